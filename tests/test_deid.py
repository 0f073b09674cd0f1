"""De-identification: every PS3.15 E.1-1 row, nesting, cross-file consistency, pixels, slides."""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.dataelem import DataElement
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imaging_tasks.deid import (DEMO_KEY, DeidOptions, date_shift_days, deidentify_bytes, deidentify_dataset,
                                deidentify_svs, load_key, pseudo_id, uid_for)
from imaging_tasks.deid.keys import MissingKey
from imaging_tasks.errors import BadInput
from imaging_tasks.synth import phi

KEY = b"unit-test-key-0001"
KEY2 = b"unit-test-key-0002"
CT = "1.2.840.10008.5.1.4.1.1.2"
UID_RE = re.compile(r"^2\.25\.(0|[1-9]\d*)$")
TABLE = json.loads((Path(__file__).resolve().parents[1] / "imaging_tasks/data/dicom_ps3.15_table_e1-1.json")
                   .read_text())
OPTION_COLUMN = {"retain_modified_dates": "rtnLongModifDatesOpt", "clean_descriptors": "cleanDescOpt",
                 "retain_uids": "rtnUIDsOpt", "retain_device_identity": "rtnDevIdOpt",
                 "retain_patient_characteristics": "rtnPatCharsOpt",
                 "retain_institution_identity": "rtnInstIdOpt", "retain_safe_private": "rtnSafePrivOpt"}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------------------- helpers

def make_ct(study, rng, *, series_uid=None, sop_uid=None, instance=1, bits_stored=12, signed=False):
    ds = phi.dicom_dataset(study, modality="CT", sop_class_uid=CT, series_uid=series_uid or phi.new_uid(rng),
                           sop_uid=sop_uid or phi.new_uid(rng), series_number=2, instance_number=instance,
                           series_description=f"Axial chest {study.patient.name.split('^')[0]}")
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.25
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, instance * 1.25], [1, 0, 0, 0, 1, 0]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (np.arange(64, dtype=np.uint16) * 50).tobytes()
    return ds


def to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read(data: bytes):
    return pydicom.dcmread(io.BytesIO(data), force=True)  # force: a few pydicom test files have no preamble


def shifted(date: str, days: int) -> str:
    return (dt.datetime.strptime(date, "%Y%m%d").date() + dt.timedelta(days=days)).strftime("%Y%m%d")


def is_empty(value) -> bool:
    return value is None or value == "" or value == b"" or (isinstance(value, (list, Sequence)) and len(value) == 0)


def plant_value(i: int, vr: str):
    text = f"PHI{i:03d}Q"
    if vr in ("AE", "CS", "SH"):
        return text
    if vr in ("LO", "LT", "ST", "UT", "UC"):
        return text + " free text"
    return {"PN": f"Phi{i:03d}^Quux", "DA": "20230115", "TM": "101112", "DT": "20230115101112",
            "UI": f"1.2.3.999.{i}", "DS": "12.5", "IS": "7", "AS": "045Y", "UR": f"http://example.org/phi{i:03d}q",
            "US": 7, "SS": 7, "UL": 7, "SL": 7, "SV": 7, "UV": 7, "FL": 1.5, "FD": 1.5}.get(vr) \
        if vr not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") else f"PHI{i:03d}Q".encode()


def planted_dataset():
    """A CT carrying a value in every single-tag row of Table E.1-1 that pydicom can hold."""
    rng = np.random.default_rng(7)
    ds = make_ct(phi.fake_study(rng, "study-rows"), rng)
    planted, skipped = {}, []
    for i, row in enumerate(TABLE):
        if len(row["id"]) != 8 or not re.fullmatch(r"[0-9a-f]{8}", row["id"]):
            continue  # pattern rows are tested separately
        tag = int(row["id"], 16)
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            skipped.append(row["tag"])
            continue
        if tag >> 16 in (0x0000, 0x0002) or " or " in vr or vr == "AT":
            skipped.append(row["tag"])  # command/file-meta groups can't sit in a stored data set
            continue
        if vr == "SQ":
            item = Dataset()
            item.PatientAddress = f"PHI{i:03d}QSQ"  # X with no option retaining it
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "C1", "99T", "meaning"
            value = Sequence([item])
        else:
            value = plant_value(i, vr)
        ds.add(DataElement(tag, vr, value))
        planted[tag] = (row, vr, value)
    return ds, planted, skipped


