"""Reading DICOM: headers only for indexing, whole series into a volume for processing.

Every failure to read becomes a :class:`BadInput` with a stable reason code, so the caller can
quarantine the file and go on: :func:`parse` (and so :func:`read_header` / :func:`read_full`) raises nothing
else for any input, however garbled (unknown VR bytes, delimiters out of place, nesting thousands deep...).

What "complete" means for a file (checked by :func:`parse` when it reads a whole file):

* every length the file declares is satisfied: the last element's value is as long as its header says, at
  every sequence depth (a cut inside a value or a defined-length sequence/item); every undefined-length
  sequence or item is closed by its delimiter (pydicom refuses a missing one);
* the data set ends exactly where its last element ends: no partial element header (a file cut inside the
  8-12 header bytes, which pydicom drops silently) and nothing but the closing sequence delimiter after an
  undefined-length last element;
* the group length of the data set's last group, when the file has one, is not larger than what is left of
  the file (a file cut at an element boundary inside a group whose length is declared).  Not for the Pixel
  Data group (7FE0), whose length re-encoding tools often leave stale; Pixel Data is checked on its own;
* no item or sequence delimiter stands where a data element belongs (e.g. appended after the data set);
* Pixel Data is encapsulated exactly when the transfer syntax says so (a relabelled file is refused).

A file cut exactly at a top-level element boundary, outside a group with a declared length, leaves no trace
in its bytes: only the object's own content can tell (an image without its Pixel Data, an RT Plan without its
beams...); de-identification checks that with a table of required content per SOP class
(``imaging_tasks.deid.rules.REQUIRED_CONTENT``).  A deflated data set is complete when its deflate stream is
(zlib refuses a cut one).

Nesting: at most :data:`MAX_NESTING` levels of sequences are accepted; deeper inputs are refused with
``nesting_too_deep`` (no scanner needs more, and recursion limits of readers and writers are far beyond it).
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from imaging_tasks import retry
from imaging_tasks.errors import BadInput

# First groups of a data set stored without preamble and 'DICM' (old archives, some PACS exports):
# the file meta group, or the identifying group 0008 that every composite object starts with.
_BARE_FIRST_GROUPS = (0x0002, 0x0008)


def _bare_dataset_offset(head: bytes) -> int | None:
    """Where a data set without preamble starts (0, or 4 after a lone 'DICM'); None if it is not one."""
    offset = 4 if head[:4] == b"DICM" else 0
    if len(head) < offset + 4:
        return None
    group, element = struct.unpack_from("<HH", head, offset)
    return offset if group in _BARE_FIRST_GROUPS and element < 0x0100 else None


MAX_NESTING = 64  # levels of nested sequences accepted (see the module docstring)
_UNDEFINED = 0xFFFFFFFF
_VR32 = frozenset("OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # explicit VRs with a 32-bit length
_SEQ_END = {True: struct.pack("<HHL", 0xFFFE, 0xE0DD, 0), False: struct.pack(">HHL", 0xFFFE, 0xE0DD, 0)}


def parse(data: bytes | BinaryIO, *, stop_before_pixels: bool = False, decode: bool = True) -> pydicom.Dataset:
    """``dcmread`` that also accepts a bare data set (no preamble/'DICM'), refuses what is not DICOM, is cut
    short (see the module docstring), nests deeper than MAX_NESTING or holds values that do not decode, and
    checks the transfer syntax.  Every value is decoded here (``decode=False`` leaves values to be decoded when
    read: for files this pipeline wrote and checked itself, where decoding thousands of per-frame items of an
    enhanced multi-frame object again costs seconds and finds nothing).  Every failure is a BadInput with a stable
    reason; nothing else is raised, whatever the input (except a transient storage fault while reading from
    an open remote file, which is re-raised for the caller's retry: it says nothing about the file).
    """
    from_memory = isinstance(data, (bytes, bytearray, memoryview))
    if from_memory:
        if not data:
            raise BadInput("empty_file", "the file is empty (0 bytes); re-export it from the source system")
        data = io.BytesIO(bytes(data))
    try:
        return _parse(data, stop_before_pixels, decode)
    except BadInput:
        raise
    except InvalidDicomError:
        raise BadInput("not_dicom", "no DICOM preamble/header found; only DICOM files belong in this prefix") from None
    except RecursionError:  # pydicom parses undefined-length sequences recursively: thousands of levels
        raise _too_deep() from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on truncated or garbled input
        if not from_memory and retry.is_transient(exc):
            raise  # a storage fault while streaming the header, not a bad file: the caller retries the read
        raise BadInput("unreadable_dicom", f"DICOM data set could not be parsed ({type(exc).__name__}); "
                       "the file is likely truncated or corrupt, re-send it") from None


def _too_deep() -> BadInput:
    return BadInput("nesting_too_deep", f"sequences nested more than {MAX_NESTING} levels deep; no acquisition "
                    "or analysis object needs that many, the file is corrupt or crafted - re-export it")


def _parse(data: BinaryIO, stop_before_pixels: bool, decode: bool = True) -> pydicom.Dataset:
    start = data.tell()
    src = data
    try:
        ds = pydicom.dcmread(src, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        data.seek(start)
        offset = _bare_dataset_offset(data.read(12))
        if offset is None:
            raise
        data.seek(start + offset)  # pydicom rewinds to 0 when it finds no preamble: give it a fresh stream
        src = io.BytesIO(data.read())
        ds = pydicom.dcmread(src, stop_before_pixels=stop_before_pixels, force=True)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts and not UID(str(ts)).is_transfer_syntax:
        raise BadInput("unreadable_dicom", "the file meta Transfer Syntax UID is not a transfer syntax; the file "
                       "is corrupt, re-export it")
    check_complete(ds)
    if not stop_before_pixels and not (ts and UID(str(ts)).is_deflated):
        _check_end(ds, src)
    if ts and 0x7FE00010 in ds:
        pixels = ds.get_item(0x7FE00010)
        undefined = pixels.length == _UNDEFINED if isinstance(pixels, RawDataElement) else \
            bool(getattr(pixels, "is_undefined_length", False))
        if undefined != UID(str(ts)).is_encapsulated:
            raise BadInput("wrong_transfer_syntax", f"Pixel Data is {'' if undefined else 'not '}encapsulated but "
                           f"the transfer syntax ({UID(str(ts)).name}) says otherwise: the file is mislabelled, "
                           "re-export it")
    if decode:
        decode_all(ds)
    return ds


def _last_read(ds: pydicom.Dataset):
    """The top-level element read last (the highest file position), undecoded; None for an empty data set."""
    last, last_pos = None, -1
    for tag in ds.keys():
        elem = ds.get_item(tag)
        pos = elem.value_tell if isinstance(elem, RawDataElement) else getattr(elem, "file_tell", None)
        if pos is not None and pos > last_pos:
            last, last_pos = elem, pos
    return last


def _check_end(ds: pydicom.Dataset, src: BinaryIO) -> None:
    """The data set ends where its last element ends; the last group is as long as its group length says."""
    last = _last_read(ds)
    if last is None:
        return
    end = src.seek(0, io.SEEK_END)
    little = getattr(ds, "original_encoding", (None, True))[1] is not False
    if isinstance(last, RawDataElement):
        if last.length == _UNDEFINED:  # encapsulated Pixel Data: pydicom stopped after its delimiter
            stop = last.value_tell + len(last.value or b"") + 8
        else:
            stop = last.value_tell + last.length
    elif getattr(last, "is_undefined_length", False):
        # an undefined-length sequence: the data set must end with its closing delimiter
        src.seek(end - 8)
        stop = end if src.read(8) == _SEQ_END[little] else -1
    else:  # decoded while reading (Specific Character Set, empty values): its length is in the header before it
        implicit = getattr(ds, "original_encoding", (False, True))[0]
        long_form = implicit or last.VR in _VR32
        src.seek(last.file_tell - (4 if long_form else 2))
        raw_length = src.read(4 if long_form else 2)
        fmt = ("<" if little else ">") + ("L" if long_form else "H")
        stop = last.file_tell + struct.unpack(fmt, raw_length)[0] if len(raw_length) == struct.calcsize(fmt) else -1
    if stop != end:
        raise BadInput("truncated_file", "the data set does not end with a whole element (a cut element header, "
                       "a missing sequence delimiter or trailing bytes); the file was cut short, re-send it")
    # Not for the Pixel Data group: tools that re-encode pixels often leave a stale (7FE0,0000) behind, and Pixel
    # Data is checked on its own (its length or fragments, and Rows x Columns x frames).
    group = int(last.tag) >> 16
    gl = ds.get_item(group << 16) if group != 0x7FE0 and (group << 16) in ds else None
    if isinstance(gl, RawDataElement) and gl.value is not None and len(gl.value) == 4:
        declared = struct.unpack("<L" if little else ">L", gl.value)[0]
        if gl.value_tell + 4 + declared > end:
            raise BadInput("truncated_file", f"group {group:04X} declares {declared} bytes but the file ends "
                           f"{gl.value_tell + 4 + declared - end} bytes earlier; the file was cut short, re-send it")


def check_complete(ds: pydicom.Dataset) -> None:
    """Refuse a data set whose last element (at any sequence depth) is shorter than its declared length.

    pydicom stops quietly at the end of a cut file and returns the element with a short or empty value;
    without this a truncated file would be passed on as if complete.  Iterative: no recursion limit.
    """
    item, depth = ds, 0
    while True:
        tags = list(item.keys())
        if not tags:
            return
        tag = max(tags, key=lambda t: _position(item.get_item(t)))
        elem = item.get_item(tag)
        if isinstance(elem, RawDataElement):
            if elem.value is not None and elem.length != _UNDEFINED and len(elem.value) < elem.length:
                pixels = int(tag) == 0x7FE00010
                raise BadInput("truncated_pixels" if pixels else "truncated_file",
                               f"the file ends inside {'Pixel Data' if pixels else f'element {tag}'} "
                               f"({len(elem.value)} of {elem.length} bytes); it was cut short, re-send it")
            return
        if elem.VR != "SQ" or not elem.value:
            return
        depth += 1
        if depth > MAX_NESTING:
            raise _too_deep()
        item = elem.value[-1]


def _position(elem) -> int:
    pos = elem.value_tell if isinstance(elem, RawDataElement) else getattr(elem, "file_tell", None)
    return -1 if pos is None else pos


def decode_all(ds: pydicom.Dataset) -> None:
    """Decode every value at every depth (iteratively), so garbled input is refused here and not half-way
    through a caller: unknown VR bytes, values that do not decode, delimiters where elements belong, more than
    MAX_NESTING levels of sequences.  Raises BadInput (or lets the caller map pydicom's exceptions)."""
    stack = [(ds, 0)]
    while stack:
        item, depth = stack.pop()
        for tag in list(item.keys()):
            if tag >> 16 == 0xFFFE:
                raise BadInput("unreadable_dicom", "an item or sequence delimiter stands where a data element "
                               "belongs (e.g. appended after the data set); the file is corrupt, re-export it")
            elem = item[tag]
            if elem.VR == "SQ" and elem.value:
                if depth + 1 > MAX_NESTING:
                    raise _too_deep()
                stack.extend((child, depth + 1) for child in elem.value)


def check_readable(data: bytes) -> pydicom.Dataset:
    """Parse bytes about to be written as pydicom will read them back: the whole file, every value at every
    depth.  Raises BadInput("unwritable_dicom") if pydicom cannot (a writer bug or a value kept from the source
    that does not survive writing); nothing unreadable is ever published."""
    try:
        return parse(data)
    except BadInput as exc:
        raise BadInput("unwritable_dicom", f"the de-identified output does not read back ({exc.reason}); nothing "
                       "was written - report the input's sha256") from None


def read_header(data: bytes | BinaryIO, *, decode: bool = True) -> pydicom.Dataset:
    """Parse a file's header without pixels; raise BadInput for anything that is not readable DICOM.

    Accepts bytes or an open binary file; with a file, only the header bytes are read.  ``decode``: see
    :func:`parse`.
    """
    ds = parse(data, stop_before_pixels=True, decode=decode)
    check_required(ds)
    return ds


REQUIRED_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality")


def check_required(ds: pydicom.Dataset) -> None:
    """Raise BadInput("missing_attribute") unless the attributes every consumer needs have values."""
    for tag in REQUIRED_TAGS:
        try:
            value = str(ds.get(tag, "") or "")
        except Exception:  # noqa: BLE001 - a value that does not decode is as good as missing
            value = ""
        if not value:
            raise BadInput("missing_attribute", f"required attribute {tag} is missing or empty")


def read_full(data: bytes) -> pydicom.Dataset:
    """Parse a whole file including pixel data, checking the pixels decode to the declared size."""
    ds = parse(data)
    check_required(ds)
    if "PixelData" in ds:
        try:
            ds.pixel_array  # noqa: B018 - decode now so truncation is caught here, not mid-algorithm
        except Exception as exc:
            raise BadInput("truncated_pixels", f"pixel data cannot be decoded ({type(exc).__name__}: "
                           "size does not match Rows x Columns x frames); the file is truncated, re-send it") from None
    return ds


@dataclass
class Volume:
    """A 3-D image in (z, y, x) order with physical geometry, values rescaled (HU for CT)."""

    array: np.ndarray
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    origin_mm: tuple[float, float, float]  # (x, y, z) patient coordinates of the first voxel
    direction: tuple[float, ...]  # 3x3 row-major, columns are the x, y, z axes in patient space


def load_series(paths: list[Path] | list[str]) -> Volume:
    """Stack a single-frame series into a volume, ordered along the slice normal."""
    datasets = [pydicom.dcmread(str(p)) for p in paths]
    if not datasets:
        raise BadInput("empty_series", "a series with no readable instances")
    first = datasets[0]
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    datasets.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    if len(datasets) > 1:
        gaps = np.diff(positions @ normal)
        dz = float(np.median(gaps))
        if np.any(np.abs(gaps - dz) > 0.01 * abs(dz) + 1e-3):
            raise BadInput("irregular_slices", "slice positions are not evenly spaced (missing instances?)")
    else:
        dz = float(getattr(first, "SliceThickness", 1.0) or 1.0)
    slices = []
    for d in datasets:
        slope = float(getattr(d, "RescaleSlope", 1) or 1)
        intercept = float(getattr(d, "RescaleIntercept", 0) or 0)
        slices.append(d.pixel_array.astype(np.float32) * slope + intercept)
    array = np.stack(slices)
    dy, dx = (float(v) for v in first.PixelSpacing)
    direction = tuple(np.column_stack([row, col, normal]).ravel().tolist())
    return Volume(array=array, spacing_mm=(abs(dz), dy, dx), origin_mm=tuple(positions[0].tolist()),
                  direction=direction)
