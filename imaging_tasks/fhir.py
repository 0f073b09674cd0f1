"""Study status and results as FHIR resources, sent to a research FHIR server (plain Python, no Airflow).

What is sent for a study the ledger says is done (``loaded``, or ``quarantined`` after de-identification):

* one ``ImagingStudy``: ``status`` (``available``; ``cancelled`` when quarantined, with the reason code as a
  note), ``identifier`` = the study pseudonym (plus the de-identified StudyInstanceUID as ``urn:oid:``),
  ``subject`` = a logical reference to the patient pseudonym (no Patient resource is made), ``started`` = the
  de-identified (shifted) StudyDate, and per series its new UID, number, modality and number of instances;
* one ``Observation`` per metric of ``results.json`` (``partOf`` the ImagingStudy, ``valueQuantity``);
* one ``DiagnosticReport`` whose ``result`` lists those Observations and whose ``imagingStudy`` is the study.

The wire format is FHIR R4 (4.0.1) as spoken by R4 and R4B servers; every body is validated with
``fhir.resources.R4B`` (R4B = 4.3.0, identical to R4 for these three resources) before it leaves.  Only
pseudonyms, new UIDs, shifted dates, modality codes, counts and metric values go out: nothing is read from raw
inputs, and header values other than those are never copied.

Each resource is sent with a *conditional update* (``PUT [base]/ImagingStudy?identifier=system|value``), so a
rerun updates what the first run created instead of adding a duplicate.  Transient faults (5xx, 429, timeouts,
resets) are retried by :mod:`imaging_tasks.retry`; other 4xx fail that study at once.

Which studies are due is kept in the lake, beside the ledger: ``ledger/<specialty>/fhir/<S…>.json`` holds the
ledger ``updated_at`` last sent; a study is due while its ledger record is newer (a reprocessed study is sent
again, a study whose send failed is taken by the next attempt or run).

The same client also reads (:meth:`FhirClient.search`, paged by ``link[relation=next]``, same retries): the
progression DAG takes cognitive-score Observations from that server (:mod:`imaging_tasks.progression.fhir_scores`).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from imaging_tasks import retry, storage
from imaging_tasks.errors import ConfigError

log = logging.getLogger(__name__)

FHIR_VERSION = "4.0.1"  # what the bodies are (R4); validated with fhir.resources.R4B (4.3.0)
DEFAULT_SYSTEM = "urn:imaging-pipeline"  # identifier systems: <system>:study, :patient, :observation, :report
DICOM_DCM = "http://dicom.nema.org/resources/ontology/DCM"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
REPORT_CATEGORY = "http://terminology.hl7.org/CodeSystem/v2-0074"
SENT_STATES = frozenset({"loaded", "quarantined"})
MEDIA_TYPE = "application/fhir+json"
POLICY = retry.Policy(attempts=4, initial_s=0.5, multiplier=2.0, max_wait_s=8.0, budget_s=60.0)
ID_SAFE = re.compile(r"[^A-Za-z0-9.\-]")


class FhirError(RuntimeError):
    """A FHIR server answered with an error (``status``); the message names the resource type and study only."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class FhirRefused(FhirError, ConfigError):
    """A read the server refused for a reason only a setting fixes (base URL, credentials, read access, the
    search's codes): a :class:`ConfigError` too, so every caller fails it once, at once, without a mapping of its
    own."""


REFUSED_READ = frozenset({400, 401, 403, 404})  # GET answers that retrying cannot change


# --------------------------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class StudyFacts:
    """What the resources say about one study, read from the ledger record and the lake (no raw data)."""

    specialty: str
    study: str
    patient: str
    state: str
    reason: str | None = None
    step: str | None = None
    study_uid: str | None = None
    started: str | None = None  # FHIR date (YYYY-MM-DD), from the shifted StudyDate
    series: tuple[dict, ...] = ()  # {uid, number, modality, instances}
    metrics: tuple[dict, ...] = ()  # {name, value, unit}
    n_findings: int = 0
    code_version: str | None = None


