"""Fuzzing DICOM de-identification: mutated copies of pydicom's own test files, through the command line
(as a user runs it, relative paths) and through ``deidentify_bytes`` (as the pipeline calls it).

The corpus (seeded, rebuilt identically every run): every file of ``pydicom.data.get_testdata_files()`` that
pydicom reads, with identifying values planted at the top level, nested and in a private block, then mutated:
byte flips, truncations at random offsets and at element boundaries (top level and nested), huge lengths,
garbled VRs, relabelled transfer syntaxes, deep nesting (64/65/70/200/1,000 levels), appended junk and an
appended sequence delimiter, empty and non-DICOM files, and hidden file/folder names.

What must hold for every input:
* nothing aborts: ``imaging-tasks deidentify`` exits 0 with a report; ``deidentify_bytes`` returns or raises
  ``BadInput`` (never anything else); so does the audit's header read;
* every input is accounted for in the report: de-identified, quarantined (reason) or skipped (reason);
* every output is readable back by pydicom (``dcmread`` and a walk of every element, sequences included);
* no planted identifying value survives in any output (ASCII and UTF-16).

Run alone with ``-s`` to see the counts (inputs, de-identified, quarantined by reason, skipped).
"""
from __future__ import annotations

import datetime as dt
import functools
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

REPO = Path(__file__).resolve().parents[1]
SEED = 20261122
KEY = b"fuzz-test-key-000000001"
UID_ROOT = "1.2.826.0.1.3680043.10.777"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_VR32 = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_VR16 = {v.encode() for v in "AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split()}
ITEM, ITEM_END, SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                     "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.3.4",
                     "not a uid"]


# ----------------------------------------------------------------------------------------- sources

