"""What a person meets when running the DAGs: a trigger form that submits at its defaults, empty nights that end at
once, configuration errors that fail once, mapped tasks named by study, logs that carry the facts, asset events
only when rows were loaded."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
UTC = dt.timezone.utc
DAG_IDS = ("neuroimaging", "cardiovascular", "pathology", "mammography")


@pytest.fixture()
def dagbag():
    """A fresh parse per test: ``dag.test(run_conf=...)`` leaves the conf in the DAG object's params."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag


# --------------------------------------------------------------------------- Params
@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_trigger_form_submits_at_its_defaults(dagbag, dag_id):
    """Every Param validates at its default (what the form submits untouched), has a title and a section, and
    the optional ones admit null: an empty ``type="string"`` field would be required and block the form."""
    from airflow.serialization.serialized_objects import DagSerialization

    dag = dagbag.dags[dag_id]
    resolved = dag.params.validate()  # raises ParamValidationError on a default the form could not submit
    assert resolved["prefix"] is None and resolved["window"] == "auto" and resolved["reprocess"] is False
    for name, param in dag.params.items():
        schema = param.schema
        assert schema.get("title") and schema.get("section"), (dag_id, name)
        if param.value is None:
            assert "null" in schema["type"], (dag_id, name)
    # what the UI receives: the serialized DAG's params keep the nullable types and bounds
    import json

    serialized = json.dumps(DagSerialization.to_dict(dag)["dag"]["params"], default=str)
    assert '"type": ["null", "string"]' in serialized and '"section": "Which inputs"' in serialized


@pytest.mark.parametrize("dag_id,name,bad,good", [
    ("pathology", "tile_px", 10, 512), ("pathology", "target_mpp", -1, 0.5), ("pathology", "target_mpp", 0, 0.25),
    ("neuroimaging", "mr_only_wait_hours", -5, 0), ("cardiovascular", "landing_quiet_seconds", -1, 0),
    ("mammography", "window", "yesterday", "all"), ("cardiovascular", "prefix", "../other-specialty", "site-a/2026"),
])
def test_out_of_range_values_are_refused_by_the_schema(dagbag, dag_id, name, bad, good):
    from airflow.sdk.definitions.param import ParamValidationError

    param = dagbag.dags[dag_id].params.get_param(name)
    with pytest.raises(ParamValidationError):
        param.resolve(bad)
    assert param.resolve(good) == good


def test_the_options_schema_is_one_for_params_cli_and_library():
    """A specialty's options come from its record: the DAG's Params, the CLI's flags and the library's checks."""
    from imaging_dags.params import run_options, specialty_params
    from imaging_tasks.cli import build_parser
    from imaging_tasks.specialties import get, names

    for name in names():
        record = get(name)
        params = specialty_params(name)
        for o in record.options:
            assert params[o.name].value == o.default and params[o.name].schema["title"] == o.title
            if o.minimum is not None:
                assert params[o.name].schema["minimum"] == o.minimum
    pathology = get("pathology")
    assert run_options("pathology", {"tile_px": 512, "target_mpp": None, "prefix": "x"}) == {"tile_px": 512}
    assert pathology.options_for({"tile_px": 512})["target_mpp"] == 1.0  # missing: the default
    # a site-wide Variable fills an option the run leaves empty (a model URI); the run's own value wins
    site = {"imaging_cine_model_uri": "s3://models/lv.pt"}.get
    assert run_options("cardiovascular", {"cine_model_uri": None}, variable=site)["cine_model_uri"] == "s3://models/lv.pt"
    assert run_options("cardiovascular", {"cine_model_uri": "m.pt"}, variable=site)["cine_model_uri"] == "m.pt"
    assert "cine_model_uri" not in run_options("cardiovascular", {}, variable=lambda name: None)
    assert "imaging_cine_model_uri" in specialty_params("cardiovascular")["cine_model_uri"].description
    with pytest.raises(ValueError, match="tile_px.*minimum 32"):
        pathology.options_for({"tile_px": 10})
    args = build_parser().parse_args(["run", "pathology", "--landing", "l", "--lake", "k", "--warehouse", "w",
                                      "--tile-px", "512"])
    assert args.tile_px == 512 and args.specialty == "pathology"
    assert pathology.result_options({"tile_px": 256, "batch": 1}) == {}  # defaults hash like a default run


