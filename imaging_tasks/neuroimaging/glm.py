"""fMRI first-level GLM: events table -> design matrix -> voxel-wise OLS / AR(1) fit -> contrast maps.

The numbers are nilearn 0.14.1's (``make_first_level_design_matrix`` + ``FirstLevelModel``), written again here
so the fit runs as a few batched matrix products on the torch device instead of nilearn's per-bin Python loop:

* :func:`design_matrix` reproduces nilearn's column values: SPM canonical HRF (difference of gammas sampled on
  a 50x oversampled grid, ``loc=dt``, normalised to sum 1), optional time derivative (finite difference at
  0.1 s, orthogonalised against the HRF column), boxcar sampled by ``searchsorted`` on nilearn's high-resolution
  grid (which starts 24 s before the first frame), linear interpolation back to the frame times, DCT-II cosine
  drifts below ``high_pass_hz``, the constant last; columns: conditions (sorted), motion, drifts, constant.
* :func:`fit_glm` is nilearn's ``run_glm``: percent-signal scaling (``signal_scaling=0``), OLS, then for AR(1)
  the lag-1 Yule-Walker coefficient of each voxel's OLS residuals, truncated to 1/100 (nilearn's bins), and a
  refit of the prewhitened model per coefficient.  Instead of one pseudo-inverse and one masked fit per bin, the
  whitened normal equations are assembled for all voxels at once: with ``S`` the one-step shift,
  ``Xw = X - rho S X`` and ``wY = Y - rho S Y``, so ``Xw' wY = X' wY - rho (SX)' wY`` is one (2p x n) @ (n x V)
  product; only the p x p covariance ``pinv(Xw) pinv(Xw)'`` is per bin (at most 200 of them, built in one
  batched pseudo-inverse).  Whitened residuals are ``R - rho S R`` with ``R = Y - X beta``.
* :meth:`GLMFit.contrast` gives nilearn's effect, variance, t and z (t -> p by Student's t with the residual
  degrees of freedom, p -> z by the normal quantile, sf/cdf chosen as nilearn does for numerical range;
  :func:`t_to_z` interpolates the exact map for large images, 1e-10 from it).

Precision: float64 by default, on CPU and CUDA (matches nilearn to ~1e-6, the rounding of its float32
scaling); ``dtype=torch.float32`` runs the data products in float32 (each voxel centred on its first sample
first), the rest in float64: ~1e-6 relative betas, ~2e-5 variances.  Only t -> z runs on the host (scipy), on
the n_voxel vector.
"""
from __future__ import annotations

import ast
import contextlib
import csv
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from imaging_tasks.errors import BadInput

HRF_MODELS = ("spm", "spm + derivative")
DRIFT_MODELS = ("cosine", None)
NOISE_MODELS = ("ar1", "ols")
MOTION_NAMES = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")  # fMRIPrep's confound names
OVERSAMPLING = 50  # nilearn's default: HRF and boxcar sampled at tr/50
MIN_ONSET_S = -24.0  # nilearn's default: the high-resolution grid starts 24 s before the first frame
HRF_LENGTH_S = 32.0
DERIVATIVE_DT_S = 0.1  # nilearn's finite-difference step for the time derivative
AR1_BINS = 100  # nilearn's run_glm(bins=100): rho truncated to 1/100
FULL_RANK_CMAX = 1e15  # nilearn's full_rank: regularise a design whose condition number exceeds this
TINY = 1e-50  # nilearn's Contrast.tiny: variance floor in t = effect / sqrt(variance)
DOF_MAX = 1e10


# =========================================================================== events
@dataclass(frozen=True)
class Event:
    """One row of a BIDS ``events.tsv``: onset and duration in seconds from the first frame."""

    onset_s: float
    duration_s: float
    trial_type: str
    modulation: float = 1.0


def _number(text: str, column: str, row: int) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise BadInput("events_values", f"events table row {row}: {column} {text!r} is not a number; "
                                        "give seconds as plain numbers") from None
    if not math.isfinite(value):
        raise BadInput("events_values", f"events table row {row}: {column} is not finite; give seconds")
    return value


