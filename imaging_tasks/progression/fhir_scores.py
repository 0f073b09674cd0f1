"""Cognitive scores from a FHIR R4 server's ``Observation``s, de-identified exactly as a score upload is.

The other way scores arrive (beside CSV/Parquet uploads in ``<landing>/cognitive_scores/``): where the site has a
FHIR server (the one the ``fhir_update`` tasks write to, :class:`imaging_tasks.fhir.FhirClient`), its
cognitive-score Observations are searched::

    GET [base]/Observation?code=<system|code,...>&_include=Observation:subject&_count=N[&_lastUpdated=gt<instant>]

and every page is followed (``link[relation=next]``, absolute or server-relative).  What an Observation gives:

* **score**: its ``code`` looked up in a table of ``system|code`` -> score name (:data:`DEFAULT_CODES`: LOINC
  72107-6 "Mini-Mental State Examination [MMSE]"; a site adds its own, e.g. local codes of CDR sum of boxes and
  ADAS-Cog, for which LOINC has no single total-score code we could confirm); failing that, its ``code.text`` or a
  coding's ``display`` when :func:`~imaging_tasks.progression.features.canonical_score` makes it one of
  ``MMSE``, ``CDR_SB``, ``ADAS_Cog``.  Anything else is skipped and counted (``unknown_code``).
* **patient**: the raw ID the imaging studies carry is the DICOM PatientID (the MRN): the subject Patient's
  ``identifier`` of the configured system; with no system configured, the Patient's only identifier; failing
  that, the subject reference's own ``identifier.value``.  The Patient comes from the ``_include``; a server that
  does not include it is asked ``GET Patient/<id>`` (once per patient).  Unresolvable: skipped and counted.
* **date**: ``effectiveDateTime``, else ``effectivePeriod.start``, else ``issued`` (the date part as written).
* **value**: ``valueQuantity.value``, else ``valueInteger``.
* only ``final``, ``amended`` and ``corrected`` Observations are scores; an ``entered-in-error`` or
  ``cancelled`` one withdraws the row an earlier version of it gave.

Each score then goes through :func:`~imaging_tasks.progression.features.pseudonymise_scores` with the
de-identification key, one at a time: the same keyed pseudonym and per-patient date shift the studies got, and
one bad value refuses that Observation only.  Raw IDs, names and real dates stay inside :func:`read_scores`;
what leaves it (:class:`FhirScore`) is pseudonymised, and an Observation is named in logs by the sha256 of its
server URL only.

Which Observation versions were loaded, and the newest ``meta.lastUpdated`` seen (the watermark), are kept in the
lake (:class:`ScoreState`); :func:`imaging_tasks.progression.store.ingest_fhir` does the upserts.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from imaging_tasks.errors import BadInput, ConfigError

log = logging.getLogger(__name__)

LOINC = "http://loinc.org"
DEFAULT_CODES: dict[str, str] = {f"{LOINC}|72107-6": "MMSE"}  # Mini-Mental State Examination [MMSE]
SCORE_STATUS = frozenset({"final", "amended", "corrected"})
WITHDRAWN_STATUS = frozenset({"entered-in-error", "cancelled"})
DEFAULT_PAGE_SIZE = 100
DEFAULT_OVERLAP_S = 300.0  # servers commit out of order a little: re-ask this far back; dedupe makes it exact
_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ settings
def parse_codes(value: Any) -> dict[str, str]:
    """The code table a site configures: a mapping (or its JSON text) of ``system|code`` (or a bare ``code``,
    any system) to a score name, e.g. ``{"http://loinc.org|72107-6": "MMSE", "urn:site|CDRSB": "CDR_SB"}``.
    Empty or None: :data:`DEFAULT_CODES`.  Names are made canonical (``CDR-SB`` -> ``CDR_SB``)."""
    from imaging_tasks.progression.features import canonical_score

    if value is None or (isinstance(value, str) and not value.strip()):
        return dict(DEFAULT_CODES)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError("the FHIR score code table is not JSON: give an object of \"system|code\": score "
                              "name, e.g. {\"http://loinc.org|72107-6\": \"MMSE\"}") from None
    if not isinstance(value, Mapping) or not value:
        raise ConfigError("the FHIR score code table must be a non-empty object of \"system|code\": score name, "
                          "e.g. {\"http://loinc.org|72107-6\": \"MMSE\"}")
    out = {}
    for code, name in value.items():
        if not str(code).strip().strip("|") or not str(name or "").strip():
            raise ConfigError(f"the FHIR score code table has an empty code or name ({code!r}: {name!r}): give "
                              "\"system|code\": score name")
        out[str(code).strip()] = canonical_score(name)
    return out


def search_params(codes: Mapping[str, str], *, since: dt.datetime | None = None,
                  page_size: int = DEFAULT_PAGE_SIZE) -> dict:
    """The Observation search: the table's codes, the subject Patients included, new since ``since``."""
    params = {"code": ",".join(sorted(codes)), "_include": "Observation:subject", "_count": str(int(page_size))}
    if since is not None:
        params["_lastUpdated"] = "gt" + instant(since)
    return params


