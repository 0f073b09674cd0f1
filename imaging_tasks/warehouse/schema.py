"""One schema definition for every warehouse backend.

Each table has a natural key; loads are upserts on it, so a re-run or retry replaces rows instead of
adding duplicates.  Types are the portable subset: STRING, INT64, FLOAT64, BOOL, TIMESTAMP, JSON.
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


def _c(name, type_, required=False, description=""):
    return Column(name, type_, required, description)


TABLES: dict[str, Table] = {t.name: t for t in [
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
]}
