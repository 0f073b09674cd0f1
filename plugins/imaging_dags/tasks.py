"""The tasks every specialty DAG chains; thin wrappers over ``imaging_tasks.pipeline``.

XComs carry pseudonyms, lake URIs and counts only: never image data, raw paths or identifiers.
"""
from __future__ import annotations

import datetime as dt
from contextlib import contextmanager

from airflow.sdk import Asset, Param, TriggerRule, get_current_context, task

from imaging_dags.settings import GPU_POOL, GPU_QUEUE, SENSOR_TIMEOUT_S

SPECIALTY_DEFAULTS = {
    "owner": "imaging-data-eng",
    "retries": 2,
    "retry_delay": dt.timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": dt.timedelta(minutes=10),
    "execution_timeout": dt.timedelta(hours=2),
}


def pipeline_params(**extra: Param) -> dict[str, Param]:
    """Trigger-form Params; the defaults are what the nightly schedule uses."""
    return {
        "prefix": Param("", type="string", description="only inputs under this sub-prefix of the landing bucket"),
        "reprocess": Param(False, type="boolean", description="redo studies whose outputs are already published"),
        "window": Param("auto", enum=["auto", "interval", "all"],
                        description="auto: the data interval for scheduled/backfill runs, everything for manual runs"),
        "landing_quiet_seconds": Param(None, type=["null", "number"], minimum=0,
                                       description="upload finished after this many seconds with no new object "
                                                   "(empty: [imaging] landing_quiet_seconds, default 120)"),
        **extra,
    }


def warehouse_asset(specialty: str) -> Asset:
    """Emitted when a specialty's rows land, so downstream DAGs can be scheduled on it."""
    return Asset(name=f"imaging_{specialty}_warehouse")  # a URI with a scheme would load every provider at parse


def _run():
    from imaging_tasks.pipeline import RunContext

    ctx = get_current_context()
    ti = ctx["ti"]
    return RunContext(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, map_index=ti.map_index)


class StudyFailed(RuntimeError):
    """A step failed for one study: the message names the specialty, the pseudonymous study and the step."""


@contextmanager
def naming_study(specialty: str, study: dict, step: str, *, detail: bool = True):
    """Re-raise any failure with the study it happened to, so the UI and alerts say which one.

    ``detail=False`` keeps the original message out (steps reading raw inputs, whose errors may quote them).
    """
    try:
        yield
    except Exception as exc:
        what = f"{type(exc).__name__}: {exc}" if detail else type(exc).__name__
        raise StudyFailed(f"{specialty} study {study.get('study', '?')}: {step} failed ({what}); the task retries "
                          "with backoff; if it keeps failing, look at this study's inputs and the task log") from exc


def _lake(specialty: str):
    from imaging_dags.settings import for_specialty

    return for_specialty(specialty).lake


def landing_sensor(specialty: str):
    from imaging_dags.sensors import LandingSensor

    return LandingSensor(task_id="wait_for_landing", specialty=specialty, poke_interval=60,
                         timeout=SENSOR_TIMEOUT_S, soft_fail=True)


@task
def index_studies(specialty: str, arrived: dict | None = None) -> list[dict]:
    """Headers only; groups files into studies, quarantines unreadable ones, skips studies already done."""
    from imaging_dags.settings import deid_key, for_specialty
    from imaging_dags.window import run_window
    from imaging_tasks.pipeline import index_landing

    ctx = get_current_context()
    params = ctx["params"]
    settings = for_specialty(specialty)
    since, until = run_window(ctx)
    key, _demo = deid_key()
    summary = index_landing(settings.landing, settings.lake, key=key, prefix=params.get("prefix") or "",
                            since=since, until=until, reprocess=bool(params.get("reprocess")),
                            mr_only_wait_hours=float(params.get("mr_only_wait_hours", 6.0)))
    counts = {"objects": summary["objects"], "to_process": len(summary["studies"]),
              "already_done": len(summary["skipped_done"]), "waiting": len(summary["waiting"]),
              "quarantined": summary["quarantined"]}
    ctx["ti"].xcom_push(key="summary", value=counts)
    print(f"index {specialty}: {counts['objects']} object(s) -> {counts['to_process']} stud(ies) to process, "
          f"{counts['already_done']} already done, {counts['waiting']} waiting, {counts['quarantined']} quarantined")
    return summary["studies"]


