"""Group what arrived in a landing prefix into studies, reading headers only.

The index is the one place that sees raw identifiers: it keys each study by a keyed pseudonym and
writes the list of raw inputs to a study manifest in the lake's PHI zone (``work/``).  Downstream
tasks get only the pseudonyms and the manifest URI.

NIfTI uploads (a specialty whose record has ``nifti_uploads``, e.g. neuroimaging ``{"mri": "MR", "pet": "PT"}``)
are laid out as ``<patient>/<session>/<stem>.nii[.gz]`` under the specialty's landing folder, with optional
``<stem>.json`` sidecars beside them.  One patient/session folder is one study: study =
``pseudo_id(key, "<patient>/<session>", "study")``, patient = ``pseudo_id(key, "<patient>", "patient")`` (so a
patient folder named by its PatientID gets the same pseudonym as that patient's DICOM studies).  The raw folder
names stay in the work manifest (``upload`` of each file row), where the PHI audit reads them back as values that
must not survive.  The path counts from the specialty's landing folder whatever the run's ``prefix`` (the prefix
is put back in front of the listed path), so a run limited to one patient folder names the study alike.  A
study is either DICOM or NIfTI: DICOM files in the same folder make their own study, keyed by
StudyInstanceUID as always.  Refused, each with a reason that spells the layout: a NIfTI or sidecar at another
depth (``nifti_layout``), under a file name the specialty does not know (``nifti_unknown_name``), two NIfTI of
one name in a session (``duplicate_nifti``: ``mri.nii`` and ``mri.nii.gz``), a file whose header is not a
single-file NIfTI-1/2 (``unreadable_nifti``), and any NIfTI in a specialty without NIfTI uploads (``not_dicom``,
as before, now saying where NIfTI is taken).

Further sidecars the record names in ``upload_sidecars`` (neuroimaging: ``events.tsv`` / ``bold_events.tsv`` for
the BOLD, ``dwi.bval`` and ``dwi.bvec``) sit beside the NIfTI like the JSON ones.  An events table may also sit in
the folder of one DICOM study's files (a DICOM BOLD series): it then joins that study (its row carries the raw
folder names for the PHI audit, ``beside: dicom``); in a folder with no study, or with several, it is refused
(``events_without_bold``, ``events_ambiguous``).
"""
from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable

from imaging_tasks import retry, storage
from imaging_tasks.contracts import StudyRecord, study_record
from imaging_tasks.deid.pseudonym import pseudo_id
from imaging_tasks.deid.slide import slide_pseudonyms
from imaging_tasks.dicom_io import read_header
from imaging_tasks.errors import BadInput
from imaging_tasks.formats import SLIDE_SUFFIXES  # defined below index and deid; still index.SLIDE_SUFFIXES
from imaging_tasks.formats import file_kind
from imaging_tasks.specialties import get as get_specialty
from imaging_tasks.specialties import names as specialty_names
from imaging_tasks.specialty import SIDECAR_KINDS

SIDECAR_SUFFIX = ".json"


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
                  now: dt.datetime | None = None, options: dict | None = None, prefix: str = "") -> IndexResult:
    """Group objects into studies as the specialty's record says (DICOM by StudyInstanceUID, NIfTI uploads by
    patient/session folder, or one slide per study), refuse modalities it does not accept, hold studies it does
    not call ready yet (``options``: its index-stage options, e.g. how long to wait for a PET); bad files go to
    ``quarantine`` and the rest carry on.  ``prefix``: the run's sub-folder of the landing folder the objects were
    listed under (their ``relpath`` is relative to it); NIfTI layouts count from the landing folder."""
    record = get_specialty(specialty)
    if record.file_kind == "slide":
        return _index_slides(objects, specialty=specialty, key=key, quarantine=quarantine)
    studies: dict[str, StudyEntry] = {}
    quarantined = []
    accepted = record.modalities
    events: list[storage.ObjectInfo] = []  # placed once every folder's studies are known
    upload_folders: set[PurePosixPath] = set()
    dicom_folders: dict[PurePosixPath, set[str]] = {}
    for obj in objects:
        try:
            if obj.size == 0:
                raise BadInput("empty_file", "the file is empty (0 bytes); re-export it from the source system")
            named = _upload_name(obj.relpath, record)
            if named is not None and named[1] == "events":
                events.append(obj)
                continue
            upload = _upload_of(obj, prefix, record)  # None: not a NIfTI upload, read as DICOM
            if upload is not None:
                _add_upload(studies, obj, upload, specialty=specialty, key=key)
                upload_folders.add(_folder(prefix, obj.relpath))
                continue
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
        dicom_folders.setdefault(_folder(prefix, obj.relpath), set()).add(study)
    for obj in events:
        try:
            _place_events(obj, prefix, record, studies, upload_folders, dicom_folders, specialty=specialty, key=key)
        except BadInput as exc:
            quarantined.append(quarantine(obj, exc))
    ready, waiting = [], []
    for entry in studies.values():
        if not record.is_ready(entry.modalities, entry.newest, now, options):
            waiting.append(entry.study)
            continue
        ready.append(entry)
    return IndexResult(studies=sorted(ready, key=lambda e: e.study), quarantined=quarantined, waiting=waiting)


