"""The progression DAG under a real Airflow, and its patient timelines reached from the UI (issue 19).

One Airflow stack (tests/airflow_stack.py: api-server, scheduler, dag-processor, triggerer; LocalExecutor on
SQLite) over a DuckDB warehouse holding the neuroimaging sessions of a few synthetic patients, their cognitive
scores uploaded raw (``MRN...`` IDs, real dates) to ``<landing>/cognitive_scores/`` and a progression model trained
for a few epochs (the Variable ``imaging_progression_model_uri``, set through ``AIRFLOW_VAR_...``):

- an asset event for ``imaging_neuroimaging_warehouse`` posted through the REST API (what the neuroimaging DAG's
  load emits) makes the scheduler start an ``asset_triggered`` run of ``progression``, which predicts every
  patient once (patients x horizons x scores, model name and version on every row);
- one more session of one patient and another event: that patient only is predicted again; an event with nothing
  changed: ``predict`` is skipped and nothing is written;
- in chromium (Debian's, via Playwright): log in, "Imaging patients" in the UI's navigation, a patient in the list,
  the timeline's SVG charts with the stored predictions, all inside the UI's iframe; no raw ID in any page;
- nor in the warehouse, Airflow's metadata DB, the task logs or any component's log.

The test process opens the warehouse only between runs (each call opens and closes its own DuckDB connection):
DuckDB allows one writing process at a time.
"""
from __future__ import annotations

import csv
import datetime as dt
import time
import types
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from airflow_stack import NO_SCHEDULED_RUN_CRON, AirflowStack
from test_progression_api import fill_warehouse

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler]

