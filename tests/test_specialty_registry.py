"""One specialty, one folder: generic code reads records; a hospital adds a specialty from its own package.

The toy specialty below lives in a temporary folder with its own distribution metadata (an entry point in the
``imaging_tasks.specialties`` group), exactly as an installed package would; its two-step chain (a CPU step, then
a GPU step that reads the first one's outputs) runs end to end through a DAG file written like the built-in ones.
"""
from __future__ import annotations

import ast
import json
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILT_IN = ("neuroimaging", "cardiovascular", "pathology", "mammography")

TOY_INIT = '''
"""A toy specialty: DX images, a mean-intensity measure then a report that reads it."""
from imaging_tasks.specialty import Option, Specialty, Step

SPECIALTY = Specialty(
    name="toy", title="Toy", summary="Toy DX measurements", file_kind="dicom", modalities=frozenset({"DX"}),
    steps=(Step("measure", "toy_imaging.steps:measure", gpu=False),
           Step("report", "toy_imaging.steps:report", gpu=True)),
    options=(Option("scale", "number", 2.0, "Scale factor", "multiplies the mean", minimum=0.5, maximum=10),),
    synthesizer="toy_imaging.synth:synthesize", results="`results` holds `mean_scaled` and `n_images`.",
    order=50)
'''

TOY_STEPS = '''
import json
from pathlib import Path

import numpy as np
import pydicom


def measure(files, out_dir, *, device=None, scale=2.0):
    from imaging_tasks.errors import BadInput

    means = [float(pydicom.dcmread(str(f)).pixel_array.mean()) for f in files]
    if np.mean(means) > 1000:
        raise BadInput("too_bright", "the toy measure is defined below 1000; re-acquire")
    (Path(out_dir) / "measure.json").write_text(json.dumps({"mean": float(np.mean(means)), "n": len(means)}))
    return {"metrics": [{"name": "mean_scaled", "value": float(np.mean(means)) * scale, "unit": "1"}],
            "findings": [], "outputs": ["measure.json"]}


def report(files, out_dir, *, device=None, previous=None):
    measured = json.loads((Path(previous["measure"]) / "measure.json").read_text())
    (Path(out_dir) / "report.txt").write_text(f"{measured['n']} image(s) on {device}")
    return {"metrics": [{"name": "n_images", "value": float(measured["n"]), "unit": "count"}],
            "findings": [{"kind": "note", "index": 0, "n": measured["n"]}], "outputs": ["report.txt"]}
'''

TOY_SYNTH = '''
import json
from pathlib import Path

import numpy as np

from imaging_tasks.synth.phi import dicom_dataset, fake_study, new_uid, phi_values, write_dicom


def synthesize(out, studies, seed, **_ignored):
    rng = np.random.default_rng(seed)
    truths = []
    for n in range(studies):
        study = fake_study(rng, f"toy-{n}")
        series = new_uid(rng)
        folder = Path(out) / "toy" / f"study-{n:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        means = []
        for i in range(3):
            ds = dicom_dataset(study, modality="DX", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", series_uid=series,
                               sop_uid=new_uid(rng), series_number=1, instance_number=i + 1,
                               series_description="toy")
            base = 100 * (n + 1) if n < 2 else 2000  # the third study is too bright for the toy measure
            pixels = rng.integers(base, base + 50, size=(16, 16), dtype=np.uint16)
            ds.Rows = ds.Columns = 16
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.ImagerPixelSpacing = [0.2, 0.2]
            ds.PixelData = pixels.tobytes()
            write_dicom(ds, str(folder / f"{i:03d}.dcm"))
            means.append(float(pixels.mean()))
        truth = Path(out) / "_truth" / "toy" / f"study-{n:03d}.json"
        truth.parent.mkdir(parents=True, exist_ok=True)
        truth.write_text(json.dumps({"study_uid": study.study_uid, "mean": float(np.mean(means)),
                                     "phi": phi_values(study)}))
        truths.append(truth)
    return truths
'''

