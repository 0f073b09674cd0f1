"""Every setting of the imaging DAGs, in one place, resolved the Airflow way.

Parse-time settings (queue and pool names, schedule) come from Airflow's config (``[imaging]`` section,
so ``AIRFLOW__IMAGING__GPU_QUEUE`` etc.): no database access while parsing.  Run-time settings come from
Variables (so ``AIRFLOW_VAR_IMAGING_LAKE_URI`` etc.) and Connections, read inside tasks only.

| setting | where | default |
|---|---|---|
| landing bucket (all specialties) | Variable ``imaging_landing_uri`` | ``file://<repo>/data/landing`` (+ ``/<specialty>``) |
| landing bucket of one specialty | Variable ``imaging_landing_uri_<specialty>`` | the above |
| lake (anonymized/derived/quarantine) | Variable ``imaging_lake_uri`` / ``imaging_lake_uri_<specialty>`` | ``file://<repo>/data/lake`` |
| warehouse | Variable ``imaging_warehouse`` | ``duckdb://<repo>/data/warehouse.duckdb``; ``bigquery://project/dataset`` |
| BigQuery connection | Variable ``imaging_gcp_conn_id`` | ``google_cloud_default`` |
| de-identification key | Connection ``imaging_deid`` (password), else env ``IMAGING_DEID_KEY`` | none: refuses to run; env ``IMAGING_DEID_DEMO=1`` selects the public demo key (outputs marked DEMO) |
| GPU queue / pool | config ``[imaging] gpu_queue`` / ``gpu_pool`` | ``gpu`` / ``gpu`` |
| torch device | env ``IMAGING_DEVICE`` | ``auto`` (CUDA if present) |
| torch imported in the scheduler (LocalExecutor) or Celery worker that forks the task processes (``imaging_dags.preload``) | config ``[imaging] preload_torch`` | ``true`` |
| nightly schedule | config ``[imaging] schedule`` | ``0 2 * * *`` |
| sensor timeout (s) | config ``[imaging] sensor_timeout`` | ``3600`` |
| landing quiet period (s): an upload is finished when nothing new arrived for this long | config ``[imaging] landing_quiet_seconds`` (read at run time); a Param / run conf ``landing_quiet_seconds`` wins | ``120`` |
| a specialty option left empty in a run (e.g. the cine model URI) | the Variable its record names (``Option.variable``: ``imaging_cine_model_uri``) | none |
| connection for ``s3://`` URIs that name none | Variable ``imaging_aws_conn_id`` | none: the provider's ambient credentials (instance role, env) |
| connection for ``gs://`` URIs that name none | Variable ``imaging_gcs_conn_id`` | none: Application Default Credentials |
| email recipients of failure and end-of-run notifications (comma-separated) | Variable ``imaging_notify_email_to`` | none: no email |
| SMTP connection for them (the SMTP provider's ``smtp`` type) | Variable ``imaging_notify_smtp_conn_id`` | ``smtp_default`` (used only when recipients are set) |
| sender address | Variable ``imaging_notify_email_from`` | the SMTP connection's ``from_email`` extra |
| Slack-compatible incoming webhook (the Slack provider's ``slackwebhook`` type: host = base URL, password = path/token) | Variable ``imaging_notify_webhook_conn_id`` | none: no webhook |
| FHIR server of the optional ``fhir_update`` task (none: the task skips) | Variable ``imaging_fhir_base_url``, else Connection ``imaging_fhir`` (HTTP: host = base URL; login/password; extra ``headers``, ``timeout``) | none |
| identifier system prefix of the FHIR resources | Variable ``imaging_fhir_identifier_system`` | ``urn:imaging-pipeline`` |
| the Patient identifier that is the DICOM PatientID (MRN), for cognitive-score Observations read by the ``progression`` DAG | Variable ``imaging_fhir_patient_identifier_system`` | none: the Patient's only identifier, else the subject reference's ``identifier`` |
| score Observations the ``progression`` DAG reads (a JSON object: score name by code, as in README.md) | Variable ``imaging_fhir_score_codes`` | LOINC 72107-6 (MMSE) |
| queues whose storage notifications wake a DAG (S3 -> SQS; GCS -> Pub/Sub), read at parse time (``imaging_dags.events``) | env ``IMAGING_EVENTS_SQS_QUEUE_URL[_<SPECIALTY>]`` / ``IMAGING_EVENTS_PUBSUB_SUBSCRIPTION[_<SPECIALTY>]`` (``projects/P/subscriptions/S``; ``{specialty}`` is replaced), or config ``[imaging] events_sqs_queue_url[_<specialty>]`` / ``events_pubsub_subscription[_<specialty>]``; connections ``IMAGING_EVENTS_AWS_CONN_ID`` / ``IMAGING_EVENTS_GCP_CONN_ID`` | none: cron only; connections ``aws_default`` / ``google_cloud_default`` |

Bucket URIs (``file://``, ``s3://``, ``gs://``) all go through Airflow's ``ObjectStoragePath`` and the same
``imaging_tasks.storage`` code (``s3://`` needs the amazon provider with ``s3fs``; ``gs://`` the google provider
with ``gcsfs``).  A URI may name its Airflow connection the ObjectStoragePath way,
``s3://aws_default@bucket/prefix``; that wins over the Variables above, and the lake URIs the tasks pass on
(XCom, manifests, warehouse rows) keep naming it.  Connections as usual, e.g.
``AIRFLOW_CONN_IMAGING_S3='{"conn_type": "aws", "extra": {"endpoint_url": "http://minio:9000"}}'`` for an
S3-compatible store, or for a GCS emulator ``{"conn_type": "google_cloud_platform", "extra": {"is_anonymous":
true, "project": "p", "gcs.endpoint": "http://host:4443"}}`` (with env ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``
set before gcsfs is imported: emulators lack the gRPC storage-control API that gcsfs's default probes).
Sensors on ``s3://``/``gs://`` defer to the triggerer while they wait; on local folders they poke in
reschedule mode; both fire only after the quiet period.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from airflow.sdk import conf

from imaging_tasks.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("IMAGING_DATA_DIR", REPO / "data"))

GPU_QUEUE = conf.get("imaging", "gpu_queue", fallback="gpu")
GPU_POOL = conf.get("imaging", "gpu_pool", fallback="gpu")
SCHEDULE_CRON = conf.get("imaging", "schedule", fallback="0 2 * * *")
SENSOR_TIMEOUT_S = conf.getint("imaging", "sensor_timeout", fallback=3600)
LANDING_QUIET_DEFAULT_S = 120
REMOTE_CONN_VARIABLES = {"s3": "imaging_aws_conn_id", "s3a": "imaging_aws_conn_id",
                         "gs": "imaging_gcs_conn_id", "gcs": "imaging_gcs_conn_id"}


def _param_or_setting(params, name: str, fallback: str):
    """Run time: the run's Param ``name`` if given, else the setting ``[imaging] name`` (raw, to parse)."""
    value = (params or {}).get(name)
    return conf.get("imaging", name, fallback=fallback) if value is None or value == "" else value


