"""DTI: the tensor fit against dipy's TensorModel (its shipped DWIs and a phantom), the phantom's known tensors,
tractography against dipy's EuDX tracking from the same seeds and against the phantom's bundle lengths, the
gradient checks, and the outputs (TRK/TCK, colour FA, NIfTI + bval/bvec).

dipy is the reference only here (the library never imports it).
"""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from imaging_tasks.errors import BadInput
from imaging_tasks.neuroimaging import dti, synth_dwi
from imaging_tasks.neuroimaging import tractography as tg

STEP_MM, FA_STOP, MAX_ANGLE = 0.5, 0.2, 30.0


def _dipy_tensor(data, bvals, bvecs, mask=None):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    return TensorModel(gradient_table(bvals, bvecs=bvecs), return_S0_hat=True).fit(data, mask=mask)


def _dipy_eudx(v1, fa, seeds_vox, affine, max_angle=MAX_ANGLE):
    """dipy's deterministic EuDX tracking (LocalTracking + a peaks direction getter + ThresholdStoppingCriterion on
    FA) on the same principal eigenvectors: a PeaksAndMetrics whose 'sphere' is the set of eigenvectors, so no
    direction is quantised."""
    from dipy.core.sphere import Sphere
    from dipy.direction.peaks import PeaksAndMetrics
    from dipy.tracking.local_tracking import LocalTracking
    from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion

    ok = fa > 0
    pam = PeaksAndMetrics()
    pam.sphere = Sphere(xyz=v1[ok])
    indices = np.zeros(fa.shape + (1,))
    indices[ok, 0] = np.arange(ok.sum())
    pam.peak_indices, pam.peak_values, pam.peak_dirs = indices, np.where(ok, fa, 0.0)[..., None], v1[..., None, :]
    pam.ang_thr, pam.qa_thr, pam.total_weight = max_angle, 0.0, 0.5
    seeds_w = seeds_vox @ affine[:3, :3].T + affine[:3, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lines = list(LocalTracking(pam, ThresholdStoppingCriterion(fa, FA_STOP), seeds_w, affine, step_size=STEP_MM,
                                   maxlen=500, return_all=True))
    inv = np.linalg.inv(affine)
    return [s @ inv[:3, :3].T + inv[:3, 3] for s in lines if len(s) >= 2]


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=["small_64D", "small_101D"])
def shipped(request):
    from dipy.data import get_fnames

    nifti, bval, bvec = get_fnames(name=request.param)
    data = np.asarray(nib.load(nifti).dataobj, dtype=np.float64)
    bvals, bvecs = dti.read_gradients(bval, bvec, data.shape[3])
    return {"name": request.param, "data": data, "bvals": bvals, "bvecs": bvecs, "bval_path": bval,
            "bvec_path": bvec}


@pytest.fixture(scope="module")
def ph():
    return synth_dwi.phantom(np.random.default_rng(12), shape=(44, 44, 22), n_directions=30, snr=40.0)


@pytest.fixture(scope="module")
def ph_fit(ph):
    return dti.fit_tensor(ph["data"], ph["bvals"], ph["bvecs"], ph["truth"]["brain"], device="cpu")


def _wm_seeds(fit):
    return tg.seeds_from_mask(fit.fa > 0.3, per_axis=1)


# --------------------------------------------------------------------------------------------- the fit vs dipy
def test_fit_matches_dipy_on_shipped_dwi(shipped):
    """FA and MD vs dipy's TensorModel (WLS) on dipy's own files; held far tighter than the issue's 1e-3."""
    from dipy.io.gradients import read_bvals_bvecs

    bvals_ref, bvecs_ref = read_bvals_bvecs(str(shipped["bval_path"]), str(shipped["bvec_path"]))
    ref = _dipy_tensor(shipped["data"], bvals_ref, bvecs_ref)
    ours = dti.fit_tensor(shipped["data"], shipped["bvals"], shipped["bvecs"], device="cpu")
    assert np.abs(ours.fa - ref.fa).max() < 1e-6
    assert np.abs(ours.md - ref.md).max() < 1e-6 * ref.md.max()      # MD is ~1e-3 mm^2/s: compare relatively
    assert np.abs(ours.ad - ref.ad).max() < 1e-6 * ref.md.max()
    assert np.abs(ours.rd - ref.rd).max() < 1e-6 * ref.md.max()
    assert np.allclose(ours.evals, ref.evals, rtol=1e-6, atol=1e-12)
    aniso = ref.fa > 0.2
    assert aniso.sum() > 20
    alignment = np.abs((ours.v1[aniso] * ref.evecs[aniso][..., 0]).sum(-1))
    assert alignment.min() > 1 - 1e-6
    assert np.allclose(ours.s0, ref.S0_hat, rtol=1e-6)


