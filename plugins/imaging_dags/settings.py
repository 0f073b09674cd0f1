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
| de-identification key | Connection ``imaging_deid`` (password), else env ``IMAGING_DEID_KEY`` | demo key, outputs marked DEMO |
| GPU queue / pool | config ``[imaging] gpu_queue`` / ``gpu_pool`` | ``gpu`` / ``gpu`` |
| torch device | env ``IMAGING_DEVICE`` | ``auto`` (CUDA if present) |
| nightly schedule | config ``[imaging] schedule`` | ``0 2 * * *`` |
| sensor timeout (s) | config ``[imaging] sensor_timeout`` | ``3600`` |

URIs may name an Airflow connection the ObjectStoragePath way: ``s3://aws_default@bucket/prefix``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from airflow.sdk import conf

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("IMAGING_DATA_DIR", REPO / "data"))

GPU_QUEUE = conf.get("imaging", "gpu_queue", fallback="gpu")
GPU_POOL = conf.get("imaging", "gpu_pool", fallback="gpu")
SCHEDULE_CRON = conf.get("imaging", "schedule", fallback="0 2 * * *")
SENSOR_TIMEOUT_S = conf.getint("imaging", "sensor_timeout", fallback=3600)


def schedule():
    """Cron with data intervals (not Airflow 3's default trigger timetable): a nightly run owns the arrivals of
    the previous day, and a backfill over a date range re-processes exactly those days."""
    from airflow.sdk import CronDataIntervalTimetable

    return CronDataIntervalTimetable(SCHEDULE_CRON, timezone="UTC")


def _var(name: str, default: str) -> str:
    from airflow.sdk import Variable

    return Variable.get(name, default=default)


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

        from imaging_tasks.pipeline import Lake

        return Lake(ObjectStoragePath(self.lake_uri), self.specialty)


def for_specialty(specialty: str) -> SpecialtySettings:
    """Resolve at run time (inside a task), never at parse time."""
    landing_root = _var("imaging_landing_uri", (DATA / "landing").as_uri())
    return SpecialtySettings(
        specialty=specialty,
        landing_uri=_var(f"imaging_landing_uri_{specialty}", landing_root.rstrip("/") + f"/{specialty}"),
        lake_uri=_var(f"imaging_lake_uri_{specialty}", _var("imaging_lake_uri", (DATA / "lake").as_uri())),
        warehouse_uri=_var("imaging_warehouse", "duckdb://" + str(DATA / "warehouse.duckdb")),
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
