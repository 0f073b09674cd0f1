"""A local BigQuery for the tests: ``bqemulator`` (REST API on 127.0.0.1, DuckDB inside) in a venv of its own.

Why a venv of its own: the project pins duckdb 2.0.0; bqemulator needs DuckDB's ``spatial`` extension at
start-up, which DuckDB downloads from its extension site (not reachable here, nor in CI), and the only
pip-installable build of it is ``duckdb-ext-spatial`` for DuckDB 1.4.4.  So the emulator runs on
duckdb==1.4.4 with that extension, in ``.venv-bqemu/`` (override: env ``IMAGING_BQEMU_VENV``), created on
first use from the exact pins below and reused while they do not change.

Two adjustments, both made here at start-up and nowhere else:
* DuckDB finds the packaged extension through ``HOME`` (``$HOME/.duckdb/extensions`` links to the wheel's
  folder), so ``INSTALL spatial`` is a no-op and ``LOAD spatial`` works offline;
* bqemulator 1.4.0 registers its Python UDFs with type names as strings (``"JSON"``), which DuckDB's Python
  API accepts from 1.5 on; on 1.4.4 they are converted with ``duckdb.sqltype`` (and numpy is installed, which
  1.4.4 needs for Python UDFs).

Usage: ``python tests/bq_emulator.py install [VENV]`` (what a make step would run);
``with Emulator() as emu: emu.endpoint`` from the tests; ``VENV/bin/python tests/bq_emulator.py serve --port N``
is what :class:`Emulator` starts.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-bqemu"

# What the emulator venv gets: these four, with every dependency pinned by CONSTRAINTS (a `pip freeze`).
REQUIREMENTS = ["bqemulator==1.4.0", "duckdb==1.4.4", "duckdb-ext-spatial==1.4.4.20260205", "numpy==2.4.6"]
CONSTRAINTS = """\
alembic==1.20.1
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
asgiref==3.13.0
bqemulator==1.4.0
certifi==2026.10.18
cffi==2.1.1
charset-normalizer==3.5.2
click==8.5.1
cryptography==50.0.2
duckdb-ext-spatial==1.4.4.20260205
duckdb==1.4.4
fastapi==0.165.0
fastavro==1.13.1
google-api-core==2.44.0
google-auth==2.62.2
google-cloud-bigquery-storage==2.43.0
googleapis-common-protos==1.76.0
grpcio-health-checking==1.80.1
grpcio-status==1.85.1
grpcio-tools==1.80.1
grpcio==1.85.1
h11==0.16.0
httpcore==1.0.9
httptools==0.9.0
httpx==0.28.1
idna==3.20
Mako==1.4.3
MarkupSafe==3.0.4
numpy==2.4.6
opentelemetry-api==1.45.2
opentelemetry-exporter-http-transport==0.66b2
opentelemetry-exporter-otlp-common==0.66b2
opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2
opentelemetry-exporter-otlp==1.45.2
opentelemetry-instrumentation-asgi==0.66b2
opentelemetry-instrumentation-fastapi==0.66b2
opentelemetry-instrumentation-grpc==0.66b2
opentelemetry-instrumentation==0.66b2
opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-util-http==0.66b2
orjson==3.13.0
packaging==26.3
prometheus_client==0.26.0
proto-plus==1.29.0
protobuf==6.33.6
pyarrow==26.0.1
pyasn1==0.6.5
pyasn1_modules==0.4.2
pycparser==3.12
pydantic-settings==2.16.3
pydantic==2.14.3
pydantic_core==2.50.4
PyJWT==2.15.1
python-dotenv==1.2.4
pytz==2026.6
PyYAML==6.0.3
requests==2.34.2
SQLAlchemy==2.1.9
sqlglot==30.11.0
starlette==1.10.0
structlog==26.1.0
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
uvicorn==0.54.0
uvloop==0.23.0
watchfiles==1.3.0
websockets==17.4
wrapt==2.5.2
"""
START_TIMEOUT_S = 90


class EmulatorError(RuntimeError):
    """The emulator could not be installed or started; the message says why and what to look at."""


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _fingerprint() -> str:
    text = "\n".join([sys.version.split()[0], *REQUIREMENTS, CONSTRAINTS])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_venv(venv: Path | str | None = None) -> Path:
    """The emulator venv's python, creating or refreshing the venv if its pins changed (locked across processes)."""
    import fcntl

    venv = Path(venv or os.environ.get("IMAGING_BQEMU_VENV") or DEFAULT_VENV).resolve()
    stamp = venv / ".installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:  # e.g. .venv-bqemu.lock beside the venv
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text().strip() == _fingerprint() and _venv_python(venv).exists():
            return _venv_python(venv)
        base = getattr(sys, "_base_executable", None) or sys.executable
        with tempfile.TemporaryDirectory(prefix="bqemu-pins-") as tmp:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text(CONSTRAINTS)
            for cmd in ([base, "-m", "venv", "--clear", str(venv)],
                        [str(_venv_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                         *REQUIREMENTS, "-c", str(constraints)]):
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise EmulatorError(f"setting up the BigQuery emulator venv failed: {' '.join(cmd)}\n"
                                        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        stamp.write_text(_fingerprint() + "\n")
        return _venv_python(venv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """Starts the emulator on 127.0.0.1 (ephemeral, in memory) and stops it; ``endpoint`` is its REST base URL."""

    def __init__(self, venv: Path | str | None = None, project: str = "imaging-test"):
        self.python = ensure_venv(venv)
        self.project = project
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="bqemu-"))
        self.log_path = self.workdir / "emulator.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Emulator":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update({"BQEMU_ENABLE_FORMAT_EXTENSIONS": "false",  # the avro extension would be downloaded
                    "BQEMU_UPLOAD_STAGING_DIR": str(self.workdir / "uploads"),
                    "BQEMU_HOME": str(self.workdir / "home")})
        cmd = [str(self.python), str(Path(__file__).resolve()), "serve", "--port", str(self.port),
               "--project", self.project]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                                     start_new_session=True)
        log.close()
        atexit.register(self.stop)  # even if the test session dies without tearing its fixtures down
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"{self.endpoint}/bigquery/v2/projects/{self.project}/datasets"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmulatorError(f"the BigQuery emulator exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            time.sleep(0.25)
        self.stop()
        raise EmulatorError(f"the BigQuery emulator did not answer within {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- inside the emulator venv
def _serve(port: int, project: str) -> int:
    """Run bqemulator in this (the emulator venv's) interpreter, with the two adjustments of the docstring."""
    import duckdb
    import duckdb_ext  # the namespace package of duckdb-ext-spatial: duckdb_ext/extensions/v1.4.4/<platform>/

    home = Path(os.environ.get("BQEMU_HOME") or tempfile.mkdtemp(prefix="bqemu-home-"))
    (home / ".duckdb").mkdir(parents=True, exist_ok=True)
    link = home / ".duckdb" / "extensions"
    if not link.exists():
        link.symlink_to(Path(list(duckdb_ext.__path__)[0]) / "extensions", target_is_directory=True)
    os.environ["HOME"] = str(home)  # DuckDB's default extension_directory is $HOME/.duckdb/extensions

    import bqemulator.sql.builtin_udfs as udfs

    register = udfs.register_builtin_udfs

    class _TypeNames:
        """Converts type names to DuckDB types in ``create_function`` (DuckDB < 1.5 takes types only)."""

        def __init__(self, con):
            self._con = con

        def __getattr__(self, name):
            return getattr(self._con, name)

        def create_function(self, name, fn, parameters=None, return_type=None, **kwargs):
            as_type = lambda t: duckdb.sqltype(t) if isinstance(t, str) else t  # noqa: E731
            params = None if parameters is None else [as_type(p) for p in parameters]
            return self._con.create_function(name, fn, params, as_type(return_type), **kwargs)

    if tuple(int(x) for x in duckdb.__version__.split(".")[:2]) < (1, 5):
        udfs.register_builtin_udfs = lambda con: register(_TypeNames(con))

    from bqemulator.cli import main

    sys.argv = ["bqemulator", "start", "--rest-host", "127.0.0.1", "--rest-port", str(port),
                "--grpc-host", "127.0.0.1", "--grpc-port", "0", "--ephemeral", "--project", project,
                "--log-level", "warning", "--log-format", "console"]
    return main()


def _cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install", help="create or refresh the emulator venv from the pins")
    inst.add_argument("venv", nargs="?", default=None)
    serve = sub.add_parser("serve", help="(inside the emulator venv) run the emulator")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--project", default="imaging-test")
    args = parser.parse_args(argv)
    if args.cmd == "install":
        print(ensure_venv(args.venv))
        return 0
    return _serve(args.port, args.project) or 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
