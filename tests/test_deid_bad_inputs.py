"""The bad-input matrix of de-identification: each odd file is de-identified correctly or quarantined
with a reason; never a crash, never a half-written output, never PHI passed on because parsing failed.

Files are built from a synthetic CT carrying PHI everywhere real scanners put it (imaging_tasks.synth.phi)
and re-encoded or damaged the way real archives do it.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

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


# ----------------------------------------------------------------------------------------- crash-proof batches
# Every per-file failure is a BadInput, from de-identification and from the audit's header read alike (the
# pipeline catches only BadInput); see imaging_tasks/dicom_io.py for what "complete" means.

def _refusals(data: bytes, *, header_too: bool = False) -> set[str]:
    """The reason(s) deidentify_bytes gives (fast path and reference alone); the audit's header read (which
    stops before Pixel Data) either reads the header or raises BadInput (``header_too``: must raise).
    Anything but BadInput fails the test."""
    from imaging_tasks.dicom_io import read_header

    reasons = set()
    for fast in (True, False):
        with pytest.raises(BadInput) as err:
            deidentify_bytes(data, KEY, fast=fast)
        reasons.add(err.value.reason)
    try:
        dicom_identifying_values(read_header(data))
        assert not header_too, "the header read accepted it"
    except BadInput:
        pass
    return reasons


def _deep(depth: int, *, undefined: bool, implicit: bool) -> tuple[bytes, str]:
    import test_deid_fuzz as tf

    ds, study = _ct(20)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    raw = _bytes(ds, enforce_file_format=True)
    elems, _info = tf.elements(raw)
    return tf._insert_top(raw, elems, 0x00081140, tf._nested(depth, "DEEPPHI01", undefined=undefined,
                                                               implicit=implicit)), study.patient.name


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined-lengths", "defined-lengths"])
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_nesting_limit(undefined, implicit):
    """64 levels of sequences are de-identified (and read back); 65, 200 and 1,000 are refused, never a
    RecursionError, whatever the entry point."""
    from imaging_tasks.dicom_io import MAX_NESTING, read_header

    assert MAX_NESTING == 64
    data, _name = _deep(64, undefined=undefined, implicit=implicit)
    out, _ = deidentify_bytes(data, KEY)
    out_ref, _ = deidentify_bytes(data, KEY, fast=False)
    assert dicom_identifying_values(read_header(data))  # the audit reads it too
    for o in (out, out_ref):
        got = pydicom.dcmread(io.BytesIO(o))
        item, depth = got, 0
        while "ReferencedImageSequence" in item:
            item, depth = item.ReferencedImageSequence[0], depth + 1
        assert depth == 64 and b"DEEPPHI01" not in o  # nested name and free text cleaned at the bottom
    for depth in (65, 200, 1000):
        data, name = _deep(depth, undefined=undefined, implicit=implicit)
        assert _refusals(data, header_too=True) == {"nesting_too_deep"}, depth


def test_garbled_structure_is_refused_everywhere():
    """The issue's abort signatures: unknown VR bytes, a delimiter appended after the data set, an explicit-VR
    file labelled implicit, native pixels labelled compressed, a cut header."""
    import test_deid_fuzz as tf

    ds, study = _ct(21)
    raw = _bytes(ds, enforce_file_format=True)
    i = raw.index(b"\x10\x00\x10\x00PN")  # PatientName
    cases = {
        "unknown VR": raw[:i + 4] + b"ZZ" + raw[i + 6:],
        "appended sequence delimiter": raw + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",
        "appended item delimiter": raw + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00",
        "cut header": raw + b"\x20\x00",
    }
    for what, data in cases.items():
        assert data != raw, what
        reasons = _refusals(data, header_too=what == "unknown VR")
        assert reasons <= {"unreadable_dicom", "truncated_file"}, (what, reasons)
    assert _refusals(tf._with_ts(raw, "1.2.840.10008.1.2.4.90")) == {"wrong_transfer_syntax"}
    assert _refusals(cases["cut header"]) == {"truncated_file"}
    # explicit VR data labelled implicit: pydicom reads it by what it finds; either refused or de-identified clean
    relabelled = tf._with_ts(raw, "1.2.840.10008.1.2")
    for fast in (True, False):
        try:
            out, _ = deidentify_bytes(relabelled, KEY, fast=fast)
        except BadInput as exc:
            assert exc.reason in {"unreadable_dicom", "truncated_file"}
            continue
        _assert_clean(out, ds, study)
        tf.read_back(out)


def _top_level_boundaries(raw: bytes) -> list[tuple[int, int]]:
    import test_deid_fuzz as tf

    elems, _ = tf.elements(raw)
    return [(e["tag"], e["start"]) for e in elems if e["depth"] == 0]


@pytest.mark.parametrize("name", ["rtdose.dcm", "rtplan.dcm", "CT_small.dcm", "waveform_ecg.dcm"])
def test_cut_at_every_element_boundary(name):
    """A file cut exactly between two top-level elements reads as complete; what it lost tells: images and RT
    Dose grids need Pixel Data, RT Plans their beams, waveforms their Waveform Sequence (REQUIRED_CONTENT).
    Cuts inside an element header are refused as truncated.  A cut that removes only optional trailing
    attributes (an RT Plan's patient setups, its approval) leaves no trace and is published."""
    from pydicom.data import get_testdata_files

    from imaging_tasks.deid.rules import REQUIRED_CONTENT

    raw = Path(get_testdata_files(name)[0]).read_bytes()
    src = pydicom.dcmread(io.BytesIO(raw))
    required = [t for tags in REQUIRED_CONTENT.get(str(src.SOPClassUID), ()) for t in tags] + [0x7FE00010]
    last_required = max(i for i, (tag, _start) in enumerate(_top_level_boundaries(raw)) if tag in required)
    for i, (tag, start) in enumerate(_top_level_boundaries(raw)):
        reasons = set()
        for fast in (True, False):
            try:
                deidentify_bytes(raw[:start], KEY, fast=fast)
                reasons.add("published")
            except BadInput as exc:
                reasons.add(exc.reason)
        assert len(reasons) == 1, (name, f"{tag:08X}", reasons)
        if i <= last_required:
            assert reasons <= {"missing_attribute", "missing_pixels", "missing_content"}, (name, f"{tag:08X}", reasons)
        else:
            assert reasons == {"published"}, (name, f"{tag:08X}", reasons)
        for extra in (1, 4, 7):  # a few bytes of the next element's header
            expected = {"truncated_file"} if i else {"missing_attribute"}  # i == 0: nothing but a cut header
            assert _refusals(raw[:start + extra]) == expected, (name, f"{tag:08X}", extra)


def test_group_length_reveals_a_cut_at_an_element_boundary():
    """Where the last group declares its length (old writers do, every group), a cut between two of its
    elements is refused; without the group length the same cut is undetectable (see the test above)."""
    from pydicom.data import get_testdata_files

    import struct

    plain = Path(get_testdata_files("rtplan.dcm")[0]).read_bytes()  # implicit VR little endian
    boundaries = dict(_top_level_boundaries(plain))
    start = boundaries[min(t for t in boundaries if t >> 16 == 0x300A)]
    body = plain[start:boundaries[0x300C0002]]  # the whole 300A group
    with_gl = plain[:start] + struct.pack("<HHLL", 0x300A, 0, 4, len(body)) + plain[start:]  # (300A,0000) UL
    cut_at = dict(_top_level_boundaries(with_gl))[0x300A0180]  # after the beams, before the patient setups
    cut_plain = dict(_top_level_boundaries(plain))[0x300A0180]
    deidentify_bytes(plain[:cut_plain], KEY)  # no group length: published (nothing to tell)
    assert _refusals(with_gl[:cut_at]) == {"truncated_file"}
    deidentify_bytes(with_gl, KEY)  # the whole file, group length and all, is fine


def test_unexpected_errors_become_bad_inputs(monkeypatch):
    """An exception nobody foresaw, on one file: BadInput("deid_error") naming its type and code location,
    never its message (which may quote a value); the fast path hands such files to the reference."""
    from imaging_tasks.deid import reference, stream

    ds, study = _ct(22)
    data = _bytes(ds, enforce_file_format=True)
    good, _ = deidentify_bytes(data, KEY)

    def boom(*_a, **_k):
        raise ValueError(f"cannot handle {study.patient.name}")

    monkeypatch.setattr(stream._Rewriter, "dataset", boom)
    assert deidentify_bytes(data, KEY)[0] == good  # the reference path wrote it, the same bytes
    monkeypatch.setattr(reference, "deidentify_inplace", boom)
    with pytest.raises(BadInput) as err:
        deidentify_bytes(data, KEY)
    assert err.value.reason == "deid_error" and "ValueError" in err.value.message
    assert study.patient.name not in err.value.message and study.patient.name.split("^")[0] not in str(err.value)


def test_a_folder_accounts_for_every_input(tmp_path, monkeypatch):
    """Relative SRC/DST/quarantine; hidden files and folders listed as skipped; two inputs that would write the
    same instance with different content never overwrite each other; one input failing unexpectedly is
    quarantined and the batch goes on."""
    from imaging_tasks.deid import dicom as ref
    from imaging_tasks.deid.pseudonym import pseudo_id

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src"
    ds, _ = _ct(23)
    twin = pydicom.dcmread(io.BytesIO(_bytes(ds, enforce_file_format=True)))
    twin.PixelData = bytes(len(ds.PixelData))  # same instance UID, other pixels
    files = {"a/good.dcm": _bytes(ds, enforce_file_format=True), "a/twin.dcm": _bytes(twin, enforce_file_format=True),
             "a/copy.dcm": _bytes(ds, enforce_file_format=True),
             "b/boom.dcm": _bytes(_ct(24)[0], enforce_file_format=True),
             "b/deep.dcm": _deep(65, undefined=True, implicit=False)[0], ".hidden.dcm": b"x", "_truth/t.json": b"{}",
             "a/.git/HEAD": b"ref", "a/_notes.txt": b"notes"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    import imaging_tasks.deid.tree as tree

    real = tree.deidentify_bytes

    def flaky(data, *a, **k):  # a bug that bypasses deidentify_bytes' own boundary: the tree's catches it
        if data == files["b/boom.dcm"]:
            raise KeyError("unexpected")
        return real(data, *a, **k)

    monkeypatch.setattr(tree, "deidentify_bytes", flaky)
    report = deidentify_tree("src", "dst", key=KEY, demo=False, quarantine="q", options=ref.DeidOptions())
    ident = {pseudo_id(KEY, rel, "input"): rel for rel in files}
    got = {ident[e["input"]]: ("deidentified", None) for e in report["deidentified_files"]}
    got.update({ident[e["input"]]: ("quarantined", e["reason"]) for e in report["quarantined"]})
    got.update({ident[e["input"]]: ("skipped", e["reason"]) for e in report["skipped"]})
    assert report["inputs"] == len(files) == len(got)
    first_twin = min("a/good.dcm", "a/twin.dcm")  # listing order: the first one is written
    assert got[first_twin] == ("deidentified", None) and got["a/copy.dcm"] == ("deidentified", None)
    assert got[max("a/good.dcm", "a/twin.dcm")] == ("quarantined", "duplicate_instance")
    assert got["b/boom.dcm"] == ("quarantined", "deid_error")
    assert got["b/deep.dcm"] == ("quarantined", "nesting_too_deep")
    for rel in (".hidden.dcm", "_truth/t.json", "a/.git/HEAD", "a/_notes.txt"):
        assert got[rel] == ("skipped", "hidden_name")
    assert len(list((tmp_path / "dst").rglob("*.dcm"))) == 1 and (tmp_path / "q").is_dir()
    assert not any(rel.split("/")[-1] in json.dumps(report) for rel in files)  # names never in the report
