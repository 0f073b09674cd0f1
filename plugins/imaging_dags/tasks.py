"""The tasks every specialty DAG chains; thin wrappers over ``imaging_tasks.pipeline``.

XComs carry pseudonyms, lake URIs and counts only: never image data, raw paths or identifiers.
"""
from __future__ import annotations

import datetime as dt
import logging
from contextlib import contextmanager

from airflow.sdk import Asset, TriggerRule, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from imaging_dags import lineage
from imaging_dags.params import run_options
from imaging_dags.settings import GPU_POOL, GPU_QUEUE, SENSOR_TIMEOUT_S, in_object_storage
from imaging_tasks.contracts import is_ok

log = logging.getLogger("imaging_dags")
STUDY_LABEL = "{{ study_label }}"  # map_index_template: each mapped instance named by the study it holds

SPECIALTY_DEFAULTS = {
    "owner": "imaging-data-eng",
    "retries": 2,
    "retry_delay": dt.timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": dt.timedelta(minutes=10),
    "execution_timeout": dt.timedelta(hours=2),
}


def warehouse_asset(specialty: str) -> Asset:
    """Emitted when a specialty's rows land, so downstream DAGs can be scheduled on it."""
    return Asset(name=f"imaging_{specialty}_warehouse")  # a URI with a scheme would load every provider at parse


def _run():
    from imaging_tasks.pipeline import RunContext

    ctx = get_current_context()
    ti = ctx["ti"]
    return RunContext(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, map_index=ti.map_index)


class FailuresInRun(AirflowFailException):
    """The load, having loaded the good studies, fails the run because studies or tasks of it failed (each was
    told when it failed; the end-of-run summary names them)."""


class StudyFailed(RuntimeError):
    """A step failed for one study: the message names the specialty, the pseudonymous study and the step."""


@contextmanager
def failing_fast(what: str):
    """A configuration error (no key, unknown bucket, bad warehouse URI) fails the task once, without retries:
    retrying cannot fix it, and the message says what to set."""
    from imaging_tasks.errors import ConfigError

    try:
        yield
    except ConfigError as exc:
        raise AirflowFailException(f"{what}: configuration error, not retried: {exc}") from None


def label_study(study: dict, extra: str = "") -> None:
    """Name this mapped task instance after its study (the ``map_index_template`` reads ``study_label``)."""
    label = str(study.get("study") or "?") + (f" {extra}" if extra else "")
    get_current_context()["study_label"] = label  # type: ignore[index]


def label_batch(studies: list[dict]) -> None:
    """Name this mapped task instance after the studies of its batch (first, last and count), and list them all
    in the task log."""
    from imaging_tasks.batches import label

    get_current_context()["study_label"] = label(studies)  # type: ignore[index]
    log.info("batch of %d stud(ies): %s", len(studies), ", ".join(str(s.get("study")) for s in studies))


def _final_attempt() -> bool:
    """Whether this try is the instance's last (no retry follows a failure)."""
    ti = get_current_context()["ti"]
    max_tries = getattr(ti, "max_tries", None)
    if max_tries is None:
        max_tries = ti.task.retries or 0
    return ti.try_number > max_tries


def _batches(specialty: str, studies: list[dict]) -> list[list[dict]]:
    """The studies in batches of the run's size (its Param, else the setting: exactly that), else of the
    specialty's default spread over the workers a small night has (``imaging_tasks.batches.plan_batches``)."""
    from imaging_dags.settings import batch_size
    from imaging_tasks.batches import plan_batches
    from imaging_tasks.specialties import get

    with failing_fast("batch size"):
        return plan_batches(studies, batch_size(get_current_context()["params"]), default=get(specialty).batch_size)


def run_batch(specialty: str, batch: list[dict], step: str, work, *, detail: bool = True, settled=()) -> list[dict]:
    """``work`` on each study of the batch (``imaging_tasks.batches.run_batch``): a failing study is recorded in
    the ledger (step, reason, attempt); the instance retries only the failed studies, and on its last attempt
    lets them go on as failed so the rest of the batch is not held back (the load then fails the run, naming
    them).  ``detail=False`` keeps failure messages out of the ledger and log (steps reading raw inputs)."""
    from imaging_dags.notifiers import notify_study_failure
    from imaging_tasks import batches

    final = _final_attempt()

    def on_failure(study: dict, exc: BaseException) -> None:
        _record_failure(specialty, study, step, exc, detail=detail)
        if final:  # told now, as a failed task instance would be (the instance itself goes on)
            notify_study_failure(get_current_context(), study=study.get("study"), step=step, exc=exc)

    with failing_fast(f"{specialty} {step}"):
        return batches.run_batch(batch, work, lake=_lake(specialty), run_id=get_current_context()["ti"].run_id,
                                 step=step, final_attempt=final, on_failure=on_failure, settled=settled)


