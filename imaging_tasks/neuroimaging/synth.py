"""Synthetic brain MR (T1) + PET sessions built from nilearn's shipped MNI152 template, with known truth.

Why the template rather than a geometric phantom: brain extraction and N4 have to face real cortical folding,
ventricles and grey/white contrast.  What is added on top is known exactly, so tests can check against it:

* a head size (the template scaled by about 0.86-0.97 per axis, so brain volumes vary between subjects and
  are realistic) and a rigid pose per series: ``A(p) = R S^-1 (p - c) + c + t`` (scanner -> template, LPS mm);
* a smooth non-linear anatomy warp ``W(q) = q + d(q)`` in template space, a sum of 3-6 Gaussian bumps
  (peak 1.5-4 mm, sigma 20-35 mm, centred at least 25 mm inside the brain), so the subject is not an affine
  copy of the atlas: scanner -> template is ``p_t = W(A(p_s))`` (:func:`scanner_to_template`, exact; its
  inverse :func:`template_to_scanner` by fixed-point iteration).  Atlas registration is checked against it;
* around the brain, a CSF gap, a dark skull and a bright fat-like scalp, bridged by two optic-nerve-like
  tissue tubes from the orbitofrontal brain to the scalp, so that neither a threshold nor a threshold plus
  largest component extracts the brain;
* a smooth multiplicative bias field ``b(p) = exp(sum_k c_k phi_k(u) - offset)``, ``u = (p - centre) / scale``,
  with second-order polynomial terms ``phi``, evaluated in scanner coordinates (the coil does not move);
* Rician noise, as in magnitude MR images;
* for PET, activity in Bq/ml per tissue and region: cerebellar grey matter is the reference (SUVR 1 by
  definition), five cortical regions defined as boxes in MNI millimetres (:data:`PET_REGIONS`) and the rest of
  the grey matter carry known SUVRs; white matter, CSF and scalp known uptakes.  Blurred by the scanner PSF
  and stored with per-slice RescaleSlope (Units BQML).  The truth also gives the SUVR a perfect pipeline would
  measure (partial volume included: :func:`expected_suvr`) and the SUV factor the headers imply;
* optionally 4-D PET (``pet_frames``): frames with known rigid inter-frame head motion and their own noise,
  one DICOM series with NumberOfTimeSlices / ImageIndex / FrameReferenceTime as scanners write it.

Layouts (``layout``): ``"dicom"`` writes ``out/neuroimaging/<label>/t1/*.dcm`` and ``.../pet/*.dcm`` (PET
optional); ``"nifti"`` writes what research groups upload, ``out/neuroimaging/<patient ID>/<study date>/``
``mri.nii.gz``, ``pet.nii.gz`` (3-D or 4-D) and a BIDS-like ``pet.json`` sidecar, with patient identifiers
planted in the folder names, the NIfTI ``descrip`` field, a NIfTI comment extension and the sidecar, so that
de-identification has something to remove.  The same seed gives the same subject in both layouts.
Everything is nilearn data shipped in the wheel (no download); nilearn's own resampling to 2 mm is
deterministic.  The template is skull-stripped and covers the brain down to the lower brainstem, where the
grid ends; the synthetic skull closes under that cut (a skull base).

Random streams: what the first version drew (pose, bias, noise, uptakes, UIDs) still comes from the study's
generator in the same order; everything added later (warp, regional SUVRs, frame motion and noise) comes from
child generators spawned from it without advancing it, so with ``warp_mm=0`` the T1 series is byte-identical
to what the first version wrote.
"""
from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import warnings

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from scipy import ndimage as ndi

from imaging_tasks.synth import phi
from imaging_tasks.synth import malformed as mf

SPECIALTY = "neuroimaging"
MR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"
PET_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.128"

# Relative T1 intensities of the added tissues (template brain is 0..1, white matter ~0.85-0.95).  The CSF
# around the brain has the brightness of the template's own CSF (ventricles and sulci: mean 0.28 where the CSF
# probability > 0.9): real CSF has one brightness, and an envelope darker than the sulci (0.12 once) let a
# method read sulcal CSF as partial-volume tissue and still look right here.
CSF_T1, SKULL_T1, SCALP_T1, NERVE_T1 = 0.28, 0.03, 0.95, 0.6
# Optic-nerve-like tissue bridges from the inferior frontal brain through skull to scalp (MNI RAS mm):
# what keeps a plain threshold + largest component from separating brain and scalp on real heads.
NERVES = [((sx * 18.0, 20.0, -22.0), (sx * 0.25, 1.0, 0.0)) for sx in (-1.0, 1.0)]
NERVE_RADIUS_MM = 2.5
MR_SCALE = 1000.0  # stored value of relative intensity 1.0
PAD_VOX = 14  # template grid padding (2 mm voxels) to make room for the head shell
BIAS_BASIS = ["x", "y", "z", "xx", "yy", "zz", "xy", "xz", "yz"]
# Cerebellar reference region in MNI (RAS) millimetres: below the tentorium, behind the brainstem.
CEREBELLUM_RULE = {"mni_y_max_mm": -40.0, "mni_z_max_mm": -20.0}
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

# Anatomy warp (template space): Gaussian bumps centred this deep inside the brain, so the brain's volume stays
# within ~1 % of the affine copy's (a bump at the surface would swell or shrink it by ~1.5 % each; measured
# -0.5 to +0.6 % over seeds 0-7, brain displacement mean 0.3-1.7 mm, max 2.3-5.4 mm at warp_mm=4).  The
# Lipschitz bound keeps W invertible and the fixed-point inverse fast.
WARP_CENTRE_DEPTH_MM = 25.0
WARP_SIGMA_MM = (20.0, 35.0)
WARP_BUMPS = (3, 6)
WARP_MAX_LIPSCHITZ = 0.5
WARP_DEFINITION = ("template LPS mm: W(q) = q + d(q), d(q) = sum_k vectors_mm[k] * exp(-|q - centres_mm[k]|^2 / "
                   "(2 sigmas_mm[k]^2)); scanner -> template: p_t = W(A(p_s)) with A the series' pose (for PET "
                   "frame f, p_s is first mapped to frame 0 by that frame's motion); the same W for every series "
                   "of the session (it is the subject's anatomy): W cancels in the true T1 -> PET mapping "
                   "A_pet^-1(A_mr(p)). vectors are scaled down together if needed so that "
                   "sum_k |v_k| / sigma_k * exp(-1/2) (a bound on |grad d|) <= lipschitz_max")
# PET regions with their own SUVR: boxes in MNI (RAS) millimetres, [[x0, x1], [y0, y1], [z0, z1]] inclusive,
# pairwise disjoint; grey matter inside a box (minus the cerebellar reference rule) takes the region's SUVR.
PET_REGIONS = {
    "precuneus_posterior_cingulate": [[[-14, 14], [-76, -40], [8, 52]]],
    "frontal": [[[-72, 72], [22, 76], [-12, 72]]],
    "lateral_temporal": [[[-72, -40], [-60, 12], [-42, 0]], [[40, 72], [-60, 12], [-42, 0]]],
    "parietal": [[[-72, -20], [-80, -26], [26, 76]], [[20, 72], [-80, -26], [26, 76]]],
    "occipital": [[[-72, 72], [-112, -82], [-12, 36]]],
}
PET_REGION_SUVR_FACTOR = (0.8, 1.3)  # region SUVR = other-grey-matter SUVR x U(0.8, 1.3), clipped to 1.0-2.5
PET_REGION_SUVR_RANGE = (1.0, 2.5)
F18_HALF_LIFE_S = 6586.2
INJECTION_BEFORE_SCAN_S = 45 * 60
STATIC_FRAME_S = 600.0
PET_NOISE_STATIC = 0.05  # multiplicative Gaussian per voxel for a 600 s frame; scales with 1/sqrt(duration)
LAYOUTS = ("dicom", "nifti")
PER_STUDY_OPTIONS = ("with_pet", "layout", "pet_frames", "warp_mm", "with_bold", "with_dwi")