def _plant(ds: Dataset, i: int) -> list[str]:
    """Set identifying values (unique to source ``i``) the default profile must remove; returns them."""
    v = {k: f"FZ{k}{i:03d}Q" for k in ("FAM", "GIV", "PID", "ACC", "INST", "REF", "OPER", "OPID", "RACC",
                                       "NREF", "PRIV", "PSQ", "DOC", "DESC")}
    birth = (dt.date(1901, 1, 1) + dt.timedelta(days=37 * i)).strftime("%Y%m%d")
    uids = [f"{UID_ROOT}.{i}.{n}" for n in (1, 2, 3, 4)]
    ds.PatientName = f"{v['FAM']}^{v['GIV']}"
    ds.PatientID = v["PID"]
    ds.PatientBirthDate = birth
    ds.AccessionNumber = v["ACC"]
    ds.InstitutionName = f"{v['INST']} HOSPITAL"
    ds.ReferringPhysicianName = v["REF"]
    ds.OperatorsName = v["OPER"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uids[:3]
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = uids[2]
    other = Dataset()
    other.PatientID = v["OPID"]
    ds.OtherPatientIDsSequence = Sequence([other])
    req = Dataset()
    req.AccessionNumber = v["RACC"]
    ds.RequestAttributesSequence = Sequence([req])
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = uids[3]
    ds.ReferencedStudySequence = Sequence([ref])
    refpat = Dataset()
    refpat.PatientName = v["NREF"]
    ds.ReferencedPatientSequence = Sequence([refpat])
    ds.add_new(0x00420010, "ST", f"Report for {v['DOC']} (DOB {birth})")  # DocumentTitle: not in Table E.1-1
    ds.add_new(0x00700081, "LO", f"seen by {v['DESC']}")  # ContentDescription: not in Table E.1-1
    block = ds.private_block(0x0009, "FUZZ PLANTED", create=True)
    block.add_new(0x01, "LO", v["PRIV"])
    inner = Dataset()
    inner.PatientName = v["PSQ"]
    block.add_new(0x02, "SQ", Sequence([inner]))
    return [*v.values(), birth, *uids]


@functools.lru_cache(maxsize=1)
def sources() -> tuple[tuple[str, bytes, tuple[str, ...]], ...]:
    """(name, bytes, planted values) for every pydicom test file that pydicom reads and writes back."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, path in enumerate(sorted(get_testdata_files())):
            if not os.path.isfile(path) or os.path.getsize(path) > 2_000_000:
                continue
            try:
                ds = pydicom.dcmread(path)
                planted = _plant(ds, i)
                buf = io.BytesIO()
                ds.save_as(buf)
            except Exception:  # noqa: BLE001 - README, JSON, a source pydicom cannot write back
                continue
            out.append((Path(path).name, buf.getvalue(), tuple(planted)))
    return tuple(out)


# ----------------------------------------------------------------------------------------- structure

def _plain_image(raw: bytes) -> bool:
    """An image with pixels from a modality the de-identifier accepts (not SC/US/XA): where most mutations
    still leave something to de-identify.  Decided from the source alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(raw))
    return "PixelData" in ds and str(ds.get("Modality", "")) not in ("US", "SC", "XA", "OT") and \
        not str(ds.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.7") and \
        str(ds.get("BurnedInAnnotation", "")).upper() != "YES"


def _dataset_start(raw: bytes) -> tuple[int, str] | None:
    """(offset of the data set, transfer syntax UID) of a Part-10 file, from its meta group."""
    if raw[128:132] != b"DICM":
        return None
    pos, ts = 132, None
    while pos + 8 <= len(raw) and raw[pos:pos + 2] == b"\x02\x00":
        el = struct.unpack_from("<H", raw, pos + 2)[0]
        if raw[pos + 4:pos + 6] in _VR32:
            length, vstart = struct.unpack_from("<L", raw, pos + 8)[0], pos + 12
        else:
            length, vstart = struct.unpack_from("<H", raw, pos + 6)[0], pos + 8
        if el == 0x10:
            ts = raw[vstart:vstart + length].rstrip(b"\0 ").decode("latin-1")
        pos = vstart + length
    return pos, ts or ""


def elements(raw: bytes) -> tuple[list[dict], dict]:
    """Element map of a (well-formed) Part-10 file: start/end/value offsets, depth, where the VR and the
    length are.  Only little endian, explicit or implicit VR; ``[]`` for anything else."""
    found = _dataset_start(raw)
    if found is None:
        return [], {}
    start, ts = found
    if ts not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1") and not ts.startswith("1.2.840.10008.1.2.4") \
            and ts != "1.2.840.10008.1.2.5":
        return [], {"start": start, "ts": ts}
    implicit = ts == "1.2.840.10008.1.2"
    out: list[dict] = []

    def walk(pos: int, end: int, depth: int, undefined: bool) -> int:
        while pos + 8 <= end:
            group, el = struct.unpack_from("<HH", raw, pos)
            tag = group << 16 | el
            if tag == 0xFFFEE00D:
                return pos + 8
            vr = None if implicit else raw[pos + 4:pos + 6]
            if implicit or vr not in _VR16 and vr not in _VR32:
                length, lpos, lsize, vstart = struct.unpack_from("<L", raw, pos + 4)[0], pos + 4, 4, pos + 8
                vr = None
            elif vr in _VR32:
                length, lpos, lsize, vstart = struct.unpack_from("<L", raw, pos + 8)[0], pos + 8, 4, pos + 12
            else:
                length, lpos, lsize, vstart = struct.unpack_from("<H", raw, pos + 6)[0], pos + 6, 2, pos + 8
            is_sq = vr == b"SQ" or (vr is None and length == 0xFFFFFFFF) or \
                (vr is None and pydicom.datadict.dictionary_VR(tag) == "SQ" if not group & 1 and
                 pydicom.datadict.dictionary_has_tag(tag) else False)
            rec = {"start": pos, "tag": tag, "vr_pos": None if implicit else pos + 4, "len_pos": lpos,
                   "len_size": lsize, "vstart": vstart, "depth": depth, "sq": is_sq}
            out.append(rec)
            if length == 0xFFFFFFFF:
                pos = items(vstart, len(raw), depth, fragments=not is_sq)
            else:
                if is_sq:
                    items(vstart, vstart + length, depth)
                pos = vstart + length
            rec["end"] = pos
        return pos

    def items(pos: int, end: int, depth: int, fragments: bool = False) -> int:
        while pos + 8 <= end:
            tag = raw[pos:pos + 4]
            length = struct.unpack_from("<L", raw, pos + 4)[0]
            if tag == SEQ_END:
                return pos + 8
            if tag != ITEM:
                return end
            if fragments:  # encapsulated Pixel Data: opaque
                pos += 8 + length
            elif length == 0xFFFFFFFF:
                pos = walk(pos + 8, end, depth + 1, True)
            else:
                walk(pos + 8, pos + 8 + length, depth + 1, False)
                pos = pos + 8 + length
        return pos

    try:
        walk(start, len(raw), 0, False)
    except (struct.error, KeyError, ValueError):
        return [], {"start": start, "ts": ts}
    return out, {"start": start, "ts": ts, "implicit": implicit}


# ----------------------------------------------------------------------------------------- mutations

def _with_ts(raw: bytes, ts: str) -> bytes:
    """The same data set under another Transfer Syntax UID (the meta group rewritten, lengths fixed)."""
    start, _old = _dataset_start(raw)
    value = ts.encode("latin-1")
    if len(value) % 2:
        value += b"\0"
    pos, parts = 132, []
    while pos < start:
        el = struct.unpack_from("<H", raw, pos + 2)[0]
        if raw[pos + 4:pos + 6] in _VR32:
            length, vstart = struct.unpack_from("<L", raw, pos + 8)[0], pos + 12
        else:
            length, vstart = struct.unpack_from("<H", raw, pos + 6)[0], pos + 8
        if el == 0x10:
            parts.append(struct.pack("<HH2sH", 2, 0x10, b"UI", len(value)) + value)
        elif el != 0:
            parts.append(raw[pos:vstart + length])
        pos = vstart + length
    body = b"".join(parts)
    return raw[:132] + struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(body)) + body + raw[start:]


