"""A synthetic session's BOLD run and DWI series, in the subject's own head (not in MNI space), with known truth.

The T1 of :mod:`.synth` is the MNI152 template through a per-subject pose and anatomy warp; the BOLD and DWI
here go through the very same mapping (the head did not move between series), on their own coarser grids, so
the chain has to register them to the T1 and carry the atlas across as it would for real data:

* **BOLD** (:func:`add_bold`): an EPI-like baseline (CSF bright, grey above white matter, a faint scalp), a block
  design of two conditions (:func:`.synth_fmri.block_events`) and planted responses (percent signal change,
  :data:`.synth_fmri.DEFAULT_AMPLITUDES`) in 10 mm balls around Seitzman-300 ROI centres (so each atlas sphere lies
  inside its activation), rendered by :func:`.synth_fmri.render_bold` (its own HRF, AR(1) noise, drift).  Truth:
  the amplitude of each planted ROI per condition; every other ROI has 0.
* **DWI** (:func:`add_dwi`): two b=0 volumes and ``n_directions`` at b=1000 s/mm^2; each voxel's signal is the sum
  of three compartments weighted by the template's tissue fractions, each with its own b=0 signal (CSF brightest):
  CSF isotropic 3.0e-3 mm^2/s, grey matter isotropic 0.8e-3, white matter an axially symmetric tensor of FA
  :data:`WM_FA` and MD :data:`WM_MD` whose fibres run left-right within 20 mm of the midline (a callosum) and
  head-feet elsewhere (projection fibres), in template coordinates, turned into the scanner frame by the pose's
  rotation; Rician noise.  Truth: the white-matter tensor (FA and MD of pure white-matter voxels).

``series_grid(voxel_mm) -> (grid, scanner -> template transform)`` comes from :mod:`.synth` (the session's pose
and warp).  Layouts follow the session's: DICOM (classic per-slice files, or one enhanced multi-frame object) in ``bold/`` and
``dwi/`` with the BIDS ``events.tsv`` in ``bold/`` beside the BOLD files; NIfTI uploads as ``bold.nii.gz`` +
``events.tsv`` + ``bold.json`` and ``dwi.nii.gz`` + ``dwi.bval`` + ``dwi.bvec``.  Identifiers are planted in the
sidecar and in an extra events column, so de-identification has something to remove.
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable

import numpy as np
import SimpleITK as sitk

WM_FA = 0.7
WM_MD = 0.75e-3
GM_MD = 0.8e-3
CSF_MD = 3.0e-3
ACTIVATION_RADIUS_MM = 10.0


def xyz_affine(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """An (z, y, x) SimpleITK grid's nibabel-style view: the RAS+ affine of (x, y, z) arrays."""
    from imaging_tasks.neuroimaging.session import LPS_FROM_RAS

    lps = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = LPS_FROM_RAS @ lps
    affine[:3, 3] = LPS_FROM_RAS @ np.array(img.GetOrigin())
    return affine


