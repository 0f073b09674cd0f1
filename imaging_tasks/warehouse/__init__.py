"""The metadata warehouse: one schema, loaded by upsert into DuckDB (embedded) or BigQuery."""
from imaging_tasks.warehouse.schema import TABLES, Column, Table
from imaging_tasks.warehouse.duckdb_store import DuckDBWarehouse

__all__ = ["TABLES", "Column", "Table", "DuckDBWarehouse"]
