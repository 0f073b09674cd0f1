"""Free text Table E.1-1 does not list, and strict mode (imaging_tasks/deid/allowlist.py).

Unlisted free text (LO, SH, ST, LT, UT, UC) is removed unless a reviewed allow-list names it (a few attributes
an IOD requires are emptied or get a dummy instead); strict mode keeps verbatim only allow-listed attributes.
The reference walker and the byte-level fast path make the same decisions (test_deid_stream.py runs its
whole corpus under strict mode too; here the two outputs are compared on the cases of this file).
"""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import test_deid_bad_inputs as tb
import test_deid_stream as ts
from imaging_tasks.deid import DeidOptions, deidentify_bytes
from imaging_tasks.deid import allowlist
from imaging_tasks.deid import profile, rules
from imaging_tasks.phi_audit import DICOM_IDENTIFYING, dicom_identifying_values, find_leaks

KEY = b"allow-list-test-key-01"
NAME = "Quintero^Pilar"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _both(data: bytes, options: DeidOptions = DeidOptions()) -> pydicom.Dataset:
    """De-identify by the fast path and by the reference alone; the two must agree element by element."""
    out_fast, info_fast = deidentify_bytes(data, KEY, options)
    out_ref, info_ref = deidentify_bytes(data, KEY, options, fast=False)
    a, b = pydicom.dcmread(io.BytesIO(out_ref)), pydicom.dcmread(io.BytesIO(out_fast))
    assert ts._same(a, b) is None and info_fast == info_ref, ts._same(a, b)
    for out in (out_fast, out_ref):
        assert b"Quintero" not in out and "Quintero".encode("utf-16-le") not in out
    return a


def _encapsulated_pdf() -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "DOC", NAME, "MRN-7731902"
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = f"Discharge letter for {NAME.replace('^', ' ')}"  # not in Table E.1-1
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "18842-5", "LN", "Discharge summary"
    ds.ConceptNameCodeSequence = Sequence([code])
    ds.EncapsulatedDocument = b"%PDF-1.4\n% fake document body\n"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_document_title_of_an_encapsulated_pdf():
    """The held-out case: DocumentTitle (Type 2, unlisted) kept the patient's name.  Now emptied; the coded
    title and the MIME type are kept (the document itself is listed: D, a dummy)."""
    got = _both(_encapsulated_pdf())
    assert "DocumentTitle" in got and got.DocumentTitle == ""
    assert got.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert got.ConceptNameCodeSequence[0].CodeMeaning == "Discharge summary"
    assert b"PDF" not in got.EncapsulatedDocument


def _ct_with_text() -> tuple[bytes, pydicom.Dataset]:
    ds, _study = tb._ct(40)
    ds.PatientName = NAME
    # unlisted free text: removed, or emptied / dummy where an IOD requires it
    ds.AcquisitionContextDescription = f"scanned for {NAME}"  # ST
    ds.add(DataElement(tag_for_keyword("BeamName"), "LO", "Quintero beam"))
    ds.add(DataElement(tag_for_keyword("ImageID"), "SH", "Quintero-1"))
    ds.add(DataElement(tag_for_keyword("ContentDescription"), "LO", f"{NAME} contours"))
    ds.add(DataElement(tag_for_keyword("SegmentLabel"), "LO", f"{NAME} liver"))
    ds.add(DataElement(tag_for_keyword("BodyPartExamined"), "LO", "Quintero"))  # a CS stored as LO: removed
    # allow-listed free text: kept
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "ACME_MED", "Scan 9000", "VA40"
    ds.RescaleType, ds.SequenceName, ds.ConvolutionKernel = "HU", "*fl3d1", "B30f"
    anatomy = Dataset()
    anatomy.CodeValue, anatomy.CodingSchemeDesignator, anatomy.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = Sequence([anatomy])
    # the same unlisted free text nested in a kept sequence
    ref_item = Dataset()
    ref_item.ReferencedSOPClassUID, ref_item.ReferencedSOPInstanceUID = ds.SOPClassUID, generate_uid()
    ref_item.AcquisitionContextDescription = f"nested {NAME}"
    ref_item.add(DataElement(tag_for_keyword("ContentDescription"), "LO", f"nested {NAME}"))
    ds.ReferencedImageSequence = Sequence([ref_item])
    ds.add(DataElement(0x00189073, "FD", 12.5))  # Acquisition Duration: unlisted, technical, not on the strict list
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), ds


def test_unlisted_free_text_removed_unless_allow_listed():
    data, src = _ct_with_text()
    got = _both(data)
    for kw in ("AcquisitionContextDescription", "BeamName", "ImageID", "BodyPartExamined"):
        assert kw not in got, kw
    assert got.ContentDescription == "" and got.SegmentLabel == rules.DUMMY_TEXT
    for kw in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "RescaleType", "SequenceName",
               "ConvolutionKernel"):
        assert got[kw].value == src[kw].value, kw
    assert got.AnatomicRegionSequence[0].CodeMeaning == "Chest"
    nested = got.ReferencedImageSequence[0]
    assert "AcquisitionContextDescription" not in nested and nested.ContentDescription == ""
    assert got.AcquisitionDuration == 12.5  # not text: the basic profile keeps what the table does not list