TOY_DAG = '''
"""## Toy: a two-step chain (an Airflow DAG file, written like the built-in ones)"""
from imaging_dags import (audit_phi, deidentify, imaging_dag, index_studies, landing_sensor, load_metadata,
                          ready_for_processing, study_step)

SPECIALTY = "toy"


@imaging_dag(SPECIALTY, summary=__doc__)
def toy():
    arrived = landing_sensor(SPECIALTY)
    studies = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(batch=studies)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(batch=clean)
    ready = ready_for_processing(SPECIALTY, audited)
    measured = study_step(SPECIALTY, "measure").expand(batch=ready)
    reported = study_step(SPECIALTY, "report").expand(batch=measured)
    load_metadata(SPECIALTY, reported)


toy()
'''


@pytest.fixture()
def toy_package(tmp_path, monkeypatch):
    """A package + distribution metadata in a temporary folder on sys.path: what `pip install` would leave."""
    from imaging_tasks import specialties

    site = tmp_path / "site"
    (site / "toy_imaging").mkdir(parents=True)
    (site / "toy_imaging" / "__init__.py").write_text(TOY_INIT)
    (site / "toy_imaging" / "steps.py").write_text(TOY_STEPS)
    (site / "toy_imaging" / "synth.py").write_text(TOY_SYNTH)
    dist = site / "toy_imaging-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-imaging\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[imaging_tasks.specialties]\ntoy = toy_imaging:SPECIALTY\n")
    monkeypatch.syspath_prepend(str(site))
    specialties.refresh()
    yield site
    specialties.refresh()
    for name in [m for m in sys.modules if m == "toy_imaging" or m.startswith("toy_imaging.")]:
        del sys.modules[name]


def test_the_registry_lists_built_ins_in_order_and_an_installed_specialty(toy_package):
    from imaging_tasks import specialties

    assert specialties.names() == (*BUILT_IN, "toy")
    toy = specialties.get("toy")
    assert [s.name for s in toy.steps] == ["measure", "report"] and toy.modalities == {"DX"}
    with pytest.raises(ValueError, match="unknown specialty 'dermatology'"):
        specialties.get("dermatology")


def test_cli_knows_the_installed_specialty_and_its_flags(toy_package, tmp_path):
    from imaging_tasks.cli import build_parser, main

    args = build_parser().parse_args(["run", "toy", "--landing", "l", "--lake", "k", "--warehouse", "w",
                                      "--scale", "3"])
    assert args.specialty == "toy" and args.scale == 3.0
    with pytest.raises(SystemExit) as exc:  # out of the option's bounds: refused before anything runs
        main(["run", "toy", "--landing", str(tmp_path), "--lake", str(tmp_path / "lake"), "--warehouse",
              str(tmp_path / "w.duckdb"), "--scale", "50", "--demo-key"])
    assert exc.value.code == 2