@contextmanager
def naming_study(specialty: str, study: dict, step: str, *, detail: bool = True):
    """Re-raise any failure with the study it happened to, so the UI and alerts say which one, and record it in
    the ledger (failed: step, reason, attempt), so the load step reports it and the next run takes it again.

    ``detail=False`` keeps the original message out (steps reading raw inputs, whose errors may quote them).
    A configuration error fails once, without retries (as in ``failing_fast``).
    """
    try:
        with failing_fast(f"{specialty} study {study.get('study', '?')}: {step}"):
            yield
    except AirflowFailException:
        raise
    except Exception as exc:
        _record_failure(specialty, study, step, exc, detail=detail)
        what = f"{type(exc).__name__}: {exc}" if detail else type(exc).__name__
        raise StudyFailed(f"{specialty} study {study.get('study', '?')}: {step} failed ({what}); the task retries "
                          "with backoff; if it keeps failing, look at this study's inputs and the task log") from exc


def _record_failure(specialty: str, study: dict, step: str, exc: Exception, *, detail: bool) -> None:
    from imaging_tasks.pipeline import record_failure

    try:
        ti = get_current_context()["ti"]
        record_failure(study, _lake(specialty), step=step, exc=exc, run=_run(), attempt=ti.try_number, detail=detail)
    except Exception as ledger_exc:  # the original failure matters more than its bookkeeping
        log.error("%s study %s: could not record the failure in the ledger: %s", specialty, study.get("study"),
                  type(ledger_exc).__name__)


def _lake(specialty: str):
    from imaging_dags.settings import for_specialty

    return for_specialty(specialty).lake


def landing_sensor(specialty: str):
    from imaging_dags.sensors import LandingSensor

    return LandingSensor(task_id="wait_for_landing", specialty=specialty, poke_interval=60,
                         timeout=SENSOR_TIMEOUT_S)


@lineage.task(reads=("landing",), writes=("work", "quarantine"))
@in_object_storage
def index_studies(specialty: str, arrived: dict | None = None) -> list[list[dict]]:
    """Headers only; groups files into studies, quarantines unreadable ones, skips studies already done; the
    studies to process in batches (``imaging_tasks.batches``), each mapped to one instance per step."""
    from imaging_dags.settings import deid_key, for_specialty
    from imaging_dags.window import run_window
    from imaging_tasks.pipeline import index_landing

    ctx = get_current_context()
    params = ctx["params"]
    with failing_fast(f"index {specialty}"):
        settings = for_specialty(specialty)
        key, demo = deid_key()
        since, until = run_window(ctx)
        log.info("index %s: window %s .. %s, prefix %r, reprocess=%s, de-identification key: %s", specialty,
                 since or "-", until or "-", params.get("prefix") or "", bool(params.get("reprocess")),
                 "public DEMO key" if demo else "configured key")
        summary = index_landing(settings.landing, settings.lake, key=key, prefix=params.get("prefix") or "",
                                since=since, until=until, reprocess=bool(params.get("reprocess")),
                                options=run_options(specialty, params), run=_run())
    counts = {"objects": summary["objects"], "to_process": len(summary["studies"]),
              "already_done": len(summary["skipped_done"]), "waiting": len(summary["waiting"]),
              "quarantined": summary["quarantined"], "quarantined_new": summary["quarantined_new"]}
    ctx["ti"].xcom_push(key="summary", value=counts)
    batches = _batches(specialty, summary["studies"])
    if summary["studies"]:
        log.info("index %s: %d stud(ies) to process in %d batch(es): %s", specialty, len(summary["studies"]),
                 len(batches), ", ".join(s["study"] for s in summary["studies"][:50])
                 + (" ..." if len(summary["studies"]) > 50 else ""))
    return batches


@lineage.task(max_active_tis_per_dagrun=4, map_index_template=STUDY_LABEL, reads=("landing", "work"),
              writes=("anonymized", "quarantine"))
