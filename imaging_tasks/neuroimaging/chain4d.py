"""The 4-D steps of the session chain: a BOLD run's first-level GLM, the DWI's tensor fit and tractography.

    ... -> suvr -> fmri_glm -> dti -> tractography -> roi_features

Same signature as every chain step (:mod:`.chain`).  A session without BOLD (or DWI) runs these steps too: they
write nothing and say so in their metrics.  Inputs come from the session's files (``session.load_4d``: NIfTI +
sidecars, or DICOM series converted by dcm2niix), not from an earlier step's folder, so a 4-D series is not
copied from step to step.  The maps stay in the series' own grid (no resampling of the data); what crosses
spaces are the T1's masks and the atlas, carried into the series' grid through a rigid mutual-information
registration of the series' mean (BOLD) or b=0 image (DWI) to the T1 (``pet.register_pet_to_t1``, the same
registration the PET gets).  The maths lives in :mod:`.glm`, :mod:`.dti` and :mod:`.tractography`.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np

from imaging_tasks.neuroimaging.chain import (ATLAS_IN_T1, ATLAS_LABELS, BRAIN, DTI_ROIS, FMRI_ROIS, FRACTIONS, T1_N4,
                                              _m, _outputs, _read)

log = logging.getLogger(__name__)

BOLD_MEAN = "bold_mean.nii.gz"
BOLD_TO_T1 = "bold_to_t1.tfm"  # rigid, T1 point -> BOLD point
DESIGN = "design_matrix.tsv"
MOTION = "motion.tsv"
DWI_B0 = "dwi_b0.nii.gz"
DWI_TO_T1 = "dwi_to_t1.tfm"
DTI_MAPS = {"fa": "fa", "md": "md_mm2_per_s", "ad": "ad_mm2_per_s", "rd": "rd_mm2_per_s"}  # file: TensorFit
V1 = "v1.nii.gz"
BRAIN_IN_DWI = "brain_in_dwi.nii.gz"
STREAMLINES = "streamlines.trk"
LENGTHS = "streamline_lengths.json"
MAX_SEEDS = 200_000  # a 2 mm brain has ~60k white-matter voxels; beyond this seeds are thinned evenly


def _slug(name: str) -> str:
    """A contrast's name in file names and warehouse metrics: operators spelled out, so that ``a - b`` and
    ``a + b`` stay apart (``a_minus_b``, ``a_plus_b``)."""
    for op, word in (("-", " minus "), ("+", " plus "), ("*", " x "), ("/", " over ")):
        name = name.replace(op, word)
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).replace(".", "p").strip("_").lower() or "contrast"


def _save_xyz(arr: np.ndarray, affine: np.ndarray, path: Path) -> str:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path.name


def _load_xyz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=float)


def _register(mean_xyz: np.ndarray, affine: np.ndarray, previous: dict, out_dir: Path, tfm_name: str):
    """The series' reference image registered rigidly to the T1; returns (reference image, T1 -> series)."""
    import SimpleITK as sitk

    from imaging_tasks.neuroimaging.pet import register_pet_to_t1
    from imaging_tasks.neuroimaging.session import image_from_xyz

    reference = image_from_xyz(mean_xyz, affine)
    t1 = _read(Path(previous["n4_bias"]) / T1_N4)
    brain = _read(Path(previous["brain_extraction"]) / BRAIN)
    transform = register_pet_to_t1(reference, t1, brain)
    sitk.WriteTransform(transform, str(out_dir / tfm_name))
    return reference, transform


