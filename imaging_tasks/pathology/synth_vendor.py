"""Synthetic Hamamatsu NDPI and 3DHISTECH MIRAX slides that OpenSlide 4 opens, with PHI where those vendors put it.

Pixels come from :mod:`.synth` (real IHC-derived tissue from scikit-image, composited with a known tissue mask);
:func:`synthesize_vendor` composes a slide and writes it in either layout, returning the ground truth.

**NDPI** (what OpenSlide's ``hamamatsu-ndpi`` reader needs, written here without a TIFF library):

* classic little-endian TIFF "pretending to be BigTIFF": the first-IFD pointer is read as 8 bytes (the 4 bytes
  after the header are the high half, 0 here) and every IFD ends with an 8-byte next-IFD pointer; OpenSlide
  only switches to this NDPI mode when the first IFD holds tag 65420 (format flag);
* after each IFD's next pointer, one 4-byte word per entry with the high half of its value/offset (0 below
  4 GiB); OpenSlide guesses high bits instead, tifffile reads these words;
* one IFD per pyramid level, largest first, each ONE JPEG strip (RowsPerStrip = ImageLength) with restart
  markers: OpenSlide's tile is one restart interval (restart interval x MCU width by one MCU row), so each level's
  MCUs per row must be a multiple of the interval and its size a multiple of the MCU (16 x 8 px, 4:2:2: with
  4:2:0 OpenSlide's full-resolution tile reads fail, see ``NDPI_MCU_W``);
* tag 65421 (source lens) as FLOAT on every IFD: > 0 a pyramid level, -1 the macro photo, -2 the scan map;
  65424 (focal plane, SLONG) 0 on levels; 65426 (McuStarts) the offset of each restart interval from the strip
  start, so OpenSlide need not scan for markers; XResolution in pixels per centimetre (ResolutionUnit 3) is what
  becomes ``openslide.mpp-x``.

PHI as NDP.scan writes it: tag 65427 (Reference: the slide label text), DateTime (306), the scanner serial
(65442), the property map 65449 (``key=value`` lines; here operator, institution, case, creation time), the macro
photo of the glass with the printed label (name, MRN, accession, date of birth).

**MIRAX**: ``X.mrxs`` (OpenSlide only checks it exists and is not TIFF) + ``X/Slidedat.ini`` + ``X/Index.dat``
+ ``X/Data000N.dat``.  Slidedat.ini names the levels (HIER_0 "Slide zoom level", one section each with
MICROMETER_PER_PIXEL_X, DIGITIZER_WIDTH, IMAGE_CONCAT_FACTOR...), the non-hierarchical records (a
VIMSLIDE_POSITION_BUFFER with each camera position, and a "Scan data layer" holding the macro, label and
preview JPEGs) and the data files.  Index.dat starts with ``"01.02" + SLIDE_ID`` then two pointers: to the table
of per-level record lists (pages of ``image_index, offset, length, fileno``) and to the table of non-hierarchical
records.  PHI: SLIDE_NAME, PROJECT_NAME, creation date/time, the barcode text, SLIDE_ID, and the label/macro
images in the data files.
"""
from __future__ import annotations

import io
import json
import struct
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from . import synth

JPEG_QUALITY = 80
NDPI_DOWNSAMPLES = (1, 4, 16)
# 4:2:2 chroma subsampling: 16 x 8 px MCUs.  Not 4:2:0: OpenSlide decodes one restart interval as if it were the
# whole image (SOF size patched in memory only after the header is read), and libjpeg's h2v2 "fancy" upsampling
# then reads one MCU row ahead and hits the end of the interval ("found marker 0xd9 instead of RST0").
NDPI_MCU_W, NDPI_MCU_H = 16, 8
NDPI_MAX_RESTART_MCUS = 8  # OpenSlide tile = restart interval x 16 px wide (<= 128 px here), 8 px high
MIRAX_TILE = 256
MIRAX_LEVELS = 4
MIRAX_INDEX_VERSION = b"01.02"
GLASS_BGR = 0xECEEF0  # IMAGE_FILL_COLOR_BGR: glass (R 240, G 238, B 236) in 3DHISTECH's BGR order


