"""Nothing lost, nothing loaded twice: the study ledger across failures, kills and reruns."""
from __future__ import annotations

import collections
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UTC = dt.timezone.utc
TABLES = ("studies", "series", "instances", "results", "findings", "quarantine", "ledger")
VOLATILE = {"loaded_at", "updated_at", "quarantined_at", "run_id", "attempt", "fingerprint"}  # fingerprint: of landing URIs


# --------------------------------------------------------------------------- the ledger itself
def test_ledger_states_pending_and_done(tmp_path):
    from imaging_tasks.ledger import Ledger, options_hash

    ledger = Ledger(tmp_path, "cardiovascular")
    study = {"study": "S1", "patient": "P1", "fingerprint": "f1"}
    ledger.mark(study, "arrived", step="index", run_id="r1", options_hash=options_hash({}))
    assert not ledger.is_done(ledger.get("S1"), "f1") and ledger.pending() == []
    ledger.mark(study, "published", step="process_study", run_id="r1", derived_uri="file:///x")
    assert [r["study"] for r in ledger.pending()] == ["S1"]  # published, not loaded: due for the next load
    assert not ledger.is_done(ledger.get("S1"), "f1")
    ledger.mark_loaded(ledger.pending(), run_id="r2")
    record = ledger.get("S1")
    assert record["state"] == "loaded" and ledger.pending() == []
    assert ledger.is_done(record, "f1", options_hash({})) and not ledger.is_done(record, "f2")
    assert not ledger.is_done(record, "f1", options_hash({"tile_px": 512}))  # other options: due again
    assert [h["state"] for h in record["history"]] == ["arrived", "published", "loaded"]
    assert record["derived_uri"] == "file:///x"  # facts carry over between states
    # new inputs: a new life, the old history is not mixed in
    ledger.mark({**study, "fingerprint": "f2"}, "arrived", step="index", run_id="r3")
    assert [h["state"] for h in ledger.get("S1")["history"]] == ["arrived"]


def test_a_stale_pending_marker_is_dropped(tmp_path):
    """A kill between the marker and the record: the marker is dropped, the study stays due (not done)."""
    from imaging_tasks import storage
    from imaging_tasks.ledger import Ledger

    ledger = Ledger(tmp_path, "mammography")
    ledger.mark({"study": "S2", "fingerprint": "f"}, "audited", step="audit_phi", run_id="r")
    storage.write_json(tmp_path / "ledger" / "mammography" / "to_load" / "S2.json", {"study": "S2"})
    assert ledger.pending() == []
    assert not (tmp_path / "ledger" / "mammography" / "to_load" / "S2.json").exists()


def test_a_failed_study_is_reported_once_and_retried(buckets):
    """Library level: a study failing in processing gets a failed ledger row, the others load; the next plain
    run processes it again and loads it, and nothing is loaded twice."""
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.pipeline import (Lake, RunContext, audit_deidentified, deidentify_study, index_landing, load,
                                        process_study, record_failure)
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.warehouse import DuckDBWarehouse

    synthesizer("cardiovascular")(buckets["landing"], 3, 41)
    lake, wh = Lake(buckets["lake"], "cardiovascular"), DuckDBWarehouse(buckets["warehouse"])
    landing = buckets["landing"] / "cardiovascular"

    def night(run_id: str, fail: str | None = None) -> tuple[dict, dict]:
        run = RunContext(run_id=run_id)
        summary = index_landing(landing, lake, key=DEMO_KEY, run=run)
        for study in summary["studies"]:
            clean = deidentify_study(study, lake, key=DEMO_KEY, demo=True, run=run)
            audit_deidentified(clean, lake, run=run)
            if study["study"] == fail:
                record_failure(clean, lake, step="process_study", exc=RuntimeError("CUDA out of memory"), run=run,
                               attempt=3)
                continue
            process_study(clean, lake, run=run)
        return summary, load([], lake, wh, run=run)

    first, _ = night("r1")
    victim = first["studies"][0]["study"]
    # start again from scratch with the victim failing
    shutil.rmtree(buckets["lake"])
    buckets["warehouse"].unlink()
    summary, counts = night("r1", fail=victim)
    assert len(summary["studies"]) == 3
    assert counts["failed"] == [{"study": victim, "step": "process_study", "reason": "RuntimeError", "attempt": 3}]
    assert {s for (s,) in wh.query("SELECT study_id FROM studies")} == {s["study"] for s in first["studies"]} - {victim}
    assert wh.query("SELECT state, step, reason, attempt FROM ledger WHERE study_id = ?", [victim]) == \
        [("failed", "process_study", "RuntimeError", 3)]
    # the next plain run takes the failed study again (and only it), and loads it
    summary, counts = night("r2")
    assert [s["study"] for s in summary["studies"]] == [victim] and counts["failed"] == []
    assert wh.count("studies") == 3 and set(s for (s,) in wh.query("SELECT DISTINCT state FROM ledger")) == {"loaded"}
    # and one more: nothing to do, nothing loaded twice
    summary, counts = night("r3")
    assert summary["studies"] == [] and counts["loaded"] == [] and wh.count("studies") == 3


