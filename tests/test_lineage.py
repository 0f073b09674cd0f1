"""OpenLineage events of the imaging DAGs (``imaging_dags.lineage``), through Airflow's OpenLineage provider.

The provider reads its configuration when it is imported, so whatever runs with lineage on runs in a subprocess
with ``AIRFLOW__OPENLINEAGE__TRANSPORT`` set (the file transport); this test process keeps it off.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PHI_FOLDER = "DOE_JANE_1961-02-03"  # a landing folder named after a patient, as uploads sometimes are


def _lineage_env(events: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)]),
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events),
                                                           "append": True}),
            "AIRFLOW__OPENLINEAGE__NAMESPACE": "imaging-test"}


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_dataset_names_follow_the_providers_converters():
    from imaging_dags.lineage import dataset_id, table_ids

    assert dataset_id("file:///data/lake/derived/mammography") == ("file", "/data/lake/derived/mammography")
    assert dataset_id("s3://aws_default@bucket/lake/derived/mammography/") == ("s3://bucket",
                                                                                "lake/derived/mammography")
    assert dataset_id("gs://bucket/landing/pathology") == ("gs://bucket", "landing/pathology")
    assert table_ids("duckdb:///data/warehouse.duckdb", ["studies"]) == [("duckdb:///data/warehouse.duckdb",
                                                                          "warehouse.main.studies")]
    assert table_ids("bigquery://proj-1/imaging?location=EU", ["results"]) == [("bigquery", "proj-1.imaging.results")]
    # the same names as the providers' own asset converters give (what ObjectStoragePath lineage would say)
    from airflow.providers.amazon.aws.assets.s3 import convert_asset_to_openlineage as s3
    from airflow.providers.common.io.assets.file import convert_asset_to_openlineage as file
    from airflow.providers.google.assets.gcs import convert_asset_to_openlineage as gcs
    from airflow.sdk import Asset

    for uri, convert in (("file:///data/lake/derived/mammography", file), ("s3://bucket/lake/x", s3),
                         ("gs://bucket/landing/pathology", gcs)):
        ol = convert(Asset(uri=uri), None)
        assert dataset_id(uri) == (ol.namespace, ol.name), uri


def _probe_script() -> str:
    return textwrap.dedent('''
        import json, sys, types
        from airflow.providers.openlineage.extractors.manager import ExtractorManager
        from airflow.sdk import DAG
        from airflow.sdk.lineage import get_hook_lineage_collector
        from airflow.utils.state import TaskInstanceState

        from imaging_dags import lineage
        from imaging_dags.settings import SpecialtySettings

        @lineage.task(reads=("landing", "work"), writes=("anonymized", "quarantine"))
        def deidentify(specialty: str, study: dict) -> dict:
            return study

        @lineage.task
        def no_data(specialty: str) -> None:
            return None

        with DAG("lineage_probe", schedule=None) as dag:
            deidentify("mammography", {})
            no_data("mammography")
        settings = SpecialtySettings("mammography", "s3://aws_default@raw-bucket/landing/mammography",
                                     "s3://aws_default@lake-bucket/lake", "bigquery://proj/imaging")
        raw = "s3://raw-bucket/landing/mammography/%s/0001.dcm" % sys.argv[1]
        run = types.SimpleNamespace(run_id="r", dag_id="lineage_probe")
        out = {}
        for op in dag.tasks:
            op._imaging_settings = settings
            # what ObjectStoragePath does for every object it opens on s3:// / gs://
            get_hook_lineage_collector().add_input_asset(context=op, uri=raw)
            if op.task_id == "no_data":
                lineage._forget_object_lineage()  # what the task does when its body ends
            meta = ExtractorManager().extract_metadata(run, op, TaskInstanceState.SUCCESS, types.SimpleNamespace())
            out[op.task_id] = {"inputs": [[d.namespace, d.name] for d in meta.inputs],
                               "outputs": [[d.namespace, d.name] for d in meta.outputs]}
        print(json.dumps(out))
    ''')


def test_own_lineage_wins_over_the_objects_object_storage_reports(tmp_path):
    """On s3:// and gs://, ObjectStoragePath reports each raw object it opens to the hook-lineage collector; the
    provider must send the task's zones instead, and nothing at all for a task without zones."""
    proc = subprocess.run([sys.executable, "-c", _probe_script(), PHI_FOLDER], env=_lineage_env(tmp_path / "e.json"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["deidentify"] == {
        "inputs": [["s3://raw-bucket", "landing/mammography"], ["s3://lake-bucket", "lake/work/mammography"]],
        "outputs": [["s3://lake-bucket", "lake/anonymized/mammography"],
                    ["s3://lake-bucket", "lake/quarantine/mammography"]]}
    assert out["no_data"] == {"inputs": [], "outputs": []}
    assert PHI_FOLDER not in proc.stdout


_RUN_DAG = textwrap.dedent('''
    import sys
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=sys.argv[1]).dags["mammography"]
    run = dag.test(run_conf={"landing_quiet_seconds": 0})
    print("STATE", run.state)
''')


@pytest.mark.e2e
def test_mammography_run_sends_start_and_complete_with_lake_and_warehouse_datasets(airflow_db, buckets, tmp_path):
    from imaging_tasks.mammography.synth import synthesize

    synthesize(buckets["landing"], 1, 11, rows=400, cols=320)
    truths = [json.loads(p.read_text()) for p in (buckets["truth"] / "mammography").glob("*.json")]
    study = next((buckets["landing"] / "mammography").iterdir())
    study.rename(study.with_name(PHI_FOLDER))  # raw object names carrying a patient's name
    events_file = tmp_path / "openlineage.jsonl"
    proc = subprocess.run([sys.executable, "-c", _RUN_DAG, str(REPO / "dags")], env=_lineage_env(events_file),
                          capture_output=True, text=True, timeout=600)
    assert "STATE success" in proc.stdout, proc.stderr[-4000:]
    events = _events(events_file)

    tasks = {"wait_for_landing", "index_studies", "deidentify", "audit_phi", "ready_for_processing",
             "process_study", "load_metadata"}
    by_task: dict[str, dict[str, dict]] = {}
    for e in events:
        assert e["job"]["namespace"] == "imaging-test"
        name = e["job"]["name"]
        if name.startswith("mammography."):
            by_task.setdefault(name.split(".", 1)[1], {})[e["eventType"]] = e
    assert tasks <= set(by_task)
    for task_id, kinds in by_task.items():  # every task of the run: START, then COMPLETE
        assert {"START", "COMPLETE"} <= set(kinds), (task_id, sorted(kinds))

    landing, lake = str(buckets["landing"] / "mammography"), str(buckets["lake"])
    wh_ns, wh_db = f"duckdb://{buckets['warehouse']}", buckets["warehouse"].stem

    def zone(z):
        return ["file", f"{lake}/{z}/mammography"]

    expected = {
        "wait_for_landing": ([["file", landing]], []),
        "index_studies": ([["file", landing]], [zone("work"), zone("quarantine")]),
        "deidentify": ([["file", landing], zone("work")], [zone("anonymized"), zone("quarantine")]),
        "audit_phi": ([["file", landing], zone("anonymized")], []),
        "ready_for_processing": ([], []),
        "process_study": ([zone("anonymized")], [zone("derived")]),
        "load_metadata": ([zone("derived"), zone("quarantine"), zone("runs"), zone("ledger")], None),
    }
    for task_id, (inputs, outputs) in expected.items():
        for kind in ("START", "COMPLETE"):
            e = by_task[task_id][kind]
            got_in = [[d["namespace"], d["name"]] for d in e.get("inputs", [])]
            got_out = [[d["namespace"], d["name"]] for d in e.get("outputs", [])]
            assert got_in == inputs, (task_id, kind, got_in)
            if outputs is not None:
                assert got_out == outputs, (task_id, kind, got_out)
    # the load: every table it may write at START, the tables that got rows at COMPLETE
    start_tables = {n for ns, n in ([d["namespace"], d["name"]] for d in by_task["load_metadata"]["START"]["outputs"])
                    if ns == wh_ns}
    done = [[d["namespace"], d["name"]] for d in by_task["load_metadata"]["COMPLETE"]["outputs"]]
    assert all(ns == wh_ns for ns, _ in done)
    done_tables = {n for _, n in done}
    assert {f"{wh_db}.main.{t}" for t in ("studies", "series", "instances", "results", "ledger",
                                           "processing_runs")} <= done_tables <= start_tables
    assert f"{wh_db}.main.roi_features" in start_tables - done_tables  # none for a mammography exam

    # no PHI in any event: the planted header values, nor the raw folder named after the patient
    text = events_file.read_text()
    phi = sorted({v for t in truths for v in t["phi"] if len(v) >= 6})
    assert phi
    for value in [*phi, PHI_FOLDER, "DOE_JANE"]:
        assert value not in text, f"PHI value of length {len(value)} in an OpenLineage event"
