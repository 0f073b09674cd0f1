"""The production configuration for real: PostgreSQL metadata DB, CeleryExecutor on Redis, a GPU worker.

Starts every Airflow 3 component as its own process, the way docker-compose.yaml and the Helm chart do:
scheduler, dag-processor, triggerer, api-server, and two Celery workers, one on the ``default`` queue and
one on the ``gpu`` queue (distinct hostnames). Then, as a user would from the UI, it logs in through the REST
API, creates the ``gpu`` pool, unpauses and triggers the cardiovascular DAG on synthetic studies, waits for
the run, and checks through the REST API that the GPU step ran on the GPU worker (queue and pool ``gpu``) and
every other step on the default worker.

Isolation, so parallel runs don't clash: a fresh PostgreSQL database with a unique name (dropped at the end),
a random Redis database number plus a unique Celery key prefix (keys deleted at the end), free ports, and
every component in its own process group, killed at the end.

Needs the PostgreSQL and Redis servers of the machine (127.0.0.1:5432 trust auth as ``postgres``,
127.0.0.1:6379); they are started when installed but stopped.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from airflow_stack import NO_SCHEDULED_RUN_CRON

pytestmark = [pytest.mark.production, pytest.mark.scheduler]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DAG_ID = "cardiovascular"
STUDIES = 2
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
REDIS = ("127.0.0.1", 6379)
GPU_STEP = "calcium_scoring"  # a step its record marks gpu: queue and pool `gpu`


# ---------------------------------------------------------------- services of the machine

def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _ensure_service(name: str, host: str, port: int, start: list[str] | str | None) -> None:
    if _port_open(host, port):
        return
    if start is None:
        pytest.skip(f"{name} is not running on {host}:{port} and is not installed here")
    subprocess.run(start, shell=isinstance(start, str), check=False, capture_output=True, timeout=60)
    deadline = time.time() + 30
    while not _port_open(host, port):
        if time.time() > deadline:
            pytest.skip(f"{name} did not come up on {host}:{port}")
        time.sleep(0.5)


def _postgres_start_command() -> str | None:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or not shutil.which("pg_ctlcluster"):
        return None
    return f"pg_ctlcluster --skip-systemctl-redirect {versions[-1]} main start"


def _redis_start_command() -> list[str] | None:
    if not shutil.which("redis-server"):
        return None
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)
    return ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
            "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]


@pytest.fixture()
def metadata_db():
    """A fresh PostgreSQL database with a unique name; dropped (connections and all) afterwards."""
    psycopg2 = pytest.importorskip("psycopg2", reason="PostgreSQL driver: apache-airflow[postgres]")
    pytest.importorskip("asyncpg", reason="the api-server's async PostgreSQL driver: apache-airflow[postgres]")
    _ensure_service("PostgreSQL", PG["host"], PG["port"], _postgres_start_command())
    name = f"imaging_it_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(dbname="postgres", **PG)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture()
def broker():
    """A Redis database number and a Celery key prefix of our own; our keys are deleted afterwards."""
    pytest.importorskip("airflow.providers.celery", reason="CeleryExecutor: apache-airflow[celery]")
    redis = pytest.importorskip("redis")
    _ensure_service("Redis", *REDIS, _redis_start_command())
    db, prefix = random.randint(1, 15), f"imaging-it-{uuid.uuid4().hex[:8]}:"
    yield {"url": f"redis://{REDIS[0]}:{REDIS[1]}/{db}", "prefix": prefix}
    client = redis.Redis(host=REDIS[0], port=REDIS[1], db=db)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


# ---------------------------------------------------------------- the Airflow components

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group is gone already
        pass


class Stack:
    """The Airflow processes, their logs, and the REST API as a logged-in user sees it."""

    def __init__(self, home: Path, env: dict[str, str], api_port: int, user: str, password: str):
        self.home, self.env, self.user, self.password = home, env, user, password
        self.api = f"http://127.0.0.1:{api_port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.token: str | None = None
        self.workers: dict[str, str] = {}  # queue -> the hostname its worker reports

    def airflow(self, *args: str, timeout: float = 300) -> str:
        res = subprocess.run([str(BIN / "airflow"), *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert res.returncode == 0, f"airflow {' '.join(args)} exited {res.returncode}: {res.stderr[-3000:]}"
        return res.stdout

    def start(self, name: str, *args: str, **extra_env: str) -> None:
        log = open(self.home / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen([str(BIN / "airflow"), *args], env={**self.env, **extra_env},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def stop(self) -> None:
        """SIGTERM to every component's process group (Celery pool children and api-server workers included),
        SIGKILL to whatever is left after 45 s."""
        for proc in self.procs.values():
            _killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 45
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"components exited: {dead}\n{self.logs()}"

    def logs(self, tail: int = 2500) -> str:
        out = []
        for path in sorted(self.home.glob("*.log")):
            out.append(f"----- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        for path in sorted((self.home / "logs").rglob("*.log"))[-6:]:
            out.append(f"----- task log {path.relative_to(self.home)}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # REST API, as the UI calls it
    def request(self, method: str, path: str, body: dict | None = None, *, ok=(200, 201)) -> dict:
        import requests

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        res = requests.request(method, self.api + path, json=body, headers=headers, timeout=30)
        assert res.status_code in ok, f"{method} {path} -> {res.status_code}: {res.text[:2000]}"
        return res.json() if res.content else {}

    def wait_until(self, what: str, probe, timeout: float, every: float = 2.0):
        deadline = time.time() + timeout
        while True:
            value = probe()
            if value:
                return value
            self.check_alive()
            assert time.time() < deadline, f"timed out waiting for {what}\n{self.logs()}"
            time.sleep(every)

    def get_ok(self, path: str) -> dict | None:
        import requests

        try:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            res = requests.get(self.api + path, headers=headers, timeout=10)
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy starting
            return None
        return res.json() if res.status_code == 200 else None


HOSTNAME_MODULE = '''\
"""[core] hostname_callable for the integration test: two workers on one machine, two names."""
import os
import socket


def worker_hostname() -> str:
    return os.environ.get("IMAGING_IT_HOSTNAME") or socket.getfqdn()
'''


@pytest.fixture()
def stack(tmp_path, metadata_db, broker, buckets):
    home = tmp_path / "airflow"
    home.mkdir()
    (tmp_path / "pylib").mkdir()
    (tmp_path / "pylib" / "imaging_it_hostname.py").write_text(HOSTNAME_MODULE)
    api_port = _free_port()
    user, password = "imaging", secrets.token_urlsafe(16)
    passwords = home / "simple_auth_manager_passwords.json"
    passwords.write_text(json.dumps({user: password}))
    env = {
        **os.environ,  # includes the buckets fixture's AIRFLOW_VAR_IMAGING_* variables
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_db,
        "AIRFLOW__CELERY__BROKER_URL": broker["url"],
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata_db,
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": broker["prefix"],
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{user}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__IMAGING__SCHEDULE": NO_SCHEDULED_RUN_CRON,
        "AIRFLOW__IMAGING__SENSOR_TIMEOUT": "120",
        "IMAGING_DEVICE": "auto",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(tmp_path / "pylib")]),
    }
    s = Stack(home, env, api_port, user, password)
    try:
        s.airflow("db", "migrate")
        s.start("api-server", "api-server")
        s.start("scheduler", "scheduler")
        s.start("dag-processor", "dag-processor")
        s.start("triggerer", "triggerer")
        token = uuid.uuid4().hex[:6]
        s.workers = workers = {"default": f"worker-default-{token}", "gpu": f"worker-gpu-{token}"}
        for queue, concurrency in (("default", "2"), ("gpu", "1")):
            s.start(f"worker-{queue}", "celery", "worker", "--queues", queue, "--concurrency", concurrency,
                    "--celery-hostname", f"{workers[queue]}@%h",
                    IMAGING_IT_HOSTNAME=workers[queue],
                    AIRFLOW__CORE__HOSTNAME_CALLABLE="imaging_it_hostname.worker_hostname",
                    AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port()))
        yield s
    finally:
        s.stop()


def test_gpu_steps_run_on_the_gpu_worker_through_the_rest_api(stack, buckets):
    from imaging_tasks.specialties import synthesizer

    started = time.time()
    synthesizer(DAG_ID)(buckets["landing"], STUDIES, 31)

    # log in as the UI does (SimpleAuthManager here; FAB/Keycloak issue the same kind of JWT)
    stack.wait_until("the api-server", lambda: stack.get_ok("/api/v2/monitor/health"), timeout=180)
    stack.token = stack.request("POST", "/auth/token", {"username": stack.user, "password": stack.password},
                                ok=(200, 201))["access_token"]
    # Admin > Pools > + : one slot per GPU
    stack.request("POST", "/api/v2/pools", {"name": "gpu", "slots": 1, "description": "GPU slots (one task per GPU)"})
    stack.wait_until(f"the dag-processor to parse {DAG_ID}", lambda: stack.get_ok(f"/api/v2/dags/{DAG_ID}"),
                     timeout=180)
    stack.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    run = stack.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                        {"logical_date": None, "conf": {}, "note": "production stack integration test"})
    run_path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}"

    def finished():
        state = (stack.get_ok(run_path) or {}).get("state")
        return state if state in ("success", "failed") else None

    state = stack.wait_until("the DAG run", finished, timeout=240, every=3)
    tis = stack.request("GET", f"{run_path}/taskInstances?limit=100")["task_instances"]
    table = [(t["task_id"], t["map_index"], t["state"], t["queue"], t["pool"], t["hostname"]) for t in tis]
    assert state == "success", f"{table}\n{stack.logs()}"

    # the DAG as the UI shows it (Graph > task details): which steps are declared for the GPU queue
    tasks = stack.request("GET", f"/api/v2/dags/{DAG_ID}/tasks")["tasks"]
    gpu_tasks = {t["task_id"] for t in tasks if t["queue"] == "gpu"}
    assert GPU_STEP in gpu_tasks and all(t["pool"] == "gpu" for t in tasks if t["task_id"] in gpu_tasks), tasks
    gpu = [t for t in tis if t["task_id"] in gpu_tasks]
    cpu = [t for t in tis if t["task_id"] not in gpu_tasks]
    assert len([t for t in gpu if t["task_id"] == GPU_STEP]) == STUDIES, table  # mapped over the studies
    assert {t["task_id"] for t in cpu} >= {"wait_for_landing", "index_studies", "deidentify", "load_metadata"}, table
    # every task succeeded; the optional FHIR update is skipped, as it is without a configured FHIR server
    assert all(t["state"] == ("skipped" if t["task_id"] == "fhir_update" else "success") for t in tis), table
    for t in gpu:
        assert (t["queue"], t["pool"], t["hostname"]) == ("gpu", "gpu", stack.workers["gpu"]), table
    for t in cpu:
        assert (t["queue"], t["pool"], t["hostname"]) == ("default", "default_pool", stack.workers["default"]), table

    from imaging_tasks.warehouse import DuckDBWarehouse

    assert DuckDBWarehouse(buckets["warehouse"]).count("studies") == STUDIES
    print(f"\nproduction stack: {DAG_ID} run {run['dag_run_id']} succeeded in {time.time() - started:.0f}s; "
          f"{len(gpu)} GPU task(s) on {stack.workers['gpu']}, {len(cpu)} on {stack.workers['default']}")
