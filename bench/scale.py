"""Scale bench (issue 17): N synthetic studies of one specialty through the library alone and through its DAG under
the real Airflow scheduler, side by side on the same landing folder.

    .venv/bin/python bench/scale.py [--studies 200] [--specialty cardiovascular] [--batch-sizes 16,32]
        [--skip-library] [--skip-dag] [--parallelism N] [--with-deid] [--workdir DIR] [--out bench/results/scale]

Why it is built this way:

* The studies are generated once (``imaging-tasks synth``, the project's own generator) and every configuration
  reads the same landing folder, each with its own empty lake and warehouse: the only thing that differs between
  rows is what runs them.
* (a) ``imaging-tasks run`` is the floor: the same pipeline functions in one process, no orchestration.
* (b) ``airflow standalone`` (api-server, scheduler, dag-processor, triggerer; LocalExecutor; SQLite) is what a
  user gets from ``make up``: the bench changes no Airflow default it does not have to (``--parallelism`` is
  opt-in), so the DAG/library ratio is that of the embedded default.  Its environment is what the DAGs need: the
  landing/lake/warehouse Variables, the demo key (synthetic data), no quiet period (the uploads are complete), a
  cron that never fires (no nightly run competing with the triggered one), the ``gpu`` pool.  Each batch size of
  ``--batch-sizes`` is a fresh Airflow home, lake and warehouse: a second run on the same ones would skip every
  study as done.
* Per-stage time comes from the pipeline's own StatsD timers (``imaging_tasks.metrics``, ``<p>.<s>.step.<step>``),
  caught by a UDP listener here: the same numbers for the CLI and inside each task, so "TI duration minus the
  step's own work" is the orchestration's share per task instance.  The lineage records (``lake/runs/``,
  ``pipeline.record_lineage``) are summed per task too, as a cross-check; the CLI records every step as task
  ``cli`` with map index -1, so there only the last record per study survives (noted in the results).
* Task-instance times are read from the metadata DB (``task_instance``, ``dag_run``) after Airflow stopped, per
  task_id, with no assumption on which tasks the DAG has: the DAG is being changed to map over batches.
* Peak memory is the RSS summed over each process tree, sampled with psutil every 0.2 s, and the PSS every 5 s:
  forked workers share pages, so summed RSS counts the LocalExecutor's idle workers several times over.  CPU
  seconds per kind of process, and the whole machine's, say where the time went and whether the machine was shared.

Nothing here imports ``tests/``; a bench stands on its own.  ``--with-deid`` adds ``bench/deid_scale.py`` (the
de-identification command vs dicognito vs a bare loop, whole processes; slow, so off by default).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BIN = Path(sys.executable).parent
RESULTS = BENCH / "results"
NEVER_CRON = "0 2 29 2 *"  # first fire after the DAGs' start_date is in 2032: unpausing schedules no run
ADMIN = ("admin", "scale-bench-password")
STATSD_PREFIX = "imaging"
TERMINAL = {"success", "failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def utc_epoch(text: str | None) -> float | None:
    """A metadata-DB timestamp (SQLite stores them as naive UTC text) as epoch seconds."""
    if not text:
        return None
    t = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


# --------------------------------------------------------------------------- measuring
class TreeSampler(threading.Thread):
    """Peak memory of the process trees under ``roots()``, and CPU seconds per kind of process.

    RSS every ``interval`` s; PSS (each shared page split among its sharers) every ``pss_every`` samples (reading
    smaps of ~60 processes every second cost ~17% of a core in a 14-minute run), because forked processes share most pages: 32 idle LocalExecutor workers add up to
    ~4.5 GB of RSS but ~0.3 GB of PSS.  CPU per process is its last sampled user+system time (a process that exits
    between two samples loses at most one interval), grouped by ``kind_of``.  Also remembers every process it saw,
    so a stop can end exactly those (by pid and start time) and nothing else.
    """

    def __init__(self, roots, interval: float = 0.2, pss_every: int = 25):
        super().__init__(daemon=True)
        self.roots, self.interval, self.pss_every = roots, interval, pss_every
        self.peak_bytes = self.peak_pss = self.peak_procs = self.samples = 0
        self.seen: dict[int, psutil.Process] = {}
        self.cpu: dict[int, list] = {}  # pid -> [kind, cpu at first sight, cpu at last sight]
        self.own_cpu_s = self._own_cpu0 = 0.0
        self._halt = threading.Event()

    def reset(self) -> None:
        """Peaks and CPU from now on (the run's, not the start-up's)."""
        self.peak_bytes = self.peak_pss = self.peak_procs = 0
        self._own_cpu0 = self.own_cpu_s
        for v in self.cpu.values():
            v[1] = v[2]

    def sample(self) -> int:
        total, pss, pids = 0, 0, set()
        with_pss = self.samples % self.pss_every == 0
        for pid in self.roots():
            try:
                root = psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in tree:
                if p.pid in pids:
                    continue
                try:
                    with p.oneshot():
                        if with_pss:
                            m = p.memory_full_info()
                            pss += m.pss
                        else:
                            m = p.memory_info()
                        t = p.cpu_times()
                        if p.pid not in self.cpu:
                            self.cpu[p.pid] = [kind_of(p), 0.0, 0.0]
                except psutil.Error:
                    continue
                total += m.rss
                self.cpu[p.pid][2] = t.user + t.system
                pids.add(p.pid)
                self.seen.setdefault(p.pid, p)
        self.samples += 1
        self.peak_bytes = max(self.peak_bytes, total)
        if with_pss:
            self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(pids))
        return total

    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, first, last in self.cpu.values():
            out[kind] = out.get(kind, 0.0) + last - first
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def run(self) -> None:
        t0 = time.thread_time()
        while not self._halt.is_set():
            self.sample()
            self.own_cpu_s = time.thread_time() - t0
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)


def kind_of(p: psutil.Process) -> str:
    """A process by what it is to Airflow (its title or command line), e.g. ``scheduler``, ``worker``."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    text = " ".join(cmd)
    if text.startswith("airflow ") and not text.startswith("airflow standalone"):  # a set process title
        words = text.split()
        return words[1] if len(words) > 1 else "airflow"
    for arg in cmd[1:]:
        name = Path(arg).name
        if name == "imaging-tasks":
            return name
        if name in ("airflow", "python", "python3") or name.startswith("-"):
            continue
        return name
    return Path(cmd[0]).name if cmd else "?"


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (all processes, all cores)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class StatsdSink(threading.Thread):
    """A StatsD listener on a free UDP port: the pipeline's step timers, from the CLI and from every task."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.records: list[tuple[str, float, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                data = self.sock.recv(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            for line in data.decode(errors="replace").splitlines():
                name, _, rest = line.partition(":")
                value, _, kind = rest.partition("|")
                try:
                    self.records.append((name, float(value), kind.split("|")[0]))
                except ValueError:
                    pass

    def stop(self) -> None:
        time.sleep(0.3)  # the last datagrams in flight
        self._halt.set()
        self.join(timeout=2)
        self.sock.close()

    def env(self) -> dict:
        return {"IMAGING_STATSD_HOST": "127.0.0.1", "IMAGING_STATSD_PORT": str(self.port),
                "IMAGING_STATSD_PREFIX": STATSD_PREFIX}

    def steps(self, specialty: str) -> dict[str, dict]:
        """{step: {"n", "sum_s"}} of the ``step.*`` timers."""
        head = f"{STATSD_PREFIX}.{specialty}.step."
        out: dict[str, dict] = {}
        for name, value, kind in self.records:
            if kind == "ms" and name.startswith(head):
                s = out.setdefault(name[len(head):], {"n": 0, "sum_s": 0.0})
                s["n"] += 1
                s["sum_s"] += value / 1000.0
        return {k: {"n": v["n"], "sum_s": round(v["sum_s"], 3)} for k, v in sorted(out.items())}


def lineage_by_task(lake: Path, specialty: str) -> dict[str, dict]:
    """The lake's lineage records (one file per task, map index and study) summed per task_id."""
    out: dict[str, dict] = {}
    for f in sorted((lake / "runs" / specialty).glob("*/*.json")):
        try:
            row = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        s = out.setdefault(str(row.get("task_id")), {"records": 0, "sum_s": 0.0})
        s["records"] += 1
        s["sum_s"] = round(s["sum_s"] + float(row.get("duration_s") or 0), 3)
    return out