def instant(when: dt.datetime) -> str:
    """A FHIR instant in UTC, to the second (rounded down: the window only widens)."""
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instant(text: Any) -> dt.datetime | None:
    """``meta.lastUpdated`` as an aware datetime; None when absent or not an instant (no time zone: UTC)."""
    try:
        out = dt.datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return out if out.tzinfo else out.replace(tzinfo=dt.timezone.utc)


# ------------------------------------------------------------------------------------------------ one Observation
@dataclass(frozen=True)
class FhirScore:
    """What an Observation gives once de-identified: its ``row`` (``patient_id`` pseudonym, shifted ``date``,
    ``score``, ``value``) or why it has none (``skipped``: ``status``, ``withdrawn``, ``unknown_code``,
    ``no_patient``, ``no_date``, ``no_value``, ``bad_value``).  ``observation``: sha256 of
    ``fhir:<base>/Observation/<id>``; ``source``: of that plus ``/_history/<versionId>``, the row's
    ``source_sha256``; ``updated``: its ``meta.lastUpdated``."""

    observation: str
    source: str
    updated: dt.datetime | None
    row: dict | None = None
    skipped: str | None = None


def score_name(code: Mapping | None, codes: Mapping[str, str]) -> str | None:
    """The score an Observation ``code`` is: by ``system|code`` (or bare code) in ``codes``, else by its text or a
    coding's display when that is one of the known scores (:data:`~imaging_tasks.progression.features.SCORE_RANGES`)."""
    from imaging_tasks.progression.features import SCORE_RANGES, canonical_score

    code = code or {}
    codings = [c for c in code.get("coding") or [] if isinstance(c, Mapping)]
    for c in codings:
        for k in (f"{c.get('system') or ''}|{c.get('code') or ''}", str(c.get("code") or "")):
            if k in codes:
                return codes[k]
    for text in [code.get("text"), *(c.get("display") for c in codings)]:
        if text and canonical_score(text) in SCORE_RANGES:
            return canonical_score(text)
    return None


def patient_reference(subject: Mapping | None) -> str | None:
    """``Patient/<id>`` of a subject reference (relative, absolute or versioned); None when it names no Patient."""
    match = _PATIENT_REF.search(str((subject or {}).get("reference") or "").strip())
    return f"Patient/{match.group(1)}" if match else None


def raw_patient_id(patient: Mapping | None, subject: Mapping | None, system: str | None) -> str | None:
    """The DICOM PatientID (MRN) of an Observation's patient (see the module docstring); None when unresolved."""
    def value(ident) -> str:
        return str(ident.get("value") or "").strip() if isinstance(ident, Mapping) else ""

    idents = [i for i in (patient or {}).get("identifier") or [] if value(i)]
    own = (subject or {}).get("identifier")
    if system:
        found = [value(i) for i in idents if i.get("system") == system]
        if found:
            return found[0]
        return value(own) if isinstance(own, Mapping) and own.get("system") == system and value(own) else None
    if len(idents) == 1:
        return value(idents[0])
    return value(own) or None


def observation_date(obs: Mapping) -> str | None:
    """``effectiveDateTime``, ``effectivePeriod.start`` or ``issued``: the date part as written (the local date of
    the assessment), ``YYYY-MM-DD``; None when none is a full date."""
    from imaging_tasks.progression.features import parse_date

    for text in (obs.get("effectiveDateTime"), (obs.get("effectivePeriod") or {}).get("start"), obs.get("issued")):
        when = parse_date(str(text)[:10]) if text else None
        if when is not None:
            return when.isoformat()
    return None


def observation_value(obs: Mapping) -> Any:
    quantity = obs.get("valueQuantity")
    if isinstance(quantity, Mapping) and quantity.get("value") is not None:
        return quantity["value"]
    return obs.get("valueInteger")


