"""The users' habits: nightly runs own their data interval; backfills from the CLI re-process a range idempotently."""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow_stack import AirflowStack

REPO = Path(__file__).resolve().parents[1]
UTC = dt.timezone.utc


def _ctx(run_type: str, window: str = "auto", start=None, end=None) -> dict:
    return {"params": {"window": window}, "dag_run": SimpleNamespace(run_type=run_type),
            "data_interval_start": start, "data_interval_end": end}


def test_run_window_follows_run_type():
    from imaging_dags.window import run_window

    a, b = dt.datetime(2026, 3, 1, 2, tzinfo=UTC), dt.datetime(2026, 3, 2, 2, tzinfo=UTC)
    assert run_window(_ctx("scheduled", start=a, end=b)) == (a, b)
    assert run_window(_ctx("backfill", start=a, end=b)) == (a, b)
    assert run_window(_ctx("manual", start=a, end=b)) == (None, None)
    assert run_window(_ctx("manual", "interval", a, b)) == (a, b)
    assert run_window(_ctx("scheduled", "all", a, b)) == (None, None)


def _plant_by_day(buckets, seed: int) -> list[str]:
    """Two cardiac CT studies, arriving on 2026-03-01 and 2026-03-02 at 10:00 UTC; returns their pseudonyms."""
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.deid.pseudonym import pseudo_id
    from imaging_tasks.specialties import synthesizer

    truths = synthesizer("cardiovascular")(buckets["landing"], 2, seed)
    folders = sorted((buckets["landing"] / "cardiovascular").iterdir())
    for day, folder in enumerate(folders, start=1):
        stamp = dt.datetime(2026, 3, day, 10, tzinfo=UTC).timestamp()
        for f in folder.rglob("*"):
            os.utime(f, (stamp, stamp))
    return [pseudo_id(DEMO_KEY, json.loads(t.read_text())["study_uid"], "study") for t in sorted(truths)]


def _studies(buckets) -> set[str]:
    from imaging_tasks.warehouse import DuckDBWarehouse

    if not buckets["warehouse"].exists():
        return set()
    return {s for (s,) in DuckDBWarehouse(buckets["warehouse"]).query("SELECT study_id FROM studies")}


@pytest.mark.e2e
def test_interval_run_processes_only_its_days_arrivals(airflow_db, buckets):
    from airflow.dag_processing.dagbag import DagBag

    first, second = _plant_by_day(buckets, seed=21)
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["cardiovascular"]
    # a run at 2026-03-02 12:00 owns [03-01 02:00, 03-02 02:00): the first study only
    conf = {"window": "interval"}
    assert dag.test(logical_date=dt.datetime(2026, 3, 2, 12, tzinfo=UTC), run_conf=conf).state == "success"
    assert _studies(buckets) == {first}
    assert dag.test(logical_date=dt.datetime(2026, 3, 3, 12, tzinfo=UTC), run_conf=conf).state == "success"
    assert _studies(buckets) == {first, second}
    # the first day again (a retry or re-run of that night): nothing new, nothing duplicated
    counts = _table_counts(buckets)
    assert dag.test(logical_date=dt.datetime(2026, 3, 2, 12, tzinfo=UTC), run_conf=conf).state == "success"
    assert _table_counts(buckets) == counts


@pytest.mark.scheduler
def test_backfill_from_cli_with_the_scheduler(buckets, tmp_path):
    """`airflow backfill create` against a real scheduler (tests/airflow_stack.py): one run per day of the range,
    each processing its day's arrivals.  (Re-running a range with reprocess is the conf the e2e and ledger tests
    drive through dag.test: the same rows, no duplicates.)"""
    first, second = _plant_by_day(buckets, seed=22)
    with AirflowStack(tmp_path, buckets, dag_ids=["cardiovascular"]) as stack:
        stack.api.set_paused("cardiovascular", False)
        stack.cli("backfill", "create", "--dag-id", "cardiovascular", "--from-date", "2026-03-01",
                  "--to-date", "2026-03-03")
        _wait_backfills(stack, expected=2)
        assert _studies(buckets) == {first, second}
        runs = {r["logical_date"][:10]: r for r in stack.api.runs("cardiovascular") if r["run_type"] == "backfill"}
        for day in ("2026-03-01", "2026-03-02"):  # each run indexed only the study that arrived in its interval
            summary = stack.api.get(f"/dags/cardiovascular/dagRuns/{runs[day]['dag_run_id']}/taskInstances/"
                                    "index_studies/xcomEntries/summary")["value"]
            summary = json.loads(summary) if isinstance(summary, str) else summary
            assert summary["to_process"] == 1, (day, summary)


def _wait_backfills(stack, *, expected: int) -> None:
    def done():
        runs = [r for r in stack.api.runs("cardiovascular") if r["run_type"] == "backfill"]
        failed = [r["dag_run_id"] for r in runs if r["state"] == "failed"]
        if failed:
            stack.fail(f"backfill runs failed: {failed}")
        return len([r for r in runs if r["state"] == "success"]) >= expected

    stack.wait_until(done, f"{expected} successful backfill runs", timeout=300, interval=2)


def _table_counts(buckets) -> dict[str, int]:
    from imaging_tasks.warehouse import DuckDBWarehouse

    wh = DuckDBWarehouse(buckets["warehouse"])
    return {t: wh.count(t) for t in ("studies", "series", "instances", "results", "findings")}
