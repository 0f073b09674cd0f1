"""Transient faults (issue 9, item 6): 5xx, throttling, connection resets and slow answers are retried inside the
task, and a run through them ends as a run without them, with nothing duplicated.

The faults come from a flaky HTTP proxy on 127.0.0.1 (``tests/cloud_servers.py``: :class:`FlakyProxy`) in front of
the moto S3 server, breaking requests by a seeded schedule: S3 ``InternalError`` 500 and ``SlowDown`` 503 answers,
connections reset before an answer, answers cut mid-body (after the server applied a PUT) and stalled answers, on
GET, PUT, LIST and HEAD.  The code under test reaches it through an Airflow connection (``endpoint_url``), as in
production.  The buckets are checked with boto3 straight at moto, not through the proxy.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cloud_servers import S3_KEY_ID, S3_REGION, S3_SECRET, FaultPlan

SPECIALTY = "mammography"
PHI_PREFIX = "Doe^Jane"  # landing names can carry patient names: they must never reach a retry log line
FAST = dict(attempts=5, initial_s=0.01, multiplier=2.0, max_wait_s=0.05, budget_s=30.0)


# ------------------------------------------------------------------------------------------------ set-up
def _aws_conn(monkeypatch, proxy, *, sdk_retries: bool) -> str:
    """An Airflow connection to moto through ``proxy``.  ``sdk_retries=False`` turns botocore's and s3fs's own
    per-request retries off, so every injected fault reaches :mod:`imaging_tasks.retry`; True keeps the SDK
    defaults, as in production.  A fresh id each time: ObjectStoragePath caches a filesystem per connection."""
    conn_id = f"imaging_flaky_{uuid.uuid4().hex[:8]}"
    config = {} if sdk_retries else {"retries": {"total_max_attempts": 1}}
    if not sdk_retries:
        import s3fs

        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({
        "conn_type": "aws", "login": S3_KEY_ID, "password": S3_SECRET,
        "extra": {"endpoint_url": proxy.url, "region_name": S3_REGION, "config_kwargs": config}}))
    return conn_id


@pytest.fixture()
def object_storage(monkeypatch):
    """URI text opens as ObjectStoragePath (the DAG glue), restored afterwards."""
    from imaging_dags.settings import object_storage as glue

    with glue():
        yield


@pytest.fixture()
def fast_retries(monkeypatch):
    from imaging_tasks import retry

    monkeypatch.setattr(retry, "DEFAULT", retry.Policy(**FAST))


def _retry_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "imaging_tasks.retry"]


def _s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.url, aws_access_key_id=S3_KEY_ID,
                        aws_secret_access_key=S3_SECRET, region_name=S3_REGION)


def _no_leftovers(s3_server, bucket: str, keys: list[str]) -> None:
    """No temporary objects and no unfinished multipart uploads (their parts would linger, billed and hidden)."""
    temporary = [k for k in keys if k.rsplit("/", 1)[-1].startswith(".") or k.endswith((".tmp", ".imaging-tmp"))]
    assert temporary == []
    assert _s3_client(s3_server).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# ------------------------------------------------------------------------------------------------ (a) storage
@pytest.mark.parametrize("kind", ["500", "503", "reset", "cut", "slow"])
def test_storage_operations_get_through_every_kind_of_fault(kind, flaky_s3, s3_server, new_s3_bucket, object_storage,
                                                            fast_retries, monkeypatch, tmp_path, caplog):
    """Every storage operation a task uses, with each fault on the first try of every request it makes (SDK
    retries off: the faults reach our retry), returns the right bytes and leaves exactly the right objects."""
    from imaging_tasks import storage

    caplog.set_level(logging.WARNING, logger="imaging_tasks.retry")
    bucket = new_s3_bucket("flaky")
    conn = _aws_conn(monkeypatch, flaky_s3, sdk_retries=False)
    root = bucket.uri("", conn)
    big = bytes(range(256)) * 4096  # 1 MiB: a body long enough to be cut in the middle
    bucket.put(f"landing/{PHI_PREFIX}/scan.dcm", big)
    (tmp_path / "out" / "qc").mkdir(parents=True)
    (tmp_path / "out" / "results.json").write_bytes(b'{"n": 1}')
    (tmp_path / "out" / "qc" / "view.png").write_bytes(b"\x89PNG" + big[:5000])
    storage.list_objects(root)  # the connection and its filesystem are set up before the faults start
    # aiohttp itself re-sends an idempotent request once when a reused connection drops: a reset twice in a row
    # gets past it to our retry
    flaky_s3.plan = FaultPlan(seed=11, rate=1.0, burst=2 if kind == "reset" else 1, slow_s=0.1, kinds={
        op: (kind,) for op in ("GET", "LIST", "PUT", "HEAD")})

    src = f"{root}/landing/{PHI_PREFIX}/scan.dcm"
    assert storage.read_bytes(src) == big
    assert storage.sha256_of(src) == hashlib.sha256(big).hexdigest()
    assert storage.download(src, tmp_path / "copy.dcm").read_bytes() == big
    assert storage.write_bytes(f"{root}/lake/{PHI_PREFIX}/a.bin", big) == hashlib.sha256(big).hexdigest()
    storage.write_json(f"{root}/lake/{PHI_PREFIX}/b.json", {"k": [1, 2]})
    assert storage.read_json(f"{root}/lake/{PHI_PREFIX}/b.json") == {"k": [1, 2]}
    assert storage.exists(f"{root}/lake/{PHI_PREFIX}/b.json")
    assert not storage.exists(f"{root}/lake/{PHI_PREFIX}/never.json")
    listing = storage.upload_dir(tmp_path / "out", f"{root}/lake/derived/{PHI_PREFIX}")
    assert [o["path"] for o in listing] == ["qc/view.png", "results.json"]
    assert storage.read_manifest(f"{root}/lake/derived/{PHI_PREFIX}") is None
    storage.publish_manifest(f"{root}/lake/derived/{PHI_PREFIX}", {"outputs": listing})
    assert storage.read_manifest(f"{root}/lake/derived/{PHI_PREFIX}") == {"outputs": listing}
    rows = [storage.quarantine(b"not dicom", f"{root}/lake", specialty=SPECIALTY, reason="not_dicom", message="m",
                               stage="index", source_uri=src, suffix=".dcm") for _ in range(2)]
    assert [r["first_seen"] for r in rows] == [True, False]
    found = storage.list_objects(f"{root}/lake")
    checksum = hashlib.sha256(b"not dicom").hexdigest()[:16]
    expected = sorted([f"{PHI_PREFIX}/a.bin", f"{PHI_PREFIX}/b.json", f"derived/{PHI_PREFIX}/qc/view.png",
                       f"derived/{PHI_PREFIX}/results.json", f"quarantine/{SPECIALTY}/{checksum}/input.dcm",
                       f"quarantine/{SPECIALTY}/{checksum}/reason.json"])
    assert [o.relpath for o in found] == expected  # _MANIFEST.json is hidden from listings ('_')

    # what the bucket holds, read straight from moto: the right bytes, nothing twice, nothing temporary
    keys = bucket.keys("lake/")
    assert keys == sorted([f"lake/{k}" for k in expected] + [f"lake/derived/{PHI_PREFIX}/_MANIFEST.json"])
    assert bucket.get(f"lake/{PHI_PREFIX}/a.bin") == big
    assert bucket.get(f"lake/derived/{PHI_PREFIX}/qc/view.png") == b"\x89PNG" + big[:5000]
    _no_leftovers(s3_server, bucket.name, keys)

    injected = sum(flaky_s3.faults.values())
    assert injected >= 12, flaky_s3.faults
    lines = _retry_lines(caplog)
    if kind == "slow":
        assert lines == []  # slow is not failed
    else:
        assert lines, "no fault reached imaging_tasks.retry"
        assert all(f"s3://{bucket.name}" in line and "attempt" in line and "retrying in" in line for line in lines)
    assert not any("Doe" in line or "scan.dcm" in line for line in lines), "an object name reached a log line"


# ------------------------------------------------------------------------------------------------ (c) refusals
def test_missing_bucket_403_and_missing_object_fail_at_once(flaky_s3, s3_server, new_s3_bucket, object_storage,
                                                              monkeypatch, caplog):
    """Non-transient errors are not retried by any layer (SDK defaults on): one request, a clear error."""
    from imaging_tasks import storage

    caplog.set_level(logging.WARNING, logger="imaging_tasks.retry")
    denied = new_s3_bucket("denied")
    denied.put("landing/x.dcm", b"x")
    conn = _aws_conn(monkeypatch, flaky_s3, sdk_retries=True)
    flaky_s3.plan = FaultPlan(deny=frozenset({denied.name}))
    started = time.monotonic()

    with pytest.raises(storage.MissingBucket, match=r"bucket s3://no-such-bucket-\w+ does not exist"):
        storage.list_objects(f"s3://{conn}@no-such-bucket-{uuid.uuid4().hex[:8]}/landing")

    flaky_s3.reset_counts()
    with pytest.raises(PermissionError) as refused:
        storage.read_bytes(f"s3://{conn}@{denied.name}/landing/x.dcm")
    assert flaky_s3.repeated() == 0 and sum(flaky_s3.requests.values()) == 1  # one request, not retried
    assert f"read on s3://{denied.name} was refused (access denied)" in "\n".join(refused.value.__notes__)
    flaky_s3.reset_counts()
    with pytest.raises(PermissionError):
        storage.write_bytes(f"s3://{conn}@{denied.name}/lake/y.json", b"{}")
    assert flaky_s3.requests == {"PUT": 1}

    flaky_s3.reset_counts()
    present = new_s3_bucket("present")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{conn}@{present.name}/missing.json")
    assert flaky_s3.repeated() == 0  # a HEAD, and a LIST to tell a missing object from a folder; no retry
    assert storage.read_manifest(f"s3://{conn}@{present.name}/derived/S1") is None
    assert _retry_lines(caplog) == [] and time.monotonic() - started < 5


def test_a_fault_that_outlasts_the_retries_fails_the_call_saying_so(flaky_s3, new_s3_bucket, object_storage,
                                                                     fast_retries, monkeypatch, caplog):
    from imaging_tasks import retry, storage

    bucket = new_s3_bucket("down")
    conn = _aws_conn(monkeypatch, flaky_s3, sdk_retries=False)
    storage.list_objects(bucket.uri("", conn))
    flaky_s3.plan = FaultPlan(seed=3, rate=1.0, burst=99, kinds={"PUT": ("503",)})
    with pytest.raises(OSError) as failed:
        storage.write_bytes(f"s3://{conn}@{bucket.name}/{PHI_PREFIX}/x.json", b"{}")
    assert retry.is_transient(failed.value)
    assert flaky_s3.requests["PUT"] == FAST["attempts"]
    assert f"write s3://{bucket.name}: gave up after 5 attempt(s)" in "\n".join(failed.value.__notes__)
    assert bucket.keys() == []


# ------------------------------------------------------------------------------------------------ (b) a whole run
@pytest.fixture(scope="module")
def landing_files(tmp_path_factory):
    """Two synthetic mammography studies and the bad inputs (quarantined), shared by the two runs."""
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.synth.bad_inputs import write_bad_inputs

    local = tmp_path_factory.mktemp("synth")
    synthesizer(SPECIALTY)(local, 2, 21)
    write_bad_inputs(local, SPECIALTY, seed=21)
    return local / SPECIALTY


def _run(landing_uri: str, lake_uri: str, warehouse: Path, capsys) -> dict:
    from imaging_tasks import cli

    rc = cli.main(["run", SPECIALTY, "--landing", landing_uri, "--lake", lake_uri, "--warehouse", str(warehouse),
                   "--demo-key"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, out
    return json.loads(out[-1])


def _warehouse_snapshot(path: Path, lake: str) -> dict[str, list]:
    """Every row of every table, timestamps and durations aside, the lake bucket's name replaced by <lake>."""
    from imaging_tasks.warehouse import DuckDBWarehouse
    from imaging_tasks.warehouse.schema import TABLES

    wh = DuckDBWarehouse(path)
    out = {}
    for table in TABLES.values():
        keep = [c.name for c in table.columns if c.type != "TIMESTAMP" and c.name != "duration_s"]
        duplicates = wh.query(f"SELECT {', '.join(table.key)}, count(*) FROM {table.name} "
                              f"GROUP BY {', '.join(table.key)} HAVING count(*) > 1")
        assert duplicates == [], f"{table.name}: duplicate keys {duplicates}"
        rows = wh.query(f"SELECT {', '.join(keep)} FROM {table.name}")
        out[table.name] = sorted(json.dumps(dict(zip(keep, r)), sort_keys=True, default=str).replace(lake, "<lake>")
                                 for r in rows)
    return out