def _on_grid(image: sitk.Image, grid: sitk.Image, to_template: sitk.Transform, *, labels: bool = False) -> np.ndarray:
    """A template image on the series' grid, as (x, y, z)."""
    out = sitk.Resample(image, grid, to_template, sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0,
                        sitk.sitkInt32 if labels else sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def add_bold(study_dir: pathlib.Path, study, rng: np.random.Generator, ph: dict, series_grid: Callable, *,
             layout: str, voxel_mm: float = 4.0, n_volumes: int = 80, tr_s: float = 2.5, style: str = "enhanced",
             noise_percent: float = 0.8) -> dict:
    """Write the session's BOLD run and its events; return its truth (see the module docstring)."""
    from imaging_tasks.neuroimaging import rois
    from imaging_tasks.neuroimaging.synth_fmri import (DEFAULT_AMPLITUDES, _pick_rois, block_events, render_bold,
                                                       write_events_tsv)

    img = ph["images"]
    grid, to_template = series_grid(voxel_mm)
    affine = xyz_affine(grid)
    tissue = {k: _on_grid(img[k], grid, to_template) for k in ("gm", "wm", "csf")}
    head = _on_grid(img["t1"], grid, to_template) > 0.05
    baseline = 1000.0 * (0.75 * tissue["gm"] + 0.55 * tissue["wm"] + 1.1 * tissue["csf"])
    baseline = np.where(head & (baseline < 150.0), 150.0, baseline).astype(np.float32)
    # activations: balls around the picked Seitzman centres, drawn in template space and carried like the anatomy
    picked = _pick_rois()
    template = rois.label_atlas("seitzman300").image
    balls = {}
    ras = np.stack(np.meshgrid(*[np.arange(n) for n in template.GetSize()], indexing="ij"), -1)
    for name, roi in picked.items():
        centre = np.array([roi["x_mm"], roi["y_mm"], roi["z_mm"]])
        idx = np.array(template.TransformPhysicalPointToContinuousIndex(
            (-float(centre[0]), -float(centre[1]), float(centre[2]))))
        dist = np.linalg.norm((ras - idx) * np.array(template.GetSpacing()), axis=-1)
        ball = sitk.GetImageFromArray((dist <= ACTIVATION_RADIUS_MM).transpose(2, 1, 0).astype(np.uint8))
        ball.CopyInformation(template)
        balls[name] = _on_grid(ball, grid, to_template, labels=True) > 0
    events = block_events(tuple(sorted(DEFAULT_AMPLITUDES)), n_volumes=n_volumes, tr_s=tr_s)
    data = render_bold(balls, DEFAULT_AMPLITUDES, baseline, events, tr_s, n_volumes, rng,
                       noise_percent=noise_percent)
    if layout == "nifti":
        import nibabel as nib

        study_dir.mkdir(parents=True, exist_ok=True)
        nii = nib.Nifti1Image(np.clip(np.rint(data), 0, 32767).astype(np.int16), affine)
        nii.header.set_xyzt_units("mm", "sec")
        nii.header["pixdim"][4] = tr_s
        nii.header["descrip"] = f"BOLD {study.patient.name}"[:79].encode()
        nib.save(nii, str(study_dir / "bold.nii.gz"))
        (study_dir / "bold.json").write_text(json.dumps({
            "RepetitionTime": tr_s, "TaskName": "motorvisual", "EchoTime": 0.03, "PatientName": study.patient.name,
            "InstitutionName": study.institution}, indent=2))
        events_path = study_dir / "events.tsv"
    else:
        from imaging_tasks.neuroimaging.synth_dicom4d import write_4d_dicom

        write_4d_dicom(data, affine, study_dir / "bold", kind="bold", tr_s=tr_s, style=style, study=study, rng=rng,
                       series_number=5)
        events_path = study_dir / "bold" / "events.tsv"
    write_events_tsv(events_path, events)
    _plant_events_phi(events_path, study)
    return {"file": "bold.nii.gz" if layout == "nifti" else "bold/", "voxel_mm": voxel_mm, "n_volumes": n_volumes,
            "tr_s": tr_s, "style": None if layout == "nifti" else style,
            "amplitudes_percent": DEFAULT_AMPLITUDES,
            "active_rois": {name: roi["name"] if "name" in roi else int(roi["index"]) for name, roi in picked.items()},
            "active_roi_index": {name: int(roi["index"]) for name, roi in picked.items()},
            "activation_radius_mm": ACTIVATION_RADIUS_MM,
            "events": [{"onset": e.onset_s, "duration": e.duration_s, "trial_type": e.trial_type} for e in events]}


def _plant_events_phi(path: pathlib.Path, study) -> None:
    """An extra column naming the patient (what a stimulus log may carry): de-identification must drop it."""
    lines = path.read_text().splitlines()
    out = [lines[0] + "\tnotes"] + [line + f"\t{study.patient.name} run 1" for line in lines[1:]]
    path.write_text("\n".join(out) + "\n")


def _wm_direction_lps(points_template_lps: np.ndarray) -> np.ndarray:
    """Fibre direction of white matter at template points: left-right near the midline, head-feet elsewhere."""
    x = points_template_lps[..., 0]
    d = np.zeros(points_template_lps.shape)
    near = np.abs(x) < 20.0
    d[near, 0] = 1.0
    d[~near, 2] = 1.0
    return d


def add_dwi(study_dir: pathlib.Path, study, rng: np.random.Generator, ph: dict, series_grid: Callable, *,
            layout: str, voxel_mm: float = 3.0, n_directions: int = 20, b_s_per_mm2: float = 1000.0,
            style: str = "enhanced", noise_fraction: float = 0.02) -> dict:
    """Write the session's DWI series (and its gradient files); return its truth (see the module docstring)."""
    from imaging_tasks.neuroimaging.synth_dwi import _frame, axial_evals, gradient_scheme, tensor_signal

    img = ph["images"]
    grid, to_template = series_grid(voxel_mm)
    affine = xyz_affine(grid)
    f = {k: np.clip(_on_grid(img[k], grid, to_template), 0, 1) for k in ("gm", "wm", "csf")}
    head = _on_grid(img["t1"], grid, to_template) > 0.05
    bvals, bvecs = gradient_scheme(n_directions, b_s_per_mm2, 2)
    # white-matter direction: at each voxel's template position, turned into the scanner (= voxel, LPS) frame
    size = grid.GetSize()
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3).astype(float)
    origin, spacing = np.array(grid.GetOrigin()), np.array(grid.GetSpacing())
    points = origin + ijk * spacing  # identity direction: LPS
    template_pts = np.array([to_template.TransformPoint(tuple(p)) for p in points[:: 1]])
    d_template = _wm_direction_lps(template_pts)
    jac = _linear_part(to_template)  # template <- scanner; a template direction d is scanner direction J^-1 d
    d_scanner = d_template @ np.linalg.inv(jac).T
    d_scanner /= np.linalg.norm(d_scanner, axis=1, keepdims=True)
    v1 = d_scanner.reshape(*size, 3)
    wm_signal = tensor_signal(axial_evals(WM_FA, WM_MD)[None].repeat(v1[..., 0].size, 0).reshape(*size, 3),
                              _frame(v1), bvals, bvecs, np.ones(size))
    iso = {k: np.exp(-bvals * md) for k, md in (("gm", GM_MD), ("csf", CSF_MD))}
    s0 = {"wm": 700.0, "gm": 900.0, "csf": 1800.0}
    signal = (s0["wm"] * f["wm"][..., None] * wm_signal + s0["gm"] * f["gm"][..., None] * iso["gm"] +
              s0["csf"] * f["csf"][..., None] * iso["csf"])
    signal += np.where(head & (f["wm"] + f["gm"] + f["csf"] < 0.1), 120.0, 0.0)[..., None]  # a faint scalp
    sigma = noise_fraction * s0["wm"]
    noisy = np.sqrt((signal + rng.normal(0, sigma, signal.shape)) ** 2 + rng.normal(0, sigma, signal.shape) ** 2)
    data = noisy.astype(np.float32)
    if layout == "nifti":
        import nibabel as nib

        study_dir.mkdir(parents=True, exist_ok=True)
        nii = nib.Nifti1Image(np.clip(np.rint(data), 0, 32767).astype(np.int16), affine)
        nii.header.set_xyzt_units("mm", "sec")
        nib.save(nii, str(study_dir / "dwi.nii.gz"))
        # FSL convention: voxel axes, x negated when the affine's determinant is positive
        flip = np.diag([-1.0, 1, 1]) if np.linalg.det(affine[:3, :3]) > 0 else np.eye(3)
        np.savetxt(study_dir / "dwi.bval", bvals[None], fmt="%g")
        np.savetxt(study_dir / "dwi.bvec", (bvecs @ flip).T, fmt="%.6f")
    else:
        from imaging_tasks.neuroimaging.synth_dicom4d import write_4d_dicom

        write_4d_dicom(data, affine, study_dir / "dwi", kind="dwi", bvals=bvals, bvecs_voxel=bvecs, style=style,
                       study=study, rng=rng, series_number=6)
    return {"file": "dwi.nii.gz" if layout == "nifti" else "dwi/", "voxel_mm": voxel_mm,
            "n_volumes": int(len(bvals)), "b_s_per_mm2": b_s_per_mm2, "style": None if layout == "nifti" else style,
            "white_matter_fa": WM_FA, "white_matter_md_mm2_per_s": WM_MD, "grey_matter_md_mm2_per_s": GM_MD,
            "csf_md_mm2_per_s": CSF_MD, "noise_sigma": sigma,
            "fibres": "left-right within 20 mm of the template midline, head-feet elsewhere"}


def _linear_part(transform: sitk.Transform) -> np.ndarray:
    """The Jacobian of a (composite) transform at the head centre, by central differences (1 mm)."""
    c = np.zeros(3)
    cols = []
    for k in range(3):
        e = np.zeros(3)
        e[k] = 1.0
        cols.append((np.array(transform.TransformPoint(tuple(c + e))) -
                     np.array(transform.TransformPoint(tuple(c - e)))) / 2.0)
    return np.stack(cols, axis=1)
