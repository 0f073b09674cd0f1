"""The warehouse behind the load step: DuckDB file (embedded default) or BigQuery via the google provider."""
from __future__ import annotations

from airflow.sdk import BaseHook


class WarehouseHook(BaseHook):
    """Chooses the backend from the ``imaging_warehouse`` URI; both expose ``upsert(table, rows, replace_scope)``."""

    def __init__(self, uri: str, gcp_conn_id: str = "google_cloud_default"):
        super().__init__()
        self.uri, self.gcp_conn_id = uri, gcp_conn_id

    def get_conn(self):
        scheme, _, rest = self.uri.partition("://")
        if scheme == "duckdb":
            from imaging_tasks.warehouse import DuckDBWarehouse

            return DuckDBWarehouse(rest)
        if scheme == "bigquery":
            from imaging_dags.bigquery import BigQueryWarehouse

            project, _, dataset = rest.partition("/")
            return BigQueryWarehouse(project=project, dataset=dataset, gcp_conn_id=self.gcp_conn_id)
        raise ValueError(f"imaging_warehouse={self.uri!r}: use duckdb:///path/file.duckdb or bigquery://project/dataset")
