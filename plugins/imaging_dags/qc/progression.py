"""Progression in the QC app (issue 19): on-demand predictions and a patient's timeline, mounted by ``qc/app.py``.

| route (under ``/imaging``) | answers |
|---|---|
| ``POST /predict-progression`` | body ``{"patient_id": "P…"}`` (optional ``"model_uri"``): the patient's predicted cognitive scores at the model's horizons, computed now from the warehouse (JSON below); nothing is written |
| ``GET /patient-timeline/{patient}`` | JSON: the patient's sessions (date, study, a few ROI features), cognitive scores, stored predictions and the progression DAG's refusals (model, reason, message) |
| ``GET /patients`` | HTML: the patients of the progression specialty (sessions, dates, stored predictions) |
| ``GET /patients/{patient}`` | HTML: the timeline as inline SVG charts (ROI trajectories, scores, predictions at their horizons) |

``POST /predict-progression`` answers::

    {"patient_id": "P…", "specialty": "…",
     "model": {"name": "progression-lstm", "version": "…", "sha256": "…"},
     "as_of_study_id": "S…", "as_of_date": "YYYYMMDD", "n_sessions": 10, "n_sessions_used": 10,
     "predictions": [{"horizon_months": 6, "score": "MMSE", "value": 24.1, "target_date": "YYYYMMDD"}, ...]}

Dates are as the warehouse holds them: shifted per patient by de-identification (``YYYYMMDD``); horizons count
from the last session (``as_of_date``).  ``n_sessions`` is the patient's dated sessions, ``n_sessions_used`` those
the model was fed (its ``max_sessions`` latest).  The sessions are ``studies`` joined with ``roi_features`` of
the progression specialty (``imaging_tasks.progression.features.SESSIONS_SQL``, for this patient only) and the
patient's ``cognitive_scores``; the sequence and the prediction are the library's own
(``build_sequences``, ``predict``), so they equal what the progression DAG computes from the same rows.

Errors are JSON ``{"detail": "...", "reason": "..."}`` saying what to do: not a pseudonym or unknown patient 404;
too few sessions 422 (``"sessions"`` and ``"min_sessions"``: never a guess); a feature the model needs never
measured for the patient 422; no model configured 503 naming the Variable ``imaging_progression_model_uri``; a
model that cannot be loaded 503; a bad body 400.  The model is loaded once per process and kept by URI, and
reloaded when the sha256 of its file (or of its JSON) changes.  A ``model_uri`` in the body (another model than
the Variable's) needs edit access to the DAG as well, since it makes the api-server read and run that file.

Authentication and authorization as the other QC routes (``GetUserDep``: 401 without a token, 403 with an invalid
one), then the auth manager's read access to the progression specialty's DAG runs and task instances (403).
Only pseudonyms, shifted dates and values leave: the warehouse holds nothing else.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import OrderedDict

from fastapi import APIRouter, Body, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep
from imaging_dags.qc import render
from imaging_dags.qc.lake import PATIENT
from imaging_dags.qc.status import READ_ENTITIES, _base, _reading, _warehouse

log = logging.getLogger(__name__)
router = APIRouter(tags=["progression"])

MODEL_VARIABLE = "imaging_progression_model_uri"
MAX_PATIENTS = 1000
MAX_CACHED_MODELS = 4
SCORE_ORDER = ("MMSE", "CDR_SB", "ADAS_Cog")
# the timeline's ROI features: (key, label, unit); how each is read from a session's roi_features: _roi_features
TIMELINE_FEATURES = (("hippocampal_gm_volume", "Hippocampal GM volume", "ml"),
                     ("whole_brain_volume", "Whole-brain volume", "ml"),
                     ("mean_suvr", "Mean SUVR", "1"))
PREDICTION_COLUMNS = ("model", "model_version", "horizon_months", "score", "value", "as_of_study_id", "as_of_date",
                      "target_date", "n_sessions", "model_sha256", "run_id", "computed_at")


class Refused(Exception):
    """An answer other than 200, as JSON ``{"detail", "reason", **extra}``."""

    def __init__(self, status: int, reason: str, detail: str, **extra):
        super().__init__(detail)
        self.status, self.reason, self.detail, self.extra = status, reason, detail, extra

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail, "reason": self.reason, **self.extra}, status_code=self.status,
                            headers={"Cache-Control": "no-store"})


# ------------------------------------------------------------------------------------------------ access
def specialty() -> str:
    from imaging_tasks.specialties import progression_specialty

    return progression_specialty()


def _details(dag_id: str) -> DagDetails:
    from airflow.models.dag import DagModel

    return DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))


def _allowed(user, *, edit: bool = False) -> str:
    """The progression specialty, when ``user`` may read its DAG's runs and task instances (and edit the DAG)."""
    name = specialty()
    manager, details = get_auth_manager(), _details(name)
    if not all(manager.is_authorized_dag(method="GET", access_entity=e, details=details, user=user)
               for e in READ_ENTITIES):
        raise HTTPException(403, f"not allowed to read the {name} DAG, whose warehouse rows progression reads")
    if edit and not manager.is_authorized_dag(method="PUT", details=details, user=user):
        raise HTTPException(403, f"a model_uri of your own needs edit access to the {name} DAG; without one the "
                                 f"model of the Variable {MODEL_VARIABLE} is used")
    return name


