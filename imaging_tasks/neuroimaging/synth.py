"""Synthetic brain MR (T1) + PET sessions built from nilearn's shipped MNI152 template, with known truth.

Why the template rather than a geometric phantom: brain extraction and N4 have to face real cortical folding,
ventricles and grey/white contrast.  What is added on top is known exactly, so tests can check against it:

* a head size (the template scaled by about 0.86-0.97 per axis, so brain volumes vary between subjects and
  are realistic) and a rigid pose per series: ``T(p) = R S^-1 (p - c) + c + t`` (scanner -> template, LPS mm);
* around the brain, a CSF gap, a dark skull and a bright fat-like scalp, bridged by two optic-nerve-like
  tissue tubes from the orbitofrontal brain to the scalp, so that neither a threshold nor a threshold plus
  largest component extracts the brain;
* a smooth multiplicative bias field ``b(p) = exp(sum_k c_k phi_k(u) - offset)``, ``u = (p - centre) / scale``,
  with second-order polynomial terms ``phi``, evaluated in scanner coordinates (the coil does not move);
* Rician noise, as in magnitude MR images;
* for PET, region-wise activity (grey matter, white matter, cerebellar reference, CSF, scalp) in Bq/ml,
  blurred by the scanner PSF and stored with per-slice RescaleSlope (Units BQML).

Layout: ``out/neuroimaging/<label>/t1/*.dcm`` and ``out/neuroimaging/<label>/pet/*.dcm`` (PET optional).
Everything is nilearn data shipped in the wheel (no download); nilearn's own resampling to 2 mm is
deterministic.  The template is skull-stripped and covers the brain down to the lower brainstem, where the
grid ends; the synthetic skull closes under that cut (a skull base).
"""
from __future__ import annotations

import functools
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

# Relative T1 intensities of the added tissues (template brain is 0..1, white matter ~0.85-0.95).
CSF_T1, SKULL_T1, SCALP_T1, NERVE_T1 = 0.12, 0.03, 0.95, 0.6
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
    lps = LPS_FROM_RAS @ affine_ras[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple((lps / spacing).ravel().tolist()))
    img.SetOrigin(tuple((LPS_FROM_RAS @ affine_ras[:3, 3]).tolist()))
    return img


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


def truth_on_grid(truth: dict, reference: sitk.Image, name: str, series: str = "mr") -> np.ndarray:
    """A phantom map (``brain``, ``icv``, ``gm``, ``wm``, ``csf``, ``cereb``, ``t1``) on a series' grid, (z, y, x).

    For tests and benchmarks: what the masks are, in the scanner space of that series, by construction.
    """
    img = head_phantom()["images"][name]
    return _resample(img, reference, pose_transform(truth[series]["pose"]))


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


def _write_mr(study: phi.Study, rng: np.random.Generator, folder: pathlib.Path, grid: sitk.Image,
              vol: np.ndarray) -> str:
    series_uid = phi.new_uid(rng)
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


