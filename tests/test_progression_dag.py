"""The progression DAG as a site runs it: scheduled on the neuroimaging warehouse asset; score uploads with raw
patient IDs pseudonymised into the warehouse; predictions for exactly the patients whose data changed, once per
change; no model configured: predict skipped."""
from __future__ import annotations

import csv
import datetime as dt
import json
import os
from pathlib import Path

import pytest

import test_bigquery
from imaging_tasks.deid.keys import DEMO_KEY
from imaging_tasks.progression.cohort import CohortParams, synthesize_cohort

REPO = Path(__file__).resolve().parents[1]
SPECIALTY = "neuroimaging"  # the specialty whose ROI features feed progression
HORIZONS, OUTPUTS = 5, 3  # the trainer's defaults: 6, 12, 18, 24, 36 months x MMSE, CDR_SB, ADAS_Cog

emulator, bq = test_bigquery.emulator, test_bigquery.bq  # the BigQuery emulator's fixtures


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    import torch

    from imaging_tasks.progression.train import train_progression

    torch.set_num_threads(1)
    sessions, scores, truth = synthesize_cohort(24, seed=77)  # other patients than the DAG's
    result = train_progression(sessions, scores, seed=0, epochs=3, hidden=8, truth=truth,
                               out=tmp_path_factory.mktemp("model") / "progression")
    return result.model_uri


def _load_sessions(warehouse, rows: list[dict]) -> None:
    studies = {r["study_id"]: {"specialty": SPECIALTY, "study_id": r["study_id"], "patient_id": r["patient_id"],
                               "study_date": r["study_date"], "status": "loaded"} for r in rows}
    with warehouse.transaction() as tx:
        tx.upsert("studies", list(studies.values()))
        tx.upsert("roi_features", [{k: r[k] for k in ("specialty", "study_id", "atlas", "roi", "metric", "value",
                                                       "unit")} for r in rows])


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["patient_id", "date", "score", "value"])
        writer.writeheader()
        writer.writerows(rows)


def _xcom_text(dag_id: str) -> str:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return "\n".join(json.dumps(v, default=str) for v in
                         session.scalars(select(XComModel.value).where(XComModel.dag_id == dag_id)))


def _summary(run_id: str) -> dict:
    return _xcom_value("predict", run_id, key="summary")


def _states(run) -> dict[str, str]:
    return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in run.get_task_instances()}


def _prediction_events() -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return list(session.scalars(select(AssetEvent.extra).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                                    .where(AssetModel.name == "imaging_progression_predictions")))


def test_dag_parses_scheduled_on_the_neuroimaging_warehouse_asset():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "progression.py"))
    assert bag.import_errors == {}
    dag = bag.dags["progression"]
    assets = [asset.name for asset in dag.timetable.asset_condition.objects]
    assert assets == [f"imaging_{SPECIALTY}_warehouse"]
    assert dag.max_active_runs == 1 and not dag.catchup
    assert dag.get_task("predict").upstream_task_ids == {"ingest_scores"}
    assert [o.name for o in dag.get_task("predict").outlets] == ["imaging_progression_predictions"]
    for t in dag.tasks:
        assert t.owner == "imaging-data-eng" and t.retries >= 1 and t.execution_timeout is not None, t.task_id


