"""Status of studies and patients as JSON, for research systems: ``/imaging/status/...`` (mounted by ``qc/app.py``).

| route (under ``/imaging``) | answers |
|---|---|
| ``/status/study/{study}`` | the study (a study pseudonym ``S…``) in every specialty whose DAG the user may read |
| ``/status/{patient}`` | every study of a patient pseudonym ``P…``: those the warehouse ``ledger`` table knows (loaded, quarantined, failed) and those de-identified in the lake but not loaded yet |

Each study: specialty, ledger ``state`` (``arrived``, ``deidentified``, ``audited``, ``published`` = processed,
``loaded``, ``quarantined``, ``failed``), ``step``, ``reason``, ``message``, ``attempt`` and ``failures`` (failed
transitions kept in the history), the run that set the state, when it arrived and changed, the history, what the
warehouse holds (modalities, series, instances, shifted study date), when the FHIR server was last told, and links to
the QC pages (study, run) and the Airflow UI run.  A study only indexed so far (``arrived``) is found by its study
pseudonym; by the patient's once de-identified.

Authentication and authorization as the QC pages: ``GetUserDep`` (UI session cookie or Bearer JWT: 401 without,
403 with an invalid one), then the auth manager's read access to each specialty's DAG runs and task instances (as
``requires_access_dag("GET", RUN / TASK_INSTANCE)`` on the run and study pages): only readable specialties are
searched, 403 when none is.  Unknown or unreadable ids are 404 with what was searched.  Only pseudonyms, reason
codes and lake-relative facts leave: no lake URI, no raw path, no header value.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep
from imaging_dags.qc import URL_PREFIX, api_root_path, specialties
from imaging_dags.qc import render
from imaging_dags.qc.lake import PATIENT, STUDY

log = logging.getLogger(__name__)
READ_ENTITIES = (DagAccessEntity.RUN, DagAccessEntity.TASK_INSTANCE)  # what the run and study pages require
HISTORY_FIELDS = ("state", "step", "run_id", "at", "reason", "attempt")
MAX_STUDIES = 500

router = APIRouter(prefix="/status", tags=["status"])


def readable_specialties(user) -> list[str]:
    """The imaging DAGs whose runs and task instances ``user`` may read (the QC pages' permissions)."""
    from airflow.models.dag import DagModel

    manager = get_auth_manager()
    out = []
    for dag_id in specialties():
        details = DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))
        if all(manager.is_authorized_dag(method="GET", access_entity=e, details=details, user=user)
               for e in READ_ENTITIES):
            out.append(dag_id)
    return out


def _allowed(user) -> list[str]:
    allowed = readable_specialties(user)
    if not allowed:
        raise HTTPException(403, "not allowed to read any imaging DAG")
    return allowed


def _base(request: Request) -> str:
    return str(request.scope.get("root_path") or URL_PREFIX).rstrip("/")


def _ui_root(request: Request) -> str:
    base = _base(request)
    return base[: -len(URL_PREFIX)] if base.endswith(URL_PREFIX) else api_root_path()


def _settings(specialty: str):
    from imaging_dags.settings import for_specialty, server_variable

    return for_specialty(specialty, get=server_variable)


@contextmanager
def _reading(what: str):
    """Errors reading the lake or warehouse: logged, answered 503 with the kind only (messages may quote paths)."""
    try:
        yield
    except HTTPException:
        raise
    except Exception as exc:
        log.exception("imaging status: reading the %s failed", what)
        raise HTTPException(503, f"reading the {what} failed ({type(exc).__name__}); see the api-server log") from exc


# ------------------------------------------------------------------------------------------------ the lake
def _ledger(specialty: str):
    return _settings(specialty).lake.ledger


def _fhir_sent(specialty: str, study: str) -> str | None:
    from imaging_tasks import storage

    lake = _settings(specialty).lake
    try:
        return storage.read_json(storage.join(lake.root, "ledger", specialty, "fhir", f"{study}.json")).get("sent_at")
    except (FileNotFoundError, ValueError):
        return None


def _patient_studies_in_lake(specialty: str, patient: str) -> set[str]:
    """Studies of the patient de-identified in the lake (``anonymized/<specialty>/<P…>/<S…>/``)."""
    from imaging_tasks import storage

    lake = _settings(specialty).lake
    found = set()
    for info in storage.list_objects(storage.join(lake.root, "anonymized", specialty, patient)):
        first = info.relpath.split("/", 1)[0]
        if STUDY.match(first):
            found.add(first)
    return found


# ------------------------------------------------------------------------------------------------ the warehouse
def _warehouse(specialty: str):
    """The warehouse through the project's hook, or None when it does not exist yet (a DuckDB file not made)."""
    from imaging_dags.settings import server_variable
    from imaging_dags.warehouse_hook import WarehouseHook
    from imaging_tasks.warehouse import parse_warehouse_uri

    uri = _settings(specialty).warehouse_uri
    where = parse_warehouse_uri(uri)
    if where.kind == "duckdb" and not os.path.exists(where.path):
        return None
    return WarehouseHook(uri, server_variable("imaging_gcp_conn_id", "google_cloud_default")).get_conn()


def _warehouse_patient(allowed: list[str], patient: str) -> tuple[dict[str, set[str]], str | None]:
    """specialty -> the patient's studies in the warehouse ``ledger`` table; and a note when it could not be read."""
    out: dict[str, set[str]] = {}
    try:
        warehouse = _warehouse(allowed[0])
        if warehouse is None:
            return out, None
        rows = warehouse.query(f"SELECT specialty, study_id FROM {warehouse.ref('ledger')} WHERE patient_id = ?",
                               [patient])
    except Exception as exc:  # the lake still answers
        log.warning("imaging status: warehouse ledger not read (%s)", type(exc).__name__)
        return out, f"warehouse not read ({type(exc).__name__}); studies from the lake only"
    for specialty, study in rows:
        if specialty in allowed:
            out.setdefault(specialty, set()).add(study)
    return out, None


