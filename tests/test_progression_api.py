"""Progression in the QC app (issue 19): ``POST /imaging/predict-progression``, the patient timeline (JSON and the
SVG page) through the api-server app (Airflow's ``create_app`` with the plugins, the SimpleAuthManager and real
JWTs), against a DuckDB warehouse filled from the synthetic cohort and a reference model trained for a few epochs;
then the timeline page in a real browser (Debian chromium via Playwright, the app served by uvicorn).
"""
from __future__ import annotations

import datetime as dt
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SVG = "{http://www.w3.org/2000/svg}"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def fill_warehouse(path: Path, session_rows: list[dict], score_rows: list[dict], specialty: str) -> None:
    """Session rows -> ``studies`` + ``roi_features``, score rows -> ``cognitive_scores`` (what the DAGs load)."""
    from imaging_tasks.warehouse import DuckDBWarehouse

    studies = {}
    for r in session_rows:
        studies[r["study_id"]] = {"specialty": specialty, "study_id": r["study_id"], "patient_id": r["patient_id"],
                                  "study_date": r["study_date"], "status": "loaded"}
    features = [{k: r[k] for k in ("study_id", "atlas", "roi", "metric", "value", "unit")} | {"specialty": specialty}
                for r in session_rows]
    scores = [dict(r, specialty=specialty) for r in score_rows]
    with DuckDBWarehouse(path).transaction() as tx:
        tx.upsert("studies", list(studies.values()))
        tx.upsert("roi_features", features)
        tx.upsert("cognitive_scores", scores)


def prediction_rows(records: list[dict], specialty: str, n_sessions: dict[str, int]) -> list[dict]:
    """``predict`` records as the ``predictions`` table holds them (what the progression DAG writes)."""
    import datetime as dt

    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    return [{"specialty": specialty, "patient_id": r["patient_id"], "model": r["model_name"],
             "model_version": r["model_version"], "horizon_months": r["horizon_months"], "score": r["score"],
             "value": r["value"], "as_of_study_id": r["as_of_study_id"], "as_of_date": r["as_of_date"],
             "target_date": r["target_date"], "n_sessions": n_sessions[r["patient_id"]],
             "model_sha256": r["model_sha256"], "run_id": "manual__test", "computed_at": now} for r in records]


