"""Read-only view of one specialty's lake for the QC pages, through ``imaging_tasks.storage`` (local, S3, GCS).

What leaves this module is safe to show: pseudonyms, metrics, findings, lineage rows with lake-relative paths and
quarantine reasons.  It never returns raw landing paths (``reason.json``'s ``source_uri``, the ``landing:`` inputs
of lineage rows), nor bytes of the anonymized or quarantine zones: the only bytes it reads out are outputs that a
study's ``_MANIFEST.json`` lists, checked against the checksum the manifest records.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from imaging_tasks import storage
from imaging_tasks.lake import Lake
from imaging_tasks.pipeline import DEID_MANIFEST

PATIENT = re.compile(r"^P[A-Za-z0-9]{4,64}$")
STUDY = re.compile(r"^S[A-Za-z0-9]{4,64}$")
# a manifest output name: relative, no '..', no empty or hidden segments, plain characters only
OUTPUT_NAME = re.compile(r"^(?!.*(?:^|/)\.)[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*$")
QUARANTINE_FIELDS = ("reason", "stage", "message", "quarantined_at")
LOCAL = ("", "file", "local")
MAX_QUARANTINE = 200
MAX_LINEAGE = 200


def is_pseudonym(patient: str, study: str) -> bool:
    return bool(PATIENT.match(patient or "")) and bool(STUDY.match(study or ""))


def _norm(uri: str) -> tuple[str, str]:
    """(kind, path) for comparing URIs as text: local paths without ``file://``; remote ones without the
    connection named in them (``s3://conn@bucket/x`` -> ``bucket/x``).  Never opens anything."""
    text = str(uri)
    if "://" not in text:
        return "local", text.rstrip("/")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in LOCAL:
        return "local", parts.path.rstrip("/")
    host = parts.netloc.rpartition("@")[2]
    return {"s3a": "s3", "gcs": "gs"}.get(scheme, scheme), (host + parts.path).rstrip("/")


@dataclass(frozen=True)
class StudyFiles:
    manifest: dict
    pictures: list[dict]  # manifest outputs that are PNG/JPEG, QC pictures first
    others: list[dict]


class LakeView:
    """The lake of one specialty, as the QC pages read it."""

    def __init__(self, specialty: str, lake_uri: str):
        self.specialty = specialty
        self.lake_uri = lake_uri
        self.lake = Lake(storage.as_path(lake_uri), specialty)
        self._root = _norm(lake_uri)

    # ------------------------------------------------------------------ paths
    def relative(self, uri: str) -> str | None:
        """``uri`` relative to the lake root (``derived/...``), or None when it lies outside the lake."""
        kind, path = _norm(uri)
        root_kind, root = self._root
        if kind != root_kind or not path.startswith(root + "/"):
            return None
        return path[len(root) + 1:]

    def derived(self, patient: str, study: str):
        if not is_pseudonym(patient, study):
            raise ValueError("not a patient/study pseudonym")
        return self.lake.derived(patient, study)

    # ------------------------------------------------------------------ studies
    def manifest(self, patient: str, study: str) -> dict | None:
        """The published ``_MANIFEST.json`` (None while the study is not published)."""
        try:
            manifest = storage.read_manifest(self.derived(patient, study))
        except (FileNotFoundError, ValueError):
            return None
        if not manifest or manifest.get("study") != study or manifest.get("patient") != patient:
            return None
        return manifest

    def study_files(self, manifest: dict) -> StudyFiles:
        outputs = [o for o in manifest.get("outputs") or [] if isinstance(o, dict) and _valid_name(o.get("path"))]
        pictures = [o for o in outputs if o["path"].lower().endswith((".png", ".jpg", ".jpeg"))]
        pictures.sort(key=lambda o: (not o["path"].rsplit("/", 1)[-1].lower().startswith("qc"), o["path"]))
        return StudyFiles(manifest=manifest, pictures=pictures, others=[o for o in outputs if o not in pictures])

    def output(self, patient: str, study: str, name: str, manifest: dict | None = None) -> tuple[dict, bytes] | None:
        """(manifest entry, bytes) of an output the study's manifest lists, when its checksum still matches."""
        if not _valid_name(name):
            return None
        manifest = manifest or self.manifest(patient, study)
        if manifest is None:
            return None
        files = self.study_files(manifest)
        entry = next((o for o in files.pictures + files.others if o["path"] == name), None)
        if entry is None:
            return None
        try:
            data = storage.read_bytes(storage.join(self.derived(patient, study), *name.split("/")))
        except FileNotFoundError:
            return None
        if entry.get("sha256") and storage.sha256_bytes(data) != entry["sha256"]:
            return None  # being re-published: the manifest is rewritten last
        return entry, data

    def results(self, patient: str, study: str, manifest: dict) -> dict:
        """``results.json`` (metrics and findings) when the manifest lists it, else the manifest's metrics."""
        found = self.output(patient, study, "results.json", manifest)
        if found is not None:
            import json

            try:
                data = json.loads(found[1])
                return {"metrics": list(data.get("metrics") or []), "findings": list(data.get("findings") or [])}
            except ValueError:
                pass
        return {"metrics": list(manifest.get("metrics") or []), "findings": []}

    def deid_summary(self, patient: str, study: str) -> dict | None:
        """Counts from the de-identification record: instances, modalities, demo key. No header values."""
        try:
            record = storage.read_json(storage.join(self.lake.anonymized(patient, study), DEID_MANIFEST))
        except (FileNotFoundError, ValueError):
            return None
        instances = record.get("instances") or []
        return {"instances": len(instances), "bytes": sum(int(i.get("bytes") or 0) for i in instances),
                "modalities": sorted({str(i.get("modality")) for i in instances if i.get("modality")}),
                "series": len({i.get("series_uid") for i in instances}), "demo_key": bool(record.get("demo_key"))}

    def find_patient(self, study: str) -> str | None:
        """The patient pseudonym of a published study, from the derived folder's layout (one listing)."""
        if not STUDY.match(study or ""):
            return None
        for info in storage.list_objects(storage.join(self.lake.root, "derived", self.specialty)):
            parts = info.relpath.split("/")
            if len(parts) >= 3 and parts[1] == study and PATIENT.match(parts[0]):
                return parts[0]
        return None

    # ------------------------------------------------------------------ lineage
    def run_lineage(self, run_id: str) -> list[dict]:
        """The lineage rows the run's tasks wrote (``runs/<specialty>/<run id>/``), oldest first."""
        rows = [self._row(o.uri) for o in storage.list_objects(self.lake.runs(run_id)) if o.relpath.endswith(".json")]
        return sorted((r for r in rows if r), key=lambda r: (r.get("started_at") or "", r.get("task_id") or ""))

    def study_lineage(self, study: str, run_id: str | None = None) -> list[dict]:
        """The lineage rows of one study: in one run, or (one listing) in every run; newest first."""
        if not STUDY.match(study or ""):
            return []
        root = self.lake.runs(run_id) if run_id else storage.join(self.lake.root, "runs", self.specialty)
        found = [o for o in storage.list_objects(root) if o.relpath.endswith(f".{study}.json")]
        rows = [r for r in (self._row(o.uri) for o in found) if r and r.get("study_id") == study]
        rows.sort(key=lambda r: r.get("started_at") or "", reverse=True)
        return rows[:MAX_LINEAGE]

    def _row(self, uri) -> dict | None:
        try:
            row = storage.read_json(uri)
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(row, dict):
            return None
        return {**row, "inputs": [self.location(i) for i in row.get("inputs") or []],
                "outputs": [self.location(o) for o in row.get("outputs") or []]}

    def location(self, item: dict) -> dict:
        """A lineage input/output as it may be shown: the lake-relative path and its zone, never a raw path."""
        uri = str((item or {}).get("uri") or "")
        rel = self.relative(uri)
        if rel is not None:
            return {"zone": rel.split("/", 1)[0], "path": rel}
        if uri.startswith("landing:"):
            return {"zone": "landing", "path": None}  # a raw input: only its existence is shown
        return {"zone": "outside", "path": None}

    # ------------------------------------------------------------------ quarantine
    def quarantine(self) -> list[dict]:
        """The specialty's quarantine reasons (reason, stage, message, checksum prefix, time), newest first.

        Only ``reason.json`` files are read, and only those fields are kept: ``source_uri`` (a raw landing path,
        which may carry a patient name) and the quarantined input itself never leave this function.
        """
        rows = []
        for info in storage.list_objects(storage.join(self.lake.root, "quarantine", self.specialty)):
            parts = info.relpath.split("/")
            if len(parts) != 2 or parts[1] != "reason.json":
                continue
            try:
                record = storage.read_json(info.uri)
            except (FileNotFoundError, ValueError):
                continue
            row = {k: record.get(k) for k in QUARANTINE_FIELDS}
            row["sha_prefix"] = str(record.get("input_sha256") or parts[0])[:12]
            rows.append(row)
        rows.sort(key=lambda r: str(r.get("quarantined_at") or ""), reverse=True)
        return rows[:MAX_QUARANTINE]


def _valid_name(name) -> bool:
    return isinstance(name, str) and len(name) < 512 and bool(OUTPUT_NAME.match(name)) and ".." not in name