@pytest.mark.e2e
def test_an_installed_toy_specialty_runs_its_two_step_dag_end_to_end(toy_package, airflow_db, buckets, tmp_path,
                                                                       monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.deid.pseudonym import pseudo_id
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.warehouse import DuckDBWarehouse

    truths = [json.loads(p.read_text()) for p in synthesizer("toy")(buckets["landing"], 3, 5)]
    bright = truths.pop()  # its first step quarantines it: the second step is skipped, the others load
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "toy.py").write_text(TOY_DAG)
    # the hospital's DAG folder is a DAG bundle of its own beside the project's (dag.test syncs bundles)
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([
        {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {}},
        {"name": "toy-dags", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
         "kwargs": {"path": str(dags)}}]))
    bag = DagBag(dag_folder=str(dags))
    assert bag.import_errors == {}
    dag = bag.dags["toy"]
    assert dag.get_task("measure").queue != dag.get_task("report").queue  # only the GPU step takes the GPU queue
    assert dag.get_task("report").pool == "gpu" and dag.get_task("measure").pool != "gpu"
    assert dag.params["scale"] == 2.0
    run = dag.test(run_conf={"landing_quiet_seconds": 0, "scale": 3.0})
    assert run.state == "success"

    wh = DuckDBWarehouse(buckets["warehouse"])
    got = {s: v for s, v in wh.query("SELECT study_id, value FROM results WHERE metric = 'mean_scaled'")}
    want = {pseudo_id(DEMO_KEY, t["study_uid"], "study"): t["mean"] * 3.0 for t in truths}
    assert got == pytest.approx(want)
    assert {v for (v,) in wh.query("SELECT value FROM results WHERE metric = 'n_images'")} == {3.0}
    bright_study = pseudo_id(DEMO_KEY, bright["study_uid"], "study")
    assert sorted(wh.query("SELECT state, reason FROM ledger WHERE specialty = 'toy'")) == \
        [("loaded", None), ("loaded", None), ("quarantined", "too_bright")]
    assert wh.query("SELECT reason FROM ledger WHERE study_id = ?", [bright_study]) == [("too_bright",)]
    from test_run_behaviour import _states

    assert _states("toy", run.run_id)["report"] == {"success", "skipped"}  # Airflow's own skip for that one
    # the published study holds both steps' outputs
    derived = buckets["lake"] / "derived" / "toy"
    assert len(list(derived.rglob("measure/measure.json"))) == 2 and len(list(derived.rglob("report.txt"))) == 2
    text = "\n".join(repr(r) for r in wh.query("SELECT * FROM studies"))
    assert not any(v in text for t in truths for v in t["phi"] if len(v) >= 6)


def test_no_generic_module_names_a_specialty():
    """Outside imaging_tasks/<specialty>/, the code never names one: no string literal equal to a specialty's
    name, no import of a specialty package (docstrings and comments may mention them)."""
    offenders = []
    roots = [REPO / "imaging_tasks", REPO / "plugins"]
    for root in roots:
        for path in root.rglob("*.py"):
            rel = path.relative_to(REPO)
            if rel.parts[:2] in {("imaging_tasks", name) for name in BUILT_IN}:
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                          and node.body and isinstance(node.body[0], ast.Expr)
                          and isinstance(node.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                        and node.value in BUILT_IN:
                    offenders.append(f"{rel}:{node.lineno} names {node.value!r}")
                if isinstance(node, ast.ImportFrom) and node.module and any(
                        node.module == f"imaging_tasks.{n}" or node.module.startswith(f"imaging_tasks.{n}.")
                        for n in BUILT_IN):
                    offenders.append(f"{rel}:{node.lineno} imports {node.module}")
    assert offenders == [], textwrap.indent("\n".join(offenders), "  ")


def test_every_step_passes_a_declared_study_record(buckets):
    """Index, de-identification, audit, processing and the ledger's reload all hand on records that validate
    against the declared schema (no stray fields, statuses from the list)."""
    import jsonschema

    from imaging_tasks.contracts import JSON_SCHEMA, study_record
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.pipeline import (Lake, audit_deidentified, deidentify_study, index_landing, pending_loads,
                                        process_study)
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.synth.bad_inputs import write_bad_inputs

    synthesizer("mammography")(buckets["landing"], 1, 61)
    write_bad_inputs(buckets["landing"], "mammography", seed=2)
    lake = Lake(buckets["lake"], "mammography")
    records = []
    for study in index_landing(buckets["landing"] / "mammography", lake, key=DEMO_KEY)["studies"]:
        clean = deidentify_study(study, lake, key=DEMO_KEY, demo=True)
        records += [study, clean]
        if clean["status"] == "ok":
            audit_deidentified(clean, lake)
            records.append(process_study(clean, lake, device="cpu"))
    assert {r["status"] for r in records} == {"ok", "quarantined"}  # the truncated file is a study of its own
    for record in records:
        jsonschema.validate(record, JSON_SCHEMA)
    assert pending_loads(lake)  # published and quarantined studies wait for the load
    with pytest.raises(TypeError, match="no field"):
        study_record(specialty="x", study="S1", patient="P1", fingerprint="f", raw_path="/landing/Doe^Jane")
