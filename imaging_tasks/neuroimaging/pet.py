"""PET for a neuro session: frame averaging with motion correction, SUV, PET->T1 registration, SUVR.

Why each step is the way it is:

* **Frame averaging** (:func:`average_frames`).  A dynamic or multi-frame static PET is several 3-D frames of
  the same head; the head moves a few mm between them, and averaging moved frames blurs the cortex into the
  white matter and CSF (partial-volume loss that biases every regional value).  Every frame is rigidly
  registered to the duration-weighted mean (a reference that favours no single, possibly moved, frame), the
  mean is recomputed from the realigned frames and the frames are realigned once more to that sharper
  mean; the result is the duration-weighted mean of the realigned frames (frames hold concentrations, so
  weighting by duration gives the concentration averaged over the whole acquisition).
* **SUV** (:func:`suv_factor`) needs the injected dose, the decay-correction reference and the patient's
  weight.  De-identification removes the weight unless the DICOM PS3.15 "Retain Patient Characteristics"
  option is applied; without it there is no SUV, only SUVR (which needs none of these facts).
* **PET->T1** (:func:`register_pet_to_t1`): rigid (same head, same session: no shape change) with Mattes
  mutual information (PET and T1 contrasts are unrelated: grey matter is bright in FDG PET and dark in T1),
  multi-resolution, started from the better of a moments (centre-of-mass) start and a coarse grid search
  over rotations and axial shifts, for a wide capture range (15 mm and 10 degrees about each axis, cropped
  axial fields of view).  The T1 is worked on at >= 2 mm and blurred to the PET resolution: the PET
  (~4-6 mm FWHM) carries no finer information, and it keeps the registration to seconds.
* **SUVR** (:func:`suvr_image`): PET divided by the mean uptake of a reference region (default cerebellar
  grey matter) on the T1 grid; ratio images are comparable across scanners, doses and uptake times without
  any of the SUV facts.

Transforms follow the chain's convention: ``t1_to_pet`` maps a physical (LPS mm) point of the T1 into the
PET; ``sitk.Resample(pet, t1, t1_to_pet)`` brings the PET onto the T1 grid.
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from imaging_tasks.errors import BadInput

SEED = 20240611  # fixed sampling seed: the same inputs give the same transform (run to run, on one machine)
WORK_SPACING_MM = 2.0  # T1 working resolution for PET->T1; finer than the PET PSF needs
PET_FWHM_MM = 6.0  # typical reconstructed brain PET resolution; the T1 is blurred to it before MI
MIN_REFERENCE_VOXELS = 50  # fewer voxels and the reference mean is dominated by noise and edge voxels
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------------------------
def _same_grid(a: sitk.Image, b: sitk.Image, tol_mm: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5, rtol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol_mm)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _physical_points(mask: sitk.Image, max_points: int | None = None) -> np.ndarray:
    """(N, 3) LPS mm coordinates of the non-zero voxels of ``mask`` (evenly subsampled to ``max_points``)."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(np.float64)  # (x, y, z) indices
    if max_points is not None and len(idx) > max_points:
        idx = idx[:: int(math.ceil(len(idx) / max_points))]
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    return np.asarray(mask.GetOrigin()) + (idx * np.asarray(mask.GetSpacing())) @ direction.T


def _affine_parts(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray] | None:
    """(A, b) with T(p) = A p + b when ``transform`` is linear (matrix-offset or a composite of them), else None."""
    t = transform.Downcast() if hasattr(transform, "Downcast") else transform
    if isinstance(t, sitk.CompositeTransform):
        a_total, b_total = np.eye(3), np.zeros(3)
        for i in range(t.GetNumberOfTransforms()):  # ITK applies the last-added transform first
            parts = _affine_parts(t.GetNthTransform(i))
            if parts is None:
                return None
            a, b = parts
            a_total, b_total = a_total @ a, a_total @ b + b_total
        return a_total, b_total
    if hasattr(t, "GetMatrix") and hasattr(t, "GetCenter") and hasattr(t, "GetTranslation"):
        a = np.array(t.GetMatrix()).reshape(3, 3)
        c = np.array(t.GetCenter())
        return a, c + np.array(t.GetTranslation()) - a @ c
    if t.GetName() == "IdentityTransform":
        return np.eye(3), np.zeros(3)
    return None


