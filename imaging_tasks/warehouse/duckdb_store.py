"""DuckDB as the embedded stand-in for BigQuery; same tables, same upsert keys."""
from __future__ import annotations

import datetime as dt
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from imaging_tasks import retry, storage
from imaging_tasks.warehouse.schema import TABLES, Table, prepare_rows, replaced_scopes

DUCK_TYPES = {"STRING": "VARCHAR", "INT64": "BIGINT", "FLOAT64": "DOUBLE", "BOOL": "BOOLEAN",
              "TIMESTAMP": "TIMESTAMPTZ", "JSON": "JSON"}


def ddl(table: Table) -> str:
    cols = ", ".join(f"{c.name} {DUCK_TYPES[c.type]}{' NOT NULL' if c.required else ''}" for c in table.columns)
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({cols}, PRIMARY KEY ({', '.join(table.key)}))"


# another process holding the file (a concurrent load of another specialty, an open notebook) is waited for:
# waits of 0.25 s doubling to 5 s, for up to a minute
LOCK_POLICY = retry.Policy(attempts=12, initial_s=0.25, multiplier=2.0, max_wait_s=5.0, budget_s=60.0)


def is_lock_conflict(exc: BaseException) -> bool:
    """DuckDB's "Could not set lock on file ...: Conflicting lock is held in ...": another process has it open."""
    text = str(exc).lower()
    return "could not set lock" in text or "conflicting lock" in text


def _migrate(con) -> None:
    """Create missing tables and add columns that a warehouse file made by an older version lacks."""
    have: dict[str, set[str]] = {}
    for table, column in con.execute("SELECT table_name, column_name FROM information_schema.columns "
                                     "WHERE table_schema = current_schema()").fetchall():
        have.setdefault(table, set()).add(column)
    for table in TABLES.values():
        if table.name not in have:
            con.execute(ddl(table))
            continue
        for c in table.columns:
            if c.name not in have[table.name] and not c.required:
                con.execute(f"ALTER TABLE {table.name} ADD COLUMN {c.name} {DUCK_TYPES[c.type]}")


def _create_whole(path: str) -> None:
    """DuckDB writes a new file's headers in several writes, and a process killed between them leaves a file
    DuckDB can never open again ("Could not read enough bytes").  So a new warehouse is built beside its place
    and linked in whole; if another process got there first, its file is kept."""
    import duckdb

    storage.sweep_temporary_siblings(Path(path))  # what an earlier creator killed here left
    tmp = storage.temporary_sibling(Path(path))
    try:
        con = duckdb.connect(str(tmp))
        try:
            _migrate(con)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        try:
            os.link(tmp, path)  # atomic, and never replaces a file that appeared meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)


class DuckDBWarehouse:
    """Upserts rows keyed by each table's natural key; one short transaction per load."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)

    def _connect(self):
        import duckdb

        if self.path != ":memory:" and not os.path.exists(self.path):
            _create_whole(self.path)
        con = retry.call(duckdb.connect, self.path, operation="open warehouse", target=f"duckdb://{self.path}",
                         policy=LOCK_POLICY, retry_if=is_lock_conflict)
        try:
            _migrate(con)
        except Exception:
            con.close()
            raise
        return con

    @contextmanager
    def transaction(self):
        """``with wh.transaction() as tx: tx.upsert(...)``: every upsert inside commits together or not at all
        (a kill between two tables leaves the warehouse as it was)."""
        con = self._connect()
        try:
            con.execute("BEGIN")
            try:
                yield _Transaction(con)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def upsert(self, table_name: str, rows: Iterable[dict], *, replace_scope: tuple[str, ...] = (),
               scopes: Iterable[tuple] | None = None) -> int:
        """Insert or replace rows by key; with ``replace_scope`` (e.g. specialty, study_id), rows of the same
        scope that the new load no longer has are deleted too, so a reprocessed study leaves no stale rows.
        ``scopes`` (values of ``replace_scope``) names scopes replaced even if no new row has them (a
        reprocessed study that now has no findings).  Every row gets ``loaded_at`` (now, unless it has one)."""
        with self.transaction() as tx:
            return tx.upsert(table_name, rows, replace_scope=replace_scope, scopes=scopes)

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        con = self._connect()
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()

    def ref(self, table_name: str, *, create: bool = False) -> str:
        return TABLES[table_name].name

    def count(self, table_name: str, where: str = "", params: list | None = None) -> int:
        return self.query(f"SELECT count(*) FROM {self.ref(table_name)} {where}", params)[0][0]


class _Transaction:
    """Upserts on one open connection inside a transaction (see :meth:`DuckDBWarehouse.transaction`)."""

    def __init__(self, con):
        self.con = con

    def upsert(self, table_name: str, rows: Iterable[dict], *, replace_scope: tuple[str, ...] = (),
               scopes: Iterable[tuple] | None = None) -> int:
        table = TABLES[table_name]
        names = table.column_names
        prepared = prepare_rows(table, rows, loaded_at=dt.datetime.now(dt.timezone.utc))
        replaced = replaced_scopes(table, prepared, replace_scope, scopes)
        if not prepared and not replaced:
            return 0
        values = [[_encode(row[c.name], c.type) for c in table.columns] for row in prepared]
        where = " AND ".join(f"{k} = ?" for k in replace_scope)
        for scope in replaced:
            self.con.execute(f"DELETE FROM {table.name} WHERE {where}", list(scope))
        if values:
            sql = f"INSERT OR REPLACE INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            self.con.executemany(sql, values)
        return len(values)


def _encode(value, type_: str):
    if value is None:
        return None
    if type_ == "JSON":
        return json.dumps(value, sort_keys=True, default=str)
    return value