def test_wrong_b_matrix_is_caught(shipped):
    """The comparison must be able to fail: swapped bvec axes or scaled b-values move FA/MD/v1 far past 1e-3."""
    data, bvals, bvecs = shipped["data"], shipped["bvals"], shipped["bvecs"]
    good = dti.fit_tensor(data, bvals, bvecs, device="cpu")
    aniso = good.fa > 0.2
    swapped = dti.fit_tensor(data, bvals, bvecs[:, [1, 0, 2]], device="cpu")
    # FA is invariant to a permutation of the frame, the direction is not
    assert np.median(np.abs((swapped.v1[aniso] * good.v1[aniso]).sum(-1))) < 0.95
    scaled = dti.fit_tensor(data, bvals * 2, bvecs, device="cpu")
    assert np.abs(scaled.md[aniso] / good.md[aniso] - 0.5).max() < 1e-6
    assert np.abs(scaled.md - good.md).max() > 1e-3 * good.md.max() * 100
    skewed = bvecs.copy()
    skewed[:, 2] *= -1      # one axis flipped: FA the same, v1 mirrored
    flipped = dti.fit_tensor(data, bvals, skewed, device="cpu")
    assert np.abs(flipped.fa - good.fa).max() < 1e-6
    off_axis = aniso & (np.abs(good.v1[..., 2]) > 0.3) & (np.abs(good.v1[..., :2]).max(-1) > 0.3)
    assert np.abs((flipped.v1[off_axis] * good.v1[off_axis]).sum(-1)).max() < 0.95


def test_phantom_fit_matches_dipy_and_truth(ph, ph_fit):
    truth = ph["truth"]
    ref = _dipy_tensor(ph["data"].astype(np.float64), ph["bvals"], ph["bvecs"], mask=truth["brain"])
    assert np.abs(ph_fit.fa - ref.fa).max() < 1e-6
    assert np.abs(ph_fit.md - ref.md).max() < 1e-6 * ref.md.max()
    for name, bundle in truth["bundles"].items():
        inside = truth["labels"] == bundle["label"]
        assert abs(np.median(ph_fit.fa[inside]) - bundle["fa"]) < 0.03, name
        assert abs(np.median(ph_fit.md[inside]) / bundle["md_mm2_per_s"] - 1) < 0.03, name
        angle = np.degrees(np.arccos(np.clip(np.abs((ph_fit.v1[inside] * truth["v1"][inside]).sum(-1)), 0, 1)))
        assert np.median(angle) < 3.0, name
    background = truth["labels"] == 0
    assert np.percentile(ph_fit.fa[background], 95) < FA_STOP
    assert np.all(ph_fit.fa[~truth["brain"]] == 0)


def test_noiseless_phantom_is_exact():
    ph = synth_dwi.phantom(np.random.default_rng(0), shape=(24, 24, 12), n_directions=12, snr=None)
    fit = dti.fit_tensor(ph["data"], ph["bvals"], ph["bvecs"], ph["truth"]["brain"], device="cpu")
    brain = ph["truth"]["brain"]
    assert np.abs(fit.fa - ph["truth"]["fa"])[brain].max() < 1e-4
    assert np.abs(fit.md / np.where(brain, ph["truth"]["md_mm2_per_s"], 1) - 1)[brain].max() < 1e-4
    assert np.abs(fit.s0[brain] - 1000).max() < 0.1


# --------------------------------------------------------------------------------------------- tractography
@pytest.fixture(scope="module")
def tracks(ph, ph_fit):
    vs = tg.voxel_sizes_mm(ph["affine"])
    seeds = _wm_seeds(ph_fit)
    ours = tg.track_deterministic(ph_fit.v1, ph_fit.fa, seeds, voxel_size_mm=vs, step_mm=STEP_MM, fa_stop=FA_STOP,
                                  max_angle_deg=MAX_ANGLE, min_length_mm=0, max_length_mm=250, device="cpu")
    return seeds, ours


