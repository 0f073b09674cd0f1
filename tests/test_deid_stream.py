"""The byte-level fast path (imaging_tasks.deid.stream) against the reference walker (reference.py).

For every DICOM file of pydicom's test data and the synthetic files the other de-identification tests
build, under several option sets: either both paths refuse with the same reason, or pydicom parses both
outputs to data sets equal element by element at every depth (file meta included) and ``info`` is equal.
The fast path must also have handled (not fallen back on) a large majority of the corpus.
"""
from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataelem import DataElement
from pydicom.uid import ImplicitVRLittleEndian, RLELossless, generate_uid

import test_deid as td
import test_deid_bad_inputs as tb
import test_deid_charset_wsi as tc
from imaging_tasks.deid import dicom as ref
from imaging_tasks.deid import stream
from imaging_tasks.deid.dicom import DeidOptions
from imaging_tasks.errors import BadInput
from imaging_tasks.synth import phi

KEY = b"stream-equivalence-key-0001"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OPTION_SETS = {
    "default": DeidOptions(),
    "no-dates": DeidOptions(retain_modified_dates=False),
    "retain-ids": DeidOptions(retain_uids=True, retain_device_identity=True, retain_institution_identity=True,
                              retain_safe_private=True),
    "all-options": td.ALL_ON,  # text scrubbing options: the fast path declines, the reference runs
    "strict": DeidOptions(strict=True, retain_safe_private=True),  # only allow-listed attributes kept verbatim
}


# ----------------------------------------------------------------------------------------- corpus

