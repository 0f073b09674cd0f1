"""One schema definition for every warehouse backend.

Each table has a natural key; loads are upserts on it, so a re-run or retry replaces rows instead of
adding duplicates.  Types are the portable subset: STRING, INT64, FLOAT64, BOOL, TIMESTAMP, JSON.

Every table also has ``loaded_at`` (TIMESTAMP), stamped by the warehouse at each upsert: the processing date a
row was (re)written.  BigQuery partitions every table by its day (see :attr:`Table.partition_column`) and
clusters by :attr:`Table.clustering` (specialty, modality where present, then the study).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # STRING | INT64 | FLOAT64 | BOOL | TIMESTAMP | JSON
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class Table:
    name: str
    key: tuple[str, ...]
    columns: tuple[Column, ...]
    description: str = ""

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def partition_column(self) -> str:
        """TIMESTAMP column whose day partitions the table in BigQuery: when the row was (re)loaded."""
        return LOADED_AT

    @property
    def clustering(self) -> tuple[str, ...]:
        """BigQuery clustering columns: specialty and modality where the table has them, then the study
        (what MERGE keys and scope replacement filter on), or the patient in a per-patient table; at most four."""
        names = set(self.column_names)
        study = "study_id" if "study_id" in names else "patient_id"
        return tuple(c for c in ("specialty", "modality", study) if c in names)[:4]


LOADED_AT = "loaded_at"


def _c(name, type_, required=False, description=""):
    return Column(name, type_, required, description)


def _loaded_at() -> Column:
    # nullable so that it can be added to tables created before it existed; every load sets it
    return _c(LOADED_AT, "TIMESTAMP", False, "when the load step (re)wrote this row; BigQuery partitions by its day")


_TABLES: list[Table] = [
    Table("studies", ("specialty", "study_id"), (
        _c("specialty", "STRING", True), _c("study_id", "STRING", True, "keyed pseudonym of StudyInstanceUID"),
        _c("patient_id", "STRING", True, "keyed pseudonym of PatientID"), _c("study_uid", "STRING", False, "new UID"),
        _c("study_date", "STRING", False, "shifted per patient"), _c("modalities", "JSON"),
        _c("n_series", "INT64"), _c("n_instances", "INT64"), _c("anonymized_uri", "STRING"),
        _c("derived_uri", "STRING"), _c("status", "STRING"), _c("demo_key", "BOOL"), _c("updated_at", "TIMESTAMP"),
    ), "one row per study (slide, session)"),
    Table("series", ("specialty", "series_uid"), (
        _c("specialty", "STRING", True), _c("series_uid", "STRING", True), _c("study_id", "STRING", True),
        _c("modality", "STRING"), _c("series_number", "INT64"), _c("series_description", "STRING"),
        _c("n_instances", "INT64"),
    )),
    Table("instances", ("specialty", "sop_uid"), (
        _c("specialty", "STRING", True), _c("sop_uid", "STRING", True), _c("series_uid", "STRING"),
        _c("study_id", "STRING", True), _c("sop_class_uid", "STRING"), _c("modality", "STRING"),
        _c("uri", "STRING"), _c("sha256", "STRING"), _c("bytes", "INT64"), _c("header", "JSON"),
    ), "de-identified header metadata per file"),
    Table("results", ("specialty", "study_id", "metric"), (
        _c("specialty", "STRING", True), _c("study_id", "STRING", True), _c("metric", "STRING", True),
        _c("value", "FLOAT64"), _c("unit", "STRING"), _c("run_id", "STRING"), _c("code_version", "STRING"),
    ), "one row per study metric"),
    Table("findings", ("specialty", "study_id", "kind", "finding_index"), (
        _c("specialty", "STRING", True), _c("study_id", "STRING", True), _c("kind", "STRING", True),
        _c("finding_index", "INT64", True), _c("properties", "JSON"),
    ), "per-lesion / per-cluster / per-tile-summary rows"),
    Table("roi_features", ("specialty", "study_id", "atlas", "roi", "metric"), (
        _c("specialty", "STRING", True), _c("study_id", "STRING", True),
        _c("atlas", "STRING", True, "atlas the ROI belongs to (a built-in name or the bring-your-own atlas's name)"),
        _c("roi", "STRING", True, "ROI label name; 'whole_brain' for whole-brain values"),
        _c("metric", "STRING", True), _c("value", "FLOAT64"), _c("unit", "STRING"),
    ), "per-ROI features of a study (neuroimaging: GM volume, SUVR, normalised T1 per atlas ROI)"),
    Table("quarantine", ("specialty", "input_sha256"), (
        _c("specialty", "STRING", True), _c("input_sha256", "STRING", True), _c("stage", "STRING"),
        _c("reason", "STRING"), _c("message", "STRING"), _c("quarantine_uri", "STRING"), _c("input_bytes", "INT64"),
        _c("quarantined_at", "TIMESTAMP"),
    ), "inputs set aside with the reason; the file itself is under quarantine_uri"),
    Table("processing_runs", ("dag_id", "run_id", "task_id", "map_index", "study_id"), (
        _c("dag_id", "STRING", True), _c("run_id", "STRING", True), _c("task_id", "STRING", True),
        _c("map_index", "INT64", True), _c("study_id", "STRING", True), _c("specialty", "STRING"),
        _c("inputs", "JSON", False, "[{uri, sha256}]"), _c("outputs", "JSON", False, "[{uri, sha256}]"),
        _c("code_version", "STRING"), _c("device", "STRING"), _c("started_at", "TIMESTAMP"),
        _c("ended_at", "TIMESTAMP"), _c("duration_s", "FLOAT64"), _c("status", "STRING"),
    ), "lineage: what each task read and wrote, with checksums, code version, device and timings"),
    Table("cognitive_scores", ("specialty", "patient_id", "score", "date"), (
        _c("specialty", "STRING", True, "the specialty whose sessions the scores go with"), _c("patient_id", "STRING", True, "keyed pseudonym of PatientID (the key that made the imaging's)"),
        _c("score", "STRING", True, "MMSE, CDR_SB, ADAS_Cog, ..."),
        _c("date", "STRING", True, "assessment date, shifted per patient like the studies (YYYYMMDD)"),
        _c("value", "FLOAT64"), _c("source_sha256", "STRING", False, "of the upload the row came from"),
    ), "cognitive scores, pseudonymised from uploads (imaging_tasks.progression.features.read_scores_upload)"),
    Table("predictions", ("specialty", "patient_id", "model", "model_version", "horizon_months", "score"), (
        _c("specialty", "STRING", True), _c("patient_id", "STRING", True, "keyed pseudonym of PatientID"),
        _c("model", "STRING", True, "the model's name (its JSON)"), _c("model_version", "STRING", True),
        _c("horizon_months", "INT64", True), _c("score", "STRING", True, "MMSE, CDR_SB, ADAS_Cog, ..."),
        _c("value", "FLOAT64", False, "predicted score at as_of_date + horizon"),
        _c("as_of_study_id", "STRING", False, "the patient's last session the prediction saw"),
        _c("as_of_date", "STRING", False, "its date (shifted per patient, YYYYMMDD)"),
        _c("target_date", "STRING", False, "as_of_date + horizon (shifted alike)"),
        _c("n_sessions", "INT64"), _c("model_sha256", "STRING", False, "the archive the prediction came from"),
        _c("run_id", "STRING"), _c("computed_at", "TIMESTAMP"),
    ), "progression predictions: the latest per patient, model, horizon and score"),
    Table("prediction_refusals", ("specialty", "patient_id", "model", "model_version"), (
        _c("specialty", "STRING", True), _c("patient_id", "STRING", True, "keyed pseudonym of PatientID"),
        _c("model", "STRING", True), _c("model_version", "STRING", True),
        _c("reason", "STRING", True, "not_enough_sessions, missing_features, ..."),
        _c("message", "STRING", False, "what the model lacked and when to expect a prediction"),
        _c("run_id", "STRING"), _c("computed_at", "TIMESTAMP"),
    ), "patients a progression model could not take, and why; looked at again when their data change"),
    Table("ledger", ("specialty", "study_id"), (
        _c("specialty", "STRING", True), _c("study_id", "STRING", True), _c("patient_id", "STRING"),
        _c("state", "STRING", True, "loaded | quarantined | failed (the states that reach the warehouse)"),
        _c("step", "STRING", False, "the step that set the state"), _c("reason", "STRING", False, "reason code"),
        _c("message", "STRING", False, "what was wrong and what to do"), _c("attempt", "INT64"),
        _c("fingerprint", "STRING", False, "of the raw inputs: new inputs make the study due again"),
        _c("code_version", "STRING"), _c("options_hash", "STRING", False, "of the processing options"),
        _c("run_id", "STRING", False, "the run that set the state"), _c("derived_uri", "STRING"),
        _c("updated_at", "TIMESTAMP"),
    ), "each study's state: loaded, quarantined (with the reason) or failed (step, reason, attempt)"),
]

TABLES: dict[str, Table] = {t.name: Table(t.name, t.key, (*t.columns, _loaded_at()), t.description) for t in _TABLES}


def prepare_rows(table: Table, rows, *, loaded_at) -> list[dict]:
    """Every column of every row, in schema order, ready for any backend.

    ``loaded_at`` is stamped where a row has none; rows missing a key column are refused; rows repeating a
    key keep the last one (what an upsert of them one by one would leave), so a MERGE never sees two source
    rows for one target row.
    """
    names = table.column_names
    out: dict[tuple, dict] = {}
    for row in rows:
        full = {n: row.get(n) for n in names}
        if full.get(LOADED_AT) is None:
            full[LOADED_AT] = loaded_at
        key = tuple(full[k] for k in table.key)
        if any(v is None for v in key):
            missing = [k for k in table.key if full[k] is None]
            raise ValueError(f"{table.name}: key column(s) {missing} missing in some rows; every row needs its key")
        out.pop(key, None)  # a later duplicate goes last, like a second upsert would
        out[key] = full
    return list(out.values())


def replaced_scopes(table: Table, prepared: list[dict], replace_scope: tuple[str, ...],
                    scopes=None) -> list[tuple]:
    """The scopes an upsert replaces: those of its rows plus any named in ``scopes``, sorted."""
    unknown = [k for k in replace_scope if k not in table.column_names]
    if unknown:
        raise ValueError(f"{table.name}: replace_scope column(s) {unknown} not in the table")
    if not replace_scope:
        if scopes:
            raise ValueError(f"{table.name}: scopes given without replace_scope")
        return []
    out = {tuple(row[k] for k in replace_scope) for row in prepared}
    for scope in scopes or ():
        scope = tuple(scope)
        if len(scope) != len(replace_scope) or any(v is None for v in scope):
            raise ValueError(f"{table.name}: scope {scope!r} does not match replace_scope {replace_scope}")
        out.add(scope)
    return sorted(out, key=repr)