def landing_quiet_seconds(params=None) -> float:
    """Run time: the run's Param ``landing_quiet_seconds`` if given, else ``[imaging] landing_quiet_seconds``."""
    value = _param_or_setting(params, "landing_quiet_seconds", str(LANDING_QUIET_DEFAULT_S))
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"landing_quiet_seconds must be a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise ConfigError(f"landing_quiet_seconds must be >= 0, got {seconds}")
    return seconds


def batch_size(params=None) -> int | None:
    """Run time: studies per mapped task instance: the run's Param ``batch_size`` if given, else
    ``[imaging] batch_size`` (``AIRFLOW__IMAGING__BATCH_SIZE``), else None (the library's default,
    ``imaging_tasks.batches.DEFAULT_BATCH_SIZE``)."""
    value = _param_or_setting(params, "batch_size", "")
    if value is None or value == "":
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size must be a whole number of studies, got {value!r}") from None
    if size < 1:
        raise ConfigError(f"batch_size must be at least 1 study per task instance, got {size}")
    return size


def schedule(specialty: str | None = None):
    """Cron with data intervals (not Airflow 3's default trigger timetable): a nightly run owns the arrivals of
    the previous day, and a backfill over a date range re-processes exactly those days.

    With a ``specialty`` whose storage notifications are configured (:func:`event_sources`): that cron OR its
    landing asset (``AssetOrTimeSchedule``; the asset's watchers read the queues, ``imaging_dags.events``)."""
    from airflow.sdk import CronDataIntervalTimetable

    cron = CronDataIntervalTimetable(SCHEDULE_CRON, timezone="UTC")
    if specialty is None:
        return cron
    from imaging_dags.events import landing_asset

    asset = landing_asset(specialty)
    if asset is None:
        return cron
    from airflow.sdk import AssetOrTimeSchedule

    return AssetOrTimeSchedule(timetable=cron, assets=[asset])