def test_a_pipeline_run_through_faults_ends_as_a_run_without_them(landing_files, flaky_s3, s3_server, new_s3_bucket,
                                                                  object_storage, monkeypatch, tmp_path, capsys,
                                                                  caplog):
    """index -> de-identify -> process -> load on s3:// landing and lake, SDK retries at their defaults (as in
    production) plus ours: the faulty run's warehouse and lake equal the faultless run's."""
    caplog.set_level(logging.WARNING, logger="imaging_tasks.retry")
    conn = _aws_conn(monkeypatch, flaky_s3, sdk_retries=True)
    landing = new_s3_bucket("landing")
    landing.upload_dir(landing_files, f"incoming/{SPECIALTY}")
    landing_uri = landing.uri(f"incoming/{SPECIALTY}", conn)
    lakes = {"clean": new_s3_bucket("lake"), "faulty": new_s3_bucket("lake")}

    started = time.monotonic()
    clean = _run(landing_uri, lakes["clean"].uri("lake", conn), tmp_path / "clean.duckdb", capsys)
    halfway = time.monotonic()
    baseline = dict(flaky_s3.requests)
    flaky_s3.reset_counts()
    flaky_s3.plan = FaultPlan(seed=2031, rate=0.12, burst=2, slow_s=0.2)
    faulty = _run(landing_uri, lakes["faulty"].uri("lake", conn), tmp_path / "faulty.duckdb", capsys)
    injected = dict(flaky_s3.faults)
    print(f"clean run {halfway - started:.1f} s, {baseline}; faulty run {time.monotonic() - halfway:.1f} s, "
          f"{dict(flaky_s3.requests)}, injected {injected}; {len(_retry_lines(caplog))} retried by imaging_tasks.retry "
          "(the rest by the SDKs)", file=sys.stderr)

    assert faulty == clean and clean["loaded"] == 2 and clean["failed"] == []
    # seed 2031 breaks 21 of ~250 requests, every kind, on GET, PUT, LIST and HEAD (today's request pattern)
    assert sum(injected.values()) >= 12 and {k for _, k in injected} == {"500", "503", "reset", "cut", "slow"}
    assert {op for op, _ in injected} >= {"GET", "PUT"}
    snapshots = {name: _warehouse_snapshot(tmp_path / f"{name}.duckdb", lakes[name].name) for name in lakes}
    assert snapshots["faulty"] == snapshots["clean"]
    assert len(snapshots["clean"]["studies"]) == 2 and snapshots["clean"]["quarantine"]

    keys = {name: lakes[name].keys() for name in lakes}
    assert keys["faulty"] == keys["clean"]  # nothing written twice under another name, nothing missing
    for key in keys["clean"]:
        if key.endswith(".dcm") or "/input" in key:  # de-identified files and quarantined inputs, byte for byte
            assert lakes["faulty"].get(key) == lakes["clean"].get(key), key
    for name in lakes:
        _no_leftovers(s3_server, lakes[name].name, keys[name])
    assert not any("Doe" in line for line in _retry_lines(caplog))


