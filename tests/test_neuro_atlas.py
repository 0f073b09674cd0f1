"""MNI152 -> T1 atlas registration against planted truth (imaging_tasks.neuroimaging.atlas).

Each subject is the MNI152 template put through a known map and a different scanner: a smooth random warp
(Gaussian-smoothed noise, smooth at ~30 mm, 5 mm peak inside the brain), then an affine (scale 0.85-1.05 per
axis, rotations up to 8 deg, shifts up to 10 mm), a monotone intensity remap (another GM/WM contrast),
multiplicative and additive noise, a dark skull and bright scalp around the brain, on a 2 mm or an oblique
1.2 x 1.2 x 2 mm grid.  Landmarks are a regular grid of MNI points inside the brain; their true place in the
subject is found by inverting the planted map numerically.  A registration that got the direction, the
composition order or the LPS/RAS flip wrong, or whose deformable stage did nothing, fails these.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from imaging_tasks.errors import BadInput
from imaging_tasks.neuroimaging import atlas

# name: seed, grid spacing (mm), obliquity of the grid (deg), warp peak (mm), intensity exponent, input mask
CASES = {
    "warped_2mm": dict(seed=11, spacing=(2.0, 2.0, 2.0), oblique_deg=0.0, warp_peak_mm=5.0, gamma=0.7,
                       mask="brain"),
    "warped_oblique_1.2x1.2x2mm": dict(seed=12, spacing=(1.2, 1.2, 2.0), oblique_deg=10.0, warp_peak_mm=5.0,
                                       gamma=1.4, mask="parenchyma"),
    "affine_only_2mm": dict(seed=13, spacing=(2.0, 2.0, 2.0), oblique_deg=0.0, warp_peak_mm=0.0, gamma=1.2,
                            mask="brain"),
}
WARPED = [k for k, v in CASES.items() if v["warp_peak_mm"] > 0]
PAD = 10  # voxels of room around the template for the skull and scalp
WARP_SMOOTH_MM = 12.0  # Gaussian sigma of the warp noise (FWHM ~28 mm)
LANDMARK_STEP = 15  # template voxels (30 mm) between landmarks


def _like(arr, ref):
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


@functools.lru_cache(maxsize=1)
def _head() -> dict:
    """The template padded, with CSF, a dark skull and a bright scalp around the brain (template space)."""
    tpl = atlas.mni_template()
    ref = sitk.ConstantPad(tpl["t1"], [PAD] * 3, [PAD] * 3, 0.0)
    images = {k: sitk.ConstantPad(sitk.Cast(v, sitk.sitkFloat32), [PAD] * 3, [PAD] * 3, 0.0) for k, v in tpl.items()}
    brain = sitk.GetArrayFromImage(images["brain"]) > 0
    d = ndi.distance_transform_edt(~brain, sampling=2.0)
    t1 = sitk.GetArrayFromImage(images["t1"])
    t1 = np.where(brain, t1, np.select([d <= 3, d <= 9, d <= 15], [0.12, 0.03, 0.9], 0.0)).astype(np.float32)
    images["t1"] = _like(t1, ref)
    return images


def _warp_field(rng, ref: sitk.Image, brain: np.ndarray, peak_mm: float) -> sitk.Image:
    u = np.stack([ndi.gaussian_filter(rng.normal(size=brain.shape), WARP_SMOOTH_MM / 2.0) for _ in range(3)], -1)
    u *= peak_mm / np.linalg.norm(u, axis=-1)[brain].max()
    return _like(u, ref)  # vector image, LPS mm


@functools.lru_cache(maxsize=None)
def _case(name: str) -> dict:
    spec = CASES[name]
    rng = np.random.default_rng(spec["seed"])
    head = _head()
    brain = sitk.GetArrayFromImage(head["brain"]) > 0
    # Planted map, subject point q -> MNI point: T(q) = W(A(q)), A(q) = R diag(1/s) (q - c) + c + t.
    scale, rot, shift = rng.uniform(0.85, 1.05, 3), rng.uniform(-8, 8, 3), rng.uniform(-10, 10, 3)
    centre = np.array(head["brain"].TransformContinuousIndexToPhysicalPoint(
        np.argwhere(brain)[:, ::-1].mean(0).tolist()))
    euler = sitk.Euler3DTransform()
    euler.SetRotation(*np.deg2rad(rot))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(centre))
    affine.SetMatrix(tuple((np.array(euler.GetMatrix()).reshape(3, 3) @ np.diag(1 / scale)).ravel()))
    affine.SetTranslation(tuple(shift))
    parts = [affine]
    warp = None
    if spec["warp_peak_mm"] > 0:
        warp = sitk.DisplacementFieldTransform(_warp_field(rng, head["t1"], brain, spec["warp_peak_mm"]))
        parts = [warp, affine]
    truth = sitk.CompositeTransform(parts)  # applies the last first: W(A(q))
    # Scanner grid: oblique by `oblique_deg`, centred on the subject's brain.
    sp = np.array(spec["spacing"])
    size = [int(np.ceil((n * 2.0 + 20) / s)) for n, s in zip(head["t1"].GetSize(), sp)]
    tilt = sitk.Euler3DTransform()
    tilt.SetRotation(np.deg2rad(spec["oblique_deg"]), 0.0, np.deg2rad(spec["oblique_deg"] / 2))
    direction = np.array(tilt.GetMatrix()).reshape(3, 3)
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(tuple(sp))
    grid.SetDirection(tuple(direction.ravel()))
    subject_centre = np.array(affine.GetInverse().TransformPoint(tuple(centre)))
    grid.SetOrigin(tuple(subject_centre - direction @ ((np.array(size) - 1) / 2 * sp)))
    # Another scanner: monotone remap of the intensities (GM/WM contrast), noise.
    remapped = _like(np.clip(sitk.GetArrayFromImage(head["t1"]), 0, None) ** spec["gamma"], head["t1"])
    signal = sitk.GetArrayFromImage(sitk.Resample(remapped, grid, truth, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    noisy = 1000.0 * signal * (1 + 0.03 * rng.normal(size=signal.shape)) + rng.normal(0, 10, signal.shape)
    t1 = _like(np.clip(noisy, 0, None).astype(np.float32), grid)

    def planted(img):
        return sitk.GetArrayFromImage(sitk.Resample(img, grid, truth, sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > 0.5

    truth_brain = planted(head["brain"])
    given = truth_brain if spec["mask"] == "brain" else planted(head["gm"] + head["wm"])  # parenchyma only
    mask = sitk.Cast(_like(given.astype(np.uint8), grid), sitk.sitkUInt8)
    # Landmarks: a 30 mm grid of MNI points inside the (eroded) brain; subject place = A^-1(W^-1(p)).
    tpl_brain = atlas.mni_template()["brain"]
    inner = np.argwhere(ndi.binary_erosion(sitk.GetArrayFromImage(tpl_brain) > 0, iterations=2))
    inner = inner[(inner % LANDMARK_STEP == LANDMARK_STEP // 2).all(1)]
    p_mni = np.array([tpl_brain.TransformIndexToPhysicalPoint([int(v) for v in zyx[::-1]]) for zyx in inner])
    inverse_affine = affine.GetInverse()
    q = []
    for p in p_mni:
        a = p.copy()
        for _ in range(60 if warp is not None else 0):  # fixed point of a = p - u(a); |grad u| << 1 converges
            a = p - (np.array(warp.TransformPoint(tuple(a))) - a)
        q.append(inverse_affine.TransformPoint(tuple(a)))
    q = np.array(q)
    back = np.array([truth.TransformPoint(tuple(x)) for x in q])
    assert np.abs(back - p_mni).max() < 1e-4, "the planted map's numerical inverse did not converge"
    return {"t1": t1, "mask": mask, "truth_brain": truth_brain, "q": q, "p": p_mni, "truth": truth}


@functools.lru_cache(maxsize=None)
def _registered(name: str) -> atlas.AtlasRegistration:
    case = _case(name)
    return atlas.register_mni_to_t1(case["t1"], case["mask"])


def _landmark_errors(transform: sitk.Transform, case: dict) -> np.ndarray:
    est = np.array([transform.TransformPoint(tuple(x)) for x in case["q"]])
    return np.linalg.norm(est - case["p"], axis=1)


# --------------------------------------------------------------------------- template
def test_template_is_nilearns_mni152_in_lps():
    from nilearn import datasets

    tpl = atlas.mni_template()
    nii = datasets.load_mni152_template(resolution=2)
    data = np.asarray(nii.dataobj)
    img = tpl["t1"]
    for ijk in [(10, 20, 30), (60, 90, 40), (49, 20, 70)]:
        ras = nii.affine @ np.array([*ijk, 1.0])
        lps = (-ras[0], -ras[1], ras[2])
        assert np.allclose(img.TransformIndexToPhysicalPoint(ijk), lps, atol=1e-6)
        assert img.GetPixel(*ijk) == pytest.approx(float(data[ijk]), abs=1e-6)
    assert np.allclose(np.array(img.GetDirection()).reshape(3, 3), np.diag([-1, -1, 1]))
    brain = sitk.GetArrayFromImage(tpl["brain"]) > 0
    assert tpl["brain"].GetPixelID() == sitk.sitkUInt8
    assert 1800 < brain.sum() * 8 / 1000 < 1950  # ml: nilearn's T1 > 0.2 mask
    total = sum(sitk.GetArrayFromImage(tpl[k]) for k in ("gm", "wm", "csf"))
    assert np.allclose(total[brain], 1.0, atol=1e-5) and np.all(total[~brain] == 0)
    # the cache hands out copies
    tpl["brain"][0, 0, 0] = 7
    assert atlas.mni_template()["brain"][0, 0, 0] == 0


# --------------------------------------------------------------------------- accuracy against the planted map
@pytest.mark.parametrize("name", list(CASES))
def test_landmark_error(name, record_property):
    case = _case(name)
    reg = _registered(name)
    full = _landmark_errors(reg.transform, case)
    affine_only = _landmark_errors(reg.affine, case)
    summary = {"landmarks": len(full), "mean_mm": round(float(full.mean()), 3), "max_mm": round(float(full.max()), 3),
               "affine_only_mean_mm": round(float(affine_only.mean()), 3),
               "affine_only_max_mm": round(float(affine_only.max()), 3), "timings_s": reg.timings}
    record_property("landmark_error", summary)
    print(name, json.dumps(summary))
    assert 30 <= len(full) <= 80
    assert full.mean() <= 1.5, summary
    assert full.max() <= 4.0, summary
    assert reg.metrics["folded_fraction"] == 0.0 and reg.metrics["jacobian_min"] > 0
    if name in WARPED:
        # the deformable stage does the work the affine cannot
        assert affine_only.mean() >= 1.2, summary
        assert full.mean() <= 0.5 * affine_only.mean(), summary
        assert reg.metrics["correlation_deformable"] > reg.metrics["correlation_affine"]
    else:
        assert affine_only.mean() <= 0.5, summary


@pytest.mark.parametrize("name", list(CASES))
def test_mni_brain_mask_onto_t1_matches_planted_mask(name):
    case = _case(name)
    reg = _registered(name)
    mni_brain = atlas.mni_template()["brain"]
    in_t1 = atlas.to_t1(mni_brain, case["t1"], reg.transform, labels=True)
    assert in_t1.GetPixelID() == sitk.sitkUInt8 and set(np.unique(sitk.GetArrayFromImage(in_t1))) <= {0, 1}
    assert np.allclose(in_t1.GetOrigin(), case["t1"].GetOrigin()) and in_t1.GetSize() == case["t1"].GetSize()
    truth = sitk.Cast(_like(case["truth_brain"].astype(np.uint8), case["t1"]), sitk.sitkUInt8)
    agreement = atlas.mask_agreement(truth, in_t1)
    assert agreement["dice"] >= 0.95, agreement
    assert 0.95 <= agreement["volume_ratio"] <= 1.05, agreement
    # the same image, linearly: fractions in [0, 1], float32, > 0.5 where the label version is 1 (mostly)
    frac = atlas.to_t1(sitk.Cast(mni_brain, sitk.sitkFloat32), case["t1"], reg.transform, labels=False)
    f = sitk.GetArrayFromImage(frac)
    assert frac.GetPixelID() == sitk.sitkFloat32 and f.min() >= 0 and f.max() <= 1 + 1e-6
    assert ((f > 0.5) == (sitk.GetArrayFromImage(in_t1) > 0)).mean() > 0.99


def test_transform_round_trips_through_files(tmp_path):
    name = WARPED[0]
    case = _case(name)
    reg = _registered(name)
    names = atlas.save_registration(reg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    loaded = atlas.load_transform(tmp_path)
    rng = np.random.default_rng(0)
    t1 = case["t1"]
    corners = np.array(t1.TransformContinuousIndexToPhysicalPoint([0, 0, 0]))
    far = np.array(t1.TransformContinuousIndexToPhysicalPoint([n - 1 for n in t1.GetSize()]))
    points = np.vstack([case["q"], corners + rng.uniform(0, 1, (200, 3)) * (far - corners)])  # in and off the field
    a = np.array([reg.transform.TransformPoint(tuple(p)) for p in points])
    b = np.array([loaded.TransformPoint(tuple(p)) for p in points])
    assert np.abs(a - b).max() < 1e-3
    manifest = json.loads((tmp_path / atlas.MANIFEST_FILE).read_text())
    assert manifest["affine"] == atlas.AFFINE_FILE and manifest["displacement"] == atlas.FIELD_FILE
    # an affine-only registration (no field) loads as the affine
    only = atlas.AtlasRegistration(affine=reg.affine, transform=reg.affine)
    atlas.save_registration(only, tmp_path / "affine")
    again = atlas.load_transform(tmp_path / "affine")
    assert np.allclose(again.TransformPoint(tuple(case["q"][0])), reg.affine.TransformPoint(tuple(case["q"][0])))


# --------------------------------------------------------------------------- small pieces
def test_mask_agreement_of_planted_boxes():
    a = np.zeros((20, 20, 20), np.uint8)
    b = np.zeros_like(a)
    a[2:12, 2:12, 2:12] = 1  # 1000 voxels
    b[2:12, 2:12, 7:17] = 1  # 1000 voxels, 500 shared
    got = atlas.mask_agreement(sitk.GetImageFromArray(a), sitk.GetImageFromArray(b))
    assert got == {"dice": 0.5, "volume_ratio": 1.0}
    b[2:12, 2:12, 12:17] = 0  # 500 voxels, all shared
    got = atlas.mask_agreement(sitk.GetImageFromArray(a), sitk.GetImageFromArray(b))
    assert got == {"dice": round(1000 / 1500, 4), "volume_ratio": 2.0}


def test_unusable_inputs_raise_bad_input(tmp_path):
    t1 = sitk.Image([60, 60, 60], sitk.sitkFloat32)
    t1.SetSpacing((2.0, 2.0, 2.0))
    t1 += 100.0
    small = sitk.Image(t1.GetSize(), sitk.sitkUInt8)
    small.CopyInformation(t1)
    small[20:30, 20:30, 20:30] = 1  # 8 ml
    with pytest.raises(BadInput) as err:
        atlas.register_mni_to_t1(t1, small)
    assert err.value.reason == "brain_mask_too_small"
    other = sitk.Image([50, 60, 60], sitk.sitkUInt8)
    with pytest.raises(BadInput) as err:
        atlas.register_mni_to_t1(t1, other)
    assert err.value.reason == "mismatched_geometry"
    big = sitk.Image(t1.GetSize(), sitk.sitkUInt8)
    big.CopyInformation(t1)
    big[5:55, 5:55, 5:55] = 1
    with pytest.raises(BadInput) as err:
        atlas.register_mni_to_t1(t1 * 0, big)
    assert err.value.reason == "blank_image"
    with pytest.raises(BadInput) as err:
        atlas.load_transform(tmp_path)
    assert err.value.reason == "missing_registration"