def _upload_name(relpath: str, record) -> tuple[str, str] | None:
    """``(stem, kind)`` of a NIfTI (``nifti``), a ``<stem>.json`` (``sidecar``) or a sidecar the record names in
    ``upload_sidecars`` (``events``, ``bval``, ``bvec``), else None (read as DICOM).  A ``.tsv``/``.bval``/``.bvec``
    under another name, where the record takes uploads, is refused with the names it knows."""
    name = PurePosixPath(relpath).name
    if file_kind(name) == "nifti":
        return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[:-len(".nii")], "nifti"
    if name.lower().endswith(SIDECAR_SUFFIX):
        return name[: -len(SIDECAR_SUFFIX)], "sidecar"
    suffix = PurePosixPath(name.lower()).suffix
    if suffix in SIDECAR_KINDS and record.nifti_uploads:
        stem = (record.upload_sidecars or {}).get(name.lower())
        if stem is None:
            known = ", ".join(sorted(record.upload_sidecars or {})) or "none"
            raise BadInput("nifti_unknown_name", f"a {suffix} file whose name the {record.name} pipeline does not know "
                           f"(it takes {known} beside the NIfTI uploads); rename it")
        return stem, SIDECAR_KINDS[suffix]
    return None


def _folder(prefix: str, relpath: str) -> PurePosixPath:
    """The folder of a listed file, counted from the landing folder (whatever the run's prefix)."""
    return PurePosixPath(*(p for p in (prefix.strip("/"), relpath) if p)).parent


def _place_events(obj: storage.ObjectInfo, prefix: str, record, studies: dict, upload_folders: set,
                  dicom_folders: dict, *, specialty: str, key: bytes) -> None:
    """An events table joins the NIfTI session of its folder, else the one DICOM study whose files share its
    folder (a DICOM BOLD series with its events beside it); anywhere else it is refused with a reason."""
    folder = _folder(prefix, obj.relpath)
    if folder in upload_folders:
        _add_upload(studies, obj, _upload_of(obj, prefix, record), specialty=specialty, key=key)
        return
    owners = dicom_folders.get(folder, set())
    if len(owners) != 1:
        reason = "events_without_bold" if not owners else "events_ambiguous"
        raise BadInput(reason, f"an events table in a folder holding {len(owners)} studies; it belongs beside the "
                       "BOLD it describes: <patient>/<session>/bold.nii.gz for NIfTI uploads, or in the folder of "
                       "one study's DICOM files")
    stem, kind = _upload_name(obj.relpath, record)
    names = folder.parts
    upload = {"patient": names[0] if names else "", "session": "/".join(names[1:]), "stem": stem, "kind": kind,
              "modality": record.nifti_uploads[stem], "beside": "dicom"}
    entry = studies[next(iter(owners))]
    if any((f.get("upload") or {}).get("kind") == kind for f in entry.files):
        raise BadInput("duplicate_nifti", "a second events table for one DICOM study; keep one and re-upload")
    entry.files.append({**_file_row(obj), "upload": upload})


