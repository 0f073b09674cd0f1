"""Inputs every pipeline must quarantine, not crash on: empty, not DICOM, truncated, wrong modality, bad slide."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from imaging_tasks.specialties import get as get_specialty
from imaging_tasks.synth.phi import dicom_dataset, fake_study, new_uid

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
               "MG": "1.2.840.10008.5.1.4.1.1.1.2", "PT": "1.2.840.10008.5.1.4.1.1.128",
               "OT": "1.2.840.10008.5.1.4.1.1.7"}



def _small_image(modality: str, rng: np.random.Generator) -> bytes:
    study = fake_study(rng, "bad")
    sop_class = SOP_CLASSES[modality]
    ds = dicom_dataset(study, modality=modality, sop_class_uid=sop_class, series_uid=new_uid(rng),
                       sop_uid=new_uid(rng), series_number=1, instance_number=1, series_description="bad input")
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelData = rng.integers(0, 4000, size=(32, 32), dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_bad_inputs(out: Path, specialty: str, seed: int = 0) -> dict[str, str]:
    """Write one file per failure mode under ``out/<specialty>/bad-inputs/``; returns {file name: expected reason}."""
    rng = np.random.default_rng(seed + 7919)
    folder = Path(out) / specialty / "bad-inputs"
    folder.mkdir(parents=True, exist_ok=True)
    record = get_specialty(specialty)
    # drawn first whatever the specialty, so every specialty's bad inputs stay the same for a seed
    good = _small_image(sorted(record.modalities & set(SOP_CLASSES))[0] if record.modalities else "CT", rng)
    if record.file_kind == "slide":
        files = {"empty.svs": (b"", "empty_file"),
                 "truncated.svs": (b"II*\x00" + bytes(rng.integers(0, 256, 4000, dtype=np.uint8)), "unreadable_slide"),
                 "notes.txt": (b"slide list for the tumour board\n", "not_a_slide")}
    else:
        files = {"empty.dcm": (b"", "empty_file"),
                 "report.dcm": (b"%PDF-1.4 not an image\n" * 20, "not_dicom"),
                 "truncated.dcm": (good[: len(good) - 1000], "truncated_pixels"),
                 "wrong-modality.dcm": (_small_image(record.bad_modality, rng), "wrong_modality")}
    for name, (data, _reason) in files.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_data, reason) in files.items()}
