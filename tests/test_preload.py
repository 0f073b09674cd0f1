"""Which processes preload torch for the task processes they fork (``imaging_dags.preload``); the real scheduler
is checked in tests/test_progression_airflow.py."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("argv, executor, expected", [
    (["/venv/bin/airflow", "scheduler"], "LocalExecutor", True),
    (["airflow", "scheduler"], "airflow.executors.local_executor.LocalExecutor", True),
    (["airflow", "scheduler"], "CeleryExecutor,LocalExecutor", True),
    (["airflow", "scheduler"], "CeleryExecutor", False),  # Celery workers fork the tasks, not the scheduler
    (["airflow", "celery", "worker", "--queues", "gpu"], "CeleryExecutor", True),
    (["airflow", "celery", "flower"], "CeleryExecutor", False),
    (["airflow", "dag-processor"], "LocalExecutor", False),
    (["airflow", "api-server"], "LocalExecutor", False),
    (["airflow", "triggerer"], "LocalExecutor", False),
    (["airflow", "tasks", "test", "scheduler_dag", "t"], "LocalExecutor", False),
    (["pytest", "tests/"], "LocalExecutor", False),
])
def test_only_the_process_that_forks_task_processes_preloads(argv, executor, expected):
    from imaging_dags.preload import forks_task_processes

    assert forks_task_processes(argv, executor) is expected


def test_the_setting_turns_it_off_and_a_bad_value_only_logs(monkeypatch, caplog):
    import sys

    from imaging_dags import preload

    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh scheduler
    imported = []
    monkeypatch.setattr(preload.importlib, "import_module", lambda name: imported.append(name))
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    monkeypatch.setenv("AIRFLOW__IMAGING__PRELOAD_TORCH", "false")
    assert preload.preload_for_tasks(["airflow", "scheduler"]) is False and imported == []
    monkeypatch.setenv("AIRFLOW__IMAGING__PRELOAD_TORCH", "maybe")
    assert preload.preload_for_tasks(["airflow", "scheduler"]) is False and imported == []
    assert "must be true or false" in caplog.text
    monkeypatch.delenv("AIRFLOW__IMAGING__PRELOAD_TORCH")
    assert preload.preload_for_tasks(["airflow", "dag-processor"]) is False and imported == []
    assert preload.preload_for_tasks(["airflow", "scheduler"]) is True and imported == ["torch"]
