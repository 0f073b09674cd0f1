"""The reference path of the DICOM de-identifier: the whole file parsed by pydicom, every value decoded, the
data set walked element by element at every depth with the decisions of ``rules.py``, written back by pydicom.

It handles every input the de-identifier accepts (deflate, nested character sets, compressed pixels with overlay
bits, the text-scrubbing options...); the byte-level fast path (``stream.py``) handles the common cases faster
with the same decisions and falls back here for the rest.  ``dicom.deidentify_bytes`` chooses between them.

:func:`deidentify` is the path from bytes to bytes: ``dicom_io.parse`` (cut files, garbled structure, more than
64 levels of nesting are refused), every check of ``rules.REFUSAL_CHECKS``, the walk, the additions of
``rules.mark_deidentified``, Pixel Data (``pixels.clean_pixel_data``), the file meta rebuilt
(MediaStorageSOPInstanceUID = the new SOPInstanceUID) and the preamble zeroed.  :class:`Walker` is also used by
the fast path, for the patient's pseudonym and date shift and for the rare actions it does not write out.
"""
from __future__ import annotations

import io
import re
from typing import Any, Callable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

from imaging_tasks.dicom_io import parse
from imaging_tasks.errors import BadInput

from . import profile, rules
from .pixels import clean_pixel_data
from .pseudonym import date_shift_days, pseudo_id, uid_for
from .rules import DeidOptions, values_of

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


def collect_identifiers(ds: Dataset) -> list[str]:
    """Identifier strings of this dataset, longest first, for blanking them out of free text."""
    tokens: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "PN":
            for v in values_of(elem):
                s = str(v).strip()
                if s:
                    tokens.add(s)
                    tokens.update(p for p in re.split(r"[\^=\s,]+", s) if len(p) >= 3)
        elif elem.keyword in _IDENTIFIER_KEYWORDS:
            tokens.update(s for s in (str(v).strip() for v in values_of(elem)) if len(s) >= 3)
    return sorted(tokens, key=lambda t: (-len(t), t))


def transfer_syntax(ds: Dataset) -> UID:
    """The data set's transfer syntax: from its file meta, else from how pydicom read it."""
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


# ----------------------------------------------------------------------------------------- walker

class Walker:
    """Walks one data set in place (``walk``), each element's action from ``rules.plan`` / ``rules.code_for``."""

    def __init__(self, key: bytes, options: DeidOptions, ds: Dataset):
        self.key = key
        self.options = options
        self.columns = options.columns
        self.patient_key = rules.patient_key(ds)
        self.patient_pseudo = pseudo_id(key, self.patient_key, "patient")
        self.shift_days = date_shift_days(key, self.patient_key)
        self._scrubber: re.Pattern | None = None
        if options.clean_descriptors or options.retain_patient_characteristics:
            tokens = collect_identifiers(ds)
            if tokens:
                self._scrubber = re.compile("|".join(re.escape(t) for t in tokens), re.IGNORECASE)

    # --- walk
    def walk(self, ds: Dataset, depth: int = 0) -> None:
        creators: list[int] = []
        kept_blocks: set[tuple[int, int]] = set()
        columns, rmd, strict = self.columns, self.options.retain_modified_dates, self.options.strict
        for elem in list(ds):
            tag = int(elem.tag)
            code, row = rules.plan(tag, elem.VR, columns, rmd, strict)
            if code == "private":
                element = tag & 0xFFFF
                if 0x0010 <= element <= 0x00FF:
                    creators.append(tag)  # decided once the block's data elements are known
                elif element >= 0x1000 and self._safe_private(ds, tag, elem):
                    kept_blocks.add((tag >> 16, element >> 8))
                else:
                    del ds[tag]
            elif code == "patient_id":
                if depth == 0:
                    elem.value = self.patient_pseudo
                else:
                    v = str(elem.value or "").strip()
                    elem.value = pseudo_id(self.key, v, "patient") if v else ""
            elif code == "patient_name":
                if depth == 0:
                    elem.value = self.patient_pseudo
                else:  # nested: the item's own patient (its PatientID is still the original here)
                    v = str(ds.get("PatientID", "") or "").strip()
                    elem.value = pseudo_id(self.key, v, "patient") if v else ""
            else:
                self.apply(ds, elem, code, row, depth)
        for ctag in creators:
            if (ctag >> 16, ctag & 0xFF) not in kept_blocks:
                del ds[ctag]

    def _safe_private(self, ds: Dataset, tag: int, elem: DataElement) -> bool:
        if not self.options.retain_safe_private or elem.VR not in rules.SAFE_PRIVATE_VRS:
            return False
        group, element = tag >> 16, tag & 0xFFFF
        creator = ds.get((group << 16) | (element >> 8))
        if creator is None or not creator.value:
            return False
        return (str(creator.value).strip().upper(), group, element & 0xFF) in rules.SAFE_PRIVATE

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
        vals = values_of(elem)
        if vals:
            rules.set_values(elem, [uid_for(self.key, str(v)) if str(v).strip() else v for v in vals])

    def dummy(self, elem: DataElement, depth: int) -> None:
        vr = elem.VR
        if vr == "SQ":
            if elem.keyword.endswith("CodeSequence"):
                elem.value = Sequence([rules.dummy_code_item()])
            else:
                self.recurse(elem, depth)
        elif vr == "UI":
            if values_of(elem):
                self.map_uids(elem)
            else:
                elem.value = uid_for(self.key, f"dummy:{int(elem.tag):08X}")
        elif vr in rules.BINARY_VRS:
            elem.value = b"\0" * 8
        elif vr in rules.INT_VRS:
            elem.value = 0
        elif vr in rules.FLOAT_VRS:
            elem.value = 0.0
        elif vr == "AT":
            elem.value = 0
        else:
            elem.value = rules.DUMMY_BY_VR.get(vr, rules.DUMMY_TEXT)

    def clean(self, ds: Dataset, elem: DataElement, row: profile.Row | None, depth: int) -> None:
        vr = elem.VR
        sources = rules.clean_sources(row, self.columns)
        if vr == "SQ":
            self.recurse(elem, depth)
        elif vr in ("DA", "DT", "TM") and rules.DATES_COLUMN in sources:
            if vr != "TM":  # whole-day shift: times stay valid as they are
                shift = rules.shift_date if vr == "DA" else rules.shift_datetime
                rules.set_values(elem, [shift(v, self.shift_days) for v in values_of(elem)] or [""])
        elif vr == "AE":
            vals = values_of(elem)
            if vals:
                rules.set_values(elem, [pseudo_id(self.key, str(v).strip(), "ae")[:16] for v in vals])
        elif vr == "CS":
            pass  # enumerated / defined terms: already non-identifying
        elif vr in rules.FREE_TEXT_VRS and sources - {rules.DATES_COLUMN}:
            vals = values_of(elem)
            if vals:
                rules.set_values(elem, [self.scrub(str(v)) for v in vals])
        else:
            basic = rules.resolve(int(elem.tag), row.basic) if row is not None else "X"
            self.apply(ds, elem, "X" if basic == "C" else basic, row, depth)

    def scrub(self, text: str) -> str:
        if self._scrubber is not None:
            text = self._scrubber.sub("*", text)
        return _LONG_DIGITS.sub("*", _DATE_IN_TEXT.sub("*", text))


