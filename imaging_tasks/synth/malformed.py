"""Malformed-but-readable variants of the synthetic studies, with the reason a processor must give for each.

Every edit keeps the files valid, parseable DICOM (or an OpenSlide-readable slide): what breaks is a
processor's precondition (missing or zero spacing, too few slices, duplicate positions, a colour image...),
or nothing at all for the variants a processor must cope with (shuffled order, MONOCHROME1, a missing
RescaleSlope).  Use on a copy of a study written by :mod:`imaging_tasks.cardiovascular.synth`,
:mod:`~imaging_tasks.neuroimaging.synth`, :mod:`~imaging_tasks.mammography.synth` or
:mod:`~imaging_tasks.pathology.synth`:

    files = malformed.copy_study(out / "cardiovascular" / "study-000", tmp / "case")
    reason = malformed.apply("cardiovascular", "zero_pixel_spacing", files)   # -> "invalid_pixel_spacing"

:data:`CASES` lists, per specialty, each case's expected reason (``None``: must still process, with the same
result as the unedited study).  The edits only touch the image series (CT: the axial series, not the scout;
neuro: the T1 series, not the PET).
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import importlib

import pydicom

CT_LOCALIZER = "LOCALIZER"


# --------------------------------------------------------------------------- helpers
def copy_study(src: Path, dst: Path) -> list[Path]:
    """A copy of a study folder (files only, sub-folders kept); returns the copied files, sorted."""
    shutil.copytree(src, dst)
    return sorted(p for p in Path(dst).rglob("*") if p.is_file())


def _read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid DS values are the point of some cases
        return pydicom.dcmread(str(path))


def _save(ds: pydicom.Dataset, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(str(path), enforce_file_format=True)


def edit(paths: list[Path], change: Callable[[pydicom.Dataset], None]) -> None:
    for p in paths:
        ds = _read(p)
        change(ds)
        _save(ds, p)


def image_series(files: list[Path], modality: str) -> list[Path]:
    """The study's image stack to edit: the largest series of ``modality`` that is not a localizer, sorted
    along the slice normal (ascending).  (For MG, where each view is its own series, see ``_mg``.)"""
    groups: dict[str, list[tuple[float, Path]]] = {}
    for p in files:
        if p.suffix.lower() != ".dcm":
            continue
        ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        if str(ds.get("Modality", "")) != modality or CT_LOCALIZER in [str(v).upper() for v in ds.get("ImageType", [])]:
            continue
        key = 0.0
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            key = float(np.dot(np.cross(iop[:3], iop[3:]), [float(v) for v in ds.ImagePositionPatient]))
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((key, p))
    if not groups:
        raise ValueError(f"no {modality} image series among the files")
    members = max(groups.values(), key=len)
    return [p for _k, p in sorted(members)]


def remove(keywords: tuple[str, ...]) -> Callable[[pydicom.Dataset], None]:
    def change(ds):
        for k in keywords:
            if k in ds:
                delattr(ds, k)
    return change


def put(keyword: str, value) -> Callable[[pydicom.Dataset], None]:
    def change(ds):
        setattr(ds, keyword, value)
    return change


# --------------------------------------------------------------------------- slice stacks
def keep_slices(series: list[Path], n: int) -> list[Path]:
    """Delete all but ``n`` consecutive slices from the middle of the stack; returns the deleted files."""
    start = max(0, (len(series) - n) // 2)
    gone = series[:start] + series[start + n:]
    for p in gone:
        p.unlink()
    return gone


def drop_middle_slice(series: list[Path]) -> None:
    series[len(series) // 2].unlink()


def duplicate_position(series: list[Path]) -> None:
    """Move one slice onto its neighbour's position (two instances at one place, as with two phases)."""
    k = len(series) // 2
    target = _read(series[k + 1]).ImagePositionPatient
    edit([series[k]], put("ImagePositionPatient", list(target)))


