"""3DHISTECH MIRAX de-identification: ``X.mrxs`` + the folder ``X/`` rebuilt from an allow-list.

A MIRAX slide is ``X.mrxs`` (OpenSlide reads nothing from it) and a folder ``X/`` beside it holding
``Slidedat.ini`` (key files: slide name, project, dates, barcode text, SLIDE_ID, level geometry, the names of
everything else), ``Index.dat`` (``"01.02" + SLIDE_ID``, then pointers to per-level record lists and to the
non-hierarchical records) and ``Data*.dat`` (concatenated JPEG tiles, plus the label, macro and preview photos
and other scanner records).  PHI lives in Slidedat.ini text, in the label/macro photos and in whatever other
non-hierarchical records a scanner writes.

The copy is built, not edited, so anything not chosen is absent:

* data files hold only the bytes of the pyramid tiles (byte for byte) and of the camera-position buffer
  (needed to place tiles); the label (``ScanDataLayer_SlideBarcode``), macro (``..._SlideThumbnail``), preview
  (``..._SlidePreview``; OpenSlide's "thumbnail", which can show the label end of the glass, so it goes too:
  a thumbnail can always be rendered from the pyramid) and every other record are not copied;
* Index.dat is written anew for those records, under a keyed pseudonymous SLIDE_ID;
* Slidedat.ini is written anew: the structure OpenSlide needs plus :data:`TECHNICAL_KEYS`, each value checked
  to be a number (or a known format name), so text cannot ride along in a technical key; other layers
  (focus/filter levels), groups and keys are dropped and listed (names, never values) in ``removed``;
* ``X.mrxs`` is written empty (OpenSlide only needs it to exist and not be a TIFF).

The source files are only read.  Broken slides (missing folder, Slidedat.ini, index or data file; truncated
index or data; records out of range) raise ``BadInput("unreadable_slide")``.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from imaging_tasks.errors import BadInput

from .pseudonym import pseudo_id
from .tiff_copy import copy_range

INDEX_VERSION = b"01.02"
SLIDE_ZOOM_LEVEL = "Slide zoom level"
POSITION_LAYERS = ("VIMSLIDE_POSITION_BUFFER", "StitchingIntensityLayer")  # OpenSlide's order of preference
POSITION_RECORD_BYTES = 9  # flag byte, x, y (int32 little-endian)
_INT = re.compile(r"[+-]?\d{1,10}")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_VERSION = re.compile(r"\d{1,3}(\.\d{1,3}){1,3}")
_FORMATS = frozenset({"JPEG", "PNG", "BMP24"})

# (group kind, key) -> value check.  Group kinds: "GENERAL", "LEVEL" (a zoom level's section), "POSITION" (the
# position layer's section).  What each is: level geometry and pixel format OpenSlide reads, nothing about who.
TECHNICAL_KEYS = {
    ("GENERAL", "SLIDE_VERSION"): _VERSION,
    ("GENERAL", "IMAGENUMBER_X"): _INT, ("GENERAL", "IMAGENUMBER_Y"): _INT,
    ("GENERAL", "OBJECTIVE_MAGNIFICATION"): _INT, ("GENERAL", "CameraImageDivisionsPerSide"): _INT,
    ("LEVEL", "OVERLAP_X"): _FLOAT, ("LEVEL", "OVERLAP_Y"): _FLOAT,
    ("LEVEL", "MICROMETER_PER_PIXEL_X"): _FLOAT, ("LEVEL", "MICROMETER_PER_PIXEL_Y"): _FLOAT,
    ("LEVEL", "IMAGE_FORMAT"): _FORMATS, ("LEVEL", "IMAGE_FILL_COLOR_BGR"): _INT,
    ("LEVEL", "DIGITIZER_WIDTH"): _INT, ("LEVEL", "DIGITIZER_HEIGHT"): _INT,
    ("LEVEL", "IMAGE_CONCAT_FACTOR"): _INT, ("LEVEL", "IMAGE_QUALITY"): _INT,
    ("POSITION", "VIMSLIDE_POSITION_DATA_FORMAT_VERSION"): _INT,
}
# Keys OpenSlide cannot open a slide without (a slide missing one is unreadable, not de-identifiable).
_REQUIRED_GENERAL = ("IMAGENUMBER_X", "IMAGENUMBER_Y", "OBJECTIVE_MAGNIFICATION")
_REQUIRED_LEVEL = ("OVERLAP_X", "OVERLAP_Y", "MICROMETER_PER_PIXEL_X", "MICROMETER_PER_PIXEL_Y", "IMAGE_FORMAT",
                   "IMAGE_FILL_COLOR_BGR", "DIGITIZER_WIDTH", "DIGITIZER_HEIGHT", "IMAGE_CONCAT_FACTOR")
# Values the rebuilt Slidedat.ini itself contains: never evidence of a leak.
_STRUCTURAL_VALUES = frozenset(v.lower() for v in ("default", "Slide zoom level", "Index.dat", "JPEG", "PNG", "BMP24",
                                                   *POSITION_LAYERS))
_MAX_PAGES = 1 << 20


def _bad(what: str) -> BadInput:
    return BadInput("unreadable_slide", f"the MIRAX slide is incomplete or damaged ({what}); re-export the "
                    "whole slide (the .mrxs file and its folder) from the scanner")


# ----------------------------------------------------------------------------------------------- Slidedat.ini
def parse_slidedat(raw: bytes) -> dict[str, dict[str, str]]:
    """Groups of a GKeyFile-style key file (what OpenSlide reads): ``[group]``, ``key=value``, ``#`` comments,
    a UTF-8 BOM ignored, later duplicates win.  Not UTF-8: read as Windows-1252, so identifying values keep
    the characters the audit must search for."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    groups: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = groups.setdefault(stripped[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if not sep or current is None:
            raise _bad("Slidedat.ini has a line that is not a key, a group or a comment")
        current[key.strip()] = value.strip()
    return groups