def expected_codes(row: dict, options: DeidOptions) -> set[str]:
    """What the table allows for this row under ``options`` (independent of the implementation)."""
    cols = {OPTION_COLUMN[n] for n in OPTION_COLUMN if getattr(options, n)}
    opt = {row[c] for c in cols if c in row}
    if "K" in opt:
        return {"K"}
    if "C" in opt:
        return {"C"}
    return set(row["basicProfile"].replace("U*", "U").split("/"))


def outcome_ok(code: str, out, tag: int, vr: str, planted, ctx) -> bool:
    present = tag in out
    value = out[tag].value if present else None
    if code == "X":
        return not present
    if code == "Z":
        return present and is_empty(value)
    if code == "K":
        if vr == "SQ":
            return present and len(value) == 1
        return present and str(value) == str(planted) if not isinstance(planted, bytes) else value == planted
    if code == "U":
        if vr == "SQ":  # X/Z/U*: kept, contained UIDs replaced, items cleaned
            return present and all("PatientAddress" not in item for item in value)
        return present and str(value) == uid_for(KEY, planted)
    if code == "D":
        if not present or is_empty(value):
            return False
        if vr == "SQ":  # dummy code item, or items kept and cleaned
            return all("PatientAddress" not in item for item in value)
        return value != planted and str(value) != str(planted)
    if code == "C":
        if vr in ("DA", "DT"):
            return present and str(value) == shifted(planted[:8], ctx["shift"]) + planted[8:]
        if vr == "TM":
            return present and str(value) == planted  # whole-day shift keeps the time of day
        if vr == "AE":
            return present and value != planted and 0 < len(value) <= 16
        if vr == "SQ":
            return present and all("PatientAddress" not in item for item in value)
        if vr in ("LO", "LT", "ST", "UT", "UC", "SH", "CS") and ctx["c_cols"] - {"rtnLongModifDatesOpt"}:
            return present and not is_empty(value)
        # C on a VR with no meaningful clean (OB timestamps, SH offset): the basic code applies
        return any(outcome_ok(c, out, tag, vr, planted, ctx) for c in ctx["basic"])
    raise AssertionError(code)


# ----------------------------------------------------------------------------------------- table rows

ALL_ON = DeidOptions(retain_modified_dates=True, retain_patient_characteristics=True, retain_device_identity=True,
                     retain_institution_identity=True, clean_descriptors=True, retain_uids=True,
                     retain_safe_private=True)


@pytest.mark.parametrize("options", [DeidOptions(), DeidOptions(retain_modified_dates=False), ALL_ON],
                         ids=["default", "no-dates", "all-options"])
def test_every_table_row_is_acted_on(options):
    ds, planted, skipped = planted_dataset()
    assert len(planted) >= 600 and len(skipped) <= 5, skipped
    pid = str(ds.PatientID)
    data, info = deidentify_bytes(to_bytes(ds), KEY, options)
    out = read(data)
    ctx = {"shift": date_shift_days(KEY, pid)}
    failures, seen = [], set()
    for tag, (row, vr, value) in planted.items():
        if tag in (0x00100010, 0x00100020):  # PatientName / PatientID: keyed pseudonym (a D dummy)
            assert out[tag].value == pseudo_id(KEY, pid, "patient")
            continue
        codes = expected_codes(row, options)
        ctx["basic"] = set(row["basicProfile"].replace("U*", "U").split("/"))
        ctx["c_cols"] = {OPTION_COLUMN[n] for n in OPTION_COLUMN
                         if getattr(options, n) and row.get(OPTION_COLUMN[n]) == "C"}
        if not any(outcome_ok(c, out, tag, vr, value, ctx) for c in codes):
            failures.append((row["tag"], row["name"], row["basicProfile"], sorted(codes), vr,
                             repr(out[tag].value)[:40] if tag in out else "<removed>"))
        seen.update(codes)
    assert not failures, failures[:20]
    assert {"X", "Z", "D", "U"} <= seen
    if options == DeidOptions():
        # Nothing planted survives in the raw bytes (text markers, dates, UIDs, binary values)
        assert b"PHI" not in data and b"Phi0" not in data
        assert b"20230115" not in data and b"1.2.3.999." not in data
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == ("MODIFIED" if options.retain_modified_dates else "REMOVED")
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert "113100" in codes and ("113107" in codes) == options.retain_modified_dates
    assert ("113110" in codes) == options.retain_uids
    assert "DEMO KEY" not in " ".join(out.DeidentificationMethod)


