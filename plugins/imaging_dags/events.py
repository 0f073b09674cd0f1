"""Event-driven runs: an upload wakes its specialty's DAG within seconds; the nightly schedule stays the safety net.

The storage tells a queue about every new object (S3 event notifications into SQS; GCS notifications into
Pub/Sub); an Airflow 3 ``AssetWatcher`` on the specialty's landing asset runs a trigger in the triggerer that
reads the queue through the providers' ``MessageQueueTrigger`` (common-messaging: ``scheme="sqs"`` goes to the
amazon provider's ``SqsSensorTrigger``, ``scheme="google+pubsub"`` to the google provider's
``PubsubPullTrigger``).  Each batch of object notifications becomes one asset event, and the asset event queues an
asset-triggered run of the DAG (schedule: cron OR asset, ``AssetOrTimeSchedule``).

What an event-started run does (``imaging_dags.window``, ``imaging_dags.sensors``): like a manual run it looks at
everything under the landing prefix not yet done; its landing sensor still waits until nothing new arrived for
the quiet period, so a multi-file study that is still uploading is not cut in two, and the ledger skips studies
already done, so a burst of notifications (one per file) processes each study once.  Notifications that arrive
while a run is going queue one more run (``max_active_runs=1``), which picks up whatever that run did not see.

The queues are read at parse time from the environment / ``[imaging]`` config only (never the database or the
network), see :func:`imaging_dags.settings.event_sources`; nothing configured = a cron-only DAG, as before.

File names in landing buckets can carry patient names: the asset event (stored in the metadata DB and shown in the
UI) holds counts only, never the object keys the notifications name.
"""
from __future__ import annotations

import base64
import json
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

SQS_WAIT_S = 20  # SQS long polling: a receive returns as soon as a message is there, else after this long
SQS_IDLE_S = 1  # pause between two empty receives
PUBSUB_IDLE_S = 2.0  # Pub/Sub: pause between two empty pulls (pulls wait a bounded time for a message first)
MAX_MESSAGES = 10  # per receive/pull (the SQS maximum)


def landing_asset_name(specialty: str) -> str:
    return f"imaging_{specialty}_landing"


def key_filter(specialty: str) -> str:
    """For a queue shared by several specialties: the JSONPath (jsonpath-ng ext) selecting S3 records of this
    specialty's landing folder (``<...>/<specialty>/...``); other messages stay in the queue for their DAG.  Keys
    in notifications are URL-encoded (S3 keeps '/', moto and some S3-compatible stores send '%2F')."""
    return f'Records[?(@.s3.object.key =~ "(^|/|%2F){specialty}(/|%2F)")]'


class LandingEventTrigger(BaseEventTrigger):
    """Reads one specialty's storage notifications from SQS or Pub/Sub and fires once some objects were created.

    Runs the providers' trigger for the queue (``MessageQueueTrigger(scheme=..., **trigger_kwargs)``) and turns its
    message batch into counts (``{"source", "specialty", "objects", "bytes"}``); a batch without object-created
    notifications (S3's ``s3:TestEvent`` when a notification is set up, deletions) is consumed and waited past.
    """

    def __init__(self, specialty: str, scheme: str, trigger_kwargs: dict[str, Any]):
        super().__init__()
        self.specialty, self.scheme, self.trigger_kwargs = specialty, scheme, dict(trigger_kwargs)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("imaging_dags.events.LandingEventTrigger",
                {"specialty": self.specialty, "scheme": self.scheme, "trigger_kwargs": self.trigger_kwargs})

    def queue_trigger(self) -> BaseEventTrigger:
        """The provider's trigger, as ``MessageQueueTrigger`` dispatches it."""
        from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

        return MessageQueueTrigger(scheme=self.scheme, **self.trigger_kwargs).trigger

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            async for event in self.queue_trigger().run():  # the provider's triggers end after one batch
                objects, size = summarise(event.payload)
                if objects:
                    self.log.info("%s: %d new object(s), %d bytes notified: waking the DAG", self.specialty,
                                  objects, size)
                    yield TriggerEvent({"source": self.scheme, "specialty": self.specialty, "objects": objects,
                                        "bytes": size})
                    return
                self.log.info("%s: a notification batch without new objects (test event, deletion): ignored",
                              self.specialty)


