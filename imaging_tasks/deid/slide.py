"""Whole-slide image de-identification for Aperio SVS, generic tiled TIFF and Hamamatsu NDPI.

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

Hamamatsu NDPI (classic TIFF with 8-byte IFD pointers and one restart-marked JPEG strip per level, which
tifffile cannot write back) takes the same approach in :mod:`.ndpi`; :func:`deidentify_svs` dispatches to it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import tifffile

from imaging_tasks.errors import BadInput
from imaging_tasks.storage import as_path, sha256_of

from .ndpi import deidentify_ndpi, is_ndpi
from .ome import deidentify_ome
from .tiff_copy import DESCRIPTION as _DESCRIPTION
from .tiff_copy import KEPT_TAGS, slide_pseudonyms
from .tiff_copy import OFFSET_TAGS as _OFFSET_TAGS
from .tiff_copy import TiffOut as _TiffOut
from .tiff_copy import aperio_fields as _aperio_fields
from .tiff_copy import check_file as _check_file
from .tiff_copy import note as _note
from .tiff_copy import raw_tag_bytes as _raw_tag_bytes

# Aperio ImageDescription fields that describe the optics and scan geometry, not the patient/operator.
# Matched case-sensitively, as Aperio writes them (the PHI audit in phi_audit.py uses the same set).
TECHNICAL_FIELDS = frozenset({
    "AppMag", "MPP", "StripeWidth", "OriginalWidth", "OriginalHeight", "Originalheight", "Filtered",
    "Focus Offset", "Left", "Top", "LineCameraSkew", "LineAreaXOffset", "LineAreaYOffset", "Exposure Time",
    "Exposure Scale", "DisplayColor", "Gamma", "ICC Profile",
})

@dataclass
class _Page:
    index: int
    entries: dict[int, tuple[int, int, bytes]]  # code -> (TIFF type, count, raw value bytes)
    offsets_tag: int
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]
    description: str | None
    fields: dict[str, str] = field(default_factory=dict)


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


def _plan(tif: tifffile.TiffFile, removed: list[str]) -> list[_Page]:
    if getattr(tif, "is_ndpi", False):  # is_ndpi() said no (no format flag in the first IFD): not one we can write
        raise BadInput("unsupported_slide", "this NDPI variant (no format flag in its first directory) cannot be "
                       "rewritten here; convert it to tiled TIFF/SVS first")
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


def _is_ome(src: Path) -> bool:
    try:
        with tifffile.TiffFile(src) as tif:
            return bool(tif.is_ome)
    except Exception:  # noqa: BLE001 - not a TIFF: the copier below says so with its reason
        return False


def deidentify_svs(src: Path, dst: Path, key: bytes, *, digest: str | None = None) -> dict:
    """Write a de-identified copy of the slide ``src`` to ``dst``; returns what was done.

    Returns ``{"pseudo_study", "pseudo_patient", "removed": [what was dropped, no values], "mpp",
    "dimensions": [width, height] of level 0, "pages": kept page count, "vendor": "aperio" | "generic" |
    "hamamatsu"}``.  Raises BadInput("unreadable_slide") for files that are not readable TIFF (and
    "unsupported_slide" for NDPI of 4 GiB or more).  ``digest``: the source's SHA-256 when the caller already
    has it.  Hamamatsu NDPI is handled by :func:`.ndpi.deidentify_ndpi` (pseudo_patient from its Reference tag),
    OME-TIFF by :func:`.ome.deidentify_ome`.
    """
    src, dst = Path(src), Path(dst)
    _check_file(src)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("dst must differ from src: the source is needed while the copy is written")
    if is_ndpi(src):
        return deidentify_ndpi(src, dst, key, digest=digest)
    if _is_ome(src):  # its label is a second OME image, not a page this copier would know to drop
        return deidentify_ome(src, dst, key, digest=digest)
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
