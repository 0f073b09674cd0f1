"""Event-driven runs (``imaging_dags.events``): storage notifications wake a specialty's DAG within seconds.

Against real servers on 127.0.0.1: moto (S3 with an event notification into an SQS queue, one process for both;
``tests/cloud_servers.py``) and, for GCS -> Pub/Sub, fake-gcs-server publishing its object events to Google's
Pub/Sub emulator (``gcloud``'s ``cloud-pubsub-emulator``; skipped where it is not installed).  The triggers run as
the triggerer runs them: rebuilt from their serialized form, ``run()`` driven on an event loop.  The last test runs
a whole Airflow (api-server, scheduler, dag-processor, triggerer): uploads to S3 start asset-triggered runs that
wait for the quiet period, and a second notification does not process the study again.
"""
from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import unquote_plus

import pytest
from cloud_servers import GCS_PROJECT, HOST, S3_KEY_ID, S3_REGION, S3_SECRET, ServerProcess, fake_gcs_binary

REPO = Path(__file__).resolve().parents[1]
SPECIALTY = "mammography"
ACCOUNT = "123456789012"  # moto's default account
PUBSUB_EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
EVENT_ENV = [k for k in os.environ if k.startswith("IMAGING_EVENTS_") or k.startswith("AIRFLOW__IMAGING__EVENTS_")]


@pytest.fixture(autouse=True)
def _no_ambient_queues(monkeypatch):
    for key in EVENT_ENV:
        monkeypatch.delenv(key, raising=False)


def _parse_dag(specialty: str = SPECIALTY):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / f"{specialty}.py"))
    assert bag.import_errors == {}
    return bag.dags[specialty]


def _watchers(dag) -> list:
    from airflow.sdk import AssetOrTimeSchedule

    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    (asset,) = dag.timetable.asset_condition.objects
    assert asset.name == f"imaging_{dag.dag_id}_landing"
    return asset.watchers


def _as_triggerer(trigger):
    """Rebuild the trigger from what the DB stores (classpath + kwargs), as the triggerer does."""
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))


def _first_event(trigger, timeout_s: float):
    async def first():
        return await asyncio.wait_for(anext(trigger.run()), timeout_s)

    return asyncio.run(first())


# ------------------------------------------------------------------------------------------ parse time
def test_no_queue_configured_keeps_todays_cron_schedule():
    from airflow.sdk import CronDataIntervalTimetable

    from imaging_dags.settings import event_sources, schedule

    assert not event_sources(SPECIALTY).sqs_queue_url and not event_sources(SPECIALTY).pubsub_subscription
    assert isinstance(schedule(SPECIALTY), CronDataIntervalTimetable)
    dag = _parse_dag()
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.max_active_runs == 1 and dag.catchup is False


def test_settings_per_specialty_shared_and_placeholder(monkeypatch):
    from imaging_dags.settings import event_sources
    from imaging_tasks.errors import ConfigError

    monkeypatch.setenv("IMAGING_EVENTS_SQS_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/1/landing")
    monkeypatch.setenv("IMAGING_EVENTS_SQS_QUEUE_URL_PATHOLOGY", "https://sqs.eu-west-1.amazonaws.com/1/slides")
    assert event_sources("mammography").sqs_shared and event_sources("mammography").sqs_queue_url.endswith("/landing")
    assert not event_sources("pathology").sqs_shared and event_sources("pathology").sqs_queue_url.endswith("/slides")
    monkeypatch.setenv("IMAGING_EVENTS_SQS_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/1/imaging-{specialty}")
    assert event_sources("mammography") .sqs_queue_url.endswith("/imaging-mammography")
    assert not event_sources("mammography").sqs_shared
    monkeypatch.setenv("AIRFLOW__IMAGING__EVENTS_PUBSUB_SUBSCRIPTION", "projects/p/subscriptions/imaging-{specialty}")
    assert event_sources("neuroimaging").pubsub_subscription == "projects/p/subscriptions/imaging-neuroimaging"
    monkeypatch.setenv("IMAGING_EVENTS_PUBSUB_SUBSCRIPTION", "projects/p/subscriptions/everything")
    with pytest.raises(ConfigError, match="one reader"):
        event_sources("neuroimaging")