# ------------------------------------------------------------------------------------------------ classification
def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def test_what_counts_as_transient():
    import aiohttp
    import requests
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, NoCredentialsError, \
        ReadTimeoutError
    from gcsfs.retry import HttpError
    from google.api_core import exceptions as g

    from imaging_tasks.errors import BadInput, ConfigError
    from imaging_tasks.retry import is_transient
    from imaging_tasks.storage import MissingBucket

    def wrapped(cause):  # what s3fs raises: OSError(EIO) from the ClientError
        err = OSError(5, "wrapped")
        err.__cause__ = cause
        return err

    transient = [
        _client_error("InternalError", 500), _client_error("SlowDown", 503), _client_error("ServiceUnavailable", 503),
        _client_error("RequestTimeout", 400), _client_error("Throttling", 400), _client_error("503", 503),
        wrapped(_client_error("InternalError", 500)), EndpointConnectionError(endpoint_url="http://x"),
        ConnectionClosedError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x"),
        ConnectionResetError(), BrokenPipeError(), TimeoutError(), aiohttp.ClientPayloadError("cut"),
        aiohttp.ServerDisconnectedError(), HttpError({"code": 503, "message": "m"}),
        HttpError({"code": 429, "message": "m"}), requests.exceptions.ConnectionError(),
        requests.exceptions.ChunkedEncodingError(),
        # BigQuery / google.api_core
        g.ServiceUnavailable("m"), g.InternalServerError("m"), g.TooManyRequests("m"), g.BadGateway("m"),
        g.GatewayTimeout("m"), g.Forbidden("m", errors=[{"reason": "rateLimitExceeded"}]),
        g.BadRequest("m", errors=[{"reason": "backendError"}]),
        g.InternalServerError("m", errors=[{"reason": "jobInternalError"}]),
    ]
    permanent = [
        _client_error("NoSuchBucket", 404), _client_error("AccessDenied", 403), _client_error("NoSuchKey", 404),
        _client_error("NotImplemented", 501), _client_error("403", 403), wrapped(_client_error("AccessDenied", 403)),
        FileNotFoundError(), PermissionError(), MissingBucket("gone"), ConfigError("bad"), BadInput("r", "m"),
        NoCredentialsError(), HttpError({"code": 403, "message": "m"}), HttpError({"code": 404, "message": "m"}),
        OSError(5, "unexplained"), ValueError(), KeyError("k"),
        g.NotFound("m"), g.Conflict("m"), g.BadRequest("m", errors=[{"reason": "invalidQuery"}]),
        g.Forbidden("m", errors=[{"reason": "quotaExceeded"}]), g.Forbidden("m", errors=[{"reason": "accessDenied"}]),
        g.RetryError("google's Retry gave up", cause=g.ServiceUnavailable("m")),
    ]
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []
    # an error raised while handling a transient one is judged by itself (__context__ is not followed)
    try:
        try:
            raise ConnectionResetError()
        except ConnectionResetError:
            raise KeyError("k")  # noqa: B904
    except KeyError as exc:
        assert not is_transient(exc)


