"""The MRI + PET session chain, one function per step (each an Airflow task, each ``imaging-tasks process`` step).

    n4_bias -> brain_extraction -> pet_average -> pet_to_t1 -> atlas_registration -> suvr
        -> (fmri_glm -> dti -> tractography: :mod:`.chain4d`) -> roi_features

Every step has the signature the pipeline calls (``files, out_dir, *, device, previous, **options``): ``files`` are
the session's de-identified inputs (DICOM or NIfTI), ``previous`` maps each earlier step to the folder of what it
wrote.  A step reads the images it needs from there, writes its own, and returns metrics.  The maths lives in
:mod:`.session` (inputs), :mod:`.structural` (N4), :mod:`.tissue` (brain and tissue classes), :mod:`.pet`
(frames, SUV, PET->T1, SUVR), :mod:`.atlas` (MNI152 -> T1) and :mod:`.rois` (atlases, reference regions,
features); this module only wires files to them.

An MR-only session runs the chain too: the PET steps write nothing and say so in their metrics, and the ROI
features carry volumes and T1 intensity without SUVR.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

T1 = "t1.nii.gz"
T1_N4 = "t1_n4.nii.gz"
BIAS = "bias_field.nii.gz"
PET_FRAMES = "pet_frames"  # folder: frame_000.nii.gz ... as loaded (Bq/ml)
PET_FACTS = "pet_facts.json"
SESSION = "session.json"
BRAIN = "brain_mask.nii.gz"
ICV = "intracranial_mask.nii.gz"
MRI_BRAIN = "mri_brain.nii.gz"
FRACTIONS = {"gm": "gm_fraction.nii.gz", "wm": "wm_fraction.nii.gz", "csf": "csf_fraction.nii.gz"}
PET_MEAN = "pet_mean.nii.gz"
PET_IN_T1 = "pet_in_t1.nii.gz"
PET_TO_T1 = "pet_to_t1.tfm"
ATLAS_IN_T1 = "atlas_in_t1.nii.gz"
ATLAS_LABELS = "atlas_labels.json"
REGISTRATION = "registration"  # folder: the T1 -> MNI transform files
REFERENCE_IN_T1 = "reference_region_in_t1.nii.gz"
PET_SUVR = "pet_suvr.nii.gz"
ROI_FEATURES = "roi_features.json"
FMRI_ROIS = "fmri_rois.json"  # written by chain4d.fmri_glm, read here by roi_features
DTI_ROIS = "dti_rois.json"  # written by chain4d.dti


def _read(path: Path):
    import SimpleITK as sitk

    return sitk.ReadImage(str(path))


def _write(img, path: Path) -> str:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path.name


def _arr(img) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img)


def _spacing_zyx(img) -> np.ndarray:
    return np.array(img.GetSpacing()[::-1], dtype=float)


def _m(name: str, value, unit: str) -> dict:
    return {"name": name, "value": None if value is None else float(value), "unit": unit}


def _outputs(out_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(out_dir)) for p in Path(out_dir).rglob("*") if p.is_file())


def _has_pet(previous: dict) -> bool:
    return (Path(previous["n4_bias"]) / PET_FRAMES).is_dir()


# --------------------------------------------------------------------------- 1. inputs + N4
def n4_bias(files: list[Path], out_dir: Path, *, device: str | None = None, n4_shrink: int = 2,
            n4_iterations=(50, 50), **_options) -> dict:
    """Load the session (DICOM or NIfTI), keep the T1 and PET frames as NIfTI for the later steps, N4 the T1."""
    import SimpleITK as sitk

    from imaging_tasks.neuroimaging.session import load_session
    from imaging_tasks.neuroimaging.structural import n4_correct

    started = time.perf_counter()
    out_dir = Path(out_dir)
    session = load_session([Path(f) for f in files])
    loaded = time.perf_counter()
    corrected, log_bias = n4_correct(session.t1, shrink=n4_shrink, iterations=tuple(n4_iterations))
    n4_s = time.perf_counter() - loaded
    _write(sitk.Cast(session.t1, sitk.sitkFloat32), out_dir / T1)
    _write(sitk.Cast(corrected, sitk.sitkFloat32), out_dir / T1_N4)
    # the field is smooth: every second voxel loses nothing and keeps the file small
    _write(sitk.Shrink(sitk.Exp(log_bias), [2, 2, 2]), out_dir / BIAS)
    for k, frame in enumerate(session.pet_frames):
        _write(sitk.Cast(frame, sitk.sitkFloat32), out_dir / PET_FRAMES / f"frame_{k:03d}.nii.gz")
    if session.pet_frames:
        (out_dir / PET_FACTS).write_text(json.dumps(session.pet_facts, indent=2, sort_keys=True))
    (out_dir / SESSION).write_text(json.dumps({"source": session.source, "n_mr_series": session.n_mr_series,
                                               "n_pet_series": session.n_pet_series,
                                               "n_pet_frames": len(session.pet_frames)}, indent=2))
    head = _arr(session.t1) > 0
    bias = np.exp(_arr(log_bias)[head]) if head.any() else np.ones(1)
    return {"metrics": [_m("bias_field_range_percent", (bias.max() / bias.min() - 1) * 100, "%"),
                        _m("n_mr_series", session.n_mr_series, "count"),
                        _m("n_pet_series", session.n_pet_series, "count"),
                        _m("n_pet_frames", len(session.pet_frames), "count"),
                        _m("n4_seconds", n4_s, "s"), _m("load_seconds", loaded - started, "s")],
            "findings": [], "outputs": _outputs(out_dir)}


# --------------------------------------------------------------------------- 2. brain extraction
def brain_extraction(files: list[Path], out_dir: Path, *, device: str | None = None, previous: dict,
                     **_options) -> dict:
    """Tissue classes (GM/WM/CSF partial-volume fractions), the parenchymal brain mask and the intracranial mask."""
    import SimpleITK as sitk

    from imaging_tasks.device import pick_device
    from imaging_tasks.errors import BadInput
    from imaging_tasks.neuroimaging.qc import overlay_png
    from imaging_tasks.neuroimaging.structural import MIN_BRAIN_ML, intensity_cv, white_matter_mask
    from imaging_tasks.neuroimaging.tissue import segment_brain

    dev = pick_device(device)
    out_dir = Path(out_dir)
    first = Path(previous["n4_bias"])
    raw, corrected = _read(first / T1), _read(first / T1_N4)
    seg = segment_brain(corrected, device=dev)
    if seg.volumes_ml["brain"] < MIN_BRAIN_ML:
        raise BadInput("no_brain_found", f"brain extraction found {seg.volumes_ml['brain']:.0f} ml of brain "
                       f"(< {MIN_BRAIN_ML:.0f} ml); the MR series is probably not a T1 of the head")
    _write(seg.brain, out_dir / BRAIN)
    _write(seg.icv, out_dir / ICV)
    for name, file in FRACTIONS.items():
        _write(getattr(seg, name), out_dir / file)
    _write(sitk.Mask(corrected, sitk.Cast(seg.brain, sitk.sitkUInt8)), out_dir / MRI_BRAIN)
    b, ic, cor = _arr(seg.brain).astype(bool), _arr(seg.icv).astype(bool), _arr(corrected)
    spacing = _spacing_zyx(corrected)
    overlay_png(cor, spacing, out_dir / "qc_brain.png", centre_mask=b,
                contours=((ic, (250, 210, 40)), (b, (255, 50, 50))))
    wm = white_matter_mask(cor, b, spacing, dev)
    v = seg.volumes_ml
    return {"metrics": [_m("brain_volume_ml", v["brain"], "ml"), _m("intracranial_volume_ml", v["intracranial"], "ml"),
                        _m("grey_matter_volume_ml", v["grey_matter"], "ml"),
                        _m("white_matter_volume_ml", v["white_matter"], "ml"), _m("csf_volume_ml", v["csf"], "ml"),
                        _m("brain_fraction", v["brain"] / max(v["intracranial"], 1e-9), "1"),
                        _m("bias_field_cv_before", intensity_cv(_arr(raw), wm, dev), "1"),
                        _m("bias_field_cv_after", intensity_cv(cor, wm, dev), "1")],
            "findings": [], "outputs": _outputs(out_dir), "device": str(dev)}


# --------------------------------------------------------------------------- 3. PET frames
def pet_average(files: list[Path], out_dir: Path, *, device: str | None = None, previous: dict,
                **_options) -> dict:
    """One PET image per session: frames realigned to their mean (rigid) and averaged; the SUV factor if the
    de-identified headers still hold weight, dose and timing."""
    from imaging_tasks.neuroimaging.pet import average_frames, suv_factor

    out_dir = Path(out_dir)
    if not _has_pet(previous):
        return {"metrics": [_m("pet_frames_averaged", 0, "count")], "findings": [], "outputs": []}
    first = Path(previous["n4_bias"])
    frames = [_read(p) for p in sorted((first / PET_FRAMES).glob("frame_*.nii.gz"))]
    facts = json.loads((first / PET_FACTS).read_text())
    mean, motion = average_frames(frames, facts.get("frame_durations_s"))
    _write(mean, out_dir / PET_MEAN)
    factor, why = suv_factor(facts)
    (out_dir / "pet_motion.json").write_text(json.dumps({"frames": motion, "suv_factor": factor,
                                                          "suv_factor_note": why}, indent=2))
    worst = max((f.get("mean_displacement_mm", 0.0) for f in motion), default=0.0)
    metrics = [_m("pet_frames_averaged", len(frames), "count"), _m("pet_max_frame_motion_mm", worst, "mm")]
    if factor is not None:
        metrics.append(_m("suv_factor", factor, "g/Bq"))
    else:
        log.info("SUV not computed: %s (SUVR needs none of it)", why)
    return {"metrics": metrics, "findings": [], "outputs": _outputs(out_dir)}


# --------------------------------------------------------------------------- 4. PET -> T1
def pet_to_t1(files: list[Path], out_dir: Path, *, device: str | None = None, previous: dict, **_options) -> dict:
    """Rigid mutual-information registration of the mean PET to the T1; the PET resampled onto the T1 grid."""
    import SimpleITK as sitk

    from imaging_tasks.neuroimaging.pet import register_pet_to_t1, to_t1
    from imaging_tasks.neuroimaging.qc import overlay_png

    out_dir = Path(out_dir)
    if not _has_pet(previous):
        return {"metrics": [], "findings": [], "outputs": []}
    t1 = _read(Path(previous["n4_bias"]) / T1_N4)
    brain = _read(Path(previous["brain_extraction"]) / BRAIN)
    pet = _read(Path(previous["pet_average"]) / PET_MEAN)
    started = time.perf_counter()
    transform = register_pet_to_t1(pet, t1, brain)
    seconds = time.perf_counter() - started
    sitk.WriteTransform(transform, str(out_dir / PET_TO_T1))
    pet_t1 = to_t1(pet, t1, transform)
    _write(pet_t1, out_dir / PET_IN_T1)
    b = _arr(brain).astype(bool)
    overlay_png(_arr(t1), _spacing_zyx(t1), out_dir / "qc_pet.png", centre_mask=b, heat=_arr(pet_t1),
                contours=((b, (80, 200, 255)),))
    return {"metrics": [_m("pet_to_t1_seconds", seconds, "s")], "findings": [], "outputs": _outputs(out_dir)}


# --------------------------------------------------------------------------- 5. atlas
def _label_atlas(atlas: str, atlas_uri: str | None, atlas_labels_uri: str | None):
    from imaging_tasks.neuroimaging import rois

    if not atlas_uri:
        return rois.label_atlas(atlas)
    import tempfile

    from imaging_tasks import storage
    from imaging_tasks.errors import ConfigError

    if not atlas_labels_uri:
        raise ConfigError("atlas_uri is set but atlas_labels_uri is not: a bring-your-own atlas needs its labels "
                          "TSV (columns index, name[, network]) beside the NIfTI; set atlas_labels_uri")
    with tempfile.TemporaryDirectory(prefix="atlas-") as tmp:
        name = Path(str(atlas_uri)).name
        try:
            image = storage.download(atlas_uri, Path(tmp) / name)
            labels = storage.download(atlas_labels_uri, Path(tmp) / "labels.tsv")
        except FileNotFoundError as exc:
            raise ConfigError(f"bring-your-own atlas not found ({exc}); check atlas_uri and atlas_labels_uri") \
                from None
        return rois.label_atlas_from_files(image, labels, name=name.split(".")[0])


def atlas_registration(files: list[Path], out_dir: Path, *, device: str | None = None, previous: dict,
                       atlas: str = "seitzman300", atlas_uri: str | None = None, atlas_labels_uri: str | None = None,
                       **_options) -> dict:
    """MNI152 -> T1 (affine, then deformable); the ROI atlas in T1 space; the registered MNI152 brain mask as a
    cross-check of the segmentation's brain mask."""
    from imaging_tasks.neuroimaging import atlas as atlas_mod
    from imaging_tasks.neuroimaging.qc import overlay_png

    out_dir = Path(out_dir)
    t1 = _read(Path(previous["n4_bias"]) / T1_N4)
    brain = _read(Path(previous["brain_extraction"]) / BRAIN)
    labels = _label_atlas(atlas, atlas_uri, atlas_labels_uri)
    reg = atlas_mod.register_mni_to_t1(t1, brain, device=device)
    atlas_mod.save_registration(reg, out_dir / REGISTRATION)
    in_t1 = atlas_mod.to_t1(labels.image, t1, reg.transform, labels=True)
    _write(in_t1, out_dir / ATLAS_IN_T1)
    (out_dir / ATLAS_LABELS).write_text(json.dumps({"atlas": labels.name, "labels": labels.labels}, indent=2))
    mni_brain = atlas_mod.to_t1(atlas_mod.mni_template()["brain"], t1, reg.transform, labels=True)
    agreement = atlas_mod.mask_agreement(brain, mni_brain)
    b = _arr(brain).astype(bool)
    overlay_png(_arr(t1), _spacing_zyx(t1), out_dir / "qc_atlas.png", centre_mask=b, labels=_arr(in_t1),
                contours=((_arr(mni_brain).astype(bool), (80, 255, 120)),))
    present = int(len(np.unique(_arr(in_t1))) - 1)
    return {"metrics": [_m("mni_mask_dice", agreement["dice"], "1"),
                        _m("mni_mask_volume_ratio", agreement["volume_ratio"], "1"),
                        _m("atlas_rois_in_t1", present, "count"),
                        _m("atlas_registration_seconds", sum(reg.timings.values()), "s")],
            "findings": [], "outputs": _outputs(out_dir)}


