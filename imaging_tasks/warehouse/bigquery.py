"""BigQuery store: the same schema, upsert keys and API as :class:`~imaging_tasks.warehouse.DuckDBWarehouse`.

Plain Python: the caller passes a ``google.cloud.bigquery.Client`` in.  Airflow builds it from its connection
(``imaging_dags.warehouse_hook.WarehouseHook``, through the google provider's ``BigQueryHook``); outside Airflow,
:func:`imaging_tasks.warehouse.open_warehouse` builds it from ambient credentials.

A load of one table is

1. a **batch load job** (newline-delimited JSON uploaded with the job, ``WRITE_TRUNCATE``) into a staging
   table of its own; never streaming inserts, so rows are visible to DML at once and loads cost nothing;
2. **one MERGE** of the staging rows into the target on the table's key: a re-run or retry updates the
   same rows, never adds any.  With ``replace_scope`` (a reprocessed study) the same statement also deletes
   the target rows of that scope that the new load no longer has, so replacing a study is atomic and
   idempotent (one DML statement: no window without the study's rows, no half-applied state).  A scope
   named in ``scopes`` that has no new rows at all (a study reprocessed into no findings) is emptied by one
   DELETE of those scopes;
3. the staging table is dropped (and expires after a day if even that fails).

Tables are created from :data:`imaging_tasks.warehouse.TABLES` (the DuckDB default's definitions):
partitioned by the day of ``loaded_at`` and clustered by specialty / modality / study where they have them.

There is no multi-table transaction in BigQuery: :meth:`BigQueryWarehouse.transaction` yields the store
itself, and each upsert (one MERGE) applies on its own; each MERGE converges when rerun, so a load interrupted
between two tables is completed by running it again.

Transient faults: google-cloud-bigquery already retries every API call (job insert, polling, table calls) on
429/5xx/connection errors for up to 10 minutes, and re-runs a query job (the MERGE/DELETE) that failed for a
transient reason.  What it does not cover is retried here with :mod:`imaging_tasks.retry`: a load job that
failed server-side for a transient reason (``backendError``...) or whose upload broke off is run again (it
replaces the staging table, so twice is once); a DML statement is re-run on a transient error the client gave
back and on a concurrent-update conflict (``DML_ATTEMPTS`` in all).  A re-run MERGE cannot duplicate rows:
it matches on the table key, so it updates the rows the first run inserted.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
import time  # noqa: F401 - tests stub time.sleep through this module (the retry waits use it)
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator

from imaging_tasks import retry
from imaging_tasks.errors import ConfigError
from imaging_tasks.warehouse.schema import TABLES, Table, prepare_rows, replaced_scopes

if TYPE_CHECKING:
    from google.cloud.bigquery import Client

log = logging.getLogger(__name__)

BQ_MODE = {True: "REQUIRED", False: "NULLABLE"}
STAGING_PREFIX = "_staging_"
STAGING_TTL = dt.timedelta(days=1)
STALE = "_imaging_stale"  # marks target rows of a replaced scope inside the MERGE source
DML_ATTEMPTS = 4  # concurrent DML on the same partitions may fail to serialize; ours is idempotent
# waits of 1-2, 2-4, 4-8 s between DML attempts; a load job is re-run with imaging_tasks.retry.DEFAULT
DML_POLICY = retry.Policy(attempts=DML_ATTEMPTS, initial_s=2.0, multiplier=2.0, max_wait_s=30.0, budget_s=600.0)


def is_serialization_conflict(exc: BaseException) -> bool:
    """Concurrent DML on the same table/partitions (BigQuery: "Could not serialize access ...")."""
    return "could not serialize access" in str(exc).lower()


def dml_retryable(exc: BaseException) -> bool:
    """A DML statement is worth re-running after a serialization conflict or a transient fault."""
    return is_serialization_conflict(exc) or retry.is_transient(exc)


# --------------------------------------------------------------------------- definitions (REST JSON)
def bq_schema(table: Table) -> list[dict]:
    """The table's schema as BigQuery REST ``TableFieldSchema`` JSON."""
    return [{"name": c.name, "type": c.type, "mode": BQ_MODE[c.required], "description": c.description}
            for c in table.columns]


