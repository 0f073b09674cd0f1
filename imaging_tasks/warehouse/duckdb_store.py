"""DuckDB as the embedded stand-in for BigQuery; same tables, same upsert keys."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from imaging_tasks.warehouse.schema import TABLES, Table

DUCK_TYPES = {"STRING": "VARCHAR", "INT64": "BIGINT", "FLOAT64": "DOUBLE", "BOOL": "BOOLEAN",
              "TIMESTAMP": "TIMESTAMPTZ", "JSON": "JSON"}


def ddl(table: Table) -> str:
    cols = ", ".join(f"{c.name} {DUCK_TYPES[c.type]}{' NOT NULL' if c.required else ''}" for c in table.columns)
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({cols}, PRIMARY KEY ({', '.join(table.key)}))"


class DuckDBWarehouse:
    """Upserts rows keyed by each table's natural key; one short transaction per load."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)

    def _connect(self):
        import duckdb

        con = duckdb.connect(self.path)
        for table in TABLES.values():
            con.execute(ddl(table))
        return con

    def upsert(self, table_name: str, rows: Iterable[dict], *, replace_scope: tuple[str, ...] = ()) -> int:
        """Insert or replace rows by key; with ``replace_scope`` (e.g. specialty, study_id), rows of the same
        scope that the new load no longer has are deleted too, so a reprocessed study leaves no stale rows."""
        table = TABLES[table_name]
        names = table.column_names
        values = [[_encode(row.get(n), c.type) for n, c in zip(names, table.columns)] for row in rows]
        if not values:
            return 0
        missing = [k for k in table.key if any(v[names.index(k)] is None for v in values)]
        if missing:
            raise ValueError(f"{table_name}: key column(s) {missing} missing in some rows; every row needs its key")
        sql = f"INSERT OR REPLACE INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        con = self._connect()
        try:
            con.execute("BEGIN")
            if replace_scope:
                scopes = {tuple(v[names.index(k)] for k in replace_scope) for v in values}
                where = " AND ".join(f"{k} = ?" for k in replace_scope)
                for scope in sorted(scopes):
                    con.execute(f"DELETE FROM {table.name} WHERE {where}", list(scope))
            con.executemany(sql, values)
            con.execute("COMMIT")
        finally:
            con.close()
        return len(values)

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        con = self._connect()
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()

    def count(self, table_name: str, where: str = "", params: list | None = None) -> int:
        return self.query(f"SELECT count(*) FROM {TABLES[table_name].name} {where}", params)[0][0]


def _encode(value, type_: str):
    if value is None:
        return None
    if type_ == "JSON":
        return json.dumps(value, sort_keys=True, default=str)
    return value