@functools.lru_cache(maxsize=1)
def _template() -> dict:
    """MNI152 2 mm arrays (x, y, z index order) + LPS geometry; cached because loading costs ~4 s."""
    from nilearn import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = datasets.load_mni152_template(resolution=2)
        brain = datasets.load_mni152_brain_mask(resolution=2)
        gm = datasets.load_mni152_gm_template(resolution=2)
        wm = datasets.load_mni152_wm_template(resolution=2)
    aff = np.asarray(t1.affine, dtype=float)
    if not np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3]))):
        raise RuntimeError("expected an axis-aligned MNI152 affine from nilearn; check the nilearn version")
    for img in (brain, gm, wm):
        if not np.allclose(img.affine, aff):
            raise RuntimeError("nilearn MNI152 images are not on one grid; check the nilearn version")
    arrays = {k: np.asarray(v.dataobj, dtype=np.float32) for k, v in
              (("t1", t1), ("brain", brain), ("gm", gm), ("wm", wm))}
    arrays["brain"] = (arrays["brain"] > 0).astype(np.float32)
    return {"arrays": arrays, "affine_ras": aff}


def _sitk_from_xyz(arr: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    from imaging_tasks.neuroimaging.session import image_from_xyz

    return image_from_xyz(arr, affine_ras)


@functools.lru_cache(maxsize=1)
def head_phantom() -> dict:
    """Template-space head: T1 intensities, brain / intracranial masks, tissue maps; padded, as SimpleITK images.

    The intracranial space is the brain's envelope (closing with an 8 mm ball, holes filled) grown by a 3 mm
    CSF gap; then 7 mm of skull and 6 mm of scalp (template millimetres: each study scales the head).
    """
    tpl = _template()
    a = {k: np.pad(v, PAD_VOX) for k, v in tpl["arrays"].items()}
    aff = tpl["affine_ras"].copy()
    aff[:3, 3] -= aff[:3, :3] @ np.full(3, PAD_VOX)
    vox = float(np.linalg.norm(aff[:3, 0]))
    brain = a["brain"] > 0
    r_close, gap, skull, scalp = 8.0, 3.0, 7.0, 6.0
    outside_dist = ndi.distance_transform_edt(~brain, sampling=vox)
    dilated = outside_dist <= r_close
    envelope = ndi.binary_fill_holes(ndi.distance_transform_edt(dilated, sampling=vox) > r_close) | brain
    d = ndi.distance_transform_edt(~envelope, sampling=vox)
    icv = d <= gap
    skull_m = (d > gap) & (d <= gap + skull)
    scalp_m = (d > gap + skull) & (d <= gap + skull + scalp)
    # Scalp is fat and muscle, not uniform: a fixed smooth +-10 % texture (seeded, independent of study seeds).
    tex = ndi.gaussian_filter(np.random.default_rng(20240611).standard_normal(brain.shape), 3.0)
    tex = 1.0 + 0.1 * tex / (np.abs(tex).max() + 1e-9)
    t1 = np.where(brain, a["t1"], 0.0)
    t1 = np.where(icv & ~brain, CSF_T1, t1)
    t1 = np.where(skull_m, SKULL_T1, t1)
    t1 = np.where(scalp_m, SCALP_T1 * tex, t1)
    ii = np.indices(brain.shape, dtype=np.float32)
    ras = [aff[a, a] * ii[a] + aff[a, 3] for a in range(3)]
    nerve = np.zeros_like(brain)
    for start, direction in NERVES:
        u = np.asarray(direction) / np.linalg.norm(direction)
        rel = [ras[a] - start[a] for a in range(3)]
        along = sum(rel[a] * u[a] for a in range(3))
        radial2 = sum(r * r for r in rel) - along ** 2
        nerve |= (along > 0) & (radial2 <= NERVE_RADIUS_MM ** 2)
    nerve &= ~brain & (d <= gap + skull + scalp)
    t1 = np.where(nerve, NERVE_T1, t1).astype(np.float32)
    cereb = brain & (ras[1] < CEREBELLUM_RULE["mni_y_max_mm"]) & (ras[2] < CEREBELLUM_RULE["mni_z_max_mm"])
    gm = np.clip(a["gm"], 0, 1) * brain
    wm = np.clip(a["wm"], 0, 1) * brain
    tot = gm + wm
    gm, wm = np.where(tot > 1, gm / np.maximum(tot, 1e-6), gm), np.where(tot > 1, wm / np.maximum(tot, 1e-6), wm)
    csf = np.clip(1.0 - gm - wm, 0, 1) * icv
    imgs = {
        "t1": t1, "brain": brain, "icv": icv, "scalp": scalp_m, "gm": gm, "wm": wm, "csf": csf,
        "cereb": cereb,
    }
    head = ndi.binary_fill_holes(icv | skull_m | scalp_m)
    centre_vox = np.array(ndi.center_of_mass(head))
    bbox = np.argwhere(head)
    extent_mm = (bbox.max(0) - bbox.min(0) + 1) * vox
    centre_lps = LPS_FROM_RAS @ (aff[:3, :3] @ centre_vox + aff[:3, 3])
    return {
        "images": {k: _sitk_from_xyz(v.astype(np.float32), aff) for k, v in imgs.items()},
        "centre_lps": centre_lps, "extent_mm": extent_mm, "voxel_ml": vox ** 3 / 1000.0,
        "layers_mm": {"envelope_closing_radius": r_close, "csf_gap": gap, "skull": skull, "scalp": scalp},
        "nerve_bridges": {"start_and_direction_mni_ras": [list(map(list, n)) for n in NERVES],
                          "radius_mm": NERVE_RADIUS_MM, "t1_relative": NERVE_T1,
                          "volume_ml": float(nerve.sum() * vox ** 3 / 1000.0)},
        "template_brain_ml": float(brain.sum() * vox ** 3 / 1000.0),
        "template_icv_ml": float(icv.sum() * vox ** 3 / 1000.0),
    }


def pose_transform(pose: dict) -> sitk.AffineTransform:
    """The scanner -> template transform of a truth ``pose`` record."""
    euler = sitk.Euler3DTransform()
    euler.SetRotation(*(float(np.deg2rad(r)) for r in pose["rotation_deg"]))
    matrix = np.array(euler.GetMatrix()).reshape(3, 3) @ np.diag(1.0 / np.asarray(pose["scale"], dtype=float))
    tr = sitk.AffineTransform(3)
    tr.SetCenter(tuple(float(c) for c in pose["center_mm"]))
    tr.SetMatrix(tuple(matrix.ravel().tolist()))
    tr.SetTranslation(tuple(float(t) for t in pose["translation_mm"]))
    return tr


def _pose(rng: np.random.Generator, centre: np.ndarray, scale: np.ndarray, max_rot_deg: float,
          max_shift_mm: float) -> dict:
    pose = {
        "convention": "scanner LPS mm -> template LPS mm: p_t = R diag(1/scale) (p_s - c) + c + t, R = Rz Rx Ry "
                      "from rotation_deg about x, y, z (SimpleITK Euler3DTransform); the subject's head is the "
                      "template scaled by `scale` along the scanner axes",
        "rotation_deg": [round(float(r), 6) for r in rng.uniform(-max_rot_deg, max_rot_deg, 3)],
        "translation_mm": [round(float(s), 6) for s in rng.uniform(-max_shift_mm, max_shift_mm, 3)],
        "center_mm": [round(float(c), 6) for c in centre],
        "scale": [round(float(v), 6) for v in scale],
    }
    tr = pose_transform(pose)
    m = np.eye(4)
    m[:3, :3] = np.array(tr.GetMatrix()).reshape(3, 3)
    m[:3, 3] = np.array(tr.GetTranslation()) + np.array(tr.GetCenter()) - m[:3, :3] @ np.array(tr.GetCenter())
    pose["matrix_4x4"] = [[round(float(v), 9) for v in row] for row in m]
    return {"transform": tr, "truth": pose}


def truth_on_grid(truth: dict, reference: sitk.Image, name: str, series: str = "mr", frame: int = 0) -> np.ndarray:
    """A phantom map on a series' grid, (z, y, x), through the true pose and anatomy warp.

    ``name``: ``brain``, ``icv``, ``gm``, ``wm``, ``csf``, ``cereb``, ``scalp``, ``t1``, or a PET region of
    :data:`PET_REGIONS` (its box mask, cerebellar rule removed; intersect with ``gm`` for the region's grey
    matter).  For tests and benchmarks: what the masks are, in the scanner space of that series (PET: of
    ``frame``), by construction.
    """
    img = pet_region_masks()[name] if name in PET_REGIONS else head_phantom()["images"][name]
    return _resample(img, reference, scanner_to_template_transform(truth, reference, series, frame))


def _grid(centre: np.ndarray, extent_mm: np.ndarray, voxel_mm: float, margin_mm: float) -> sitk.Image:
    """An axial scanner grid (identity orientation, LPS) centred on the head."""
    size = [int(np.ceil((e + 2 * margin_mm) / voxel_mm / 2) * 2) for e in extent_mm]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing((voxel_mm,) * 3)
    ref.SetOrigin(tuple(float(c - (n - 1) / 2 * voxel_mm) for c, n in zip(centre, size)))
    return ref


def bias_field_at(points_mm: np.ndarray, params: dict) -> np.ndarray:
    """Multiplicative bias at LPS points (N, 3) from truth ``bias_field`` parameters."""
    u = (np.asarray(points_mm, dtype=float) - np.asarray(params["center_mm"])) / float(params["scale_mm"])
    x, y, z = u[:, 0], u[:, 1], u[:, 2]
    basis = {"x": x, "y": y, "z": z, "xx": x * x, "yy": y * y, "zz": z * z, "xy": x * y, "xz": x * z, "yz": y * z}
    g = sum(c * basis[name] for name, c in zip(params["basis"], params["coefficients"]))
    return np.exp(g - float(params["offset"]))


def image_points_mm(img: sitk.Image) -> np.ndarray:
    """LPS coordinates of every voxel, in numpy (z, y, x) order flattened."""
    size = img.GetSize()
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), -1).reshape(-1, 3).astype(float)
    d = np.array(img.GetDirection()).reshape(3, 3)
    pts = idx * np.array(img.GetSpacing()) @ d.T + np.array(img.GetOrigin())
    # meshgrid over (x, y, z) in ij order -> reorder to numpy (z, y, x) flattening
    return pts.reshape(size[0], size[1], size[2], 3).transpose(2, 1, 0, 3).reshape(-1, 3)