def _nested(depth: int, planted: str, *, undefined: bool, implicit: bool) -> bytes:
    """``depth`` levels of Referenced Image Sequence, a person name and a free-text value at the bottom."""
    def el(tag: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b" "
        if implicit:
            return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value
        if vr in _VR32:
            return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value

    body = el(0x00081150, b"UI", b"1.2.840.10008.5.1.4.1.1.2") + el(0x00081155, b"UI", b"1.2.3.4.5\0") + \
        el(0x00100010, b"PN", f"{planted}^DEEP".encode()) + el(0x0040A160, b"UT", f"text {planted}".encode())
    for _ in range(depth):
        seq_tag = struct.pack("<HH", 0x0008, 0x1140)
        if undefined:
            item = ITEM + b"\xff\xff\xff\xff" + body + ITEM_END + b"\0\0\0\0"
            hdr = seq_tag + (b"\xff\xff\xff\xff" if implicit else b"SQ\0\0\xff\xff\xff\xff")
            body = hdr + item + SEQ_END + b"\0\0\0\0"
        else:
            item = ITEM + struct.pack("<L", len(body)) + body
            hdr = seq_tag + (struct.pack("<L", len(item)) if implicit else b"SQ\0\0" + struct.pack("<L", len(item)))
            body = hdr + item
    return body


def _insert_top(raw: bytes, elems: list[dict], tag: int, blob: bytes) -> bytes:
    """``blob`` (a whole element) inserted among the top-level elements in tag order."""
    top = [e for e in elems if e["depth"] == 0]
    pos = next((e["start"] for e in top if e["tag"] > tag), len(raw))
    if any(e["tag"] == tag for e in top):
        old = next(e for e in top if e["tag"] == tag)
        return raw[:old["start"]] + blob + raw[old["end"]:]
    return raw[:pos] + blob + raw[pos:]


KINDS = ("byte_flip", "truncate_random", "truncate_boundary", "huge_length", "garbled_vr", "relabel_ts",
         "append_junk", "append_delimiter", "deep_nesting")


def mutate(kind: str, raw: bytes, planted: tuple[str, ...], rng: random.Random) -> tuple[str, bytes]:
    """One mutation of ``raw``; returns (label, bytes)."""
    elems, info = elements(raw)
    start = info.get("start", 132)
    if kind == "byte_flip":
        data = bytearray(raw)
        for _ in range(rng.choice((1, 1, 2, 4, 16))):
            if elems and rng.random() < 0.6:  # a header byte: tag, VR or length
                e = rng.choice(elems)
                p = e["start"] + rng.randrange(max(1, min(12, e["vstart"] - e["start"])))
            else:
                p = rng.randrange(start, len(data)) if len(data) > start else rng.randrange(len(data))
            data[p] ^= rng.randrange(1, 256)
        return "byte_flip", bytes(data)
    if kind == "truncate_random":
        return "truncate_random", raw[:rng.randrange(1, len(raw))]
    if kind == "truncate_boundary":
        if not elems:
            return "truncate_random", raw[:rng.randrange(1, len(raw))]
        nested = [e for e in elems if e["depth"] > 0]
        e = rng.choice(nested if nested and rng.random() < 0.4 else [e for e in elems if e["depth"] == 0])
        cut = e["start"] if rng.random() < 0.5 else e["end"]
        if cut >= len(raw):
            cut = e["start"]
        return f"truncate_boundary_depth{min(e['depth'], 1)}", raw[:cut]
    if kind == "huge_length":
        if not elems:
            return "huge_length_none", raw + b"\0" * 8
        e = rng.choice(elems)
        data = bytearray(raw)
        if e["len_size"] == 4:
            value = rng.choice((0xFFFFFFF0, 0x7FFFFFFF, 0xFFFFFFFE, len(raw) * 4, 0x00FFFFFF))
            struct.pack_into("<L", data, e["len_pos"], value)
        else:
            struct.pack_into("<H", data, e["len_pos"], rng.choice((0xFFFF, 0xFFFE, 0x8000)))
        return "huge_length", bytes(data)
    if kind == "garbled_vr":
        explicit = [e for e in elems if e["vr_pos"] is not None]
        if not explicit:
            return "garbled_vr_none", raw[:start] + bytes(rng.randrange(256) for _ in range(64)) + raw[start:]
        e = rng.choice(explicit)
        data = bytearray(raw)
        data[e["vr_pos"]:e["vr_pos"] + 2] = rng.choice(
            (b"ZZ", b"\x00\x01", b"sq", b"UN", b"SQ", b"OB", b"XX", b"\xff\xfe", b"PN", b"UT", b"OW"))
        return "garbled_vr", bytes(data)
    if kind == "relabel_ts":
        if _dataset_start(raw) is None:
            return "relabel_ts_none", raw
        return "relabel_ts", _with_ts(raw, rng.choice(TRANSFER_SYNTAXES))
    if kind == "append_junk":
        junk = rng.choice((bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), b"\0" * rng.randrange(1, 9),
                           b"trailing text " + planted[0].encode(), b"\xff" * 12))
        return "append_junk", raw + junk
    if kind == "append_delimiter":  # in the data set's byte order
        seq_end, item_end = (SEQ_END, ITEM_END) if info.get("ts") != "1.2.840.10008.1.2.2" else \
            (b"\xff\xfe\xe0\xdd", b"\xff\xfe\xe0\x0d")
        return "append_delimiter", raw + rng.choice((seq_end + b"\0\0\0\0", item_end + b"\0\0\0\0",
                                                     seq_end + b"\0\0\0\0" + seq_end + b"\0\0\0\0"))
    if kind == "deep_nesting":
        if not elems or "implicit" not in info:
            return "deep_nesting_none", raw
        depth = rng.choice((63, 64, 65, 70, 200, 1000))
        blob = _nested(depth, planted[0], undefined=rng.random() < 0.5, implicit=info["implicit"])
        return f"deep_nesting_{depth}", _insert_top(raw, elems, 0x00081140, blob)
    raise ValueError(kind)


