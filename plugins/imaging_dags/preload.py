"""torch imported once in the Airflow process that forks task processes, instead of once per GPU-step task.

Every GPU step (calcium, cine, flow, brain extraction, the GLM, tile features, ...) imports torch: ~2.5 s of CPU
in a fresh process.  On a night of 1,000 studies in batches that is ~3 minutes of the two cores
(bench/results/scale_1000.md: cine 142 s under the DAG against 52 s in the library).  Task processes are forked
(Linux): by the LocalExecutor's workers, themselves forked from the scheduler, and by a Celery worker's pool
processes, forked from the worker.  A module imported in that parent before it forks is already in every task
process, shared copy-on-write.

So the plugin calls :func:`preload_for_tasks` when Airflow loads it; it imports torch only in a process that will
fork task processes (``airflow scheduler`` with a LocalExecutor, ``airflow celery worker``), and only when the
setting ``[imaging] preload_torch`` (``AIRFLOW__IMAGING__PRELOAD_TORCH``, default true) is not ``false``.  The
import is done synchronously, before the process forks anything: a fork during an import would leave the child
with a held import lock.  Importing torch starts no thread pool (that happens at the
first operation, which the parent never runs), so the forked children are safe to use it.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time

log = logging.getLogger("imaging_dags.preload")

SETTING = "preload_torch"


def forks_task_processes(argv: list[str], executor: str) -> bool:
    """Whether this process (its command line ``argv``) forks the task processes: the scheduler when a
    LocalExecutor runs the tasks, or a Celery worker."""
    words = [os.path.basename(a) for a in argv[:4]]
    if "scheduler" in words:
        return any(e.strip().split(".")[-1].split(":")[-1] == "LocalExecutor" for e in executor.split(","))
    return "celery" in words and "worker" in words


def preload_for_tasks(argv: list[str] | None = None) -> bool:
    """Import torch here if this process forks task processes and the setting allows it; True when it did."""
    if "torch" in sys.modules:
        return False
    from airflow.sdk import conf

    try:
        wanted = conf.getboolean("imaging", SETTING, fallback=True)
    except Exception as exc:  # a bad value must not stop the scheduler: said loudly, nothing preloaded
        log.error("imaging: torch not preloaded: [imaging] %s must be true or false (%s)", SETTING, exc)
        return False
    if not wanted:
        return False
    if not forks_task_processes(sys.argv if argv is None else argv, conf.get("core", "executor", fallback="")):
        return False
    started = time.perf_counter()
    try:
        importlib.import_module("torch")  # the point: loaded before the fork
    except ImportError as exc:  # a component image without torch: the tasks will say so themselves
        log.warning("imaging: torch not preloaded (%s); GPU-step tasks import it themselves", exc)
        return False
    log.info("imaging: torch preloaded in %s (%.1f s) for the task processes it forks; [imaging] %s = false "
             "turns this off", os.path.basename(sys.argv[0] if argv is None else argv[0]),
             time.perf_counter() - started, SETTING)
    return True


__all__ = ["forks_task_processes", "preload_for_tasks"]
