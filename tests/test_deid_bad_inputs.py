"""The bad-input matrix of de-identification: each odd file is de-identified correctly or quarantined
with a reason; never a crash, never a half-written output, never PHI passed on because parsing failed.

Files are built from a synthetic CT carrying PHI everywhere real scanners put it (imaging_tasks.synth.phi)
and re-encoded or damaged the way real archives do it.
"""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from imaging_tasks.deid import deidentify_bytes
from imaging_tasks.deid.tree import deidentify_tree
from imaging_tasks.errors import BadInput
from imaging_tasks.phi_audit import dicom_identifying_values, find_leaks
from imaging_tasks.synth import phi

KEY = b"bad-input-test-key-0001"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ct(seed: int = 0):
    rng = np.random.default_rng(seed)
    study = phi.fake_study(rng, f"bad-{seed}")
    ds = phi.dicom_dataset(study, modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                           series_uid=phi.new_uid(rng), sop_uid=phi.new_uid(rng), series_number=1,
                           instance_number=1, series_description="Axial")
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(256, dtype=np.uint16) * 13 % 4096).astype("<u2").tobytes()
    return ds, study


def _bytes(ds, **kwargs) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, **kwargs)
    return buf.getvalue()


def _bare(ds) -> bytes:
    """The data set alone, implicit VR little endian: no preamble, no 'DICM', no file meta."""
    ds = ds.copy()
    ds.preamble = None
    del ds.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def _assert_clean(out: bytes, ds, study) -> pydicom.Dataset:
    """Output re-reads, is marked de-identified and carries none of the input's identifying values."""
    got = pydicom.dcmread(io.BytesIO(out))
    assert got.PatientIdentityRemoved == "YES"
    assert got.file_meta.MediaStorageSOPInstanceUID == got.SOPInstanceUID
    assert find_leaks(dicom_identifying_values(ds), out) == []
    assert study.patient.name.split("^")[0].encode() not in out
    assert not any(e.tag.is_private for e in got.iterall())
    return got


def test_no_preamble_is_de_identified():
    """A bare data set (no preamble, no DICM, no file meta), as old archives and some PACS exports hold."""
    ds, study = _ct(1)
    raw = _bare(ds)
    assert raw[128:132] != b"DICM"
    out, _info = deidentify_bytes(raw, KEY)
    got = _assert_clean(out, ds, study)
    assert out[128:132] == b"DICM" and got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, ds.pixel_array)


def test_meta_without_preamble_is_de_identified():
    ds, study = _ct(2)
    full = _bytes(ds, enforce_file_format=True)
    out, _ = deidentify_bytes(full[128:], KEY)  # 'DICM' + meta, no 128-byte preamble
    _assert_clean(out, ds, study)
    out2, _ = deidentify_bytes(full[132:], KEY)  # meta group without the 'DICM' prefix
    _assert_clean(out2, ds, study)


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_implicit_vr_and_big_endian(ts):
    ds, study = _ct(3)
    ds.file_meta.TransferSyntaxUID = ts
    raw = _bytes(ds, enforce_file_format=True, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian)
    out, _ = deidentify_bytes(raw, KEY)
    got = _assert_clean(out, ds, study)
    assert got.file_meta.TransferSyntaxUID == ts
    src = pydicom.dcmread(io.BytesIO(raw))
    assert np.array_equal(got.pixel_array, src.pixel_array)  # big-endian words kept in their byte order


def test_broken_private_creator_blocks():
    """Private data without a creator, an empty creator, a creator that is not text, a duplicated block."""
    ds, study = _ct(4)
    ds.add(DataElement(0x00091010, "LO", f"orphan {study.patient.name}"))  # no (0009,0010) creator
    ds.add(DataElement(0x00110010, "LO", ""))  # empty creator
    ds.add(DataElement(0x00111001, "LO", study.patient.patient_id))
    ds.add(DataElement(0x00130010, "UN", b"\xff\xfe\x00\x01"))  # creator stored as binary junk
    ds.add(DataElement(0x00131001, "UN", study.patient.name.encode()))
    ds.add(DataElement(0x00150010, "LO", "ACME 1.0"))
    ds.add(DataElement(0x00150011, "LO", "ACME 1.0"))  # same creator twice
    ds.add(DataElement(0x00151001, "LO", study.patient.name))
    ds.add(DataElement(0x00151101, "LO", study.accession))
    out, _ = deidentify_bytes(_bytes(ds, enforce_file_format=True), KEY)
    _assert_clean(out, ds, study)