def _get(groups, group: str, key: str) -> str:
    try:
        return groups[group][key]
    except KeyError:
        raise _bad(f"Slidedat.ini lacks {group}.{key}") from None


def _int(groups, group: str, key: str, minimum: int = 0) -> int:
    value = _get(groups, group, key)
    if not _INT.fullmatch(value) or int(value) < minimum:
        raise _bad(f"Slidedat.ini {group}.{key} is not a whole number >= {minimum}")
    return int(value)


def _divisions(groups) -> int:
    """CameraImageDivisionsPerSide (camera images per photo side), 1 when absent, as OpenSlide reads it."""
    if "CameraImageDivisionsPerSide" not in groups.get("GENERAL", {}):
        return 1
    return _int(groups, "GENERAL", "CameraImageDivisionsPerSide", 1)


def _valid(check, value: str) -> bool:
    return value in check if isinstance(check, frozenset) else bool(check.fullmatch(value))


@dataclass
class _Slide:
    """What the de-identifier needs from one source slide."""
    folder: Path
    groups: dict[str, dict[str, str]]
    slide_id: str
    level_sections: list[str]
    datafiles: list[Path]
    index_path: Path
    position_layer: str | None = None
    position_section: str | None = None
    position_record: int = -1
    associated: dict[str, int] = field(default_factory=dict)  # "ScanDataLayer_..." -> nonhier record number


def _folder(src_mrxs: Path) -> Path:
    return src_mrxs.with_suffix("")


