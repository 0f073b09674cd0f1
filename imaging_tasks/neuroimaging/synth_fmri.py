"""Synthetic BOLD with known truth: block-design activations of known percent signal change in known ROIs.

The time courses are rendered with an HRF written from the SPM double-gamma formula (peak gamma shape 6,
undershoot gamma shape 16, ratio 1/6, unit scale), sampled at 0.1 s and convolved with the events' boxcars in
continuous time: independent of ``glm.py``'s nilearn-matched sampling (which shifts the kernel by one
oversampled step and uses ratio 0.167), so a fit recovers the planted amplitudes closely but not trivially.

Amplitudes are percent signal change of the block plateau: the HRF is normalised to unit area, so a block
long enough to saturate reaches ``amplitude_percent`` of the voxel's baseline, which is what a GLM with
percent-signal scaling and unit-area HRF regressors reports as beta.
"""
from __future__ import annotations

import csv

import numpy as np

from imaging_tasks.neuroimaging.glm import Event

HRF_DT_S = 0.1


def double_gamma_hrf(t_s: np.ndarray) -> np.ndarray:
    """SPM canonical HRF h(t) = t^5 e^-t / 5! - (1/6) t^15 e^-t / 15!  (t in seconds, 0 for t <= 0)."""
    from scipy.special import gammaln

    t = np.asarray(t_s, dtype=np.float64)
    out = np.zeros_like(t)
    pos = t > 0
    lt = np.log(t[pos])
    out[pos] = np.exp(5 * lt - t[pos] - gammaln(6)) - np.exp(15 * lt - t[pos] - gammaln(16)) / 6.0
    return out


def response(events, condition: str, frame_times_s: np.ndarray) -> np.ndarray:
    """The unit-plateau BOLD response of ``condition`` at ``frame_times_s`` (boxcar * HRF, HRF area 1)."""
    t_end = float(frame_times_s[-1]) + 1.0
    t = np.arange(0.0, t_end + HRF_DT_S, HRF_DT_S)
    box = np.zeros_like(t)
    for e in events:
        if e.trial_type == condition:
            box += e.modulation * ((t >= e.onset_s) & (t < e.onset_s + max(e.duration_s, HRF_DT_S)))
    h = double_gamma_hrf(np.arange(0.0, 32.0, HRF_DT_S))
    h /= h.sum()
    return np.interp(frame_times_s, t, np.convolve(box, h)[:t.size])


def _ar1_noise(rng, shape_vox: tuple, n: int, ar1: float) -> np.ndarray:
    """Unit-variance AR(1) noise, (n, *shape_vox) float32."""
    out = np.empty((n,) + tuple(shape_vox), np.float32)
    out[0] = rng.standard_normal(shape_vox, dtype=np.float32)
    scale = np.float32(np.sqrt(1 - ar1 * ar1))
    for i in range(1, n):
        out[i] = ar1 * out[i - 1] + scale * rng.standard_normal(shape_vox, dtype=np.float32)
    return out


def render_bold(region_masks: dict, amplitudes_percent: dict, baseline, events, tr_s: float, n_volumes: int,
                rng, noise_percent: float = 1.0, ar1: float = 0.3, drift_percent: float = 2.0) -> np.ndarray:
    """A 4-D series (x, y, z, t) float32 on any grid.

    ``region_masks``: {roi: bool (x, y, z)}; ``amplitudes_percent``: {condition: {roi: percent signal change}};
    ``baseline`` (x, y, z) the mean signal (0 outside the head stays 0).  Each voxel: baseline x (1 + sum of
    amplitude/100 x response) + baseline x drift (a linear ramp plus a slow cosine, peak-to-peak
    ``drift_percent``, random phase per voxel) + AR(1) noise of sd ``noise_percent`` of the baseline.
    """
    base = np.asarray(baseline, dtype=np.float32)
    ft = np.arange(n_volumes) * float(tr_s)
    gain = np.zeros((n_volumes,) + base.shape, np.float32)
    for cond, per_roi in amplitudes_percent.items():
        r = response(events, cond, ft).astype(np.float32)
        for roi, amp in per_roi.items():
            gain[:, region_masks[roi]] += r[:, None] * np.float32(amp / 100.0)
    span = ft[-1] if ft[-1] > 0 else 1.0
    phase = rng.uniform(0, 2 * np.pi, base.shape).astype(np.float32)
    ramp = (ft / span - 0.5).astype(np.float32)
    slow = np.cos(2 * np.pi * ft / (1.5 * span)).astype(np.float32)
    drift = 0.5 * ramp[:, None, None, None] + 0.25 * slow[:, None, None, None] * np.cos(phase)[None]
    gain += np.float32(drift_percent / 100.0) * drift
    gain += np.float32(noise_percent / 100.0) * _ar1_noise(rng, base.shape, n_volumes, ar1)
    out = base[None] * (1.0 + gain)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def block_events(conditions=("motor", "visual"), *, block_s: float = 16.0, rest_s: float = 14.0,
                 n_volumes: int = 160, tr_s: float = 2.0, first_onset_s: float = 10.0) -> list[Event]:
    """Blocks of each condition in turn, separated by rest, until the run ends (one block per slot)."""
    events, t, k = [], first_onset_s, 0
    end = n_volumes * tr_s - block_s - 8.0
    while t <= end:
        events.append(Event(float(t), float(block_s), conditions[k % len(conditions)]))
        t += block_s + rest_s
        k += 1
    return events


