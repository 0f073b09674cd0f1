"""Airflow glue of the ``progression`` DAG: cognitive-score uploads (and FHIR Observations) into the warehouse,
then batch predictions for the patients whose data changed.  The maths is :mod:`imaging_tasks.progression`;
here: settings, warehouse queries (DuckDB and BigQuery alike), logging, XCom counts and the asset event.

XComs and asset events carry counts only: never a patient ID, raw or pseudonymous.  Log lines name patients by
pseudonym only, and score uploads by their sha256 (an object name in the landing bucket may carry a name).
"""
from __future__ import annotations

import logging

from airflow.sdk import Asset, Param, get_current_context, task

from imaging_dags.notifiers import notify_task_failure
from imaging_dags.settings import in_object_storage
from imaging_dags.tasks import SPECIALTY_DEFAULTS, failing_fast, warehouse_asset

log = logging.getLogger("imaging_dags.progression")

SCORES_FOLDER = "cognitive_scores"  # <landing>/cognitive_scores/: top level, outside every specialty's folder
MODEL_VARIABLE = "imaging_progression_model_uri"
PATIENT_SYSTEM_VARIABLE = "imaging_fhir_patient_identifier_system"  # the Patient identifier that is the MRN
SCORE_CODES_VARIABLE = "imaging_fhir_score_codes"  # JSON {"system|code": score}; default LOINC MMSE
PREDICTIONS_ASSET = Asset(name="imaging_progression_predictions")
DEFAULT_ARGS = {**SPECIALTY_DEFAULTS, "on_failure_callback": notify_task_failure}


def sessions_asset() -> Asset:
    """The warehouse asset of the specialty whose ROI features feed progression: new sessions landed."""
    from imaging_tasks.specialties import progression_specialty

    return warehouse_asset(progression_specialty())


def progression_params() -> dict[str, Param]:
    return {
        "model_uri": Param(None, type=["null", "string"], maxLength=2048, title="Progression model URI (optional)",
                           description="TorchScript or torch.export file with its JSON beside it (local path, "
                                       f"file://, s3://, gs://). Empty: the Variable {MODEL_VARIABLE}; neither set: "
                                       "no prediction (the predict task is skipped)."),
        "landing_quiet_seconds": Param(None, type=["null", "integer"], minimum=0, maximum=86_400,
                                       title="Upload quiet period (seconds, optional)",
                                       description="A score upload modified more recently than this is still "
                                                   "arriving and waits for the next run. Empty: the [imaging] "
                                                   "landing_quiet_seconds setting (default 120 s)."),
    }


# --------------------------------------------------------------------------------------------------- settings
def _specialty() -> str:
    from imaging_tasks.specialties import progression_specialty

    with failing_fast("progression"):
        return progression_specialty()


def scores_landing_uri(*, get=None) -> str:
    """``<imaging_landing_uri>/cognitive_scores``: the landing root's, not a specialty's."""
    from imaging_dags.settings import DATA, _var, with_connection

    var = get or _var
    root = var("imaging_landing_uri", (DATA / "landing").as_uri())
    return with_connection(root.rstrip("/") + f"/{SCORES_FOLDER}", get=var)


def model_uri(params) -> str | None:
    """The run's Param ``model_uri``, else the Variable; None when neither is set."""
    from imaging_dags.settings import _var

    value = (params or {}).get("model_uri") or _var(MODEL_VARIABLE, "")
    return str(value).strip() or None


def _warehouse(specialty: str):
    from airflow.sdk import Variable

    from imaging_dags.settings import for_specialty
    from imaging_dags.warehouse_hook import WarehouseHook

    return WarehouseHook(for_specialty(specialty).warehouse_uri,
                         Variable.get("imaging_gcp_conn_id", default="google_cloud_default")).get_conn()