def duplicate_instance(series: list[Path]) -> Path:
    """The same instance sent twice (same SOPInstanceUID, another file name); returns the copy."""
    src = series[len(series) // 2]
    dst = src.with_name(src.stem + "-resent" + src.suffix)
    shutil.copyfile(src, dst)
    return dst


def shuffle_instance_numbers(series: list[Path], seed: int = 0) -> None:
    """InstanceNumber permuted (file order is the caller's to shuffle): slice order must come from positions."""
    numbers = [int(_read(p).InstanceNumber) for p in series]
    perm = np.random.default_rng(seed).permutation(numbers)
    for p, n in zip(series, perm):
        edit([p], put("InstanceNumber", int(n)))


def tilt_one_slice(series: list[Path], degrees: float = 5.0) -> None:
    """One slice rotated about the patient x axis: two orientations in one series."""
    t = np.deg2rad(degrees)
    iop = ["1", "0", "0", "0", f"{np.cos(t):.6f}", f"{np.sin(t):.6f}"]
    edit([series[len(series) // 2]], put("ImageOrientationPatient", iop))


def crop_one_slice(series: list[Path], rows: int = 16) -> None:
    """One slice with ``rows`` fewer rows (a consistent, readable file of another matrix size)."""
    def change(ds):
        arr = ds.pixel_array[: ds.Rows - rows]
        ds.Rows = arr.shape[0]
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
    edit([series[len(series) // 2]], change)


def other_spacing_on_one_slice(series: list[Path]) -> None:
    def change(ds):
        ds.PixelSpacing = [f"{float(v) * 1.25:.6g}" for v in ds.PixelSpacing]
    edit([series[len(series) // 2]], change)


def make_coronal(series: list[Path], step_mm: float = 3.0) -> None:
    """Relabel the stack as a coronal one (orientation and positions consistent with it)."""
    x0 = float(_read(series[0]).ImagePositionPatient[0])
    for k, p in enumerate(series):
        ds = _read(p)
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.ImagePositionPatient = [f"{x0:g}", f"{-100 + step_mm * k:g}", "50"]
        _save(ds, p)


def missing_position_on_one_slice(series: list[Path]) -> None:
    edit([series[len(series) // 2]], remove(("ImagePositionPatient",)))


# --------------------------------------------------------------------------- pixel representation
def to_rgb(paths: list[Path]) -> None:
    """A colour (RGB, 8-bit) rendering of each grey image: a screenshot-like secondary capture."""
    def change(ds):
        arr = ds.pixel_array.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        grey = np.round((arr - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        for k in ("RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth"):
            if k in ds:
                delattr(ds, k)
        ds.PixelData = rgb.tobytes()
    edit(paths, change)


def to_monochrome1(paths: list[Path]) -> None:
    """The same image stored MONOCHROME1: stored values mirrored over their range (low + high - v), so its
    MONOCHROME1 rendering is the MONOCHROME2 rendering of the original; Presentation LUT Shape INVERSE."""
    def change(ds):
        bits = int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        arr = ds.pixel_array.astype(np.int64)
        out = (lo + hi - arr).astype(ds.pixel_array.dtype)
        ds.PixelData = out.tobytes()
        ds.PhotometricInterpretation = "MONOCHROME1"
        if "PresentationLUTShape" in ds:
            ds.PresentationLUTShape = "INVERSE"
        if "WindowCenter" in ds:
            ds.WindowCenter = f"{lo + hi - float(ds.WindowCenter):g}"
    edit(paths, change)


def relabel_monochrome1(paths: list[Path]) -> None:
    """MONOCHROME1 with the stored values untouched: for CT and MR the values keep their meaning (HU, signal);
    only the display inverts, so results must not change."""
    edit(paths, put("PhotometricInterpretation", "MONOCHROME1"))


def blank_pixels(paths: list[Path]) -> None:
    """Every pixel 0 (a failed reconstruction or export), header untouched."""
    def change(ds):
        ds.PixelData = np.zeros_like(ds.pixel_array).tobytes()
    edit(paths, change)


def crop_image(paths: list[Path], rows: int, cols: int) -> None:
    def change(ds):
        arr = np.ascontiguousarray(ds.pixel_array[:rows, :cols])
        ds.Rows, ds.Columns = arr.shape
        ds.PixelData = arr.tobytes()
    edit(paths, change)


# --------------------------------------------------------------------------- slides
def set_slide_mpp(slide: Path, text: str) -> None:
    """Rewrite the Aperio ``MPP = ...`` field in place (same byte length, so the TIFF stays valid)."""
    data = slide.read_bytes()
    start = data.index(b"MPP = ")
    end = start + len(b"MPP = ")
    while data[end:end + 1] not in (b"|", b"\r", b"\n", b"\0"):
        end += 1
    field = data[start:end]
    new = f"MPP = {text}".encode()
    if len(new) > len(field):
        raise ValueError(f"{text!r} is longer than the MPP field it replaces")
    slide.write_bytes(data.replace(field, new.ljust(len(field))))


# --------------------------------------------------------------------------- series pickers for the catalogues
def ct_series(files):
    return image_series(files, "CT")


def mr_series(files):
    return image_series(files, "MR")


def mg_images(files):
    """Every MG image (one series per view), in file order."""
    return [p for p in files if p.suffix.lower() == ".dcm"
            and str(pydicom.dcmread(str(p), stop_before_pixels=True).get("Modality", "")) == "MG"]


def slide_file(files):
    return [p for p in files if p.suffix.lower() == ".svs"][0]


def cases(specialty: str) -> dict[str, tuple[Callable[[list[Path]], object], str | None]]:
    """The specialty's catalogue: ``MALFORMED`` in its synthesizer's module, {case: (edit, expected reason or
    None for "must still process")}."""
    from imaging_tasks.specialties import get as get_specialty

    module = get_specialty(specialty).synthesizer.partition(":")[0]
    return importlib.import_module(module).MALFORMED


def apply(specialty: str, case: str, files: list[Path]) -> str | None:
    """Apply ``case`` to a study's files in place; returns the reason processing must give (None: none)."""
    change, reason = cases(specialty)[case]
    change(files)
    return reason
