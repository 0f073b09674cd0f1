"""The DICOM receiver (``imaging-tasks receive``, imaging_tasks/edge/) over a real network on 127.0.0.1.

pynetdicom sends (the data sets exactly as stored in the files: ``STORE_SEND_CHUNKED_DATASET``); the checks read
what landed with plain file reads / boto3, not with the code under test.  Covered: routing, plain mode (right
specialty, byte-identical, idempotent resends), edge mode (de-identified, PHI-audited, refused instances held in
a local quarantine), association control, an S3 outage (moto stopped and restarted), ``kill -9`` of the receiver
process, the study-complete manifest and the Airflow asset event.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


# ---------------------------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait(condition, what: str, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _body(blob: bytes) -> bytes:
    """The data set of a Part 10 file, after its file meta group (both sides write the group length)."""
    assert blob[128:132] == b"DICM" and blob[132:138] == b"\x02\x00\x00\x00UL", "not a Part 10 file with group length"
    return blob[144 + struct.unpack("<I", blob[140:144])[0]:]


class Sender:
    """A pynetdicom SCU holding one association open; ``store(path)`` returns the C-STORE status."""

    def __init__(self, port: int, files, *, calling: str = "MODALITY", called: str = "IMAGING"):
        from pynetdicom import AE

        self.ae = AE(ae_title=calling)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 20
        contexts = {(str(m.file_meta.MediaStorageSOPClassUID), str(m.file_meta.TransferSyntaxUID))
                    for m in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
        for sop_class, syntax in sorted(contexts):
            self.ae.add_requested_context(sop_class, syntax)
        from pynetdicom.sop_class import Verification

        self.ae.add_requested_context(Verification)
        self.assoc = self.ae.associate(HOST, port, ae_title=called)

    def store(self, path) -> int | None:
        status = self.assoc.send_c_store(Path(path))
        return int(status.Status) if "Status" in status else None

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def __enter__(self):
        assert self.assoc.is_established, "association not established"
        return self

    def __exit__(self, *exc):
        self.close()


def _send(port: int, files, **kw) -> list[int | None]:
    with Sender(port, files, **kw) as sender:
        return [sender.store(f) for f in files]


@pytest.fixture(autouse=True)
def _send_raw_datasets(monkeypatch):
    """Send each file's data set bytes as stored (no decode/re-encode), so byte identity is testable."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, list[Path]]:
    """One small synthetic study per specialty the default routes send CT and MG to, plus pydicom's files."""
    from imaging_tasks import specialties

    out = tmp_path_factory.mktemp("synth")
    specialties.synthesizer("cardiovascular")(out, 1, 11, rows=64, slices=10)
    specialties.synthesizer("mammography")(out, 1, 12, rows=320, cols=256)
    found = {name: sorted((out / name).rglob("*.dcm")) for name in ("cardiovascular", "mammography")}
    assert len(found["cardiovascular"]) >= 5 and len(found["mammography"]) >= 2
    found["ct_small"] = [Path(get_testdata_file("CT_small.dcm"))]
    found["mr_small"] = [Path(get_testdata_file("MR_small.dcm"))]
    return found


