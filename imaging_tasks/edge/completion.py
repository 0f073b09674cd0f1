"""When a received study is whole, and telling Airflow so.

DICOM has no "end of study" message: senders push instances over one or several associations and stop.  A study
(one specialty's part of it: a study routed to two specialties is two studies here) counts as complete when

* no association that sent to it is still open,
* nothing arrived for it for the quiet period (``--quiet-seconds``, 30 s by default), and
* every instance of it that was acknowledged is in the landing bucket (none left in the spool).

Then ``<landing>/<specialty>/<study-folder>/_STUDY_COMPLETE.json`` is written (``{"specialty", "study_folder",
"instances", "series", "completed_at", "receiver_ae", "burst"}``; counts and pseudonymous names only; a name
starting with ``_`` is hidden from the DAGs' landing listings) and, with ``--airflow-url``, an asset event is
posted for the asset ``imaging_<specialty>_landing`` (:class:`AssetEvents`), which starts the specialty's DAG.
Instances arriving for the study later open a new *burst*, completed the same way (the manifest is rewritten
with the study's new totals and ``burst`` + 1): one manifest and one event per (study, burst).  Counts are of
distinct instances, so a resend does not inflate them.

State survives a restart: what was uploaded, which bursts were completed and which events were posted are
appended to a journal per study (``<spool>/state/<specialty>/<study-folder>.jsonl``, fsync'd, one JSON line per
fact); what was received and not uploaded is the spool itself.  After a restart no association is open, so a
study whose burst was interrupted completes once the quiet period has passed since its last instance.  A crash
between writing a manifest and journaling it writes the same manifest key again: never a second object.  An asset
event is journaled as posted once Airflow accepted it; a crash between the two posts it again on start (an extra
run of the DAG finds the study done in its ledger), so events are at least once, never lost.
Journals of studies finished longer ago than ``retention_days`` are removed at start.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from imaging_tasks import retry, storage
from imaging_tasks.errors import ConfigError

from .spool import Entry
from .uploader import Backoff

log = logging.getLogger(__name__)
MANIFEST = "_STUDY_COMPLETE.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass
class _Study:
    specialty: str
    study_folder: str
    instances: set[str] = field(default_factory=set)  # object names uploaded, over every burst
    series: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)  # spool entries acknowledged, not uploaded yet
    associations: set[int] = field(default_factory=set)  # open associations that sent to it
    last_received: float = 0.0
    bursts: int = 0  # bursts completed (manifests written)
    open_burst: bool = False  # something arrived since the last manifest
    unposted: dict[int, dict] = field(default_factory=dict)  # burst -> counts of events not posted yet
    changes: int = 0  # bumped on every receipt/upload: a manifest is journaled only if nothing changed meanwhile
    retry_at: float = 0.0  # monotonic: after a failed manifest write
    backoff: Backoff | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.specialty, self.study_folder


class Completion:
    """Tracks studies (see the module docstring).  The receiver calls :meth:`received` (under the spool's lock,
    once the instance is stored), :meth:`association_closed`, and the uploader :meth:`uploaded` (under the
    spool's lock, before the entry leaves the spool); a thread calls :meth:`tick`."""

    def __init__(self, state_dir: str | Path, landing: Any, *, quiet_s: float = 30.0, receiver_ae: str = "",
                 events: "AssetEvents | None" = None, initial_backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 retention_days: float = 30.0, clock: Callable[[], float] = time.time):
        if quiet_s < 0:
            raise ConfigError(f"--quiet-seconds must be >= 0, got {quiet_s}")
        self.state_dir = Path(state_dir)
        self.landing = storage.as_path(landing)
        self.quiet_s = float(quiet_s)
        self.receiver_ae = receiver_ae
        self.events = events
        self.initial_backoff_s, self.max_backoff_s = initial_backoff_s, max_backoff_s
        self.retention_s = retention_days * 86400
        self.clock = clock
        self.completed = 0
        self._studies: dict[tuple[str, str], _Study] = {}
        self._by_association: dict[int, set[tuple[str, str]]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if events is not None:
            events.on_posted = self._posted

    # ------------------------------------------------------------------ journal
    def _journal(self, key: tuple[str, str]) -> Path:
        specialty, folder = key
        if not (_SAFE_NAME.match(specialty) and _SAFE_NAME.match(folder)):
            raise ValueError("study key is not a safe file name")
        return self.state_dir / specialty / f"{folder}.jsonl"

    def _append(self, key: tuple[str, str], record: dict) -> None:
        path = self._journal(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fh.write(json.dumps(record, sort_keys=True).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _replay(self, key: tuple[str, str]) -> _Study:
        study = _Study(*key)
        try:
            lines = self._journal(key).read_bytes().splitlines()
        except FileNotFoundError:
            return study
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash: the fact it was writing is redone
            kind = record.get("e")
            if kind == "up":
                study.instances.add(record["sop"])
                study.series.add(record["series"])
                study.last_received = max(study.last_received, float(record.get("received_at") or 0))
                study.open_burst = True
            elif kind == "complete":
                study.bursts = max(study.bursts, int(record["burst"]))
                study.open_burst = False
                if record.get("notify"):
                    study.unposted[int(record["burst"])] = record["counts"]
            elif kind == "posted":
                study.unposted.pop(int(record["burst"]), None)
        return study

    def _study(self, key: tuple[str, str]) -> _Study:
        study = self._studies.get(key)
        if study is None:
            study = self._studies[key] = self._replay(key)
        return study

    def load(self, pending: list[Entry]) -> dict[str, int]:
        """Rebuild the state after a (re)start: journals with an open burst or an unposted event, plus the spool's
        entries (acknowledged, not uploaded).  Old finished journals are removed."""
        now = self.clock()
        removed = 0
        with self._lock:
            for path in sorted(self.state_dir.glob("*/*.jsonl")):
                key = (path.parent.name, path.stem)
                study = self._replay(key)
                if study.open_burst or study.unposted:
                    self._studies[key] = study
                elif now - path.stat().st_mtime > self.retention_s:
                    path.unlink(missing_ok=True)
                    removed += 1
            for entry in pending:
                self._note_receipt(entry, None)
            for study in self._studies.values():
                for burst, counts in sorted(study.unposted.items()):
                    self._submit(study, burst, counts)
        return {"studies_open": sum(1 for s in self._studies.values() if s.open_burst),
                "events_unposted": sum(len(s.unposted) for s in self._studies.values()),
                "journals_removed": removed}

    # ------------------------------------------------------------------ facts
    def _note_receipt(self, entry: Entry, association: int | None) -> None:
        study = self._study(entry.study)
        study.pending.add(entry.name)
        study.last_received = max(study.last_received, entry.received_at)
        study.open_burst = True
        study.changes += 1
        if association is not None:
            study.associations.add(association)
            self._by_association.setdefault(association, set()).add(study.key)

    def received(self, entry: Entry, association: int | None = None) -> None:
        with self._lock:
            self._note_receipt(entry, association)

    def uploaded(self, entry: Entry) -> None:
        """Journal an upload (fsync'd) before the spool forgets the entry."""
        with self._lock:
            study = self._study(entry.study)
            self._append(study.key, {"e": "up", "sop": entry.object_name, "series": entry.series_folder,
                                     "received_at": entry.received_at})
            study.pending.discard(entry.name)
            study.instances.add(entry.object_name)
            study.series.add(entry.series_folder)
            study.last_received = max(study.last_received, entry.received_at)
            study.open_burst = True
            study.changes += 1

    def association_closed(self, association: int) -> None:
        with self._lock:
            for key in self._by_association.pop(association, ()):
                study = self._studies.get(key)
                if study is not None:
                    study.associations.discard(association)

    # ------------------------------------------------------------------ deciding
    def due(self, now: float | None = None) -> list[tuple[str, str]]:
        """Studies whose burst is complete now (see the module docstring)."""
        now = self.clock() if now is None else now
        with self._lock:
            return [s.key for s in self._studies.values()
                    if s.open_burst and not s.associations and not s.pending and s.instances
                    and now - s.last_received >= self.quiet_s and time.monotonic() >= s.retry_at]

    def tick(self, now: float | None = None) -> int:
        """Complete every study that is due; how many were."""
        done = 0
        for key in self.due(now):
            with self._lock:
                study = self._studies.get(key)
                if study is None:
                    continue
                changes, burst = study.changes, study.bursts + 1
                counts = {"studies": 1, "instances": len(study.instances), "series": len(study.series)}
            manifest = {"specialty": key[0], "study_folder": key[1], "instances": counts["instances"],
                        "series": counts["series"], "receiver_ae": self.receiver_ae, "burst": burst,
                        "completed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            try:
                storage.write_json(storage.join(self.landing, key[0], key[1], MANIFEST), manifest)
            except Exception as exc:  # noqa: BLE001 - the bucket is down or refuses: try again later
                with self._lock:
                    study.backoff = study.backoff or Backoff(self.initial_backoff_s, self.max_backoff_s)
                    wait = study.backoff.next()
                    study.retry_at = time.monotonic() + wait
                log.warning("%s study %s complete but its manifest could not be written (%s); retrying in %.1f s",
                            key[0], key[1][:16], retry.describe(exc), wait)
                continue
            with self._lock:
                if study.changes != changes:
                    continue  # an instance arrived meanwhile: the burst goes on, its manifest is rewritten later
                notify = self.events is not None
                self._append(key, {"e": "complete", "burst": burst, "counts": counts, "notify": notify,
                                   "at": self.clock()})
                study.bursts, study.open_burst, study.backoff, study.retry_at = burst, False, None, 0.0
                if notify:
                    study.unposted[burst] = counts
                    self._submit(study, burst, counts)
                self._forget_if_idle(study)
            self.completed += 1
            done += 1
            log.info("%s study %s complete: %d instance(s) in %d series (burst %d)%s", key[0], key[1][:16],
                     counts["instances"], counts["series"], burst, "; asset event queued" if notify else "")
        return done

    def _submit(self, study: _Study, burst: int, counts: dict) -> None:
        if self.events is not None:
            self.events.submit(study.specialty, study.study_folder, burst, counts)

    def _posted(self, specialty: str, study_folder: str, burst: int) -> None:
        with self._lock:
            key = (specialty, study_folder)
            self._append(key, {"e": "posted", "burst": burst})
            study = self._studies.get(key)
            if study is not None:
                study.unposted.pop(burst, None)
                self._forget_if_idle(study)

    def _forget_if_idle(self, study: _Study) -> None:
        """Drop a finished study from memory (its journal stays: a later burst reads it back)."""
        if not (study.open_burst or study.pending or study.associations or study.unposted):
            self._studies.pop(study.key, None)

    def open_studies(self) -> int:
        with self._lock:
            return sum(1 for s in self._studies.values() if s.open_burst)

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        interval = min(1.0, max(0.05, self.quiet_s / 4))

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - a bug here must not stop the receiver; logged with traceback
                    log.exception("study completion check failed; retrying")

        self._thread = threading.Thread(target=run, name="edge-completion", daemon=True)
        self._thread.start()
        if self.events is not None:
            self.events.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        if self.events is not None:
            self.events.stop()


# ---------------------------------------------------------------------------------------------- Airflow
@dataclass(frozen=True)
class AirflowTarget:
    """Where asset events go: Airflow 3's public REST API (``/api/v2``) at ``url``, with a bearer token (a JWT
    given as is) or a user and password exchanged for one at ``POST /auth/token`` (the simple auth manager's and
    the FAB auth manager's token endpoint)."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    timeout_s: float = 10.0

    def __post_init__(self):
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"--airflow-url {self.url!r} is not an http(s) URL of the Airflow API server "
                              "(e.g. https://airflow.example.org)")
        if not self.token and not (self.username and self.password):
            raise ConfigError("--airflow-url needs credentials: --airflow-user with the password in "
                              "AIRFLOW_RECEIVER_PASSWORD (or --airflow-password), or a bearer token in "
                              "IMAGING_AIRFLOW_TOKEN")


class AirflowError(RuntimeError):
    """A refused or failed call to the Airflow API; the message says which call and what to check."""


class AssetEvents:
    """Posts one asset event per completed (study, burst), from a thread, oldest first; a failed post is retried
    with backoff (each event on its own schedule, so one specialty whose asset is missing does not hold up the
    others) and never blocks receiving or uploading.  ``extra`` holds counts only."""

    def __init__(self, target: AirflowTarget, *, initial_backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        self.target = target
        self.base = target.url.rstrip("/")
        self.initial_backoff_s, self.max_backoff_s = initial_backoff_s, max_backoff_s
        self.on_posted: Callable[[str, str, int], None] | None = None
        self.posted = 0
        self._queue: dict[tuple[str, str, int], dict] = {}  # (specialty, study, burst) -> item
        self._token: str | None = target.token
        self._asset_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, specialty: str, study_folder: str, burst: int, counts: dict) -> None:
        with self._lock:
            self._queue.setdefault((specialty, study_folder, burst), {
                "counts": dict(counts), "due": 0.0, "backoff": Backoff(self.initial_backoff_s, self.max_backoff_s)})
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-asset-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.target.timeout_s * 3 + 5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before looking: a submit from now on wakes the wait below
            now = time.monotonic()
            with self._lock:
                due = [(k, v) for k, v in self._queue.items() if v["due"] <= now]
                later = [v["due"] for v in self._queue.values() if v["due"] > now]
            for (specialty, study, burst), item in due:
                if self._stop.is_set():
                    return
                try:
                    self.post(specialty, item["counts"])
                except Exception as exc:  # noqa: BLE001 - Airflow down or refusing: retry later, never give up
                    wait = item["backoff"].next()
                    item["due"] = time.monotonic() + wait
                    log.warning("asset event for %s study %s not posted (%s); retrying in %.1f s", specialty,
                                study[:16], exc if isinstance(exc, AirflowError) else retry.describe(exc), wait)
                    continue
                with self._lock:
                    self._queue.pop((specialty, study, burst), None)
                self.posted += 1
                log.info("asset event posted for %s study %s (burst %d): %s", specialty, study[:16], burst,
                         item["counts"])
                if self.on_posted is not None:
                    self.on_posted(specialty, study, burst)
            if not due:
                self._wake.wait(min(later) - time.monotonic() if later else 5.0)

    # ------------------------------------------------------------------ the REST calls
    def post(self, specialty: str, counts: dict) -> dict:
        """``POST /api/v2/assets/events`` for the asset ``imaging_<specialty>_landing``; a token refused once (401:
        expired) is fetched again."""
        for attempt in (1, 2):
            try:
                asset_id = self._asset_id(specialty)
                return self._call("POST", "/api/v2/assets/events", {"asset_id": asset_id, "extra": dict(counts)})
            except AirflowError as exc:
                if getattr(exc, "status", None) == 401 and attempt == 1 and not self.target.token:
                    self._token = None
                    continue
                raise
        raise AssertionError("unreachable")

    def _asset_id(self, specialty: str) -> int:
        name = f"imaging_{specialty}_landing"
        if name not in self._asset_ids:
            # name_pattern is a LIKE search ("_" matches any character): keep the exact name only
            found = self._call("GET", "/api/v2/assets?" + urllib.parse.urlencode({"name_pattern": name,
                                                                                  "limit": 100}))
            ids = [a["id"] for a in (found or {}).get("assets", []) if a.get("name") == name]
            if not ids:
                raise AirflowError(f"Airflow has no asset named {name}: deploy and parse the {specialty} DAG (it "
                                   "declares the asset), or check --airflow-url")
            self._asset_ids[name] = int(ids[0])
        return self._asset_ids[name]

    def _bearer(self) -> str:
        if self._token is None:
            body = self._call("POST", "/auth/token", {"username": self.target.username,
                                                      "password": self.target.password}, auth=False)
            token = (body or {}).get("access_token")
            if not token:
                raise AirflowError("POST /auth/token answered without an access_token: is --airflow-url the API "
                                   "server of Airflow 3?")
            self._token = token
        return self._token

    def _call(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self._bearer()}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        what = f"{method} {path.split('?', 1)[0]}"
        try:
            with urllib.request.urlopen(request, timeout=self.target.timeout_s) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            hint = {401: "the credentials or token were refused (check --airflow-user / AIRFLOW_RECEIVER_PASSWORD "
                         "or IMAGING_AIRFLOW_TOKEN)",
                    403: "the user may not do this (it needs permission to create asset events)",
                    404: "not found (is --airflow-url the API server of Airflow 3?)"}.get(exc.code, "")
            error = AirflowError(f"{what} -> HTTP {exc.code}{': ' + hint if hint else ''}")
            error.status = exc.code
            raise error from None
        return json.loads(text) if text else None