def _describe(src_mrxs: Path) -> _Slide:
    """Parse Slidedat.ini of ``src_mrxs`` and locate what OpenSlide uses; BadInput when it cannot be opened."""
    src_mrxs = Path(src_mrxs)
    if src_mrxs.suffix != ".mrxs" or not src_mrxs.is_file():
        raise _bad("the .mrxs file is missing")
    folder = _folder(src_mrxs)
    ini = folder / "Slidedat.ini"
    if not ini.is_file():
        raise _bad("the slide folder or its Slidedat.ini is missing next to the .mrxs file")
    if ini.stat().st_size > 1 << 20:
        raise _bad("Slidedat.ini is larger than any real one")
    groups = parse_slidedat(ini.read_bytes())
    slide_id = _get(groups, "GENERAL", "SLIDE_ID")
    for key in _REQUIRED_GENERAL:
        _int(groups, "GENERAL", key)
    if _int(groups, "GENERAL", "IMAGENUMBER_X") < 1 or _int(groups, "GENERAL", "IMAGENUMBER_Y") < 1:
        raise _bad("Slidedat.ini gives no images")
    h = "HIERARCHICAL"
    _int(groups, h, "HIER_COUNT", 1)
    if _get(groups, h, "HIER_0_NAME") != SLIDE_ZOOM_LEVEL:
        raise _bad("the first hierarchical layer is not the slide zoom level")
    _divisions(groups)
    levels = _int(groups, h, "HIER_0_COUNT", 1)
    level_sections = [_get(groups, h, f"HIER_0_VAL_{i}_SECTION") for i in range(levels)]
    for section in level_sections:
        for key in _REQUIRED_LEVEL:
            value = _get(groups, section, key)
            if not _valid(TECHNICAL_KEYS[("LEVEL", key)], value):
                raise _bad(f"a zoom level's {key} is not a valid value")
    n_files = _int(groups, "DATAFILE", "FILE_COUNT", 1)
    datafiles = []
    for i in range(n_files):
        name = _get(groups, "DATAFILE", f"FILE_{i}")
        path = folder / name
        if "/" in name or "\\" in name or name in ("", ".", "..") or not path.is_file():
            raise _bad(f"data file {i + 1} of {n_files} is missing")
        datafiles.append(path)
    index_name = _get(groups, h, "INDEXFILE")
    index_path = folder / index_name
    if "/" in index_name or "\\" in index_name or not index_path.is_file():
        raise _bad("the index file is missing")
    slide = _Slide(folder, groups, slide_id, level_sections, datafiles, index_path)
    record = 0
    for i in range(_int(groups, h, "NONHIER_COUNT")):
        name = _get(groups, h, f"NONHIER_{i}_NAME")
        count = _int(groups, h, f"NONHIER_{i}_COUNT", 1)
        for j in range(count):
            value = _get(groups, h, f"NONHIER_{i}_VAL_{j}")
            if name == "Scan data layer":
                slide.associated[value] = record + j
        if name in POSITION_LAYERS and (slide.position_layer is None
                                        or POSITION_LAYERS.index(name) < POSITION_LAYERS.index(slide.position_layer)):
            slide.position_layer, slide.position_record = name, record
            slide.position_section = groups[h].get(f"NONHIER_{i}_VAL_0_SECTION")
        record += count
    return slide


# ----------------------------------------------------------------------------------------------- Index.dat
class _Index:
    def __init__(self, raw: bytes):
        self.raw = raw

    def i32(self, at: int) -> int:
        if at < 0 or at + 4 > len(self.raw):
            raise _bad("the index file is truncated")
        return struct.unpack_from("<i", self.raw, at)[0]