def _check_patient(patient: str) -> None:
    if not PATIENT.match(patient or ""):
        raise Refused(404, "not_a_pseudonym", "not a patient pseudonym (P followed by 4-64 letters or digits)")


# ------------------------------------------------------------------------------------------------ the warehouse
def _patient_rows(warehouse, name: str, patient: str) -> tuple[list[dict], int, list[dict]]:
    """The patient's session rows (``SESSIONS_SQL`` for one patient), how many studies it has at all (with ROI
    features or not) and its score rows: one query (one connection: the cost of a DuckDB read is opening it)."""
    studies, features = warehouse.ref("studies"), warehouse.ref("roi_features")
    rows = warehouse.query(
        f"SELECT 'session', s.patient_id, s.study_id, s.study_date, r.atlas, r.roi, r.metric, r.value FROM {studies} s "
        f"LEFT JOIN {features} r ON r.specialty = s.specialty AND r.study_id = s.study_id "
        "WHERE s.specialty = ? AND s.patient_id = ? "
        f"UNION ALL SELECT 'score', patient_id, NULL, date, NULL, score, NULL, value "
        f"FROM {warehouse.ref('cognitive_scores')} WHERE specialty = ? AND patient_id = ?",
        [name, patient, name, patient])
    columns = ("patient_id", "study_id", "study_date", "atlas", "roi", "metric", "value")
    sessions = sorted((dict(zip(columns, r[1:])) for r in rows if r[0] == "session"),
                      key=lambda r: (str(r["study_date"]), r["study_id"]))
    scores = sorted(({"patient_id": r[1], "date": r[3], "score": r[5], "value": r[7]} for r in rows
                     if r[0] == "score"), key=lambda r: (str(r["date"]), r["score"]))
    return [r for r in sessions if r["roi"] is not None], len({r["study_id"] for r in sessions}), scores


def _patient_table(warehouse, table: str, columns: tuple[str, ...], name: str, patient: str,
                   order: str) -> list[dict]:
    """One patient's rows of a progression table as JSON-ready dicts (``computed_at`` as ISO text)."""
    rows = [dict(zip(columns, r)) for r in warehouse.query(
        f"SELECT {', '.join(columns)} FROM {warehouse.ref(table)} WHERE specialty = ? AND patient_id = ? "
        f"ORDER BY {order}", [name, patient])]
    for item in rows:
        if hasattr(item["computed_at"], "isoformat"):
            item["computed_at"] = item["computed_at"].isoformat()
    return rows


