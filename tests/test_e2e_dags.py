"""Each DAG end to end with ``dag.test()`` on synthetic studies with known ground truth.

Checks outputs against the truth, warehouse rows, quarantine of bad inputs, raw data untouched, a PHI
scan of every derived file, warehouse row and XCom, and an idempotent re-run and reprocess.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TABLES = ("studies", "series", "instances", "results", "findings", "quarantine")
pytestmark = pytest.mark.e2e


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def _truths(buckets, specialty) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((buckets["truth"] / specialty).glob("*.json"))]


def _counts(wh, specialty) -> dict[str, int]:
    return {t: wh.count(t, "WHERE specialty = ?", [specialty]) for t in TABLES}


def _warehouse_text(wh) -> str:
    return "\n".join(repr(wh.query(f"SELECT * FROM {t}")) for t in (*TABLES, "processing_runs"))


def _xcom_text(dag_id: str) -> str:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return "\n".join(json.dumps(v, default=str) for v in
                         session.scalars(select(XComModel.value).where(XComModel.dag_id == dag_id)))


def _pseudo_study(truth: dict) -> str:
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.deid.pseudonym import pseudo_id

    if truth.get("layout") == "nifti":  # an upload session: <patient>/<session>/ names the study
        patient, session = truth["session_folder"].split("/")[-2:]
        return pseudo_id(DEMO_KEY, f"{patient}/{session}", "study")
    return pseudo_id(DEMO_KEY, truth["study_uid"], "study")


def _seitzman_names() -> dict[int, str]:
    from imaging_tasks.neuroimaging.rois import label_atlas

    return {int(r["index"]): r["name"] for r in label_atlas("seitzman300").labels}


def _metrics(wh, specialty) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for study, metric, value in wh.query("SELECT study_id, metric, value FROM results WHERE specialty = ?", [specialty]):
        out.setdefault(study, {})[metric] = value
    return out


def check_results(specialty: str, wh, truths: list[dict]) -> None:
    """The processed numbers against the synthetic ground truth."""
    metrics = _metrics(wh, specialty)
    assert len(metrics) == len(truths)
    if specialty == "cardiovascular":
        for t in truths:
            m = metrics[_pseudo_study(t)]
            assert m["agatston_score"] == pytest.approx(t["truth"]["agatston"], abs=1e-9)
            assert m["calcium_volume_mm3"] == pytest.approx(t["truth"]["volume_mm3"], abs=1e-6)
            cine, flow = t["truth"].get("cine"), t["truth"].get("flow") or {}
            if cine:  # the targets: EF within 2 points, EDV/ESV within 5 %
                assert m["lv_ef_pct"] == pytest.approx(cine["ef_pct"], abs=2.0)
                assert m["lv_edv_ml"] == pytest.approx(cine["edv_ml"], rel=0.05)
                assert m["lv_esv_ml"] == pytest.approx(cine["esv_ml"], rel=0.05)
            for prefix, truth in flow.items():  # net flow within 2 %, regurgitant fraction within 2 points
                assert m[f"{prefix}_net_flow_ml"] == pytest.approx(truth["net_flow_ml"], rel=0.02)
                assert m[f"{prefix}_regurgitant_fraction_pct"] == pytest.approx(truth["regurgitant_fraction_pct"],
                                                                                abs=2.0)
    elif specialty == "neuroimaging":
        for t in truths:
            study = _pseudo_study(t)
            m = metrics[study]
            assert m["brain_volume_ml"] == pytest.approx(t["truth"]["parenchyma_volume_ml"], rel=0.03)
            assert m["intracranial_volume_ml"] == pytest.approx(t["truth"]["intracranial_volume_ml"], rel=0.03)
            # the whole chain ran: ROI rows of the default atlas (Seitzman-300) with SUVR, and whole-brain rows
            rows = wh.query("SELECT roi, metric, value FROM roi_features WHERE specialty = ? AND study_id = ?",
                            ["neuroimaging", study])
            assert len({r[0] for r in rows}) == 301
            suvr = [v for roi, metric, v in rows if metric == "mean_suvr"]
            assert len(suvr) >= 290 and 0.3 < float(np.median(suvr)) < 3.0
            bold, dwi = t["truth"].get("bold"), t["truth"].get("dwi")
            if bold:  # the BOLD run went through the GLM: planted ROI responses back in the warehouse, with sign
                beta = {(roi, metric): v for roi, metric, v in rows if metric.startswith("beta_")}
                index_to_name = _seitzman_names()
                for condition, per_roi in bold["amplitudes_percent"].items():
                    for planted, amplitude in per_roi.items():
                        roi = index_to_name[bold["active_roi_index"][planted]]
                        assert beta[(roi, f"beta_{condition}")] == pytest.approx(amplitude, abs=0.35 * abs(amplitude))
                quiet = [v for (roi, metric), v in beta.items()
                         if roi not in {index_to_name[i] for i in bold["active_roi_index"].values()}]
                assert len(quiet) > 500 and float(np.percentile(np.abs(quiet), 95)) < 0.5
                assert m["bold_volumes"] == bold["n_volumes"] and m["z_max_motor"] > 5
            if dwi:  # the DWI through the tensor fit and tractography
                fa = [v for roi, metric, v in rows if metric == "fa_mean"]
                assert len(fa) >= 290 and 0.05 < float(np.median(fa)) < 0.5
                assert 0.4 < m["white_matter_mean_fa"] < dwi["white_matter_fa"] + 0.05
                assert m["streamlines"] > 1000 and 10 < m["streamline_mean_length_mm"] < 150
    elif specialty == "mammography":
        for t in truths:
            planted = sum(len(v["clusters"]) for v in t["truth"]["views"].values())
            assert planted > 0
            study = _pseudo_study(t)
            m = metrics[study]
            assert m["n_clusters"] == planted
            # the exam level reached the warehouse: density per breast and for the exam, one summary row per breast
            sides = sorted({key.split("_")[0] for key in t["truth"]["views"]})
            assert all(0 <= m[f"percent_density_{lat}"] <= 100 for lat in sides)
            assert m["percent_density"] == max(m[f"percent_density_{lat}"] for lat in sides)
            assert m["birads_density"] in (1, 2, 3, 4) and "n_seen_in_both_views" in m
            rows = wh.query("SELECT properties FROM findings WHERE specialty = ? AND study_id = ? AND kind = ?",
                            [specialty, study, "breast_summary"])
            summaries = sorted((r[0] if isinstance(r[0], dict) else json.loads(r[0]) for r in rows),
                               key=lambda s: s["laterality"])
            assert [s["laterality"] for s in summaries] == sides
            assert all(s["birads_density"] in "abcd" for s in summaries)
    elif specialty == "pathology":
        areas = sorted(m["tissue_area_mm2"] for m in metrics.values())
        expected = sorted(t["truth"]["tissue_area_mm2"] for t in truths)
        for got, want in zip(areas, expected):
            assert got == pytest.approx(want, rel=0.05)


@pytest.mark.parametrize("specialty", ["cardiovascular", "mammography", "neuroimaging", "pathology"])
def test_dag_end_to_end(specialty, airflow_db, buckets, monkeypatch):
    from imaging_tasks.specialties import get as get_specialty
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.synth.bad_inputs import write_bad_inputs
    from imaging_tasks.warehouse import DuckDBWarehouse

    if specialty == "neuroimaging":  # one DICOM session, one NIfTI upload with a BOLD run (+ events) and a DWI
        # (DICOM BOLD/DWI, classic and enhanced, through index, de-identification and loading: test_neuro_4d_inputs)
        synthesizer(specialty)(buckets["landing"], 2, 11, layout=["dicom", "nifti"], with_bold=[False, True],
                               with_dwi=[False, True])
    elif specialty == "cardiovascular":  # one study: calcium CT + short-axis cine + 2-D phase contrast (4-D flow
        # through index, strict de-identification, every step and loading: test_cardio_chain)
        synthesizer(specialty)(buckets["landing"], 1, 11, with_cine=True, with_flow="pc")
    else:
        synthesizer(specialty)(buckets["landing"], 1, 11)
    expected_bad = write_bad_inputs(buckets["landing"], specialty, seed=3)
    truths = _truths(buckets, specialty)
    raw_before = _snapshot(buckets["landing"])
    dag = _dag(specialty)
    # the truncated MR is a session of its own without PET: process MR-only sessions at once
    # the synthetic uploads are complete when written: no quiet period to wait out (tested in test_cloud_storage)
    conf = {"landing_quiet_seconds": 0, **({"mr_only_wait_hours": 0} if specialty == "neuroimaging" else {})}

    run = dag.test(run_conf=conf)
    assert run.state == "success"
    wh = DuckDBWarehouse(buckets["warehouse"])
    counts = _counts(wh, specialty)
    assert counts["studies"] == len(truths)
    assert counts["instances"] > 0 and counts["results"] > 0
    check_results(specialty, wh, truths)
    if specialty == "mammography":  # the exam's QC montage beside the per-view pictures
        derived = {p.name for p in (buckets["lake"] / "derived").rglob("*.png")}
        assert "qc_exam.png" in derived and any(n.startswith("qc_L_") or n.startswith("qc_R_") for n in derived)

    # bad inputs: each quarantined once, with the reason it deserves; the rest of the run went on
    reasons = sorted(r for (r,) in wh.query("SELECT reason FROM quarantine WHERE specialty = ?", [specialty]))
    assert reasons == sorted(expected_bad.values())
    for folder in (buckets["lake"] / "quarantine" / specialty).iterdir():
        assert (folder / "reason.json").exists() and any(p.name.startswith("input") for p in folder.iterdir())

    # raw data untouched
    assert _snapshot(buckets["landing"]) == raw_before

    # lineage: what each step read and wrote, with device and timings
    steps = {r[0] for r in wh.query("SELECT task_id FROM processing_runs WHERE specialty = ?", [specialty])}
    last = get_specialty(specialty).steps[-1].name if specialty != "pathology" else "finish_slide"
    assert {"deidentify", last} <= steps
    assert wh.query("SELECT count(*) FROM processing_runs WHERE device IS NOT NULL AND specialty = ?",
                    [specialty])[0][0] > 0

    # no PHI downstream: derived files, de-identified files, lineage, warehouse rows, XComs
    phi = sorted({v for t in truths for v in t["phi"] if len(v) >= 6})
    assert phi
    blobs = [p.read_bytes() for zone in ("anonymized", "derived", "runs") for p in (buckets["lake"] / zone).rglob("*")
             if p.is_file()]
    texts = _warehouse_text(wh) + _xcom_text(specialty)
    for value in phi:
        assert not any(value.encode() in b for b in blobs), f"PHI value of length {len(value)} in an output file"
        assert value not in texts, f"PHI value of length {len(value)} in warehouse rows or XComs"
    for p in (buckets["lake"] / "derived").rglob("*"):
        assert not any(v in str(p) for v in phi)

    # idempotent: a second run finds the studies done, a reprocess rewrites identical outputs, no duplicates
    derived_before = _snapshot(buckets["lake"] / "derived")
    assert dag.test(run_conf=conf).state == "success"
    assert _counts(wh, specialty) == counts
    assert _snapshot(buckets["lake"] / "derived") == derived_before
    if specialty != "neuroimaging":  # the session chain's ten steps again would cost ~2.5 min; reprocessing is
        #                               the same generic load path for every specialty (also test_bigquery)
        assert dag.test(run_conf={**conf, "reprocess": True}).state == "success"
        assert _counts(wh, specialty) == counts
        assert _snapshot(buckets["lake"] / "derived").keys() == derived_before.keys()
    assert _snapshot(buckets["landing"]) == raw_before
