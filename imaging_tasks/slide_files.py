"""Which files make one slide, what format they are, and which one to hand OpenSlide.

A pathology study is one slide, which is one file or several:

* one file: Aperio SVS (``aperio``), generic pyramidal TIFF (``generic-tiff``), OME-TIFF (``ome-tiff``),
  Hamamatsu NDPI (``ndpi``);
* a MIRAX slide (``mirax``): ``X.mrxs`` plus every file under the folder ``X/`` beside it (``Slidedat.ini``,
  ``Index.dat``, ``Data*.dat``); OpenSlide opens the ``.mrxs`` and finds the folder by name;
* a DICOM whole-slide series (``dicom``): one file per pyramid level (plus label/overview instances), all of one
  SeriesInstanceUID; OpenSlide opens any one VOLUME file and reads the others from the same folder.

The format is told from the first bytes (TIFF and DICOM files come under any name), never from the suffix
alone: :func:`sniff` reads a few KB, so the index can call it on a bucket object.  The de-identified copy keeps
a name OpenSlide recognises (:data:`OUTPUT_NAMES`); :func:`main_slide_file` picks, from a study's fetched
files, the one to open.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path, PurePosixPath

from imaging_tasks.errors import BadInput

SLIDE_FORMATS = ("aperio", "generic-tiff", "ome-tiff", "ndpi", "mirax", "dicom")
# Name of the de-identified copy in the study's anonymized folder (MIRAX: plus the folder ``slide/``; DICOM:
# ``<series uid>/<sop uid>.dcm``, the layout every DICOM study has).  OME-TIFF comes out as a generic pyramidal
# TIFF (its OME-XML is dropped, calibration kept in the resolution tags): ``.tif``.
OUTPUT_NAMES = {"aperio": "slide.svs", "generic-tiff": "slide.tif", "ome-tiff": "slide.tif", "ndpi": "slide.ndpi",
                "mirax": "slide.mrxs"}
MIRAX_SUFFIX = ".mrxs"
DICOM_SUFFIX = ".dcm"
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
# Suffixes of single-file slides OpenSlide opens (the MIRAX index file is chosen apart).
_SINGLE_FILE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".vms", ".vmu", ".svslide")


def is_dicom_head(head: bytes) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def sniff(location, name: str | None = None) -> tuple[str, str]:
    """``(format, description)`` of a slide file from its first bytes (TIFF header and first page only).

    ``location``: a local path or a bucket URI; ``name``: the name to judge the MIRAX suffix by (default: the
    location's).  ``description``: page 0's ImageDescription of a TIFF ('' otherwise), which the slide
    pseudonyms are derived from.  Raises BadInput ``unreadable_slide`` for a file that is neither DICOM nor a
    TIFF that parses (truncated, garbage under a slide suffix).
    """
    from imaging_tasks.storage import as_path

    path = as_path(location)
    if str(name or path.name).lower().endswith(MIRAX_SUFFIX):
        return "mirax", ""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
            if is_dicom_head(head):
                return "dicom", ""
            if head[:4] not in _TIFF_MAGIC:
                raise ValueError("no TIFF or DICOM signature")
            if _first_ifd_has(fh, head, 65420):  # NDPI's format flag: OpenSlide's own test (tifffile may misread)
                return "ndpi", ""
            fh.seek(0)
            return _tiff_format(fh)
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on damaged input; OSError: cut files
        raise BadInput("unreadable_slide", f"not a readable whole-slide file ({type(exc).__name__}): neither DICOM "
                       "nor a TIFF whose first page parses; check it is a complete slide and re-send it") from None


def _first_ifd_has(fh, head: bytes, code: int) -> bool:
    """Whether the first IFD of a classic TIFF holds tag ``code`` (BigTIFF: False)."""
    import struct

    bo = "<" if head[:2] == b"II" else ">"
    if struct.unpack(bo + "H", head[2:4])[0] != 42:
        return False
    fh.seek(struct.unpack(bo + "I", head[4:8])[0])
    raw = fh.read(2)
    if len(raw) < 2:
        return False
    n = struct.unpack(bo + "H", raw)[0]
    table = fh.read(12 * n)
    return len(table) == 12 * n and any(struct.unpack(bo + "H", table[12 * i:12 * i + 2])[0] == code
                                        for i in range(n))


def _tiff_format(fh) -> tuple[str, str]:
    import tifffile

    with tifffile.TiffFile(fh) as tif:
        page = tif.pages[0]
        description = page.description or ""
        if getattr(tif, "is_ndpi", False):
            return "ndpi", description
        if description.startswith("Aperio"):
            return "aperio", description
        if getattr(tif, "is_ome", False):
            return "ome-tiff", description
        return "generic-tiff", description


@contextlib.contextmanager
def local_file(location):
    """A local path of ``location``: itself when local, else a temporary download (removed afterwards), for
    readers that need a real file (``deid.ndpi``, ``deid.mirax``, OpenSlide)."""
    from imaging_tasks import storage

    path = storage.as_path(location)
    if storage.is_local(path):
        yield Path(path.path)
        return
    with tempfile.TemporaryDirectory(prefix="slide-") as tmp:
        yield storage.download(path, Path(tmp) / path.name)


def mirax_folder(mrxs_relpath: str) -> PurePosixPath:
    """The data folder of a MIRAX index file: ``a/b/X.mrxs`` -> ``a/b/X``."""
    rel = PurePosixPath(mrxs_relpath)
    return rel.parent / rel.name[: -len(MIRAX_SUFFIX)]


def main_slide_file(paths: list[Path]) -> Path:
    """The file to hand OpenSlide among one slide study's local files (as ``pipeline.fetch_instances`` laid
    them out): the ``.mrxs`` of a MIRAX slide (its folder beside it), one VOLUME file of a DICOM series (the
    largest: level 0; all of them must share one folder), else the single slide file; one file of an unknown
    suffix is handed over as it is (OpenSlide decides).  BadInput ``not_one_slide`` when the files are not
    exactly one slide."""
    paths = [Path(p) for p in paths]
    mrxs = [p for p in paths if p.name.lower().endswith(MIRAX_SUFFIX)]
    if len(mrxs) == 1:
        return mrxs[0]
    dicom = [p for p in paths if p.name.lower().endswith(DICOM_SUFFIX) or (not p.suffix and _is_dicom_file(p))]
    singles = [p for p in paths if p.name.lower().endswith(_SINGLE_FILE_SUFFIXES)]
    if not mrxs and dicom and not singles:
        if len({p.parent for p in dicom}) == 1:
            return max(dicom, key=lambda p: (p.stat().st_size, p.name))
        why = f"DICOM files in {len({p.parent for p in dicom})} folders (one series must share one folder)"
    elif not mrxs and len(singles) == 1 and not dicom:
        return singles[0]
    elif len(paths) == 1 and not mrxs:
        return paths[0]
    else:
        why = f"{len(mrxs)} MIRAX, {len(singles)} single-file slide(s) and {len(dicom)} DICOM file(s)"
    raise BadInput("not_one_slide", f"a pathology study is one slide, got {why}; send each slide as its own study")


def check_readable(path: Path) -> dict:
    """Open a slide with OpenSlide and read the first and the last pixel of every level (so every level's first
    and last tile or frame decodes); returns ``{"vendor", "levels", "dimensions"}``.  BadInput ``unreadable_slide``
    when it cannot: truncated, corrupt, a DICOM level or frame or a MIRAX data file missing, or a format
    OpenSlide does not read.  Cheap (two tiles per level), so de-identification checks every copy it writes."""
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
        try:
            for level, (w, h) in enumerate(slide.level_dimensions):
                ds = float(slide.level_downsamples[level])
                for x, y in ((0, 0), (w - 1, h - 1)):
                    slide.read_region((int(x * ds), int(y * ds)), level, (1, 1))
            return {"vendor": slide.properties.get("openslide.vendor"), "levels": slide.level_count,
                    "dimensions": list(slide.dimensions)}
        finally:
            slide.close()
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise BadInput("unreadable_slide", f"OpenSlide cannot read the slide ({type(exc).__name__}): it is "
                       "truncated, corrupt, incomplete (a DICOM level or frame, a MIRAX data file missing) or not a "
                       "whole-slide format OpenSlide reads; re-scan or re-export it") from None


def mirax_digest(rows: list[dict]) -> str:
    """The content digest of a MIRAX slide from its index rows (``slide.path`` and ``sha256`` of each file): the
    study pseudonym's source, the same at the index and the de-identifier."""
    import hashlib

    lines = sorted(f"{r['slide']['path']}:{r['sha256']}" for r in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return is_dicom_head(fh.read(132))
    except OSError:
        return False


__all__ = ["SLIDE_FORMATS", "OUTPUT_NAMES", "sniff", "main_slide_file", "mirax_folder", "is_dicom_head",
           "check_readable", "mirax_digest", "local_file"]