def test_pattern_rows_curves_overlays_private():
    rng = np.random.default_rng(3)
    ds = make_ct(phi.fake_study(rng, "study-pat"), rng)
    ds.add_new(0x50000010, "US", 5)  # curve group
    ds.add_new(0x50003000, "OW", b"CURVEPHI")
    ds.add_new(0x60000010, "US", 8)  # overlay group
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    ds.add_new(0x60004000, "LT", "OVERLAYPHI comment")
    ds.add_new(0x00091010, "LO", "PRIVNOCREATOR")
    out = read(deidentify_bytes(to_bytes(ds), KEY)[0])
    groups = {e.tag.group for e in out}
    assert not any(g & 0xFF00 in (0x5000, 0x6000) for g in groups)
    assert not any(g & 1 for g in groups)
    assert b"SYNTHCO" not in to_bytes(out) and b"OVERLAYPHI" not in to_bytes(out)


# ----------------------------------------------------------------------------------------- structure

def test_nested_sequences_three_deep_and_cross_file_references():
    rng = np.random.default_rng(11)
    study = phi.fake_study(rng, "study-nest")
    series = phi.new_uid(rng)
    a = make_ct(study, rng, series_uid=series, instance=1)
    b = make_ct(study, rng, series_uid=series, instance=2)
    a_sop = str(a.SOPInstanceUID)
    # B refers to A at depths 1, 2 and 3, with identifiers planted at each depth.
    item3 = Dataset()
    item3.ReferencedSOPInstanceUID = a_sop
    item3.PatientAddress = "NEST3 Quarry Road"
    item3.SecondaryReviewerName = "Nestor^Third"  # PN not listed in E.1-1: removed anyway
    item3.TextValue = "NEST3 text about " + study.patient.name
    item3.ContentDate = "20240102"
    item2 = Dataset()
    item2.ReferencedSOPClassUID = CT
    item2.ReferencedSOPInstanceUID = a_sop
    item2.AccessionNumber = "NEST2ACC"
    item2.PurposeOfReferenceCodeSequence = Sequence([item3])
    blk = item2.private_block(0x0011, "NESTED PRIV", create=True)
    blk.add_new(0x01, "LO", "NEST2PRIVATE")
    item1 = Dataset()
    item1.SeriesInstanceUID = series
    item1.OperatorsName = "Nestor^First"
    item1.ReferencedInstanceSequence = Sequence([item2])
    b.ReferencedSeriesSequence = Sequence([item1])
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT, a_sop
    b.ReferencedImageSequence = Sequence([ref])
    b.SourceImageSequence = Sequence([copy.deepcopy(ref)])

    a_bytes, a_info = deidentify_bytes(to_bytes(a), KEY)
    b_bytes, b_info = deidentify_bytes(to_bytes(b), KEY)
    ao, bo = read(a_bytes), read(b_bytes)
    new_a = str(ao.SOPInstanceUID)
    assert new_a == a_info["sop_uid"] == uid_for(KEY, a_sop) and UID_RE.match(new_a)
    assert ao.file_meta.MediaStorageSOPInstanceUID == new_a
    assert bo.file_meta.MediaStorageSOPInstanceUID == bo.SOPInstanceUID != new_a
    assert bo.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new_a
    assert bo.SourceImageSequence[0].ReferencedSOPInstanceUID == new_a
    assert ao.StudyInstanceUID == bo.StudyInstanceUID == a_info["study_uid"] != study.study_uid
    assert ao.SeriesInstanceUID == bo.SeriesInstanceUID
    assert ao.FrameOfReferenceUID == bo.FrameOfReferenceUID != study.frame_of_reference_uid
    assert a_info["pseudo_study"] == b_info["pseudo_study"] == pseudo_id(KEY, study.study_uid, "study")
    assert a_info["pseudo_patient"] == b_info["pseudo_patient"] == pseudo_id(KEY, study.patient.patient_id, "patient")
    # depth 1
    i1 = bo.ReferencedSeriesSequence[0]
    assert i1.SeriesInstanceUID == ao.SeriesInstanceUID and "OperatorsName" not in i1
    # depth 2
    i2 = i1.ReferencedInstanceSequence[0]
    assert i2.ReferencedSOPInstanceUID == new_a and i2.ReferencedSOPClassUID == CT
    assert i2.AccessionNumber == "" and not any(e.tag.is_private for e in i2)
    # depth 3
    i3 = i2.PurposeOfReferenceCodeSequence[0]
    assert i3.ReferencedSOPInstanceUID == new_a
    assert "PatientAddress" not in i3 and "SecondaryReviewerName" not in i3
    assert i3.TextValue == "ANONYMIZED"
    assert i3.ContentDate == shifted("20240102", date_shift_days(KEY, study.patient.patient_id))
    # PHI scan of both outputs, raw bytes
    for data in (a_bytes, b_bytes):
        leaked = [v for v in phi.phi_values(study) + [a_sop, "NEST", "Nestor"] if v.encode() in data]
        assert not leaked, leaked


