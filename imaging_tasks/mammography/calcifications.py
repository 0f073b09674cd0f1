"""Micro-calcification detection and clustering on screening mammograms (MG "for presentation").

Why this shape: a micro-calcification is a sub-millimetre spot brighter than its surroundings, while the
fibroglandular background varies on scales of millimetres and its noise level depends on the local
density (fewer photons behind dense tissue).  So the detector is a difference of Gaussians tuned to the
spot size (the background subtracted with a mask-normalised Gaussian so the air outside does not leak
in), divided by a *local* robust noise estimate; spots are accepted at ``k_sigma`` local standard
deviations and a size/shape test drops structures that are too large or linear (vessel and gland edges).

Clustering follows the classic CAD rule: a cluster is >= 3 calcifications within 1 cm^2, made
operational as DBSCAN with ``radius_mm`` = 5.64 mm (the radius of a 1 cm^2 disc) and ``min_count`` = 3:
a calcification with >= 3 calcifications (itself included) within that disc is a core, cores within the
radius of each other join, and other calcifications within the radius of a core join its cluster.
``min_count=5`` gives the BI-RADS 5th-edition "grouped" threshold instead.  Isolated specks and pairs
are never clusters.

Coordinates: ``*_xy_px`` are (column, row) of the pixel grid of the image given, ``*_xy_mm`` the same times
the pixel spacing.

This module is detection and clustering on one image.  The exam (headers and their preconditions, normalisation
to the canonical orientation, the breast and pectoral masks, density, cross-view findings, QC) is
:mod:`imaging_tasks.mammography.study`.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from imaging_tasks.device import pick_device
from imaging_tasks.preconditions import check_spacing_values

CLUSTER_RADIUS_MM = math.sqrt(100.0 / math.pi)  # a disc of 1 cm^2
CLUSTER_MIN_COUNT = 3


# -------------------------------------------------------------------------------------------- detection

def _gauss1d(sigma_px: float, torch, device):
    radius = max(1, int(math.ceil(3.5 * sigma_px)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    return k / k.sum()


def _blur(t, sigma_px: float):
    """Separable Gaussian on a (1, 1, H, W) tensor, reflecting at the image border."""
    import torch
    import torch.nn.functional as F

    k = _gauss1d(sigma_px, torch, t.device)
    r = (k.numel() - 1) // 2
    h, w = t.shape[-2:]
    if r >= min(h, w):  # reflect padding needs r < size; replicate is fine for such tiny images
        t = F.pad(t, (r, r, 0, 0), mode="replicate")
    else:
        t = F.pad(t, (r, r, 0, 0), mode="reflect")
    t = F.conv2d(t, k.view(1, 1, 1, -1))
    t = F.pad(t, (0, 0, r, r), mode="replicate" if r >= min(h, w) else "reflect")
    return F.conv2d(t, k.view(1, 1, -1, 1))


def breast_mask(image: np.ndarray) -> np.ndarray:
    """The breast (and pectoral muscle) against the air: Otsu threshold, largest component, holes filled."""
    from skimage.filters import threshold_otsu

    step = max(1, int(max(image.shape) // 512))
    small = image[::step, ::step]
    if float(small.max()) <= float(small.min()):
        return np.zeros(image.shape, dtype=bool)
    thr = threshold_otsu(small)
    # The air is nearly uniform; halfway between it and the Otsu level keeps the thin periphery.
    air = float(np.median(small[small < thr])) if np.any(small < thr) else float(small.min())
    fg = image > (air + 0.5 * (thr - air))
    labels, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))


def detect_calcifications(image: np.ndarray, pixel_spacing_mm: float, *, device=None, mask: np.ndarray | None = None,
                          k_sigma: float = 6.0, k_low: float = 3.0, spot_sigma_mm: float = 0.075,
                          background_sigma_mm: float = 0.3, rim_mm: float = 3.0, max_area_mm2: float = 0.5,
                          max_elongation: float = 4.0, detector_blur_mm: float = 0.05) -> list[dict]:
    """Candidate micro-calcifications in a MONOCHROME2 mammogram (brighter = denser).

    ``k_sigma`` is the acceptance threshold in local noise standard deviations of the DoG response for a
    point-like spot; the spot extent is where the response is at least half its local peak.  A calcium
    spot's peak contrast grows with its diameter, while the tissue texture that survives the filter gives
    broad, faint bumps; so a spot larger than the footprint of a point (system blur + filter) must reach
    ``k_sigma * sqrt(area / point_area)``.  The ``rim_mm`` under the skin line is skipped: the skin/air
    step dominates the response there, and specks in it are dermal.
    Returns dicts with ``centre_xy_px``, ``centre_xy_mm``, ``area_mm2``, ``diameter_mm`` (equivalent
    circle), ``contrast`` (peak above local background, stored pixel units), ``snr`` and ``score`` (the largest
    ``k_sigma`` at which the spot is still accepted).
    """
    import torch
    import torch.nn.functional as F

    dev = pick_device(device) if not isinstance(device, torch.device) else device
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    (sp,) = check_spacing_values([pixel_spacing_mm], "calcification detection")
    breast = breast_mask(img) if mask is None else np.asarray(mask, dtype=bool)
    interior = ndimage.distance_transform_edt(breast) * sp > rim_mm
    if not interior.any():
        return []
    t = torch.from_numpy(img).to(dev)[None, None]
    m = torch.from_numpy(breast.astype(np.float32)).to(dev)[None, None]
    inner = torch.from_numpy(interior).to(dev)[None, None]
    spot = _blur(t, max(0.6, spot_sigma_mm / sp))
    # Mask-normalised background so the black air outside the breast does not pull it down.
    bg = _blur(t * m, background_sigma_mm / sp) / _blur(m, background_sigma_mm / sp).clamp_min(1e-3)
    resp = spot - bg
    # Noise: robust global sigma to clip outliers, then a local RMS over ~2 mm blocks smoothed over ~6 mm.
    vals = resp[inner]
    med = vals.median()
    sigma_g = 1.4826 * (vals - med).abs().median().clamp_min(1e-6)
    clipped = ((resp - med).clamp(-3 * sigma_g, 3 * sigma_g) ** 2) * inner
    block = max(2, int(round(2.0 / sp)))
    h, w = img.shape
    ph, pw = (-h) % block, (-w) % block
    num = F.avg_pool2d(F.pad(clipped, (0, pw, 0, ph)), block)
    den = F.avg_pool2d(F.pad(inner.float(), (0, pw, 0, ph)), block)
    num, den = _blur(num, 1.5), _blur(den, 1.5)
    var = num / den.clamp_min(1e-3)
    var = torch.where(den > 1e-3, var, torch.full_like(var, float(sigma_g**2)))
    var = F.interpolate(var, scale_factor=block, mode="bilinear", align_corners=False)[..., :h, :w]
    # 0.995: the share of a Gaussian's variance that survives clamping at +-3 sigma.
    sigma_local = (var / 0.995).sqrt().clamp_min(float(sigma_g) * 0.25)
    resp = resp - med
    z = resp / sigma_local
    # Spot extent: above k_low and at least half the brightest response within ~0.3 mm.
    win = 2 * max(1, int(round(0.25 / sp))) + 1
    local_max = F.max_pool2d(resp, win, stride=1, padding=win // 2)
    core = (z > k_low) & (resp >= 0.5 * local_max) & inner
    core_np = core[0, 0].cpu().numpy()
    z_np = z[0, 0].cpu().numpy()
    resp_np = resp[0, 0].cpu().numpy()
    labels, n = ndimage.label(core_np, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    # Per-spot statistics over the few labelled pixels only (bincount, not whole-image passes).
    rr, cc = np.nonzero(labels)
    lab = labels[rr, cc] - 1
    zv, rv = z_np[rr, cc], resp_np[rr, cc]
    area_px = np.bincount(lab, minlength=n).astype(float)
    peak_z = np.full(n, -np.inf)
    np.maximum.at(peak_z, lab, zv)
    peak_c = np.full(n, -np.inf)
    np.maximum.at(peak_c, lab, rv)
    wv = np.clip(rv, 1e-6, None)
    wsum = np.bincount(lab, wv, n)
    cy, cx = np.bincount(lab, wv * rr, n) / wsum, np.bincount(lab, wv * cc, n) / wsum
    # Second moments for elongation: vessels and gland edges give line-like spots.
    my, mx = np.bincount(lab, rr, n) / area_px, np.bincount(lab, cc, n) / area_px
    dy, dx = rr - my[lab], cc - mx[lab]
    syy = np.bincount(lab, dy * dy, n) / area_px + 1 / 12
    sxx = np.bincount(lab, dx * dx, n) / area_px + 1 / 12
    sxy = np.bincount(lab, dx * dy, n) / area_px
    tr, det = sxx + syy, sxx * syy - sxy * sxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    elong = np.sqrt((tr / 2 + disc) / np.maximum(tr / 2 - disc, 1e-6))
    # Half-maximum area of a blurred point: 2*pi*ln2*sigma^2 (1.5x margin) with sigma from filter,
    # pixel and detector blur.
    point_area = 1.5 * 2 * math.pi * math.log(2) * (max(0.6 * sp, spot_sigma_mm) ** 2 + sp * sp / 12
                                                   + detector_blur_mm**2)
    area_mm2 = area_px * sp * sp
    needed = k_sigma * np.sqrt(np.maximum(area_mm2 / point_area, 1.0))
    keep = (peak_z >= needed) & (area_mm2 <= max_area_mm2) & (elong <= max_elongation)
    out = []
    for j in np.nonzero(keep)[0]:
        area_mm2 = float(area_px[j]) * sp * sp
        out.append({
            "index": len(out),
            "centre_xy_px": [round(float(cx[j]), 3), round(float(cy[j]), 3)],
            "centre_xy_mm": [round(float(cx[j]) * sp, 4), round(float(cy[j]) * sp, 4)],
            "area_mm2": round(area_mm2, 5),
            "diameter_mm": round(2.0 * math.sqrt(area_mm2 / math.pi), 4),
            "contrast": round(float(peak_c[j]), 3),
            "snr": round(float(peak_z[j]), 2),
            # the largest k_sigma that still accepts this spot: thresholding ``score`` at t keeps exactly what
            # detection at k_sigma = t keeps (the FROC sweep in mammography.froc relies on it)
            "score": float(peak_z[j] / math.sqrt(max(float(area_px[j]) * sp * sp / point_area, 1.0))),
            "elongation": round(float(elong[j]), 3),
        })
    return out


# ------------------------------------------------------------------------------------------- clustering

def cluster_calcifications(cands: list[dict], *, radius_mm: float = CLUSTER_RADIUS_MM,
                           min_count: int = CLUSTER_MIN_COUNT) -> list[dict]:
    """Group candidates into clusters: >= ``min_count`` within a disc of ``radius_mm`` (DBSCAN).

    The default (3 within 5.64 mm, i.e. 1 cm^2) is the classic CAD cluster definition.  Each cluster gives
    its member indices (into ``cands``), centroid, ``radius_mm`` (largest member distance from the centroid)
    and ``extent_mm`` (largest member-to-member distance).
    """
    if len(cands) < min_count:
        return []
    pts = np.array([c["centre_xy_mm"] for c in cands], dtype=float)
    tree = cKDTree(pts)
    nbrs = tree.query_ball_point(pts, r=radius_mm)
    core = np.array([len(nb) >= min_count for nb in nbrs])
    parent = list(range(len(pts)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.nonzero(core)[0]:
        for j in nbrs[i]:
            if core[j]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    assign = {}
    for i in range(len(pts)):
        if core[i]:
            assign[i] = find(i)
        else:  # border point: joins the nearest core within the radius
            cores = [j for j in nbrs[i] if core[j]]
            if cores:
                nearest = min(cores, key=lambda j: float(np.hypot(*(pts[i] - pts[j]))))
                assign[i] = find(nearest)
    groups: dict[int, list[int]] = {}
    for i, root in assign.items():
        groups.setdefault(root, []).append(i)
    clusters = []
    for root in sorted(groups):
        members = sorted(groups[root])
        p = pts[members]
        cen = p.mean(axis=0)
        radius = float(np.max(np.hypot(*(p - cen).T)))
        extent = float(np.max(np.hypot(*(p[:, None, :] - p[None, :, :]).transpose(2, 0, 1)))) if len(p) > 1 else 0.0
        px = np.array([cands[m]["centre_xy_px"] for m in members], dtype=float).mean(axis=0)
        clusters.append({
            "index": len(clusters),
            "members": members,
            "n_members": len(members),
            "centre_xy_mm": [round(float(v), 4) for v in cen],
            "centre_xy_px": [round(float(v), 3) for v in px],
            "radius_mm": round(radius, 4),
            "extent_mm": round(extent, 4),
            "mean_snr": round(float(np.mean([cands[m].get("snr", 0.0) for m in members])), 2),
        })
    return clusters


__all__ = ["detect_calcifications", "cluster_calcifications", "breast_mask", "CLUSTER_RADIUS_MM", "CLUSTER_MIN_COUNT"]
