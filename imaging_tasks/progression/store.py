"""The progression data in the warehouse (DuckDB or BigQuery alike): cognitive-score uploads loaded once each
and FHIR score Observations once per version (:func:`ingest_fhir`), the patients whose sessions or scores
changed since their last prediction, predictions as table rows.

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


def held_scores(warehouse, specialty: str) -> dict[tuple, str]:
    """``(patient_id, score, date) -> source_sha256`` of the specialty's score rows in the warehouse."""
    ref = warehouse.ref("cognitive_scores", create=True)
    return {(p, s, d): sha for p, s, d, sha in warehouse.query(
        f"SELECT patient_id, score, date, source_sha256 FROM {ref} WHERE specialty = ?", [specialty])}


def upsert_scores(warehouse, specialty: str, rows: list[tuple[dict, str]], withdrawn: list[tuple] = ()) -> None:
    """The one way score rows reach the warehouse, from uploads and FHIR alike: ``(row, source_sha256)`` pairs
    upserted on the table key (the newer value of a key replaces the older), and the ``withdrawn`` keys
    ``(patient_id, score, date)`` deleted, in one transaction."""
    scope = ("specialty", "patient_id", "score", "date")
    with warehouse.transaction() as tx:
        if withdrawn:
            tx.upsert("cognitive_scores", [], replace_scope=scope, scopes=[(specialty, *k) for k in withdrawn])
        if rows:
            tx.upsert("cognitive_scores", [{**r, "specialty": specialty, "source_sha256": sha} for r, sha in rows])


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
    held = held_scores(warehouse, specialty)
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
        upsert_scores(warehouse, specialty, [(r, sha) for r in fresh])
        held.update({(r["patient_id"], r["score"], r["date"]): sha for r in fresh})
        loaded_shas.add(sha)
        counts["loaded"] += 1
        counts["rows"] += len(fresh)
        log.info("%s: %d score row(s) of %d patient(s) loaded%s", name, len(fresh),
                 len({r["patient_id"] for r in fresh}),
                 f", {len(later)} left out (a later upload corrected them)" if later else "")
    return counts


# ----------------------------------------------------------------------------------------------- FHIR scores
FHIR_COUNTS = ("observations", "loaded", "amended", "already_loaded", "superseded", "withdrawn", "held_by_upload",
               "rows", "skipped_status", "skipped_unknown_code", "skipped_no_patient", "skipped_no_date",
               "skipped_no_value", "skipped_bad_value")


def ingest_fhir(client, warehouse, specialty: str, key: bytes, *, lake_root, codes: dict | None = None,
                patient_system: str | None = None, overlap_s: float | None = None,
                page_size: int | None = None) -> dict:
    """Cognitive-score Observations of a FHIR server (``client``: :class:`imaging_tasks.fhir.FhirClient`) new or
    changed since the last run (the watermark in ``lake_root``, less ``overlap_s``), pseudonymised like uploads
    (:mod:`imaging_tasks.progression.fhir_scores`) and upserted through :func:`upsert_scores`.  Counts.

    Exactly once, whatever the overlap: an Observation version already loaded (by the lake's record, or its
    ``source_sha256`` in the warehouse) adds nothing; a newer version (amended, corrected) replaces the row of
    the earlier one, and removes it when its key moved (another date); an older version read after a newer one
    changes nothing (``superseded``, as an upload corrected later); ``entered-in-error`` / ``cancelled`` removes
    the row the Observation gave.  Where an upload holds the same patient, score and date, the upload wins
    (``held_by_upload``; otherwise it would be reloaded over the Observation's row).  The lake record
    and watermark are saved after the warehouse write: a run that fails re-reads the same Observations.
    """
    from imaging_tasks.progression import fhir_scores as fs

    state = fs.ScoreState.load(lake_root, specialty, client.base_url)
    held = held_scores(warehouse, specialty)
    sources = set(held.values())
    if state.observations and not any(o["source"] in sources for o in state.observations.values()):
        log.warning("FHIR scores: none of the %d Observation row(s) the lake records as loaded is in the "
                    "warehouse (a new or reset warehouse?): reading every Observation again",
                    len(state.observations))
        state = fs.ScoreState(state.uri)
    counts = dict.fromkeys(FHIR_COUNTS, 0)
    fhir_sources = {o["source"] for o in state.observations.values()}  # any other source in held is an upload
    pending: dict[tuple, tuple[dict, str]] = {}  # key -> (row, source), the newest of the run
    stale: dict[tuple, str] = {}  # key -> source whose row an amendment or withdrawal takes away
    newest = state.watermark
    since = state.since(fs.DEFAULT_OVERLAP_S if overlap_s is None else overlap_s)
    log.info("FHIR scores of %s: Observations %s", specialty,
             f"updated after {fs.instant(since)}" if since else "all (no watermark yet)")
    for score in fs.read_scores(client, key, codes=codes, patient_system=patient_system, since=since,
                                page_size=page_size or fs.DEFAULT_PAGE_SIZE):
        counts["observations"] += 1
        if score.updated is not None and (newest is None or score.updated > newest):
            newest = score.updated
        _take_fhir_score(score, state, held, sources, fhir_sources, pending, stale, counts)
    withdrawn = [k for k, src in stale.items() if k not in pending and held.get(k) == src]
    rows = list(pending.values())
    if rows or withdrawn:
        upsert_scores(warehouse, specialty, rows, withdrawn)
    counts["rows"] = len(rows)
    state.watermark = newest
    state.save()
    skipped = {k: v for k, v in counts.items() if k.startswith("skipped_") and v}
    log.info("FHIR scores of %s: %d Observation(s): %d row(s) written (%d new, %d amended), %d withdrawn, %d "
             "already loaded, %d superseded%s; watermark %s", specialty, counts["observations"], len(rows),
             counts["loaded"], counts["amended"], counts["withdrawn"], counts["already_loaded"],
             counts["superseded"], "".join(f", {v} {k}" for k, v in skipped.items()),
             fs.instant(newest) if newest else "none (no meta.lastUpdated: every run reads everything)")
    return counts