@in_object_storage
def deidentify(specialty: str, batch: list[dict]) -> list[dict]:
    """PS3.15 basic profile with keyed pseudonyms, on each study of a batch; outputs audited for PHI before they
    are written."""
    from imaging_dags.settings import deid_key
    from imaging_tasks.pipeline import deidentify_study

    label_batch(batch)
    with failing_fast(f"de-identify {specialty}"):
        key, demo = deid_key()
        lake = _lake(specialty)
    options = run_options(specialty, get_current_context()["params"])  # the specialty's PS3.15 option choices
    run = _run()
    return run_batch(specialty, batch, "de-identification",
                     lambda one: deidentify_study(one, lake, key=key, demo=demo, options=options, run=run),
                     detail=False)


@lineage.task(max_active_tis_per_dagrun=4, map_index_template=STUDY_LABEL, reads=("landing", "anonymized"))
@in_object_storage
def audit_phi(specialty: str, batch: list[dict]) -> list[dict]:
    """Independent, fail-closed PHI audit of each de-identified study of a batch: the raw inputs' identifying
    values are re-read and searched for in every byte written to the lake and in the XCom; returns the studies
    unchanged.

    A leak fails its study at once, without retries (the result would not change): it goes no further, its
    ledger row names the attribute, and the load fails the run naming it.
    """
    from imaging_tasks.phi_audit import PHILeak
    from imaging_tasks.pipeline import audit_deidentified

    label_batch(batch)
    lake, run = _lake(specialty), _run()

    def audit(one: dict) -> dict:
        audit_deidentified(one, lake, run=run)  # logs what it searched; ledger: audited (or failed: the leak)
        return one

    return run_batch(specialty, batch, "audit_phi", audit, settled=(PHILeak,))


@lineage.task  # reads and writes no data: XComs only
def ready_for_processing(specialty: str, audited: list[list[dict]], *, batched: bool = True) -> list:
    """Only de-identified, audited studies go on: a quarantined study never takes a GPU slot.  The ready studies
    in fresh batches (``batched``), or one by one (the per-slide chain maps a task group per slide)."""
    from imaging_tasks.batches import flatten

    studies = flatten(audited)
    ready = [s for s in studies if is_ok(s)]
    held = [s for s in studies if not is_ok(s)]
    log.info("%s: %d stud(ies) ready for processing%s", specialty, len(ready),
             "" if not held else f"; {len(held)} held back (quarantined or failed before processing): "
             + ", ".join(f"{s.get('study')} ({s.get('status')})" for s in held[:50]))
    return _batches(specialty, ready) if batched else ready


GPU_ROUTING = {"queue": GPU_QUEUE, "pool": GPU_POOL}  # GPU steps; CPU fallback inside the step when no CUDA


def gpu_task(**kwargs):
    """A task routed to the GPU queue and pool."""
    return lineage.task(**GPU_ROUTING, **kwargs)


@lineage.task(map_index_template=STUDY_LABEL, reads=("anonymized", "earlier_steps"), writes=("this_step",))
@in_object_storage
def _study_step(specialty: str, step: str, batch: list[dict]) -> list[dict]:
    """One processing step of the specialty's record on each study of a batch (the last step publishes it)."""
    from imaging_tasks.pipeline import process_study as run_step

    from airflow.sdk.exceptions import AirflowSkipException

    label_batch(batch)
    if not any(is_ok(s) for s in batch):  # Airflow's own state in the grid, not a run for nothing
        raise AirflowSkipException(f"{specialty} {step}: skipped, every study of this batch went no further at an "
                                   "earlier step: " + ", ".join(f"{s.get('study')} ({s.get('status')})"
                                                                for s in batch[:50]))
    options = run_options(specialty, get_current_context()["params"])
    lake, run = _lake(specialty), _run()
    return run_batch(specialty, batch, step,
                     lambda one: run_step(one, lake, step=step, options=options, run=run))


def _skip_unless_ok(specialty: str, study: dict, step: str) -> None:
    """A study an earlier step quarantined has nothing left to do here: this instance is skipped (Airflow's own
    state, shown as such in the grid), not run for nothing."""
    from airflow.sdk.exceptions import AirflowSkipException

    if not is_ok(study):
        raise AirflowSkipException(f"{specialty} study {study.get('study')}: {step} skipped, the study was "
                                   f"{study.get('status')} at an earlier step ({study.get('reason') or 'no reason'})")


def study_step(specialty: str, name: str):
    """The task of processing step ``name`` of the specialty's record, to ``.expand(batch=batches)``: its task id
    is the step's name, and a GPU step runs on the GPU queue and pool (CPU fallback inside the step when no CUDA)."""
    from imaging_tasks.specialties import get

    step = get(specialty).step(name)
    routing = GPU_ROUTING if step.gpu else {}
    return _study_step.override(task_id=step.name, **routing).partial(specialty=specialty, step=step.name)