def test_deterministic_and_key_dependent():
    rng = np.random.default_rng(5)
    ds = make_ct(phi.fake_study(rng, "study-det"), rng)
    raw = to_bytes(ds)
    out1, info1 = deidentify_bytes(raw, KEY)
    out2, info2 = deidentify_bytes(raw, KEY)
    out3, info3 = deidentify_bytes(raw, KEY2)
    assert out1 == out2 and info1 == info2
    assert out1 != out3
    for k in ("study_uid", "series_uid", "sop_uid", "pseudo_patient", "pseudo_study"):
        assert info1[k] != info3[k]
    for info in (info1, info3):
        for k in ("study_uid", "series_uid", "sop_uid"):
            assert UID_RE.match(info[k]) and len(info[k]) <= 64
        assert re.fullmatch(r"P[A-Z2-7]{16}", info["pseudo_patient"])
        assert re.fullmatch(r"S[A-Z2-7]{16}", info["pseudo_study"])
    json.dumps(info1)  # JSON-safe for the warehouse


def test_dates_shift_equally_within_a_patient():
    rng = np.random.default_rng(9)
    shifts = []
    for p in range(6):
        patient = phi.fake_patient(rng)
        per_patient = set()
        for s in range(2):
            study = phi.fake_study(rng, f"study-{p}-{s}", patient=patient)
            out = read(deidentify_bytes(to_bytes(make_ct(study, rng)), KEY)[0])
            delta = (dt.datetime.strptime(out.StudyDate, "%Y%m%d") -
                     dt.datetime.strptime(study.study_date, "%Y%m%d")).days
            assert out.SeriesDate == out.StudyDate == out.AcquisitionDate == out.ContentDate
            assert out.StudyTime == study.study_time  # whole-day shift
            per_patient.add(delta)
        assert len(per_patient) == 1, per_patient  # same shift for both studies of one patient
        (delta,) = per_patient
        assert -730 <= delta <= -1 and delta == date_shift_days(KEY, patient.patient_id)
        shifts.append(delta)
    assert len(set(shifts)) > 1  # shifts differ between patients


def test_input_dataset_untouched_and_demo_marking():
    rng = np.random.default_rng(4)
    ds = make_ct(phi.fake_study(rng, "study-copy"), rng)
    before = to_bytes(ds)
    out = deidentify_dataset(ds, DEMO_KEY, demo=True)
    assert to_bytes(ds) == before
    assert out is not ds and out.PatientID != ds.PatientID
    assert any("DEMO KEY" in m for m in out.DeidentificationMethod)


def test_options_clean_descriptors_and_safe_private():
    rng = np.random.default_rng(21)
    study = phi.fake_study(rng, "study-opt")
    ds = make_ct(study, rng)
    family = study.patient.name.split("^")[0]
    ds.SeriesDescription = f"Axial chest {family} {study.patient.patient_id} 2024-03-05"
    blk = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    blk.add_new(0x0C, "IS", 1000)  # B value: safe
    blk.add_new(0x10, "LO", study.patient.name)  # not on the safe list
    plain = read(deidentify_bytes(to_bytes(ds), KEY)[0])
    assert "SeriesDescription" not in plain and not any(e.tag.is_private for e in plain)
    opts = DeidOptions(clean_descriptors=True, retain_safe_private=True)
    data, _ = deidentify_bytes(to_bytes(ds), KEY, opts)
    out = read(data)
    assert out.SeriesDescription.startswith("Axial chest")
    assert family not in out.SeriesDescription and study.patient.patient_id not in out.SeriesDescription
    assert "2024-03-05" not in out.SeriesDescription
    creator = out.private_block(0x0019, "SIEMENS MR HEADER")
    assert int(creator[0x0C].value) == 1000 and 0x00191010 not in out
    assert family.encode() not in data and b"SYNTHCO PRIVATE" not in data
    kept = read(deidentify_bytes(to_bytes(ds), KEY, DeidOptions(retain_uids=True))[0])
    assert kept.SOPInstanceUID == ds.SOPInstanceUID and kept.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


