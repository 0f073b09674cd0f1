"""DICOM de-identification: PS3.15 Annex E Basic Application Level Confidentiality Profile, table-driven.

Every one of the 621 rows of Table E.1-1 (see ``profile.py``) is applied at every sequence depth, with
the options of ``DeidOptions``.  How the action codes are carried out here:

* ``X`` remove; ``Z`` zero-length value (an empty sequence for SQ); ``K`` keep (sequences still walked).
* ``D`` a non-empty dummy valid for the VR ("ANONYMIZED", 19000101, 0, 8 zero bytes, a keyed UID).
  A ``D`` sequence is kept and its items walked (Content Sequence, Graphic Annotation Sequence...), except
  code sequences (keyword ``...CodeSequence``), whose codes identify a person or place: they become one
  dummy code item.
* ``U`` each UID replaced by ``uid_for(key, uid)``: the same UID maps to the same pseudonym in every file,
  so references between files (ReferencedSOPInstanceUID...) stay consistent, and so does the file meta
  MediaStorageSOPInstanceUID, which is rebuilt from the new SOPInstanceUID.
* ``C`` (only reachable through an option): dates shifted by the patient's ``date_shift_days`` (times are
  kept: a whole-day shift leaves them valid); free text has the dataset's own identifiers (names, IDs,
  accession, institution...), dates and long digit runs blanked out; AE titles become keyed pseudonyms;
  coded strings (CS) are kept; sequences are walked.  For VRs where none of that applies (the two OB
  timestamps and the SH timezone offset marked C under Modified Dates) the basic code is used instead.
* Combined codes depend on the attribute's Type in its IOD, which a file-level tool cannot see in
  general.  Rule used: the least-retaining choice that keeps the common IODs valid - remove (``X``) or
  empty (``Z``) unless ``_IOD_TYPE`` below lists the attribute as Type 1 (then ``D``) or Type 2 (then
  ``Z``) in some common composite IOD.  ``X/Z/U*`` sequences (Referenced Image / Source Image Sequence)
  are kept with every contained UID replaced: the references are needed to interpret derived images
  and localizers, and once the UIDs are keyed pseudonyms they identify nobody.
* Patterns: curve groups (50xx) and whole overlay groups (60xx: the basic profile removes Overlay Data and
  Comments, and the remaining attributes would describe a plane that is gone) are removed; private
  (odd-group) attributes are removed unless ``retain_safe_private`` and they are in ``SAFE_PRIVATE``.

Attributes not in the table are kept, except free text: Table E.1-1 lists what must be acted on, and the
rest (geometry, pixel module, acquisition parameters) is what research needs.  Safety nets for what the
table cannot list: unlisted free text (LO, SH, ST, LT, UT, UC) is removed unless a reviewed allow-list names
it as coded/technical (``allowlist.py``: code meanings, manufacturer, kernel, coil names...; a few an IOD
requires get a dummy or an empty value); unlisted person names (PN) are removed; unlisted dates (DA/DT) are
shifted or removed like listed ones; SR Text Value and presentation-state Unformatted Text Value (free text
inside the Content / Graphic Annotation sequences, which the table marks D) get a dummy; standard-group tags
unknown to the DICOM dictionary, group lengths and Data Set Trailing Padding are removed.  ``strict`` keeps
verbatim only what the allow-list names (see ``allowlist.py``).

Before anything is written: the input must be complete and parse (``dicom_io.parse``: cut files, garbled
structure, more than 64 levels of nesting are refused), and carry the content its SOP class cannot lack
(``REQUIRED_CONTENT``: Pixel Data of images, the dose grid or DVHs of an RT Dose, the beams of an RT Plan...,
which is what a file cut at a top-level element boundary loses); the output is parsed back in full
(``dicom_io.check_readable``) so nothing unreadable is published.  ``deidentify_bytes`` raises BadInput and
nothing else: an unexpected error on one file becomes ``BadInput("deid_error")`` (logged with its type and
code location, never its message, which could quote a value), so a batch quarantines the file and goes on.

Outside the header: overlays hidden in the unused high bits of Pixel Data are cleared (unsigned: zeroed;
signed: replaced by the sign extension, which leaves every pixel value unchanged); burned-in text cannot
be removed here, so objects whose header says or whose kind implies burned-in annotation are refused
(``BadInput("burned_in_annotation")``) rather than passed on.
"""
from __future__ import annotations

import copy
import datetime as dt
import functools
import io
import logging
import re
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, get_entry, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, RLELossless)

from imaging_tasks.dicom_io import MAX_NESTING, check_readable, check_required, parse
from imaging_tasks.errors import BadInput

from . import allowlist, profile
from .pseudonym import date_shift_days, pseudo_id, uid_for


@dataclass(frozen=True)
class DeidOptions:
    """PS3.15 E.3 options.  Retain Longitudinal Temporal Information with Modified Dates is on by default:
    longitudinal research needs intervals, and a keyed per-patient shift keeps them without real dates."""

    retain_modified_dates: bool = True
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    clean_descriptors: bool = False
    retain_uids: bool = False
    retain_safe_private: bool = False
    strict: bool = False  # keep verbatim only allow-listed attributes (allowlist.STRICT_ALLOWED)

    @property
    def columns(self) -> frozenset[str]:
        """Table E.1-1 option columns enabled by these options."""
        return frozenset(profile.OPTION_COLUMNS[f.name] for f in fields(self)
                         if f.name in profile.OPTION_COLUMNS and getattr(self, f.name))


