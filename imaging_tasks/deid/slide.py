"""Whole-slide image de-identification for Aperio SVS and generic tiled TIFF.

Slides keep PHI in three places: the label image (a photo of the handwritten/printed slide label), the
macro image (an overview photo that includes the label), and text tags (Aperio's ImageDescription holds
Filename, Date, Time, User, ScanScope ID...; TIFF DateTime/Artist/Software/EXIF...).

Approach: a byte-level copy of the TIFF structure.  The kept pages' compressed strips/tiles are copied
verbatim (so pixels are identical at every level, with no decode/re-encode and no codec needed) and a new
IFD chain is written with:
* label and macro pages dropped,
* only an allow-list of technical TIFF tags kept (geometry, compression, colour, JPEG tables, ICC),
* the Aperio ImageDescription rebuilt from its header line (which OpenSlide needs to recognise the
  vendor) plus an allow-list of technical ``key = value`` fields; generic TIFF descriptions are dropped.
Anything not on an allow-list goes, so a field a vendor adds later is removed, not leaked.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import tifffile

from imaging_tasks.errors import BadInput
from imaging_tasks.storage import as_path, sha256_of

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
_OFFSET_TAGS = {273: 279, 324: 325}  # offsets tag -> byte counts tag
_DESCRIPTION = 270

# Aperio ImageDescription fields that describe the optics and scan geometry, not the patient/operator.
# Matched case-sensitively, as Aperio writes them (the PHI audit in phi_audit.py uses the same set).
TECHNICAL_FIELDS = frozenset({
    "AppMag", "MPP", "StripeWidth", "OriginalWidth", "OriginalHeight", "Originalheight", "Filtered",
    "Focus Offset", "Left", "Top", "LineCameraSkew", "LineAreaXOffset", "LineAreaYOffset", "Exposure Time",
    "Exposure Scale", "DisplayColor", "Gamma", "ICC Profile",
})

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_COPY_BLOCK = 1 << 20


@dataclass
class _Page:
    index: int
    entries: dict[int, tuple[int, int, bytes]]  # code -> (TIFF type, count, raw value bytes)
    offsets_tag: int
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]
    description: str | None
    fields: dict[str, str] = field(default_factory=dict)


def _aperio_fields(desc: str) -> dict[str, str]:
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
    lower = {k.lower(): v for k, v in _aperio_fields(description or "").items()}
    patient_source = next((v for k, v in lower.items() if "barcode" in k and v), None) \
        or lower.get("filename") or digest
    return pseudo_id(key, digest, "study"), pseudo_id(key, patient_source, "patient")


def associated_kind(desc: str | None) -> str | None:
    """'label' or 'macro' when a page description names an associated image of that kind."""
    if not desc:
        return None
    if desc.startswith("Aperio"):
        lines = desc.split("|")[0].splitlines()
        candidates = lines[1:2]  # Aperio: "label 387x463" / "macro 1280x431" on the second line
    else:
        candidates = [desc.strip()[:64]]
    for text in candidates:
        m = re.match(r"\s*(label|macro)\b", text, re.IGNORECASE)
        if m:
            return m[1].lower()
    return None


def scrub_description(desc: str | None, removed: list[str]) -> str | None:
    """Aperio: header line + dimension line + allow-listed fields; anything else: dropped (None)."""
    if not desc:
        return None
    if not desc.startswith("Aperio"):
        _note(removed, "ImageDescription (non-Aperio text)")
        return None
    head, *parts = desc.split("|")
    lines = head.splitlines()
    kept_lines = [lines[0].strip()] + [ln.strip() for ln in lines[1:] if re.match(r"\s*\d+x\d+\b", ln)]
    if len(kept_lines) < len(lines):
        _note(removed, "ImageDescription header text")
    kept_parts = []
    for part in parts:
        name, sep, _ = part.partition("=")
        if sep and name.strip() in TECHNICAL_FIELDS:
            kept_parts.append(f"{name.strip()} = {part.partition('=')[2].strip()}")
        else:
            _note(removed, f"ImageDescription field {name.strip()!r}" if sep else "ImageDescription free text")
    return "\r\n".join(kept_lines) + "".join("|" + p for p in kept_parts)


def _check_file(src) -> None:
    if not src.is_file():
        raise BadInput("unreadable_slide", "the slide file is missing; re-send it")
    if src.stat().st_size == 0:
        raise BadInput("empty_file", "the slide file is empty (0 bytes); re-scan or re-export it")


def read_description(src) -> str:
    """The first page's ImageDescription of a slide ('' if none); BadInput if it is not readable TIFF.

    ``src``: a local path or a bucket URI; only the TIFF header is read (a few KB, even on a bucket).
    """
    path = as_path(src)
    _check_file(path)
    try:
        with path.open("rb") as fh, tifffile.TiffFile(fh) as tif:
            return tif.pages[0].description or ""
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on non-TIFF input
        raise BadInput("unreadable_slide", f"not a readable TIFF/SVS slide ({type(exc).__name__}); "
                       "check the file is a complete whole-slide image") from None


def _note(removed: list[str], what: str) -> None:
    if what not in removed:
        removed.append(what)


def _raw_tag_bytes(fh, tag) -> bytes:
    size = _TYPE_SIZES.get(int(tag.dtype))
    if size is None:
        raise ValueError(f"unknown TIFF type {int(tag.dtype)}")
    fh.seek(tag.valueoffset)
    data = fh.read(size * tag.count)
    if len(data) != size * tag.count:
        raise ValueError("tag value runs past the end of the file")
    return data


def _plan(tif: tifffile.TiffFile, removed: list[str]) -> list[_Page]:
    if getattr(tif, "is_ndpi", False):
        raise BadInput("unsupported_slide", "Hamamatsu NDPI is not a standard TIFF and cannot be rewritten here; "
                       "convert it to tiled TIFF/SVS first")
    fh = tif.filehandle
    pages = []
    for index in range(len(tif.pages)):
        page = tif.pages[index]
        desc = page.description or None
        kind = associated_kind(desc) if index > 0 else None
        if kind:
            _note(removed, f"page {index} ({kind} image)")
            continue
        entries: dict[int, tuple[int, int, bytes]] = {}
        offsets_tag = 324 if page.is_tiled else 273
        for tag in page.tags.values():
            code = int(tag.code)
            if code in _OFFSET_TAGS or code in _OFFSET_TAGS.values() or code == _DESCRIPTION:
                continue
            if code in KEPT_TAGS:
                entries[code] = (int(tag.dtype), int(tag.count), _raw_tag_bytes(fh, tag))
            else:
                _note(removed, f"TIFF tag {tag.name} ({code})")
        if 330 in page.tags:  # SubIFDs were dropped with their pointer tag
            _note(removed, "SubIFDs")
        pages.append(_Page(index=index, entries=entries, offsets_tag=offsets_tag,
                           offsets=tuple(int(o) for o in page.dataoffsets),
                           bytecounts=tuple(int(c) for c in page.databytecounts),
                           description=desc, fields=_aperio_fields(desc) if desc and desc.startswith("Aperio") else {}))
    if not pages:
        raise BadInput("unreadable_slide", "the TIFF has no image pages")
    return pages


class _TiffOut:
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
        src.seek(offset)
        left = count
        while left:
            block = src.read(min(left, _COPY_BLOCK))
            if not block:
                raise ValueError("strip/tile data runs past the end of the file")
            self.fh.write(block)
            left -= len(block)
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


def _mpp(pages: list[_Page], tif_page0) -> float | None:
    raw = pages[0].fields.get("MPP")
    try:
        if raw:
            return float(raw)
    except ValueError:
        pass
    try:  # generic TIFF: resolution tags (2 = inch, 3 = cm)
        unit = int(tif_page0.tags["ResolutionUnit"].value)
        num, den = tif_page0.tags["XResolution"].value
        per_unit = num / den
        if per_unit > 1 and unit in (2, 3):
            return (25400.0 if unit == 2 else 10000.0) / per_unit
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    return None


def deidentify_svs(src: Path, dst: Path, key: bytes, *, digest: str | None = None) -> dict:
    """Write a de-identified copy of the slide ``src`` to ``dst``; returns what was done.

    Returns ``{"pseudo_study", "pseudo_patient", "removed": [what was dropped, no values], "mpp",
    "dimensions": [width, height] of level 0, "pages": kept page count, "vendor": "aperio" | "generic"}``.  Raises BadInput("unreadable_slide") for
    files that are not readable TIFF.  ``digest``: the source's SHA-256 when the caller already has it.
    """
    src, dst = Path(src), Path(dst)
    _check_file(src)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("dst must differ from src: the source is needed while the copy is written")
    digest = digest or sha256_of(src)
    removed: list[str] = []
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with tifffile.TiffFile(src) as tif:
            pages = _plan(tif, removed)
            original_description = tif.pages[0].description or ""
            mpp = _mpp(pages, tif.pages[0])
            dimensions = [int(tif.pages[0].imagewidth), int(tif.pages[0].imagelength)]
            payload = sum(sum(p.bytecounts) for p in pages)
            big = tif.is_bigtiff or payload > 0xFFFFFFFF - (64 << 20)
            src_fh = tif.filehandle
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out_fh:
                out = _TiffOut(out_fh, tif.byteorder, big)
                copied: dict[tuple[int, int], int] = {}
                for page in pages:
                    new_offsets = []
                    for off, cnt in zip(page.offsets, page.bytecounts):
                        if off == 0 or cnt == 0:  # sparse tile
                            new_offsets.append(0)
                            continue
                        if (off, cnt) not in copied:
                            copied[(off, cnt)] = out.copy(src_fh, off, cnt)
                        new_offsets.append(copied[(off, cnt)])
                    entries = dict(page.entries)
                    entries[page.offsets_tag] = out.int_array(new_offsets)
                    entries[_OFFSET_TAGS[page.offsets_tag]] = out.int_array(list(page.bytecounts))
                    desc = scrub_description(page.description, removed)
                    if desc:
                        raw = desc.encode("ascii", "replace") + b"\0"
                        entries[_DESCRIPTION] = (2, len(raw), raw)
                    out.write_ifd(entries)
        with tifffile.TiffFile(tmp) as check:
            if len(check.pages) != len(pages):
                raise ValueError("re-read page count differs")
        os.replace(tmp, dst)
    except BadInput:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on non-TIFF or damaged input
        tmp.unlink(missing_ok=True)
        raise BadInput("unreadable_slide", f"not a readable TIFF/SVS slide ({type(exc).__name__}); "
                       "check the file is a complete whole-slide image") from None

    pseudo_study, pseudo_patient = slide_pseudonyms(key, digest, original_description)
    return {
        "pseudo_study": pseudo_study,
        "pseudo_patient": pseudo_patient,
        "removed": removed,
        "mpp": mpp,
        "dimensions": dimensions,
        "pages": len(pages),
        "vendor": "aperio" if pages[0].description and pages[0].description.startswith("Aperio") else "generic",
    }


__all__ = ["deidentify_svs", "slide_pseudonyms", "read_description", "scrub_description", "associated_kind", "KEPT_TAGS",
           "TECHNICAL_FIELDS"]
