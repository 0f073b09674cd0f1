"""Wait for inputs on a landing bucket: poke/reschedule for local folders, deferrable for S3/GCS."""
from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, AsyncIterator

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.triggers.base import BaseTrigger, TriggerEvent

from imaging_dags.window import run_window


def _summarise(uri: str, since: str | None, until: str | None) -> dict:
    from airflow.sdk import ObjectStoragePath

    from imaging_tasks.storage import list_objects

    parse = lambda s: dt.datetime.fromisoformat(s) if s else None  # noqa: E731
    objects = list_objects(ObjectStoragePath(uri), since=parse(since), until=parse(until))
    return {"objects": len(objects), "bytes": sum(o.size for o in objects)}


class LandingTrigger(BaseTrigger):
    """Polls a bucket prefix from the triggerer, so waiting on S3/GCS holds no worker slot."""

    def __init__(self, uri: str, since: str | None, until: str | None, poke_interval: float):
        super().__init__()
        self.uri, self.since, self.until, self.poke_interval = uri, since, until, poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("imaging_dags.sensors.LandingTrigger",
                {"uri": self.uri, "since": self.since, "until": self.until, "poke_interval": self.poke_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            found = await asyncio.to_thread(_summarise, self.uri, self.since, self.until)
            if found["objects"]:
                yield TriggerEvent({"status": "found", **found})
                return
            await asyncio.sleep(self.poke_interval)


class LandingSensor(BaseSensorOperator):
    """Succeeds when the specialty's landing prefix holds inputs in the run's window; returns counts only.

    File names in landing buckets can carry patient names, so the XCom is a count, not a listing; the
    index step lists the prefix itself.
    """

    def __init__(self, *, specialty: str, deferrable: bool = True, **kwargs):
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        self.specialty = specialty
        self.deferrable = deferrable

    def _target(self, context) -> tuple[str, str | None, str | None]:
        from imaging_dags.settings import for_specialty

        uri = for_specialty(self.specialty).landing_uri
        prefix = context["params"].get("prefix") or ""
        if prefix:
            uri = uri.rstrip("/") + "/" + prefix.strip("/")
        since, until = run_window(context)
        return uri, since and since.isoformat(), until and until.isoformat()

    def execute(self, context):
        uri, since, until = self._target(context)
        remote = uri.split("://", 1)[0] in ("s3", "gs", "gcs")
        if self.deferrable and remote:
            found = _summarise(uri, since, until)
            if found["objects"]:
                return found
            self.defer(trigger=LandingTrigger(uri, since, until, float(self.poke_interval)),
                       method_name="execute_complete", timeout=dt.timedelta(seconds=self.timeout))
        return super().execute(context)

    def poke(self, context) -> PokeReturnValue:
        uri, since, until = self._target(context)
        found = _summarise(uri, since, until)
        self.log.info("landing %s: %d object(s), %d bytes in window", self.specialty, found["objects"], found["bytes"])
        return PokeReturnValue(is_done=found["objects"] > 0, xcom_value=found)

    def execute_complete(self, context, event: dict):
        return {"objects": event["objects"], "bytes": event["bytes"]}