def _warehouse_facts(specialty: str, studies: list[str]) -> dict[str, dict]:
    """study -> what the warehouse ``studies`` table holds of it (modalities, counts, shifted date, loaded_at)."""
    if not studies:
        return {}
    try:
        warehouse = _warehouse(specialty)
        if warehouse is None:
            return {}
        marks = ", ".join("?" for _ in studies)
        rows = warehouse.query(
            f"SELECT study_id, modalities, n_series, n_instances, study_date, loaded_at FROM "
            f"{warehouse.ref('studies')} WHERE specialty = ? AND study_id IN ({marks})", [specialty, *studies])
    except Exception as exc:
        log.warning("imaging status: warehouse studies not read (%s)", type(exc).__name__)
        return {}
    out = {}
    for study, modalities, n_series, n_instances, study_date, loaded_at in rows:
        if isinstance(modalities, str):
            try:
                modalities = json.loads(modalities)
            except ValueError:
                modalities = [modalities]
        out[study] = {"modalities": modalities, "n_series": n_series, "n_instances": n_instances,
                      "study_date": study_date, "loaded_at": loaded_at.isoformat() if hasattr(loaded_at, "isoformat")
                      else loaded_at}
    return out


# ------------------------------------------------------------------------------------------------ answers
def study_status(record: dict, *, base: str, ui_root: str, warehouse: dict | None = None,
                 fhir_sent_at: str | None = None) -> dict:
    """What the status routes say of one ledger record (pseudonyms, states, reason codes, links; no URIs)."""
    specialty, study, patient = record["specialty"], record["study"], record.get("patient")
    history = [{k: h.get(k) for k in HISTORY_FIELDS if h.get(k) is not None} for h in record.get("history") or []]
    arrived = next((h.get("at") for h in history if h.get("state") == "arrived"), None)
    run_id = record.get("run_id")
    links = {}
    if patient and record.get("anonymized_uri"):
        links["study_page"] = render.study_url(base, specialty, patient, study)
        links["study_json"] = render.study_url(base, specialty, patient, study).split("?")[0] + "/study.json"
    if run_id:
        links["run_page"] = render.run_url(base, specialty, run_id)
        links["airflow_run"] = render.ui_run_url(ui_root, specialty, run_id)
    return {
        "specialty": specialty, "study": study, "patient": patient, "state": record.get("state"),
        "step": record.get("step"), "reason": record.get("reason"), "message": record.get("message"),
        "attempt": record.get("attempt"), "failures": sum(1 for h in history if h.get("state") == "failed"),
        "run_id": run_id, "code_version": record.get("code_version"), "arrived_at": arrived,
        "updated_at": record.get("updated_at"), "processed": bool(record.get("derived_uri")),
        "warehouse": warehouse, "fhir_sent_at": fhir_sent_at, "history": history, "links": links,
    }


def _answer(payload: dict) -> JSONResponse:
    return JSONResponse(payload, headers={"Cache-Control": "no-store"})


@router.get("/study/{study}")
def status_of_study(study: str, request: Request, user: GetUserDep):
    if not STUDY.match(study or ""):
        raise HTTPException(404, "not a study pseudonym (S followed by 4-64 letters or digits)")
    allowed = _allowed(user)
    base, ui_root = _base(request), _ui_root(request)
    found = []
    with _reading("lake"):
        for specialty in allowed:
            record = _ledger(specialty).get(study)
            if record:
                facts = _warehouse_facts(specialty, [study]).get(study)
                found.append(study_status(record, base=base, ui_root=ui_root, warehouse=facts,
                                          fhir_sent_at=_fhir_sent(specialty, study)))
    if not found:
        raise HTTPException(404, f"no study {study} in the ledger of {', '.join(allowed)}")
    return _answer({"study": study, "studies": found})


@router.get("/{patient}")
def status_of_patient(patient: str, request: Request, user: GetUserDep):
    if not PATIENT.match(patient or ""):
        raise HTTPException(404, "not a patient pseudonym (P followed by 4-64 letters or digits)")
    allowed = _allowed(user)
    base, ui_root = _base(request), _ui_root(request)
    in_warehouse, note = _warehouse_patient(allowed, patient)
    found = []
    with _reading("lake"):
        for specialty in allowed:
            ids = sorted(in_warehouse.get(specialty, set()) | _patient_studies_in_lake(specialty, patient))
            facts = _warehouse_facts(specialty, ids[:MAX_STUDIES])
            ledger = _ledger(specialty)
            for study in ids[:MAX_STUDIES]:
                record = ledger.get(study)
                if record and record.get("patient") == patient:
                    found.append(study_status(record, base=base, ui_root=ui_root, warehouse=facts.get(study),
                                              fhir_sent_at=_fhir_sent(specialty, study)))
    if not found:
        raise HTTPException(404, f"no study of patient {patient} in the ledger or warehouse of {', '.join(allowed)}"
                                 + (f" ({note})" if note else ""))
    found.sort(key=lambda s: (s.get("updated_at") or ""), reverse=True)
    payload = {"patient": patient, "studies": found, "counts": {}}
    for s in found:
        payload["counts"][s["state"]] = payload["counts"].get(s["state"], 0) + 1
    if note:
        payload["note"] = note
    return _answer(payload)