def _layout(record) -> str:
    stems = sorted(record.nifti_uploads)
    extra = "".join(f", {name}" for name in sorted(record.upload_sidecars or {}))
    return (f"<patient>/<session>/{{{','.join(stems)}}}.nii.gz (or .nii), each with an optional "
            f"{{{','.join(stems)}}}.json sidecar{extra}, directly under the {record.name} landing folder")


def _upload_of(obj: storage.ObjectInfo, prefix: str, record) -> dict | None:
    """The upload row of a NIfTI or sidecar file (raw patient/session names, stem, kind, modality); None for
    anything else (read as DICOM).  Raises BadInput for NIfTI where none is taken, a wrong depth or name, or a
    NIfTI header that does not parse."""
    named = _upload_name(obj.relpath, record)
    if named is None:
        return None
    stem, kind = named
    if not record.nifti_uploads:
        if kind == "sidecar":
            return None  # a .json in a DICOM-only landing: refused by the DICOM reader, as before
        takers = [n for n in specialty_names() if get_specialty(n).nifti_uploads]
        raise BadInput("not_dicom", f"a NIfTI file: the {record.name} pipeline takes DICOM only; NIfTI uploads "
                       f"belong to {', '.join(takers) or 'no installed specialty'}, laid out as "
                       "<patient>/<session>/<name>.nii.gz under that specialty's landing folder")
    parts = PurePosixPath(*(p for p in (prefix.strip("/"), obj.relpath) if p)).parts
    what = {"nifti": "NIfTI", "sidecar": "JSON sidecar"}.get(kind, f"{kind} sidecar")
    if len(parts) != 3:
        raise BadInput("nifti_layout", f"a {what} file {len(parts) - 1} "
                       f"folder(s) below the landing folder; NIfTI uploads are laid out as {_layout(record)}; "
                       "move it there")
    if stem.lower() not in record.nifti_uploads:
        raise BadInput("nifti_unknown_name", f"a {what} file whose name "
                       f"is not one the {record.name} pipeline knows ({', '.join(sorted(record.nifti_uploads))}); "
                       f"NIfTI uploads are laid out as {_layout(record)}; rename it")
    stem = stem.lower()
    if kind == "nifti":
        retry.call(_check_nifti_header, obj.uri, operation="read header", target=storage.where(obj.uri))
    return {"patient": parts[0], "session": parts[1], "stem": stem, "kind": kind,
            "modality": record.nifti_uploads[stem]}


def _check_nifti_header(uri: str) -> None:
    """The first bytes must be a single-file NIfTI-1 or NIfTI-2 header (headers only, like DICOM)."""
    with storage.as_path(uri).open("rb") as raw:
        try:
            head = (gzip.open(raw) if str(uri).lower().endswith(".gz") else raw).read(540)
        except (gzip.BadGzipFile, EOFError, zlib.error):  # a storage fault (other OSError) is retried, not refused
            head = b""
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")} if len(head) >= 4 else set()
    ok = (348 in sizes and len(head) >= 348 and head[344:348] == b"n+1\0") or \
        (540 in sizes and len(head) >= 540 and head[4:8] == b"n+2\0")
    if not ok:
        raise BadInput("unreadable_nifti", "the file is not a readable single-file NIfTI-1/2 (no NIfTI header at "
                       "its start, or a broken gzip stream); re-export it as .nii or .nii.gz")


def _add_upload(studies: dict[str, "StudyEntry"], obj: storage.ObjectInfo, upload: dict, *, specialty: str,
                key: bytes) -> None:
    study = pseudo_id(key, f"{upload['patient']}/{upload['session']}", "study")
    entry = studies.setdefault(study, StudyEntry(specialty=specialty, study=study,
                                                 patient=pseudo_id(key, upload["patient"], "patient")))
    twin = [f for f in entry.files if (f.get("upload") or {}).get("stem") == upload["stem"]
            and f["upload"]["kind"] == upload["kind"]]
    if twin:
        raise BadInput("duplicate_nifti", f"a second {upload['stem']} {upload['kind']} file in one session folder "
                       f"(e.g. {upload['stem']}.nii and {upload['stem']}.nii.gz); keep one of them and re-upload")
    entry.files.append({**_file_row(obj), "upload": upload})
    if upload["kind"] == "nifti":
        entry.modalities[upload["modality"]] = entry.modalities.get(upload["modality"], 0) + 1
    if obj.modified:
        entry.newest = max(entry.newest or "", obj.modified.isoformat())


