"""OME-TIFF de-identification: a byte copy of the slide's pyramid as a generic pyramidal TIFF.

Where OME-TIFF keeps PHI: the OME-XML in page 0's ImageDescription (Image Name and Description, often the case
number or patient name; AcquisitionDate; Experimenter names, e-mail, user name, institution; free-text
annotations), and further OME images in the main IFD chain: converters of vendor slides (``bfconvert``) write
the label and macro photos as images 2 and 3, which hold the label in their pixels.

What is written (the byte-level writer of :mod:`.slide`: compressed tiles copied verbatim, only
``slide.KEPT_TAGS`` kept, so pixels are identical at every level):

* the first OME image only: page 0 and the reduced levels in its SubIFDs, lifted into the main IFD chain
  (NewSubfileType 0 for level 0, 1 for reduced levels).  OpenSlide 4.0.1 has no OME reader: it opens an
  OME-TIFF as ``generic-tiff``, which reads the main chain only, so the source shows level 0 alone while the
  copy is a full pyramid;
* every other page of the main chain (label, macro, other OME images) is dropped, whatever it is called: the
  kept set is an allow-list (image 0), not a deny-list of names;
* the OME-XML is dropped whole: nothing in it is needed to read the pixels, and OpenSlide ignores it.  The
  calibration is what matters, and OpenSlide reads it from the TIFF resolution tags (``openslide.mpp-x`` of a
  generic TIFF), which are kept; where the source has none, they are written from the OME ``PhysicalSizeX/Y``
  (converted to pixels per centimetre, each level scaled by its size), so the copy is calibrated either way.

Multi-plane OME-TIFF (several channels as planes, z-stacks, time series: fluorescence, not bright-field RGB)
is refused (``unsupported_slide``).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import tifffile

from imaging_tasks.errors import BadInput
from imaging_tasks.storage import sha256_of

from .tiff_copy import KEPT_TAGS, OFFSET_TAGS, TiffOut, check_file, note, raw_tag_bytes, slide_pseudonyms

_UNIT_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def ome_physical_size_um(xml: str) -> tuple[float, float] | None:
    """``(x, y)`` µm per pixel of the first OME image's Pixels (PhysicalSizeX/Y and their units, µm by
    default), or None when absent, unparsable or not a positive length."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except (ET.ParseError, ValueError):
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    out = []
    for axis in ("X", "Y"):
        try:
            value = float(pixels.get(f"PhysicalSize{axis}", ""))
        except ValueError:
            return None
        scale = _UNIT_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if scale is None or not value > 0 or value != value:
            return None
        out.append(value * scale)
    return out[0], out[1]


