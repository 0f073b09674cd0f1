"""Character sets and DICOM whole-slide images in de-identification.

Character sets: pydicom's own charset test files (Japanese ISO 2022, Korean, Chinese GB18030, Greek,
Hebrew, Arabic, Cyrillic, UTF-8...) and a synthetic Latin-1 file: outputs decode cleanly under their
declared SpecificCharacterSet, names are gone in every encoding, and cleaned descriptions stay valid.
DICOM WSI: LABEL and OVERVIEW instances (photos of the slide label) are refused, VOLUME instances pass.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.charset import decode_element
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from imaging_tasks.deid import DeidOptions, deidentify_bytes
from imaging_tasks.errors import BadInput
from imaging_tasks.phi_audit import dicom_identifying_values, find_leaks

KEY = b"charset-test-key-0001"
TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _decodes_cleanly(out: bytes) -> pydicom.Dataset:
    """Every text value of the output decodes under the output's own SpecificCharacterSet."""
    ds = pydicom.dcmread(io.BytesIO(out))
    charsets = ds.get("SpecificCharacterSet", "ISO_IR 6")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns (and replaces) on undecodable bytes
        for elem in ds.iterall():
            if elem.VR in TEXT_VRS:
                decode_element(elem, charsets)
    return ds


CHARSET_FILES = sorted(f for f in get_charset_files() if f.endswith(".dcm"))


@pytest.mark.parametrize("path", CHARSET_FILES, ids=lambda p: p.rsplit("/", 1)[-1])
@pytest.mark.parametrize("options", [DeidOptions(), DeidOptions(clean_descriptors=True,
                                                                retain_patient_characteristics=True)],
                         ids=["basic", "clean-descriptors"])
def test_pydicom_charset_files(path, options):
    src = pydicom.dcmread(path)
    # These are secondary-capture headers without pixels, refused for burned-in text; the subject here is
    # text encoding, so relabel them as Raw Data (the header text, in its own character set, is untouched).
    src.SOPClassUID = src.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66"
    src.Modality = "OT"
    if "PixelData" not in src:  # a header without pixels: no image pixel module either
        for kw in ("SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "Rows", "Columns",
                   "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
            if kw in src:
                del src[kw]
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not src.get(kw):
            setattr(src, kw, generate_uid())
    data = _bytes(src)
    src = pydicom.dcmread(io.BytesIO(data))
    out, _ = deidentify_bytes(data, KEY, options)
    ds = _decodes_cleanly(out)
    assert ds.get("SpecificCharacterSet") == src.get("SpecificCharacterSet")
    assert find_leaks(dicom_identifying_values(src), out) == []
    if "PatientName" in src and str(src.PatientName):
        assert str(ds.PatientName).startswith("P") and str(ds.PatientName) != str(src.PatientName)


def _latin1_dataset() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID = "Müller^Jürgen", "Müller-4711-Ä"
    ds.StudyDescription = "Kontrolle Müller Jürgen 12.03.2024"
    ds.SeriesDescription = "Thorax Übersicht"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.SOPClassUID = "OT", "1.2.840.10008.5.1.4.1.1.66"  # Raw Data: a header without pixels
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_latin1_names_and_cleaned_descriptions():
    src = _latin1_dataset()
    data = _bytes(src)
    assert "Müller".encode("latin-1") in data
    out, _ = deidentify_bytes(data, KEY, DeidOptions(clean_descriptors=True))
    ds = _decodes_cleanly(out)
    assert "Müller".encode("latin-1") not in out and "Müller".encode() not in out
    assert "Müller" not in ds.StudyDescription and "12.03.2024" not in ds.StudyDescription
    assert ds.SeriesDescription == "Thorax Übersicht"  # non-identifying non-ASCII text survives, still Latin-1
    assert "Übersicht".encode("latin-1") in out


def _wsi(image_type: list[str], **extra) -> bytes:
    ds = _latin1_dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image
    ds.Modality, ds.ImageType = "SM", image_type
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.full((4, 4, 3), 200, np.uint8).tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    return _bytes(ds)


@pytest.mark.parametrize("image_type", [["ORIGINAL", "PRIMARY", "LABEL", "NONE"],
                                        ["ORIGINAL", "PRIMARY", "OVERVIEW", "NONE"]])
def test_dicom_wsi_label_and_overview_are_refused(image_type):
    with pytest.raises(BadInput) as err:
        deidentify_bytes(_wsi(image_type), KEY)
    assert err.value.reason == "slide_label_image"
    assert "Müller" not in err.value.message


def test_dicom_wsi_volume_passes_unless_the_label_is_in_it():
    out, info = deidentify_bytes(_wsi(["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]), KEY)
    ds = _decodes_cleanly(out)
    assert ds.PatientIdentityRemoved == "YES" and info["modality"] == "SM"
    assert np.array_equal(ds.pixel_array, np.full((4, 4, 3), 200, np.uint8))
    with pytest.raises(BadInput, match="label"):
        deidentify_bytes(_wsi(["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], SpecimenLabelInImage="YES"), KEY)