@task(task_id="ingest_scores")
@in_object_storage
def ingest_scores() -> dict:
    """Cognitive-score uploads (CSV or Parquet: patient_id, date, score, value) in ``<landing>/cognitive_scores/``,
    pseudonymised with the de-identification key (the same pseudonyms and date shifts as the studies) and upserted
    into ``cognitive_scores`` with their sha256; an upload already loaded is skipped, a malformed one is logged
    and left for the site to fix.  The raw uploads are never modified nor deleted.  Where a FHIR server is
    configured, its cognitive-score Observations too, once per version (``imaging_tasks.progression.fhir_scores``;
    counts ``fhir_*``)."""
    from imaging_dags.settings import deid_key, landing_quiet_seconds

    ctx = get_current_context()
    specialty = _specialty()
    with failing_fast("ingest cognitive scores"):
        key, demo = deid_key()
        quiet = landing_quiet_seconds(ctx["params"])
        landing = scores_landing_uri()
        warehouse = _warehouse(specialty)
    from imaging_tasks import storage

    log.info("cognitive scores of %s: uploads under %s .../%s/, de-identification key: %s", specialty,
             storage.where(landing), SCORES_FOLDER, "public DEMO key" if demo else "configured key")
    from imaging_tasks.progression.store import ingest

    counts = ingest(landing, warehouse, specialty, key, quiet_s=quiet)
    log.info("cognitive scores: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    counts.update({f"fhir_{k}": v for k, v in _ingest_fhir_scores(specialty, warehouse, key).items()})
    return counts


def _ingest_fhir_scores(specialty: str, warehouse, key: bytes) -> dict:
    """Score Observations of the FHIR server, when one is configured (``settings.fhir_server``); none: nothing
    (``{}``).  Which versions were loaded and the watermark live in the lake."""
    from imaging_dags.settings import _var, fhir_server, for_specialty

    with failing_fast("ingest cognitive scores from FHIR"):
        server = fhir_server()
        if server is None:
            return {}
        from imaging_tasks import fhir
        from imaging_tasks.progression.fhir_scores import parse_codes

        codes = parse_codes(_var(SCORE_CODES_VARIABLE, "") or None)
        system = (_var(PATIENT_SYSTEM_VARIABLE, "") or "").strip() or None
        lake = for_specialty(specialty).lake_uri
        client = fhir.FhirClient(server.base_url, headers=dict(server.headers), auth=server.auth,
                                 timeout_s=server.timeout_s)
    from imaging_tasks.progression.store import ingest_fhir

    log.info("cognitive scores from FHIR %s: codes %s, patient identifier system %s", fhir.origin(server.base_url),
             ", ".join(sorted(codes)), system or "(none: the Patient's only identifier)")
    try:
        with failing_fast("ingest cognitive scores from FHIR"):  # a refused read (fhir.FhirRefused) fails once
            return ingest_fhir(client, warehouse, specialty, key, lake_root=lake, codes=codes, patient_system=system)
    finally:
        client.close()


# ----------------------------------------------------------------------------------------------- predictions
@task(task_id="predict", outlets=[PREDICTIONS_ASSET])
@in_object_storage
def predict() -> dict:
    """The model (Param ``model_uri``, else Variable ``imaging_progression_model_uri``; neither: skipped) loaded
    once; the patients whose sessions or scores changed since their last prediction by it predicted in one batch
    and upserted (one set per patient: its earlier set by this model version replaced); a patient the model
    cannot take (too few sessions, a feature never measured) is logged, counted and recorded in
    ``prediction_refusals``, not failed; it is looked at again when its sessions or scores change.  Emits
    ``imaging_progression_predictions`` with counts; skipped (no event) when nothing was predicted."""
    from airflow.sdk.exceptions import AirflowSkipException

    from imaging_tasks.progression.model import load_progression_model
    from imaging_tasks.progression.store import check_model, predict_changed

    ctx = get_current_context()
    ti = ctx["ti"]
    uri = model_uri(ctx["params"])
    if uri is None:
        log.warning("no progression model configured: set the Variable %s (or the run's Param model_uri) to the "
                    "model file (its JSON beside it); nothing predicted", MODEL_VARIABLE)
        raise AirflowSkipException(f"no progression model configured: set the Variable {MODEL_VARIABLE}")
    specialty = _specialty()
    with failing_fast("progression predictions"):
        model, spec = load_progression_model(uri)
        check_model(spec)
        warehouse = _warehouse(specialty)
    counts = predict_changed(warehouse, specialty, model, spec, run_id=ti.run_id)
    ti.xcom_push(key="summary", value=counts)
    if not counts["rows"]:
        raise AirflowSkipException(f"nothing new to predict ({counts['refused']} changed patient(s) refused, "
                                   f"{counts['unchanged']} unchanged): no prediction written, no asset event")
    ctx["outlet_events"][PREDICTIONS_ASSET].extra = {
        "specialty": specialty, "run_id": ti.run_id, "model": spec.name, "model_version": spec.version,
        "model_sha256": spec.sha256, **{k: v for k, v in counts.items() if k != "refused_by_reason"},
        "table": "predictions"}
    return counts


__all__ = ["DEFAULT_ARGS", "MODEL_VARIABLE", "PATIENT_SYSTEM_VARIABLE", "PREDICTIONS_ASSET", "SCORE_CODES_VARIABLE",
           "SCORES_FOLDER", "ingest_scores", "model_uri", "predict", "progression_params", "scores_landing_uri",
           "sessions_asset"]
