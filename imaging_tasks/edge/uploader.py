"""Drain the spool into the landing bucket, in the background, through :mod:`imaging_tasks.storage` (so
``file://``, ``s3://`` and ``gs://`` landings behave alike).

Object names.  Each instance goes to ``<landing>/<specialty>/<study>/<series>/<sop>.dcm`` where, in plain mode,
study, series and sop are ``sha256(UID)`` hex prefixes (16 digits) of the raw Study/Series/SOP Instance UIDs, and
in edge mode the pseudonymous UIDs the de-identifier gave the instance.  Why hashes and not the UIDs: object names
travel where file contents do not (listings, logs, bucket notifications, the Airflow UI); a hash names the same
folder for every instance of a study (the DAG's index groups them by their headers anyway) and is the same for a
resend, which is what makes uploads exactly-once by key, without saying anything about the patient.  The bytes
are not touched: in plain mode the object is the data set exactly as the sender sent it, behind a DICOM Part 10
file meta header (``event.encoded_dataset()``).

Failures.  Every storage error except a configuration one (missing bucket, access refused) means "not now": the
entry stays in the spool and the upload is tried again after an exponential backoff (``initial_backoff_s``
doubling up to ``max_backoff_s``, 30 s by default), oldest entry first.  A configuration error is logged as one,
with what to fix, and retried at the longest wait: the receiver keeps accepting into the spool meanwhile (an
acknowledged instance is never dropped).  An entry leaves the spool only after its object was written; a crash
between the two uploads it again on start, to the same key with the same bytes.
"""
from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from typing import Any, Callable

from imaging_tasks import retry, storage
from imaging_tasks.errors import ConfigError

from .spool import Entry, Spool

log = logging.getLogger(__name__)


class Backoff:
    """Waits of ``initial_s * 2**n`` seconds (three quarters fixed, a quarter random so many receivers do not
    retry in step), at most ``cap_s``; :meth:`reset` after a success."""

    def __init__(self, initial_s: float = 0.5, cap_s: float = 30.0):
        if initial_s <= 0 or cap_s < initial_s:
            raise ConfigError(f"retry waits need 0 < initial ({initial_s} s) <= longest ({cap_s} s): give "
                              "--retry-cap-seconds a positive number")
        self.initial_s, self.cap_s, self.failures = initial_s, cap_s, 0

    def next(self) -> float:
        wait = min(self.cap_s, self.initial_s * 2 ** self.failures)
        self.failures += 1
        return wait * (0.75 + 0.25 * random.random())

    def reset(self) -> None:
        self.failures = 0


class Uploader:
    """A thread uploading spool entries; :meth:`wake` after a :meth:`Spool.put` so it starts at once."""

    def __init__(self, spool: Spool, landing: Any, *, before_remove: Callable[[Entry], None] | None = None,
                 initial_backoff_s: float = 0.5, max_backoff_s: float = 30.0, idle_s: float = 1.0):
        self.spool = spool
        self.landing = storage.as_path(landing)
        self.target = storage.where(self.landing)
        self.before_remove = before_remove
        self.backoff = Backoff(initial_backoff_s, max_backoff_s)
        self.idle_s = idle_s
        self.uploaded = 0
        self.failing = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._deadline = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-uploader", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, drain_s: float = 5.0) -> None:
        """Finish: keep uploading for at most ``drain_s`` seconds (what is left stays in the spool for the next
        start), then end the thread."""
        self._deadline = time.monotonic() + max(0.0, drain_s)
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=drain_s + 60)
            self._thread = None

    def _past_deadline(self) -> bool:
        return self._stopping.is_set() and time.monotonic() >= self._deadline

    def _run(self) -> None:
        while not self._past_deadline():
            self._wake.clear()
            done, error = self.drain()
            if error is not None:
                self._sleep(self._failed(error))
            elif self._stopping.is_set():
                return  # everything pending went up
            elif done == 0:
                self._sleep(self.idle_s)

    def _sleep(self, seconds: float) -> None:
        if self._stopping.is_set():
            seconds = min(seconds, max(0.0, self._deadline - time.monotonic()))
        self._wake.wait(seconds)

    def drain(self) -> tuple[int, BaseException | None]:
        """One pass over the spool, oldest first, stopping at the first failure: (entries uploaded, error)."""
        done = 0
        for entry in self.spool.pending():
            if self._past_deadline():
                break
            try:
                if self.upload(entry):
                    done += 1
            except Exception as exc:  # noqa: BLE001 - any storage failure: keep the entry, back off
                return done, exc
            if self.failing:
                log.info("landing %s is reachable again; uploading the %d instance(s) held in the spool",
                         self.target, self.spool.count())
                self.failing = False
            self.backoff.reset()
        return done, None

    def upload(self, entry: Entry) -> bool:
        """Upload one entry and drop it from the spool; False when it was gone or changed meanwhile."""
        try:
            data = self.spool.read(entry)
        except FileNotFoundError:
            return False  # removed meanwhile
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            log.error("spool entry %s does not match its recorded sha256 (disk fault?); moved to %s/damaged, "
                      "ask the sender to resend the study", entry.name[:12], self.spool.root)
            self._set_aside(entry)
            return False
        storage.write_bytes(storage.join(self.landing, *entry.key.split("/")), data)
        if self.spool.remove(entry, on_removed=self.before_remove):
            self.uploaded += 1
            log.debug("uploaded spool entry %s (%s, %d bytes) to %s", entry.name[:12], entry.specialty, entry.size,
                      self.target)
        return True

    def _set_aside(self, entry: Entry) -> None:
        damaged = self.spool.root / "damaged"
        damaged.mkdir(exist_ok=True)
        for suffix in (".dcm", ".json"):
            source = self.spool.incoming / f"{entry.name}{suffix}"
            if source.exists():
                source.replace(damaged / source.name)

    def _failed(self, exc: BaseException) -> float:
        wait = self.backoff.cap_s if _config_error(exc) else self.backoff.next()
        held = self.spool.count()
        if _config_error(exc):
            log.error("landing %s refused the upload (%s): a configuration error - check that the bucket exists "
                      "and the credentials may write to it; %d instance(s) held in the spool, retrying in %.0f s",
                      self.target, retry.describe(exc), held, wait)
        else:
            log.warning("landing %s unreachable (%s); %d instance(s) held in the spool, retrying in %.1f s",
                        self.target, retry.describe(exc), held, wait)
        self.failing = True
        return wait


def _config_error(exc: BaseException) -> bool:
    return isinstance(exc, (ConfigError, PermissionError))
