"""``make demo``: synthesize studies (once), run the four DAGs with ``dag.test()``, print what happened.

Runs on the embedded default: local folders as buckets, SQLite Airflow, DuckDB warehouse, CPU.
Running it again re-uses the same inputs; studies already done are skipped and no row is duplicated.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SPECIALTIES = ("neuroimaging", "cardiovascular", "pathology", "mammography")


def synthesize(landing: Path, studies: int, seed: int) -> None:
    from imaging_tasks.cli import main as cli

    for specialty in SPECIALTIES:
        if (landing / specialty).exists():
            continue
        cli(["synth", "--specialty", specialty, "--out", str(landing), "--studies", str(studies),
             "--seed", str(seed), "--bad-inputs"])


def warehouse_counts(path: Path) -> dict[str, dict[str, int]]:
    from imaging_tasks.warehouse import DuckDBWarehouse

    wh = DuckDBWarehouse(path)
    counts: dict[str, dict[str, int]] = {}
    for table in ("studies", "series", "instances", "results", "findings", "quarantine", "processing_runs"):
        for specialty, n in wh.query(f"SELECT specialty, count(*) FROM {table} GROUP BY specialty"):
            counts.setdefault(specialty, {})[table] = n
    return counts


def main() -> int:
    from airflow.dag_processing.dagbag import DagBag

    data = Path(os.environ.get("IMAGING_DATA_DIR", Path(__file__).resolve().parents[2] / "data"))
    synthesize(data / "landing", studies=int(os.environ.get("DEMO_STUDIES", "2")), seed=0)
    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags"))
    if bag.import_errors:
        print("DAG import errors:", bag.import_errors, file=sys.stderr)
        return 1
    rows, ok = [], True
    for dag_id in SPECIALTIES:
        started = time.time()
        run = bag.dags[dag_id].test()
        seconds = time.time() - started
        ok &= str(run.state) in ("success", "DagRunState.SUCCESS")
        tis = {ti.task_id: ti for ti in run.get_task_instances()}
        rows.append((dag_id, str(run.state), seconds, tis))
    counts = warehouse_counts(data / "warehouse.duckdb")
    print()
    header = f"{'DAG':<15} {'state':<8} {'studies':>7} {'de-id':>6} {'processed':>9} {'quarant.':>8} {'rows':>6} {'wall s':>7}"
    print(header)
    print("-" * len(header))
    for dag_id, state, seconds, _tis in rows:
        c = counts.get(dag_id, {})
        processed = c.get("studies", 0)
        print(f"{dag_id:<15} {state:<8} {processed:>7} {processed:>6} {processed:>9} {c.get('quarantine', 0):>8} "
              f"{sum(c.values()):>6} {seconds:>7.1f}")
    print(f"\nwarehouse: {data / 'warehouse.duckdb'}   lake: {data / 'lake'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