@dataclass(frozen=True)
class EventSources:
    """Where a specialty's storage notifications are read (parse time: environment and config only)."""

    sqs_queue_url: str | None = None
    sqs_shared: bool = False  # one queue for every specialty: each DAG takes the records under its folder
    pubsub_subscription: str | None = None  # projects/<project>/subscriptions/<name>
    aws_conn_id: str | None = "aws_default"
    gcp_conn_id: str = "google_cloud_default"
    receiver: bool = False  # the DICOM receiver (`imaging-tasks receive --airflow-url`) posts the asset's events


def _parse_time(name: str) -> str:
    """Env ``IMAGING_<NAME>``, else config ``[imaging] <name>`` (``AIRFLOW__IMAGING__<NAME>``); '' when unset."""
    return (os.environ.get(f"IMAGING_{name.upper()}") or conf.get("imaging", name.lower(), fallback="") or "").strip()


def event_sources(specialty: str) -> EventSources:
    """Parse time: the queues that wake ``specialty``'s DAG.  ``events_sqs_queue_url_<specialty>`` wins over
    ``events_sqs_queue_url`` (in which ``{specialty}`` is replaced; without it the queue is shared and filtered by
    key); likewise ``events_pubsub_subscription[_<specialty>]``, which must name one subscription per specialty.
    ``events_receiver`` (true/false): the DICOM receiver posts the landing asset's events through the REST API
    when a study is complete (``imaging_tasks.edge``), so the asset exists even with no queue to watch."""
    sqs = _parse_time(f"events_sqs_queue_url_{specialty}")
    shared = False
    if not sqs:
        sqs = _parse_time("events_sqs_queue_url")
        shared = bool(sqs) and "{specialty}" not in sqs
        sqs = sqs.replace("{specialty}", specialty)
    sub = _parse_time(f"events_pubsub_subscription_{specialty}")
    if not sub:
        sub = _parse_time("events_pubsub_subscription")
        if sub and "{specialty}" not in sub:
            raise ConfigError(f"IMAGING_EVENTS_PUBSUB_SUBSCRIPTION={sub!r} names one subscription for every DAG, but a "
                              "Pub/Sub subscription hands each message to one reader: put {specialty} in it "
                              "(projects/P/subscriptions/imaging-{specialty}) or set "
                              f"IMAGING_EVENTS_PUBSUB_SUBSCRIPTION_{specialty.upper()}")
        sub = sub.replace("{specialty}", specialty)
    if sub and not re.fullmatch(r"projects/[^/]+/subscriptions/[^/]+", sub):
        raise ConfigError(f"Pub/Sub subscription {sub!r} for {specialty}: expected projects/<project>/subscriptions/<name>")
    receiver = _parse_time("events_receiver")
    if receiver.lower() not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
        raise ConfigError(f"IMAGING_EVENTS_RECEIVER={receiver!r}: expected true or false (true: the DICOM receiver "
                          "posts an asset event when a study is complete, and that event starts the DAG)")
    return EventSources(sqs_queue_url=sqs or None, sqs_shared=shared, pubsub_subscription=sub or None,
                        aws_conn_id=_parse_time("events_aws_conn_id") or "aws_default",
                        gcp_conn_id=_parse_time("events_gcp_conn_id") or "google_cloud_default",
                        receiver=receiver.lower() in ("1", "true", "yes", "on"))


