"""The study ledger: one record per study saying how far it got, so that nothing is lost and nothing is loaded twice.

States, in order::

    arrived -> deidentified -> audited -> published -> loaded
                         \\-> quarantined (step, reason)      \\-> failed (step, reason, attempt)

*Done means loaded* (or quarantined with the same inputs): the index skips a study only then.  A study that
was published but never loaded (the run was killed, or another study failed the run) stays *pending* and the
next run's load step loads it, whichever run published it.  A failed study is retried by the next run.

The ledger lives in the lake, beside what it describes::

    ledger/<specialty>/studies/<study>.json   the current record of each study
    ledger/<specialty>/to_load/<study>.json   present while the study's latest state has not reached the warehouse

Writes are single objects (atomic on object stores; tmp + rename locally), ordered so that a kill between two
of them is repaired by the next run: a pending marker is written before the record that needs it and removed
only after the warehouse committed the study's rows.  Records carry pseudonyms, lake URIs, the input
fingerprint, code version and an options hash (an algorithm upgrade is told apart from a re-run), and
reason codes; never raw paths or identifiers.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

import imaging_tasks
from imaging_tasks import storage

STATES = ("arrived", "deidentified", "audited", "published", "loaded", "quarantined", "failed")
DONE = frozenset({"loaded", "quarantined"})  # nothing left to do for these inputs
PENDING = frozenset({"published", "quarantined", "failed"})  # states the warehouse must be told about
HISTORY = 20  # transitions kept per record


def options_hash(options: dict | None) -> str:
    """A short stable hash of the processing options a study was (or will be) processed with."""
    text = json.dumps(options or {}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


@dataclass(frozen=True)
class Ledger:
    """The ledger of one specialty under a lake root."""

    root: Any
    specialty: str

    # ------------------------------------------------------------------ locations
    def _record_uri(self, study: str):
        return storage.join(self.root, "ledger", self.specialty, "studies", f"{study}.json")

    def _pending_uri(self, study: str):
        return storage.join(self.root, "ledger", self.specialty, "to_load", f"{study}.json")

    # ------------------------------------------------------------------ reading
    def get(self, study: str) -> dict | None:
        uri = self._record_uri(study)
        return storage.read_json(uri) if storage.exists(uri) else None

    def is_done(self, record: dict | None, fingerprint: str, opts: str | None = None) -> bool:
        """Loaded or quarantined with these very inputs (and these options, when given)."""
        if not record or record.get("fingerprint") != fingerprint:
            return False
        if opts is not None and record.get("state") == "loaded" and record.get("options_hash") not in (None, opts):
            return False
        return record.get("state") in DONE

    def pending(self) -> list[dict]:
        """Every study whose latest state has not reached the warehouse yet (any run's), oldest first."""
        folder = storage.join(self.root, "ledger", self.specialty, "to_load")
        out = []
        for info in storage.list_objects(folder):
            if info.relpath.endswith(".json") and "/" not in info.relpath:
                record = self.get(info.relpath[:-5])
                if record is not None and record.get("state") in PENDING:
                    out.append(record)
                else:  # a stale marker (kill after a load, or its record was superseded): drop it
                    self._drop_pending(info.relpath[:-5])
        return sorted(out, key=lambda r: r.get("updated_at") or "")

    # ------------------------------------------------------------------ writing
    def mark(self, study: dict, state: str, *, step: str, run_id: str, reason: str | None = None,
             message: str | None = None, attempt: int | None = None, **facts: Any) -> dict:
        """Record that ``study`` (a study record: study, patient, fingerprint, ...) reached ``state`` at ``step``."""
        if state not in STATES:
            raise ValueError(f"unknown ledger state {state!r}; one of {', '.join(STATES)}")
        previous = self.get(study["study"]) or {}
        if study.get("fingerprint") and previous.get("fingerprint") not in (None, study["fingerprint"]):
            previous = {}  # new inputs: a new life for the record
        now = _now()
        record = {
            **{k: v for k, v in previous.items() if k != "history"},
            "specialty": self.specialty, "study": study["study"], "patient": study.get("patient"),
            "fingerprint": study.get("fingerprint") or previous.get("fingerprint"),
            "state": state, "step": step, "reason": reason, "message": message, "attempt": attempt,
            "run_id": run_id, "code_version": imaging_tasks.__version__, "updated_at": now,
            **{k: v for k, v in facts.items() if v is not None},
        }
        history = (previous.get("history") or [])[-(HISTORY - 1):]
        record["history"] = [*history, {"state": state, "step": step, "run_id": run_id, "at": now,
                                        **({"reason": reason} if reason else {}),
                                        **({"attempt": attempt} if attempt else {})}]
        self.ensure_pending(record)  # marker first: a kill before the record leaves one the next run drops or uses
        storage.write_json(self._record_uri(study["study"]), record)
        return record

    def ensure_pending(self, record: dict) -> None:
        """The pending marker of a record whose state the warehouse must still be told about (re-made by the index
        for a study published whose marker a concurrent load dropped)."""
        if record.get("state") in PENDING:
            storage.write_json(self._pending_uri(record["study"]), {"study": record["study"], "state": record["state"]})

    def mark_loaded(self, records: Iterable[dict], *, run_id: str) -> None:
        """After the warehouse committed: published studies become loaded; every marker is removed."""
        for record in records:
            if record.get("state") == "published":
                current = self.get(record["study"])
                if current and current.get("state") == "published" and \
                        current.get("fingerprint") == record.get("fingerprint"):
                    self.mark(current, "loaded", step="load", run_id=run_id)
            self._drop_pending(record["study"])

    def _drop_pending(self, study: str) -> None:
        storage.remove(self._pending_uri(study))


def warehouse_row(record: dict) -> dict:
    """The ``ledger`` table row of a record (the current state; the history stays in the lake)."""
    return {"specialty": record["specialty"], "study_id": record["study"], "patient_id": record.get("patient"),
            "state": record["state"], "step": record.get("step"), "reason": record.get("reason"),
            "message": record.get("message"), "attempt": record.get("attempt"),
            "fingerprint": record.get("fingerprint"), "code_version": record.get("code_version"),
            "options_hash": record.get("options_hash"), "run_id": record.get("run_id"),
            "derived_uri": record.get("derived_uri"), "updated_at": record.get("updated_at")}
