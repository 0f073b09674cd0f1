"""The longitudinal table: a patient's sessions in time order, each with the model contract's feature vector.

Inputs are shaped like the warehouse, so the same code reads the neuro warehouse, a CSV export of it and the
synthetic cohort (:mod:`imaging_tasks.progression.cohort`):

* **session rows**: one per measurement, ``patient_id`` (the keyed pseudonym), ``study_id``, ``study_date``
  (``YYYYMMDD``, shifted per patient by de-identification), ``atlas``, ``roi``, ``metric``, ``value`` (``unit``
  and ``specialty`` may be there and are not read).  That is ``studies`` joined with ``roi_features``
  (:data:`SESSIONS_SQL`, :func:`warehouse_session_rows`).
* **score rows**: ``patient_id`` (pseudonym), ``date`` (shifted ``YYYYMMDD``), ``score``, ``value``.  A site's
  upload, with raw patient IDs and real dates, goes through :func:`read_scores_upload` /
  :func:`pseudonymise_scores` first: the same keyed pseudonym and per-patient date shift de-identification gave
  that patient's studies, so a score date lines up with the shifted study dates.

Either may be a list of dicts, a pyarrow Table, a DuckDB relation or a pandas DataFrame; files are read by
:func:`read_session_rows` (a DuckDB warehouse file, or CSV/Parquet) and :func:`read_table_rows`.  Score names
are made canonical (``MMSE``, ``CDR_SB``, ``ADAS_Cog``; ``CDR-SB``, ``ADAS-Cog 11`` ... accepted); other names pass
through unchanged.

Feature names
-------------
* ``roi:<roi>:<metric>``: a ``roi_features`` value of the session, e.g. ``roi:hippocampus:gm_volume`` or
  ``roi:whole_brain:brain_volume`` (any atlas; when two atlases of a session give that ROI different values
  the name is ambiguous and refused: name the atlas with ``roi:<atlas>:<roi>:<metric>``).
* ``score:<name>``: the cognitive score carried to the session (below), e.g. ``score:MMSE``.
* ``days_since_first``: days from the patient's first session (kept when old sessions are cut by
  ``max_sessions``: disease duration matters more than where the window starts); ``interval_days``: days since
  the previous session (0 for the first).

Scores at a session
-------------------
A score observation belongs to the session nearest in time within ``window_days`` (default 90) either side:
the cognitive assessment of that visit, whether it came a few weeks before or after the scan (ties go to the
earlier session; when several observations of one score belong to a session, the nearest wins, the later on a
tie).  Observations near no session are not inputs (they can still be training targets).  A session without
its own observation carries the previous session's forward; sessions before the first observation take it
backwards.  That back-fill uses nothing from after the prediction time: every session of a sequence precedes
it.  ROI values missing at a session (no PET that visit) are filled the same way.  Filling runs over all the
patient's sessions before a model's ``max_sessions`` cut, so a score measured before the kept window still
reaches it.  A feature with no value at any session of the patient is not guessed: :func:`feature_matrix`
refuses the patient (``missing_features``).  The last session's score may thus be one taken up to
``window_days`` after the scan; horizons still count from the scan.

Session dates must be there: a study de-identified without the "retain modified dates" option has none and is
left out (counted in :attr:`PatientSequence.undated_sessions`).  Horizons count from the last session's date in
months of ``365.25 / 12`` days (:data:`DAYS_PER_MONTH`).
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import numpy as np

from imaging_tasks.errors import BadInput
from imaging_tasks.specialties import progression_specialty

DAYS_PER_MONTH = 365.25 / 12
WINDOW_DAYS = 90
TIME_FEATURES = ("days_since_first", "interval_days")
# The scores the cohort and the baselines know, with their valid ranges (ADAS-Cog: the 11-item 0-70 scale).
SCORE_RANGES: dict[str, tuple[float, float]] = {"MMSE": (0.0, 30.0), "CDR_SB": (0.0, 18.0),
                                                "ADAS_Cog": (0.0, 70.0)}
_ALIASES = {re.sub(r"[^a-z0-9]", "", k.lower()): k for k in SCORE_RANGES} | {"adascog11": "ADAS_Cog",
                                                                            "cdrsumofboxes": "CDR_SB"}
SESSION_COLUMNS = ("patient_id", "study_id", "study_date", "roi", "metric", "value")
SCORE_COLUMNS = ("patient_id", "date", "score", "value")
UPLOAD_COLUMNS = ("patient_id", "date", "score", "value")

# studies joined with roi_features: the session rows of one specialty, straight from the warehouse
SESSIONS_SQL = ("SELECT s.patient_id, s.study_id, s.study_date, r.atlas, r.roi, r.metric, r.value, r.unit "
                "FROM studies s JOIN roi_features r ON r.specialty = s.specialty AND r.study_id = s.study_id "
                "WHERE s.specialty = ? ORDER BY s.patient_id, s.study_date, s.study_id")


class NotEnoughSessions(BadInput):
    """The patient has fewer dated sessions than the model needs (``min_sessions``): no prediction, no guess."""

    def __init__(self, patient_id: str, sessions: int, min_sessions: int, undated: int = 0):
        extra = (f" ({undated} more have no study date: de-identify with the retain-modified-dates option to use "
                 "them)") if undated else ""
        super().__init__("not_enough_sessions",
                         f"patient {patient_id} has {sessions} dated session(s){extra}; the model needs at least "
                         f"{min_sessions} ('min_sessions' in its JSON): predict again after the next session")
        self.patient_id, self.sessions, self.min_sessions = patient_id, sessions, min_sessions


def canonical_score(name: Any) -> str:
    """``MMSE``, ``CDR_SB``, ``ADAS_Cog`` for their usual spellings (``CDR-SB``, ``ADAS-Cog 11`` ...); other names
    are kept as given (stripped), so a site's own scores pass through."""
    text = str(name).strip()
    return _ALIASES.get(re.sub(r"[^a-z0-9]", "", text.lower()), text)