@pytest.fixture(scope="module")
def env(airflow_db, tmp_path_factory):
    """A warehouse with a training cohort, two 10-session patients, a one-session patient, scores and stored
    predictions of one 10-session patient; a model trained on the cohort; the api-server app and JWTs."""
    import torch

    from conftest import api_server_client
    from imaging_tasks.progression import CohortParams, build_sequences, load_progression_model, synthesize_cohort
    from imaging_tasks.specialties import progression_specialty
    from imaging_tasks.progression.model import predict
    from imaging_tasks.progression.train import train_progression
    from imaging_tasks.warehouse import DuckDBWarehouse

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("progression-api")
    specialty = progression_specialty()
    cohort_s, cohort_c, truth = synthesize_cohort(24, seed=11)
    long_s, long_c, _ = synthesize_cohort(2, seed=12, params=CohortParams(sessions=(10, 10)))
    one_s, one_c, _ = synthesize_cohort(1, seed=13, params=CohortParams(sessions=(1, 1)))
    trained = train_progression(cohort_s, cohort_c, truth=truth, epochs=3, hidden=8, seed=0, out=tmp / "model",
                                name="progression-lstm", version="test.1")
    sessions, scores = cohort_s + long_s + one_s, cohort_c + long_c + one_c
    warehouse = tmp / "w.duckdb"
    fill_warehouse(warehouse, sessions, scores, specialty)
    sequences = build_sequences(sessions, scores)
    long_ids = sorted({r["patient_id"] for r in long_s})
    one_id = one_s[0]["patient_id"]
    model, spec = load_progression_model(trained.model_uri)
    stored = long_ids[0]
    DuckDBWarehouse(warehouse).upsert("predictions", prediction_rows(
        predict(model, spec, sequences[stored]), specialty, {stored: len(sequences[stored].sessions)}))
    from imaging_tasks.progression.features import NotEnoughSessions
    from imaging_tasks.progression.store import refusal_rows

    why = NotEnoughSessions(one_id, 1, spec.min_sessions)  # as the progression DAG records it
    DuckDBWarehouse(warehouse).upsert("prediction_refusals", refusal_rows(
        [{"patient_id": one_id, "reason": why.reason, "message": why.message}], spec, specialty=specialty,
        run_id="scheduled__test", computed_at=dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_VAR_IMAGING_WAREHOUSE", f"duckdb://{warehouse}")
        mp.setenv("AIRFLOW_VAR_IMAGING_PROGRESSION_MODEL_URI", trained.model_uri)
        with api_server_client() as (client, tokens):
            yield {"client": client, "tokens": tokens, "model": model, "spec": spec, "sequences": sequences,
                   "long": long_ids, "one": one_id, "stored": stored, "specialty": specialty, "tmp": tmp,
                   "model_uri": trained.model_uri, "warehouse": warehouse}


def _auth(env, who: str = "admin") -> dict:
    return {"Authorization": f"Bearer {env['tokens'][who]}"}


def _predict(env, patient: str, who: str = "admin", **extra):
    return env["client"].post("/imaging/predict-progression", json={"patient_id": patient, **extra},
                               headers=_auth(env, who))


def test_predict_returns_the_documented_json_equal_to_predict_by_hand(env):
    from imaging_tasks.progression.model import predict

    patient = env["long"][1]
    response = _predict(env, patient)
    assert response.status_code == 200, response.text
    body = response.json()
    spec = env["spec"]
    assert set(body) == {"patient_id", "specialty", "model", "as_of_study_id", "as_of_date", "n_sessions",
                         "n_sessions_used", "predictions"}
    assert body["model"] == {"name": "progression-lstm", "version": "test.1", "sha256": spec.sha256}
    assert body["patient_id"] == patient and body["n_sessions"] == 10 and body["n_sessions_used"] == 10
    by_hand = predict(env["model"], spec, env["sequences"][patient])
    assert body["as_of_study_id"] == by_hand[0]["as_of_study_id"] == env["sequences"][patient].sessions[-1].study_id
    assert body["as_of_date"] == by_hand[0]["as_of_date"]
    assert len(body["predictions"]) == len(spec.horizons_months) * len(spec.outputs) == len(by_hand)
    for got, want in zip(body["predictions"], by_hand):
        assert set(got) == {"horizon_months", "score", "value", "target_date"}
        assert (got["horizon_months"], got["score"], got["target_date"]) == \
            (want["horizon_months"], want["score"], want["target_date"])
        assert got["value"] == pytest.approx(want["value"], rel=1e-6, abs=1e-6)
    assert response.headers["cache-control"] == "no-store"


def test_predict_refusals(env):
    client = env["client"]
    one = _predict(env, env["one"])
    assert one.status_code == 422, one.text
    body = one.json()
    assert body["reason"] == "not_enough_sessions" and body["sessions"] == 1
    assert body["min_sessions"] == env["spec"].min_sessions == 2
    assert "1 dated session" in body["detail"] and "at least 2" in body["detail"] and "predictions" not in body
    unknown = _predict(env, "PAAAAAAAAAAAAAAAA")
    assert unknown.status_code == 404 and unknown.json()["reason"] == "unknown_patient", unknown.text
    assert _predict(env, "../etc/passwd").status_code == 404
    assert client.post("/imaging/predict-progression", json={"patient": "x"}, headers=_auth(env)).status_code == 400
    # a model of one's own (edit access to the DAG: the admin has it); one that is not there says so
    assert _predict(env, env["long"][0], model_uri=env["model_uri"]).status_code == 200
    gone = _predict(env, env["long"][0], model_uri=str(env["tmp"] / "nowhere.pt"))
    assert gone.status_code == 503 and gone.json()["reason"] == "model_unusable", gone.text
    # authentication and authorization as the other QC routes
    assert client.post("/imaging/predict-progression", json={"patient_id": env["long"][0]}).status_code == 401
    assert client.post("/imaging/predict-progression", json={"patient_id": env["long"][0]},
                       headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403
    refused = _predict(env, env["long"][0], who="no_role")
    assert refused.status_code == 403 and "predictions" not in refused.text
    assert client.get(f"/imaging/patient-timeline/{env['long'][0]}").status_code == 401
    assert client.get(f"/imaging/patient-timeline/{env['long'][0]}", headers=_auth(env, "no_role")).status_code == 403
    assert client.get(f"/imaging/patients/{env['long'][0]}", headers=_auth(env, "no_role")).status_code == 403


def test_no_model_configured_and_a_replaced_model(env, monkeypatch):
    import shutil

    from imaging_dags.qc.progression import MODELS
    from imaging_tasks.progression import synthesize_cohort
    from imaging_tasks.progression.train import train_progression

    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_PROGRESSION_MODEL_URI", "")
    missing = _predict(env, env["long"][0])
    assert missing.status_code == 503 and "imaging_progression_model_uri" in missing.json()["detail"], missing.text
    # another model at the same URI (new file, new JSON) is loaded again, not served from the cache
    copy = env["tmp"] / "swap" / "model.pt"
    copy.parent.mkdir()
    shutil.copy(env["model_uri"], copy)
    shutil.copy(Path(env["model_uri"]).with_suffix(".json"), copy.with_suffix(".json"))
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_PROGRESSION_MODEL_URI", str(copy))
    first = _predict(env, env["long"][0]).json()
    assert first["model"]["sha256"] == env["spec"].sha256
    cohort_s, cohort_c, truth = synthesize_cohort(12, seed=21)
    other = train_progression(cohort_s, cohort_c, truth=truth, epochs=1, hidden=4, seed=1, out=env["tmp"] / "other",
                              version="test.2")
    shutil.copy(other.model_uri, copy)
    shutil.copy(Path(other.model_uri).with_suffix(".json"), copy.with_suffix(".json"))
    second = _predict(env, env["long"][0]).json()
    assert second["model"] == {"name": "progression-lstm", "version": "test.2", "sha256": other.sha256}
    assert second["predictions"] != first["predictions"]
    MODELS.clear()


def test_timeline_json(env):
    patient = env["stored"]
    response = env["client"].get(f"/imaging/patient-timeline/{patient}", headers=_auth(env))
    assert response.status_code == 200, response.text
    body = response.json()
    seq = env["sequences"][patient]
    assert [s["study_id"] for s in body["sessions"]] == [s.study_id for s in seq.sessions]
    assert [s["date"] for s in body["sessions"]] == sorted(s["date"] for s in body["sessions"])
    hippocampus = [s.measures[("synthetic_ad", "hippocampus", "gm_volume")] for s in seq.sessions]
    assert [s["features"]["hippocampal_gm_volume"] for s in body["sessions"]] == pytest.approx(hippocampus)
    assert all(s["features"]["mean_suvr"] is not None and s["features"]["whole_brain_volume"] > 500
               for s in body["sessions"])
    assert len(body["scores"]) == len(seq.scores)
    assert [s["date"] for s in body["scores"]] == sorted(s["date"] for s in body["scores"])
    spec = env["spec"]
    assert len(body["predictions"]) == len(spec.horizons_months) * len(spec.outputs)
    assert {(p["model"], p["model_version"], p["model_sha256"]) for p in body["predictions"]} == \
        {("progression-lstm", "test.1", spec.sha256)}
    none = env["client"].get(f"/imaging/patient-timeline/{env['long'][1]}", headers=_auth(env)).json()
    assert none["predictions"] == [] and len(none["sessions"]) == 10 and none["refusals"] == []
    assert body["refusals"] == []
    one = env["client"].get(f"/imaging/patient-timeline/{env['one']}", headers=_auth(env)).json()
    assert [(r["model"], r["model_version"], r["reason"]) for r in one["refusals"]] == \
        [("progression-lstm", "test.1", "not_enough_sessions")]
    assert "1 dated session" in one["refusals"][0]["message"] and one["predictions"] == []
    page = env["client"].get(f"/imaging/patients/{env['one']}", headers=_auth(env)).text
    assert "Not predicted (1)" in page and "not_enough_sessions" in page
    assert env["client"].get("/imaging/patient-timeline/PZZZZZZZZZZZZZZZZ", headers=_auth(env)).status_code == 404


def _svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", page, re.S)]


def test_timeline_page_draws_the_series_and_the_predictions(env):
    patient = env["stored"]
    response = env["client"].get(f"/imaging/patients/{patient}", headers={**_auth(env), "Accept": "text/html"})
    assert response.status_code == 200, response.text
    page = response.text
    charts = {svg.find(f"{SVG}title").text: svg for svg in _svgs(page)}
    assert {"Hippocampal GM volume", "Whole-brain volume", "Mean SUVR", "MMSE", "CDR_SB", "ADAS_Cog"} <= set(charts)
    n_sessions = len(env["sequences"][patient].sessions)
    for title in ("Hippocampal GM volume", "Whole-brain volume", "Mean SUVR"):
        assert len(charts[title].findall(f".//{SVG}circle")) == n_sessions, title
    seq, spec = env["sequences"][patient], env["spec"]
    for score in spec.outputs:
        svg = charts[score]
        observed = svg.findall(f".//{SVG}g[@class='series observed']/{SVG}circle")
        assert len(observed) == sum(1 for o in seq.scores if o.score == score)
        predicted = svg.findall(f".//{SVG}g[@class='series predicted']")
        assert len(predicted) == 1 and predicted[0].get("data-model-version") == "test.1"
        markers = predicted[0].findall(f"{SVG}path")
        assert len(markers) == len(spec.horizons_months)
        assert "stroke-dasharray" in predicted[0].find(f"{SVG}polyline").attrib
        assert "progression-lstm test.1" in "".join(svg.itertext())
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    index = env["client"].get("/imaging/patients", headers=_auth(env))
    assert index.status_code == 200 and f"/imaging/patients/{patient}" in index.text
    # an unknown patient's page is an HTML 404 like the other QC pages
    missing = env["client"].get("/imaging/patients/PZZZZZZZZZZZZZZZZ", headers={**_auth(env), "Accept": "text/html"})
    assert missing.status_code == 404 and "<h1>Not found</h1>" in missing.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_timeline_page_in_a_real_browser(env):
    """The page renders in chromium: the SVG charts with their markers, nothing refused by the CSP, no errors."""
    import uvicorn
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make install` installs Debian's chromium package"
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(env["client"].app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        patient = env["stored"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                context = browser.new_context(extra_http_headers=_auth(env))
                page = context.new_page()
                errors = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                response = page.goto(f"http://127.0.0.1:{port}/imaging/patients/{patient}")
                assert response.status == 200
                page.wait_for_load_state("load")
                assert page.locator("svg.chart").count() == 6
                n_sessions = len(env["sequences"][patient].sessions)
                assert page.locator("svg.chart[aria-label='Hippocampal GM volume'] circle").count() == n_sessions
                markers = page.locator("svg.chart g.predicted path.point")
                assert markers.count() == len(env["spec"].horizons_months) * len(env["spec"].outputs)
                box = page.locator("svg.chart").first.bounding_box()
                assert box and box["width"] > 300 and box["height"] > 100  # laid out, not collapsed
                assert errors == []
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