def read_events(path) -> list[Event]:
    """Read a BIDS ``events.tsv`` (tab-separated, header row): onset, duration, trial_type, optional modulation.

    Raises BadInput ``events_unreadable`` (not a readable text table), ``events_columns`` (a required column is
    missing), ``events_values`` (a non-numeric or non-finite onset/duration/modulation, a negative duration, an
    empty trial_type), ``events_empty`` (no rows).  Messages never name the file (it sits beside patient data).
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput("events_unreadable", f"the events table could not be read as UTF-8 text "
                                            f"({type(exc).__name__}); upload a BIDS events.tsv") from None
    if "\x00" in text:
        raise BadInput("events_unreadable", "the events table is binary, not tab-separated text; upload a BIDS "
                                            "events.tsv")
    rows = list(csv.reader(text.splitlines(), delimiter="\t"))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise BadInput("events_empty", "the events table is empty; it needs a header (onset, duration, "
                                       "trial_type) and one row per event")
    header = [c.strip().lower() for c in rows[0]]
    missing = [c for c in ("onset", "duration", "trial_type") if c not in header]
    if missing:
        raise BadInput("events_columns", f"the events table has no {', '.join(missing)} column (found: "
                                         f"{', '.join(header)[:200]}); BIDS events.tsv needs onset, duration and "
                                         "trial_type, tab-separated")
    col = {name: header.index(name) for name in header}
    events = []
    for n, r in enumerate(rows[1:], start=1):
        if len(r) < len(header):
            raise BadInput("events_values", f"events table row {n} has {len(r)} fields, the header "
                                            f"{len(header)}; check the tabs")
        onset = _number(r[col["onset"]], "onset", n)
        duration = _number(r[col["duration"]], "duration", n)
        if duration < 0:
            raise BadInput("events_values", f"events table row {n}: negative duration {duration}; durations are "
                                            "seconds >= 0")
        trial = r[col["trial_type"]].strip()
        if not trial or trial.lower() == "n/a":
            raise BadInput("events_values", f"events table row {n}: empty trial_type; name every event's "
                                            "condition")
        mod = 1.0
        if "modulation" in col and r[col["modulation"]].strip().lower() not in ("", "n/a"):
            mod = _number(r[col["modulation"]], "modulation", n)
        events.append(Event(onset, duration, trial, mod))
    if not events:
        raise BadInput("events_empty", "the events table has a header but no events")
    return events


def conditions(events) -> list[str]:
    """The condition names in design-matrix order (sorted, as nilearn's ``np.unique``)."""
    return sorted({e.trial_type for e in events})


# =========================================================================== design matrix
def _gamma_pdf(t: np.ndarray, shape: float, loc: float) -> np.ndarray:
    """scipy.stats.gamma.pdf(t, shape, loc=loc, scale=1), written out: zero at and before ``loc``."""
    from scipy.special import gammaln

    x = t - loc
    out = np.zeros_like(x)
    pos = x > 0
    out[pos] = np.exp((shape - 1) * np.log(x[pos]) - x[pos] - gammaln(shape))
    return out


def spm_hrf(tr_s: float, oversampling: int = OVERSAMPLING, onset_s: float = 0.0) -> np.ndarray:
    """SPM canonical HRF sampled at ``tr_s / oversampling`` over 32 s: gamma(6) - gamma(16) / 6 (nilearn's
    ratio 0.167), shifted by one sample (``loc = dt``) and normalised to sum 1, exactly as nilearn samples it."""
    dt = tr_s / oversampling
    t = np.linspace(0, HRF_LENGTH_S, int(np.rint(HRF_LENGTH_S / dt))) - onset_s
    h = _gamma_pdf(t, 6.0, dt) - 0.167 * _gamma_pdf(t, 16.0, dt)
    return h / h.sum()


def spm_time_derivative(tr_s: float, oversampling: int = OVERSAMPLING) -> np.ndarray:
    """Finite-difference time derivative of :func:`spm_hrf` (step 0.1 s), as nilearn computes it."""
    return (spm_hrf(tr_s, oversampling) - spm_hrf(tr_s, oversampling, DERIVATIVE_DT_S)) / DERIVATIVE_DT_S


def _high_res_times(frame_times_s: np.ndarray, oversampling: int, min_onset_s: float) -> np.ndarray:
    n = frame_times_s.size
    lo, hi = frame_times_s.min(), frame_times_s.max()
    n_hr = (n - 1) / (hi - lo) * (hi * (1 + 1.0 / (n - 1)) - lo - min_onset_s) * oversampling + 1
    return np.linspace(lo + min_onset_s, hi * (1 + 1.0 / (n - 1)), int(np.rint(n_hr)))


def _boxcar(onsets, durations, values, t_hr: np.ndarray) -> np.ndarray:
    """Events -> a step function on the high-resolution grid (nilearn's ``_sample_condition``)."""
    tmax = len(t_hr)
    reg = np.zeros(tmax)
    t_on = np.minimum(np.searchsorted(t_hr, onsets), tmax - 1)
    np.add.at(reg, t_on, values)
    t_off = np.minimum(np.searchsorted(t_hr, onsets + durations), tmax - 1)
    same = (t_off < tmax - 1) & (t_off == t_on)  # zero duration: one high-resolution sample wide
    t_off[same] += 1
    np.subtract.at(reg, t_off, values)
    return np.cumsum(reg)


def cosine_drift(frame_times_s: np.ndarray, high_pass_hz: float) -> np.ndarray:
    """DCT-II basis below ``high_pass_hz`` (columns ``sqrt(2/n) cos(pi k (t + 1/2) / n)``) plus a constant."""
    n = len(frame_times_s)
    dt = (frame_times_s[-1] - frame_times_s[0]) / (n - 1)
    order = min(n - 1, int(np.floor(2 * n * high_pass_hz * dt)))
    out = np.zeros((n, order + 1))
    k = np.arange(1, order + 1)
    out[:, :order] = np.sqrt(2.0 / n) * np.cos(np.pi / n * (np.arange(n)[:, None] + 0.5) * k[None, :])
    out[:, -1] = 1.0
    return out


def _full_rank(X: np.ndarray) -> np.ndarray:
    """nilearn's ``full_rank``: lift the small singular values of a (near) singular design."""
    u, s, vt = np.linalg.svd(X, full_matrices=False)
    smax, smin = s.max(), s.min()
    if smin > 0 and smax / smin < FULL_RANK_CMAX:
        return X
    lda = (smax - FULL_RANK_CMAX * smin) / (FULL_RANK_CMAX - 1)
    return u @ np.diag(s + lda) @ vt


def design_matrix(frame_times_s, events, *, hrf_model: str = "spm", drift_model: str | None = "cosine",
                  high_pass_hz: float = 0.01, motion=None, oversampling: int = OVERSAMPLING,
                  min_onset_s: float = MIN_ONSET_S) -> tuple[np.ndarray, list[str]]:
    """The first-level design ``(X (n, p) float64, names)``: one HRF-convolved column per condition (sorted
    names; ``<name>_derivative`` after each with ``"spm + derivative"``), the 6 ``motion`` columns (n, 6) if
    given (:data:`MOTION_NAMES`), cosine drifts ``drift_1..k`` (``drift_model="cosine"``), ``constant`` last.

    ``events``: :class:`Event` list (duplicates add up, as in nilearn).  Events before ``min_onset_s`` are
    ignored, as nilearn does (it warns).  ValueError for an unknown model or mismatched motion rows.
    """
    if hrf_model not in HRF_MODELS:
        raise ValueError(f"unknown hrf_model {hrf_model!r}; choose one of {HRF_MODELS}")
    if drift_model not in DRIFT_MODELS:
        raise ValueError(f"unknown drift_model {drift_model!r}; choose 'cosine' or None")
    ft = np.asarray(frame_times_s, dtype=np.float64)
    if ft.ndim != 1 or ft.size < 2 or np.any(np.diff(ft) <= 0):
        raise ValueError("frame_times_s must be increasing times, one per volume")
    tr_s = float(np.min(np.diff(ft)))
    t_hr = _high_res_times(ft, oversampling, min_onset_s)
    kernels = [spm_hrf(tr_s, oversampling)]
    if hrf_model == "spm + derivative":
        kernels.append(spm_time_derivative(tr_s, oversampling))
    columns, names = [], []
    for cond in conditions(events):
        ev = [e for e in events if e.trial_type == cond]
        box = _boxcar(np.array([e.onset_s for e in ev]), np.array([e.duration_s for e in ev]),
                      np.array([e.modulation for e in ev], dtype=np.float64), t_hr)
        block = np.stack([np.interp(ft, t_hr, np.convolve(box, h)[:box.size]) for h in kernels], axis=1)
        if block.shape[1] == 2:  # derivative orthogonalised against the HRF column (nilearn's orthogonalize)
            a = block[:, 0]
            block[:, 1] -= a * (block[:, 1] @ a) / (a @ a) if a @ a > 0 else 0.0
        columns.append(block)
        names += [cond] + ([f"{cond}_derivative"] if len(kernels) == 2 else [])
    if motion is not None:
        motion = np.asarray(motion, dtype=np.float64)
        if motion.shape != (ft.size, 6) or not np.all(np.isfinite(motion)):
            raise ValueError(f"motion must be finite (n_volumes, 6) = ({ft.size}, 6), got {motion.shape}")
        columns.append(motion)
        names += list(MOTION_NAMES)
    drift = cosine_drift(ft, high_pass_hz) if drift_model == "cosine" else np.ones((ft.size, 1))
    columns.append(drift)
    names += [f"drift_{k}" for k in range(1, drift.shape[1])] + ["constant"]
    return _full_rank(np.hstack(columns)), names


# =========================================================================== contrasts
def condition_columns(names: list[str]) -> list[str]:
    """The design columns that are conditions (not derivatives, motion, drifts or the constant)."""
    return [n for n in names if n != "constant" and not n.startswith("drift_") and n not in MOTION_NAMES
            and not (n.endswith("_derivative") and n[:-len("_derivative")] in names)]


def _linear(node, names: list[str], known: list[str]) -> dict[str, float]:
    """A parsed expression as {column: weight} plus "" for a constant term (which must end up 0)."""
    if isinstance(node, ast.Expression):
        return _linear(node.body, names, known)
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"unknown condition {node.id!r} in the contrast; known conditions: {', '.join(known)}")
        return {node.id: 1.0}
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return {"": float(node.value)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        return {k: sign * v for k, v in _linear(node.operand, names, known).items()}
    if isinstance(node, ast.BinOp):
        a, b = _linear(node.left, names, known), _linear(node.right, names, known)
        if isinstance(node.op, (ast.Add, ast.Sub)):
            s = 1.0 if isinstance(node.op, ast.Add) else -1.0
            return {k: a.get(k, 0.0) + s * b.get(k, 0.0) for k in set(a) | set(b)}
        if isinstance(node.op, ast.Mult):
            if set(a) == {""}:
                return {k: a[""] * v for k, v in b.items()}
            if set(b) == {""}:
                return {k: b[""] * v for k, v in a.items()}
            raise ValueError("a contrast multiplies two conditions; it must be linear (weights times names)")
        if isinstance(node.op, ast.Div) and set(b) == {""} and b[""] != 0:
            return {k: v / b[""] for k, v in a.items()}
    raise ValueError("a contrast must be a linear expression of condition names, e.g. 'faces - houses'")


def parse_contrasts(spec: str | None, names: list[str]) -> dict[str, np.ndarray]:
    """Contrast vectors over the design columns ``names``.

    ``spec`` None or blank: each condition vs baseline (key = the condition).  Otherwise comma-separated
    linear expressions (``"faces - houses, 0.5*faces + 0.5*houses"``; any design column may be named, e.g.
    ``faces_derivative``); key = the expression as written (whitespace collapsed).  ValueError for an unknown
    name (the message lists the conditions), a non-linear expression or a contrast that is all zeros.
    """
    known = condition_columns(names)
    index = {n: i for i, n in enumerate(names)}
    out: dict[str, np.ndarray] = {}
    if spec is None or not spec.strip():
        for c in known:
            v = np.zeros(len(names))
            v[index[c]] = 1.0
            out[c] = v
        return out
    for part in spec.split(","):
        text = " ".join(part.split())
        if not text:
            continue
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError:
            raise ValueError(f"contrast {text!r} is not an expression; write e.g. 'faces - houses' with known "
                             f"conditions: {', '.join(known)}") from None
        weights = _linear(tree, names, known)
        if weights.pop("", 0.0) != 0.0:
            raise ValueError(f"contrast {text!r} has a constant term; contrasts weigh conditions only")
        v = np.zeros(len(names))
        for k, w in weights.items():
            v[index[k]] = w
        if not np.any(v):
            raise ValueError(f"contrast {text!r} is all zeros")
        out[text] = v
    if not out:
        raise ValueError("no contrast given; leave it empty for each condition vs baseline")
    return out


# =========================================================================== fit
@dataclass
class GLMFit:
    """A fitted first-level GLM over ``n_vox`` voxels (numpy, float64).

    ``beta`` (p, n_vox); ``dispersion`` (n_vox,) residual variance of the (whitened) model; ``rho`` (n_vox,)
    the quantised AR(1) coefficient (zeros for OLS); ``bin_index`` (n_vox,) into ``cov`` (n_bins, p, p), the
    unscaled covariance ``pinv(Xw) pinv(Xw)'`` of each bin's whitened design; ``dof`` residual degrees of
    freedom (n - rank X).
    """

    beta: np.ndarray
    dispersion: np.ndarray
    rho: np.ndarray
    bin_index: np.ndarray
    cov: np.ndarray
    dof: int
    names: list[str] = field(default_factory=list)
    noise_model: str = "ar1"

    def contrast(self, vector) -> dict[str, np.ndarray]:
        """nilearn's t contrast: ``effect = c beta``, ``variance = c cov c' dispersion``, ``t``, ``z``."""
        c = np.asarray(vector, dtype=np.float64).ravel()
        if c.size > self.beta.shape[0]:
            raise ValueError(f"contrast has {c.size} weights, the design {self.beta.shape[0]} columns")
        c = np.pad(c, (0, self.beta.shape[0] - c.size))  # nilearn pads short contrasts with zeros
        effect = c @ self.beta
        variance = np.einsum("i,bij,j->b", c, self.cov, c)[self.bin_index] * self.dispersion
        t = effect / np.sqrt(np.maximum(variance, TINY))
        z = t_to_z(t, min(self.dof, DOF_MAX))
        return {"effect": effect, "variance": variance, "t": t, "z": z}


def _t_to_z_exact(t_abs: np.ndarray, dof: float) -> np.ndarray:
    """z >= 0 of |t| as nilearn computes it: ``isf(sf(|t|))`` with p clipped to [1e-300, 1 - 1e-16], through
    scipy.special (``sf(t) = stdtr(dof, -t)``, ``isf(p) = -ndtri(p)``), ~30x faster than scipy.stats."""
    from scipy import special

    return -special.ndtri(np.clip(special.stdtr(dof, -t_abs), 1e-300, 1 - 1e-16))


def t_to_z(t, dof: float, *, nodes: int = 2049, exact_below: int = 20000) -> np.ndarray:
    """nilearn's t -> z (Student's t with ``dof`` degrees of freedom -> the standard normal of the same tail
    probability): ``z = isf(sf(t))`` for t >= 0, ``ppf(cdf(t))`` for t < 0 (an odd function of t).

    ``stdtr`` (an incomplete beta function) costs ~0.35 us per value, 80 ms for a 2 mm brain per contrast, so
    for large maps it is evaluated exactly on ``nodes`` points, uniform in ``u = log(1 + |t|)`` up to the map's
    largest |t|, and every voxel is interpolated by cubic Hermite with the exact slope at the nodes (``dz/dt =
    f_t(t) / phi(z)``): error ~1e-10 (checked against the exact map in the tests), 10x faster.  Voxels at or
    past the node where nilearn's p clip (1e-300) takes over, and non-finite t, are computed exactly.  Maps
    with fewer than ``exact_below`` voxels are computed exactly throughout."""
    from scipy import special

    t = np.asarray(t, dtype=np.float64)
    a = np.abs(t)
    if a.size < exact_below:
        return np.copysign(_t_to_z_exact(a, dof), t)
    finite = np.isfinite(a)
    u_max = math.log1p(float(a[finite].max())) if finite.any() else 0.0
    if u_max == 0.0:
        return np.copysign(_t_to_z_exact(a, dof), t)
    h = u_max / (nodes - 1)
    xs = np.expm1(np.arange(nodes) * h)
    zs = _t_to_z_exact(xs, dof)
    z_clip = -special.ndtri(1e-300)
    # log pdf of Student's t and of the normal -> dz/du = f_t(x) / phi(z) * dx/du
    log_ft = (special.gammaln((dof + 1) / 2) - special.gammaln(dof / 2) - 0.5 * math.log(dof * math.pi)
              - (dof + 1) / 2 * np.log1p(xs * xs / dof))
    log_phi = -0.5 * zs * zs - 0.5 * math.log(2 * math.pi)
    ds = np.exp(log_ft - log_phi) * (1.0 + xs) * h  # slope per node interval
    clipped = np.nonzero(zs >= z_clip * (1 - 1e-12))[0]
    x_exact = xs[max(clipped[0] - 1, 0)] if clipped.size else np.inf
    u = np.log1p(np.where(finite, a, 0.0)) / h
    i = np.minimum(u.astype(np.int64), nodes - 2)
    s = u - i
    s2 = s * s
    s3 = s2 * s
    z = ((2 * s3 - 3 * s2 + 1) * zs[i] + (s3 - 2 * s2 + s) * ds[i] + (3 * s2 - 2 * s3) * zs[i + 1]
         + (s3 - s2) * ds[i + 1])
    redo = ~finite | (a >= x_exact)
    if redo.any():
        z[redo] = _t_to_z_exact(a[redo], dof)
    return np.copysign(z, t)


def _shift(a):
    """``S a``: each row moved one step later, the first row zero (the AR(1) lag operator, rows = time)."""
    import torch

    return torch.cat([torch.zeros_like(a[:1]), a[:-1]], dim=0)


def _unshift(a):
    """``S' a``: each row moved one step earlier, the last row zero."""
    import torch

    return torch.cat([a[1:], torch.zeros_like(a[:1])], dim=0)


class _Series:
    """The (n_t, n_vox) data as the fit reads it: voxel-major chunks ``chunk(lo, hi)`` -> (v, n_t) tensor, from a
    (n_t, n_vox) array (``data[brain].T``, a view) or straight from a 4-D (x, y, z, t) series and a 3-D mask,
    gathering each chunk's voxels when it is read (no masked copy of the whole series is made)."""

    def __init__(self, data, mask=None):
        import torch

        if mask is None:
            self.flat, self.index = data, None
            self.shape = tuple(data.shape)
            return
        mask = np.asarray(mask, dtype=bool)
        if data.ndim != 4 or tuple(mask.shape) != tuple(data.shape[:3]):
            raise ValueError(f"with a mask, data must be a 4-D (x, y, z, t) series on the mask's grid "
                             f"{tuple(mask.shape)}, got {tuple(data.shape)}")
        n_t = int(data.shape[3])
        self.flat = data.reshape(-1, n_t)
        index = np.flatnonzero(mask)
        self.index = torch.from_numpy(index) if isinstance(data, torch.Tensor) else index
        self.shape = (n_t, int(index.size))

    def chunk(self, lo: int, hi: int):
        import torch

        if self.index is None:
            src = self.flat[:, lo:hi]
            return (src if isinstance(src, torch.Tensor) else torch.from_numpy(src)).T
        src = self.flat[self.index[lo:hi]]
        return src if isinstance(src, torch.Tensor) else torch.from_numpy(src)


def _moments(data, M, dtype, chunk_voxels: int, ar1: bool, signal_scaling: bool, workers: int = 1) -> dict:
    """Everything the fit needs from the data, in one read of it, as float64: ``G = M' ys`` (q, n_vox) for the
    stacked design ``M`` and the per-voxel ``ys'ys`` (and for AR(1) ``ys'S ys``), where ``ys`` is nilearn's
    percent-signal data ``a y - 100`` (``a = 100 / max(mean, 1)`` per voxel) or ``y`` itself.

    The scaling is never applied to the data: it is an affine map per voxel, so the moments of ``ys`` follow
    from those of ``y`` (``M'ys = a M'y - 100 M'1``, ``ys'ys = a^2 y'y - 200 a 1'y + 100^2 n``, ``ys'S ys =
    a^2 y'Sy - 100 a (2 1'y - y_0 - y_last) + 100^2 (n - 1)``), and ``M``'s last columns are the constant (and
    for AR(1) the first and last unit vectors), so the voxel sums and end samples come out of the product.  In
    float64 the cancellation (the signal is ~1% of the intensity) costs ~4 of 16 digits; a float32 ``dtype``
    first subtracts each voxel's first sample (exact in float32) and shifts the moments back in float64.

    The data are converted a chunk of ``chunk_voxels`` voxels at a time into a small reused (voxel, time)
    buffer that stays in the CPU cache, so the conversion, the product and the reductions do not go back to
    memory, and no float64 copy of the whole data matrix is ever made.  ``workers`` Python threads take chunks
    in turn (torch releases the GIL; every op is single-threaded on the CPU, see :func:`fit_glm`)."""
    import torch

    n_t, n_vox = data.shape
    dev = M.device
    q = M.shape[1]
    MT = M.T.contiguous().to(dtype)
    Msum = M.sum(0)[:, None]
    exact = dtype == torch.float64
    G = torch.empty((q, n_vox), device=dev, dtype=torch.float64)
    yy = torch.empty(n_vox, device=dev, dtype=torch.float64)
    ySy = torch.empty(n_vox, device=dev, dtype=torch.float64) if ar1 else None
    i_sum = q - 3 if ar1 else q - 1
    starts = iter(range(0, n_vox, chunk_voxels))
    lock = threading.Lock()

    def work():  # each worker pulls chunks until none are left, with its own cache-sized buffer
        buf = torch.empty((min(chunk_voxels, n_vox), n_t), device=dev, dtype=dtype)
        while True:
            with lock:
                lo = next(starts, None)
            if lo is None:
                return
            hi = min(lo + chunk_voxels, n_vox)
            y = buf[:hi - lo]
            y.copy_(data.chunk(lo, hi))
            g, dd = G[:, lo:hi], yy[lo:hi]
            if exact:
                shift = None
                torch.matmul(MT, y.T, out=g)
                torch.linalg.vecdot(y, y, out=dd)
                if ar1:
                    torch.linalg.vecdot(y[:, 1:], y[:, :-1], out=ySy[lo:hi])
            else:
                shift = y[:, 0].double()
                y.sub_(y[:, :1].clone())
                g.copy_(torch.matmul(MT, y.T))
                dd.copy_(torch.linalg.vecdot(y, y))
                if ar1:
                    ySy[lo:hi].copy_(torch.linalg.vecdot(y[:, 1:], y[:, :-1]))
            if not signal_scaling and shift is None:
                continue
            # ys = a y - b = a (y - shift) - B with B = b - a shift
            total = g[i_sum].clone()
            if signal_scaling:
                a = 100.0 / torch.clamp((total + (0.0 if shift is None else n_t * shift)) / n_t, min=1.0)
                B = 100.0 - (0.0 if shift is None else a * shift)
            else:
                a, B = 1.0, -shift
            if ar1:
                ends = g[q - 2] + g[q - 1]
                ySy[lo:hi].mul_(a * a).sub_(a * B * (2 * total - ends)).add_(B * B * (n_t - 1))
            dd.mul_(a * a).sub_(2 * a * B * total).add_(B * B * n_t)
            g.mul_(a).sub_(B * Msum)

    if workers <= 1:
        work()
    else:
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(work) for _ in range(workers)]:
                f.result()
    out = {"G": G, "yy": yy}
    if ar1:
        out.update(ySy=ySy, sum=G[i_sum], first=G[q - 2], last=G[q - 1])
    return out