def _bias(rng: np.random.Generator, grid: sitk.Image, head: np.ndarray, amplitude: float) -> tuple[np.ndarray, dict]:
    centre = np.array(grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()]))
    params = {"basis": BIAS_BASIS, "center_mm": [round(float(c), 6) for c in centre], "scale_mm": 100.0,
              "coefficients": [0.0] * len(BIAS_BASIS), "offset": 0.0}
    raw = rng.normal(0, 1, len(BIAS_BASIS)) * np.array([1, 1, 1, .5, .5, .5, .5, .5, .5])
    params["coefficients"] = raw.tolist()
    pts = image_points_mm(grid)
    g = np.log(bias_field_at(pts, params)).reshape(head.shape)
    scale = np.log1p(amplitude) / float(np.ptp(g[head]))
    params["coefficients"] = [round(float(c * scale), 9) for c in raw]
    g = np.log(bias_field_at(pts, params)).reshape(head.shape)
    params["offset"] = round(float(g[head].mean()), 9)
    params["amplitude"] = round(float(amplitude), 6)
    params["definition"] = ("b(p) = exp(sum_k coefficients_k * basis_k(u) - offset), u = (p_LPS - center_mm) / "
                            "scale_mm; max(b)/min(b) over the head = 1 + amplitude; mean log b over the head = 0")
    return np.exp(g - params["offset"]).astype(np.float32), params


