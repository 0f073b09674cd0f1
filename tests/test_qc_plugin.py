"""The QC plugin end to end: a real cardiovascular run with ``dag.test()``, then the api-server app (Airflow's own
``create_app`` with the plugins folder, the SimpleAuthManager and real JWTs) driven with FastAPI's TestClient.

Checks authentication and DAG authorization, that the run and study pages show what the lake and warehouse hold,
that QC pictures load, the task-instance resolver and the "Study QC" extra link, that the file route serves
manifest outputs only, and that no raw landing path or identifying value of the synthetic inputs appears.
"""
from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.e2e


def _pseudo_study(truth: dict) -> str:
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.deid.pseudonym import pseudo_id

    return pseudo_id(DEMO_KEY, truth["study_uid"], "study")


def _study_map_indexes(dag_id: str, run_id: str, task_id: str) -> dict[str, int]:
    """study -> map index of its ``task_id`` instance, from the XComs."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(XComModel.map_index, XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
            XComModel.key == "return_value")).all()
    out = {}
    for map_index, value in rows:
        value = json.loads(value) if isinstance(value, str) else value
        for study in value:  # the batch's outcomes
            out[study["study"]] = map_index
    return out


def _metric_cells(page: str) -> dict[str, str]:
    section = page.split("<h2>Metrics", 1)[1].split("<h2>", 1)[0]
    return {unescape(name): unescape(value) for name, value in
            re.findall(r'<tr><td>([^<]*)</td><td class="num">([^<]*)</td>', section)}


@pytest.fixture()
def qc_client(airflow_db, buckets):
    """The api-server app (core APIs, plugins, auth manager) and JWTs (conftest.api_server_client)."""
    from conftest import api_server_client

    with api_server_client() as (client, tokens):
        yield client, tokens


def test_qc_pages_of_a_real_run(qc_client, buckets):
    from airflow.dag_processing.dagbag import DagBag

    from imaging_tasks.synth.bad_inputs import write_bad_inputs
    from imaging_tasks.cardiovascular.synth import synthesize
    from imaging_tasks.warehouse import DuckDBWarehouse

    client, tokens = qc_client
    synthesize(buckets["landing"], 2, 5)
    expected_bad = write_bad_inputs(buckets["landing"], "cardiovascular", seed=3)
    truths = [json.loads(p.read_text()) for p in sorted((buckets["truth"] / "cardiovascular").glob("*.json"))]
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    run = bag.dags["cardiovascular"].test(run_conf={"batch_size": 2})  # 3 studies: batches of 2 and 1
    assert run.state == "success"
    run_id, lake = run.run_id, buckets["lake"]
    studies = {}  # study pseudonym -> patient pseudonym, the patient read from the lake's layout
    for truth in truths:
        study = _pseudo_study(truth)
        (folder,) = (lake / "derived" / "cardiovascular").glob(f"*/{study}")
        studies[study] = folder.parent.name
    pages: list[str] = []

    def get(url: str, *, status: int = 200, **kwargs):
        response = client.get(url, **kwargs)
        assert response.status_code == status, (url, response.status_code, response.text[:300])
        if response.headers.get("content-type", "").startswith(("text/", "application/json")):
            pages.append(response.text)
        return response

    run_url = f"/imaging/dags/cardiovascular/runs/{quote(run_id, safe='')}"

    # authentication and authorization are Airflow's: no token 401, a bad token 403, a user without DAG access 403
    assert client.get("/imaging/").status_code == 401
    assert client.get(run_url).status_code == 401
    assert client.get(run_url, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403
    assert client.get(run_url, headers={"Authorization": f"Bearer {tokens['no_role']}"}).status_code == 403
    some_study, some_patient = next(iter(studies.items()))
    assert client.get(f"/imaging/dags/cardiovascular/studies/{some_patient}/{some_study}/files/calcium_scoring/qc_calcium.png",
                      headers={"Authorization": f"Bearer {tokens['no_role']}"}).status_code == 403
    client.cookies.set("_token", tokens["admin"])  # the UI's session cookie works as well as a Bearer token
    assert get("/imaging/").status_code == 200
    client.cookies.clear()
    client.headers["Authorization"] = f"Bearer {tokens['admin']}"

    # index: the four specialties and this run
    index = get("/imaging/").text
    assert all(f"<h2>{d}" in index for d in ("neuroimaging", "cardiovascular", "pathology", "mammography"))
    assert f'href="{run_url}"' in index

    # run page: every study published with a thumbnail; the quarantine reasons, nothing more of them
    page = get(run_url).text
    for study, patient in studies.items():
        assert f"/imaging/dags/cardiovascular/studies/{patient}/{study}?run_id=" in page
    assert page.count('class="badge published"') == len(studies)
    for reason in set(expected_bad.values()):
        assert f"<td>{reason}</td>" in page
    summary = get(f"{run_url}/run.json").json()
    published = [s for s in summary["studies"] if s["published"]]
    assert {s["study"] for s in published} == set(studies)
    assert all(s["status"] == "published" and s["device"] and s["picture"] for s in published)
    # the truncated CT is a study of its own, quarantined at de-identification: listed, with no results
    assert [s["status"] for s in summary["studies"] if not s["published"]] == ["quarantined"]
    assert sorted(q["reason"] for q in summary["quarantine"]) == sorted(expected_bad.values())
    assert all(set(q) == {"reason", "stage", "message", "quarantined_at", "sha_prefix"} for q in summary["quarantine"])
    for s in published:
        assert get(s["picture"]).content.startswith(PNG)

    # study pages: metrics as in results.json and the warehouse, pictures that load, lineage
    wh = DuckDBWarehouse(buckets["warehouse"])
    for study, patient in studies.items():
        url = f"/imaging/dags/cardiovascular/studies/{patient}/{study}"
        page = get(url, params={"run_id": run_id}).text
        results = json.loads((lake / "derived" / "cardiovascular" / patient / study / "results.json").read_text())
        shown = _metric_cells(page)
        assert set(shown) == {m["name"] for m in results["metrics"]}
        stored = dict(wh.query("SELECT metric, value FROM results WHERE study_id = ?", [study]))
        for m in results["metrics"]:
            assert float(shown[m["name"]]) == pytest.approx(m["value"], rel=1e-5)
            assert stored[m["name"]] == pytest.approx(m["value"], rel=1e-12)
        assert f"<h2>Findings ({len(results['findings'])})</h2>" in page
        sources = re.findall(r'<img loading="lazy" alt="[^"]*" src="([^"]+)"', page)
        assert sources
        for src in sources:
            image = get(unescape(src))
            assert image.headers["content-type"] == "image/png" and image.content.startswith(PNG)
        assert "calcium_scoring" in page and "flow" in page and "deidentify" in page and "DEMO KEY" in page
        data = get(f"{url}/study.json").json()
        assert {m["name"]: m["value"] for m in data["metrics"]} == {m["name"]: m["value"] for m in results["metrics"]}

        # the file route serves manifest outputs only
        files = f"{url}/files"
        assert get(f"{files}/calcium_scoring/lesions.json").json() == json.loads(
            (lake / "derived" / "cardiovascular" / patient / study / "calcium_scoring" / "lesions.json").read_text())
        deid = f"anonymized/cardiovascular/{patient}/{study}/_DEID.json"
        quarantined = next((lake / "quarantine" / "cardiovascular").glob("*/input*")).relative_to(lake).as_posix()
        for name in ("_MANIFEST.json", "nope.png", "../results.json", f"../../../../{deid}",
                     f"../../../../{quarantined}",
                     "..%2F..%2F..%2F..%2F" + quote(deid, safe=""), "%2e%2e/%2e%2e/%2e%2e/%2e%2e/" + deid,
                     quote(str(lake / "derived" / "cardiovascular" / patient / study / "results.json"), safe="")):
            response = client.get(f"{files}/{name}")
            assert response.status_code == 404, name
            assert not response.content.startswith((b"DICM", PNG)) and b"instances" not in response.content
        for other in (f"/imaging/dags/cardiovascular/studies/..%2F..%2Fquarantine/{study}/files/results.json",
                      f"/imaging/dags/cardiovascular/studies/{patient}/{study}/files/",
                      f"/imaging/dags/not_imaging/studies/{patient}/{study}/files/calcium_scoring/qc_calcium.png"):
            assert client.get(other).status_code == 404, other

    # the resolver: a mapped instance holding one study -> its study page; a batch -> a page linking each of its
    # studies; a task that holds no study says so
    indexes = _study_map_indexes("cardiovascular", run_id, "calcium_scoring")
    assert set(indexes) == set(studies) and set(indexes.values()) == {0}  # the two audited studies, one batch
    page = get(f"{run_url}/tasks/calcium_scoring/0").text
    assert "calcium_scoring [0]: a batch of 2 studies" in unescape(page)
    for study, patient in studies.items():
        assert f"/imaging/dags/cardiovascular/studies/{patient}/{study}?run_id=" in unescape(page)
    deidentified = _study_map_indexes("cardiovascular", run_id, "deidentify")
    (single,) = [m for m in set(deidentified.values()) if list(deidentified.values()).count(m) == 1]
    (study,) = [s for s, m in deidentified.items() if m == single]
    if study in studies:
        response = get(f"{run_url}/tasks/deidentify/{single}", follow_redirects=False, status=303)
        location = response.headers["location"]
        assert urlsplit(location).path == f"/imaging/dags/cardiovascular/studies/{studies[study]}/{study}"
        assert "Metrics" in get(location).text
    else:  # the truncated CT's own study, quarantined at de-identification
        assert f"Study {study} was quarantined" in get(f"{run_url}/tasks/deidentify/{single}").text
    assert "holds no single study" in get(f"{run_url}/tasks/load_metadata/-1").text
    assert "holds no single study" in get(f"{run_url}/tasks/index_studies/%7BMAP_INDEX%7D").text
    get(f"{run_url}/tasks/calcium_scoring/99", status=404)

    # the "Study QC" extra link, evaluated by the api-server on the serialized DAG
    links = f"/api/v2/dags/cardiovascular/dagRuns/{quote(run_id, safe='')}/taskInstances"
    some = next(iter(indexes.items()))  # (study, its batch's map index)
    got = client.get(f"{links}/calcium_scoring/links", params={"map_index": some[1]}).json()["extra_links"]
    assert got["Study QC"] == f"{run_url}/tasks/calcium_scoring/{some[1]}"
    assert client.get(f"{links}/index_studies/links").json()["extra_links"]["Study QC"] is None

    # the plugin's UI entries
    plugins = client.get("/api/v2/plugins").json()["plugins"]
    views = next(p for p in plugins if p["name"] == "imaging_qc")["external_views"]
    assert {v["destination"] for v in views} == {"nav", "dag_run", "task_instance"}
    assert all(not v["href"].startswith("/") for v in views)

    # nothing raw: no landing path or file name, no identifying value of the synthetic inputs
    text = "\n".join(pages)
    assert str(buckets["landing"]) not in text and "bad-inputs" not in text and "source_uri" not in text
    phi = sorted({v for t in truths for v in t["phi"] if len(v) >= 6})
    assert phi
    for value in phi:
        assert value not in text and value not in unescape(text), f"PHI value of length {len(value)} in a page"


def test_study_link_only_on_study_tasks(monkeypatch):
    from imaging_dags.qc.links import StudyQCLink, study_task_url

    class Key:
        dag_id, run_id, task_id, map_index = "mammography", "manual__2026-01-02T03:04:05+00:00", "process_study", 2

    assert StudyQCLink().get_link(None, ti_key=Key) == (
        "/imaging/dags/mammography/runs/manual__2026-01-02T03%3A04%3A05%2B00%3A00/tasks/process_study/2")
    assert study_task_url("mammography", "r", "load_metadata", -1) == ""
    assert study_task_url("mammography", "r", "wait_for_landing", -1) == ""
    assert study_task_url("mammography", "r", "process_study", -1) == ""
    assert study_task_url("some_other_dag", "r", "process_study", 0) == ""
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://example.org/airflow/")
    assert study_task_url("pathology", "r", "tile_features", 7) == (
        "/airflow/imaging/dags/pathology/runs/r/tasks/tile_features/7")


def test_server_side_settings_read_variables_from_env_and_db(airflow_db, monkeypatch, tmp_path):
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session

    from imaging_dags.settings import for_specialty, server_variable

    monkeypatch.delenv("AIRFLOW_VAR_IMAGING_LAKE_URI", raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_IMAGING_LAKE_URI_NEUROIMAGING", raising=False)
    Variable.set("imaging_lake_uri_neuroimaging", (tmp_path / "db-lake").as_uri())
    try:
        assert for_specialty("neuroimaging", get=server_variable).lake_uri == (tmp_path / "db-lake").as_uri()
        monkeypatch.setenv("AIRFLOW_VAR_IMAGING_LAKE_URI_NEUROIMAGING", (tmp_path / "env-lake").as_uri())
        assert for_specialty("neuroimaging", get=server_variable).lake_uri == (tmp_path / "env-lake").as_uri()
    finally:
        with create_session() as session:
            Variable.delete("imaging_lake_uri_neuroimaging", session=session)


def test_qc_pages_read_an_object_store_lake(cloud, qc_client, monkeypatch):
    """The same pages on an S3 / GCS lake (moto, fake-gcs-server) named with its Airflow connection."""
    import base64
    import hashlib

    scheme, conn_id, new_bucket = cloud
    client, tokens = qc_client
    client.headers["Authorization"] = f"Bearer {tokens['admin']}"
    bucket = new_bucket("lake")
    patient, study, run_id = "P" + "A" * 16, "S" + "B" * 16, "manual__2026-03-01T02:00:00+00:00"
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
                           "rkJggg==")  # 1x1 PNG
    results = json.dumps({"metrics": [{"name": "n_clusters", "value": 3.0, "unit": ""}],
                          "findings": [{"index": 1, "kind": "cluster", "n_calcs": 5}]}).encode()
    base = f"derived/mammography/{patient}/{study}"
    outputs = [{"path": n, "sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
               for n, d in (("qc_overview.png", png), ("results.json", results))]
    bucket.put(f"{base}/qc_overview.png", png)
    bucket.put(f"{base}/results.json", results)
    bucket.put(f"{base}/_MANIFEST.json", json.dumps({
        "specialty": "mammography", "study": study, "patient": patient, "code_version": "0.1.0", "outputs": outputs,
        "metrics": [{"name": "n_clusters", "value": 3.0, "unit": ""}], "n_findings": 1}).encode())
    bucket.put(f"runs/mammography/manual__2026-03-01T02_00_00_00_00/process_study.0.{study}.json", json.dumps({
        "dag_id": "mammography", "run_id": run_id, "task_id": "process_study", "map_index": 0, "study_id": study,
        "inputs": [], "outputs": [{"uri": bucket.uri(f"{base}/qc_overview.png"), "sha256": outputs[0]["sha256"]}],
        "device": "cpu", "duration_s": 1.5, "status": "success", "started_at": "2026-03-01T02:00:01+00:00"}).encode())
    bucket.put("quarantine/mammography/0123456789abcdef/input.dcm", b"DICM raw input with PHI")
    bucket.put("quarantine/mammography/0123456789abcdef/reason.json", json.dumps({
        "input_sha256": "0123456789abcdef" * 4, "stage": "index", "reason": "not_dicom", "message": "no DICOM header",
        "source_uri": "s3://landing/mammography/DOE^JANE/scan.dcm",
        "quarantined_at": "2026-03-01T02:00:00+00:00"}).encode())
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_LAKE_URI", bucket.uri("", conn_id))

    page = client.get(f"/imaging/dags/mammography/runs/{quote(run_id, safe='')}")
    assert page.status_code == 200, page.text[:300]
    assert study in page.text and "not_dicom" in page.text and "DOE^JANE" not in page.text
    assert 'class="badge published"' in page.text and 'class="thumb"' in page.text  # from the lineage alone
    assert "source_uri" not in page.text and "landing" not in page.text
    url = f"/imaging/dags/mammography/studies/{patient}/{study}"
    page = client.get(url, params={"run_id": run_id}).text
    assert _metric_cells(page) == {"n_clusters": "3"}
    assert f"derived/mammography/{patient}/{study}/qc_overview.png" in page  # lineage, relative to the lake
    image = client.get(f"{url}/files/qc_overview.png")
    assert image.status_code == 200 and image.content == png
    assert client.get(f"{url}/files/../../../../quarantine/mammography/0123456789abcdef/input.dcm").status_code == 404
    bucket.put(f"{base}/qc_overview.png", png + b"changed")  # no longer what the manifest vouches for
    assert client.get(f"{url}/files/qc_overview.png").status_code == 404