def test_strict_mode_keeps_only_allow_listed_attributes():
    data, src = _ct_with_text()
    options = DeidOptions(strict=True)
    got = _both(data, options)
    assert rules.STRICT_TEXT in got.DeidentificationMethod
    assert "AcquisitionDuration" not in got and "AnatomicRegionSequence" in got
    kept_by_profile = {0x00100010, 0x00100020, 0x00120062, 0x00120063, 0x00120064, 0x00280303}
    for elem in got.iterall():
        tag = int(elem.tag)
        row = profile.by_tag().get(tag)
        code = rules.code_for(tag, elem.VR, options.columns, options.retain_modified_dates, True)[0]
        if tag in kept_by_profile or (row is not None and code != "K") or tag in allowlist.TEXT_REQUIRED:
            continue  # written by the profile: pseudonyms, mapped UIDs, shifted dates, dummies, emptied
        if elem.VR in ("DA", "DT") and row is None:
            continue  # unlisted dates: shifted
        assert tag in allowlist.STRICT_ALLOWED, (elem.keyword, f"{tag:08X}")
    # an option the caller enabled still retains what it names
    src.StationName = "CT-ROOM-7"
    buf = io.BytesIO()
    src.save_as(buf, enforce_file_format=True)
    got = _both(buf.getvalue(), DeidOptions(strict=True, retain_device_identity=True))
    assert got.StationName == "CT-ROOM-7"


def test_strict_mode_keeps_what_the_pipeline_reads():
    """The processors (cardio, mammo, neuro, preconditions), the index and the warehouse header summary read
    these; in strict mode each is kept verbatim, or written by the profile (UIDs, IDs, dates)."""
    read_by_pipeline = {
        "BitsAllocated", "BitsStored", "BurnedInAnnotation", "CodeMeaning", "ImageLaterality",
        "ImageOrientationPatient",
        "ImagePositionPatient", "ImageType", "ImagerPixelSpacing", "InstanceNumber", "Laterality", "Modality",
        "NumberOfFrames", "PhotometricInterpretation", "PixelData", "PixelRepresentation", "PixelSpacing",
        "PresentationIntentType", "RescaleIntercept", "RescaleSlope", "SamplesPerPixel", "SequenceName",
        "SeriesNumber", "SliceThickness", "SOPClassUID", "ViewCodeSequence", "ViewPosition", "Rows", "Columns",
        "CodeValue", "CodingSchemeDesignator", *rules.HEADER_FIELDS}
    for kw in sorted(read_by_pipeline):
        tag = int(tag_for_keyword(kw))
        code = rules.code_for(tag, dictionary_VR(tag), DeidOptions().columns, True, True)[0]
        assert code != "X" or profile.by_tag().get(tag) is not None, kw  # removed only where the table says so
    # on a real image, the header summary the warehouse stores is the same in strict mode
    data, _src = _ct_with_text()
    for fast in (True, False):
        default = deidentify_bytes(data, KEY, fast=fast)[1]["header"]
        strict = deidentify_bytes(data, KEY, DeidOptions(strict=True), fast=fast)[1]["header"]
        assert strict == default


def test_allow_lists_are_consistent():
    """Every keyword resolves (checked at import); text allow-list entries are unlisted free-text attributes;
    no attribute the audit treats as identifying is allow-listed."""
    free_text = {"LO", "SH", "ST", "LT", "UT", "UC"}
    for tag in allowlist.TEXT_ALLOWED | set(allowlist.TEXT_REQUIRED):
        assert dictionary_VR(tag) in free_text, keyword_for_tag(tag)
        assert tag not in profile.by_tag(), keyword_for_tag(tag)  # the table decides listed attributes
    for tag in allowlist.STRICT_ALLOWED | set(allowlist.TEXT_REQUIRED):
        assert keyword_for_tag(tag) not in DICOM_IDENTIFYING, keyword_for_tag(tag)
    assert allowlist.TEXT_ALLOWED <= allowlist.STRICT_ALLOWED
    assert not set(allowlist.TEXT_REQUIRED) & allowlist.STRICT_ALLOWED


def test_cli_strict_option(tmp_path):
    from imaging_tasks.cli import OPTION_FLAGS, build_parser
    from imaging_tasks.deid.tree import deidentify_tree

    args = build_parser().parse_args(["deidentify", "src", "dst", "--option", "strict"])
    assert DeidOptions(**{OPTION_FLAGS[o]: True for o in args.option}).strict
    (tmp_path / "src").mkdir()
    data, src = _ct_with_text()
    (tmp_path / "src" / "ct.dcm").write_bytes(data)
    report = deidentify_tree(tmp_path / "src", tmp_path / "dst", key=KEY, demo=False, options=DeidOptions(strict=True))
    assert report["deidentified"] == 1 and "strict" in report["options"]
    out = next((tmp_path / "dst").rglob("*.dcm")).read_bytes()
    assert find_leaks(dicom_identifying_values(src), out) == []
    got = pydicom.dcmread(io.BytesIO(out))
    assert "AcquisitionDuration" not in got and np.array_equal(got.pixel_array, src.pixel_array)