# --------------------------------------------------------------------------- 6. SUVR
def suvr(files: list[Path], out_dir: Path, *, device: str | None = None, previous: dict,
         reference_region: str = "cerebellar_grey_matter", **_options) -> dict:
    """SUVR image: PET in T1 space over its mean in the reference region (taken from MNI space into the T1)."""
    from imaging_tasks.neuroimaging import atlas as atlas_mod
    from imaging_tasks.neuroimaging.pet import suvr_image
    from imaging_tasks.neuroimaging.qc import overlay_png
    from imaging_tasks.neuroimaging.rois import reference_region_mni

    out_dir = Path(out_dir)
    if not _has_pet(previous):
        return {"metrics": [], "findings": [], "outputs": []}
    t1 = _read(Path(previous["n4_bias"]) / T1_N4)
    brain = _read(Path(previous["brain_extraction"]) / BRAIN)
    pet_t1 = _read(Path(previous["pet_to_t1"]) / PET_IN_T1)
    transform = atlas_mod.load_transform(Path(previous["atlas_registration"]) / REGISTRATION)
    reference = atlas_mod.to_t1(reference_region_mni(reference_region), t1, transform, labels=True)
    _write(reference, out_dir / REFERENCE_IN_T1)
    image, ref_mean = suvr_image(pet_t1, reference)
    _write(image, out_dir / PET_SUVR)
    b = _arr(brain).astype(bool)
    overlay_png(_arr(t1), _spacing_zyx(t1), out_dir / "qc_suvr.png", centre_mask=b, heat=_arr(image) * b,
                heat_max=2.5, contours=((_arr(reference).astype(bool), (80, 255, 120)),))
    metrics = [_m("suvr_reference_mean", ref_mean, "Bq/ml"),
               _m("suvr_reference_volume_ml", float(_arr(reference).astype(bool).sum()) *
                  float(np.prod(t1.GetSpacing())) / 1000.0, "ml")]
    motion = Path(previous["pet_average"]) / "pet_motion.json"
    factor = json.loads(motion.read_text()).get("suv_factor") if motion.exists() else None
    if factor:
        metrics.append(_m("suv_reference_mean", ref_mean * factor, "g/ml"))
    return {"metrics": metrics, "findings": [], "outputs": _outputs(out_dir)}


