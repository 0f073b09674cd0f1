"""The BigQuery warehouse against a local BigQuery emulator (see ``tests/bq_emulator.py``).

The load goes the production way: ``WarehouseHook("bigquery://PROJECT/DATASET", conn)`` -> the google provider's
``BigQueryHook`` (an anonymous-credentials connection) builds a google-cloud-bigquery client -> the store
``imaging_tasks.warehouse.bigquery`` -> REST on 127.0.0.1, where the client is pointed by
``BIGQUERY_EMULATOR_HOST``.  The rows are those of a real pipeline run on synthetic
cardiovascular studies (with bad inputs, so quarantine rows too); the same rows go into the DuckDB default
and both warehouses must agree.

The emulator is not optional: if its venv cannot be built or it does not start, these tests fail (not skip).
"""
from __future__ import annotations

import json
import uuid

import pytest

from imaging_tasks.warehouse import TABLES, DuckDBWarehouse
from imaging_tasks.warehouse.duckdb_store import ddl

SPECIALTY = "cardiovascular"
SCOPED = ("series", "instances", "results", "findings")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def emulator():
    from bq_emulator import Emulator

    with Emulator() as emu:  # builds .venv-bqemu on first use; raises if it cannot
        yield emu


@pytest.fixture()
def bq(emulator, monkeypatch):
    """A BigQueryWarehouse on a fresh dataset, made by WarehouseHook from a bigquery:// URI and a connection."""
    from google.cloud import bigquery

    from imaging_dags.warehouse_hook import WarehouseHook

    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", emulator.endpoint)
    monkeypatch.setenv("AIRFLOW_CONN_BQ_EMULATOR", json.dumps(
        {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True}}))

    def streaming(*_a, **_k):
        raise AssertionError("streaming inserts are not allowed: loads must be batch load jobs")

    for name in ("insert_rows", "insert_rows_json", "insert_rows_from_dataframe"):
        monkeypatch.setattr(bigquery.Client, name, streaming)
    dataset = f"imaging_{uuid.uuid4().hex[:10]}"
    wh = WarehouseHook(f"bigquery://{emulator.project}/{dataset}", "bq_emulator").get_conn()
    assert type(wh).__name__ == "BigQueryWarehouse"
    return wh


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """A real run of the chain (index -> de-identify -> process) on 2 synthetic studies plus bad inputs."""
    from imaging_tasks import pipeline
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.synth.bad_inputs import write_bad_inputs

    root = tmp_path_factory.mktemp("bq-run")
    landing = root / "landing"
    synthesizer(SPECIALTY)(landing, 2, 7)
    write_bad_inputs(landing, SPECIALTY, seed=3)
    lake = pipeline.Lake(str(root / "lake"), SPECIALTY)
    def ctx(task_id: str, map_index: int = -1):
        return pipeline.RunContext(dag_id=SPECIALTY, run_id="manual__bq-test", task_id=task_id, map_index=map_index)

    summary = pipeline.index_landing(landing / SPECIALTY, lake, key=DEMO_KEY)
    processed = []
    for i, study in enumerate(summary["studies"]):
        clean = pipeline.deidentify_study(study, lake, key=DEMO_KEY, demo=True, run=ctx("deidentify", i))
        processed.append(pipeline.process_study(clean, lake, run=ctx("process_study", i)))
    run = ctx("load_metadata")
    assert sum(p.get("status") == "ok" for p in processed) == 2
    return {"processed": processed, "lake": lake, "run": run, "root": root}


# --------------------------------------------------------------------------- helpers
def _counts(wh) -> dict[str, int]:
    return {t: wh.count(t) for t in TABLES}


def _duplicates(wh, table: str) -> int:
    t = TABLES[table]
    name = f"`{wh.table_id(t.name)}`" if hasattr(wh, "table_id") else t.name
    keys = ", ".join(t.key)
    return wh.query(f"SELECT count(*) FROM (SELECT {keys}, count(*) AS n FROM {name} GROUP BY {keys}) "
                    "WHERE n > 1")[0][0]


def _keys(wh, table: str) -> set[tuple]:
    t = TABLES[table]
    name = f"`{wh.table_id(t.name)}`" if hasattr(wh, "table_id") else t.name
    return set(wh.query(f"SELECT {', '.join(t.key)} FROM {name}"))


def _results(wh, study: str) -> dict[str, float]:
    name = f"`{wh.table_id('results')}`" if hasattr(wh, "table_id") else "results"
    return dict(wh.query(f"SELECT metric, value FROM {name} WHERE study_id = ?", [study]))


