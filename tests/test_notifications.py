"""Who gets told what: failure and end-of-run notifications by email (a real SMTP server, aiosmtpd) and by a
Slack-compatible webhook (a real HTTP receiver), both on 127.0.0.1, sent by the real Airflow callbacks of a real
DAG run in which one study fails processing; and never a byte of PHI in them."""
from __future__ import annotations

import datetime as dt
import email
import html
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# planted in the raw headers of every landing file (and quoted by the injected fault's message)
PLANTED = {"PatientName": "Zyqwx^Plantedname", "PatientID": "PHIMRN99887766", "AccessionNumber": "ACCPHI4242",
           "InstitutionName": "Planted Institute Of Identifiers", "ReferringPhysicianName": "Quuxley^Referrer"}


# --------------------------------------------------------------------------------------------- receivers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Inbox:
    """aiosmtpd handler: keeps every message it is handed."""

    def __init__(self):
        self.messages: list[email.message.Message] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 Message accepted for delivery"


def mail_text(msg) -> str:
    """Subject, addresses and every decoded part of a message (the HTML body travels base64-encoded)."""
    parts = [str(msg["Subject"]), str(msg["From"]), str(msg["To"])]
    for part in msg.walk():
        payload = part.get_payload(decode=True)
        if payload:
            parts.append(html.unescape(payload.decode("utf-8", "replace")))
    return "\n".join(parts)


@pytest.fixture()
def smtp_server():
    from aiosmtpd.controller import Controller

    inbox = _Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=_free_port())
    controller.start()
    try:
        yield controller.port, inbox
    finally:
        controller.stop()


@pytest.fixture()
def webhook_receiver():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append({"path": self.path, "body": json.loads(body)})
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def channels(smtp_server, webhook_receiver, monkeypatch):
    """Both channels configured the way users do: Variables naming connections defined by env."""
    smtp_port, inbox = smtp_server
    hook_port, posts = webhook_receiver
    monkeypatch.setenv("AIRFLOW_CONN_IMAGING_SMTP", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": smtp_port,
        "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "airflow@imaging.test", "timeout": 10,
                  "retry_limit": 0}}))
    monkeypatch.setenv("AIRFLOW_CONN_IMAGING_HOOK", json.dumps({
        "conn_type": "slackwebhook", "host": f"http://127.0.0.1:{hook_port}", "password": "services/T0/B0/XYZ"}))
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_NOTIFY_EMAIL_TO", "imaging-oncall@imaging.test, pacs@imaging.test")
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_NOTIFY_SMTP_CONN_ID", "imaging_smtp")
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_NOTIFY_WEBHOOK_CONN_ID", "imaging_hook")
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.imaging.test/af")
    return inbox.messages, posts