def test_runs_predict_changed_patients_once(model_uri, airflow_db, buckets, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    from imaging_tasks.warehouse import TABLES, DuckDBWarehouse

    sessions, _, truth = synthesize_cohort(12, seed=5, key=DEMO_KEY, params=CohortParams(sessions=(1, 5)))
    warehouse = DuckDBWarehouse(buckets["warehouse"])
    _load_sessions(warehouse, sessions)
    raw = truth.raw_score_rows()
    raw_ids = sorted({r["patient_id"] for r in raw})
    n_sessions = {p.patient_id: len(p.session_days) for p in truth.patients.values()}
    by_raw = {p.raw_id: p.patient_id for p in truth.patients.values()}
    # one patient with several sessions has no score uploaded: refused (a model feature never measured)
    unscored = next(r for r in raw_ids if n_sessions[by_raw[r]] >= 2)
    uploads = buckets["landing"] / "cognitive_scores"
    half = raw_ids[:6]
    _write_csv(uploads / "site-a" / "scores.csv", [r for r in raw if r["patient_id"] in half
                                                   and r["patient_id"] != unscored])
    import pyarrow as pa
    import pyarrow.parquet as pq

    (uploads / "site-b").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([r for r in raw if r["patient_id"] not in half
                                         and r["patient_id"] != unscored]), uploads / "site-b" / "scores.parquet")
    (uploads / "bad.csv").write_text(f"id,when,score,value\n{raw_ids[0]},2020-01-01,MMSE,27\n")
    before = {p: p.read_bytes() for p in uploads.rglob("*") if p.is_file()}
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_PROGRESSION_MODEL_URI", str(model_uri))
    dag = DagBag(dag_folder=str(REPO / "dags" / "progression.py")).dags["progression"]

    # run 1: every patient with enough sessions and all features predicted, exactly once
    run1 = dag.test(run_conf={"landing_quiet_seconds": 0})
    assert run1.state == "success" and _states(run1) == {"ingest_scores": "success", "predict": "success"}
    expected = {pid for pid, n in n_sessions.items() if n >= 2 and pid != by_raw[unscored]}
    refused = set(n_sessions) - expected
    assert expected and refused
    rows = warehouse.query("SELECT patient_id, model, model_version, horizon_months, score, run_id, "
                           "CAST(computed_at AS VARCHAR) FROM predictions")
    assert len(rows) == len(expected) * HORIZONS * OUTPUTS
    assert {r[0] for r in rows} == expected and {r[5] for r in rows} == {run1.run_id}
    assert warehouse.count("cognitive_scores") == len([r for r in raw if r["patient_id"] != unscored])
    assert warehouse.count("cognitive_scores", "WHERE specialty = ?", [SPECIALTY]) == warehouse.count(
        "cognitive_scores")
    summary = _summary(run1.run_id)
    assert summary["predicted"] == len(expected) and summary["refused"] == len(refused)
    assert summary["refused_by_reason"] == {"not_enough_sessions": len(refused) - 1, "missing_features": 1}
    ingest = _xcom_value("ingest_scores", run1.run_id)
    assert ingest == {"uploads": 3, "loaded": 2, "already_loaded": 0, "waiting": 0, "malformed": 1, "superseded": 0,
                      "rows": warehouse.count("cognitive_scores"), "superseded_rows": 0}
    (event,) = _prediction_events()
    assert event["predicted"] == len(expected) and event["rows"] == len(rows)
    refusals = dict(warehouse.query("SELECT patient_id, reason FROM prediction_refusals"))
    assert set(refusals) == refused and refusals[by_raw[unscored]] == "missing_features"
    computed = {r[0]: r[6] for r in rows}

    # no raw patient ID anywhere in the warehouse or the XComs; the uploads untouched
    dump = "\n".join(json.dumps(warehouse.query(f"SELECT * FROM {t}"), default=str) for t in TABLES)
    xcoms = _xcom_text("progression")
    assert "MRN" not in dump and "MRN" not in xcoms
    assert not any(r in dump or r in xcoms for r in raw_ids)
    assert {p: p.read_bytes() for p in uploads.rglob("*") if p.is_file()} == before

    # run 2: nothing changed: nothing computed (predict skipped: no write, no event), uploads not reloaded
    run2 = dag.test(run_conf={"landing_quiet_seconds": 0})
    assert run2.state == "success" and _states(run2)["predict"] == "skipped"
    assert _xcom_value("ingest_scores", run2.run_id)["already_loaded"] == 2
    assert _summary(run2.run_id)["predicted"] == 0
    assert _summary(run2.run_id)["refused"] == 0  # refused patients are not looked at again until their data change
    again = warehouse.query("SELECT patient_id, CAST(computed_at AS VARCHAR), run_id FROM predictions")
    assert {r[0]: r[1] for r in again} == computed and {r[2] for r in again} == {run1.run_id}
    assert len(_prediction_events()) == 1

    # run 3: a new session of one patient, and a second session of a patient refused for having one: those two
    # only are recomputed; the refused one is predicted now and its refusal goes
    patient = sorted(expected)[0]
    single = sorted(p for p in refused if n_sessions[p] == 1)[0]
    for who, study in ((patient, "NEWSESSION1"), (single, "NEWSESSION2")):
        last = max((r for r in sessions if r["patient_id"] == who), key=lambda r: r["study_date"])["study_date"]
        later = (dt.datetime.strptime(last, "%Y%m%d") + dt.timedelta(days=200)).strftime("%Y%m%d")
        _load_sessions(warehouse, [{**r, "study_id": study, "study_date": later}
                                   for r in sessions if r["patient_id"] == who and r["study_date"] == last])
    run3 = dag.test(run_conf={"landing_quiet_seconds": 0})
    assert run3.state == "success" and _states(run3)["predict"] == "success"
    rows3 = warehouse.query("SELECT patient_id, CAST(computed_at AS VARCHAR), run_id, as_of_study_id, n_sessions "
                            "FROM predictions WHERE patient_id != ?", [single])
    assert len(rows3) == len(rows)
    changed = {r[0] for r in rows3 if r[2] == run3.run_id}
    assert changed == {patient}
    assert warehouse.count("predictions", "WHERE patient_id = ? AND run_id = ?", [single, run3.run_id]) == \
        HORIZONS * OUTPUTS
    assert dict(warehouse.query("SELECT patient_id, reason FROM prediction_refusals")) == \
        {p: r for p, r in refusals.items() if p != single}
    assert {r[3] for r in rows3 if r[0] == patient} == {"NEWSESSION1"}
    assert {r[4] for r in rows3 if r[0] == patient} == {n_sessions[patient] + 1}
    assert {r[0]: r[1] for r in rows3 if r[0] != patient} == {p: c for p, c in computed.items() if p != patient}
    assert _summary(run3.run_id)["predicted"] == 2 and _summary(run3.run_id)["refused"] == 0

    # no model configured: predict skipped, the run succeeds, nothing written
    monkeypatch.delenv("AIRFLOW_VAR_IMAGING_PROGRESSION_MODEL_URI")
    run4 = dag.test(run_conf={"landing_quiet_seconds": 0})
    assert run4.state == "success" and _states(run4) == {"ingest_scores": "success", "predict": "skipped"}
    assert warehouse.count("predictions", "WHERE run_id = ?", [run4.run_id]) == 0