DAG_ID = "progression"
SPECIALTY = "neuroimaging"  # the specialty whose ROI features feed progression
ASSET = f"imaging_{SPECIALTY}_warehouse"
MODEL = ("progression-lstm", "airflow.1")
PATIENTS = 4
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The stack (started while the model trains), the warehouse path, the cohort's sessions and truth, the model's
    spec."""
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.progression.cohort import CohortParams, synthesize_cohort

    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("progression-airflow")
    buckets = {"landing": tmp / "landing", "lake": tmp / "lake", "warehouse": tmp / "warehouse.duckdb"}
    # every patient predictable: at least 2 sessions (the model's minimum), every score measured at the first visit
    sessions, _, truth = synthesize_cohort(PATIENTS, seed=19, key=DEMO_KEY, params=CohortParams(sessions=(2, 5)))
    fill_warehouse(buckets["warehouse"], sessions, [], SPECIALTY)  # the sessions only: scores come as uploads
    upload = buckets["landing"] / "cognitive_scores" / "site-a" / "scores.csv"
    upload.parent.mkdir(parents=True)
    with open(upload, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["patient_id", "date", "score", "value"])
        writer.writeheader()
        writer.writerows(truth.raw_score_rows())
    model_out = tmp / "model" / "progression"
    stack_env = {"AIRFLOW_VAR_IMAGING_PROGRESSION_MODEL_URI": f"{model_out}.pt",  # written while the stack starts
                 # the specialty DAGs are parsed too: no nightly run of theirs beside the progression runs
                 "AIRFLOW__IMAGING__SCHEDULE": NO_SCHEDULED_RUN_CRON,
                 # an asset event starts runs of unpaused DAGs only: unpaused from the first parse
                 "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False"}
    stack = AirflowStack(tmp / "stack", buckets, env=stack_env, dag_ids=[DAG_ID])
    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(_train, model_out)
        with stack:
            spec = training.result()
            print(f"\nAirflow stack up in {stack.started_in:.1f}s at {stack.url}")
            yield types.SimpleNamespace(stack=stack, warehouse=buckets["warehouse"], sessions=sessions,
                                        truth=truth, spec=spec, runs=[])
    print(f"\nprogression under Airflow: {time.monotonic() - t0:.1f}s in all (stack start and stop included)")


def _train(out: Path):
    import torch

    from imaging_tasks.progression.cohort import synthesize_cohort
    from imaging_tasks.progression.model import load_progression_model
    from imaging_tasks.progression.train import train_progression

    torch.set_num_threads(1)
    sessions, scores, truth = synthesize_cohort(24, seed=77)  # other patients than the warehouse's
    trained = train_progression(sessions, scores, seed=0, epochs=3, hidden=8, truth=truth, out=out,
                                name=MODEL[0], version=MODEL[1])
    return load_progression_model(trained.model_uri)[1]  # the spec: horizons, outputs


# ------------------------------------------------------------------------------------------------ helpers
def _post_event(stack: AirflowStack, **extra) -> dict:
    """``POST /api/v2/assets/events`` for the neuroimaging warehouse asset (``name_pattern`` is a LIKE search:
    the exact name is kept)."""
    found = stack.api.get("/assets", name_pattern=ASSET, limit=100)["assets"]
    (asset_id,) = [a["id"] for a in found if a["name"] == ASSET]
    return stack.api.post("/assets/events", {"asset_id": asset_id, "extra": extra})


def _event_run(env, **extra) -> dict:
    """Post an event, wait for the asset-triggered run it starts and for that run to succeed."""
    stack = env.stack
    known = {r["dag_run_id"] for r in stack.api.runs(DAG_ID)}
    posted = time.monotonic()
    _post_event(stack, **extra)

    def new_run():
        return [r for r in stack.api.runs(DAG_ID) if r["dag_run_id"] not in known]

    (run,) = stack.wait_until(new_run, "an asset-triggered progression run", timeout=60)
    assert run["run_type"] == "asset_triggered", run
    run = stack.wait_for_run(DAG_ID, run["dag_run_id"], timeout=120)
    print(f"\n{run['dag_run_id']}: started and finished {time.monotonic() - posted:.1f}s after its event")
    # the run consumed the event posted (asked once the run has started: Airflow answers 500 for a queued run)
    quoted = urllib.parse.quote(run["dag_run_id"], safe="")
    events = stack.api.get(f"/dags/{DAG_ID}/dagRuns/{quoted}/upstreamAssetEvents")["asset_events"]
    assert [(e["name"], e["extra"]) for e in events] == [(ASSET, {**extra, "from_rest_api": True})], events
    env.runs.append(run["dag_run_id"])
    return run


def _states(stack: AirflowStack, run_id: str) -> dict[str, str]:
    return {t["task_id"]: t["state"] for t in stack.api.task_instances(DAG_ID, run_id)}


def _xcom(stack: AirflowStack, run_id: str, task_id: str, key: str):
    quoted = urllib.parse.quote(run_id, safe="")
    return stack.api.get(f"/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/{task_id}/xcomEntries/{key}")["value"]


def _predictions(env) -> list[dict]:
    from imaging_tasks.warehouse import DuckDBWarehouse

    columns = ("patient_id", "model", "model_version", "horizon_months", "score", "run_id", "computed_at",
               "as_of_study_id", "n_sessions")
    rows = DuckDBWarehouse(env.warehouse).query(
        f"SELECT {', '.join(columns[:-3])}, CAST(computed_at AS VARCHAR), {', '.join(columns[-2:])} FROM predictions "
        "ORDER BY patient_id, score, horizon_months")
    return [dict(zip(columns, r)) for r in rows]


def _prediction_events(stack: AirflowStack) -> list[dict]:
    found = stack.api.get("/assets", name_pattern="imaging_progression_predictions", limit=100)["assets"]
    (asset_id,) = [a["id"] for a in found if a["name"] == "imaging_progression_predictions"]
    return stack.api.get("/assets/events", asset_id=asset_id, limit=100)["asset_events"]


@pytest.fixture(scope="module")
def first_run(env) -> dict:
    run = _event_run(env, studies=len({r["study_id"] for r in env.sessions}))
    return {"run": run, "rows": _predictions(env)}


# ------------------------------------------------------------------------------------------------ the DAG
def test_an_asset_event_starts_a_run_that_predicts_every_patient(env, first_run):
    stack, spec = env.stack, env.spec
    run_id = first_run["run"]["dag_run_id"]
    assert _states(stack, run_id) == {"ingest_scores": "success", "predict": "success"}
    assert _xcom(stack, run_id, "ingest_scores", "return_value")["loaded"] == 1  # the raw upload, pseudonymised
    rows = first_run["rows"]
    horizons, outputs = spec.horizons_months, spec.outputs
    assert len(rows) == PATIENTS * len(horizons) * len(outputs)
    assert {r["patient_id"] for r in rows} == set(env.truth.patients)
    for patient in env.truth.patients:  # exactly one set per patient: each horizon and score once
        assert sorted((r["horizon_months"], r["score"]) for r in rows if r["patient_id"] == patient) == sorted(
            (h, s) for h in horizons for s in outputs)
    assert {(r["model"], r["model_version"], r["run_id"]) for r in rows} == {(*MODEL, run_id)}
    summary = _xcom(stack, run_id, "predict", "summary")
    assert (summary["patients"], summary["changed"], summary["predicted"], summary["refused"]) == (
        PATIENTS, PATIENTS, PATIENTS, 0)
    (event,) = _prediction_events(stack)
    assert event["extra"]["predicted"] == PATIENTS and event["extra"]["rows"] == len(rows)
    assert (event["extra"]["model"], event["extra"]["model_version"]) == MODEL


def test_a_new_session_predicts_that_patient_only_and_nothing_new_nothing(env, first_run):
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.deid.pseudonym import pseudo_id

    stack = env.stack
    before = first_run["rows"]
    patient = sorted(env.truth.patients)[0]
    mine = [r for r in env.sessions if r["patient_id"] == patient]
    last = max(r["study_date"] for r in mine)
    later = (dt.datetime.strptime(last, "%Y%m%d") + dt.timedelta(days=200)).strftime("%Y%m%d")
    study = pseudo_id(DEMO_KEY, f"{env.truth.patients[patient].raw_id}/new", "study")
    new_session = [{**r, "study_id": study, "study_date": later} for r in mine if r["study_date"] == last]
    fill_warehouse(env.warehouse, new_session, [], SPECIALTY)  # no run is active: the warehouse is the test's
    env.sessions.extend(new_session)

    run_id = _event_run(env, studies=1)["dag_run_id"]
    assert _states(stack, run_id) == {"ingest_scores": "success", "predict": "success"}
    assert _xcom(stack, run_id, "ingest_scores", "return_value")["already_loaded"] == 1
    summary = _xcom(stack, run_id, "predict", "summary")
    assert (summary["changed"], summary["predicted"], summary["unchanged"]) == (1, 1, PATIENTS - 1)
    after = _predictions(env)
    assert len(after) == len(before)
    assert {r["patient_id"] for r in after if r["run_id"] == run_id} == {patient}
    assert {(r["as_of_study_id"], r["n_sessions"]) for r in after if r["patient_id"] == patient} == {
        (study, len({r["study_id"] for r in mine}) + 1)}
    assert [r for r in after if r["patient_id"] != patient] == [r for r in before if r["patient_id"] != patient]

    # nothing changed since: predict skipped (no write, no event), the run a success
    quiet = _event_run(env)["dag_run_id"]
    assert _states(stack, quiet) == {"ingest_scores": "success", "predict": "skipped"}
    assert _xcom(stack, quiet, "predict", "summary")["predicted"] == 0
    assert _predictions(env) == after
    assert [e["extra"]["run_id"] for e in _prediction_events(stack)] == [env.runs[0], run_id]
    assert [r["run_type"] for r in stack.api.runs(DAG_ID)] == ["asset_triggered"] * 3  # nothing else


# ------------------------------------------------------------------------------------------------ the UI
def test_patient_timeline_from_the_ui_navigation(env, first_run, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from imaging_tasks.warehouse import DuckDBWarehouse
    from test_ui_browser import CHROMIUM_ARGS, _log_in

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make install` installs Debian's chromium package"
    stack, spec = env.stack, env.spec
    patient = sorted(env.truth.patients)[-1]
    n_sessions = DuckDBWarehouse(env.warehouse).count("studies", "WHERE specialty = ? AND patient_id = ?",
                                                      [SPECIALTY, patient])
    raw_ids = sorted(p.raw_id for p in env.truth.patients.values())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(20_000)
        expect.set_options(timeout=20_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            _log_in(types.SimpleNamespace(page=page, stack=stack))
            page.get_by_role("link", name="Imaging patients").click()  # the plugin's top-level nav entry
            # the UI mirrors the iframe's location in its own URL (/plugin/<url_route>/<path in the iframe>)
            page.wait_for_url(f"{stack.url}/plugin/imaging-patients/imaging/patients")
            frame = page.frame_locator("iframe")
            expect(frame.get_by_role("heading", name="Patients · progression timelines")).to_be_visible()
            for pid in env.truth.patients:
                expect(frame.get_by_role("link", name=pid, exact=True)).to_be_visible()
            listing = _frame_html(page)
            frame.get_by_role("link", name=patient, exact=True).click()

            # the timeline, still inside the UI's iframe (the page's links are the api-server's own paths)
            expect(frame.get_by_role("heading", name=f"Patient {patient} · progression timeline")).to_be_visible()
            page.wait_for_url(f"{stack.url}/plugin/imaging-patients/imaging/patients/{patient}")
            expect(page.get_by_role("link", name="Imaging patients")).to_be_visible()  # the UI around it
            charts = frame.locator("svg.chart")
            expect(charts).to_have_count(3 + len(spec.outputs))  # three ROI features, then each score
            for label in ("Hippocampal GM volume", "Whole-brain volume", "Mean SUVR"):
                expect(frame.locator(f"svg.chart[aria-label='{label}'] circle.point")).to_have_count(n_sessions)
            for score in spec.outputs:
                chart = frame.locator(f"svg.chart[aria-label='{score}']")
                predicted = chart.locator("g.series.predicted")
                expect(predicted).to_have_count(1)
                assert (predicted.get_attribute("data-model"), predicted.get_attribute("data-model-version")) == MODEL
                markers = predicted.locator("path.point.predicted")
                expect(markers).to_have_count(len(spec.horizons_months))
                tips = markers.locator("title").all_text_contents()
                assert [t.split(" at ")[1].split(" (")[0] for t in tips] == [
                    f"+{h:g} months" for h in spec.horizons_months], tips
                assert all(t.startswith(f"{MODEL[0]} {MODEL[1]}: {score} ") for t in tips), tips
                expect(chart.locator("text", has_text=f"{MODEL[0]} {MODEL[1]}")).to_have_count(1)  # the legend
            timeline = _frame_html(page)
            # that URL is a deep link: reloaded, the UI opens the same timeline in its iframe
            page.reload()
            expect(frame.get_by_role("heading", name=f"Patient {patient} · progression timeline")).to_be_visible()
            expect(frame.locator("svg.chart g.series.predicted path.point")).to_have_count(
                len(spec.outputs) * len(spec.horizons_months))
            assert errors == []
        except Exception:
            page.screenshot(path=str(tmp_path / "timeline.png"), full_page=True)
            print(f"\nscreenshot: {tmp_path / 'timeline.png'}\n{stack.logs(1500)}")
            raise
        finally:
            browser.close()
    assert f"/imaging/patients/{patient}" in listing
    for html in (listing, timeline):  # pseudonyms only: no raw ID of the uploads, escaped or not
        assert "MRN" not in html and not any(raw in html for raw in raw_ids)


def _frame_html(page) -> str:
    """The HTML of the UI's plugin iframe (the QC page itself, once loaded)."""
    (frame,) = [f for f in page.frames if f != page.main_frame and "/imaging/" in f.url]
    return frame.content()