def test_retry_waits_back_off_with_jitter_and_stop_at_the_budget(monkeypatch, caplog):
    from imaging_tasks import retry

    policy = retry.Policy(attempts=6, initial_s=1.0, multiplier=2.0, max_wait_s=5.0, budget_s=12.0)
    waits = [policy.wait(n) for n in range(1, 6)]
    for n, w in enumerate(waits, 1):
        cap = min(5.0, 2.0 ** (n - 1))
        assert cap / 2 <= w <= cap
    slept: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", slept.append)
    clock = iter(range(0, 1000, 4))  # each attempt takes 4 s
    monkeypatch.setattr(retry.time, "monotonic", lambda: next(clock))
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionResetError()

    with pytest.raises(ConnectionResetError) as failed:
        retry.call(flaky, operation="write", target="s3://bucket", policy=policy)
    assert 2 <= len(calls) < policy.attempts  # the 12 s budget ends it before the 6 attempts
    assert "gave up after" in failed.value.__notes__[-1]
    calls.clear()
    with pytest.raises(KeyError):  # never retried
        retry.call(lambda: calls.append(1) or {}["k"], operation="read", target="s3://bucket", policy=policy)
    assert calls == [1]


# ------------------------------------------------------------------------------------------------ BigQuery
class _Job:
    def __init__(self, job_id: str, error: BaseException | None):
        self.job_id, self.error = job_id, error

    def result(self):
        if self.error:
            raise self.error