# ----------------------------------------------------------------------------------------------- PHI
def vendor_phi(rng: np.random.Generator, label: str = "slide-000") -> dict[str, str]:
    """Identifying values for one synthetic slide (names, MRN, accession, dates, operator, institution)."""
    from imaging_tasks.synth.phi import fake_study

    study = fake_study(rng, label)
    family, given = study.patient.name.split("^")[:2]
    d, t = study.study_date, study.study_time
    return {
        "patient_name": f"{family}, {given}",
        "patient_family": family,
        "patient_id": study.patient.patient_id,
        "birth_date": study.patient.birth_date,
        "accession": study.accession,
        "slide_label": f"{study.accession}-A1-HE",
        "operator": " ".join(study.operator.split("^")[:2][::-1]),
        "institution": study.institution,
        "scan_date": d,  # YYYYMMDD
        "scan_time": t,  # HHMMSS
        "scanner_serial": f"SN{int(rng.integers(10 ** 5, 10 ** 6))}",
    }


def _label_photo(phi: dict[str, str]) -> Image.Image:
    lines = [phi["institution"][:28], phi["patient_name"], phi["patient_id"], phi["accession"],
             f"DOB {phi['birth_date']}  H&E"]
    return synth._label_image(lines, phi["slide_label"])


def _planted(phi: dict[str, str] | None) -> list[str]:
    """The identifying strings a de-identified copy must not contain (>= 6 characters, as the PHI audit)."""
    return sorted({v for v in (phi or {}).values() if len(v) >= 6})


# ----------------------------------------------------------------------------------------------- JPEG
def _jpeg(img: np.ndarray | Image.Image, *, quality: int = JPEG_QUALITY, restart_mcus: int = 0) -> bytes:
    buf = io.BytesIO()
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    pil.convert("RGB").save(buf, "JPEG", quality=quality, subsampling=1 if restart_mcus else 2,
                            restart_marker_blocks=restart_mcus)
    return buf.getvalue()


def _sos_end(jpeg: bytes) -> int:
    """Offset of the first entropy-coded byte (just after the SOS segment)."""
    pos = 2
    while True:
        if jpeg[pos] != 0xFF:
            raise ValueError("JPEG marker expected")
        marker = jpeg[pos + 1]
        length = struct.unpack(">H", jpeg[pos + 2:pos + 4])[0]
        pos += 2 + length
        if marker == 0xDA:
            return pos


def mcu_starts(jpeg: bytes) -> list[int]:
    """Offsets (from the JPEG start) of each restart interval's first byte: after SOS, then after each RSTn.

    In entropy-coded data 0xFF is always followed by 0x00 (stuffing) or a marker, so every FF D0-D7 is a real
    restart marker.
    """
    starts = [_sos_end(jpeg)]
    pos = starts[0]
    while True:
        pos = jpeg.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(jpeg):
            return starts
        if 0xD0 <= jpeg[pos + 1] <= 0xD7:
            starts.append(pos + 2)
        pos += 2


def _with_comment(jpeg: bytes, text: str) -> bytes:
    """The JPEG with a COM segment after SOI (some writers put the case or operator there)."""
    body = text.encode("utf-8")
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


# ----------------------------------------------------------------------------------------------- NDPI
_ASCII, _SHORT, _LONG, _RATIONAL, _SLONG, _FLOAT = 2, 3, 4, 5, 9, 11


def _tag(typ: int, values) -> tuple[int, int, bytes]:
    if typ == _ASCII:
        raw = values.encode("ascii") + b"\0"
        return typ, len(raw), raw
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    fmt = {_SHORT: "H", _LONG: "I", _SLONG: "i", _FLOAT: "f", _RATIONAL: "II"}[typ]
    if typ == _RATIONAL:
        flat = [int(x) for pair in values for x in pair]
        return typ, len(values), struct.pack(f"<{len(flat)}I", *flat)
    return typ, len(values), struct.pack(f"<{len(values)}{fmt}", *values)