def warehouse_studies(warehouse: Path, specialty: str) -> int | None:
    if not warehouse.exists():
        return None
    try:
        from imaging_tasks.warehouse import open_warehouse

        return open_warehouse(str(warehouse)).count("studies", "WHERE specialty = ?", [specialty])
    except Exception as exc:  # noqa: BLE001 - a figure missing from the table, not a failed bench
        print(f"  (could not count warehouse studies: {type(exc).__name__}: {exc})", flush=True)
        return None


def base_env(data_dir: Path, sink: StatsdSink) -> dict:
    """What both runs share: no inherited key or Airflow setting, the demo key (synthetic data), StatsD here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "IMAGING_"))}
    env.update({"IMAGING_DEID_DEMO": "1", "IMAGING_DATA_DIR": str(data_dir), "NO_COLOR": "1",
                "PATH": f"{BIN}:{env.get('PATH', '')}", **sink.env()})
    return env


# --------------------------------------------------------------------------- (a) the library
def run_library(args, landing: Path, work: Path) -> dict:
    work.mkdir(parents=True)
    lake, warehouse = work / "lake", work / "warehouse.duckdb"
    sink = StatsdSink()
    sink.start()
    cmd = [str(BIN / "imaging-tasks"), "run", args.specialty, "--landing", str(landing / args.specialty),
           "--lake", str(lake), "--warehouse", str(warehouse), "--demo-key", "--run-id", "scale-bench"]
    print(f"(a) library: {' '.join(cmd[1:3])} ... ({args.studies} studies)", flush=True)
    with open(work / "imaging-tasks.log", "wb") as log:
        t0, busy0 = time.monotonic(), machine_busy_s()
        proc = subprocess.Popen(cmd, env=base_env(work, sink), cwd=work, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
        sampler = TreeSampler(lambda: [proc.pid])
        sampler.start()
        try:
            out, _ = proc.communicate(timeout=args.timeout)
        except BaseException:
            _end_processes(sampler.seen.values())
            raise
        finally:
            sampler.stop()
        wall, busy = time.monotonic() - t0, machine_busy_s() - busy0
    sink.stop()
    printed = {}
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            printed = json.loads(line)
            break
    res = {"config": "library", "label": "library (imaging-tasks run)", "exit": proc.returncode,
           "wall_s": round(wall, 2), **memory_and_cpu(sampler, busy), "task_instances": None,
           "studies_loaded": printed.get("loaded"), "warehouse_studies": warehouse_studies(warehouse, args.specialty),
           "printed": printed, "stages": sink.steps(args.specialty), "lineage": lineage_by_task(lake, args.specialty),
           "note": "lineage: the CLI records every step as task 'cli', map index -1: one record per study survives"}
    print(f"    {res['wall_s']} s, exit {proc.returncode}, loaded {res['studies_loaded']}, peak RSS "
          f"{res['peak_rss_mb']} MB, PSS {res['peak_pss_mb']} MB, CPU {res['cpu_s']}", flush=True)
    if proc.returncode not in (0, 1):
        print((work / "imaging-tasks.log").read_text(errors="replace")[-3000:], flush=True)
    return res


def memory_and_cpu(sampler: TreeSampler, machine_busy: float) -> dict:
    return {"peak_rss_mb": round(sampler.peak_bytes / 1e6, 1), "peak_pss_mb": round(sampler.peak_pss / 1e6, 1),
            "peak_processes": sampler.peak_procs, "cpu_s": sampler.cpu_by_kind(),
            "machine_busy_s": round(machine_busy, 1), "sampler_cpu_s": round(sampler.own_cpu_s - sampler._own_cpu0, 1)}


# --------------------------------------------------------------------------- (b) the DAG
class Api:
    """The REST API (/api/v2) with a JWT from /auth/token, as the UI logs in."""

    def __init__(self, base: str):
        self.base, self._token = base, None

    def _send(self, method: str, path: str, body=None, params=None, auth=True):
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            if self._token is None:
                self._token = self._send("POST", "/auth/token", {"username": ADMIN[0], "password": ADMIN[1]},
                                         auth=False)["access_token"]
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(url, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode()
        return json.loads(text) if text else None

    def get(self, path, **params):
        return self._send("GET", "/api/v2" + path, params=params or None)

    def post(self, path, body):
        return self._send("POST", "/api/v2" + path, body)

    def patch(self, path, body, **params):
        return self._send("PATCH", "/api/v2" + path, body, params=params or None)


class Standalone:
    """``airflow standalone`` in a throw-away AIRFLOW_HOME, configured by environment only (it passes its own
    environment to the four components it starts)."""

    def __init__(self, work: Path, env: dict, port: int):
        self.work, self.env, self.port = work, env, port
        self.url = f"http://127.0.0.1:{port}"
        self.api = Api(self.url)
        self.proc: subprocess.Popen | None = None
        self.sampler = TreeSampler(lambda: [self.proc.pid] if self.proc else [])
        self.log_path = work / "standalone.log"

    def start(self, dag_id: str, timeout: float = 300) -> float:
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(BIN / "airflow"), "standalone"], env=self.env, cwd=self.work,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.sampler.start()  # also remembers every process of the tree, for stop()
        self.wait(lambda: self._health() is not None, "the api-server", timeout)
        # as `make` sets it up: one slot per GPU, one per core on a machine without one (the GPU steps run on the CPU)
        self.api.post("/pools", {"name": "gpu", "slots": os.cpu_count() or 1,
                                 "description": "GPU slots (one per core: no GPU here)"})
        self.wait(lambda: self._dag_parsed(dag_id), f"DAG {dag_id} to be parsed", timeout)
        self.wait(lambda: all((self._health().get(c) or {}).get("status") == "healthy"
                              for c in ("scheduler", "triggerer", "dag_processor")), "healthy components", timeout)
        return time.monotonic() - t0

    def _health(self):
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    def _dag_parsed(self, dag_id: str) -> bool:
        if dag_id in {d["dag_id"] for d in self.api.get("/dags", limit=100)["dags"]}:
            return True
        errors = self.api.get("/importErrors", limit=100)["import_errors"]
        if errors:
            raise RuntimeError("DAG import errors:\n" + "\n".join(e["stack_trace"][-1500:] for e in errors))
        return False

    def wait(self, ready, what: str, timeout: float, interval: float = 0.5):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"airflow standalone exited {self.proc.returncode} while waiting for {what}:\n"
                                   + self.tail())
            try:
                result = ready()
                if result:
                    return result
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 404:
                    raise
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.tail()}")
            time.sleep(interval)

    def tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGINT is standalone's own shutdown (it terminates its components); whatever of the tree is left after
        that (task processes, api-server workers) is ended by pid."""
        if self.proc is None:
            return
        self.sampler.sample()
        self.sampler.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        _end_processes(self.sampler.seen.values())