# ------------------------------------------------------------------------------------------- feature names

@dataclass(frozen=True)
class Feature:
    """One parsed feature name: ``kind`` is ``roi``, ``score`` or ``time``."""

    name: str
    kind: str
    atlas: str | None = None
    roi: str = ""
    metric: str = ""
    score: str = ""


def parse_feature(name: Any) -> Feature:
    """The parsed feature name; ``ValueError`` saying what the accepted forms are."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"feature {name!r} is not a name (e.g. 'roi:hippocampus:gm_volume', 'score:MMSE', "
                         f"{', '.join(map(repr, TIME_FEATURES))})")
    if name in TIME_FEATURES:
        return Feature(name, "time")
    parts = name.split(":")
    if parts[0] == "score" and len(parts) == 2 and parts[1]:
        if canonical_score(parts[1]) != parts[1]:
            raise ValueError(f"feature {name!r}: write the score as 'score:{canonical_score(parts[1])}'")
        return Feature(name, "score", score=parts[1])
    if parts[0] == "roi" and len(parts) in (3, 4) and all(parts[1:]):
        if len(parts) == 3:
            return Feature(name, "roi", None, parts[1], parts[2])
        return Feature(name, "roi", parts[1], parts[2], parts[3])
    raise ValueError(f"feature {name!r} is not one of 'roi:<roi>:<metric>', 'roi:<atlas>:<roi>:<metric>', "
                     f"'score:<name>', {', '.join(map(repr, TIME_FEATURES))}")


# ------------------------------------------------------------------------------------------------ sequences

@dataclass(frozen=True)
class ScoreObservation:
    day: int  # days since the patient's first session (negative before it)
    date: str  # shifted YYYYMMDD
    score: str  # canonical name
    value: float


@dataclass(frozen=True)
class Session:
    study_id: str
    date: str  # shifted YYYYMMDD
    day: int  # days since the patient's first session
    interval_days: int  # since the previous session; 0 for the first
    measures: Mapping[tuple[str, str, str], float]  # (atlas, roi, metric) -> value


@dataclass(frozen=True)
class PatientSequence:
    """One patient's dated sessions in time order (ties by study_id) and every score observation."""

    patient_id: str
    first_date: str  # of the patient's first session: day 0
    sessions: tuple[Session, ...]
    scores: tuple[ScoreObservation, ...] = ()  # by day
    undated_sessions: int = 0
    history: tuple[Session, ...] = field(default=(), compare=False, repr=False)  # all sessions, when a prefix
    _matched: dict = field(default_factory=dict, compare=False, repr=False)  # window_days -> matches of history

    def prefix(self, n: int) -> "PatientSequence":
        """The first ``n`` sessions, for predicting from the n-th (training samples, back-testing).  Every score
        observation is kept: the later ones are the targets; the inputs are only those belonging to the kept
        sessions.  Which session an observation belongs to is still decided over the whole history, so it does
        not move to another session when later sessions are cut."""
        return replace(self, sessions=self.sessions[:n], history=self.history or self.sessions,
                       _matched=self._matched)

    def matched_scores(self, window_days: int = WINDOW_DAYS) -> list[dict[str, ScoreObservation]]:
        """Per session, the score observations that belong to it (see the module docstring), by score name."""
        if window_days not in self._matched:
            self._matched[window_days] = _match(self.history or self.sessions, self.scores, window_days)
        return self._matched[window_days][:len(self.sessions)]


