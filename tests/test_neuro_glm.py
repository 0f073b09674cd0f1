"""fMRI first-level GLM (imaging_tasks.neuroimaging.glm) against nilearn 0.14.1 and against planted truth.

nilearn is the reference: its design matrix column by column, its ``FirstLevelModel`` (OLS and AR(1)) betas,
variances and z maps on the same data and design.  The synthetic run (synth_fmri) plants known percent signal
changes in known Seitzman ROIs; a wrong HRF timing or a flipped contrast must miss them.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from imaging_tasks.errors import BadInput
from imaging_tasks.neuroimaging import glm, synth_fmri
from imaging_tasks.neuroimaging.glm import Event

N_VOL = 120
TR_S = 2.0
BETA_RTOL = 1e-4  # the bound: betas within 1e-4 relative
Z_ATOL = 1e-3  # z within 1e-3


@pytest.fixture(scope="module")
def run():
    s = synth_fmri.synthesize_bold_mni(np.random.default_rng(12), voxel_mm=4, n_volumes=N_VOL, tr_s=TR_S)
    s["frame_times_s"] = np.arange(N_VOL) * TR_S
    s["Y"] = s["data"][s["truth"]["brain_mask"]].T  # (t, v) view of the (v, t) masked array
    return s


def _events_df(events):
    return pd.DataFrame({"onset": [e.onset_s for e in events], "duration": [e.duration_s for e in events],
                         "trial_type": [e.trial_type for e in events],
                         "modulation": [e.modulation for e in events]})


def _nilearn_dm(ft, events, **kw):
    from nilearn.glm.first_level import make_first_level_design_matrix

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_first_level_design_matrix(ft, _events_df(events), **kw)


# --------------------------------------------------------------------------- design matrix
def test_design_matrix_matches_nilearn_column_by_column(run):
    ft = run["frame_times_s"]
    # awkward events too: zero duration, a modulation, a duplicate (nilearn sums them), one before the run
    events = run["events"] + [Event(33.3, 0.0, "probe"), Event(101.7, 3.5, "probe", 2.0),
                              Event(101.7, 3.5, "probe", 1.0), Event(-5.0, 10.0, "probe")]
    motion = np.random.default_rng(1).normal(0, 0.3, (N_VOL, 6))
    cases = [dict(hrf_model="spm"), dict(hrf_model="spm + derivative"),
             dict(hrf_model="spm", drift_model=None), dict(hrf_model="spm", high_pass_hz=0.02, motion=motion)]
    for kw in cases:
        X, names = glm.design_matrix(ft, events, **kw)
        ref = _nilearn_dm(ft, events, hrf_model=kw["hrf_model"], drift_model=kw.get("drift_model", "cosine"),
                          high_pass=kw.get("high_pass_hz", 0.01), add_regs=kw.get("motion"),
                          add_reg_names=list(glm.MOTION_NAMES) if "motion" in kw else None)
        assert names == list(ref.columns), kw
        np.testing.assert_allclose(X, ref.to_numpy(), rtol=0, atol=1e-12, err_msg=str(kw))
    # the check can fail: nilearn's Glover HRF is a different (valid) HRF and must not pass for SPM's
    X, _ = glm.design_matrix(ft, events)
    glover = _nilearn_dm(ft, events, hrf_model="glover").to_numpy()
    assert np.abs(X - glover).max() > 1e-2
    assert glm.condition_columns(glm.design_matrix(ft, events, hrf_model="spm + derivative", motion=motion)[1]) \
        == ["motor", "probe", "visual"]


# --------------------------------------------------------------------------- fit vs nilearn FirstLevelModel
def _first_level(run, X, names, noise_model):
    import nibabel as nib
    from nilearn.glm.first_level import FirstLevelModel

    img = nib.Nifti1Image(run["data"], run["affine"])
    mask = nib.Nifti1Image(run["truth"]["brain_mask"].astype(np.uint8), run["affine"])
    model = FirstLevelModel(t_r=TR_S, noise_model=noise_model, mask_img=mask, signal_scaling=0,
                            minimize_memory=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(img, design_matrices=[pd.DataFrame(X, columns=names)])
    return model


def _nilearn_contrast(model, run, vector):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.compute_contrast(vector, stat_type="t", output_type="all")
    mask = run["truth"]["brain_mask"]
    return {k: np.asarray(out[k].dataobj)[mask] for k in ("effect_size", "effect_variance", "z_score", "stat")}


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
def test_fit_matches_nilearn_first_level_model(run, noise_model):
    X, names = glm.design_matrix(run["frame_times_s"], run["events"], hrf_model="spm + derivative")
    fit = glm.fit_glm(run["Y"], X, noise_model=noise_model, names=names, device="cpu")
    model = _first_level(run, X, names, noise_model)
    if noise_model == "ar1":  # same AR(1) bins as nilearn (its labels are the quantised coefficients)
        theirs = np.asarray(model.labels_[0], dtype=float)
        assert np.mean(fit.rho == theirs) > 0.999
        assert len(np.unique(fit.rho)) > 5  # the data do have a spread of AR(1) coefficients (synthetic 0.3)
        same = fit.rho == theirs
    else:
        same = np.ones(fit.rho.size, bool)
    # betas of each kind of column (condition, derivative, drift, constant) as single-column contrasts
    for name in ("motor", "motor_derivative", "visual", "drift_1", "constant"):
        c = np.eye(len(names))[names.index(name)]
        ref = _nilearn_contrast(model, run, c)
        ours = fit.contrast(c)
        scale = np.abs(ref["effect_size"]).max()
        err = np.abs(ours["effect"] - ref["effect_size"])[same].max() / scale
        assert err < BETA_RTOL, (name, err)
        np.testing.assert_allclose(ours["variance"][same], ref["effect_variance"][same], rtol=1e-4)
        assert np.abs(ours["z"] - ref["z_score"])[same].max() < Z_ATOL, name
    for text, c in glm.parse_contrasts("motor - visual, 0.5*motor + 0.5*visual", names).items():
        ref, ours = _nilearn_contrast(model, run, c), fit.contrast(c)
        big = np.abs(ref["effect_size"]) > 0.05 * np.abs(ref["effect_size"]).max()
        rel = np.abs(ours["effect"] / ref["effect_size"] - 1)[same & big]
        assert rel.max() < BETA_RTOL, text  # per voxel too, where the effect is not ~0
        assert np.abs(ours["z"] - ref["z_score"])[same].max() < Z_ATOL, text
        assert np.abs(ours["t"] - ref["stat"])[same].max() < Z_ATOL, text
    assert fit.dof == N_VOL - len(names)


def test_fit_accepts_torch_and_checks_shapes(run):
    import torch

    X, names = glm.design_matrix(run["frame_times_s"], run["events"])
    Y = run["Y"][:, :500]
    a = glm.fit_glm(Y, X, noise_model="ar1")
    b = glm.fit_glm(torch.from_numpy(np.ascontiguousarray(Y)), X, noise_model="ar1", chunk_voxels=128)
    np.testing.assert_allclose(a.beta, b.beta, rtol=1e-10, atol=1e-10)
    # float32 products (voxels centred first) stay close to float64; no scaling = plain least squares
    c = glm.fit_glm(Y, X, noise_model="ar1", dtype=torch.float32, chunk_voxels=200)
    assert np.abs(c.beta - a.beta).max() < 1e-4 * np.abs(a.beta).max() and np.mean(c.rho == a.rho) > 0.99
    raw = glm.fit_glm(Y, X, noise_model="ols", signal_scaling=False, chunk_voxels=128)
    lstsq = np.linalg.lstsq(X, Y.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(raw.beta, lstsq, rtol=1e-9, atol=1e-9 * np.abs(lstsq).max())
    scaled = 100 * (Y / Y.mean(0) - 1)  # nilearn's percent signal (these voxels' means are >> 1)
    np.testing.assert_allclose(glm.fit_glm(Y, X, noise_model="ols").beta,
                               np.linalg.lstsq(X, scaled.astype(np.float64), rcond=None)[0], rtol=0, atol=1e-4)
    # straight from the 4-D series and the mask: the same fit as on data[mask].T
    brain = run["truth"]["brain_mask"]
    d = glm.fit_glm(run["data"], X, noise_model="ar1", mask=brain, chunk_voxels=3000)
    e = glm.fit_glm(run["Y"], X, noise_model="ar1")
    np.testing.assert_allclose(d.beta, e.beta, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d.dispersion, e.dispersion, rtol=1e-12)
    with pytest.raises(ValueError, match="mask"):
        glm.fit_glm(run["data"], X, mask=brain[:-1])
    with pytest.raises(ValueError, match="design rows"):
        glm.fit_glm(Y[:-1], X)
    with pytest.raises(ValueError, match="noise_model"):
        glm.fit_glm(Y, X, noise_model="ar2")


def test_t_to_z_matches_scipy_stats():
    """The interpolated t -> z of large maps against nilearn's formula through scipy.stats, tails included."""
    from scipy import stats

    rng = np.random.default_rng(4)
    t = np.concatenate([rng.normal(0, 4, 30000), rng.standard_cauchy(20000) * 20, [0.0, 1e-9, 60.0, -300.0,
                                                                                    1e12, np.inf, -np.inf]])
    for dof in (3, 168, 1e10):
        pos = t >= 0
        p = np.where(pos, stats.t.sf(t, dof), stats.t.cdf(t, dof)).clip(1e-300, 1 - 1e-16)
        ref = np.where(pos, stats.norm.isf(p), stats.norm.ppf(p))
        got = glm.t_to_z(t, dof)
        assert np.abs(got - ref).max() < 1e-7, dof
        assert np.abs(glm.t_to_z(t[:1000], dof) - ref[:1000]).max() < 1e-7  # the exact path (small maps)
        assert np.abs(glm.t_to_z(t, dof + 1) - ref).max() > 1e-4 or dof > 1e9  # the check sees the dof
    assert np.isnan(glm.t_to_z(np.r_[t, np.nan], 168)[-1])


