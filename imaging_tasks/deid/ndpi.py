"""Hamamatsu NDPI de-identification: the NDPI branch of the slide byte-copy writer (see :mod:`.slide`).

NDPI is classic TIFF with NDPI's own quirks, which tifffile and libtiff writers do not reproduce, so it is read
and written here the way OpenSlide's ``hamamatsu-ndpi`` reader sees it: the first-IFD pointer and every
next-IFD pointer are 8 bytes (classic TIFF "pretending to be BigTIFF"; a classic TIFF with 4-byte pointers
and the format flag in its first IFD is NDPI to OpenSlide too, and is read as such), and each page is ONE JPEG
strip whose restart intervals are OpenSlide's tiles.  The copy is always written in NDPI mode, with the 4-byte
high halves tifffile expects after each IFD (zero: the file is below 4 GiB), so tifffile reads it as NDPI.

Where NDP.scan puts PHI: the macro page (SourceLens -1, a photo of the glass with its label), the Reference
tag 65427 (the label text), the property map 65449 (``key=value`` lines), DateTime, the scanner serial and
other vendor tags, and possibly COM/APPn segments of a JPEG header.  What is written:

* pyramid pages only (SourceLens > 0), in their order; the macro (-1) and the scan map (-2) are dropped;
* only the tags on :data:`KEPT_NDPI_TAGS` (each with why OpenSlide or tifffile needs it); everything else goes;
* each kept JPEG strip copied byte for byte after its header, whose COM and APPn segments (other than a
  thumbnail-less JFIF APP0 and the Adobe APP14 colour-transform flag) are dropped; McuStarts (65426) are shifted
  by the bytes removed, so OpenSlide still finds every tile without scanning, and pixels are identical.

Files of 4 GiB and more (NDPI's 64-bit extension: offsets' high bits implied or in tags 65324/65325/65432) are
refused with ``BadInput("unsupported_slide")``: OpenSlide's heuristic for those high bits depends on how the
writer laid the file out, which cannot be reproduced reliably here.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from imaging_tasks.errors import BadInput
from imaging_tasks.storage import sha256_of

from .pseudonym import pseudo_id
from .tiff_copy import TYPE_SIZES as _TYPE_SIZES
from .tiff_copy import copy_range

NDPI_FORMAT_FLAG = 65420
SOURCE_LENS = 65421
MCU_STARTS = 65426
REFERENCE = 65427
PROPERTY_MAP = 65449
MAX_CLASSIC_BYTES = 0xFFFFFFFF

# The tags a de-identified NDPI keeps (strip offsets/byte counts 273/279 are rewritten), and why.
KEPT_NDPI_TAGS = {
    256: "ImageWidth: level width (OpenSlide checks it against the JPEG)",
    257: "ImageLength: level height",
    258: "BitsPerSample: 8 bits per channel",
    259: "Compression: 7 (JPEG)",
    262: "PhotometricInterpretation: colour space of the JPEG",
    271: "Make: always written as 'Hamamatsu' (tifffile recognises NDPI pages by Make + 65420), never copied",
    277: "SamplesPerPixel: 3",
    278: "RowsPerStrip: OpenSlide requires it equal to the height (one strip per level)",
    282: "XResolution: pixels per cm, becomes openslide.mpp-x",
    283: "YResolution: pixels per cm, becomes openslide.mpp-y",
    284: "PlanarConfiguration: chunky",
    296: "ResolutionUnit: 3 (cm), else OpenSlide records no mpp",
    530: "YCbCrSubSampling: chroma subsampling of the JPEG",
    531: "YCbCrPositioning: chroma siting",
    NDPI_FORMAT_FLAG: "NDPI format flag: how OpenSlide recognises NDPI (and reads 8-byte IFD pointers)",
    SOURCE_LENS: "SourceLens: objective magnification; > 0 marks a pyramid level (openslide.objective-power)",
    65422: "XOffsetFromSlideCentre: scan position on the glass in nm (geometry, no identity)",
    65423: "YOffsetFromSlideCentre: scan position on the glass in nm",
    65424: "ZOffsetFromSlideCentre: focal plane; OpenSlide requires it on levels and keeps plane 0",
    MCU_STARTS: "McuStarts: offset of each restart interval (tile) in the strip; spares OpenSlide a scan",
}
# Pyramid-page tags that may not be missing (OpenSlide reads them all).
_REQUIRED = (256, 257, 278, 273, 279, SOURCE_LENS, 65424)
_HIGH_BYTES_TAGS = (65324, 65325, 65432)
_TAG_NAMES = {270: "ImageDescription", 271: "Make", 272: "Model", 305: "Software", 306: "DateTime", 315: "Artist",
              316: "HostComputer", 65324: "OffsetHighBytes", 65325: "ByteCountHighBytes", 65425: "TissueIndex",
              65427: "Reference (slide label text)", 65428: "AuthCode", 65432: "McuStartsHighBytes",
              65439: "FocusPoints", 65440: "FocusPointRegions", 65441: "CaptureMode",
              65442: "ScannerSerialNumber", 65444: "JpegQuality", 65445: "RefocusInterval", 65446: "FocusOffset",
              65448: "FirmwareVersion", 65449: "property map", 65450: "LabelObscured"}
# Make, Model, Software: the vendor and its program ("Hamamatsu", "NDP.scan 3.3"): dropped, but not evidence.
_VENDOR_TEXT = (271, 272, 305)
_INT_FORMATS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q"}
_MAX_HEADER = 1 << 20  # a JPEG header (tables) longer than this is not one
_MAKE = b"Hamamatsu\0"
_NUMERIC_TYPES = frozenset({3, 4, 5, 8, 9, 10, 11, 12, 13, 16, 17})  # a kept tag of another type (text) is dropped


@dataclass
class _Ifd:
    index: int
    entries: dict[int, tuple[int, int, bytes]]  # code -> (type, count, raw value bytes)

    def values(self, code: int, bo: str) -> list:
        typ, count, raw = self.entries[code]
        if typ in (5, 10):
            nums = struct.unpack(f"{bo}{2 * count}{'I' if typ == 5 else 'i'}", raw)
            return [a / b if b else float("nan") for a, b in zip(nums[::2], nums[1::2])]
        if typ in (11, 12):
            return list(struct.unpack(f"{bo}{count}{'f' if typ == 11 else 'd'}", raw))
        if typ in _INT_FORMATS:
            return list(struct.unpack(f"{bo}{count}{_INT_FORMATS[typ]}", raw))
        raise ValueError(f"tag {code} is not numeric")

    def first(self, code: int, bo: str):
        return self.values(code, bo)[0]

    def text(self, code: int) -> str:
        typ, _, raw = self.entries[code]
        return raw.split(b"\0")[0].decode("latin-1") if typ in (1, 2, 7) else ""


def _bad(what: str) -> BadInput:
    return BadInput("unreadable_slide", f"the NDPI slide is damaged ({what}); re-scan or re-export it")


def _first_ifd_has_flag(fh, bo: str, offset: int) -> bool:
    fh.seek(offset)
    raw = fh.read(2)
    if len(raw) < 2:
        return False
    n = struct.unpack(bo + "H", raw)[0]
    table = fh.read(12 * n)
    return len(table) == 12 * n and any(
        struct.unpack(bo + "H", table[12 * i:12 * i + 2])[0] == NDPI_FORMAT_FLAG for i in range(n))


def _mode(fh) -> tuple[str, int, int] | None:
    """``(byte order, first IFD offset, next-pointer size)`` of an NDPI file, else None.

    As OpenSlide: NDPI mode (8-byte pointers) when the first-IFD pointer read as 8 bytes leads to an IFD with
    the format flag; else a classic TIFF (4-byte pointers) whose first IFD has the flag is NDPI too (some
    converters write it so), and OpenSlide still reads it as Hamamatsu.
    """
    fh.seek(0)
    head = fh.read(12)
    if len(head) < 12 or head[:2] not in (b"II", b"MM"):
        return None
    bo = "<" if head[:2] == b"II" else ">"
    if struct.unpack(bo + "H", head[2:4])[0] != 42:
        return None
    wide = struct.unpack(bo + "Q", head[4:12])[0]
    if _first_ifd_has_flag(fh, bo, wide):
        return bo, wide, 8
    narrow = struct.unpack(bo + "I", head[4:8])[0]
    if _first_ifd_has_flag(fh, bo, narrow):
        return bo, narrow, 4
    return None


def is_ndpi(path) -> bool:
    """True when ``path`` is a TIFF whose first IFD holds the NDPI format flag (OpenSlide's own test)."""
    try:
        with open(path, "rb") as fh:
            return _mode(fh) is not None
    except (OSError, struct.error, ValueError, OverflowError):
        return False


def _read_ifds(fh, size: int) -> tuple[str, list[_Ifd]]:
    """Byte order and every IFD of an NDPI file (< 4 GiB), values read in full; BadInput when damaged."""
    try:
        mode = _mode(fh)
    except (OSError, ValueError, OverflowError):
        mode = None
    if mode is None:
        raise _bad("no TIFF header with the NDPI format flag")
    bo, offset, pointer = mode
    ifds: list[_Ifd] = []
    seen: set[int] = set()
    while offset:
        if offset in seen or offset + 2 > size or len(ifds) > 4096:
            raise _bad("a directory pointer is out of the file or loops")
        seen.add(offset)
        fh.seek(offset)
        count_raw = fh.read(2)
        if len(count_raw) < 2:
            raise _bad("a directory runs past the end of the file (truncated)")
        n = struct.unpack(bo + "H", count_raw)[0]
        table = fh.read(12 * n + pointer)
        if len(table) < 12 * n + pointer:
            raise _bad("a directory runs past the end of the file (truncated)")
        entries: dict[int, tuple[int, int, bytes]] = {}
        for i in range(n):
            code, typ, count = struct.unpack(bo + "HHI", table[12 * i:12 * i + 8])
            width = _TYPE_SIZES.get(typ)
            if width is None:
                raise _bad(f"tag {code} has unknown TIFF type {typ}")
            nbytes = width * count
            if nbytes <= 4:
                raw = table[12 * i + 8:12 * i + 8 + nbytes]
            else:
                at = struct.unpack(bo + "I", table[12 * i + 8:12 * i + 12])[0]
                if at + nbytes > size:
                    raise _bad(f"the value of tag {code} runs past the end of the file (truncated)")
                fh.seek(at)
                raw = fh.read(nbytes)
            entries[code] = (typ, count, raw)
        ifds.append(_Ifd(len(ifds), entries))
        offset = struct.unpack(bo + ("Q" if pointer == 8 else "I"), table[12 * n:12 * n + pointer])[0]
    return bo, ifds


def _scrub_jpeg_header(head: bytes) -> tuple[bytes, int, list[str]]:
    """(kept header up to and including SOS, length of the original header, what was dropped).

    Kept: the segments a decoder needs (quantisation and Huffman tables, frame, restart interval, arithmetic
    conditioning, scan header), a JFIF APP0 without a thumbnail and an Adobe APP14 (its colour-transform flag
    changes decoding).  Dropped: COM and every other APPn (EXIF, XMP, ICC, vendor blocks), which can carry text.
    """
    if head[:2] != b"\xff\xd8":
        raise _bad("a pyramid level is not a JPEG")
    out, dropped, pos = bytearray(b"\xff\xd8"), [], 2
    while True:
        if pos + 4 > len(head) or head[pos] != 0xFF:
            raise _bad("a JPEG header is damaged")
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack(">H", head[pos + 2:pos + 4])[0]
        segment = head[pos:pos + 2 + length]
        if len(segment) < 2 + length or length < 2:
            raise _bad("a JPEG header is truncated")
        pos += 2 + length
        app0_jfif = marker == 0xE0 and segment[4:9] == b"JFIF\0" and length == 16
        app14_adobe = marker == 0xEE and segment[4:9] == b"Adobe" and length == 14
        if marker in (0xC4, 0xCC, 0xDB, 0xDD, 0xDA) or 0xC0 <= marker <= 0xCF or app0_jfif or app14_adobe:
            out += segment
        else:
            dropped.append("COM" if marker == 0xFE else f"APP{marker - 0xE0}" if 0xE0 <= marker <= 0xEF
                           else f"marker FF{marker:02X}")
        if marker == 0xDA:
            return bytes(out), pos, dropped


def _text_fields(ifd: _Ifd) -> dict[str, set[str]]:
    """Identifying text of one IFD: every ASCII tag not kept, and each value of the property map."""
    found: dict[str, set[str]] = {}
    for code, (typ, _count, _raw) in ifd.entries.items():
        if typ != 2 or code in KEPT_NDPI_TAGS or code in _VENDOR_TEXT:
            continue
        text = ifd.text(code).strip()
        if code == PROPERTY_MAP:
            for line in text.replace("\r", "\n").split("\n"):
                name, sep, value = line.partition("=")
                if sep and value.strip():
                    found.setdefault(f"hamamatsu.{name.strip()}", set()).add(value.strip())
        elif text:
            found.setdefault(_TAG_NAMES.get(code, f"tag {code}"), set()).add(text)
    return found


def ndpi_identifying_fields(src) -> dict[str, set[str]]:
    """``{field: values}`` of the text an NDPI carries outside the kept technical tags (Reference, DateTime,
    serial, property map values...): what the PHI audit searches a de-identified copy for."""
    path = Path(src)
    with open(path, "rb") as fh:
        _bo, ifds = _read_ifds(fh, path.stat().st_size)
    found: dict[str, set[str]] = {}
    for ifd in ifds:
        for name, values in _text_fields(ifd).items():
            found.setdefault(name, set()).update(values)
    return found


def ndpi_identifying_values(src) -> set[str]:
    """The identifying strings of :func:`ndpi_identifying_fields`, flattened."""
    return set().union(*ndpi_identifying_fields(src).values())


def ndpi_pseudonyms(key: bytes, digest: str, src) -> tuple[str, str]:
    """``(study, patient)`` pseudonyms: the study is the file (its SHA-256); the patient the slide's Reference
    (the label text NDP.scan records, so a case's slides group together) when present, else the file too."""
    path = Path(src)
    with open(path, "rb") as fh:
        _bo, ifds = _read_ifds(fh, path.stat().st_size)
    reference = ifds[0].text(REFERENCE).strip() if REFERENCE in ifds[0].entries else ""
    return pseudo_id(key, digest, "study"), pseudo_id(key, reference or digest, "patient")


# ----------------------------------------------------------------------------------------------- writing
class _NdpiOut:
    """NDPI container writer: header + 4 zero bytes (high half of the first pointer), then per page its strip,
    its out-of-line values and its IFD, whose 8-byte next pointer is patched when another page follows."""

    def __init__(self, fh, bo: str):
        self.fh, self.bo = fh, bo
        fh.write((b"II" if bo == "<" else b"MM") + struct.pack(bo + "HI", 42, 0) + b"\0" * 4)
        self.next_ptr, self.next_size = 4, 4

    def _align(self) -> None:
        if self.fh.tell() % 2:
            self.fh.write(b"\0")

    def page(self, head: bytes, src, body_offset: int, body_length: int,
             entries: dict[int, tuple[int, int, bytes]]) -> None:
        """One page: ``head`` then ``body_length`` bytes of ``src`` from ``body_offset`` (streamed), then its
        values and IFD."""
        fh, bo = self.fh, self.bo
        self._align()
        start = fh.tell()
        fh.write(head)
        try:
            copy_range(src, fh, body_offset, body_length)
        except EOFError:
            raise _bad("a strip runs past the end of the file (truncated)") from None
        length = fh.tell() - start
        if fh.tell() > MAX_CLASSIC_BYTES - (1 << 20):
            raise BadInput("unsupported_slide", "the de-identified NDPI would exceed 4 GiB, which classic NDPI "
                           "offsets cannot address; convert the slide to tiled TIFF/SVS first")
        entries = dict(entries)
        entries[273] = (4, 1, struct.pack(bo + "I", start))
        entries[279] = (4, 1, struct.pack(bo + "I", length))
        where: dict[int, int] = {}
        for code in sorted(entries):
            raw = entries[code][2]
            if len(raw) > 4:
                self._align()
                where[code] = fh.tell()
                fh.write(raw)
        self._align()
        ifd = fh.tell()
        table = bytearray(struct.pack(bo + "H", len(entries)))
        for code in sorted(entries):
            typ, count, raw = entries[code]
            value = struct.pack(bo + "I", where[code]) if code in where else raw.ljust(4, b"\0")
            table += struct.pack(bo + "HHI", code, typ, count) + value
        # 8-byte next pointer, then the high halves of the entries' values/offsets (0: the file is < 4 GiB)
        fh.write(bytes(table) + b"\0" * 8 + b"\0" * 4 * len(entries))
        end = fh.tell()
        fh.seek(self.next_ptr)
        fh.write(struct.pack(bo + ("I" if self.next_size == 4 else "Q"), ifd))
        fh.seek(end)
        self.next_ptr, self.next_size = ifd + len(table), 8


def _note(removed: list[str], what: str) -> None:
    if what not in removed:
        removed.append(what)


def deidentify_ndpi(src: Path, dst: Path, key: bytes, *, digest: str | None = None) -> dict:
    """Write a de-identified copy of the NDPI ``src`` to ``dst`` (see the module docstring).

    Returns ``{"pseudo_study", "pseudo_patient", "removed": [what was dropped, no values], "mpp",
    "dimensions": [w, h] of level 0, "pages": kept page count, "vendor": "hamamatsu"}``.  BadInput
    ``unreadable_slide`` for a damaged file, ``unsupported_slide`` for one of 4 GiB or more.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("dst must differ from src: the source is needed while the copy is written")
    size = src.stat().st_size
    if size > MAX_CLASSIC_BYTES:
        raise BadInput("unsupported_slide", f"the NDPI is {size / 2 ** 30:.1f} GiB; NDPI files of 4 GiB and more "
                       "(64-bit offset extension) are not supported by the de-identifier; convert it to tiled "
                       "TIFF/SVS (e.g. with the scanner software) and send that")
    digest = digest or sha256_of(src)
    removed: list[str] = []
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with open(src, "rb") as fh:
            bo, ifds = _read_ifds(fh, size)
            if NDPI_FORMAT_FLAG not in ifds[0].entries:
                raise _bad("no NDPI format flag in the first directory")
            pages = []
            for ifd in ifds:
                if SOURCE_LENS not in ifd.entries:
                    raise _bad(f"directory {ifd.index} has no SourceLens tag")
                lens = ifd.first(SOURCE_LENS, bo)
                if not lens > 0:
                    kind = {-1: "macro image", -2: "scan map"}.get(lens, "non-pyramid page")
                    _note(removed, f"page {ifd.index} ({kind})")
                    continue
                if any(ifd.entries.get(code, (0, 0, b""))[2].strip(b"\0") for code in _HIGH_BYTES_TAGS):
                    raise BadInput("unsupported_slide", "the NDPI uses 64-bit offsets (files of 4 GiB and more), "
                                   "which the de-identifier does not support; convert it to tiled TIFF/SVS first")
                missing = [c for c in _REQUIRED if c not in ifd.entries]
                if missing:
                    raise _bad(f"level directory {ifd.index} lacks tags {missing}")
                pages.append(ifd)
            if not pages:
                raise _bad("no pyramid level")
            for ifd in pages:
                for code in sorted(ifd.entries):
                    if code not in KEPT_NDPI_TAGS and code not in (273, 279):
                        _note(removed, f"TIFF tag {_TAG_NAMES.get(code, code)} ({code})")
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out_fh:
                out = _NdpiOut(out_fh, bo)
                for ifd in pages:
                    offsets, counts = ifd.values(273, bo), ifd.values(279, bo)
                    if len(offsets) != 1 or len(counts) != 1:
                        raise _bad(f"level directory {ifd.index} is not a single strip")
                    start, length = offsets[0], counts[0]
                    if ifd.first(278, bo) != ifd.first(257, bo) or start + length > size or length < 4:
                        raise _bad(f"the strip of directory {ifd.index} is out of the file (truncated)")
                    fh.seek(start)
                    head = fh.read(min(length, _MAX_HEADER))
                    kept_head, old_len, dropped = _scrub_jpeg_header(head)
                    for seg in dropped:
                        _note(removed, f"JPEG {seg} segment")
                    delta = old_len - len(kept_head)
                    entries = {c: v for c, v in ifd.entries.items() if c in KEPT_NDPI_TAGS}
                    for code in [c for c, v in entries.items() if v[0] not in _NUMERIC_TYPES]:
                        del entries[code]
                        if code != 271:
                            _note(removed, f"TIFF tag {code} (allow-listed, but not a number)")
                    entries[271] = (2, len(_MAKE), _MAKE)
                    if MCU_STARTS in entries and delta:
                        count = entries[MCU_STARTS][1]
                        starts = [s - delta if s >= old_len else s for s in ifd.values(MCU_STARTS, bo)]
                        entries[MCU_STARTS] = (4, count, struct.pack(f"{bo}{count}I", *starts))
                    out.page(kept_head, fh, start + old_len, length - old_len, entries)
        with open(tmp, "rb") as check:
            _, again = _read_ifds(check, tmp.stat().st_size)
        if len(again) != len(pages) or NDPI_FORMAT_FLAG not in again[0].entries:
            raise ValueError("re-read page count differs")
        os.replace(tmp, dst)
    except BadInput:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, struct.error, ValueError, OverflowError) as exc:
        tmp.unlink(missing_ok=True)
        raise BadInput("unreadable_slide", f"not a readable NDPI slide ({type(exc).__name__}); check the file "
                       "is a complete whole-slide image") from None

    level0 = pages[0]
    mpp = None
    try:
        if level0.first(296, bo) == 3 and level0.first(282, bo) > 0:
            mpp = 10000.0 / level0.first(282, bo)
    except (KeyError, IndexError, ValueError):
        pass
    reference = ifds[0].text(REFERENCE).strip() if REFERENCE in ifds[0].entries else ""
    return {
        "pseudo_study": pseudo_id(key, digest, "study"),
        "pseudo_patient": pseudo_id(key, reference or digest, "patient"),
        "removed": removed,
        "mpp": mpp,
        "dimensions": [int(level0.first(256, bo)), int(level0.first(257, bo))],
        "pages": len(pages),
        "vendor": "hamamatsu",
    }


__all__ = ["deidentify_ndpi", "is_ndpi", "ndpi_identifying_fields", "ndpi_identifying_values", "ndpi_pseudonyms",
           "KEPT_NDPI_TAGS"]