def _match(sessions: tuple[Session, ...], scores: tuple[ScoreObservation, ...],
           window_days: int) -> list[dict[str, ScoreObservation]]:
    out: list[dict[str, ScoreObservation]] = [{} for _ in sessions]
    if not sessions:
        return out
    days = np.array([s.day for s in sessions])
    for obs in scores:
        gaps = np.abs(days - obs.day)
        best = int(np.argmin(gaps))  # first minimum: the earlier session on a tie
        if gaps[best] > window_days:
            continue
        held = out[best].get(obs.score)
        if held is None or abs(obs.day - days[best]) <= abs(held.day - days[best]):
            out[best][obs.score] = obs  # nearer wins; on a tie the later (scores come by day)
    return out


def records(table: Any, what: str = "rows") -> list[dict]:
    """Rows as dicts from a list of mappings, a pyarrow Table, a DuckDB relation or a pandas DataFrame."""
    if table is None:
        return []
    if hasattr(table, "to_pylist"):  # pyarrow
        return table.to_pylist()
    if hasattr(table, "fetchall") and hasattr(table, "columns"):  # DuckDB relation
        cols = list(table.columns)
        return [dict(zip(cols, row)) for row in table.fetchall()]
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas
        return table.to_dict("records")
    out = list(table)
    if out and not all(isinstance(r, Mapping) for r in out):
        raise BadInput("bad_rows", f"{what} must be mappings (dicts), a pyarrow Table, a DuckDB relation or a "
                                   "pandas DataFrame")
    return [dict(r) for r in out]


def warehouse_session_rows(con, specialty: str | None = None) -> list[dict]:
    """The session rows of a DuckDB warehouse connection (studies joined with roi_features) of ``specialty``
    (default: :func:`progression_specialty`)."""
    specialty = specialty or progression_specialty()
    cursor = con.execute(SESSIONS_SQL, [specialty])
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


def read_session_rows(uri: Any, specialty: str | None = None) -> list[dict]:
    """Session rows from a DuckDB warehouse file (``*.duckdb`` or ``duckdb://PATH``, opened read-only, joined by
    :data:`SESSIONS_SQL`), or a Parquet or CSV export of such rows (told apart by content)."""
    from imaging_tasks import storage

    text = str(uri)
    if text.startswith("duckdb://") or text.endswith(".duckdb"):
        import duckdb

        path = text.removeprefix("duckdb://")
        if not storage.exists(path):
            raise BadInput("bad_rows", f"warehouse {path} not found: give the DuckDB file the pipeline loads into")
        con = duckdb.connect(path, read_only=True)
        try:
            return warehouse_session_rows(con, specialty)
        finally:
            con.close()
    return read_table_rows(uri, "session rows")


def read_table_rows(uri: Any, what: str = "rows") -> list[dict]:
    """The rows of a Parquet or UTF-8 CSV file at a path or URI (:func:`table_rows`)."""
    from imaging_tasks import storage

    return table_rows(storage.read_bytes(uri), what)