def _var(name: str, default: str) -> str:
    from airflow.sdk import Variable

    return Variable.get(name, default=default)


def server_variable(name: str, default: str) -> str:
    """A Variable read outside a task (the QC plugin in the api-server): env ``AIRFLOW_VAR_*``, secrets backends,
    then the metadata DB, as Airflow's own server components read them.

    ``airflow.sdk.Variable`` is meant for task context: outside one it reads the metadata DB only when the process
    is marked as a server (``airflow api-server`` does that, an app built some other way does not), else it
    silently falls back to the defaults.  Pass as ``for_specialty(specialty, get=server_variable)``.
    """
    from airflow.models.variable import Variable

    return Variable.get(name, default_var=default)


@dataclass(frozen=True)
class SpecialtySettings:
    specialty: str
    landing_uri: str
    lake_uri: str
    warehouse_uri: str

    @property
    def landing(self):
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(self.landing_uri)

    @property
    def lake(self):
        from airflow.sdk import ObjectStoragePath

        from imaging_tasks.lake import Lake

        return Lake(ObjectStoragePath(self.lake_uri), self.specialty)


def _object_storage_path(uri: str):
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(uri)


def object_storage():
    """``with object_storage(): ...``: inside, ``imaging_tasks.storage`` opens remote URI text (from XCom, manifests)
    as ``ObjectStoragePath``, so the connection a URI names is used.  Every task body and QC request runs in one."""
    from imaging_tasks import storage

    return storage.resolving_uris(_object_storage_path)


