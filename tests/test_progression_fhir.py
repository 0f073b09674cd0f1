"""Cognitive scores from FHIR ``Observation``s, against a real local FHIR-ish server (``http.server`` on 127.0.0.1):
searchset Bundles paged by ``_count`` with absolute, server-relative and relative next links, the subject Patients
``_include``d (one left out, read by ``GET Patient/<id>``), ``_lastUpdated=gt`` filtering on a server clock that
moves an hour per write, versions in ``meta.versionId``, 5xx/4xx on demand, every request recorded.

The rows must be what the upload path gives for the same raw rows (``pseudonymise_scores`` by hand) and carry the
pseudonym and shifted date the DICOM de-identifier gives the same PatientID; MRNs and names planted in the FHIR
data must reach neither the warehouse file, the lake, the logs nor the counts.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from imaging_tasks.deid.keys import DEMO_KEY
from test_progression_dag import _xcom_value

REPO = Path(__file__).resolve().parents[1]
SPECIALTY = "neuroimaging"
MRN_SYSTEM = "urn:oid:1.2.3.4.5.mrn"
SITE_CODES = {"http://loinc.org|72107-6": "MMSE", "urn:site:scores|CDRSB": "CDR_SB"}
LOINC_MMSE = {"coding": [{"system": "http://loinc.org", "code": "72107-6",
                          "display": "Mini-Mental State Examination [MMSE]"}]}
CDR_SB = {"coding": [{"system": "urn:site:scores", "code": "CDRSB"}], "text": "CDR sum of boxes"}
ADAS_BY_TEXT = {"coding": [{"system": "urn:site:other", "code": "X9"}], "text": "ADAS-Cog 11"}
HEART_RATE = {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]}
# PHI planted in the FHIR data: none may reach the warehouse, the lake, the logs or the counts
PHI = ("MRN-4711-QX", "MRN-0815-QX", "MRN-3333-QX", "MRN-5555-QX", "MRN-9999-QX", "Quillfeather", "Zanzibar",
       "Vantongeren", "123-45-6789")


# --------------------------------------------------------------------------------------------- a FHIR server
class ScoresServer:
    """Observations and Patients by id; search pages of ``_count``; a clock an hour per write."""

    def __init__(self):
        self.observations: dict[str, dict] = {}
        self.patients: dict[str, dict] = {}
        self.not_included: set[str] = set()  # Patient ids left out of _include (read them)
        self.faults: list[int] = []  # statuses to answer next
        self.faults_served = 0
        self.requests: list[str] = []
        self.clock = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                status, body = server.handle(self.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{self.origin}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def put(self, resource: dict) -> dict:
        """Store a resource as a new version, stamped by the server clock."""
        with self.lock:
            self.clock += dt.timedelta(hours=1)
            store = self.observations if resource["resourceType"] == "Observation" else self.patients
            old = store.get(resource["id"])
            version = int(old["meta"]["versionId"]) + 1 if old else 1
            stored = {**resource, "meta": {"versionId": str(version),
                                           "lastUpdated": self.clock.isoformat().replace("+00:00", "Z")}}
            store[resource["id"]] = stored
            return stored

    def handle(self, path: str):
        with self.lock:
            self.requests.append(path)
            if self.faults:
                self.faults_served += 1
                return self.faults.pop(0), {"resourceType": "OperationOutcome",
                                            "issue": [{"severity": "error", "code": "transient"}]}
            parts = urlsplit(path)
            if parts.path.startswith("/fhir/Patient/"):
                patient = self.patients.get(parts.path.rsplit("/", 1)[1])
                return (200, patient) if patient else (404, {"resourceType": "OperationOutcome", "issue": []})
            if parts.path != "/fhir/Observation":
                return 404, {"resourceType": "OperationOutcome", "issue": []}
            return 200, self.search(parse_qs(parts.query))

    def search(self, query: dict) -> dict:
        assert query["_include"] == ["Observation:subject"] and query["code"], query
        count, offset = int(query["_count"][0]), int(query.get("_offset", ["0"])[0])
        found = sorted(self.observations.values(), key=lambda o: (o["meta"]["lastUpdated"], o["id"]))
        if "_lastUpdated" in query:
            (since,) = query["_lastUpdated"]
            assert since.startswith("gt")
            found = [o for o in found if _instant(o["meta"]["lastUpdated"]) > _instant(since[2:])]
        page = found[offset:offset + count]
        refs = {o["subject"]["reference"].split("/")[-1] for o in page if "reference" in o.get("subject", {})}
        entries = [{"fullUrl": f"{self.url}/Observation/{o['id']}", "resource": o, "search": {"mode": "match"}}
                   for o in page]
        entries += [{"fullUrl": f"{self.url}/Patient/{p}", "resource": self.patients[p],
                     "search": {"mode": "include"}} for p in sorted(refs - self.not_included) if p in self.patients]
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(found), "entry": entries,
                  "link": [{"relation": "self", "url": f"{self.url}/Observation?{urlencode(query, doseq=True)}"}]}
        if offset + count < len(found):
            nxt = urlencode({**{k: v[0] for k, v in query.items()}, "_offset": offset + count})
            form = (offset // count) % 3  # absolute, server-relative, relative to the base
            bundle["link"].append({"relation": "next", "url": [f"{self.url}/Observation?{nxt}",
                                                               f"/fhir/Observation?{nxt}",
                                                               f"Observation?{nxt}"][form]})
        return bundle


def _instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _patient(pid: str, *identifiers: tuple[str, str], name: str = "Quillfeather^Zanzibar") -> dict:
    family, given = name.split("^")
    return {"resourceType": "Patient", "id": pid, "name": [{"family": family, "given": [given]}],
            "identifier": [{"system": s, "value": v} for s, v in identifiers]}


def _obs(oid: str, subject: dict, code: dict, status: str = "final", **value) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": status, "code": code, "subject": subject, **value}


def _ref(pid: str) -> dict:
    return {"reference": f"Patient/{pid}", "display": "Quillfeather, Zanzibar"}


@pytest.fixture()
def server():
    srv = ScoresServer()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _populate(srv: ScoresServer) -> list[dict]:
    """Ten Observations over four pages of 3; returns the raw rows the six usable ones stand for."""
    srv.put(_patient("p1", (MRN_SYSTEM, "MRN-4711-QX"), ("urn:ssn", "123-45-6789")))
    srv.put(_patient("p2", (MRN_SYSTEM, "MRN-0815-QX"), name="Vantongeren^Ysolde"))
    srv.put(_patient("p3", (MRN_SYSTEM, "MRN-3333-QX")))
    srv.put(_patient("p4", ("urn:ssn", "123-45-6789")))  # no MRN: its Observation cannot be placed
    srv.not_included = {"p3"}
    srv.put(_obs("o1", _ref("p1"), LOINC_MMSE, effectiveDateTime="2020-03-01T09:30:00+01:00",
                 valueQuantity={"value": 27, "unit": "{score}"}))
    srv.put(_obs("o2", _ref("p1"), CDR_SB, effectiveDateTime="2020-03-01", valueQuantity={"value": 1.5}))
    srv.put(_obs("o3", _ref("p2"), ADAS_BY_TEXT, effectivePeriod={"start": "2021-06-02T10:00:00+02:00"},
                 valueInteger=18))
    srv.put(_obs("o4", _ref("p2"), LOINC_MMSE, status="corrected", issued="2021-06-03T08:00:00Z", valueInteger=24))
    srv.put(_obs("o5", {"reference": f"{srv.url}/Patient/p3"}, LOINC_MMSE, effectiveDateTime="2019-11-20",
                 valueQuantity={"value": 29}))
    srv.put(_obs("o6", {"identifier": {"system": MRN_SYSTEM, "value": "MRN-5555-QX"}}, LOINC_MMSE,
                 effectiveDateTime="2022-01-10", valueQuantity={"value": 22}))
    srv.put(_obs("o7", _ref("p1"), HEART_RATE, effectiveDateTime="2020-03-01", valueQuantity={"value": 71}))
    srv.put(_obs("o8", _ref("p4"), LOINC_MMSE, effectiveDateTime="2020-03-01", valueQuantity={"value": 20}))
    srv.put(_obs("o9", _ref("p1"), LOINC_MMSE, status="preliminary", effectiveDateTime="2020-04-01",
                 valueQuantity={"value": 26}))
    srv.put(_obs("o10", {"identifier": {"system": MRN_SYSTEM, "value": "MRN-9999-QX"}}, LOINC_MMSE,
                 effectiveDateTime="2020-05-01", valueQuantity={"value": 45}))  # outside 0-30
    return [{"patient_id": "MRN-4711-QX", "date": "2020-03-01", "score": "MMSE", "value": 27},
            {"patient_id": "MRN-4711-QX", "date": "2020-03-01", "score": "CDR_SB", "value": 1.5},
            {"patient_id": "MRN-0815-QX", "date": "2021-06-02", "score": "ADAS_Cog", "value": 18},
            {"patient_id": "MRN-0815-QX", "date": "2021-06-03", "score": "MMSE", "value": 24},
            {"patient_id": "MRN-3333-QX", "date": "2019-11-20", "score": "MMSE", "value": 29},
            {"patient_id": "MRN-5555-QX", "date": "2022-01-10", "score": "MMSE", "value": 22}]


def _client(url: str):
    from imaging_tasks.fhir import FhirClient
    from imaging_tasks.retry import Policy

    return FhirClient(url, policy=Policy(attempts=4, initial_s=0.01, max_wait_s=0.05, budget_s=10))


def _rows(warehouse) -> set[tuple]:
    return set(warehouse.query("SELECT patient_id, score, date, value FROM cognitive_scores"))


def _expected(raw: list[dict]) -> set[tuple]:
    from imaging_tasks.progression.features import pseudonymise_scores

    return {(r["patient_id"], r["score"], r["date"], r["value"]) for r in pseudonymise_scores(raw, DEMO_KEY)}


def _ingest(srv, warehouse, lake, **kw):
    from imaging_tasks.progression.store import ingest_fhir

    client = _client(srv.url)
    try:
        return ingest_fhir(client, warehouse, SPECIALTY, DEMO_KEY, lake_root=lake, codes=SITE_CODES,
                           patient_system=MRN_SYSTEM, page_size=3, **kw)
    finally:
        client.close()


def _searches(srv, since: int = 0) -> list[dict]:
    return [parse_qs(urlsplit(p).query) for p in srv.requests[since:] if urlsplit(p).path == "/fhir/Observation"]


def _no_phi(*texts: str) -> None:
    leaked = [v for v in PHI for t in texts if v in t]
    assert not leaked, leaked


# --------------------------------------------------------------------------------------------- tests
def test_scores_arrive_pseudonymised_once_amended_and_withdrawn(server, tmp_path, caplog):
    from imaging_tasks.warehouse import DuckDBWarehouse

    caplog.set_level(logging.DEBUG)
    raw = _populate(server)
    warehouse, lake = DuckDBWarehouse(tmp_path / "w.duckdb"), tmp_path / "lake"

    first = _ingest(server, warehouse, lake)
    assert _rows(warehouse) == _expected(raw)  # exactly what an upload of the same raw rows gives
    assert {k: v for k, v in first.items() if v} == {
        "observations": 10, "loaded": 6, "rows": 6, "skipped_unknown_code": 1, "skipped_no_patient": 1,
        "skipped_status": 1, "skipped_bad_value": 1}
    searches = _searches(server)
    assert len(searches) == 4 and "_lastUpdated" not in searches[0]  # every page (3+3+3+1), all three link forms
    assert [s.get("_offset") for s in searches] == [None, ["3"], ["6"], ["9"]]
    assert searches[0]["code"] == [",".join(sorted(SITE_CODES))]
    assert sum(p == "/fhir/Patient/p3" for p in server.requests) == 1  # not included: read once
    sources = {r[0] for r in warehouse.query("SELECT source_sha256 FROM cognitive_scores")}
    assert len(sources) == 6 and all(len(s) == 64 for s in sources)

    # the second run asks from the watermark (less the overlap: the newest Observation again), adds nothing
    table = warehouse.query("SELECT *, CAST(loaded_at AS VARCHAR) FROM cognitive_scores ORDER BY ALL")
    mark = len(server.requests)
    second = _ingest(server, warehouse, lake)
    (search,) = _searches(server, mark)
    newest = max(_instant(o["meta"]["lastUpdated"]) for o in server.observations.values())
    assert search["_lastUpdated"] == ["gt" + (newest - dt.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")]
    assert (second["observations"], second["rows"], second["loaded"]) == (1, 0, 0)  # o10 again, still refused
    assert warehouse.query("SELECT *, CAST(loaded_at AS VARCHAR) FROM cognitive_scores ORDER BY ALL") == table

    # amended: a new value replaces the old; corrected to another date: the old row goes; entered-in-error:
    # withdrawn; a new Observation; all of it read from the watermark on
    o1 = copy.deepcopy(server.observations["o1"])
    server.put({**server.observations["o1"], "status": "amended", "valueQuantity": {"value": 25}})
    server.put({**server.observations["o4"], "issued": "2021-06-04T08:00:00Z"})
    server.put({**server.observations["o6"], "status": "entered-in-error"})
    server.put(_obs("o11", _ref("p2"), CDR_SB, effectiveDateTime="2021-06-02", valueQuantity={"value": 4.0}))
    third = _ingest(server, warehouse, lake)
    assert {k: third[k] for k in ("observations", "loaded", "amended", "withdrawn", "rows")} == \
        {"observations": 5, "loaded": 1, "amended": 2, "withdrawn": 1, "rows": 3}  # + o10 in the overlap
    now = [dict(r, value=25) if r["score"] == "MMSE" and r["date"] == "2020-03-01" else
           dict(r, date="2021-06-04") if r["patient_id"] == "MRN-0815-QX" and r["score"] == "MMSE" else r
           for r in raw if r["patient_id"] != "MRN-5555-QX"]
    now.append({"patient_id": "MRN-0815-QX", "date": "2021-06-02", "score": "CDR_SB", "value": 4.0})
    assert _rows(warehouse) == _expected(now)

    # a stale replica serving o1's first version again (asked from the start): it does not undo the amendment
    server.observations["o1"] = o1
    fourth = _ingest(server, warehouse, lake, overlap_s=10 * 365 * 86400)
    assert fourth["superseded"] == 1 and fourth["rows"] == 0 and _rows(warehouse) == _expected(now)

    # no PHI in the warehouse file, the lake's record, the logs (every level, every logger) nor the counts
    warehouse_bytes = (tmp_path / "w.duckdb").read_bytes().decode("latin-1")
    lake_text = "\n".join(p.read_text() for p in lake.rglob("*.json"))
    assert lake_text and list(lake.rglob("*.json"))[0].parts[-4:-1] == ("progression", SPECIALTY, "fhir_scores")
    logs = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    assert "FHIR scores of neuroimaging" in logs
    _no_phi(warehouse_bytes, lake_text, logs, json.dumps([first, second, third, fourth]),
            json.dumps(warehouse.query("SELECT * FROM cognitive_scores"), default=str))
    for oid in server.observations:  # server ids are hashed too
        assert f"Observation/{oid}" not in logs


def test_pseudonym_and_date_shift_match_the_imaging_de_identification(server, tmp_path):
    """The row of PatientID MRN-4711-QX carries the pseudonym and the shifted date the DICOM de-identifier writes
    into a study of that patient acquired the same day."""
    import pydicom
    from pydicom.dataset import Dataset

    from imaging_tasks.deid.reference import deidentify_inplace
    from imaging_tasks.deid.rules import DeidOptions
    from imaging_tasks.warehouse import DuckDBWarehouse

    _populate(server)
    warehouse = DuckDBWarehouse(tmp_path / "w.duckdb")
    _ingest(server, warehouse, tmp_path / "lake")
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.StudyDate = "MRN-4711-QX", "Quillfeather^Zanzibar", "20200301"
    ds.StudyInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPClassUID, ds.Modality = pydicom.uid.MRImageStorage, "MR"
    deidentify_inplace(ds, DEMO_KEY, DeidOptions(), demo=True)
    assert warehouse.query("SELECT patient_id, date FROM cognitive_scores WHERE score = 'MMSE' AND value = 27") \
        == [(ds.PatientID, ds.StudyDate)]
    assert ds.PatientID != "MRN-4711-QX" and ds.StudyDate != "20200301"


def test_transient_errors_are_retried_and_a_refusal_says_what_to_check(server, tmp_path):
    from imaging_tasks.fhir import FhirError
    from imaging_tasks.warehouse import DuckDBWarehouse

    raw = _populate(server)
    warehouse = DuckDBWarehouse(tmp_path / "w.duckdb")
    server.faults = [503, 502]
    assert _ingest(server, warehouse, tmp_path / "lake")["rows"] == 6 and server.faults_served == 2
    assert _rows(warehouse) == _expected(raw)

    server.faults = [401]
    before = len(server.requests)
    with pytest.raises(FhirError, match=r"HTTP 401.*credentials of connection imaging_fhir") as caught:
        _ingest(server, warehouse, tmp_path / "lake2")
    assert caught.value.status == 401 and len(server.requests) == before + 1  # not retried
    assert not (tmp_path / "lake2").exists()  # nothing recorded: the next run asks again

    client = _client(server.url)  # a next link to another server is not followed (the credentials would go)
    with pytest.raises(FhirError, match="another server"):
        client.read("http://elsewhere.example/fhir/Observation?_offset=3")
    client.close()


def test_codes_and_patients_resolved_as_configured():
    from imaging_tasks.errors import ConfigError
    from imaging_tasks.progression import fhir_scores as fs

    assert fs.parse_codes(None) == fs.DEFAULT_CODES == {"http://loinc.org|72107-6": "MMSE"}
    assert fs.parse_codes('{"urn:x|1": "CDR-SB", "ADAS": "adas-cog 11"}') == {"urn:x|1": "CDR_SB",
                                                                             "ADAS": "ADAS_Cog"}
    with pytest.raises(ConfigError, match="not JSON"):
        fs.parse_codes("MMSE=72107-6")
    assert fs.score_name(ADAS_BY_TEXT, fs.DEFAULT_CODES) == "ADAS_Cog"
    assert fs.score_name(HEART_RATE, fs.DEFAULT_CODES) is None
    patient = _patient("p", ("urn:a", "A1"), ("urn:b", "B1"))
    assert fs.raw_patient_id(patient, _ref("p"), "urn:b") == "B1"
    assert fs.raw_patient_id(patient, _ref("p"), None) is None  # two identifiers, none chosen: not guessed
    assert fs.raw_patient_id(_patient("p", ("urn:a", "A1")), _ref("p"), None) == "A1"
    assert fs.raw_patient_id(None, {"identifier": {"value": "X7"}}, None) == "X7"
    assert fs.patient_reference({"reference": "https://h/fhir/Patient/ab-1/_history/3"}) == "Patient/ab-1"
    assert fs.patient_reference({"reference": "Group/g1"}) is None


def test_the_dag_ingests_fhir_scores_when_a_server_is_configured(server, airflow_db, buckets, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    from imaging_tasks.warehouse import DuckDBWarehouse

    raw = _populate(server)
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_FHIR_BASE_URL", server.url)
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_FHIR_PATIENT_IDENTIFIER_SYSTEM", MRN_SYSTEM)
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_FHIR_SCORE_CODES", json.dumps(SITE_CODES))
    monkeypatch.delenv("AIRFLOW_VAR_IMAGING_PROGRESSION_MODEL_URI", raising=False)
    dag = DagBag(dag_folder=str(REPO / "dags" / "progression.py")).dags["progression"]
    run = dag.test(run_conf={"landing_quiet_seconds": 0})
    assert run.state == "success"
    counts = _xcom_value("ingest_scores", run.run_id)
    assert counts["uploads"] == 0 and counts["rows"] == 0  # no upload: the upload counts as before
    assert (counts["fhir_observations"], counts["fhir_loaded"], counts["fhir_rows"]) == (10, 6, 6)
    assert _rows(DuckDBWarehouse(buckets["warehouse"])) == _expected(raw)
    assert list((buckets["lake"] / "progression" / SPECIALTY / "fhir_scores").glob("*.json"))
    _no_phi(json.dumps(counts))  # (a second run asking from the watermark: the first test, on the same code)


def test_task_glue_without_a_server_does_nothing_and_a_refusal_is_not_retried(server, tmp_path, monkeypatch):
    """The FHIR half of ``ingest_scores`` as a worker runs it (Variables from the environment)."""
    from airflow.sdk.exceptions import AirflowFailException

    from imaging_dags.progression import _ingest_fhir_scores
    from imaging_tasks.warehouse import DuckDBWarehouse

    _populate(server)
    warehouse = DuckDBWarehouse(tmp_path / "w.duckdb")
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_LAKE_URI", (tmp_path / "lake").as_uri())
    monkeypatch.delenv("AIRFLOW_VAR_IMAGING_FHIR_BASE_URL", raising=False)
    assert _ingest_fhir_scores(SPECIALTY, warehouse, DEMO_KEY) == {} and server.requests == []
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_FHIR_BASE_URL", server.url)
    server.faults = [403]
    with pytest.raises(AirflowFailException, match=r"configuration error, not retried.*HTTP 403.*read access"):
        _ingest_fhir_scores(SPECIALTY, warehouse, DEMO_KEY)
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_FHIR_SCORE_CODES", "MMSE")
    with pytest.raises(AirflowFailException, match="not JSON"):
        _ingest_fhir_scores(SPECIALTY, warehouse, DEMO_KEY)