def _fhir_date(value: Any) -> str | None:
    text = str(value or "").strip()
    if re.fullmatch(r"\d{8}", text):
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return text
    return None


def study_facts(record: dict) -> StudyFacts:
    """The facts of a ledger record: series from the de-identification record (``_DEID.json``: modality, new
    UIDs, the shifted StudyDate and SeriesNumber only), metrics and findings count from ``results.json``."""
    from imaging_tasks.pipeline import DEID_MANIFEST

    series: dict[str, dict] = {}
    study_uid = started = None
    if record.get("anonymized_uri"):
        try:
            deid = storage.read_json(storage.join(record["anonymized_uri"], DEID_MANIFEST))
        except FileNotFoundError:
            deid = {}
        for inst in deid.get("instances") or []:
            header = inst.get("header") or {}
            uid = inst.get("series_uid") or f"{record['study']}-slide"
            number = header.get("SeriesNumber")
            s = series.setdefault(uid, {"uid": uid, "modality": inst.get("modality"), "instances": 0,
                                        "number": int(number) if isinstance(number, (int, float)) else None})
            s["instances"] += 1
            study_uid = study_uid or inst.get("study_uid")
            started = started or _fhir_date(header.get("StudyDate"))
    metrics: list[dict] = []
    n_findings = 0
    if record.get("state") == "loaded" and record.get("derived_uri"):
        try:
            results = storage.read_json(storage.join(record["derived_uri"], "results.json"))
        except FileNotFoundError:
            results = {}
        metrics = [m for m in results.get("metrics") or [] if isinstance(m, dict) and m.get("name")]
        n_findings = len(results.get("findings") or [])
    return StudyFacts(specialty=record["specialty"], study=record["study"], patient=record.get("patient") or "",
                      state=record["state"], reason=record.get("reason"), step=record.get("step"),
                      study_uid=study_uid, started=started, series=tuple(series.values()), metrics=tuple(metrics),
                      n_findings=n_findings, code_version=record.get("code_version"))


# --------------------------------------------------------------------------------------------- resources
def _identifier(system: str, kind: str, value: str) -> dict:
    return {"system": f"{system}:{kind}", "value": value}


def reference(resource_type: str, identifier: dict, server_id: str | None = None) -> dict:
    """A reference by identifier (always) and by the server's id (when known)."""
    ref = {"type": resource_type, "identifier": identifier}
    if server_id:
        ref["reference"] = f"{resource_type}/{server_id}"
    return ref


def validate(body: dict) -> dict:
    """``body`` checked against its resource type with ``fhir.resources`` (R4B), returned as JSON-ready data.
    Raises ``ValueError`` (pydantic's ``ValidationError``) when it is not a valid resource."""
    from fhir.resources.R4B import get_fhir_model_class

    kind = body.get("resourceType")
    if not isinstance(kind, str):
        raise ValueError("not a FHIR resource: no resourceType")
    try:
        model = get_fhir_model_class(kind)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unknown FHIR resource type {kind!r}") from exc
    return json.loads(model.model_validate(body).model_dump_json(exclude_none=True))


def imaging_study(facts: StudyFacts, *, system: str = DEFAULT_SYSTEM) -> dict:
    subject = reference("Patient", _identifier(system, "patient", facts.patient))
    body: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [_identifier(system, "study", facts.study)]
        + ([{"system": "urn:dicom:uid", "value": f"urn:oid:{facts.study_uid}"}] if facts.study_uid else []),
        "status": "cancelled" if facts.state == "quarantined" else "available",
        "subject": subject,
    }
    if facts.started:
        body["started"] = facts.started
    modalities = sorted({s["modality"] for s in facts.series if s.get("modality")})
    if modalities:
        body["modality"] = [{"system": DICOM_DCM, "code": m} for m in modalities]
    if facts.series:
        body["numberOfSeries"] = len(facts.series)
        body["numberOfInstances"] = sum(s["instances"] for s in facts.series)
        body["series"] = [{"uid": ID_SAFE.sub("-", s["uid"])[:64],
                           **({"number": s["number"]} if s.get("number") is not None else {}),
                           "modality": {"system": DICOM_DCM, "code": s.get("modality") or "OT"},
                           "numberOfInstances": s["instances"]} for s in facts.series]
    if facts.state == "quarantined":
        body["note"] = [{"text": f"quarantined at {facts.step or '?'}: {facts.reason or 'no reason recorded'}"}]
    body["description"] = f"{facts.specialty} imaging pipeline"
    return validate(body)