def _non_dicom(rng: random.Random, planted: str) -> dict[str, bytes]:
    return {
        "empty.dcm": b"",
        "text.dcm": f"Patient {planted}\n".encode() * 20,
        "random.dcm": bytes(rng.randrange(256) for _ in range(3000)),
        "png.dcm": b"\x89PNG\r\n\x1a\n" + bytes(200),
        "zip.dcm": b"PK\x03\x04" + bytes(100),
        "preamble_only.dcm": b"\0" * 128 + b"DICM",
        "dicm_only.dcm": b"DICM",
        "one_byte": b"\x08",
        "meta_only.dcm": sources()[0][1][:200] if sources() else b"",
    }


class Case(NamedTuple):
    data: bytes
    kind: str  # mutation label
    source: str  # pydicom test file it was made from ("" for the non-DICOM ones)
    planted: tuple[str, ...]  # identifying values that must not survive


@functools.lru_cache(maxsize=1)
def corpus() -> dict[str, Case]:
    """relative path -> Case, seeded: the same corpus every run."""
    rng = random.Random(SEED)
    cases: dict[str, Case] = {}
    srcs = sources()
    images = [s for s in srcs if _plain_image(s[1])]
    n = 0

    def add(kind: str, name: str, raw: bytes, planted: tuple[str, ...]) -> None:
        nonlocal n
        label, data = mutate(kind, raw, planted, rng)
        cases[f"case{n // 100:02d}/{n:04d}_{label}_{name}"] = Case(data, label, name, planted)
        n += 1

    for name, raw, planted in srcs:  # every source: two mutations
        for kind in rng.sample(KINDS, 2):
            add(kind, name, raw, planted)
    for name, raw, planted in images:  # images a scanner makes (the pipeline's inputs): four more each
        for kind in rng.sample(KINDS, 4):
            add(kind, name, raw, planted)
    for kind in KINDS:  # and each kind on extra random images, so every kind is well represented
        for _ in range(6):
            add(kind, *rng.choice(images))
    for depth in (64, 65, 1000):  # the limit, just above it, far above it: on a CT and an MR image
        for name in ("CT_small.dcm", "MR_small.dcm"):
            raw, planted = next((r, p) for nm, r, p in srcs if nm == name)
            elems, info = elements(raw)
            for undefined in (True, False):
                blob = _nested(depth, planted[0], undefined=undefined, implicit=info["implicit"])
                cases[f"deep/{depth}_{'undef' if undefined else 'def'}_{name}"] = Case(
                    _insert_top(raw, elems, 0x00081140, blob), f"deep_nesting_{depth}", name, planted)
    for name, data in _non_dicom(rng, srcs[0][2][0]).items():
        cases[f"other/{name}"] = Case(data, "non_dicom", "", srcs[0][2])
    for rel in (".hidden.dcm", "_underscore.dcm", ".git/objects/ab", "_truth/x.json", "ok/.DS_Store"):
        name, raw, planted = rng.choice(srcs)
        cases[rel] = Case(raw, "hidden", name, planted)
    return cases


