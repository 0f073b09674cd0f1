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
  degrees of freedom, p -> z by the normal quantile, sf/cdf chosen as nilearn does for numerical range).

Precision: float64 on CPU (matches nilearn to ~1e-10); on CUDA the big products run in float32 by default
(``dtype`` overrides) while the per-bin p x p algebra stays float64 - expect ~1e-5 relative there.
Only t -> z runs on the host (scipy), on the n_voxel vector.
"""
from __future__ import annotations

import ast
import csv
import math
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
        from scipy import special

        c = np.asarray(vector, dtype=np.float64).ravel()
        if c.size > self.beta.shape[0]:
            raise ValueError(f"contrast has {c.size} weights, the design {self.beta.shape[0]} columns")
        c = np.pad(c, (0, self.beta.shape[0] - c.size))  # nilearn pads short contrasts with zeros
        effect = c @ self.beta
        variance = np.einsum("i,bij,j->b", c, self.cov, c)[self.bin_index] * self.dispersion
        t = effect / np.sqrt(np.maximum(variance, TINY))
        dof = min(self.dof, DOF_MAX)
        # nilearn: z = isf(sf(t)) where that is >= 0 (t >= 0), else ppf(cdf(t)), p clipped to [1e-300, 1-1e-16];
        # the same with scipy.special's stdtr/ndtri (cdf(t) = stdtr(dof, t), sf(t) = stdtr(dof, -t))
        neg = t < 0
        p = np.clip(special.stdtr(dof, np.where(neg, t, -t)), 1e-300, 1 - 1e-16)
        q = special.ndtri(p)
        z = np.where(neg, q, -q)
        return {"effect": effect, "variance": variance, "t": t, "z": z}


def _shift(a):
    """``S a``: each row moved one step later, the first row zero (the AR(1) lag operator, rows = time)."""
    import torch

    return torch.cat([torch.zeros_like(a[:1]), a[:-1]], dim=0)


def _unshift(a):
    """``S' a``: each row moved one step earlier, the last row zero."""
    import torch

    return torch.cat([a[1:], torch.zeros_like(a[:1])], dim=0)


def _raw_moments(data, Mt, dtype, chunk_voxels: int, ar1: bool) -> dict:
    """Unscaled moments of the data in one read: ``G = M' y`` (q, n_vox) for the stacked design ``M`` (its
    columns include a constant and, for AR(1), the first and last unit vectors, so the sums and end samples
    come out of the same product), ``y'y`` and for AR(1) the lag-1 product ``y'Sy``.

    The data are converted to ``dtype`` a chunk at a time into one small reused (voxel, time) buffer sized to
    stay in the CPU's L2/L3 cache, so the conversion, the product and the reductions read it from cache, not
    from memory; no float64 copy of the whole data matrix is ever made.  (torch's CPU allocator also maps
    every large tensor afresh, and those page faults cost more than the arithmetic.)"""
    import torch

    n_t, n_vox = data.shape
    dev = Mt.device
    q = Mt.shape[1]
    Gv = torch.empty((n_vox, q), device=dev, dtype=dtype)  # voxel-major: each chunk's product lands in place
    yy = torch.empty(n_vox, device=dev, dtype=dtype)
    ySy = torch.empty(n_vox, device=dev, dtype=dtype) if ar1 else None
    buf = torch.empty((min(chunk_voxels, n_vox), n_t), device=dev, dtype=dtype)
    for lo in range(0, n_vox, chunk_voxels):
        hi = min(lo + chunk_voxels, n_vox)
        src = data[:, lo:hi]
        src = src if isinstance(src, torch.Tensor) else torch.from_numpy(src)
        y = buf[:hi - lo]
        y.copy_(src.T)
        torch.matmul(y, Mt, out=Gv[lo:hi])
        torch.linalg.vecdot(y, y, out=yy[lo:hi])
        if ar1:
            torch.linalg.vecdot(y[:, 1:], y[:, :-1], out=ySy[lo:hi])
    out = {"G": Gv.T.double(), "yy": yy.double()}
    if ar1:
        out["ySy"] = ySy.double()
    return out