# --------------------------------------------------------------------------- known truth
def _roi_means(fit, names, run, spec=None):
    masks, brain = run["truth"]["masks"], run["truth"]["brain_mask"]
    out = {}
    for cname, c in glm.parse_contrasts(spec, names).items():
        res = fit.contrast(c)
        out[cname] = {roi: (float(res["effect"][m[brain]].mean()), float(res["z"][m[brain]].mean()))
                      for roi, m in masks.items()}
    return out


@pytest.mark.parametrize("noise_model", ["ar1", "ols"])
def test_recovers_planted_amplitudes(run, noise_model):
    X, names = glm.design_matrix(run["frame_times_s"], run["events"])
    fit = glm.fit_glm(run["Y"], X, noise_model=noise_model, names=names)
    means = _roi_means(fit, names, run)
    truth = run["truth"]["amplitudes_percent"]
    for cond in ("motor", "visual"):
        for roi in run["truth"]["masks"]:
            planted = truth[cond].get(roi, 0.0)
            beta, z = means[cond][roi]
            assert abs(beta - planted) < 0.15 + 0.1 * abs(planted), (cond, roi, beta, planted)
            if planted:
                assert np.sign(z) == np.sign(planted) and abs(z) > 3, (cond, roi, z)
    # a differential contrast: the sign flips with the order of the terms
    diff = _roi_means(fit, names, run, "motor - visual, visual - motor")
    assert diff["motor - visual"]["SomatomotorDorsal_L"][0] > 1.5
    assert diff["visual - motor"]["SomatomotorDorsal_L"][0] < -1.5
    assert abs(diff["motor - visual"]["DefaultMode"][0]) < 0.2