def _take_fhir_score(score, state, held: dict, sources: set, fhir_sources: set, pending: dict, stale: dict,
                     counts: dict) -> None:
    """Decide what one :class:`~imaging_tasks.progression.fhir_scores.FhirScore` does (see :func:`ingest_fhir`),
    updating the run's pending rows, the keys to withdraw, the lake record and the counts."""
    prev = state.observations.get(score.observation)
    if prev and prev["source"] != score.source and _older(score.updated, prev.get("updated")):
        counts["superseded"] += 1  # a newer version of it is loaded already
        return
    if score.skipped == "withdrawn":
        if prev:
            _retire(prev, pending, stale)
            del state.observations[score.observation]
            counts["withdrawn"] += 1
        else:
            counts["skipped_status"] += 1
        return
    if score.skipped:
        counts[f"skipped_{score.skipped}"] += 1
        if score.skipped in ("no_patient", "unknown_code"):
            log.info("FHIR Observation sha256 %s: %s, skipped", score.observation[:16],
                     "its patient has no usable identifier" if score.skipped == "no_patient" else
                     "its code is not a configured score")
        return
    row = score.row
    key = (row["patient_id"], row["score"], row["date"])
    record = {"source": score.source, "updated": score.updated.isoformat() if score.updated else None,
              "key": list(key)}
    if (prev and prev["source"] == score.source) or (not prev and score.source in sources):
        state.observations[score.observation] = record  # (re)learnt from the warehouse when the lake lost it
        counts["already_loaded"] += 1
        return
    upload = held.get(key)
    if upload is not None and upload not in fhir_sources:
        counts["held_by_upload"] += 1  # the site's own upload of that score and date wins (it would reload)
        return
    if prev:
        _retire(prev, pending, stale)
    pending[key] = (row, score.source)
    fhir_sources.add(score.source)
    state.observations[score.observation] = record
    counts["amended" if prev else "loaded"] += 1


def _retire(prev: dict, pending: dict, stale: dict) -> None:
    """The row of an Observation's earlier version goes (unless another Observation holds that key now)."""
    key = tuple(prev["key"])
    if key in pending and pending[key][1] == prev["source"]:
        del pending[key]
    stale[key] = prev["source"]


def _older(updated: dt.datetime | None, than: str | None) -> bool:
    if updated is None or not than:
        return False
    from imaging_tasks.progression.fhir_scores import parse_instant

    other = parse_instant(than)
    return other is not None and updated < other


