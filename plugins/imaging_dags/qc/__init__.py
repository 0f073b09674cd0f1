"""QC and results in the Airflow UI: a FastAPI app served by the api-server (``/imaging``), external views and a
"Study QC" operator extra link, registered by ``plugins/imaging_qc_plugin.py``.

Pages, all behind Airflow's own authentication (UI session cookie or ``Authorization: Bearer <JWT>``) and the
auth manager's read access to the DAG:

| route (under ``/imaging``) | what |
|---|---|
| ``/`` | the four specialties and their recent runs (metadata DB) |
| ``/dags/{dag_id}/runs/{run_id}`` (+ ``/run.json``) | the run's studies: status, key metrics, first QC picture, device, duration (lineage rows + XComs); the specialty's quarantine reasons |
| ``/dags/{dag_id}/studies/{patient}/{study}`` (+ ``/study.json``) | QC pictures, metrics, findings, de-identification summary, lineage |
| ``/dags/{dag_id}/studies/{patient}/{study}/files/{name}`` | one output listed in the study's ``_MANIFEST.json`` (checksum verified); anything else is 404 |
| ``/dags/{dag_id}/runs/{run_id}/tasks/{task_id}/{map_index}`` | a mapped study task instance -> its study page (or why there is none) |
| ``/status/study/{study}``, ``/status/{patient}`` | JSON: where a study (or each study of a patient) is in the ledger, with links (``qc/status.py``) |
| ``/patients``, ``/patients/{patient}`` | progression: the patients with sessions, and a patient's timeline (ROI trajectories, cognitive scores, stored predictions at their horizons) as charts (``qc/progression.py``) |
| ``/patient-timeline/{patient}`` | JSON: the same timeline |
| ``POST /predict-progression`` | JSON: predictions on demand for ``{"patient_id"}`` with the configured model (``imaging_progression_model_uri``) |

What is never shown: raw landing paths or names (``reason.json``'s ``source_uri``), bytes of the anonymized or
quarantine zones, anything outside ``derived/`` that a manifest does not list.  The api-server reads the lake
through ``imaging_tasks.storage`` (``file://``, ``s3://``, ``gs://``) with the same Variables and connections as the
tasks, so it needs read access (list + get) to ``derived/``, ``runs/``, ``quarantine/*/reason.json`` and
``anonymized/*/*/*/_DEID.json`` of the lake; never to the landing bucket.

This module stays light (no FastAPI): Airflow loads plugins in every component, including each task process.
"""
from __future__ import annotations

from urllib.parse import quote

URL_PREFIX = "/imaging"
# mapped tasks whose instances each hold one study (the per-slide chain included), besides the
# processing steps the specialties' records declare
COMMON_STUDY_TASKS = ("deidentify", "audit_phi", "plan_tiles", "tile_features", "finish_slide")


def specialties() -> tuple[str, ...]:
    from imaging_tasks.specialties import names

    return names()


def study_tasks() -> tuple[str, ...]:
    from imaging_tasks.specialties import get

    steps = {s.name for name in specialties() for s in get(name).steps}
    return (*COMMON_STUDY_TASKS, *sorted(steps - set(COMMON_STUDY_TASKS)))


def final_tasks() -> tuple[str, ...]:
    """The tasks that publish a study: each record's last step, and the tile fan-out's per-study summary."""
    from imaging_tasks.specialties import get

    return ("finish_slide", *sorted({get(name).steps[-1].name for name in specialties()}))


def api_root_path() -> str:
    """Path prefix of the api-server (``[api] base_url``), without the trailing slash: ``""`` or ``"/airflow"``."""
    from urllib.parse import urlsplit

    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def seg(text) -> str:
    """One URL path segment, percent-encoded (run ids hold ``:`` and ``+``)."""
    return quote(str(text), safe="")


def task_instance_path(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    """Path of the task-instance resolver, relative to the app's mount point."""
    return f"/dags/{seg(dag_id)}/runs/{seg(run_id)}/tasks/{seg(task_id)}/{int(map_index)}"