def table_resource(project: str, dataset: str, table: Table) -> dict:
    """The REST ``Table`` resource the warehouse creates: schema, day partitions on ``loaded_at``, clustering."""
    resource = {
        "tableReference": {"projectId": project, "datasetId": dataset, "tableId": table.name},
        "description": table.description,
        "schema": {"fields": bq_schema(table)},
        "timePartitioning": {"type": "DAY", "field": table.partition_column},
    }
    if table.clustering:
        resource["clustering"] = {"fields": list(table.clustering)}
    return resource


def load_job_config(table: Table) -> dict:
    """REST ``JobConfiguration`` of the staging load: batch NDJSON, explicit schema, replace the staging table."""
    return {"load": {
        "sourceFormat": "NEWLINE_DELIMITED_JSON",
        "writeDisposition": "WRITE_TRUNCATE",
        "createDisposition": "CREATE_IF_NEEDED",
        "schema": {"fields": bq_schema(table)},
        "ignoreUnknownValues": False,
        "maxBadRecords": 0,
    }}


def _q(name: str) -> str:
    return f"`{name}`"


def merge_sql(target: str, table: Table, staging: str, replace_scope: tuple[str, ...] = ()) -> str:
    """One MERGE of ``staging`` into ``target`` (both ``project.dataset.table``) on the table key.

    With ``replace_scope``, the source also carries the target rows of every scope present in the staging
    table whose key the staging table lacks, flagged ``_imaging_stale``: those are deleted by the same
    statement.  Running it twice leaves the same rows.
    """
    cols = table.column_names
    unknown = [k for k in replace_scope if k not in cols]
    if unknown:
        raise ValueError(f"{table.name}: replace_scope column(s) {unknown} not in the table")
    col_list = ", ".join(cols)
    on = " AND ".join(f"T.{k} = S.{k}" for k in table.key)
    update = ", ".join(f"{c} = S.{c}" for c in cols if c not in table.key)
    source = f"SELECT {col_list}, FALSE AS {STALE} FROM {_q(staging)}"
    if replace_scope:
        in_scope = " AND ".join(f"N.{k} = O.{k}" for k in replace_scope)
        same_key = " AND ".join(f"N.{k} = O.{k}" for k in table.key)
        source += (f"\n  UNION ALL\n  SELECT {', '.join('O.' + c for c in cols)}, TRUE AS {STALE} FROM {_q(target)} O"
                   f"\n  WHERE EXISTS (SELECT 1 FROM {_q(staging)} N WHERE {in_scope})"
                   f"\n    AND NOT EXISTS (SELECT 1 FROM {_q(staging)} N WHERE {same_key})")
    return (f"MERGE {_q(target)} T\nUSING (\n  {source}\n) S\nON {on}\n"
            + (f"WHEN MATCHED AND S.{STALE} THEN DELETE\n" if replace_scope else "")
            + (f"WHEN MATCHED THEN UPDATE SET {update}\n" if update else "")
            + f"WHEN NOT MATCHED AND NOT S.{STALE} THEN INSERT ({col_list}) VALUES ({', '.join('S.' + c for c in cols)})")


# --------------------------------------------------------------------------- rows
def _value(value, type_: str):
    if value is None:
        return None
    if type_ == "TIMESTAMP":
        return value.isoformat() if hasattr(value, "isoformat") else str(value)
    if type_ == "JSON":  # the JSON value itself (not a string holding it), as BigQuery's NDJSON load expects
        return json.loads(json.dumps(value, sort_keys=True, default=str))
    if type_ == "FLOAT64":
        value = float(value)
        # JSON has no NaN/Infinity literals: quoted "nan"/"inf"/"-inf", as google-cloud-bigquery sends them
        return value if math.isfinite(value) else str(value)
    if type_ == "INT64":
        return int(value)
    if type_ == "BOOL":
        return bool(value)
    return str(value)


def to_ndjson(table: Table, rows: Iterable[dict]) -> bytes:
    """Newline-delimited JSON of the rows, every column of the schema present."""
    return b"".join(json.dumps({c.name: _value(row.get(c.name), c.type) for c in table.columns},
                               separators=(",", ":")).encode() + b"\n" for row in rows)


