"""The "Study QC" operator extra link: from a mapped study task instance to its study's QC page.

Registered as a global operator extra link, so Airflow 3 evaluates it on the api-server, for every task of
every DAG, with the serialized operator and the task instance key: it answers only for the study tasks of the
imaging DAGs and returns ``""`` for everything else.  The api turns ``""`` into ``null`` and the 3.3 UI then
hides that button (a ``null`` link is skipped, not shown disabled).

The URL points at the app's resolver (which reads the instance's XCom to find the study), with the api-server's
``[api] base_url`` path prefix, so it works behind a proxy; being same-origin, the UI opens it in the same tab.
"""
from __future__ import annotations

from airflow.sdk import BaseOperatorLink

from imaging_dags.qc import URL_PREFIX, study_tasks, api_root_path, specialties, task_instance_path


def study_task_url(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    """The resolver URL of a study task instance, or ``""`` when the task holds no single study."""
    if dag_id not in specialties() or task_id not in study_tasks() or map_index is None or map_index < 0:
        return ""
    return api_root_path() + URL_PREFIX + task_instance_path(dag_id, run_id, task_id, map_index)


class StudyQCLink(BaseOperatorLink):
    """Extra link "Study QC" on deidentify / audit_phi / process_study / plan_tiles / tile_features / finish_slide."""

    name = "Study QC"

    def get_link(self, operator, *, ti_key) -> str:
        return study_task_url(ti_key.dag_id, ti_key.run_id, ti_key.task_id, ti_key.map_index)