def test_the_dicom_receiver_setting_gives_the_dag_a_landing_asset_with_no_watcher(monkeypatch):
    """``imaging-tasks receive --airflow-url`` posts the landing asset's events itself: no queue to watch."""
    from imaging_dags.settings import event_sources
    from imaging_tasks.errors import ConfigError

    monkeypatch.setenv("IMAGING_EVENTS_RECEIVER", "true")
    assert _watchers(_parse_dag()) == []
    monkeypatch.setenv("IMAGING_EVENTS_RECEIVER", "sometimes")
    with pytest.raises(ConfigError, match="expected true or false"):
        event_sources(SPECIALTY)


def test_an_event_started_run_looks_at_everything_not_done_like_a_manual_run():
    """An asset-triggered run's data interval spans its events, not the arrivals: it must not narrow the window
    (the landing sensor then applies the quiet period to the whole prefix; the ledger skips what is done)."""
    import datetime as dt
    from types import SimpleNamespace

    from imaging_dags.window import run_window

    a, b = dt.datetime(2026, 3, 1, 10, tzinfo=dt.timezone.utc), dt.datetime(2026, 3, 1, 10, 5, tzinfo=dt.timezone.utc)
    ctx = {"params": {"window": "auto"}, "dag_run": SimpleNamespace(run_type="asset_triggered"),
           "data_interval_start": a, "data_interval_end": b}
    assert run_window(ctx) == (None, None)


# ------------------------------------------------------------------------------------------ S3 -> SQS (moto)
@pytest.fixture()
def s3_to_sqs(s3_server, s3_conn, monkeypatch):
    """A bucket whose object-created notifications go to a fresh SQS queue; returns (s3 client, bucket, queue)."""
    import boto3

    kw = dict(endpoint_url=s3_server.url, aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET,
              region_name=S3_REGION)
    s3, sqs = boto3.client("s3", **kw), boto3.client("sqs", **kw)
    name = f"landing-{uuid.uuid4().hex[:10]}"
    queue_url = sqs.create_queue(QueueName=name)["QueueUrl"]
    s3.create_bucket(Bucket=name)
    s3.put_bucket_notification_configuration(Bucket=name, NotificationConfiguration={"QueueConfigurations": [
        {"QueueArn": f"arn:aws:sqs:{S3_REGION}:{ACCOUNT}:{name}", "Events": ["s3:ObjectCreated:*"]}]})
    monkeypatch.setenv("IMAGING_EVENTS_AWS_CONN_ID", s3_conn)
    return s3, name, queue_url


def test_an_s3_upload_fires_the_dags_sqs_watcher_within_seconds(s3_to_sqs, monkeypatch):
    s3, bucket, queue_url = s3_to_sqs
    monkeypatch.setenv(f"IMAGING_EVENTS_SQS_QUEUE_URL_{SPECIALTY.upper()}", queue_url)
    (watcher,) = _watchers(_parse_dag())
    trigger = _as_triggerer(watcher.trigger)

    # the provider's own trigger, as MessageQueueTrigger(scheme="sqs") dispatches it: the notification names the key
    key = f"incoming/{SPECIALTY}/DOE^JANE/view-1.dcm"
    s3.put_object(Bucket=bucket, Key=key, Body=b"x" * 100)
    t0 = time.monotonic()
    raw = _first_event(trigger.queue_trigger(), 10)
    bodies = [json.loads(m["Body"]) for m in raw.payload["message_batch"]]
    keys = [r["s3"]["object"]["key"] for b in bodies for r in b.get("Records", [])]
    assert [unquote_plus(k) for k in keys] == [key]  # URL-encoded, as S3 sends keys

    # the watcher's trigger: one event per batch of new objects, counts only (keys can carry patient names)
    s3.put_object(Bucket=bucket, Key=f"incoming/{SPECIALTY}/DOE^JANE/view-2.dcm", Body=b"y" * 250)
    t1 = time.monotonic()
    event = _first_event(trigger, 10)
    assert time.monotonic() - t1 < 10 and t1 - t0 < 10  # seconds, not the nightly schedule
    assert event.payload == {"source": "sqs", "specialty": SPECIALTY, "objects": 1, "bytes": 250}
    assert "DOE" not in json.dumps(event.payload)


