"""DAG parse time per file, over a bare ``import airflow.sdk`` (target: < 0.3 s each).

Each file is parsed in a fresh interpreter, as the DAG processor does, best of N runs:
    python bench/dag_parse_time.py [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import sys, time, json, runpy
sys.path.insert(0, {plugins!r})
t0 = time.perf_counter(); import airflow.sdk; t1 = time.perf_counter()
runpy.run_path({dag!r}); t2 = time.perf_counter()
print(json.dumps({{"sdk_s": t1 - t0, "dag_s": t2 - t1}}))
"""


def measure(dag: Path, runs: int) -> dict:
    samples = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", PROBE.format(plugins=str(REPO / "plugins"), dag=str(dag))],
                             check=True, capture_output=True, text=True).stdout
        samples.append(json.loads(out.strip().splitlines()[-1]))
    return {"sdk_s": min(s["sdk_s"] for s in samples), "dag_s": min(s["dag_s"] for s in samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"{'DAG file':<22} {'import airflow.sdk s':>20} {'parse over it s':>16}  target < 0.300")
    worst = 0.0
    for dag in sorted((REPO / "dags").glob("*.py")):
        m = measure(dag, args.runs)
        worst = max(worst, m["dag_s"])
        print(f"{dag.name:<22} {m['sdk_s']:>20.3f} {m['dag_s']:>16.3f}  {'ok' if m['dag_s'] < 0.3 else 'SLOW'}")
    print(f"worst: {worst:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