def test_tracking_matches_dipy_eudx(ph, ph_fit, tracks):
    seeds, ours = tracks
    ref = _dipy_eudx(ph_fit.v1, ph_fit.fa, seeds, ph["affine"])
    assert len(ours) > 0.9 * len(seeds)
    assert abs(len(ours) / len(ref) - 1) <= 0.05
    ours_mm = tg.streamline_lengths_mm(ours, ph["affine"])
    ref_mm = tg.streamline_lengths_mm(ref, ph["affine"])
    assert abs(ours_mm.mean() / ref_mm.mean() - 1) <= 0.05
    # the same algorithm: streamline for streamline, the same points up to float32 rounding (the tracker runs in
    # float32; a stop right at the FA or angle threshold may go the other way, so allow a few such streamlines)
    assert len(ours) == len(ref)
    same = [a.shape == b.shape for a, b in zip(ours, ref)]
    assert np.mean(same) >= 0.99
    assert max(np.abs(a - b).max() for a, b, s in zip(ours, ref, same) if s) < 1e-3


def test_tracking_pool_and_blocks_do_not_change_streamlines(ph, ph_fit, tracks):
    """The pool (halves in flight) and the assembly blocks are bookkeeping only: a tiny pool, odd block sizes and a
    length cap that ends many halves mid-way give the same streamlines as the defaults (the same points up to
    float32 rounding: torch's vectorised and scalar loops round the last bit differently for other array sizes)."""

    def same(xs, ys):
        return len(xs) == len(ys) and all(a.shape == b.shape and np.abs(a - b).max() < 1e-4 for a, b in zip(xs, ys))

    seeds, ours = tracks
    vs = tg.voxel_sizes_mm(ph["affine"])
    small = tg.track_deterministic(ph_fit.v1, ph_fit.fa, seeds, voxel_size_mm=vs, step_mm=STEP_MM, fa_stop=FA_STOP,
                                   max_angle_deg=MAX_ANGLE, min_length_mm=0, max_length_mm=250, device="cpu",
                                   pool=64, block_seeds=37)
    assert same(small, ours)
    capped = [tg.track_deterministic(ph_fit.v1, ph_fit.fa, seeds[:300], voxel_size_mm=vs, step_mm=STEP_MM,
                                     fa_stop=FA_STOP, min_length_mm=3, max_length_mm=15, device="cpu", **kw)
              for kw in ({}, {"pool": 50, "block_seeds": 23})]
    assert len(capped[0]) == len(capped[1]) > 0
    assert same(*capped)
    lengths = tg.streamline_lengths_mm(capped[0], ph["affine"])
    assert lengths.max() <= 15 + 1e-9 and lengths.min() >= 3 - 1e-9
    # a half stops at ceil(15 / 0.5) = 30 points: the seed plus at most 30 points each way
    assert max(len(s) for s in capped[0]) <= 61


def test_tracking_recovers_bundle_lengths(ph, ph_fit, tracks):
    seeds, ours = tracks
    truth = ph["truth"]
    lengths = tg.streamline_lengths_mm(ours, ph["affine"])
    top = np.array(truth["fa"].shape) - 1
    majority = np.array([np.bincount(np.maximum(truth["labels"][tuple(np.clip(np.round(s).astype(int), 0, top).T)], 0),
                                     minlength=4).argmax() for s in ours])
    for name, bundle in truth["bundles"].items():
        mine = lengths[majority == bundle["label"]]
        assert len(mine) > 20, name
        assert abs(np.median(mine) / bundle["length_mm"] - 1) < 0.12, (name, np.median(mine), bundle["length_mm"])


def test_flipped_gradient_axis_breaks_the_arc(ph):
    """A wrong b-matrix (x of the gradients flipped) mirrors every direction: the half-ring's field no longer
    follows the ring, and its streamlines fall far short of the planted length."""
    truth = ph["truth"]
    bvecs = ph["bvecs"].copy()
    bvecs[:, 0] *= -1
    fit = dti.fit_tensor(ph["data"], ph["bvals"], bvecs, truth["brain"], device="cpu")
    arc = truth["labels"] == truth["bundles"]["arc"]["label"]
    seeds = tg.seeds_from_mask(arc & (fit.fa > 0.3))
    lines = tg.track_deterministic(fit.v1, fit.fa, seeds, voxel_size_mm=tg.voxel_sizes_mm(ph["affine"]),
                                   min_length_mm=0, device="cpu")
    assert np.median(tg.streamline_lengths_mm(lines, ph["affine"])) < 0.5 * truth["bundles"]["arc"]["length_mm"]


