"""The QC FastAPI app, mounted by the api-server under ``/imaging`` (see :mod:`imaging_dags.qc` for the routes).

Authentication and authorization are Airflow's own: every route depends on
``airflow.api_fastapi.core_api.security`` (``GetUserDep`` reads the UI's ``_token`` session cookie or an
``Authorization: Bearer`` JWT: 401 without one, 403 with an invalid one) and, for a DAG's pages, on
``requires_access_dag("GET", ...)`` for that DAG's runs, task instances (and XComs for the resolver), so the
configured auth manager decides (403 when it refuses).  The index lists only the DAGs the user may read.

Routes are plain ``def``: they block on the lake (local, S3, GCS) and the metadata DB, so FastAPI runs them in
its thread pool.
"""
import logging
import mimetypes
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from imaging_dags.qc import URL_PREFIX, study_tasks, api_root_path, specialties
from imaging_dags.qc import render
from imaging_dags.qc.lake import LakeView, is_pseudonym
from imaging_dags.qc.runs import dag_run, recent_runs, resolve_study, run_studies

log = logging.getLogger(__name__)

RUN_READ = [Depends(requires_access_dag("GET", DagAccessEntity.RUN))]
STUDY_READ = [Depends(requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE))]
XCOM_READ = [*STUDY_READ, Depends(requires_access_dag("GET", DagAccessEntity.XCOM))]
INLINE_TYPES = {"image/png", "image/jpeg", "application/json", "text/csv", "text/plain", "text/tab-separated-values"}
HTML_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'self'; "
            "base-uri 'none'; form-action 'none'")


class LakeUnavailable(Exception):
    """The lake could not be read (bucket missing, no credentials, network)."""


def _base(request: Request) -> str:
    """Where this app is mounted, as the client sees it (``/imaging``, or ``/<base_url path>/imaging``)."""
    return str(request.scope.get("root_path") or URL_PREFIX).rstrip("/")


def _ui_root(request: Request) -> str:
    base = _base(request)
    return base[: -len(URL_PREFIX)] if base.endswith(URL_PREFIX) else api_root_path()


def _check_dag(dag_id: str) -> None:
    if dag_id not in specialties():
        raise HTTPException(404, f"{dag_id!r} is not an imaging DAG")


def _lake(dag_id: str) -> LakeView:
    from imaging_dags.settings import for_specialty, server_variable

    return LakeView(dag_id, for_specialty(dag_id, get=server_variable).lake_uri)


def _html(text: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status_code, headers={"Cache-Control": "no-store"})


def _map_index(text: str) -> int:
    """The UI leaves ``{MAP_INDEX}`` in an external view's href for unmapped tasks: those are -1."""
    try:
        return int(text)
    except ValueError:
        return -1