def fit_glm(data, X, *, noise_model: str = "ar1", device=None, signal_scaling: bool = True,
            names: list[str] | None = None, dtype=None, chunk_voxels: int = 1024, mask=None) -> GLMFit:
    """Fit ``data`` (n_t, n_vox) (numpy or torch) on the design ``X`` (n_t, p) as nilearn's ``run_glm`` does.
    With a 3-D boolean ``mask``, ``data`` is the 4-D (x, y, z, t) series and the voxels are ``data[mask]`` (same
    order), gathered chunk by chunk as they are read: the same result without the masked copy of the series.

    ``signal_scaling``: each voxel as percent change from its mean (mean floored at 1), nilearn's
    ``signal_scaling=0``, so betas are percent signal change per unit regressor.  ``noise_model`` ``"ols"``
    or ``"ar1"`` (OLS residuals -> lag-1 Yule-Walker coefficient, truncated to 1/100 -> prewhitened refit).

    The data are read once, ``chunk_voxels`` voxels at a time (:func:`_moments`: one (q x n) @ (n x v) product
    and one or two reductions per chunk; the percent-signal scaling is applied to the moments, not to the
    data).  Everything after that is p-sized per voxel: OLS betas and the residuals' lag-0/1
    sums follow from ``X'y``, ``(S'X)'y``, ``(SX)'y``, ``y'y`` and ``y'Sy`` (the Yule-Walker estimate subtracts
    the grand mean of all residuals, as nilearn's does); the whitened normal equations are
    ``Xw'wY = X'y - rho ((S'X)'y + (SX)'y) + rho^2 (S'SX)'y`` and the whitened residual sum of squares is
    ``wy'wy - beta'(Xw'wy)``.  ``dtype``: torch dtype of the data products, float64 by default (also on CUDA;
    float32 is faster on consumer GPUs: ~1e-6 relative betas, ~2e-5 variances, measured on CPU).  On the CPU
    the torch ops run single-threaded and the chunks are shared by ``torch.get_num_threads()`` Python threads.
    """
    import torch

    from imaging_tasks.device import pick_device

    if noise_model not in NOISE_MODELS:
        raise ValueError(f"unknown noise_model {noise_model!r}; choose 'ar1' or 'ols'")
    dev = pick_device(device)
    dtype = dtype or torch.float64
    Xn = np.asarray(X, dtype=np.float64)
    n_t, p = Xn.shape
    data = _Series(data, mask)
    if len(data.shape) != 2 or data.shape[0] != n_t:
        raise ValueError(f"data must be (n_t, n_vox) with n_t = {n_t} design rows, got {tuple(data.shape)}")
    if n_t <= p:
        raise ValueError(f"{n_t} volumes cannot fit {p} regressors; need more volumes than columns")
    if dev.type != "cpu":
        return _fit(data, Xn, dev, dtype, noise_model, signal_scaling, names, chunk_voxels, 1)
    # CPU: single-threaded torch ops, and the chunks of the data pass spread over a few Python threads (torch
    # releases the GIL).  Every op here is memory-bound; torch's intra-op threads split each small in-cache op
    # and meet at a barrier after it, which costs more than it gains, and on a shared machine a descheduled
    # thread stalls every barrier (measured 3-20x slower with 2 intra-op threads under load).
    workers = torch.get_num_threads()
    with _torch_threads(1):
        return _fit(data, Xn, dev, dtype, noise_model, signal_scaling, names, chunk_voxels, workers)


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(data, Xn, dev, dtype, noise_model, signal_scaling, names, chunk_voxels, workers) -> GLMFit:
    """:func:`fit_glm` after the argument checks."""
    import torch

    n_t, p = Xn.shape
    n_vox = int(data.shape[1])
    eps = np.abs(Xn).sum() * np.finfo(np.float64).eps
    dof = n_t - int(np.linalg.matrix_rank(Xn, eps))
    d64 = dict(device=dev, dtype=torch.float64)
    X64 = torch.as_tensor(Xn, **d64)
    SX = _shift(X64)
    ar1 = noise_model == "ar1"
    # M = [X, SX, S'X, 1, e_0, e_last] (AR(1)) or [X, 1] (OLS): the sums and end samples ride in the product
    ones = torch.ones((n_t, 1), **d64)
    cols = [X64, SX, _unshift(X64), ones, torch.eye(n_t, **d64)[:, [0, n_t - 1]]] if ar1 else [X64, ones]
    M = torch.cat(cols, dim=1)
    m = _moments(data, M, dtype, chunk_voxels, ar1, signal_scaling, workers)
    Xy = m["G"][:p]
    pinv0 = torch.as_tensor(np.linalg.pinv(Xn), **d64)  # p x n: on the host (LAPACK), as nilearn's pinv
    cov0 = pinv0 @ pinv0.T  # (X'X)^-1
    b_ols = cov0 @ Xy
    sse_ols = torch.clamp(m["yy"] - (b_ols * Xy).sum(0), min=0.0)
    if noise_model == "ols":
        return GLMFit(b_ols.cpu().numpy(), (sse_ols / (n_t - p)).cpu().numpy(), np.zeros(n_vox),
                      np.zeros(n_vox, dtype=np.int64), cov0.cpu().numpy()[None], dof, list(names or []), noise_model)

    SXy, StXy = m["G"][p:2 * p], m["G"][2 * p:3 * p]
    StSXy = Xy - X64[-1][:, None] * m["last"][None]  # S'S X = X with its last row zeroed
    # Yule-Walker lag-1 of the OLS residuals r = y - X b, from the moments (nilearn: x - x.mean(), global)
    s1 = m["sum"] - X64.sum(0) @ b_ols
    first, last = m["first"] - X64[0] @ b_ols, m["last"] - X64[-1] @ b_ols
    lag = m["ySy"] - (b_ols * (StXy + SXy)).sum(0) + (b_ols * ((X64.T @ SX) @ b_ols)).sum(0)
    g = s1.sum() / (n_vox * n_t)
    r0 = (sse_ols - 2 * g * s1 + n_t * g * g) / (n_t * n_t)
    r1 = (lag - g * (2 * s1 - first - last) + (n_t - 1) * g * g) / ((n_t - 1) * n_t)
    rho_raw = torch.where(r0 > 0, r1 / torch.where(r0 > 0, r0, 1.0), 0.0)  # constant voxels: nilearn gets nan
    rho = torch.trunc(rho_raw * AR1_BINS) / AR1_BINS
    levels, bin_index = torch.unique(rho, return_inverse=True)
    # one batched pseudo-inverse for every bin's whitened design Xw = X - rho S X
    lv = levels.cpu().numpy()
    pw = torch.as_tensor(np.linalg.pinv(Xn[None] - lv[:, None, None] * SX.cpu().numpy()[None]), **d64)
    cov = pw @ pw.transpose(1, 2)  # (B, p, p) = (Xw' Xw)^-1
    rhs = Xy - rho * (StXy + SXy) + rho * rho * StSXy  # Xw' wy
    beta = torch.empty_like(rhs)
    for lo in range(0, n_vox, chunk_voxels):  # gather each voxel's bin covariance, a chunk at a time
        sl = slice(lo, min(lo + chunk_voxels, n_vox))
        beta[:, sl] = torch.einsum("vij,jv->iv", cov[bin_index[sl]], rhs[:, sl])
    wyy = m["yy"] - 2 * rho * m["ySy"] + rho * rho * (m["yy"] - m["last"] ** 2)
    sse = torch.clamp(wyy - (beta * rhs).sum(0), min=0.0)
    return GLMFit(beta.cpu().numpy(), (sse / (n_t - p)).cpu().numpy(), rho.cpu().numpy(),
                  bin_index.cpu().numpy().astype(np.int64), cov.cpu().numpy(), dof, list(names or []), noise_model)