def test_seeds_match_dipy_and_histogram(ph_fit):
    from dipy.tracking.utils import seeds_from_mask

    mask = ph_fit.fa > 0.5
    for d in (1, 2):
        assert np.allclose(tg.seeds_from_mask(mask, per_axis=d), seeds_from_mask(mask, np.eye(4), density=d))
    counts, edges = tg.length_histogram([5.0, 12.0, 18.0, 31.0], bin_mm=10)
    assert counts.tolist() == [1, 2, 0, 1] and edges[0] == 0 and edges[-1] == 40


@pytest.mark.parametrize("suffix", [".trk", ".tck"])
def test_save_streamlines_round_trip(ph, tracks, tmp_path, suffix):
    _, ours = tracks
    path = tg.save_streamlines(ours[:200], ph["affine"], ph["data"].shape, tmp_path / f"tracks{suffix}")
    back = nib.streamlines.load(str(path)).streamlines
    world = tg.to_world(ours[:200], ph["affine"])
    assert len(back) == 200
    assert max(np.abs(np.asarray(a) - b).max() for a, b in zip(back, world)) < 1e-3


# --------------------------------------------------------------------------------------------- I/O and checks
def test_color_fa_png(ph_fit, tmp_path):
    from PIL import Image

    path = dti.color_fa_png(ph_fit.fa, ph_fit.v1, tmp_path / "cfa.png")
    rgb = np.asarray(Image.open(path)).astype(int)
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)     # the x bundle
    assert red.sum() > 50


def test_write_nifti_round_trip(ph, tmp_path):
    paths = synth_dwi.write_nifti(tmp_path, ph)
    img = nib.load(paths["nifti"])
    bvals, bvecs = dti.read_gradients(paths["bval"], paths["bvec"], img.shape[3])
    assert np.allclose(bvals, ph["bvals"]) and np.allclose(bvecs, ph["bvecs"], atol=1e-6)
    assert np.allclose(img.affine, ph["affine"])
    assert np.array_equal(np.asarray(img.dataobj), ph["data"])


def _write(tmp_path, bval_text, bvec_text):
    (tmp_path / "g.bval").write_text(bval_text)
    (tmp_path / "g.bvec").write_text(bvec_text)
    return tmp_path / "g.bval", tmp_path / "g.bvec"


def test_gradient_layouts_and_bad_inputs(tmp_path):
    bvals, bvecs = synth_dwi.gradient_scheme(8, 1000, 1)
    rows = "\n".join(" ".join(f"{v:.6f}" for v in r) for r in bvecs.T)
    cols = "\n".join(" ".join(f"{v:.6f}" for v in r) for r in bvecs)
    bval_row = " ".join(f"{b:g}" for b in bvals)
    a = dti.read_gradients(*_write(tmp_path, bval_row, rows), 9)
    b = dti.read_gradients(*_write(tmp_path, bval_row.replace(" ", "\n"), cols), 9)
    assert np.allclose(a[0], b[0]) and np.allclose(a[1], b[1])

    def reason(bval_text, bvec_text, n=9):
        with pytest.raises(BadInput) as err:
            dti.read_gradients(*_write(tmp_path, bval_text, bvec_text), n)
        assert str(tmp_path) not in err.value.message
        return err.value.reason

    assert reason("0 1000 abc", rows) == "dwi_gradients_unreadable"
    assert reason("", rows) == "dwi_gradients_unreadable"
    assert reason(bval_row, rows, n=10) == "dwi_volume_mismatch"
    nan_b0 = "\n".join(" ".join(["nan"] + [f"{v:.6f}" for v in r[1:]]) for r in bvecs.T)   # dipy's small_64D style
    assert np.allclose(dti.read_gradients(*_write(tmp_path, bval_row, nan_b0), 9)[1], a[1])
    assert reason(bval_row, nan_b0.replace(f"{bvecs[1, 0]:.6f}", "nan", 1)) == "dwi_gradients_unreadable"
    assert reason(bval_row, nan_b0.replace("nan", "inf", 1)) == "dwi_gradients_unreadable"
    assert reason(bval_row.replace("0 ", "1000 ", 1), rows) == "dwi_no_b0"
    few = np.concatenate([np.zeros((1, 3)), np.tile(bvecs[1:4], (3, 1))[:8]])
    assert reason(bval_row, "\n".join(" ".join(f"{v:.6f}" for v in r) for r in few.T)) == "dwi_too_few_directions"
    with pytest.raises(BadInput) as err:
        dti.check_gradients(bvals, bvecs, 10)
    assert err.value.reason == "dwi_volume_mismatch"