def test_no_raw_id_outside_the_uploads(env, first_run):
    """The uploads' raw patient IDs reach neither the warehouse, Airflow's metadata DB (XComs, asset events), the
    task logs nor any component's log (everything under the stack's directory)."""
    from imaging_tasks.warehouse import TABLES, DuckDBWarehouse

    raw_ids = sorted(p.raw_id for p in env.truth.patients.values())
    files = [p for p in env.stack.tmp.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" and "task_id=" in str(p) for p in files), "no task log to scan"
    assert any(p.name == "airflow.db" for p in files)
    found = {(raw, str(p.relative_to(env.stack.tmp))) for p in files for blob in [p.read_bytes()] for raw in raw_ids
             if raw.encode() in blob}
    warehouse = DuckDBWarehouse(env.warehouse)
    dump = "\n".join(repr(warehouse.query(f"SELECT * FROM {t}")) for t in TABLES)
    found |= {(raw, "warehouse rows") for raw in raw_ids if raw in dump}
    assert not found, f"raw patient IDs found in: {sorted(found)}"
    assert warehouse.count("cognitive_scores") == len(env.truth.raw_scores)  # the upload was loaded, pseudonymised


def test_the_scheduler_preloads_torch_for_the_task_processes_it_forks(env, first_run):
    """``imaging_dags.preload``: the scheduler (LocalExecutor) has torch loaded, so the task processes it forks
    (the predict task here, every GPU step in the specialty DAGs) do not import it again; the other components do
    not carry it for nothing.  The run above succeeded with it: the forked task used torch."""
    stack = env.stack

    def mapped(name: str) -> bool:
        maps = Path(f"/proc/{stack.procs[name].pid}/maps").read_text()
        return "libtorch_cpu" in maps or "libtorch.so" in maps

    assert mapped("scheduler")
    assert not mapped("dag-processor") and not mapped("triggerer")
    assert "torch preloaded in airflow" in (stack.tmp / "scheduler.log").read_text(errors="replace")