def _scaled_moments(raw: dict, Msum, n_t: int, p: int, signal_scaling: bool, ar1: bool) -> dict:
    """The moments of nilearn's percent-signal data ``ys = a y - 100`` (``a = 100 / max(mean, 1)`` per voxel)
    from the raw ones, on q-vectors instead of on the data: ``M' ys = a M' y - 100 M' 1``,
    ``ys' ys = a^2 y'y - 200 a 1'y + 100^2 n``, ``ys' S ys = a^2 y'Sy - 100 a (2 1'y - y_0 - y_last) +
    100^2 (n - 1)``.  float64: the cancellation (the signal is ~1% of the raw intensity) costs ~4 digits of 16."""
    G, yy = raw["G"], raw["yy"]
    total = G[-1] if not ar1 else G[-3]
    first, last = (G[-2], G[-1]) if ar1 else (None, None)
    if signal_scaling:
        import torch

        a = 100.0 / torch.clamp(total / n_t, min=1.0)
        b = 100.0
        G = a * G - b * Msum[:, None]
        yy = a * a * yy - 2 * b * a * total + b * b * n_t
        if ar1:
            ySy = a * a * raw["ySy"] - b * a * (2 * total - first - last) + b * b * (n_t - 1)
            total, first, last = a * total - b * n_t, a * first - b, a * last - b
    elif ar1:
        ySy = raw["ySy"]
    out = {"G": G[:3 * p] if ar1 else G[:p], "yy": yy}
    if ar1:
        out.update(ySy=ySy, sum=total, first=first, last=last)
    return out