def _read_index(slide: _Slide) -> tuple[list[list[tuple[int, int, int, int]]], tuple[int, int, int] | None]:
    """Per zoom level its records ``(image_index, offset, length, fileno)``, and the position record
    ``(offset, size, fileno)`` (None if the slide has none), exactly as OpenSlide walks them."""
    idx = _Index(slide.index_path.read_bytes())
    head = INDEX_VERSION + slide.slide_id.encode("utf-8")
    if idx.raw[:len(head)] != head:
        raise _bad("the index file does not belong to this Slidedat.ini (version or slide id differ)")
    hier_root = len(head)
    table = idx.i32(hier_root)
    levels = []
    for i in range(len(slide.level_sections)):
        ptr = idx.i32(table + 4 * i)
        if idx.i32(ptr) != 0:
            raise _bad("a level's record list does not start with 0")
        page, records, pages = idx.i32(ptr + 4), [], 0
        while True:
            count, nxt = idx.i32(page), idx.i32(page + 4)
            pages += 1
            if count < 0 or pages > _MAX_PAGES:
                raise _bad("a level's record list is damaged")
            for r in range(count):
                rec = tuple(idx.i32(page + 8 + 16 * r + 4 * k) for k in range(4))
                if min(rec) < 0 or rec[3] >= len(slide.datafiles):
                    raise _bad("a tile record is out of range")
                records.append(rec)
            if nxt == 0:
                break
            page = nxt
        levels.append(records)
    position = None
    if slide.position_record >= 0:
        nonhier_table = idx.i32(hier_root + 4)
        ptr = idx.i32(nonhier_table + 4 * slide.position_record)
        page = idx.i32(ptr + 4)
        if idx.i32(ptr) != 0 or idx.i32(page) != 1 or idx.i32(page + 8) != 0 or idx.i32(page + 12) != 0:
            raise _bad("the position record is damaged")
        offset, size, fileno = idx.i32(page + 16), idx.i32(page + 20), idx.i32(page + 24)
        if min(offset, size, fileno) < 0 or fileno >= len(slide.datafiles):
            raise _bad("the position record is out of range")
        if slide.position_layer == "VIMSLIDE_POSITION_BUFFER":
            g, div = slide.groups["GENERAL"], _divisions(slide.groups)
            positions = (int(g["IMAGENUMBER_X"]) // div) * (int(g["IMAGENUMBER_Y"]) // div)
            if size != POSITION_RECORD_BYTES * positions:
                raise _bad("the position buffer has the wrong size")
        position = (offset, size, fileno)
    return levels, position


# ----------------------------------------------------------------------------------------------- public helpers
def mirax_files(mrxs_path) -> list[Path]:
    """Every file of a MIRAX slide: the ``.mrxs`` and all files under the folder of the same name beside it."""
    mrxs_path = Path(mrxs_path)
    folder = _folder(mrxs_path)
    inside = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    return [mrxs_path] + inside


def mirax_digest(src_mrxs) -> str:
    """The slide's identity for pseudonyms when the caller has none: SHA-256 of its Slidedat.ini (which holds
    the scanner's unique SLIDE_ID); the ``.mrxs`` file itself is empty or alike across slides."""
    ini = _folder(Path(src_mrxs)) / "Slidedat.ini"
    if not ini.is_file():
        raise _bad("the slide folder or its Slidedat.ini is missing next to the .mrxs file")
    return hashlib.sha256(ini.read_bytes()).hexdigest()


def _kind(slide: _Slide, group: str) -> str | None:
    if group == "GENERAL":
        return "GENERAL"
    if group in slide.level_sections:
        return "LEVEL"
    if group == slide.position_section:
        return "POSITION"
    return None


def mirax_identifying_fields(src_mrxs) -> dict[str, set[str]]:
    """``{"GROUP.KEY": values}`` of Slidedat.ini outside the technical allow-list and the structure (layer
    and file names), plus SLIDE_ID: what the PHI audit searches a de-identified copy for.  Numbers are kept
    (an identifier can be all digits); words the rebuilt file itself uses ("default", "JPEG"...) are not."""
    slide = _describe(Path(src_mrxs))
    found: dict[str, set[str]] = {"GENERAL.SLIDE_ID": {slide.slide_id}}
    for group, keys in slide.groups.items():
        if group in ("HIERARCHICAL", "DATAFILE"):
            continue
        kind = _kind(slide, group)
        for key, value in keys.items():
            if (kind, key) in TECHNICAL_KEYS or not value or value.lower() in _STRUCTURAL_VALUES:
                continue
            if key.endswith("_IMAGE_TYPE"):
                continue
            found.setdefault(f"{group}.{key}", set()).add(value)
    return found


def mirax_identifying_values(src_mrxs) -> set[str]:
    """The identifying strings of a MIRAX slide (flattened :func:`mirax_identifying_fields`)."""
    return set().union(*mirax_identifying_fields(src_mrxs).values())


def mirax_pseudonyms(key: bytes, digest: str, src_mrxs) -> tuple[str, str]:
    """``(study, patient)`` pseudonyms: study from ``digest``; patient from SLIDE_NAME (the label text the
    scanner read, e.g. an accession, so a case's slides group together) when present, else ``digest``."""
    slide = _describe(Path(src_mrxs))
    name = slide.groups["GENERAL"].get("SLIDE_NAME", "").strip()
    return pseudo_id(key, digest, "study"), pseudo_id(key, name or digest, "patient")


# ----------------------------------------------------------------------------------------------- writing
def _ini_text(groups: dict[str, dict[str, object]]) -> str:
    return "".join(f"[{g}]\n" + "".join(f"{k}={v}\n" for k, v in keys.items()) + "\n" for g, keys in groups.items())


def _index_bytes(slide_id: str, levels: list[list[tuple[int, int, int, int]]],
                 nonhier: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(INDEX_VERSION + slide_id.encode("ascii"))
    root = len(buf)
    buf += b"\0" * 8

    def put(data: bytes) -> int:
        pos = len(buf)
        buf.extend(data)
        return pos

    def set_i32(at: int, value: int) -> None:
        buf[at:at + 4] = struct.pack("<i", value)

    table = put(b"\0" * 4 * len(levels))
    set_i32(root, table)
    for i, records in enumerate(levels):
        head = put(b"\0" * 8)
        set_i32(table + 4 * i, head)
        page = struct.pack("<ii", len(records), 0) + b"".join(struct.pack("<iiii", *r) for r in records)
        set_i32(head + 4, put(page))
    table = put(b"\0" * 4 * len(nonhier))
    set_i32(root + 4, table)
    for j, (offset, size, fileno) in enumerate(nonhier):
        head = put(b"\0" * 8)
        set_i32(table + 4 * j, head)
        set_i32(head + 4, put(struct.pack("<iiiiiii", 1, 0, 0, 0, offset, size, fileno)))
    if len(buf) > 0x7FFFFFFF:
        raise BadInput("unsupported_slide", "the MIRAX index would exceed 2 GiB")
    return bytes(buf)


def _copy_range(src_fh, dst_fh, offset: int, length: int) -> None:
    try:
        copy_range(src_fh, dst_fh, offset, length)
    except EOFError:
        raise _bad("a data file is truncated") from None


def deidentify_mirax(src_mrxs: Path, dst_mrxs: Path, key: bytes, *, digest: str | None = None) -> dict:
    """Write a de-identified copy of the MIRAX slide ``src_mrxs`` as ``dst_mrxs`` + its folder (see the module
    docstring); the source is only read.

    Returns ``{"pseudo_study", "pseudo_patient", "removed": [what was dropped, names only], "mpp",
    "dimensions": [w, h] of level 0, "levels", "vendor": "mirax", "files": [paths written]}``.  ``digest``:
    the slide's identity when the caller has one (default :func:`mirax_digest`).  An existing ``dst_mrxs`` and
    its folder are replaced.  BadInput("unreadable_slide") for broken slides.
    """
    src_mrxs, dst_mrxs = Path(src_mrxs), Path(dst_mrxs)
    if dst_mrxs.suffix != ".mrxs":
        raise ValueError("dst_mrxs must end in .mrxs (OpenSlide recognises MIRAX by the extension)")
    slide = _describe(src_mrxs)
    src_dir, dst_dir = slide.folder, _folder(dst_mrxs)
    if dst_dir.resolve() == src_dir.resolve() or dst_mrxs.resolve() == src_mrxs.resolve():
        raise ValueError("dst must differ from src: the source is needed while the copy is written")
    digest = digest or mirax_digest(src_mrxs)
    levels, position = _read_index(slide)
    groups = slide.groups
    removed: list[str] = []

    # every kept byte range, grouped by source data file, each copied once
    kept = sorted({(r[3], r[1], r[2]) for recs in levels for r in recs}
                  | ({(position[2], position[0], position[1])} if position else set()))
    sizes = [p.stat().st_size for p in slide.datafiles]
    for fileno, offset, length in kept:
        if offset + length > sizes[fileno]:
            raise _bad(f"data file {fileno + 1} of {len(sizes)} is truncated")
    used_files = sorted({f for f, _, _ in kept})
    new_fileno = {f: i for i, f in enumerate(used_files)}
    if len(used_files) < len(slide.datafiles):
        removed.append(f"{len(slide.datafiles) - len(used_files)} data file(s) holding no pyramid tile")
    referenced = {slide.index_path, slide.folder / "Slidedat.ini", *slide.datafiles}
    others = [p for p in mirax_files(src_mrxs)[1:] if p not in referenced]
    if others:
        removed.append(f"{len(others)} other file(s) in the slide folder")
    for value, _record in sorted(slide.associated.items()):
        kind = {"ScanDataLayer_SlideBarcode": "label", "ScanDataLayer_SlideThumbnail": "macro",
                "ScanDataLayer_SlidePreview": "preview/thumbnail"}.get(value, "other")
        removed.append(f"associated image {kind} ({value})")

    h = groups["HIERARCHICAL"]
    for i in range(1, int(h.get("HIER_COUNT", "1"))):
        removed.append(f"hierarchical layer {h.get(f'HIER_{i}_NAME', i)!s}")
    for i in range(int(h.get("NONHIER_COUNT", "0") or 0)):
        name = h.get(f"NONHIER_{i}_NAME", "")
        if name not in ("Scan data layer", slide.position_layer):
            removed.append(f"non-hierarchical layer {name}")

    # Slidedat.ini: structure + checked technical values
    new_id = pseudo_id(key, digest, "mirax-slide")
    out_groups: dict[str, dict[str, object]] = {}
    general: dict[str, object] = {"SLIDE_ID": new_id}
    removed.append("Slidedat.ini GENERAL.SLIDE_ID (replaced by a pseudonym)")
    for group, keys in groups.items():
        if group in ("HIERARCHICAL", "DATAFILE"):
            continue
        kind = _kind(slide, group)
        for k, value in keys.items():
            check = TECHNICAL_KEYS.get((kind, k))
            if k == "SLIDE_ID" and kind == "GENERAL":
                continue
            if check is not None and _valid(check, value):
                if kind == "GENERAL":
                    general[k] = value
            else:
                removed.append(f"Slidedat.ini {group}.{k}" if kind else f"Slidedat.ini group {group}")
    removed = list(dict.fromkeys(removed))
    out_groups["GENERAL"] = general
    hier: dict[str, object] = {"HIER_COUNT": 1, "HIER_0_NAME": SLIDE_ZOOM_LEVEL, "HIER_0_COUNT": len(levels)}
    for i in range(len(levels)):
        hier[f"HIER_0_VAL_{i}"] = f"ZoomLevel_{i}"
        hier[f"HIER_0_VAL_{i}_SECTION"] = f"LAYER_0_LEVEL_{i}_SECTION"
    hier["NONHIER_COUNT"] = 1 if position else 0
    if position:
        hier.update({"NONHIER_0_NAME": slide.position_layer, "NONHIER_0_COUNT": 1, "NONHIER_0_VAL_0": "default",
                     "NONHIER_0_VAL_0_SECTION": "NONHIERLAYER_0_VAL_0_SECTION"})
    hier["INDEXFILE"] = "Index.dat"
    out_groups["HIERARCHICAL"] = hier
    out_groups["DATAFILE"] = {"FILE_COUNT": len(used_files),
                              **{f"FILE_{i}": f"Data{i:04d}.dat" for i in range(len(used_files))}}
    for i, section in enumerate(slide.level_sections):
        out_groups[f"LAYER_0_LEVEL_{i}_SECTION"] = {
            k: v for k, v in groups[section].items()
            if ("LEVEL", k) in TECHNICAL_KEYS and _valid(TECHNICAL_KEYS[("LEVEL", k)], v)}
    if position:
        src_section = groups.get(slide.position_section or "", {})
        out_groups["NONHIERLAYER_0_VAL_0_SECTION"] = {
            k: v for k, v in src_section.items()
            if ("POSITION", k) in TECHNICAL_KEYS and _valid(TECHNICAL_KEYS[("POSITION", k)], v)}

    # write into a temporary folder beside the destination, then move both into place
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = dst_dir.with_name(f".{dst_dir.name}.tmp-{os.getpid()}")
    tmp_mrxs = dst_mrxs.with_name(f".{dst_mrxs.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        tmp_dir.mkdir()
        where: dict[tuple[int, int, int], tuple[int, int]] = {}  # (fileno, offset, length) -> (new fileno, new offset)
        for src_no in used_files:
            with open(slide.datafiles[src_no], "rb") as src_fh, \
                    open(tmp_dir / f"Data{new_fileno[src_no]:04d}.dat", "wb") as dst_fh:
                for fileno, offset, length in kept:
                    if fileno == src_no:
                        where[(fileno, offset, length)] = (new_fileno[src_no], dst_fh.tell())
                        _copy_range(src_fh, dst_fh, offset, length)
        for (_, _, length), (_, new_offset) in where.items():
            if new_offset + length > 0x7FFFFFFF:
                raise BadInput("unsupported_slide", "a de-identified MIRAX data file would exceed 2 GiB")
        new_levels = [[(r[0], where[(r[3], r[1], r[2])][1], r[2], where[(r[3], r[1], r[2])][0]) for r in recs]
                      for recs in levels]
        new_nonhier = []
        if position:
            fileno, offset = where[(position[2], position[0], position[1])]
            new_nonhier.append((offset, position[1], fileno))
        (tmp_dir / "Index.dat").write_bytes(_index_bytes(new_id, new_levels, new_nonhier))
        (tmp_dir / "Slidedat.ini").write_text(_ini_text(out_groups), encoding="utf-8")
        tmp_mrxs.write_bytes(b"")
        if dst_dir.exists():
            shutil.rmtree(dst_dir)
        os.replace(tmp_dir, dst_dir)
        os.replace(tmp_mrxs, dst_mrxs)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_mrxs.unlink(missing_ok=True)
        raise

    # dimensions as OpenSlide computes them
    g, div = groups["GENERAL"], _divisions(groups)
    level0 = groups[slide.level_sections[0]]
    iw, ih = int(level0["DIGITIZER_WIDTH"]), int(level0["DIGITIZER_HEIGHT"])
    ox, oy = float(level0["OVERLAP_X"]), float(level0["OVERLAP_Y"])
    nx, ny = int(g["IMAGENUMBER_X"]), int(g["IMAGENUMBER_Y"])
    width = sum(iw if (i % div != div - 1 or i == nx - 1) else iw - ox for i in range(nx))
    height = sum(ih if (i % div != div - 1 or i == ny - 1) else ih - oy for i in range(ny))
    name = g.get("SLIDE_NAME", "").strip()
    return {
        "pseudo_study": pseudo_id(key, digest, "study"),
        "pseudo_patient": pseudo_id(key, name or digest, "patient"),
        "removed": removed,
        "mpp": float(level0["MICROMETER_PER_PIXEL_X"]),
        "dimensions": [int(width), int(height)],
        "levels": len(levels),
        "vendor": "mirax",
        "files": [str(p) for p in mirax_files(dst_mrxs)],
    }


__all__ = ["deidentify_mirax", "mirax_files", "mirax_digest", "mirax_identifying_fields", "mirax_identifying_values",
           "mirax_pseudonyms", "TECHNICAL_KEYS"]
