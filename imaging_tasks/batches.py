"""Study batches: how one run holds many studies in few task instances, each study keeping its own outcome.

Under a real scheduler a task instance costs a process start, a DAG parse and metadata-database round trips
(seconds each on a small machine); one instance per study and step makes a 1,000-study night thousands of them,
and the orchestration outweighs the imaging.  A batch keeps what a per-study instance gave:

- every study of the batch runs, and one failing never stops the others;
- a finished study leaves a checkpoint (its outcome, PHI-free like an XCom) in the run's work area, so a retry
  of the instance redoes only the studies that did not finish;
- on the instance's last attempt a study still failing goes on marked ``failed`` (its ledger row says step,
  reason and attempt, and the next run takes it again) instead of holding back the rest of its batch; the load
  at the end of the run loads the others and then fails the run naming it.

Checkpoints live until the run's load (:func:`forget_run`): a retry reuses them, a later clear of a finished run
recomputes.  Pure Python: the Airflow tasks and ``bench/scale.py`` call it the same way.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import time
from typing import Callable, Iterable

from imaging_tasks import storage
from imaging_tasks.contracts import is_ok, with_status
from imaging_tasks.errors import ConfigError
from imaging_tasks.lake import Lake, safe_name

log = logging.getLogger(__name__)

# Studies per batch when neither the run nor the setting says (a specialty's record may say: heavy studies, whose
# steps take minutes, gain nothing from sharing an instance).  Chosen with bench/scale.py at 200 cardiovascular
# studies under the standalone scheduler (bench/README.md, "scale.py"): 16 a batch took 1.36x the library's wall
# time, 32 took 1.19x; each instance costs ~2-8 s of process start and imports, and a step's instances finish
# together before the next step's start, so fewer, fuller instances win until a night has too few to fill the
# workers (MIN_BATCHES).
DEFAULT_BATCH_SIZE = 32
# A small night is spread over at least this many instances per step (while it has the studies), so the workers
# it has are used: 20 studies are 7 batches of 3, not 2 of 10.
MIN_BATCHES = 8
# Instances per mapped step, whatever the night's size: beyond it batches grow instead (1,000 studies at the
# default size are 32 batches; 10,000 are 250 batches of 40).
MAX_BATCHES = 250
# Checkpoints of a run that never reached its load (killed, failed, abandoned) are swept after this long.
STALE_AFTER = dt.timedelta(days=14)


def batch_size_for(n_studies: int, requested: int | None = None, *, default: int | None = None) -> int:
    """The batch size a run of ``n_studies`` uses: the ``requested`` one (the run's Param or the setting), else the
    ``default`` (the specialty's, else :data:`DEFAULT_BATCH_SIZE`) cut so a small night still spreads over
    :data:`MIN_BATCHES` instances; either grown so a large night maps at most :data:`MAX_BATCHES` instances per
    step."""
    size = int(requested or default or DEFAULT_BATCH_SIZE)
    if size < 1:
        raise ConfigError(f"batch size {size}: must be at least 1 (studies per task instance)")
    if not n_studies:
        return size
    if not requested:
        size = min(size, math.ceil(n_studies / MIN_BATCHES))
    return max(size, math.ceil(n_studies / MAX_BATCHES))


def plan_batches(studies: list[dict], size: int | None = None, *, default: int | None = None) -> list[list[dict]]:
    """The studies in order, cut into batches of nearly equal length, none longer than :func:`batch_size_for`
    gives (17 studies at size 10 are 9 + 8, not 10 + 7: the last instance is not the slow one).  No studies: no
    batches."""
    if not studies:
        return []
    size = batch_size_for(len(studies), size, default=default)
    count = math.ceil(len(studies) / size)
    base, extra = divmod(len(studies), count)
    out, start = [], 0
    for n in range(count):
        end = start + base + (1 if n < extra else 0)
        out.append(studies[start:end])
        start = end
    return out


def flatten(batches: Iterable) -> list[dict]:
    """Every study of a mapped step's outputs, in order: a batch (list), one study (dict), or nothing (a skipped
    instance's ``None``)."""
    out = []
    for item in batches or []:
        if isinstance(item, dict):
            out.append(item)
        elif isinstance(item, list):
            out.extend(s for s in item if isinstance(s, dict))
    return out


def label(studies: list[dict]) -> str:
    """How a batch is named in the UI (``map_index_template``): its first study, and its last and count when it
    holds more (the studies between are in the task log and on the run's QC page)."""
    ids = [str(s.get("study") or "?") for s in studies]
    if not ids:
        return "no studies"
    if len(ids) == 1:
        return ids[0]
    return f"{ids[0]} … {ids[-1]} ({len(ids)} studies)"


class BatchFailed(RuntimeError):
    """Some studies of a batch failed on an attempt that will be retried: the message names them."""


def _checkpoint(lake: Lake, run_id: str, step: str, study: dict):
    return lake.work("batches", safe_name(run_id), step, f"{study['study']}.json")


def run_batch(studies: list[dict], work: Callable[[dict], dict], *, lake: Lake, run_id: str, step: str,
              final_attempt: bool, on_failure: Callable[[dict, BaseException], None] | None = None,
              settled: tuple[type[BaseException], ...] = ()) -> list[dict]:
    """``work`` on every study of the batch that is still going on (``ok``) and has not finished this step in
    this run; the batch's outcomes, in order.

    A study whose ``work`` raises is reported to ``on_failure`` (the ledger row) and, unless this is the final
    attempt, the batch raises :class:`BatchFailed` after every other study ran, naming the failed ones; on the
    final attempt it goes on as ``failed``.  ``settled`` exceptions fail the study at once, with no retry and
    no ``on_failure`` (their ledger row is written where they are raised, e.g. a PHI leak: a retry would give
    the same result).  A configuration error fails the whole batch at once: it is the same for every study.
    """
    outcomes, failed = [], []
    started = time.time()
    reused = 0
    for study in studies:
        if not is_ok(study):  # quarantined or failed at an earlier step: it passes through untouched
            outcomes.append(study)
            continue
        done = _checkpoint(lake, run_id, step, study)
        if storage.exists(done):
            outcomes.append(storage.read_json(done))
            reused += 1
            continue
        try:
            outcome = work(study)
        except ConfigError:
            raise
        except settled as exc:
            outcomes.append(with_status(study, "failed", reason=type(exc).__name__, failed_step=step))
            continue
        except Exception as exc:  # noqa: BLE001 - one study's failure must not stop the others
            if on_failure is not None:
                on_failure(study, exc)
            failed.append((study, exc))
            outcomes.append(with_status(study, "failed", reason=type(exc).__name__, failed_step=step))
            continue
        storage.write_json(done, outcome)
        outcomes.append(outcome)
    ran = sum(1 for s in studies if is_ok(s)) - reused
    log.info("%s %s batch: %d stud(ies), %d run, %d finished on an earlier attempt, %d passed on (not ok), "
             "%d failed, %.1f s", lake.specialty, step, len(studies), ran, reused,
             sum(1 for s in studies if not is_ok(s)), len(failed), time.time() - started)
    if failed and not final_attempt:
        raise BatchFailed(
            f"{lake.specialty} {step}: {len(failed)} of {len(studies)} stud(ies) failed: "
            + "; ".join(f"{s.get('study')} ({type(e).__name__})" for s, e in failed[:20])
            + f"; the {len(studies) - len(failed)} other(s) are done and kept; the retry redoes only the failed ones")
    return outcomes


def forget_run(lake: Lake, run_id: str, *, now: dt.datetime | None = None) -> int:
    """Drop the run's checkpoints once its studies are loaded (a cleared, finished run then recomputes), and those
    of any run untouched for :data:`STALE_AFTER` (a run killed or failed before its load never forgets its own;
    a checkpoint only saves work, so a run cleared after that long recomputes).  Returns how many were removed."""
    root = lake.work("batches", safe_name(run_id))
    removed = sum(storage.remove(o.uri) for o in storage.list_objects(root)) if storage.exists(root) else 0
    cutoff = (now or dt.datetime.now(dt.timezone.utc)) - STALE_AFTER
    stale = [o for o in storage.list_objects(lake.work("batches")) if o.modified and o.modified < cutoff]
    if stale:
        log.info("%s: %d checkpoint(s) of runs untouched since before %s removed", lake.specialty, len(stale),
                 cutoff.date())
    return removed + sum(storage.remove(o.uri) for o in stale)