# --------------------------------------------------------------------------- 7. ROI features
def roi_features(files: list[Path], out_dir: Path, *, device: str | None = None, previous: dict,
                 reference_region: str = "cerebellar_grey_matter", **_options) -> dict:
    """Per-ROI GM volume, SUVR (mean, median) and normalised T1, plus whole-brain volumes: roi_features.json and
    the ``roi_features`` warehouse rows, with the 4-D steps' ROI means (their own JSON files) added as rows."""
    from imaging_tasks.neuroimaging import rois

    out_dir = Path(out_dir)
    first, second = Path(previous["n4_bias"]), Path(previous["brain_extraction"])
    atlas_dir = Path(previous["atlas_registration"])
    labels_doc = json.loads((atlas_dir / ATLAS_LABELS).read_text())
    label_image = _read(atlas_dir / ATLAS_IN_T1)
    suvr_path = Path(previous["suvr"]) / PET_SUVR if "suvr" in previous else None
    doc = rois.roi_features(
        label_image, rois.LabelAtlas(labels_doc["atlas"], None, labels_doc["labels"]),
        t1_n4=_read(first / T1_N4), gm=_read(second / FRACTIONS["gm"]), wm=_read(second / FRACTIONS["wm"]),
        csf=_read(second / FRACTIONS["csf"]), brain=_read(second / BRAIN), icv=_read(second / ICV),
        suvr=_read(suvr_path) if suvr_path is not None and suvr_path.exists() else None,
        reference_region=reference_region if suvr_path is not None and suvr_path.exists() else None)
    rois.validate(doc)
    (out_dir / ROI_FEATURES).write_text(json.dumps(doc, indent=2, allow_nan=False))
    rows = rois.feature_rows(doc) + roi_rows(previous)  # + contrast betas, FA and MD where the session has them
    with_suvr = [r["mean_suvr"] for r in doc["rois"] if r.get("mean_suvr") is not None]
    return {"metrics": [_m("roi_count", len(doc["rois"]), "count"),
                        _m("roi_mean_suvr_median", float(np.median(with_suvr)) if with_suvr else None, "1")],
            "findings": [], "outputs": _outputs(out_dir), "tables": {"roi_features": rows}}


def roi_rows(previous: dict) -> list[dict]:
    """The 4-D steps' ROI means as ``roi_features`` warehouse rows (contrast betas and t, FA, MD)."""
    units = {"beta": "%", "t": "1", "fa_mean": "1", "md_mean": "mm2/s"}
    rows = []
    for step, name in (("fmri_glm", FMRI_ROIS), ("dti", DTI_ROIS)):
        path = Path(previous.get(step, "")) / name
        if step not in previous or not path.exists():
            continue
        doc = json.loads(path.read_text())
        for roi in doc["rois"]:
            for key, value in roi.items():
                if key in ("index", "name", "voxels") or value is None:
                    continue
                unit = units.get(key, units.get(key.split("_", 1)[0], "1"))
                rows.append({"roi": roi["name"], "atlas": doc["atlas"], "metric": key, "value": float(value),
                             "unit": unit})
    return rows