# --------------------------------------------------------------------------- definitions (no emulator)
def test_bigquery_tables_come_from_the_shared_schema():
    from imaging_tasks.warehouse.bigquery import load_job_config, merge_sql, table_resource

    for table in TABLES.values():
        res = table_resource("p", "d", table)
        assert [f["name"] for f in res["schema"]["fields"]] == table.column_names
        assert ddl(table).count(" ") > 0 and all(c in ddl(table) for c in table.column_names)  # DuckDB: same columns
        assert res["timePartitioning"] == {"type": "DAY", "field": "loaded_at"}
        assert {f["name"]: f["type"] for f in res["schema"]["fields"]}["loaded_at"] == "TIMESTAMP"
        assert res["clustering"]["fields"][0] == "specialty"
        assert ("modality" in res["clustering"]["fields"]) == ("modality" in table.column_names)
        assert load_job_config(table)["load"]["sourceFormat"] == "NEWLINE_DELIMITED_JSON"
        assert load_job_config(table)["load"]["writeDisposition"] == "WRITE_TRUNCATE"
        sql = merge_sql("p.d.t", table, "p.d.s", ("specialty", "study_id") if "study_id" in table.column_names else ())
        assert sql.startswith("MERGE ") and sql.count("MERGE") == 1 and ";" not in sql  # one statement
    assert TABLES["series"].clustering == ("specialty", "modality", "study_id")


def test_merge_is_retried_on_a_concurrent_update(monkeypatch):
    """Concurrent DML on one partition may fail to serialize; the (idempotent) MERGE is re-run, other errors raise."""
    from imaging_tasks.warehouse import bigquery as bqmod

    class Job:
        def __init__(self, error):
            self.error, self.job_id = error, f"job{len(calls)}"

        def result(self):
            if self.error:
                raise RuntimeError(self.error)

    calls: list[str] = []
    errors = ["400 Could not serialize access to table p:d.results due to concurrent update", None]

    class Client:
        def query(self, sql, **_):
            calls.append(sql)
            return Job(errors.pop(0))

    monkeypatch.setattr(bqmod.time, "sleep", lambda s: None)
    wh = bqmod.BigQueryWarehouse(Client(), project="p", dataset="d")
    wh._dml("MERGE x", "imaging_merge_results_")
    assert len(calls) == 2
    errors[:] = ["400 Syntax error"]
    with pytest.raises(RuntimeError, match="Syntax error"):
        wh._dml("MERGE x", "imaging_merge_results_")


def test_both_stores_share_one_api_and_open_warehouse_picks_one_from_a_path_or_uri(tmp_path, monkeypatch):
    """``open_warehouse``: a path or ``duckdb://`` -> DuckDB, ``bigquery://PROJECT/DATASET[?location=]`` -> BigQuery
    with ambient credentials; the Airflow hook parses the same URIs and refuses what is not one."""
    from imaging_dags.warehouse_hook import WarehouseHook
    from imaging_tasks.errors import ConfigError
    from imaging_tasks.warehouse import (BigQueryWarehouse, Warehouse, WarehouseURI, open_warehouse,
                                         parse_warehouse_uri)

    assert parse_warehouse_uri("bigquery://my-proj/imaging_ds?location=EU") == \
        WarehouseURI("bigquery", project="my-proj", dataset="imaging_ds", location="EU")
    assert parse_warehouse_uri("bigquery://my-proj/imaging_ds/") == WarehouseURI("bigquery", project="my-proj",
                                                                                dataset="imaging_ds")
    assert parse_warehouse_uri("duckdb:///data/w.duckdb") == WarehouseURI("duckdb", path="/data/w.duckdb")
    assert parse_warehouse_uri(tmp_path / "w.duckdb") == WarehouseURI("duckdb", path=str(tmp_path / "w.duckdb"))
    for bad in ("", "bigquery://proj", "bigquery://proj/ds/extra", "bigquery://proj/ds`x", "bigquery://p/d?loc=EU",
                "bigquery://p/d?location=", "postgres://h/db", "duckdb://"):
        with pytest.raises(ConfigError):
            parse_warehouse_uri(bad)
        with pytest.raises(ConfigError, match="imaging_warehouse"):
            WarehouseHook(bad).get_conn()
    with pytest.raises(ConfigError, match="imaging_warehouse"):  # a bare path means nothing on a worker
        WarehouseHook(str(tmp_path / "w.duckdb")).get_conn()

    for where in (tmp_path / "a.duckdb", str(tmp_path / "b.duckdb"), f"duckdb://{tmp_path / 'c.duckdb'}"):
        duck = open_warehouse(where)
        assert isinstance(duck, DuckDBWarehouse) and isinstance(duck, Warehouse)
        with duck.transaction() as tx:
            tx.upsert("results", [{"specialty": SPECIALTY, "study_id": "S1", "metric": "m", "value": 1.0}])
        assert duck.count("results") == 1
    assert isinstance(WarehouseHook(f"duckdb://{tmp_path / 'a.duckdb'}").get_conn(), DuckDBWarehouse)

    made = []
    bq = open_warehouse("bigquery://p/d?location=EU", bigquery_client=lambda w: made.append(w) or "client")
    assert isinstance(bq, BigQueryWarehouse) and isinstance(bq, Warehouse)
    assert (bq.client, bq.project, bq.dataset, bq.location) == ("client", "p", "d", "EU") and made[0].project == "p"
    with bq.transaction() as tx:  # no multi-table transaction in BigQuery: the store itself, each MERGE converges
        assert tx is bq

    import google.auth
    import google.auth.exceptions

    def no_credentials(*_a, **_k):
        raise google.auth.exceptions.DefaultCredentialsError("none here")

    monkeypatch.setattr(google.auth, "default", no_credentials)
    with pytest.raises(ConfigError, match="credentials"):
        open_warehouse("bigquery://p/d")


