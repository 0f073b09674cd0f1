"""The study record every step passes to the next (and every task through XCom): declared once, built once.

It carries pseudonyms, lake URIs, counts and a status, never image data, raw paths or identifiers (the raw file
list stays in the manifest under ``work/``, a PHI zone).  ``study`` is the keyed pseudonym of the study (``S…``),
``patient`` that of the patient (``P…``).  Steps add what they produced (``anonymized``, ``derived``,
``metrics``...) through :func:`with_facts`, and say a study goes no further with :func:`with_status`.
"""
from __future__ import annotations

from typing import Any, Literal, TypedDict

Status = Literal["ok", "quarantined", "skipped", "failed"]
STATUSES = ("ok", "quarantined", "skipped", "failed")


class StudyRecord(TypedDict, total=False):
    specialty: str  # required
    study: str  # required: S…, keyed pseudonym of StudyInstanceUID (or of the slide's content)
    patient: str  # required: P…
    fingerprint: str  # required: of the raw inputs; new inputs make the study due again
    status: Status  # required: "ok" goes on; "quarantined" / "skipped" / "failed" go no further
    manifest: str  # index: URI of the raw-input manifest (work/, PHI zone)
    n_files: int
    modalities: dict[str, int]
    anonymized: str  # de-identification: URI of the de-identified copies
    n_instances: int
    n_quarantined: int
    reason: str  # why a study is quarantined (a reason code) or failed (the exception's class name)
    failed_step: str  # the step a study failed at, after its task's retries (its ledger row has the rest)
    steps_done: list[str]  # a multi-step chain's finished steps
    derived: str  # the published results (last step)
    metrics: dict[str, Any]
    plan: str  # per-slide chain: the tile plan, its checksum and tile count
    plan_sha256: str
    n_tiles: int
    features: str  # the tile-feature parts, the device that computed them, the encoder's name (or None)
    device: str
    encoder: str | None


REQUIRED = ("specialty", "study", "patient", "fingerprint", "status")

JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "StudyRecord",
    "type": "object",
    "required": list(REQUIRED),
    "properties": {
        "specialty": {"type": "string"}, "study": {"type": "string", "pattern": "^S[A-Z0-9]+$"},
        "patient": {"type": "string", "pattern": "^P[A-Z0-9]+$"}, "fingerprint": {"type": "string"},
        "status": {"enum": list(STATUSES)}, "manifest": {"type": "string"}, "n_files": {"type": "integer"},
        "modalities": {"type": "object", "additionalProperties": {"type": "integer"}},
        "anonymized": {"type": "string"}, "n_instances": {"type": "integer"}, "n_quarantined": {"type": "integer"},
        "reason": {"type": "string"}, "failed_step": {"type": "string"}, "steps_done": {"type": "array", "items": {"type": "string"}},
        "derived": {"type": "string"}, "metrics": {"type": "object"}, "plan": {"type": "string"},
        "plan_sha256": {"type": "string"}, "n_tiles": {"type": "integer"}, "features": {"type": "string"},
        "device": {"type": "string"}, "encoder": {"type": ["string", "null"]},
    },
    "additionalProperties": False,
}


def study_record(*, specialty: str, study: str, patient: str, fingerprint: str, status: Status = "ok",
                 **facts: Any) -> StudyRecord:
    """The one constructor: the required fields, then any of the declared optional ones."""
    unknown = set(facts) - set(StudyRecord.__annotations__)
    if unknown:
        raise TypeError(f"StudyRecord has no field(s) {sorted(unknown)}; declare them in imaging_tasks.contracts")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    return StudyRecord(specialty=specialty, study=study, patient=patient, fingerprint=fingerprint, status=status,
                       **facts)


def with_facts(record: StudyRecord, **facts: Any) -> StudyRecord:
    """The record with what a step produced added (or replaced)."""
    return study_record(**{**record, **facts})


def with_status(record: StudyRecord, status: Status, **facts: Any) -> StudyRecord:
    """The record of a study that goes no further (``quarantined``, ``skipped``), or goes on again (``ok``)."""
    return with_facts(record, status=status, **facts)


def is_ok(record: StudyRecord | None) -> bool:
    """Whether the study goes on to the next step."""
    return bool(record) and record.get("status") == "ok"