def _end_processes(procs) -> None:
    """SIGTERM, then SIGKILL after 10 s, to the given processes that still run (psutil checks the start time, so
    a reused pid is never hit)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.terminate()
                alive.append(p)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=10)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)


def airflow_env(args, home: Path, landing: Path, lake: Path, warehouse: Path, port: int, sink: StatsdSink) -> dict:
    env = base_env(home.parent, sink)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN[0]}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        # one secret for every component: the scheduler signs the task tokens the api-server checks
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__IMAGING__SCHEDULE": NEVER_CRON,
        "AIRFLOW__IMAGING__LANDING_QUIET_SECONDS": "0",
        "AIRFLOW_VAR_IMAGING_LANDING_URI": landing.as_uri(),
        "AIRFLOW_VAR_IMAGING_LAKE_URI": lake.as_uri(),
        "AIRFLOW_VAR_IMAGING_WAREHOUSE": f"duckdb://{warehouse}",
        "PYTHONPATH": str(REPO / "plugins"),
    })
    if args.parallelism:
        env["AIRFLOW__CORE__PARALLELISM"] = str(args.parallelism)
    return env


def run_dag(args, landing: Path, work: Path, batch: int | None) -> dict:
    home, lake, warehouse = work / "airflow-home", work / "lake", work / "warehouse.duckdb"
    home.mkdir(parents=True)
    (home / "passwords.json").write_text(json.dumps({ADMIN[0]: ADMIN[1]}))
    label = "DAG, default" if batch is None else f"DAG, batch {batch}"
    sink = StatsdSink()
    sink.start()
    port = free_port()
    stack = Standalone(work, airflow_env(args, home, landing, lake, warehouse, port, sink), port)
    dag_id, note, conf = args.specialty, [], {}
    print(f"(b) {label}: airflow standalone in {home}", flush=True)
    try:
        started_in = stack.start(dag_id)
        params = stack.api.get(f"/dags/{dag_id}/details").get("params") or {}
        if batch is not None:
            if "batch_size" in params:
                conf = {"batch_size": batch}
            else:
                note.append("the DAG has no batch_size Param yet: conf dropped, this is a default run")
        stack.api.patch(f"/dags/{dag_id}", {"is_paused": False}, update_mask="is_paused")
        idle = stack.sampler.sample()
        stack.sampler.reset()  # the peaks and CPU of the run, not of the start-up
        print(f"    up in {started_in:.1f} s (idle RSS {idle / 1e6:.0f} MB); triggering with conf {conf}", flush=True)
        t_trigger, busy0 = time.time(), machine_busy_s()
        run = stack.api.post(f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        run_id = run["dag_run_id"]
        quoted = urllib.parse.quote(run_id, safe="")
        state, last_print = run["state"], time.monotonic()
        deadline = time.monotonic() + args.timeout
        while state not in TERMINAL:
            if time.monotonic() > deadline:
                note.append(f"timed out after {args.timeout} s")
                break
            if stack.proc.poll() is not None:
                raise RuntimeError(f"airflow standalone exited {stack.proc.returncode}:\n{stack.tail()}")
            time.sleep(1)
            try:
                state = stack.api.get(f"/dags/{dag_id}/dagRuns/{quoted}")["state"]
            except (OSError, urllib.error.HTTPError):
                continue
            if time.monotonic() - last_print > 30:
                print(f"    {time.time() - t_trigger:.0f} s: run {state}", flush=True)
                last_print = time.monotonic()
        t_seen, busy = time.time(), machine_busy_s() - busy0
        stack.sampler.sample()
        measured = memory_and_cpu(stack.sampler, busy)
    finally:
        stack.stop()
        sink.stop()
    db = dag_metrics(home / "airflow.db", dag_id, run_id)
    stats = sink.steps(args.specialty)
    for task_id, t in db["tasks"].items():  # orchestration's share: TI time not spent in the step itself
        work_s = (stats.get(STEP_OF.get(task_id, task_id)) or {}).get("sum_s")
        if work_s is not None and t["n"]:
            t["work_s"] = work_s
            t["overhead_s_per_ti"] = round((t["sum_s"] - work_s) / t["n"], 3)
    end = db["run"].get("end")
    res = {"config": "dag" if batch is None else f"dag_b{batch}", "label": label, "batch_size": batch,
           "conf": conf, "run_id": run_id, "state": db["run"].get("state") or state,
           "wall_s": round((end or t_seen) - t_trigger, 2), "wall_seen_s": round(t_seen - t_trigger, 2),
           "start_up_s": round(started_in, 1), "idle_rss_mb": round(idle / 1e6, 1),
           **measured,
           "task_instances": db["task_instances"], "tries": db["tries"], "run": db["run"], "tasks": db["tasks"],
           "studies_loaded": warehouse_studies(warehouse, args.specialty), "stages": stats,
           "lineage": lineage_by_task(lake, args.specialty), "note": "; ".join(note),
           "parallelism": args.parallelism or "default (32)"}
    res["warehouse_studies"] = res["studies_loaded"]
    print(f"    run {res['state']} in {res['wall_s']} s, {res['task_instances']} task instances, loaded "
          f"{res['studies_loaded']}, peak RSS {res['peak_rss_mb']} MB, PSS {res['peak_pss_mb']} MB, CPU {res['cpu_s']}",
          flush=True)
    if res["state"] != "success":
        failed = {k: v["states"] for k, v in db["tasks"].items() if set(v["states"]) - {"success", "skipped"}}
        print(f"    task states: {failed}\n{stack.tail(2000)}", flush=True)
    return res


# the library's StatsD step names where a task id differs
STEP_OF = {"index_studies": "index", "load_metadata": "load"}


def dag_metrics(db_path: Path, dag_id: str, run_id: str) -> dict:
    """Per task_id from the metadata DB (read after Airflow stopped: no lock contention): instances, summed
    duration, first start -> last end, states; and the run's own times."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        runs = con.execute("SELECT * FROM dag_run WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)).fetchall()
        r = dict(runs[0]) if runs else {}
        tis = [dict(t) for t in con.execute("SELECT * FROM task_instance WHERE dag_id = ? AND run_id = ?",
                                             (dag_id, run_id))]
    finally:
        con.close()
    tasks: dict[str, dict] = {}
    for t in tis:
        s = tasks.setdefault(t["task_id"], {"n": 0, "sum_s": 0.0, "first_queued": None, "first_start": None,
                                            "last_end": None, "states": {}, "tries": 0})
        s["n"] += 1
        s["sum_s"] += float(t.get("duration") or 0)
        s["states"][str(t.get("state"))] = s["states"].get(str(t.get("state")), 0) + 1
        s["tries"] += int(t.get("try_number") or 0)
        for key, col, pick in (("first_queued", "queued_dttm", min), ("first_start", "start_date", min),
                               ("last_end", "end_date", max)):
            v = utc_epoch(t.get(col))
            if v is not None:
                s[key] = v if s[key] is None else pick(s[key], v)
    run = {"state": r.get("state"), "queued": utc_epoch(r.get("queued_at")), "start": utc_epoch(r.get("start_date")),
           "end": utc_epoch(r.get("end_date"))}
    queued = [s["first_queued"] for s in tasks.values() if s["first_queued"]]
    ends = [s["last_end"] for s in tasks.values() if s["last_end"]]
    run["first_task_queued"] = min(queued) if queued else None
    run["last_task_end"] = max(ends) if ends else None
    if queued and ends:
        run["first_queued_to_last_end_s"] = round(max(ends) - min(queued), 2)
    order = sorted(tasks, key=lambda k: tasks[k]["first_start"] or float("inf"))
    for k in order:
        s = tasks[k]
        s["sum_s"] = round(s["sum_s"], 3)
        s["span_s"] = round(s["last_end"] - s["first_start"], 2) if s["first_start"] and s["last_end"] else None
    return {"run": run, "tasks": {k: tasks[k] for k in order}, "task_instances": len(tis),
            "tries": sum(s["tries"] for s in tasks.values())}