# --------------------------------------------------------------------------- per-slide chain (whole-slide specialties)
@lineage.task(map_index_template=STUDY_LABEL, reads=("anonymized",), writes=("work",))
@in_object_storage
def plan_tiles(specialty: str, study: dict) -> dict:
    """Tissue detection and tile list at the run's options (e.g. ``target_mpp`` / ``tile_px``)."""
    from imaging_tasks.specialties import get

    label_study(study)
    params = get_current_context()["params"]
    with naming_study(specialty, study, "tile planning"):
        plan = get(specialty).fan_out_step("plan_slide")(study, _lake(specialty),
                                                          options=run_options(specialty, params), run=_run())
    log.info("plan %s study %s: %d tile(s) on tissue, status %s", specialty, study["study"], plan.get("n_tiles", 0),
             plan.get("status"))
    return plan


@gpu_task(map_index_template=STUDY_LABEL, reads=("anonymized", "work"), writes=("work",))
@in_object_storage
def tile_features(specialty: str, plan: dict) -> dict:
    """Every tile of one slide: worker processes read and compute where they read; the encoder (when set) on the
    GPU; Parquet parts in the work area (a retry keeps the parts already written)."""
    from imaging_tasks.specialties import get

    label_study(plan)
    _skip_unless_ok(specialty, plan, "tile features")
    params = get_current_context()["params"]
    with naming_study(specialty, plan, "tile features"):
        return get(specialty).fan_out_step("slide_features")(plan, _lake(specialty),
                                                              options=run_options(specialty, params), run=_run())


@lineage.task(map_index_template=STUDY_LABEL, reads=("work",), writes=("derived",))
@in_object_storage
def finish_slide(specialty: str, features: dict) -> dict:
    """One tile table, MIL bag, tile-QC picture and summary per slide, published for the warehouse load."""
    from imaging_tasks.specialties import get

    label_study(features)
    _skip_unless_ok(specialty, features, "slide summary")
    with naming_study(specialty, features, "slide summary"):
        return get(specialty).fan_out_step("finish_slide")(features, _lake(specialty), run=_run())


def per_slide(specialty: str):
    """The slide chain as one task group to ``.expand(study=...)``: each slide's plan -> features -> summary runs as
    soon as that slide is ready (not after every slide's plan), and its tiles never leave its own three tasks."""
    from airflow.sdk import task_group

    @task_group(group_id="slide", prefix_group_id=False)
    def slide(study: dict):
        plan = plan_tiles(specialty, study)
        return finish_slide(specialty, tile_features(specialty, plan))

    return slide


@lineage.task(task_id="load_metadata", trigger_rule=TriggerRule.ALL_DONE,
              reads=("derived", "quarantine", "runs", "ledger"), writes=("warehouse",))
@in_object_storage
def _load_metadata(specialty: str, processed: list[dict] | None = None) -> dict:
    """Load every pending study (this run's and any earlier run's that never reached the warehouse), then fail the
    run if one of its studies or tasks failed: the others are loaded first, the failure stays visible."""
    from airflow.sdk import Variable
    from airflow.sdk.exceptions import AirflowSkipException

    from imaging_dags.settings import for_specialty
    from imaging_dags.warehouse_hook import WarehouseHook
    from imaging_tasks.batches import flatten, forget_run
    from imaging_tasks.pipeline import load, pending_loads

    ctx = get_current_context()
    ti = ctx["ti"]
    if isinstance(processed, dict):  # a mapped task group expanded once hands over its one value unpacked
        processed = [processed]      # (apache/airflow#69036), not a list of one
    processed = flatten(processed)  # batches of studies (or slides one by one)
    indexed = ti.xcom_pull(task_ids="index_studies", key="summary") or {}
    with failing_fast(f"load {specialty}"):
        settings = for_specialty(specialty)
        pending = pending_loads(settings.lake)
        if not pending and not processed and not indexed.get("quarantined_new"):
            _fail_if_upstream_failed(specialty, ti, loaded=0)
            raise AirflowSkipException(f"{specialty}: nothing new to load (no study published, quarantined or failed "
                                       "since the last load, no input quarantined): no warehouse write, no asset event")
        warehouse = WarehouseHook(settings.warehouse_uri,
                                  Variable.get("imaging_gcp_conn_id", default="google_cloud_default")).get_conn()
    counts = load(processed, settings.lake, warehouse, run=_run())  # audits each study's rows and files first
    failed, loaded = counts.pop("failed"), counts.pop("loaded")
    forget_run(settings.lake, ti.run_id)  # the batches' checkpoints: a clear of this finished run recomputes
    ctx["outlet_events"][warehouse_asset(specialty)].extra = {
        "specialty": specialty, "run_id": ti.run_id, "rows": counts, "studies": len(loaded),
        "study_ids": [x["study"] for x in loaded][:200], "derived_uris": [x["derived"] for x in loaded][:200],
        "warehouse": settings.warehouse_uri.split("?", 1)[0]}
    for f in failed:
        log.error("%s study %s: failed at %s (%s, attempt %s); its ledger row says so and the next run retries it",
                  specialty, f["study"], f["step"], f["reason"], f["attempt"] or 1)
    if any(f["reason"] == "phi_audit_failed" for f in failed):
        raise AirflowFailException(f"{specialty}: {len(loaded)} stud(ies) loaded; PHI audit failed for "
                                   + ", ".join(f["study"] for f in failed if f["reason"] == "phi_audit_failed")
                                   + " (not loaded; the ledger names the attribute)")
    _fail_if_upstream_failed(specialty, ti, loaded=len(loaded), failed=failed)
    return counts