def _apply(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    parts = _affine_parts(transform)
    if parts is not None:
        a, b = parts
        return points @ a.T + b
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])


def mean_displacement_mm(t_est: sitk.Transform, t_true: sitk.Transform, points_mm) -> float:
    """Mean distance |T_est(p) - T_true(p)| over ``points_mm`` ((N, 3) LPS mm), the registration error measure.

    Over brain voxels this is what a misregistration costs the regional values (a rotation error moves the
    cortex far from the centre more than the centre), unlike the transform parameters themselves.
    """
    pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    if len(pts) == 0:
        raise ValueError("mean_displacement_mm needs at least one point")
    return float(np.linalg.norm(_apply(t_est, pts) - _apply(t_true, pts), axis=1).mean())


def _foreground(image: sitk.Image, fraction: float = 0.05) -> sitk.Image:
    """The image with values below ``fraction`` of its 99.5th percentile set to 0 (background noise, for moments)."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    positive = arr[arr > 0]
    if positive.size == 0:
        return sitk.Cast(image, sitk.sitkFloat32)
    arr[arr < fraction * np.percentile(positive, 99.5)] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def _head_mask(image: sitk.Image, fraction: float = 0.15) -> sitk.Image:
    """The head (brain uptake) in a PET image: above ``fraction`` of the robust maximum, largest component, filled.

    A fixed fraction rather than Otsu: Otsu on a brain PET splits grey from white matter, not head from
    background; 15% of the 99.5th percentile keeps white matter (~25-40% of cortex in FDG) and drops noise.
    """
    img = sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    positive = arr[arr > 0]
    if positive.size < 10:
        return sitk.Cast(img > 0, sitk.sitkUInt8)
    mask = sitk.Cast(img > fraction * float(np.percentile(positive, 99.5)), sitk.sitkUInt8)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.BinaryFillhole(sitk.Cast(cc == 1, sitk.sitkUInt8))


def _copy(transform: sitk.Euler3DTransform) -> sitk.Euler3DTransform:
    """An independent Euler3DTransform (registrations below optimise their transform in place)."""
    out = sitk.Euler3DTransform()
    out.SetCenter(transform.GetCenter())
    out.SetParameters(transform.GetParameters())
    return out


def _relative_to(frame_from_mean: sitk.Euler3DTransform, mean_from_first: sitk.Transform,
                 centre) -> sitk.Euler3DTransform:
    """frame_from_mean o mean_from_first as one Euler3DTransform about ``centre``: first-frame point -> frame point."""
    def matrix(t) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = np.array(t.GetMatrix()).reshape(3, 3)
        c = np.array(t.GetCenter())
        m[:3, 3] = np.array(t.GetTranslation()) + c - m[:3, :3] @ c
        return m

    m = matrix(frame_from_mean) @ matrix(mean_from_first)
    out = sitk.Euler3DTransform()
    out.SetCenter(tuple(float(v) for v in centre))
    out.SetMatrix(tuple(m[:3, :3].ravel().tolist()))
    c = np.array(centre, dtype=float)
    out.SetTranslation(tuple((m[:3, 3] - c + m[:3, :3] @ c).tolist()))
    return out


def _euler_motion(transform: sitk.Euler3DTransform, points: np.ndarray) -> dict:
    return {
        "rotation_deg": [round(math.degrees(a), 4) for a in (transform.GetAngleX(), transform.GetAngleY(),
                                                             transform.GetAngleZ())],
        "translation_mm": [round(float(t), 4) for t in transform.GetTranslation()],
        "centre_mm": [round(float(c), 4) for c in transform.GetCenter()],
        "mean_displacement_mm": round(mean_displacement_mm(transform, sitk.Euler3DTransform(), points), 4),
    }


# ----------------------------------------------------------------------------------------------------------------
# frame averaging with motion correction
# ----------------------------------------------------------------------------------------------------------------
def _weighted_mean(frames: list[sitk.Image], weights: np.ndarray) -> sitk.Image:
    acc = np.zeros(sitk.GetArrayViewFromImage(frames[0]).shape, dtype=np.float64)
    for f, w in zip(frames, weights):
        acc += w * sitk.GetArrayViewFromImage(f)
    out = sitk.GetImageFromArray((acc / weights.sum()).astype(np.float32))
    out.CopyInformation(frames[0])
    return out


def _register_frame(reference: sitk.Image, frame: sitk.Image, mask: sitk.Image,
                    initial: sitk.Euler3DTransform) -> sitk.Euler3DTransform:
    """Rigid frame -> reference (same tracer, same grid: small motion; MI copes with early/late contrast change)."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.5, SEED)
    reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=200,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    transform = _copy(initial)
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(reference, frame)
    return transform


