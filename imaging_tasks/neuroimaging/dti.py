"""Diffusion tensor imaging: gradients, the weighted least-squares tensor fit, the scalar maps and a colour-FA picture.

The fit is the one the field checks against: dipy's ``TensorModel`` default (``fit_method="WLS"``), written here
as batched linear algebra on the torch device so that a whole brain is a handful of matrix products instead of a
pseudo-inverse per voxel.  The steps, in dipy 1.12's order:

1. signals below ``MIN_SIGNAL`` (1e-4) are raised to it, then logged;
2. an ordinary least-squares fit of ``log S = -b g^T D g + log S0`` (design matrix columns
   ``-(bxx, 2bxy, byy, 2bxz, 2byz, bzz), -1``: the seventh coefficient is ``-log S0``);
3. the OLS prediction ``w = exp(X beta_ols)`` weights every row (weights ``w^2`` on the squared residuals,
   Chung et al. 2006), and the weighted problem is solved voxel by voxel;
4. the tensor ``(Dxx, Dxy, Dyy, Dxz, Dyz, Dzz)`` is eigen-decomposed (``torch.linalg.eigh`` on 3x3 batches),
   eigenvalues sorted descending and clipped below at ``1e-6 / max(B)`` as dipy does;
5. FA, MD, AD (lambda1) and RD (mean of lambda2, lambda3) from the eigenvalues, FA 0 where all are 0.

Step 3 goes through the normal equations with the columns rescaled to unit size and the weights rescaled per
voxel (the solution does not change under either); in float64 that is as exact as dipy's SVD pseudo-inverse to
far below the 1e-3 the maps are held to, and ~50x cheaper.  On CUDA the same code runs in float32 (documented
trade-off: FA/MD agree with the float64 fit to ~1e-5 on realistic data; the rescaling is what keeps float32 usable).

Gradients are FSL/dipy style: ``bvals`` (n,) in s/mm^2 and ``bvecs`` (n, 3) unit vectors in the image's voxel-axis
frame, so the tensor and its eigenvectors come out in that frame too (what the tractography walks along).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imaging_tasks.errors import BadInput

MIN_SIGNAL = 1e-4          # dipy's MIN_POSITIVE_SIGNAL: log() of a zero or negative signal is undefined
B0_THRESHOLD_S_PER_MM2 = 50.0   # dipy's gradient_table default: volumes at or below it count as b=0
_EIG_TOL = 1e-6            # dipy: eigenvalues are clipped at tol / max(B)


# --------------------------------------------------------------------------------------------- gradients
def read_gradients(bval_path, bvec_path, n_volumes: int, affine=None) -> tuple[np.ndarray, np.ndarray]:
    """Read FSL ``.bval`` (one row or one column) and ``.bvec`` (3 rows, or 3 columns) for a ``n_volumes`` DWI.

    Returns ``(bvals (n,) s/mm^2, bvecs (n, 3))`` checked by :func:`check_gradients`.  Parsed by the project's one
    FSL reader (:func:`.series4d.read_fsl_text`, :func:`.series4d.gradients_from_fsl`): NaN only as a b=0
    vector (dipy's ``small_64D``).  ``affine``: apply FSL's x-flip rule for that image; None takes the numbers as
    written, which is how dipy's ``read_bvals_bvecs`` reads them.
    """
    from imaging_tasks.neuroimaging.series4d import gradients_from_fsl, read_fsl_text

    bvals, bvecs = gradients_from_fsl(read_fsl_text(bval_path, "b-value"), read_fsl_text(bvec_path, "b-vector"),
                                      affine, n_volumes)
    return check_gradients(bvals, bvecs, n_volumes)


def check_gradients(bvals, bvecs, n_volumes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate gradients from any source (text files, DICOM): counts, a b=0, enough directions for a tensor.

    Returns float64 copies, b>0 vectors normalised to unit length (b=0 vectors are kept as given).
    """
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvecs.ndim != 2 or bvecs.shape[1] != 3:
        raise BadInput("dwi_gradients_unreadable", f"b-vectors must be n x 3, got shape {bvecs.shape}")
    if len(bvals) != n_volumes or len(bvecs) != n_volumes:
        raise BadInput("dwi_volume_mismatch",
                       f"{len(bvals)} b-values and {len(bvecs)} b-vectors for a series of {n_volumes} volumes; "
                       "the gradient files must list one entry per volume, in volume order")
    if not np.isfinite(bvals).all() or (bvals < 0).any():
        raise BadInput("dwi_gradients_unreadable", "b-values must be finite and >= 0")
    b0 = bvals <= B0_THRESHOLD_S_PER_MM2
    bvecs = np.where(b0[:, None] & ~np.isfinite(bvecs), 0.0, bvecs)   # some writers put NaN for b=0
    if not np.isfinite(bvecs).all():
        raise BadInput("dwi_gradients_unreadable", "a diffusion-weighted volume has a non-finite b-vector")
    if not b0.any():
        raise BadInput("dwi_no_b0", f"no volume has b <= {B0_THRESHOLD_S_PER_MM2:g} s/mm^2; the tensor fit needs "
                                    "an unweighted (b=0) reference volume")
    norms = np.linalg.norm(bvecs, axis=1)
    if (norms[~b0] < 1e-3).any():
        raise BadInput("dwi_gradients_unreadable", "a diffusion-weighted volume (b > 50) has a zero b-vector")
    bvecs[~b0] /= norms[~b0, None]
    g = bvecs[~b0]
    unique = _distinct_directions(g)
    rank = np.linalg.matrix_rank(_b_columns(np.ones(len(g)), g), tol=1e-6) if len(g) else 0
    if unique < 6 or rank < 6:
        raise BadInput("dwi_too_few_directions",
                       f"{unique} distinct diffusion directions (b > 50); a tensor needs at least 6 non-collinear "
                       "ones")
    return bvals, bvecs


def _distinct_directions(g: np.ndarray, cos_tol: float = np.cos(np.deg2rad(1.0))) -> int:
    """Directions that differ by more than 1 degree, up to sign (g and -g measure the same thing)."""
    kept: list[np.ndarray] = []
    for v in g:
        if all(abs(float(v @ k)) < cos_tol for k in kept):
            kept.append(v)
    return len(kept)


def _b_columns(bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """(n, 6): b * (gx^2, 2 gx gy, gy^2, 2 gx gz, 2 gy gz, gz^2), dipy's lower-triangular order."""
    gx, gy, gz = bvecs[:, 0], bvecs[:, 1], bvecs[:, 2]
    return bvals[:, None] * np.stack([gx * gx, 2 * gx * gy, gy * gy, 2 * gx * gz, 2 * gy * gz, gz * gz], axis=1)


def design_matrix(bvals, bvecs) -> np.ndarray:
    """dipy's tensor design matrix (n, 7): ``-(Bxx, 2Bxy, Byy, 2Bxz, 2Byz, Bzz, 1)``."""
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    return -np.concatenate([_b_columns(bvals, bvecs), np.ones((len(bvals), 1))], axis=1)


# --------------------------------------------------------------------------------------------- the fit
@dataclass
class TensorFit:
    """Maps of one tensor fit, numpy, on the DWI grid; zero outside ``mask``.

    Diffusivities in mm^2/s (b in s/mm^2); ``evals`` (x,y,z,3) descending; ``v1`` (x,y,z,3) the principal
    eigenvector in the voxel-axis frame (unit, sign arbitrary); ``s0`` the fitted unweighted signal.
    """

    fa: np.ndarray
    md_mm2_per_s: np.ndarray
    ad_mm2_per_s: np.ndarray
    rd_mm2_per_s: np.ndarray
    evals: np.ndarray
    v1: np.ndarray
    s0: np.ndarray
    mask: np.ndarray

    @property
    def md(self) -> np.ndarray:
        return self.md_mm2_per_s

    @property
    def ad(self) -> np.ndarray:
        return self.ad_mm2_per_s

    @property
    def rd(self) -> np.ndarray:
        return self.rd_mm2_per_s


def fractional_anisotropy(evals):
    """FA from eigenvalues (last axis 3), dipy's formula; 0 where all eigenvalues are 0 (works on numpy and torch)."""
    l1, l2, l3 = evals[..., 0], evals[..., 1], evals[..., 2]
    ss = l1 * l1 + l2 * l2 + l3 * l3
    all_zero = (evals == 0).all(-1)
    num = 0.5 * ((l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2)
    return (num / (ss + all_zero)) ** 0.5


def _wls_solve(X, logs, w):
    """Per-voxel solution of min ||w * (X beta - logs)||^2, X (n, 7), logs and w (V, n) -> beta (V, 7).

    Columns of X are scaled to unit max and w to unit max per voxel (the minimiser is invariant under both),
    then the 7x7 normal equations are formed with one (V, n) x (n, 28) product and Cholesky-solved.
    """
    import torch

    scale = X.abs().amax(0)
    Xs = X / scale
    w = w / w.amax(1, keepdim=True)
    W = w * w
    iu = torch.triu_indices(7, 7, device=X.device)
    pairs = Xs[:, iu[0]] * Xs[:, iu[1]]                      # (n, 28)
    gram_u = W @ pairs                                       # (V, 28)
    gram = X.new_zeros((W.shape[0], 7, 7))
    gram[:, iu[0], iu[1]] = gram_u
    gram[:, iu[1], iu[0]] = gram_u
    rhs = (W * logs) @ Xs                                    # (V, 7)
    chol, info = torch.linalg.cholesky_ex(gram)
    beta = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    bad = info != 0
    if bad.any():   # rank-deficient voxels (degenerate data): the pseudo-inverse, as dipy uses everywhere
        A = Xs.unsqueeze(0) * w[bad].unsqueeze(-1)
        beta[bad] = (torch.linalg.pinv(A) @ (w[bad] * logs[bad]).unsqueeze(-1)).squeeze(-1)
    return beta / scale


def _fit_chunk(y, X, pinv_X, min_diffusivity):
    import torch

    logs = torch.log(torch.clamp(y, min=MIN_SIGNAL))
    beta_ols = logs @ pinv_X.T
    w = torch.exp(beta_ols @ X.T)
    beta = _wls_solve(X, logs, w)
    d = beta[:, :6]
    tensor = torch.stack([torch.stack([d[:, 0], d[:, 1], d[:, 3]], -1),
                          torch.stack([d[:, 1], d[:, 2], d[:, 4]], -1),
                          torch.stack([d[:, 3], d[:, 4], d[:, 5]], -1)], -2)
    evals, evecs = torch.linalg.eigh(tensor)                 # ascending
    evals = torch.flip(evals, [-1]).clamp(min=min_diffusivity)
    v1 = evecs[:, :, 2]
    return evals, v1, torch.exp(-beta[:, 6])


def fit_tensor(data, bvals, bvecs, mask=None, *, device=None, chunk_voxels: int = 200_000) -> TensorFit:
    """WLS tensor fit of a DWI ``data`` (x, y, z, n) with ``bvals`` (n,) s/mm^2 and ``bvecs`` (n, 3).

    ``mask`` (x, y, z) bool limits the fit (everything when None); voxels are fitted in chunks of
    ``chunk_voxels`` so memory stays bounded on any device.  float64 on CPU, float32 on CUDA.
    """
    import torch

    from imaging_tasks.device import pick_device

    data = np.asarray(data)
    if data.ndim != 4:
        raise BadInput("dwi_not_4d", f"a DWI series must be 4-D (x, y, z, volumes); got {data.ndim}-D")
    bvals, bvecs = check_gradients(bvals, bvecs, data.shape[3])
    shape = data.shape[:3]
    mask = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != shape:
        raise BadInput("dwi_mask_shape", f"mask shape {mask.shape} differs from the DWI grid {shape}")
    dev = pick_device(device)
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    X_np = design_matrix(bvals, bvecs)
    X = torch.as_tensor(X_np, dtype=dtype, device=dev)
    pinv_X = torch.as_tensor(np.linalg.pinv(X_np), dtype=dtype, device=dev)
    min_diffusivity = _EIG_TOL / -X_np.min()
    voxels = data[mask]                                       # (V, n), in the data's own dtype
    evals = np.zeros((len(voxels), 3))
    v1 = np.zeros((len(voxels), 3))
    s0 = np.zeros(len(voxels))
    for start in range(0, len(voxels), chunk_voxels):
        y = torch.as_tensor(voxels[start:start + chunk_voxels], device=dev).to(dtype)
        ev, vec, s = _fit_chunk(y, X, pinv_X, min_diffusivity)
        evals[start:start + len(y)] = ev.cpu().numpy()
        v1[start:start + len(y)] = vec.cpu().numpy()
        s0[start:start + len(y)] = s.cpu().numpy()

    def full(values, tail=()):
        out = np.zeros(shape + tail)
        out[mask] = values
        return out

    ev_map = full(evals, (3,))
    return TensorFit(fa=full(fractional_anisotropy(evals)), md_mm2_per_s=full(evals.mean(1)),
                     ad_mm2_per_s=full(evals[:, 0]), rd_mm2_per_s=full(evals[:, 1:].mean(1)),
                     evals=ev_map, v1=full(v1, (3,)), s0=full(s0), mask=mask)


# --------------------------------------------------------------------------------------------- QC picture
def color_fa_png(fa, v1, path, *, n_slices: int = 6, mm_per_pixel_scale: int = 3) -> Path:
    """Write the usual colour-FA QC picture: RGB = |v1| x FA (x red, y green, z blue, voxel axes), a row of
    ``n_slices`` axial slices spread over the slices that contain tissue, each upscaled ``mm_per_pixel_scale``x.
    """
    from PIL import Image

    fa = np.clip(np.nan_to_num(np.asarray(fa, dtype=np.float64)), 0, 1)
    rgb = np.abs(np.nan_to_num(np.asarray(v1, dtype=np.float64))) * fa[..., None]
    filled = np.flatnonzero(fa.reshape(-1, fa.shape[2]).max(0) > 0)
    lo, hi = (int(filled[0]), int(filled[-1])) if len(filled) else (0, fa.shape[2] - 1)
    zs = np.unique(np.linspace(lo, hi, n_slices + 2).round().astype(int)[1:-1]) if hi > lo else [lo]
    tiles = []
    for z in zs:
        tile = (np.clip(rgb[:, :, z], 0, 1) * 255).astype(np.uint8).transpose(1, 0, 2)[::-1]  # x right, y up
        tile = np.repeat(np.repeat(tile, mm_per_pixel_scale, 0), mm_per_pixel_scale, 1)
        tiles.append(np.pad(tile, ((2, 2), (2, 2), (0, 0))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)
    return path
