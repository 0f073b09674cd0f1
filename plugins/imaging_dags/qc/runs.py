"""What the metadata DB says about a run's studies (task instances, XComs), joined with the lake's lineage rows.

XComs of the imaging DAGs carry pseudonyms, lake URIs, statuses and metrics only; of them, only those fields
are used here.  Mapped study task instances are tied to their study by their XCom, else by the name their
``map_index_template`` rendered (the study pseudonym), so failed instances are found too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from imaging_dags.qc import final_tasks, study_tasks
from imaging_dags.qc.lake import PATIENT, STUDY, LakeView

STEP_ORDER = {t: n for n, t in enumerate(("index_studies", "deidentify", "audit_phi", "ready_for_processing",
                                          "plan_tiles", "tile_features", "process_study",
                                          "finish_slide", "load_metadata"))}


def _step_rank(task_id: str) -> float:
    """Position in a chain: the generic tasks above, a specialty's own steps in their record's order in place of
    ``process_study`` (so "quarantined at" names the step that quarantined, not a later one passing it on)."""
    if task_id in STEP_ORDER:
        return STEP_ORDER[task_id]
    from imaging_tasks.specialties import get

    from imaging_dags.qc import specialties

    for name in specialties():
        names = [s.name for s in get(name).steps]
        if task_id in names:
            return STEP_ORDER["process_study"] + (names.index(task_id) - len(names)) / (len(names) + 1)
    return 99
FAILED = ("failed", "upstream_failed")
UNFINISHED = ("scheduled", "queued", "running", "up_for_retry", "up_for_reschedule", "deferred", "restarting")
MISSING = object()


# ---------------------------------------------------------------------------------------------- metadata DB
def recent_runs(session, dag_id: str, limit: int = 10) -> list[dict]:
    from airflow.models.dagrun import DagRun

    runs = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id)
                           .order_by(DagRun.run_after.desc(), DagRun.id.desc()).limit(limit))
    return [_run_dict(r) for r in runs]


def dag_run(session, dag_id: str, run_id: str) -> dict | None:
    from airflow.models.dagrun import DagRun

    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    return _run_dict(run) if run is not None else None


def _run_dict(run) -> dict:
    return {"run_id": run.run_id, "state": str(run.state) if run.state else None, "run_type": str(run.run_type),
            "run_after": run.run_after, "logical_date": run.logical_date, "start_date": run.start_date,
            "end_date": run.end_date}


def return_values(session, dag_id: str, run_id: str, task_ids) -> list[tuple[str, int, Any]]:
    """(task_id, map_index, value) of the run's ``return_value`` XComs of ``task_ids``."""
    from airflow.models.xcom import XComModel

    rows = session.execute(select(XComModel.task_id, XComModel.map_index, XComModel.value).where(
        XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == "return_value",
        XComModel.task_id.in_(list(task_ids))))
    return [(task_id, map_index, _value(value)) for task_id, map_index, value in rows]


def return_value(session, dag_id: str, run_id: str, task_id: str, map_index: int):
    """One task instance's ``return_value`` XCom, or ``MISSING``."""
    from airflow.models.xcom import XComModel

    row = session.execute(select(XComModel.value).where(
        XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
        XComModel.map_index == map_index, XComModel.key == "return_value")).first()
    return MISSING if row is None else _value(row[0])


def _value(raw):
    from types import SimpleNamespace

    from airflow.models.xcom import XComModel

    try:
        return XComModel.deserialize_value(SimpleNamespace(value=raw))
    except (ValueError, TypeError):
        return None


def task_instances(session, dag_id: str, run_id: str, task_ids=None) -> list[dict]:
    from airflow.models.taskinstance import TaskInstance as TI

    query = select(TI.task_id, TI.map_index, TI.state, TI._rendered_map_index, TI.duration, TI.start_date,
                   TI.end_date, TI.try_number).where(TI.dag_id == dag_id, TI.run_id == run_id)
    if task_ids is not None:
        query = query.where(TI.task_id.in_(list(task_ids)))
    return [{"task_id": t, "map_index": m, "state": str(s) if s else None, "label": label, "duration": d,
             "start_date": sd, "end_date": ed, "try_number": tn}
            for t, m, s, label, d, sd, ed, tn in session.execute(query)]