def _read_header(uri: str):
    """Headers only, from the open object; a transient storage fault is retried by the caller, not quarantined."""
    with storage.as_path(uri).open("rb") as fh:
        return read_header(fh)


def _index_slides(objects: list[storage.ObjectInfo], *, specialty: str, key: bytes,
                  quarantine: Quarantine) -> IndexResult:
    """One study per slide; a slide is one file or several (``slide_files``).

    * single-file slides (Aperio SVS, generic pyramidal TIFF, OME-TIFF, NDPI; told by their first bytes): the
      study is the file (its SHA-256), the patient its barcode/Filename (``slide_pseudonyms``), as before, or
      for NDPI its Reference tag (the label text; ``deid.ndpi.ndpi_pseudonyms``);
    * a MIRAX slide: ``X.mrxs`` plus every file under ``X/`` beside it; the study is the SHA-256 of the member
      list (relative name and SHA-256 of each file), the patient Slidedat.ini's SLIDE_NAME when it has one
      (``deid.mirax.mirax_pseudonyms``' rule);
    * a DICOM whole-slide series (VL Whole Slide Microscopy Image Storage; ``.dcm`` or any name with the DICOM
      signature): all instances of one SeriesInstanceUID, wherever they sit in the landing; study =
      ``pseudo_id(key, SeriesInstanceUID, "study")`` (one series is one slide; a DICOM study may hold several),
      patient = ``pseudo_id(key, PatientID, "patient")``, the rule of every DICOM study, so a patient's slides
      and radiology share one pseudonym.  Its label and overview instances stay in the study: the
      de-identifier refuses them (quarantined with their reason) and the slide goes on without them.

    Each file row carries ``sha256`` and ``slide``: ``{"format", "role"}`` (role ``main``; MIRAX ``data`` for
    the folder's files, with ``path`` relative to the ``.mrxs``'s folder; DICOM ``volume``/``label``/
    ``overview``/``other`` from ImageType).  Refused, each file on its own, with a reason: empty files
    (``empty_file``), unknown file types (``not_a_slide``), a slide suffix whose content is neither TIFF nor
    DICOM or does not parse (``unreadable_slide``), DICOM that is not whole-slide (``not_wsi``) or whose header
    does not read (the DICOM reader's reasons), a DICOM series without a VOLUME image (``no_volume_image``),
    files under a MIRAX folder with no ``.mrxs`` beside it (``mirax_orphan``), and a ``.mrxs`` without its folder
    or Slidedat.ini (``mirax_incomplete``: the ``.mrxs`` and every file of its folder).
    """
    from imaging_tasks.slide_files import is_dicom_head, mirax_folder, sniff

    studies, quarantined = [], []

    def refuse(obj: storage.ObjectInfo, exc: BadInput) -> None:
        quarantined.append(quarantine(obj, exc))

    empty = BadInput("empty_file", "the slide file is empty (0 bytes); re-scan or re-export it")
    kept = []
    for obj in objects:  # a MIRAX .mrxs may be empty: OpenSlide reads only the folder beside it
        if obj.size == 0 and not obj.relpath.lower().endswith(".mrxs"):
            refuse(obj, empty)
        else:
            kept.append(obj)
    objects = kept
    # MIRAX: X.mrxs owns every file under X/ beside it
    folders = {mirax_folder(o.relpath): o for o in objects if o.relpath.lower().endswith(".mrxs")}
    members: dict[PurePosixPath, list[storage.ObjectInfo]] = {f: [] for f in folders}
    rest = []
    for obj in objects:
        if obj.relpath.lower().endswith(".mrxs"):
            continue
        owner = next((p for p in PurePosixPath(obj.relpath).parents if p in folders), None)
        if owner is not None:
            members[owner].append(obj)
        else:
            rest.append(obj)
    for folder, mrxs in folders.items():
        try:
            studies.append(_mirax_study(mrxs, members[folder], folder, specialty=specialty, key=key))
        except BadInput as exc:
            for obj in (mrxs, *members[folder]):
                refuse(obj, exc)
    # DICOM-WSI series and single-file slides
    series: dict[str, list[tuple[storage.ObjectInfo, Any]]] = {}
    for obj in rest:
        try:
            name = PurePosixPath(obj.relpath).name
            if _is_mirax_member_name(name):
                raise BadInput("mirax_orphan", "a MIRAX data file with no X.mrxs beside its folder X/; upload the "
                               "whole slide: X.mrxs and the folder X/ with every file in it, side by side")
            if name.lower().endswith(".dcm"):
                fmt = "dicom"  # the DICOM reader gives its own reasons for what is not DICOM
            elif name.lower().endswith(SLIDE_SUFFIXES):
                fmt, description = retry.call(sniff, obj.uri, operation="read header",
                                              target=storage.where(obj.uri))
            else:  # DICOM comes under any name, often none
                head = retry.call(_head, obj.uri, operation="read header", target=storage.where(obj.uri))
                if not is_dicom_head(head):
                    raise BadInput("not_a_slide", f"file type is not a supported whole-slide format "
                                   f"({', '.join(SLIDE_SUFFIXES)}, or DICOM whole-slide); only slides belong in "
                                   "this prefix")
                fmt = "dicom"
            if fmt == "dicom":
                ds = retry.call(_read_header, obj.uri, operation="read header", target=storage.where(obj.uri))
                _check_wsi(ds)
                series.setdefault(str(ds.SeriesInstanceUID), []).append((obj, ds))
                continue
        except BadInput as exc:
            refuse(obj, exc)
            continue
        digest = storage.sha256_of(obj.uri)
        study, patient = slide_pseudonyms(key, digest, description)
        if fmt == "ndpi":  # the patient from the Reference tag (the label text): deid.ndpi's own rule
            try:
                study, patient = retry.call(_ndpi_pseudonyms, key, digest, obj.uri, operation="read header",
                                            target=storage.where(obj.uri))
            except BadInput as exc:
                refuse(obj, exc)
                continue
        studies.append(StudyEntry(specialty=specialty, study=study, patient=patient,
                                  files=[{**_file_row(obj), "sha256": digest,
                                          "slide": {"format": fmt, "role": "main"}}],
                                  modalities={"SM": 1}, newest=obj.modified.isoformat() if obj.modified else None))
    for series_uid, items in series.items():
        roles = [_wsi_role(ds) for _, ds in items]
        if "volume" not in roles:
            exc = BadInput("no_volume_image", "a DICOM whole-slide series without a VOLUME image (only label, "
                           "overview or thumbnail instances): there is no slide to read; send the whole series")
            for obj, _ in items:
                refuse(obj, exc)
            continue
        first = items[0][1]
        entry = StudyEntry(specialty=specialty, study=pseudo_id(key, series_uid, "study"),
                           patient=pseudo_id(key, str(first.get("PatientID", "")), "patient"))
        for (obj, ds), role in sorted(zip(items, roles), key=lambda x: x[0][0].relpath):
            entry.files.append({**_file_row(obj), "slide": {"format": "dicom", "role": role}})
            entry.modalities["SM"] = entry.modalities.get("SM", 0) + 1
            if obj.modified:
                entry.newest = max(entry.newest or "", obj.modified.isoformat())
        studies.append(entry)
    return IndexResult(studies=sorted(studies, key=lambda e: e.study), quarantined=quarantined, waiting=[])