def table_rows(data: bytes, what: str = "rows") -> list[dict]:
    """The rows of a Parquet or UTF-8 CSV file's bytes (told apart by content: Parquet starts with ``PAR1``); CSV
    values come as text, which :func:`build_sequences` parses."""
    if data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    try:
        return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    except UnicodeDecodeError:
        raise BadInput("bad_rows", f"the {what} file is neither Parquet nor UTF-8 CSV: export it as one of them") \
            from None


def parse_date(value: Any) -> dt.date | None:
    """A date from ``YYYYMMDD``, ``YYYY-MM-DD`` (a time after it is ignored), a date or datetime; None when it is
    empty or not a date."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if hasattr(value, "to_pydatetime"):  # pandas Timestamp
        return value.to_pydatetime().date()
    m = re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})(?:[T ].*)?", str(value).strip())
    if not m:
        return None
    try:
        return dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _need_columns(rows: list[dict], columns: tuple[str, ...], what: str, how: str) -> None:
    if rows:
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise BadInput("bad_rows", f"{what} lack column(s) {', '.join(missing)} (they have "
                                       f"{', '.join(map(str, rows[0])) or 'none'}): {how}")


def build_sequences(session_rows: Any, score_rows: Any = None) -> dict[str, PatientSequence]:
    """Per patient pseudonym, the :class:`PatientSequence` of warehouse-shaped rows (see the module docstring).

    Rows with no value (null, NaN) are missing measurements.  A measurement given twice for one session with
    different values, or score rows naming none of the session patients (raw IDs instead of pseudonyms), are
    refused with :class:`BadInput`.
    """
    rows = records(session_rows, "session rows")
    _need_columns(rows, SESSION_COLUMNS, "session rows", "join studies with roi_features (SESSIONS_SQL)")
    studies: dict[str, dict[str, Any]] = {}  # patient -> study -> [date, measures]
    for row in rows:
        pid, sid = str(row["patient_id"]), str(row["study_id"])
        entry = studies.setdefault(pid, {}).setdefault(sid, [parse_date(row["study_date"]), {}])
        value = _number(row["value"])
        if value is None:
            continue
        key = (str(row.get("atlas") or ""), str(row["roi"]), str(row["metric"]))
        held = entry[1].get(key)
        if held is not None and not math.isclose(held, value, rel_tol=1e-9, abs_tol=1e-12):
            raise BadInput("bad_rows", f"study {sid} has two values for {key[1]}/{key[2]} (atlas {key[0] or '-'}): "
                                       f"{held} and {value}; keep one row per study, atlas, ROI and metric")
        entry[1][key] = value

    score_list = records(score_rows, "score rows")
    _need_columns(score_list, SCORE_COLUMNS, "score rows", "give patient_id (pseudonym), date (shifted), score, "
                                                           "value; pseudonymise an upload with read_scores_upload")
    by_patient: dict[str, list[tuple[dt.date, str, float]]] = {}
    for i, row in enumerate(score_list):
        when, value = parse_date(row["date"]), _number(row["value"])
        if when is None or value is None:
            raise BadInput("bad_scores", f"score row {i + 1} has no usable date or value (dates YYYYMMDD or "
                                         "YYYY-MM-DD, values numbers): fix or drop that row")
        by_patient.setdefault(str(row["patient_id"]), []).append((when, canonical_score(row["score"]), value))
    if score_list and not set(by_patient) & set(studies):
        raise BadInput("bad_scores", "no score row names a patient of the session rows: the scores' patient_id must "
                                     "be the keyed pseudonym (read_scores_upload with the de-identification key)")

    out: dict[str, PatientSequence] = {}
    for pid in sorted(studies):
        dated = sorted(((d, sid, m) for sid, (d, m) in studies[pid].items() if d is not None),
                       key=lambda t: (t[0], t[1]))
        undated = len(studies[pid]) - len(dated)
        if not dated:
            out[pid] = PatientSequence(pid, "", (), (), undated)
            continue
        first = dated[0][0]
        sessions, previous = [], None
        for when, sid, measures in dated:
            day = (when - first).days
            sessions.append(Session(sid, when.strftime("%Y%m%d"), day, 0 if previous is None else day - previous,
                                    dict(measures)))
            previous = day
        obs = sorted((ScoreObservation((when - first).days, when.strftime("%Y%m%d"), name, value)
                      for when, name, value in by_patient.get(pid, ())), key=lambda o: (o.day, o.score))
        out[pid] = PatientSequence(pid, first.strftime("%Y%m%d"), tuple(sessions), tuple(obs), undated)
    return out


# ------------------------------------------------------------------------------------------------ matrices

def raw_matrix(seq: PatientSequence, features: Iterable[str], window_days: int = WINDOW_DAYS) -> np.ndarray:
    """(T, F) float64 of the sessions' own values, NaN where a session has none (before any filling)."""
    parsed = [parse_feature(f) for f in features]
    matched = seq.matched_scores(window_days)
    out = np.full((len(seq.sessions), len(parsed)), np.nan)
    for t, session in enumerate(seq.sessions):
        for j, feat in enumerate(parsed):
            if feat.kind == "time":
                out[t, j] = session.day if feat.name == "days_since_first" else session.interval_days
            elif feat.kind == "score":
                obs = matched[t].get(feat.score)
                if obs is not None:
                    out[t, j] = obs.value
            else:
                out[t, j] = _roi_value(session, feat)
    return out


