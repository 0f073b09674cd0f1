"""The pipeline's own StatsD metrics: what arrived, what came out, how long each step took, what it cost.

Plain StatsD over UDP (the ``statsd`` package, the client Airflow's own StatsD logger uses): fire and forget, so a
metric never slows or breaks a run.  Off unless ``IMAGING_STATSD_HOST`` is set; any error (an unresolvable host, a
closed socket) is swallowed and logged once.  No Airflow here: the ``imaging-tasks`` CLI and the DAG tasks emit the
same metrics because both go through :mod:`imaging_tasks.pipeline`, which calls the functions below.

Settings (environment variables, read at each emission, so a test or a task can change them):

- ``IMAGING_STATSD_HOST`` (unset: off): StatsD / statsd-exporter host; unset or empty, no metrics are sent
- ``IMAGING_STATSD_PORT`` (``8125``): its UDP port (the compose stack's statsd-exporter listens on 9125)
- ``IMAGING_STATSD_PREFIX`` (``imaging``): first segment of every name (deploy/statsd-mapping.yaml matches on it)
- ``IMAGING_COST_PER_CPU_HOUR`` (``0``): cost of one hour of a worker running a step not on a GPU (any currency)
- ``IMAGING_COST_PER_GPU_HOUR`` (``0``): cost of one hour of a step on a GPU (``cuda``)
- ``IMAGING_COST_PER_GB_STORED`` (``0``): cost of keeping one GB (10^9 bytes) of de-identified copies and results

Names (``<p>`` the prefix, ``<s>`` the specialty; ``c`` counter, ``ms`` timer in milliseconds):

- ``<p>.<s>.studies.arrived`` c: studies the index hands on to processing (new, changed or due again)
- ``<p>.<s>.studies.processed`` c: studies published (all steps done, results in ``derived/``)
- ``<p>.<s>.studies.quarantined.<step>.<reason>`` c: studies that went no further (``deidentify.no_usable_input``,
  or the processing step's reason)
- ``<p>.<s>.studies.failed.<step>.<reason>`` c: a step failed for a study (reason: exception type or
  ``phi_audit_failed``); the study stays due
- ``<p>.<s>.studies.loaded`` c: studies loaded into the warehouse
- ``<p>.<s>.inputs.quarantined.<stage>.<reason>`` c: each refused input once, when it first enters quarantine
  (one row of the warehouse ``quarantine`` table)
- ``<p>.<s>.step.<step>`` ms: wall time of a step (``index``, ``deidentify``, ``audit_phi``, each processing step,
  ``load``); per study except index and load (per run)
- ``<p>.<s>.device.<device>.<step>`` ms: the same time under the device it ran on (``cuda``: GPU seconds; ``cpu``)
- ``<p>.<s>.queue_wait.landing`` ms: from a study's newest landed file to the index picking it up
- ``<p>.<s>.queue_wait.process`` ms: from the index (arrival) to its first processing step starting
- ``<p>.<s>.bytes.landing`` / ``.bytes.anonymized`` / ``.bytes.derived`` c: bytes in (raw inputs of the studies
  indexed) and out (de-identified copies, published results)
- ``<p>.<s>.cost.cpu`` / ``.cost.gpu`` / ``.cost.storage`` c: estimated cost from the rates above (CPU: seconds of
  every step not on a GPU; GPU: seconds on ``cuda``; storage: bytes written to ``anonymized/`` and ``derived/``).
  Cost per scan = the sum of the three over ``studies.processed`` (failed and quarantined work is paid for by the
  studies that made it); sent only when a rate is set.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import threading
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PORT = 8125
DEFAULT_PREFIX = "imaging"
COST_RATES = {"cpu": "IMAGING_COST_PER_CPU_HOUR", "gpu": "IMAGING_COST_PER_GPU_HOUR",
              "storage": "IMAGING_COST_PER_GB_STORED"}

# Every name this module sends, after the prefix; ``*`` is one name segment (specialty, step, reason, device).
# The statsd-exporter mapping (deploy/statsd-mapping.yaml) must match each one (tests/test_metrics.py checks it).
NAMES = {
    "studies.arrived": "c", "studies.processed": "c", "studies.loaded": "c",
    "studies.quarantined.*.*": "c", "studies.failed.*.*": "c", "inputs.quarantined.*.*": "c",
    "step.*": "ms", "device.*.*": "ms", "queue_wait.landing": "ms", "queue_wait.process": "ms",
    "bytes.landing": "c", "bytes.anonymized": "c", "bytes.derived": "c",
    "cost.cpu": "c", "cost.gpu": "c", "cost.storage": "c",
}

_lock = threading.Lock()
_clients: dict[tuple, Any] = {}  # (host, port, prefix) -> StatsClient, or None where it could not be made
_warned: set[str] = set()


def settings() -> dict[str, Any]:
    """The current settings from the environment (host None: metrics off)."""
    host = (os.environ.get("IMAGING_STATSD_HOST") or "").strip() or None
    port = os.environ.get("IMAGING_STATSD_PORT") or DEFAULT_PORT
    prefix = os.environ.get("IMAGING_STATSD_PREFIX")
    prefix = DEFAULT_PREFIX if prefix is None else prefix.strip(".") or None
    return {"host": host, "port": port, "prefix": prefix}


def _warn_once(what: str, exc: BaseException) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("metrics: %s failed (%s: %s); metrics are best effort, the run goes on", what,
                    type(exc).__name__, exc)


def _client():
    conf = settings()
    if not conf["host"]:
        return None
    key = (conf["host"], conf["port"], conf["prefix"])
    with _lock:
        if key not in _clients:
            try:
                from statsd import StatsClient

                _clients[key] = StatsClient(conf["host"], int(conf["port"]), prefix=conf["prefix"])
            except Exception as exc:  # noqa: BLE001 - an unresolvable host, a bad port: no metrics, no failure
                _warn_once(f"StatsD client for {conf['host']}:{conf['port']}", exc)
                _clients[key] = None
        return _clients[key]


def enabled() -> bool:
    """Whether metrics are on (a host is set and a client could be made): callers skip extra work otherwise."""
    try:
        return _client() is not None
    except Exception:  # noqa: BLE001
        return False


def segment(value: Any) -> str:
    """One name segment: dots and anything StatsD or Prometheus would choke on become ``_``."""
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", str(value if value not in (None, "") else "unknown")).strip("_")
    return text or "unknown"


def device_kind(device: Any) -> str:
    """``cuda:1`` -> ``cuda``; ``cpu`` -> ``cpu``; None (a step without a torch device) -> ``cpu``."""
    return segment(str(device).split(":")[0]) if device else "cpu"


def _name(specialty: str, *parts: Any) -> str:
    return ".".join([segment(specialty), *parts])


def _send(kind: str, stat: str, value: float) -> None:
    try:
        client = _client()
        if client is None:
            return
        if kind == "c":
            client.incr(stat, value)
        else:
            client.timing(stat, value)
    except Exception as exc:  # noqa: BLE001 - metrics never break a run
        _warn_once("sending a metric", exc)


def count(specialty: str, what: str, n: float = 1) -> None:
    """``<p>.<s>.<what>`` += n (``what`` already dotted, e.g. ``studies.arrived``); nothing sent for n == 0."""
    if n:
        _send("c", _name(specialty, what), n)


def timing(specialty: str, what: str, seconds: float) -> None:
    """``<p>.<s>.<what>`` observed ``seconds`` (sent in milliseconds, StatsD's unit for timers)."""
    _send("ms", _name(specialty, what), max(0.0, float(seconds)) * 1000.0)


def rate(kind: str) -> float:
    """A cost rate from its environment variable (``cpu``/``gpu`` per hour, ``storage`` per GB); 0 when unset or
    unreadable."""
    try:
        return max(0.0, float(os.environ.get(COST_RATES[kind]) or 0))
    except ValueError:
        return 0.0


# --------------------------------------------------------------------------- what the pipeline reports
def arrived(specialty: str, studies: list[dict], entries_newest: dict[str, str | None] | None = None,
            landing_bytes: int = 0, now: dt.datetime | None = None) -> None:
    """The index handed ``studies`` on: count them, their raw bytes, and how long each waited since it landed."""
    count(specialty, "studies.arrived", len(studies))
    count(specialty, "bytes.landing", landing_bytes)
    now = now or dt.datetime.now(dt.timezone.utc)
    for newest in (entries_newest or {}).values():
        waited = _seconds_since(newest, now)
        if waited is not None:
            timing(specialty, "queue_wait.landing", waited)


def step_done(specialty: str, step: str, seconds: float, *, device: Any = None) -> None:
    """A step finished (for a study, or for the run): its time, its device time, and what that time cost."""
    kind = device_kind(device)
    timing(specialty, f"step.{segment(step)}", seconds)
    timing(specialty, f"device.{kind}.{segment(step)}", seconds)
    cost = "gpu" if kind == "cuda" else "cpu"
    per_hour = rate(cost)
    if per_hour:
        count(specialty, f"cost.{cost}", round(seconds / 3600.0 * per_hour, 9))


def stored(specialty: str, zone: str, n_bytes: int) -> None:
    """Bytes written to ``anonymized`` or ``derived``, and what keeping them costs."""
    count(specialty, f"bytes.{segment(zone)}", n_bytes)
    per_gb = rate("storage")
    if per_gb and n_bytes:
        count(specialty, "cost.storage", round(n_bytes / 1e9 * per_gb, 9))


def input_quarantined(specialty: str, stage: str, reason: str) -> None:
    count(specialty, f"inputs.quarantined.{segment(stage)}.{segment(reason)}")


def study_quarantined(specialty: str, step: str, reason: str) -> None:
    count(specialty, f"studies.quarantined.{segment(step)}.{segment(reason)}")


def study_failed(specialty: str, step: str, reason: str) -> None:
    count(specialty, f"studies.failed.{segment(step)}.{segment(reason)}")


def processing_started(specialty: str, arrived_at: Any, now: dt.datetime | None = None) -> None:
    """A study's first processing step starts: how long it queued since the index saw it arrive.  ``arrived_at``:
    the time, or a callable reading it (called only when metrics are on; its errors are swallowed)."""
    if callable(arrived_at):
        if not enabled():
            return
        try:
            arrived_at = arrived_at()
        except Exception as exc:  # noqa: BLE001 - a metric never fails a step
            _warn_once("reading the arrival time", exc)
            return
    waited = _seconds_since(arrived_at, now or dt.datetime.now(dt.timezone.utc))
    if waited is not None:
        timing(specialty, "queue_wait.process", waited)


def arrival_time(ledger_record: dict | None) -> Any:
    """When the index last marked the study arrived (its ledger history), or None."""
    for entry in reversed((ledger_record or {}).get("history") or []):
        if entry.get("state") == "arrived":
            return entry.get("at")
    return None


def _seconds_since(when: Any, now: dt.datetime) -> float | None:
    try:
        if when is None:
            return None
        if not isinstance(when, dt.datetime):
            when = dt.datetime.fromisoformat(str(when))
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return max(0.0, (now - when).total_seconds())
    except (TypeError, ValueError):
        return None