# --------------------------------------------------------------------------- report
def fmt(v, spec: str = "") -> str:
    return "" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    m, d = res["machine"], res["data"]
    lib = next((c for c in res["configs"] if c["config"] == "library"), None)
    lines = [f"Scale bench of {res['when']}: {d['studies']} synthetic {res['specialty']} studies "
             f"({d['files']} files, {d['megabytes']:.0f} MB, generated in {d['synth_s']:.1f} s); machine: "
             f"{m['cores']} cores, {m['memory_gb']:.0f} GB, load average {m['load_start'][0]:.2f} at start, "
             f"{m['load_end'][0]:.2f} at end (1 min); Airflow {m['airflow']}, git {m['git']}.", "",
             "| configuration | wall s | / library | task instances | peak RSS MB | peak PSS MB | CPU s (tree) | "
             "machine busy s | studies loaded | state | note |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in res["configs"]:
        ratio = c["wall_s"] / lib["wall_s"] if lib and c is not lib and lib["wall_s"] else None
        state = c.get("state") or ("exit " + str(c.get("exit")))
        lines.append(f"| {c['label']} | {c['wall_s']:.1f} | {fmt(ratio, '.2f')}{'x' if ratio else ''} | "
                     f"{fmt(c.get('task_instances'))} | {c['peak_rss_mb']:.0f} | {c['peak_pss_mb']:.0f} | "
                     f"{sum(c['cpu_s'].values()):.0f} | {c['machine_busy_s']:.0f} | {fmt(c.get('studies_loaded'))} | "
                     f"{state} | {c.get('note') or ''} |")
    lines += ["", "CPU s (tree): user + system seconds of the configuration's processes during the run, by kind: " +
              "; ".join(f"{c['label']}: " + ", ".join(f"{k} {v:.0f}" for k, v in c["cpu_s"].items() if v >= 0.5)
                        for c in res["configs"]) + ". Machine busy s: every process on the machine, of which other "
              "processes than the configuration's and the sampler's: " + ", ".join(
                  f"{c['machine_busy_s'] - sum(c['cpu_s'].values()) - c['sampler_cpu_s']:.0f} s" for c in res["configs"])
              + " (sampler: " + ", ".join(f"{c['sampler_cpu_s']:.0f} s" for c in res["configs"]) + "): a shared "
              "machine shows here, and its wall times are not the configuration's alone."]
    for c in res["configs"]:
        if c["config"] == "library":
            continue
        r = c["run"]
        lines += ["", f"**{c['label']}** (run {c['run_id']}): trigger -> run end {c['wall_s']:.1f} s; first task "
                  f"queued {fmt(_minus(r.get('first_task_queued'), r.get('queued')), '.1f')} s after the run was "
                  f"queued, first task queued -> last task end {fmt(r.get('first_queued_to_last_end_s'), '.1f')} s; "
                  f"start-up of the stack {c['start_up_s']:.0f} s (not in wall), idle RSS {c['idle_rss_mb']:.0f} MB, "
                  f"peak {c['peak_processes']} processes; parallelism {c['parallelism']}.", "",
                  "| stage (task_id) | TIs | TI s (sum) | in-step s (StatsD) | overhead s / TI | first start -> last "
                  "end s | library in-step s | states |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for task_id, t in c["tasks"].items():
            libs = ((lib or {}).get("stages") or {}).get(STEP_OF.get(task_id, task_id), {}).get("sum_s")
            states = ", ".join(f"{k} {v}" for k, v in t["states"].items())
            lines.append(f"| {task_id} | {t['n']} | {t['sum_s']:.1f} | {fmt(t.get('work_s'), '.1f')} | "
                         f"{fmt(t.get('overhead_s_per_ti'), '.2f')} | {fmt(t.get('span_s'), '.1f')} | "
                         f"{fmt(libs, '.1f')} | {states} |")
    if lib:
        lines += ["", "**library** per step (StatsD step timers, summed over studies): " + ", ".join(
            f"{k} {v['sum_s']:.1f} s ({v['n']})" for k, v in lib["stages"].items())
            + f"; total in steps {sum(v['sum_s'] for v in lib['stages'].values()):.1f} s of {lib['wall_s']:.1f} s wall."]
    if res.get("deid"):
        lines += ["", "### De-identification command (bench/deid_scale.py)", "", res["deid"].get("markdown", "")]
    return "\n".join(lines) + "\n"


def _minus(a, b):
    return None if a is None or b is None else a - b


def machine(load_start) -> dict:
    try:
        from importlib.metadata import version

        airflow = version("apache-airflow")
    except Exception:  # noqa: BLE001
        airflow = "?"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dags", "plugins", "imaging_tasks"], cwd=REPO,
                               capture_output=True, text=True).stdout
        git = head.strip() + (" + uncommitted changes" if dirty.strip() else "")
    except OSError:
        git = "?"
    return {"cores": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 1e9, "python":
            platform.python_version(), "platform": platform.platform(), "airflow": airflow, "git": git,
            "load_start": [round(x, 2) for x in load_start]}


# --------------------------------------------------------------------------- main
def synthesize(args, landing: Path) -> dict:
    t0 = time.monotonic()
    subprocess.run([str(BIN / "imaging-tasks"), "synth", "--specialty", args.specialty, "--out", str(landing),
                    "--studies", str(args.studies), "--seed", str(args.seed)], check=True, env={
                        **{k: v for k, v in os.environ.items() if not k.startswith("IMAGING_")}})
    files = [p for p in (landing / args.specialty).rglob("*") if p.is_file()]
    return {"studies": args.studies, "files": len(files), "megabytes": sum(p.stat().st_size for p in files) / 1e6,
            "synth_s": round(time.monotonic() - t0, 1), "seed": args.seed}


def run_deid(args) -> dict:
    """bench/deid_scale.py as it is (its own results files), then its table here."""
    cmd = [sys.executable, str(BENCH / "deid_scale.py"), *args.deid_args.split()]
    print(f"(c) {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    out = {"exit": proc.returncode, "command": " ".join(cmd[1:])}
    if (RESULTS / "deid_scale.json").exists():
        out["results"] = json.loads((RESULTS / "deid_scale.json").read_text())
        out["markdown"] = (RESULTS / "deid_scale.md").read_text()
    return out


def write(res: dict, stem: Path) -> str:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    stem.with_suffix(".md").write_text(md)
    return md


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=200)
    p.add_argument("--specialty", default="cardiovascular")
    p.add_argument("--batch-sizes", default="", help="comma list: one more DAG run per batch size (default: none)")
    p.add_argument("--skip-library", action="store_true")
    p.add_argument("--skip-dag", action="store_true")
    p.add_argument("--parallelism", type=int, default=None,
                   help="[core] parallelism of the LocalExecutor (default: Airflow's, 32)")
    p.add_argument("--with-deid", action="store_true", help="also run bench/deid_scale.py (slow)")
    p.add_argument("--deid-args", default="", help="arguments for bench/deid_scale.py, e.g. '--repeats 1'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="per run, s (default 600 + 30 s per study)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "scale_bench")
    p.add_argument("--keep", action="store_true", help="keep each configuration's lake, warehouse and Airflow home")
    p.add_argument("--out", type=Path, default=RESULTS / "scale")
    args = p.parse_args()
    args.timeout = args.timeout or 600 + 30 * args.studies
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    stem = args.out if args.out.is_absolute() else Path.cwd() / args.out

    def interrupted(signum, frame):  # SIGTERM ends the runs as Ctrl-C does: through every finally
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    work = args.workdir.resolve() / f"{args.specialty}-{args.studies}"
    shutil.rmtree(work, ignore_errors=True)
    landing = work / "landing"
    res = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "specialty": args.specialty,
           "machine": machine(os.getloadavg()), "args": {k: str(v) for k, v in vars(args).items()}, "configs": []}
    print(f"synthesizing {args.studies} {args.specialty} studies in {landing}", flush=True)
    res["data"] = synthesize(args, landing)
    print(f"    {res['data']}", flush=True)
    plan = ([] if args.skip_library else [("library", None)]) + \
           ([] if args.skip_dag else [("dag", None), *(("dag", b) for b in batches)])
    for kind, batch in plan:
        where = work / (kind if batch is None else f"dag-b{batch}")
        res["configs"].append(run_library(args, landing, where) if kind == "library"
                              else run_dag(args, landing, where, batch))
        res["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
        write(res, stem)  # a long night that dies half-way still leaves its rows
        last = res["configs"][-1]
        if not args.keep and (last.get("state") == "success" or last.get("exit") == 0):  # else: logs to read
            shutil.rmtree(where, ignore_errors=True)
    if args.with_deid:
        res["deid"] = run_deid(args)
    res["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    md = write(res, stem)
    print("\n" + md)
    if not args.keep and not any(work.glob("*/*.log")):
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