class _NdpiWriter:
    """Classic little-endian TIFF with NDPI's 8-byte next-IFD pointers; each page: data, values, then its IFD."""

    def __init__(self, fh):
        self.fh = fh
        fh.write(b"II*\0" + struct.pack("<I", 0) + b"\0" * 4)  # first IFD pointer; bytes 8-11: its high half
        self.next_ptr = 4

    def page(self, data: bytes, entries: dict[int, tuple[int, int, bytes]]) -> None:
        fh = self.fh
        offset = fh.tell()
        fh.write(data)
        entries = dict(entries)
        entries[273] = _tag(_LONG, offset)
        entries[279] = _tag(_LONG, len(data))
        blobs: dict[int, int] = {}
        for code in sorted(entries):
            raw = entries[code][2]
            if len(raw) > 4:
                if fh.tell() % 2:
                    fh.write(b"\0")
                blobs[code] = fh.tell()
                fh.write(raw)
        if fh.tell() % 2:
            fh.write(b"\0")
        ifd = fh.tell()
        out = bytearray(struct.pack("<H", len(entries)))
        for code in sorted(entries):
            typ, count, raw = entries[code]
            value = struct.pack("<I", blobs[code]) if code in blobs else raw.ljust(4, b"\0")
            out += struct.pack("<HHI", code, typ, count) + value
        out += b"\0" * 8  # next-IFD pointer (8 bytes in NDPI)
        out += b"\0" * 4 * len(entries)  # high halves of each entry's value/offset (tifffile reads them)
        fh.write(out)
        end = fh.tell()
        fh.seek(self.next_ptr)
        fh.write(struct.pack("<Q" if self.next_ptr != 4 else "<I", ifd))
        fh.seek(end)
        self.next_ptr = ifd + 2 + 12 * len(entries)


