"""A DWI phantom with known tensors: crossing-free fibre bundles in an isotropic background.

What it plants (all in the voxel-axis frame, isotropic voxels):

- ``straight_x``: a straight tube along the x axis, FA 0.80;
- ``oblique``: a straight tube in the y-z plane at ``oblique_deg`` from y, FA 0.60 (a direction with z in it);
- ``arc``: a half-ring in the x-y plane (the direction turns through 180 degrees along it), FA 0.70;
- background: an isotropic ellipsoid ("brain", MD 0.8e-3 mm^2/s) with a CSF-like core (MD 2.5e-3), FA 0.

Each bundle is an axially symmetric tensor of the bundle's FA and MD whose principal axis follows the bundle, so the
truth is FA, MD, the direction per voxel, and each bundle's centre-line length (what tractography seeded inside
the bundle should reproduce).  The bundles do not touch each other, so a tensor is the right model everywhere.

:func:`tensor_signal` is the forward model (``S = S0 exp(-b g^T D g)``, optional Rician noise) and can be used on
any grid (the in-head synthetic session builds its DWI with it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def fibonacci_hemisphere(n: int) -> np.ndarray:
    """``n`` near-uniform unit vectors on the z >= 0 hemisphere (a gradient scheme without an optimiser)."""
    k = np.arange(n) + 0.5
    z = 1 - k / n                      # (0, 1]
    phi = np.pi * (3 - np.sqrt(5)) * k
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def gradient_scheme(n_directions: int = 32, b_s_per_mm2: float = 1000.0, n_b0: int = 2):
    """(bvals (n,), bvecs (n, 3)): ``n_b0`` b=0 volumes (zero vectors) followed by ``n_directions`` shells points."""
    bvecs = np.concatenate([np.zeros((n_b0, 3)), fibonacci_hemisphere(n_directions)])
    bvals = np.concatenate([np.zeros(n_b0), np.full(n_directions, float(b_s_per_mm2))])
    return bvals, bvecs


def axial_evals(fa: float, md_mm2_per_s: float) -> np.ndarray:
    """Eigenvalues (l1, l2, l2) of the axially symmetric tensor with this FA and MD.

    With l1 = MD + 2d and l2 = MD - d, FA^2 = 9 d^2 / (3 MD^2 + 6 d^2), so d = MD FA sqrt(3 / (9 - 6 FA^2)).
    """
    d = md_mm2_per_s * fa * np.sqrt(3.0 / (9.0 - 6.0 * fa * fa))
    return np.array([md_mm2_per_s + 2 * d, md_mm2_per_s - d, md_mm2_per_s - d])


def _frame(v1: np.ndarray) -> np.ndarray:
    """(..., 3, 3) orthonormal eigenvector columns with ``v1`` first."""
    v1 = v1 / np.linalg.norm(v1, axis=-1, keepdims=True)
    helper = np.where(np.abs(v1[..., :1]) < 0.9, np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
    v2 = np.cross(v1, helper)
    v2 /= np.linalg.norm(v2, axis=-1, keepdims=True)
    v3 = np.cross(v1, v2)
    return np.stack([v1, v2, v3], axis=-1)


def tensor_signal(evals, evecs, bvals, bvecs, s0, *, sigma: float | None = None, rng=None) -> np.ndarray:
    """Signal ``(..., n)`` of tensors ``evals`` (..., 3) mm^2/s with eigenvector columns ``evecs`` (..., 3, 3)
    for gradients ``bvals`` (n,) s/mm^2 / ``bvecs`` (n, 3), scaled by ``s0`` (...).  With ``sigma`` (same units as
    ``s0``) Rician noise is added: ``|S + N(0, sigma) + i N(0, sigma)|``."""
    evals = np.asarray(evals, dtype=np.float64)
    evecs = np.asarray(evecs, dtype=np.float64)
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    proj = np.einsum("nk,...kj->...nj", bvecs, evecs)            # g . e_j, (..., n, 3)
    adc = np.einsum("...nj,...j->...n", proj * proj, evals)       # g^T D g
    signal = np.asarray(s0, dtype=np.float64)[..., None] * np.exp(-bvals * adc)
    if sigma:
        rng = rng if rng is not None else np.random.default_rng()
        signal = np.hypot(signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape))
    return signal


BUNDLES = {"straight_x": {"label": 1, "fa": 0.80, "md_mm2_per_s": 0.75e-3},
           "oblique": {"label": 2, "fa": 0.60, "md_mm2_per_s": 0.80e-3},
           "arc": {"label": 3, "fa": 0.70, "md_mm2_per_s": 0.75e-3}}


def phantom(rng, *, shape=(48, 48, 24), voxel_mm: float = 2.0, n_directions: int = 32,
            b_s_per_mm2: float = 1000.0, n_b0: int = 2, snr: float | None = 40.0, s0: float = 1000.0,
            oblique_deg: float = 35.0) -> dict:
    """The phantom on ``shape`` (x, y, z) voxels of ``voxel_mm``: ``dict(data (x,y,z,n) float32, bvals, bvecs,
    affine, truth)``; ``snr`` = s0 / Rician sigma (None: noiseless).

    ``truth``: ``fa``, ``md_mm2_per_s``, ``v1`` (x,y,z,3), ``evals`` (x,y,z,3), ``labels`` (0 background, 1..3
    bundles, -1 outside the head), ``brain`` mask, and ``bundles``: name -> label, FA, MD, direction summary and
    ``length_mm`` of the centre line (its voxels' extent along the bundle plus one voxel, i.e. end face to end face,
    as far as the head lets it run).
    """
    nx, ny, nz = shape
    idx = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij"), axis=-1).astype(float)
    centre = (np.array(shape) - 1) / 2.0
    rel = (idx - centre) / (np.array(shape) / 2.0 - 1.5)
    brain = (rel ** 2).sum(-1) <= 1.0
    csf = ((idx - centre) / (np.array(shape) * [0.08, 0.08, 0.12])) ** 2
    csf = csf.sum(-1) <= 1.0

    labels = np.where(brain, 0, -1)
    v1 = np.zeros(shape + (3,))
    radius = max(1.6, min(shape) * 0.09)
    x, y, z = idx[..., 0], idx[..., 1], idx[..., 2]
    # straight_x along x at y = 0.22 ny, z = centre
    y1, z1 = 0.22 * (ny - 1), centre[2]
    x0, x1 = 0.18 * (nx - 1), 0.82 * (nx - 1)
    tube = ((y - y1) ** 2 + (z - z1) ** 2 <= radius ** 2) & (x >= x0) & (x <= x1) & brain
    labels[tube] = 1
    v1[tube] = [1.0, 0, 0]
    axis = tube & ((y - y1) ** 2 + (z - z1) ** 2 <= 0.75 ** 2)       # the centre line, as far as the head allows
    lengths = {"straight_x": (np.ptp(x[axis]) + 1) * voxel_mm}
    # oblique: in the y-z plane through (0.8 nx, centre y, centre z), direction (0, cos a, sin a)
    a = np.deg2rad(oblique_deg)
    d = np.array([0.0, np.cos(a), np.sin(a)])
    p0 = np.array([0.74 * (nx - 1), centre[1], centre[2]])
    r = idx - p0
    t = r @ d
    perp = np.linalg.norm(r - t[..., None] * d, axis=-1)
    half = min(0.30 * ny, (nz / 2 - 2.5) / max(np.sin(a), 1e-6))   # stays inside the head
    ob = (perp <= radius) & (np.abs(t) <= half) & brain & (labels == 0)
    labels[ob] = 2
    v1[ob] = d
    axis = ob & (perp <= 0.75)
    lengths["oblique"] = (np.ptp(t[axis]) + 1) * voxel_mm
    # arc: half ring in the x-y plane centred at (0.42 nx, 0.58 ny), radius 0.22 nx, for y above the centre
    cx, cy, ring = 0.42 * (nx - 1), 0.60 * (ny - 1), 0.22 * nx
    rx, ry = x - cx, y - cy
    rho = np.hypot(rx, ry)
    arc = ((rho - ring) ** 2 + (z - centre[2]) ** 2 <= radius ** 2) & (ry >= 0) & brain & (labels == 0)
    labels[arc] = 3
    tangent = np.stack([-ry, rx, np.zeros_like(rx)], axis=-1) / np.maximum(rho, 1e-9)[..., None]
    v1[arc] = tangent[arc]
    axis = arc & ((rho - ring) ** 2 + (z - centre[2]) ** 2 <= 0.75 ** 2)
    theta = np.arctan2(ry[axis], rx[axis])
    lengths["arc"] = (np.ptp(theta) + 1 / ring) * ring * voxel_mm

    evals = np.zeros(shape + (3,))
    evals[brain] = 0.8e-3
    evals[brain & csf & (labels == 0)] = 2.5e-3
    for name, spec in BUNDLES.items():
        evals[labels == spec["label"]] = axial_evals(spec["fa"], spec["md_mm2_per_s"])
    evecs = np.broadcast_to(np.eye(3), shape + (3, 3)).copy()
    fibre = labels > 0
    evecs[fibre] = _frame(v1[fibre])
    v1[~fibre] = 0.0

    bvals, bvecs = gradient_scheme(n_directions, b_s_per_mm2, n_b0)
    s0_map = np.where(brain, s0, 0.0)
    sigma = s0 / snr if snr else None
    data = tensor_signal(evals, evecs, bvals, bvecs, s0_map, sigma=sigma, rng=rng)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -centre * voxel_mm
    from imaging_tasks.neuroimaging.dti import fractional_anisotropy

    truth = {"fa": fractional_anisotropy(evals), "md_mm2_per_s": evals.mean(-1), "evals": evals, "v1": v1,
             "labels": labels, "brain": brain, "snr": snr,
             "bundles": {name: {**spec, "length_mm": float(lengths[name]), "n_voxels": int((labels == spec["label"])
                                                                                         .sum())}
                         for name, spec in BUNDLES.items()}}
    return {"data": data.astype(np.float32), "bvals": bvals, "bvecs": bvecs, "affine": affine, "truth": truth}


def write_nifti(folder, ph: dict, stem: str = "dwi") -> dict[str, Path]:
    """Write ``<stem>.nii.gz`` (float32), ``<stem>.bval`` (one row) and ``<stem>.bvec`` (3 rows), FSL style, and
    ``<stem>_truth.json`` with the bundle summary; returns their paths."""
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nifti = folder / f"{stem}.nii.gz"
    img = nib.Nifti1Image(np.asarray(ph["data"], dtype=np.float32), ph["affine"])
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, nifti)
    bval, bvec = folder / f"{stem}.bval", folder / f"{stem}.bvec"
    bval.write_text(" ".join(f"{b:g}" for b in ph["bvals"]) + "\n")
    bvec.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in np.asarray(ph["bvecs"]).T) + "\n")
    truth = folder / f"{stem}_truth.json"
    truth.write_text(json.dumps({"bundles": ph["truth"]["bundles"], "snr": ph["truth"]["snr"]}, indent=2))
    return {"nifti": nifti, "bval": bval, "bvec": bvec, "truth": truth}
