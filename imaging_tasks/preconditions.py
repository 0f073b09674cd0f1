"""Checks shared by the processors: what one DICOM image or a stack of single-frame slices must satisfy.

Each processor states its own preconditions in its ``check_inputs`` (see :mod:`imaging_tasks.cardiovascular.calcium`,
:mod:`imaging_tasks.neuroimaging.structural`, :mod:`imaging_tasks.mammography.calcifications`, :mod:`imaging_tasks.pathology.tiles`); the header checks
they have in common live here.  Everything runs on headers read without pixel data, so a study that cannot
be processed is refused before any pixel is decoded.  Every violation raises
:class:`~imaging_tasks.errors.BadInput` with one of these stable reason codes; messages name attributes,
counts and numbers only, never a value that could identify a patient (no names, IDs, dates or UIDs):

* ``unsupported_photometric``: SamplesPerPixel is not 1, or PhotometricInterpretation is not MONOCHROME1 or
  MONOCHROME2 (RGB, YBR_*, PALETTE COLOR: a screenshot or secondary capture);
* ``unsupported_frames``: a multi-frame object where single frames are expected;
* ``missing_image_size``: Rows/Columns missing or zero;
* ``missing_pixel_spacing``: no PixelSpacing (Type 1 in the Image Plane module);
* ``invalid_pixel_spacing``: PixelSpacing is not two finite numbers > 0 (zero, negative, NaN, text);
* ``missing_orientation`` / ``invalid_orientation``: no ImageOrientationPatient, or not two orthogonal unit
  vectors;
* ``missing_position`` / ``invalid_position``: no ImagePositionPatient on some slice, or not three finite
  numbers (SliceLocation is no substitute: Type 3, with no defined origin or direction);
* ``mixed_geometry``: slices of one series differ in orientation, pixel spacing, Rows/Columns or photometric
  interpretation, or their positions do not lie on one line (several stacks merged into one series);
* ``duplicate_slice_positions``: two different instances at one position (several phases, echoes or
  acquisitions in one series): which one to use cannot be decided;
* ``irregular_slices``: positions not evenly spaced (a missing instance);
* ``invalid_rescale``: RescaleSlope/RescaleIntercept not finite numbers, or a zero slope.

What is *not* refused, because it can be repaired without guessing: files in any order and instance numbers
in any order (slices are sorted along the slice normal), the same instance sent twice (same
SOPInstanceUID: one copy is kept), RescaleSlope/RescaleIntercept absent where the IOD makes them optional
(identity, as PS3.3 C.11.1 defines; CT is stricter, see :mod:`imaging_tasks.cardiovascular.calcium`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.multival import MultiValue

from imaging_tasks.errors import BadInput

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
ORIENTATION_TOL = 1e-3  # |row|, |col| within 1 +- tol, row.col within tol
SAME_ORIENTATION_TOL = 1e-4
SAME_SPACING_REL_TOL = 1e-4
# Evenly spaced: every gap within 1 % (+ 1 um for rounded positions) of the median gap, as dicom_io.load_series.
GAP_REL_TOL, GAP_ABS_TOL_MM = 0.01, 1e-3


def _values(ds, keyword: str) -> list | None:
    """The attribute's values as a list, or None when absent or empty.  Values pydicom cannot even convert
    (a DS holding text) come back as the raw strings so the caller reports them as invalid."""
    if keyword not in ds:
        return None
    try:
        value = ds[keyword].value
    except (ValueError, TypeError, OverflowError):  # pydicom converts DS/IS lazily; garbage raises here
        return ["?"]
    if value is None or value == "" or (hasattr(value, "__len__") and not isinstance(value, str) and len(value) == 0):
        return None
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _floats(values: list) -> list[float] | None:
    """Floats of ``values``, None if any is not a finite number."""
    out = []
    for v in values:
        try:
            f = float(v)
        except (ValueError, TypeError, OverflowError):
            return None
        if not math.isfinite(f):
            return None
        out.append(f)
    return out


def check_photometric(ds, what: str) -> str:
    """PhotometricInterpretation of a grey-scale image (MONOCHROME1 or MONOCHROME2), else BadInput."""
    samples = ds.get("SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    try:
        samples = int(samples if samples not in (None, "") else 1)
    except (ValueError, TypeError):
        samples = -1
    if samples != 1 or photometric not in MONOCHROME:
        shown = photometric or "missing"
        raise BadInput("unsupported_photometric", f"{what} has PhotometricInterpretation {shown} with "
                       f"{samples if samples >= 0 else '?'} sample(s) per pixel; this algorithm needs a grey-scale "
                       "(MONOCHROME1/MONOCHROME2) image as the modality writes it, not a colour screenshot or "
                       "secondary capture; send the original image series")
    return photometric


def check_single_frame(ds, what: str) -> None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (ValueError, TypeError):
        frames = 1
    if frames > 1:
        raise BadInput("unsupported_frames", f"{what} is a multi-frame object ({frames} frames); only single-frame "
                       "images are supported here; send the single-frame series (or split it)")


def image_size(ds, what: str) -> tuple[int, int]:
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (ValueError, TypeError):
        rows = cols = 0
    if rows <= 0 or cols <= 0:
        raise BadInput("missing_image_size", f"{what} has no Rows/Columns; the file is incomplete, re-export it")
    return rows, cols


def pixel_spacing(ds, what: str, keyword: str = "PixelSpacing") -> tuple[float, float]:
    """(row spacing, column spacing) in mm from ``keyword``: missing -> ``missing_pixel_spacing``; zero,
    negative, non-finite or not two numbers -> ``invalid_pixel_spacing``."""
    values = _values(ds, keyword)
    if values is None:
        raise BadInput("missing_pixel_spacing", f"{what} has no {keyword}; without it no distance, area or volume "
                       "can be measured; re-export the series with its pixel spacing")
    floats = _floats(values)
    if floats is None or len(floats) != 2 or min(floats) <= 0:
        shown = "/".join(f"{v:g}" for v in floats) if floats is not None else "not a number"
        raise BadInput("invalid_pixel_spacing", f"{what} has {keyword} {shown} ({len(values)} value(s)); it must "
                       "be two finite numbers > 0 mm; re-export the series with its true pixel spacing")
    return floats[0], floats[1]


def rescale(ds, what: str) -> tuple[float | None, float | None]:
    """(RescaleSlope, RescaleIntercept) as given, None where absent; non-finite or zero slope refused."""
    out = []
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        values = _values(ds, keyword)
        if values is None:
            out.append(None)
            continue
        floats = _floats(values)
        if floats is None or len(floats) != 1:
            raise BadInput("invalid_rescale", f"{what} has a {keyword} that is not one finite number; the stored "
                           "values cannot be converted to physical units; re-export the series")
        out.append(floats[0])
    if out[0] == 0:
        raise BadInput("invalid_rescale", f"{what} has RescaleSlope 0, which maps every pixel to one value; "
                       "re-export the series")
    return out[0], out[1]


def stored_range(ds) -> tuple[int, int]:
    """The values a pixel can be stored as (BitsStored, signed or not by PixelRepresentation): the range a
    MONOCHROME1 image is inverted over and a window-free image scaled over, whatever this image holds."""
    try:
        bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 16) or 16)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    except (TypeError, ValueError):
        bits, signed = 16, False
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def check_spacing_values(spacing_mm, what: str) -> tuple[float, ...]:
    """Guard for the computations: every spacing finite and > 0 (a BadInput, not a ZeroDivisionError later)."""
    try:
        values = tuple(float(s) for s in spacing_mm)
    except (ValueError, TypeError):
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise BadInput("invalid_pixel_spacing", f"{what}: voxel spacing {spacing_mm!r} mm is not finite and > 0; "
                       "re-export the series with its true spacing")
    return values


# --------------------------------------------------------------------------- slice stacks
@dataclass
class Stack:
    """A series that passed :func:`check_stack`: slices sorted along the normal, geometry measured."""

    paths: list[Path]
    headers: list
    spacing_mm: tuple[float, float, float]  # (z, y, x): slice gap from positions, PixelSpacing row/col
    origin_mm: tuple[float, float, float]  # ImagePositionPatient of the first (lowest along the normal) slice
    direction: tuple[float, ...]  # 3x3 row-major, columns: row, column and slice directions (LPS)
    rows: int
    cols: int
    rescale: list[tuple[float | None, float | None]]  # per slice, as given (None: absent)
    notes: list[str] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return len(self.paths)

    @property
    def normal(self) -> np.ndarray:
        return np.array(self.direction).reshape(3, 3)[:, 2]

    @property
    def coverage_mm(self) -> float:
        """Extent imaged along the normal: slices x slice spacing."""
        return self.n_slices * self.spacing_mm[0]


def _orientation(ds, what: str) -> np.ndarray:
    values = _values(ds, "ImageOrientationPatient")
    if values is None:
        raise BadInput("missing_orientation", f"{what} has no ImageOrientationPatient; slice geometry is unknown; "
                       "re-export the series with its Image Plane attributes")
    floats = _floats(values)
    if floats is None or len(floats) != 6:
        raise BadInput("invalid_orientation", f"{what}: ImageOrientationPatient is not six finite numbers")
    row, col = np.array(floats[:3]), np.array(floats[3:])
    if (abs(np.linalg.norm(row) - 1) > ORIENTATION_TOL or abs(np.linalg.norm(col) - 1) > ORIENTATION_TOL
            or abs(float(row @ col)) > ORIENTATION_TOL):
        raise BadInput("invalid_orientation", f"{what}: ImageOrientationPatient is not two orthogonal unit vectors; "
                       "the slice geometry is corrupt, re-export the series")
    return np.array(floats)


def _position(ds, what: str) -> np.ndarray:
    values = _values(ds, "ImagePositionPatient")
    if values is None:
        raise BadInput("missing_position", f"{what} has no ImagePositionPatient on at least one slice; slices "
                       "cannot be ordered or spaced; re-export the series with its Image Plane attributes")
    floats = _floats(values)
    if floats is None or len(floats) != 3:
        raise BadInput("invalid_position", f"{what}: ImagePositionPatient is not three finite numbers on at least "
                       "one slice; re-export the series")
    return np.array(floats)


def finite_float(value) -> float | None:
    """``value`` as a finite float, or None (absent, text, NaN, infinite)."""
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def unique_instances(items: list[tuple[Path, object]]) -> tuple[list[tuple[Path, object]], list[str]]:
    """``(path, header)`` items with a re-sent instance (same SOPInstanceUID) kept once, and a note if any was."""
    seen, unique = set(), []
    for path, ds in items:
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if uid and uid in seen:
            continue
        seen.add(uid)
        unique.append((Path(path), ds))
    dropped = len(items) - len(unique)
    return unique, [f"{dropped} duplicate copy(ies) of an instance ignored"] if dropped else []


def check_stack(items: list[tuple[Path, object]], *, what: str, min_slices: int, too_few_reason: str,
                too_few_why: str) -> Stack:
    """Check a single-frame series (``(path, header)`` pairs, any order) and sort it along its normal.

    Checks, in order: duplicates of one instance dropped; at least ``min_slices`` instances (else
    ``too_few_reason``, the message ending with ``too_few_why``); per slice grey-scale photometric,
    single frame, Rows/Columns, PixelSpacing, orientation, position, rescale; one geometry for all
    slices; positions on one line, distinct and evenly spaced.
    """
    unique, notes = unique_instances(items)
    if len(unique) < min_slices:
        raise BadInput(too_few_reason, f"{what} has {len(unique)} slice(s); at least {min_slices} are needed: "
                       f"{too_few_why}")

    first = unique[0][1]
    photometric = check_photometric(first, what)
    rows, cols = image_size(first, what)
    dy, dx = pixel_spacing(first, what)
    iop = _orientation(first, what)
    positions, scales = [], []
    for _path, ds in unique:
        check_single_frame(ds, what)
        if check_photometric(ds, what) != photometric:
            raise BadInput("mixed_geometry", f"{what} mixes MONOCHROME1 and MONOCHROME2 slices; send one "
                           "consistent series")
        if image_size(ds, what) != (rows, cols):
            raise BadInput("mixed_geometry", f"{what}: Rows/Columns differ between slices ({rows}x{cols} and "
                           f"{'x'.join(map(str, image_size(ds, what)))}); slices cannot be stacked; send one "
                           "reconstruction per series")
        sy, sx = pixel_spacing(ds, what)
        if abs(sy - dy) > SAME_SPACING_REL_TOL * dy or abs(sx - dx) > SAME_SPACING_REL_TOL * dx:
            raise BadInput("mixed_geometry", f"{what}: PixelSpacing differs between slices ({dy:g}/{dx:g} and "
                           f"{sy:g}/{sx:g} mm); send one reconstruction per series")
        if np.max(np.abs(_orientation(ds, what) - iop)) > SAME_ORIENTATION_TOL:
            raise BadInput("mixed_geometry", f"{what}: ImageOrientationPatient differs between slices (several "
                           "stacks or a localizer in one series); send one stack per series")
        positions.append(_position(ds, what))
        scales.append(rescale(ds, what))

    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    pos = np.array(positions)
    along = pos @ normal
    order = np.argsort(along, kind="stable")  # file and instance-number order do not matter
    along, pos = along[order], pos[order]
    gaps = np.diff(along)
    dz = float(np.median(gaps)) if len(gaps) else 0.0
    same = gaps <= max(GAP_ABS_TOL_MM, 1e-3 * abs(dz))
    if np.any(same):
        raise BadInput("duplicate_slice_positions", f"{what}: {int(same.sum())} slice(s) share a position with "
                       "another instance (several phases, echoes or acquisitions in one series?); which one to "
                       "use cannot be decided; send one image per position")
    if len(gaps) and np.any(np.abs(gaps - dz) > GAP_REL_TOL * abs(dz) + GAP_ABS_TOL_MM):
        raise BadInput("irregular_slices", f"{what}: slice positions are not evenly spaced (gaps "
                       f"{gaps.min():.3g}-{gaps.max():.3g} mm around {dz:.3g} mm: missing instances?); send the "
                       "complete series")
    # In-plane offsets must move linearly along the normal (straight stack, or a gantry tilt); anything
    # else is several stacks in one series.
    if len(along) > 2:
        for axis, step in ((row, dx), (col, dy)):
            offset = pos @ axis
            fit = np.polyval(np.polyfit(along - along[0], offset, 1), along - along[0])
            if np.max(np.abs(offset - fit)) > max(0.5 * step, 0.01):
                raise BadInput("mixed_geometry", f"{what}: slice positions do not lie on one line (several "
                               "stacks in one series); send one stack per series")
    items_sorted = [unique[i] for i in order]
    direction = tuple(np.column_stack([row, col, normal]).ravel().tolist())
    return Stack(paths=[p for p, _ in items_sorted], headers=[d for _, d in items_sorted],
                 spacing_mm=(abs(dz), dy, dx), origin_mm=tuple(pos[0].tolist()), direction=direction, rows=rows,
                 cols=cols, rescale=[scales[i] for i in order], notes=notes)


def load_stack(stack: Stack, rescale_values: list[tuple[float, float]], what: str):
    """Pixels of a checked stack, rescaled slice by slice, as a :class:`imaging_tasks.dicom_io.Volume`."""
    from imaging_tasks.dicom_io import Volume, read_full

    slices = []
    for path, (slope, intercept) in zip(stack.paths, rescale_values, strict=True):
        ds = read_full(Path(path).read_bytes())  # BadInput truncated_pixels / unreadable_dicom
        arr = ds.pixel_array
        if arr.shape != (stack.rows, stack.cols):
            raise BadInput("mixed_geometry", f"{what}: a slice decodes to shape {arr.shape}, not the "
                           f"{stack.rows}x{stack.cols} its header declares; re-export the series")
        slices.append(arr.astype(np.float32) * slope + intercept)
    return Volume(array=np.stack(slices), spacing_mm=stack.spacing_mm, origin_mm=stack.origin_mm,
                  direction=stack.direction)
