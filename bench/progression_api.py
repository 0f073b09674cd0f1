"""Latency of ``POST /imaging/predict-progression`` through the api-server app, for a 10-session patient.

    .venv/bin/python bench/progression_api.py [--patients 60] [--repeats 50] [--epochs 5]

1. In a child process (so that this one has not imported torch yet, as an api-server that has not predicted
   yet): synthesises a cohort (``synthesize_cohort``) plus one patient with 10 sessions, loads them into a DuckDB
   warehouse (``studies``, ``roi_features``, ``cognitive_scores``) and trains the reference LSTM on the cohort
   (``train_progression``, default size, ``--epochs``: accuracy is not measured here, only cost).
2. Airflow's api-server app (``create_app``, the plugins, the SimpleAuthManager, an admin JWT) in FastAPI's
   TestClient, with ``AIRFLOW_VAR_IMAGING_WAREHOUSE`` and ``AIRFLOW_VAR_IMAGING_PROGRESSION_MODEL_URI`` set.
3. In a fresh child process, the first POST as the api-server's first /imaging request (builds the QC app,
   imports torch, loads and dry-runs the model, reads the warehouse); in another, the first POST once an /imaging
   page was served and the model warm-up the QC app then starts has finished.  The median / p90 / min of
   ``--repeats`` warm POSTs (each: authentication, authorization, the model file's and JSON's sha256 against the
   cache, three warehouse reads through the project's hook, ``build_sequences``, ``predict``); also the median of
   ``GET /imaging/patient-timeline/{p}`` and of the HTML page ``GET /imaging/patients/{p}``.  Target: <= 1 s.
4. Writes ``bench/results/progression_api.json`` and ``bench/results/progression_api.md``.

Torch runs with its default threads (what the api-server gets).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
TARGET_S = 1.0


def _environment(home: Path) -> None:
    """A throw-away Airflow home (SQLite), the repo's DAGs and plugins (as tests/conftest.py sets them)."""
    os.environ.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING", "IMAGING_DEID_DEMO": "1"})
    for p in (str(REPO / "plugins"), str(REPO)):
        if p not in sys.path:
            sys.path.insert(0, p)


def _prepare(tmp: str, patients: int, epochs: int, queue) -> None:
    """Child process: warehouse + model; puts (model_uri, warehouse, patient) on the queue."""
    _environment(Path(tmp) / "home")
    from imaging_tasks.progression import CohortParams, synthesize_cohort
    from imaging_tasks.specialties import progression_specialty
    from imaging_tasks.progression.train import train_progression
    from imaging_tasks.warehouse import DuckDBWarehouse

    specialty = progression_specialty()
    sessions, scores, truth = synthesize_cohort(patients, seed=7)
    long_s, long_c, _ = synthesize_cohort(1, seed=8, params=CohortParams(sessions=(10, 10)))
    trained = train_progression(sessions, scores, truth=truth, epochs=epochs, out=Path(tmp) / "model")
    rows, score_rows = sessions + long_s, scores + long_c
    studies = {r["study_id"]: {"specialty": specialty, "study_id": r["study_id"], "patient_id": r["patient_id"],
                               "study_date": r["study_date"], "status": "loaded"} for r in rows}
    warehouse = Path(tmp) / "w.duckdb"
    with DuckDBWarehouse(warehouse).transaction() as tx:
        tx.upsert("studies", list(studies.values()))
        tx.upsert("roi_features", [{k: r[k] for k in ("study_id", "atlas", "roi", "metric", "value", "unit")}
                                   | {"specialty": specialty} for r in rows])
        tx.upsert("cognitive_scores", [dict(r, specialty=specialty) for r in score_rows])
    queue.put((trained.model_uri, str(warehouse), long_s[0]["patient_id"], len(rows), len(score_rows)))


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median_s": statistics.median(ordered), "p90_s": ordered[int(0.9 * (len(ordered) - 1))],
            "min_s": ordered[0], "n": len(ordered)}


