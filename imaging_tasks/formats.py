"""File-format facts shared by the index, de-identification and the PHI audit.

Kept apart so that all three can import them without importing each other: this module imports nothing of
the project.  A file is told by its name only (a landing tree holds DICOM files under any name, often none).

Whole-slide formats are told apart by content, not here: :mod:`imaging_tasks.slide_files` sniffs the
first bytes (Aperio, generic TIFF, OME-TIFF, NDPI, DICOM whole-slide) and knows which files make one slide (a
MIRAX ``X.mrxs`` with its folder ``X/``, a DICOM-WSI series).  ``.dcm`` stays ``"dicom"`` here for every
specialty; only a slide specialty's index reads a DICOM file as part of a whole-slide series.
"""
from __future__ import annotations

# Whole-slide image containers: Aperio SVS and generic tiled TIFF, Hamamatsu NDPI, Leica SCN, MIRAX, Ventana BIF.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".bif")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def file_kind(name: str) -> str:
    """``"slide"``, ``"nifti"`` or ``"dicom"`` (anything else) for a file name, path or URI; case-insensitive."""
    lower = str(name).lower()
    if lower.endswith(SLIDE_SUFFIXES):
        return "slide"
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    return "dicom"


__all__ = ["SLIDE_SUFFIXES", "NIFTI_SUFFIXES", "file_kind"]
