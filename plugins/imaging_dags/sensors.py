"""Wait for an upload to finish on a landing bucket: deferrable for S3/GCS, poke/reschedule for local folders.

Both paths apply one rule (``imaging_tasks.storage.QuietPeriod``): inputs are in the run's window and
nothing new arrived for the quiet period (``[imaging] landing_quiet_seconds``, default 120 s; a run's
Param ``landing_quiet_seconds`` wins), so a study still being uploaded is not picked up half-way.

A scheduled or backfill run whose data interval has closed with nothing in it is skipped at once (it cannot
fill up any more), so it never holds the DAG's one active run slot against a manual run.  A timeout without
a finished upload skips the run; a configuration error (unknown bucket, bad setting) fails it once.

File names in landing buckets can carry patient names: logs, trigger events and the XCom hold counts only.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import math
from typing import Any, AsyncIterator

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowSensorTimeout, AirflowSkipException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from imaging_dags.lineage import ImagingLineage
from imaging_dags.window import run_window

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs")
MIN_RECHECK_S = 1.0  # while waiting for quiet, re-list at most this often (unless the poke interval is shorter)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _summarise(uri: str, since: str | None, until: str | None):
    """The window's arrivals under ``uri`` (an ``imaging_tasks.storage.Arrivals``: counts, newest time, fingerprint)."""
    from airflow.sdk import ObjectStoragePath

    from imaging_dags.settings import object_storage
    from imaging_tasks.storage import arrivals, list_objects

    parse = lambda s: dt.datetime.fromisoformat(s) if s else None  # noqa: E731
    with object_storage():
        return arrivals(list_objects(ObjectStoragePath(uri), since=parse(since), until=parse(until)))


def _check_local_root(uri: str) -> None:
    """A local landing URI whose parent folder does not exist is a typo in the settings, not an empty night."""
    from imaging_tasks import storage
    from imaging_tasks.errors import ConfigError

    if is_remote(uri):
        return  # a missing bucket is reported by the listing itself (storage.MissingBucket)
    path = storage.as_path(uri)
    if not path.exists() and not path.parent.exists():
        raise ConfigError(f"landing folder {uri} does not exist, nor its parent: check the Variable "
                          "imaging_landing_uri (or imaging_landing_uri_<specialty>) and the run's prefix")