# CID 7050 De-identification Method codes (scheme DCM).
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES = {
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}
METHOD_TEXT = "PS3.15 E.1 Basic Profile (imaging_tasks.deid)"
STRICT_TEXT = "Strict allow-list of retained attributes"
DEMO_MARK = "DEMO KEY - NOT FOR PRODUCTION USE"
IMPLEMENTATION_VERSION = "IMAGING_DEID_1"

# Type of combined-code attributes in the most demanding common composite IOD (1: must have a value,
# 2: must be present, may be empty).  Anything not listed is treated as Type 3 (may be removed).
_IOD_TYPE = {
    0x0008002A: "1",  # Acquisition DateTime: Type 1C in Enhanced CT/MR/PET/XA frame content
    0x00080023: "1",  # Content Date: Type 1 in SR Document General
    0x00080033: "1",  # Content Time: Type 1 in SR Document General
    0x00181000: "1",  # Device Serial Number: Type 1 in Enhanced General Equipment
    0x00400555: "2",  # Acquisition Context Sequence: Type 2 in Acquisition Context module
    0x00700084: "2",  # Content Creator's Name: Type 2 in Presentation State Identification
    0x00180010: "2",  # Contrast/Bolus Agent: Type 2 in Contrast/Bolus module
    0x00100020: "2",  # Patient ID: Type 2 in Patient module (pseudonymized anyway)
    0x300A00B2: "2",  # Treatment Machine Name: Type 2 in RT Beams
}

# Unlisted attributes handled anyway: free text inside sequences the table marks D, and a few free-text
# comments/identifiers of the SR and worklist modules that the table does not list.
_EXTRA_CODES = {
    0x0040A160: "D",  # Text Value (SR content items inside Content Sequence)
    0x00700006: "D",  # Unformatted Text Value (text objects inside Graphic Annotation Sequence)
    0x0040A492: "X",  # Completion Flag Description (SR Document General, Type 3)
    0x00400400: "X",  # Comments on the Scheduled Procedure Step
    0x0040E001: "X",  # HL7 Instance Identifier
}

# Retain Safe Private: a small subset of PS3.15 Table E.3.10-1 (diffusion and scaling parameters).
# Keyed by (private creator, group, element offset within the block); kept only with a numeric or coded VR.
SAFE_PRIVATE = {
    ("SIEMENS MR HEADER", 0x0019, 0x0A),  # Number of Images in Mosaic
    ("SIEMENS MR HEADER", 0x0019, 0x0B),  # Slice Measurement Duration
    ("SIEMENS MR HEADER", 0x0019, 0x0C),  # B value
    ("SIEMENS MR HEADER", 0x0019, 0x0D),  # Diffusion Directionality
    ("SIEMENS MR HEADER", 0x0019, 0x0E),  # Diffusion Gradient Direction
    ("SIEMENS MR HEADER", 0x0019, 0x27),  # B matrix
    ("GEMS_ACQU_01", 0x0019, 0xBB),  # diffusion direction x (user data 20)
    ("GEMS_ACQU_01", 0x0019, 0xBC),  # diffusion direction y (user data 21)
    ("GEMS_ACQU_01", 0x0019, 0xBD),  # diffusion direction z (user data 22)
    ("GEMS_PARM_01", 0x0043, 0x39),  # slop_int_6..9 (b value)
    ("PHILIPS MR IMAGING DD 001", 0x2001, 0x03),  # Diffusion B-Factor
    ("PHILIPS MR IMAGING DD 001", 0x2001, 0x04),  # Diffusion Direction
    ("PHILIPS MR IMAGING DD 001", 0x2005, 0x0D),  # Scale Intercept
    ("PHILIPS MR IMAGING DD 001", 0x2005, 0x0E),  # Scale Slope
}
_SAFE_PRIVATE_VRS = {"CS", "DS", "IS", "FL", "FD", "SL", "SS", "UL", "US"}

# Objects whose pixels are known to carry burned-in text (patient name, dates) often enough that a
# header flag cannot be trusted: ultrasound, angiography/fluoroscopy, secondary capture (incl. CT dose
# screens) and radiation dose reports.
BURNED_IN_MODALITIES = frozenset({"US", "SC", "XA"})
BURNED_IN_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",  # secondary capture family
    "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2",
    "1.2.840.10008.5.1.4.1.1.3", "1.2.840.10008.5.1.4.1.1.3.1",  # ultrasound (incl. retired)
    "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.12.1.1", "1.2.840.10008.5.1.4.1.1.12.2",
    "1.2.840.10008.5.1.4.1.1.12.2.1", "1.2.840.10008.5.1.4.1.1.12.3",  # XA / XRF
    "1.2.840.10008.5.1.4.1.1.88.67", "1.2.840.10008.5.1.4.1.1.88.68", "1.2.840.10008.5.1.4.1.1.88.73",
    "1.2.840.10008.5.1.4.1.1.88.75",  # radiation dose SRs
})

_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_INT_VRS = {"SL", "SS", "UL", "US", "SV", "UV", "US or SS", "US or OW", "US or SS or OW"}
_FLOAT_VRS = {"FL", "FD"}
_FREE_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR = {"AS": "000D", "DA": "19000101", "DT": "19000101000000", "TM": "000000", "DS": "0", "IS": "0",
                "UR": "urn:x-anonymized"}