def test_a_shared_queue_wakes_only_the_specialty_whose_folder_got_the_upload(s3_to_sqs, monkeypatch):
    s3, bucket, queue_url = s3_to_sqs
    monkeypatch.setenv("IMAGING_EVENTS_SQS_QUEUE_URL", queue_url)
    from imaging_dags.events import landing_asset

    mammo = _as_triggerer(landing_asset("mammography").watchers[0].trigger)
    patho = _as_triggerer(landing_asset("pathology").watchers[0].trigger)
    s3.put_object(Bucket=bucket, Key="incoming/pathology/slide.svs", Body=b"s" * 7)
    with pytest.raises(TimeoutError):  # mammography's watcher leaves pathology's notification alone ...
        _first_event(mammo, 3)
    assert _first_event(patho, 25).payload["objects"] == 1  # ... which pathology's then takes


# ------------------------------------------------------------------------------------------ GCS -> Pub/Sub
@pytest.fixture()
def gcs_to_pubsub(tmp_path, monkeypatch):
    """Google's Pub/Sub emulator and a fake-gcs-server publishing object events to a topic on it."""
    if not PUBSUB_EMULATOR.exists() or not shutil.which("java"):
        pytest.skip("the Pub/Sub emulator (gcloud component pubsub-emulator, Java) is not installed")
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import pubsub_v1, storage

    emulator = ServerProcess("pubsub-emulator", lambda port: [str(PUBSUB_EMULATOR), f"--host={HOST}",
                                                               f"--port={port}"], "/", tmp_path).start()
    try:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"{HOST}:{emulator.port}")
        topic = f"projects/{GCS_PROJECT}/topics/landing"
        subscription = f"projects/{GCS_PROJECT}/subscriptions/imaging-{SPECIALTY}"
        pubsub_v1.PublisherClient().create_topic(name=topic)
        pubsub_v1.SubscriberClient().create_subscription(name=subscription, topic=topic)
        gcs = ServerProcess("fake-gcs-events", lambda port: [
            str(fake_gcs_binary()), "-scheme", "http", "-backend", "memory", "-host", HOST, "-port", str(port),
            "-external-url", f"http://{HOST}:{port}", "-public-host", f"{HOST}:{port}", "-log-level", "warn",
            "-event.pubsub-project-id", GCS_PROJECT, "-event.pubsub-topic", "landing", "-event.list", "finalize"],
            "/storage/v1/b", tmp_path).start()
        try:
            client = storage.Client(project=GCS_PROJECT, credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": gcs.url})
            monkeypatch.setenv("AIRFLOW_CONN_IMAGING_PUBSUB_TEST", json.dumps({
                "conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": GCS_PROJECT}}))
            monkeypatch.setenv("IMAGING_EVENTS_GCP_CONN_ID", "imaging_pubsub_test")
            yield client.create_bucket("landing"), subscription
        finally:
            gcs.stop()
    finally:
        emulator.stop()


def test_a_gcs_upload_fires_the_dags_pubsub_watcher_within_seconds(gcs_to_pubsub, monkeypatch):
    bucket, subscription = gcs_to_pubsub
    monkeypatch.setenv(f"IMAGING_EVENTS_PUBSUB_SUBSCRIPTION_{SPECIALTY.upper()}", subscription)
    (watcher,) = _watchers(_parse_dag())
    trigger = _as_triggerer(watcher.trigger)
    key = f"incoming/{SPECIALTY}/DOE^JANE/view-1.dcm"
    bucket.blob(key).upload_from_string(b"z" * 321)
    t0 = time.monotonic()
    raw = _first_event(trigger.queue_trigger(), 15)  # PubsubPullTrigger, as MessageQueueTrigger dispatches it
    assert [m["message"]["attributes"]["objectId"] for m in raw.payload["message"]] == [key]
    bucket.blob(f"incoming/{SPECIALTY}/DOE^JANE/view-2.dcm").upload_from_string(b"w" * 123)
    event = _first_event(trigger, 15)
    assert time.monotonic() - t0 < 10
    assert event.payload == {"source": "google+pubsub", "specialty": SPECIALTY, "objects": 1, "bytes": 123}


