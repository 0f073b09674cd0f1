"""The DICOM receiver's asset event starts the DAG, end to end with a real Airflow.

``imaging-tasks receive --deidentify --airflow-url`` (a subprocess, as deployed) takes a mammography study over
DICOM C-STORE, lands it de-identified and, once the study is complete, posts an asset event for
``imaging_mammography_landing``; the Airflow stack (tests/airflow_stack.py, ``IMAGING_EVENTS_RECEIVER=true``: the
DAG's schedule is cron OR that asset, the cron never due) starts an asset-triggered run from it within seconds,
which loads the study.  The patient's raw name and ID reach neither the landing, the lake, the warehouse,
Airflow's metadata DB (XComs, asset events), the task logs nor any component's log.
"""
from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest
from airflow_stack import ADMIN, NO_SCHEDULED_RUN_CRON, AirflowStack, free_port
from test_edge_receiver import _send, _start_cli, _wait

SPECIALTY = "mammography"
WAREHOUSE_TABLES = ("studies", "series", "instances", "results", "findings", "quarantine", "ledger",
                    "processing_runs")


def _succeeded(stack: AirflowStack, run_id: str) -> bool:
    """Whether the run succeeded; fails at once, with the task's error lines, when a task fails or is up for retry
    (a retry waits minutes and, on local storage, fails again)."""
    if stack.api.run(SPECIALTY, run_id)["state"] == "success":
        return True
    bad = [t for t in stack.api.task_instances(SPECIALTY, run_id)
           if t["state"] in ("failed", "up_for_retry", "upstream_failed")]
    if bad:
        logs = stack.home / "logs" / f"dag_id={SPECIALTY}" / f"run_id={run_id}"
        errors = [line[:600] for t in bad for p in sorted(logs.glob(f"task_id={t['task_id']}/**/*.log"))
                  for line in p.read_text(errors="replace").splitlines() if '"level":"error"' in line]
        stack.fail(f"run {run_id}: {[(t['task_id'], t['map_index'], t['state']) for t in bad]}\n" + "\n".join(errors))
    return False


@pytest.mark.e2e
@pytest.mark.scheduler
def test_a_received_study_posts_the_asset_event_that_starts_the_dag(buckets, tmp_path):
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.warehouse import DuckDBWarehouse

    env = {"IMAGING_EVENTS_RECEIVER": "true", "AIRFLOW__IMAGING__SCHEDULE": NO_SCHEDULED_RUN_CRON,
           "AIRFLOW__IMAGING__LANDING_QUIET_SECONDS": "3",
           # an asset event starts runs of unpaused DAGs only: unpaused from the first parse
           "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False"}
    stack = AirflowStack(tmp_path / "stack", buckets, env=env, dag_ids=[SPECIALTY])
    port = free_port()
    receiver_log, receiver = tmp_path / f"receiver-{port}.log", None
    with ThreadPoolExecutor(2) as pool:  # the receiver boots and the study is drawn while Airflow starts
        # (_start_cli's own --landing/--spool come first: this --landing wins, the spool is tmp_path/spool)
        receiving = pool.submit(_start_cli, tmp_path, port, "--landing", buckets["landing"].as_uri(),
                                "--deidentify", "--demo-key", "--airflow-url", stack.url,
                                "--airflow-user", ADMIN[0], "--airflow-password", ADMIN[1])
        drawing = pool.submit(synthesizer(SPECIALTY), tmp_path / "synth", 1, 11, rows=320, cols=256)
        try:
            with stack:
                receiver = receiving.result()
                drawing.result()
                files = sorted((tmp_path / "synth" / SPECIALTY).rglob("*.dcm"))  # not the truth JSON
                headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
                phi = {v for ds in headers for v in (str(ds.PatientName), str(ds.PatientID))}
                assert len(files) >= 2 and all(len(v) >= 6 for v in phi)

                assert _send(port, files) == [0] * len(files)
                manifest = _wait(lambda: next((buckets["landing"] / SPECIALTY).rglob("_STUDY_COMPLETE.json"), None),
                                 "the study-complete manifest", timeout=30)
                complete_at = time.monotonic()
                assert json.loads(manifest.read_text())["instances"] == len(files)

                def asset_runs():
                    return [r for r in stack.api.runs(SPECIALTY) if r["run_type"] == "asset_triggered"]

                (run,) = stack.wait_until(asset_runs, "an asset-triggered run", timeout=60)
                started_s = time.monotonic() - complete_at
                run_id = run["dag_run_id"]
                stack.wait_until(lambda: _succeeded(stack, run_id), f"run {run_id} to succeed", timeout=180)
                assert [r["run_type"] for r in stack.api.runs(SPECIALTY)] == ["asset_triggered"]  # nothing else
                # the run consumed the receiver's event (asked once the run has started: Airflow 3.3 answers 500
                # for a queued run, whose start_date is still null)
                events = stack.api.get(f"/dags/{SPECIALTY}/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"]
                series = len({ds.SeriesInstanceUID for ds in headers})
                assert [(e["name"], e["extra"]) for e in events] == [
                    (f"imaging_{SPECIALTY}_landing",
                     {"studies": 1, "instances": len(files), "series": series, "from_rest_api": True})]

                wh = DuckDBWarehouse(buckets["warehouse"])
                assert wh.query("SELECT state, run_id FROM ledger WHERE specialty = ?", [SPECIALTY]) == [
                    ("loaded", run_id)]
                assert wh.count("studies", "WHERE specialty = ?", [SPECIALTY]) == 1
                assert wh.count("instances", "WHERE specialty = ?", [SPECIALTY]) == len(files)
                assert wh.count("results", "WHERE specialty = ? AND run_id = ?", [SPECIALTY, run_id]) > 0

                receiver.send_signal(signal.SIGTERM)
                assert receiver.wait(timeout=30) == 0

                # no raw name or ID in anything written but the synthetic inputs: the landing, the spool, the lake,
                # the warehouse, Airflow's metadata DB (XComs, asset events), task and component logs, the
                # receiver's log
                scanned = [p for p in tmp_path.rglob("*")
                           if p.is_file() and p.relative_to(tmp_path).parts[0] != "synth"]
                assert any(p.suffix == ".log" and "task_id=" in str(p) for p in scanned), "no task log to scan"
                found = {(v, str(p.relative_to(tmp_path))) for p in scanned for blob in [p.read_bytes()] for v in phi
                         if v.encode() in blob}
                rows = "\n".join(repr(wh.query(f"SELECT * FROM {t}")) for t in WAREHOUSE_TABLES)
                found |= {(v, "warehouse rows") for v in phi if v in rows}
                assert not found, f"raw PatientName/PatientID found in: {sorted(found)}"
        except BaseException:
            if receiver_log.exists():
                print(f"--- receiver log {receiver_log}\n{receiver_log.read_text(errors='replace')[-5000:]}")
            print(stack.logs())
            raise
        finally:
            receiver = receiver or (None if receiving.exception() else receiving.result())
            if receiver is not None and receiver.poll() is None:
                receiver.kill()
                receiver.wait(timeout=10)
    assert started_s < 60, f"the asset-triggered run appeared {started_s:.1f} s after the study was complete"