def _wait(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------------------------- the pure function
STUDY = "SABCDEFGHIJKLMNOP"


def test_compose_failure_names_pseudonym_step_reason_and_links():
    from imaging_dags.notifiers import TaskFailure, compose

    msg = compose(TaskFailure(dag_id="mammography", run_id="manual__2026-01-02T03:04:05+00:00",
                              task_id="process_study", map_index=1, study=STUDY, step="process_study",
                              reason="RuntimeError", exceptions=("StudyFailed", "RuntimeError"), attempt=3,
                              max_attempts=3), base_url="https://af.example/root/")
    assert msg.subject == f"[imaging] mammography: study {STUDY} failed at process_study (RuntimeError)"
    assert "raised as StudyFailed <- RuntimeError" in msg.text and "Attempt:  3 of 3" in msg.text
    run = "manual__2026-01-02T03%3A04%3A05%2B00%3A00"
    assert dict(msg.links) == {
        "Study QC": f"https://af.example/root/imaging/dags/mammography/runs/{run}/tasks/process_study/1",
        "Task instance (log)": f"https://af.example/root/dags/mammography/runs/{run}/tasks/process_study/mapped/1",
        "Run QC": f"https://af.example/root/imaging/dags/mammography/runs/{run}",
        "Airflow run": f"https://af.example/root/dags/mammography/runs/{run}"}
    assert all(url in msg.text for _, url in msg.links)
    assert f'<a href="https://af.example/root/imaging/dags/mammography/runs/{run}">' in msg.html


def test_compose_summary_counts_by_reason():
    from imaging_dags.notifiers import RunSummary, compose

    msg = compose(RunSummary(dag_id="pathology", run_id="scheduled__2026-01-02T02:00:00+00:00", succeeded=False,
                             reason="task_failure", loaded=7, quarantined={"no_usable_input": 2, "not_dicom": 1},
                             failed=((STUDY, "tile features", "MemoryError"),), failed_count=1),
                  base_url="http://localhost:8080")
    assert msg.subject == "[imaging] pathology run failed: 7 loaded, 3 quarantined, 1 failed"
    assert "Quarantined:  3 (no_usable_input: 2, not_dicom: 1)" in msg.text
    assert f"  - {STUDY} at tile features: MemoryError" in msg.text
    ok = compose(RunSummary(dag_id="pathology", run_id="r1", succeeded=True, loaded=3), base_url="")
    assert ok.subject == "[imaging] pathology run succeeded: 3 loaded, 0 quarantined, 0 failed"


def test_compose_cannot_carry_free_text():
    """Whatever lands in a fact by mistake (a header value as a label, a message as a reason) is not shown."""
    from imaging_dags.notifiers import RunSummary, TaskFailure, compose

    phi = list(PLANTED.values())
    msg = compose(TaskFailure(dag_id="mammography", run_id="r1", task_id="process_study", map_index=0,
                              study=PLANTED["PatientName"], step=PLANTED["InstitutionName"] + "!",
                              reason=f"bad value {PLANTED['PatientID']}", exceptions=(PLANTED["AccessionNumber"] + " x",),
                              attempt=1), base_url="http://x")
    summary = compose(RunSummary(dag_id="mammography", run_id="r1", succeeded=False,
                                 quarantined={f"{PLANTED['PatientID']} unreadable": 1},
                                 failed=((PLANTED["PatientName"], "x", "y"),), failed_count=1), base_url="http://x")
    for m in (msg, summary):
        text = m.subject + m.text + m.html
        assert not [p for p in phi if p.lower() in text.lower()], text
    assert "Study:    -" in msg.text and "Study QC" not in dict(msg.links)


# --------------------------------------------------------------------------------------------- configuration
def test_nothing_configured_sends_nothing_and_does_not_fail(monkeypatch):
    from imaging_dags.notifiers import ImagingNotifier
    from imaging_dags.settings import notify_channels

    for name in ("EMAIL_TO", "SMTP_CONN_ID", "WEBHOOK_CONN_ID", "EMAIL_FROM"):
        monkeypatch.delenv(f"AIRFLOW_VAR_IMAGING_NOTIFY_{name}", raising=False)
    assert not notify_channels()
    for event in ImagingNotifier.EVENTS:
        ImagingNotifier(event)({})  # an empty context: nothing is looked at


def test_a_missing_connection_fails_with_what_to_set_and_the_other_channel_still_goes(channels, monkeypatch):
    from imaging_dags.notifiers import NotificationError, RunSummary, compose, deliver
    from imaging_dags.settings import notify_channels

    mails, posts = channels
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_NOTIFY_WEBHOOK_CONN_ID", "imaging_nowhere")
    message = compose(RunSummary(dag_id="neuroimaging", run_id="r9", succeeded=True, loaded=1), base_url="http://x")
    with pytest.raises(NotificationError) as err:
        deliver(message, notify_channels(), {})
    assert "imaging_nowhere" in str(err.value) and "AIRFLOW_CONN_IMAGING_NOWHERE" in str(err.value)
    assert "imaging_notify_webhook_conn_id" in str(err.value)
    assert _wait(lambda: len(mails) == 1) and posts == []
    assert mails[0]["Subject"] == message.subject
    assert sorted(a.strip() for a in mails[0]["To"].split(",")) == ["imaging-oncall@imaging.test",
                                                                    "pacs@imaging.test"]
    # recipients missing while a connection is named: a configuration error naming the Variable to set
    from imaging_tasks.errors import ConfigError

    monkeypatch.delenv("AIRFLOW_VAR_IMAGING_NOTIFY_EMAIL_TO")
    with pytest.raises(ConfigError, match="imaging_notify_email_to"):
        notify_channels()


# --------------------------------------------------------------------------------------------- a real DAG run
def _plant_phi(landing: Path) -> list[str]:
    import pydicom

    uids = []
    for path in sorted(landing.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        uids.append(str(ds.StudyInstanceUID))
        ds.save_as(path)
    assert uids
    return sorted(set(uids))


@pytest.mark.e2e
def test_a_study_failing_in_a_dag_run_is_told_by_mail_and_webhook_without_phi(airflow_db, buckets, channels,
                                                                               monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    import imaging_tasks.pipeline as pipeline
    from imaging_tasks.specialties import synthesizer

    mails, posts = channels
    synthesizer("mammography")(buckets["landing"], 2, 43)
    study_uids = _plant_phi(buckets["landing"] / "mammography")
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["mammography"]
    for t in dag.tasks:  # one retry, no waiting: a retry must not notify, the final failure must
        t.retries, t.retry_delay, t.retry_exponential_backoff = 1, dt.timedelta(seconds=0), False
    real, victim = pipeline.process_study, {}

    def faulty(study, lake, **kw):
        victim.setdefault("study", study["study"])
        if study["study"] == victim["study"]:  # an error quoting raw header values, as careless code might
            raise RuntimeError(f"pixel data of {PLANTED['PatientName']} ({PLANTED['PatientID']}) unreadable")
        return real(study, lake, **kw)

    monkeypatch.setattr(pipeline, "process_study", faulty)
    started = time.monotonic()
    run = dag.test(run_conf={"landing_quiet_seconds": 0})
    print(f"dag.test: {time.monotonic() - started:.1f} s")
    assert run.state == "failed"
    study = victim["study"]
    assert _wait(lambda: len(mails) >= 2 and len(posts) >= 2), ([m["Subject"] for m in mails], posts)

    subjects = [m["Subject"] for m in mails]
    failure = f"[imaging] mammography: study {study} failed at process_study (RuntimeError)"
    summary = "[imaging] mammography run failed: 1 loaded, 0 quarantined, 1 failed"
    # exactly one failure message for the study (its first attempt was retried: no message), and one summary;
    # the load step's deliberate failure is told by the summary, not on its own
    assert sorted(subjects) == sorted([failure, summary]), subjects
    assert sorted(p["body"]["text"].splitlines()[0] for p in posts) == sorted(f"*{s}*" for s in subjects)
    assert {p["path"] for p in posts} == {"/services/T0/B0/XYZ"}

    fail_mail = mail_text(next(m for m in mails if m["Subject"] == failure))
    fail_post = next(p["body"]["text"] for p in posts if failure in p["body"]["text"])
    run_seg = __import__("urllib.parse", fromlist=["quote"]).quote(run.run_id, safe="")
    for text in (fail_mail, fail_post):
        assert f"Study:    {study} (pseudonym)" in text and "Step:     process_study" in text
        assert "Reason:   RuntimeError" in text  # the study's own exception (its batch instance went on)
        assert "Attempt:  2 of 2" in text
        assert (f"https://airflow.imaging.test/af/imaging/dags/mammography/runs/{run_seg}/tasks/process_study/"
                in text), text
    sum_mail = mail_text(next(m for m in mails if m["Subject"] == summary))
    sum_post = next(p["body"]["text"] for p in posts if summary in p["body"]["text"])
    for text in (sum_mail, sum_post):
        assert "Loaded:       1" in text and "Failed:       1" in text and "Outcome:      failed" in text
        assert f"  - {study} at process_study: RuntimeError" in text
        assert f"https://airflow.imaging.test/af/imaging/dags/mammography/runs/{run_seg}" in text

    # no PHI: not the planted values, not the raw study UIDs, not the fault's message
    everything = "\n".join([*(mail_text(m) for m in mails), *(json.dumps(p) for p in posts)]).lower()
    leaks = [v for v in (*PLANTED.values(), *PLANTED["PatientName"].split("^"), *study_uids, "unreadable")
             if v.lower() in everything]
    assert leaks == []