def test_wrong_hrf_or_sign_misses_the_truth(run):
    truth = run["truth"]["amplitudes_percent"]
    ft = run["frame_times_s"]

    def worst_error(events, flip=1.0):
        X, names = glm.design_matrix(ft, events)
        means = _roi_means(glm.fit_glm(run["Y"], X, noise_model="ols", names=names), names, run)
        return max(abs(flip * means[c][roi][0] - truth[c].get(roi, 0.0)) / (0.15 + 0.1 * abs(truth[c].get(roi, 0)))
                   for c in ("motor", "visual") for roi in run["truth"]["masks"])

    assert worst_error(run["events"]) < 1.0  # the right model passes the bound used above
    # an HRF 6 s late (the response peaking at 12 s instead of 6 s) is the wrong HRF: the bound fails
    late = [Event(e.onset_s + 6.0, e.duration_s, e.trial_type) for e in run["events"]]
    assert worst_error(late) > 1.0
    assert worst_error(run["events"], flip=-1.0) > 1.0  # a sign error fails too
    swapped = [Event(e.onset_s, e.duration_s, {"motor": "visual", "visual": "motor"}[e.trial_type])
               for e in run["events"]]
    assert worst_error(swapped) > 1.0  # as does confusing the conditions


# --------------------------------------------------------------------------- contrasts and events
def test_parse_contrasts():
    names = ["faces", "faces_derivative", "houses", "trans_x", "drift_1", "constant"]
    default = glm.parse_contrasts(None, names)
    assert list(default) == ["faces", "houses"] and default["houses"].tolist() == [0, 0, 1, 0, 0, 0]
    assert glm.parse_contrasts("  ", names).keys() == default.keys()
    got = glm.parse_contrasts("faces - houses, 0.5*faces + houses/2, -faces_derivative", names)
    assert got["faces - houses"].tolist() == [1, 0, -1, 0, 0, 0]
    assert got["0.5*faces + houses/2"].tolist() == [0.5, 0, 0.5, 0, 0, 0]
    assert got["-faces_derivative"].tolist() == [0, -1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="known conditions: faces, houses"):
        glm.parse_contrasts("faces - cars", names)
    with pytest.raises(ValueError, match="linear"):
        glm.parse_contrasts("faces * houses", names)
    with pytest.raises(ValueError, match="all zeros"):
        glm.parse_contrasts("faces - faces", names)