def _write_pet(study: phi.Study, rng: np.random.Generator, folder: pathlib.Path, grid: sitk.Image,
               vol_bqml: np.ndarray, weight_kg: float, dose_bq: float) -> str:
    series_uid = phi.new_uid(rng)
    folder.mkdir(parents=True, exist_ok=True)
    hh, mm, ss = int(study.study_time[:2]), int(study.study_time[2:4]), int(study.study_time[4:6])
    inj = (hh * 3600 + mm * 60 + ss) - 45 * 60
    inj_time = f"{inj // 3600:02d}{inj % 3600 // 60:02d}{inj % 60:02d}"
    for k in range(vol_bqml.shape[0]):
        ds = phi.dicom_dataset(study, modality="PT", sop_class_uid=PET_SOP_CLASS, series_uid=series_uid,
                               sop_uid=phi.new_uid(rng), series_number=5, instance_number=k + 1,
                               series_description="PET Brain FDG AC")
        _geometry(ds, grid, k)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.Units = "BQML"
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.CountsSource = "EMISSION"
        ds.CorrectedImage = ["ATTN", "SCAT", "DECY", "RAN", "NORM", "DTIM"]
        ds.DecayCorrection = "START"
        ds.ReconstructionMethod = "OSEM 4i16s"
        ds.AttenuationCorrectionMethod = "MR-based"
        ds.FrameReferenceTime = "0"
        ds.ActualFrameDuration = 600000
        ds.NumberOfSlices = vol_bqml.shape[0]
        ds.ImageIndex = k + 1
        ds.DecayFactor = "1.0"
        ds.PatientWeight = f"{weight_kg:.1f}"
        rad = Dataset()
        rad.Radiopharmaceutical = "Fludeoxyglucose F^18^"
        rad.RadiopharmaceuticalStartTime = inj_time
        rad.RadionuclideTotalDose = f"{dose_bq:.1f}"
        rad.RadionuclideHalfLife = "6586.2"
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
        phi.write_dicom(ds, str(folder / f"{k + 1:04d}.dcm"))
    return series_uid