# MIRAX folder files by name: what a 3DHISTECH scanner writes beside X.mrxs
_MIRAX_MEMBER = re.compile(r"^(slidedat\.ini|index\.dat|data\d{4}\.dat)$", re.IGNORECASE)
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _is_mirax_member_name(name: str) -> bool:
    return bool(_MIRAX_MEMBER.match(name))


def _head(uri: str) -> bytes:
    with storage.as_path(uri).open("rb") as fh:
        return fh.read(132)


def _check_wsi(ds) -> None:
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if sop_class != WSI_SOP_CLASS:
        raise BadInput("not_wsi", f"a DICOM file that is not a whole-slide image (modality {ds.get('Modality', '?')}, "
                       f"SOP class {sop_class or 'missing'}); the pathology pipeline takes VL Whole Slide Microscopy "
                       "images; other DICOM belongs in its specialty's landing prefix")


def _wsi_role(ds) -> str:
    """``volume``, ``label``, ``overview`` or ``other`` (thumbnails) from ImageType's third value."""
    try:
        kinds = {str(v).strip().upper() for v in (ds.get("ImageType") or [])}
    except TypeError:
        kinds = {str(ds.get("ImageType")).strip().upper()}
    for role in ("LABEL", "OVERVIEW", "VOLUME"):
        if role in kinds:
            return role.lower()
    return "other"


