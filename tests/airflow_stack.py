"""A real Airflow stack for a test: api-server (UI + REST), scheduler, dag-processor and triggerer.

Started the way a deployment runs them (separate ``airflow <component>`` processes, LocalExecutor, SQLite in a
temp AIRFLOW_HOME), with the repo's dags/ and plugins/, free ports, the ``gpu`` pool and a known admin login::

    with AirflowStack(tmp_path, buckets) as stack:           # migrates, starts, waits until the DAGs are parsed
        run = stack.api.trigger("cardiovascular")
        stack.wait_for_run("cardiovascular", run["dag_run_id"])

Failures carry the tail of every component's log (``stack.logs()``).
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DAG_IDS = ("cardiovascular", "mammography", "neuroimaging", "pathology")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ADMIN = ("admin", "admin-password")
TERMINAL = {"success", "failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StackError(AssertionError):
    """A failed CLI call, a component that exited, a wait that timed out (these end with the log tails)."""


class ApiError(AssertionError):
    """A REST call answered with an HTTP error."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# A cron whose first interval after the DAG's start_date (2026-01-01) ends in 2032: unpausing creates no
# scheduled run that would compete with a triggered one (max_active_runs=1); for stacks that test something other
# than the nightly schedule (test_scheduling.py does).
NO_SCHEDULED_RUN_CRON = "0 2 29 2 *"