def _measure(tmp: str, model_uri: str, warehouse: str, patient: str, scenario: str, repeats: int, queue) -> None:
    """Child process: a fresh api-server app.  ``cold``: the first request is the POST.  ``warmed``: an /imaging
    page first, then wait for the model warm-up the QC app starts, then the first POST."""
    _environment(Path(tmp) / "home")
    os.environ["AIRFLOW_VAR_IMAGING_WAREHOUSE"] = f"duckdb://{warehouse}"
    os.environ["AIRFLOW_VAR_IMAGING_PROGRESSION_MODEL_URI"] = model_uri
    assert "torch" not in sys.modules
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    app = create_app(apps="core")
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    headers = {"Authorization": f"Bearer {token}"}
    out = {"waited": 0.0}
    with TestClient(app) as client:
        def post():
            started = time.perf_counter()
            response = client.post("/imaging/predict-progression", json={"patient_id": patient}, headers=headers)
            took = time.perf_counter() - started
            assert response.status_code == 200, response.text
            return took, response.json()

        def get(url):
            started = time.perf_counter()
            response = client.get(url, headers=headers)
            assert response.status_code == 200, response.text
            return time.perf_counter() - started

        if scenario == "warmed":
            started = time.perf_counter()
            get("/imaging/patients")
            from imaging_dags.qc.progression import MODELS

            while not MODELS._held and time.perf_counter() - started < 120:
                time.sleep(0.05)
            out["waited"] = time.perf_counter() - started
            out["first"] = post()[0]
        else:
            out["first"], out["body"] = post()
            out["warm"] = [post()[0] for _ in range(repeats)]
            out["timeline"] = [get(f"/imaging/patient-timeline/{patient}") for _ in range(20)]
            out["page"] = [get(f"/imaging/patients/{patient}") for _ in range(20)]
    queue.put(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-progression-api-")
    try:
        t0 = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_prepare, args=(tmp, args.patients, args.epochs, queue))
        child.start()
        model_uri, warehouse, patient, n_rows, n_scores = queue.get(timeout=900)
        child.join()
        prepared_s = time.perf_counter() - t0

        _environment(Path(tmp) / "home")
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
        runs = {}
        for scenario in ("cold", "warmed"):
            child = ctx.Process(target=_measure, args=(tmp, model_uri, warehouse, patient, scenario, args.repeats,
                                                       queue))
            child.start()
            runs[scenario] = queue.get(timeout=900)
            child.join()
        first_s, warm, timeline, page, body = (runs["cold"][k] for k in ("first", "warm", "timeline", "page",
                                                                          "body"))
        warmed_first_s, warmed_wait_s = runs["warmed"]["first"], runs["warmed"]["waited"]
        assert body["n_sessions"] == 10
        result = {
            "what": "POST /imaging/predict-progression through the api-server app (TestClient), one 10-session "
                    "patient, DuckDB warehouse",
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_avg_1m": os.getloadavg()[0]},
            "warehouse": {"patients": args.patients + 1, "roi_feature_rows": n_rows, "score_rows": n_scores},
            "model": body["model"] | {"epochs": args.epochs},
            "first_call_s": first_s, "first_call_after_warm_up_s": warmed_first_s,
            "warm_up_wait_s": warmed_wait_s, "warm": _stats(warm), "timeline_json": _stats(timeline),
            "timeline_page": _stats(page), "target_s": TARGET_S,
            "meets_target": {"first_call_cold": first_s <= TARGET_S,
                             "first_call_after_warm_up": warmed_first_s <= TARGET_S,
                             "warm_median": statistics.median(warm) <= TARGET_S},
            "setup_s": prepared_s,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "progression_api.json").write_text(json.dumps(result, indent=2))
    ms = lambda s: f"{1000 * s:.1f} ms"  # noqa: E731
    md = ["# Progression API latency", "", f"{result['what']}; {result['when']}; {os.cpu_count()} CPUs, load "
          f"{result['machine']['load_avg_1m']:.1f}. Target <= {TARGET_S:g} s.", "",
          "| call | median | p90 | min | n |", "|---|---|---|---|---|",
          f"| POST, first call in a fresh api-server process (QC app build, torch import, model load) | "
          f"{ms(first_s)} | | | 1 |",
          f"| POST, first call once the QC app was built and its model warm-up done ({warmed_wait_s:.1f} s after "
          f"the first /imaging page) | {ms(warmed_first_s)} | | | 1 |"]
    for label, key in (("POST, warm", "warm"), ("GET timeline JSON", "timeline_json"),
                       ("GET timeline page (HTML + SVG)", "timeline_page")):
        s = result[key]
        md.append(f"| {label} | {ms(s['median_s'])} | {ms(s['p90_s'])} | {ms(s['min_s'])} | {s['n']} |")
    md += ["", "Meets the target: " + ", ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'no'}"
                                             for k, v in result["meets_target"].items()) + "."]
    (RESULTS / "progression_api.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
