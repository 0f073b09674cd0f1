"""Reading DICOM: headers only for indexing, whole series into a volume for processing.

Every failure to read becomes a :class:`BadInput` with a stable reason code, so the caller can
quarantine the file and go on.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from imaging_tasks.errors import BadInput

# Header fields the index needs; reading stops before pixel data.
INDEX_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
              "PatientID", "StudyDate", "SeriesNumber", "InstanceNumber", "BurnedInAnnotation"]


# First groups of a data set stored without preamble and 'DICM' (old archives, some PACS exports):
# the file meta group, or the identifying group 0008 that every composite object starts with.
_BARE_FIRST_GROUPS = (0x0002, 0x0008)


def _bare_dataset_offset(head: bytes) -> int | None:
    """Where a data set without preamble starts (0, or 4 after a lone 'DICM'); None if it is not one."""
    offset = 4 if head[:4] == b"DICM" else 0
    if len(head) < offset + 4:
        return None
    group, element = struct.unpack_from("<HH", head, offset)
    return offset if group in _BARE_FIRST_GROUPS and element < 0x0100 else None


def parse(data: bytes | BinaryIO, *, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """``dcmread`` that also accepts a bare data set (no preamble/'DICM'), refuses what is not DICOM or is
    cut short, and checks the transfer syntax; every failure is a BadInput with a stable reason."""
    if isinstance(data, (bytes, bytearray)):
        if not data:
            raise BadInput("empty_file", "the file is empty (0 bytes); re-export it from the source system")
        data = io.BytesIO(data)
    start = data.tell()
    try:
        try:
            ds = pydicom.dcmread(data, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            data.seek(start)
            offset = _bare_dataset_offset(data.read(12))
            if offset is None:
                raise
            data.seek(start + offset)  # pydicom rewinds to 0 when it finds no preamble: give it a fresh stream
            ds = pydicom.dcmread(io.BytesIO(data.read()), stop_before_pixels=stop_before_pixels, force=True)
    except InvalidDicomError:
        raise BadInput("not_dicom", "no DICOM preamble/header found; only DICOM files belong in this prefix") from None
    except Exception as exc:  # pydicom raises many types on truncated or garbled input
        raise BadInput("unreadable_dicom", f"DICOM header could not be parsed ({type(exc).__name__}); "
                       "the file is likely truncated or corrupt, re-send it") from None
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts and not UID(str(ts)).is_transfer_syntax:
        raise BadInput("unreadable_dicom", "the file meta Transfer Syntax UID is not a transfer syntax; the file "
                       "is corrupt, re-export it")
    check_complete(ds)
    return ds


def check_complete(ds: pydicom.Dataset) -> None:
    """Refuse a data set whose last element (at any sequence depth) is shorter than its declared length.

    pydicom stops quietly at the end of a cut file and returns the element with a short or empty value;
    without this a truncated file would be passed on as if complete.
    """
    tags = list(ds.keys())
    if not tags:
        return
    elem = ds.get_item(tags[-1])
    if isinstance(elem, RawDataElement):
        if elem.value is not None and elem.length != 0xFFFFFFFF and len(elem.value) < elem.length:
            pixels = int(tags[-1]) == 0x7FE00010
            raise BadInput("truncated_pixels" if pixels else "truncated_file",
                           f"the file ends inside {'Pixel Data' if pixels else f'element {tags[-1]}'} "
                           f"({len(elem.value)} of {elem.length} bytes); it was cut short, re-send it")
    elif elem.VR == "SQ" and elem.value:
        check_complete(elem.value[-1])


def read_header(data: bytes | BinaryIO) -> pydicom.Dataset:
    """Parse a file's header without pixels; raise BadInput for anything that is not readable DICOM.

    Accepts bytes or an open binary file; with a file, only the header bytes are read.
    """
    ds = parse(data, stop_before_pixels=True)
    check_required(ds)
    return ds


REQUIRED_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality")


def check_required(ds: pydicom.Dataset) -> None:
    """Raise BadInput("missing_attribute") unless the attributes every consumer needs have values."""
    for tag in REQUIRED_TAGS:
        if not str(ds.get(tag, "") or ""):
            raise BadInput("missing_attribute", f"required attribute {tag} is missing or empty")


def read_full(data: bytes) -> pydicom.Dataset:
    """Parse a whole file including pixel data, checking the pixels decode to the declared size."""
    ds = parse(data)
    check_required(ds)
    if "PixelData" in ds:
        try:
            ds.pixel_array  # noqa: B018 - decode now so truncation is caught here, not mid-algorithm
        except Exception as exc:
            raise BadInput("truncated_pixels", f"pixel data cannot be decoded ({type(exc).__name__}: "
                           "size does not match Rows x Columns x frames); the file is truncated, re-send it") from None
    return ds


@dataclass
class Volume:
    """A 3-D image in (z, y, x) order with physical geometry, values rescaled (HU for CT)."""

    array: np.ndarray
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    origin_mm: tuple[float, float, float]  # (x, y, z) patient coordinates of the first voxel
    direction: tuple[float, ...]  # 3x3 row-major, columns are the x, y, z axes in patient space

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm))


def load_series(paths: list[Path] | list[str]) -> Volume:
    """Stack a single-frame series into a volume, ordered along the slice normal."""
    datasets = [pydicom.dcmread(str(p)) for p in paths]
    if not datasets:
        raise BadInput("empty_series", "a series with no readable instances")
    first = datasets[0]
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    datasets.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    if len(datasets) > 1:
        gaps = np.diff(positions @ normal)
        dz = float(np.median(gaps))
        if np.any(np.abs(gaps - dz) > 0.01 * abs(dz) + 1e-3):
            raise BadInput("irregular_slices", "slice positions are not evenly spaced (missing instances?)")
    else:
        dz = float(getattr(first, "SliceThickness", 1.0) or 1.0)
    slices = []
    for d in datasets:
        slope = float(getattr(d, "RescaleSlope", 1) or 1)
        intercept = float(getattr(d, "RescaleIntercept", 0) or 0)
        slices.append(d.pixel_array.astype(np.float32) * slope + intercept)
    array = np.stack(slices)
    dy, dx = (float(v) for v in first.PixelSpacing)
    direction = tuple(np.column_stack([row, col, normal]).ravel().tolist())
    return Volume(array=array, spacing_mm=(abs(dz), dy, dx), origin_mm=tuple(positions[0].tolist()),
                  direction=direction)