# ----------------------------------------------------------------------------------------- pixels

def test_overlay_in_unused_high_bits_is_cleared():
    rng = np.random.default_rng(2)
    study = phi.fake_study(rng, "study-pix")
    ds = make_ct(study, rng)
    words = np.arange(64, dtype=np.uint16) * 50
    words[::3] |= 0x8000  # an overlay plane in bit 15
    ds.PixelData = words.tobytes()
    out = read(deidentify_bytes(to_bytes(ds), KEY)[0])
    got = np.frombuffer(out.PixelData, "<u2")
    assert not np.any(got >> 12) and np.array_equal(got & 0x0FFF, words & 0x0FFF)

    signed = make_ct(study, rng, signed=True)
    values = np.linspace(-1000, 1500, 64).astype(np.int16)
    raw = values.view(np.uint16) & 0x0FFF  # 12-bit two's complement, high bits not sign-extended...
    raw[::5] |= 0x4000  # ...and an overlay bit
    signed.PixelData = raw.tobytes()
    out = read(deidentify_bytes(to_bytes(signed), KEY)[0])
    got = np.frombuffer(out.PixelData, "<u2")
    assert np.array_equal(got.view(np.int16), values)  # sign-extended: every value preserved
    assert np.array_equal(out.pixel_array.ravel(), values)

    from pydicom.pixels import pixel_array
    from pydicom.uid import RLELossless
    rle = make_ct(study, rng, bits_stored=16)  # encode as 16-bit, then declare 12: RLE keeps the high bits
    rle.compress(RLELossless, words.reshape(8, 8), generate_instance_uid=False)
    rle.BitsStored, rle.HighBit = 12, 11
    data, info = deidentify_bytes(to_bytes(rle), KEY)
    out = read(data)
    assert out.file_meta.TransferSyntaxUID == RLELossless and out.SOPInstanceUID == info["sop_uid"]
    got = pixel_array(out, correct_unused_bits=False).ravel()
    assert not np.any(got >> 12) and np.array_equal(got & 0x0FFF, words & 0x0FFF)


def test_compressed_pixels_are_decoded_only_when_their_stream_can_hold_bits_above_bits_stored(monkeypatch):
    """A JPEG-family stream declaring a precision within BitsStored cannot carry overlay bits: not decoded.  One
    declaring more is decoded and checked, as before (here: refused, its values use bits above BitsStored)."""
    import pydicom.pixels
    from pydicom.data import get_testdata_file

    from imaging_tasks.deid import pixels

    j2k = pydicom.dcmread(get_testdata_file("J2K_pixelrep_mismatch.dcm"))  # SIZ: 13 bits; BitsStored 13 of 16
    ts = j2k.file_meta.TransferSyntaxUID
    assert pixels._declared_precision(j2k, ts) == 13
    real = pydicom.pixels.pixel_array
    decoded = []
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: decoded.append(1) or real(*a, **k))
    assert pixels.clean_pixel_data(j2k, ts) is False and decoded == []

    j2k.BitsStored, j2k.HighBit = 10, 9  # the stream's 11-bit values no longer fit: decoded, and refused
    with pytest.raises(BadInput, match="overlay bits above BitsStored"):
        pixels.clean_pixel_data(j2k, ts)
    assert decoded == [1]

    wide = pydicom.dcmread(get_testdata_file("693_J2KI.dcm"))  # SIZ: 16 bits for BitsStored 14: decoded
    assert pixels._declared_precision(wide, wide.file_meta.TransferSyntaxUID) == 16
    assert pixels.clean_pixel_data(wide, wide.file_meta.TransferSyntaxUID) is False and decoded == [1, 1]

    # JPEG and JPEG-LS: the SOF segment after any other segments; anything unreadable counts as unknown
    jpeg = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))
    assert pixels._declared_precision(jpeg, jpeg.file_meta.TransferSyntaxUID) == 12
    header = b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + b"\xff\xff\xc3\x00\x0b\x0c\x00\x08\x00\x08\x01\x01\x11\x00"
    assert pixels._jpeg_precision(header) == 12
    assert pixels._jpeg_precision(b"\xff\xd8\xff\xda\x00\x02") == pixels.UNKNOWN_PRECISION
    assert pixels._jpeg_precision(b"not a jpeg") == pixels._j2k_precision(b"\xff\x4f") == pixels.UNKNOWN_PRECISION