# ------------------------------------------------------------------------------------------ a whole Airflow
@pytest.mark.scheduler
def test_uploads_start_asset_triggered_runs_that_wait_for_quiet_and_never_redo_a_study(
        s3_to_sqs, s3_server, s3_conn, buckets, tmp_path):
    """Real api-server, scheduler, dag-processor and triggerer (tests/airflow_stack.py); the DAG's landing is the
    notified S3 bucket.  An exam uploaded file by file starts a run within seconds; the run takes the whole exam
    (its sensor waits for the quiet period); notifications for the same files again start a run that skips it."""
    from airflow_stack import NO_SCHEDULED_RUN_CRON, AirflowStack

    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.warehouse import DuckDBWarehouse

    s3, bucket, queue_url = s3_to_sqs
    local = tmp_path / "synth"
    synthesizer(SPECIALTY)(local, 1, 11)
    files = [(f"incoming/{SPECIALTY}/{p.relative_to(local / SPECIALTY).as_posix()}", p)
             for p in sorted((local / SPECIALTY).rglob("*")) if p.is_file()]
    env = {f"AIRFLOW_CONN_{s3_conn.upper()}": os.environ[f"AIRFLOW_CONN_{s3_conn.upper()}"],
           "AIRFLOW_VAR_IMAGING_LANDING_URI": f"s3://{s3_conn}@{bucket}/incoming",
           f"IMAGING_EVENTS_SQS_QUEUE_URL_{SPECIALTY.upper()}": queue_url, "IMAGING_EVENTS_AWS_CONN_ID": s3_conn,
           "AIRFLOW__IMAGING__SCHEDULE": NO_SCHEDULED_RUN_CRON, "AIRFLOW__IMAGING__LANDING_QUIET_SECONDS": "3",
           # watchers are registered when an unpaused DAG is parsed: unpaused from its first parse
           "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False", "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5"}
    lake = {k: buckets[k] for k in ("lake", "warehouse")}

    def _watching(stack) -> bool:
        return "LandingEventTrigger" in (stack.tmp / "triggerer.log").read_text(errors="replace")

    def asset_runs():
        return sorted((r for r in stack.api.runs(SPECIALTY) if r["run_type"] == "asset_triggered"),
                      key=lambda r: r["run_after"])

    with AirflowStack(tmp_path / "stack", lake, env=env, dag_ids=[SPECIALTY]) as stack:
        stack.wait_until(lambda: _watching(stack), "the triggerer to run the landing watcher", timeout=30)
        t0 = time.monotonic()
        for key, path in files:  # one notification per file, 0.5 s apart: one study arriving over seconds
            s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            time.sleep(0.5)
        first = stack.wait_until(lambda: asset_runs()[:1], "an asset-triggered run", timeout=30)[0]
        started_s = time.monotonic() - t0
        stack.wait_for_run(SPECIALTY, first["dag_run_id"], timeout=240)
        later = asset_runs()[1:]  # notifications that came while the first run worked queue (at most) one more run
        if not later:  # all were consumed by the first run: notify one of the files again (a re-upload)
            s3.put_object(Bucket=bucket, Key=files[0][0], Body=files[0][1].read_bytes())
            later = stack.wait_until(lambda: asset_runs()[1:], "a run for the second notification", 180)
        for run in later:
            stack.wait_for_run(SPECIALTY, run["dag_run_id"], states=("success",), timeout=240)
        wh = DuckDBWarehouse(buckets["warehouse"])
        assert wh.count("studies", "WHERE specialty = ?", [SPECIALTY]) == 1
        instances = wh.count("instances", "WHERE specialty = ?", [SPECIALTY])
        assert instances == len([k for k, _ in files if "/study-" in k]), "the run took part of the upload"
        # the later run saw the same files and did not redo the study
        summary = stack.api.get(f"/dags/{SPECIALTY}/dagRuns/{later[-1]['dag_run_id']}/taskInstances/index_studies/"
                                "xcomEntries/summary")["value"]
        summary = json.loads(summary) if isinstance(summary, str) else summary
        assert summary["to_process"] == 0 and summary["already_done"] == 1, summary
    assert started_s < 15, f"the first run started {started_s:.1f} s after the upload began"