@task(max_active_tis_per_dagrun=4)
def deidentify(specialty: str, study: dict) -> dict:
    """PS3.15 basic profile with keyed pseudonyms; outputs audited for PHI before they are written."""
    from imaging_dags.settings import deid_key
    from imaging_tasks.pipeline import deidentify_study

    key, demo = deid_key()
    with naming_study(specialty, study, "de-identification", detail=False):
        return deidentify_study(study, _lake(specialty), key=key, demo=demo, run=_run())


@task(max_active_tis_per_dagrun=4)
def audit_phi(specialty: str, study: dict) -> dict:
    """Independent, fail-closed PHI audit of a de-identified study: the raw inputs' identifying values are
    re-read and searched for in every byte written to the lake and in the XCom; returns the study unchanged.

    A leak fails the task without retries (the result would not change) and nothing downstream runs on it.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from imaging_tasks.phi_audit import PHILeak
    from imaging_tasks.pipeline import audit_study

    if study.get("status") != "ok":
        return study
    try:
        report = audit_study(study, _lake(specialty))
    except PHILeak as exc:  # names attributes, never values
        raise AirflowFailException(f"{specialty} study {study['study']}: {exc}") from None
    print(f"PHI audit {specialty} {study['study']}: {report['values']} identifying value(s) absent from "
          f"{report['files']} file(s), {report['bytes']} bytes, {report['payloads']} payload(s)")
    return study


def gpu_task(**kwargs):
    """A task routed to the GPU queue and pool (CPU fallback inside the step when no CUDA)."""
    return task(queue=GPU_QUEUE, pool=GPU_POOL, **kwargs)


@gpu_task()
def process_study(specialty: str, study: dict) -> dict:
    from imaging_tasks.pipeline import process_study as run_step

    with naming_study(specialty, study, "processing"):
        return run_step(study, _lake(specialty), run=_run())


@task
def plan_tiles(study: dict) -> dict:
    """Tissue detection and tile list at the run's ``target_mpp`` / ``tile_px`` Params."""
    from imaging_tasks.pipeline import plan_slide

    params = get_current_context()["params"]
    with naming_study("pathology", study, "tile planning"):
        return plan_slide(study, _lake("pathology"), target_mpp=float(params.get("target_mpp", 1.0)),
                          tile_px=int(params.get("tile_px", 256)), run=_run())


@task
def tile_batches(plans: list[dict], max_batches: int = 1000) -> list[dict]:
    """Never more than ``max_batches`` mapped feature tasks, however many tiles arrive."""
    from imaging_tasks.pipeline import tile_batches as split

    batches = split(list(plans), max_batches=max_batches)
    print(f"{sum(b['stop'] - b['start'] for b in batches)} tiles in {len(batches)} batch(es)")
    return batches


@gpu_task()
def tile_features(batch: dict) -> dict:
    from imaging_tasks.pipeline import tile_features_batch

    with naming_study("pathology", batch, f"tile features {batch['start']}-{batch['stop']}"):
        return tile_features_batch(batch, _lake("pathology"), run=_run())


@task(trigger_rule=TriggerRule.NONE_FAILED)
def finish_slide(plan: dict, features: list[dict] | None = None) -> dict:
    from imaging_tasks.pipeline import finish_slide as finish

    with naming_study("pathology", plan, "slide summary"):
        return finish(plan, list(features or []), _lake("pathology"), run=_run())


def load_metadata(specialty: str, processed):
    """Upsert studies, series, instances, results, findings, quarantine and lineage rows."""

    @task(task_id="load_metadata", trigger_rule=TriggerRule.NONE_FAILED, outlets=[warehouse_asset(specialty)])
    def _load(processed: list[dict] | None = None) -> dict:
        from airflow.sdk import Variable

        from imaging_dags.settings import for_specialty
        from imaging_dags.warehouse_hook import WarehouseHook
        from imaging_tasks.pipeline import load

        settings = for_specialty(specialty)
        hook = WarehouseHook(settings.warehouse_uri, Variable.get("imaging_gcp_conn_id", default="google_cloud_default"))
        from airflow.sdk.exceptions import AirflowFailException

        from imaging_tasks.phi_audit import PHILeak

        try:  # load audits every study's derived files, rows and XCom before writing anything
            counts = load(list(processed or []), settings.lake, hook.get_conn(), run=_run())
        except PHILeak as exc:
            raise AirflowFailException(f"{specialty}: {exc}") from None
        print(f"loaded {specialty}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        return counts

    return _load(processed)
