"""The status endpoints and the FHIR update, on ledger rows made by a real ``imaging-tasks run`` (so the states are
real: loaded studies, studies quarantined at de-identification), with PHI-like strings planted in raw headers.

FHIR: a local FHIR endpoint (``http.server`` on 127.0.0.1) validates every body it receives with ``fhir.resources``
(400 when invalid), checks references, stores resources by identifier and can answer 503 on demand; the client's
resources arrive valid, a rerun (after a real ``--reprocess`` CLI run) updates instead of duplicating, transient
503s are retried, one refused study does not stop the others, and no PHI is in any body.

Status: the api-server app (Airflow's ``create_app`` with the plugins, the SimpleAuthManager, real JWTs) driven
with FastAPI's TestClient, as tests/test_qc_plugin.py does; plus a check that the routes carry the QC pages'
authentication dependency.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = "cardiovascular"
PLANTED = {"StudyDescription": "Quillfeather^Zanzibar coronary", "SeriesDescription": "PLANTED-SERIES-7731",
           "InstitutionName": "Glimmerbrook Infirmary", "OperatorsName": "Vantongeren^Ysolde"}


# --------------------------------------------------------------------------------------------- a real CLI run
def _cli(root: Path, *extra: str) -> None:
    env = {**os.environ, "IMAGING_DEID_DEMO": "1", "IMAGING_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "imaging_tasks.cli", "run", SPEC, "--landing", f"landing/{SPEC}",
                           "--lake", "lake", "--warehouse", "warehouse.duckdb", *extra], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def _records(lake: Path) -> dict[str, dict]:
    folder = lake / "ledger" / SPEC / "studies"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    import pydicom

    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.synth.bad_inputs import write_bad_inputs

    root = tmp_path_factory.mktemp("status_fhir")
    synthesizer(SPEC)(root / "landing", 2, 61)
    write_bad_inputs(root / "landing", SPEC, seed=5)
    for path in sorted((root / "landing" / SPEC / "study-000").glob("*.dcm")):  # PHI-like values in raw headers
        ds = pydicom.dcmread(path)
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    _cli(root)
    truths = [json.loads(p.read_text()) for p in sorted((root / "landing" / "_truth" / SPEC).glob("*.json"))]
    phi = {str(v) for t in truths for v in t["phi"]} | set(PLANTED.values())
    records = _records(root / "lake")
    loaded = sorted(s for s, r in records.items() if r["state"] == "loaded")
    quarantined = sorted(s for s, r in records.items() if r["state"] == "quarantined")
    assert len(loaded) == 2 and quarantined
    return SimpleNamespace(root=root, lake=root / "lake", warehouse=root / "warehouse.duckdb", phi=phi,
                           records=records, loaded=loaded, quarantined=quarantined)


# --------------------------------------------------------------------------------------------- a FHIR endpoint
class FhirEndpoint:
    """Stores resources by (type, identifier); validates what it receives; 503s on demand."""

    def __init__(self):
        self.resources: dict[tuple[str, str], dict] = {}
        self.bodies: list[bytes] = []
        self.faults: dict[str, list[int]] = {}  # resource type -> statuses to answer next
        self.reject: set[str] = set()  # identifier values answered 422
        self.faults_served = 0
        self.requests = 0
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_PUT(self):
                status, body, headers = endpoint.handle(self.path, self.rfile.read(int(self.headers["Content-Length"])),
                                                        self.headers.get("Content-Type", ""))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def outcome(text: str) -> dict:
        return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                               "diagnostics": text[:300]}]}

    def ids(self, kind: str) -> set[str]:
        return {r["id"] for (k, _), r in self.resources.items() if k == kind}

    def handle(self, path: str, raw: bytes, content_type: str):
        from fhir.resources.R4B import get_fhir_model_class

        with self.lock:
            self.requests += 1
            self.bodies.append(raw)
            parts = urlsplit(path)
            kind = parts.path.rsplit("/", 1)[-1]
            if self.faults.get(kind):
                self.faults_served += 1
                return self.faults[kind].pop(0), self.outcome("try again later"), {}
            if not content_type.startswith("application/fhir+json"):
                return 415, self.outcome("expected application/fhir+json"), {}
            identifier = (parse_qs(parts.query).get("identifier") or [""])[0]
            try:
                body = json.loads(raw)
                get_fhir_model_class(kind).model_validate(body)
            except Exception as exc:  # not JSON, not that type, not valid
                return 400, self.outcome(f"{type(exc).__name__}: {exc}"), {}
            if body.get("resourceType") != kind:
                return 400, self.outcome("resourceType does not match the URL"), {}
            if identifier not in {f"{i.get('system')}|{i.get('value')}" for i in body.get("identifier") or []}:
                return 400, self.outcome("the conditional identifier is not in the resource"), {}
            refs = [*(body.get("partOf") or []), *(body.get("imagingStudy") or []), *(body.get("result") or [])]
            for ref in refs:  # literal references must resolve
                if "reference" in ref:
                    rtype, rid = ref["reference"].split("/", 1)
                    if rid not in self.ids(rtype):
                        return 400, self.outcome(f"unresolved reference {ref['reference']}"), {}
            if identifier.split("|", 1)[1].split(".")[0] in self.reject:
                return 422, self.outcome("business rule"), {}
            key = (kind, identifier)
            old = self.resources.get(key)
            rid = old["id"] if old else uuid.uuid4().hex[:16]
            version = old["version"] + 1 if old else 1
            self.resources[key] = {"id": rid, "version": version, "body": body}
            stored = {**body, "id": rid, "meta": {"versionId": str(version)}}
            return (200 if old else 201), stored, {"Location": f"{self.url}/{kind}/{rid}/_history/{version}"}

    def of(self, kind: str) -> list[dict]:
        return [r for (k, _), r in self.resources.items() if k == kind]


@pytest.fixture()
def fhir_endpoint():
    endpoint = FhirEndpoint()
    yield endpoint
    endpoint.httpd.shutdown()
    endpoint.httpd.server_close()



def _client(url: str):
    from imaging_tasks import fhir
    from imaging_tasks.retry import Policy

    return fhir.FhirClient(url, policy=Policy(attempts=4, initial_s=0.01, max_wait_s=0.05, budget_s=10))


def _warehouse(cli_run, sql: str, params=()):
    from imaging_tasks.warehouse import DuckDBWarehouse

    return DuckDBWarehouse(cli_run.warehouse).query(sql, list(params))


# --------------------------------------------------------------------------------------------- FHIR
def test_fhir_resources_arrive_valid_rerun_updates_and_503_is_retried(cli_run, fhir_endpoint):
    from imaging_tasks import fhir

    sync = fhir.FhirSync(cli_run.lake, SPEC)
    assert sorted(r["study"] for r in sync.due()) == cli_run.loaded  # quarantined before de-identification: none
    fhir_endpoint.faults = {"ImagingStudy": [503], "Observation": [503, 502]}
    client = _client(fhir_endpoint.url)
    out = fhir.send_due(client, sync)
    assert sorted(out["sent"]) == cli_run.loaded and out["failed"] == []
    assert fhir_endpoint.faults_served == 3  # each answered with a retry, none surfaced

    n_metrics = _warehouse(cli_run, "SELECT count(*) FROM results WHERE specialty = ?", [SPEC])[0][0]
    assert len(fhir_endpoint.of("ImagingStudy")) == 2 and len(fhir_endpoint.of("DiagnosticReport")) == 2
    assert len(fhir_endpoint.of("Observation")) == n_metrics > 0
    for study in cli_run.loaded:
        record = cli_run.records[study]
        stored = fhir_endpoint.resources[("ImagingStudy", f"urn:imaging-pipeline:study|{study}")]
        body = stored["body"]
        assert body["status"] == "available"
        assert body["subject"]["identifier"]["value"] == record["patient"]
        (study_date,) = _warehouse(cli_run, "SELECT study_date FROM studies WHERE study_id = ?", [study])[0]
        assert body["started"] == f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}"  # the shifted date
        series = {uid: (modality, n) for uid, modality, n in _warehouse(
            cli_run, "SELECT series_uid, modality, n_instances FROM series WHERE study_id = ?", [study])}
        assert {s["uid"]: (s["modality"]["code"], s["numberOfInstances"]) for s in body["series"]} == series
        report = fhir_endpoint.resources[("DiagnosticReport", f"urn:imaging-pipeline:report|{study}")]["body"]
        assert report["imagingStudy"][0]["reference"] == f"ImagingStudy/{stored['id']}"
        metrics = dict(_warehouse(cli_run, "SELECT metric, value FROM results WHERE study_id = ?", [study]))
        observations = {r["body"]["code"]["text"]: r for r in fhir_endpoint.of("Observation")
                        if r["body"]["identifier"][0]["value"].startswith(study + ".")}
        assert {k: o["body"]["valueQuantity"]["value"] for k, o in observations.items()} == pytest.approx(metrics)
        assert sorted(r["reference"] for r in report["result"]) == sorted(f"Observation/{o['id']}"
                                                                           for o in observations.values())
        assert all(o["body"]["partOf"][0]["reference"] == f"ImagingStudy/{stored['id']}"
                   for o in observations.values())
    assert sync.due() == []  # sent: not due until the ledger changes

    # a rerun: both studies' ledger records change (as a reprocessing run's load leaves them), so they are due
    # again, and the resources are updated in place
    from imaging_tasks.ledger import Ledger

    ledger = Ledger(cli_run.lake, SPEC)
    for study in cli_run.loaded:
        ledger.mark(ledger.get(study), "loaded", step="load", run_id="rerun")
    assert sorted(r["study"] for r in sync.due()) == cli_run.loaded
    out = fhir.send_due(client, sync)
    assert sorted(out["sent"]) == cli_run.loaded and out["failed"] == []
    assert len(fhir_endpoint.of("ImagingStudy")) == 2 and len(fhir_endpoint.of("DiagnosticReport")) == 2
    assert len(fhir_endpoint.of("Observation")) == n_metrics
    assert {r["version"] for r in fhir_endpoint.resources.values()} == {2}
    client.close()

    sent = b"\n".join(fhir_endpoint.bodies).decode()
    leaked = [v for v in cli_run.phi if v in sent]
    assert not leaked, leaked
    assert str(cli_run.root) not in sent  # no lake path either


def test_one_refused_study_does_not_stop_the_others_and_invalid_bodies_are_not_retried(cli_run, fhir_endpoint):
    from imaging_tasks import fhir

    refused, other = cli_run.loaded
    fhir_endpoint.reject = {refused}
    client = _client(fhir_endpoint.url)
    sync = fhir.FhirSync(cli_run.lake, SPEC)
    records = [json.loads((cli_run.lake / "ledger" / SPEC / "studies" / f"{s}.json").read_text())
               for s in cli_run.loaded]
    out = fhir.send_due(client, sync, records=records)
    assert out["sent"] == [other]
    assert [f["study"] for f in out["failed"]] == [refused] and "HTTP 422" in out["failed"][0]["error"]
    assert ("ImagingStudy", f"urn:imaging-pipeline:study|{other}") in fhir_endpoint.resources

    before = fhir_endpoint.requests
    with pytest.raises(fhir.FhirError) as caught:  # a body the server finds invalid: 400, not retried
        client.put_conditional({"resourceType": "ImagingStudy", "status": "available"},
                               {"system": "urn:x", "value": "S0000"})
    assert caught.value.status == 400 and fhir_endpoint.requests == before + 1
    with pytest.raises(ValueError):  # and our own builder refuses it before sending
        fhir.validate({"resourceType": "ImagingStudy", "status": "available"})
    client.close()


def test_fhir_task_skips_without_a_server_and_fails_naming_the_refused_study(cli_run, fhir_endpoint, monkeypatch):
    """The task body (``fhir_update``) as a worker runs it, Variables from the environment."""
    from airflow.sdk.exceptions import AirflowSkipException

    from imaging_dags.tasks import _fhir_update

    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_LAKE_URI", cli_run.lake.as_uri())
    monkeypatch.delenv("AIRFLOW_VAR_IMAGING_FHIR_BASE_URL", raising=False)
    with pytest.raises(AirflowSkipException, match="no FHIR server configured"):
        _fhir_update.function(SPEC)
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_FHIR_BASE_URL", fhir_endpoint.url)
    for marker in (cli_run.lake / "ledger" / SPEC / "fhir").glob("*.json"):
        marker.unlink()  # due again
    refused, other = cli_run.loaded
    fhir_endpoint.reject = {refused}
    with pytest.raises(RuntimeError, match=f"FHIR update failed for 1 stud.*{refused}") as caught:
        _fhir_update.function(SPEC)
    assert other not in str(caught.value).split("failed for", 1)[1].split(";")[0]
    fhir_endpoint.reject = set()
    assert _fhir_update.function(SPEC) == {"sent": 1, "failed": 0}  # the retry sends only what is still due


def test_fhir_server_settings():
    from imaging_dags.settings import fhir_server

    def getter(values):
        return lambda name, default: values.get(name, default)

    conn = SimpleNamespace(host="fhir.example.org", schema="", port=8443, login="svc", password="pw",
                           extra_dejson={"headers": {"X-Api-Key": "k"}, "timeout": 5})
    assert fhir_server(get=getter({"imaging_fhir_base_url": "https://f.example/fhir"}), connection=conn).base_url \
        == "https://f.example/fhir"  # the Variable wins
    server = fhir_server(get=getter({}), connection=conn)
    assert (server.base_url, server.auth, dict(server.headers), server.timeout_s) == \
        ("https://fhir.example.org:8443", ("svc", "pw"), {"X-Api-Key": "k"}, 5.0)


def test_every_dag_ends_with_the_optional_fhir_update():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    for dag_id in ("cardiovascular", "mammography", "neuroimaging", "pathology"):
        task = bag.dags[dag_id].get_task("fhir_update")
        assert task.upstream_task_ids == {"load_metadata"} and not task.downstream_task_ids
        assert task.trigger_rule == "none_failed"  # runs after a skipped load too; not after a failed one


# --------------------------------------------------------------------------------------------- status endpoints
@pytest.fixture(scope="module")
def api(airflow_db, cli_run):
    """The api-server app (core APIs, plugins, auth manager), the lake and warehouse of the CLI run, JWTs."""
    from conftest import api_server_client

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_VAR_IMAGING_LAKE_URI", cli_run.lake.as_uri())
        mp.setenv("AIRFLOW_VAR_IMAGING_WAREHOUSE", f"duckdb://{cli_run.warehouse}")
        with api_server_client() as (client, tokens):
            yield client, tokens


def test_status_routes_are_authenticated_like_the_qc_pages():
    from airflow.api_fastapi.core_api.security import get_user
    from imaging_dags.qc.app import create_app

    routes = {r.path: r for r in create_app().routes if hasattr(r, "dependant")}

    def calls(route):
        out, todo = set(), list(route.dependant.dependencies)
        while todo:
            dep = todo.pop()
            out.add(dep.call)
            todo.extend(dep.dependencies)
        return out

    assert get_user in calls(routes["/"])  # the QC index: GetUserDep, then the auth manager per DAG
    for path in ("/status/study/{study}", "/status/{patient}"):
        assert get_user in calls(routes[path]), path


def test_status_of_studies_and_patients(cli_run, api):
    client, tokens = api
    loaded, quarantined = cli_run.loaded[0], cli_run.quarantined[0]
    url = f"/imaging/status/study/{loaded}"
    assert client.get(url).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403
    denied = client.get(url, headers={"Authorization": f"Bearer {tokens['no_role']}"})
    assert denied.status_code == 403 and "not allowed" in denied.json()["detail"]
    auth = {"Authorization": f"Bearer {tokens['admin']}"}
    texts = []

    def get(path: str, status: int = 200) -> dict:
        response = client.get(path, headers=auth)
        assert response.status_code == status, (path, response.status_code, response.text[:300])
        texts.append(response.text)
        return response.json()

    (study,) = get(url)["studies"]
    record = _records(cli_run.lake)[loaded]  # as it is now (the FHIR test may have marked it again)
    assert {k: study[k] for k in ("specialty", "study", "patient", "state", "step", "run_id", "updated_at")} == \
        {"specialty": SPEC, "study": loaded, "patient": record["patient"], "state": "loaded", "step": "load",
         "run_id": record["run_id"], "updated_at": record["updated_at"]}
    assert [h["state"] for h in study["history"]][:5] == ["arrived", "deidentified", "audited", "published", "loaded"]
    assert study["history"][0]["run_id"] == "cli"  # the CLI run made it
    assert study["arrived_at"] and study["updated_at"] and study["processed"] and study["failures"] == 0
    assert study["warehouse"]["n_instances"] > 0 and study["warehouse"]["modalities"] == ["CT"]
    page = client.get(study["links"]["study_page"], headers=auth)  # the link opens the study's QC page
    assert page.status_code == 200 and loaded in page.text

    (q,) = get(f"/imaging/status/study/{quarantined}")["studies"]
    assert (q["state"], q["step"], q["reason"]) == ("quarantined", "deidentify", "no_usable_input")
    assert "study_page" not in q["links"]  # nothing de-identified to show

    patient = get(f"/imaging/status/{record['patient']}")
    assert [s["study"] for s in patient["studies"]] == [loaded] and patient["counts"] == {"loaded": 1}
    q_patient = get(f"/imaging/status/{cli_run.records[quarantined]['patient']}")  # from the warehouse ledger table
    assert quarantined in [s["study"] for s in q_patient["studies"]]

    assert "no study SUNKNOWN00" in get("/imaging/status/study/SUNKNOWN00", 404)["detail"]
    assert "no study of patient PUNKNOWN00" in get("/imaging/status/PUNKNOWN00", 404)["detail"]
    assert "not a study pseudonym" in get("/imaging/status/study/1.2.840.113619", 404)["detail"]
    assert "not a patient pseudonym" in get("/imaging/status/Castellanos", 404)["detail"]

    everything = "\n".join(texts)
    leaked = [v for v in cli_run.phi if v in everything]
    assert not leaked, leaked
    assert str(cli_run.root) not in everything  # no lake path
