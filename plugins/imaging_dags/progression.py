"""Airflow glue of the ``progression`` DAG: cognitive-score uploads into the warehouse, then batch predictions for
the patients whose data changed.  The maths is :mod:`imaging_tasks.progression`; here: settings, warehouse
queries (DuckDB and BigQuery alike), logging, XCom counts and the asset event.

XComs and asset events carry counts only: never a patient ID, raw or pseudonymous.  Log lines name patients by
pseudonym only, and score uploads by their sha256 (an object name in the landing bucket may carry a name).
"""
from __future__ import annotations

import datetime as dt
import logging

from airflow.sdk import Asset, Param, get_current_context, task

from imaging_dags.notifiers import notify_task_failure
from imaging_dags.settings import in_object_storage
from imaging_dags.tasks import SPECIALTY_DEFAULTS, failing_fast, warehouse_asset

log = logging.getLogger("imaging_dags.progression")

SCORES_FOLDER = "cognitive_scores"  # <landing>/cognitive_scores/: top level, outside every specialty's folder
MODEL_VARIABLE = "imaging_progression_model_uri"
PREDICTIONS_ASSET = Asset(name="imaging_progression_predictions")
DEFAULT_ARGS = {**SPECIALTY_DEFAULTS, "on_failure_callback": notify_task_failure}
PREDICTION_SCOPE = ("specialty", "patient_id", "model", "model_version")  # one set per patient and model


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


def table(warehouse, name: str) -> str:
    """A table as the store's SQL names it (BigQuery: `project.dataset.name`, made if no load made it yet)."""
    table_id = getattr(warehouse, "table_id", None)
    if table_id is None:
        return name
    from imaging_tasks.warehouse import TABLES

    warehouse.ensure_table(TABLES[name])
    return f"`{table_id(name)}`"


# ----------------------------------------------------------------------------------------------- score uploads
def superseded(rows: list[dict], held: dict[tuple, str], age: dict[str, int], mine: int) -> list[dict]:
    """The rows of an upload (``mine``: its place in upload order) whose key a later upload holds in the warehouse
    (``held``: key -> source_sha256, ``age``: sha256 -> place of the uploads still in the landing folder).  A
    correction uploaded later wins, and the earlier upload, re-read because its own rows are gone, does not
    undo it."""
    return [r for r in rows if age.get(held.get((r["patient_id"], r["score"], r["date"])), -1) > mine]


def ingest(landing_uri: str, warehouse, specialty: str, key: bytes, *, quiet_s: float,
           now: dt.datetime | None = None) -> dict:
    """Pseudonymise and upsert every score upload under ``landing_uri`` not loaded yet (its sha256 absent from
    ``cognitive_scores``), oldest first; a malformed one is logged (reason, no PHI) and the others go on.  The
    uploads are only read.  Counts."""
    from imaging_tasks import storage
    from imaging_tasks.errors import BadInput
    from imaging_tasks.progression.features import read_scores_upload

    now = now or dt.datetime.now(dt.timezone.utc)
    epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    objects = sorted(storage.list_objects(landing_uri), key=lambda o: (o.modified or epoch, o.relpath))
    ref = table(warehouse, "cognitive_scores")
    held = {(p, s, d): sha for p, s, d, sha in warehouse.query(
        f"SELECT patient_id, score, date, source_sha256 FROM {ref} WHERE specialty = ?", [specialty])}
    counts = {"uploads": len(objects), "loaded": 0, "already_loaded": 0, "waiting": 0, "malformed": 0,
              "superseded": 0, "rows": 0, "superseded_rows": 0}
    uploads, age = [], {}
    for obj in objects:
        if quiet_s and obj.modified is not None and (now - obj.modified).total_seconds() < quiet_s:
            counts["waiting"] += 1  # still being written, perhaps: the next run takes it
            continue
        sha = storage.sha256_bytes(storage.read_bytes(obj.uri))
        if sha in age:  # the same bytes twice in the folder
            counts["already_loaded"] += 1
            continue
        age[sha] = len(age)
        uploads.append((obj, sha))
    loaded_shas = set(held.values())
    for obj, sha in uploads:
        name = f"score upload sha256 {sha[:16]} ({obj.size} bytes)"
        if sha in loaded_shas:
            counts["already_loaded"] += 1
            continue
        try:
            rows = read_scores_upload(obj.uri, key)
        except BadInput as exc:  # its messages name row numbers, never values
            log.error("%s is malformed (%s): %s; not loaded, the others go on", name, exc.reason, exc.message)
            counts["malformed"] += 1
            continue
        except OSError:
            raise  # storage: retried
        except Exception as exc:  # noqa: BLE001  a damaged Parquet file etc.: the type only (no raw value)
            log.error("%s is malformed (%s: unreadable as CSV or Parquet); not loaded, the others go on", name,
                      type(exc).__name__)
            counts["malformed"] += 1
            continue
        if not rows:
            log.error("%s is malformed (no rows): not loaded", name)
            counts["malformed"] += 1
            continue
        later = superseded(rows, held, age, age[sha])
        gone = {id(r) for r in later}
        fresh = [r for r in rows if id(r) not in gone]
        counts["superseded_rows"] += len(later)
        if not fresh:
            log.info("%s: each of its %d row(s) was corrected by a later upload: nothing to load", name, len(rows))
            counts["superseded"] += 1
            continue
        warehouse.upsert("cognitive_scores", [{**r, "specialty": specialty, "source_sha256": sha} for r in fresh])
        held.update({(r["patient_id"], r["score"], r["date"]): sha for r in fresh})
        loaded_shas.add(sha)
        counts["loaded"] += 1
        counts["rows"] += len(fresh)
        log.info("%s: %d score row(s) of %d patient(s) loaded%s", name, len(fresh),
                 len({r["patient_id"] for r in fresh}),
                 f", {len(later)} left out (a later upload corrected them)" if later else "")
    return counts


