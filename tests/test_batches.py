"""Study batches: sizes, per-study outcomes, retries that redo only the failed studies, checkpoints per run."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest

from imaging_tasks import batches
from imaging_tasks.contracts import study_record, with_status
from imaging_tasks.errors import ConfigError
from imaging_tasks.lake import Lake


def _studies(n: int) -> list[dict]:
    return [study_record(specialty="cardiovascular", study=f"S{n:04d}X", patient="PABCD1", fingerprint="f")
            for n in range(n)]


@pytest.mark.parametrize("n, size, lengths", [
    (17, 10, [9, 8]),            # even lengths, none above the size
    (3, 2, [2, 1]),
    (1, 16, [1]),
    (0, 16, []),
    (100, 1, [1] * 100),
    (1000, 1, [4] * 250),        # never more than MAX_BATCHES instances per step: batches grow instead
])
def test_a_requested_size_is_kept_exactly_up_to_the_instance_cap(n, size, lengths):
    got = batches.plan_batches(_studies(n), size)
    assert [len(b) for b in got] == lengths
    assert [s for b in got for s in b] == _studies(n)  # every study once, in order


@pytest.mark.parametrize("n, lengths", [
    (3, [1, 1, 1]),              # a small night is spread over the workers
    (20, [3] * 6 + [2]),         # ceil(20 / MIN_BATCHES) = 3 per batch
    (200, [25] * 8),             # the default size (32), spread over MIN_BATCHES instances
    (1000, [32] * 8 + [31] * 24),
])
def test_the_default_size_spreads_small_nights_and_caps_large_ones(n, lengths):
    assert [len(b) for b in batches.plan_batches(_studies(n))] == lengths
    one_each = [len(b) for b in batches.plan_batches(_studies(n), default=1)]  # a specialty of heavy studies
    assert one_each == ([1] * n if n <= batches.MAX_BATCHES else [4] * 250)


def test_a_bad_size_is_a_configuration_error():
    with pytest.raises(ConfigError, match="at least 1"):
        batches.plan_batches(_studies(3), -2)


def test_labels_name_the_batch():
    three = _studies(3)
    assert batches.label(three[:1]) == "S0000X"
    assert batches.label(three) == "S0000X … S0002X (3 studies)"
    assert batches.flatten([three[:2], None, three[2]]) == three


def _lake(tmp_path) -> Lake:
    return Lake(tmp_path.as_uri(), "cardiovascular")


def test_a_failed_study_is_retried_alone_and_goes_on_failed_on_the_last_attempt(tmp_path):
    lake, studies = _lake(tmp_path), _studies(4)
    studies[3] = with_status(studies[3], "quarantined", reason="no_usable_input")
    calls, recorded = collections.Counter(), []
    broken = {studies[1]["study"]}

    def work(study):
        calls[study["study"]] += 1
        if study["study"] in broken:
            raise RuntimeError("device fault")
        return {**study, "steps_done": ["calcium_scoring"]}

    def run(final: bool):
        return batches.run_batch(studies, work, lake=lake, run_id="manual__2026-12-02T01:00:00+00:00",
                                 step="calcium_scoring", final_attempt=final,
                                 on_failure=lambda s, e: recorded.append((s["study"], type(e).__name__)))

    with pytest.raises(batches.BatchFailed, match=r"1 of 4 stud\(ies\) failed: S0001X \(RuntimeError\)"):
        run(False)
    assert calls == {"S0000X": 1, "S0001X": 1, "S0002X": 1}  # the quarantined study is not worked on
    with pytest.raises(batches.BatchFailed):
        run(False)
    assert calls == {"S0000X": 1, "S0001X": 2, "S0002X": 1}  # the retry redid only the failed one
    out = run(True)
    assert [s["status"] for s in out] == ["ok", "failed", "ok", "quarantined"]
    assert out[1]["reason"] == "RuntimeError" and out[1]["failed_step"] == "calcium_scoring"
    assert out[0]["steps_done"] == ["calcium_scoring"] and out[3] == studies[3]
    assert recorded == [("S0001X", "RuntimeError")] * 3

    broken.clear()  # the fault is gone: the next attempt finishes it; the others still come from checkpoints
    assert [s["status"] for s in run(False)] == ["ok", "ok", "ok", "quarantined"]
    assert calls == {"S0000X": 1, "S0001X": 4, "S0002X": 1}
    assert batches.forget_run(lake, "manual__2026-12-02T01:00:00+00:00") == 3
    run(False)
    assert calls == {"S0000X": 2, "S0001X": 5, "S0002X": 2}  # a cleared, finished run recomputes


def test_settled_failures_are_not_retried_and_configuration_errors_fail_the_batch(tmp_path):
    lake, studies = _lake(tmp_path), _studies(3)

    class Leak(Exception):
        pass

    def leaky(study):
        if study["study"] == "S0001X":
            raise Leak("PatientName")
        return study

    out = batches.run_batch(studies, leaky, lake=lake, run_id="r", step="audit_phi", final_attempt=False,
                            on_failure=lambda *a: pytest.fail("a settled failure is recorded where it is raised"),
                            settled=(Leak,))
    assert [s["status"] for s in out] == ["ok", "failed", "ok"] and out[1]["reason"] == "Leak"

    def misconfigured(study):
        raise ConfigError("no key: set IMAGING_DEID_KEY")

    with pytest.raises(ConfigError):
        batches.run_batch(studies, misconfigured, lake=lake, run_id="r", step="deidentify", final_attempt=True)


def test_checkpoints_of_a_run_that_never_loaded_are_swept_by_a_later_load(tmp_path):
    """A killed night never reaches its load: its checkpoints go with the first load STALE_AFTER later; a run
    that is still going (fresh checkpoints) keeps its own."""
    import datetime as dt
    import os

    lake, studies = _lake(tmp_path), _studies(2)
    for run_id in ("scheduled__2026-11-01T02:00:00+00:00", "manual__2026-12-02T01:00:00+00:00",
                   "scheduled__2026-12-02T02:00:00+00:00"):
        batches.run_batch(studies, lambda s: {**s, "steps_done": ["x"]}, lake=lake, run_id=run_id, step="x",
                          final_attempt=True)
    old = dt.datetime(2026, 11, 1, 3, tzinfo=dt.timezone.utc).timestamp()
    for f in Path(lake.work("batches").path).rglob("*.json"):
        if "2026-11-01" in str(f):
            os.utime(f, (old, old))
    now = dt.datetime(2026, 12, 2, 4, tzinfo=dt.timezone.utc)
    assert batches.forget_run(lake, "manual__2026-12-02T01:00:00+00:00", now=now) == 2 + 2
    left = sorted(p.relative_to(Path(lake.work("batches").path)).parts[0]
                  for p in Path(lake.work("batches").path).rglob("*.json"))
    assert len(left) == 2 and all("2026-12-02T02" in name for name in left), left