# ----------------------------------------------------------------------------------------- bytes to bytes

def deidentify_inplace(ds: Dataset, key: bytes, options: DeidOptions, demo: bool) -> dict:
    """De-identify a data set that passed the refusal checks, in place; returns ``info``."""
    ts = transfer_syntax(ds)
    original_study = str(ds.get("StudyInstanceUID", "") or "").strip()
    walker = Walker(key, options, ds)
    walker.walk(ds, 0)

    ds.PatientID = walker.patient_pseudo  # Type 2: present even if the source lacked it
    ds.PatientName = walker.patient_pseudo
    rules.mark_deidentified(ds, options, demo)
    clean_pixel_data(ds, ts)

    if getattr(ds, "file_meta", None) is not None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or uid_for(
            key, str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")))
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = rules.IMPLEMENTATION_VERSION
        ds.file_meta = meta
    if isinstance(ds, FileDataset):
        ds.preamble = b"\0" * 128  # the preamble may hold a TIFF header or anything else
        ds.filename = None

    return rules.deid_info(ds, pseudo_patient=walker.patient_pseudo,
                           pseudo_study=pseudo_id(key, original_study, "study"))


def deidentify(data: bytes, key: bytes, options: DeidOptions, demo: bool, *,
               read: Callable[[Dataset], Any] | None = None) -> tuple[bytes, dict]:
    """The reference path, bytes to ``(bytes, info)``; the output is not read back here (the caller does).
    ``read``: called with the data set as parsed, once it passed the refusal checks and before any change
    (``dicom.deidentify_bytes``' ``source``)."""
    # One parse of the whole file, every value decoded: empty_file / not_dicom / unreadable_dicom /
    # truncated_* / nesting_too_deep from parse; then the refusals (missing_attribute, missing_pixels /
    # missing_content for an object lacking what its SOP class needs - a file cut at an element boundary reads
    # as complete -, slide_label_image, burned_in_annotation).
    ds = parse(data)
    for check in rules.REFUSAL_CHECKS:
        check(ds)
    if read is not None:
        read(ds)
    info = deidentify_inplace(ds, key, options, demo)
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - values kept from the source that cannot be encoded
        raise BadInput("unwritable_dicom", f"the de-identified data set could not be written ({type(exc).__name__}); "
                       "the source holds values invalid for their VR, fix them at the source") from None
    return buf.getvalue(), info


__all__ = ["Walker", "deidentify", "deidentify_inplace", "collect_identifiers", "transfer_syntax"]
