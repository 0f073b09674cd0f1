"""The warehouse behind the load step, from the ``imaging_warehouse`` URI and an Airflow connection.

The stores themselves are plain Python in :mod:`imaging_tasks.warehouse`; this hook only builds BigQuery's
client from the Airflow connection (the google provider's ``BigQueryHook``) and passes it in.
"""
from __future__ import annotations

from airflow.sdk import BaseHook

from imaging_tasks.errors import ConfigError
from imaging_tasks.warehouse import Warehouse, WarehouseURI, open_warehouse, parse_warehouse_uri


class WarehouseHook(BaseHook):
    """The store a warehouse URI names, with the same parsing as :func:`imaging_tasks.warehouse.open_warehouse`.

    ``duckdb:///path/file.duckdb`` or ``bigquery://PROJECT/DATASET`` (optionally ``?location=EU``); BigQuery
    goes through the Airflow connection ``gcp_conn_id`` (its credentials; jobs run in the URI's project).
    """

    def __init__(self, uri: str, gcp_conn_id: str = "google_cloud_default"):
        super().__init__()
        self.uri, self.gcp_conn_id = uri, gcp_conn_id

    def get_conn(self) -> Warehouse:
        if "://" not in self.uri:  # a bare path would be relative to whichever worker runs the task
            raise ConfigError(f"Variable imaging_warehouse={self.uri!r} is not a warehouse URI: use "
                              "duckdb:///path/file.duckdb or bigquery://PROJECT/DATASET")
        try:
            parse_warehouse_uri(self.uri)
        except ConfigError as exc:
            raise ConfigError(f"Variable imaging_warehouse: {exc}") from None
        return open_warehouse(self.uri, bigquery_client=self.bigquery_client)

    def bigquery_client(self, where: WarehouseURI):
        """A ``google.cloud.bigquery.Client`` for the URI's project and location, with the credentials of the
        Airflow connection ``gcp_conn_id``."""
        from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

        kwargs = {"location": where.location} if where.location else {}
        hook = BigQueryHook(gcp_conn_id=self.gcp_conn_id, use_legacy_sql=False, **kwargs)
        return hook.get_client(project_id=where.project, location=where.location or hook.location)