def _roi_value(session: Session, feat: Feature) -> float:
    found = {v for (atlas, roi, metric), v in session.measures.items()
             if roi == feat.roi and metric == feat.metric and (feat.atlas is None or atlas == feat.atlas)}
    if not found:
        return math.nan
    if max(found) - min(found) > 1e-9 * max(1.0, abs(max(found))):
        atlases = sorted({a for (a, r, m) in session.measures if r == feat.roi and m == feat.metric})
        raise BadInput("ambiguous_feature", f"study {session.study_id}: atlases {', '.join(atlases)} give different "
                                            f"values for {feat.roi}/{feat.metric}; name the atlas in the feature: "
                                            f"'roi:{atlases[0]}:{feat.roi}:{feat.metric}'")
    return found.pop()


def fill(matrix: np.ndarray) -> np.ndarray:
    """Carry each column's last value forward, then its first value backward (see the module docstring)."""
    out = matrix.copy()
    for j in range(out.shape[1]):
        col = out[:, j]
        seen = np.flatnonzero(~np.isnan(col))
        if not len(seen):
            continue
        idx = np.maximum.accumulate(np.where(~np.isnan(col), np.arange(len(col)), -1))
        col[:] = np.where(idx >= 0, col[np.maximum(idx, 0)], col[seen[0]])
    return out


def feature_matrix(seq: PatientSequence, features: Iterable[str], *, min_sessions: int,
                   max_sessions: int | None = None, window_days: int = WINDOW_DAYS) -> np.ndarray:
    """(T, F) float32 the model is fed: every session filled (module docstring), then the last ``max_sessions``.

    :class:`NotEnoughSessions` below ``min_sessions``; ``BadInput("missing_features")`` when a feature has no
    value at any session.
    """
    features = list(features)
    if len(seq.sessions) < min_sessions:
        raise NotEnoughSessions(seq.patient_id, len(seq.sessions), min_sessions, seq.undated_sessions)
    matrix = raw_matrix(seq, features, window_days)
    missing = [f for j, f in enumerate(features) if np.isnan(matrix[:, j]).all()]
    if missing:
        raise BadInput("missing_features", f"patient {seq.patient_id} has no value for {', '.join(missing)} at any of "
                                           f"its {len(matrix)} session(s): the model needs them (load the ROI "
                                           "features / cognitive scores for this patient, or use a model without "
                                           "them)")
    matrix = fill(matrix)  # before the cut: a score of an older session is still the latest one later on
    if max_sessions is not None and len(matrix) > max_sessions:
        matrix = matrix[-max_sessions:]
    return matrix.astype(np.float32)


def longitudinal_table(sequences: Mapping[str, PatientSequence], features: Iterable[str], *,
                       window_days: int = WINDOW_DAYS) -> list[dict]:
    """One row per session: patient_id, study_id, study_date, days_since_first, interval_days and each feature
    as the model would see it (filled; None where the patient has no value at all).  For inspection and export."""
    features = list(features)
    rows = []
    for pid, seq in sequences.items():
        if not seq.sessions:
            continue
        matrix = fill(raw_matrix(seq, features, window_days))
        for session, values in zip(seq.sessions, matrix):
            rows.append({"patient_id": pid, "study_id": session.study_id, "study_date": session.date,
                         "days_since_first": session.day, "interval_days": session.interval_days,
                         **{f: (None if np.isnan(v) else float(v)) for f, v in zip(features, values)}})
    return rows


