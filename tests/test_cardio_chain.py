"""A cardiac study with CT calcium, cine and flow series through index, de-identification, the four steps and the
warehouse (the library path the DAG's tasks call); bad MR series quarantined with their reasons; the others go on.

The DAG itself runs such a study in ``test_e2e_dags``; the phantoms' accuracy across their variations is in
``test_cardio_cine`` and ``test_cardio_flow``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from imaging_tasks.synth import phi

SPECIALTY = "cardiovascular"


def _run(landing, lake_root, warehouse, *, deid=None, options=None):
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.pipeline import Lake, audit_deidentified, deidentify_study, index_landing, load, process_study
    from imaging_tasks.warehouse import DuckDBWarehouse

    lake = Lake(lake_root, SPECIALTY)
    summary = index_landing(landing / SPECIALTY, lake, key=DEMO_KEY)
    done = []
    for study in summary["studies"]:
        clean = deidentify_study(study, lake, key=DEMO_KEY, demo=True, options=deid)
        audit_deidentified(clean, lake)
        done.append(process_study(clean, lake, device="cpu", options=options))
    wh = DuckDBWarehouse(warehouse)
    load([], lake, wh)
    return done, wh


def _truth(landing, label="study-000"):
    return json.loads((landing / "_truth" / SPECIALTY / f"{label}.json").read_text())["truth"]


@pytest.fixture(scope="module")
def full_study(tmp_path_factory):
    """One study: CT calcium + cine + 2-D PC + 4-D flow, de-identified in strict mode (keeps only allow-listed
    attributes: what the steps read must survive it) and processed with the defaults."""
    from imaging_tasks.cardiovascular.synth import synthesize

    root = tmp_path_factory.mktemp("cv-chain")
    synthesize(root / "landing", 1, 5, with_cine=True, with_flow="both")
    from imaging_tasks.deid.dicom import DeidOptions

    done, wh = _run(root / "landing", root / "lake", root / "wh.duckdb", deid=DeidOptions(strict=True))
    return root, done, wh


def test_every_series_measured_after_strict_deidentification(full_study):
    root, done, wh = full_study
    assert [d["status"] for d in done] == ["ok"]
    truth = _truth(root / "landing")
    m = dict(wh.query("SELECT metric, value FROM results"))
    routed = json.loads(next((root / "lake" / "derived").rglob("series.json")).read_text())["counts"]
    assert routed["calcium_ct"] == 1 and routed["cine"] == 1 and routed["flow"] >= 2
    assert m["agatston_score"] == pytest.approx(truth["agatston"], abs=1e-9)
    cine = truth["cine"]
    assert m["lv_ef_pct"] == pytest.approx(cine["ef_pct"], abs=2.0)
    assert m["lv_edv_ml"] == pytest.approx(cine["edv_ml"], rel=0.05)
    assert m["lv_esv_ml"] == pytest.approx(cine["esv_ml"], rel=0.05)
    for prefix, t in (("pc", truth["flow"]["pc"]), ("flow4d", truth["flow"]["flow4d"])):
        assert m[f"{prefix}_net_flow_ml"] == pytest.approx(t["net_flow_ml"], rel=0.02), prefix
        assert m[f"{prefix}_regurgitant_fraction_pct"] == pytest.approx(t["regurgitant_fraction_pct"], abs=2.0)

    # per-phase volumes and per-frame flow in findings, through the one schema
    kinds = dict(wh.query("SELECT kind, count(*) FROM findings GROUP BY kind"))
    assert kinds["lv_phase_volume"] == cine["phases"]
    assert kinds["pc_flow_frame"] == truth["flow"]["pc"]["frames"]
    assert kinds["flow4d_flow_frame"] == truth["flow"]["flow4d"]["frames"]
    assert kinds["calcified_lesion"] == truth["lesion_count"]
    volumes = [json.loads(p)["volume_ml"] for (p,) in
               wh.query("SELECT properties FROM findings WHERE kind = 'lv_phase_volume' ORDER BY finding_index")]
    assert np.allclose(volumes, cine["volumes_ml"], rtol=0.06, atol=2.0)

    # every step's outputs published together; no PHI in them (the audit already failed closed otherwise)
    derived = next((root / "lake" / "derived").rglob("results.json")).parent
    names = {p.relative_to(derived).as_posix() for p in derived.rglob("*") if p.is_file()}
    assert {"route_series/series.json", "calcium_scoring/lesions.json", "cine_function/cine_volumes.json",
            "flow.json", "qc_flow_curve.png"} <= names
    values = [v for v in phi.phi_values(phi.fake_study(np.random.default_rng([5, 0]), "study-000")) if len(v) >= 6]
    for p in derived.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert not any(v.encode() in data for v in values)


def test_bad_mr_series_quarantine_their_study_with_the_reason(tmp_path):
    """Cine without trigger times, phase without VENC, magnitude and phase that do not match: each study held with
    its reason, once; a good study in the same night is loaded."""
    from imaging_tasks.cardiovascular import synth_cine, synth_flow

    landing = tmp_path / "landing"
    cases = {
        "no-trigger": (lambda f, s, r: synth_cine.write_cine_series(f, s, r, omit_trigger_time=True, slices=6,
                                                                       phases=10), "missing_trigger_time"),
        "no-venc": (lambda f, s, r: synth_flow.write_pc_series(f, s, r, defect="missing_venc", frames=10),
                    "missing_venc"),
        "mismatch": (lambda f, s, r: synth_flow.write_pc_series(f, s, r, defect="mismatched_magnitude_phase",
                                                                   frames=10), "mismatched_magnitude_phase"),
        "good": (lambda f, s, r: synth_flow.write_pc_series(f, s, r, frames=10), None),
    }
    for i, (label, (write, _reason)) in enumerate(cases.items()):
        rng = np.random.default_rng([9, i])
        folder = landing / SPECIALTY / label
        folder.mkdir(parents=True)
        write(folder, phi.fake_study(rng, label), rng)
    done, wh = _run(landing, tmp_path / "lake", tmp_path / "wh.duckdb")
    assert sorted(d["status"] for d in done) == ["ok", "quarantined", "quarantined", "quarantined"]
    reasons = sorted(r for (r,) in wh.query("SELECT reason FROM ledger WHERE state = 'quarantined'"))
    assert reasons == sorted(r for _w, r in cases.values() if r)
    assert wh.query("SELECT count(*) FROM ledger WHERE state = 'loaded'") == [(1,)]
    assert wh.query("SELECT count(*) FROM results WHERE metric = 'pc_net_flow_ml'") == [(1,)]
    messages = [m for (m,) in wh.query("SELECT message FROM ledger WHERE state = 'quarantined'")]
    assert all(len(m) > 40 for m in messages)  # says what was wrong and what to do


def test_dag_runs_the_site_model_a_variable_names(airflow_db, buckets, monkeypatch, tmp_path):
    """The way a site uses its own model: the URI in the Airflow Variable ``imaging_cine_model_uri`` (here as
    env AIRFLOW_VAR_*), the run triggered with ``cine_segmentation = model``; the warehouse gets the model's
    numbers (LV mass only a myocardium-labelling model gives), identical to the step run by hand on the same files."""
    from airflow.dag_processing.dagbag import DagBag
    from byo_models import Bands, config, save_model

    from imaging_tasks.cardiovascular import cine, synth_cine
    from imaging_tasks.warehouse import DuckDBWarehouse

    model = save_model(tmp_path, Bands(mus=(0.05, 0.9, 0.3)), config(name="site-lv"), "site-lv.pt")
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_CINE_MODEL_URI", model.as_uri())
    rng = np.random.default_rng(3)
    folder = buckets["landing"] / SPECIALTY / "cine-only"
    folder.mkdir(parents=True)
    synth_cine.write_cine_series(folder, phi.fake_study(rng, "cine-only"), rng, slices=6, phases=10, matrix=48,
                                 pixel_mm=5.0)
    dag = DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags")).dags[SPECIALTY]
    run = dag.test(run_conf={"cine_segmentation": "model", "landing_quiet_seconds": 0})
    assert run.state == "success"
    m = dict(DuckDBWarehouse(buckets["warehouse"]).query("SELECT metric, value FROM results"))
    by_hand = cine.cine_function(sorted(folder.glob("*.dcm")), tmp_path / "by-hand", cine_segmentation="model",
                                 cine_model_uri=str(model), device="cpu")
    expected = {x["name"]: x["value"] for x in by_hand["metrics"]}
    for name in ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "lv_mass_g"):
        assert m[name] == pytest.approx(expected[name], rel=1e-9), name
