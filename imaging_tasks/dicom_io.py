"""Reading DICOM: headers only for indexing, whole series into a volume for processing.

Every failure to read becomes a :class:`BadInput` with a stable reason code, so the caller can
quarantine the file and go on.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from imaging_tasks.errors import BadInput

# Header fields the index needs; reading stops before pixel data.
INDEX_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
              "PatientID", "StudyDate", "SeriesNumber", "InstanceNumber", "BurnedInAnnotation"]


def read_header(data: bytes | BinaryIO) -> pydicom.Dataset:
    """Parse a file's header without pixels; raise BadInput for anything that is not readable DICOM.

    Accepts bytes or an open binary file; with a file, only the header bytes are read.
    """
    if isinstance(data, bytes):
        if not data:
            raise BadInput("empty_file", "the file is empty (0 bytes); re-export it from the source system")
        data = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(data, stop_before_pixels=True)
    except InvalidDicomError:
        raise BadInput("not_dicom", "no DICOM preamble/header found; only DICOM files belong in this prefix") from None
    except Exception as exc:  # pydicom raises many types on truncated or garbled input
        raise BadInput("unreadable_dicom", f"DICOM header could not be parsed ({type(exc).__name__}); "
                       "the file is likely truncated or corrupt, re-send it") from None
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality"):
        if not str(ds.get(tag, "") or ""):
            raise BadInput("missing_attribute", f"required attribute {tag} is missing or empty")
    return ds


def read_full(data: bytes) -> pydicom.Dataset:
    """Parse a whole file including pixel data, checking the pixels decode to the declared size."""
    read_header(data)  # same checks and reasons as the index
    ds = pydicom.dcmread(io.BytesIO(data))
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