PATIENT_NAME, PATIENT_ID = 0x00100010, 0x00100020
log = logging.getLogger(__name__)
_DATES_COLUMN = profile.OPTION_COLUMNS["retain_modified_dates"]
DATASET_TRAILING_PADDING = 0xFFFCFFFC

# Header attributes whose values make identifiers worth blanking out of descriptions ("C" on text).
_IDENTIFIER_KEYWORDS = {
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientBirthDate", "PatientAddress",
    "PatientTelephoneNumbers", "MedicalRecordLocator", "AccessionNumber", "StudyID", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "RequestedProcedureID", "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "MilitaryRank", "BranchOfService",
    "RegionOfResidence", "CountryOfResidence", "Occupation",
}
_DATE_IN_TEXT = re.compile(r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b|\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b")
_LONG_DIGITS = re.compile(r"\d{6,}")

HEADER_FIELDS = (
    "Modality", "SOPClassUID", "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "StudyDate",
    "SeriesDate", "SeriesNumber", "AcquisitionNumber", "InstanceNumber", "ImageType", "Rows", "Columns",
    "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImagePositionPatient",
    "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept", "RescaleType", "KVP",
    "MagneticFieldStrength", "Laterality", "ImageLaterality", "ViewPosition", "SeriesDescription",
    "PatientSex", "PatientAge",
)


# ----------------------------------------------------------------------------------------- values

def _values(elem: DataElement) -> list:
    v = elem.value
    if v is None or v == "":
        return []
    if isinstance(v, (list, tuple, MultiValue)):
        return list(v)
    return [v]


def _set_values(elem: DataElement, vals: list) -> None:
    elem.value = vals[0] if len(vals) == 1 else vals


def _shift_date(text: str, days: int) -> str:
    """Shift a DA value (YYYYMMDD, legacy YYYY.MM.DD, YYYY, YYYYMM or a range); '' when unparseable."""
    s = str(text).strip()
    if not s:
        return s
    if "-" in s:  # query-style range A-B, -B or A-
        return "-".join(_shift_date(p, days) if p else "" for p in s.split("-"))
    m = re.fullmatch(r"(\d{4})\.?(\d{2})?\.?(\d{2})?", s)
    if not m:
        return ""
    try:
        base = dt.date(int(m[1]), int(m[2] or 1), int(m[3] or 1)) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return base.strftime("%Y%m%d" if m[3] else "%Y%m" if m[2] else "%Y")


_DT_RE = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{0,6}(?:\.\d{1,6})?)([+-]\d{4})?")


def _shift_datetime(text: str, days: int) -> str:
    """Shift the date part of a DT value; the time of day and UTC offset are kept."""
    s = str(text).strip()
    m = _DT_RE.fullmatch(s)
    if not s or not m:
        return ""
    date_part = "".join(g for g in m.groups()[:3] if g)
    shifted = _shift_date(date_part, days)
    return shifted + (m[4] or "") + (m[5] or "") if shifted else ""


def _dummy_code_item() -> Dataset:
    item = Dataset()
    item.CodeValue = "ANON"
    item.CodingSchemeDesignator = "99DEID"
    item.CodeMeaning = "Anonymized"
    return item


