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
| nightly schedule | config ``[imaging] schedule`` | ``0 2 * * *`` |
| sensor timeout (s) | config ``[imaging] sensor_timeout`` | ``3600`` |
| landing quiet period (s): an upload is finished when nothing new arrived for this long | config ``[imaging] landing_quiet_seconds`` (read at run time); a Param / run conf ``landing_quiet_seconds`` wins | ``120`` |
| a specialty option left empty in a run (e.g. the cine model URI) | the Variable its record names (``Option.variable``: ``imaging_cine_model_uri``) | none |
| connection for ``s3://`` URIs that name none | Variable ``imaging_aws_conn_id`` | none: the provider's ambient credentials (instance role, env) |
| connection for ``gs://`` URIs that name none | Variable ``imaging_gcs_conn_id`` | none: Application Default Credentials |

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


def landing_quiet_seconds(params=None) -> float:
    """Run time: the run's Param ``landing_quiet_seconds`` if given, else ``[imaging] landing_quiet_seconds``."""
    value = (params or {}).get("landing_quiet_seconds")
    if value is None or value == "":
        value = conf.get("imaging", "landing_quiet_seconds", fallback=str(LANDING_QUIET_DEFAULT_S))
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"landing_quiet_seconds must be a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise ConfigError(f"landing_quiet_seconds must be >= 0, got {seconds}")
    return seconds


def schedule():
    """Cron with data intervals (not Airflow 3's default trigger timetable): a nightly run owns the arrivals of
    the previous day, and a backfill over a date range re-processes exactly those days."""
    from airflow.sdk import CronDataIntervalTimetable

    return CronDataIntervalTimetable(SCHEDULE_CRON, timezone="UTC")


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


def deid_key() -> tuple[bytes, bool]:
    """The HMAC key: Connection ``imaging_deid`` password, else ``IMAGING_DEID_KEY``, else the demo key."""
    from airflow.sdk import Connection

    from imaging_tasks.deid.keys import load_key

    try:
        password = Connection.get("imaging_deid").password
    except Exception:  # connection not defined: fall back to the environment / demo key
        password = None
    return load_key(value=password or None)
