"""BigQuery backend: the same schema and upsert keys as DuckDB, through the google provider's hook.

Rows are loaded into a staging table and MERGEd on the table key, so re-runs replace rather than add.
"""
from __future__ import annotations

import json
import uuid

from imaging_tasks.warehouse.schema import TABLES, Table

BQ_MODE = {True: "REQUIRED", False: "NULLABLE"}


def bq_schema(table: Table) -> list[dict]:
    return [{"name": c.name, "type": c.type, "mode": BQ_MODE[c.required], "description": c.description}
            for c in table.columns]


def merge_sql(dataset: str, table: Table, staging: str, replace_scope: tuple[str, ...] = ()) -> str:
    cols = table.column_names
    on = " AND ".join(f"T.{k} = S.{k}" for k in table.key)
    update = ", ".join(f"{c} = S.{c}" for c in cols if c not in table.key)
    delete = ""
    if replace_scope:
        scope = " AND ".join(f"T.{k} = S.{k}" for k in replace_scope)
        delete = (f"DELETE FROM `{dataset}.{table.name}` T WHERE EXISTS "
                  f"(SELECT 1 FROM `{dataset}.{staging}` S WHERE {scope});\n")
    return (f"{delete}MERGE `{dataset}.{table.name}` T USING `{dataset}.{staging}` S ON {on} "
            f"WHEN MATCHED THEN UPDATE SET {update} "
            f"WHEN NOT MATCHED THEN INSERT ({', '.join(cols)}) VALUES ({', '.join('S.' + c for c in cols)})")


class BigQueryWarehouse:
    def __init__(self, *, project: str, dataset: str, gcp_conn_id: str = "google_cloud_default"):
        if not project or not dataset:
            raise ValueError("imaging_warehouse must look like bigquery://PROJECT/DATASET")
        self.project, self.dataset, self.gcp_conn_id = project, dataset, gcp_conn_id

    def _client(self):
        from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

        return BigQueryHook(gcp_conn_id=self.gcp_conn_id).get_client(project_id=self.project)

    def upsert(self, table_name: str, rows, *, replace_scope: tuple[str, ...] = ()) -> int:
        from google.cloud import bigquery

        rows = [{k: (json.dumps(v, default=str) if TABLES[table_name].columns[i].type == "JSON" and v is not None
                     else (v.isoformat() if hasattr(v, "isoformat") else v))
                 for i, (k, v) in enumerate((c.name, r.get(c.name)) for c in TABLES[table_name].columns)}
                for r in rows]
        if not rows:
            return 0
        table = TABLES[table_name]
        client = self._client()
        dataset = f"{self.project}.{self.dataset}"
        client.create_dataset(dataset, exists_ok=True)
        schema = [bigquery.SchemaField(f["name"], f["type"], mode=f["mode"], description=f["description"])
                  for f in bq_schema(table)]
        client.create_table(bigquery.Table(f"{dataset}.{table.name}", schema=schema), exists_ok=True)
        staging = f"_stage_{table.name}_{uuid.uuid4().hex[:12]}"
        job = client.load_table_from_json(rows, f"{dataset}.{staging}",
                                          job_config=bigquery.LoadJobConfig(schema=schema))
        job.result()
        try:
            client.query(merge_sql(dataset, table, staging, replace_scope)).result()
        finally:
            client.delete_table(f"{dataset}.{staging}", not_found_ok=True)
        return len(rows)