def is_remote(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in REMOTE_SCHEMES if "://" in uri else False


class LandingTrigger(BaseTrigger):
    """Lists a bucket prefix from the triggerer until an upload has finished, holding no worker slot meanwhile.

    Fires once something arrived in the window and the listing stayed unchanged for ``quiet_seconds``; an
    object added during the quiet period restarts it.  Lists every ``poke_interval`` seconds, or sooner when
    the quiet period would end sooner.  The event carries counts only.
    """

    def __init__(self, uri: str, since: str | None, until: str | None, poke_interval: float,
                 quiet_seconds: float = 0.0):
        super().__init__()
        self.uri, self.since, self.until = uri, since, until
        self.poke_interval, self.quiet_seconds = float(poke_interval), float(quiet_seconds)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("imaging_dags.sensors.LandingTrigger",
                {"uri": self.uri, "since": self.since, "until": self.until, "poke_interval": self.poke_interval,
                 "quiet_seconds": self.quiet_seconds})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from imaging_tasks.storage import QuietPeriod

        quiet = QuietPeriod(self.quiet_seconds)
        while True:
            # listing is blocking I/O (and may look the connection up): keep it off the triggerer's event loop
            found = await asyncio.to_thread(_summarise, self.uri, self.since, self.until)
            wait = quiet.observe(found, _utcnow())
            if wait <= 0:
                yield TriggerEvent({"status": "found", **found.counts()})
                return
            if found.objects:
                self.log.info("landing: %d object(s), %d bytes; upload not quiet yet, %.0f s to go",
                              found.objects, found.bytes, wait)
            await asyncio.sleep(_next_check(self.poke_interval, wait))


def _next_check(poke_interval: float, wait: float) -> float:
    return poke_interval if math.isinf(wait) else max(min(poke_interval, wait), min(MIN_RECHECK_S, poke_interval))


class LandingSensor(ImagingLineage, BaseSensorOperator):
    """Succeeds when the specialty's landing prefix holds inputs in the run's window and the upload has finished
    (nothing new for the quiet period); returns counts only.

    File names in landing buckets can carry patient names, so the XCom is a count, not a listing; the
    index step lists the prefix itself.  Its lineage (``imaging_dags.lineage``) is the landing prefix, as a whole.
    """

    lineage_reads = ("landing",)

    def __init__(self, *, specialty: str, deferrable: bool = True, **kwargs):
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        self.specialty = specialty
        self.deferrable = deferrable
        self._quiet = None  # QuietPeriod of this execution (kept across pokes in poke mode)
        self._recheck_s: float | None = None

    def _target(self, context) -> tuple[str, str | None, str | None]:
        from imaging_dags.settings import for_specialty

        uri = for_specialty(self.specialty).landing_uri
        prefix = context["params"].get("prefix") or ""
        if prefix:
            uri = uri.rstrip("/") + "/" + prefix.strip("/")
        since, until = run_window(context)
        return uri, since and since.isoformat(), until and until.isoformat()

    def _check(self, context, target: tuple[str, str | None, str | None]) -> tuple[Any, float, float]:
        """List the target once: (arrivals, seconds still to wait, the quiet period in seconds)."""
        from airflow.sdk.exceptions import AirflowSkipException

        from imaging_dags.settings import landing_quiet_seconds
        from imaging_dags.tasks import failing_fast
        from imaging_tasks.storage import QuietPeriod

        with failing_fast(f"landing {self.specialty}"):
            quiet_s = landing_quiet_seconds(context["params"])
            _check_local_root(target[0])
            found = _summarise(*target)
        if self._quiet is None or self._quiet.quiet_s != quiet_s:
            self._quiet = QuietPeriod(quiet_s)
        until = target[2]
        if not found.objects and until and dt.datetime.fromisoformat(until) <= _utcnow():
            raise AirflowSkipException(f"landing {self.specialty}: nothing arrived in this run's data interval "
                                       f"({target[1]} .. {until}), which has closed: nothing to do")
        wait = self._quiet.observe(found, _utcnow())
        if found.objects and wait > 0:
            self.log.info("landing %s: %d object(s), %d bytes in window; waiting for %.0f s without new uploads "
                          "(%.0f s to go)", self.specialty, found.objects, found.bytes, quiet_s, wait)
        else:
            self.log.info("landing %s: %d object(s), %d bytes in window", self.specialty, found.objects, found.bytes)
        return found, wait, quiet_s

    def execute(self, context):
        try:
            return self._execute(context)
        except AirflowSensorTimeout as exc:
            raise AirflowSkipException(f"landing {self.specialty}: no finished upload within {self.timeout:.0f} s "
                                       f"({exc}); the next run looks again") from None

    def resume_execution(self, next_method: str, next_kwargs, context):
        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except AirflowSensorTimeout as exc:
            raise AirflowSkipException(f"landing {self.specialty}: no finished upload within {self.timeout:.0f} s "
                                       f"({exc}); the next run looks again") from None

    def _execute(self, context):
        target = self._target(context)
        if self.deferrable and is_remote(target[0]):
            found, wait, quiet_s = self._check(context, target)
            if wait <= 0:
                return found.counts()
            self.defer(trigger=LandingTrigger(*target, poke_interval=float(self.poke_interval), quiet_seconds=quiet_s),
                       method_name="execute_complete", timeout=dt.timedelta(seconds=self.timeout))
        return super().execute(context)

    def poke(self, context) -> PokeReturnValue:
        found, wait, _quiet_s = self._check(context, self._target(context))
        self._recheck_s = None if math.isinf(wait) else wait
        return PokeReturnValue(is_done=wait <= 0, xcom_value=found.counts())

    def _get_next_poke_interval(self, started_at, run_duration, poke_count) -> float:
        """Poke again when the quiet period would end, if that is sooner than the usual interval."""
        interval = super()._get_next_poke_interval(started_at, run_duration, poke_count)
        if self._recheck_s is None:
            return interval
        return _next_check(interval, self._recheck_s)

    def execute_complete(self, context, event: dict):
        if event.get("status") != "found":
            raise RuntimeError(f"landing trigger for {self.specialty} ended without inputs: {event.get('status')!r}")
        return {"objects": event["objects"], "bytes": event["bytes"]}