def test_bigquery_dml_and_load_are_rerun_on_transient_errors_only(monkeypatch):
    """A MERGE/DELETE whose insert or result hits 503/429/reset/backendError is run again (it is idempotent on the
    key); a load job that failed server-side is run again with the whole NDJSON; bad SQL or 403 raise at once."""
    from google.api_core import exceptions as g

    from imaging_tasks.warehouse import bigquery as bqmod
    from imaging_tasks import retry

    monkeypatch.setattr(retry.time, "sleep", lambda s: None)
    queries: list[str] = []
    script: list[tuple[str, BaseException | None]] = []  # per query: ("insert" | "result", error or None)

    class Client:
        def query(self, sql, **_):
            queries.append(sql)
            where, error = script.pop(0)
            if where == "insert" and error:
                raise error  # jobs.insert itself failed
            return _Job(f"job{len(queries)}", error)  # the job failed (or not), seen by result()

    wh = bqmod.BigQueryWarehouse(Client(), project="p", dataset="d")
    script[:] = [("insert", g.ServiceUnavailable("insert")), ("insert", ConnectionResetError()),
                 ("result", g.InternalServerError("job", errors=[{"reason": "backendError"}])), ("result", None)]
    wh._dml("MERGE x", "imaging_merge_results_")
    assert len(queries) == bqmod.DML_ATTEMPTS == 4
    for error in (g.BadRequest("Syntax error", errors=[{"reason": "invalidQuery"}]),
                  g.Forbidden("no", errors=[{"reason": "accessDenied"}])):
        queries.clear()
        script[:] = [("result", error), ("result", None)]
        with pytest.raises(type(error)):
            wh._dml("MERGE x", "imaging_merge_results_")
        assert len(queries) == 1
    queries.clear()
    script[:] = [("result", g.TooManyRequests("slow down"))] * bqmod.DML_ATTEMPTS + [("result", None)]
    with pytest.raises(g.TooManyRequests):
        wh._dml("MERGE x", "imaging_merge_results_")
    assert len(queries) == bqmod.DML_ATTEMPTS

    # the staging load: a failed job is re-run with the whole payload (a fresh stream, not the spent one)
    from imaging_tasks.warehouse.schema import TABLES, prepare_rows

    loads: list[bytes] = []
    outcomes = [g.InternalServerError("load", errors=[{"reason": "backendError"}]), None]

    class LoadClient(Client):
        def create_table(self, *_, **__):
            pass

        def delete_table(self, *_, **__):
            pass

        def load_table_from_file(self, fh, *_, **__):
            loads.append(fh.read())
            return _Job(f"load{len(loads)}", outcomes.pop(0))

    wh.client = LoadClient()
    script[:] = [("result", None)]
    queries.clear()
    rows = [{"specialty": SPECIALTY, "study_id": "S1", "metric": "n", "value": 1.0}]
    prepared = prepare_rows(TABLES["results"], rows, loaded_at=dt.datetime.now(dt.timezone.utc))
    wh._stage_and_merge(TABLES["results"], prepared, ())
    assert len(loads) == 2 and loads[0] == loads[1] and loads[0].count(b"\n") == 1
    assert len(queries) == 1 and queries[0].startswith("MERGE")