def fit_glm(data, X, *, noise_model: str = "ar1", device=None, signal_scaling: bool = True,
            names: list[str] | None = None, dtype=None, chunk_voxels: int = 1024) -> GLMFit:
    """Fit ``data`` (n_t, n_vox) (numpy or torch) on the design ``X`` (n_t, p) as nilearn's ``run_glm`` does.

    ``signal_scaling``: each voxel as percent change from its mean (mean floored at 1), nilearn's
    ``signal_scaling=0``, so betas are percent signal change per unit regressor.  ``noise_model`` ``"ols"``
    or ``"ar1"`` (OLS residuals -> lag-1 Yule-Walker coefficient, truncated to 1/100 -> prewhitened refit).

    The data are read once, ``chunk_voxels`` voxels at a time: one (4p x n) @ (n x v) product and three
    reductions per chunk.  Everything after that is p-sized per voxel: OLS betas and the residuals' lag-0/1
    sums follow from ``X'y``, ``(S'X)'y``, ``(SX)'y``, ``y'y`` and ``y'Sy`` (the Yule-Walker estimate subtracts
    the grand mean of all residuals, as nilearn's does); the whitened normal equations are
    ``Xw'wY = X'y - rho ((S'X)'y + (SX)'y) + rho^2 (S'SX)'y`` and the whitened residual sum of squares is
    ``wy'wy - beta'(Xw'wy)``.  ``dtype``: torch dtype of the data products, float64 by default (also on CUDA;
    float32 is faster on consumer GPUs, at ~1e-4 relative accuracy of the variances - measure before use).
    """
    import torch

    from imaging_tasks.device import pick_device

    if noise_model not in NOISE_MODELS:
        raise ValueError(f"unknown noise_model {noise_model!r}; choose 'ar1' or 'ols'")
    dev = pick_device(device)
    dtype = dtype or torch.float64
    Xn = np.asarray(X, dtype=np.float64)
    n_t, p = Xn.shape
    if data.ndim != 2 or data.shape[0] != n_t:
        raise ValueError(f"data must be (n_t, n_vox) with n_t = {n_t} design rows, got {tuple(data.shape)}")
    if n_t <= p:
        raise ValueError(f"{n_t} volumes cannot fit {p} regressors; need more volumes than columns")
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
    raw = _raw_moments(data, M.to(dtype), dtype, chunk_voxels, ar1)
    m = _scaled_moments(raw, M.sum(0), n_t, p, signal_scaling, ar1)
    del raw
    Xy = m["G"][:p]
    pinv0 = torch.as_tensor(np.linalg.pinv(Xn), **d64)  # p x n: on the host (LAPACK), as nilearn's pinv
    cov0 = pinv0 @ pinv0.T  # (X'X)^-1
    b_ols = cov0 @ Xy
    sse_ols = torch.clamp(m["yy"] - (b_ols * Xy).sum(0), min=0.0)
    if noise_model == "ols":
        return GLMFit(b_ols.cpu().numpy(), (sse_ols / (n_t - p)).cpu().numpy(), np.zeros(n_vox),
                      np.zeros(n_vox, dtype=np.int64), cov0.cpu().numpy()[None], dof, list(names or []), noise_model)

    SXy, StXy = m["G"][p:2 * p], m["G"][2 * p:]
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
                 max_points: int = 20000) -> np.ndarray:
    """Rigid motion of each volume against volume ``reference``: (n, 6) ``trans_x/y/z`` (mm) and
    ``rot_x/y/z`` (radians, about the voxel grid's centre, world axes), fMRIPrep's confound layout.

    Batched Gauss-Newton on the device (inverse-compositional style: the reference's gradient and Jacobian are
    computed once, every iteration resamples all volumes at once with ``grid_sample``) on a 2x downsampled
    copy, then on the full grid, at up to ``max_points`` head voxels per level.  Good for the sub-voxel to few-mm motion of a compliant subject; it is what the
    optional motion regressors need, not a replacement for a full realignment package.
    """
    import torch
    import torch.nn.functional as F

    from imaging_tasks.device import pick_device

    dev = pick_device(device)
    vol = np.asarray(data4d, dtype=np.float32)
    if vol.ndim != 4:
        raise ValueError("realign_bold needs a 4-D (x, y, z, t) series")
    A = np.asarray(affine, dtype=np.float64)
    nx, ny, nz, nt = vol.shape
    f32 = dict(device=dev, dtype=torch.float32)
    # torch volumes are (t, 1, D=z, H=y, W=x)
    v = torch.as_tensor(np.ascontiguousarray(vol.transpose(3, 2, 1, 0)), **f32)[:, None]
    v = v / torch.clamp(v.mean(), min=1e-6)
    centre_vox = (np.array([nx, ny, nz]) - 1) / 2.0
    centre_mm = A[:3, :3] @ centre_vox + A[:3, 3]
    params = torch.zeros(nt, 6, dtype=torch.float64, device=dev)

    def rot(p):
        ax, ay, az = p[:, 3], p[:, 4], p[:, 5]
        c, s = torch.cos, torch.sin
        one, zero = torch.ones_like(ax), torch.zeros_like(ax)
        rx = torch.stack([one, zero, zero, zero, c(ax), -s(ax), zero, s(ax), c(ax)], 1).view(-1, 3, 3)
        ry = torch.stack([c(ay), zero, s(ay), zero, one, zero, -s(ay), zero, c(ay)], 1).view(-1, 3, 3)
        rz = torch.stack([c(az), -s(az), zero, s(az), c(az), zero, zero, zero, one], 1).view(-1, 3, 3)
        return rz @ ry @ rx

    for level in (2, 1):
        vl = F.avg_pool3d(v, level, level) if level > 1 else v
        D, H, W = vl.shape[2:]
        # voxel index (of the pooled grid) -> world mm, and world -> normalised grid coords of the full grid
        idx = torch.stack(torch.meshgrid(torch.arange(W, **f32), torch.arange(H, **f32), torch.arange(D, **f32),
                                         indexing="ij"), -1).reshape(-1, 3).double()  # (x, y, z) pooled index
        idx_full = idx * level + (level - 1) / 2.0
        A_t = torch.as_tensor(A, device=dev, dtype=torch.float64)
        world = idx_full @ A_t[:3, :3].T + A_t[:3, 3] - torch.as_tensor(centre_mm, device=dev)
        Ainv = torch.linalg.inv(A_t)
        size = torch.as_tensor([W, H, D], device=dev, dtype=torch.float64)
        ref = vl[reference, 0].permute(2, 1, 0).reshape(-1).double()  # (x, y, z) order, matches idx
        # gradient of the reference in world mm (chain rule through the voxel grid)
        gz, gy, gx = torch.gradient(vl[reference, 0].double(), spacing=1.0)
        g_vox = torch.stack([gx.permute(2, 1, 0).reshape(-1), gy.permute(2, 1, 0).reshape(-1),
                             gz.permute(2, 1, 0).reshape(-1)], 1) / level
        g_mm = g_vox @ torch.linalg.inv(A_t[:3, :3])  # d ref / d world
        # sample points: the head (ref above 5% of its max), thinned to at most max_points (SPM's realign
        # samples every few mm too); every volume is resampled at these points only
        keep = torch.nonzero(ref > 0.05 * ref.max()).ravel()
        keep = keep[::max(1, math.ceil(keep.numel() / max_points))]
        world, ref, g_mm = world[keep], ref[keep], g_mm[keep]
        J = torch.cat([g_mm, torch.cross(world, g_mm, dim=1)], 1)  # (N, 6): translations, small rotations
        Jw = J
        H_inv = torch.linalg.inv(Jw.T @ J + 1e-9 * torch.eye(6, device=dev, dtype=torch.float64))
        for _ in range(iterations):
            R = rot(params)
            moved = torch.einsum("tij,nj->tni", R, world) + params[:, None, :3] + torch.as_tensor(
                centre_mm, device=dev)
            vox = (moved @ Ainv[:3, :3].T + Ainv[:3, 3] - (level - 1) / 2.0) / level  # pooled-grid index
            grid = (2 * vox / (size - 1) - 1).float().view(nt, 1, 1, -1, 3)
            warped = F.grid_sample(vl, grid, mode="bilinear", padding_mode="border", align_corners=True)
            err = warped.view(nt, -1).double() - ref[None]
            delta = (err @ Jw) @ H_inv.T  # (t, 6): volume_t(T x) - ref ~ J delta => step back by delta
            # compose: T <- T o (I - delta) ~ subtract the rotated increment
            params[:, :3] -= torch.einsum("tij,tj->ti", R, delta[:, :3])
            params[:, 3:] -= delta[:, 3:]
    return params.cpu().numpy()
