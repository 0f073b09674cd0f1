"""PET library (imaging_tasks.neuroimaging.pet) against planted truth.

Phantoms come from nilearn's shipped MNI152 maps (2 mm; no downloads): a T1 (the MNI152 brain with a CSF
rim, a dark skull and a bright scalp added, as a real T1 has them and the PET does not), and a PET
= grey matter x 4 + white matter x 1.5 with a cerebellar reference region (MNI y < -40, z < -20, in grey
matter) at 2, blurred by a 6 mm FWHM PSF, resampled through a planted rigid ``t1_to_pet`` onto a 3-3.5 mm
PET grid, with 5% multiplicative noise.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import SimpleITK as sitk

from imaging_tasks.errors import BadInput
from imaging_tasks.neuroimaging import pet

GM_ACTIVITY, WM_ACTIVITY, REFERENCE_ACTIVITY = 4.0, 1.5, 2.0
PSF_FWHM_MM = 6.0
BRAIN_CENTRE = (0.0, -18.0, 10.0)  # LPS mm, roughly the middle of the MNI brain


# ------------------------------------------------------------------------------------------------ phantoms
def _nifti_to_sitk(img) -> sitk.Image:
    """nibabel (RAS, array x,y,z) -> SimpleITK (LPS, array z,y,x)."""
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    out.SetSpacing(spacing.tolist())
    out.SetOrigin((ras_to_lps @ img.affine[:3, 3]).tolist())
    out.SetDirection((ras_to_lps @ (img.affine[:3, :3] / spacing)).ravel().tolist())
    return out


def _like(array: np.ndarray, reference: sitk.Image, dtype=np.float32) -> sitk.Image:
    out = sitk.GetImageFromArray(np.asarray(array, dtype=dtype))
    out.CopyInformation(reference)
    return out


@functools.lru_cache(maxsize=1)
def _mni():
    from nilearn import datasets

    t1 = _nifti_to_sitk(datasets.load_mni152_template(resolution=2))
    gm = _nifti_to_sitk(datasets.load_mni152_gm_template(resolution=2))
    wm = _nifti_to_sitk(datasets.load_mni152_wm_template(resolution=2))
    brain = sitk.Cast(_nifti_to_sitk(datasets.load_mni152_brain_mask(resolution=2)) > 0.5, sitk.sitkUInt8)
    return t1, gm, wm, brain


@functools.lru_cache(maxsize=1)
def _head_t1() -> sitk.Image:
    from scipy import ndimage as ndi

    t1, _gm, _wm, brain = _mni()
    dist = ndi.distance_transform_edt(sitk.GetArrayFromImage(brain) == 0, sampling=2.0)
    arr = sitk.GetArrayFromImage(t1).copy()
    arr[(dist > 0) & (dist <= 4)] = 0.12   # CSF
    arr[(dist > 4) & (dist <= 10)] = 0.05  # skull
    arr[(dist > 10) & (dist <= 16)] = 0.65  # scalp
    arr += 0.02 * np.random.default_rng(123).standard_normal(arr.shape) * (arr > 0)
    return _like(arr, t1)


@functools.lru_cache(maxsize=1)
def _reference_mask() -> sitk.Image:
    """Cerebellar-ish grey matter: MNI (RAS) y < -40 and z < -20, grey-matter probability > 0.5."""
    _t1, gm, _wm, _brain = _mni()
    g = sitk.GetArrayFromImage(gm)
    zz, yy, xx = np.indices(g.shape)
    idx = np.stack([xx, yy, zz], -1).reshape(-1, 3).astype(float)
    phys = np.asarray(gm.GetOrigin()) + (idx * gm.GetSpacing()) @ np.array(gm.GetDirection()).reshape(3, 3).T
    y_ras, z = -phys[:, 1].reshape(g.shape), phys[:, 2].reshape(g.shape)
    return _like((y_ras < -40) & (z < -20) & (g > 0.5), gm, np.uint8)


@functools.lru_cache(maxsize=2)
def _activity(blur: bool = True) -> sitk.Image:
    _t1, gm, wm, _brain = _mni()
    act = GM_ACTIVITY * sitk.GetArrayFromImage(gm) + WM_ACTIVITY * sitk.GetArrayFromImage(wm)
    act[sitk.GetArrayFromImage(_reference_mask()) > 0] = REFERENCE_ACTIVITY
    img = _like(act, gm)
    return sitk.SmoothingRecursiveGaussian(img, PSF_FWHM_MM / 2.3548) if blur else img


def _pet_grid(spacing=(3.5, 3.5, 3.0), z_range=None, flip=False) -> sitk.Image:
    """A PET grid around the head; ``z_range`` crops the axial field of view; ``flip`` stores it RAS-wise."""
    extent = np.array([220.0, 250.0, 200.0])
    spacing = np.asarray(spacing, dtype=float)
    size = np.round(extent / spacing).astype(int)
    origin = np.asarray(BRAIN_CENTRE) - spacing * (size - 1) / 2
    if z_range is not None:
        origin[2] = z_range[0]
        size[2] = int(round((z_range[1] - z_range[0]) / spacing[2])) + 1
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    if flip:  # same physical box, rows stored right-to-left and anterior-to-posterior
        far = origin + spacing * (size - 1)
        origin = np.array([far[0], far[1], origin[2]])
        grid.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    grid.SetOrigin(origin.tolist())
    return grid


def _rigid(rot_deg, shift_mm) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter(BRAIN_CENTRE)
    t.SetRotation(*[math.radians(a) for a in rot_deg])
    t.SetTranslation([float(s) for s in shift_mm])
    return t


def _noisy(image: sitk.Image, rng, noise=0.05) -> sitk.Image:
    arr = sitk.GetArrayFromImage(image)
    return _like(arr * (1 + noise * rng.standard_normal(arr.shape)), image)


def _pet(t1_to_pet, grid, seed) -> sitk.Image:
    """The PET a subject with activity _activity() (in T1 space) gives when T1 point x sits at t1_to_pet(x)."""
    moved = sitk.Resample(_activity(), grid, t1_to_pet.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return _noisy(moved, np.random.default_rng(seed))


def _brain_points() -> np.ndarray:
    return pet._physical_points(_mni()[3])


# ------------------------------------------------------------------------------------------------ helper
def test_mean_displacement_mm_matches_hand_values():
    shift = sitk.TranslationTransform(3, (3.0, 4.0, 0.0))
    points = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 7.0]])
    assert pet.mean_displacement_mm(shift, sitk.Euler3DTransform(), points) == pytest.approx(5.0)
    # 90 degrees about z through the origin: a point at radius r moves r * sqrt(2)
    quarter = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, math.pi / 2, (0.0, 0.0, 0.0))
    radial = np.array([[10.0, 0.0, 0.0], [0.0, 20.0, 5.0]])
    assert pet.mean_displacement_mm(quarter, sitk.Euler3DTransform(), radial) == pytest.approx(15 * math.sqrt(2))
    # composites are applied last-added first, as ITK does
    both = sitk.CompositeTransform([shift, quarter])
    expected = np.mean([np.linalg.norm(np.array(quarter.TransformPoint(p)) + (3, 4, 0) - p) for p in radial])
    assert pet.mean_displacement_mm(both, sitk.Euler3DTransform(), radial) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ PET -> T1
REGISTRATION_CASES = {
    # name: (rotation deg about x, y, z; shift mm; axial field of view (None = whole head); brain mask; flip)
    "small-mask": ((3.0, -4.0, 5.0), (5.0, -7.0, 6.0), None, True, False),
    "large-nomask": ((-8.0, 6.5, -9.0), (-12.0, 10.0, 14.0), None, False, False),
    "cropped-cerebellum-mask": ((-10.0, -10.0, 10.0), (15.0, 15.0, -15.0), (-20.0, 80.0), True, False),
    "cropped-vertex-nomask": ((7.0, -5.0, -10.0), (-9.0, -15.0, 8.0), (-60.0, 40.0), False, False),
    "flipped-storage-mask": ((9.0, 3.0, -6.0), (-6.0, 13.0, -11.0), (-35.0, 65.0), True, True),
}


@pytest.mark.parametrize("name", sorted(REGISTRATION_CASES))
def test_pet_to_t1_recovers_planted_rigid_transform(name):
    rot, shift, z_range, use_mask, flip = REGISTRATION_CASES[name]
    truth = _rigid(rot, shift)
    seed = sorted(REGISTRATION_CASES).index(name)
    pet_image = _pet(truth, _pet_grid(z_range=z_range, flip=flip), seed)
    brain = _mni()[3]
    estimate = pet.register_pet_to_t1(pet_image, _head_t1(), brain if use_mask else None)
    start_error = pet.mean_displacement_mm(sitk.Euler3DTransform(), truth, _brain_points())
    error = pet.mean_displacement_mm(estimate, truth, _brain_points())
    assert start_error > 8.0  # the planted motion is real
    assert error <= 1.0, f"{name}: mean displacement error {error:.2f} mm over brain voxels"


def test_pet_to_t1_is_reproducible_and_to_t1_lands_on_the_activity():
    truth = _rigid((4.0, -6.0, 3.0), (8.0, -5.0, 10.0))
    pet_image = _pet(truth, _pet_grid(), seed=11)
    first = pet.register_pet_to_t1(pet_image, _head_t1(), _mni()[3])
    second = pet.register_pet_to_t1(pet_image, _head_t1(), _mni()[3])
    # seeded sampling: same input, same transform (up to the summation order of ITK's threads)
    assert np.allclose(first.GetParameters(), second.GetParameters(), rtol=0, atol=1e-6)

    t1 = _head_t1()
    in_t1 = pet.to_t1(pet_image, t1, first)
    assert in_t1.GetSize() == t1.GetSize() and in_t1.GetPixelID() == sitk.sitkFloat32
    brain = sitk.GetArrayFromImage(_mni()[3]) > 0
    got = sitk.GetArrayFromImage(in_t1)[brain]
    want = sitk.GetArrayFromImage(_activity())[brain]
    assert np.corrcoef(got, want)[0, 1] > 0.95
    # through a wrong transform (the identity) the same PET does not line up with the activity
    misplaced = sitk.GetArrayFromImage(pet.to_t1(pet_image, t1, sitk.Euler3DTransform()))[brain]
    assert np.corrcoef(misplaced, want)[0, 1] < 0.85
    with pytest.raises(BadInput) as err:
        pet.register_pet_to_t1(pet_image * 0.0, t1)
    assert err.value.reason == "blank_pet"
    # outside the PET field of view the resampled PET is 0
    cropped = _pet(truth, _pet_grid(z_range=(-20.0, 80.0)), seed=12)
    low = sitk.GetArrayFromImage(pet.to_t1(cropped, t1, truth))[:10]  # MNI z -72..-54: below that PET's FOV
    assert not low.any()


# ------------------------------------------------------------------------------------------------ frames
@functools.lru_cache(maxsize=1)
def _moving_frames():
    """6 frames of one head with known rigid motion (weighted-mean-free, up to ~4 mm / ~3 degrees), changing
    uptake (x0.6 .. x1.2) and 5% noise, on a 3 mm grid; frame_i(x) = activity(A_i(x))."""
    rng = np.random.default_rng(3)
    durations = np.array([60.0, 120.0, 300.0, 300.0, 600.0, 600.0])
    weights = durations / durations.sum()
    rotations = rng.uniform(-3, 3, (6, 3))
    shifts = rng.uniform(-4, 4, (6, 3))
    rotations -= weights @ rotations  # the duration-weighted mean position is the motion-free one
    shifts -= weights @ shifts
    truths = [_rigid(r, s) for r, s in zip(rotations, shifts)]
    scales = np.array([0.6, 0.8, 1.0, 1.0, 1.1, 1.2])
    grid = _pet_grid(spacing=(3.0, 3.0, 3.0))
    frames = [_noisy(sitk.Resample(_activity(), grid, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32) * float(k), rng)
              for t, k in zip(truths, scales)]
    # the motion-corrected mean lies where the first frame lies
    still = sitk.Resample(_activity(), grid, truths[0], sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    still = still * float(weights @ scales)
    head = sitk.Resample(_mni()[3], grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return frames, durations, truths, still, head


def _transform_of(motion: dict) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter(motion["centre_mm"])
    t.SetRotation(*[math.radians(a) for a in motion["rotation_deg"]])
    t.SetTranslation(motion["translation_mm"])
    return t


def test_average_frames_recovers_motion_and_sharpens_the_mean():
    frames, durations, truths, still, head = _moving_frames()
    mean, motion = pet.average_frames(frames, list(durations))
    assert len(motion) == 6 and all(m["registered"] for m in motion)
    points = pet._physical_points(head, max_points=20000)
    estimated = [_transform_of(m) for m in motion]
    # frame_i(R_i(x)) = mean(x) and frame_i(x) = activity(A_i(x)), so R_i o R_0^-1 = A_i^-1 o A_0 whatever the
    # (common) position of the mean
    for i in range(1, 6):
        relative = sitk.CompositeTransform([estimated[i], estimated[0].GetInverse()])
        true_relative = sitk.CompositeTransform([truths[i].GetInverse(), truths[0]])
        true_size = pet.mean_displacement_mm(true_relative, sitk.Euler3DTransform(), points)
        error = pet.mean_displacement_mm(relative, true_relative, points)
        assert true_size > 1.0
        assert error <= 0.5, f"frame {i}: motion error {error:.2f} mm (true relative motion {true_size:.1f} mm)"
    # the reported displacement is the size of each frame's motion relative to the first frame
    assert motion[0]["mean_displacement_mm"] == pytest.approx(0.0, abs=1e-6)
    for m, truth in zip(motion[1:], truths[1:]):
        true_relative = sitk.CompositeTransform([truth.GetInverse(), truths[0]])
        size = pet.mean_displacement_mm(true_relative, sitk.Euler3DTransform(), points)
        assert m["mean_displacement_mm"] == pytest.approx(size, abs=0.5)

    inside = sitk.GetArrayFromImage(head) > 0
    want = sitk.GetArrayFromImage(still)[inside]
    naive = sum(d * sitk.GetArrayFromImage(f) for d, f in zip(durations, frames))[inside] / durations.sum()
    corrected = sitk.GetArrayFromImage(mean)[inside]
    rms_naive = np.sqrt(np.mean((naive - want) ** 2))
    rms_corrected = np.sqrt(np.mean((corrected - want) ** 2))
    assert rms_corrected < 0.6 * rms_naive
    assert np.corrcoef(corrected, want)[0, 1] > np.corrcoef(naive, want)[0, 1]
    assert mean.GetSize() == frames[0].GetSize() and mean.GetPixelID() == sitk.sitkFloat32


def test_average_frames_single_frame_and_bad_input():
    frames, durations, *_ = _moving_frames()
    mean, motion = pet.average_frames(frames[:1], [300.0])
    assert np.array_equal(sitk.GetArrayFromImage(mean), sitk.GetArrayFromImage(frames[0]))
    assert motion[0]["mean_displacement_mm"] == 0.0 and motion[0]["translation_mm"] == [0.0, 0.0, 0.0]

    four_d = sitk.JoinSeries(frames[:1])  # one 4-D image (x, y, z, frame) is accepted too
    assert four_d.GetDimension() == 4
    mean, motion = pet.average_frames(four_d)
    assert np.array_equal(sitk.GetArrayFromImage(mean), sitk.GetArrayFromImage(frames[0])) and len(motion) == 1
    assert mean.GetOrigin() == pytest.approx(frames[0].GetOrigin())

    other_grid = sitk.Resample(frames[1], _pet_grid(spacing=(3.5, 3.5, 3.0)))
    with pytest.raises(BadInput) as err:
        pet.average_frames([frames[0], other_grid])
    assert err.value.reason == "mismatched_frames"
    shifted = sitk.Image(frames[1])
    shifted.SetOrigin([o + 2.0 for o in shifted.GetOrigin()])
    with pytest.raises(BadInput) as err:
        pet.average_frames([frames[0], shifted])
    assert err.value.reason == "mismatched_frames"
    with pytest.raises(BadInput) as err:
        pet.average_frames(frames[:2], [60.0])
    assert err.value.reason == "bad_frame_durations"
    with pytest.raises(BadInput) as err:
        pet.average_frames([frames[0], frames[1] * 0.0])
    assert err.value.reason == "blank_pet_frame"
    with pytest.raises(BadInput) as err:
        pet.average_frames([])
    assert err.value.reason == "no_pet_frames"


# ------------------------------------------------------------------------------------------------ SUV
F18_HALF_LIFE_S = 6586.2
FACTS = {"units": "BQML", "injected_dose_bq": 185e6, "injection_to_scan_s": 3600.0,
         "half_life_s": F18_HALF_LIFE_S, "decay_correction": "START", "weight_kg": 70.0}


def test_suv_factor_decays_the_dose_to_the_series_start():
    factor, why = pet.suv_factor(FACTS)
    # by hand: 185 MBq decayed 60 min (F-18, 109.77 min): 185e6 * 2 ** (-60 / 109.77) = 126.66e6 Bq
    decayed = 185e6 * 0.5 ** (3600.0 / 6586.2)
    assert decayed == pytest.approx(126.66e6, rel=1e-4)
    assert factor == pytest.approx(70_000.0 / decayed, rel=1e-9)
    assert "START" in why
    # a 5 kBq/ml voxel is then SUV 5000 * 70000 / 126.66e6 = 2.763
    assert 5000.0 * factor == pytest.approx(2.763, abs=1e-3)


def test_suv_factor_admin_does_not_decay():
    factor, why = pet.suv_factor({**FACTS, "decay_correction": "ADMIN"})
    assert factor == pytest.approx(70_000.0 / 185e6, rel=1e-12)
    assert "ADMIN" in why
    factor, _ = pet.suv_factor({**FACTS, "decay_correction": "ADMIN", "injection_to_scan_s": None})
    assert factor == pytest.approx(70_000.0 / 185e6, rel=1e-12)  # ADMIN needs no timing


@pytest.mark.parametrize("change, words", [
    ({"weight_kg": None}, "Retain Patient Characteristics"),
    ({"weight_kg": 0}, "weight"),
    ({"units": "CNTS"}, "Bq/ml"),
    ({"injected_dose_bq": None}, "dose"),
    ({"half_life_s": None}, "half-life"),
    ({"injection_to_scan_s": None}, "injection time"),
    ({"injection_to_scan_s": -60.0}, "negative"),
    ({"decay_correction": "NONE"}, "not decay-corrected"),
])
def test_suv_factor_none_with_reason(change, words):
    facts = {**FACTS, **change}
    if change.get("weight_kg", 1) is None:
        del facts["weight_kg"]
    factor, why = pet.suv_factor(facts)
    assert factor is None
    assert words in why


def test_suv_factor_units_already_suv():
    assert pet.suv_factor({"units": "GML"})[0] == 1.0


# ------------------------------------------------------------------------------------------------ SUVR
def test_suvr_of_a_region_with_known_ratio():
    """Noise-free, unblurred PET on the T1 grid: reference at 2, a target region of cortex set to 3.3 (SUVR
    1.65) and everything else GM x 4 + WM x 1.5, so the SUVR image is exactly activity / 2."""
    activity = sitk.GetArrayFromImage(_activity(blur=False)).copy()
    gm = sitk.GetArrayFromImage(_mni()[1])
    target = np.zeros_like(gm, dtype=bool)
    target[55:70, 70:90, 30:60] = True  # a superior frontal block (array z, y, x)
    target &= gm > 0.5
    activity[target] = 3.3
    reference = _reference_mask()
    suvr, ref_mean = pet.suvr_image(_like(activity, reference), reference)
    assert ref_mean == pytest.approx(REFERENCE_ACTIVITY, rel=1e-6)
    values = sitk.GetArrayFromImage(suvr)
    assert target.sum() > 500 and sitk.GetArrayFromImage(reference).sum() > 500
    assert values[target].mean() == pytest.approx(1.65, rel=0.01)
    assert values[sitk.GetArrayFromImage(reference) > 0].mean() == pytest.approx(1.0, rel=1e-6)
    assert np.allclose(values, activity / REFERENCE_ACTIVITY, atol=1e-6)


def test_suvr_ignores_reference_voxels_outside_the_pet_field_of_view():
    reference = _reference_mask()
    activity = sitk.GetArrayFromImage(_activity(blur=False)).copy()
    ref = sitk.GetArrayFromImage(reference) > 0
    cut = np.zeros_like(ref)
    cut[: np.argwhere(ref)[:, 0].min() + 5] = True  # the lowest reference slices fall outside the PET FOV
    activity[cut] = 0.0
    assert (ref & cut).sum() > 100
    _suvr, ref_mean = pet.suvr_image(_like(activity, reference), reference)
    assert ref_mean == pytest.approx(REFERENCE_ACTIVITY, rel=1e-6)


def test_suvr_refuses_an_empty_reference():
    reference = _reference_mask()
    pet_image = _activity(blur=False)
    with pytest.raises(BadInput) as err:
        pet.suvr_image(pet_image, reference * 0)
    assert err.value.reason == "empty_reference_region" and "reference region" in err.value.message
    tiny = np.zeros(sitk.GetArrayFromImage(reference).shape, np.uint8)
    tiny[20:23, 30:33, 40:43] = 1  # 27 voxels
    with pytest.raises(BadInput) as err:
        pet.suvr_image(pet_image, _like(tiny, reference, np.uint8))
    assert err.value.reason == "empty_reference_region"
    with pytest.raises(BadInput) as err:  # the whole reference outside the PET field of view
        pet.suvr_image(pet_image * sitk.Cast(reference == 0, sitk.sitkFloat32), reference)
    assert err.value.reason == "empty_reference_region"
    with pytest.raises(BadInput) as err:
        pet.suvr_image(pet_image, sitk.Resample(reference, _pet_grid(), sitk.Transform(),
                                                sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    assert err.value.reason == "reference_grid_mismatch"