def _from_t1(image, reference, t1_to_series, *, labels: bool) -> np.ndarray:
    """A T1-space image on the series' grid, as an (x, y, z) array."""
    import SimpleITK as sitk

    out = sitk.Resample(image, reference, t1_to_series.GetInverse(),
                        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0,
                        sitk.sitkInt32 if labels else sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def _atlas_in(previous: dict, reference, t1_to_series) -> tuple[np.ndarray, dict]:
    atlas_dir = Path(previous["atlas_registration"])
    labels = _from_t1(_read(atlas_dir / ATLAS_IN_T1), reference, t1_to_series, labels=True)
    return labels, json.loads((atlas_dir / ATLAS_LABELS).read_text())


def _roi_means(labels_xyz: np.ndarray, doc: dict, maps: dict[str, np.ndarray], mask: np.ndarray) -> list[dict]:
    """Mean of each map over each atlas ROI's voxels inside ``mask`` (None where the ROI has none there)."""
    flat = labels_xyz[mask]
    out = []
    for entry in doc["labels"]:
        inside = flat == int(entry["index"])
        n = int(inside.sum())
        out.append({"index": int(entry["index"]), "name": entry["name"], "voxels": n,
                    **{k: (float(v[mask][inside].mean()) if n else None) for k, v in maps.items()}})
    return out


# --------------------------------------------------------------------------- fMRI
def fmri_glm(files: list[Path], out_dir: Path, *, device: str | None = None, previous: dict,
             fmri_contrasts: str | None = None, fmri_noise_model: str = "ar1", fmri_hrf_model: str = "spm",
             fmri_high_pass_hz: float = 0.01, fmri_motion_regressors: bool = True, **_options) -> dict:
    """First-level GLM of the session's BOLD run: beta (percent signal change), t and z maps per contrast,
    the design matrix (TSV and PNG), a glass brain of each contrast's z map (|z| >= 3.1), and ROI-mean betas
    on the chain's atlas."""
    from imaging_tasks.device import pick_device
    from imaging_tasks.errors import BadInput
    from imaging_tasks.neuroimaging import glm
    from imaging_tasks.neuroimaging.qc import design_matrix_png, glass_brain_png
    from imaging_tasks.neuroimaging.session import load_4d

    out_dir = Path(out_dir)
    bold, events = load_4d(files, "bold")
    if bold is None:
        return {"metrics": [_m("bold_volumes", 0, "count")], "findings": [], "outputs": []}
    dev = pick_device(device)
    started = time.perf_counter()
    data, affine, tr_s = bold.data, bold.affine, float(bold.tr_s)
    n_t = data.shape[3]
    mean = data.mean(axis=3)
    _save_xyz(mean, affine, out_dir / BOLD_MEAN)
    reference, t1_to_bold = _register(mean, affine, previous, out_dir, BOLD_TO_T1)
    registered = time.perf_counter()
    brain = _from_t1(_read(Path(previous["brain_extraction"]) / BRAIN), reference, t1_to_bold, labels=True) > 0
    motion = None
    if fmri_motion_regressors:
        motion = glm.realign_bold(data, affine)
        np.savetxt(out_dir / MOTION, motion, delimiter="\t", fmt="%.6f",
                   header="trans_x\ttrans_y\ttrans_z\trot_x\trot_y\trot_z", comments="")  # mm, radians
    realigned = time.perf_counter()
    frame_times = np.arange(n_t) * tr_s
    X, names = glm.design_matrix(frame_times, events, hrf_model=fmri_hrf_model, drift_model="cosine",
                                 high_pass_hz=fmri_high_pass_hz, motion=motion)
    conditions = sorted({e.trial_type for e in events})
    try:
        contrasts = glm.parse_contrasts(fmri_contrasts, names)
    except ValueError as exc:
        raise BadInput("fmri_contrast_unknown", f"{exc}; this session's events have these trial types, so fix "
                       "the run's fmri_contrasts (or leave it empty for each condition against baseline)") from None
    with open(out_dir / DESIGN, "w") as fh:
        fh.write("\t".join(names) + "\n")
        for row in X:
            fh.write("\t".join(f"{v:.8g}" for v in row) + "\n")
    design_matrix_png(X, names, out_dir / "design_matrix.png")
    fit = glm.fit_glm(data, X, mask=brain, noise_model=fmri_noise_model, device=dev)
    fitted = time.perf_counter()
    labels, doc = _atlas_in(previous, reference, t1_to_bold)
    roi_maps, metrics = {}, []
    spacing_zyx = np.linalg.norm(affine[:3, :3], axis=0)[::-1]
    for name, vector in contrasts.items():
        res = fit.contrast(vector)
        slug = _slug(name)
        for kind in ("effect", "t", "z"):
            full = np.zeros(brain.shape, np.float32)
            full[brain] = res[kind]
            _save_xyz(full, affine, out_dir / f"{'beta' if kind == 'effect' else kind}_{slug}.nii.gz")
            if kind == "effect":
                roi_maps[f"beta_{slug}"] = full
            if kind == "t":
                roi_maps[f"t_{slug}"] = full
            if kind == "z":
                z = full
        glass_brain_png(z.transpose(2, 1, 0), brain.transpose(2, 1, 0), spacing_zyx, out_dir / f"qc_z_{slug}.png")
        metrics += [_m(f"z_max_{slug}", float(res["z"].max()), "1"),
                    _m(f"voxels_z_above_3_1_{slug}", int((res["z"] > 3.1).sum()), "count")]
    rois = _roi_means(labels, doc, roi_maps, brain)
    (out_dir / FMRI_ROIS).write_text(json.dumps({"atlas": doc["atlas"], "contrasts": {
        _slug(k): {"expression": k, "vector": [float(v) for v in vec]} for k, vec in contrasts.items()},
        "design_columns": names, "rois": rois}, indent=2, allow_nan=False))
    worst = float(np.abs(motion[:, :3]).max()) if motion is not None else None
    log.info("fMRI GLM: %d volumes (TR %.2f s), %d voxels, %d regressors, %d contrasts, %s noise model on %s",
             n_t, tr_s, int(brain.sum()), X.shape[1], len(contrasts), fmri_noise_model, dev)
    return {"metrics": [_m("bold_volumes", n_t, "count"), _m("bold_tr_s", tr_s, "s"),
                        _m("bold_conditions", len(conditions), "count"), _m("glm_regressors", X.shape[1], "count"),
                        _m("glm_voxels", int(brain.sum()), "count"),
                        _m("bold_max_translation_mm", worst, "mm"),
                        _m("bold_to_t1_seconds", registered - started, "s"),
                        _m("bold_realign_seconds", realigned - registered, "s"),
                        _m("glm_fit_seconds", fitted - realigned, "s"), *metrics],
            "findings": [], "outputs": _outputs(out_dir), "device": str(dev)}


# --------------------------------------------------------------------------- DTI
def dti(files: list[Path], out_dir: Path, *, device: str | None = None, previous: dict, **_options) -> dict:
    """Tensor fit of the session's DWI (weighted least squares) inside the brain: FA, MD, AD, RD and the
    principal eigenvector maps, a colour-FA picture, and ROI means of FA and MD on the chain's atlas."""
    from imaging_tasks.device import pick_device
    from imaging_tasks.neuroimaging.dti import color_fa_png, fit_tensor
    from imaging_tasks.neuroimaging.session import load_4d

    out_dir = Path(out_dir)
    dwi, _ = load_4d(files, "dwi")
    if dwi is None:
        return {"metrics": [_m("dwi_volumes", 0, "count")], "findings": [], "outputs": []}
    dev = pick_device(device)
    started = time.perf_counter()
    b0 = dwi.data[..., dwi.bvals <= 50].mean(axis=3)
    _save_xyz(b0, dwi.affine, out_dir / DWI_B0)
    reference, t1_to_dwi = _register(b0, dwi.affine, previous, out_dir, DWI_TO_T1)
    registered = time.perf_counter()
    brain = _from_t1(_read(Path(previous["brain_extraction"]) / BRAIN), reference, t1_to_dwi, labels=True) > 0
    _save_xyz(brain.astype(np.float32), dwi.affine, out_dir / BRAIN_IN_DWI)
    fit = fit_tensor(dwi.data, dwi.bvals, dwi.bvecs, mask=brain, device=dev)
    fitted = time.perf_counter()
    maps = {k: np.where(brain, getattr(fit, attr), 0).astype(np.float32) for k, attr in DTI_MAPS.items()}
    for k, v in maps.items():
        _save_xyz(v, dwi.affine, out_dir / f"{k}.nii.gz")
    _save_xyz(np.where(brain[..., None], fit.v1, 0), dwi.affine, out_dir / V1)
    color_fa_png(maps["fa"], fit.v1, out_dir / "qc_color_fa.png")
    labels, doc = _atlas_in(previous, reference, t1_to_dwi)
    rois = _roi_means(labels, doc, {"fa_mean": maps["fa"], "md_mean": maps["md"]}, brain)
    (out_dir / DTI_ROIS).write_text(json.dumps({"atlas": doc["atlas"], "rois": rois}, indent=2, allow_nan=False))
    wm = _from_t1(_read(Path(previous["brain_extraction"]) / FRACTIONS["wm"]), reference, t1_to_dwi,
                  labels=False) > 0.5
    log.info("DTI: %d volumes (%d b=0), %d brain voxels fitted on %s", dwi.data.shape[3], int((dwi.bvals <= 50).sum()),
             int(brain.sum()), dev)
    return {"metrics": [_m("dwi_volumes", dwi.data.shape[3], "count"),
                        _m("dwi_b0_volumes", int((dwi.bvals <= 50).sum()), "count"),
                        _m("dwi_max_bval", float(dwi.bvals.max()), "s/mm2"),
                        _m("dti_voxels", int(brain.sum()), "count"),
                        _m("white_matter_mean_fa", float(maps["fa"][wm].mean()) if wm.any() else None, "1"),
                        _m("brain_mean_md", float(maps["md"][brain].mean()) if brain.any() else None, "mm2/s"),
                        _m("dwi_to_t1_seconds", registered - started, "s"),
                        _m("dti_fit_seconds", fitted - registered, "s")],
            "findings": [], "outputs": _outputs(out_dir), "device": str(dev)}


# --------------------------------------------------------------------------- tractography
def tractography(files: list[Path], out_dir: Path, *, device: str | None = None, previous: dict,
                 dti_fa_stop: float = 0.2, dti_max_angle_deg: float = 30.0, dti_step_mm: float = 0.5,
                 **_options) -> dict:
    """Deterministic tractography on the principal eigenvector field, seeded in every white-matter voxel (the
    T1's white-matter fraction > 0.5 on the DWI grid) with FA above the stopping threshold; streamlines as TRK
    (RAS mm), their count and length histogram."""
    import SimpleITK as sitk

    from imaging_tasks.device import pick_device
    from imaging_tasks.neuroimaging import tractography as tracking

    out_dir = Path(out_dir)
    dti_dir = Path(previous["dti"])
    if not (dti_dir / V1).exists():
        return {"metrics": [_m("streamlines", 0, "count")], "findings": [], "outputs": []}
    dev = pick_device(device)
    started = time.perf_counter()
    fa, affine = _load_xyz(dti_dir / "fa.nii.gz")
    v1, _ = _load_xyz(dti_dir / V1)
    b0, _ = _load_xyz(dti_dir / DWI_B0)
    from imaging_tasks.neuroimaging.session import image_from_xyz

    reference = image_from_xyz(b0, affine)
    t1_to_dwi = sitk.ReadTransform(str(dti_dir / DWI_TO_T1))
    wm = _from_t1(_read(Path(previous["brain_extraction"]) / FRACTIONS["wm"]), reference, t1_to_dwi,
                  labels=False) > 0.5
    seeds_mask = wm & (fa > dti_fa_stop)
    seeds = np.argwhere(seeds_mask).astype(np.float64)
    if len(seeds) > MAX_SEEDS:
        seeds = seeds[:: int(np.ceil(len(seeds) / MAX_SEEDS))]
    streamlines = tracking.track_deterministic(v1, fa, seeds, voxel_size_mm=tracking.voxel_sizes_mm(affine),
                                               step_mm=dti_step_mm, fa_stop=dti_fa_stop,
                                               max_angle_deg=dti_max_angle_deg, device=dev)
    tracked = time.perf_counter()
    tracking.save_streamlines(streamlines, affine, fa.shape, out_dir / STREAMLINES)
    lengths = tracking.streamline_lengths_mm(streamlines, affine)
    counts, edges = tracking.length_histogram(lengths)
    (out_dir / LENGTHS).write_text(json.dumps({"seeds": len(seeds), "streamlines": len(streamlines),
                                               "bin_edges_mm": [float(e) for e in edges],
                                               "counts": [int(c) for c in counts]}, indent=2))
    log.info("tractography: %d seeds, %d streamlines, mean length %.1f mm on %s", len(seeds), len(streamlines),
             float(np.mean(lengths)) if len(lengths) else 0.0, dev)
    return {"metrics": [_m("tractography_seeds", len(seeds), "count"), _m("streamlines", len(streamlines), "count"),
                        _m("streamline_mean_length_mm", float(np.mean(lengths)) if len(lengths) else None, "mm"),
                        _m("streamline_median_length_mm", float(np.median(lengths)) if len(lengths) else None,
                           "mm"),
                        _m("tractography_seconds", tracked - started, "s")],
            "findings": [], "outputs": _outputs(out_dir), "device": str(dev)}