def _resample(img: sitk.Image, ref: sitk.Image, tr: sitk.Transform) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(img, ref, tr, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def _geometry(ds, grid: sitk.Image, k: int) -> None:
    sp = grid.GetSpacing()
    d = np.array(grid.GetDirection()).reshape(3, 3)
    pos = grid.TransformIndexToPhysicalPoint((0, 0, k))
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
    ds.PixelSpacing = [f"{sp[1]:.4f}", f"{sp[0]:.4f}"]
    ds.SliceThickness = f"{sp[2]:.4f}"
    ds.SpacingBetweenSlices = f"{sp[2]:.4f}"
    ds.SliceLocation = f"{float(np.dot(d[:, 2], pos)):.4f}"
    ds.Rows, ds.Columns = grid.GetSize()[1], grid.GetSize()[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "HEAD"
    ds.PositionReferenceIndicator = ""


def _write_mr(study: phi.Study, rng: np.random.Generator, folder: pathlib.Path | None, grid: sitk.Image,
              vol: np.ndarray) -> str:
    """The T1 series, one file per slice; ``folder=None`` draws the same UIDs without writing (NIfTI layout)."""
    series_uid = phi.new_uid(rng)
    if folder is None:
        for _ in range(vol.shape[0]):
            phi.new_uid(rng)
        return series_uid
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(vol.shape[0]):
        ds = phi.dicom_dataset(study, modality="MR", sop_class_uid=MR_SOP_CLASS, series_uid=series_uid,
                               sop_uid=phi.new_uid(rng), series_number=3, instance_number=k + 1,
                               series_description="T1w MPRAGE AX 2mm")
        _geometry(ds, grid, k)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ProtocolName = "t1_mprage_ax"
        ds.ScanningSequence = ["GR", "IR"]
        ds.SequenceVariant = ["SP", "MP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.SequenceName = "*tfl3d1"
        ds.RepetitionTime, ds.EchoTime, ds.InversionTime, ds.FlipAngle = "2300", "2.98", "900", "9"
        ds.MagneticFieldStrength, ds.ImagingFrequency, ds.ImagedNucleus = "3", "123.25", "1H"
        ds.EchoTrainLength = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = "600", "1200"
        ds.PixelData = vol[k].astype("<u2").tobytes()
        phi.write_dicom(ds, str(folder / f"{k + 1:04d}.dcm"))
    return series_uid


def _clock(hhmmss: str, offset_s: float) -> str:
    """DICOM TM ``hhmmss`` shifted by ``offset_s`` seconds (whole seconds; same day)."""
    t = int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6]) + int(round(offset_s))
    return f"{t // 3600:02d}{t % 3600 // 60:02d}{t % 60:02d}"


def _decay_factor(start_s: float, duration_s: float) -> float:
    """DICOM DecayFactor of a frame decay-corrected to the series start (DecayCorrection START)."""
    lam = np.log(2.0) / F18_HALF_LIFE_S
    return float(np.exp(lam * start_s) * lam * duration_s / -np.expm1(-lam * duration_s))


def _write_pet(study: phi.Study, rng: np.random.Generator, folder: pathlib.Path | None, grid: sitk.Image,
               frames_bqml: list[np.ndarray], timing: list[dict], weight_kg: float, dose_bq: float) -> str:
    """One PET series: every frame's slices, ImageIndex = frame * slices + slice + 1, as scanners number them.

    Per frame: FrameReferenceTime (ms from the series start to mid-frame), ActualFrameDuration (ms),
    AcquisitionTime (clock time of the frame start) and DecayFactor; NumberOfTimeSlices and SeriesType
    DYNAMIC when there is more than one frame.  ``folder=None`` only draws the UIDs (NIfTI layout).
    """
    series_uid = phi.new_uid(rng)
    n_frames, n_slices = len(frames_bqml), frames_bqml[0].shape[0]
    if folder is None:
        for _ in range(n_frames * n_slices):
            phi.new_uid(rng)
        return series_uid
    folder.mkdir(parents=True, exist_ok=True)
    inj_time = _clock(study.study_time, -INJECTION_BEFORE_SCAN_S)
    description = "PET Brain FDG AC" + (f" dynamic {n_frames} frames" if n_frames > 1 else "")
    for f, (vol_bqml, tm) in enumerate(zip(frames_bqml, timing)):
        for k in range(n_slices):
            index = f * n_slices + k + 1
            ds = phi.dicom_dataset(study, modality="PT", sop_class_uid=PET_SOP_CLASS, series_uid=series_uid,
                                   sop_uid=phi.new_uid(rng), series_number=5, instance_number=index,
                                   series_description=description)
            _geometry(ds, grid, k)
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.Units = "BQML"
            ds.SeriesType = ["DYNAMIC" if n_frames > 1 else "STATIC", "IMAGE"]
            ds.CountsSource = "EMISSION"
            ds.CorrectedImage = ["ATTN", "SCAT", "DECY", "RAN", "NORM", "DTIM"]
            ds.DecayCorrection = "START"
            ds.ReconstructionMethod = "OSEM 4i16s"
            ds.AttenuationCorrectionMethod = "MR-based"
            ds.AcquisitionTime = _clock(study.study_time, tm["start_s"])
            ds.FrameReferenceTime = f"{(tm['start_s'] + tm['duration_s'] / 2) * 1000:.1f}"
            ds.ActualFrameDuration = int(round(tm["duration_s"] * 1000))
            ds.NumberOfSlices = n_slices
            if n_frames > 1:
                ds.NumberOfTimeSlices = n_frames
            ds.ImageIndex = index
            ds.DecayFactor = f"{_decay_factor(tm['start_s'], tm['duration_s']):.6f}"
            ds.PatientWeight = f"{weight_kg:.1f}"
            rad = Dataset()
            rad.Radiopharmaceutical = "Fludeoxyglucose F^18^"
            rad.RadiopharmaceuticalStartTime = inj_time
            rad.RadionuclideTotalDose = f"{dose_bq:.1f}"
            rad.RadionuclideHalfLife = f"{F18_HALF_LIFE_S}"
            rad.RadionuclidePositronFraction = "0.9673"
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "C-111A1", "SRT", "^18^Fluorine"
            rad.RadionuclideCodeSequence = Sequence([code])
            ds.RadiopharmaceuticalInformationSequence = Sequence([rad])
            sl = vol_bqml[k]
            slope = max(float(sl.max()), 1.0) / 32000.0
            ds.RescaleSlope = f"{slope:.8g}"
            ds.RescaleIntercept = "0"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = np.clip(np.rint(sl / float(ds.RescaleSlope)), 0, 32767).astype("<i2").tobytes()
            phi.write_dicom(ds, str(folder / f"{index:04d}.dcm"))
    return series_uid


# --------------------------------------------------------------------------- anatomy warp and true mappings
def _extra_rngs(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    """``n`` independent generators for what later versions added, taken without advancing ``rng``.

    Why: drawing them from ``rng`` would shift every later draw (pose, bias, noise, UIDs) and change every
    existing study.  ``Generator.spawn`` derives children from the seed sequence and leaves the stream alone.
    """
    try:
        return list(rng.spawn(n))
    except (AttributeError, TypeError, ValueError):  # a generator without a seed sequence: derive from its state
        state = json.dumps(rng.bit_generator.state, sort_keys=True, default=str).encode()
        seed = int.from_bytes(hashlib.sha256(state).digest()[:8], "little")
        return [np.random.default_rng([seed, k]) for k in range(n)]


def _voxel_points(img: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    d = np.array(img.GetDirection()).reshape(3, 3)
    return np.asarray(index_xyz, float) * np.array(img.GetSpacing()) @ d.T + np.array(img.GetOrigin())


@functools.lru_cache(maxsize=1)
def _brain_points() -> tuple[np.ndarray, np.ndarray]:
    """Template LPS mm of the brain voxels and their depth below the brain surface (mm)."""
    img = head_phantom()["images"]["brain"]
    brain = sitk.GetArrayFromImage(img) > 0
    depth = ndi.distance_transform_edt(brain, sampling=img.GetSpacing()[::-1])
    idx = np.argwhere(brain)
    return _voxel_points(img, idx[:, ::-1]), depth[tuple(idx.T)]


def _draw_warp(rng: np.random.Generator, warp_mm: float) -> dict:
    """Warp parameters (truth record); always the same draws, so ``warp_mm`` only scales the vectors."""
    n = int(rng.integers(WARP_BUMPS[0], WARP_BUMPS[1] + 1))
    brain_pts, depth = _brain_points()
    cand = brain_pts[depth >= WARP_CENTRE_DEPTH_MM]
    centres = cand[rng.choice(len(cand), n, replace=False)] + rng.uniform(-1.0, 1.0, (n, 3))
    sigmas = rng.uniform(*WARP_SIGMA_MM, n)
    directions = rng.normal(size=(n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    peaks = rng.uniform(0.375, 1.0, n) * float(warp_mm)
    bound = float(np.sum(peaks / sigmas) * np.exp(-0.5))
    if bound > WARP_MAX_LIPSCHITZ:
        peaks *= WARP_MAX_LIPSCHITZ / bound
    vectors = directions * peaks[:, None]
    if warp_mm <= 0:
        centres, sigmas, vectors = centres[:0], sigmas[:0], vectors[:0]
    warp = {
        "definition": WARP_DEFINITION, "magnitude_mm": float(warp_mm), "lipschitz_max": WARP_MAX_LIPSCHITZ,
        "centres_mm": [[round(float(v), 4) for v in c] for c in centres],
        "sigmas_mm": [round(float(v), 4) for v in sigmas],
        "vectors_mm": [[round(float(v), 6) for v in c] for c in vectors],
    }
    warp["lipschitz_bound"] = round(float(sum(np.linalg.norm(v) / s for v, s in
                                              zip(warp["vectors_mm"], warp["sigmas_mm"])) * np.exp(-0.5)), 6)
    # How much the brain moves (template brain voxels): bumps add up, so the maximum may exceed magnitude_mm.
    moved = np.linalg.norm(warp_displacement(brain_pts, warp), axis=1)
    warp["brain_displacement_mm"] = {"mean": round(float(moved.mean()), 4),
                                     "p95": round(float(np.percentile(moved, 95)), 4),
                                     "max": round(float(moved.max()), 4)}
    return warp


def _warp_of(truth: dict) -> dict | None:
    warp = truth.get("mr", {}).get("warp")
    return warp if warp and warp["vectors_mm"] else None


def warp_displacement(points_lps: np.ndarray, warp: dict | None) -> np.ndarray:
    """d(q) of a truth ``warp`` record at template LPS points (N, 3); zeros without a warp."""
    q = np.asarray(points_lps, dtype=float).reshape(-1, 3)
    d = np.zeros_like(q)
    if not warp:
        return d
    for c, s, v in zip(np.asarray(warp["centres_mm"], float), warp["sigmas_mm"], np.asarray(warp["vectors_mm"], float)):
        d += np.exp(((q - c) ** 2).sum(1) / (-2.0 * float(s) ** 2))[:, None] * v
    return d


def _matrix(tr: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of a SimpleITK matrix-offset transform (Affine, Euler)."""
    m = np.eye(4)
    m[:3, :3] = np.array(tr.GetMatrix()).reshape(3, 3)
    c = np.array(tr.GetCenter())
    m[:3, 3] = np.array(tr.GetTranslation()) + c - m[:3, :3] @ c
    return m


def frame_transform(truth: dict, frame: int) -> sitk.Euler3DTransform:
    """PET frame ``frame`` scanner LPS -> frame 0 scanner LPS: the true inter-frame head motion (rigid).

    SimpleITK convention: with fixed = frame ``frame`` and moving = frame 0, this is what a rigid registration
    should return; ``sitk.Resample(frame0, frame_f, frame_transform(truth, f))`` lays frame 0 onto frame f.
    """
    rec = truth["pet"]["frames"][frame]
    tr = sitk.Euler3DTransform()
    tr.SetCenter(tuple(float(c) for c in rec["center_mm"]))
    tr.SetRotation(*(float(np.deg2rad(r)) for r in rec["rotation_deg"]))
    tr.SetTranslation(tuple(float(t) for t in rec["translation_mm"]))
    return tr


def _series_matrix(truth: dict, series: str, frame: int) -> np.ndarray:
    m = _matrix(pose_transform(truth[series]["pose"]))
    if series == "pet" and frame:
        m = m @ _matrix(frame_transform(truth, frame))
    return m


def scanner_to_template(truth: dict, points_lps, series: str = "mr", frame: int = 0) -> np.ndarray:
    """True template (MNI152 LPS mm: MNI mm with x, y negated) position of scanner LPS points of a series.

    ``p_t = W(A(p_s))`` (for PET frame f: ``W(A(M_f(p_s)))``), exactly as the images were made.  Accepts (3,)
    or (N, 3); returns the same shape.
    """
    p = np.asarray(points_lps, dtype=float)
    m = _series_matrix(truth, series, frame)
    q = p.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
    return (q + warp_displacement(q, _warp_of(truth))).reshape(p.shape)


def template_to_scanner(truth: dict, points_lps, series: str = "mr", frame: int = 0, tol_mm: float = 1e-7,
                        max_iter: int = 200) -> np.ndarray:
    """Inverse of :func:`scanner_to_template`: W^-1 by fixed-point iteration ``q <- p_t - d(q)``, then A^-1.

    Converges because |grad d| <= lipschitz_bound < 1 (error shrinks by that factor per step); stops when a
    step moves no point by more than ``tol_mm``.
    """
    t = np.asarray(points_lps, dtype=float)
    target = t.reshape(-1, 3)
    warp = _warp_of(truth)
    q = target.copy()
    if warp:
        for _ in range(max_iter):
            new = target - warp_displacement(q, warp)
            step = float(np.abs(new - q).max()) if len(q) else 0.0
            q = new
            if step < tol_mm:
                break
        else:
            raise RuntimeError("anatomy warp inverse did not converge; is the warp's lipschitz_bound < 1?")
    inv = np.linalg.inv(_series_matrix(truth, series, frame))
    return (q @ inv[:3, :3].T + inv[:3, 3]).reshape(t.shape)


def scanner_to_template_transform(truth: dict, reference: sitk.Image, series: str = "mr",
                                  frame: int = 0) -> sitk.Transform:
    """The true scanner -> template mapping as a SimpleITK transform valid on ``reference``'s voxels.

    Without a warp or frame motion it is the pose (an AffineTransform, as the first version used).  Otherwise a
    DisplacementFieldTransform sampled at ``reference``'s voxel centres, so resampling onto ``reference`` is
    exact there (the field is evaluated only at its own grid points).
    """
    if _warp_of(truth) is None and not frame:
        return pose_transform(truth[series]["pose"])
    pts = image_points_mm(reference)
    disp = scanner_to_template(truth, pts, series, frame) - pts
    nx, ny, nz = reference.GetSize()
    field = sitk.GetImageFromArray(disp.reshape(nz, ny, nx, 3), isVector=True)
    field.SetOrigin(reference.GetOrigin())
    field.SetSpacing(reference.GetSpacing())
    field.SetDirection(reference.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def mr_to_pet_points(truth: dict, points_lps, frame: int = 0) -> np.ndarray:
    """True PET (frame) scanner position of T1 scanner points: ``A_pet^-1(A_mr(p))`` (the warp cancels).

    Nearly rigid: the head size is applied along each series' scanner axes, so the two poses differ by a
    rotation of a slightly anisotropic (<= ~3 %) scaling; that residual is part of the truth.
    """
    m = np.linalg.inv(_series_matrix(truth, "pet", frame)) @ _series_matrix(truth, "mr", 0)
    p = np.asarray(points_lps, dtype=float)
    return (p.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]).reshape(p.shape)


# --------------------------------------------------------------------------- PET regions and activity
@functools.lru_cache(maxsize=1)
def _region_labels() -> np.ndarray:
    """(z, y, x) label map on the phantom grid: k + 1 inside the k-th PET_REGIONS box set, 0 elsewhere.

    The cerebellar reference rule is removed from every region (it never is a target region).
    """
    ph = head_phantom()["images"]
    ref = ph["gm"]
    pts = image_points_mm(ref)
    ras = pts @ LPS_FROM_RAS.T  # LPS -> RAS is the same sign flip
    labels = np.zeros(len(pts), np.int8)
    for k, boxes in enumerate(PET_REGIONS.values(), start=1):
        inside = np.zeros(len(pts), bool)
        for box in boxes:
            inside |= np.all([(ras[:, a] >= box[a][0]) & (ras[:, a] <= box[a][1]) for a in range(3)], axis=0)
        if (labels[inside] > 0).any():
            raise RuntimeError("PET_REGIONS boxes overlap")
        labels[inside] = k
    labels = labels.reshape(sitk.GetArrayFromImage(ref).shape)
    labels[sitk.GetArrayFromImage(ph["cereb"]) > 0] = 0
    return labels


@functools.lru_cache(maxsize=1)
def _region_mask_images() -> tuple:
    ref = head_phantom()["images"]["gm"]
    labels = _region_labels()
    out = []
    for k, name in enumerate(PET_REGIONS, start=1):
        img = sitk.GetImageFromArray((labels == k).astype(np.float32))
        img.CopyInformation(ref)
        out.append((name, img))
    return tuple(out)


def pet_region_masks() -> dict[str, sitk.Image]:
    """Template-space box masks (float32 0/1, phantom grid) of the PET regions, cerebellar rule removed."""
    return dict(_region_mask_images())


def pet_activity_template(truth: dict, blurred: bool = True) -> sitk.Image:
    """Noise-free PET activity (Bq/ml) in template space from a truth record, PSF-blurred unless told not to.

    Grey matter takes its region's SUVR x the cerebellar uptake (cerebellar rule: the cerebellar uptake;
    elsewhere ``uptake_bqml.grey_matter``); white matter, CSF and scalp their uptakes; partial-volume weighted
    by the phantom's tissue fractions.  This is what every PET frame is resampled from.  Use it with a template
    -space ROI mask to get the SUVR a perfect pipeline would measure for any atlas.
    """
    pet = truth["pet"]
    up, suvr = pet["uptake_bqml"], pet["suvr_true"]
    ph = head_phantom()["images"]
    a = {k: sitk.GetArrayFromImage(ph[k]) for k in ("gm", "wm", "csf", "cereb", "scalp")}
    labels = _region_labels()
    gm_act = np.full(labels.shape, up["grey_matter"], dtype=float)
    for k, name in enumerate(PET_REGIONS, start=1):
        gm_act[labels == k] = suvr[name] * up["cerebellum"]
    gm_act[a["cereb"] > 0] = up["cerebellum"]
    act = a["gm"] * gm_act + a["wm"] * up["white_matter"] + a["csf"] * up["csf"] + a["scalp"] * up["scalp"]
    img = sitk.GetImageFromArray(act.astype(np.float32))
    img.CopyInformation(ph["gm"])
    if blurred:
        img = sitk.SmoothingRecursiveGaussian(img, float(pet["psf_fwhm_mm"]) / 2.3548)
    return img


EXPECTED_SUVR_DEFINITION = (
    "in template space: mean of the noise-free PSF-blurred activity (pet_activity_template) over the region's "
    "voxels with tissue fraction >= 0.5 (grey matter for regions, other_grey_matter and the reference; white "
    "matter for white_matter), divided by the same over the reference (cerebellar rule, grey matter >= 0.5). "
    "What a pipeline with perfect registration measures on an infinitely fine grid; PET resampling to 4 mm and "
    "noise add a little. partial_volume_ratio = expected_suvr / suvr_true: the partial-volume effect (< 1 for "
    "hot grey matter next to cooler white matter, > 1 for white matter)")


def expected_suvr(truth: dict) -> dict[str, float]:
    """The measurement truth per region (see EXPECTED_SUVR_DEFINITION), recomputed from a truth record."""
    blurred = sitk.GetArrayFromImage(pet_activity_template(truth))
    ph = head_phantom()["images"]
    gm = sitk.GetArrayFromImage(ph["gm"]) >= 0.5
    wm = sitk.GetArrayFromImage(ph["wm"]) >= 0.5
    cereb = sitk.GetArrayFromImage(ph["cereb"]) > 0
    labels = _region_labels()
    ref = float(blurred[gm & cereb].mean())
    out = {name: float(blurred[gm & (labels == k)].mean()) / ref for k, name in enumerate(PET_REGIONS, start=1)}
    out["other_grey_matter"] = float(blurred[gm & (labels == 0) & ~cereb].mean()) / ref
    out["white_matter"] = float(blurred[wm].mean()) / ref
    out["cerebellar_grey_matter"] = 1.0
    return {k: round(v, 6) for k, v in out.items()}


# --------------------------------------------------------------------------- NIfTI upload layout
def _write_nifti(path: pathlib.Path, img: sitk.Image, descrip: str, comment: str | None = None) -> None:
    """Geometry by SimpleITK (LPS -> RAS qform/sform); ``descrip`` and a comment extension patched by nibabel.

    Both carry patient identifiers on purpose: that is where converters and scanner consoles leave them.
    """
    import nibabel as nib

    tmp = path.with_name("." + path.name.replace(".nii.gz", ".tmp.nii"))
    sitk.WriteImage(img, str(tmp))
    try:
        nii = nib.load(str(tmp), mmap=False)
        data = np.asarray(nii.dataobj)
        hdr = nii.header.copy()
        hdr["descrip"] = descrip.encode("ascii", "replace")[:79]
        if comment:
            hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", comment.encode("ascii", "replace")))
        nib.save(nib.Nifti1Image(data, nii.affine, hdr), str(path))
    finally:
        tmp.unlink(missing_ok=True)


def _image(arr: np.ndarray, grid: sitk.Image, pixel_id: int) -> sitk.Image:
    img = sitk.Cast(sitk.GetImageFromArray(arr), pixel_id)
    img.CopyInformation(grid)
    return img


def _pet_sidecar(study: phi.Study, timing: list[dict], weight_kg: float, dose_bq: float,
                 acquisition_datetime: str) -> dict:
    """BIDS-PET-like sidecar (times in seconds relative to TimeZero = scan start), plus identifiers to remove.

    Not BIDS: ``RadionuclideHalfLife`` (s; dcm2niix writes it too) and the DICOM-style identifying keys
    (PatientName, PatientID, PatientBirthDate, AcquisitionDateTime, InstitutionName) a careless export keeps.
    """
    t = study.study_time
    return {
        "Modality": "PT", "Manufacturer": "SynthCo", "TracerName": "FDG", "TracerRadionuclide": "F18",
        "Units": "Bq/mL", "InjectedRadioactivity": round(dose_bq / 1e6, 7), "InjectedRadioactivityUnits": "MBq",
        "RadionuclideHalfLife": F18_HALF_LIFE_S, "TimeZero": f"{t[:2]}:{t[2:4]}:{t[4:6]}", "ScanStart": 0,
        "InjectionStart": -INJECTION_BEFORE_SCAN_S,
        "FrameTimesStart": [tm["start_s"] for tm in timing], "FrameDuration": [tm["duration_s"] for tm in timing],
        "ImageDecayCorrected": True, "ImageDecayCorrectionTime": 0,
        "DecayCorrectionFactor": [round(_decay_factor(tm["start_s"], tm["duration_s"]), 6) for tm in timing],
        "AttenuationCorrection": "MR-based", "ReconMethodName": "OSEM", "ReconMethodParameterValues": [4, 16],
        "ReconMethodParameterLabels": ["iterations", "subsets"], "BodyWeight": round(weight_kg, 1),
        "PatientName": study.patient.name, "PatientID": study.patient.patient_id,
        "PatientBirthDate": study.patient.birth_date, "AcquisitionDateTime": acquisition_datetime,
        "InstitutionName": study.institution,
    }


# --------------------------------------------------------------------------- one session
def synthesize_study(out: pathlib.Path, label: str, rng: np.random.Generator, *, with_pet: bool = True,
                     mr_voxel_mm: float = 2.0, pet_voxel_mm: float = 4.0, noise_fraction: float = 0.02,
                     bias_amplitude: tuple[float, float] = (0.25, 0.40), max_rotation_deg: float = 6.0,
                     max_translation_mm: float = 8.0, pet_fwhm_mm: float = 6.0,
                     head_scale: tuple[float, float] = (0.86, 0.97), warp_mm: float = 4.0, pet_frames: int = 1,
                     pet_frame_s: float = 300.0, max_frame_rotation_deg: float = 2.0,
                     max_frame_translation_mm: float = 2.5, layout: str = "dicom", with_bold: bool = False,
                     with_dwi: bool = False, series4d_style: str = "enhanced", bold_volumes: int = 80,
                     patient: phi.Patient | None = None, study_date: str | None = None,
                     head_scale_xyz=None, anatomy_seed: int | None = None, region_suvr=None) -> dict:
    """One session: a T1 (and a PET unless ``with_pet`` is False) in ``layout``; returns the truth record.

    ``warp_mm``: peak displacement of the largest anatomy-warp bump (0: the subject is an affine copy of the
    template).  ``pet_frames``: 1 = a static 600 s frame; n > 1 = n frames of ``pet_frame_s`` with inter-frame
    motion up to ``max_frame_rotation_deg`` / ``max_frame_translation_mm`` per axis.  ``layout``: "dicom" or
    "nifti" (see the module docstring).  ``with_bold`` / ``with_dwi``: add a BOLD run with its events table and a
    DWI series in the same head (:mod:`.synth_session4d`; DICOM as ``series4d_style`` "classic" per-slice files or
    one "enhanced" multi-frame object; ``bold_volumes`` long).

    Longitudinal sessions of one subject (:mod:`.synth_longitudinal`) fix what would otherwise be drawn; every
    draw still happens, so the rest of the session is what the same ``rng`` gives without them:
    ``patient`` (a :class:`~imaging_tasks.synth.phi.Patient`: the same PatientID, name and birth date in every
    session), ``study_date`` (``YYYYMMDD``), ``head_scale_xyz`` (the head's scale per scanner axis, 3 floats),
    ``anatomy_seed`` (the anatomy warp drawn from ``default_rng(anatomy_seed)``: the same brain in every
    session) and ``region_suvr`` (true SUVRs by :data:`PET_REGIONS` name, and ``other_grey_matter`` for the rest
    of the cortex, 0.5-4; regions not named keep their drawn SUVR).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    pet_frames = int(pet_frames)
    if pet_frames < 1:
        raise ValueError(f"pet_frames must be >= 1, not {pet_frames}")
    ph = head_phantom()
    img = ph["images"]
    # Children for what later versions added; spawning does not advance ``rng`` (see _extra_rngs).
    warp_rng, suvr_rng, motion_rng, frame_noise_rng = _extra_rngs(rng, 4)
    study = phi.fake_study(rng, label)
    if patient is not None:
        study.patient = patient
    if study_date is not None:
        if len(str(study_date)) != 8 or not str(study_date).isdigit():
            raise ValueError(f"study_date must be YYYYMMDD, not {study_date!r}")
        study.study_date = str(study_date)
    region_suvr = dict(region_suvr or {})
    unknown = sorted(set(region_suvr) - set(PET_REGIONS) - {"other_grey_matter"})
    if unknown or not all(0.5 <= float(v) <= 4.0 for v in region_suvr.values()):
        raise ValueError(f"region_suvr takes SUVRs 0.5-4 of {sorted(PET_REGIONS)} or other_grey_matter; got "
                         f"{region_suvr}")
    if layout == "dicom":
        study_dir = out / SPECIALTY / label
    else:
        # Research uploads: patient and session folders named by identifiers (keyed pseudonyms after intake).
        study_dir = out / SPECIALTY / study.patient.patient_id / study.study_date
        t = study.study_time
        acquisition_dt = f"{study.study_date[:4]}-{study.study_date[4:6]}-{study.study_date[6:]}T" \
                         f"{t[:2]}:{t[2:4]}:{t[4:6]}"
        study.extra_phi += [study.study_date, acquisition_dt]
    nifti = layout == "nifti"

    # --- MR ---------------------------------------------------------------------------------------------
    # Head size: the MNI152 brain (1.9 l) is larger than most; each subject is a scaled copy (about 1.2-1.7 l).
    scale = rng.uniform(*head_scale) * rng.uniform(0.97, 1.03, 3)
    if head_scale_xyz is not None:
        scale = np.asarray(head_scale_xyz, dtype=float).reshape(3)
    mr_pose = _pose(rng, ph["centre_lps"], scale, max_rotation_deg, max_translation_mm)
    if anatomy_seed is not None:
        warp_rng = np.random.default_rng(anatomy_seed)
    geo = {"mr": {"pose": mr_pose["truth"], "warp": _draw_warp(warp_rng, warp_mm)}}
    extent = ph["extent_mm"] * scale.max()
    grid = _grid(ph["centre_lps"], extent, mr_voxel_mm, margin_mm=max_translation_mm + 6.0)
    to_template = scanner_to_template_transform(geo, grid, "mr")
    t1 = _resample(img["t1"], grid, to_template)
    brain = _resample(img["brain"], grid, to_template)
    icv = _resample(img["icv"], grid, to_template)
    tissue = {k: _resample(img[k], grid, to_template) for k in ("gm", "wm", "csf")}
    head = ndi.binary_fill_holes(t1 > 0.5 * SKULL_T1) | (brain > 0.5)
    bias, bias_params = _bias(rng, grid, head, float(rng.uniform(*bias_amplitude)))
    sigma = noise_fraction * MR_SCALE
    signal = t1 * MR_SCALE * bias
    mag = np.sqrt((signal + rng.normal(0, sigma, signal.shape)) ** 2 + rng.normal(0, sigma, signal.shape) ** 2)
    mr_vol = np.clip(np.rint(mag), 0, 4095).astype(np.uint16)
    mr_series = _write_mr(study, rng, None if nifti else study_dir / "t1", grid, mr_vol)
    voxel_ml = float(np.prod(grid.GetSpacing())) / 1000.0
    if nifti:
        study_dir.mkdir(parents=True, exist_ok=True)
        p = study.patient
        _write_nifti(study_dir / "mri.nii.gz", _image(mr_vol, grid, sitk.sitkUInt16),
                     descrip=f"T1w MPRAGE {p.name} {p.patient_id} {study.study_date}",
                     comment=f"PatientName={p.name}; PatientID={p.patient_id}; PatientBirthDate={p.birth_date}; "
                             f"StudyDate={study.study_date}; InstitutionName={study.institution}")

    def ml(a: np.ndarray) -> float:
        return round(float(a.sum()) * voxel_ml, 3)

    truth = {
        "mr": {
            "series_uid": None if nifti else mr_series, "file": "mri.nii.gz" if nifti else "t1/",
            "n_slices": int(mr_vol.shape[0]), "voxel_mm": mr_voxel_mm,
            "pose": mr_pose["truth"], "warp": geo["mr"]["warp"], "noise_sigma": sigma, "intensity_scale": MR_SCALE,
        },
        # Partial-volume sums of the linearly resampled template maps: the volumes in scanner space.
        "brain_volume_ml": ml(brain),
        "intracranial_volume_ml": ml(icv),
        "parenchyma_volume_ml": ml(tissue["gm"] + tissue["wm"]),
        "grey_matter_volume_ml": ml(tissue["gm"]),
        "white_matter_volume_ml": ml(tissue["wm"]),
        "csf_volume_ml": ml(tissue["csf"]),
        "brain_volume_template_ml": round(ph["template_brain_ml"], 3),
        "intracranial_volume_template_ml": round(ph["template_icv_ml"], 3),
        "brain_mask_definition": "nilearn load_mni152_brain_mask(resolution=2) (MNI152 2009a template > 0.2)",
        "intracranial_definition": "brain envelope (closing, holes filled) grown by the CSF gap; inner skull table",
        "tissue_volume_definition": "partial-volume sums on the T1 grid of the MNI152 GM/WM maps (clipped, "
                                    "scaled to sum <= 1, inside the brain mask) and CSF = (1 - GM - WM) inside the "
                                    "intracranial space; parenchyma = GM + WM (brain_volume_ml is the MNI brain "
                                    "mask, which also holds the ventricles)",
        "head_layers_mm": ph["layers_mm"],
        "nerve_bridges": ph["nerve_bridges"],
        "t1_relative_intensity": {"csf": CSF_T1, "skull": SKULL_T1, "scalp": SCALP_T1,
                                  "brain": "MNI152 template 0..1 (white matter ~0.9)"},
        "bias_field": bias_params,
        "pet": None,
    }

    # --- PET ---------------------------------------------------------------------------------------------
    if with_pet:
        uptake = {"grey_matter": float(rng.uniform(9000, 13000)), "white_matter": float(rng.uniform(3500, 5000)),
                  "cerebellum": float(rng.uniform(6500, 8500)), "csf": float(rng.uniform(300, 700)),
                  "scalp": float(rng.uniform(1000, 2000))}
        uptake = {k: round(v, 3) for k, v in uptake.items()}
        if "other_grey_matter" in region_suvr:
            uptake["grey_matter"] = round(float(region_suvr["other_grey_matter"]) * uptake["cerebellum"], 3)
        other = uptake["grey_matter"] / uptake["cerebellum"]
        factors = suvr_rng.uniform(*PET_REGION_SUVR_FACTOR, len(PET_REGIONS))
        suvr_true = {name: round(float(np.clip(other * f, *PET_REGION_SUVR_RANGE)), 6)
                     for name, f in zip(PET_REGIONS, factors)}
        suvr_true.update({name: round(float(v), 6) for name, v in region_suvr.items() if name in PET_REGIONS})
        suvr_true.update(other_grey_matter=round(other, 6), cerebellar_grey_matter=1.0,
                         white_matter=round(uptake["white_matter"] / uptake["cerebellum"], 6))
        pet_truth = {"uptake_bqml": uptake, "suvr_true": suvr_true, "psf_fwhm_mm": pet_fwhm_mm}
        act_img = pet_activity_template({"pet": pet_truth})
        pet_pose = _pose(rng, ph["centre_lps"], scale, max_rotation_deg, max_translation_mm)
        if pet_frames == 1:
            timing = [{"start_s": 0.0, "duration_s": STATIC_FRAME_S}]
            motion_margin = 0.0
        else:
            timing = [{"start_s": f * float(pet_frame_s), "duration_s": float(pet_frame_s)} for f in range(pet_frames)]
            motion_margin = max_frame_translation_mm + 80.0 * np.deg2rad(max_frame_rotation_deg)
        frames = []
        for f, tm in enumerate(timing):
            rot = np.zeros(3) if f == 0 else motion_rng.uniform(-max_frame_rotation_deg, max_frame_rotation_deg, 3)
            shift = np.zeros(3) if f == 0 else motion_rng.uniform(-max_frame_translation_mm,
                                                                   max_frame_translation_mm, 3)
            frames.append({**tm, "rotation_deg": [round(float(r), 6) for r in rot],
                           "translation_mm": [round(float(s), 6) for s in shift],
                           "center_mm": [round(float(c), 6) for c in ph["centre_lps"]],
                           "noise_fraction": round(PET_NOISE_STATIC * float(np.sqrt(STATIC_FRAME_S / tm["duration_s"])),
                                                   6)})
        geo["pet"] = {"pose": pet_pose["truth"], "frames": frames}
        for f, rec in enumerate(frames):
            rec["matrix_4x4"] = [[round(float(v), 9) for v in row] for row in _matrix(frame_transform(geo, f))]
        pgrid = _grid(ph["centre_lps"], extent, pet_voxel_mm, margin_mm=max_translation_mm + 8.0 + motion_margin)
        pet_arrays = []
        for f, rec in enumerate(frames):
            act = _resample(act_img, pgrid, scanner_to_template_transform(geo, pgrid, "pet", f))
            if pet_frames == 1:
                noise = rng.normal(0, PET_NOISE_STATIC, act.shape)
            elif f == 0:  # the first version's draw, scaled to the frame's noise
                noise = rng.normal(0, PET_NOISE_STATIC, act.shape) * (rec["noise_fraction"] / PET_NOISE_STATIC)
            else:
                noise = frame_noise_rng.normal(0, rec["noise_fraction"], act.shape)
            pet_arrays.append(np.clip(act * (1.0 + noise), 0, None).astype(np.float32))
        weight = float(rng.uniform(55, 95))
        dose = float(rng.uniform(150e6, 250e6))
        pet_series = _write_pet(study, rng, None if nifti else study_dir / "pet", pgrid, pet_arrays, timing,
                                weight, dose)
        if nifti:
            pet_imgs = [_image(a, pgrid, sitk.sitkFloat32) for a in pet_arrays]
            pet_img = pet_imgs[0] if pet_frames == 1 else sitk.JoinSeries(pet_imgs, 0.0, float(pet_frame_s))
            _write_nifti(study_dir / "pet.nii.gz", pet_img,
                         descrip=f"FDG {study.patient.name} {study.patient.patient_id}")
            sidecar = _pet_sidecar(study, timing, weight, dose, acquisition_dt)
            (study_dir / "pet.json").write_text(json.dumps(sidecar, indent=2))
        weight_r, dose_r = round(weight, 1), round(dose, 1)
        dose_at_start = dose_r * 2.0 ** (-INJECTION_BEFORE_SCAN_S / F18_HALF_LIFE_S)
        pet_truth.update({
            "series_uid": None if nifti else pet_series, "file": "pet.nii.gz" if nifti else "pet/",
            "n_slices": int(pet_arrays[0].shape[0]), "n_frames": pet_frames, "voxel_mm": pet_voxel_mm,
            "pose": pet_pose["truth"], "units": "BQML",
            "reference_region": "cerebellum",
            "reference_region_definition": {"tissue": "grey matter", "mni_ras": CEREBELLUM_RULE},
            "suvr_grey_matter": suvr_true["other_grey_matter"],
            "suvr_white_matter": suvr_true["white_matter"],
            "regions": {name: {"boxes_mni_ras_mm": boxes, "tissue": "grey matter"} for name, boxes in
                        PET_REGIONS.items()},
            "regions_definition": "boxes [[x0, x1], [y0, y1], [z0, z1]] in MNI (RAS) mm, bounds inclusive, on "
                                  "template voxel centres, minus the cerebellar reference rule; grey matter in a "
                                  "region has activity suvr_true[region] x uptake_bqml.cerebellum; grey matter "
                                  "elsewhere outside the cerebellum uptake_bqml.grey_matter (other_grey_matter)",
            "frames": frames,
            "frame_motion_definition": "frame f scanner LPS mm -> frame 0 scanner LPS mm: p0 = R (p - center_mm) "
                                       "+ center_mm + translation_mm, R from rotation_deg as in pose "
                                       "(SimpleITK Euler3DTransform, frame_transform()); frame 0 is the identity",
            "frame_timing_definition": "start_s from the series start (DICOM: AcquisitionTime = frame start, "
                                       "FrameReferenceTime = mid-frame in ms, ActualFrameDuration in ms); all "
                                       "frames decay-corrected to the series start, so activity does not change "
                                       "between frames",
            "patient_weight_kg": weight_r, "injected_dose_bq": dose_r,
            "half_life_s": F18_HALF_LIFE_S, "injection_to_scan_s": INJECTION_BEFORE_SCAN_S,
            "decay_correction": "START",
            "suv_factor": round(weight_r * 1000.0 / dose_at_start, 12),
            "suv_factor_definition": "SUV = Bq/ml x suv_factor; suv_factor = weight_g / (injected_dose_bq x "
                                     "2^(-injection_to_scan_s / half_life_s)) (dose decayed to the series start)",
            "noise": "multiplicative Gaussian per voxel, noise_fraction per frame (5 % for 600 s, x sqrt(600 / "
                     "duration_s)); each frame its own draw",
        })
        pet_truth["expected_suvr"] = expected_suvr({"pet": pet_truth})
        pet_truth["partial_volume_ratio"] = {k: round(pet_truth["expected_suvr"][k] / v, 6)
                                             for k, v in suvr_true.items()}
        pet_truth["expected_suvr_definition"] = EXPECTED_SUVR_DEFINITION
        truth["pet"] = pet_truth
    truth["bold"] = truth["dwi"] = None
    if with_bold or with_dwi:  # children spawned after the first four: nothing drawn before changes
        from imaging_tasks.neuroimaging.synth_session4d import add_bold, add_dwi

        bold_rng, dwi_rng = _extra_rngs(rng, 2)

        def series_grid(voxel_mm: float):  # the head did not move between the MR series
            g = _grid(ph["centre_lps"], extent, voxel_mm, margin_mm=4.0)
            return g, scanner_to_template_transform(geo, g, "mr")

        if with_bold:
            truth["bold"] = add_bold(study_dir, study, bold_rng, ph, series_grid, layout=layout, style=series4d_style,
                                     n_volumes=bold_volumes)
        if with_dwi:
            truth["dwi"] = add_dwi(study_dir, study, dwi_rng, ph, series_grid, layout=layout, style=series4d_style)
    truth["session_complete"] = bool(with_pet)

    truth_path = out / "_truth" / SPECIALTY / f"{label}.json"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"specialty": SPECIALTY, "label": label, "study_uid": study.study_uid, "phi": phi.phi_values(study),
              "layout": layout, "session_folder": study_dir.relative_to(out).as_posix(), "truth": truth}
    truth_path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return record


def synthesize(out: pathlib.Path, studies: int, seed: int, *, with_pet: bool | list[bool] = True,
               **options) -> list[pathlib.Path]:
    """Write ``studies`` sessions; the truth paths.

    ``with_pet``, ``layout``, ``pet_frames`` and ``warp_mm`` may be one value or a list with one per study (e.g.
    MR-only sessions, a NIfTI upload next to a DICOM one); other options go to every :func:`synthesize_study`.
    Each study's subject depends only on ``seed`` and its index, not on the options of the others.
    """
    out = pathlib.Path(out)
    rng = np.random.default_rng(seed)
    per_study = {"with_pet": with_pet, **{k: options.pop(k) for k in PER_STUDY_OPTIONS if k in options}}
    values = {}
    for key, value in per_study.items():
        values[key] = list(value) if isinstance(value, (list, tuple)) else [value] * studies
        if len(values[key]) != studies:
            raise ValueError(f"{key} has {len(values[key])} values for {studies} studies")
    paths = []
    for i in range(studies):
        label = f"study-{i:03d}"
        study_rng = np.random.default_rng(rng.integers(0, 2**63))
        synthesize_study(out, label, study_rng, **{k: v[i] for k, v in values.items()}, **options)
        paths.append(out / "_truth" / SPECIALTY / f"{label}.json")
    return paths


__all__ = ["EXPECTED_SUVR_DEFINITION", "LAYOUTS", "PET_REGIONS", "SPECIALTY", "WARP_DEFINITION", "bias_field_at",
           "expected_suvr", "frame_transform", "head_phantom", "image_points_mm", "mr_to_pet_points",
           "pet_activity_template", "pet_region_masks", "pose_transform", "scanner_to_template",
           "scanner_to_template_transform", "synthesize", "synthesize_study", "template_to_scanner",
           "truth_on_grid", "warp_displacement"]


# --------------------------------------------------------------------------- malformed-but-readable cases
# {case: (edit of a copy of a study written here, reason processing must give; None: must still process)}
MALFORMED = {
    "no_pixel_spacing": (lambda f: mf.edit(mf.mr_series(f), mf.remove(("PixelSpacing",))), "missing_pixel_spacing"),
    "zero_pixel_spacing": (lambda f: mf.edit(mf.mr_series(f), mf.put("PixelSpacing", ["0", "0"])),
                           "invalid_pixel_spacing"),
    "nan_pixel_spacing": (lambda f: mf.edit(mf.mr_series(f), mf.put("PixelSpacing", ["nan", "nan"])),
                          "invalid_pixel_spacing"),
    "few_slices": (lambda f: mf.keep_slices(mf.mr_series(f), 12), "not_volumetric"),
    "spacing_differs_on_a_slice": (lambda f: mf.other_spacing_on_one_slice(mf.mr_series(f)), "mixed_geometry"),
    "tilted_slice": (lambda f: mf.tilt_one_slice(mf.mr_series(f)), "mixed_geometry"),
    "duplicate_position": (lambda f: mf.duplicate_position(mf.mr_series(f)), "duplicate_slice_positions"),
    "missing_slice": (lambda f: mf.drop_middle_slice(mf.mr_series(f)), "irregular_slices"),
    "rgb": (lambda f: mf.to_rgb(mf.mr_series(f)), "unsupported_photometric"),
    "blank": (lambda f: mf.blank_pixels(mf.mr_series(f)), "blank_image"),
    "shuffled": (lambda f: mf.shuffle_instance_numbers(mf.mr_series(f)), None),
}
