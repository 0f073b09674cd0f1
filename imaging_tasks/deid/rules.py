"""The decisions of the DICOM de-identifier, shared by its two paths: PS3.15 Annex E Basic Application Level
Confidentiality Profile, table-driven.

The reference walker (``reference.py``, on pydicom data sets) and the byte-level fast path (``stream.py``, on
the raw bytes) both take every decision from here: which action an attribute gets, what a dummy, a shifted
date, a pseudonymous patient are, which objects are refused and why, what is added to the output and what
``info`` reports.  Neither path holds a rule of its own, so they cannot drift apart
(``tests/test_deid_stream.py`` proves they give equal results on pydicom's corpus under every option set).

Every one of the 621 rows of Table E.1-1 (see ``profile.py``) is applied at every sequence depth, with the
options of :class:`DeidOptions`.  How the action codes are carried out:

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
  general.  Rule used (:func:`resolve`): the least-retaining choice that keeps the common IODs valid - remove
  (``X``) or empty (``Z``) unless :data:`IOD_TYPE` lists the attribute as Type 1 (then ``D``) or Type 2 (then
  ``Z``) in some common composite IOD.  ``X/Z/U*`` sequences (Referenced Image / Source Image Sequence)
  are kept with every contained UID replaced: the references are needed to interpret derived images
  and localizers, and once the UIDs are keyed pseudonyms they identify nobody.
* Patterns: curve groups (50xx) and whole overlay groups (60xx: the basic profile removes Overlay Data and
  Comments, and the remaining attributes would describe a plane that is gone) are removed; private
  (odd-group) attributes are removed unless ``retain_safe_private`` and they are in :data:`SAFE_PRIVATE`.

Attributes not in the table are kept, except free text: Table E.1-1 lists what must be acted on, and the
rest (geometry, pixel module, acquisition parameters) is what research needs.  Safety nets for what the
table cannot list (:func:`code_for`): unlisted free text (LO, SH, ST, LT, UT, UC) is removed unless a
reviewed allow-list names it as coded/technical (``allowlist.py``: code meanings, manufacturer, kernel, coil
names...; a few an IOD requires get a dummy or an empty value); unlisted person names (PN) are removed;
unlisted dates (DA/DT) are shifted or removed like listed ones; SR Text Value and presentation-state
Unformatted Text Value (free text inside the Content / Graphic Annotation sequences, which the table marks D)
get a dummy; standard-group tags unknown to the DICOM dictionary, group lengths and Data Set Trailing Padding
are removed.  ``strict`` keeps verbatim only what the allow-list names (see ``allowlist.py``).

Refusals (:data:`REFUSAL_CHECKS`, a tuple of functions both paths iterate in order, after the file parsed
completely): the attributes every consumer needs (``dicom_io.check_required``); the content the object's SOP
class cannot lack (:data:`REQUIRED_CONTENT`: what a file cut at a top-level element boundary loses); whole-slide
label/overview images; burned-in annotation (the header says so, or the kind of object routinely carries it):
text in pixels cannot be removed here, so such objects are refused, not passed on.  The fast path runs each
check on a small data set of the values :data:`CHECK_TAGS` names and the presence of :data:`PRESENCE_TAGS`: a
check reading anything else must add it there (``tests/test_deid_stream.py`` checks that).
"""
from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass, fields
from typing import Any

from pydicom.datadict import dictionary_VR, get_entry, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID

from imaging_tasks.dicom_io import check_required
from imaging_tasks.errors import BadInput