# ----------------------------------------------------------------------------------------- checks

def read_back(data: bytes) -> pydicom.Dataset:
    """dcmread + a walk converting every element at every depth (iterative: no recursion limit)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    stack = [ds]
    while stack:
        item = stack.pop()
        for elem in item:
            if elem.VR == "SQ":
                stack.extend(elem.value)
    return ds


def survivors(planted: tuple[str, ...], blob: bytes) -> list[str]:
    return [v for v in planted if v.encode() in blob or v.encode("utf-16-le") in blob]


_TOKEN = re.compile(rb"FZ(?:FAM|GIV|PID|ACC|INST|REF|OPER|OPID|RACC|NREF|PRIV|PSQ|DOC|DESC)\d{3}Q")


def _in_process(case: Case) -> tuple[str, bytes | None]:
    """What the pipeline does with one file: de-identify, reading the audit's identifying values from the same
    parse (``source=``), which must find at least what a separate header read finds.  Returns
    ("deidentified", output) or (BadInput reason, None); anything else raised fails the test."""
    from imaging_tasks.deid import deidentify_bytes
    from imaging_tasks.dicom_io import read_header
    from imaging_tasks.errors import BadInput
    from imaging_tasks.phi_audit import IdentifyingValues, dicom_identifying_values, retained_by

    try:
        header_values = dicom_identifying_values(read_header(case.data), retained_by(None))
    except BadInput:
        header_values = None
    outcomes, read = [], []
    for fast in (True, False):  # the byte-level fast path (default) and the reference walker alone
        reader = IdentifyingValues(retained_by(None))
        try:
            outcomes.append(("deidentified", deidentify_bytes(case.data, KEY, fast=fast, source=reader.source)[0]))
            read.append(reader.values)
        except BadInput as exc:
            outcomes.append((exc.reason, None))
    assert outcomes[0][0] == outcomes[1][0], ("fast path and reference disagree", outcomes[0][0], outcomes[1][0])
    if outcomes[0][1] is not None:
        assert header_values is not None, "de-identified, but the audit cannot read the input's header"
        for values in read:  # never fewer values than the header read (more: elements after Pixel Data)
            assert all(strings <= values.get(attr, set()) for attr, strings in header_values.items()), \
                ("the de-identifier's parse missed identifying values", sorted(header_values), sorted(values))
        read_back(outcomes[1][1])
        assert not survivors(case.planted, outcomes[1][1]) and not _TOKEN.search(outcomes[1][1])
    return outcomes[0]


def test_fuzzed_inputs_never_abort_and_are_all_accounted_for(tmp_path):
    from imaging_tasks.deid.pseudonym import pseudo_id

    cases = corpus()
    n_dicom = sum(1 for c in cases.values() if c.kind not in ("hidden", "non_dicom"))
    assert len(cases) >= 500 and n_dicom >= 500, (len(cases), n_dicom)
    assert {c.kind.split("_depth")[0] for c in cases.values()} >= {
        "byte_flip", "truncate_random", "truncate_boundary", "huge_length", "garbled_vr", "relabel_ts",
        "append_junk", "append_delimiter", "deep_nesting_64", "deep_nesting_65", "deep_nesting_200",
        "deep_nesting_1000", "non_dicom", "hidden"}
    landing = tmp_path / "landing"
    for rel, case in cases.items():
        (landing / rel).parent.mkdir(parents=True, exist_ok=True)
        (landing / rel).write_bytes(case.data)

    # 1. as a user runs it: relative SRC, DST and quarantine, from the folder that holds them
    env = {k: v for k, v in os.environ.items() if k != "IMAGING_DEID_DEMO"}
    env["IMAGING_DEID_KEY"] = KEY.decode()
    proc = subprocess.run([sys.executable, "-m", "imaging_tasks.cli", "deidentify", "landing", "out",
                           "--quarantine", "quarantine"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("de-identified ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "deidentify-report.json").read_text())

    # 2. every input accounted for, exactly once
    by_input: dict[str, tuple[str, str]] = {}
    for section, entries in (("deidentified", report["deidentified_files"]), ("quarantined", report["quarantined"]),
                             ("skipped", report["skipped"])):
        for e in entries:
            assert e["input"] not in by_input, ("accounted twice", e)
            by_input[e["input"]] = (section, e.get("reason", "") or e.get("output", ""))
    ident = {pseudo_id(KEY, rel, "input"): rel for rel in cases}
    assert set(by_input) == set(ident), "inputs missing from the report, or unknown entries in it"
    assert report["inputs"] == len(cases) == report["deidentified"] + len(report["quarantined"]) + \
        len(report["skipped"])
    outcome = {ident[i]: v for i, v in by_input.items()}
    for rel, case in cases.items():
        section, what = outcome[rel]
        if case.kind == "hidden":
            assert (section, what) == ("skipped", "hidden_name"), rel
        else:
            assert section in ("deidentified", "quarantined"), (rel, section, what)
    assert all(q["reason"] != "deid_error" for q in report["quarantined"]), \
        [q["message"] for q in report["quarantined"] if q["reason"] == "deid_error"]

    # 3. every output reads back in full and carries no planted value (its own, or any source's tokens)
    published = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
                 for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != "deidentify-report.json"}
    assert set(published) == {e["output"] for e in report["deidentified_files"]}
    for rel, (section, output) in outcome.items():
        if section != "deidentified":
            continue
        data = published[output]
        read_back(data)
        assert not survivors(cases[rel].planted, data), (rel, survivors(cases[rel].planted, data))
        assert not _TOKEN.search(data), rel
    assert not any(_TOKEN.search(p.name.encode()) for p in (tmp_path / "out").rglob("*"))

    # 4. the same files through deidentify_bytes and the audit's header read, as the pipeline calls them:
    # BadInput or an output, nothing else, and the same outcome as the command line
    for rel, case in cases.items():
        if case.kind == "hidden":
            continue
        result, out = _in_process(case)
        section, what = outcome[rel]
        if what == "duplicate_instance":  # the tree's own refusal: another input wrote that instance first
            assert result == "deidentified", rel
            continue
        assert (result == "deidentified") == (section == "deidentified"), (rel, result, section, what)
        if out is not None:
            read_back(out)
            assert not survivors(case.planted, out) and not _TOKEN.search(out), rel
        else:
            assert result == what, (rel, result, what)

    # 5. what the issue found: these never pass, or pass exactly at the limit
    for rel, case in cases.items():
        section, what = outcome[rel]
        if case.kind in ("deep_nesting_65", "deep_nesting_70", "deep_nesting_200", "deep_nesting_1000") \
                and rel.startswith("deep/"):
            assert what == "nesting_too_deep", (rel, what)
        if rel.startswith("deep/64_"):
            assert section == "deidentified", (rel, what)
        if case.kind in ("append_delimiter", "truncate_boundary_depth1"):
            assert section == "quarantined", (rel, what)

    counts = Counter(section for section, _ in outcome.values())
    reasons = Counter(what for section, what in outcome.values() if section == "quarantined")
    kinds = Counter(case.kind.split("_depth")[0] for case in cases.values())
    print(f"\nfuzz: {len(cases)} inputs ({n_dicom} mutated DICOM, {kinds['non_dicom']} non-DICOM, "
          f"{kinds['hidden']} hidden) from {len(sources())} pydicom test files; de-identified "
          f"{counts['deidentified']}, quarantined {counts['quarantined']}, skipped {counts['skipped']}")
    print("quarantined by reason:", dict(reasons.most_common()))
    print("inputs by mutation:", dict(sorted(kinds.items())))