@pytest.fixture()
def receiver(tmp_path):
    """Start receivers in this process (stopped at the end): ``receiver(**settings)``."""
    from imaging_tasks.edge.scp import Receiver, ReceiverSettings

    started = []

    def start(**kw):
        kw.setdefault("landing", tmp_path / "landing")
        kw.setdefault("spool", tmp_path / "spool")
        settings = ReceiverSettings(host=HOST, port=0, initial_backoff_s=0.1, max_backoff_s=0.5, shutdown_grace_s=1,
                                    **kw)
        r = Receiver(settings).start()
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def _landed(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


def _uid_hash(uid: str) -> str:
    import hashlib

    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def _phi(files) -> set[str]:
    """Raw identifying strings of the inputs, as they must never appear in logs or names."""
    out = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out |= {str(ds.PatientName), str(ds.PatientID), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    return {v for v in out if len(v) >= 6}


# ---------------------------------------------------------------------------------------------- routing
def test_routing_defaults_and_routes_file_validation(tmp_path):
    from imaging_tasks.edge.routing import default_table, load_routes
    from imaging_tasks.errors import ConfigError

    table = default_table()
    assert table.route("CT", "1.2.840.10008.5.1.4.1.1.2.1", "ANY") == "cardiovascular"  # Enhanced CT
    assert table.route("MR", "1.2.840.10008.5.1.4.1.1.4", "ANY") == "neuroimaging"
    assert table.route("PT", "1.2.840.10008.5.1.4.1.1.128", "ANY") == "neuroimaging"
    assert table.route("DX", "1.2.840.10008.5.1.4.1.1.13.1.3", "ANY") == "mammography"  # tomosynthesis
    assert table.route("DX", "1.2.840.10008.5.1.4.1.1.1.1", "ANY") is None  # a chest DX is nobody's
    assert table.route("SM", "1.2.840.10008.5.1.4.1.1.77.1.6", "ANY") == "pathology"
    assert table.route("US", "1.2.840.10008.5.1.4.1.1.6.1", "ANY") is None

    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps([
        {"calling_ae": "CARDIO_*", "modality": "MR", "specialty": "cardiovascular", "comment": "cardiac MR"},
        {"modality": ["mr", "PT"], "specialty": "neuroimaging"},
        {"sop_class": "DigitalMammographyXRayImageStorageForPresentation", "specialty": "mammography"}]))
    table = load_routes(routes)
    assert table.route("MR", "x", "CARDIO_MR1") == "cardiovascular"
    assert table.route("MR", "x", "NEURO_MR1") == "neuroimaging"
    assert table.route("MG", "1.2.840.10008.5.1.4.1.1.1.2", "X") == "mammography"
    assert table.route("CT", "1.2.840.10008.5.1.4.1.1.2", "X") is None  # the file replaces the whole table

    for rules, expected in (([{"modality": "CT", "specialty": "dermatology"}], r"rule 1 .*dermatology.*not installed"),
                            ([{"modality": "CT"}, {"modalty": "MR", "specialty": "neuroimaging"}],
                             r"rule 1 names the specialty None"),
                            ([{"modalty": "MR", "specialty": "neuroimaging"}], r"rule 1 has unknown key.*'modalty'"),
                            ([{"sop_class": "NoSuchStorage", "specialty": "neuroimaging"}], r"rule 1: sop_class"),
                            ([], r"non-empty JSON list")):
        routes.write_text(json.dumps(rules))
        with pytest.raises(ConfigError, match=expected):
            load_routes(routes)
    with pytest.raises(ConfigError, match="does not exist"):
        load_routes(tmp_path / "missing.json")



def test_completion_state_and_unposted_events_survive_a_restart(tmp_path):
    """What the journals under <spool>/state keep: a burst interrupted by a crash completes after the restart,
    an event not posted yet is queued again; a second receiver on the same spool is refused."""
    from imaging_tasks.edge.completion import AirflowTarget, AssetEvents, Completion
    from imaging_tasks.edge.spool import Entry, Spool
    from imaging_tasks.errors import ConfigError

    spool = Spool(tmp_path / "spool")
    spool.open()
    with pytest.raises(ConfigError, match="in use by another receiver"):
        Spool(tmp_path / "spool").open()
    landing = tmp_path / "landing"
    t0 = time.time() - 100
    entries = [Entry(name=f"entry{i}", specialty="cardiovascular", study_folder="a1b2", series_folder=f"s{i % 2}",
                     object_name=f"o{i}.dcm", received_at=t0 + i, calling_ae="MODALITY", sha256="0" * 64, size=1)
               for i in range(3)]
    before = Completion(spool.state, landing, quiet_s=5)
    for entry in entries:
        before.received(entry, association=1)
    before.uploaded(entries[0])
    before.uploaded(entries[1])
    assert before.tick() == 0  # the association is still open
    # the process dies here; the third instance is still in the spool
    events = AssetEvents(AirflowTarget("http://127.0.0.1:9", token="token-for-tests"))
    after = Completion(spool.state, landing, quiet_s=5, events=events)
    assert after.load([entries[2]])["studies_open"] == 1
    assert after.tick() == 0  # one instance not uploaded yet
    after.uploaded(entries[2])
    assert after.tick() == 1  # no association survives a restart; quiet since the last instance
    manifest = json.loads((landing / "cardiovascular" / "a1b2" / "_STUDY_COMPLETE.json").read_text())
    assert (manifest["instances"], manifest["series"], manifest["burst"]) == (3, 2, 1)
    assert events.pending() == 1  # never started: the event was not posted

    again = AssetEvents(AirflowTarget("http://127.0.0.1:9", token="token-for-tests"))
    assert Completion(spool.state, landing, quiet_s=5, events=again).load([])["events_unposted"] == 1
    assert again.pending() == 1
    after._posted("cardiovascular", "a1b2", 1)
    assert Completion(spool.state, landing, quiet_s=5).load([]) == {"studies_open": 0, "events_unposted": 0,
                                                                    "journals_removed": 0}
    spool.close()

# ---------------------------------------------------------------------------------------------- (a) plain mode
def test_plain_mode_lands_every_instance_byte_identical_under_its_specialty(receiver, studies, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="imaging_tasks")
    r = receiver(quiet_seconds=60)
    files = studies["cardiovascular"] + studies["mammography"] + studies["ct_small"] + studies["mr_small"]
    # an instance no rule takes: a CT image whose Modality says OT
    odd = pydicom.dcmread(studies["ct_small"][0])
    odd.Modality, odd.SOPInstanceUID = "OT", pydicom.uid.generate_uid()
    odd.file_meta.MediaStorageSOPInstanceUID = odd.SOPInstanceUID
    odd.save_as(tmp_path / "odd.dcm")
    statuses = _send(r.port, [*files, tmp_path / "odd.dcm"])
    assert statuses == [0] * len(files) + [0xC001]
    landing = tmp_path / "landing"
    _wait(lambda: r.uploader.uploaded == len(files) and r.spool.count() == 0, "every upload")
    landed = _landed(landing)

    expected = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        specialty = {"CT": "cardiovascular", "MG": "mammography", "MR": "neuroimaging"}[ds.Modality]
        key = (f"{specialty}/{_uid_hash(ds.StudyInstanceUID)}/{_uid_hash(ds.SeriesInstanceUID)}/"
               f"{_uid_hash(ds.SOPInstanceUID)}.dcm")
        expected[key] = f
    assert sorted(landed) == sorted(expected)
    for key, f in expected.items():
        assert _body(landed[key]) == _body(f.read_bytes()), f"{key} differs from what was sent"
        meta = pydicom.dcmread(landing / key, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID

    # a resend is the same spool entry and the same object: nothing new lands
    assert _send(r.port, studies["ct_small"] + studies["mammography"][:1]) == [0, 0]
    _wait(lambda: r.spool.count() == 0 and r.uploader.uploaded == len(files) + 2, "the resends to upload")
    assert sorted(_landed(landing)) == sorted(expected)

    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "no routing rule matches" in logged and "refused_no_route" in r.summary()
    leaked = [v for v in _phi([*files, tmp_path / "odd.dcm"]) if v in logged]
    assert not leaked, "log lines carry identifying values"


# ---------------------------------------------------------------------------------------------- (b) edge mode
def test_edge_mode_uploads_only_deidentified_instances_and_quarantines_refusals_locally(receiver, studies, tmp_path):
    from imaging_tasks.deid.keys import load_key
    from imaging_tasks.phi_audit import audit, dicom_identifying_values, merge

    key, demo = load_key()
    assert demo, "tests run with the demo key (IMAGING_DEID_DEMO=1)"
    r = receiver(deidentify=True, key=key, demo=demo, quarantine=tmp_path / "quarantine", quiet_seconds=0.5)
    burned = pydicom.dcmread(studies["cardiovascular"][0])
    burned.BurnedInAnnotation = "YES"
    burned.SOPInstanceUID = burned.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    burned.save_as(tmp_path / "burned.dcm")
    files = studies["cardiovascular"] + studies["mammography"]
    assert _send(r.port, [*files, tmp_path / "burned.dcm"]) == [0] * (len(files) + 1)  # the refusal is held: success

    landing = tmp_path / "landing"
    landed = _wait(lambda: (lambda d: d if len(d) == len(files) else None)(_landed(landing)), "every upload")
    manifests = _wait(lambda: (lambda m: m if len(m) == 2 else None)(sorted(landing.rglob("_STUDY_COMPLETE.json"))),
                      "both studies' manifests")
    raw_values = merge(*(dicom_identifying_values(pydicom.dcmread(f)) for f in [*files, tmp_path / "burned.dcm"]))
    audit(raw_values, files=[str(p) for p in sorted(landing.rglob("*")) if p.is_file()])  # raises PHILeak
    names = {str(pydicom.dcmread(f, stop_before_pixels=True).PatientName).encode() for f in files}
    everything = b"".join(p.read_bytes() for p in landing.rglob("*") if p.is_file())
    assert not any(n in everything for n in names)
    assert not any(v in key for v in _phi(files) for key in landed)
    for key, blob in landed.items():
        ds = pydicom.dcmread(landing / key, stop_before_pixels=True)
        assert key == f"{key.split('/')[0]}/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        assert ds.PatientIdentityRemoved == "YES"
    assert {m.parent.parent.name for m in manifests} == {"cardiovascular", "mammography"}

    reasons = [json.loads(p.read_text()) for p in (tmp_path / "quarantine").rglob("reason.json")]
    assert len(reasons) == 1
    assert reasons[0]["reason"] == "burned_in_annotation" and reasons[0]["stage"] == "edge_deidentify"
    assert reasons[0]["specialty"] == "cardiovascular" and reasons[0]["source_uri"] == "dicom://MODALITY"
    held = next((tmp_path / "quarantine").rglob("input.dcm")).read_bytes()
    assert _body(held) == _body((tmp_path / "burned.dcm").read_bytes())  # the raw bytes, kept on site
    assert r.stats["quarantined"] == 1 and r.stats["stored"] == len(files)


# ---------------------------------------------------------------------------------------------- (c) who may send
def test_unknown_calling_ae_and_hosts_outside_the_allow_list_are_rejected(receiver, studies, tmp_path):
    r = receiver(allow_ae=("MODALITY",))
    ct = studies["ct_small"]
    rejected = Sender(r.port, ct, calling="INTRUDER")
    assert rejected.assoc.is_rejected and not rejected.assoc.is_established
    with Sender(r.port, ct, calling="MODALITY") as sender:
        assert sender.assoc.send_c_echo().Status == 0
        assert sender.store(ct[0]) == 0

    far = receiver(allow_hosts=("10.0.0.0/8",), spool=tmp_path / "spool2", landing=tmp_path / "landing2")
    refused = Sender(far.port, ct)
    assert refused.assoc.is_rejected and not refused.assoc.is_established
    near = receiver(allow_hosts=("10.0.0.0/8", "127.0.0.0/8"), spool=tmp_path / "spool3",
                    landing=tmp_path / "landing3")
    with Sender(near.port, ct) as sender:
        assert sender.assoc.send_c_echo().Status == 0
    assert r.stats["associations_rejected"] == 1 and far.stats["associations_rejected"] == 1


# ---------------------------------------------------------------------------------------------- (d) S3 outage
class _MotoServer:
    """moto's S3 in this process (its state survives a stop/start), one request per connection, so stopping it
    really cuts the receiver off (no kept-alive connection goes on being served)."""

    def __init__(self, port: int):
        self.port = port
        self._server = None

    def start(self) -> "_MotoServer":
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        class OneRequest(MotoRequestHandler):
            protocol_version = "HTTP/1.0"

        self._server = make_server(HOST, self.port, DomainDispatcherApplication(create_backend_app), threaded=True,
                                   request_handler=OneRequest)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_s3_outage_holds_instances_in_the_spool_and_delivers_each_exactly_once(receiver, studies, tmp_path,
                                                                                monkeypatch):
    import boto3
    from upath import UPath

    from imaging_tasks import retry

    monkeypatch.setattr(retry, "DEFAULT", retry.Policy(attempts=2, initial_s=0.05, max_wait_s=0.1, budget_s=2))
    port = _free_port()
    moto = _MotoServer(port).start()
    try:
        url = f"http://{HOST}:{port}"
        creds = {"aws_access_key_id": "edge-test", "aws_secret_access_key": "edge-test", "region_name": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=url, **creds)
        s3.create_bucket(Bucket="edge-landing")
        landing = UPath("s3://edge-landing/landing", endpoint_url=url, key="edge-test", secret="edge-test",
                        client_kwargs={"region_name": "us-east-1"},
                        config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10})

        def keys() -> list[str]:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket="edge-landing", Prefix="landing/")
            return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".dcm"))

        r = receiver(landing=landing, quiet_seconds=60)
        files = studies["cardiovascular"]
        half = len(files) // 2
        with Sender(r.port, files) as sender:
            assert [sender.store(f) for f in files[:half]] == [0] * half
            _wait(lambda: len(keys()) == half, "the first half to land")
            moto.stop()
            assert [sender.store(f) for f in files[half:]] == [0] * (len(files) - half)  # acknowledged, held
        _wait(lambda: r.uploader.failing, "the uploader to notice the outage")
        _wait(lambda: r.spool.count() == len(files) - half, "the second half to be held in the spool")
        assert r.uploader.uploaded == half
        time.sleep(0.5)
        moto = _MotoServer(port).start()
        _wait(lambda: r.spool.count() == 0, "the spool to drain after the outage", timeout=30)
        landed = keys()
        assert len(landed) == len(files) == len(set(landed))
        by_sop = {_uid_hash(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
        for key in landed:
            body = s3.get_object(Bucket="edge-landing", Key=key)["Body"].read()
            assert _body(body) == _body(by_sop[key.rsplit("/", 1)[1][:-4]].read_bytes())
    finally:
        with contextlib.suppress(Exception):
            moto.stop()


# ---------------------------------------------------------------------------------------------- (e) kill -9
def _start_cli(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen:
    log = open(tmp_path / f"receiver-{port}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "imaging_tasks.cli", "receive", "--landing", "landing", "--spool", "spool",
         "--host", HOST, "--port", str(port), "--retry-cap-seconds", "0.5", "--quiet-seconds", "1", *extra],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    _wait(lambda: process.poll() is not None or b"listening on" in (tmp_path / f"receiver-{port}.log").read_bytes(),
          "the receiver to listen", timeout=60)
    assert process.poll() is None, (tmp_path / f"receiver-{port}.log").read_text()
    return process


def test_kill_9_mid_association_loses_nothing_and_duplicates_nothing(studies, tmp_path):
    files = studies["cardiovascular"]
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "cardiovascular").write_text("a file where the folder belongs: every upload fails until it goes")
    port = _free_port()
    first = _start_cli(tmp_path, port)
    acked = len(files) // 2 + 1
    try:
        with Sender(port, files) as sender:
            assert [sender.store(f) for f in files[:acked]] == [0] * acked
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            _wait(lambda: not sender.assoc.is_established, "the association to die with the process")
    finally:
        if first.poll() is None:
            first.kill()
    incoming = tmp_path / "spool" / "incoming"
    assert len(list(incoming.glob("*.json"))) == acked  # every acknowledged instance survived the kill
    (incoming / "0123abcd-unacknowledged.dcm").write_bytes(b"an instance whose answer was never sent")

    (landing / "cardiovascular").unlink()  # the landing is back
    port = _free_port()
    second = _start_cli(tmp_path, port)
    try:
        _wait(lambda: len(_landed(landing)) == acked, "the spool to drain after the restart", timeout=30)
        assert not (incoming / "0123abcd-unacknowledged.dcm").exists()
        assert _send(port, files) == [0] * len(files)  # the sender resends everything
        _wait(lambda: len(_landed(landing)) == len(files) and not list(incoming.glob("*.json")), "every instance")
        _wait(lambda: list(landing.rglob("_STUDY_COMPLETE.json")), "the study manifest")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        if second.poll() is None:
            second.kill()
    landed = _landed(landing)
    assert len(landed) == len(files)
    by_sop = {_uid_hash(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    for key, blob in landed.items():
        assert _body(blob) == _body(by_sop[key.rsplit("/", 1)[1][:-4]].read_bytes())
    manifest = json.loads(next(landing.rglob("_STUDY_COMPLETE.json")).read_text())
    assert manifest["instances"] == len(files)
    logs = b"".join(p.read_bytes() for p in tmp_path.glob("receiver-*.log")).decode()
    assert "stopped" in logs and not [v for v in _phi(files) if v in logs]


# ---------------------------------------------------------------------------------------------- (f, g) completion
class _FakeAirflow:
    """Airflow's token, asset and asset-event endpoints, recording every request; the first event POST fails."""

    def __init__(self):
        self.requests: list[dict] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append({"method": self.command, "path": self.path, "body": body,
                                      "auth": self.headers.get("Authorization")})
                path = self.path.split("?", 1)[0]
                if self.command == "POST" and path == "/auth/token":
                    ok = body == {"username": "receiver", "password": "pw-for-tests"}
                    return self._answer(201, {"access_token": "jwt-1"}) if ok else self._answer(401, {})
                if self.headers.get("Authorization") != "Bearer jwt-1":
                    return self._answer(401, {"detail": "Not authenticated"})
                if self.command == "GET" and path == "/api/v2/assets":
                    return self._answer(200, {"assets": [{"id": 41, "name": "imaging_cardiovascularXlanding"},
                                                         {"id": 42, "name": "imaging_cardiovascular_landing"}],
                                              "total_entries": 2})
                if self.command == "POST" and path == "/api/v2/assets/events":
                    posts = [r for r in fake.requests if r["path"] == "/api/v2/assets/events"]
                    if len(posts) == 1:
                        return self._answer(503, {"detail": "try again"})
                    return self._answer(200, {"id": len(posts), "asset_id": body["asset_id"]})
                return self._answer(404, {})

            do_GET = do_POST = _handle

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{HOST}:{self.server.server_address[1]}"

    def events(self) -> list[dict]:
        return [r for r in self.requests if r["path"] == "/api/v2/assets/events" and r["method"] == "POST"]


def test_study_complete_manifest_once_per_burst_and_asset_event_with_counts_only(receiver, studies, tmp_path):
    from imaging_tasks.edge.completion import AirflowTarget

    airflow = _FakeAirflow()
    try:
        r = receiver(quiet_seconds=1, airflow=AirflowTarget(airflow.url, username="receiver", password="pw-for-tests"))
        files = studies["cardiovascular"]
        series = len({pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files})
        landing = tmp_path / "landing" / "cardiovascular"
        with Sender(r.port, files) as sender:
            assert [sender.store(f) for f in files] == [0] * len(files)
            time.sleep(1.6)  # quiet for longer than the quiet period, but the association is still open
            assert not list(landing.rglob("_STUDY_COMPLETE.json"))
        path = _wait(lambda: next(landing.rglob("_STUDY_COMPLETE.json"), None), "the manifest")
        manifest = json.loads(path.read_text())
        assert manifest == {"specialty": "cardiovascular", "study_folder": path.parent.name, "instances": len(files),
                            "series": series, "receiver_ae": "IMAGING", "burst": 1,
                            "completed_at": manifest["completed_at"]}
        _wait(lambda: len(airflow.events()) == 2, "the asset event (after one refused attempt)")
        time.sleep(1.5)  # nothing more happens: once per burst
        assert json.loads(path.read_text()) == manifest and len(airflow.events()) == 2

        token = [q for q in airflow.requests if q["path"] == "/auth/token"]
        lookups = [q for q in airflow.requests if q["path"].startswith("/api/v2/assets?")]
        assert len(token) == 1 and token[0]["auth"] is None
        assert len(lookups) == 1 and "name_pattern=imaging_cardiovascular_landing" in lookups[0]["path"]
        event = airflow.events()[-1]
        assert event["auth"] == "Bearer jwt-1"
        assert event["body"] == {"asset_id": 42, "extra": {"studies": 1, "instances": len(files), "series": series}}
        sent = json.dumps(airflow.requests)
        assert not [v for v in _phi(files) if v in sent]

        # a later resend opens a new burst: the manifest is rewritten (same distinct count), one more event
        assert _send(r.port, files[:3]) == [0, 0, 0]
        _wait(lambda: json.loads(path.read_text())["burst"] == 2, "the second burst's manifest")
        assert json.loads(path.read_text())["instances"] == len(files)
        _wait(lambda: len(airflow.events()) == 3, "the second asset event")
        journal = next((tmp_path / "spool" / "state" / "cardiovascular").glob("*.jsonl")).read_text().splitlines()
        assert [json.loads(line)["e"] for line in journal].count("complete") == 2
    finally:
        airflow.server.shutdown()
        airflow.server.server_close()