def _prediction_rows(warehouse, name: str, patient: str) -> list[dict]:
    return _patient_table(warehouse, "predictions", PREDICTION_COLUMNS, name, patient,
                          "model, model_version, score, horizon_months")


def _refusal_rows(warehouse, name: str, patient: str) -> list[dict]:
    """Why the progression DAG made no prediction for the patient, per model version (``prediction_refusals``)."""
    return _patient_table(warehouse, "prediction_refusals", ("model", "model_version", "reason", "message",
                                                             "computed_at"), name, patient, "model, model_version")


def _patient_data(name: str, patient: str, *, predictions: bool) -> dict:
    with _reading("warehouse"):
        warehouse = _warehouse(name)
        if warehouse is None:
            return {"sessions": [], "studies": 0, "scores": [], "predictions": [], "refusals": []}
        sessions, studies, scores = _patient_rows(warehouse, name, patient)
        stored = _prediction_rows(warehouse, name, patient) if predictions else []
        refusals = _refusal_rows(warehouse, name, patient) if predictions else []
    return {"sessions": sessions, "studies": studies, "scores": scores, "predictions": stored, "refusals": refusals}


# ------------------------------------------------------------------------------------------------ the model
class ModelCache:
    """Models by URI, each kept with the sha256 of its file and JSON: a file replaced under the same URI (or a new
    JSON beside it) is loaded again on the next request.  At most ``MAX_CACHED_MODELS`` URIs are kept."""

    def __init__(self):
        self._held: OrderedDict[str, tuple[tuple[str, str], object, object]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _hashes(uri: str) -> tuple[str, str] | None:
        from imaging_tasks import storage
        from imaging_tasks.byo_model import config_uri

        try:
            return storage.sha256_of(uri), storage.sha256_of(config_uri(uri))
        except Exception:  # missing or unreadable: the loader says what is wrong
            return None

    def get(self, uri: str):
        from imaging_tasks.progression.model import load_progression_model

        hashes = self._hashes(uri)
        with self._lock:
            held = self._held.get(uri)
            if held is not None and hashes is not None and held[0] == hashes:
                self._held.move_to_end(uri)
                return held[1], held[2]
            model, spec = load_progression_model(uri)
            self._held[uri] = ((spec.sha256, spec.config_sha256), model, spec)
            self._held.move_to_end(uri)
            while len(self._held) > MAX_CACHED_MODELS:
                self._held.popitem(last=False)
            log.info("progression model %s %s loaded (sha256 %s)", spec.name, spec.version, spec.sha256[:12])
            return model, spec

    def clear(self) -> None:
        with self._lock:
            self._held.clear()


MODELS = ModelCache()


def warm_up() -> None:
    """In a background thread, when the QC app is built: import torch and load the Variable's model, so that the
    first prediction does not pay for them.  Nothing happens when no model is configured (the api-server then
    never imports torch); a model that cannot be loaded is reported by the request that needs it."""
    def run():
        try:
            from imaging_dags.settings import server_variable

            uri = (server_variable(MODEL_VARIABLE, "") or "").strip()
            if uri:
                MODELS.get(uri)
        except Exception as exc:  # noqa: BLE001  the request that needs the model says what is wrong
            log.info("progression: model not preloaded (%s)", type(exc).__name__)

    threading.Thread(target=run, name="progression-model-warm-up", daemon=True).start()


def _model(uri: str | None):
    from imaging_dags.settings import server_variable
    from imaging_tasks.errors import ConfigError

    configured = uri is None
    if configured:
        uri = (server_variable(MODEL_VARIABLE, "") or "").strip()
        if not uri:
            raise Refused(503, "no_model", f"no progression model configured: set the Airflow Variable "
                                           f"{MODEL_VARIABLE} to the model file (TorchScript or torch.export, local "
                                           "path, file://, s3:// or gs://) with its JSON beside it")
    try:
        return MODELS.get(uri)
    except ConfigError as exc:
        where = f"the Variable {MODEL_VARIABLE}'s model" if configured else "the model_uri given"
        raise Refused(503, "model_unusable", f"{where} cannot be used: {exc}") from None
    except Exception as exc:  # noqa: BLE001  storage or torch failures: the kind only, details in the log
        log.exception("progression: loading the model failed")
        raise Refused(503, "model_unusable", f"loading the progression model failed ({type(exc).__name__}); see "
                                             "the api-server log") from None


def predict_patient(patient: str, model_uri: str | None = None) -> dict:
    """The answer of ``POST /predict-progression`` (after authorization); :class:`Refused` otherwise."""
    from imaging_tasks.errors import BadInput
    from imaging_tasks.progression.features import NotEnoughSessions, build_sequences
    from imaging_tasks.progression.model import predict

    _check_patient(patient)
    name = specialty()
    data = _patient_data(name, patient, predictions=False)
    if not data["studies"] and not data["scores"]:
        raise Refused(404, "unknown_patient", f"patient {patient} has no study of {name} in the warehouse")
    model, spec = _model(model_uri)
    try:
        sequence = build_sequences(data["sessions"], data["scores"] or None).get(patient)
        if sequence is None:  # studies, but no ROI features loaded for any
            raise NotEnoughSessions(patient, 0, spec.min_sessions, 0)
        records = predict(model, spec, sequence)
    except NotEnoughSessions as exc:
        raise Refused(422, "not_enough_sessions", exc.message, sessions=exc.sessions,
                      min_sessions=exc.min_sessions) from None
    except BadInput as exc:
        raise Refused(422, exc.reason, exc.message) from None
    last = records[0]
    return {"patient_id": patient, "specialty": name,
            "model": {"name": spec.name, "version": spec.version, "sha256": spec.sha256},
            "as_of_study_id": last["as_of_study_id"], "as_of_date": last["as_of_date"],
            "n_sessions": len(sequence.sessions), "n_sessions_used": min(len(sequence.sessions), spec.max_sessions),
            "predictions": [{"horizon_months": r["horizon_months"], "score": r["score"], "value": r["value"],
                             "target_date": r["target_date"]} for r in records]}


@router.post("/predict-progression")
def predict_progression(user: GetUserDep, payload=Body(None)):
    _allowed(user, edit=isinstance(payload, dict) and payload.get("model_uri") is not None)
    try:
        if not isinstance(payload, dict) or not isinstance(payload.get("patient_id"), str):
            raise Refused(400, "bad_body", 'give a JSON body {"patient_id": "P…"} (optional "model_uri")')
        unknown = sorted(set(payload) - {"patient_id", "model_uri"})
        model_uri = payload.get("model_uri")
        if unknown or not (model_uri is None or (isinstance(model_uri, str) and model_uri.strip())):
            raise Refused(400, "bad_body", f"the body holds patient_id and optionally model_uri (text); got "
                                           f"{', '.join(map(repr, unknown)) or 'an empty model_uri'}")
        return JSONResponse(predict_patient(payload["patient_id"], model_uri), headers={"Cache-Control": "no-store"})
    except Refused as refused:
        return refused.response()


# ------------------------------------------------------------------------------------------------ the timeline
def _date(text) -> dt.date | None:
    from imaging_tasks.progression.features import parse_date

    return parse_date(text)


def _roi_features(measures: list[dict]) -> dict[str, float | None]:
    """The timeline's ROI features of one session's roi_features rows: hippocampal GM volume (every ROI named
    hippocamp…, summed: both sides), whole-brain volume, mean SUVR (a composite ROI's, else whole-brain's, else
    the mean over the ROIs); each from one atlas (the first by name that has it)."""
    by_atlas: dict[str, list[dict]] = {}
    for m in measures:
        if m["value"] is not None:
            by_atlas.setdefault(str(m.get("atlas") or ""), []).append(m)

    def pick(match, combine):
        for atlas in sorted(by_atlas):
            values = [float(m["value"]) for m in by_atlas[atlas] if match(m)]
            if values:
                return combine(values)
        return None

    def suvr():
        for match in (lambda m: "composite" in m["roi"].lower(), lambda m: m["roi"] == "whole_brain",
                      lambda m: True):
            value = pick(lambda m: m["metric"] == "mean_suvr" and match(m), lambda v: sum(v) / len(v))
            if value is not None:
                return value
        return None

    return {"hippocampal_gm_volume": pick(lambda m: "hippocamp" in m["roi"].lower() and m["metric"] == "gm_volume",
                                          sum),
            "whole_brain_volume": pick(lambda m: m["roi"] == "whole_brain" and m["metric"] == "brain_volume",
                                       lambda v: v[0]),
            "mean_suvr": suvr()}


def timeline(patient: str) -> dict:
    """The answer of ``GET /patient-timeline/{patient}`` (after authorization)."""
    from imaging_tasks.progression.features import canonical_score

    _check_patient(patient)
    name = specialty()
    data = _patient_data(name, patient, predictions=True)
    if not data["studies"] and not data["scores"] and not data["predictions"]:
        raise Refused(404, "unknown_patient", f"patient {patient} has no study, score or prediction of {name} in "
                                              "the warehouse")
    studies: dict[str, dict] = {}
    for row in data["sessions"]:
        studies.setdefault(row["study_id"], {"date": row["study_date"], "rows": []})["rows"].append(row)
    dated = sorted(((_date(s["date"]), sid) for sid, s in studies.items()), key=lambda t: (t[0] is None,
                                                                                          t[0] or dt.date.min, t[1]))
    sessions = [{"study_id": sid, "date": when.strftime("%Y%m%d") if when else None,
                 "features": _roi_features(studies[sid]["rows"])} for when, sid in dated]
    scores = sorted(({"score": canonical_score(r["score"]), "value": r["value"],
                      "date": _date(r["date"]).strftime("%Y%m%d") if _date(r["date"]) else r["date"]}
                     for r in data["scores"]), key=lambda r: (str(r["date"]), r["score"]))
    return {"patient_id": patient, "specialty": name,
            "dates": "shifted per patient by de-identification (YYYYMMDD); intervals are real",
            "features": [{"key": k, "label": label, "unit": unit} for k, label, unit in TIMELINE_FEATURES],
            "sessions": sessions, "studies_without_roi_features": data["studies"] - len(studies),
            "scores": scores, "predictions": data["predictions"], "refusals": data["refusals"]}


@router.get("/patient-timeline/{patient}")
def patient_timeline(patient: str, user: GetUserDep):
    _allowed(user)
    try:
        return JSONResponse(timeline(patient), headers={"Cache-Control": "no-store"})
    except Refused as refused:
        return refused.response()


# ------------------------------------------------------------------------------------------------ pages
def _score_key(name: str):
    return (SCORE_ORDER.index(name) if name in SCORE_ORDER else len(SCORE_ORDER), name)


def timeline_charts(data: dict) -> list[str]:
    """The SVG charts of a timeline: each ROI feature with a value, then each score (observed; every stored
    prediction of it, per model and version, dashed with diamonds at the horizons)."""
    from imaging_tasks.progression.features import SCORE_RANGES

    points = [_date(s["date"]) for s in data["sessions"]] + [_date(s["date"]) for s in data["scores"]]
    points += [_date(p["target_date"]) for p in data["predictions"]] + [_date(p["as_of_date"])
                                                                         for p in data["predictions"]]
    points = [p for p in points if p]
    if not points:
        return []
    span = max((max(points) - min(points)).days, 60)
    x_range = (min(points) - dt.timedelta(days=span // 25), max(points) + dt.timedelta(days=span // 25))
    charts = []
    for key, label, unit in TIMELINE_FEATURES:
        pts = [(_date(s["date"]), s["features"][key], f'{s["date"]} · {s["study_id"]} · {label} '
                f'{render.fmt(s["features"][key])} {unit}') for s in data["sessions"]
               if _date(s["date"]) and s["features"].get(key) is not None]
        if pts:
            charts.append(render.time_chart(label, unit, [{"label": f"observed ({len(pts)})", "points": pts,
                                                           "attrs": {"data-feature": key}}], x_range=x_range))
    names = sorted({s["score"] for s in data["scores"]} | {p["score"] for p in data["predictions"]}, key=_score_key)
    models = sorted({(p["model"], p["model_version"]) for p in data["predictions"]})
    for score in names:
        observed = [(_date(s["date"]), s["value"], f'{s["date"]} · {score} {render.fmt(s["value"])}')
                    for s in data["scores"] if s["score"] == score and _date(s["date"])]
        series = [{"label": f"observed ({len(observed)})", "points": observed, "attrs": {"data-score": score}}]
        marks = {}
        for i, (model, version) in enumerate(models):
            rows = sorted((p for p in data["predictions"] if p["score"] == score and (p["model"], p["model_version"])
                           == (model, version) and _date(p["target_date"])), key=lambda p: p["horizon_months"])
            if not rows:
                continue
            for p in rows:
                if _date(p["as_of_date"]):
                    marks[_date(p["as_of_date"])] = "predicted from"
            series.append({"label": f"{model} {version}", "kind": "predicted",
                           "color": render.CHART_COLORS[(i + 1) % len(render.CHART_COLORS)],
                           "attrs": {"data-score": score, "data-model": model, "data-model-version": version},
                           "points": [(_date(p["target_date"]), p["value"],
                                       f'{model} {version}: {score} {render.fmt(round(p["value"], 2))} at '
                                       f'+{p["horizon_months"]} months ({p["target_date"]}, from '
                                       f'{p["as_of_date"]})') for p in rows]})
        charts.append(render.time_chart(score, "", series, x_range=x_range, marks=sorted(marks.items()),
                                        y_bounds=SCORE_RANGES.get(score)))
    return charts


def timeline_page(base: str, data: dict) -> str:
    h, fmt = render.h, render.fmt
    patient = data["patient_id"]
    parts = [f"<h1>Patient {h(patient)} · progression timeline</h1>",
             f'<p class="muted">{h(data["specialty"])} sessions, cognitive scores and stored predictions from the '
             "warehouse. Dates are shifted per patient by de-identification (intervals are real). Predictions "
             "(dashed, ◇) are drawn at their horizons from the session they were made from. "
             f'<a href="{h(base)}/patient-timeline/{h(patient)}">timeline JSON</a> · '
             f'<a href="{h(base)}/status/{h(patient)}">status JSON</a></p>']
    charts = timeline_charts(data)
    parts.append('<h2>Trajectories</h2><div class="charts">' + "".join(f"<div>{c}</div>" for c in charts) + "</div>"
                 if charts else '<p class="muted">Nothing dated to plot.</p>')
    parts.append(f'<h2>Sessions ({len(data["sessions"])})</h2>')
    if data["sessions"]:
        parts.append(render.table(["date", "study"] + [f"{label} ({unit})" for _, label, unit in TIMELINE_FEATURES],
                                  [[h(s["date"] or "undated"), f'<code>{h(s["study_id"])}</code>']
                                   + [h(fmt(None if s["features"][k] is None else round(s["features"][k], 4)))
                                      for k, _, _ in TIMELINE_FEATURES] for s in data["sessions"]],
                                  numeric={2, 3, 4}))
    else:
        parts.append('<p class="muted">No session with ROI features.</p>')
    if data.get("studies_without_roi_features"):
        parts.append(f'<p class="muted">{data["studies_without_roi_features"]} more studies have no ROI features '
                     "loaded.</p>")
    parts.append(f'<h2>Stored predictions ({len(data["predictions"])})</h2>')
    if data["predictions"]:
        parts.append(render.table(
            ["model", "version", "score", "horizon", "value", "target date", "from session", "sessions", "computed"],
            [[h(p["model"]), h(p["model_version"]), h(p["score"]), h(f'{p["horizon_months"]} months'),
              h(fmt(round(p["value"], 2) if p["value"] is not None else None)), h(p["target_date"]),
              f'<code>{h(p["as_of_study_id"])}</code> {h(p["as_of_date"])}', h(p["n_sessions"]),
              h(render.fmt_time(p["computed_at"]))] for p in data["predictions"]], numeric={3, 4, 7}))
    else:
        parts.append('<p class="muted">No stored prediction (the progression DAG writes them; '
                     "<code>POST /imaging/predict-progression</code> computes one on demand).</p>")
    if data.get("refusals"):
        parts.append(f'<h2>Not predicted ({len(data["refusals"])})</h2>')
        parts.append(render.table(["model", "version", "reason", "what the model lacked", "checked"],
                                  [[h(r["model"]), h(r["model_version"]), f'<code>{h(r["reason"])}</code>',
                                    h(r["message"]), h(render.fmt_time(r["computed_at"]))]
                                   for r in data["refusals"]]))
    return render.page(f"{patient} timeline", "".join(parts),
                       crumbs=[("Imaging QC", f"{base}/"), ("Patients", f"{base}/patients"), (patient, None)])


def _html(text: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status_code, headers={"Cache-Control": "no-store"})


@router.get("/patients/{patient}", response_class=HTMLResponse)
def patient_page(patient: str, request: Request, user: GetUserDep):
    _allowed(user)
    try:
        data = timeline(patient)
    except Refused as refused:
        raise HTTPException(refused.status, refused.detail) from None
    return _html(timeline_page(_base(request), data))


@router.get("/patients", response_class=HTMLResponse)
def patients_page(request: Request, user: GetUserDep):
    name = _allowed(user)
    base = _base(request)
    with _reading("warehouse"):
        warehouse = _warehouse(name)
        rows, predicted = [], {}
        if warehouse is not None:
            rows = warehouse.query(
                f"SELECT patient_id, count(*), min(study_date), max(study_date) FROM {warehouse.ref('studies')} "
                f"WHERE specialty = ? GROUP BY patient_id ORDER BY patient_id LIMIT {MAX_PATIENTS + 1}", [name])
            predicted = dict(warehouse.query(
                f"SELECT patient_id, max(computed_at) FROM {warehouse.ref('predictions')} WHERE specialty = ? "
                "GROUP BY patient_id", [name]))
    body = [f"<h1>Patients · progression timelines</h1><p class=\"muted\">Patients of {render.h(name)} in the "
            "warehouse (pseudonyms; dates shifted per patient).</p>"]
    if not rows:
        body.append('<p class="muted">No patient in the warehouse yet.</p>')
    else:
        body.append(render.table(
            ["patient", "studies", "first", "last", "last prediction"],
            [[f'<a href="{render.h(base)}/patients/{render.h(p)}">{render.h(p)}</a>', render.h(n),
              render.h(first), render.h(last), render.h(render.fmt_time(predicted.get(p)))]
             for p, n, first, last in rows[:MAX_PATIENTS] if PATIENT.match(p or "")], numeric={1}))
        if len(rows) > MAX_PATIENTS:
            body.append(f'<p class="muted">The first {MAX_PATIENTS} are listed.</p>')
    return _html(render.page("Patients", "".join(body), crumbs=[("Imaging QC", f"{base}/"), ("Patients", None)]))


__all__ = ["router", "MODELS", "MODEL_VARIABLE", "predict_patient", "timeline", "timeline_charts", "timeline_page",
           "Refused"]