def _xcom_value(task_id: str, run_id: str, key: str = "return_value"):
    """A progression task's XCom of the run, decoded."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.scalar(select(XComModel.value).where(
            XComModel.dag_id == "progression", XComModel.run_id == run_id, XComModel.task_id == task_id,
            XComModel.key == key))
    return json.loads(value) if isinstance(value, str) else value


def test_a_correction_uploaded_later_wins_and_stays(tmp_path):
    """An upload whose every row a later upload corrected is re-read (its sha256 is gone from the warehouse) but
    never undoes the correction."""
    from imaging_tasks.progression.store import ingest
    from imaging_tasks.warehouse import DuckDBWarehouse

    warehouse = DuckDBWarehouse(tmp_path / "w.duckdb")
    landing = tmp_path / "cognitive_scores"
    _write_csv(landing / "a.csv", [{"patient_id": "MRN-1", "date": "2020-01-01", "score": "MMSE", "value": 20}])
    first = ingest(str(landing), warehouse, SPECIALTY, DEMO_KEY, quiet_s=0)
    assert (first["loaded"], first["rows"]) == (1, 1)
    _write_csv(landing / "b.csv", [{"patient_id": "MRN-1", "date": "2020-01-01", "score": "MMSE", "value": 24}])
    old = os.stat(landing / "a.csv").st_mtime
    os.utime(landing / "b.csv", (old + 60, old + 60))
    second = ingest(str(landing), warehouse, SPECIALTY, DEMO_KEY, quiet_s=0)
    assert (second["loaded"], second["already_loaded"], second["rows"]) == (1, 1, 1)
    for _ in range(2):  # a.csv is re-read, but its one row is B's now
        third = ingest(str(landing), warehouse, SPECIALTY, DEMO_KEY, quiet_s=0)
        assert (third["superseded"], third["superseded_rows"], third["rows"], third["loaded"],
                third["already_loaded"]) == (1, 1, 0, 0, 1)
        assert warehouse.query("SELECT value FROM cognitive_scores") == [(24.0,)]
    # an upload still being written waits for the quiet period
    _write_csv(landing / "c.csv", [{"patient_id": "MRN-2", "date": "2020-01-01", "score": "MMSE", "value": 25}])
    assert ingest(str(landing), warehouse, SPECIALTY, DEMO_KEY, quiet_s=3600)["waiting"] >= 1


def test_changed_patients_and_score_uploads_in_bigquery(bq, tmp_path):
    """The same queries and upserts on BigQuery (the emulator): table names qualified, ``?`` parameters."""
    from imaging_tasks.progression.store import changed_rows, ingest

    sessions, _, truth = synthesize_cohort(3, seed=8, key=DEMO_KEY)
    _load_sessions(bq, sessions)
    _write_csv(tmp_path / "cognitive_scores" / "s.csv", truth.raw_score_rows())
    counts = ingest(str(tmp_path / "cognitive_scores"), bq, SPECIALTY, DEMO_KEY, quiet_s=0)
    assert (counts["loaded"], counts["rows"]) == (1, len(truth.raw_scores))
    assert ingest(str(tmp_path / "cognitive_scores"), bq, SPECIALTY, DEMO_KEY, quiet_s=0)["already_loaded"] == 1
    rows, scores, patients = changed_rows(bq, SPECIALTY, "m", "1")
    assert patients == 3 and len(rows) == len(sessions) and len(scores) == len(truth.raw_scores)
    done = sorted(truth.patients)[0]
    bq.upsert("predictions", [{"specialty": SPECIALTY, "patient_id": done, "model": "m", "model_version": "1",
                               "horizon_months": 6, "score": "MMSE", "value": 25.0,
                               "computed_at": dt.datetime.now(dt.timezone.utc)}])
    rows, scores, patients = changed_rows(bq, SPECIALTY, "m", "1")
    assert {r["patient_id"] for r in rows} == set(truth.patients) - {done} and patients == 3
    assert done not in {r["patient_id"] for r in scores}
    assert len(changed_rows(bq, SPECIALTY, "m", "2")[0]) == len(sessions)  # another version: every patient


def test_the_two_steps_from_the_command_line_with_relative_paths(model_uri, tmp_path):
    """``imaging-tasks ingest-scores`` and ``predict-progression`` (a subprocess, run from the data folder with
    relative paths): the DAG's two steps outside Airflow, on the same library calls, with their exit statuses."""
    import shutil
    import subprocess
    import sys

    from imaging_tasks.warehouse import DuckDBWarehouse

    sessions, _, truth = synthesize_cohort(5, seed=8, key=DEMO_KEY, params=CohortParams(sessions=(1, 4)))
    _load_sessions(DuckDBWarehouse(tmp_path / "wh.duckdb"), sessions)
    _write_csv(tmp_path / "landing" / "cognitive_scores" / "scores.csv", truth.raw_score_rows())
    for suffix in (".pt", ".json"):
        shutil.copy(Path(model_uri).with_suffix(suffix), tmp_path / f"model{suffix}")
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGING_DEID_KEY", "IMAGING_DEID_DEMO")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "imaging_tasks.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    no_key = cli("ingest-scores", "--scores", "landing/cognitive_scores", "--warehouse", "wh.duckdb")
    assert no_key.returncode == 2 and "key" in no_key.stderr.lower()
    ingest = cli("ingest-scores", "--scores", "landing/cognitive_scores", "--warehouse", "wh.duckdb", "--demo-key")
    assert ingest.returncode == 0, ingest.stderr
    assert json.loads(ingest.stdout)["uploads"]["loaded"] == 1
    n_sessions = {p.patient_id: len(p.session_days) for p in truth.patients.values()}
    expected = {p for p, n in n_sessions.items() if n >= 2}
    first = cli("predict-progression", "--model", "model.pt", "--warehouse", "wh.duckdb", "--run-id", "by-hand")
    assert first.returncode == 0, first.stderr
    counts = json.loads(first.stdout)
    assert counts["predicted"] == len(expected) and counts["refused"] == len(n_sessions) - len(expected)
    assert counts["rows"] == len(expected) * HORIZONS * OUTPUTS
    warehouse = DuckDBWarehouse(tmp_path / "wh.duckdb")
    assert {r[0] for r in warehouse.query("SELECT DISTINCT patient_id FROM predictions WHERE run_id = 'by-hand'")} \
        == expected
    again = json.loads(cli("predict-progression", "--model", "model.pt", "--warehouse", "wh.duckdb").stdout)
    assert (again["changed"], again["predicted"], again["refused"]) == (0, 0, 0)
    raw = "\n".join([ingest.stdout, ingest.stderr, first.stdout, first.stderr])
    assert "MRN" not in raw and not any(p.raw_id in raw for p in truth.patients.values())
    missing = cli("predict-progression", "--model", "nothing.pt", "--warehouse", "wh.duckdb")
    assert missing.returncode == 2 and "nothing" in missing.stderr and "Traceback" not in missing.stderr
    no_lake = cli("ingest-scores", "--scores", "landing/cognitive_scores", "--warehouse", "wh.duckdb", "--demo-key",
                  "--fhir-base-url", "http://127.0.0.1:9/fhir")
    assert no_lake.returncode == 2 and "--lake" in no_lake.stderr