def _method_code_item(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code[0], "DCM", code[1]
    return item


@functools.lru_cache(maxsize=4096)
def _known_tag(tag: int) -> bool:
    try:
        get_entry(tag)
        return True
    except KeyError:
        return False


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    enc = getattr(ds, "original_encoding", (None, None))
    if enc == (True, True):
        return ImplicitVRLittleEndian
    if enc == (False, False):
        return ExplicitVRBigEndian
    return ExplicitVRLittleEndian


def _patient_key(ds: Dataset) -> str:
    """What identifies the patient of this file: PatientID, else name+birth date, else the study."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return pid
    name = str(ds.get("PatientName", "") or "").strip()
    if name:
        return f"name:{name}|{str(ds.get('PatientBirthDate', '') or '').strip()}"
    return f"study:{str(ds.get('StudyInstanceUID', '') or '').strip()}"


def _collect_identifiers(ds: Dataset) -> list[str]:
    """Identifier strings of this dataset, longest first, for blanking them out of free text."""
    tokens: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "PN":
            for v in _values(elem):
                s = str(v).strip()
                if s:
                    tokens.add(s)
                    tokens.update(p for p in re.split(r"[\^=\s,]+", s) if len(p) >= 3)
        elif elem.keyword in _IDENTIFIER_KEYWORDS:
            tokens.update(s for s in (str(v).strip() for v in _values(elem)) if len(s) >= 3)
    return sorted(tokens, key=lambda t: (-len(t), t))


# ----------------------------------------------------------------------------------------- walker

def _resolve(tag: int, code: str) -> str:
    """Reduce a combined code to one action (see module docstring)."""
    if code in ("X", "Z", "D", "K", "C", "U"):
        return code
    if code == "X/Z/U*":
        return "U*"
    iod_type = _IOD_TYPE.get(tag, "3")
    if iod_type == "1" and "D" in code:
        return "D"
    if iod_type in ("1", "2") and "Z" in code:
        return "Z"
    return "X" if "X" in code else "Z"


@functools.lru_cache(maxsize=8192)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


@functools.lru_cache(maxsize=8192)
def _code_for(tag: int, vr: str, columns: frozenset[str], retain_modified_dates: bool, strict: bool = False
              ) -> tuple[str, profile.Row | None]:
    """Action for an attribute under the enabled option columns, and its table row (None if unlisted).

    Unlisted free text (by the element's VR or its dictionary VR): removed unless allow-listed, or a dummy /
    empty value where an IOD requires one (allowlist.TEXT_REQUIRED).  ``strict``: a K (keep verbatim) stands
    only for allow-listed attributes and for what an enabled option retains explicitly.
    Pure in its arguments, so cached: a walk asks this once per element of every file.
    """
    row = profile.by_tag().get(tag)
    if row is None:
        if tag in _EXTRA_CODES:
            return _EXTRA_CODES[tag], None
        if vr == "PN":
            return "X", None
        if vr in ("DA", "DT"):
            return ("C" if retain_modified_dates else "X"), None
        if vr in _FREE_TEXT_VRS or _dictionary_vr(tag) in _FREE_TEXT_VRS:
            if tag in allowlist.TEXT_ALLOWED:
                return "K", None
            return allowlist.TEXT_REQUIRED.get(tag, "X"), None
        if strict and tag not in allowlist.STRICT_ALLOWED:
            return "X", None
        return "K", None
    code = _resolve(tag, row.code(columns))
    if strict and code == "K" and tag not in allowlist.STRICT_ALLOWED and \
            not any(row.options.get(c) == "K" for c in columns):
        code = "X"
    return code, row


class _Deidentifier:
    def __init__(self, key: bytes, options: DeidOptions, ds: Dataset):
        self.key = key
        self.options = options
        self.columns = options.columns
        self.patient_key = _patient_key(ds)
        self.patient_pseudo = pseudo_id(key, self.patient_key, "patient")
        self.shift_days = date_shift_days(key, self.patient_key)
        self._scrubber: re.Pattern | None = None
        if options.clean_descriptors or options.retain_patient_characteristics:
            tokens = _collect_identifiers(ds)
            if tokens:
                self._scrubber = re.compile("|".join(re.escape(t) for t in tokens), re.IGNORECASE)

    # --- resolution of action codes
    def code_for(self, tag: int, vr: str) -> tuple[str, profile.Row | None]:
        return _code_for(tag, vr, self.columns, self.options.retain_modified_dates, self.options.strict)

    resolve = staticmethod(_resolve)

    # --- walk
    def walk(self, ds: Dataset, depth: int = 0) -> None:
        creators: list[int] = []
        kept_blocks: set[tuple[int, int]] = set()
        for elem in list(ds):
            tag = int(elem.tag)
            group, element = tag >> 16, tag & 0xFFFF
            if group == 0x0002 or element == 0x0000 or tag == DATASET_TRAILING_PADDING:
                del ds[tag]  # stray file meta, stale group lengths, padding that can hide anything
            elif group & 1:
                if 0x0010 <= element <= 0x00FF:
                    creators.append(tag)  # decided once the block's data elements are known
                elif element >= 0x1000 and self._safe_private(ds, tag, elem):
                    kept_blocks.add((group, element >> 8))
                else:
                    del ds[tag]
            elif tag == PATIENT_ID:
                if depth == 0:
                    elem.value = self.patient_pseudo
                else:
                    v = str(elem.value or "").strip()
                    elem.value = pseudo_id(self.key, v, "patient") if v else ""
            elif tag == PATIENT_NAME:
                if depth == 0:
                    elem.value = self.patient_pseudo
                else:  # nested: the item's own patient (its PatientID is still the original here)
                    v = str(ds.get("PatientID", "") or "").strip()
                    elem.value = pseudo_id(self.key, v, "patient") if v else ""
            elif group & 0xFF00 in (0x5000, 0x6000):  # group is even here: profile.pattern_for's rows
                del ds[tag]  # curve group, overlay group (see module docstring)
            elif not _known_tag(tag):
                del ds[tag]  # a standard-group tag nobody can say is harmless
            else:
                code, row = self.code_for(tag, elem.VR)
                self.apply(ds, elem, code, row, depth)
        for ctag in creators:
            if (ctag >> 16, ctag & 0xFF) not in kept_blocks:
                del ds[ctag]

    def _safe_private(self, ds: Dataset, tag: int, elem: DataElement) -> bool:
        if not self.options.retain_safe_private or elem.VR not in _SAFE_PRIVATE_VRS:
            return False
        group, element = tag >> 16, tag & 0xFFFF
        creator = ds.get((group << 16) | (element >> 8))
        if creator is None or not creator.value:
            return False
        return (str(creator.value).strip().upper(), group, element & 0xFF) in SAFE_PRIVATE

    def apply(self, ds: Dataset, elem: DataElement, code: str, row: profile.Row | None, depth: int) -> None:
        tag = int(elem.tag)
        if code == "X":
            del ds[tag]
        elif code == "Z":
            self.empty(elem)
        elif code == "D":
            self.dummy(elem, depth)
        elif code == "U":
            if elem.VR == "UI":
                self.map_uids(elem)
            elif elem.VR == "SQ":
                self.recurse(elem, depth)
            else:  # a UID stored as UN by a writer that did not know the tag: re-type it and map it
                raw = elem.value
                text = raw.decode("ascii", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw or "")
                uids = [u.strip("\0 ") for u in text.split("\\")]
                mapped = [uid_for(self.key, u) if u else "" for u in uids]
                ds[tag] = DataElement(tag, "UI", mapped[0] if len(mapped) == 1 else mapped)
        elif code == "C":
            self.clean(ds, elem, row, depth)
        elif elem.VR == "SQ":  # K and U*: keep, with the items cleaned
            self.recurse(elem, depth)

    def recurse(self, elem: DataElement, depth: int) -> None:
        for item in elem.value or []:
            self.walk(item, depth + 1)

    @staticmethod
    def empty(elem: DataElement) -> None:
        if elem.VR == "SQ":
            elem.value = Sequence([])
        else:
            elem.clear()

    def map_uids(self, elem: DataElement) -> None:
        vals = _values(elem)
        if vals:
            _set_values(elem, [uid_for(self.key, str(v)) if str(v).strip() else v for v in vals])

    def dummy(self, elem: DataElement, depth: int) -> None:
        vr = elem.VR
        if vr == "SQ":
            if elem.keyword.endswith("CodeSequence"):
                elem.value = Sequence([_dummy_code_item()])
            else:
                self.recurse(elem, depth)
        elif vr == "UI":
            if _values(elem):
                self.map_uids(elem)
            else:
                elem.value = uid_for(self.key, f"dummy:{int(elem.tag):08X}")
        elif vr in _BINARY_VRS:
            elem.value = b"\0" * 8
        elif vr in _INT_VRS:
            elem.value = 0
        elif vr in _FLOAT_VRS:
            elem.value = 0.0
        elif vr == "AT":
            elem.value = 0
        else:
            elem.value = _DUMMY_BY_VR.get(vr, DUMMY_TEXT)

    def clean(self, ds: Dataset, elem: DataElement, row: profile.Row | None, depth: int) -> None:
        vr = elem.VR
        # Which enabled options asked for C decides what cleaning means (unlisted dates: the date option).
        sources = {c for c in self.columns if row.options.get(c) == "C"} if row is not None else {_DATES_COLUMN}
        if vr == "SQ":
            self.recurse(elem, depth)
        elif vr in ("DA", "DT", "TM") and _DATES_COLUMN in sources:
            if vr != "TM":  # whole-day shift: times stay valid as they are
                shift = _shift_date if vr == "DA" else _shift_datetime
                _set_values(elem, [shift(v, self.shift_days) for v in _values(elem)] or [""])
        elif vr == "AE":
            vals = _values(elem)
            if vals:
                _set_values(elem, [pseudo_id(self.key, str(v).strip(), "ae")[:16] for v in vals])
        elif vr == "CS":
            pass  # enumerated / defined terms: already non-identifying
        elif vr in _FREE_TEXT_VRS and sources - {_DATES_COLUMN}:
            vals = _values(elem)
            if vals:
                _set_values(elem, [self.scrub(str(v)) for v in vals])
        else:
            basic = self.resolve(int(elem.tag), row.basic) if row is not None else "X"
            self.apply(ds, elem, "X" if basic == "C" else basic, row, depth)

    def scrub(self, text: str) -> str:
        if self._scrubber is not None:
            text = self._scrubber.sub("*", text)
        return _LONG_DIGITS.sub("*", _DATE_IN_TEXT.sub("*", text))


# ----------------------------------------------------------------------------------------- checks

# VL Whole Slide Microscopy: LABEL and OVERVIEW images are photographs of the slide label (names, MRNs,
# barcodes); a VOLUME image may include the label too, which Specimen Label in Image says.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_WSI_LABEL_TYPES = {"LABEL", "OVERVIEW"}


def _check_slide_label(ds: Dataset) -> None:
    image_type = {str(v).strip().upper() for v in _values(ds["ImageType"])} if "ImageType" in ds else set()
    label_in_image = str(ds.get("SpecimenLabelInImage", "") or "").strip().upper() == "YES"
    is_wsi = str(ds.get("SOPClassUID", "") or "").strip() == WSI_SOP_CLASS
    if is_wsi and image_type & _WSI_LABEL_TYPES:
        why = f"a whole-slide {'/'.join(sorted(image_type & _WSI_LABEL_TYPES))} image (a photo of the slide label)"
    elif label_in_image:
        why = "an image whose header says the specimen label is in the pixels (SpecimenLabelInImage YES)"
    else:
        return
    raise BadInput("slide_label_image", f"{why} is dropped: it carries the label's identifiers in its pixels. "
                   "The slide's VOLUME instances are de-identified without it.")


# What a file cut at a top-level element boundary loses first is its highest tags: the bulk data at the end
# (Pixel Data, waveforms, spectra, encapsulated documents) or the last required module.  Those boundaries leave
# no trace in the bytes (see dicom_io), so the object's own content is checked: each SOP class below needs, for
# every tuple, at least one of its attributes at the top level (Type 1, or the 1C pair one of which its IOD
# requires, in a Mandatory module).  Images need pixels: any SOP class named "... Image Storage", and any object
# whose Image Pixel module has begun (one of _PIXEL_MODULE present), RT Dose grids included - except classes
# with bulk data of their own (MR Spectroscopy describes its grid with Rows/Columns but holds spectra).
PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float / Double Float / Pixel Data
_PIXEL_MODULE = (0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102,
                 0x00280103)  # Samples per Pixel ... Pixel Representation, Number of Frames
_SR = ((0x0040A730,),)  # Content Sequence: what an SR or a Key Object Selection says
_GSPS = ((0x0070005A,),)  # Displayed Area Selection Sequence (Displayed Area module)
REQUIRED_CONTENT: dict[str, tuple[tuple[int, ...], ...]] = {
    "1.2.840.10008.5.1.4.1.1.481.2": ((0x7FE00010, 0x30040050),),  # RT Dose: dose grid or DVH Sequence
    "1.2.840.10008.5.1.4.1.1.481.3": ((0x30060020,), (0x30060039,), (0x30060080,)),  # RT Structure Set: ROIs,
    # their contours and observations
    "1.2.840.10008.5.1.4.1.1.481.4": ((0x30080020,),),  # RT Beams Treatment Record: Treatment Session Beam Seq.
    "1.2.840.10008.5.1.4.1.1.481.5": ((0x300A00B0, 0x300A0230),),  # RT Plan: Beam or Application Setup Seq.
    "1.2.840.10008.5.1.4.1.1.481.8": ((0x300A03A2,),),  # RT Ion Plan: Ion Beam Sequence
    "1.2.840.10008.5.1.4.1.1.481.9": ((0x30080021,),),  # RT Ion Beams Treatment Record
    "1.2.840.10008.5.1.4.1.1.4.2": ((0x56000020,),),  # MR Spectroscopy: Spectroscopy Data
    "1.2.840.10008.5.1.4.1.1.66.5": ((0x00660002,),),  # Surface Segmentation: Surface Sequence
    **{f"1.2.840.10008.5.1.4.1.1.104.{n}": ((0x00420011,),) for n in range(1, 6)},  # encapsulated PDF, CDA,
    # STL, OBJ, MTL: Encapsulated Document
    **{f"1.2.840.10008.5.1.4.1.1.9.{s}": ((0x54000100,),)  # waveforms: Waveform Sequence
       for s in ("1.1", "1.2", "1.3", "2.1", "3.1", "4.1", "4.2", "5.1", "6.1", "6.2", "7.1", "7.2", "7.3", "7.4",
                 "8.1")},
    **{f"1.2.840.10008.5.1.4.1.1.88.{n}": _SR for n in (11, 22, 33, 34, 35, 40, 50, 59, 65, 69, 70, 71, 72, 74,
                                                          76)},  # (dose SRs are refused as burned-in anyway)
    **{f"1.2.840.10008.5.1.4.1.1.11.{n}": _GSPS for n in (1, 2, 3, 4)},  # presentation states
}
CONTENT_GROUPS = tuple(sorted({tags for req in REQUIRED_CONTENT.values() for tags in req}
                              | {PIXEL_DATA_TAGS, _PIXEL_MODULE}))  # _check_content_present asks "any of these?"
CONTENT_TAGS = tuple(sorted({t for tags in CONTENT_GROUPS for t in tags}))


def _check_content_present(ds: Dataset) -> None:
    """An object without the content its SOP class cannot lack was cut at an element boundary (or exported
    incomplete): images without Pixel Data, RT Dose without grid or DVH, RT Plans without beams...
    Reads SOPClassUID's value and, of CONTENT_TAGS, only whether they are present."""
    sop_class = UID(str(ds.get("SOPClassUID", "") or "").strip())
    required = REQUIRED_CONTENT.get(str(sop_class), ())
    own_bulk = required and not any(t in PIXEL_DATA_TAGS for tags in required for t in tags)  # e.g. spectra
    if not own_bulk and not any(t in ds for t in PIXEL_DATA_TAGS):
        if any(t in ds for t in _PIXEL_MODULE) or sop_class.name.endswith("Image Storage"):
            raise BadInput("missing_pixels", f"an image object ({sop_class.name}) without Pixel Data: the file "
                           "was cut short or exported without pixels; re-send it")
    for tags in required:
        if not any(t in ds for t in tags):
            names = " or ".join(keyword_for_tag(t) or f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in tags)
            raise BadInput("missing_content", f"a {sop_class.name} object without {names}: the file was cut short "
                           "or exported incomplete; re-send it")


def _check_burned_in(ds: Dataset) -> None:
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if flag == "YES":
        why = "BurnedInAnnotation is YES"
    elif modality in BURNED_IN_MODALITIES:
        why = f"modality {modality} routinely carries burned-in text"
    elif sop_class in BURNED_IN_SOP_CLASSES:
        why = f"SOP class {sop_class} (secondary capture/ultrasound/angiography/dose report) routinely " \
              "carries burned-in text"
    else:
        return
    raise BadInput("burned_in_annotation", f"{why}; header de-identification cannot remove text from pixels. "
                   "Exclude these objects or scrub their pixels with a dedicated tool before ingest.")


def _clean_high_bits(words: np.ndarray, bits_stored: int, high_bit: int, signed: bool) -> np.ndarray:
    """Clear bits outside [high_bit-bits_stored+1, high_bit]; for signed data set them to the sign."""
    nbits = words.dtype.itemsize * 8
    low = max(high_bit + 1 - bits_stored, 0)
    mask = (((1 << bits_stored) - 1) << low) & ((1 << nbits) - 1)
    out = words & mask
    if signed and low == 0:
        negative = ((out >> (bits_stored - 1)) & 1).astype(bool)
        out = np.where(negative, out | (((1 << nbits) - 1) ^ mask), out)
    return out.astype(words.dtype)


def _clean_pixel_data(ds: Dataset, ts: UID) -> bool:
    """Check Pixel Data is complete and clear overlays in unused high bits.  Returns True if changed."""
    if "PixelData" not in ds:
        return False
    try:
        bits_alloc = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored", bits_alloc) or bits_alloc)
        hb = ds.get("HighBit")
        high_bit = int(hb) if hb not in (None, "") else bits_stored - 1
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    except (AttributeError, TypeError, ValueError):
        raise BadInput("missing_attribute", "Pixel Data present but BitsAllocated/BitsStored are missing or "
                       "invalid; re-export the image from the source system") from None
    if not ts.is_encapsulated:
        try:
            for kw in ("Rows", "Columns", "SamplesPerPixel", "NumberOfFrames"):
                if kw in ds and ds[kw].value not in (None, ""):
                    int(ds[kw].value)  # IS values such as "1A" make the expected size meaningless
            expected = int(pydicom.pixels.utils.get_expected_length(ds, "bytes"))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise BadInput("missing_attribute", "Pixel Data present but the image pixel module (Rows, Columns, "
                           "SamplesPerPixel, NumberOfFrames, PhotometricInterpretation) is incomplete or "
                           "invalid") from None
        raw = ds.PixelData
        if len(raw) < expected:
            raise BadInput("truncated_pixels", f"Pixel Data holds {len(raw)} bytes but Rows x Columns x frames "
                           f"needs {expected}; the file is truncated, re-send it")
        if bits_alloc not in (8, 16, 32) or bits_stored >= bits_alloc:
            return False
        dtype = np.dtype(f"u{bits_alloc // 8}").newbyteorder("<" if ts.is_little_endian else ">")
        count = expected // dtype.itemsize
        words = np.frombuffer(raw, dtype=dtype, count=count)
        cleaned = _clean_high_bits(words, bits_stored, high_bit, signed)
        if np.array_equal(cleaned, words):
            return False
        ds.PixelData = cleaned.astype(dtype).tobytes() + bytes(raw[count * dtype.itemsize:])
        return True
    if bits_stored >= bits_alloc or bits_alloc not in (8, 16, 32):
        return False
    # Encapsulated: RLE stores whole bytes, so it can carry high-bit overlays; JPEG-family streams normally
    # carry exactly BitsStored precision but one written at full precision can too.  Decode where a
    # decoder is installed; RLE can be re-encoded here, the others are refused if they carry overlay bits.
    try:
        arr = pydicom.pixels.pixel_array(ds, correct_unused_bits=False)
    except Exception:  # noqa: BLE001 - no codec installed: nothing can be checked or rewritten
        return False
    words = arr.view(np.dtype(f"u{arr.dtype.itemsize}")) if arr.dtype.kind in "iu" else None
    if words is None or words.dtype.itemsize * 8 != bits_alloc:
        return False
    cleaned = _clean_high_bits(words, bits_stored, high_bit, signed)
    if np.array_equal(cleaned, words):
        return False
    if ts != RLELossless:
        raise BadInput("overlay_in_pixels", "compressed Pixel Data has overlay bits above BitsStored and no "
                       "lossless re-encoder is available for its transfer syntax; decompress it before ingest")
    ds.compress(RLELossless, cleaned.view(arr.dtype), generate_instance_uid=False)
    return True


# ----------------------------------------------------------------------------------------- public API

def _deidentify_inplace(ds: Dataset, key: bytes, options: DeidOptions, demo: bool) -> dict:
    _check_slide_label(ds)
    _check_burned_in(ds)
    ts = _transfer_syntax(ds)
    original_study = str(ds.get("StudyInstanceUID", "") or "").strip()
    walker = _Deidentifier(key, options, ds)
    walker.walk(ds, 0)

    ds.PatientID = walker.patient_pseudo  # Type 2: present even if the source lacked it
    ds.PatientName = walker.patient_pseudo
    ds.PatientIdentityRemoved = "YES"
    enabled = [name for name in OPTION_CODES if getattr(options, name)]
    ds.DeidentificationMethod = method_values(options, demo)
    ds.DeidentificationMethodCodeSequence = Sequence(
        [_method_code_item(BASIC_PROFILE_CODE)] + [_method_code_item(OPTION_CODES[n]) for n in enabled])
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if options.retain_modified_dates else "REMOVED"
    _clean_pixel_data(ds, ts)

    if getattr(ds, "file_meta", None) is not None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or uid_for(
            key, str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")))
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        ds.file_meta = meta
    if isinstance(ds, FileDataset):
        ds.preamble = b"\0" * 128  # the preamble may hold a TIFF header or anything else
        ds.filename = None

    return deid_info(ds, pseudo_patient=walker.patient_pseudo, pseudo_study=pseudo_id(key, original_study, "study"))


def method_values(options: DeidOptions, demo: bool) -> list[str]:
    """De-identification Method (0012,0063) values: the profile, its options, strict mode, the demo mark."""
    enabled = [name for name in OPTION_CODES if getattr(options, name)]
    return [METHOD_TEXT] + [OPTION_CODES[n][1][:64] for n in enabled] + ([STRICT_TEXT] if options.strict else []) \
        + ([DEMO_MARK] if demo else [])


def deid_info(ds, *, pseudo_patient: str, pseudo_study: str) -> dict:
    """What ``deidentify_bytes`` returns besides the bytes, from the de-identified values (a Dataset, or any
    mapping with ``get`` and ``file_meta`` such as the fast path's)."""
    return {
        "pseudo_patient": pseudo_patient,
        "pseudo_study": pseudo_study,
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "sop_uid": str(ds.get("SOPInstanceUID", "") or ""),
        "modality": str(ds.get("Modality", "") or "") or None,
        "sop_class_uid": str(ds.get("SOPClassUID", "") or "") or None,
        "header": header_summary(ds),
    }


def deidentify_dataset(ds: Dataset, key: bytes, options: DeidOptions = DeidOptions(), *,
                       demo: bool = False) -> Dataset:
    """Return a de-identified copy of ``ds`` (the input is left untouched).

    Raises BadInput for objects that cannot be made safe here (burned-in annotation, truncated pixels).
    """
    out = copy.deepcopy(ds)
    _deidentify_inplace(out, key, options, demo)
    return out


def deidentify_bytes(data: bytes, key: bytes, options: DeidOptions = DeidOptions(), *,
                     demo: bool = False, fast: bool = True) -> tuple[bytes, dict]:
    """Parse a DICOM file, de-identify it and serialize it; returns ``(bytes, info)``.

    ``info``: pseudo_patient, pseudo_study (folder names), study_uid/series_uid/sop_uid (new), modality,
    sop_class_uid and ``header`` (non-PHI fields for a warehouse instances table).  The date shift is
    deliberately not returned: with it, anyone holding a shifted date could recover the real one.

    ``fast``: first try the byte-level path of ``stream.py`` (same decisions and result, see
    tests/test_deid_stream.py); on anything it does not handle it raises Unsupported and this reference
    path runs.  ``fast=False``: the reference path only.  Either way the output is read back before it is
    returned, by the fast path's byte-level parser with every check its input had to pass (``stream._verify``:
    structure, lengths, nesting, VRs, numbers, text in its character set; about 8% of the fast path's time,
    where a full pydicom re-read costs 190% of it), or where that parser cannot judge (deflate, nested
    character sets...) by pydicom, in full (``dicom_io.check_readable``).

    Raises BadInput and nothing else, whatever ``data`` holds (see the module docstring).
    """
    from .stream import Unsupported, deidentify_stream, verified  # here: stream.py imports this module

    try:
        if fast:
            try:
                return deidentify_stream(data, key, options, demo=demo)  # read back by stream._verify
            except Unsupported:
                pass
        out, info = _deidentify_reference(data, key, options, demo)
        if not verified(out):  # the same byte-level read-back where it can judge, else pydicom's, in full
            check_readable(out)
        return out, info
    except BadInput:
        raise
    except RecursionError:
        raise BadInput("nesting_too_deep", f"sequences nested deeper than this reader can follow (the limit is "
                       f"{MAX_NESTING} levels); the file is corrupt or crafted, re-export it") from None
    except Exception as exc:  # noqa: BLE001 - the file boundary: one bad file must not stop a batch
        raise _unexpected(exc, "de-identification") from None


def _unexpected(exc: BaseException, what: str) -> BadInput:
    """BadInput("deid_error") for an exception nobody expected on this file; logged by type and code location
    (the innermost frame), never by message: a message may quote a value of the file."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb is not None else "?"
    log.warning("%s failed on one file with %s at %s; the file is quarantined", what, type(exc).__name__, where)
    return BadInput("deid_error", f"{what} failed on this file ({type(exc).__name__} at {where}); it was "
                    "quarantined - report it with the file's sha256")


def _deidentify_reference(data: bytes, key: bytes, options: DeidOptions, demo: bool) -> tuple[bytes, dict]:
    # One parse of the whole file, every value decoded: empty_file / not_dicom / unreadable_dicom /
    # truncated_* / nesting_too_deep from parse, missing_attribute, then missing_pixels / missing_content for
    # an object lacking what its SOP class needs (a file cut at an element boundary reads as complete).
    ds = parse(data)
    check_required(ds)
    _check_content_present(ds)
    info = _deidentify_inplace(ds, key, options, demo)
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - values kept from the source that cannot be encoded
        raise BadInput("unwritable_dicom", f"the de-identified data set could not be written ({type(exc).__name__}); "
                       "the source holds values invalid for their VR, fix them at the source") from None
    return buf.getvalue(), info


def _json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple, MultiValue)):
        return [_json_value(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (bytes, bytearray, Sequence, Dataset)):
        return None
    return str(value)


def header_summary(ds: Dataset) -> dict:
    """Small JSON-safe dict of (already de-identified) technical header fields present in ``ds``."""
    out = {}
    for kw in HEADER_FIELDS:
        value = ds.get(kw)
        if value is None or value == "" or (isinstance(value, (list, MultiValue)) and len(value) == 0):
            continue
        jv = _json_value(value)
        if jv is not None:
            out[kw] = jv
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts:
        out["TransferSyntaxUID"] = str(ts)
    return out


__all__ = ["DeidOptions", "deidentify_dataset", "deidentify_bytes", "header_summary", "SAFE_PRIVATE",
           "BURNED_IN_MODALITIES", "BURNED_IN_SOP_CLASSES", "DEMO_MARK", "REQUIRED_CONTENT", "method_values"]