def average_frames(frames: list[sitk.Image] | sitk.Image, durations_s: list[float] | None = None
                   ) -> tuple[sitk.Image, list[dict]]:
    """Motion-corrected, duration-weighted mean of PET frames, and the rigid motion of each frame.

    Every frame is registered to the duration-weighted mean of the frames, the mean is recomputed from the
    realigned frames, and the frames are registered once more to that mean (initialised from the first pass);
    the output is the duration-weighted mean of the frames resampled once (linear) into the first frame's
    position.  Motion is per frame, relative to the first frame: ``rotation_deg`` (Euler X, Y, Z about
    the head centroid), ``translation_mm`` (of the head centroid) and ``mean_displacement_mm`` over the head
    voxels; ``centre_mm`` and the angles rebuild the ``sitk.Euler3DTransform`` (first-frame point -> frame point);
    ``registered`` is False when the registration of that frame failed (it is then averaged unmoved).  A
    single frame is returned as is (float32) with zero motion.  ``frames`` may also be one 4-D image
    (x, y, z, frame).

    Raises BadInput: ``no_pet_frames``, ``mismatched_frames`` (frames on different grids are not one
    acquisition: reconstruct them on one grid), ``blank_pet_frame`` (a frame without counts would pull the
    mean down), ``bad_frame_durations``.
    """
    if isinstance(frames, sitk.Image):
        frames = ([frames[:, :, :, t] for t in range(frames.GetSize()[3])] if frames.GetDimension() == 4
                  else [frames])
    if not frames:
        raise BadInput("no_pet_frames", "no PET frames to average; check that the PET series loaded")
    frames = [sitk.Cast(f, sitk.sitkFloat32) for f in frames]
    for i, f in enumerate(frames):
        if f.GetDimension() != 3:
            raise BadInput("mismatched_frames", f"PET frame {i} is {f.GetDimension()}-D; pass one 3-D image per frame")
        if not _same_grid(f, frames[0]):
            raise BadInput("mismatched_frames",
                           f"PET frame {i} has a different size, spacing, origin or orientation from frame 0; "
                           "frames of one acquisition share one grid: reconstruct them on a common grid")
        if not np.any(sitk.GetArrayViewFromImage(f) > 0):
            raise BadInput("blank_pet_frame", f"PET frame {i} has no positive counts; drop the frame (or the "
                                              "series) before averaging, or check the reconstruction")
    if durations_s is None:
        weights = np.ones(len(frames))
    else:
        weights = np.asarray(durations_s, dtype=np.float64)
        if weights.shape != (len(frames),) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
            raise BadInput("bad_frame_durations",
                           f"need one positive frame duration per frame ({len(frames)}); got {list(durations_s)}; "
                           "fix the frame timing in the headers/sidecar or omit durations for equal weights")

    if len(frames) == 1:
        points = _physical_points(_head_mask(frames[0]), max_points=20000)
        return frames[0], [{"frame": 0, "duration_s": float(weights[0]), "registered": True,
                            **_euler_motion(sitk.Euler3DTransform(), points)}]

    mean = _weighted_mean(frames, weights)
    mask = _head_mask(mean)
    centre = mean.TransformContinuousIndexToPhysicalPoint(
        np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].mean(axis=0).tolist())
    identity = sitk.Euler3DTransform()
    identity.SetCenter(centre)
    transforms = [_copy(identity) for _ in frames]
    for _pass in range(2):  # realign to the mean, recompute the mean, realign to the sharper mean
        failed: set[int] = set()
        fixed_mask = sitk.BinaryDilate(mask, [2, 2, 2])
        for i, f in enumerate(frames):
            try:
                transforms[i] = _register_frame(mean, f, fixed_mask, transforms[i])
            except RuntimeError:  # ITK: too few samples overlap / empty joint histogram: keep the frame unmoved
                failed.add(i)
                transforms[i] = _copy(identity)
        realigned = [sitk.Resample(f, mean, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                     for f, t in zip(frames, transforms)]
        mean = _weighted_mean(realigned, weights)
        mask = _head_mask(mean)

    # the result lies where the first frame lies (as SPM's realign leaves it): frame 0 is the acquisition's
    # geometry that headers describe, where the mean's position is an average of poses nobody recorded
    to_mean = _copy(transforms[0]).GetInverse()
    transforms = [_relative_to(t, to_mean, centre) for t in transforms]
    realigned = [sitk.Resample(f, frames[0], t, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                 for f, t in zip(frames, transforms)]
    mean = _weighted_mean(realigned, weights)
    mask = _head_mask(mean)
    points = _physical_points(mask, max_points=20000)
    motion = [{"frame": i, "duration_s": float(w), "registered": i not in failed, **_euler_motion(t, points)}
              for i, (t, w) in enumerate(zip(transforms, weights))]
    return mean, motion


# ----------------------------------------------------------------------------------------------------------------
# SUV
# ----------------------------------------------------------------------------------------------------------------
def _positive(facts: dict, key: str) -> float | None:
    value = facts.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def suv_factor(facts: dict) -> tuple[float | None, str]:
    """The factor that turns Bq/ml into body-weight SUV, or None and why not.

    SUVbw = C [Bq/ml] x W [g] / D_ref [Bq]  (g/ml; dimensionless with tissue density 1 g/ml), so the factor is
    W / D_ref, where D_ref is the injected dose decayed to the time the pixel values are decay-corrected to:

    * DecayCorrection ``START`` (the usual): pixels are corrected to the series start, so the dose is decayed
      from injection to the series start: D_ref = D x exp(-ln2 x injection_to_scan_s / half_life_s);
    * ``ADMIN``: pixels are corrected to the administration (injection) time: D_ref = D, no decay;
    * ``NONE``: pixels are not decay-corrected; each frame would need its own decay factor, so no SUV
      (decay-correct the frames first; SUVR, a ratio within the image, does not need it).

    facts: ``units`` (must be ``BQML``; ``GML`` is already SUVbw, factor 1), ``injected_dose_bq``,
    ``injection_to_scan_s``, ``half_life_s``, ``decay_correction``, ``weight_kg``.  The weight is what
    de-identification usually removes: SUV needs the DICOM PS3.15 "Retain Patient Characteristics" option
    (keeps PatientWeight); the dose and times come from the Radiopharmaceutical Information Sequence, with
    the injection time relative to the series time (both shift together when dates are shifted).
    Returns (factor, description) or (None, reason).
    """
    units = str(facts.get("units") or "").strip().upper().replace(" ", "")
    if units in ("GML", "G/ML"):
        return 1.0, "pixel values are already body-weight SUV (units GML)"
    if units not in ("BQML", "BQ/ML"):
        return None, (f"PET units are {units or 'missing'}, not Bq/ml (BQML): SUV needs activity concentration; "
                      "SUVR is still computed")
    weight_kg = _positive(facts, "weight_kg")
    if weight_kg is None:
        return None, ("patient weight missing (de-identified or not recorded): SUV needs the DICOM PS3.15 "
                      "'Retain Patient Characteristics' option; SUVR is still computed")
    if not 1.0 <= weight_kg <= 500.0:
        return None, f"patient weight {weight_kg} kg is not plausible; check the PatientWeight header (kg)"
    dose = _positive(facts, "injected_dose_bq")
    if dose is None:
        return None, "injected dose missing (RadionuclideTotalDose): SUV cannot be computed; SUVR is still computed"
    correction = str(facts.get("decay_correction") or "").strip().upper()
    if correction == "ADMIN":
        return weight_kg * 1000.0 / dose, "SUVbw = Bq/ml x weight_g / dose (decay-corrected to injection: ADMIN)"
    if correction == "NONE":
        return None, ("pixel values are not decay-corrected (DecayCorrection NONE): decay-correct the frames "
                      "before SUV; SUVR is still computed")
    if correction != "START":
        return None, f"unknown decay correction {correction or 'missing'} (expected START or ADMIN)"
    half_life = _positive(facts, "half_life_s")
    if half_life is None:
        return None, "radionuclide half-life missing: the dose cannot be decay-corrected to the series start"
    try:
        elapsed = float(facts.get("injection_to_scan_s"))
    except (TypeError, ValueError):
        return None, "injection time missing: the dose cannot be decay-corrected to the series start"
    if not math.isfinite(elapsed) or elapsed < 0 or elapsed > 20 * half_life:
        return None, (f"injection-to-scan time {elapsed} s is negative or implausible: check the injection "
                      "(RadiopharmaceuticalStartTime) and series times")
    decayed = dose * math.exp(-LN2 * elapsed / half_life)
    return weight_kg * 1000.0 / decayed, ("SUVbw = Bq/ml x weight_g / dose decayed to the series start "
                                          "(DecayCorrection START)")


# ----------------------------------------------------------------------------------------------------------------
# PET -> T1
# ----------------------------------------------------------------------------------------------------------------
def _working_t1(t1: sitk.Image) -> sitk.Image:
    """The T1 on a grid no finer than WORK_SPACING_MM (smoothed first, so no aliasing), float32."""
    t1 = sitk.Cast(t1, sitk.sitkFloat32)
    spacing = np.asarray(t1.GetSpacing())
    if np.all(spacing >= WORK_SPACING_MM - 1e-6):
        return t1
    new_spacing = np.maximum(spacing, WORK_SPACING_MM)
    sigmas = np.sqrt(np.maximum(new_spacing ** 2 - spacing ** 2, 0)) / 2.355  # FWHM of the coarser voxel
    smoothed = sitk.SmoothingRecursiveGaussian(t1, [float(s) if s > 0 else 1e-3 for s in sigmas])
    new_size = [int(math.ceil(n * s / ns)) for n, s, ns in zip(t1.GetSize(), spacing, new_spacing)]
    return sitk.Resample(smoothed, new_size, sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(),
                         new_spacing.tolist(), t1.GetDirection(), 0.0, sitk.sitkFloat32)


def _mi_registration(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image | None,
                     transform: sitk.Euler3DTransform, shrink: list[int], sigmas_mm: list[float],
                     sampling: float | None, bins: int, step_mm: float, min_step: float, iterations: int) -> float:
    """Optimise ``transform`` in place (Mattes MI, regular-step gradient descent); the final metric value.

    ``sampling`` None uses every voxel (the coarse level: few voxels, and random subsets there make the
    metric too noisy for the optimiser to travel 20+ mm); else that fraction, randomly, with a fixed seed.
    """
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    if sampling is not None:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, SEED)
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=step_mm, minStep=min_step,
                                                 numberOfIterations=iterations, relaxationFactor=0.5,
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas_mm)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    return float(reg.GetMetricValue())