def test_events_round_trip_and_bad_tables(tmp_path, run):
    path = tmp_path / "events.tsv"
    synth_fmri.write_events_tsv(path, run["events"])
    assert glm.read_events(path) == run["events"]
    (tmp_path / "bids.tsv").write_text("onset\tduration\ttrial_type\tresponse_time\n1.5\t2\tgo\tn/a\n"
                                       "4\t0\tstop\t0.3\n")
    assert glm.read_events(tmp_path / "bids.tsv") == [Event(1.5, 2.0, "go"), Event(4.0, 0.0, "stop")]
    bad = {"events_unreadable": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe",
           "events_columns": b"onset\ttrial_type\n1\tgo\n",
           "events_values": b"onset\tduration\ttrial_type\n1\t-2\tgo\n",
           "events_empty": b"onset\tduration\ttrial_type\n"}
    for reason, content in bad.items():
        p = tmp_path / f"{reason}.tsv"
        p.write_bytes(content)
        with pytest.raises(BadInput) as info:
            glm.read_events(p)
        assert info.value.reason == reason
        assert str(tmp_path) not in info.value.message
    (tmp_path / "nan.tsv").write_text("onset\tduration\ttrial_type\nsoon\t2\tgo\n")
    with pytest.raises(BadInput, match="events_values"):
        glm.read_events(tmp_path / "nan.tsv")
    with pytest.raises(BadInput, match="events_unreadable"):
        glm.read_events(tmp_path / "missing.tsv")


# --------------------------------------------------------------------------- motion
def _rot(rx, ry, rz):
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def test_realign_recovers_planted_motion(run):
    from scipy import ndimage as ndi

    ref = run["data"][..., 0].astype(np.float64)
    ref = ndi.gaussian_filter(ref, 0.7)  # a BOLD-like blur of the 4 mm template
    A = run["affine"]
    shape = ref.shape
    centre = A[:3, :3] @ ((np.array(shape) - 1) / 2) + A[:3, 3]
    truth = np.array([[0, 0, 0, 0, 0, 0], [1.5, -0.8, 0.5, 0.01, -0.02, 0.015],
                      [-2.0, 1.0, -1.2, -0.03, 0.01, 0.02], [0.3, 2.2, 0.9, 0.02, 0.025, -0.01]])
    ijk = np.indices(shape).reshape(3, -1)
    world = A[:3, :3] @ ijk + A[:3, 3:4]
    vols = []
    for t in truth:  # volume_t(R p + t + c) = ref(p + c), p relative to the grid centre
        R = _rot(*t[3:])
        src_world = R.T @ (world - centre[:, None] - t[:3, None]) + centre[:, None]
        src_vox = np.linalg.solve(A[:3, :3], src_world - A[:3, 3:4])
        vols.append(ndi.map_coordinates(ref, src_vox, order=1, mode="nearest").reshape(shape))
    got = glm.realign_bold(np.stack(vols, -1).astype(np.float32), A)
    assert got.shape == (4, 6)
    np.testing.assert_allclose(got[:, :3], truth[:, :3], atol=0.25)  # mm, at 4 mm voxels
    np.testing.assert_allclose(got[:, 3:], truth[:, 3:], atol=np.deg2rad(0.3))
    X, names = glm.design_matrix(np.arange(4) * TR_S, [Event(0, 2, "a")], motion=got, drift_model=None)
    assert names[1:7] == list(glm.MOTION_NAMES) and X.shape == (4, 8)
