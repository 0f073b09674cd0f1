"""Metrics reach a StatsD listener and say what the run did; the deploy files expect the names the code sends.

A UDP socket on 127.0.0.1 stands in for statsd-exporter while a real ``imaging-tasks run`` goes through synthetic
studies and planted bad inputs; the counts it receives are compared with the run's outcomes as the warehouse and
the ledger record them.  The statsd-exporter mapping and the Grafana dashboard are read and checked against the
names ``imaging_tasks.metrics`` declares and sends, and against Airflow's own metric registry.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MAPPING = REPO / "deploy" / "statsd-mapping.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "imaging-pipeline.json"
SPECIALTY = "cardiovascular"
RATES = {"IMAGING_COST_PER_CPU_HOUR": "0.5", "IMAGING_COST_PER_GPU_HOUR": "2.0", "IMAGING_COST_PER_GB_STORED": "0.1"}


class Listener:
    """A StatsD stand-in: every datagram received on 127.0.0.1:<free port>, parsed into (name, value, type)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.lines.extend(line for line in data.decode().splitlines() if line)

    def close(self) -> list[tuple[str, float, str]]:
        time.sleep(0.5)  # datagrams still in flight
        self._stop.set()
        self._thread.join()
        self.sock.close()
        out = []
        for line in self.lines:
            name, rest = line.split(":", 1)
            value, kind = rest.split("|")[:2]
            out.append((name, float(value), kind))
        return out