def observations(facts: StudyFacts, study_ref: dict, *, system: str = DEFAULT_SYSTEM) -> list[dict]:
    """One ``Observation`` per metric with a finite value."""
    out = []
    subject = reference("Patient", _identifier(system, "patient", facts.patient))
    for m in facts.metrics:
        try:
            value = float(m["value"])
        except (TypeError, ValueError):
            continue
        if not math.isfinite(value):
            continue
        quantity: dict[str, Any] = {"value": value}
        if m.get("unit"):
            quantity["unit"] = str(m["unit"])
        body = {
            "resourceType": "Observation",
            "identifier": [_identifier(system, "observation", f"{facts.study}.{m['name']}")],
            "status": "final",
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging"}]}],
            "code": {"coding": [{"system": f"{system}:metric:{facts.specialty}", "code": str(m["name"])}],
                     "text": str(m["name"])},
            "subject": subject,
            "partOf": [study_ref],
            "valueQuantity": quantity,
        }
        if facts.started:
            body["effectiveDateTime"] = facts.started
        out.append(validate(body))
    return out


def diagnostic_report(facts: StudyFacts, study_ref: dict, observation_refs: list[dict], *,
                      system: str = DEFAULT_SYSTEM) -> dict:
    body: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [_identifier(system, "report", facts.study)],
        "status": "final",
        "category": [{"coding": [{"system": REPORT_CATEGORY, "code": "RAD"}]}],
        "code": {"coding": [{"system": f"{system}:report", "code": facts.specialty}],
                 "text": f"{facts.specialty} imaging pipeline results"},
        "subject": reference("Patient", _identifier(system, "patient", facts.patient)),
        "imagingStudy": [study_ref],
        "result": observation_refs,
        "conclusion": f"{len(observation_refs)} metric(s), {facts.n_findings} finding(s); code version "
                      f"{facts.code_version or '?'}",
    }
    if facts.started:
        body["effectiveDateTime"] = facts.started
    return validate(body)