def synthesize_study(out: pathlib.Path, label: str, rng: np.random.Generator, *, with_pet: bool = True,
                     mr_voxel_mm: float = 2.0, pet_voxel_mm: float = 4.0, noise_fraction: float = 0.02,
                     bias_amplitude: tuple[float, float] = (0.25, 0.40), max_rotation_deg: float = 6.0,
                     max_translation_mm: float = 8.0, pet_fwhm_mm: float = 6.0,
                     head_scale: tuple[float, float] = (0.86, 0.97)) -> dict:
    """One session: a T1 series (and a PET series unless ``with_pet`` is False); returns the truth record."""
    ph = head_phantom()
    img = ph["images"]
    study = phi.fake_study(rng, label)
    study_dir = out / SPECIALTY / label

    # --- MR ---------------------------------------------------------------------------------------------
    # Head size: the MNI152 brain (1.9 l) is larger than most; each subject is a scaled copy (about 1.2-1.7 l).
    scale = rng.uniform(*head_scale) * rng.uniform(0.97, 1.03, 3)
    mr_pose = _pose(rng, ph["centre_lps"], scale, max_rotation_deg, max_translation_mm)
    extent = ph["extent_mm"] * scale.max()
    grid = _grid(ph["centre_lps"], extent, mr_voxel_mm, margin_mm=max_translation_mm + 6.0)
    to_template = mr_pose["transform"]
    t1 = _resample(img["t1"], grid, to_template)
    brain = _resample(img["brain"], grid, to_template)
    icv = _resample(img["icv"], grid, to_template)
    head = ndi.binary_fill_holes(t1 > 0.5 * SKULL_T1) | (brain > 0.5)
    bias, bias_params = _bias(rng, grid, head, float(rng.uniform(*bias_amplitude)))
    sigma = noise_fraction * MR_SCALE
    signal = t1 * MR_SCALE * bias
    mag = np.sqrt((signal + rng.normal(0, sigma, signal.shape)) ** 2 + rng.normal(0, sigma, signal.shape) ** 2)
    mr_vol = np.clip(np.rint(mag), 0, 4095).astype(np.uint16)
    mr_series = _write_mr(study, rng, study_dir / "t1", grid, mr_vol)
    voxel_ml = float(np.prod(grid.GetSpacing())) / 1000.0

    truth = {
        "mr": {
            "series_uid": mr_series, "n_slices": int(mr_vol.shape[0]), "voxel_mm": mr_voxel_mm,
            "pose": mr_pose["truth"], "noise_sigma": sigma, "intensity_scale": MR_SCALE,
        },
        # Partial-volume sums of the linearly resampled template masks: the mask volume in scanner space.
        "brain_volume_ml": round(float(brain.sum()) * voxel_ml, 3),
        "intracranial_volume_ml": round(float(icv.sum()) * voxel_ml, 3),
        "brain_volume_template_ml": round(ph["template_brain_ml"], 3),
        "intracranial_volume_template_ml": round(ph["template_icv_ml"], 3),
        "brain_mask_definition": "nilearn load_mni152_brain_mask(resolution=2) (MNI152 2009a template > 0.2)",
        "intracranial_definition": "brain envelope (closing, holes filled) grown by the CSF gap; inner skull table",
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
        a = {k: sitk.GetArrayFromImage(img[k]) for k in ("gm", "wm", "csf", "cereb", "scalp")}
        gm_act = np.where(a["cereb"] > 0, uptake["cerebellum"], uptake["grey_matter"])
        act = a["gm"] * gm_act + a["wm"] * uptake["white_matter"] + a["csf"] * uptake["csf"] \
            + a["scalp"] * uptake["scalp"]
        act_img = sitk.GetImageFromArray(act.astype(np.float32))
        act_img.CopyInformation(img["gm"])
        act_img = sitk.SmoothingRecursiveGaussian(act_img, pet_fwhm_mm / 2.3548)
        pet_pose = _pose(rng, ph["centre_lps"], scale, max_rotation_deg, max_translation_mm)
        pgrid = _grid(ph["centre_lps"], extent, pet_voxel_mm, margin_mm=max_translation_mm + 8.0)
        pet = _resample(act_img, pgrid, pet_pose["transform"])
        pet = np.clip(pet * (1.0 + rng.normal(0, 0.05, pet.shape)), 0, None).astype(np.float32)
        weight = float(rng.uniform(55, 95))
        dose = float(rng.uniform(150e6, 250e6))
        pet_series = _write_pet(study, rng, study_dir / "pet", pgrid, pet, weight, dose)
        truth["pet"] = {
            "series_uid": pet_series, "n_slices": int(pet.shape[0]), "voxel_mm": pet_voxel_mm,
            "pose": pet_pose["truth"], "psf_fwhm_mm": pet_fwhm_mm, "units": "BQML",
            "uptake_bqml": {k: round(v, 3) for k, v in uptake.items()},
            "reference_region": "cerebellum",
            "reference_region_definition": {"tissue": "grey matter", "mni_ras": CEREBELLUM_RULE},
            "suvr_grey_matter": round(uptake["grey_matter"] / uptake["cerebellum"], 6),
            "suvr_white_matter": round(uptake["white_matter"] / uptake["cerebellum"], 6),
            "patient_weight_kg": round(weight, 1), "injected_dose_bq": round(dose, 1),
            "noise": "multiplicative Gaussian, 5 % per voxel",
        }
    truth["session_complete"] = bool(with_pet)

    truth_path = out / "_truth" / SPECIALTY / f"{label}.json"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"specialty": SPECIALTY, "label": label, "study_uid": study.study_uid, "phi": phi.phi_values(study),
              "truth": truth}
    truth_path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return record


def synthesize(out: pathlib.Path, studies: int, seed: int, *, with_pet: bool | list[bool] = True,
               **size_options) -> list[pathlib.Path]:
    """Write ``studies`` sessions; ``with_pet`` may be one flag or one per study (MR-only sessions)."""
    out = pathlib.Path(out)
    rng = np.random.default_rng(seed)
    flags = list(with_pet) if isinstance(with_pet, (list, tuple)) else [bool(with_pet)] * studies
    if len(flags) != studies:
        raise ValueError(f"with_pet has {len(flags)} flags for {studies} studies")
    paths = []
    for i in range(studies):
        label = f"study-{i:03d}"
        study_rng = np.random.default_rng(rng.integers(0, 2**63))
        synthesize_study(out, label, study_rng, with_pet=flags[i], **size_options)
        paths.append(out / "_truth" / SPECIALTY / f"{label}.json")
    return paths


__all__ = ["SPECIALTY", "bias_field_at", "head_phantom", "image_points_mm", "pose_transform", "synthesize",
           "synthesize_study", "truth_on_grid"]


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
