"""TIFF pieces shared by the slide de-identifiers (Aperio/generic TIFF in :mod:`.slide`, OME-TIFF in :mod:`.ome`):
the tag allow-list, raw tag bytes, a classic/BigTIFF IFD writer for byte-level copies, and the one rule naming
a slide's study and patient.  Kept apart so that those two modules share it without importing each other.
"""
from __future__ import annotations

import struct

from imaging_tasks.errors import BadInput

from .pseudonym import pseudo_id

# TIFF tags copied as they are (everything else is dropped).  273/279/324/325 (strip/tile offsets and
# byte counts) are rewritten, 270 (ImageDescription) is scrubbed.
KEPT_TAGS = {
    254: "NewSubfileType", 255: "SubfileType", 256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample",
    259: "Compression", 262: "PhotometricInterpretation", 266: "FillOrder", 274: "Orientation",
    277: "SamplesPerPixel", 278: "RowsPerStrip", 282: "XResolution", 283: "YResolution",
    284: "PlanarConfiguration", 296: "ResolutionUnit", 317: "Predictor", 320: "ColorMap", 322: "TileWidth",
    323: "TileLength", 338: "ExtraSamples", 339: "SampleFormat", 340: "SMinSampleValue",
    341: "SMaxSampleValue", 347: "JPEGTables", 529: "YCbCrCoefficients", 530: "YCbCrSubSampling",
    531: "YCbCrPositioning", 532: "ReferenceBlackWhite", 32997: "ImageDepth", 32998: "TileDepth",
    34675: "InterColorProfile",
}
OFFSET_TAGS = {273: 279, 324: 325}  # offsets tag -> byte counts tag
DESCRIPTION = 270

TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
COPY_BLOCK = 1 << 20


def aperio_fields(desc: str) -> dict[str, str]:
    out = {}
    for part in desc.split("|")[1:]:
        name, sep, value = part.partition("=")
        if sep:
            out[name.strip()] = value.strip()
    return out


def slide_pseudonyms(key: bytes, digest: str, description: str | None) -> tuple[str, str]:
    """``(study, patient)`` pseudonyms of a slide, the one rule used by the index and the de-identifier.

    The study is the file (its SHA-256); the patient is the slide's barcode or Aperio Filename when the
    scanner recorded one (so a case's slides group together), else the file too.
    """
    lower = {k.lower(): v for k, v in aperio_fields(description or "").items()}
    patient_source = next((v for k, v in lower.items() if "barcode" in k and v), None) \
        or lower.get("filename") or digest
    return pseudo_id(key, digest, "study"), pseudo_id(key, patient_source, "patient")


def check_file(src) -> None:
    if not src.is_file():
        raise BadInput("unreadable_slide", "the slide file is missing; re-send it")
    if src.stat().st_size == 0:
        raise BadInput("empty_file", "the slide file is empty (0 bytes); re-scan or re-export it")


def note(removed: list[str], what: str) -> None:
    if what not in removed:
        removed.append(what)


def raw_tag_bytes(fh, tag) -> bytes:
    size = TYPE_SIZES.get(int(tag.dtype))
    if size is None:
        raise ValueError(f"unknown TIFF type {int(tag.dtype)}")
    fh.seek(tag.valueoffset)
    data = fh.read(size * tag.count)
    if len(data) != size * tag.count:
        raise ValueError("tag value runs past the end of the file")
    return data


def copy_range(src, dst, offset: int, length: int) -> None:
    """``length`` bytes of ``src`` from ``offset`` appended to ``dst`` in blocks (the byte-level slide copiers:
    TIFF, NDPI, MIRAX); EOFError when the source ends first (a truncated file)."""
    src.seek(offset)
    left = length
    while left:
        block = src.read(min(left, COPY_BLOCK))
        if not block:
            raise EOFError(f"{left} byte(s) missing at the end of the file")
        dst.write(block)
        left -= len(block)


class TiffOut:
    """Minimal classic/BigTIFF writer for copying IFDs with relocated data."""

    def __init__(self, fh, byteorder: str, big: bool):
        self.fh, self.bo, self.big = fh, byteorder, big
        mark = b"II" if byteorder == "<" else b"MM"
        if big:
            fh.write(mark + struct.pack(byteorder + "HHHQ", 43, 8, 0, 0))
            self._next_ptr = 8
        else:
            fh.write(mark + struct.pack(byteorder + "HI", 42, 0))
            self._next_ptr = 4

    def align(self, n: int = 8) -> None:
        pad = -self.fh.tell() % n
        if pad:
            self.fh.write(b"\0" * pad)

    def copy(self, src, offset: int, count: int) -> int:
        pos = self.fh.tell()
        try:
            copy_range(src, self.fh, offset, count)
        except EOFError:
            raise ValueError("strip/tile data runs past the end of the file") from None
        return pos

    def write_ifd(self, entries: dict[int, tuple[int, int, bytes]]) -> None:
        bo, big = self.bo, self.big
        inline = 8 if big else 4
        self.align(8)
        pos = self.fh.tell()
        n = len(entries)
        ifd_size = (8 + 20 * n + 8) if big else (2 + 12 * n + 4)
        ext_pos = pos + ifd_size
        body = bytearray(struct.pack(bo + ("Q" if big else "H"), n))
        blobs = bytearray()
        for code in sorted(entries):
            typ, count, raw = entries[code]
            body += struct.pack(bo + ("HHQ" if big else "HHI"), code, typ, count)
            if len(raw) <= inline:
                body += raw + b"\0" * (inline - len(raw))
            else:
                if (ext_pos + len(blobs)) % 2:
                    blobs += b"\0"
                body += struct.pack(bo + ("Q" if big else "I"), ext_pos + len(blobs))
                blobs += raw
        body += b"\0" * (8 if big else 4)  # next IFD: patched when another page follows
        self.fh.write(bytes(body) + bytes(blobs))
        end = self.fh.tell()
        self.fh.seek(self._next_ptr)
        self.fh.write(struct.pack(bo + ("Q" if big else "I"), pos))
        self.fh.seek(end)
        self._next_ptr = pos + ifd_size - (8 if big else 4)

    def int_array(self, values: tuple[int, ...] | list[int]) -> tuple[int, int, bytes]:
        if self.big:
            return 16, len(values), struct.pack(f"{self.bo}{len(values)}Q", *values)
        if values and max(values) > 0xFFFFFFFF:
            raise ValueError("offset beyond 4 GiB in a classic TIFF")
        return 4, len(values), struct.pack(f"{self.bo}{len(values)}I", *values)