def _s3_records(body: str) -> list[dict]:
    try:
        doc = json.loads(body)
    except (TypeError, ValueError):
        return []
    if isinstance(doc, dict) and isinstance(doc.get("Message"), str):  # S3 -> SNS -> SQS: the S3 event inside
        return _s3_records(doc["Message"])
    records = doc.get("Records") if isinstance(doc, dict) else None
    return [r for r in records or [] if isinstance(r, dict) and str(r.get("eventName", "")).startswith("ObjectCreated")]


def _gcs_object(message: dict) -> dict | None:
    """A GCS Pub/Sub notification (``ReceivedMessage.to_dict``): the object resource if it is a new object."""
    msg = message.get("message") or {}
    if (msg.get("attributes") or {}).get("eventType") != "OBJECT_FINALIZE":
        return None
    data = msg.get("data") or b""
    try:
        raw = data if isinstance(data, bytes) else base64.b64decode(data)
        return json.loads(raw or b"{}")
    except (TypeError, ValueError):
        return {}


def summarise(payload: dict) -> tuple[int, int]:
    """(objects created, their bytes) in a provider trigger's event payload: SQS ``message_batch`` of S3 event
    notifications, or Pub/Sub ``message`` of GCS notifications."""
    objects = size = 0
    for message in payload.get("message_batch") or []:
        for record in _s3_records(message.get("Body", "")):
            objects += 1
            size += int(((record.get("s3") or {}).get("object") or {}).get("size") or 0)
    for message in payload.get("message") or []:
        obj = _gcs_object(message)
        if obj is not None:
            objects += 1
            size += int(obj.get("size") or 0)
    return objects, size


def sqs_trigger(specialty: str, queue_url: str, *, conn_id: str | None, shared: bool) -> LandingEventTrigger:
    kwargs: dict[str, Any] = {"sqs_queue": queue_url, "aws_conn_id": conn_id, "max_messages": MAX_MESSAGES,
                              "wait_time_seconds": SQS_WAIT_S, "waiter_delay": SQS_IDLE_S}
    if shared:
        # others' notifications are left in the queue and visible again at once (not after the queue's visibility
        # timeout); ones no DAG takes (S3's test event) should go to a dead-letter queue by a redrive policy
        kwargs.update(message_filtering="jsonpath-ext", message_filtering_config=key_filter(specialty),
                      visibility_timeout=0)
    return LandingEventTrigger(specialty, "sqs", kwargs)


def pubsub_trigger(specialty: str, subscription: str, *, conn_id: str) -> LandingEventTrigger:
    """``subscription``: ``projects/<project>/subscriptions/<name>``."""
    parts = subscription.split("/")
    project, name = parts[1], parts[3]
    return LandingEventTrigger(specialty, "google+pubsub", {
        "project_id": project, "subscription": name, "max_messages": MAX_MESSAGES, "ack_messages": True,
        "gcp_conn_id": conn_id, "poke_interval": PUBSUB_IDLE_S, "return_immediately": False})


def landing_asset(specialty: str):
    """The specialty's landing asset with a watcher per configured queue (none where only the DICOM receiver posts
    its events), or None when nothing is configured to send it events."""
    from airflow.sdk import Asset, AssetWatcher

    from imaging_dags.settings import event_sources

    sources = event_sources(specialty)
    watchers = []
    if sources.sqs_queue_url:
        watchers.append(AssetWatcher(name=f"{specialty}_sqs", trigger=sqs_trigger(
            specialty, sources.sqs_queue_url, conn_id=sources.aws_conn_id, shared=sources.sqs_shared)))
    if sources.pubsub_subscription:
        watchers.append(AssetWatcher(name=f"{specialty}_pubsub", trigger=pubsub_trigger(
            specialty, sources.pubsub_subscription, conn_id=sources.gcp_conn_id)))
    if not watchers and not sources.receiver:
        return None
    return Asset(name=landing_asset_name(specialty), watchers=watchers)