def _synthetic() -> dict[str, bytes]:
    """The files the other de-identification tests build (what can be built without tmp dirs)."""
    out: dict[str, bytes] = {}
    ds, _planted, _skipped = td.planted_dataset()
    out["planted_all_rows"] = td.to_bytes(ds)
    rng = np.random.default_rng(2)
    study = phi.fake_study(rng, "stream-pix")
    ct = td.make_ct(study, rng)
    words = np.arange(64, dtype=np.uint16) * 50
    words[::3] |= 0x8000
    ct.PixelData = words.tobytes()
    out["overlay_unsigned"] = td.to_bytes(ct)
    signed = td.make_ct(study, rng, signed=True)
    raw = np.linspace(-1000, 1500, 64).astype(np.int16).view(np.uint16) & 0x0FFF
    raw[::5] |= 0x4000
    signed.PixelData = raw.tobytes()
    out["overlay_signed"] = td.to_bytes(signed)
    rle = td.make_ct(study, rng, bits_stored=16)
    rle.compress(RLELossless, words.reshape(8, 8), generate_instance_uid=False)
    rle.BitsStored, rle.HighBit = 12, 11
    out["rle_overlay"] = td.to_bytes(rle)
    rle_clean = td.make_ct(study, rng, bits_stored=16)
    rle_clean.compress(RLELossless, (words & 0x0FFF).reshape(8, 8), generate_instance_uid=False)
    out["rle_16bit"] = td.to_bytes(rle_clean)

    pat = td.make_ct(phi.fake_study(rng, "stream-pat"), rng)
    pat.add_new(0x50000010, "US", 5)
    pat.add_new(0x50003000, "OW", b"CURVEPHI")
    pat.add_new(0x60000010, "US", 8)
    pat.add_new(0x60003000, "OW", b"\xff" * 8)
    pat.add_new(0x60004000, "LT", "OVERLAYPHI comment")
    pat.add_new(0x00091010, "LO", "PRIVNOCREATOR")
    out["patterns"] = td.to_bytes(pat)

    # nested references three deep, private blocks in items (test_nested_sequences_three_deep...)
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    study = phi.fake_study(rng, "stream-nest")
    b = td.make_ct(study, rng)
    item3 = Dataset()
    item3.ReferencedSOPInstanceUID = generate_uid()
    item3.PatientAddress = "NEST3 Quarry Road"
    item3.SecondaryReviewerName = "Nestor^Third"
    item3.TextValue = "NEST3 text about " + study.patient.name
    item3.ContentDate = "20240102"
    item2 = Dataset()
    item2.ReferencedSOPClassUID = td.CT
    item2.ReferencedSOPInstanceUID = item3.ReferencedSOPInstanceUID
    item2.AccessionNumber = "NEST2ACC"
    item2.PatientID = "NESTPID"
    item2.PatientName = "Nest^Pat"
    item2.PurposeOfReferenceCodeSequence = Sequence([item3])
    item2.private_block(0x0011, "NESTED PRIV", create=True).add_new(0x01, "LO", "NEST2PRIVATE")
    item1 = Dataset()
    item1.SeriesInstanceUID = generate_uid()
    item1.OperatorsName = "Nestor^First"
    item1.ReferencedInstanceSequence = Sequence([item2, Dataset()])
    b.ReferencedSeriesSequence = Sequence([item1])
    b.ReferencedImageSequence = Sequence([item3])
    b.InstitutionCodeSequence = Sequence([item3])  # a D code sequence: one dummy code item
    b.add(DataElement(0x00181000, "LO", "SERIAL-1"))  # Device Serial Number: D/K by option
    b.StationAETitle = "STATION_AE_1"
    b.add(DataElement(0x00080020, "DA", ["20240102", "2023.01.05", "", "bad"]))  # Study Date, multi-valued
    b.AcquisitionDateTime = "20240102101112.5+0100"
    b.add(DataElement(0x00181012, "DA", "20240103"))  # Date of Secondary Capture
    b.add(DataElement(0x00189516, "DT", "2024"))  # Start Acquisition DateTime, unlisted: C as a date
    b.add(DataElement(0x00080081, "ST", "1 Long Road"))  # Institution Address
    b.add(DataElement(0x00185100, "CS", "HFS"))
    b.add(DataElement(0x00082111, "ST", "odd"))  # Derivation Description, odd length
    out["nested"] = td.to_bytes(b)
    out["nested_implicit"] = _implicit(b)
    undefined = b.copy()
    for elem in undefined.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
    out["nested_undefined_lengths"] = td.to_bytes(undefined)
    out["nested_undefined_lengths_implicit"] = _implicit(undefined)

    # unlisted free text (removed, emptied, dummy or allow-listed) at the top and nested, a CS stored as LO
    text, _ = tb._ct(30)
    text.AcquisitionContextDescription = "scanned for Quintero"
    text.add(DataElement(0x300A00C2, "LO", "Quintero beam"))  # Beam Name
    text.add(DataElement(0x00700081, "LO", "Quintero contours"))  # Content Description: Type 2, emptied
    text.add(DataElement(0x00620005, "LO", "Quintero liver"))  # Segment Label: Type 1, dummy
    text.add(DataElement(0x00420010, "ST", "Letter for Quintero"))  # Document Title: Type 2, emptied
    text.add(DataElement(0x00180015, "LO", "Quintero"))  # Body Part Examined (CS) stored as LO: removed
    text.Manufacturer, text.SequenceName, text.ConvolutionKernel, text.RescaleType = "ACME_MED", "*fl3d1", "B30f", "HU"
    text.add(DataElement(0x00189073, "FD", 12.5))  # Acquisition Duration: kept, except in strict mode
    nested_text = Dataset()
    nested_text.AcquisitionContextDescription = "nested Quintero"
    nested_text.CodeValue, nested_text.CodingSchemeDesignator, nested_text.CodeMeaning = "T-D3000", "SRT", "Chest"
    text.AnatomicRegionSequence = Sequence([nested_text])
    out["unlisted_text"] = td.to_bytes(text)
    out["unlisted_text_implicit"] = _implicit(text)

    # options test: Siemens safe-private block
    opt = td.make_ct(phi.fake_study(rng, "stream-opt"), rng)
    opt.SeriesDescription = "Axial chest 2024-03-05"
    blk = opt.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    blk.add_new(0x0C, "IS", 1000)
    blk.add_new(0x0D, "CS", "DIRECTIONAL")
    blk.add_new(0x10, "LO", study.patient.name)
    out["safe_private"] = td.to_bytes(opt)
    out["safe_private_implicit"] = _implicit(opt)

    # bad inputs of test_deid (truncations, burned-in, short pixels)
    good = td.to_bytes(td.make_ct(study, rng))
    out["cut_meta"] = good[:143]
    out["cut_pixels"] = good[:-50]
    short = td.make_ct(study, rng)
    short.PixelData = short.PixelData[:100]
    out["short_pixels"] = td.to_bytes(short)
    for name, kwargs in {"bia": {"BurnedInAnnotation": "YES"}, "us": {"Modality": "US"},
                         "sc": {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}}.items():
        d = td.make_ct(study, rng)
        for k, v in kwargs.items():
            setattr(d, k, v)
        out[f"burned_in_{name}"] = td.to_bytes(d)

    # the bad-input matrix (test_deid_bad_inputs)
    ds, _ = tb._ct(1)
    out["bare_implicit"] = tb._bare(ds)
    full = tb._bytes(tb._ct(2)[0], enforce_file_format=True)
    out["no_preamble"], out["no_dicm"] = full[128:], full[132:]
    for ts in (ImplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian):
        d, _ = tb._ct(3)
        d.file_meta.TransferSyntaxUID = ts
        out[f"ts_{ts.name}"] = tb._bytes(d, enforce_file_format=True, implicit_vr=ts.is_implicit_VR,
                                         little_endian=ts.is_little_endian)
    d, study4 = tb._ct(4)
    d.add(DataElement(0x00091010, "LO", f"orphan {study4.patient.name}"))
    d.add(DataElement(0x00110010, "LO", ""))
    d.add(DataElement(0x00111001, "LO", study4.patient.patient_id))
    d.add(DataElement(0x00130010, "UN", b"\xff\xfe\x00\x01"))
    d.add(DataElement(0x00131001, "UN", study4.patient.name.encode()))
    d.add(DataElement(0x00150010, "LO", "ACME 1.0"))
    d.add(DataElement(0x00150011, "LO", "ACME 1.0"))
    d.add(DataElement(0x00151001, "LO", study4.patient.name))
    d.add(DataElement(0x00151101, "LO", study4.accession))
    out["broken_private"] = tb._bytes(d, enforce_file_format=True)
    out["broken_private_implicit"] = _implicit(d)
    d5, _ = tb._ct(5)
    out["garbled_cs"] = tb._bytes(d5, enforce_file_format=True).replace(b"MONOCHROME2", b"MONO\x00\x01ROME2")
    d6, _ = tb._ct(5)
    d6.SliceThickness, d6.InstanceNumber, d6.PatientAge = "9.875", "4321", "041Y"
    d6.PatientBirthDate = "19330303"
    with pydicom.config.disable_value_validation():
        d6.StudyDescription = "x" * 300
        d6.SOPInstanceUID = d6.SOPInstanceUID + ".A1"
        broken = tb._bytes(d6, enforce_file_format=True)
    for good_v, bad_v in ((b"9.875", b"abc\x01e"), (b"4321", b"1.5x"), (b"041Y", b"fort"), (b"19330303", b"notadat")):
        broken = broken.replace(good_v, bad_v.ljust(len(good_v)))
    out["invalid_values"] = broken
    raw7 = tb._bytes(tb._ct(7)[0], enforce_file_format=True)
    for cut in (0.05, 0.3, 0.6, 0.97):
        out[f"truncated_{cut}"] = raw7[: int(len(raw7) * cut)]
    out["empty"] = b""
    out["text"] = b"not a dicom file\n" * 20

    # character sets and slides (test_deid_charset_wsi)
    for path in sorted(f for f in get_charset_files() if f.endswith(".dcm")):
        src = pydicom.dcmread(path)
        src.SOPClassUID = src.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        src.Modality = "CT"
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not src.get(kw):
                setattr(src, kw, generate_uid())
        out[f"charset_{Path(path).name}"] = tc._bytes(src)
        src.Rows = src.Columns = 2  # an image, so the multi-byte character sets reach the written path
        src.SamplesPerPixel, src.PhotometricInterpretation = 1, "MONOCHROME2"
        src.BitsAllocated, src.BitsStored, src.HighBit, src.PixelRepresentation = 8, 8, 7, 0
        src.add(DataElement(0x7FE00010, "OB", b"\1\2\3\4"))
        out[f"charset_image_{Path(path).name}"] = tc._bytes(src)
    out["latin1"] = tc._bytes(tc._latin1_dataset())
    for it in ("LABEL", "OVERVIEW", "VOLUME"):
        out[f"wsi_{it}"] = tc._wsi(["ORIGINAL", "PRIMARY", it, "NONE"])
    out["wsi_label_in_volume"] = tc._wsi(["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], SpecimenLabelInImage="YES")
    return out


def _implicit(ds) -> bytes:
    ds = ds.copy()
    ds.file_meta = ds.file_meta.copy()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return buf.getvalue()


def _corpus() -> dict[str, bytes]:
    files = {}
    for path in sorted(get_testdata_files()):
        if os.path.isfile(path):
            files[f"pydicom:{Path(path).parent.name}/{Path(path).name}"] = Path(path).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files.update({f"synthetic:{k}": v for k, v in _synthetic().items()})
    return files


# ----------------------------------------------------------------------------------------- comparison

def _run(fn, data, options, demo):
    try:
        return "ok", fn(data, KEY, options, demo=demo)
    except BadInput as exc:
        return "refused", exc.reason


def _same(a, b, path: str = "") -> str | None:
    """None when the two pydicom data sets are equal element by element at every depth."""
    ta, tb_ = [int(e.tag) for e in a], [int(e.tag) for e in b]
    if ta != tb_:
        return f"{path}: tags differ: {[f'{t:08X}' for t in sorted(set(ta) ^ set(tb_))][:6]}"
    for ea in a:
        eb = b[ea.tag]
        where = f"{path}/{int(ea.tag):08X}"
        if ea.VR != eb.VR:
            return f"{where}: VR {ea.VR} != {eb.VR}"
        if ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                return f"{where}: {len(ea.value)} != {len(eb.value)} items"
            for i, (x, y) in enumerate(zip(ea.value, eb.value)):
                diff = _same(x, y, f"{where}[{i}]")
                if diff:
                    return diff
        elif ea.value != eb.value or type(ea.value) is not type(eb.value):
            return f"{where} {ea.keyword}: {ea.value!r:.60} != {eb.value!r:.60}"
    return None


def _compare(name: str, data: bytes, options: DeidOptions, demo: bool = False) -> tuple[str, str]:
    """(fast path outcome, reference outcome): 'fallback' / 'refused' / 'written'.  Raises AssertionError
    unless both paths agree wherever the fast path did not fall back."""
    try:
        fast = ("ok", stream.deidentify_stream(data, KEY, options, demo=demo))
    except stream.Unsupported:
        fast = ("fallback", None)
    except BadInput as exc:
        fast = ("refused", exc.reason)
    reference = _run(lambda *a, **k: ref.deidentify_bytes(*a, **k, fast=False), data, options, demo)
    ref_outcome = "written" if reference[0] == "ok" else "refused"
    if fast[0] == "fallback":
        return "fallback", ref_outcome
    shown = [x if x[0] != "ok" else "written" for x in (fast, reference)]
    assert fast[0] == reference[0] and (fast[0] == "ok" or fast[1] == reference[1]), (name, "fast/reference:", shown)
    if fast[0] == "refused":
        return "refused", ref_outcome
    (out_f, info_f), (out_r, info_r) = fast[1], reference[1]
    a, b = pydicom.dcmread(io.BytesIO(out_r)), pydicom.dcmread(io.BytesIO(out_f))
    diff = _same(a.file_meta, b.file_meta, "meta") or _same(a, b)
    assert diff is None, (name, diff)
    assert a.preamble == b.preamble == b"\0" * 128
    assert info_f == info_r, (name, info_f, info_r)
    return "written", ref_outcome


def test_fast_path_matches_reference_on_every_file():
    corpus = _corpus()
    assert len(corpus) > 200
    outcomes: Counter = Counter()
    before = Counter(stream.FALLBACKS)
    for label, options in OPTION_SETS.items():
        for name, data in corpus.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fast, reference = _compare(f"{label}:{name}", data, options, demo=(label == "retain-ids"))
            outcomes[(label, fast, reference)] += 1
    causes = Counter(stream.FALLBACKS) - before
    print("\noutcomes:", dict(outcomes), "\nfallbacks by cause:", dict(causes))

    def count(label=None, fast=None, reference=None):
        return sum(n for (lb, f, r), n in outcomes.items()
                   if (label is None and lb != "all-options" or lb == label) and fast in (None, f)
                   and reference in (None, r))

    # The fast path really ran: it handled most of the corpus, most of what the reference writes, and
    # decided refusals too (burned-in, slide labels, short pixels) - not only the easy cases.
    assert count(fast="written") >= 0.80 * count(reference="written"), dict(causes)
    assert count() - count(fast="fallback") >= 0.65 * count(), dict(causes)
    for label in ("default", "no-dates", "retain-ids"):
        assert count(label, fast="written") >= 60 and count(label, fast="refused") >= 40, dict(outcomes)
    assert count("all-options", fast="fallback") == len(corpus)  # scrubbing options: the reference only


def test_wired_into_deidentify_bytes():
    """deidentify_bytes takes the fast path when it can, and gives the same result as the reference."""
    ds, _study = tb._ct(11)
    data = tb._bytes(ds, enforce_file_format=True)
    before = stream.HANDLED["ok"]
    out, info = ref.deidentify_bytes(data, KEY)
    assert stream.HANDLED["ok"] == before + 1
    out_r, info_r = ref.deidentify_bytes(data, KEY, fast=False)
    assert info == info_r
    assert _same(pydicom.dcmread(io.BytesIO(out)), pydicom.dcmread(io.BytesIO(out_r))) is None
    # what the fast path declines (here: the text-scrubbing option) still works, through the reference path
    n = stream.FALLBACKS["option_scrub"]
    ref.deidentify_bytes(data, KEY, DeidOptions(clean_descriptors=True))
    assert stream.FALLBACKS["option_scrub"] == n + 1 and stream.HANDLED["ok"] == before + 1


def test_structural_verification_catches_a_bad_length():
    ds, _ = tb._ct(12)
    out, _ = stream.deidentify_stream(tb._bytes(ds, enforce_file_format=True), KEY, DeidOptions())
    stream._verify(out, False, False, "iso8859")
    with pytest.raises(stream.Unsupported):
        stream._verify(out[:-2], False, False, "iso8859")
    with pytest.raises(stream.Unsupported):
        stream._verify(out + b"\0\0\0\0", False, False, "iso8859")


def test_fast_path_runs_every_refusal_check_of_the_reference(monkeypatch):
    """Both paths iterate rules.REFUSAL_CHECKS, the one tuple of refusal functions (no names to keep in step):
    every check runs on both, in the same order, and a check added there refuses on both.  Each check reads only
    what the fast path gives it (rules.CHECK_TAGS values, rules.PRESENCE_TAGS presence): a check reading another
    attribute must show up here, or the fast path would pass what the reference refuses."""
    from imaging_tasks.deid import rules

    ds, _ = tb._ct(13)
    data = tb._bytes(ds, enforce_file_format=True)
    checks = rules.REFUSAL_CHECKS
    assert len(checks) >= 4 and all(callable(c) for c in checks)
    paths = {"fast": lambda: stream.deidentify_stream(data, KEY, DeidOptions()),
             "reference": lambda: ref.deidentify_bytes(data, KEY, fast=False)}
    for name, run in paths.items():
        calls = []

        def spy(check, calls=calls):
            def spied(d):
                calls.append(check.__name__)
                return check(d)
            return spied

        monkeypatch.setattr(rules, "REFUSAL_CHECKS", tuple(spy(c) for c in checks))
        run()
        assert calls == [c.__name__ for c in checks], (name, calls)

    def check_added(_ds):
        raise BadInput("added_check", "a refusal added to rules.REFUSAL_CHECKS")

    monkeypatch.setattr(rules, "REFUSAL_CHECKS", checks + (check_added,))
    for name, run in paths.items():
        with pytest.raises(BadInput) as err:
            run()
        assert err.value.reason == "added_check", name
    monkeypatch.setattr(rules, "REFUSAL_CHECKS", checks)

    class Spy:
        def __init__(self, ds):
            self._ds, self.seen = ds, set()

        def get(self, k, default=None):
            self.seen.add(k)
            return self._ds.get(k, default)

        def __contains__(self, k):
            self.seen.add(k)
            return k in self._ds

        def __getitem__(self, k):
            self.seen.add(k)
            return self._ds[k]

        def __getattr__(self, k):
            if k.startswith("_"):
                raise AttributeError(k)
            self.seen.add(k)
            return getattr(self._ds, k)

    from pydicom.datadict import tag_for_keyword
    allowed = set(stream._SOURCE_TAGS) | set(stream._PRESENCE_TAGS)
    datasets = [pydicom.dcmread(p) for p in get_testdata_files("CT_small.dcm") + get_testdata_files("rtplan.dcm")]
    datasets.append(pydicom.dcmread(io.BytesIO(tc._wsi(["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]))))
    for check in rules.REFUSAL_CHECKS:
        for ds in datasets:
            spy = Spy(ds)
            try:
                check(spy)
            except BadInput:
                pass
            read = {tag_for_keyword(k) if isinstance(k, str) else int(k) for k in spy.seen}
            assert read <= allowed, (check.__name__, sorted(str(k) for k in spy.seen
                                                  if (tag_for_keyword(k) if isinstance(k, str) else int(k))
                                                  not in allowed))
