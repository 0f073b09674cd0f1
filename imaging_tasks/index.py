"""Group what arrived in a landing prefix into studies, reading headers only.

The index is the one place that sees raw identifiers: it keys each study by a keyed pseudonym and
writes the list of raw inputs to a study manifest in the lake's PHI zone (``work/``).  Downstream
tasks get only the pseudonyms and the manifest URI.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from imaging_tasks import retry, storage
from imaging_tasks.contracts import StudyRecord, study_record
from imaging_tasks.deid.pseudonym import pseudo_id
from imaging_tasks.deid.slide import read_description, slide_pseudonyms
from imaging_tasks.dicom_io import read_header
from imaging_tasks.errors import BadInput
from imaging_tasks.formats import SLIDE_SUFFIXES  # defined below index and deid; still index.SLIDE_SUFFIXES
from imaging_tasks.specialties import get as get_specialty


@dataclass
class StudyEntry:
    specialty: str
    study: str  # pseudonymous study id
    patient: str  # pseudonymous patient id
    files: list[dict] = field(default_factory=list)  # [{uri, size, modified}] raw inputs (PHI zone only)
    modalities: dict[str, int] = field(default_factory=dict)  # modality -> instance count
    newest: str | None = None

    @property
    def fingerprint(self) -> str:
        """Changes when an input is added, removed or rewritten; decides whether a done study is redone."""
        lines = sorted(f"{f['uri']}:{f['size']}" for f in self.files)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def summary(self, manifest_uri: str) -> StudyRecord:
        """What downstream tasks (and XCom) may see: pseudonyms and counts, no raw paths or identifiers."""
        return study_record(specialty=self.specialty, study=self.study, patient=self.patient,
                            fingerprint=self.fingerprint, manifest=manifest_uri, n_files=len(self.files),
                            modalities=dict(self.modalities))


@dataclass
class IndexResult:
    studies: list[StudyEntry]
    quarantined: list[dict]
    waiting: list[str]  # pseudonymous ids of sessions not ready yet


Quarantine = Callable[[storage.ObjectInfo, BadInput], dict]


def index_objects(objects: list[storage.ObjectInfo], *, specialty: str, key: bytes, quarantine: Quarantine,
                  now: dt.datetime | None = None, options: dict | None = None) -> IndexResult:
    """Group objects into studies as the specialty's record says (DICOM by StudyInstanceUID, or one slide per
    study), refuse modalities it does not accept, hold studies it does not call ready yet (``options``: its
    index-stage options, e.g. how long to wait for a PET); bad files go to ``quarantine`` and the rest carry on."""
    record = get_specialty(specialty)
    if record.file_kind == "slide":
        return _index_slides(objects, specialty=specialty, key=key, quarantine=quarantine)
    studies: dict[str, StudyEntry] = {}
    quarantined = []
    accepted = record.modalities
    for obj in objects:
        try:
            if obj.size == 0:
                raise BadInput("empty_file", "the file is empty (0 bytes); re-export it from the source system")
            ds = retry.call(_read_header, obj.uri, operation="read header", target=storage.where(obj.uri))
            modality = str(ds.Modality)
            if modality not in accepted:
                raise BadInput("wrong_modality", f"modality {modality} does not belong to the {specialty} pipeline "
                               f"(accepts {', '.join(sorted(accepted))}); move it to the right landing prefix")
        except BadInput as exc:
            quarantined.append(quarantine(obj, exc))
            continue
        study = pseudo_id(key, str(ds.StudyInstanceUID), "study")
        entry = studies.setdefault(study, StudyEntry(specialty=specialty, study=study,
                                                     patient=pseudo_id(key, str(ds.get("PatientID", "")), "patient")))
        entry.files.append(_file_row(obj))
        entry.modalities[modality] = entry.modalities.get(modality, 0) + 1
        if obj.modified:
            entry.newest = max(entry.newest or "", obj.modified.isoformat())
    ready, waiting = [], []
    for entry in studies.values():
        if not record.is_ready(entry.modalities, entry.newest, now, options):
            waiting.append(entry.study)
            continue
        ready.append(entry)
    return IndexResult(studies=sorted(ready, key=lambda e: e.study), quarantined=quarantined, waiting=waiting)


def _read_header(uri: str):
    """Headers only, from the open object; a transient storage fault is retried by the caller, not quarantined."""
    with storage.as_path(uri).open("rb") as fh:
        return read_header(fh)


def _index_slides(objects: list[storage.ObjectInfo], *, specialty: str, key: bytes,
                  quarantine: Quarantine) -> IndexResult:
    """Each slide file is a study named by its content; the patient by barcode/Filename (``slide_pseudonyms``)."""
    studies, quarantined = [], []
    for obj in objects:
        try:
            if obj.size == 0:
                raise BadInput("empty_file", "the slide file is empty (0 bytes); re-scan or re-export it")
            if not obj.relpath.lower().endswith(SLIDE_SUFFIXES):
                raise BadInput("not_a_slide", f"file type is not a supported whole-slide format "
                               f"({', '.join(SLIDE_SUFFIXES)}); only slides belong in this prefix")
            description = read_description(obj.uri)
        except BadInput as exc:
            quarantined.append(quarantine(obj, exc))
            continue
        digest = storage.sha256_of(obj.uri)
        study, patient = slide_pseudonyms(key, digest, description)
        entry = StudyEntry(specialty=specialty, study=study, patient=patient,
                           files=[{**_file_row(obj), "sha256": digest}],
                           modalities={"SM": 1}, newest=obj.modified.isoformat() if obj.modified else None)
        studies.append(entry)
    return IndexResult(studies=sorted(studies, key=lambda e: e.study), quarantined=quarantined, waiting=[])


def _file_row(obj: storage.ObjectInfo) -> dict[str, Any]:
    return {"uri": obj.uri, "size": obj.size, "modified": obj.modified.isoformat() if obj.modified else None}


def entry_to_manifest(entry: StudyEntry) -> dict:
    return asdict(entry) | {"fingerprint": entry.fingerprint}