def test_the_warehouse_package_does_not_import_airflow():
    import subprocess
    import sys

    code = ("import sys, imaging_tasks.warehouse as w, imaging_tasks.warehouse.bigquery; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('airflow', 'imaging_dags')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- against the emulator
def test_pipeline_rows_load_twice_without_duplicates_and_reprocess_replaces(bq, pipeline_run, tmp_path):
    from imaging_tasks import pipeline, storage

    processed, lake, run = pipeline_run["processed"], pipeline_run["lake"], pipeline_run["run"]
    duck = DuckDBWarehouse(tmp_path / "w.duckdb")

    # both warehouses get the same first load: the same pending studies (the ledger is put back in between)
    import shutil
    from pathlib import Path

    ledger_dir, saved = Path(lake.root) / "ledger", tmp_path / "ledger-before"
    shutil.copytree(ledger_dir, saved)
    loaded = pipeline.load(processed, lake, bq, run=run)
    shutil.rmtree(ledger_dir)
    shutil.copytree(saved, ledger_dir)
    pipeline.load(processed, lake, duck, run=run)
    assert [x["study"] for x in loaded.pop("loaded")] and loaded.pop("failed") == []
    assert loaded["studies"] == 2 and loaded["quarantine"] > 0 and loaded["findings"] > 0
    assert loaded["ledger"] == 3  # two loaded, one quarantined at de-identification (the truncated CT)
    first = _counts(bq)
    assert first == {t: loaded.get(t, 0) for t in TABLES} == _counts(duck)  # tables the pipeline does not load: 0

    # a re-run (or a retry of the load task) adds nothing
    pipeline.load(processed, lake, bq, run=run)
    assert _counts(bq) == first
    for table in TABLES:
        assert _duplicates(bq, table) == 0, table
        assert _keys(bq, table) == _keys(duck, table), table

    # reprocessing one study changes its outputs: one finding and one metric fewer, a value changed
    item = next(p for p in processed if p.get("status") == "ok")
    study = item["study"]
    other = {p["study"] for p in processed if p.get("status") == "ok"} - {study}
    other_before = {s: _results(bq, s) for s in other}
    results_uri = storage.join(item["derived"], "results.json")
    results = storage.read_json(results_uri)
    assert len(results["findings"]) >= 1 and len(results["metrics"]) >= 2
    dropped = results["metrics"].pop()["name"]
    results["metrics"][0]["value"] = results["metrics"][0]["value"] + 100.0
    results["findings"] = results["findings"][:-1]
    storage.write_json(results_uri, results)
    for _ in range(2):  # the reprocess itself, then its retry
        pipeline.load(processed, lake, bq, run=run)
        pipeline.load(processed, lake, duck, run=run)
        after = _counts(bq)
        assert after["results"] == first["results"] - 1
        assert after["findings"] == first["findings"] - 1
        assert {t: after[t] for t in ("studies", "series", "instances", "quarantine", "processing_runs")} == \
               {t: first[t] for t in ("studies", "series", "instances", "quarantine", "processing_runs")}
        got = _results(bq, study)
        assert dropped not in got
        assert got[results["metrics"][0]["name"]] == pytest.approx(results["metrics"][0]["value"])
        assert {s: _results(bq, s) for s in other} == other_before  # other studies untouched
        for table in TABLES:
            assert _duplicates(bq, table) == 0, table
            assert _keys(bq, table) == _keys(duck, table), table

    # JSON columns hold JSON values, not strings of JSON
    kinds = bq.query(f"SELECT JSON_VALUE(properties, '$.kind') FROM `{bq.table_id('findings')}` "
                     "WHERE study_id = ?", [study])
    assert kinds and all(k is not None for (k,) in kinds)


def test_batch_load_jobs_into_staging_then_one_merge_on_partitioned_clustered_tables(bq):
    client = bq.client
    rows = [{"specialty": "cardiovascular", "study_id": "S1", "metric": m, "value": float(i)}
            for i, m in enumerate(("agatston_score", "calcium_volume_mm3", "calcium_mass_mg"))]
    series = [{"specialty": "cardiovascular", "series_uid": "1.2.3", "study_id": "S1", "modality": "CT",
               "n_instances": 3}]
    assert bq.upsert("results", rows, replace_scope=("specialty", "study_id")) == 3
    assert bq.upsert("series", series, replace_scope=("specialty", "study_id")) == 1
    assert bq.upsert("results", rows[:1], replace_scope=("specialty", "study_id")) == 1
    assert bq.count("results") == 1

    jobs = [client.get_job(job_id) for job_id in bq.jobs]
    loads = [j for j in jobs if j.job_type == "load"]
    queries = [j for j in jobs if j.job_type == "query"]
    assert len(loads) == 3 and len(queries) == 3  # one load job and one MERGE per upsert, nothing else
    for job in loads:
        config = job.to_api_repr()["configuration"]["load"]
        assert config["sourceFormat"] == "NEWLINE_DELIMITED_JSON"
        assert config["writeDisposition"] == "WRITE_TRUNCATE"
        assert config["destinationTable"]["tableId"].startswith("_staging_")
        assert [f["name"] for f in config["schema"]["fields"]] == TABLES[
            config["destinationTable"]["tableId"].split("_")[2]].column_names
    for job in queries:
        assert job.query.startswith("MERGE `") and job.query.count("MERGE") == 1

    for name in ("results", "series"):
        table = client.get_table(bq.table_id(name))
        assert table.time_partitioning.type_ == "DAY" and table.time_partitioning.field == "loaded_at"
        assert table.clustering_fields == list(TABLES[name].clustering)
        assert [f.name for f in table.schema] == TABLES[name].column_names
    assert client.get_table(bq.table_id("series")).clustering_fields == ["specialty", "modality", "study_id"]
    # every row is stamped with its load time; the staging tables are gone
    assert bq.query(f"SELECT count(*) FROM `{bq.table_id('results')}` WHERE loaded_at IS NULL")[0][0] == 0
    assert not [t.table_id for t in client.list_tables(f"{bq.project}.{bq.dataset}")
                if t.table_id.startswith("_staging_")]


@pytest.mark.e2e
def test_dag_loads_into_bigquery_through_the_airflow_connection(bq, airflow_db, buckets, monkeypatch):
    """The load task of a real DAG run: Variable ``imaging_warehouse=bigquery://...`` and ``imaging_gcp_conn_id``."""
    from imaging_tasks.specialties import synthesizer
    from test_e2e_dags import _dag

    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_WAREHOUSE", f"bigquery://{bq.project}/{bq.dataset}")
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_GCP_CONN_ID", "bq_emulator")
    monkeypatch.setenv("AIRFLOW__IMAGING__LANDING_QUIET_SECONDS", "1")  # inputs written just now count as landed
    synthesizer("mammography")(buckets["landing"], 1, 5)
    dag = _dag("mammography")
    assert dag.test().state == "success"
    counts = _counts(bq)
    assert counts["studies"] == 1 and counts["results"] > 0 and counts["instances"] > 0
    assert counts["processing_runs"] > 0
    assert not (buckets["warehouse"]).exists()  # nothing went to the DuckDB default
    assert dag.test(run_conf={"reprocess": True}).state == "success"
    again = _counts(bq)
    assert {t: again[t] for t in SCOPED + ("studies", "quarantine")} == \
           {t: counts[t] for t in SCOPED + ("studies", "quarantine")}
    assert again["processing_runs"] > counts["processing_runs"]  # lineage of the second run, keyed by its run id
    for table in TABLES:
        assert _duplicates(bq, table) == 0, table


def test_a_table_made_before_loaded_at_gets_the_column_and_clustering(bq, caplog):
    """An older target (no loaded_at, not partitioned, not clustered) still loads; the column and clustering are
    added in place, and the missing partitioning is reported (BigQuery cannot add it to an existing table)."""
    from google.cloud import bigquery

    client = bq.client
    bq.ensure_dataset()
    old = [bigquery.SchemaField(c.name, c.type, mode="REQUIRED" if c.required else "NULLABLE")
           for c in TABLES["results"].columns if c.name != "loaded_at"]
    client.create_table(bigquery.Table(bq.table_id("results"), schema=old))
    client.query(f"INSERT INTO `{bq.table_id('results')}` (specialty, study_id, metric, value) "
                 "VALUES ('cardiovascular', 'S0', 'agatston_score', 1.0)").result()
    with caplog.at_level("WARNING", logger="imaging_tasks.warehouse.bigquery"):
        bq.upsert("results", [{"specialty": "cardiovascular", "study_id": "S1", "metric": "agatston_score",
                               "value": float("inf")}], replace_scope=("specialty", "study_id"))
    assert "not partitioned by loaded_at" in caplog.text
    # (the emulator's table metadata does not show columns added by ALTER TABLE, so look at the data instead)
    assert client.get_table(bq.table_id("results")).clustering_fields == ["specialty", "study_id"]
    got = bq.query(f"SELECT study_id, value, loaded_at IS NOT NULL FROM `{bq.table_id('results')}` ORDER BY study_id")
    assert got == [("S0", 1.0, False), ("S1", float("inf"), True)]


def test_a_reprocessed_study_left_without_rows_is_emptied_in_both_warehouses(bq, tmp_path):
    """``scopes=``: a study reprocessed into no findings at all loses its old ones (rows alone cannot say so)."""
    scope = ("specialty", "study_id")

    def finding(study, i):
        return {"specialty": "mammography", "study_id": study, "kind": "cluster", "finding_index": i,
                "properties": {"n": i}}

    duck = DuckDBWarehouse(tmp_path / "w.duckdb")
    for wh in (bq, duck):
        wh.upsert("findings", [finding("S1", 0), finding("S1", 1), finding("S2", 0)], replace_scope=scope)
        for _ in range(2):  # the reprocess and its retry: S1 has no findings any more, S2 keeps one of its own
            assert wh.upsert("findings", [finding("S2", 0)], replace_scope=scope,
                             scopes=[("mammography", "S1"), ("mammography", "S2")]) == 1
            assert _keys(wh, "findings") == {("mammography", "S2", "cluster", 0)}
        assert wh.upsert("findings", [], replace_scope=scope, scopes=[("mammography", "S2")]) == 0
        assert _keys(wh, "findings") == set()
        with pytest.raises(ValueError, match="scope"):
            wh.upsert("findings", [], replace_scope=scope, scopes=[("mammography",)])


def test_open_warehouse_loads_into_bigquery_with_ambient_credentials(emulator, monkeypatch, tmp_path):
    """What ``imaging-tasks run --warehouse bigquery://...`` gets: no Airflow, a client from Application Default
    Credentials (anonymous here, for the emulator); the rows agree with DuckDB's."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    from imaging_tasks.warehouse import BigQueryWarehouse, open_warehouse

    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", emulator.endpoint)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), emulator.project))
    dataset = f"imaging_{uuid.uuid4().hex[:10]}"
    bq = open_warehouse(f"bigquery://{emulator.project}/{dataset}")
    assert isinstance(bq, BigQueryWarehouse) and bq.client.project == emulator.project
    duck = open_warehouse(tmp_path / "w.duckdb")
    rows = [{"specialty": SPECIALTY, "study_id": "S1", "metric": m, "value": float(i)}
            for i, m in enumerate(("agatston_score", "calcium_volume_mm3"))]
    for wh in (bq, duck):
        for _ in range(2):  # a rerun converges
            with wh.transaction() as tx:
                assert tx.upsert("results", rows, replace_scope=("specialty", "study_id")) == 2
        assert wh.count("results") == 2
    assert _keys(bq, "results") == _keys(duck, "results")