def task_instance(session, dag_id: str, run_id: str, task_id: str, map_index: int) -> dict | None:
    found = [t for t in task_instances(session, dag_id, run_id, [task_id]) if t["map_index"] == map_index]
    return found[0] if found else None


def study_of_label(label) -> str | None:
    """The study pseudonym a rendered map index names (``S…`` or ``S… tiles 0-64``); None for a batch's label
    (``S… … S… (n studies)``: its studies come from the run's batch plan, :func:`_members`)."""
    text = str(label or "")
    first = text.split(" ", 1)[0]
    return first if STUDY.match(first) and "studies)" not in text else None


# The XComs that hold a run's batches: index_studies' list of batches (de-identification and audit instance i holds
# batch i) and ready_for_processing's (processing instance i holds its batch i, or its study i, per slide).
PLAN_TASKS = ("index_studies", "ready_for_processing")
BEFORE_PROCESSING = ("deidentify", "audit_phi")


def _studies_in(value) -> list[dict]:
    """The study records in an XCom value: one study, a batch, or a list of batches."""
    if isinstance(value, dict):
        return [value] if STUDY.match(str(value.get("study") or "")) else []
    if isinstance(value, list):
        return [s for item in value for s in _studies_in(item)]
    return []


def _members(values):
    """A function (task_id, map_index) -> the studies the instance holds: its own XCom where it returned one, else
    (failed, running or not yet run) its batch in the run's plan, so every study of a failed batch shows it."""
    plans = {t: v for t, _m, v in values if t in PLAN_TASKS and isinstance(v, list)}
    own = {(t, m): _studies_in(v) for t, m, v in values if t not in PLAN_TASKS}

    def held(task_id: str, map_index: int) -> list[dict]:
        if (task_id, map_index) in own:
            return own[(task_id, map_index)]
        plan = plans.get("index_studies" if task_id in BEFORE_PROCESSING else "ready_for_processing") or []
        return _studies_in(plan[map_index]) if map_index is not None and 0 <= map_index < len(plan) else []

    return held


# ---------------------------------------------------------------------------------------------- a run's studies
@dataclass
class StudyRow:
    study: str
    patient: str | None = None
    status: str = "pending"
    detail: str = ""
    steps: dict[str, dict] = field(default_factory=dict)  # task_id -> {state, status, map_index, ...}
    metrics: list[dict] = field(default_factory=list)
    picture: str | None = None
    device: str | None = None
    duration_s: float | None = None
    published: bool = False
    order: int = 1 << 30


def run_studies(session, dag_id: str, run_id: str, lake: LakeView) -> list[StudyRow]:
    """Every study the run touched: from index_studies' list, the study tasks' XComs and instances and the
    lineage rows the run wrote to the lake; with status, key metrics, first QC picture, device and duration."""
    studies: dict[str, StudyRow] = {}

    def row(study: str) -> StudyRow:
        return studies.setdefault(study, StudyRow(study=study))

    values = return_values(session, dag_id, run_id, PLAN_TASKS + study_tasks())
    for n, item in enumerate(_studies_in(next((v for t, _m, v in values if t == "index_studies"), None))):
        r = row(item["study"])
        r.order = min(r.order, n)
        r.patient = r.patient or _patient(item)
    members = _members(values)
    for ti in task_instances(session, dag_id, run_id, study_tasks()):
        held = members(ti["task_id"], ti["map_index"])
        if not held:
            study = study_of_label(ti["label"])
            held = [{"study": study}] if study else []
        for value in held:
            r = row(value["study"])
            r.patient = r.patient or _patient(value)
            r.steps[ti["task_id"]] = {"state": ti["state"], "map_index": ti["map_index"], "duration": ti["duration"],
                                      "status": value.get("status"), "reason": value.get("reason")}
    lineage = lake.run_lineage(run_id)
    for rec in lineage:
        study = str(rec.get("study_id") or "")
        if STUDY.match(study):
            r = row(study)
            if rec.get("task_id") in study_tasks() and rec["task_id"] not in r.steps:  # e.g. XComs cleared
                status = "ok" if rec.get("status") == "success" else rec.get("status")
                r.steps[rec["task_id"]] = {"state": None, "map_index": rec.get("map_index"), "status": status}
            if rec.get("task_id") in final_tasks() or (r.device is None and rec.get("device")):
                r.device = rec.get("device") or r.device
                r.duration_s = rec.get("duration_s") if rec.get("task_id") in final_tasks() else r.duration_s
    for r in studies.values():
        _settle(r)
        if r.patient is None and r.status == "published":
            r.patient = lake.find_patient(r.study)
        if r.patient and r.status in ("published", "ok"):
            manifest = lake.manifest(r.patient, r.study)
            if manifest is not None:
                r.published = True
                r.metrics = [m for m in manifest.get("metrics") or [] if isinstance(m, dict)]
                files = lake.study_files(manifest)
                r.picture = files.pictures[0]["path"] if files.pictures else None
    return sorted(studies.values(), key=lambda r: (r.order, r.study))


