"""``make demo``: synthesize studies (once), run the four DAGs with ``dag.test()``, print what happened.

``--prepare-ui`` (``make up``) only synthesizes the uploads, for runs triggered from the UI.

Runs on the embedded default: local folders as buckets, SQLite Airflow, DuckDB warehouse, CPU.
Running it again re-uses the same inputs; studies already done are skipped and no row is duplicated.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO / "plugins"), str(REPO)):  # run as a script: the glue package and the library
    if _path not in sys.path:
        sys.path.insert(0, _path)


def final_task(specialty: str) -> str:
    """The task that publishes a study: the fan-out's per-study summary, else the record's last step."""
    from imaging_tasks.specialties import get

    record = get(specialty)
    return "finish_slide" if record.fan_out else record.steps[-1].name


def synthesize(landing: Path, studies: int, seed: int) -> None:
    from imaging_tasks.cli import main as cli

    from imaging_tasks.specialties import names

    for specialty in names():
        if not (landing / specialty).exists():
            cli(["synth", "--specialty", specialty, "--out", str(landing), "--studies", str(studies),
                 "--seed", str(seed), "--bad-inputs"])


def run_xcoms(dag_id: str, run_id: str) -> dict[tuple[str, str], list]:
    """(task_id, key) -> values of one run, read back from the metadata DB."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    out: dict[tuple[str, str], list] = {}
    with create_session() as session:
        q = select(XComModel.task_id, XComModel.key, XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id)
        for task_id, key, value in session.execute(q):
            out.setdefault((task_id, key), []).append(value)
    return out


def summarize(dag_id: str, run, seconds: float, warehouse: Path) -> dict:
    from imaging_tasks.warehouse import DuckDBWarehouse

    x = run_xcoms(dag_id, run.run_id)
    index = (x.get(("index_studies", "summary")) or [{}])[0]
    ok = lambda task: sum(1 for v in x.get((task, "return_value"), []) if isinstance(v, dict) and v.get("status") == "ok")  # noqa: E731
    loaded = (x.get(("load_metadata", "return_value")) or [{}])[0] or {}
    wh = DuckDBWarehouse(warehouse)
    return {"dag": dag_id, "state": str(run.state).split(".")[-1].lower(),
            "found": index.get("to_process", 0) + index.get("already_done", 0),
            "done_before": index.get("already_done", 0), "waiting": index.get("waiting", 0),
            "deidentified": ok("deidentify"),
            "processed": ok(final_task(dag_id)),
            "quarantined": wh.count("quarantine", "WHERE specialty = ?", [dag_id]),
            "rows": sum(loaded.values()), "seconds": seconds}


def prepare_ui() -> int:
    """``make up``: the same synthetic uploads as ``make demo`` in the landing folders, for runs from the UI."""
    data = Path(os.environ.get("IMAGING_DATA_DIR", REPO / "data"))
    synthesize(data / "landing", studies=int(os.environ.get("DEMO_STUDIES", "2")), seed=0)
    key = "your IMAGING_DEID_KEY" if os.environ.get("IMAGING_DEID_KEY") else "the public DEMO key (IMAGING_DEID_DEMO=1)"
    print(f"make up: synthetic studies under {data / 'landing'}; de-identified with {key}.\n"
          "  Open http://localhost:8080, log in as admin (password above, also in .airflow/), open a DAG and press\n"
          "  Trigger: the defaults process everything not yet done. Results: 'Imaging QC' in the navigation bar.")
    return 0


def main() -> int:
    from airflow.dag_processing.dagbag import DagBag

    if "--prepare-ui" in sys.argv[1:]:
        return prepare_ui()
    if not os.environ.get("IMAGING_DEID_KEY"):
        os.environ["IMAGING_DEID_DEMO"] = "1"  # synthetic data: the public demo key, outputs marked DEMO
        print("demo: IMAGING_DEID_KEY is not set; de-identifying the synthetic data with the public DEMO key")
    # the synthetic uploads are complete when written: no need to wait out the production quiet period
    os.environ.setdefault("AIRFLOW__IMAGING__LANDING_QUIET_SECONDS", "0")
    data = Path(os.environ.get("IMAGING_DATA_DIR", REPO / "data"))
    synthesize(data / "landing", studies=int(os.environ.get("DEMO_STUDIES", "2")), seed=0)
    bag = DagBag(dag_folder=str(REPO / "dags"))
    if bag.import_errors:
        print("DAG import errors:", bag.import_errors, file=sys.stderr)
        return 1
    rows = []
    from imaging_tasks.specialties import names

    for dag_id in names():
        started = time.time()
        run = bag.dags[dag_id].test()
        rows.append(summarize(dag_id, run, time.time() - started, data / "warehouse.duckdb"))
    cols = [("dag", "DAG", 15), ("state", "state", 8), ("found", "studies", 7), ("done_before", "done before", 11),
            ("waiting", "waiting", 7),
            ("deidentified", "de-identified", 13), ("processed", "processed", 9), ("quarantined", "quarantined", 11),
            ("rows", "rows loaded", 11), ("seconds", "wall s", 7)]
    print()
    print(" ".join(f"{title:>{w}}" if i else f"{title:<{w}}" for i, (_k, title, w) in enumerate(cols)))
    print("-" * (sum(w for *_x, w in cols) + len(cols) - 1))
    for r in rows:
        print(" ".join((f"{r[k]:<{w}}" if i == 0 else f"{r[k]:>{w}.1f}" if k == "seconds" else f"{r[k]:>{w}}")
                       for i, (k, _t, w) in enumerate(cols)))
    print(f"\nlake: {data / 'lake'}   warehouse: {data / 'warehouse.duckdb'}   (run again: done studies are skipped)")
    return 0 if all(r["state"] == "success" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
