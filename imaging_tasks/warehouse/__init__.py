"""The metadata warehouse: one schema (:mod:`.schema`), loaded by upsert into DuckDB (embedded) or BigQuery.

Two stores with one API (:class:`Warehouse`): :class:`DuckDBWarehouse` (a file; :mod:`.duckdb_store`) and
:class:`BigQueryWarehouse` (a dataset, through a ``google.cloud.bigquery.Client`` passed in; :mod:`.bigquery`).
Neither imports Airflow.  :func:`open_warehouse` picks one from a path or URI::

    data/warehouse.duckdb                    DuckDB file (a bare path)
    duckdb:///abs/path/warehouse.duckdb      DuckDB file
    bigquery://PROJECT/DATASET?location=EU   BigQuery dataset (``?location=`` optional)

Airflow's ``imaging_dags.warehouse_hook.WarehouseHook`` parses the same URIs (:func:`parse_warehouse_uri`) and
only builds the BigQuery client from its Airflow connection.
"""
from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, runtime_checkable
from urllib.parse import parse_qs

from imaging_tasks.errors import ConfigError
from imaging_tasks.warehouse.bigquery import BigQueryWarehouse
from imaging_tasks.warehouse.duckdb_store import DuckDBWarehouse
from imaging_tasks.warehouse.schema import TABLES, Column, Table

if TYPE_CHECKING:
    from google.cloud.bigquery import Client

__all__ = ["TABLES", "Column", "Table", "Upserter", "Warehouse", "DuckDBWarehouse", "BigQueryWarehouse",
           "WarehouseURI", "parse_warehouse_uri", "open_warehouse"]


@runtime_checkable
class Upserter(Protocol):
    """What a load writes through: the store itself, or what its :meth:`Warehouse.transaction` yields."""

    def upsert(self, table_name: str, rows: Iterable[dict], *, replace_scope: tuple[str, ...] = (),
               scopes: Iterable[tuple] | None = None) -> int:
        """Insert or update ``rows`` of ``table_name`` (a name in :data:`TABLES`) on the table's key; returns the
        number of rows written.  With ``replace_scope`` (e.g. ``("specialty", "study_id")``) rows of a scope
        present in ``rows`` that the new rows no longer have are deleted; ``scopes`` (values of
        ``replace_scope``) are emptied even when no new row has them.  Rerunning the same upsert changes
        nothing more.  Every row is stamped with ``loaded_at``."""
        ...


@runtime_checkable
class Warehouse(Upserter, Protocol):
    """The API both stores expose (:class:`DuckDBWarehouse`, :class:`BigQueryWarehouse`)."""

    def transaction(self) -> AbstractContextManager[Upserter]:
        """``with wh.transaction() as tx: tx.upsert(...); tx.upsert(...)``.  DuckDB: one real transaction,
        every table or none.  BigQuery: yields the store itself; each MERGE converges when rerun."""
        ...

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        """Rows of a query in the store's dialect; ``?`` placeholders take ``params``."""
        ...

    def ref(self, table_name: str, *, create: bool = False) -> str:
        """A table of :data:`TABLES` as this store's SQL names it, for :meth:`query` (BigQuery:
        `` `project.dataset.name` ``; ``create``: made now if no load made it yet, so a query reads it empty; a
        reader without write access leaves it False).  DuckDB makes every table when it opens."""
        ...

    def count(self, table_name: str, where: str = "", params: list | None = None) -> int:
        """``SELECT count(*)`` of a table in :data:`TABLES`, with an optional ``WHERE ...`` clause."""
        ...


# ------------------------------------------------------------------------------------------------ URIs
@dataclass(frozen=True)
class WarehouseURI:
    """A parsed warehouse location: ``kind`` is ``"duckdb"`` (``path``) or ``"bigquery"`` (``project``,
    ``dataset``, ``location``)."""

    kind: str
    path: str = ""
    project: str = ""
    dataset: str = ""
    location: str | None = None


# project ids: letters, digits, hyphens (domain-scoped ones as "example.com:project"); datasets: letters,
# digits, underscores.  Both end up inside back-quoted SQL names, so nothing else is accepted.
_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:_-]*")
_DATASET = re.compile(r"[A-Za-z0-9_]+")
_USAGE = "use a DuckDB file (a path or duckdb:///path/file.duckdb) or bigquery://PROJECT/DATASET[?location=EU]"


def parse_warehouse_uri(uri_or_path: str | os.PathLike) -> WarehouseURI:
    """Parse a warehouse location (see the module docstring); :class:`ConfigError` when it is not one."""
    text = os.fspath(uri_or_path)
    if "://" not in text:
        if not text:
            raise ConfigError(f"empty warehouse location: {_USAGE}")
        return WarehouseURI("duckdb", path=text)
    scheme, _, rest = text.partition("://")
    if scheme == "duckdb":
        if not rest or "?" in rest:
            raise ConfigError(f"warehouse {text!r}: {_USAGE}")
        return WarehouseURI("duckdb", path=rest)
    if scheme == "bigquery":
        path, _, query = rest.partition("?")
        parts = path.strip("/").split("/")
        if len(parts) != 2 or not _PROJECT.fullmatch(parts[0]) or not _DATASET.fullmatch(parts[1]):
            raise ConfigError(f"warehouse {text!r}: {_USAGE}")
        options = parse_qs(query, keep_blank_values=True)
        unknown = sorted(set(options) - {"location"})
        if unknown or any(len(v) != 1 or not v[0] for v in options.values()):
            raise ConfigError(f"warehouse {text!r}: the only option is one ?location=... (got {query!r})")
        return WarehouseURI("bigquery", project=parts[0], dataset=parts[1],
                            location=options.get("location", [None])[0])
    raise ConfigError(f"warehouse {text!r}: unknown scheme {scheme!r}: {_USAGE}")


def open_warehouse(uri_or_path: str | os.PathLike,
                   bigquery_client: Callable[[WarehouseURI], "Client"] | None = None) -> Warehouse:
    """The store a path or URI names: :class:`DuckDBWarehouse` for a path or ``duckdb://PATH``,
    :class:`BigQueryWarehouse` for ``bigquery://PROJECT/DATASET[?location=EU]``.

    The BigQuery client is ``bigquery_client(parsed_uri)`` when given (Airflow passes one built from its
    connection); by default a ``google.cloud.bigquery.Client`` for the URI's project and location with the
    ambient credentials (Application Default Credentials: ``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth
    application-default login``, the metadata server / Workload Identity).
    """
    where = parse_warehouse_uri(uri_or_path)
    if where.kind == "duckdb":
        return DuckDBWarehouse(where.path)
    client = (bigquery_client or _ambient_client)(where)
    return BigQueryWarehouse(client, project=where.project, dataset=where.dataset, location=where.location)


def _ambient_client(where: WarehouseURI) -> "Client":
    try:
        import google.auth.exceptions
        from google.cloud import bigquery
    except ImportError as exc:  # pragma: no cover - installed with the Airflow google provider
        raise ConfigError("bigquery:// warehouses need google-cloud-bigquery (pip install google-cloud-bigquery)") \
            from exc
    try:
        return bigquery.Client(project=where.project, location=where.location)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise ConfigError(f"bigquery://{where.project}/{where.dataset}: no Google credentials found (set "
                          "GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`)") from exc
