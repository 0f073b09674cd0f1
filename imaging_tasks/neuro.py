"""T1 MRI preprocessing: N4 bias-field correction and brain extraction, giving brain volume.

N4 (SimpleITK) runs on the CPU; the intensity statistics that show it worked run on torch.  Brain
extraction is the classic threshold → erode → largest component → dilate → fill route: robust on
T1 with a visible CSF/skull gap; it is not a substitute for a learned skull-stripper on atrophic or
post-surgical brains (documented limit).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from imaging_tasks.errors import BadInput


def _group_series(files: list[Path]) -> tuple[dict[str, list[Path]], dict[str, str]]:
    import pydicom

    series: dict[str, list[Path]] = defaultdict(list)
    modality: dict[str, str] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:
            raise BadInput("unreadable_dicom", "a file of the session is not readable DICOM") from None
        uid = str(ds.SeriesInstanceUID)
        series[uid].append(f)
        modality[uid] = str(ds.Modality)
    return dict(series), modality


def to_sitk(volume):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(volume.array.astype(np.float32))
    dz, dy, dx = volume.spacing_mm
    img.SetSpacing((dx, dy, dz))
    img.SetOrigin(volume.origin_mm)
    img.SetDirection(volume.direction)
    return img


def n4_correct(image, mask=None, *, shrink: int = 2, iterations=(50, 50, 30)):
    """N4 on a shrunk copy for speed; the bias field is then evaluated at full resolution."""
    import SimpleITK as sitk

    image = sitk.Cast(image, sitk.sitkFloat32)
    if mask is None:
        mask = sitk.OtsuThreshold(image, 0, 1, 200)
    small = sitk.Shrink(image, [shrink] * image.GetDimension())
    small_mask = sitk.Shrink(mask, [shrink] * image.GetDimension())
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    n4.Execute(small, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(image)
    corrected = image / sitk.Exp(log_bias)
    return corrected, log_bias


def brain_mask(image, *, erode_mm: float = 4.0):
    """Threshold (Otsu on the head) → erode to cut brain from scalp → largest component → dilate → fill holes."""
    import SimpleITK as sitk

    head = sitk.OtsuThreshold(image, 0, 1, 200)
    stats = sitk.LabelStatisticsImageFilter()
    stats.Execute(image, head)
    tissue = sitk.BinaryThreshold(image, lowerThreshold=0.45 * stats.GetMean(1), upperThreshold=1e12)
    radius = [max(1, int(round(erode_mm / s))) for s in image.GetSpacing()]
    core = sitk.BinaryErode(tissue, radius)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(core), sortByObjectSize=True)
    largest = components == 1
    mask = sitk.BinaryDilate(largest, radius)
    mask = sitk.And(mask, tissue)
    mask = sitk.BinaryMorphologicalClosing(mask, [2] * 3)
    return sitk.BinaryFillhole(mask)


def intensity_cv(image_zyx: np.ndarray, mask_zyx: np.ndarray, device) -> float:
    """Coefficient of variation of the bright (white-matter) class inside the brain: bias inflates it."""
    import torch

    x = torch.as_tensor(image_zyx, device=device)[torch.as_tensor(mask_zyx, device=device)]
    if x.numel() == 0:
        return float("nan")
    hi = x[x > torch.quantile(x[:: max(1, x.numel() // 100000)], 0.6)]
    return float(hi.std() / hi.mean())


def _qc_png(image_zyx: np.ndarray, mask_zyx: np.ndarray, path: Path) -> None:
    from PIL import Image
    from scipy import ndimage

    nz, ny, nx = image_zyx.shape
    views = [image_zyx[nz // 2], image_zyx[:, ny // 2, :][::-1], image_zyx[:, :, nx // 2][::-1]]
    masks = [mask_zyx[nz // 2], mask_zyx[:, ny // 2, :][::-1], mask_zyx[:, :, nx // 2][::-1]]
    hi = np.percentile(image_zyx, 99.5) or 1.0
    tiles = []
    for v, m in zip(views, masks):
        grey = np.clip(v / hi * 255, 0, 255).astype(np.uint8)
        rgb = np.stack([grey] * 3, axis=-1)
        rgb[m & ~ndimage.binary_erosion(m)] = (255, 60, 60)
        tiles.append(np.pad(rgb, ((0, max(0, 140 - rgb.shape[0])), (0, 4), (0, 0))))
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
    Image.fromarray(np.concatenate(tiles, axis=1)).resize((3 * 2 * 140, 2 * height)).save(path)


def process_study(files: list[Path], out_dir: Path, *, device=None, **_options) -> dict:
    import SimpleITK as sitk

    from imaging_tasks.device import pick_device
    from imaging_tasks.dicom_io import load_series

    dev = pick_device(str(device) if device is not None else None)
    series, modality = _group_series(files)
    mr = [uid for uid in series if modality[uid] == "MR"]
    if not mr:
        raise BadInput("no_mri", "the session has no MR series (PET alone cannot be processed); send the T1")
    t1_uid = max(mr, key=lambda uid: len(series[uid]))
    volume = load_series(series[t1_uid])
    image = to_sitk(volume)
    corrected, log_bias = n4_correct(image)
    mask = brain_mask(corrected)
    raw = sitk.GetArrayFromImage(image)
    cor = sitk.GetArrayFromImage(corrected)
    m = sitk.GetArrayFromImage(mask).astype(bool)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    out_dir = Path(out_dir)
    sitk.WriteImage(corrected, str(out_dir / "t1_n4.nii.gz"))
    sitk.WriteImage(sitk.Cast(mask, sitk.sitkUInt8), str(out_dir / "brain_mask.nii.gz"))
    _qc_png(cor, m, out_dir / "qc_brain.png")
    metrics = [
        {"name": "brain_volume_ml", "value": float(m.sum()) * voxel_ml, "unit": "ml"},
        {"name": "bias_cv_before", "value": intensity_cv(raw, m, dev), "unit": ""},
        {"name": "bias_cv_after", "value": intensity_cv(cor, m, dev), "unit": ""},
        {"name": "n_mr_series", "value": float(len(mr)), "unit": ""},
        {"name": "n_pet_series", "value": float(sum(1 for uid in series if modality[uid] == "PT")), "unit": ""},
    ]
    (out_dir / "volumes.json").write_text(json.dumps({m_["name"]: m_["value"] for m_ in metrics}, indent=2))
    return {"metrics": metrics, "findings": [],
            "outputs": ["t1_n4.nii.gz", "brain_mask.nii.gz", "qc_brain.png", "volumes.json"], "device": str(dev)}
