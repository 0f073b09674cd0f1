"""Airflow plugin "imaging_qc": QC pictures, metrics, findings and lineage of the imaging DAGs in the UI.

- ``fastapi_apps``: the QC app (``imaging_dags.qc.app``) served by the api-server under ``/imaging``, behind
  Airflow's authentication and the auth manager's DAG permissions.
- ``external_views``: "Imaging QC" and "Imaging patients" (the progression timelines, ``/imaging/patients``) in
  the navigation; an "Imaging QC" tab on each DAG run and a "Study QC" tab on each task instance, opening the
  pages in the UI's iframe.  Their hrefs are relative (no leading ``/``): the UI resolves them against its
  ``<base href>``, i.e. the api-server's ``[api] base_url``; the UI fills in ``{DAG_ID}``, ``{RUN_ID}``,
  ``{TASK_ID}`` and ``{MAP_INDEX}`` (not for ``nav`` views).  The pages' own links are absolute paths under the
  api-server's root path (``/imaging/...``), so they stay inside the iframe.
- ``global_operator_extra_links``: "Study QC" on every mapped study task instance (``imaging_dags.qc.links``).

Airflow loads plugins in every component, task processes included, so this module stays light: the FastAPI app
(and Airflow's api security module it needs) is built on the first request the api-server routes to it.
"""
from __future__ import annotations

import threading

from airflow.plugins_manager import AirflowPlugin

from imaging_dags.preload import preload_for_tasks
from imaging_dags.qc import URL_PREFIX
from imaging_dags.qc.links import StudyQCLink

preload_for_tasks()  # torch, in a scheduler (LocalExecutor) or Celery worker only: its task processes inherit it


class QCApp:
    """ASGI app that builds the QC FastAPI app on first use (see the module docstring)."""

    def __init__(self):
        self._app = None
        self._lock = threading.Lock()

    @property
    def app(self):
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from imaging_dags.qc.app import create_app

                    self._app = create_app()
        return self._app

    async def __call__(self, scope, receive, send):
        from imaging_dags.settings import object_storage

        with object_storage():  # lake URIs (with the connection they name) open for this request only
            await self.app(scope, receive, send)


qc_app = QCApp()
HREF = URL_PREFIX.lstrip("/")


class ImagingQCPlugin(AirflowPlugin):
    name = "imaging_qc"
    fastapi_apps = [{"app": qc_app, "url_prefix": URL_PREFIX, "name": "Imaging QC"}]
    external_views = [
        {"name": "Imaging QC", "href": f"{HREF}/", "destination": "nav", "url_route": "imaging-qc",
         "nav_top_level": True},
        {"name": "Imaging patients", "href": f"{HREF}/patients", "destination": "nav",
         "url_route": "imaging-patients", "nav_top_level": True},
        {"name": "Imaging QC", "href": f"{HREF}/dags/{{DAG_ID}}/runs/{{RUN_ID}}", "destination": "dag_run",
         "url_route": "imaging-qc-run"},
        {"name": "Study QC", "href": f"{HREF}/dags/{{DAG_ID}}/runs/{{RUN_ID}}/tasks/{{TASK_ID}}/{{MAP_INDEX}}",
         "destination": "task_instance", "url_route": "imaging-qc-study"},
    ]
    global_operator_extra_links = [StudyQCLink()]