@task(task_id="ingest_scores")
@in_object_storage
def ingest_scores() -> dict:
    """Cognitive-score uploads (CSV or Parquet: patient_id, date, score, value) in ``<landing>/cognitive_scores/``,
    pseudonymised with the de-identification key (the same pseudonyms and date shifts as the studies) and upserted
    into ``cognitive_scores`` with their sha256; an upload already loaded is skipped, a malformed one is logged
    and left for the site to fix.  The raw uploads are never modified nor deleted."""
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
    counts = ingest(landing, warehouse, specialty, key, quiet_s=quiet)
    log.info("cognitive scores: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


# ----------------------------------------------------------------------------------------------- predictions
_CHANGED_CTE = """WITH sessions AS (
  SELECT s.patient_id, MAX(s.loaded_at) AS studies_at, MAX(r.loaded_at) AS features_at
  FROM {studies} s JOIN {roi_features} r ON r.specialty = s.specialty AND r.study_id = s.study_id
  WHERE s.specialty = ? GROUP BY s.patient_id),
scores AS (SELECT patient_id, MAX(loaded_at) AS scores_at FROM {cognitive_scores} WHERE specialty = ?
  GROUP BY patient_id),
predicted AS (SELECT patient_id, MAX(computed_at) AS computed_at FROM {predictions}
  WHERE specialty = ? AND model = ? AND model_version = ? GROUP BY patient_id),
changed AS (SELECT s.patient_id FROM sessions s LEFT JOIN scores c ON c.patient_id = s.patient_id
  LEFT JOIN predicted p ON p.patient_id = s.patient_id
  WHERE p.computed_at IS NULL OR s.studies_at > p.computed_at OR s.features_at > p.computed_at
     OR c.scores_at > p.computed_at)
"""
_CHANGED_SESSIONS = ("SELECT s.patient_id, s.study_id, s.study_date, r.atlas, r.roi, r.metric, r.value, r.unit "
                     "FROM {studies} s JOIN {roi_features} r ON r.specialty = s.specialty AND r.study_id = s.study_id "
                     "WHERE s.specialty = ? AND s.patient_id IN (SELECT patient_id FROM changed) "
                     "ORDER BY s.patient_id, s.study_date, s.study_id")
_CHANGED_SCORES = ("SELECT patient_id, date, score, value FROM {cognitive_scores} "
                   "WHERE specialty = ? AND patient_id IN (SELECT patient_id FROM changed) "
                   "ORDER BY patient_id, date, score")
_PATIENTS = ("SELECT COUNT(DISTINCT s.patient_id) FROM {studies} s JOIN {roi_features} r "
             "ON r.specialty = s.specialty AND r.study_id = s.study_id WHERE s.specialty = ?")


def changed_rows(warehouse, specialty: str, model: str, version: str) -> tuple[list[dict], list[dict], int]:
    """``(session rows, score rows, patients in all)`` of the patients whose session rows (studies joined with
    roi_features) or cognitive scores were loaded after their newest prediction by this model name and version,
    or who have none yet: all their sessions and scores, as :func:`~imaging_tasks.progression.build_sequences`
    takes them."""
    names = {n: table(warehouse, n) for n in ("studies", "roi_features", "cognitive_scores", "predictions")}
    cte, cte_params = _CHANGED_CTE.format(**names), [specialty, specialty, specialty, model, version]

    def rows(sql: str, columns: tuple[str, ...]) -> list[dict]:
        return [dict(zip(columns, r)) for r in warehouse.query(cte + sql.format(**names), cte_params + [specialty])]

    sessions = rows(_CHANGED_SESSIONS, ("patient_id", "study_id", "study_date", "atlas", "roi", "metric", "value",
                                        "unit"))
    scores = rows(_CHANGED_SCORES, ("patient_id", "date", "score", "value"))
    total = warehouse.query(_PATIENTS.format(**names), [specialty])[0][0]
    return sessions, scores, int(total or 0)


def sequences_of(session_rows: list[dict], score_rows: list[dict]) -> tuple[dict, list[dict]]:
    """``(sequences, refused)``: :func:`build_sequences` of all the rows; when it refuses them (one patient's rows
    are inconsistent), patient by patient, so one patient's bad rows refuse that patient only."""
    from imaging_tasks.errors import BadInput
    from imaging_tasks.progression.features import build_sequences

    try:
        return build_sequences(session_rows, score_rows), []
    except BadInput:
        pass
    by_patient: dict[str, tuple[list, list]] = {}
    for r in session_rows:
        by_patient.setdefault(str(r["patient_id"]), ([], []))[0].append(r)
    for r in score_rows:
        if str(r["patient_id"]) in by_patient:
            by_patient[str(r["patient_id"])][1].append(r)
    sequences, refused = {}, []
    for pid, (sessions, scores) in by_patient.items():
        try:
            sequences.update(build_sequences(sessions, scores or None))
        except BadInput as exc:
            refused.append({"patient_id": pid, "reason": exc.reason, "message": exc.message})
    return sequences, refused


def prediction_rows(predictions: list[dict], sequences: dict, spec, *, specialty: str, run_id: str,
                    computed_at: dt.datetime) -> list[dict]:
    """``predict_many``'s records as ``predictions`` table rows."""
    return [{"specialty": specialty, "patient_id": p["patient_id"], "model": p["model_name"],
             "model_version": p["model_version"], "horizon_months": int(p["horizon_months"]), "score": p["score"],
             "value": p["value"], "as_of_study_id": p["as_of_study_id"], "as_of_date": p["as_of_date"],
             "target_date": p["target_date"],
             "n_sessions": min(len(sequences[p["patient_id"]].sessions), spec.max_sessions),
             "model_sha256": p["model_sha256"], "run_id": run_id, "computed_at": computed_at} for p in predictions]


def check_model(spec) -> None:
    """What the predictions table can hold: whole-month horizons (its ``horizon_months`` is INT64)."""
    from imaging_tasks.errors import ConfigError

    odd = [h for h in spec.horizons_months if not float(h).is_integer()]
    if odd:
        raise ConfigError(f"progression model {spec.name} {spec.version} predicts at {', '.join(map(str, odd))} "
                          "months; the predictions table holds whole months: use whole-month horizons_months")


@task(task_id="predict", outlets=[PREDICTIONS_ASSET])
@in_object_storage
def predict() -> dict:
    """The model (Param ``model_uri``, else Variable ``imaging_progression_model_uri``; neither: skipped) loaded
    once; the patients whose sessions or scores changed since their last prediction by it predicted in one batch
    and upserted (one set per patient: its earlier set by this model version replaced); a patient the model
    cannot take (too few sessions, a feature never measured) is logged and counted, not failed.  Emits
    ``imaging_progression_predictions`` with counts; skipped (no event) when nothing was predicted."""
    from airflow.sdk.exceptions import AirflowSkipException

    from imaging_tasks.progression.model import load_progression_model, predict_many

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
    log.info("progression model %s %s (sha256 %s), %s sessions", spec.name, spec.version, spec.sha256[:16],
             specialty)
    computed_at = dt.datetime.now(dt.timezone.utc)  # before the read: rows loaded after it count as changed
    sessions, scores, patients = changed_rows(warehouse, specialty, spec.name, spec.version)
    sequences, refused = sequences_of(sessions, scores)
    changed = len(sequences) + len(refused)
    predictions, refused_by_model = predict_many(model, spec, sequences.values())
    refused += refused_by_model
    rows = prediction_rows(predictions, sequences, spec, specialty=specialty, run_id=ti.run_id,
                           computed_at=computed_at)
    predicted = sorted({r["patient_id"] for r in rows})
    if rows:
        warehouse.upsert("predictions", rows, replace_scope=PREDICTION_SCOPE)
    reasons: dict[str, int] = {}
    for r in refused:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        log.warning("patient %s: no prediction (%s): %s", r["patient_id"], r["reason"], r["message"])
    counts = {"patients": patients, "changed": changed,
              "predicted": len(predicted), "rows": len(rows), "refused": len(refused), "refused_by_reason": reasons,
              "unchanged": max(0, patients - changed)}
    log.info("progression predictions: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    ti.xcom_push(key="summary", value=counts)
    if not rows:
        raise AirflowSkipException(f"nothing new to predict ({counts['refused']} changed patient(s) refused, "
                                   f"{counts['unchanged']} unchanged): no warehouse write, no asset event")
    ctx["outlet_events"][PREDICTIONS_ASSET].extra = {
        "specialty": specialty, "run_id": ti.run_id, "model": spec.name, "model_version": spec.version,
        "model_sha256": spec.sha256, **{k: v for k, v in counts.items() if k != "refused_by_reason"},
        "table": "predictions"}
    return counts


__all__ = ["DEFAULT_ARGS", "MODEL_VARIABLE", "PREDICTIONS_ASSET", "SCORES_FOLDER", "changed_rows", "check_model",
           "ingest", "ingest_scores", "model_uri", "predict", "prediction_rows", "progression_params",
           "scores_landing_uri", "sequences_of", "sessions_asset", "superseded"]
