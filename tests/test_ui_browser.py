"""The Airflow UI in a real browser, as a person meets it after `make up` (issue 8).

Debian's chromium (/usr/bin/chromium, installed by `make install`) driven by Playwright, against a real Airflow
stack (tests/airflow_stack.py): log in on the login page; every DAG's trigger form submits at its defaults, with
"Unpause ... on trigger" left as the UI has it; a cardiovascular run over two synthetic studies is followed to
success, its mapped instances named by study, and a study's QC page is opened from the task's extra link; an
out-of-range number never reaches a run.  A failing step leaves a screenshot and the components' log tails.
"""
from __future__ import annotations

import json
import re
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from airflow_stack import NO_SCHEDULED_RUN_CRON, AirflowStack, StackError

pytestmark = pytest.mark.scheduler

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DAGS = ("neuroimaging", "cardiovascular", "pathology", "mammography")
REQUIRED = "This field is required"  # the 3.3 form's message for a non-nullable field left empty


@dataclass
class UI:
    stack: AirflowStack
    page: object
    tmp: Path
    studies: list[str]
    runs: dict[str, str] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str):
        """Screenshot into tmp and the components' log tails when anything inside fails."""
        try:
            yield
        except Exception as exc:
            shot = self.tmp / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
            try:
                self.page.screenshot(path=str(shot), full_page=True)
            except Exception as shot_exc:  # the browser itself may be what failed
                shot = f"(no screenshot: {shot_exc})"
            logs = "" if isinstance(exc, StackError) else "\n" + self.stack.logs(1500)  # StackError has them
            raise AssertionError(f"{name}: {exc}\npage: {self.page.url}\nscreenshot: {shot}{logs}") from exc


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A stack with two cardiac CT studies on its landing bucket, and a browser logged in on the login page."""
    from playwright.sync_api import expect, sync_playwright

    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.deid.pseudonym import pseudo_id
    from imaging_tasks.specialties import synthesizer

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make install` installs Debian's chromium package"
    tmp = tmp_path_factory.mktemp("ui-browser")
    buckets = {"landing": tmp / "landing", "lake": tmp / "lake", "warehouse": tmp / "warehouse.duckdb"}
    buckets["landing"].mkdir()
    truths = synthesizer("cardiovascular")(buckets["landing"], 2, 41)
    studies = sorted(pseudo_id(DEMO_KEY, json.loads(t.read_text())["study_uid"], "study") for t in truths)
    t0 = time.monotonic()
    # no nightly run beside the ones the test triggers, whatever the hour CI runs at (02:00 UTC made one)
    with AirflowStack(tmp, buckets, env={"AIRFLOW__IMAGING__SCHEDULE": NO_SCHEDULED_RUN_CRON}) as stack, \
            sync_playwright() as pw:
        print(f"\nAirflow stack up in {stack.started_in:.1f}s at {stack.url}")
        context = pw.chromium.launch_persistent_context(
            str(tmp / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(20_000)  # generous: the api-server shares 2 CPUs with the tasks it serves
        expect.set_options(timeout=20_000)
        page = context.pages[0] if context.pages else context.new_page()
        state = UI(stack, page, tmp, studies)
        with state.step("log in"):
            _log_in(state)
        yield state
        context.close()
    print(f"\nbrowser tests: {time.monotonic() - t0:.1f}s in all (stack start and stop included)")


def _log_in(ui: UI) -> None:
    from playwright.sync_api import expect

    page, stack = ui.page, ui.stack
    page.goto(stack.url + "/")
    page.wait_for_url(re.compile(r"/auth/login\?next="))  # not logged in: the UI sends one to its login page
    expect(page.get_by_role("heading", name="Sign into Airflow")).to_be_visible()
    page.get_by_role("textbox", name="Username").fill(stack.username)
    page.get_by_role("textbox", name="Password").fill(stack.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(stack.url + "/")
    expect(page.get_by_role("heading", name="Welcome")).to_be_visible()


def _open_trigger_form(ui: UI, dag_id: str):
    from playwright.sync_api import expect

    ui.page.goto(f"{ui.stack.url}/dags/{dag_id}")
    ui.page.get_by_role("button", name="Trigger Dag").click()
    dialog = ui.page.get_by_role("dialog")
    expect(dialog.get_by_role("heading", name=f"Trigger Dag - {dag_id}")).to_be_visible()
    return dialog


def _open_section(dialog, section: str):
    """Expand a section of the params form (an accordion: one open at a time); returns its region."""
    toggle = dialog.get_by_role("button", name=section, exact=True)
    if toggle.get_attribute("aria-expanded") != "true":
        toggle.click()
    return dialog.get_by_role("region").first


def _trigger_at_defaults(ui: UI, dag_id: str) -> str:
    """Open the DAG's trigger form, check what it shows, submit it untouched; returns the new run's id."""
    from playwright.sync_api import expect

    api = ui.stack.api
    details = api.get(f"/dags/{dag_id}/details")
    params = details["params"]
    dialog = _open_trigger_form(ui, dag_id)
    # DAGs are paused at creation, so the form offers to unpause; it is left as the UI has it (checked)
    unpause = dialog.get_by_role("checkbox", name=f"Unpause {dag_id} on trigger")
    if details["is_paused"]:
        expect(unpause).to_be_checked()
    else:
        expect(unpause).to_have_count(0)  # offered only while the DAG is paused
    # every field is shown under its section with its title; none is required and empty
    sections: dict[str, dict[str, str]] = {}
    for name, param in params.items():
        schema = param.get("schema") or {}
        sections.setdefault(schema.get("section") or "Run Parameters", {})[name] = schema.get("title") or name
    for section, titles in sections.items():
        region = _open_section(dialog, section)
        for name, title in titles.items():
            expect(region.locator(f"#element_{name}, [name=element_{name}]").first).to_be_attached()
            expect(region.locator("label[data-part=label]", has_text=title)).to_be_visible()
        expect(dialog.get_by_text(REQUIRED)).to_have_count(0)
    submit = dialog.get_by_role("button", name="Trigger", exact=True)
    expect(submit).to_be_enabled()
    submit.click()
    expect(dialog).to_be_hidden()
    ui.page.wait_for_url(re.compile(rf"/dags/{dag_id}/runs/[^/]+$"))  # the UI opens the new run
    run_id = urllib.parse.unquote(ui.page.url.rsplit("/runs/", 1)[1])
    ui.runs[dag_id] = run_id
    run = api.run(dag_id, run_id)
    assert run["run_type"] == "manual", run
    assert run["conf"] == {name: p["value"] for name, p in params.items()}, "the form submitted its defaults"
    # the UI sends the unpause (PATCH) alongside the run (POST) and opens the run once the POST answers
    ui.stack.wait_until(lambda: not api.get(f"/dags/{dag_id}")["is_paused"], f"{dag_id} unpaused on trigger", 20)
    return run_id


@pytest.mark.parametrize("dag_id", DAGS)
def test_trigger_form_submits_at_its_defaults(ui, dag_id):
    with ui.step(f"trigger {dag_id} at its defaults"):
        _trigger_at_defaults(ui, dag_id)


def test_cardiovascular_run_from_the_ui_succeeds_and_links_its_studies(ui):
    from playwright.sync_api import expect

    stack, page = ui.stack, ui.page
    with ui.step("cardiovascular run to success"):
        run_id = ui.runs.get("cardiovascular") or _trigger_at_defaults(ui, "cardiovascular")
        stack.wait_for_run("cardiovascular", run_id, timeout=150)
        quoted = urllib.parse.quote(run_id, safe="")
        instances = [t for t in stack.api.task_instances("cardiovascular", run_id) if t["task_id"] == "calcium_scoring"]
        assert sorted(t["rendered_map_index"] for t in instances) == ui.studies, instances  # named by study
        page.goto(f"{stack.url}/dags/cardiovascular/runs/{quoted}")
        expect(page.get_by_role("heading", name=run_id)).to_be_visible()
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()
    with ui.step("mapped study instance: extra link to its QC page"):
        first = min(instances, key=lambda t: t["map_index"])
        page.goto(f"{stack.url}/dags/cardiovascular/runs/{quoted}/tasks/calcium_scoring/mapped/{first['map_index']}"
                  "/details")  # the Details tab shows the instance's extra links
        expect(page.get_by_role("heading", name=f"calcium_scoring [{first['rendered_map_index']}]")).to_be_visible()
        links = page.get_by_role("heading", name="Extra Links").locator("xpath=..")
        link = links.get_by_role("link", name="Study QC")
        expect(link).to_be_visible()
        link.click()
        page.wait_for_load_state("load")
        expect(page.get_by_text(first["rendered_map_index"]).first).to_be_visible()
        picture = page.locator("img").first
        picture.scroll_into_view_if_needed()  # a lazily loaded picture loads once in view
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=picture.element_handle())


def test_out_of_range_number_never_reaches_a_run(ui):
    """pathology's tile_px has minimum 32: typed 10, the 3.3 form either refuses before submit (disabled Trigger
    or a message) or brings the value into range; what it posts is never below the minimum."""
    from playwright.sync_api import expect

    page = ui.page
    posted: list[dict] = []

    def capture(route):  # look at what the form would post, without creating a run or unpausing
        if route.request.method in ("POST", "PATCH"):
            if route.request.method == "POST":
                posted.append(json.loads(route.request.post_data))
            route.fulfill(status=400, json={"detail": "intercepted by the test"})
        else:
            route.continue_()

    pattern = re.compile(r".*/api/v2/dags/pathology(/dagRuns)?$")
    with ui.step("pathology tile_px below its minimum"):
        page.route(pattern, capture)
        try:
            dialog = _open_trigger_form(ui, "pathology")
            tile_px = _open_section(dialog, "Pathology processing").get_by_role("spinbutton", name="Tile size (pixels)")
            tile_px.fill("10")
            submit = dialog.get_by_role("button", name="Trigger", exact=True)
            tile_px.blur()
            message = dialog.get_by_text(re.compile(r"minimum|at least|greater than or equal", re.I))
            if submit.is_enabled() and not message.count():  # 3.3: the input clamps to the bounds on blur
                expect(tile_px).to_have_value("32")
                submit.click()
                expect(dialog.get_by_text("intercepted by the test")).to_be_visible()
                assert posted and posted[-1]["conf"]["tile_px"] >= 32, posted
        finally:
            page.unroute(pattern)
            page.keyboard.press("Escape")