def _mirax_study(mrxs: storage.ObjectInfo, files: list[storage.ObjectInfo], folder: PurePosixPath, *,
                 specialty: str, key: bytes) -> StudyEntry:
    """The study of one MIRAX slide (see :func:`_index_slides`); BadInput ``mirax_incomplete`` without the folder
    or its Slidedat.ini."""
    from imaging_tasks.slide_files import mirax_digest

    base = folder.parent
    by_name = {PurePosixPath(f.relpath).relative_to(folder).as_posix().lower(): f for f in files}
    if "slidedat.ini" not in by_name:
        raise BadInput("mirax_incomplete", f"a MIRAX slide without {'its folder' if not files else 'Slidedat.ini'} "
                       "(X.mrxs needs the folder X/ beside it, holding Slidedat.ini, Index.dat and the Data*.dat "
                       "files); upload the whole slide")
    rows = []
    for obj in (mrxs, *sorted(files, key=lambda o: o.relpath)):
        rel = PurePosixPath(obj.relpath).relative_to(base).as_posix()
        rows.append({**_file_row(obj), "sha256": storage.sha256_of(obj.uri),
                     "slide": {"format": "mirax", "role": "main" if obj is mrxs else "data", "path": rel}})
    digest = mirax_digest(rows)
    slide_name = _mirax_slide_name(by_name["slidedat.ini"].uri)
    newest = max((o.modified.isoformat() for o in (mrxs, *files) if o.modified), default=None)
    return StudyEntry(specialty=specialty, study=pseudo_id(key, digest, "study"),
                      patient=pseudo_id(key, slide_name or digest, "patient"), files=rows, modalities={"SM": 1},
                      newest=newest)


def _mirax_slide_name(slidedat_uri: str) -> str | None:
    """Slidedat.ini's GENERAL.SLIDE_NAME (the label text the scanner read, e.g. an accession), so a case's slides
    group under one patient pseudonym, the rule of ``deid.mirax.mirax_pseudonyms``; None when absent.  BadInput
    ``unreadable_slide`` for a Slidedat.ini that does not parse."""
    from imaging_tasks.deid.mirax import parse_slidedat  # one Slidedat.ini reader, shared with the de-identifier

    groups = parse_slidedat(storage.read_bytes(slidedat_uri))
    return (groups.get("GENERAL", {}).get("SLIDE_NAME") or "").strip() or None


def _ndpi_pseudonyms(key: bytes, digest: str, uri: str) -> tuple[str, str]:
    from imaging_tasks.deid.ndpi import ndpi_pseudonyms
    from imaging_tasks.slide_files import local_file

    try:
        with local_file(uri) as path:
            return ndpi_pseudonyms(key, digest, path)
    except BadInput:
        raise
    except (ValueError, OverflowError, struct.error) as exc:  # OSError: a storage fault, retried by the caller
        raise BadInput("unreadable_slide", f"not a readable NDPI slide ({type(exc).__name__}); check the file is "
                       "a complete whole-slide image") from None


def _file_row(obj: storage.ObjectInfo) -> dict[str, Any]:
    return {"uri": obj.uri, "size": obj.size, "modified": obj.modified.isoformat() if obj.modified else None}


def entry_to_manifest(entry: StudyEntry) -> dict:
    return asdict(entry) | {"fingerprint": entry.fingerprint}