def _ratio(value: Fraction) -> tuple[int, int]:
    """A TIFF RATIONAL (two uint32) closest to ``value``."""
    best = value.limit_denominator(1 << 20)
    while best.numerator >= 1 << 32:
        best = value.limit_denominator(max(1, best.denominator // 16))
    return best.numerator, best.denominator


def _restart_interval(width: int) -> int:
    mcus = width // NDPI_MCU_W
    return max(d for d in range(1, NDPI_MAX_RESTART_MCUS + 1) if mcus % d == 0)


def write_ndpi(path: Path, rgb: np.ndarray, *, mpp: float, phi: dict[str, str] | None = None,
               macro: Image.Image | None = None, downsamples: tuple[int, ...] = NDPI_DOWNSAMPLES,
               quality: int = JPEG_QUALITY, jpeg_comment: str | None = None) -> dict:
    """A Hamamatsu NDPI of ``rgb`` at ``mpp`` µm/px (see the module docstring); returns what was written.

    ``phi``: values from :func:`vendor_phi` planted in the Reference, DateTime, serial and property-map tags and
    rendered on the macro's label (None: a slide with no PHI, no macro unless given).  ``macro``: the overview
    photo to store (default: one built from ``phi``).  ``jpeg_comment``: text put in a COM segment of the
    level-0 JPEG (for testing that de-identification strips JPEG comments).  Width and height must be
    multiples of 16 x the largest downsample (whole MCUs at every level).
    """
    height, width = rgb.shape[:2]
    step = NDPI_MCU_W * max(downsamples)
    if width % step or height % step or list(downsamples) != sorted(downsamples) or downsamples[0] != 1:
        raise ValueError(f"NDPI levels need width and height multiples of {step} px and ascending downsamples "
                         f"from 1; got {width}x{height}, {downsamples}")
    if phi and macro is None:
        macro = synth._macro_image(_label_photo(phi), rgb)
    res_cm = Fraction(10000) / Fraction(repr(float(mpp)))  # pixels per centimetre at level 0, as an exact ratio
    common: dict[int, tuple[int, int, bytes]] = {
        258: _tag(_SHORT, [8, 8, 8]), 259: _tag(_SHORT, 7), 262: _tag(_SHORT, 6), 271: _tag(_ASCII, "Hamamatsu"),
        272: _tag(_ASCII, "C13210"), 277: _tag(_SHORT, 3), 284: _tag(_SHORT, 1), 296: _tag(_SHORT, 3),
        305: _tag(_ASCII, "NDP.scan 3.3.7"), 530: _tag(_SHORT, [2, 1]), 65420: _tag(_LONG, 1),
        65422: _tag(_SLONG, -2150000), 65423: _tag(_SLONG, 1375000), 65444: _tag(_LONG, quality),
    }
    if phi:
        d, t = phi["scan_date"], phi["scan_time"]
        props = (f"Objective.Lens.Magnificant=20\r\nNDP.S/N={phi['scanner_serial']}\r\n"
                 f"Created={d[:4]}/{d[4:6]}/{d[6:]} {t[:2]}:{t[2:4]}:{t[4:]}\r\nOperator={phi['operator']}\r\n"
                 f"Institution={phi['institution']}\r\nCase={phi['accession']} {phi['patient_name']}\r\n")
        common.update({306: _tag(_ASCII, f"{d[:4]}:{d[4:6]}:{d[6:]} {t[:2]}:{t[2:4]}:{t[4:]}"),
                       65427: _tag(_ASCII, phi["slide_label"]), 65442: _tag(_ASCII, phi["scanner_serial"]),
                       65449: _tag(_ASCII, props)})
    pil = Image.fromarray(rgb)
    levels = []
    with open(path, "wb") as fh:
        out = _NdpiWriter(fh)
        for i, ds in enumerate(downsamples):
            level = np.asarray(pil.reduce(ds)) if ds > 1 else rgb
            h, w = level.shape[:2]
            data = _jpeg(level, quality=quality, restart_mcus=_restart_interval(w))
            if i == 0 and jpeg_comment:
                data = _with_comment(data, jpeg_comment)
            starts = mcu_starts(data)
            tile_w = _restart_interval(w) * NDPI_MCU_W
            if len(starts) != (w // tile_w) * (h // NDPI_MCU_H):
                raise AssertionError("restart intervals do not match the tile grid")
            entries = {**common, 256: _tag(_LONG, w), 257: _tag(_LONG, h), 278: _tag(_LONG, h),
                       282: _tag(_RATIONAL, [_ratio(res_cm / ds)]), 283: _tag(_RATIONAL, [_ratio(res_cm / ds)]),
                       65421: _tag(_FLOAT, 20.0), 65424: _tag(_SLONG, 0), 65426: _tag(_LONG, starts)}
            out.page(data, entries)
            levels.append([w, h])
        extra = []
        if macro is not None:  # SourceLens -1: the overview photo, a plain JPEG (no restart markers)
            data = _jpeg(macro, quality=90)
            out.page(data, {**common, 256: _tag(_LONG, macro.width), 257: _tag(_LONG, macro.height),
                            278: _tag(_LONG, macro.height), 65421: _tag(_FLOAT, -1.0)})
            extra.append("macro")
        # SourceLens -2: the scan map (where the scanner imaged), 8-bit grey, uncompressed.
        grey = np.asarray(pil.reduce(32).convert("L"))
        out.page(grey.tobytes(), {**{k: v for k, v in common.items() if k not in (258, 262, 277, 530)},
                                  256: _tag(_LONG, grey.shape[1]), 257: _tag(_LONG, grey.shape[0]),
                                  258: _tag(_SHORT, 8), 259: _tag(_SHORT, 1), 262: _tag(_SHORT, 1),
                                  277: _tag(_SHORT, 1), 278: _tag(_LONG, grey.shape[0]), 65421: _tag(_FLOAT, -2.0)})
        extra.append("map")
    return {"format": "ndpi", "dimensions": [width, height], "mpp": mpp, "levels": levels, "pages": extra,
            "phi": _planted(phi), "phi_fields": dict(phi or {})}


# ----------------------------------------------------------------------------------------------- MIRAX
def _ini(groups: dict[str, dict[str, object]]) -> str:
    return "".join(f"[{g}]\n" + "".join(f"{k}={v}\n" for k, v in keys.items()) + "\n" for g, keys in groups.items())


class _IndexWriter:
    """Index.dat built in memory: ``"01.02" + SLIDE_ID``, the two root pointers, then tables and pages."""

    def __init__(self, slide_id: str):
        self.buf = bytearray(MIRAX_INDEX_VERSION + slide_id.encode("ascii"))
        self.hier_root = len(self.buf)
        self.buf += b"\0" * 8  # hier root pointer, nonhier root pointer

    def _put(self, data: bytes) -> int:
        pos = len(self.buf)
        self.buf += data
        return pos

    def _set(self, at: int, value: int) -> None:
        self.buf[at:at + 4] = struct.pack("<i", value)

    def write(self, levels: list[list[tuple[int, int, int, int]]], nonhier: list[tuple[int, int, int]]) -> bytes:
        """``levels``: per zoom level, records (image_index, offset, length, fileno); ``nonhier``: records
        (offset, size, fileno) in Slidedat order."""
        table = self._put(b"\0" * 4 * len(levels))
        self._set(self.hier_root, table)
        for i, records in enumerate(levels):
            head = self._put(b"\0" * 8)  # 0, pointer to the first page
            self._set(table + 4 * i, head)
            page = self._put(struct.pack("<ii", len(records), 0)
                             + b"".join(struct.pack("<iiii", *r) for r in records))
            self._set(head + 4, page)
        table = self._put(b"\0" * 4 * len(nonhier))
        self._set(self.hier_root + 4, table)
        for j, (offset, size, fileno) in enumerate(nonhier):
            head = self._put(b"\0" * 8)
            self._set(table + 4 * j, head)
            page = self._put(struct.pack("<iiiiiii", 1, 0, 0, 0, offset, size, fileno))
            self._set(head + 4, page)
        return bytes(self.buf)


def write_mirax(path_mrxs: Path, rgb: np.ndarray, *, mpp: float, phi: dict[str, str] | None = None,
                label_image: Image.Image | None = None, tile_px: int = MIRAX_TILE, levels: int = MIRAX_LEVELS,
                quality: int = JPEG_QUALITY, slide_id: str | None = None) -> dict:
    """A 3DHISTECH MIRAX slide: ``path_mrxs`` and the folder beside it (see the module docstring).

    Level 0 is cut into ``tile_px`` camera images (no overlap, one image per camera position); level k images
    each cover 2^k x 2^k level-0 images, downsampled.  ``label_image``: the barcode/label photo (default: built
    from ``phi``); the macro is the whole glass with that label, the preview the tissue only.  Width and height
    must be multiples of ``tile_px``.  Returns what was written (dimensions, mpp, planted PHI, files).
    """
    path_mrxs = Path(path_mrxs)
    if path_mrxs.suffix != ".mrxs":
        raise ValueError("a MIRAX slide file must end in .mrxs")
    height, width = rgb.shape[:2]
    if width % tile_px or height % tile_px:
        raise ValueError(f"MIRAX width and height must be multiples of {tile_px} px; got {width}x{height}")
    images_x, images_y = width // tile_px, height // tile_px
    slide_id = slide_id or str(uuid.uuid5(uuid.NAMESPACE_OID, f"synthetic-mirax-{width}x{height}-{mpp}"))
    folder = path_mrxs.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    if phi and label_image is None:
        label_image = _label_photo(phi)
    glass = (240, 238, 236)

    data: list[bytearray] = [bytearray(), bytearray()]  # Data0000: associated images + level 0; Data0001: the rest

    def put(fileno: int, blob: bytes) -> tuple[int, int, int]:
        offset = len(data[fileno])
        data[fileno] += blob
        return offset, len(blob), fileno

    nonhier: list[tuple[int, int, int]] = []
    # record 0: camera positions (flag byte, x, y in level-0 px), one per level-0 image
    positions = b"".join(struct.pack("<bii", 1, (i % images_x) * tile_px, (i // images_x) * tile_px)
                         for i in range(images_x * images_y))
    nonhier.append(put(0, positions))
    associated = []
    if label_image is not None:
        macro = synth._macro_image(label_image, rgb)
        preview = Image.fromarray(rgb)
        preview.thumbnail((512, 512), Image.BOX)
        for name, img in (("ScanDataLayer_SlideThumbnail", macro), ("ScanDataLayer_SlideBarcode", label_image),
                          ("ScanDataLayer_SlidePreview", preview)):
            nonhier.append(put(0, _jpeg(img, quality=90)))
            associated.append(name)

    pil = Image.fromarray(rgb)
    level_records: list[list[tuple[int, int, int, int]]] = []
    for k in range(levels):
        concat = 2 ** k
        records = []
        for y in range(0, images_y, concat):
            for x in range(0, images_x, concat):
                box = (x * tile_px, y * tile_px,
                       min(width, (x + concat) * tile_px), min(height, (y + concat) * tile_px))
                canvas = Image.new("RGB", (concat * tile_px, concat * tile_px), glass)
                canvas.paste(pil.crop(box), (0, 0))
                img = canvas.reduce(concat) if concat > 1 else canvas
                offset, length, fileno = put(0 if k == 0 else 1, _jpeg(img, quality=quality))
                records.append((y * images_x + x, offset, length, fileno))
        level_records.append(records)

    hier = {"HIER_COUNT": 1, "NONHIER_COUNT": 2 if associated else 1, "INDEXFILE": "Index.dat",
            "HIER_0_NAME": "Slide zoom level", "HIER_0_COUNT": levels}
    for k in range(levels):
        hier[f"HIER_0_VAL_{k}"] = f"ZoomLevel_{k}"
        hier[f"HIER_0_VAL_{k}_SECTION"] = f"LAYER_0_LEVEL_{k}_SECTION"
    hier.update({"NONHIER_0_NAME": "VIMSLIDE_POSITION_BUFFER", "NONHIER_0_COUNT": 1, "NONHIER_0_VAL_0": "default",
                 "NONHIER_0_VAL_0_SECTION": "NONHIERLAYER_0_VAL_0_SECTION"})
    groups: dict[str, dict[str, object]] = {}
    general: dict[str, object] = {"SLIDE_VERSION": "01.03.00.00", "SLIDE_ID": slide_id}
    if phi:
        d, t = phi["scan_date"], phi["scan_time"]
        general.update({"SLIDE_NAME": phi["slide_label"], "PROJECT_NAME": f"{phi['institution']} {phi['patient_name']}",
                        "SLIDE_CREATIONDATETIME": f"{d[6:]}/{d[4:6]}/{d[:4]} {t[:2]}:{t[2:4]}:{t[4:]}",
                        "SLIDE_UTC_CREATIONDATETIME": f"{d[:4]}-{d[4:6]}-{d[6:]}T{t[:2]}:{t[2:4]}:{t[4:]}Z",
                        "SCANNER_HARDWARE_ID": phi["scanner_serial"], "OPERATOR": phi["operator"]})
    general.update({"IMAGENUMBER_X": images_x, "IMAGENUMBER_Y": images_y, "OBJECTIVE_NAME": "Plan-Apochromat",
                    "OBJECTIVE_MAGNIFICATION": 20, "CameraImageDivisionsPerSide": 1})
    groups["GENERAL"] = general
    groups["HIERARCHICAL"] = hier
    groups["DATAFILE"] = {"FILE_COUNT": 2, "FILE_0": "Data0000.dat", "FILE_1": "Data0001.dat"}
    for k in range(levels):
        groups[f"LAYER_0_LEVEL_{k}_SECTION"] = {
            "OVERLAP_X": 0, "OVERLAP_Y": 0, "MICROMETER_PER_PIXEL_X": f"{mpp * 2 ** k:.6f}",
            "MICROMETER_PER_PIXEL_Y": f"{mpp * 2 ** k:.6f}", "IMAGE_FORMAT": "JPEG", "IMAGE_QUALITY": quality,
            "IMAGE_FILL_COLOR_BGR": GLASS_BGR, "DIGITIZER_WIDTH": tile_px, "DIGITIZER_HEIGHT": tile_px,
            "IMAGE_CONCAT_FACTOR": 0 if k == 0 else 1}
    groups["NONHIERLAYER_0_VAL_0_SECTION"] = {"VIMSLIDE_POSITION_DATA_FORMAT_VERSION": 257}
    if associated:
        hier.update({"NONHIER_1_NAME": "Scan data layer", "NONHIER_1_COUNT": len(associated)})
        kinds = {"ScanDataLayer_SlideThumbnail": "THUMBNAIL", "ScanDataLayer_SlideBarcode": "BARCODE",
                 "ScanDataLayer_SlidePreview": "PREVIEW"}
        for j, name in enumerate(associated):
            hier[f"NONHIER_1_VAL_{j}"] = name
            hier[f"NONHIER_1_VAL_{j}_SECTION"] = f"NONHIERLAYER_1_VAL_{j}_SECTION"
            section: dict[str, object] = {f"{kinds[name]}_IMAGE_TYPE": "JPEG"}
            if name == "ScanDataLayer_SlideBarcode" and phi:
                section["BARCODE_VALUE"] = phi["slide_label"]
            groups[f"NONHIERLAYER_1_VAL_{j}_SECTION"] = section

    (folder / "Slidedat.ini").write_text(_ini(groups), encoding="utf-8")
    (folder / "Index.dat").write_bytes(_IndexWriter(slide_id).write(level_records, nonhier))
    for i, blob in enumerate(data):
        (folder / f"Data{i:04d}.dat").write_bytes(bytes(blob))
    path_mrxs.write_bytes(b"")  # OpenSlide reads nothing from it; it only has to exist and not be TIFF
    files = [path_mrxs] + sorted(folder.iterdir())
    return {"format": "mirax", "dimensions": [width, height], "mpp": mpp, "levels": levels,
            "associated": associated, "slide_id": slide_id, "phi": _planted(phi) + [slide_id],
            "phi_fields": dict(phi or {}), "files": [str(f) for f in files]}


# ----------------------------------------------------------------------------------------------- entry
def synthesize_vendor(out: Path, fmt: str, *, seed: int = 0, width: int = 2048, height: int = 1536,
                      mpp: float = 0.5, stain: str = "he", fragments: int = 2, phi: bool = True) -> dict:
    """Compose one slide from real IHC pixels (:func:`.synth._compose`) and write it as ``fmt`` ('ndpi' or
    'mirax') under ``out``; returns the writer's record plus the tissue ground truth and the slide path."""
    rng = np.random.default_rng([seed, 14])
    values = vendor_phi(rng) if phi else None
    rgb, mask, areas = synth._compose(rng, height, width, stain, fragments)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "ndpi":
        path = out / "slide.ndpi"
        record = write_ndpi(path, rgb, mpp=mpp, phi=values)
    elif fmt == "mirax":
        path = out / "slide.mrxs"
        record = write_mirax(path, rgb, mpp=mpp, phi=values,
                             slide_id=str(uuid.UUID(bytes=rng.bytes(16), version=4)))
    else:
        raise ValueError(f"fmt must be 'ndpi' or 'mirax', not {fmt!r}")
    px_mm2 = (mpp / 1000.0) ** 2
    record.update({"path": str(path), "tissue_area_mm2": float(mask.sum()) * px_mm2,
                   "fragment_areas_mm2": sorted(a * px_mm2 for a in areas),
                   "n_tiles_expected": synth.expected_tiles(mask, mpp), "stain": stain})
    (out / f"_truth_{fmt}.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    return record


__all__ = ["write_ndpi", "write_mirax", "synthesize_vendor", "vendor_phi", "mcu_starts"]