class RestClient:
    """The public REST API (/api/v2) with a JWT from POST /auth/token, as the UI's own login does."""

    def __init__(self, base_url: str, username: str, password: str):
        self.base_url, self.username, self.password = base_url, username, password
        self._token: str | None = None

    def token(self) -> str:
        if self._token is None:
            body = self._send("POST", "/auth/token", {"username": self.username, "password": self.password},
                              auth=False)
            self._token = body["access_token"]
        return self._token

    def _send(self, method: str, path: str, body=None, *, auth: bool = True, params: dict | None = None):
        url = self.base_url + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            raise ApiError(f"{method} {path} -> HTTP {exc.code}: {exc.read().decode()[:2000]}", exc.code) from None
        return json.loads(text) if text else None

    def get(self, path: str, **params):
        return self._send("GET", "/api/v2" + path, params=params or None)

    def post(self, path: str, body):
        return self._send("POST", "/api/v2" + path, body)

    def patch(self, path: str, body, **params):
        return self._send("PATCH", "/api/v2" + path, body, params=params or None)

    # the few calls the tests make
    def dag_ids(self) -> set[str]:
        return {d["dag_id"] for d in self.get("/dags", limit=100)["dags"]}

    def trigger(self, dag_id: str, conf: dict | None = None) -> dict:
        """A manual run now (what the UI's Trigger button posts)."""
        return self.post(f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})

    def runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns", limit=100, order_by="-run_after")["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.get(f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        path = f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
        return self.get(path, limit=1000)["task_instances"]

    def set_paused(self, dag_id: str, paused: bool) -> dict:
        return self.patch(f"/dags/{dag_id}", {"is_paused": paused}, update_mask="is_paused")


class AirflowStack:
    """Context manager: a throw-away Airflow with the repo's DAGs; ``url`` is the UI, ``api`` the REST client."""

    def __init__(self, tmp_path: Path, buckets: dict | None = None, *, env: dict | None = None,
                 dag_ids=DAG_IDS, start_timeout: float = 180):
        self.tmp = Path(tmp_path)
        self.home = self.tmp / "airflow-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dag_ids, self.start_timeout = tuple(dag_ids), start_timeout
        self.username, self.password = ADMIN
        self.api = RestClient(self.url, *ADMIN)
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_in: float | None = None
        self.env = self._env(buckets or {}, env or {})

    def _env(self, buckets: dict, extra: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "IMAGING_DEID_KEY"))}
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.username}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            # one secret for every component: the scheduler signs the task tokens the api-server checks
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__LOGGING__NAMESPACE_LEVELS": "http.access=WARNING",  # log tails show what happened, not polls
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__IMAGING__LANDING_QUIET_SECONDS": "0",
            "AIRFLOW__IMAGING__SENSOR_TIMEOUT": "60",  # a manual run with nothing to take ends in a minute
            "IMAGING_DEID_DEMO": "1",  # synthetic data only
            "IMAGING_DEVICE": "auto",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO / "plugins"),
            "NO_COLOR": "1",
        })
        variables = {"landing": "AIRFLOW_VAR_IMAGING_LANDING_URI", "lake": "AIRFLOW_VAR_IMAGING_LAKE_URI"}
        for key, var in variables.items():
            if key in buckets:
                env[var] = Path(buckets[key]).as_uri()
        if "warehouse" in buckets:
            env["AIRFLOW_VAR_IMAGING_WAREHOUSE"] = f"duckdb://{buckets['warehouse']}"
        env.update(extra)
        return env

    # --- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> AirflowStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        atexit.register(self.stop)  # even if the test process is interrupted
        # a known password for the simple auth manager: it only generates passwords for users missing here
        (self.home / "passwords.json").write_text(json.dumps({self.username: self.password}))
        # the api-server builds its app (the slowest start) while the DB is migrated; the rest need the tables
        self._spawn("api-server", AIRFLOW__DATABASE__CHECK_MIGRATIONS="False")
        self.cli("db", "migrate")
        for name in COMPONENTS[1:]:
            self._spawn(name)
        self.wait_until(self._api_up, "the api-server to answer", self.start_timeout)
        self.api.post("/pools", {"name": "gpu", "slots": 1, "description": "GPU slots (one task per GPU)"})
        self.wait_until(self._dags_parsed, f"DAGs {self.dag_ids} to be parsed", self.start_timeout)
        self.wait_until(self._scheduler_healthy, "the scheduler's heartbeat", 60)
        self.started_in = time.monotonic() - t0

    def _spawn(self, name: str, **env: str) -> None:
        with open(self.tmp / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen([str(BIN / "airflow"), name], env={**self.env, **env}, cwd=self.tmp,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5  # the api-server and scheduler exit in ~3 s; the triggerer takes ~11 s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # task subprocesses of the LocalExecutor are in the scheduler's group; nothing else should be left
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # --- helpers ---------------------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 120) -> str:
        """The airflow CLI against this stack's home (SQLite 'database is locked' is retried)."""
        for _ in range(10):
            res = subprocess.run([str(BIN / "airflow"), *args], env=self.env, cwd=self.tmp, capture_output=True,
                                 text=True, timeout=timeout)
            if "database is locked" not in res.stderr:
                break
            time.sleep(2)
        if res.returncode:
            raise StackError(f"airflow {' '.join(args)} exited {res.returncode}: {res.stderr[-3000:]}")
        return res.stdout

    def logs(self, chars: int = 2500) -> str:
        parts = []
        for name in COMPONENTS:
            path = self.tmp / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            state = self.procs[name].poll() if name in self.procs else "not started"
            parts.append(f"--- {name} (exit: {state}) {path}\n{text[-chars:]}")
        return "\n".join(parts)

    def fail(self, message: str):
        raise StackError(f"{message}\n{self.logs()}")

    def _check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if dead:
            self.fail(f"Airflow components exited: {dead}")

    def wait_until(self, ready, what: str, timeout: float, interval: float = 0.5):
        """Poll ``ready()`` until it returns something truthy (returned); connection and HTTP errors count as not
        ready yet; a component exiting or the timeout fails with the log tails."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            self._check_alive()
            try:
                result = ready()
                if result:
                    return result
            except (OSError, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status < 500 and exc.status != 404:
                    raise  # 401, 400, ...: waiting will not change the answer
                last = exc
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")
            time.sleep(interval)

    def _dags_parsed(self) -> bool:
        if set(self.dag_ids) <= self.api.dag_ids():
            return True
        errors = self.api.get("/importErrors", limit=100)["import_errors"]
        if errors:  # a DAG file that does not import: say why at once
            self.fail("DAG import errors:\n" + "\n".join(f"{e['filename']}:\n{e['stack_trace'][-2000:]}"
                                                           for e in errors))
        return False

    def _api_up(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as resp:
            return resp.status == 200

    def _scheduler_healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as resp:
            health = json.loads(resp.read())
        return all((health.get(c) or {}).get("status") == "healthy" for c in ("scheduler", "triggerer",
                                                                              "dag_processor"))

    def wait_for_run(self, dag_id: str, run_id: str, states=("success",), timeout: float = 180) -> dict:
        """Wait for a run to reach one of ``states`` (or any terminal state, which fails unless listed)."""
        wanted = set(states)

        def reached():
            run = self.api.run(dag_id, run_id)
            if run["state"] in wanted:
                return run
            if run["state"] in TERMINAL:
                tis = [(t["task_id"], t.get("map_index"), t["state"]) for t in self.api.task_instances(dag_id, run_id)]
                self.fail(f"run {dag_id}/{run_id} ended {run['state']}, expected {sorted(wanted)}; tasks: {tis}")
            return None

        return self.wait_until(reached, f"run {dag_id}/{run_id} to reach {sorted(wanted)}", timeout, interval=1)