def test_bad_inputs_are_quarantined():
    rng = np.random.default_rng(6)
    study = phi.fake_study(rng, "study-bad")
    good = to_bytes(make_ct(study, rng))
    cases = {"empty_file": b"", "not_dicom": b"hello, this is a text file" * 10,
             "unreadable_dicom": good[:143],  # cut inside the file meta group
             "truncated_pixels/cut": good[:-50]}  # cut inside Pixel Data
    short = make_ct(study, rng)
    short.PixelData = short.PixelData[:100]
    cases["truncated_pixels"] = to_bytes(short)
    for name, kwargs in {"bia": {"BurnedInAnnotation": "YES"}, "us": {"Modality": "US"},
                         "sc": {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"},
                         "dose": {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.67"}}.items():
        d = make_ct(study, rng)
        for k, v in kwargs.items():
            setattr(d, k, v)
        cases[f"burned_in_annotation/{name}"] = to_bytes(d)
    for expected, data in cases.items():
        with pytest.raises(BadInput) as err:
            deidentify_bytes(data, KEY)
        assert err.value.reason == expected.split("/")[0], (expected, err.value)
        assert study.patient.name not in err.value.message
    ok = make_ct(study, rng)
    ok.Modality, ok.BurnedInAnnotation = "MG", "NO"
    deidentify_bytes(to_bytes(ok), KEY)  # mammography with a clean flag passes


def test_pydicom_test_files_never_crash():
    from pydicom.data import get_testdata_files
    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    assert len(files) > 100
    reasons, done = {}, 0
    for path in files:
        data = Path(path).read_bytes()
        try:
            out, info = deidentify_bytes(data, KEY)
        except BadInput as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            continue
        done += 1
        ds = read(out)
        assert ds.PatientIdentityRemoved == "YES" and UID_RE.match(ds.SOPInstanceUID)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert not any(e.tag.is_private for e in ds.iterall())
        src = read(data)
        assert src.get("PatientID", "") == "" or str(src.PatientID).encode() not in out
        if "PixelData" in src and not src.file_meta.TransferSyntaxUID.is_encapsulated:
            assert np.array_equal(src.pixel_array, ds.pixel_array), path
        json.dumps(info)
    assert done >= 55, (done, reasons)
    assert set(reasons) <= {"not_dicom", "missing_attribute", "truncated_pixels", "burned_in_annotation",
                            "unreadable_dicom", "truncated_file", "missing_pixels", "missing_content"}, reasons
    assert reasons.get("truncated_pixels", 0) >= 1 and reasons.get("burned_in_annotation", 0) >= 10
    assert reasons.get("truncated_file", 0) >= 1  # rtplan_truncated.dcm: cut inside a sequence
    assert reasons.get("missing_pixels", 0) >= 40  # the DICOMDIR set's CT instances, stored without pixels
    assert reasons.get("missing_content", 0) >= 1  # ExplVR_LitEndNoMeta.dcm: an RT Ion Plan header without beams


# ----------------------------------------------------------------------------------------- keys

def test_keys_and_pseudonyms(monkeypatch):
    monkeypatch.delenv("IMAGING_DEID_KEY", raising=False)
    monkeypatch.delenv("IMAGING_DEID_DEMO", raising=False)
    with pytest.raises(MissingKey, match="imaging_deid.*IMAGING_DEID_KEY"):
        load_key()  # no key and no explicit demo: refuse
    assert load_key(allow_demo=True) == (DEMO_KEY, True)
    monkeypatch.setenv("IMAGING_DEID_DEMO", "1")
    assert load_key() == (DEMO_KEY, True)
    monkeypatch.setenv("IMAGING_DEID_KEY", "from-env-0123456789abcdef\n")
    assert load_key() == (b"from-env-0123456789abcdef", False)  # a real key always wins over the demo flag
    assert load_key(value="explicit-0123456789abcdef") == (b"explicit-0123456789abcdef", False)
    with pytest.raises(MissingKey, match="at least 16"):
        load_key(value="short")
    assert uid_for(KEY, "1.2.3") == uid_for(KEY, "1.2.3\0") != uid_for(KEY2, "1.2.3")
    assert date_shift_days(KEY, "MRN1") == date_shift_days(KEY, "MRN1")
    ids = {pseudo_id(KEY, f"MRN{i}", "patient") for i in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"P[A-Z2-7]{16}", x) for x in ids)
    days = [date_shift_days(KEY, f"MRN{i}") for i in range(500)]
    assert min(days) >= -730 and max(days) <= -1 and len(set(days)) > 300


# ----------------------------------------------------------------------------------------- slides

SLIDE_PHI = ["Doe^Jane", "MRN123", "SS1234", "jdoe-4711", "BC-99887766", "03/14/24", "10:11:12", "Dr. Jane Doe",
             "2024:03:14", "LABELTEXT"]


def make_svs(path: Path, *, byteorder="<", bigtiff=False, aperio=True) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (512, 768, 3), dtype=np.uint8)
    head = "Aperio Image Library v12.0.15 \r\n"
    fields = "|AppMag = 20|StripeWidth = 2040|ScanScope ID = SS1234|Filename = Doe^Jane MRN123|Date = 03/14/24" \
             "|Time = 10:11:12|User = jdoe-4711|MPP = 0.5|Left = 25.1|Barcode = BC-99887766"
    label = np.frombuffer((b"LABELTEXT Doe^Jane MRN123 " * 400)[:48 * 64 * 3], np.uint8).reshape(48, 64, 3)
    with tifffile.TiffWriter(path, byteorder=byteorder, bigtiff=bigtiff) as tw:
        common = dict(photometric="rgb", metadata=None, software=False)
        tw.write(base, tile=(128, 128), compression="zlib",
                 description=(head + "768x512 [0,0 768x512] (128x128) ZLIB/RGB Q=70" + fields) if aperio
                 else "Doe^Jane MRN123 scanned 03/14/24", datetime="2024:03:14 10:11:12",
                 extratags=[(315, "s", 0, "Dr. Jane Doe", True)], **common)
        if aperio:
            tw.write(base[::8, ::8].copy(), description=head + "768x512 -> 96x64 - " + fields, **common)
        tw.write(base[::4, ::4].copy(), tile=(64, 64), compression="zlib",
                 description=head + "768x512 -> 192x128 - " + fields if aperio else None, **common)
        tw.write(label, description=head + "label 64x48" if aperio else "label", subfiletype=1, **common)
        tw.write(label, description=head + "macro 64x48" if aperio else "macro", subfiletype=9, **common)
    return base


def tile_bytes(path: Path, page: int) -> list[bytes]:
    with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
        p = tif.pages[page]
        out = []
        for off, n in zip(p.dataoffsets, p.databytecounts):
            fh.seek(off)
            out.append(fh.read(n))
        return out


def check_slide_copy(src: Path, dst: Path, phi_strings: list[str], min_levels: int = 2, require_phi: bool = True):
    openslide = pytest.importorskip("openslide")
    raw_src, raw_dst = src.read_bytes(), dst.read_bytes()
    present = [s for s in phi_strings if s.encode() in raw_src]
    assert present or not require_phi, "the source must carry the PHI for this check to mean anything"
    assert not [s for s in present if s.encode() in raw_dst]
    a, b = openslide.OpenSlide(str(src)), openslide.OpenSlide(str(dst))
    try:
        assert a.properties.get("openslide.vendor") == b.properties.get("openslide.vendor")
        assert a.level_count == b.level_count >= min_levels and a.level_dimensions == b.level_dimensions
        for level in range(a.level_count):
            size = a.level_dimensions[level]
            assert np.array_equal(np.asarray(a.read_region((0, 0), level, size)),
                                  np.asarray(b.read_region((0, 0), level, size)))
        assert not {"label", "macro"} & set(b.associated_images)
    finally:
        a.close()
        b.close()
    with tifffile.TiffFile(dst) as tif:
        descs = [p.description or "" for p in tif.pages]
    assert not any(re.search(r"\b(label|macro)\b", d) for d in descs)


def test_svs_label_macro_and_description_scrubbed(tmp_path):
    src, dst = tmp_path / "in.svs", tmp_path / "out" / "slide.svs"
    make_svs(src)
    info = deidentify_svs(src, dst, KEY)
    check_slide_copy(src, dst, SLIDE_PHI)
    assert tile_bytes(src, 0) == tile_bytes(dst, 0)  # compressed tiles copied verbatim
    assert info["mpp"] == pytest.approx(0.5) and info["vendor"] == "aperio" and info["pages"] == 3
    assert info["dimensions"] == [768, 512]
    # the pipeline's fail-closed audit, fed with the source description, finds nothing in the output
    from imaging_tasks.deid.slide import TECHNICAL_FIELDS, read_description
    from imaging_tasks.phi_audit import find_leaks, slide_identifying_values
    values = slide_identifying_values(read_description(src), TECHNICAL_FIELDS)
    assert {"Filename", "User", "ScanScope ID", "Barcode"} <= set(values)
    assert find_leaks(values, dst.read_bytes()) == [] and find_leaks(values, src.read_bytes())
    assert any("label" in r for r in info["removed"]) and any("macro" in r for r in info["removed"])
    assert info["pseudo_study"] == pseudo_id(KEY, hashlib.sha256(src.read_bytes()).hexdigest(), "study")
    assert info["pseudo_patient"] == pseudo_id(KEY, "BC-99887766", "patient")
    assert not any(s in json.dumps(info) for s in SLIDE_PHI)
    with tifffile.TiffFile(dst) as tif:
        desc = tif.pages[0].description
    assert desc.startswith("Aperio Image Library") and "AppMag = 20" in desc and "MPP = 0.5" in desc
    assert "Filename" not in desc and "User" not in desc and "Date" not in desc
    again = tmp_path / "again.svs"
    deidentify_svs(src, again, KEY)
    assert again.read_bytes() == dst.read_bytes()


def test_generic_bigendian_bigtiff_slide(tmp_path):
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    make_svs(src, byteorder=">", bigtiff=True, aperio=False)
    info = deidentify_svs(src, dst, KEY)
    check_slide_copy(src, dst, SLIDE_PHI, min_levels=1)  # OpenSlide's generic driver shows one level here
    assert info["vendor"] == "generic" and info["pages"] == 2
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(dst) as b:
        assert b.is_bigtiff and b.byteorder == ">"
        for i in range(2):
            assert np.array_equal(a.pages[i].asarray(), b.pages[i].asarray())
        assert b.pages[0].description in ("", None)


def test_unreadable_slide(tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"II*\0" + b"\xff" * 100)
    with pytest.raises(BadInput) as err:
        deidentify_svs(bad, tmp_path / "o.svs", KEY)
    assert err.value.reason == "unreadable_slide" and not (tmp_path / "o.svs").exists()
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(BadInput):
        deidentify_svs(text, tmp_path / "o.svs", KEY)
    from imaging_tasks.deid.slide import read_description
    with pytest.raises(BadInput):
        read_description(text)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(BadInput) as err:
        deidentify_svs(empty, tmp_path / "o.svs", KEY)
    assert err.value.reason == "empty_file"


def test_pathology_synth_slides_if_available(tmp_path):
    try:
        from imaging_tasks.pathology import synth as pathology
    except ImportError:
        pytest.skip("imaging_tasks.pathology.synth not written yet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truths = pathology.synthesize(tmp_path / "in", studies=1, seed=3)
    truth = json.loads(Path(truths[0]).read_text())
    slides = sorted(p for p in (tmp_path / "in").rglob("*") if p.suffix.lower() in (".svs", ".tif", ".tiff"))
    assert slides
    for i, src in enumerate(slides):
        dst = tmp_path / "out" / f"{i}.svs"
        deidentify_svs(src, dst, KEY)
        check_slide_copy(src, dst, [s for s in truth["phi"] if len(s) >= 6], min_levels=1, require_phi=False)
