"""The progression data in the warehouse (DuckDB or BigQuery alike): cognitive-score uploads loaded once each,
the patients whose sessions or scores changed since their last prediction, predictions as table rows.

The ``progression`` DAG's tasks (``plugins/imaging_dags/progression.py``) call these with the warehouse and key
they were configured with; nothing here knows Airflow.  Patients are named by pseudonym only, uploads by their
sha256 (an object name in a landing bucket may carry a patient's name).
"""
from __future__ import annotations

import datetime as dt
import logging

log = logging.getLogger(__name__)

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
    from imaging_tasks.progression.features import scores_upload_rows

    now = now or dt.datetime.now(dt.timezone.utc)
    epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    objects = sorted(storage.list_objects(landing_uri), key=lambda o: (o.modified or epoch, o.relpath))
    ref = warehouse.ref("cognitive_scores", create=True)
    held = {(p, s, d): sha for p, s, d, sha in warehouse.query(
        f"SELECT patient_id, score, date, source_sha256 FROM {ref} WHERE specialty = ?", [specialty])}
    counts = {"uploads": len(objects), "loaded": 0, "already_loaded": 0, "waiting": 0, "malformed": 0,
              "superseded": 0, "rows": 0, "superseded_rows": 0}
    uploads, age = [], {}
    loaded_shas = set(held.values())
    for obj in objects:
        if quiet_s and obj.modified is not None and (now - obj.modified).total_seconds() < quiet_s:
            counts["waiting"] += 1  # still being written, perhaps: the next run takes it
            continue
        data = storage.read_bytes(obj.uri)
        sha = storage.sha256_bytes(data)
        if sha in age:  # the same bytes twice in the folder
            counts["already_loaded"] += 1
            continue
        age[sha] = len(age)
        uploads.append((obj, sha, None if sha in loaded_shas else data))  # parsed from these bytes: read once
    for obj, sha, data in uploads:
        name = f"score upload sha256 {sha[:16]} ({obj.size} bytes)"
        if sha in loaded_shas:
            counts["already_loaded"] += 1
            continue
        try:
            rows = scores_upload_rows(data, key)
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
    names = {n: warehouse.ref(n, create=True) for n in ("studies", "roi_features", "cognitive_scores", "predictions")}
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


