"""The ``@dag`` arguments every imaging DAG shares, in one place; a DAG file states only its specialty and chain."""
from __future__ import annotations

import pendulum
from airflow.sdk import dag

from imaging_dags.docs import dag_doc
from imaging_dags.notifiers import notify_run_failed, notify_run_succeeded, notify_task_failure
from imaging_dags.params import specialty_params
from imaging_dags.settings import schedule
from imaging_dags.tasks import SPECIALTY_DEFAULTS


def imaging_dag(specialty: str, *, summary: str):
    """``@imaging_dag(SPECIALTY, summary=__doc__)``: nightly data-interval schedule (or an upload's storage
    notification, when a queue is configured: ``imaging_dags.events``), no catch-up, one active run,
    the shared task defaults (owner, retries with backoff, timeouts), tags, the Params of the specialty's record
    (its options with the common ones), its description, and ``doc_md`` from ``summary`` (the DAG file's
    docstring), the Params and what the warehouse holds for it.  Notifications (``imaging_dags.notifiers``): a
    task failing after its retries, and the end of each run, succeeded or failed."""
    from imaging_tasks.specialties import get

    record = get(specialty)
    params = specialty_params(specialty)
    return dag(dag_id=specialty, schedule=schedule(specialty), start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
               catchup=False, max_active_runs=1, params=params,
               default_args={**SPECIALTY_DEFAULTS, "on_failure_callback": notify_task_failure},
               on_success_callback=notify_run_succeeded, on_failure_callback=notify_run_failed,
               tags=["imaging", specialty], description=f"{record.summary}; de-identified, to the warehouse",
               doc_md=dag_doc(specialty, summary, params, record.results))