def fhir_score(obs: Mapping, *, base_url: str, key: bytes, codes: Mapping[str, str], patient_system: str | None,
               patient: Mapping | None) -> FhirScore:
    """One Observation (and its subject Patient, when known) as a :class:`FhirScore`, pseudonymised."""
    from imaging_tasks.progression.features import pseudonymise_scores

    meta = obs.get("meta") or {}
    updated = parse_instant(meta.get("lastUpdated")) if meta.get("lastUpdated") else None
    url = f"fhir:{base_url}/Observation/{obs.get('id')}"
    version = meta.get("versionId") or meta.get("lastUpdated") or ""
    ident = dict(observation=sha256_text(url), source=sha256_text(f"{url}/_history/{version}"), updated=updated)
    status = str(obs.get("status") or "")
    if status in WITHDRAWN_STATUS:
        return FhirScore(**ident, skipped="withdrawn")
    if status not in SCORE_STATUS:
        return FhirScore(**ident, skipped="status")
    score = score_name(obs.get("code"), codes)
    if score is None:
        return FhirScore(**ident, skipped="unknown_code")
    raw = raw_patient_id(patient, obs.get("subject"), patient_system)
    if not raw:
        return FhirScore(**ident, skipped="no_patient")
    date = observation_date(obs)
    if date is None:
        return FhirScore(**ident, skipped="no_date")
    value = observation_value(obs)
    if value is None:
        return FhirScore(**ident, skipped="no_value")
    try:
        (row,) = pseudonymise_scores([{"patient_id": raw, "date": date, "score": score, "value": value}], key)
    except BadInput:  # out of its range, not a number: this Observation only
        return FhirScore(**ident, skipped="bad_value")
    return FhirScore(**ident, row=row)


# ------------------------------------------------------------------------------------------------ the search
def read_scores(client, key: bytes, *, codes: Mapping[str, str] | None = None, patient_system: str | None = None,
                since: dt.datetime | None = None, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[FhirScore]:
    """Every Observation of the search (see the module docstring) as a :class:`FhirScore`, page by page.  The
    raw Patient resources are held here only, for the Observations of the run."""
    from imaging_tasks.fhir import FhirError

    codes = dict(codes or DEFAULT_CODES)
    patients: dict[str, Mapping | None] = {}
    for page in client.search("Observation", search_params(codes, since=since, page_size=page_size)):
        entries = [e.get("resource") or {} for e in page.get("entry") or [] if isinstance(e, Mapping)]
        for res in entries:
            if res.get("resourceType") == "Patient" and res.get("id"):
                patients[f"Patient/{res['id']}"] = res
        for res in entries:
            if res.get("resourceType") != "Observation":
                continue
            ref = patient_reference(res.get("subject"))
            if ref and ref not in patients:  # not included: read it (once)
                try:
                    patients[ref] = client.read(ref)
                except FhirError as exc:
                    if exc.status not in (404, 410):
                        raise
                    patients[ref] = None
            yield fhir_score(res, base_url=client.base_url, key=key, codes=codes, patient_system=patient_system,
                             patient=patients.get(ref) if ref else None)


# ------------------------------------------------------------------------------------------------ what was loaded
@dataclass
class ScoreState:
    """Per FHIR server and specialty, in the lake (``<lake>/progression/<specialty>/fhir_scores/<sha16>.json``,
    ``sha16`` of the base URL): ``watermark`` (the newest ``meta.lastUpdated`` seen) and, per Observation (by
    sha256), the version loaded (``source``), its ``updated`` and the row ``key`` (pseudonym, score, shifted
    date) it gave, so an amended version replaces that row even when its date moved."""

    uri: Any
    watermark: dt.datetime | None = None
    observations: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, lake_root: Any, specialty: str, base_url: str) -> "ScoreState":
        from imaging_tasks import storage

        uri = storage.join(lake_root, "progression", specialty, "fhir_scores", f"{sha256_text(base_url)[:16]}.json")
        try:
            data = storage.read_json(uri)
        except FileNotFoundError:
            return cls(uri)
        return cls(uri, parse_instant(data["watermark"]) if data.get("watermark") else None,
                   dict(data.get("observations") or {}))

    def since(self, overlap_s: float) -> dt.datetime | None:
        return None if self.watermark is None else self.watermark - dt.timedelta(seconds=overlap_s)

    def save(self) -> None:
        from imaging_tasks import storage

        storage.write_json(self.uri, {"watermark": self.watermark.isoformat() if self.watermark else None,
                                      "observations": self.observations,
                                      "saved_at": dt.datetime.now(dt.timezone.utc).isoformat()})


__all__ = ["DEFAULT_CODES", "DEFAULT_OVERLAP_S", "DEFAULT_PAGE_SIZE", "FhirScore", "LOINC", "SCORE_STATUS",
           "ScoreState", "WITHDRAWN_STATUS", "fhir_score", "instant", "observation_date", "parse_codes",
           "parse_instant", "patient_reference", "raw_patient_id", "read_scores", "score_name", "search_params"]
