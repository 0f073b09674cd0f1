"""Synthetic neuro sessions: a T1 MR series from nilearn's MNI152 template and a PET series, with ground truth.

The brain region is defined by construction (template tissue, holes filled), then wrapped in a CSF gap,
a dark skull and a bright scalp so brain extraction has real work to do.  The head is moved by a known
rigid transform and multiplied by a known smooth bias field; the PET has known regional uptake
(grey matter, white matter) in Bq/ml.  The template ships inside the nilearn wheel: nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imaging_tasks.synth.phi import dicom_dataset, fake_study, new_uid, phi_values, write_dicom

SPECIALTY = "neuroimaging"
MR_SOP = "1.2.840.10008.5.1.4.1.1.4"
PET_SOP = "1.2.840.10008.5.1.4.1.1.128"
VOXEL_MM = 2.0
# shell radii in voxels (2 mm): CSF gap, skull, scalp
CSF_VOX, SKULL_VOX, SCALP_VOX = 1, 3, 2
INTENSITY = {"csf": 0.12, "skull": 0.03, "scalp": 0.85}
PET_UPTAKE_BQML = {"grey_matter": 9000.0, "white_matter": 3500.0, "csf_and_outside": 300.0}


def _template():
    from nilearn import datasets
    from scipy import ndimage

    t1 = datasets.load_mni152_template(resolution=2)
    gm = datasets.load_mni152_gm_mask(resolution=2).get_fdata() > 0
    data = t1.get_fdata().astype(np.float32)
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(data > 0.3, iterations=2))
    brain = ndimage.binary_opening(brain, iterations=1)
    labels, _n = ndimage.label(brain)
    brain = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return data, brain, gm & brain


def _head(data: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Template tissue inside the brain region, then CSF gap, skull and scalp shells around it."""
    from scipy import ndimage

    pad = CSF_VOX + SKULL_VOX + SCALP_VOX + 3
    data, brain = np.pad(data, pad), np.pad(brain, pad)
    csf = ndimage.binary_dilation(brain, iterations=CSF_VOX)
    skull = ndimage.binary_dilation(csf, iterations=SKULL_VOX)
    scalp = ndimage.binary_dilation(skull, iterations=SCALP_VOX)
    head = np.zeros_like(data)
    head[scalp] = INTENSITY["scalp"]
    head[skull] = INTENSITY["skull"]
    head[csf] = INTENSITY["csf"]
    head[brain] = np.maximum(data[brain], INTENSITY["csf"])
    return head, brain, pad


def _rigid(rng: np.random.Generator) -> dict:
    return {"rotation_deg": rng.uniform(-6, 6, 3).round(3).tolist(), "translation_mm": rng.uniform(-6, 6, 3).round(3).tolist()}


def _resample(volume_zyx: np.ndarray, params: dict, *, nearest: bool) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(volume_zyx.astype(np.float32))
    img.SetSpacing((VOXEL_MM,) * 3)
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    tx = sitk.Euler3DTransform(centre, *np.deg2rad(params["rotation_deg"]), params["translation_mm"])
    out = sitk.Resample(img, img, tx, sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out)


def bias_field(shape_zyx: tuple[int, int, int], coeffs: list[float]) -> np.ndarray:
    """exp(a·x + b·y + c·z + d·x² + e·z²) on coordinates normalised to [-1, 1]: smooth, up to ~±35 %."""
    z, y, x = (np.linspace(-1, 1, n) for n in shape_zyx)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    a, b, c, d, e = coeffs
    return np.exp(a * xx + b * yy + c * zz + d * xx ** 2 + e * zz ** 2).astype(np.float32)