def _coarse(fixed, moving, mask, transform):
    """8 mm-voxel level (of a 2 mm T1): every voxel, 32 bins, 4 mm steps: travels the 20-30 mm a bad start can be off."""
    return _mi_registration(fixed, moving, mask, transform, [4], [4.0], None, 32, 4.0, 1e-2, 500)


def _fine(fixed, moving, mask, transform):
    """4 and 2 mm levels (of a 2 mm T1): 15% seeded random samples, 64 bins, 1 mm steps down to 1 um."""
    return _mi_registration(fixed, moving, mask, transform, [2, 1], [2.0, 1.0], 0.15, 64, 1.0, 1e-3, 200)


GRID_ROTATION_DEG = 10.0  # grid search: -10, 0, +10 degrees about each axis ...
GRID_AXIAL_MM = 10.0      # ... times -30..+30 mm in 10 mm steps along the scanner axis
GRID_AXIAL_STEPS = 3


def _grid_search(fixed, moving, mask, transform, axial_index: int) -> None:
    """Best start on a grid of rotations and axial shifts around ``transform`` (MI at 8 mm voxels, in place).

    189 metric evaluations (~0.2 s): the rotations a moments start cannot know about and the axial offset a
    cropped field of view gives the centre of mass, which together exceed the gradient descent's reach.
    """
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    steps = [1, 1, 1, 0, 0, 0]
    scales = [math.radians(GRID_ROTATION_DEG)] * 3 + [1.0, 1.0, 1.0]
    steps[3 + axial_index] = GRID_AXIAL_STEPS
    scales[3 + axial_index] = GRID_AXIAL_MM
    reg.SetOptimizerAsExhaustive(steps, stepLength=1.0)
    reg.SetOptimizerScales(scales)
    reg.SetShrinkFactorsPerLevel([4])
    reg.SetSmoothingSigmasPerLevel([4.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)


def register_pet_to_t1(pet_mean: sitk.Image, t1: sitk.Image, brain_mask: sitk.Image | None = None
                       ) -> sitk.Euler3DTransform:
    """Rigid ``t1_to_pet`` (T1 point -> PET point) by Mattes mutual information, multi-resolution.

    Fixed = T1 (at >= 2 mm, blurred to PET_FWHM_MM; restricted to the brain mask dilated by ~10 mm when
    given, so the scalp, neck and face, which look different in PET, do not drive it), moving = PET.

    Start: the centres of mass matched (of the brain when a mask is given, else of the T1 head; of the PET
    above 5% of its maximum).  That start knows nothing of rotation, and a PET whose axial field of view cuts
    the cerebellum or the vertex has its centre of mass moved along the scanner axis by 1-3 cm; together
    these exceed what gradient descent on MI recovers from.  So a grid search (rotations of -10/0/+10 degrees
    about each axis x axial shifts of -30..+30 mm, MI at 8 mm voxels, ~0.2 s) picks a second start; both
    starts are optimised at 8 mm (every voxel), the better metric wins and is refined at 4 and 2 mm (15%
    seeded random samples).  Measured on phantoms (tests/test_neuro_pet.py): up to 15 mm and 10 degrees
    about each axis, full and cropped axial fields of view, 0.1-0.35 mm mean displacement error over the
    brain with a brain mask, up to ~0.7 mm without one (the scalp, absent from the PET, then biases MI);
    1-3 s of CPU.

    Raises BadInput ``blank_pet`` (no positive PET values) and ``pet_registration_failed`` (ITK found too
    little overlap: the PET and T1 are not of the same head, or their headers place them far apart).
    """
    if not np.any(sitk.GetArrayViewFromImage(pet_mean) > 0):
        raise BadInput("blank_pet", "the PET has no positive values; check the PET series and its rescaling")
    # blurring the T1 to the PET resolution removes the bias a sharp-vs-blurred pair gives MI (on phantoms the
    # systematic error fell from ~0.5 to ~0.25 mm)
    fixed = sitk.SmoothingRecursiveGaussian(_working_t1(t1), PET_FWHM_MM / 2.3548)
    moving = sitk.Cast(pet_mean, sitk.sitkFloat32)
    mask = None
    if brain_mask is not None:
        mask = sitk.Resample(sitk.Cast(brain_mask > 0, sitk.sitkUInt8), fixed, sitk.Transform(),
                             sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        if sitk.GetArrayViewFromImage(mask).any():
            moments_fixed = sitk.Mask(fixed, mask)
            radius = [max(1, int(round(10.0 / s))) for s in fixed.GetSpacing()]
            mask = sitk.BinaryDilate(mask, radius)
        else:
            mask = None
    if mask is None:
        moments_fixed = _foreground(fixed)
    moments = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
        moments_fixed, _foreground(moving), sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS))
    # the PET slice axis (the scanner axis, along which fields of view are cropped), as the nearest LPS axis
    axis = np.array(moving.GetDirection()).reshape(3, 3)[:, 2]
    try:
        gridded = _copy(moments)
        _grid_search(fixed, moving, mask, gridded, int(np.argmax(np.abs(axis))))
        candidates = [(_coarse(fixed, moving, mask, t), i, t) for i, t in enumerate((gridded, _copy(moments)))]
        _, _, transform = min(candidates)
        _fine(fixed, moving, mask, transform)
    except RuntimeError as exc:  # ITK: "too many samples map outside moving image buffer" and the like
        raise BadInput("pet_registration_failed",
                       "PET-to-T1 registration found too little overlap between the PET and the T1; check that "
                       "both are of the same subject and session and that the PET covers the head") from exc
    return transform