def _patient(value: dict) -> str | None:
    patient = str(value.get("patient") or "")
    return patient if PATIENT.match(patient) else None


def _settle(r: StudyRow) -> None:
    """One status per study, from its steps: published > quarantined > failed > running > skipped > pending."""
    steps = sorted(r.steps.items(), key=lambda kv: _step_rank(kv[0]))
    final = [s for t, s in steps if t in final_tasks()]
    quarantined = [(t, s) for t, s in steps if s.get("status") == "quarantined"]
    failed = [(t, s) for t, s in steps if s.get("state") in FAILED or s.get("status") == "failed"]
    running = [(t, s) for t, s in steps if s.get("state") in UNFINISHED]
    if final and final[-1].get("status") == "ok":
        r.status, r.detail = "published", ""
    elif quarantined:
        task_id, s = quarantined[0]  # where it was quarantined; later steps pass the status on
        r.status, r.detail = "quarantined", f"at {task_id}" + (f": {s['reason']}" if s.get("reason") else "")
    elif failed:
        task_id, s = failed[0]
        r.status, r.detail = "failed", (f"at {task_id}" + (f": {s['reason']}" if s.get("reason") else "")
                                        if s.get("status") == "failed" else f"{task_id} {s['state']}")
    elif running:
        task_id, s = running[-1]
        r.status, r.detail = "running", f"{task_id} {s['state']}"
    elif any(s.get("status") == "skipped" or s.get("state") == "skipped" for _, s in steps):
        r.status, r.detail = "skipped", ""
    elif steps:
        task_id, s = steps[-1]
        r.status, r.detail = (s.get("status") or s.get("state") or "pending"), f"last step {task_id}"
    else:
        r.status = "pending"


def resolve_study(session, dag_id: str, run_id: str, task_id: str, map_index: int, lake: LakeView) -> dict:
    """What a study task instance holds: ``{"study", "patient", "status", "reason", "state", "ran"}``.

    The instance's own ``return_value`` first; else the study its rendered map index names (failed instances),
    with the patient from another XCom of the run or the lake.
    """
    ti = task_instance(session, dag_id, run_id, task_id, map_index)
    values = return_values(session, dag_id, run_id, (*PLAN_TASKS, task_id))
    held = _members(values)(task_id, map_index)
    out = {"study": None, "patient": None, "status": None, "reason": None, "batch": [],
           "state": ti["state"] if ti else None, "exists": ti is not None}
    if len(held) > 1:  # a batch: the page lists its studies
        out["batch"] = [{"study": s["study"], "patient": _patient(s) or lake.find_patient(s["study"]),
                         "status": s.get("status"), "reason": s.get("reason")} for s in held]
        return out
    if held:
        value = held[0]
        out.update(study=value["study"], patient=_patient(value), status=value.get("status"),
                   reason=value.get("reason"))
    if out["study"] is None and ti is not None:
        out["study"] = study_of_label(ti["label"])
    if out["study"] and not out["patient"]:
        for _t, _m, other in return_values(session, dag_id, run_id, ("index_studies", *study_tasks())):
            for item in _studies_in(other):
                if item.get("study") == out["study"] and _patient(item):
                    out["patient"] = _patient(item)
                    break
            if out["patient"]:
                break
        if not out["patient"]:
            out["patient"] = lake.find_patient(out["study"])
    return out