def _write_series(study, volume_zyx: np.ndarray, folder: Path, *, modality: str, sop: str, spacing_mm: float,
                  series_number: int, description: str, rng, slope: float, extra=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = new_uid(rng)
    nz, ny, nx = volume_zyx.shape
    origin = np.array([-(nx - 1) / 2, -(ny - 1) / 2, -(nz - 1) / 2]) * spacing_mm
    stored = np.clip(np.round(volume_zyx / slope), 0, 32767).astype(np.int16)
    for k in range(nz):
        ds = dicom_dataset(study, modality=modality, sop_class_uid=sop, series_uid=series_uid, sop_uid=new_uid(rng),
                           series_number=series_number, instance_number=k + 1, series_description=description)
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [spacing_mm, spacing_mm]
        ds.SliceThickness = spacing_mm
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2] + k * spacing_mm)]
        ds.SliceLocation = float(origin[2] + k * spacing_mm)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.6g}", "0"
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = stored[k].tobytes()
        write_dicom(ds, str(folder / f"{k + 1:04d}.dcm"))


def synthesize(out: Path, studies: int, seed: int, *, with_pet: bool = True, **_ignored) -> list[Path]:
    from scipy import ndimage

    out = Path(out)
    data, brain0, gm0 = _template()
    head0, brain0, pad = _head(data, brain0)
    gm0 = np.pad(gm0, pad)
    truths = []
    for n in range(studies):
        rng = np.random.default_rng([seed, n])
        label = f"study-{n:03d}"
        study = fake_study(rng, label)
        motion = _rigid(rng)
        # nilearn arrays are (x, y, z); DICOM slices want (z, y, x)
        head = _resample(np.transpose(head0, (2, 1, 0)), motion, nearest=False)
        brain = _resample(np.transpose(brain0, (2, 1, 0)).astype(np.float32), motion, nearest=True) > 0.5
        gm = _resample(np.transpose(gm0, (2, 1, 0)).astype(np.float32), motion, nearest=True) > 0.5
        coeffs = (rng.uniform(-0.25, 0.25, 3).tolist() + rng.uniform(-0.15, 0.15, 2).tolist())
        t1 = head * bias_field(head.shape, coeffs) * 1000.0
        t1 += np.abs(rng.normal(0, 8.0, t1.shape))  # magnitude noise floor
        folder = out / SPECIALTY / label
        _write_series(study, t1.astype(np.float32), folder / "t1", modality="MR", sop=MR_SOP, spacing_mm=VOXEL_MM,
                      series_number=2, description="T1 MPRAGE SAG", rng=rng, slope=1.0,
                      extra={"MagneticFieldStrength": 3.0, "RepetitionTime": 2300, "EchoTime": 2.98,
                             "ScanningSequence": "GR", "SequenceVariant": "SP", "MRAcquisitionType": "3D"})
        truth = {"brain_volume_ml": float(brain.sum()) * VOXEL_MM ** 3 / 1000.0, "motion": motion,
                 "bias_coeffs": coeffs, "voxel_mm": VOXEL_MM, "shape_zyx": list(head.shape),
                 "pet": None}
        if with_pet:
            wm = brain & ~gm
            pet = np.full(head.shape, PET_UPTAKE_BQML["csf_and_outside"], np.float32)
            pet[wm] = PET_UPTAKE_BQML["white_matter"]
            pet[gm] = PET_UPTAKE_BQML["grey_matter"]
            pet = ndimage.gaussian_filter(pet, sigma=1.5)[::2, ::2, ::2]  # ~6 mm FWHM, 4 mm voxels
            _write_series(study, pet, folder / "pet", modality="PT", sop=PET_SOP, spacing_mm=2 * VOXEL_MM,
                          series_number=3, description="PET BRAIN FDG", rng=rng, slope=1.0,
                          extra={"Units": "BQML", "CorrectedImage": ["ATTN", "DECY"], "DecayCorrection": "START"})
            truth["pet"] = {"uptake_bqml": PET_UPTAKE_BQML, "reference_region": "white_matter",
                            "suvr_grey_to_white": PET_UPTAKE_BQML["grey_matter"] / PET_UPTAKE_BQML["white_matter"]}
        record = {"specialty": SPECIALTY, "label": label, "study_uid": study.study_uid, "phi": phi_values(study),
                  "truth": truth}
        tpath = out / "_truth" / SPECIALTY / f"{label}.json"
        tpath.parent.mkdir(parents=True, exist_ok=True)
        tpath.write_text(json.dumps(record, indent=2, sort_keys=True))
        truths.append(tpath)
    return truths