def _fail_if_upstream_failed(specialty: str, ti, *, loaded: int, failed: list[dict] = ()) -> None:
    """The load runs whatever failed upstream (so the good studies land); then the run must still end failed."""
    broken = ti.get_ti_count(dag_id=ti.dag_id, run_ids=[ti.run_id], states=["failed", "upstream_failed"])
    if broken or failed:
        studies = ", ".join(f"{f['study']} ({f['step']}: {f['reason']})" for f in failed) or "see the failed tasks"
        raise FailuresInRun(f"{specialty}: {loaded} stud(ies) loaded, but {len(failed)} stud(ies) and "
                                   f"{broken} task instance(s) of this run failed: {studies}; the ledger table "
                                   "names each failed study and the next run retries them")


def load_metadata(specialty: str, processed):
    """Upsert studies, series, instances, results, findings, quarantine, lineage and ledger rows; emits the
    specialty's warehouse asset (with counts and URIs) when rows were loaded."""
    return _load_metadata.override(outlets=[warehouse_asset(specialty)])(specialty, processed)


@task(task_id="fhir_update", trigger_rule=TriggerRule.NONE_FAILED)
@in_object_storage
def _fhir_update(specialty: str) -> dict:
    """Send every study whose ledger state changed since it was last sent (loaded: ImagingStudy + Observations +
    DiagnosticReport; quarantined after de-identification: ImagingStudy cancelled) to the FHIR server, by
    conditional update.  Skipped when no server is configured; one study's failure never stops the others, and
    the task fails at the end naming them (its retries, or the next run, send only what is still due)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from imaging_dags.settings import fhir_server
    from imaging_tasks import fhir

    with failing_fast(f"FHIR update {specialty}"):
        server = fhir_server()
        if server is None:
            raise AirflowSkipException(f"{specialty}: no FHIR server configured (Variable imaging_fhir_base_url or "
                                       "connection imaging_fhir): nothing sent")
        client = fhir.FhirClient(server.base_url, headers=dict(server.headers), auth=server.auth,
                                 timeout_s=server.timeout_s)
    sync = fhir.FhirSync(_lake(specialty).root, specialty)
    try:
        outcome = fhir.send_due(client, sync, system=server.identifier_system)
    finally:
        client.close()
    failed = outcome["failed"]
    log.info("FHIR %s: %d stud(ies) sent, %d failed", specialty, len(outcome["sent"]), len(failed))
    if failed:
        raise RuntimeError(f"{specialty}: FHIR update failed for {len(failed)} stud(ies): "
                           + ", ".join(f"{f['study']} ({f['error']})" for f in failed[:50])
                           + f"; {len(outcome['sent'])} sent; a retry or the next run sends only what is still due")
    return {"sent": len(outcome["sent"]), "failed": 0}


def fhir_update(specialty: str, loaded):
    """After the warehouse load (``loaded``: what ``load_metadata`` returned): the optional FHIR update of every
    study not yet sent (``imaging_tasks.fhir``); skipped when no FHIR server is configured, not run when the load
    failed (the next run sends those studies)."""
    update = _fhir_update(specialty)
    loaded >> update
    return update