def _cli(cwd: Path, env: dict, *args: str) -> dict:
    env = {**os.environ, "IMAGING_DEID_DEMO": "1", "IMAGING_DEVICE": "cpu", **env}
    proc = subprocess.run([sys.executable, "-m", "imaging_tasks.cli", "run", SPECIALTY, "--landing",
                           f"landing/{SPECIALTY}", "--lake", "lake", "--warehouse", "warehouse.duckdb", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _glob(pattern: str) -> re.Pattern:
    """statsd-exporter's glob: ``*`` is one name segment (no dots)."""
    return re.compile("^" + r"[^.]+".join(re.escape(p) for p in pattern.split("*")) + "$")


def _mapping() -> list[dict]:
    return yaml.safe_load(MAPPING.read_text())["mappings"]


def _mapped(name: str, metric_type: str | None = None) -> dict | None:
    """The first mapping rule matching a StatsD name (tags stripped), as the exporter picks it."""
    for rule in _mapping():
        if rule.get("match_metric_type") and metric_type and rule["match_metric_type"] != metric_type:
            continue
        if _glob(rule["match"]).match(name):
            return rule
    return None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CLI run on 2 synthetic studies plus the bad-input set, metrics to a UDP listener; its outcomes."""
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.synth.bad_inputs import write_bad_inputs
    from imaging_tasks.warehouse import DuckDBWarehouse

    cwd = tmp_path_factory.mktemp("metrics-run")
    synthesizer(SPECIALTY)(cwd / "landing", 2, 47)
    planted = write_bad_inputs(cwd / "landing", SPECIALTY, seed=9)
    listener = Listener()
    started = time.monotonic()
    summary = _cli(cwd, {"IMAGING_STATSD_HOST": "127.0.0.1", "IMAGING_STATSD_PORT": str(listener.port), **RATES})
    duration = time.monotonic() - started
    received = listener.close()
    wh = DuckDBWarehouse(cwd / "warehouse.duckdb")

    def rows(table: str, *cols: str) -> list[dict]:
        return [dict(zip(cols, r)) for r in wh.query(f"SELECT {', '.join(cols)} FROM {table}")]

    return {"cwd": cwd, "summary": summary, "received": received, "planted": planted, "duration": duration,
            "quarantine": rows("quarantine", "stage", "reason"),
            "ledger": rows("ledger", "study_id", "state", "step", "reason"),
            "instances": rows("instances", "bytes"), "studies": rows("studies", "study_id")}


def _counts(received, prefix: str) -> dict[str, float]:
    out: dict[str, float] = collections.Counter()
    for name, value, kind in received:
        if kind == "c" and name.startswith(prefix):
            out[name[len(prefix):]] += value
    return out


def _timers(received, prefix: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = collections.defaultdict(list)
    for name, value, kind in received:
        if kind == "ms" and name.startswith(prefix):
            out[name[len(prefix):]].append(value)
    return out


def test_a_cli_run_sends_its_real_outcomes(run):
    from imaging_tasks.specialties import get

    p = f"imaging.{SPECIALTY}."
    counts, timers, summary = _counts(run["received"], p), _timers(run["received"], p), run["summary"]
    # arrived: every study the index handed on; processed: every study in the warehouse; nothing failed
    assert counts["studies.arrived"] == summary["studies"] == len(run["ledger"]) == 3
    assert counts["studies.processed"] == len(run["studies"]) == summary["loaded"] == 2
    assert counts["studies.loaded"] == 2
    assert not summary["failed"] and not any(k.startswith("studies.failed.") for k in counts)
    # quarantined inputs by stage and reason: the warehouse quarantine table, row for row, and the planted reasons
    got = {tuple(k.split(".")[2:]): v for k, v in counts.items() if k.startswith("inputs.quarantined.")}
    want = collections.Counter((r["stage"], r["reason"]) for r in run["quarantine"])
    assert got == dict(want) and sum(want.values()) == len(run["planted"])
    assert {reason for _stage, reason in got} == set(run["planted"].values())
    # quarantined studies by step and reason: the ledger's
    got = {tuple(k.split(".")[2:]): v for k, v in counts.items() if k.startswith("studies.quarantined.")}
    want = collections.Counter((r["step"], r["reason"]) for r in run["ledger"] if r["state"] == "quarantined")
    assert got == dict(want) and want  # the truncated file was a study of its own: no usable input left
    # per-step timers: index and load once per run, de-identify and audit per study, each processing step per
    # study processed, each also under its device
    steps = [s.name for s in get(SPECIALTY).steps]
    assert len(timers["step.index"]) == len(timers["step.load"]) == 1
    assert len(timers["step.deidentify"]) == 3 and len(timers["step.audit_phi"]) == 2
    for step in steps:
        assert len(timers[f"step.{step}"]) == 2, step
        assert timers[f"device.cpu.{step}"] == timers[f"step.{step}"], step
    assert not any(k.startswith("device.cuda.") for k in timers)  # IMAGING_DEVICE=cpu
    assert all(v >= 0 for vs in timers.values() for v in vs)
    assert sum(timers["step.index"]) + sum(sum(timers[f"step.{s}"]) for s in steps) < run["duration"] * 1000
    assert len(timers["queue_wait.landing"]) == 3 and len(timers["queue_wait.process"]) == 2
    # bytes: the de-identified instances the warehouse lists; results written to derived/
    assert counts["bytes.anonymized"] == sum(r["bytes"] for r in run["instances"])
    derived = [f for f in (run["cwd"] / "lake").rglob("*") if f.is_file() and "derived" in f.parts
               and not f.name.startswith("_")]
    assert counts["bytes.derived"] == sum(f.stat().st_size for f in derived) > 0
    assert counts["bytes.landing"] > 0
    # cost: CPU seconds of every step at the CPU rate, bytes kept at the storage rate (rounded per emission)
    cpu_ms = sum(v for k, vs in timers.items() if k.startswith("device.cpu.") for v in vs)
    assert counts["cost.cpu"] == pytest.approx(cpu_ms / 3.6e6 * 0.5, rel=1e-3, abs=1e-7)
    stored = counts["bytes.anonymized"] + counts["bytes.derived"]
    assert counts["cost.storage"] == pytest.approx(stored / 1e9 * 0.1, rel=1e-3, abs=1e-7)
    assert "cost.gpu" not in counts
    # every name sent is one statsd-exporter maps to a labelled metric
    unmapped = sorted({n for n, _v, _k in run["received"] if not _mapped(n)})
    assert not unmapped


def test_declared_names_are_the_names_sent(run):
    from imaging_tasks import metrics

    sent = {n.split(".", 2)[2] for n, _v, _k in run["received"]}
    for name in sent:
        assert any(_glob(t).match(name) for t in metrics.NAMES), name
    kinds = {n.split(".", 2)[2]: k for n, _v, k in run["received"]}
    for name, kind in kinds.items():
        assert kind == next(k for t, k in metrics.NAMES.items() if _glob(t).match(name)), name


def test_mapping_and_dashboard_follow_the_names_the_code_sends():
    from imaging_tasks import metrics

    rules = _mapping()
    names = {r["name"] for r in rules}
    # every name the pipeline declares (variables filled in) is mapped, with one label per variable
    for template, kind in metrics.NAMES.items():
        stat = f"{metrics.DEFAULT_PREFIX}.cardiovascular." + template.replace("*", "x")
        rule = _mapped(stat, {"c": "counter", "ms": "timer"}[kind])
        assert rule, stat
        assert len(rule.get("labels") or {}) == rule["match"].count("*"), rule
        assert rule["name"].startswith("imaging_")
        assert rule["name"].endswith("_total") == (kind == "c"), rule
    # every imaging_* rule serves a declared name (no stale rule)
    for rule in rules:
        if rule["match"].startswith("imaging."):
            assert any(_glob(rule["match"]).match(f"imaging.x.{t.replace('*', 'x')}") for t in metrics.NAMES), rule
    # the dashboard queries only metrics the mapping defines (histograms: _bucket/_sum/_count)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs.append(dashboard["templating"]["list"][0]["query"]["query"])
    used = set()
    for expr in exprs:
        for m in re.finditer(r'__name__=~"([^"]+)"', expr):
            assert any(re.fullmatch(m.group(1), n) for n in names), expr
        for m in re.finditer(r"\b((?:imaging|airflow)_[a-z_]+)\b", re.sub(r'__name__=~"[^"]+"', "", expr)):
            used.add(re.sub(r"_(bucket|sum|count)$", "", m.group(1)) if m.group(1) not in names else m.group(1))
    assert used <= names, used - names
    # each subject the issue names has its panel
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for subject in ("queue length", "time per scan per step", "success rate", "quarantines by reason",
                    "cost per scan"):
        assert subject in titles, subject
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {"prometheus"}


def test_airflow_rules_name_metrics_airflow_sends():
    """Each airflow.* rule matches a metric of Airflow's own registry (no rule for a name Airflow dropped)."""
    import airflow

    registry = yaml.safe_load((Path(airflow.__file__).parent / "_shared" / "observability" / "metrics"
                               / "metrics_template.yaml").read_text())
    known = {m["name"] for m in registry["metrics"]}
    for rule in _mapping():
        if rule["match"].startswith("airflow."):
            stat = rule["match"][len("airflow."):]
            assert any(_glob(stat).match(k) for k in known), rule["match"]


def test_airflow_statsd_lines_become_the_mapped_metrics():
    """Airflow's StatsD logger as compose configures it (InfluxDB tags) sends names the mapping turns into the
    dashboard's metrics, with the tags as labels."""
    from statsd import StatsClient

    from airflow._shared.observability.metrics.statsd_logger import get_statsd_logger

    listener = Listener()
    logger = get_statsd_logger(stats_class=StatsClient, host="127.0.0.1", port=listener.port, prefix="airflow",
                               influxdb_tags_enabled=True, statsd_influxdb_enabled=True)
    logger.incr("ti.finish", tags={"dag_id": "cardiovascular", "task_id": "deidentify", "state": "success"})
    logger.gauge("ti.queued", 3, tags={"dag_id": "cardiovascular", "task_id": "deidentify", "queue": "gpu"})
    logger.gauge("executor.queued_tasks", 2, tags={"status": "queued", "executor_class_name": "CeleryExecutor"})
    logger.gauge("pool.running_slots", 1, tags={"pool_name": "gpu"})
    got = listener.close()
    assert len(got) == 4
    want = {"airflow_ti_finish_total": "counter", "airflow_task_instances": "gauge",
            "airflow_executor_queued_tasks": "gauge", "airflow_pool_slots": "gauge"}
    for line, _value, kind in got:
        name, _, tags = line.partition(",")
        assert "=" in tags  # InfluxDB-style tags: the exporter makes them labels
        rule = _mapped(name, {"c": "counter", "g": "gauge"}[kind])
        assert rule and want.pop(rule["name"]) == {"c": "counter", "g": "gauge"}[kind], line
    assert not want


def test_compose_wires_the_metrics_stack():
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    services, env = compose["services"], compose["x-airflow-common"]["environment"]
    assert env["AIRFLOW__METRICS__STATSD_ON"] == "True" and env["AIRFLOW__METRICS__STATSD_HOST"] == "statsd-exporter"
    assert env["AIRFLOW__METRICS__STATSD_PORT"] == "9125" and env["AIRFLOW__METRICS__STATSD_PREFIX"] == "airflow"
    assert env["AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED"] == "True"
    assert env["IMAGING_STATSD_HOST"] == "${IMAGING_STATSD_HOST:-statsd-exporter}"
    assert env["IMAGING_STATSD_PREFIX"] == "imaging"
    for name in ("IMAGING_COST_PER_CPU_HOUR", "IMAGING_COST_PER_GPU_HOUR", "IMAGING_COST_PER_GB_STORED"):
        assert name in env
    exporter = services["statsd-exporter"]
    assert exporter["image"].split(":-")[1].startswith("prom/statsd-exporter:")
    assert "./deploy/statsd-mapping.yaml:/etc/statsd-exporter/mapping.yaml:ro" in exporter["volumes"]
    assert "--statsd.mapping-config=/etc/statsd-exporter/mapping.yaml" in exporter["command"]
    assert "--statsd.listen-udp=:9125" in exporter["command"]
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert "statsd-exporter:9102" in targets
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    datasource = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["uid"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/imaging.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    # Airflow components find the exporter's name as soon as they start
    assert "statsd-exporter" in compose["x-airflow-common"]["depends_on"]


# --------------------------------------------------------------------------- metrics never break a run
def test_unset_or_unreachable_statsd_sends_nothing_and_raises_nothing(monkeypatch, caplog):
    from imaging_tasks import metrics

    monkeypatch.delenv("IMAGING_STATSD_HOST", raising=False)
    assert not metrics.enabled()
    metrics.count("cardiovascular", "studies.arrived", 3)  # off: a no-op
    # a host that does not resolve: one warning, no exception, however many metrics follow
    monkeypatch.setenv("IMAGING_STATSD_HOST", "statsd.does-not-exist.invalid")
    monkeypatch.setattr(metrics, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="imaging_tasks.metrics"):
        for _ in range(3):
            metrics.step_done("cardiovascular", "deidentify", 1.5, device="cuda:0")
            metrics.count("cardiovascular", "studies.arrived")
    assert not metrics.enabled()
    assert len([r for r in caplog.records if r.name == "imaging_tasks.metrics"]) == 1
    # a port nobody listens on: UDP is fire and forget
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    monkeypatch.setenv("IMAGING_STATSD_HOST", "127.0.0.1")
    monkeypatch.setenv("IMAGING_STATSD_PORT", str(port))
    assert metrics.enabled()
    started = time.monotonic()
    for _ in range(200):
        metrics.step_done("cardiovascular", "deidentify", 0.1)
    assert time.monotonic() - started < 1.0
    # a bad port setting: off, not a failure
    monkeypatch.setenv("IMAGING_STATSD_PORT", "not-a-port")
    metrics.count("cardiovascular", "studies.arrived")


def test_a_run_with_an_unreachable_statsd_succeeds(run):
    """The same landing again (--reprocess: every step runs) with metrics pointed at a host that does not resolve."""
    summary = _cli(run["cwd"], {"IMAGING_STATSD_HOST": "statsd.does-not-exist.invalid", **RATES}, "--reprocess")
    assert summary["loaded"] == 2 and not summary["failed"]


def test_names_are_safe_segments():
    from imaging_tasks import metrics

    assert metrics.segment("cuda:0") == "cuda_0" and metrics.device_kind("cuda:1") == "cuda"
    assert metrics.device_kind(None) == "cpu" and metrics.segment("a.b c") == "a_b_c"
    assert metrics.segment("") == "unknown" and metrics.segment("phi_audit_failed") == "phi_audit_failed"