def in_object_storage(fn):
    """Decorator: run ``fn`` inside :func:`object_storage` (put it under ``@task``; the signature is kept)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with object_storage():
            return fn(*args, **kwargs)

    return wrapper


def with_connection(uri: str, *, get=None) -> str:
    """``s3://bucket/x`` -> ``s3://<conn>@bucket/x`` when Variable ``imaging_aws_conn_id`` (for ``gs://``:
    ``imaging_gcs_conn_id``) is set and the URI names no connection; other URIs are returned unchanged.
    ``get(name, default)`` reads the Variable (default: the task-context reader)."""
    scheme, sep, rest = uri.partition("://")
    variable = REMOTE_CONN_VARIABLES.get(scheme.lower()) if sep else None
    if variable is None:
        return uri
    bucket = rest.split("/", 1)[0]
    if not bucket or bucket.startswith("@") or bucket.endswith("@"):
        raise ConfigError(f"{scheme}:// URI without a bucket: expected {scheme}://[conn_id@]bucket/prefix")
    if "@" in bucket:
        return uri
    conn_id = (get or _var)(variable, "")
    return f"{scheme}://{conn_id}@{rest}" if conn_id else uri


def for_specialty(specialty: str, *, get=None) -> SpecialtySettings:
    """Resolve at run time (inside a task), never at parse time.

    ``get(name, default)`` reads Variables: by default the task-context reader; server-side code (the QC
    plugin in the api-server) passes :func:`server_variable`.
    """
    var = get or _var
    landing_root = var("imaging_landing_uri", (DATA / "landing").as_uri())
    landing = var(f"imaging_landing_uri_{specialty}", landing_root.rstrip("/") + f"/{specialty}")
    lake = var(f"imaging_lake_uri_{specialty}", var("imaging_lake_uri", (DATA / "lake").as_uri()))
    return SpecialtySettings(
        specialty=specialty,
        landing_uri=with_connection(landing, get=var),
        lake_uri=with_connection(lake, get=var),
        warehouse_uri=var("imaging_warehouse", "duckdb://" + str(DATA / "warehouse.duckdb")),
    )


@dataclass(frozen=True)
class NotifyChannels:
    """Where the notifications go (``imaging_dags.notifiers``); falsy when nothing is configured."""

    email_to: tuple[str, ...] = ()
    smtp_conn_id: str = "smtp_default"
    email_from: str | None = None
    webhook_conn_id: str | None = None

    def __bool__(self) -> bool:
        return bool(self.email_to or self.webhook_conn_id)


def notify_channels(*, get=None) -> NotifyChannels:
    """Run time (callbacks): the notification Variables.  An SMTP connection id without recipients is an error
    (it says what to set); nothing set at all means no notification."""
    var = get or _var
    to = tuple(a.strip() for a in (var("imaging_notify_email_to", "") or "").split(",") if a.strip())
    smtp = (var("imaging_notify_smtp_conn_id", "") or "").strip()
    if smtp and not to:
        raise ConfigError(f"Variable imaging_notify_smtp_conn_id={smtp!r} is set but imaging_notify_email_to is not: "
                          "set the recipients (comma-separated), or unset imaging_notify_smtp_conn_id")
    return NotifyChannels(email_to=to, smtp_conn_id=smtp or "smtp_default",
                          email_from=(var("imaging_notify_email_from", "") or "").strip() or None,
                          webhook_conn_id=(var("imaging_notify_webhook_conn_id", "") or "").strip() or None)


@dataclass(frozen=True)
class FhirServer:
    """Where the optional ``fhir_update`` task sends the FHIR resources (``imaging_tasks.fhir``)."""

    base_url: str
    headers: tuple[tuple[str, str], ...] = ()
    auth: tuple[str, str] | None = None
    identifier_system: str = "urn:imaging-pipeline"
    timeout_s: float = 30.0


def fhir_server(*, get=None, connection=None) -> FhirServer | None:
    """Run time: Variable ``imaging_fhir_base_url``, else the HTTP connection ``imaging_fhir`` (host = the base URL,
    or host/port with schema ``http``/``https``; login/password = basic auth; extra ``headers`` (e.g. a bearer
    token) and ``timeout``); None when neither is set (the task then skips)."""
    var = get or _var
    system = (var("imaging_fhir_identifier_system", "") or "").strip() or "urn:imaging-pipeline"
    url = (var("imaging_fhir_base_url", "") or "").strip()
    if url:
        return FhirServer(base_url=url, identifier_system=system)
    if connection is None:
        from airflow.sdk import Connection

        try:
            connection = Connection.get("imaging_fhir")
        except Exception:  # not defined: no FHIR server
            return None
    extra = connection.extra_dejson or {}
    host = (connection.host or "").strip()
    if not host:
        raise ConfigError("connection imaging_fhir has no host: set it to the FHIR base URL (https://host/fhir)")
    if "://" not in host:
        scheme = connection.schema if connection.schema in ("http", "https") else "https"
        host = f"{scheme}://{host}" + (f":{connection.port}" if connection.port else "")
    auth = (connection.login, connection.password or "") if connection.login else None
    headers = tuple((str(k), str(v)) for k, v in (extra.get("headers") or {}).items())
    return FhirServer(base_url=host, headers=headers, auth=auth, identifier_system=system,
                      timeout_s=float(extra.get("timeout") or 30.0))


def deid_key() -> tuple[bytes, bool]:
    """The HMAC key: Connection ``imaging_deid`` password, else ``IMAGING_DEID_KEY``, else the demo key."""
    from airflow.sdk import Connection

    from imaging_tasks.deid.keys import load_key

    try:
        password = Connection.get("imaging_deid").password
    except Exception:  # connection not defined: fall back to the environment / demo key
        password = None
    return load_key(value=password or None)