# --------------------------------------------------------------------------- warehouse
class BigQueryWarehouse:
    """The warehouse in a BigQuery dataset, through ``client`` (a ``google.cloud.bigquery.Client``).

    ``upsert(table, rows, replace_scope=..., scopes=...)``, ``transaction()``, ``query``, ``count``: the
    :class:`~imaging_tasks.warehouse.Warehouse` API.  Tables are ``project.dataset.<table>``; a missing
    dataset is created in ``location`` (the client's default location when ``None``).
    """

    def __init__(self, client: "Client", *, project: str, dataset: str, location: str | None = None):
        if not project or not dataset:
            raise ConfigError("a BigQuery warehouse needs a project and a dataset: bigquery://PROJECT/DATASET")
        self.client = client
        self.project, self.dataset, self.location = project, dataset, location
        self._ready: set[str] = set()
        self.jobs: list[str] = []  # ids of the jobs this warehouse ran (load, merge), for logs and tests

    def __repr__(self) -> str:
        return f"BigQueryWarehouse({self._where!r})"

    # ---------------------------------------------------------------- tables
    def table_id(self, name: str) -> str:
        return f"{self.project}.{self.dataset}.{name}"

    def ensure_dataset(self) -> None:
        from google.api_core.exceptions import NotFound
        from google.cloud import bigquery

        if "" in self._ready:
            return
        try:
            self.client.get_dataset(f"{self.project}.{self.dataset}")
        except NotFound:
            ds = bigquery.Dataset(f"{self.project}.{self.dataset}")
            if self.location:
                ds.location = self.location
            self.client.create_dataset(ds, exists_ok=True)
        self._ready.add("")

    def ensure_table(self, table: Table) -> None:
        """Create the table from the schema definitions; add columns an older table lacks."""
        from google.api_core.exceptions import NotFound
        from google.cloud import bigquery

        if table.name in self._ready:
            return
        self.ensure_dataset()
        want = bigquery.Table.from_api_repr(table_resource(self.project, self.dataset, table))
        try:
            have = self.client.get_table(self.table_id(table.name))
        except NotFound:
            self.client.create_table(want, exists_ok=True)
        else:
            names = {f.name for f in have.schema}
            missing = [c for c in table.columns if c.name not in names]
            for c in missing:  # added NULLABLE in place (existing rows read NULL); one DDL statement each
                self.client.query(f"ALTER TABLE {_q(self.table_id(table.name))} "
                                  f"ADD COLUMN IF NOT EXISTS {c.name} {c.type}").result()
            if missing:  # a fresh etag for the update below
                have = self.client.get_table(self.table_id(table.name))
            part = have.time_partitioning
            if part is None or part.field != table.partition_column:
                log.warning("BigQuery table %s is not partitioned by %s: recreate it (CREATE TABLE ... PARTITION BY "
                            "DATE(%s) AS SELECT ...) to get partition pruning", have.full_table_id,
                            table.partition_column, table.partition_column)
            if list(have.clustering_fields or []) != list(table.clustering):
                have.clustering_fields = list(table.clustering) or None
                self.client.update_table(have, ["clustering_fields"])
        self._ready.add(table.name)

    # ---------------------------------------------------------------- load
    def upsert(self, table_name: str, rows, *, replace_scope: tuple[str, ...] = (),
               scopes: Iterable[tuple] | None = None) -> int:
        """Batch-load ``rows`` into a staging table, then MERGE them on the key (see the module docstring).

        ``scopes`` names scopes replaced even though no new row has them (a reprocessed study that now has no
        findings): their rows are deleted by one DELETE statement.
        """
        table = TABLES[table_name]
        prepared = prepare_rows(table, rows, loaded_at=dt.datetime.now(dt.timezone.utc))
        replaced = replaced_scopes(table, prepared, replace_scope, scopes)
        self.ensure_table(table)  # even for no rows: like DuckDB, every table exists after a load
        if prepared:
            self._stage_and_merge(table, prepared, tuple(replace_scope))
        with_rows = {tuple(row[k] for k in replace_scope) for row in prepared}
        emptied = [scope for scope in replaced if scope not in with_rows]
        for start in range(0, len(emptied), 500):
            self._delete_scopes(table, tuple(replace_scope), emptied[start:start + 500])
        return len(prepared)

    def _delete_scopes(self, table: Table, replace_scope: tuple[str, ...], scopes: list[tuple]) -> None:
        from google.cloud import bigquery

        one = "(" + " AND ".join(f"{k} = ?" for k in replace_scope) + ")"
        sql = f"DELETE FROM {_q(self.table_id(table.name))} WHERE " + " OR ".join([one] * len(scopes))
        config = bigquery.QueryJobConfig(query_parameters=[_param(v) for scope in scopes for v in scope])
        self._dml(sql, f"imaging_delete_{table.name}_", config)

    def _stage_and_merge(self, table: Table, prepared: list[dict], replace_scope: tuple[str, ...]) -> None:
        from google.cloud import bigquery

        staging = self.table_id(f"{STAGING_PREFIX}{table.name}_{uuid.uuid4().hex[:16]}")
        merge = merge_sql(self.table_id(table.name), table, staging, replace_scope)
        client = self.client
        try:
            stage = bigquery.Table(staging, schema=bigquery.Table.from_api_repr(
                table_resource(self.project, self.dataset, table)).schema)
            stage.expires = dt.datetime.now(dt.timezone.utc) + STAGING_TTL
            client.create_table(stage, exists_ok=True)
            payload = to_ndjson(table, prepared)

            def load_staging() -> None:  # WRITE_TRUNCATE into our own staging table: a re-run replaces it
                job = client.load_table_from_file(
                    io.BytesIO(payload), staging, rewind=True,
                    job_config=bigquery.LoadJobConfig.from_api_repr(load_job_config(table)),
                    job_id_prefix=f"imaging_stage_{table.name}_")
                self.jobs.append(job.job_id)
                job.result()

            retry.call(load_staging, operation=f"load staging of {table.name}", target=self._where)
            self._dml(merge, f"imaging_merge_{table.name}_")
        finally:
            client.delete_table(staging, not_found_ok=True)

    @property
    def _where(self) -> str:
        return f"bigquery://{self.project}/{self.dataset}"

    def _dml(self, sql: str, job_id_prefix: str, job_config=None) -> None:
        """Run one (idempotent) DML statement; re-run it (``DML_ATTEMPTS`` in all) when concurrent DML on the
        table made it fail to serialize, or a transient fault (5xx, 429, connection reset, a job failed with
        ``backendError``) got past the client's own retries.  Other errors (bad SQL, 403, 404) raise at once."""
        def run_once() -> None:
            job = self.client.query(sql, job_config=job_config, job_id_prefix=job_id_prefix)
            self.jobs.append(job.job_id)
            job.result()

        retry.call(run_once, operation=job_id_prefix.rstrip("_"), target=self._where, policy=DML_POLICY,
                   retry_if=dml_retryable)

    @contextmanager
    def transaction(self) -> Iterator["BigQueryWarehouse"]:
        """``with wh.transaction() as tx: tx.upsert(...)``, as with DuckDB, but not atomic across tables:
        yields the store itself, and each upsert is one MERGE that applies on its own.  Each MERGE converges
        when rerun (it matches on the table key; scope replacement is part of the same statement), so a load
        that stopped half-way is completed, not duplicated, by running it again."""
        yield self

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        """Run a GoogleSQL query; ``?`` placeholders take ``params`` (as in the DuckDB warehouse)."""
        from google.cloud import bigquery

        config = bigquery.QueryJobConfig(query_parameters=[_param(v) for v in params or []])
        return [tuple(r.values()) for r in self.client.query(sql, job_config=config).result()]

    def ref(self, table_name: str, *, create: bool = False) -> str:
        if create:  # tables are made on their first load: one nothing was loaded into yet reads empty
            self.ensure_table(TABLES[table_name])
        return _q(self.table_id(TABLES[table_name].name))

    def count(self, table_name: str, where: str = "", params: list | None = None) -> int:
        return self.query(f"SELECT count(*) FROM {self.ref(table_name, create=True)} {where}", params)[0][0]


def _param(value):
    from google.cloud import bigquery

    type_ = {bool: "BOOL", int: "INT64", float: "FLOAT64"}.get(type(value), "STRING")
    return bigquery.ScalarQueryParameter(None, type_, value)