# --------------------------------------------------------------------------- empty closed interval
def _sensor_context(run_type: str, start, end, params=None):
    return {"params": {"window": "auto", "prefix": None, "landing_quiet_seconds": 0, **(params or {})},
            "dag_run": SimpleNamespace(run_type=run_type), "data_interval_start": start, "data_interval_end": end}


def test_a_closed_empty_interval_is_skipped_at_once(buckets):
    from airflow.sdk.exceptions import AirflowSkipException

    from imaging_dags.sensors import LandingSensor

    sensor = LandingSensor(task_id="wait_for_landing", specialty="cardiovascular", poke_interval=60, timeout=3600)
    now = dt.datetime.now(UTC)
    closed = (now - dt.timedelta(days=2), now - dt.timedelta(days=1))
    with pytest.raises(AirflowSkipException, match="nothing arrived in this run's data interval"):
        sensor.poke(_sensor_context("scheduled", *closed))
    # an interval still open keeps waiting (something may still arrive in it)
    assert sensor.poke(_sensor_context("scheduled", now - dt.timedelta(hours=1), now + dt.timedelta(hours=1))).is_done \
        is False
    # a manual run (no window) with nothing anywhere waits as before: the user may be uploading
    assert sensor.poke(_sensor_context("manual", *closed)).is_done is False


def test_an_unknown_landing_folder_fails_once_with_what_to_set(buckets, monkeypatch, tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from imaging_dags.sensors import LandingSensor

    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_LANDING_URI", (tmp_path / "no" / "such" / "bucket").as_uri())
    sensor = LandingSensor(task_id="wait_for_landing", specialty="mammography", poke_interval=60, timeout=3600)
    with pytest.raises(AirflowFailException, match="imaging_landing_uri"):
        sensor.poke(_sensor_context("manual", None, None))


@pytest.mark.e2e
def test_a_scheduled_run_over_an_empty_night_ends_skipped_without_an_asset_event(airflow_db, buckets, dagbag):
    from imaging_tasks.specialties import synthesizer

    synthesizer("cardiovascular")(buckets["landing"], 1, 5)  # arrives now: outside the past night's interval
    run = dagbag.dags["cardiovascular"].test(logical_date=dt.datetime(2026, 3, 2, 2, tzinfo=UTC),
                                             run_conf={"window": "interval"})
    assert run.state == "success"
    states = _states("cardiovascular", run.run_id)
    assert states["wait_for_landing"] == {"skipped"}
    assert states["load_metadata"] == {"skipped"}
    assert _asset_events("cardiovascular", run.run_id) == []
    assert not buckets["warehouse"].exists()


# --------------------------------------------------------------------------- configuration errors
@pytest.mark.e2e
def test_a_missing_key_fails_the_index_once_not_three_times(airflow_db, buckets, dagbag, monkeypatch):
    from imaging_tasks.specialties import synthesizer

    monkeypatch.delenv("IMAGING_DEID_DEMO")
    monkeypatch.delenv("IMAGING_DEID_KEY", raising=False)
    synthesizer("mammography")(buckets["landing"], 1, 6)
    run = dagbag.dags["mammography"].test(run_conf={"landing_quiet_seconds": 0})
    assert run.state == "failed"
    (ti,) = _tis("mammography", run.run_id, "index_studies")
    assert ti.state == "failed" and ti.try_number == 1  # AirflowFailException: no retries with backoff


# --------------------------------------------------------------------------- a run as the UI shows it
@pytest.mark.e2e
def test_mapped_tasks_are_named_by_study_and_quarantined_studies_never_reach_the_gpu(airflow_db, buckets, dagbag):
    from imaging_tasks.batches import label
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.synth.bad_inputs import write_bad_inputs

    synthesizer("cardiovascular")(buckets["landing"], 2, 7)
    write_bad_inputs(buckets["landing"], "cardiovascular", seed=4)  # one of them is a study of its own
    run = dagbag.dags["cardiovascular"].test(run_conf={"landing_quiet_seconds": 0, "batch_size": 2})
    assert run.state == "success"

    deid = _tis("cardiovascular", run.run_id, "deidentify")
    returned = _xcoms("cardiovascular", run.run_id, "deidentify")  # map index -> its batch's outcomes
    assert sorted(len(batch) for batch in returned.values()) == [1, 2]  # 3 studies in batches of at most 2
    outcomes = [s for m in sorted(returned) for s in returned[m]]
    ok = {v["study"] for v in outcomes if v["status"] == "ok"}
    held = {v["study"] for v in outcomes if v["status"] != "ok"}
    assert len(ok) == 2 and held, "the planted truncated CT should end quarantined at de-identification"
    assert {ti.rendered_map_index for ti in deid} == {label(b) for b in returned.values()}  # named by its studies
    assert any(ti.rendered_map_index.endswith("(2 studies)") for ti in deid)
    for step in ("calcium_scoring", "cine_function", "flow"):
        gpu = _tis("cardiovascular", run.run_id, step)
        (batch,) = _xcoms("cardiovascular", run.run_id, step).values()  # the audited studies, batched afresh
        assert {s["study"] for s in batch} == ok and [ti.rendered_map_index for ti in gpu] == [label(batch)]
        assert all(ti.pool == "gpu" and ti.state == "success" for ti in gpu)

    (event,) = _asset_events("cardiovascular", run.run_id)
    assert event.extra["studies"] == 2 and set(event.extra["study_ids"]) == ok
    assert event.extra["rows"]["studies"] == 2 and event.extra["rows"]["results"] > 0
    assert all(uri.startswith("file://") and "/derived/cardiovascular/" in uri for uri in event.extra["derived_uris"])

    # a second run has nothing new: load is skipped and no asset event is emitted
    again = dagbag.dags["cardiovascular"].test(run_conf={"landing_quiet_seconds": 0})
    assert again.state == "success"
    assert _states("cardiovascular", again.run_id)["load_metadata"] == {"skipped"}
    assert _asset_events("cardiovascular", again.run_id) == []


# --------------------------------------------------------------------------- logs
def test_log_lines_carry_study_step_reason_and_device_in_their_text(buckets, caplog):
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.pipeline import Lake, deidentify_study, index_landing, process_study
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.synth.bad_inputs import write_bad_inputs

    synthesizer("cardiovascular")(buckets["landing"], 1, 8)
    bad = write_bad_inputs(buckets["landing"], "cardiovascular", seed=5)
    lake = Lake(buckets["lake"], "cardiovascular")
    caplog.set_level(logging.INFO, logger="imaging_tasks")
    summary = index_landing(buckets["landing"] / "cardiovascular", lake, key=DEMO_KEY)
    text = caplog.text
    assert "index cardiovascular:" in text and "quarantined" in text
    index_reasons = [r for r in bad.values() if f"quarantined an input at index: {r}" in text]
    assert index_reasons, text  # the reason code is in the message itself, not in a dropped `extra` field
    caplog.clear()
    done = [deidentify_study(s, lake, key=DEMO_KEY, demo=True) for s in summary["studies"]]
    study = next(d for d in done if d["status"] == "ok")
    assert f"de-identify cardiovascular study {study['study']}:" in caplog.text
    caplog.clear()
    process_study(study, lake, device="cpu")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("processed cardiovascular"))
    assert study["study"] in line and " on cpu " in line and "agatston_score=" in line