# ------------------------------------------------------------------------------------------------ uploads

def pseudonymise_scores(rows: Any, key: bytes) -> list[dict]:
    """Score rows with raw patient IDs and real dates -> ``{patient_id, date, score, value}`` with the patient's
    keyed pseudonym and shifted date, exactly as de-identification treats that patient's studies.

    The pseudonym is ``pseudo_id(key, PatientID, "patient")`` and the shift ``date_shift_days(key, PatientID)``
    (the DICOM de-identifier's own functions, applied with its ``shift_date``), PatientID stripped as it strips
    it.  The raw IDs and dates stay inside this function: errors name row numbers, never values.
    """
    from imaging_tasks.deid.pseudonym import date_shift_days, pseudo_id
    from imaging_tasks.deid.rules import shift_date

    table = records(rows, "score upload")
    if table:
        lower = {str(k).strip().lower(): k for k in table[0]}
        missing = [c for c in UPLOAD_COLUMNS if c not in lower]
        if missing:
            raise BadInput("bad_scores", f"the score upload lacks column(s) {', '.join(missing)}: it needs "
                                         f"{', '.join(UPLOAD_COLUMNS)} (patient_id as in the DICOM PatientID, date "
                                         "YYYYMMDD or YYYY-MM-DD, score e.g. MMSE / CDR_SB / ADAS_Cog, value)")
    out, shifts = [], {}
    for i, row in enumerate(table):
        get = {str(k).strip().lower(): v for k, v in row.items()}
        raw = "" if get["patient_id"] is None else str(get["patient_id"]).strip()
        if isinstance(get["patient_id"], float) and get["patient_id"].is_integer():
            raw = str(int(get["patient_id"]))  # a numeric ID column read as floats
        when, value, score = parse_date(get["date"]), _number(get["value"]), canonical_score(get["score"] or "")
        problem = ("no patient_id" if not raw else "no usable date (YYYYMMDD or YYYY-MM-DD)" if when is None
                   else "no score name" if not score else "a value that is not a number" if value is None else None)
        if problem:
            raise BadInput("bad_scores", f"score upload row {i + 1} has {problem}: fix or drop that row")
        low_high = SCORE_RANGES.get(score)
        if low_high and not low_high[0] <= value <= low_high[1]:
            raise BadInput("bad_scores", f"score upload row {i + 1}: {score} {value} is outside its range "
                                         f"{low_high[0]:g}-{low_high[1]:g}: fix that row")
        if raw not in shifts:
            shifts[raw] = (pseudo_id(key, raw, "patient"), date_shift_days(key, raw))
        pseudonym, days = shifts[raw]
        out.append({"patient_id": pseudonym, "date": shift_date(when.strftime("%Y%m%d"), days), "score": score,
                    "value": value})
    return out


def read_scores_upload(uri: Any, key: bytes) -> list[dict]:
    """A CSV or Parquet upload (by content: Parquet starts with ``PAR1``) at a path or URI, pseudonymised
    (:func:`pseudonymise_scores`)."""
    return pseudonymise_scores(read_table_rows(uri, "score upload"), key)


def scores_upload_rows(data: bytes, key: bytes) -> list[dict]:
    """:func:`read_scores_upload` of an upload's bytes already read (to hash them, say)."""
    return pseudonymise_scores(table_rows(data, "score upload"), key)


__all__ = ["DAYS_PER_MONTH", "WINDOW_DAYS", "TIME_FEATURES", "SCORE_RANGES", "SESSIONS_SQL", "NotEnoughSessions",
           "Feature", "parse_feature", "canonical_score", "ScoreObservation", "Session", "PatientSequence",
           "build_sequences", "warehouse_session_rows", "read_session_rows", "read_table_rows", "table_rows", "raw_matrix", "fill",
           "feature_matrix", "longitudinal_table", "pseudonymise_scores", "read_scores_upload", "scores_upload_rows", "records",
           "parse_date"]