def create_app() -> FastAPI:
    app = FastAPI(title="Imaging QC", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers.setdefault("Content-Security-Policy", HTML_CSP)
        return response

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        """Pages answer errors (including Airflow's 401/403) with a short HTML page, JSON routes with JSON."""
        headers = dict(exc.headers or {})
        wants_html = "text/html" in request.headers.get("accept", "") and not request.url.path.endswith(".json")
        if not wants_html or "/files/" in request.url.path:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
        title = {401: "Not signed in", 403: "Not allowed", 404: "Not found"}.get(exc.status_code, "Error")
        text = str(exc.detail) if exc.status_code != 401 else "Sign in to Airflow, then open this page again."
        return HTMLResponse(render.message_page(_base(request), title, text), status_code=exc.status_code,
                            headers={**headers, "Cache-Control": "no-store"})

    @app.exception_handler(LakeUnavailable)
    async def _lake_unavailable(request: Request, exc: LakeUnavailable):
        return _html(render.message_page(_base(request), "Lake unavailable", str(exc)), 503)

    def lake_call(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HTTPException:
            raise
        except Exception as exc:  # the message may quote a bucket or path: log it, show the kind only
            log.exception("imaging QC: reading the lake failed")
            raise LakeUnavailable(f"reading the lake failed ({type(exc).__name__}); see the api-server log") from exc

    # -------------------------------------------------------------------------------------------- index
    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, user: GetUserDep, session: SessionDep):
        from airflow.models.dag import DagModel

        dags = []
        for dag_id in specialties():
            allowed = get_auth_manager().is_authorized_dag(
                method="GET", access_entity=DagAccessEntity.RUN,
                details=DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id)), user=user)
            dags.append((dag_id, recent_runs(session, dag_id) if allowed else None))
        return _html(render.index_page(_base(request), _ui_root(request), dags))

    # -------------------------------------------------------------------------------------------- runs
    def _run(dag_id: str, run_id: str, session):
        _check_dag(dag_id)
        lake = lake_call(_lake, dag_id)
        run = dag_run(session, dag_id, run_id)
        studies = lake_call(run_studies, session, dag_id, run_id, lake)
        if run is None and not studies:
            raise HTTPException(404, f"no run {run_id!r} of {dag_id}")
        return lake, run, studies

    @app.get("/dags/{dag_id}/runs/{run_id}", response_class=HTMLResponse, dependencies=[*RUN_READ, *STUDY_READ])
    def run_page(dag_id: str, run_id: str, request: Request, session: SessionDep):
        lake, run, studies = _run(dag_id, run_id, session)
        quarantine = lake_call(lake.quarantine)
        return _html(render.run_page(_base(request), _ui_root(request), dag_id, run_id, run, studies, quarantine))

    @app.get("/dags/{dag_id}/runs/{run_id}/run.json", dependencies=[*RUN_READ, *STUDY_READ])
    def run_json(dag_id: str, run_id: str, request: Request, session: SessionDep):
        lake, run, studies = _run(dag_id, run_id, session)
        base = _base(request)
        return JSONResponse({
            "dag_id": dag_id, "run_id": run_id, "state": (run or {}).get("state"),
            "studies": [{"study": s.study, "patient": s.patient, "status": s.status, "detail": s.detail,
                         "published": s.published, "device": s.device, "duration_s": s.duration_s,
                         "metrics": {m.get("name"): m.get("value") for m in s.metrics},
                         "page": render.study_url(base, dag_id, s.patient, s.study, run_id) if s.patient else None,
                         "picture": render.file_url(base, dag_id, s.patient, s.study, s.picture)
                         if s.picture and s.patient else None} for s in studies],
            "quarantine": lake_call(lake.quarantine)}, headers={"Cache-Control": "no-store"})

    # -------------------------------------------------------------------------------------------- studies
    def _study(dag_id: str, patient: str, study: str, run_id: Optional[str]):
        _check_dag(dag_id)
        if not is_pseudonym(patient, study):
            raise HTTPException(404, "not a patient/study pseudonym")
        lake = lake_call(_lake, dag_id)
        manifest = lake_call(lake.manifest, patient, study)
        files = lake.study_files(manifest) if manifest else None
        results = lake_call(lake.results, patient, study, manifest) if manifest else {"metrics": [], "findings": []}
        deid = lake_call(lake.deid_summary, patient, study)
        lineage = lake_call(lake.study_lineage, study, run_id)
        if manifest is None and deid is None and not lineage:
            raise HTTPException(404, f"no study {study} of patient {patient} in {dag_id}")
        return manifest, files, results, deid, lineage

    @app.get("/dags/{dag_id}/studies/{patient}/{study}", response_class=HTMLResponse, dependencies=STUDY_READ)
    def study_page(dag_id: str, patient: str, study: str, request: Request, run_id: Optional[str] = None):
        manifest, files, results, deid, lineage = _study(dag_id, patient, study, run_id)
        return _html(render.study_page(
            _base(request), _ui_root(request), dag_id, patient, study, manifest=manifest,
            pictures=files.pictures if files else [], others=files.others if files else [], results=results,
            deid=deid, lineage=lineage, run_id=run_id))

    @app.get("/dags/{dag_id}/studies/{patient}/{study}/study.json", dependencies=STUDY_READ)
    def study_json(dag_id: str, patient: str, study: str, request: Request, run_id: Optional[str] = None):
        manifest, files, results, deid, lineage = _study(dag_id, patient, study, run_id)
        base = _base(request)
        return JSONResponse({
            "dag_id": dag_id, "patient": patient, "study": study, "published": manifest is not None,
            "code_version": (manifest or {}).get("code_version"), "metrics": results["metrics"],
            "n_findings": len(results["findings"]), "deidentified": deid,
            "pictures": [render.file_url(base, dag_id, patient, study, p["path"]) for p in (files.pictures if files
                                                                                             else [])],
            "outputs": [o["path"] for o in ((files.pictures + files.others) if files else [])],
            "lineage": [{k: r.get(k) for k in ("run_id", "task_id", "map_index", "status", "device", "started_at",
                                               "duration_s")} for r in lineage]},
            headers={"Cache-Control": "no-store"})

    @app.get("/dags/{dag_id}/studies/{patient}/{study}/files/{name:path}", dependencies=STUDY_READ)
    def study_file(dag_id: str, patient: str, study: str, name: str):
        _check_dag(dag_id)
        if not is_pseudonym(patient, study):
            raise HTTPException(404, "not found")
        found = lake_call(_lake(dag_id).output, patient, study, name)
        if found is None:  # not listed in the manifest, traversal, other zones, changed since published
            raise HTTPException(404, "not found")
        entry, data = found
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        headers = {"Cache-Control": "private, max-age=300", "ETag": f'"{entry.get("sha256", "")}"'}
        if media_type not in INLINE_TYPES:
            media_type = "application/octet-stream"
            headers["Content-Disposition"] = f'attachment; filename="{name.rsplit("/", 1)[-1]}"'
        if media_type.startswith("text/") or media_type == "application/json":
            media_type += "; charset=utf-8"
            headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
        return Response(data, media_type=media_type, headers=headers)

    # -------------------------------------------------------------------------------------------- resolver
    @app.get("/dags/{dag_id}/runs/{run_id}/tasks/{task_id}/{map_index}", response_class=HTMLResponse,
             dependencies=[*RUN_READ, *XCOM_READ])
    def task_instance(dag_id: str, run_id: str, task_id: str, map_index: str, request: Request,
                      session: SessionDep):
        _check_dag(dag_id)
        base, index = _base(request), _map_index(map_index)
        run_link = [("the run's studies and quarantine reasons", render.run_url(base, dag_id, run_id))]
        crumbs = [("Imaging QC", f"{base}/"), (dag_id, None), (run_id, render.run_url(base, dag_id, run_id)),
                  (f"{task_id} [{index}]" if index >= 0 else task_id, None)]
        if task_id not in study_tasks() or index < 0:
            return _html(render.message_page(
                base, f"{task_id} holds no single study",
                f"{task_id} is not a mapped study task of {dag_id} (those are {', '.join(study_tasks())}): "
                "its results are on the run's page.", run_link, crumbs=crumbs))
        found = lake_call(resolve_study, session, dag_id, run_id, task_id, index, _lake(dag_id))
        if not found["exists"]:
            return _html(render.message_page(base, "No such task instance",
                                             f"{dag_id} run {run_id} has no {task_id} [{index}].", run_link,
                                             crumbs=crumbs), 404)
        if found["batch"]:  # a batch of studies: each one's page
            held = found["batch"]
            links = [(f"study {b['study']}" + (f" ({b['status']}{': ' + b['reason'] if b.get('reason') else ''})"
                                               if b.get("status") and b["status"] != "ok" else ""),
                      render.study_url(base, dag_id, b["patient"], b["study"], run_id)) for b in held if b["patient"]]
            return _html(render.message_page(
                base, f"{task_id} [{index}]: a batch of {len(held)} studies",
                f"{task_id} [{index}] ({found['state'] or 'not run'}) holds {len(held)} studies; each has its own "
                "QC page and outcome (a study that failed or was quarantined says so).", links + run_link,
                crumbs=crumbs))
        study, patient = found["study"], found["patient"]
        if found["status"] == "quarantined":
            reason = f" ({found['reason']})" if found.get("reason") else ""
            links = ([("its lineage", render.study_url(base, dag_id, patient, study, run_id))] if patient else [])
            return _html(render.message_page(
                base, f"Study {study} was quarantined",
                f"{task_id} [{index}] quarantined study {study}{reason}: it has no QC results. The reason is "
                "listed with the specialty's quarantine on the run's page.", links + run_link, crumbs=crumbs))
        if study and patient:
            return RedirectResponse(render.study_url(base, dag_id, patient, study, run_id), status_code=303)
        if found["state"] in (None, "scheduled", "queued", "none", "deferred", "up_for_reschedule"):
            text = (f"{task_id} [{index}] has not run yet (state: {found['state'] or 'none'}), so its study is not "
                    "known.")
        elif study:
            text = f"{task_id} [{index}] holds study {study}, whose patient pseudonym is not recorded yet."
        else:
            text = f"{task_id} [{index}] ended {found['state']} without naming its study."
        return _html(render.message_page(base, f"{task_id} [{index}]", text, run_link, crumbs=crumbs))

    from imaging_dags.qc.status import router as status_router  # /status/...: JSON for research systems

    app.include_router(status_router)
    from imaging_dags.qc.progression import router as progression_router, warm_up  # predictions, timelines

    app.include_router(progression_router)
    warm_up()
    return app