def ome_planes(xml: str, samples_per_pixel: int = 1) -> int:
    """Planes of the first OME image: SizeZ x SizeT x channels not interleaved in a pixel (SizeC over the samples
    per pixel of its pages, e.g. 3 for RGB); 1 if unreadable."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
        pixels = next(el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels")
        size_c = int(pixels.get("SizeC", "1"))
        return int(pixels.get("SizeZ", "1")) * int(pixels.get("SizeT", "1")) * \
            max(1, size_c // max(1, samples_per_pixel))
    except (ET.ParseError, StopIteration, ValueError):
        return 1


def _pyramid(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """Page 0 and the pages of its SubIFDs (the OME pyramid), largest first."""
    page0 = tif.pages[0]
    pages = [page0]
    for i, offset in enumerate(page0.subifds or ()):
        tif.filehandle.seek(offset)
        pages.append(tifffile.TiffPage(tif, index=(0, i)))
    return sorted(pages, key=lambda p: -int(p.imagewidth))


def _rational(value: float) -> tuple[int, int]:
    """Numerator and denominator of a TIFF RATIONAL close to ``value`` (px per cm)."""
    den = 1000
    return int(round(value * den)), den


def deidentify_ome(src: Path, dst: Path, key: bytes, *, digest: str | None = None) -> dict:
    """Write the de-identified generic pyramidal TIFF of the OME-TIFF ``src`` to ``dst``.

    Returns ``{"pseudo_study", "pseudo_patient", "removed": [what was dropped, no values], "mpp",
    "dimensions": [w, h] of level 0, "pages": kept page count, "vendor": "generic", "format": "ome-tiff",
    "resolution_from": "tiff" | "ome" | None}``, like ``slide.deidentify_svs``.  Raises BadInput
    (``unreadable_slide``, ``unsupported_slide``) for what cannot be copied.
    """
    src, dst = Path(src), Path(dst)
    check_file(src)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("dst must differ from src: the source is needed while the copy is written")
    digest = digest or sha256_of(src)
    removed: list[str] = []
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with tifffile.TiffFile(src) as tif:
            xml = tif.pages[0].description or ""
            planes = ome_planes(xml, int(tif.pages[0].samplesperpixel))
            if planes > 1:
                raise BadInput("unsupported_slide", f"an OME-TIFF of {planes} planes (separate channels, "
                               "z-stack or time points) is not a bright-field RGB slide; export the RGB image alone")
            note(removed, "ImageDescription (OME-XML)")
            for index in range(1, len(tif.pages)):
                note(removed, f"page {index} (another OME image: label, macro or other)")
            pyramid = _pyramid(tif)
            physical = ome_physical_size_um(xml)
            width0 = int(pyramid[0].imagewidth)
            # tifffile and others write XResolution 1 with ResolutionUnit NONE when nothing is known: not a calibration
            resolution_from = "tiff" if _mpp_of(pyramid[0]) else ("ome" if physical else None)
            fh = tif.filehandle
            payload = sum(sum(p.databytecounts) for p in pyramid)
            big = tif.is_bigtiff or payload > 0xFFFFFFFF - (64 << 20)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out_fh:
                out = TiffOut(out_fh, tif.byteorder, big)
                for n, page in enumerate(pyramid):
                    entries: dict[int, tuple[int, int, bytes]] = {}
                    for tag in page.tags.values():
                        code = int(tag.code)
                        if code in OFFSET_TAGS or code in OFFSET_TAGS.values() or code == 270:
                            continue
                        if code in KEPT_TAGS:
                            entries[code] = (int(tag.dtype), int(tag.count), raw_tag_bytes(fh, tag))
                        else:
                            note(removed, f"TIFF tag {tag.name} ({code})")
                    entries[254] = (4, 1, struct.pack(tif.byteorder + "I", 0 if n == 0 else 1))
                    if resolution_from == "ome":
                        scale = width0 / int(page.imagewidth)
                        for code, um in ((282, physical[0]), (283, physical[1])):
                            entries[code] = (5, 1, struct.pack(tif.byteorder + "II", *_rational(1e4 / (um * scale))))
                        entries[296] = (3, 1, struct.pack(tif.byteorder + "H", 3))  # centimetre
                    offsets_tag = 324 if page.is_tiled else 273
                    new_offsets = [0 if (o == 0 or c == 0) else out.copy(fh, o, c)
                                   for o, c in zip(page.dataoffsets, page.databytecounts)]
                    entries[offsets_tag] = out.int_array(new_offsets)
                    entries[OFFSET_TAGS[offsets_tag]] = out.int_array([int(c) for c in page.databytecounts])
                    out.write_ifd(entries)
            dimensions = [width0, int(pyramid[0].imagelength)]
        with tifffile.TiffFile(tmp) as check:
            if len(check.pages) != len(pyramid):
                raise ValueError("re-read page count differs")
            mpp = _mpp_of(check.pages[0])
        os.replace(tmp, dst)
    except BadInput:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on damaged input
        tmp.unlink(missing_ok=True)
        raise BadInput("unreadable_slide", f"not a readable OME-TIFF slide ({type(exc).__name__}); check the file "
                       "is a complete whole-slide image") from None
    pseudo_study, pseudo_patient = slide_pseudonyms(key, digest, xml)
    return {"pseudo_study": pseudo_study, "pseudo_patient": pseudo_patient, "removed": removed, "mpp": mpp,
            "dimensions": dimensions, "pages": len(pyramid), "vendor": "generic", "format": "ome-tiff",
            "resolution_from": resolution_from}


def _mpp_of(page) -> float | None:
    """µm per pixel from a page's resolution tags (inch or cm), as OpenSlide derives it for generic TIFF."""
    try:
        unit = int(page.tags["ResolutionUnit"].value)
        num, den = page.tags["XResolution"].value
        per_unit = num / den
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if per_unit <= 0 or unit not in (2, 3):
        return None
    return (25400.0 if unit == 2 else 10000.0) / per_unit


__all__ = ["deidentify_ome", "ome_physical_size_um", "ome_planes"]
