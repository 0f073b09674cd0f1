"""The lake: where every step of every specialty writes, documented once.

Layout under a lake root (a ``file://``, ``s3://`` or ``gs://`` URI; see :mod:`imaging_tasks.storage`)::

    anonymized/<specialty>/<P…>/<S…>/<series uid>/<sop uid>.dcm   de-identified copies + _DEID.json (instance list)
    derived/<specialty>/<P…>/<S…>/...                            results.json, tables, QC PNGs, _MANIFEST.json (last)
    quarantine/<specialty>/<sha256[:16]>/input.* + reason.json     offending input and why (PHI zone)
    work/<specialty>/studies/<S…>.json                            study manifests pointing at raw inputs (PHI zone)
    work/<specialty>/steps/<S…>/<step>/...                        outputs of a multi-step chain's earlier steps
    work/<specialty>/plans|features/<S…>/...                      each slide's tile plan and feature parts
    runs/<specialty>/<run id>/<task>.<map index>.<S…>.json        lineage records (processing_runs)
    ledger/<specialty>/studies/<S…>.json                          each study's state and history (ledger table)
    ledger/<specialty>/to_load/<S…>.json                          present until that state reached the warehouse

``P…``/``S…`` are keyed pseudonyms of PatientID / StudyInstanceUID.  A study's ``derived/`` folder is complete
when its ``_MANIFEST.json`` exists: it is written last, and local files are written under a temporary name and
renamed, so readers never see half-written outputs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from imaging_tasks import storage
from imaging_tasks.ledger import Ledger


def safe_name(text: str) -> str:
    """A run id (or any text) as one path segment."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


@dataclass(frozen=True)
class Lake:
    """The lake layout of one specialty."""

    root: Any
    specialty: str

    def anonymized(self, patient: str, study: str):
        return storage.join(self.root, "anonymized", self.specialty, patient, study)

    def derived(self, patient: str, study: str):
        return storage.join(self.root, "derived", self.specialty, patient, study)

    def work(self, *parts: str):
        return storage.join(self.root, "work", self.specialty, *parts)

    def runs(self, run_id: str):
        return storage.join(self.root, "runs", self.specialty, safe_name(run_id))

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.root, self.specialty)