def to_t1(image: sitk.Image, t1_reference: sitk.Image, t1_to_pet: sitk.Transform) -> sitk.Image:
    """``image`` (PET space) resampled onto the T1 grid: cubic B-spline, float32, 0 outside the PET field of view.

    Cubic, not linear: bringing a 4 mm PET onto a 2 mm (or 1 mm) T1 grid by linear interpolation blurs it once
    more, and a thin hot cortex next to cooler white matter loses counts to it; on the synthetic sessions ROI
    SUVR came out 1-4 % low with linear and 0.5-2.5 % with cubic interpolation (the same registration).  The
    cubic kernel's small undershoot at the head's edge is clipped at 0 (activity is not negative).
    """
    out = sitk.Resample(image, t1_reference, t1_to_pet, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    return sitk.Maximum(out, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# SUVR
# ----------------------------------------------------------------------------------------------------------------
def suvr_image(pet_in_t1: sitk.Image, reference_mask: sitk.Image) -> tuple[sitk.Image, float]:
    """SUVR = PET / mean PET in the reference region, and that mean.

    Reference voxels where the PET is exactly 0 or not finite are outside the PET field of view (``to_t1``
    fills with 0) and are left out: a cerebellum cut by the axial field of view would otherwise drag the
    reference mean down and inflate every SUVR.  Raises BadInput ``empty_reference_region`` when fewer than
    MIN_REFERENCE_VOXELS reference voxels carry counts, ``reference_grid_mismatch`` when the mask is not on
    the PET's (T1) grid.
    """
    if not _same_grid(pet_in_t1, reference_mask, tol_mm=1e-2):
        raise BadInput("reference_grid_mismatch",
                       "the reference-region mask is not on the grid of the PET in T1 space; resample it onto "
                       "the T1 (nearest neighbour) first")
    pet = sitk.GetArrayFromImage(sitk.Cast(pet_in_t1, sitk.sitkFloat32))
    ref = sitk.GetArrayViewFromImage(reference_mask) > 0
    values = pet[ref]
    n_mask = int(values.size)
    values = values[np.isfinite(values) & (values != 0)]
    mean = float(values.mean()) if values.size else 0.0
    if values.size < MIN_REFERENCE_VOXELS or not mean > 0:
        raise BadInput("empty_reference_region",
                       f"the reference region has {values.size} voxels with PET counts (mask {n_mask} voxels, "
                       f"need >= {MIN_REFERENCE_VOXELS} with a positive mean); check that the PET field of view "
                       "covers it and the atlas registration, or choose another reference region "
                       "(e.g. pons or whole cerebellum)")
    out = sitk.GetImageFromArray(np.where(np.isfinite(pet), pet / mean, 0).astype(np.float32))
    out.CopyInformation(pet_in_t1)
    return out, mean