# --------------------------------------------------------------------------- the DAG: one study fails after retries
@pytest.mark.e2e
def test_dag_one_study_failing_after_its_retries_does_not_block_the_others(airflow_db, buckets, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    import imaging_tasks.pipeline as pipeline
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.warehouse import DuckDBWarehouse

    synthesizer("mammography")(buckets["landing"], 3, 43)
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["mammography"]
    for t in dag.tasks:  # keep the retries, not the half-minute waits between them
        t.retries, t.retry_delay, t.retry_exponential_backoff = 1, dt.timedelta(seconds=0), False
    real = pipeline.process_study
    victim, calls = {}, collections.Counter()

    def flaky(study, lake, **kw):
        victim.setdefault("study", study["study"])
        calls[study["study"]] += 1
        if study["study"] == victim["study"]:
            raise RuntimeError("injected device fault")
        return real(study, lake, **kw)

    monkeypatch.setattr(pipeline, "process_study", flaky)
    run = dag.test(run_conf={"landing_quiet_seconds": 0, "batch_size": 3})  # the three studies share one instance
    assert run.state == "failed"  # the failure stays visible...
    wh = DuckDBWarehouse(buckets["warehouse"])
    studies = {s for (s,) in wh.query("SELECT study_id FROM studies")}
    assert len(studies) == 2 and victim["study"] not in studies  # ...and the other two were loaded in this run
    # the retry redid only the failed study: the two others ran once, the failed one once per attempt
    assert calls[victim["study"]] == 2 and sorted(calls.values()) == [1, 1, 2]
    assert wh.query("SELECT state, step, reason, attempt FROM ledger WHERE study_id = ?", [victim["study"]]) == \
        [("failed", "process_study", "RuntimeError", 2)]
    counts = {t: wh.count(t) for t in ("studies", "results", "findings", "instances")}

    # the fault is gone: the next plain run processes only the failed study, and nothing is loaded twice
    monkeypatch.setattr(pipeline, "process_study", real)
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["mammography"]
    run = dag.test(run_conf={"landing_quiet_seconds": 0})
    assert run.state == "success"
    assert wh.count("studies") == 3 and wh.query("SELECT DISTINCT state FROM ledger") == [("loaded",)]
    assert wh.count("results") > counts["results"]
    for table in ("studies", "results", "findings", "instances", "series", "ledger"):
        key = ", ".join(__import__("imaging_tasks.warehouse", fromlist=["TABLES"]).TABLES[table].key)
        assert wh.query(f"SELECT count(*) FROM (SELECT {key}, count(*) n FROM {table} GROUP BY ALL HAVING n > 1)") \
            == [(0,)]


# --------------------------------------------------------------------------- kill -9 and rerun
def _cli(*args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "IMAGING_DEID_DEMO": "1", "IMAGING_DEVICE": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "imaging_tasks.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _run_to_end(cwd: Path) -> str:
    proc = _cli("run", "cardiovascular", "--landing", "landing/cardiovascular", "--lake", "lake",
                "--warehouse", "warehouse.duckdb", cwd=cwd)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    return out


def _snapshot(cwd: Path) -> dict[str, list]:
    from imaging_tasks.warehouse import TABLES, DuckDBWarehouse

    wh = DuckDBWarehouse(cwd / "warehouse.duckdb")
    root = str((cwd / "lake").resolve())
    out = {}
    for table in TABLES_TO_COMPARE:
        cols = [c.name for c in TABLES[table].columns if c.name not in VOLATILE]
        rows = wh.query(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {', '.join(TABLES[table].key)}")
        out[table] = [json.loads(json.dumps(r, default=str).replace(root, "<lake>")) for r in rows]
    return out


TABLES_TO_COMPARE = TABLES


@pytest.mark.e2e
def test_kill_minus_9_at_any_moment_then_a_plain_rerun_equals_an_uninterrupted_run(tmp_path):
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.synth.bad_inputs import write_bad_inputs

    landing = tmp_path / "landing"
    synthesizer("cardiovascular")(landing, 3, 47)
    write_bad_inputs(landing, "cardiovascular", seed=9)

    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "landing").symlink_to(landing)
    started = time.monotonic()
    _run_to_end(reference)
    duration = time.monotonic() - started
    want = _snapshot(reference)
    assert len(want["studies"]) == 3 and want["quarantine"] and want["findings"]

    # kill points by what the run has written so far (seen by polling the lake), from the first de-identified file
    # to the middle of the warehouse load
    moments = [("anonymized", "*.dcm", 1), ("anonymized", "*.dcm", 30), ("anonymized", "_DEID.json", 2),
               ("ledger", "audited", 1), ("derived", "*.png", 1), ("derived", "_MANIFEST.json", 1),
               ("derived", "_MANIFEST.json", 3), ("runs", "*.json", 9), ("warehouse", "", 1)]
    killed_mid_run = 0
    for n, moment in enumerate(moments):
        trial = tmp_path / f"trial{n}"
        trial.mkdir()
        (trial / "landing").symlink_to(landing)
        proc = _cli("run", "cardiovascular", "--landing", "landing/cardiovascular", "--lake", "lake",
                    "--warehouse", "warehouse.duckdb", cwd=trial)
        if _wait_for(trial, moment, proc, timeout=duration * 3):
            os.killpg(proc.pid, signal.SIGKILL)
            killed_mid_run += 1
        proc.wait()
        _run_to_end(trial)  # a plain rerun, no --reprocess
        got = _snapshot(trial)
        for table in TABLES_TO_COMPARE:
            assert got[table] == want[table], (moment, table)
        leftovers = [p for p in (trial / "lake").rglob("*") if p.name.endswith(".imaging-tmp")]
        assert not leftovers, (moment, leftovers[:3])
    print(f"kill test: {killed_mid_run} of {len(moments)} trials killed mid-run, all repaired by a plain rerun")
    assert killed_mid_run >= len(moments) - 1, "the kills should land inside the run, not after it"


def _wait_for(trial: Path, moment: tuple[str, str, int], proc, *, timeout: float) -> bool:
    """Poll until the run has written what ``moment`` names; False if it ended first."""
    zone, pattern, count = moment
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if zone == "warehouse":
            found = int((trial / "warehouse.duckdb").exists())
        elif zone == "ledger":
            found = sum(1 for f in (trial / "lake" / "ledger").rglob("*.json")
                        if f.parent.name == "studies" and f'"state": "{pattern}"' in _text(f))
        else:
            found = sum(1 for _ in (trial / "lake" / zone).rglob(pattern))
        if found >= count:
            return True
        time.sleep(0.005)
    return False


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""