# =========================================================================== motion
def realign_bold(data4d, affine, *, reference: int = 0, device=None, iterations: int = 12,
                 max_points: int = 20000, tol_mm: float = 1e-3) -> np.ndarray:
    """Rigid motion of each volume against volume ``reference``: (n, 6) ``trans_x/y/z`` (mm) and
    ``rot_x/y/z`` (radians, about the voxel grid's centre, world axes), fMRIPrep's confound layout.

    Batched Gauss-Newton on the device (inverse-compositional style: the reference's gradient and Jacobian are
    computed once, every iteration resamples all volumes at once with ``grid_sample``) on a 2x downsampled
    copy, then on the full grid, at up to ``max_points`` head voxels per level.  Each level stops after
    ``iterations`` steps or as soon as no volume's step exceeds ``tol_mm`` (rotations: ``tol_mm`` at 100 mm
    from the centre).  Good for the sub-voxel to few-mm motion of a compliant subject; it is what the optional
    motion regressors need, not a replacement for a full realignment package.

    Cost: per iteration one (n_vol x points) trilinear resampling; the chain world -> moved -> voxel -> sampler
    coordinates is folded into one 3 x 4 matrix per volume, so each iteration is one small batched product in
    float32 instead of several float64 passes over (n_vol, points, 3) arrays.
    """
    import torch
    import torch.nn.functional as F

    from imaging_tasks.device import pick_device

    dev = pick_device(device)
    vol = np.ascontiguousarray(np.asarray(data4d, dtype=np.float32))
    if vol.ndim != 4:
        raise ValueError("realign_bold needs a 4-D (x, y, z, t) series")
    A = np.asarray(affine, dtype=np.float64)
    nx, ny, nz, nt = vol.shape
    d64 = dict(device=dev, dtype=torch.float64)
    # torch volumes are (t, 1, D=x, H=y, W=z): time to the front is one 2-D transpose (4x faster than reversing
    # the axes too); the sampler's coordinates are then (z, y, x) = (W, H, D)
    v = torch.as_tensor(vol.reshape(-1, nt), device=dev).T.contiguous().view(nt, 1, nx, ny, nz)
    v.div_(torch.clamp(v.mean(), min=1e-6))
    centre_vox = (np.array([nx, ny, nz]) - 1) / 2.0
    centre_mm = torch.as_tensor(A[:3, :3] @ centre_vox + A[:3, 3], **d64)
    A_t = torch.as_tensor(A, **d64)
    Ainv = torch.linalg.inv(A_t)
    params = torch.zeros(nt, 6, **d64)
    tol_rad = tol_mm / 100.0

    def rot(p):
        ax, ay, az = p[:, 3], p[:, 4], p[:, 5]
        c, s = torch.cos, torch.sin
        one, zero = torch.ones_like(ax), torch.zeros_like(ax)
        rx = torch.stack([one, zero, zero, zero, c(ax), -s(ax), zero, s(ax), c(ax)], 1).view(-1, 3, 3)
        ry = torch.stack([c(ay), zero, s(ay), zero, one, zero, -s(ay), zero, c(ay)], 1).view(-1, 3, 3)
        rz = torch.stack([c(az), -s(az), zero, s(az), c(az), zero, zero, zero, one], 1).view(-1, 3, 3)
        return rz @ ry @ rx

    levels = (2, 1) if min(nx, ny, nz) >= 4 else (1,)
    for level in levels:
        vl = F.avg_pool3d(v, level, level) if level > 1 else v
        size = torch.as_tensor(vl.shape[2:], **d64)  # (x, y, z) of the pooled grid
        idx = torch.stack(torch.meshgrid(*[torch.arange(int(n_), **d64) for n_ in vl.shape[2:]], indexing="ij"),
                          -1).reshape(-1, 3)  # (x, y, z) pooled index, C order = vl's memory order
        off = (level - 1) / 2.0
        world = (idx * level + off) @ A_t[:3, :3].T + A_t[:3, 3] - centre_mm  # mm, relative to the centre
        ref3 = vl[reference, 0].double()
        ref = ref3.reshape(-1)
        # gradient of the reference in world mm (chain rule through the voxel grid)
        g_vox = torch.stack(torch.gradient(ref3, spacing=1.0), -1).reshape(-1, 3) / level
        g_mm = g_vox @ torch.linalg.inv(A_t[:3, :3])  # d ref / d world
        # sample points: the head (ref above 5% of its max), thinned to at most max_points (SPM's realign
        # samples every few mm too); every volume is resampled at these points only
        keep = torch.nonzero(ref > 0.05 * ref.max()).ravel()
        keep = keep[::max(1, math.ceil(keep.numel() / max_points))]
        world, ref, g_mm = world[keep], ref[keep], g_mm[keep]
        J = torch.cat([g_mm, torch.cross(world, g_mm, dim=1)], 1)  # (N, 6): translations, small rotations
        H_inv = torch.linalg.inv(J.T @ J + 1e-9 * torch.eye(6, **d64))
        J32, ref32 = J.float(), ref.float()
        world_h = torch.cat([world, torch.ones_like(world[:, :1])], 1).float()  # (N, 4)
        # world -> sampler coordinates: n = D Ainv (R w + t + c) + D (Ainv_t - off) - 1, D = 2 / (level (size-1))
        L = (2.0 / (level * (size - 1)))[:, None] * Ainv[:3, :3]
        l0 = (2.0 / (level * (size - 1))) * (Ainv[:3, 3] - off) - 1.0
        flip = [2, 1, 0]  # (x, y, z) -> the sampler's (W, H, D) = (z, y, x)
        for _ in range(iterations):
            R = rot(params)
            K = (L @ R)[:, flip]  # (t, 3, 3)
            k = ((params[:, :3] + centre_mm) @ L.T + l0)[:, flip]  # (t, 3)
            KT = torch.cat([K.transpose(1, 2), k[:, None, :]], 1).float()  # (t, 4, 3)
            grid = torch.matmul(world_h, KT).view(nt, 1, 1, -1, 3)
            warped = F.grid_sample(vl, grid, mode="bilinear", padding_mode="border", align_corners=True)
            err = warped.view(nt, -1) - ref32[None]
            delta = (err @ J32).double() @ H_inv.T  # (t, 6): volume_t(T x) - ref ~ J delta => step back by delta
            # compose: T <- T o (I - delta) ~ subtract the rotated increment
            params[:, :3] -= torch.einsum("tij,tj->ti", R, delta[:, :3])
            params[:, 3:] -= delta[:, 3:]
            if float(delta[:, :3].abs().max()) < tol_mm and float(delta[:, 3:].abs().max()) < tol_rad:
                break
    return params.cpu().numpy()
