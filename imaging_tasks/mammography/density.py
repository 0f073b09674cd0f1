"""Breast density: percent dense area, dense volume fraction and the four BI-RADS density categories.

Input: a presentation-scale image (brighter = denser; :func:`imaging_tasks.mammography.normalize.normalize`
``pixels``), the breast mask and, on oblique / lateral views, the pectoral-muscle mask (the muscle is left
out of the breast region: it is neither dense nor fatty breast tissue).

**Model.**  A "for presentation" mammogram is (up to the window) linear in the log attenuation
``mu_fat * t + (mu_gland - mu_fat) * g`` of a path of compressed thickness ``t`` holding ``g`` mm of
fibroglandular tissue (peripheral equalisation adds back most of the fat that the rolled-off edge lacks).  So,
with ``F`` the grey level of pure fat and ``G`` that of a fully glandular path at full thickness, the
glandular fraction of a pixel is ``h = (p - F) / ((G - F) * s)`` where ``s = t / t0`` is the relative
thickness there.  A pixel is **dense** when ``h > 0.5`` (more than half of the path is gland: the definition
of the phantoms' truth, ``synth.DENSITY_DEFINITION``).

**Method (self-calibrating, per image).**

1. Breast region = breast mask minus pectoral mask.
2. Dense reference ``G``: the level of the densest tissue, taken as fully glandular: the 99.8th percentile
   of the image smoothed over 0.5 mm (quantum noise) within the full-thickness breast (``s > 0.95``; the
   whole region if fewer than 50 pixels).  Not the median of the "dense" class: with a soft gland/fat
   transition (much tissue at partial glandular fraction) that median is a partly glandular level and the
   midpoint threshold falls far too low (measured: 42 % dense for a 5 % truth).  A presentation window
   that saturates dense tissue makes ``G`` the window top (noted when > 1 % of the full-thickness breast is
   saturated); the threshold is then somewhat low (measured: up to +6 points at 5 % dense with soft edges).
   **Physics floor** (when log-linear ``values`` are given, :func:`log_linear_values`): the self-calibration
   assumes the densest tissue is fully glandular, so a fatty breast (densest tissue ~40-50 % glandular) is called
   20-40 % dense.  On values linear in log attenuation with air at 0 (checked: the median outside the breast
   within ``AIR_ZERO_TOLERANCE`` x the fat level of 0), fully glandular tissue at full thickness is at least
   ``GLAND_FAT_RATIO`` x the fat level: mu_gland / mu_fat = 0.802 / 0.456 cm^-1 = 1.76 at 20 keV (Johns & Yaffe
   1987), ~1.66-1.70 with 2 x 1.5 mm of skin (gland-like) in a 40-60 mm path, less at higher effective energy or
   with scatter; the phantoms' fully glandular patches measure 1.68-1.73 (the self-calibrated G / F on their
   values).  1.6 is taken (conservative: a floor above the true level would under-call dense breasts).  So on
   ``values`` the dense reference is ``max(G_self, air + 1.6 (F - air))`` (re-evaluated as F iterates); when the
   floor binds, the result is measured on ``values`` (``dense_reference`` = "physics floor"), otherwise on the
   presentation ``pixels`` exactly as without values.  Without log-linear values (SIGMOID VOI, VOI LUT sequence:
   the stored values may be a logit or a gamma of the picture) only the self-calibration is used (noted), and a
   fatty breast is over-called there.  Measured on default-anatomy phantoms (no ``density=``; truth ~0 %), CC and
   MLO, dose 0.5 / 1, seeds 1-8 at 0.2 mm: self-calibrated 6-41 %, with the floor 0-5.3 % (5.3: seed 4 R_MLO,
   a breast whose glandular fraction peaks just under 0.5).  Sensitivity: ratio 1.62 gives <= 4.0 there, but
   the floor must stay under the self-calibrated G / F of every image with fully glandular tissue, which is
   1.602 on the 80 %-dense, soft-edge (0.5) MLO phantom (its fat level on the unclipped values is ~6 % high:
   little pure fat at full thickness): at 1.62 the floor binds there and gives -6.7 points.  So 1.6 has almost no
   margin on that side; a better fat estimate for very dense breasts would widen it.
3. Fat reference ``F``: start from the median of the lower Otsu class, then iterate to a fixed point
   (<= 50 rounds): dense = ``h > 0.5``; ``F`` = the **mode** of the non-dense pixels (the peak of the fat
   histogram: robust to the partly glandular pixels at the edges of dense patches, which drag a mean or
   median up when fat is scarce, as in an extremely dense breast; the subcutaneous fat is always there).
4. Thickness profile (only when ``compressed_thickness_mm`` is given, e.g. BodyPartThickness): the
   compressed breast's edge is modelled as a half cylinder of radius ``t0 / 2``, so at a distance ``d`` (mm,
   from the pixel spacing) inside the skin line ``s = 2 sqrt(r^2 - (r - d)^2) / t0`` for ``d < r`` and 1
   beyond.  The dense threshold follows the thinner periphery (a dense patch near the skin is less bright);
   without the thickness ``s = 1`` everywhere: the threshold is then the midpoint of ``F`` and ``G`` (an
   isodata-like rule), which misses dense tissue near the skin (measured: up to ~9 points low at 80% dense).
   Image borders (chest wall, cut-off edges) are not skin: the mask is extended across them first.

Percent dense area = 100 x dense pixels / breast-region pixels.

**Dense volume fraction** = sum(clip(h, 0, 1) * s) / sum(s) over the region (glandular volume / breast
volume, pectoral excluded).  Estimable only with ``compressed_thickness_mm`` (otherwise ``None`` with the
reason) and only as good as the linear model: it assumes the densest tissue (``G``) is ~100% glandular and that
the presentation window does not clip it (a window that saturates gland makes ``G`` too low and the volume too
high; measured on the phantoms: +1 to +15 points, worst for dense breasts and MLO views).  A calibrated volume
(Volpara-like: raw "for processing" signal, known attenuation coefficients and exposure) is not attempted.

**Categories** (:func:`birads_category`): BI-RADS 4th-edition quartiles of percent dense area, a < 25 <= b < 50
<= c < 75 <= d.  The 5th edition (2013) defines the categories qualitatively (masking risk), so this mapping is
an approximation used for research summaries, not a clinical report.

Why the physics anchor is only a floor (not ``G = F x mu_gland / mu_fat`` itself): it needs values proportional
to log attenuation with air at zero, which a windowed presentation image does not keep, the ratio moves with the
beam's effective energy and the skin, and ``F`` errors are multiplied by it: used as G on the phantoms' values it
was off by up to -14 points (80 % dense, soft edges).

Validated on ``synth.synthesize(density=...)`` phantoms (tests/test_mammography_density.py): within 5 points of
the planted dense area fraction over 0.05-0.8 x gland/fat edge steepness 0.5/1/2 x dose 0.5/1, CC and MLO, with
normalize's own masks (measured -2.2..+4.1 points, within ~1 point at the default steep edge), EXCEPT a known
gap at 5 % dense with the softest edge (0.5): one CC view measured +6.2/+6.3 points (there the densest tissue
is only ~90 % glandular and the window top sits near it, so ``G`` is low).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from imaging_tasks.errors import BadInput

DENSE_GLANDULAR_FRACTION = 0.5
BIRADS_EDGES = (25.0, 50.0, 75.0)  # percent dense area, BI-RADS 4th edition quartiles
BIRADS_NOTE = ("BI-RADS 4th-edition quartiles of percent dense area (a < 25 <= b < 50 <= c < 75 <= d); the 5th "
               "edition is qualitative, so this is an approximation for research summaries")
FULL_THICKNESS = 0.95
MIN_REFERENCE_PX = 50
DENSE_PERCENTILE = 99.8  # of the smoothed full-thickness breast: the densest tissue = fully glandular
DENSE_SMOOTH_MM = 0.5
MIN_REGION_PX = 200
HIST_BINS = 256
# Physics floor of the dense reference on log-linear values (module docstring, step 2): 100 %-glandular tissue at
# full thickness attenuates at least GLAND_FAT_RATIO times as much as fat (air = 0).
GLAND_FAT_RATIO = 1.6
AIR_ZERO_TOLERANCE = 0.1  # |air| <= this share of the fat level: the values' zero is air
LOG_LINEAR_VOI = ("LINEAR", "LINEAR_EXACT", "LOG_STRETCH")


def birads_category(percent: float) -> str:
    """BI-RADS density category a-d of a percent dense area (0-100); see ``BIRADS_NOTE``."""
    p = float(percent)
    if not np.isfinite(p) or p < 0 or p > 100:
        raise ValueError(f"percent dense area must be within 0-100, not {percent!r}")
    return "abcd"[int(np.searchsorted(BIRADS_EDGES, p, side="right"))]


def _otsu(v: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(v, nbins=HIST_BINS))


def _mode(v: np.ndarray, lo: float, hi: float) -> float:
    hist, edges = np.histogram(v, bins=HIST_BINS, range=(lo, hi))
    hist = ndimage.gaussian_filter1d(hist.astype(np.float64), 1.5)
    i = int(np.argmax(hist))
    return float(0.5 * (edges[i] + edges[i + 1]))


def relative_thickness(breast: np.ndarray, pixel_spacing_mm: float, compressed_thickness_mm: float) -> np.ndarray:
    """t / t0 over the image: half-cylinder edge of radius t0/2 inside the skin line (image borders not skin)."""
    pad = 2
    inside = np.pad(np.asarray(breast, dtype=bool), pad, mode="edge")
    d = ndimage.distance_transform_edt(inside)[pad:-pad, pad:-pad] * float(pixel_spacing_mm)
    t0 = float(compressed_thickness_mm)
    r = t0 / 2.0
    s = 2.0 * np.sqrt(np.clip(r * r - (r - np.minimum(d, r)) ** 2, 0.0, None)) / t0
    return np.where(breast, s, 0.0)


def percent_density(pixels: np.ndarray, breast_mask: np.ndarray, pectoral_mask: np.ndarray | None = None,
                    pixel_spacing_mm: float = 0.1, *, compressed_thickness_mm: float | None = None,
                    values: np.ndarray | None = None, max_iter: int = 50) -> dict:
    """Percent dense area, dense volume fraction and BI-RADS category of one view (see the module docstring).

    ``pixels``: (H, W) presentation scale, brighter = denser (any range).  ``breast_mask`` includes the
    pectoral muscle; ``pectoral_mask`` (MLO / ML views) is removed from the region.  ``values``: the same image
    linear in log attenuation with air at zero (:func:`log_linear_values`), for the physics floor of the dense
    reference (module docstring, step 2); the result is then measured on ``values`` when the floor binds.
    Returns a dict: ``percent_dense_area`` (0-100), ``dense_area_fraction``, ``dense_area_cm2``,
    ``breast_area_cm2``, ``dense_volume_fraction`` (None when not estimable, ``volume_note`` says why),
    ``birads_density``, ``fat_level``, ``dense_level`` (F, G, on the scale measured), ``dense_reference``
    ("self-calibrated" or "physics floor"), ``iterations``, ``method``, ``notes`` and ``dense_mask`` (bool array,
    the dense pixels: for a QC overlay; drop it before JSON).
    """
    if values is not None:
        vals = np.asarray(values, dtype=np.float64)
        breast = np.asarray(breast_mask, dtype=bool)
        if vals.shape != breast.shape:
            raise BadInput("density_shape_mismatch", f"values {vals.shape} and breast mask {breast.shape} must be "
                           "the same 2-D grid; pass MammoImage.values of this image")
        if int((~breast).sum()) >= MIN_REFERENCE_PX:
            on_values = _percent_density(vals, breast, pectoral_mask, pixel_spacing_mm, compressed_thickness_mm,
                                         max_iter, air=float(np.median(vals[~breast])))
            if on_values["dense_reference"] == "physics floor":
                on_values["notes"].append("dense reference at the physics floor (fat x GLAND_FAT_RATIO): no fully "
                                          "glandular tissue; measured on the log-linear values")
                return on_values
            note = next((n for n in on_values["notes"] if "not air" in n),
                        "physics floor below the self-calibrated dense reference: measured on the presentation pixels")
        else:
            note = "no air around the breast: physics floor of the dense reference not applied"
    else:
        note = ("no log-linear values (sigmoid / LUT presentation, or none given): dense reference self-calibrated "
                "only (a fatty breast without fully glandular tissue may be over-called)")
    res = _percent_density(pixels, breast_mask, pectoral_mask, pixel_spacing_mm, compressed_thickness_mm, max_iter)
    res["notes"].append(note)
    return res


def _percent_density(pixels, breast_mask, pectoral_mask, pixel_spacing_mm, compressed_thickness_mm, max_iter,
                     air: float | None = None) -> dict:
    """:func:`percent_density` on one scale; ``air`` (the air level, log-linear values only) sets the floor."""
    img = np.asarray(pixels, dtype=np.float64)
    breast = np.asarray(breast_mask, dtype=bool)
    if img.ndim != 2 or breast.shape != img.shape:
        raise BadInput("density_shape_mismatch", f"pixels {img.shape} and breast mask {breast.shape} must be the "
                       "same 2-D grid; pass the mask computed on this image")
    region = breast.copy()
    if pectoral_mask is not None:
        pect = np.asarray(pectoral_mask, dtype=bool)
        if pect.shape != img.shape:
            raise BadInput("density_shape_mismatch", f"pectoral mask {pect.shape} is not on the image grid "
                           f"{img.shape}; pass the mask computed on this image")
        region &= ~pect
    if not (pixel_spacing_mm and float(pixel_spacing_mm) > 0):
        raise BadInput("invalid_pixel_spacing", f"pixel spacing {pixel_spacing_mm!r} mm is not positive; pass the "
                       "image's PixelSpacing")
    if int(region.sum()) < MIN_REGION_PX:
        raise BadInput("breast_region_too_small", f"the breast region has {int(region.sum())} pixels (< "
                       f"{MIN_REGION_PX}); density needs the breast segmented (check the breast / pectoral masks)")
    notes: list[str] = []
    v = img[region]
    if float(v.max()) <= float(v.min()):
        raise BadInput("blank_breast_region", "the breast region has a single grey level; density cannot be "
                       "measured on a blank or saturated image")
    if compressed_thickness_mm is not None and float(compressed_thickness_mm) > 0:
        s_img = relative_thickness(breast, pixel_spacing_mm, compressed_thickness_mm)
    else:
        s_img = np.where(breast, 1.0, 0.0)
        notes.append("no compressed thickness: uniform thickness assumed (dense tissue near the skin is "
                     "under-counted in dense breasts)")
    s = s_img[region]
    lo, hi = float(v.min()), float(v.max())
    full = s > FULL_THICKNESS
    # Dense reference: the densest tissue at full thickness, on a lightly smoothed copy (quantum noise).
    sig = DENSE_SMOOTH_MM / float(pixel_spacing_mm)
    weight = ndimage.gaussian_filter(region.astype(np.float64), sig)
    smooth = ndimage.gaussian_filter(np.where(region, img, 0.0), sig) / np.maximum(weight, 1e-6)
    vs = smooth[region]
    g = float(np.percentile(vs[full] if full.sum() >= MIN_REFERENCE_PX else vs, DENSE_PERCENTILE))
    clipped = float(np.mean(v[full] >= hi)) if full.any() else 0.0
    if clipped > 0.01:
        notes.append(f"{100 * clipped:.1f}% of the full-thickness breast is at the top of the presentation range "
                     "(window saturates dense tissue): the dense reference is the window top")
    t = _otsu(v)
    f = float(np.median(v[v <= t]))
    g_self = g
    if air is not None and (f <= 0 or abs(air) > AIR_ZERO_TOLERANCE * f):
        notes.append(f"the values' zero is not air (air {air:.4g}, fat {f:.4g}): physics floor of the dense "
                     "reference not applied")
        air = None

    def floor(fat: float) -> float:
        return g_self if air is None else max(g_self, air + GLAND_FAT_RATIO * (fat - air))

    g = floor(f)
    if g <= f:
        raise BadInput("blank_breast_region", "the breast region shows no tissue brighter than its fat level; "
                       "density cannot be measured on this image")
    it = 0
    for it in range(1, max_iter + 1):
        h = (v - f) / np.maximum((g - f) * s, 1e-12)
        dense = h > DENSE_GLANDULAR_FRACTION
        if dense.all() or not dense.any():
            break
        nf = _mode(v[~dense], lo, hi)
        if nf >= floor(nf):
            notes.append("fat reference reached the dense one; kept the previous one")
            break
        if abs(nf - f) < 1e-6 * (hi - lo):
            f, g = nf, floor(nf)
            break
        f, g = nf, floor(nf)
    h = (v - f) / np.maximum((g - f) * s, 1e-12)
    dense = h > DENSE_GLANDULAR_FRACTION
    noise = 1.4826 * float(np.median(np.abs(v[~dense] - f))) if (~dense).any() else 0.0
    if g - f < 6.0 * noise:
        notes.append(f"weak fat/dense contrast ({g - f:.4g} vs noise {noise:.3g}): density unreliable")
    frac = float(dense.mean())
    pct = 100.0 * frac
    area_px_cm2 = float(pixel_spacing_mm) ** 2 / 100.0
    if compressed_thickness_mm is not None and float(compressed_thickness_mm) > 0:
        vol = float((np.clip(h, 0.0, 1.0) * s).sum() / max(float(s.sum()), 1e-12))
        vol_note = ("linear model on the presentation image (F fat, G fully glandular at full thickness, "
                    "half-cylinder edge); approximate")
    else:
        vol = None
        vol_note = "not estimable: needs the compressed breast thickness (BodyPartThickness)"
    dense_mask = np.zeros(img.shape, dtype=bool)
    dense_mask[region] = dense
    return {
        "percent_dense_area": round(pct, 3),
        "dense_area_fraction": round(frac, 5),
        "dense_area_cm2": round(float(dense.sum()) * area_px_cm2, 3),
        "breast_area_cm2": round(float(region.sum()) * area_px_cm2, 3),
        "dense_volume_fraction": None if vol is None else round(vol, 5),
        "volume_note": vol_note,
        "birads_density": birads_category(pct),
        "birads_note": BIRADS_NOTE,
        "fat_level": round(f, 6),
        "dense_level": round(g, 6),
        "dense_level_self_calibrated": round(g_self, 6),
        "dense_reference": "physics floor" if g > g_self else "self-calibrated",
        "iterations": it,
        "method": "self-calibrating two-reference threshold: fat = histogram mode of the non-dense pixels, dense = "
                  f"{DENSE_PERCENTILE:g}th percentile of the smoothed full-thickness breast, dense where glandular "
                  "fraction > 0.5" +
                  (" with a half-cylinder thickness profile" if vol is not None else ""),
        "notes": notes,
        "dense_mask": dense_mask,
    }


def density_for_image(image, *, pectoral: np.ndarray | None = None,
                      compressed_thickness_mm: float | None = None) -> dict:
    """:func:`percent_density` of a ``normalize.MammoImage`` with normalize's own breast and pectoral masks.

    ``pectoral`` overrides the pectoral mask (canonical grid).  Masks in the result are on the canonical grid.
    """
    from imaging_tasks.mammography.normalize import breast_mask, pectoral_mask

    sp = image.pixel_spacing_mm
    breast = breast_mask(image.values if image.values is not None else image.pixels, pixel_spacing_mm=sp)
    if pectoral is None:
        pectoral = pectoral_mask(image.pixels, breast, image.view, pixel_spacing_mm=sp)
    return percent_density(image.pixels, breast, pectoral, sp, compressed_thickness_mm=compressed_thickness_mm,
                           values=log_linear_values(image))


def log_linear_values(image) -> np.ndarray | None:
    """``MammoImage.values`` when they are linear in log attenuation (the ``values`` of :func:`percent_density`).

    A linear-window presentation image (VOI LINEAR, LINEAR_EXACT: ``values`` are the stored log signal before the
    window) and a for-processing image after normalize's log conversion (LOG_STRETCH); ``None`` for a SIGMOID VOI,
    a VOI LUT sequence or no VOI, where the stored values need not be linear in log attenuation (the phantoms'
    sigmoid variant stores a logit of the picture, the LUT variant a gamma of it): the same choice as
    ``study.detection_input`` makes for the SIGMOID case, stricter for the LUT sequence.
    """
    return image.values if image.values is not None and image.voi in LOG_LINEAR_VOI else None