def test_progress_lines_every_n_items_or_seconds(caplog):
    from imaging_tasks.progress import Progress

    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0, 42.0, 43.0]).__next__
    log = logging.getLogger("imaging_tasks.test")
    caplog.set_level(logging.INFO, logger="imaging_tasks.test")
    with Progress(log, "de-identify S1", total=5, unit="file", every_n=2, every_s=30, clock=clock) as p:
        for _ in range(5):
            p.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("de-identify S1: 2/5 files (40%)")
    assert any("3/5 files" in x for x in lines)  # 38 s after the last line: time-triggered
    assert lines[-1] == "de-identify S1: 5 file(s) done in 43.0 s"


# --------------------------------------------------------------------------- helpers (metadata DB)
def _tis(dag_id: str, run_id: str, task_id: str):
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id,
                                                         TaskInstance.task_id == task_id)).all()
        session.expunge_all()
    return tis


def _states(dag_id: str, run_id: str) -> dict[str, set[str]]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    out: dict[str, set[str]] = {}
    with create_session() as session:
        for task_id, state in session.execute(select(TaskInstance.task_id, TaskInstance.state).where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)):
            out.setdefault(task_id, set()).add(str(state))
    return out


def _xcoms(dag_id: str, run_id: str, task_id: str) -> dict[int, dict]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(XComModel.map_index, XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
            XComModel.key == "return_value")).all()
    import json

    return {m: (json.loads(v) if isinstance(v, str) else v) for m, v in rows}


def _asset_events(dag_id: str, run_id: str) -> list:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.scalars(select(AssetEvent).where(AssetEvent.source_dag_id == dag_id,
                                                          AssetEvent.source_run_id == run_id)).all()
        session.expunge_all()
    return events

