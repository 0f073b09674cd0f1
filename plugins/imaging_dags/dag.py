"""The ``@dag`` arguments every imaging DAG shares, in one place; a DAG file states only what is its own."""
from __future__ import annotations

import pendulum
from airflow.sdk import dag

from imaging_dags.docs import dag_doc
from imaging_dags.settings import schedule
from imaging_dags.tasks import SPECIALTY_DEFAULTS


def imaging_dag(specialty: str, *, summary: str, description: str, params: dict, results: str):
    """``@imaging_dag(SPECIALTY, ...)``: nightly data-interval schedule, no catch-up, one active run, the shared
    task defaults (owner, retries with backoff, timeouts), tags, and ``doc_md`` built from ``summary`` (the DAG
    file's docstring), its Params and ``results`` (what the warehouse holds for it)."""
    return dag(dag_id=specialty, schedule=schedule(), start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
               catchup=False, max_active_runs=1, params=params, default_args=SPECIALTY_DEFAULTS,
               tags=["imaging", specialty], description=description,
               doc_md=dag_doc(specialty, summary, params, results))