_CHANGED_CTE = """WITH sessions AS (
  SELECT s.patient_id, MAX(s.loaded_at) AS studies_at, MAX(r.loaded_at) AS features_at
  FROM {studies} s JOIN {roi_features} r ON r.specialty = s.specialty AND r.study_id = s.study_id
  WHERE s.specialty = ? GROUP BY s.patient_id),
scores AS (SELECT patient_id, MAX(loaded_at) AS scores_at FROM {cognitive_scores} WHERE specialty = ?
  GROUP BY patient_id),
predicted AS (SELECT patient_id, MAX(computed_at) AS computed_at FROM (
  SELECT patient_id, computed_at FROM {predictions} WHERE specialty = ? AND model = ? AND model_version = ?
  UNION ALL SELECT patient_id, computed_at FROM {prediction_refusals}
  WHERE specialty = ? AND model = ? AND model_version = ?) AS seen GROUP BY patient_id),
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
    roi_features) or cognitive scores were loaded after their newest prediction, or refusal, by this model name
    and version, or who have neither yet: all their sessions and scores, as
    :func:`~imaging_tasks.progression.build_sequences` takes them.  A refused patient (too few sessions, ...)
    is thus looked at again when its data change, not on every run."""
    names = {n: warehouse.ref(n, create=True)
             for n in ("studies", "roi_features", "cognitive_scores", "predictions", "prediction_refusals")}
    cte = _CHANGED_CTE.format(**names)
    cte_params = [specialty, specialty, specialty, model, version, specialty, model, version]

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


PREDICTION_SCOPE = ("specialty", "patient_id", "model", "model_version")  # one set per patient and model


def refusal_rows(refused: list[dict], spec, *, specialty: str, run_id: str, computed_at: dt.datetime) -> list[dict]:
    """``prediction_refusals`` rows of the changed patients the model could not take (``sequences_of`` and
    ``predict_many`` refusals: ``patient_id``, ``reason``, ``message``)."""
    return [{"specialty": specialty, "patient_id": r["patient_id"], "model": spec.name,
             "model_version": spec.version, "reason": r["reason"], "message": r["message"], "run_id": run_id,
             "computed_at": computed_at} for r in refused]


def save_predictions(warehouse, specialty: str, spec, rows: list[dict], refusals: list[dict]) -> None:
    """One transaction: each predicted patient's set replaces its earlier one by this model version (and any
    refusal it had), each refused patient's refusal is recorded (its earlier predictions stay: they were made
    on data the model could take)."""
    scope = PREDICTION_SCOPE
    predicted = sorted({r["patient_id"] for r in rows})
    with warehouse.transaction() as tx:
        if rows:
            tx.upsert("predictions", rows, replace_scope=scope)
            tx.upsert("prediction_refusals", [], replace_scope=scope,
                      scopes=[(specialty, p, spec.name, spec.version) for p in predicted])
        if refusals:
            tx.upsert("prediction_refusals", refusals)


def predict_changed(warehouse, specialty: str, model, spec, *, run_id: str) -> dict:
    """The batch step of the ``progression`` DAG and ``imaging-tasks predict-progression``: the patients whose
    sessions or scores changed since their last prediction (or refusal) by this model version, predicted in one
    batch and saved with their refusals (:func:`save_predictions`).  A patient the model cannot take (too few
    sessions, a feature never measured) is logged with its reason and counted, never guessed.  Returns counts
    (no patient ID): ``patients``, ``changed``, ``predicted``, ``rows``, ``refused``, ``refused_by_reason``,
    ``unchanged``."""
    from imaging_tasks.progression.model import predict_many

    log.info("progression model %s %s (sha256 %s), %s sessions", spec.name, spec.version, spec.sha256[:16],
             specialty)
    computed_at = dt.datetime.now(dt.timezone.utc)  # before the read: rows loaded after it count as changed
    sessions, scores, patients = changed_rows(warehouse, specialty, spec.name, spec.version)
    sequences, refused = sequences_of(sessions, scores)
    changed = len(sequences) + len(refused)
    predictions, refused_by_model = predict_many(model, spec, sequences.values())
    refused += refused_by_model
    rows = prediction_rows(predictions, sequences, spec, specialty=specialty, run_id=run_id,
                           computed_at=computed_at)
    save_predictions(warehouse, specialty, spec, rows,
                     refusal_rows(refused, spec, specialty=specialty, run_id=run_id, computed_at=computed_at))
    reasons: dict[str, int] = {}
    for r in refused:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        log.warning("patient %s: no prediction (%s): %s", r["patient_id"], r["reason"], r["message"])
    counts = {"patients": patients, "changed": changed, "predicted": len({r["patient_id"] for r in rows}),
              "rows": len(rows), "refused": len(refused), "refused_by_reason": reasons,
              "unchanged": max(0, patients - changed)}
    log.info("progression predictions: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def check_model(spec) -> None:
    """What the predictions table can hold: whole-month horizons (its ``horizon_months`` is INT64)."""
    from imaging_tasks.errors import ConfigError

    odd = [h for h in spec.horizons_months if not float(h).is_integer()]
    if odd:
        raise ConfigError(f"progression model {spec.name} {spec.version} predicts at {', '.join(map(str, odd))} "
                          "months; the predictions table holds whole months: use whole-month horizons_months")


