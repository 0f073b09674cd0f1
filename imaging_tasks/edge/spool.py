"""The receiver's durable local spool: what was acknowledged and is not in the landing bucket yet.

Layout under the spool directory::

    incoming/<entry>.dcm    the bytes to upload (DICOM Part 10)
    incoming/<entry>.json   its sidecar: where it goes, specialty, study folder, received time, calling AE, sha256
    state/                  study-completion journals (imaging_tasks.edge.completion)
    quarantine/             edge mode's refused instances, when no --quarantine is given
    .lock                   held by the running receiver (a second one on the same spool is refused)

Why it is safe to acknowledge an instance once :meth:`Spool.put` returned: both files are written under
temporary names, fsync'd, renamed into place (``.dcm`` first, the sidecar last) and the folder fsync'd; the
sidecar is the commit mark.  A ``.dcm`` without a sidecar was never acknowledged (the process died before the
answer) and is removed when the receiver starts; everything with a sidecar is uploaded, however the last run
ended (``kill -9`` included).

``<entry>`` is ``<sha256 of the SOP Instance UID>[:32]-<sha256 of the bytes>[:16]``: a resend of the same
instance with the same bytes lands on the same entry (idempotent), a corrected resend (same UID, new bytes) gets
an entry of its own so it never overwrites one that was acknowledged and not uploaded yet; the uploader sends
them oldest first, so the newest version ends up in the bucket.  Names are hashes: no UID, no PHI on disk names.

:meth:`Spool.put` and :meth:`Spool.remove` run their callbacks under one lock, so the completion tracker sees
"received" and "uploaded" of one entry in the order they happened.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from imaging_tasks.errors import ConfigError

log = logging.getLogger(__name__)
TMP_SUFFIX = ".spool-tmp"


def uid_hash(uid: str, length: int = 16) -> str:
    """The name an identifier is known by outside this host: sha256 hex (prefix).  Object names are listed,
    logged and sent in bucket notifications; a UID there would be an identifier in plain text."""
    return hashlib.sha256(uid.strip().encode("ascii", "replace")).hexdigest()[:length]


@dataclass(frozen=True)
class Entry:
    """One acknowledged instance and where it goes: ``<landing>/<specialty>/<study_folder>/<series_folder>/
    <object_name>``.  Every field is free of PHI (hashes, pseudonymous UIDs, AE titles, counts)."""

    name: str
    specialty: str
    study_folder: str
    series_folder: str
    object_name: str
    received_at: float  # wall clock (seconds since the epoch): survives a restart
    calling_ae: str
    sha256: str
    size: int
    deidentified: bool = False

    @property
    def key(self) -> str:
        return f"{self.specialty}/{self.study_folder}/{self.series_folder}/{self.object_name}"

    @property
    def study(self) -> tuple[str, str]:
        return self.specialty, self.study_folder


def entry_name(sop_uid: str, sha256: str) -> str:
    return f"{uid_hash(sop_uid, 32)}-{sha256[:16]}"


def durable_write(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all, on disk when this returns (temp file, fsync, rename, fsync of
    the folder)."""
    tmp = _write_temp(path, data)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _write_temp(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename or a new name in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.incoming = self.root / "incoming"
        self.state = self.root / "state"
        self._lock = threading.Lock()
        self._lock_fh = None

    # ------------------------------------------------------------------ life cycle
    def open(self) -> dict[str, int]:
        """Create the folders, take the spool's lock and clean up what a killed run left; the counts."""
        for folder in (self.incoming, self.state):
            folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise ConfigError(f"the spool {self.root} is in use by another receiver (its .lock is held): give each "
                              "receiver its own --spool directory") from None
        self._lock_fh = fh
        return self.recover()

    def close(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def recover(self) -> dict[str, int]:
        """Remove temporary files and instances never acknowledged (a ``.dcm`` without its sidecar)."""
        temps = unacknowledged = orphans = 0
        for path in self.incoming.iterdir():
            if path.name.endswith(TMP_SUFFIX):
                path.unlink(missing_ok=True)
                temps += 1
            elif path.suffix == ".dcm" and not path.with_suffix(".json").exists():
                path.unlink(missing_ok=True)
                unacknowledged += 1
            elif path.suffix == ".json" and not path.with_suffix(".dcm").exists():
                log.error("spool entry %s has a sidecar but no data (removed by hand?); its sidecar is dropped",
                          path.stem[:12])
                path.unlink(missing_ok=True)
                orphans += 1
        return {"temporary": temps, "unacknowledged": unacknowledged, "orphan_sidecars": orphans,
                "pending": len(self.pending())}

    # ------------------------------------------------------------------ entries
    def put(self, entry: Entry, data: bytes, on_stored: Callable[[Entry], None] | None = None) -> Entry:
        """Store ``data`` durably under ``entry`` (see the module docstring); ``on_stored`` runs under the lock once
        it is in place.  Raises OSError when the disk refuses (the caller must not acknowledge)."""
        if entry.sha256 != hashlib.sha256(data).hexdigest():
            raise ValueError("spool entry sha256 does not match its data")
        data_path = self.incoming / f"{entry.name}.dcm"
        side_path = self.incoming / f"{entry.name}.json"
        data_tmp = _write_temp(data_path, data)
        try:
            side_tmp = _write_temp(side_path, json.dumps(asdict(entry), sort_keys=True).encode())
        except BaseException:
            data_tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            os.replace(data_tmp, data_path)
            os.replace(side_tmp, side_path)
            fsync_path(self.incoming)
            if on_stored is not None:
                on_stored(entry)
        return entry

    def pending(self) -> list[Entry]:
        """Every committed entry, oldest first (unreadable sidecars are logged and skipped)."""
        out = []
        for side in self.incoming.glob("*.json"):
            entry = self._read_sidecar(side)
            if entry is not None:
                out.append(entry)
        return sorted(out, key=lambda e: (e.received_at, e.name))

    def _read_sidecar(self, side: Path) -> Entry | None:
        try:
            return Entry(**json.loads(side.read_bytes()))
        except FileNotFoundError:
            return None  # uploaded and removed meanwhile
        except (OSError, ValueError, TypeError) as exc:
            log.error("spool sidecar %s is unreadable (%s); it is left for inspection", side.stem[:12],
                      type(exc).__name__)
            return None

    def read(self, entry: Entry) -> bytes:
        return (self.incoming / f"{entry.name}.dcm").read_bytes()

    def remove(self, entry: Entry, on_removed: Callable[[Entry], None] | None = None) -> bool:
        """Drop an uploaded entry; ``on_removed`` runs first, under the lock (so it is journaled before the spool
        forgets it).  False when the entry is not there any more."""
        side_path = self.incoming / f"{entry.name}.json"
        with self._lock:
            if not side_path.exists():
                return False
            if on_removed is not None:
                on_removed(entry)
            side_path.unlink(missing_ok=True)  # the commit mark goes first: a crash here leaves an unacked .dcm
            (self.incoming / f"{entry.name}.dcm").unlink(missing_ok=True)
            fsync_path(self.incoming)
        return True

    def count(self) -> int:
        return sum(1 for _ in self.incoming.glob("*.json"))
