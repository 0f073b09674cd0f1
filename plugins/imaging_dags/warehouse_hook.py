"""The warehouse behind the load step: DuckDB file (embedded default) or BigQuery via the google provider."""
from __future__ import annotations

from urllib.parse import parse_qs

from airflow.sdk import BaseHook

from imaging_tasks.errors import ConfigError


class WarehouseHook(BaseHook):
    """Chooses the backend from the ``imaging_warehouse`` URI; both expose ``upsert(table, rows, replace_scope)``.

    ``duckdb:///path/file.duckdb`` or ``bigquery://PROJECT/DATASET`` (optionally ``?location=EU``); BigQuery
    goes through the Airflow connection ``gcp_conn_id`` (the google provider's BigQueryHook).
    """

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

            path, _, query = rest.partition("?")
            project, _, dataset = path.strip("/").partition("/")
            location = (parse_qs(query).get("location") or [None])[0]
            return BigQueryWarehouse(project=project, dataset=dataset, gcp_conn_id=self.gcp_conn_id,
                                     location=location)
        raise ConfigError(f"Variable imaging_warehouse={self.uri!r} is not a warehouse URI: use "
                          "duckdb:///path/file.duckdb or bigquery://PROJECT/DATASET")