# ------------------------------------------------------------------------------------------------ DuckDB
def test_duckdb_waits_for_another_process_holding_the_file(tmp_path, monkeypatch):
    from imaging_tasks import retry
    from imaging_tasks.warehouse import DuckDBWarehouse
    from imaging_tasks.warehouse import duckdb_store

    monkeypatch.setattr(duckdb_store, "LOCK_POLICY", retry.Policy(attempts=40, initial_s=0.1, max_wait_s=0.2,
                                                                  budget_s=20))
    path, ready = tmp_path / "w.duckdb", tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import duckdb, pathlib, sys, time; con = duckdb.connect(sys.argv[1]); pathlib.Path(sys.argv[2]).touch(); "
        "time.sleep(1.5); con.close()"), str(path), str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        assert DuckDBWarehouse(path).query("SELECT 42") == [(42,)]
        assert time.monotonic() - started > 0.5  # it did wait for the other process
    finally:
        holder.wait(timeout=30)


def test_a_warehouse_file_appears_whole_or_not_at_all_when_its_creator_is_killed(tmp_path):
    """DuckDB writes a new file's headers in several writes; a creator killed between them left a file no later
    run could open ("Could not read enough bytes", "not a valid DuckDB database file": 4 of 20 such kills
    before the fix).  Killed the moment the file appears, or at moments spread over the creation, the next
    open always works and no temporary file is left beside it."""
    import signal

    from imaging_tasks.warehouse import DuckDBWarehouse

    script = ("import sys; from imaging_tasks.warehouse import DuckDBWarehouse; "
              "print('ready', flush=True); sys.stdin.readline(); DuckDBWarehouse(sys.argv[1]).query('SELECT 1')")
    for n, delay in enumerate([None] * 12 + [0.0, 0.01, 0.03, 0.08, 0.2]):
        path = tmp_path / f"t{n}" / "warehouse.duckdb"
        proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"  # imports done: the kill lands in the creation
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        if delay is None:  # the moment the file appears
            while not path.exists() and proc.poll() is None:
                pass
        else:
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert DuckDBWarehouse(path).query("SELECT count(*) FROM ledger") == [(0,)], delay
        assert sorted(p.name for p in path.parent.iterdir()) == ["warehouse.duckdb"], delay


# ------------------------------------------------------------------------------------------------ headers
def test_a_network_fault_while_reading_a_header_is_not_a_bad_input():
    import io

    from imaging_tasks.dicom_io import read_header

    class Dropping(io.RawIOBase):  # a remote object's stream whose connection drops at the first read
        def readable(self):
            return True

        def seekable(self):
            return True

        def tell(self):
            return 0

        def seek(self, pos, whence=0):
            return 0

        def readinto(self, buffer):
            raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(ConnectionResetError):
        read_header(io.BufferedReader(Dropping()))