def test_invalid_vr_values_never_crash_or_leak():
    ds, study = _ct(5)
    # control characters garbled into a coded string, in place (same length)
    raw = _bytes(ds, enforce_file_format=True).replace(b"MONOCHROME2", b"MONO\x00\x01ROME2")
    ds2, _ = _ct(5)
    ds2.SliceThickness, ds2.InstanceNumber, ds2.PatientAge = "9.875", "4321", "041Y"
    ds2.PatientBirthDate = "19330303"
    with pydicom.config.disable_value_validation():  # write what broken writers write
        ds2.StudyDescription = "x" * 300  # too long for LO
        ds2.SOPInstanceUID = ds2.SOPInstanceUID + ".A1"  # letters in a UID
        broken = _bytes(ds2, enforce_file_format=True)
    for good, bad in ((b"9.875", b"abc\x01e"), (b"4321", b"1.5x"), (b"041Y", b"fort"), (b"19330303", b"notadat")):
        assert broken.count(good) == 1
        broken = broken.replace(good, bad.ljust(len(good)))
    for data in (raw, broken):
        try:
            out, _ = deidentify_bytes(data, KEY)
        except BadInput as exc:
            assert exc.reason in {"unreadable_dicom", "unwritable_dicom", "missing_attribute"}, exc.reason
            assert study.patient.name not in exc.message
            continue
        _assert_clean(out, ds, study)


def test_huge_private_block_is_dropped():
    ds, study = _ct(6)
    ds.add(DataElement(0x00290010, "LO", "SIEMENS CSA HEADER"))
    big = np.random.default_rng(0).integers(0, 255, 48 << 20, dtype=np.uint8).tobytes()
    ds.add(DataElement(0x00291010, "OB", big[:24 << 20] + study.patient.name.encode() + big[24 << 20:]))
    raw = _bytes(ds, enforce_file_format=True)
    out, _ = deidentify_bytes(raw, KEY)
    _assert_clean(out, ds, study)
    assert len(out) < 64 * 1024


@pytest.mark.parametrize("cut", [0.05, 0.3, 0.6, 0.97, *np.linspace(0.06, 0.99, 40).round(3)])
def test_truncated_anywhere_is_refused_not_passed_on(cut):
    """Cut through the meta group, the patient module, a sequence or the pixels: refused with a reason."""
    ds, study = _ct(7)
    raw = _bytes(ds, enforce_file_format=True)
    data = raw[: int(len(raw) * cut)]
    with pytest.raises(BadInput) as err:
        deidentify_bytes(data, KEY)
    assert err.value.reason in {"unreadable_dicom", "truncated_file", "truncated_pixels", "missing_pixels",
                                "missing_attribute", "not_dicom"}
    assert study.patient.name not in err.value.message


def test_a_folder_of_bad_inputs_goes_on_and_loses_nothing(tmp_path):
    """Through the tree de-identifier: every file is either published or quarantined with a reason."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    files = {}
    ds, _ = _ct(8)
    raw = _bytes(ds, enforce_file_format=True)
    files["good.dcm"] = raw
    files["nopreamble.dcm"] = _bare(_ct(9)[0])
    files["empty.dcm"] = b""
    files["cut.dcm"] = raw[: len(raw) // 2]
    files["text.dcm"] = b"not a dicom file\n" * 20
    us, _ = _ct(10)
    us.Modality = "US"
    files["us.dcm"] = _bytes(us, enforce_file_format=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    report = deidentify_tree(src.as_uri(), dst.as_uri(), key=KEY, demo=False)
    reasons = sorted(q["reason"] for q in report["quarantined"])
    assert report["deidentified"] == 2
    assert reasons == sorted(["empty_file", "not_dicom", "truncated_file", "burned_in_annotation"])
    assert sum(1 for p in dst.rglob("*.dcm")) == 2
    assert not list(dst.rglob("*.tmp*"))  # no half-written output
    assert len(list((tmp_path / "dst-quarantine").rglob("reason.json"))) == 4