# --------------------------------------------------------------------------------------------- client
@dataclass
class FhirClient:
    """Conditional updates (and reads: :meth:`read`, :meth:`search`) against a FHIR base URL
    (``https://host/fhir``), with retries on transient faults."""

    base_url: str
    headers: dict = field(default_factory=dict)
    auth: Any = None  # a ``requests`` auth (e.g. ``("user", "password")``)
    timeout_s: float = 30.0
    policy: retry.Policy = POLICY

    def __post_init__(self):
        import requests

        if not re.match(r"^https?://", self.base_url or ""):
            raise ConfigError(f"FHIR base URL must start with http:// or https://, got {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def put_conditional(self, body: dict, identifier: dict) -> dict:
        """``PUT [base]/<type>?identifier=system|value``: creates the resource or updates the one that identifier
        names.  Returns the server's resource (at least its ``id``, when the server tells it)."""
        kind = body["resourceType"]
        return retry.call(self._put, kind, body, f"{identifier['system']}|{identifier['value']}",
                          operation=f"FHIR PUT {kind}", target=self.base_url.split("?", 1)[0],
                          policy=self.policy)

    def _put(self, kind: str, body: dict, identifier: str) -> dict:
        import requests

        response = self._session.put(
            f"{self.base_url}/{kind}", params={"identifier": identifier}, json=body, auth=self.auth,
            timeout=self.timeout_s, headers={"Content-Type": MEDIA_TYPE, "Accept": MEDIA_TYPE,
                                             "Prefer": "return=representation", **self.headers})
        if response.status_code >= 400:
            error = requests.HTTPError(f"FHIR server answered {response.status_code} to PUT {kind}",
                                       response=response)
            if retry.is_transient(error):
                raise error
            raise FhirError(f"FHIR server refused PUT {kind} (HTTP {response.status_code}: "
                            f"{_outcome(response)})", response.status_code)
        try:
            out = response.json() if response.content else {}
        except ValueError:
            out = {}
        if not out.get("id"):  # no body: the Location header says where it is
            match = re.search(rf"{kind}/([A-Za-z0-9\-.]{{1,64}})", response.headers.get("Location", ""))
            if match:
                out = {**out, "id": match.group(1)}
        return out

    # ----------------------------------------------------------------------------------------- reading
    def read(self, url: str, params: dict | None = None) -> dict:
        """``GET`` of a resource or a search page (``url``: relative to the base, or an absolute URL on the base's
        own server), with the same retries as the PUTs.  A 4xx raises :class:`FhirError` saying what to check."""
        target = self._url(url)
        return retry.call(self._get, target, params, operation="FHIR GET", target=origin(self.base_url),
                          policy=self.policy)

    def search(self, resource_type: str, params: dict) -> Iterator[dict]:
        """The pages (``Bundle``s) of ``GET [base]/<resource_type>?params``, following ``link[relation=next]``
        (absolute or server-relative) until there is none.  A next link to another server is refused: the
        credentials must not go there."""
        page = self.read(resource_type, params)
        seen = set()
        while True:
            yield page
            nxt = next((link.get("url") for link in page.get("link") or [] if link.get("relation") == "next"), None)
            if not nxt or nxt in seen:
                return
            seen.add(nxt)
            page = self.read(nxt)

    def _url(self, url: str) -> str:
        from urllib.parse import urljoin

        full = urljoin(self.base_url + "/", url)
        if origin(full) != origin(self.base_url):
            raise FhirError(f"FHIR server sent a link to another server ({origin(full)}, not "
                            f"{origin(self.base_url)}): not followed; check the server's base URL setting")
        return full

    def _get(self, url: str, params: dict | None) -> dict:
        import requests

        response = self._session.get(url, params=params, auth=self.auth, timeout=self.timeout_s,
                                     headers={"Accept": MEDIA_TYPE, **self.headers})
        what = url[len(self.base_url):].split("?", 1)[0].strip("/").split("/", 1)[0] or "search page"
        if response.status_code >= 400:
            error = requests.HTTPError(f"FHIR server answered {response.status_code} to GET {what}",
                                       response=response)
            if retry.is_transient(error):
                raise error
            hint = {401: "check the credentials of connection imaging_fhir",
                    403: "the FHIR account may not read this resource type: ask for read access",
                    404: "check the FHIR base URL (Variable imaging_fhir_base_url or connection imaging_fhir)"}
            refused = FhirRefused if response.status_code in REFUSED_READ else FhirError
            raise refused(f"FHIR server refused GET {what} (HTTP {response.status_code}: {_outcome(response)})"
                          + (f"; {hint[response.status_code]}" if response.status_code in hint else ""),
                          response.status_code)
        try:
            return response.json()
        except ValueError:
            raise FhirError(f"FHIR server answered GET {what} with no JSON (HTTP {response.status_code}, "
                            f"{response.headers.get('Content-Type') or 'no content type'}): check the FHIR base URL "
                            "(it must be the FHIR endpoint, e.g. https://host/fhir)", response.status_code) from None


def origin(url: str) -> str:
    """``scheme://host:port`` of a URL: what log lines and errors may name (paths and queries may not)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def _outcome(response) -> str:
    """The first issue of an OperationOutcome (diagnostics are the server's words about our own body), short."""
    try:
        issue = (response.json().get("issue") or [{}])[0]
        return str(issue.get("diagnostics") or issue.get("code") or "no detail")[:200]
    except (ValueError, AttributeError):
        return "no detail"


def send_study(client: FhirClient, record: dict, *, system: str = DEFAULT_SYSTEM) -> dict:
    """ImagingStudy, then its Observations, then the DiagnosticReport; returns the counts and server ids."""
    facts = study_facts(record)
    if not facts.patient:
        raise ValueError(f"study {facts.study}: no patient pseudonym in its ledger record")
    study_body = imaging_study(facts, system=system)
    study_id = _identifier(system, "study", facts.study)
    sent = client.put_conditional(study_body, study_id)
    study_ref = reference("ImagingStudy", study_id, sent.get("id"))
    obs_refs = []
    for body in observations(facts, study_ref, system=system):
        ident = body["identifier"][0]
        got = client.put_conditional(body, ident)
        obs_refs.append(reference("Observation", ident, got.get("id")))
    report = None
    if facts.state == "loaded":
        body = diagnostic_report(facts, study_ref, obs_refs, system=system)
        report = client.put_conditional(body, body["identifier"][0]).get("id")
    return {"study": facts.study, "imaging_study": sent.get("id"), "observations": len(obs_refs), "report": report}


# --------------------------------------------------------------------------------------------- what is due
@dataclass(frozen=True)
class FhirSync:
    """Which studies of a specialty's ledger still have to reach the FHIR server, and marking them sent."""

    root: Any  # the lake root
    specialty: str

    def _folder(self, *parts: str):
        return storage.join(self.root, "ledger", self.specialty, *parts)

    def due(self, limit: int | None = None) -> list[dict]:
        """Ledger records in a sent state (loaded; quarantined after de-identification) not sent since their last
        change, oldest first.  Reads only records whose file is newer than their marker (or has none)."""
        from imaging_tasks.ledger import Ledger

        markers = {o.relpath[:-5]: o.modified for o in storage.list_objects(self._folder("fhir"))
                   if o.relpath.endswith(".json") and "/" not in o.relpath}
        ledger = Ledger(self.root, self.specialty)
        out = []
        for info in storage.list_objects(self._folder("studies")):
            study = info.relpath[:-5]
            if not info.relpath.endswith(".json") or "/" in info.relpath:
                continue
            seen = markers.get(study)
            if seen is not None and info.modified is not None and info.modified < seen:
                continue
            record = ledger.get(study)
            if not record or record.get("state") not in SENT_STATES:
                continue
            if record["state"] == "quarantined" and not record.get("anonymized_uri"):
                continue  # quarantined before de-identification: nothing de-identified to describe
            if seen is not None and self._sent(study) == record.get("updated_at"):
                continue
            out.append(record)
        out.sort(key=lambda r: r.get("updated_at") or "")
        return out[:limit] if limit else out

    def _sent(self, study: str) -> str | None:
        try:
            return storage.read_json(self._folder("fhir", f"{study}.json")).get("updated_at")
        except (FileNotFoundError, ValueError):
            return None

    def mark_sent(self, record: dict, result: dict) -> None:
        storage.write_json(self._folder("fhir", f"{record['study']}.json"),
                           {"study": record["study"], "state": record["state"], "updated_at": record.get("updated_at"),
                            "imaging_study": result.get("imaging_study"), "report": result.get("report"),
                            "sent_at": dt.datetime.now(dt.timezone.utc).isoformat()})


def send_due(client: FhirClient, sync: FhirSync, records: Iterable[dict] | None = None, *,
             system: str = DEFAULT_SYSTEM) -> dict:
    """Send every due study (or ``records``); one study's failure never stops the others.

    Returns ``{"sent": [study...], "failed": [{"study", "error"}...]}``; errors name the type and HTTP status,
    never a body or header value.
    """
    sent, failed = [], []
    for record in (sync.due() if records is None else records):
        try:
            result = send_study(client, record, system=system)
        except Exception as exc:  # noqa: BLE001 - one study's failure must not stop the others
            what = retry.describe(exc) if not isinstance(exc, FhirError) else str(exc)
            log.error("FHIR %s study %s: not sent (%s)", sync.specialty, record.get("study"), what)
            failed.append({"study": record.get("study"), "error": what})
            continue
        sync.mark_sent(record, result)
        sent.append(record["study"])
        log.info("FHIR %s study %s: ImagingStudy %s, %d Observation(s), DiagnosticReport %s", sync.specialty,
                 record["study"], result["imaging_study"] or "?", result["observations"], result["report"] or "-")
    return {"sent": sent, "failed": failed}