# Seitzman 2020 ROIs (indices into imaging_tasks.neuroimaging.rois's seitzman300) and what they do in the
# synthetic task: "motor" drives two dorsal somatomotor ROIs, "visual" two visual ROIs, and both deactivate
# one default-mode ROI (negative amplitudes catch sign errors).
DEFAULT_AMPLITUDES = {"motor": {"SomatomotorDorsal_L": 2.0, "SomatomotorDorsal_R": 1.5, "DefaultMode": -1.0},
                      "visual": {"Visual_L": 2.5, "Visual_R": 1.0, "DefaultMode": -1.0}}


def _pick_rois(min_separation_mm: float = 30.0) -> dict[str, dict]:
    """One Seitzman ROI per name of :data:`DEFAULT_AMPLITUDES` (network, hemisphere by x sign), far apart."""
    from imaging_tasks.neuroimaging import rois as rois_mod

    picked: dict[str, dict] = {}
    wanted = [("SomatomotorDorsal_L", "SomatomotorDorsal", -1), ("SomatomotorDorsal_R", "SomatomotorDorsal", 1),
              ("Visual_L", "Visual", -1), ("Visual_R", "Visual", 1), ("DefaultMode", "DefaultMode", 0)]
    for name, network, side in wanted:
        for roi in rois_mod._seitzman():
            x = roi["x_mm"]
            if roi["network"] != network or (side and np.sign(x) != side) or (not side and abs(x) > 10):
                continue
            c = np.array([roi["x_mm"], roi["y_mm"], roi["z_mm"]])
            if all(np.linalg.norm(c - np.array([p["x_mm"], p["y_mm"], p["z_mm"]])) >= min_separation_mm
                   for p in picked.values()):
                picked[name] = roi
                break
        else:
            raise RuntimeError(f"no Seitzman ROI for {name}")
    return picked


def synthesize_bold_mni(rng, *, voxel_mm: int = 3, n_volumes: int = 160, tr_s: float = 2.0,
                        amplitudes_percent: dict | None = None, roi_radius_mm: float = 8.0,
                        noise_percent: float = 1.0, ar1: float = 0.3, drift_percent: float = 2.0,
                        baseline_signal: float = 1000.0) -> dict:
    """A BOLD run on nilearn's MNI152 grid at ``voxel_mm`` with a block design and planted activations.

    Returns ``data`` (x, y, z, t) float32, ``affine`` (RAS mm), ``tr_s``, ``events`` (list of Event), and
    ``truth``: ``amplitudes_percent`` {condition: {roi: %}}, ``masks`` {roi: bool (x, y, z)} (spheres of
    ``roi_radius_mm`` around Seitzman 2020 centres, inside the brain), ``centres_mm`` {roi: (x, y, z)},
    ``brain_mask`` (x, y, z) bool.  Baseline: ``baseline_signal`` x (0.6 + 0.4 x the template T1) in the brain
    (grey/white contrast), 0 outside.
    """
    import warnings

    from nilearn import datasets  # shipped MNI152 data only

    amplitudes_percent = amplitudes_percent or DEFAULT_AMPLITUDES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = datasets.load_mni152_template(resolution=voxel_mm)
        brain = datasets.load_mni152_brain_mask(resolution=voxel_mm)
    affine = np.asarray(t1.affine, dtype=np.float64)
    brain_mask = np.asarray(brain.dataobj) > 0
    t1a = np.asarray(t1.dataobj, dtype=np.float32)
    t1a = t1a / max(float(t1a[brain_mask].max()), 1e-6)
    baseline = np.where(brain_mask, baseline_signal * (0.6 + 0.4 * t1a), 0.0).astype(np.float32)
    ijk = np.indices(brain_mask.shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    masks, centres = {}, {}
    rois = _pick_rois()
    for name, roi in rois.items():
        c = np.array([roi["x_mm"], roi["y_mm"], roi["z_mm"]])
        m = (np.linalg.norm(xyz - c, axis=1) <= roi_radius_mm).reshape(brain_mask.shape) & brain_mask
        masks[name], centres[name] = m, tuple(float(v) for v in c)
    events = block_events(tuple(sorted(amplitudes_percent)), n_volumes=n_volumes, tr_s=tr_s)
    data = render_bold(masks, amplitudes_percent, baseline, events, tr_s, n_volumes, rng,
                       noise_percent=noise_percent, ar1=ar1, drift_percent=drift_percent)
    return {"data": data, "affine": affine, "tr_s": float(tr_s), "events": events,
            "truth": {"amplitudes_percent": amplitudes_percent, "masks": masks, "centres_mm": centres,
                      "brain_mask": brain_mask, "seitzman_index": {k: r["index"] for k, r in rois.items()}}}


def write_events_tsv(path, events) -> None:
    """BIDS ``events.tsv``: onset, duration, trial_type, modulation (tab-separated, header row)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["onset", "duration", "trial_type", "modulation"])
        for e in events:
            w.writerow([f"{e.onset_s:g}", f"{e.duration_s:g}", e.trial_type, f"{e.modulation:g}"])