from . import allowlist, profile


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
IOD_TYPE = {
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
EXTRA_CODES = {
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
SAFE_PRIVATE_VRS = {"CS", "DS", "IS", "FL", "FD", "SL", "SS", "UL", "US"}

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

BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
INT_VRS = {"SL", "SS", "UL", "US", "SV", "UV", "US or SS", "US or OW", "US or SS or OW"}
FLOAT_VRS = {"FL", "FD"}
FREE_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
DUMMY_TEXT = "ANONYMIZED"
DUMMY_BY_VR = {"AS": "000D", "DA": "19000101", "DT": "19000101000000", "TM": "000000", "DS": "0", "IS": "0",
               "UR": "urn:x-anonymized"}

PATIENT_NAME, PATIENT_ID = 0x00100010, 0x00100020
DATES_COLUMN = profile.OPTION_COLUMNS["retain_modified_dates"]
DATASET_TRAILING_PADDING = 0xFFFCFFFC

# Technical header fields reported in ``info["header"]`` (a warehouse instances table reads them).
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

def values_of(elem: DataElement) -> list:
    """The values of an element as a list ([] for an empty one)."""
    v = elem.value
    if v is None or v == "":
        return []
    if isinstance(v, (list, tuple, MultiValue)):
        return list(v)
    return [v]


def set_values(elem: DataElement, vals: list) -> None:
    elem.value = vals[0] if len(vals) == 1 else vals


def shift_date(text: str, days: int) -> str:
    """Shift a DA value (YYYYMMDD, legacy YYYY.MM.DD, YYYY, YYYYMM or a range); '' when unparseable."""
    s = str(text).strip()
    if not s:
        return s
    if "-" in s:  # query-style range A-B, -B or A-
        return "-".join(shift_date(p, days) if p else "" for p in s.split("-"))
    m = re.fullmatch(r"(\d{4})\.?(\d{2})?\.?(\d{2})?", s)
    if not m:
        return ""
    try:
        base = dt.date(int(m[1]), int(m[2] or 1), int(m[3] or 1)) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return base.strftime("%Y%m%d" if m[3] else "%Y%m" if m[2] else "%Y")


_DT_RE = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{0,6}(?:\.\d{1,6})?)([+-]\d{4})?")


def shift_datetime(text: str, days: int) -> str:
    """Shift the date part of a DT value; the time of day and UTC offset are kept."""
    s = str(text).strip()
    m = _DT_RE.fullmatch(s)
    if not s or not m:
        return ""
    date_part = "".join(g for g in m.groups()[:3] if g)
    shifted = shift_date(date_part, days)
    return shifted + (m[4] or "") + (m[5] or "") if shifted else ""


def dummy_code_item() -> Dataset:
    """The one item a ``D`` code sequence is replaced by."""
    item = Dataset()
    item.CodeValue = "ANON"
    item.CodingSchemeDesignator = "99DEID"
    item.CodeMeaning = "Anonymized"
    return item


def method_code_item(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code[0], "DCM", code[1]
    return item


@functools.lru_cache(maxsize=4096)
def known_tag(tag: int) -> bool:
    """Whether the DICOM dictionary knows ``tag`` (a standard-group tag it does not know is removed)."""
    try:
        get_entry(tag)
        return True
    except KeyError:
        return False


@functools.lru_cache(maxsize=8192)
def dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


# Top-level attributes whose values decide the patient's pseudonym and date shift (all K in every option set).
PATIENT_KEY_TAGS = (0x00100010, 0x00100020, 0x00100030, 0x0020000D)


def patient_key(ds: Dataset) -> str:
    """What identifies the patient of this file: PatientID, else name+birth date, else the study."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return pid
    name = str(ds.get("PatientName", "") or "").strip()
    if name:
        return f"name:{name}|{str(ds.get('PatientBirthDate', '') or '').strip()}"
    return f"study:{str(ds.get('StudyInstanceUID', '') or '').strip()}"


# ----------------------------------------------------------------------------------------- action codes

def resolve(tag: int, code: str) -> str:
    """Reduce a combined code to one action (see the module docstring)."""
    if code in ("X", "Z", "D", "K", "C", "U"):
        return code
    if code == "X/Z/U*":
        return "U*"
    iod_type = IOD_TYPE.get(tag, "3")
    if iod_type == "1" and "D" in code:
        return "D"
    if iod_type in ("1", "2") and "Z" in code:
        return "Z"
    return "X" if "X" in code else "Z"


@functools.lru_cache(maxsize=8192)
def code_for(tag: int, vr: str, columns: frozenset[str], retain_modified_dates: bool, strict: bool = False
             ) -> tuple[str, profile.Row | None]:
    """Action for an attribute under the enabled option columns, and its table row (None if unlisted).

    Unlisted free text (by the element's VR or its dictionary VR): removed unless allow-listed, or a dummy /
    empty value where an IOD requires one (allowlist.TEXT_REQUIRED).  ``strict``: a K (keep verbatim) stands
    only for allow-listed attributes and for what an enabled option retains explicitly.
    Pure in its arguments, so cached: a walk asks this once per element of every file.
    """
    row = profile.by_tag().get(tag)
    if row is None:
        if tag in EXTRA_CODES:
            return EXTRA_CODES[tag], None
        if vr == "PN":
            return "X", None
        if vr in ("DA", "DT"):
            return ("C" if retain_modified_dates else "X"), None
        if vr in FREE_TEXT_VRS or dictionary_vr(tag) in FREE_TEXT_VRS:
            if tag in allowlist.TEXT_ALLOWED:
                return "K", None
            return allowlist.TEXT_REQUIRED.get(tag, "X"), None
        if strict and tag not in allowlist.STRICT_ALLOWED:
            return "X", None
        return "K", None
    code = resolve(tag, row.code(columns))
    if strict and code == "K" and tag not in allowlist.STRICT_ALLOWED and \
            not any(row.options.get(c) == "K" for c in columns):
        code = "X"
    return code, row


@functools.lru_cache(maxsize=16384)
def plan(tag: int, vr: str, columns: frozenset[str], retain_modified_dates: bool, strict: bool = False
         ) -> tuple[str, profile.Row | None]:
    """What happens to one element, whatever its depth, in the order the paths decide it: ``"X"`` (removed:
    file meta, group lengths, Data Set Trailing Padding, curve and overlay groups, standard-group tags the
    dictionary does not know), ``"private"`` (odd group: see ``retain_safe_private``), ``"patient_id"`` /
    ``"patient_name"`` (pseudonyms), or the action code and table row of :func:`code_for`."""
    group, element = tag >> 16, tag & 0xFFFF
    if group == 0x0002 or element == 0x0000 or tag == DATASET_TRAILING_PADDING:
        return "X", None  # stray file meta, stale group lengths, padding that can hide anything
    if group & 1:
        return "private", None
    if tag == PATIENT_ID:
        return "patient_id", None
    if tag == PATIENT_NAME:
        return "patient_name", None
    if group & 0xFF00 in (0x5000, 0x6000) or not known_tag(tag):
        return "X", None  # curve group, overlay group (see the module docstring); a tag nobody can vouch for
    return code_for(tag, vr, columns, retain_modified_dates, strict)


def clean_sources(row: profile.Row | None, columns: frozenset[str]) -> set[str]:
    """Which enabled option columns asked for ``C``: that decides what cleaning means (unlisted dates: the
    dates option)."""
    return {c for c in columns if row.options.get(c) == "C"} if row is not None else {DATES_COLUMN}


# ----------------------------------------------------------------------------------------- refusals

# VL Whole Slide Microscopy: LABEL and OVERVIEW images are photographs of the slide label (names, MRNs,
# barcodes); a VOLUME image may include the label too, which Specimen Label in Image says.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_WSI_LABEL_TYPES = {"LABEL", "OVERVIEW"}


def check_slide_label(ds: Dataset) -> None:
    """Refuse whole-slide LABEL/OVERVIEW images and any image whose specimen label is in its pixels."""
    image_type = {str(v).strip().upper() for v in values_of(ds["ImageType"])} if "ImageType" in ds else set()
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
# whose Image Pixel module has begun (one of PIXEL_MODULE present), RT Dose grids included - except classes
# with bulk data of their own (MR Spectroscopy describes its grid with Rows/Columns but holds spectra).
PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float / Double Float / Pixel Data
PIXEL_MODULE = (0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102,
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
                              | {PIXEL_DATA_TAGS, PIXEL_MODULE}))  # check_content_present asks "any of these?"
CONTENT_TAGS = tuple(sorted({t for tags in CONTENT_GROUPS for t in tags}))


def check_content_present(ds: Dataset) -> None:
    """An object without the content its SOP class cannot lack was cut at an element boundary (or exported
    incomplete): images without Pixel Data, RT Dose without grid or DVH, RT Plans without beams...
    Reads SOPClassUID's value and, of CONTENT_TAGS, only whether they are present."""
    sop_class = UID(str(ds.get("SOPClassUID", "") or "").strip())
    required = REQUIRED_CONTENT.get(str(sop_class), ())
    own_bulk = required and not any(t in PIXEL_DATA_TAGS for tags in required for t in tags)  # e.g. spectra
    if not own_bulk and not any(t in ds for t in PIXEL_DATA_TAGS):
        if any(t in ds for t in PIXEL_MODULE) or sop_class.name.endswith("Image Storage"):
            raise BadInput("missing_pixels", f"an image object ({sop_class.name}) without Pixel Data: the file "
                           "was cut short or exported without pixels; re-send it")
    for tags in required:
        if not any(t in ds for t in tags):
            names = " or ".join(keyword_for_tag(t) or f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in tags)
            raise BadInput("missing_content", f"a {sop_class.name} object without {names}: the file was cut short "
                           "or exported incomplete; re-send it")


def check_burned_in(ds: Dataset) -> None:
    """Refuse objects whose header says, or whose kind implies, burned-in annotation."""
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


# Refusals for what the pixels show (identifiers no header rule can remove): ``deidentify_dataset`` runs these.
PIXEL_PHI_CHECKS = (check_slide_label, check_burned_in)
# Every refusal a parsed file gets before it is de-identified, in this order (the first failing one gives the
# reason): both paths of ``deidentify_bytes`` iterate this tuple, looked up at call time.
REFUSAL_CHECKS = (check_required, check_content_present) + PIXEL_PHI_CHECKS

# Top-level attributes whose values the refusal checks read (check_required's REQUIRED_TAGS included), and those
# whose presence only they ask about (by any-of group).  The fast path gives the checks exactly these.
CHECK_TAGS = (0x00080008, 0x00080016, 0x00080018, 0x00080060, 0x0020000D, 0x0020000E, 0x00280010, 0x00280301,
              0x00480010)  # ImageType, SOP Class/Instance, Modality, Study/Series, Rows, BIA, Specimen Label in Image
PRESENCE_GROUPS = CONTENT_GROUPS
PRESENCE_TAGS = CONTENT_TAGS


# ----------------------------------------------------------------------------------------- what is added and said

def method_values(options: DeidOptions, demo: bool) -> list[str]:
    """De-identification Method (0012,0063) values: the profile, its options, strict mode, the demo mark."""
    enabled = [name for name in OPTION_CODES if getattr(options, name)]
    return [METHOD_TEXT] + [OPTION_CODES[n][1][:64] for n in enabled] + ([STRICT_TEXT] if options.strict else []) \
        + ([DEMO_MARK] if demo else [])


def mark_deidentified(ds: Dataset, options: DeidOptions, demo: bool) -> None:
    """Set PatientIdentityRemoved, DeidentificationMethod (+ Code Sequence, CID 7050) and
    LongitudinalTemporalInformationModified on ``ds`` (the fast path writes the same elements it gets here)."""
    enabled = [name for name in OPTION_CODES if getattr(options, name)]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = method_values(options, demo)
    ds.DeidentificationMethodCodeSequence = Sequence(
        [method_code_item(BASIC_PROFILE_CODE)] + [method_code_item(OPTION_CODES[n]) for n in enabled])
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if options.retain_modified_dates else "REMOVED"


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


__all__ = ["DeidOptions", "OPTION_CODES", "BASIC_PROFILE_CODE", "METHOD_TEXT", "STRICT_TEXT", "DEMO_MARK",
           "IMPLEMENTATION_VERSION", "IOD_TYPE", "EXTRA_CODES", "SAFE_PRIVATE", "SAFE_PRIVATE_VRS",
           "BURNED_IN_MODALITIES", "BURNED_IN_SOP_CLASSES", "DUMMY_TEXT", "DUMMY_BY_VR", "HEADER_FIELDS",
           "values_of", "set_values", "shift_date", "shift_datetime", "dummy_code_item", "method_code_item",
           "known_tag", "dictionary_vr", "PATIENT_KEY_TAGS", "patient_key", "resolve", "code_for", "plan", "clean_sources",
           "check_slide_label", "check_content_present", "check_burned_in", "REQUIRED_CONTENT", "PIXEL_PHI_CHECKS",
           "REFUSAL_CHECKS", "CHECK_TAGS", "PRESENCE_GROUPS", "PRESENCE_TAGS", "method_values", "mark_deidentified",
           "deid_info", "header_summary"]
