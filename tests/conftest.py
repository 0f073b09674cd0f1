"""Test environment: a throw-away Airflow home (SQLite), the repo's DAGs and plugins, tmp buckets.

Environment variables are set before anything imports Airflow, as Airflow reads its config at import.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cloud_servers import *  # noqa: F401,F403  S3 (moto) and GCS (fake-gcs-server) fixtures for tests/test_cloud_storage.py

REPO = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="imaging-airflow-home-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.update({
    "AIRFLOW_HOME": str(_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    "IMAGING_DEVICE": "auto",
})
os.environ.pop("IMAGING_DEID_KEY", None)
os.environ["IMAGING_DEID_DEMO"] = "1"  # synthetic data only; tests of the refusal unset it
for p in (str(REPO / "plugins"), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(scope="session")
def airflow_db():
    """Migrate the SQLite metadata DB once per session (what `airflow db migrate` does for users)."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    return _HOME


@pytest.fixture()
def buckets(tmp_path, monkeypatch):
    """Landing, lake and warehouse in tmp, configured the way users do: AIRFLOW_VAR_* variables."""
    landing, lake, warehouse = tmp_path / "landing", tmp_path / "lake", tmp_path / "warehouse.duckdb"
    landing.mkdir()
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_LANDING_URI", landing.as_uri())
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_LAKE_URI", lake.as_uri())
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_WAREHOUSE", f"duckdb://{warehouse}")
    return {"landing": landing, "lake": lake, "warehouse": warehouse, "truth": landing / "_truth"}


@contextlib.contextmanager
def api_server_client():
    """The api-server app (core APIs, plugins, auth manager) as a test client, and JWTs of an admin (``admin``) and
    of a user with no role (``no_role``): ``with api_server_client() as (client, tokens)``."""
    from airflow.api_fastapi.app import create_app, get_auth_manager, purge_cached_app
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    app = create_app(apps="core")
    manager = get_auth_manager()
    tokens = {"admin": manager.generate_jwt(SimpleAuthManagerUser(username="admin", role="admin")),
              "no_role": manager.generate_jwt(SimpleAuthManagerUser(username="nobody", role=None))}
    try:
        with TestClient(app) as client:
            yield client, tokens
    finally:
        purge_cached_app()
