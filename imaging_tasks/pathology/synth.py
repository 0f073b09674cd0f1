"""Synthetic whole-slide images in the Aperio SVS layout, with known tissue area and PHI where scanners put it.

Tissue pixels come from real microscopy shipped inside the scikit-image wheel
(``skimage.data.immunohistochemistry``, a DAB/haematoxylin IHC section; no download).  For an H&E slide
the image is colour-deconvolved (Ruifrok & Johnston) and restained: its real haematoxylin layer is kept
and eosin is laid where the IHC had DAB (cytoplasm, membranes) over a stroma baseline.  Patches of it are
rotated, scaled, elastically warped and blended to fill a few irregular tissue fragments of known shape,
composited in optical density onto glass with sensor noise and dust.  The level-0 fragment mask is known,
so tissue area in mm², region count and the expected tile count are exact ground truth.

PHI sits where Aperio scanners put it: the label and macro images (rendered text and a barcode) and the
page ImageDescription (Filename, User, Barcode, Date, Time), so the slide de-identifier has real work.

Tiles are JPEG (what Aperio writes), encoded by tifffile through ``imagecodecs``; ``compression="zlib"``
is available where JPEG is unwanted.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont

from imaging_tasks.synth.phi import fake_study, phi_values
from imaging_tasks.synth import malformed as mf

SPECIALTY = "pathology"
TILE = 256
DOWNSAMPLES = (4, 16)  # reduced pyramid levels, as Aperio writes them
THUMB_MAX_SIDE = 1024
GLASS_RGB = (240.0, 238.0, 236.0)  # bright-field glass as scanners record it (not 255)
NOISE_SD = 1.8
JPEG_QUALITY = 80
BAND = 256  # rows composited at a time, so memory stays ~ width x BAND, not the whole slide

# Ruifrok & Johnston (2001) stain OD vectors, rows H, E, DAB; the published constants (as in scikit-image).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# The tile grid the ground-truth tile count refers to (pathology.plan_tiles defaults).
TRUTH_TARGET_MPP, TRUTH_TILE_PX, TRUTH_MIN_FRACTION = 1.0, 256, 0.5


# ----------------------------------------------------------------------------------------------- tissue
def _source_od(stain: str) -> np.ndarray:
    """Optical density (512, 512, 3) of the real IHC image, restained to H&E unless ``stain == "ihc"``."""
    from skimage.data import immunohistochemistry

    od = -np.log10(np.clip(immunohistochemistry().astype(np.float64), 1, 255) / 255.0)
    if stain == "ihc":
        # A baseline so the IHC image's own glass-white lumens still read as (pale) tissue inside a fragment.
        return (od + 0.05).astype(np.float32)
    if stain != "he":
        raise ValueError(f"stain must be 'he' or 'ihc', not {stain!r}")
    hed = np.clip(od @ HED_FROM_RGB, 0, None)
    h = 1.5 * hed[..., 0] + 0.04
    e = 0.16 + 0.5 * hed[..., 2]
    return (np.stack([h, e], -1) @ RGB_FROM_HED[:2]).astype(np.float32)


def _warped_patches(rng: np.random.Generator, src, count: int, size: int) -> np.ndarray:
    """``count`` size x size views of ``src`` (a torch tensor 1x3xHxW): random rotation, flip, scale, offset
    and a smooth elastic warp each, so the mosaic does not repeat visibly."""
    import torch
    import torch.nn.functional as F

    n_src = src.shape[-1]
    grids = np.empty((count, size, size, 2), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - size / 2
    for i in range(count):
        angle, scale = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.2)
        flip = rng.integers(2) * 2 - 1
        offset = rng.uniform(0, n_src, 2)
        field = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
                 for c in rng.normal(0, 10.0, (2, 6, 6))]
        c, s = np.cos(angle) * scale, np.sin(angle) * scale
        ys = c * yy - s * xx * flip + offset[0] + field[0]
        xs = s * yy + c * xx * flip + offset[1] + field[1]
        # grid_sample wants (x, y) in [-1, 1] (align_corners=False: pixel centres at (2i + 1) / n - 1)
        grids[i, ..., 0] = (2 * xs + 1) / n_src - 1
        grids[i, ..., 1] = (2 * ys + 1) / n_src - 1
    with torch.no_grad():
        out = F.grid_sample(src.expand(count, -1, -1, -1), torch.from_numpy(grids), mode="bilinear",
                            padding_mode="reflection", align_corners=False)
    return out.permute(0, 2, 3, 1).numpy()


def _fragment_od(rng: np.random.Generator, src, height: int, width: int) -> np.ndarray:
    """Tissue OD filling a height x width box: warped patches feather-blended on an overlapping grid."""
    patch, step = 512, 416
    ramp = np.minimum(1.0, np.minimum(np.arange(patch) + 1, patch - np.arange(patch)) / (patch - step))
    weight = np.outer(ramp, ramp).astype(np.float32)[..., None]
    origins = [(y, x) for y in range(0, height, step) for x in range(0, width, step)]
    acc = np.zeros((height, width, 3), np.float32)
    wsum = np.zeros((height, width, 1), np.float32)
    for start in range(0, len(origins), 8):
        chunk = origins[start:start + 8]
        for (y, x), view in zip(chunk, _warped_patches(rng, src, len(chunk), patch), strict=True):
            h, w = min(patch, height - y), min(patch, width - x)
            acc[y:y + h, x:x + w] += view[:h, :w] * weight[:h, :w]
            wsum[y:y + h, x:x + w] += weight[:h, :w]
    acc /= np.maximum(wsum, 1e-6)
    return acc


def _fragments(rng: np.random.Generator, height: int, width: int, count: int) -> list[dict]:
    """Irregular, non-touching tissue fragments: star-shaped outlines r(theta) = R (1 + sum a_k cos(k theta))."""
    frags: list[dict] = []
    short = min(height, width)
    for _ in range(400):
        if len(frags) == count:
            break
        radius = rng.uniform(0.14, 0.24) * short
        harmonics = [(k, rng.uniform(0, 0.22 / k ** 0.8), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
        reach = radius * (1 + sum(a for _, a, _ in harmonics))
        cy, cx = rng.uniform(reach + 8, height - reach - 8), rng.uniform(reach + 8, width - reach - 8)
        if all(np.hypot(cy - f["cy"], cx - f["cx"]) > reach + f["reach"] + 0.02 * short for f in frags):
            frags.append({"cy": cy, "cx": cx, "radius": radius, "reach": reach, "harmonics": harmonics})
    if count and not frags:
        raise ValueError("slide too small for a tissue fragment; use at least 512 x 512 px")
    return frags


def _fragment_mask(frag: dict, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    dy, dx = ys[:, None] - np.float32(frag["cy"]), xs[None, :] - np.float32(frag["cx"])
    theta = np.arctan2(dy, dx)
    r = np.ones_like(theta)
    for k, a, p in frag["harmonics"]:
        r += np.float32(a) * np.cos(np.float32(k) * theta + np.float32(p))
    return np.hypot(dy, dx) <= r * np.float32(frag["radius"])


# ----------------------------------------------------------------------------------------------- slide
def _compose(rng: np.random.Generator, height: int, width: int, stain: str, n_fragments: int, *,
             noise_sd: float = NOISE_SD, stain_scale: float = 1.0, folds: int = 0,
             art_rng: np.random.Generator | None = None, labels: np.ndarray | None = None,
             truth: dict | None = None):
    """Level-0 RGB, the exact tissue mask, and per-fragment areas (px).

    ``stain_scale`` multiplies the tissue optical density (paler or darker staining); ``folds`` plants that many
    folds (see :func:`_plant_fold`) drawn from ``art_rng``, marked in ``labels`` and listed in ``truth``.  With
    the defaults the output is what it always was (``rng`` is consumed identically).
    """
    import torch
    from scipy import ndimage

    src = torch.from_numpy(_source_od(stain)).permute(2, 0, 1)[None].contiguous()
    frags = _fragments(rng, height, width, n_fragments)
    fold_at = set(art_rng.choice(len(frags), size=min(folds, len(frags)), replace=False).tolist()) if folds else set()
    boxes = []
    for index, f in enumerate(frags):
        y0, y1 = int(max(0, np.floor(f["cy"] - f["reach"] - 4))), int(min(height, np.ceil(f["cy"] + f["reach"] + 5)))
        x0, x1 = int(max(0, np.floor(f["cx"] - f["reach"] - 4))), int(min(width, np.ceil(f["cx"] + f["reach"] + 5)))
        mask = _fragment_mask(f, np.arange(y0, y1, dtype=np.float32) + 0.5, np.arange(x0, x1, dtype=np.float32) + 0.5)
        # Section thickness varies slowly across a fragment; the edge is soft over ~1 µm, centred on the outline.
        thick = Image.fromarray(rng.uniform(0.85, 1.15, (4, 4)).astype(np.float32), mode="F")
        thick = np.asarray(thick.resize((x1 - x0, y1 - y0), Image.BILINEAR))
        alpha = ndimage.gaussian_filter(mask.astype(np.float32), 1.2)
        alpha *= thick
        del thick
        od = _fragment_od(rng, src, y1 - y0, x1 - x0)
        if stain_scale != 1.0:
            alpha *= np.float32(stain_scale)
        od *= alpha[..., None]
        if index in fold_at:
            doubled = _plant_fold(art_rng, od, mask, f["cy"] - y0, f["cx"] - x0, f["radius"])
            labels[y0:y1, x0:x1][doubled] |= ARTEFACT_BITS["fold"]
            ys, xs = np.nonzero(doubled)
            truth.setdefault("fold", []).append({"bbox": [int(x0 + xs.min()), int(y0 + ys.min()),
                                                          int(x0 + xs.max()) + 1, int(y0 + ys.max()) + 1],
                                                 "area_px": int(doubled.sum())})
        od = od.astype(np.float16)  # kept until compositing: half the memory
        boxes.append((y0, y1, x0, x1, mask, od))
    # Dust on the glass: a few specks of a few µm, which a tissue detector must not count.
    specks = []
    for _ in range(int(rng.integers(4, 9))):
        y, x, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(1.5, 5)
        if all(not (y0 - 10 < y < y1 + 10 and x0 - 10 < x < x1 + 10) for y0, y1, x0, x1, _, _ in boxes):
            specks.append((y, x, r))

    rgb = np.empty((height, width, 3), np.uint8)
    full_mask = np.zeros((height, width), bool)
    glass = np.asarray(GLASS_RGB, np.float32)
    for b0 in range(0, height, BAND):
        b1 = min(height, b0 + BAND)
        od = np.zeros((b1 - b0, width, 3), np.float32)
        for y0, y1, x0, x1, mask, fod in boxes:
            lo, hi = max(b0, y0), min(b1, y1)
            if lo < hi:
                od[lo - b0:hi - b0, x0:x1] += fod[lo - y0:hi - y0]
                full_mask[lo:hi, x0:x1] |= mask[lo - y0:hi - y0]
        yy = np.arange(b0, b1)[:, None] + 0.5
        for y, x, r in specks:
            if b0 - r - 1 < y < b1 + r + 1:
                lo, hi = int(max(0, x - r - 1)), int(min(width, x + r + 2))
                xx = np.arange(lo, hi)[None, :] + 0.5
                od[:, lo:hi] += 0.6 * ((yy - y) ** 2 + (xx - x) ** 2 <= r * r)[..., None]
        noise = rng.standard_normal((b1 - b0, width, 3), dtype=np.float32) * np.float32(noise_sd)
        rgb[b0:b1] = np.clip(glass * np.power(10.0, -od) + noise, 0, 255).round().astype(np.uint8)
    areas = [int(mask.sum()) for *_, mask, _ in boxes]
    return rgb, full_mask, areas


def _stain_truth(rgb: np.ndarray, mask: np.ndarray) -> dict:
    """Mean H, E, DAB optical density over the true tissue pixels, as written (before JPEG)."""
    od_of = -np.log10(np.maximum(np.arange(256), 1) / 255.0).astype(np.float32)
    sums, n = np.zeros(3), 0
    for b0 in range(0, rgb.shape[0], BAND):
        m = mask[b0:b0 + BAND]
        if m.any():
            hed = np.clip(od_of[rgb[b0:b0 + BAND]] @ HED_FROM_RGB.astype(np.float32), 0, None)
            sums += np.einsum("yxc,yx->c", hed, m.astype(np.float32), dtype=np.float64)
            n += int(m.sum())
    mean = sums / max(n, 1)
    return {"hematoxylin_od_mean": float(mean[0]), "eosin_od_mean": float(mean[1]), "dab_od_mean": float(mean[2])}


def expected_tiles(mask: np.ndarray, mpp: float, *, target_mpp: float = TRUTH_TARGET_MPP,
                   tile_px: int = TRUTH_TILE_PX, min_fraction: float = TRUTH_MIN_FRACTION) -> int:
    """Tiles of tile_px at target_mpp on a grid from (0, 0) whose true tissue fraction >= min_fraction."""
    side = tile_px * target_mpp / mpp
    height, width = mask.shape
    count = 0
    for j in range(int((height + 1e-6) // side)):
        for i in range(int((width + 1e-6) // side)):
            y0, x0 = int(round(j * side)), int(round(i * side))
            if mask[y0:int(round(y0 + side)), x0:int(round(x0 + side))].mean() >= min_fraction:
                count += 1
    return count


# ----------------------------------------------------------------------------------------------- artefacts
# Optional, each with level-0 ground truth (a label image of these bits plus boxes in the truth JSON), so the
# tile QC (pathology.tile_qc) can be scored: which tiles carry ink, lie in the blurred patch or on a fold.
ARTEFACT_BITS = {"pen": 1, "blur": 2, "fold": 4, "blur_edge": 8, "pen_on_tissue": 16}
# Colour of each marker ink laid thick on glass, as HSV ranges (hue in degrees) a stroke's ink is drawn from:
# what blue, green and black markers look like scanned.  Blue-violet inks (hue > ~230°, the hue of
# haematoxylin) are left out on purpose: no colour rule can tell them from a dense nucleus (see tile_qc).
PEN_HSV = {"blue": ((205, 226), (0.5, 0.8), (0.55, 0.78)), "green": ((110, 165), (0.45, 0.75), (0.4, 0.65)),
           "black": ((0, 360), (0.0, 0.12), (0.08, 0.2))}


def _plant_fold(rng: np.random.Generator, od: np.ndarray, mask: np.ndarray, cy: float, cx: float,
                radius: float) -> np.ndarray:
    """A fold inside one fragment box: the section beyond a random line is folded back over a band of width
    0.35-0.6 radius, so there the tissue is two layers thick and its optical density the sum of both (the
    mirror image across the line is added).  ``od`` (h, w, 3) is edited in place; returns the level-0 mask
    (box coordinates) where both layers are tissue."""
    h, w = mask.shape
    theta = rng.uniform(0, 2 * np.pi)
    ny, nx = np.sin(theta), np.cos(theta)
    offset = rng.uniform(-0.3, 0.3) * radius
    band = rng.uniform(0.35, 0.6) * radius
    ly, lx = cy + offset * ny, cx + offset * nx  # a point on the fold line
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + np.float32(0.5)
    dist = (ys - np.float32(ly)) * np.float32(ny) + (xs - np.float32(lx)) * np.float32(nx)
    inside = (dist > 0) & (dist < band)
    sy = np.floor(ys[inside] - 2 * dist[inside] * np.float32(ny)).astype(np.int64)
    sx = np.floor(xs[inside] - 2 * dist[inside] * np.float32(nx)).astype(np.int64)
    ok = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    iy, ix = np.nonzero(inside)
    iy, ix, sy, sx = iy[ok], ix[ok], sy[ok], sx[ok]
    od[iy, ix] += od[sy, sx]
    doubled = np.zeros((h, w), bool)
    doubled[iy, ix] = mask[iy, ix] & mask[sy, sx]
    return doubled


def _plant_blur(rng: np.random.Generator, rgb: np.ndarray, labels: np.ndarray, centre: tuple[float, float],
                mpp: float, noise_sd: float) -> dict:
    """An out-of-focus patch: a rectangle around ``centre`` (y, x) blurred by a Gaussian of 1.5-3 µm (defocus
    spreads light, so it is applied to intensities), fading to sharp over a margin of 4 sigma; fresh sensor
    noise is added where it was blurred away.  ``labels`` gets ``blur`` on the core, ``blur_edge`` on the margin."""
    from scipy import ndimage

    height, width = labels.shape
    short = min(height, width)
    sigma_um = rng.uniform(1.5, 3.0)
    sigma = sigma_um / mpp
    ramp = int(np.ceil(4 * sigma))
    half_h, half_w = rng.uniform(0.12, 0.2, 2) * short
    cy, cx = centre[0] + rng.uniform(-0.05, 0.05) * short, centre[1] + rng.uniform(-0.05, 0.05) * short
    core = [int(max(0, cx - half_w)), int(max(0, cy - half_h)), int(min(width, cx + half_w)),
            int(min(height, cy + half_h))]
    outer = [max(0, core[0] - ramp), max(0, core[1] - ramp), min(width, core[2] + ramp), min(height, core[3] + ramp)]
    pad = int(np.ceil(4 * sigma))
    rx0, ry0 = max(0, outer[0] - pad), max(0, outer[1] - pad)
    rx1, ry1 = min(width, outer[2] + pad), min(height, outer[3] + pad)
    region = rgb[ry0:ry1, rx0:rx1].astype(np.float32)
    blurred = ndimage.gaussian_filter(region, (sigma, sigma, 0), mode="nearest")
    yy = np.arange(ry0, ry1, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(rx0, rx1, dtype=np.float32)[None, :] + 0.5
    out_y = np.maximum(np.maximum(core[1] - yy, yy - core[3]), 0)
    out_x = np.maximum(np.maximum(core[0] - xx, xx - core[2]), 0)
    weight = np.clip(1 - np.maximum(out_y, out_x) / ramp, 0, 1)[..., None]
    noise = rng.standard_normal(region.shape, dtype=np.float32) * np.float32(noise_sd)
    region += weight * (blurred - region + noise)
    rgb[ry0:ry1, rx0:rx1] = np.clip(region, 0, 255).round().astype(np.uint8)
    lab = labels[ry0:ry1, rx0:rx1]
    lab[(weight[..., 0] > 0) & (weight[..., 0] < 1)] |= ARTEFACT_BITS["blur_edge"]
    lab[weight[..., 0] >= 1] |= ARTEFACT_BITS["blur"]
    return {"core": core, "outer": outer, "sigma_um": round(float(sigma_um), 3)}


def _stroke_points(rng: np.random.Generator, through: tuple[float, float], length: float) -> np.ndarray:
    """A gently curved marker stroke (a cubic Bezier) of about ``length`` px passing near ``through`` (y, x)."""
    angle = rng.uniform(0, np.pi)
    d = np.array([np.sin(angle), np.cos(angle)])
    n = np.array([-d[1], d[0]])
    p0 = np.asarray(through) - d * length * rng.uniform(0.3, 0.7)
    ctrl = [p0, p0 + d * length / 3 + n * rng.normal(0, 0.15) * length,
            p0 + 2 * d * length / 3 + n * rng.normal(0, 0.15) * length, p0 + d * length]
    t = np.linspace(0, 1, 64)[:, None]
    return ((1 - t) ** 3 * ctrl[0] + 3 * (1 - t) ** 2 * t * ctrl[1] + 3 * (1 - t) * t ** 2 * ctrl[2]
            + t ** 3 * ctrl[3])


def _plant_pen(rng: np.random.Generator, rgb: np.ndarray, labels: np.ndarray, colour: str,
               through: tuple[float, float], tissue: np.ndarray, noise_sd: float) -> dict:
    """A marker stroke on the coverslip: ink of ``colour`` (jittered), streaky (density 0.6-1.2 varying along
    and across the stroke), soft-edged; absorbs on top of whatever is below (transmission multiplies).
    ``labels`` gets ``pen`` where the ink covers at least half a pixel, and ``pen_on_tissue`` where that is
    over the section (``tissue``, level 0), where ink and stain colours mix."""
    from scipy import ndimage

    height, width = labels.shape
    short = min(height, width)
    import colorsys

    (h0, h1), (s0, s1), (v0, v1) = PEN_HSV[colour]
    ink_rgb = 255.0 * np.array(colorsys.hsv_to_rgb(rng.uniform(h0, h1) / 360, rng.uniform(s0, s1),
                                                   rng.uniform(v0, v1)))
    ink_od = -np.log10(np.clip(ink_rgb, 4, 250) / 255.0)
    stroke_w = max(16, int(rng.uniform(0.08, 0.14) * short))
    pts = _stroke_points(rng, through, rng.uniform(0.5, 0.9) * short)
    x0 = int(max(0, np.floor(pts[:, 1].min()) - stroke_w))
    y0 = int(max(0, np.floor(pts[:, 0].min()) - stroke_w))
    x1 = int(min(width, np.ceil(pts[:, 1].max()) + stroke_w))
    y1 = int(min(height, np.ceil(pts[:, 0].max()) + stroke_w))
    if x1 <= x0 or y1 <= y0:
        return {"colour": colour, "bbox": None}
    img = Image.new("L", (x1 - x0, y1 - y0), 255)
    ImageDraw.Draw(img).line([(float(x - x0), float(y - y0)) for y, x in pts], fill=0, width=1)
    # distance to the centre line, so the stroke is one smooth band (a wide polyline leaves seams at its joints)
    dist = ndimage.distance_transform_edt(np.asarray(img) > 0).astype(np.float32)
    cover = np.clip((stroke_w / 2 - dist) / 3.0 + 0.5, 0, 1)  # soft edge over ~3 px
    del dist
    streak = Image.fromarray(rng.uniform(0.6, 1.2, (12, 12)).astype(np.float32), mode="F")
    density = np.asarray(streak.resize((x1 - x0, y1 - y0), Image.BICUBIC)) * cover
    region = rgb[y0:y1, x0:x1].astype(np.float32)
    region *= np.power(10.0, -density[..., None] * ink_od.astype(np.float32)).astype(np.float32)
    region += rng.standard_normal(region.shape, dtype=np.float32) * np.float32(0.5 * noise_sd) * (cover[..., None] > 0)
    rgb[y0:y1, x0:x1] = np.clip(region, 0, 255).round().astype(np.uint8)
    inked = cover >= 0.5
    labels[y0:y1, x0:x1][inked] |= ARTEFACT_BITS["pen"]
    labels[y0:y1, x0:x1][inked & tissue[y0:y1, x0:x1]] |= ARTEFACT_BITS["pen_on_tissue"]
    return {"colour": colour, "rgb": [round(float(c), 1) for c in ink_rgb], "width_px": stroke_w,
            "bbox": [x0, y0, x1, y1]}


def _tissue_sites(mask: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """Per tissue fragment: a point deep inside it and its outline points (y, x), in random order but fragments
    carrying a fold last, so that blur and pen strokes land on other fragments while there are any."""
    from scipy import ndimage

    step = max(1, int(max(mask.shape) // 512))
    small = mask[::step, ::step]
    depth = ndimage.distance_transform_edt(small)
    comps, n = ndimage.label(small)
    if not n:
        return [{"centre": (mask.shape[0] / 2, mask.shape[1] / 2), "edge": np.array([[mask.shape[0] / 2,
                                                                                      mask.shape[1] / 2]])}]
    folded = set(np.unique(comps[(labels[::step, ::step] & ARTEFACT_BITS["fold"]) > 0]).tolist()) - {0}
    peaks = ndimage.maximum_position(depth, comps, range(1, n + 1))
    edge = small & ~ndimage.binary_erosion(small)
    sites = []
    for i in rng.permutation(n).tolist():
        ey, ex = np.nonzero(edge & (comps == i + 1))
        sites.append({"centre": ((peaks[i][0] + 0.5) * step, (peaks[i][1] + 0.5) * step),
                      "edge": np.stack([(ey + 0.5) * step, (ex + 0.5) * step], 1), "folded": i + 1 in folded})
    return sorted(sites, key=lambda site: site["folded"])


def artefact_fractions(labels: np.ndarray, tiles: list, side_l0: float) -> dict[str, np.ndarray]:
    """Per tile (``[x, y, ...]`` level-0 origins of ``side_l0`` squares), the fraction of its area under each
    artefact of the label image that :func:`synthesize` writes (``<label>_artefacts.png``)."""
    side = int(round(side_l0))
    out = {name: np.zeros(len(tiles)) for name in ARTEFACT_BITS}
    for i, (x, y, *_rest) in enumerate(tiles):
        patch = labels[int(y):int(y) + side, int(x):int(x) + side]
        for name, bit in ARTEFACT_BITS.items():
            out[name][i] = float(np.count_nonzero(patch & bit)) / max(1, patch.size)
    return out


# ----------------------------------------------------------------------------------------------- label
def _barcode(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int]) -> None:
    """A 1-D bar pattern from the text's bytes (looks like a barcode; not a decodable symbology)."""
    x0, y0, x1, y1 = box
    bits = "".join(f"{b:08b}" for b in text.encode())
    unit = max(1, (x1 - x0) // max(1, len(bits) + 4))
    for i, bit in enumerate(bits):
        if bit == "1":
            draw.rectangle([x0 + (i + 2) * unit, y0, x0 + (i + 3) * unit - 1, y1], fill=(0, 0, 0))


def _label_image(lines: list[str], barcode: str, size=(560, 470)) -> Image.Image:
    img = Image.new("RGB", size, (246, 246, 242))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=30)
    for i, line in enumerate(lines):
        draw.text((18, 18 + 44 * i), line, fill=(10, 10, 10), font=font)
    _barcode(draw, barcode, (18, size[1] - 130, size[0] - 18, size[1] - 30))
    return img


def _macro_image(label: Image.Image, rgb: np.ndarray, size=(1280, 431)) -> Image.Image:
    """Overview photo of the whole glass: the label at one end, the section on the rest."""
    img = Image.new("RGB", size, (205, 208, 210))
    lab = label.resize((int(label.width * size[1] / label.height), size[1]), Image.BILINEAR)
    img.paste(lab, (0, 0))
    room = (size[0] - lab.width - 20, size[1] - 20)
    thumb = Image.fromarray(rgb)
    thumb.thumbnail(room, Image.BOX)
    img.paste(thumb, (lab.width + 10 + (room[0] - thumb.width) // 2, 10 + (room[1] - thumb.height) // 2))
    return img


# ----------------------------------------------------------------------------------------------- writing
def write_svs(path: Path, rgb: np.ndarray, *, mpp: float, fields: dict[str, str], label: Image.Image,
              macro: Image.Image, compression: str = "jpeg") -> None:
    """Aperio layout: tiled level 0, stripped thumbnail, tiled reduced levels, stripped label and macro."""
    height, width = rgb.shape[:2]
    codec = f"JPEG/RGB Q={JPEG_QUALITY}" if compression == "jpeg" else "Deflate/RGB"
    head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE})"
    text = "|".join(f"{k} = {v}" for k, v in fields.items())
    if compression == "jpeg":
        # JPEG tiles as scanners write them, encoded by tifffile through imagecodecs.  Photometric RGB: with
        # tifffile's YCbCr tiles openslide decodes the colours wrongly (seen: (200,80,40) read as (77,255,115)).
        tiled = dict(compression="jpeg", compressionargs={"level": JPEG_QUALITY}, photometric="rgb")
    elif compression == "zlib":
        tiled = dict(compression="zlib", photometric="rgb")
    else:
        raise ValueError(f"compression must be 'jpeg' or 'zlib', not {compression!r}")
    stripped = dict(compression="zlib", photometric="rgb", metadata=None, software=False)
    pil = Image.fromarray(rgb)
    thumb_ds = max(1, -(-max(width, height) // THUMB_MAX_SIDE))
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(rgb, tile=(TILE, TILE), description=f"{head} {codec}|{text}", metadata=None, software=False,
                  **tiled)
        thumb = np.asarray(pil.reduce(thumb_ds))
        tif.write(thumb, description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]} {codec}", rowsperstrip=64,
                  **stripped)
        for factor in DOWNSAMPLES:
            level = np.asarray(pil.reduce(factor))
            tif.write(level, tile=(TILE, TILE), metadata=None, software=False,
                      description=f"{head} -> {level.shape[1]}x{level.shape[0]} {codec}|{text}", **tiled)
        # Aperio: NewSubfileType 1 for the label, 9 for the macro; the kind is the first word of line 2.
        tif.write(np.asarray(label), subfiletype=1, rowsperstrip=64,
                  description=f"Aperio Image Library v12.0.15\r\nlabel {label.width}x{label.height}", **stripped)
        tif.write(np.asarray(macro), subfiletype=9, rowsperstrip=64,
                  description=f"Aperio Image Library v12.0.15\r\nmacro {macro.width}x{macro.height}", **stripped)


# ----------------------------------------------------------------------------------------------- entry
def synthesize(out: Path, studies: int, seed: int, *, width: int = 6144, height: int = 4608, mpp: float = 0.5,
               stain: str = "he", fragments: int = 3, compression: str = "jpeg", noise_sd: float = NOISE_SD,
               stain_scale: float = 1.0, pen: tuple[str, ...] = (), blur: int = 0, folds: int = 0,
               **_ignored) -> list[Path]:
    """One Aperio SVS per study under ``out/pathology/<label>/slide.svs``; truth JSON per study.

    ``fragments=0`` gives a glass-only slide (dust, no tissue), which processing must refuse.

    Variation and artefacts (all off by default, and then the files are byte-for-byte what they were):
    ``noise_sd`` sensor noise (grey levels), ``stain_scale`` staining intensity (x tissue OD), ``pen`` one marker
    stroke per listed colour (``"blue"``, ``"green"``, ``"black"``), ``blur`` out-of-focus patches, ``folds``
    tissue folds.  Artefacts come from their own random stream, are centred on tissue fragments, and their
    truth is ``truth["artefacts"]`` (boxes in level-0 px) plus a level-0 label image
    ``_truth/pathology/<label>_artefacts.png`` of :data:`ARTEFACT_BITS` (see :func:`artefact_fractions`).
    """
    unknown = set(pen) - set(PEN_HSV)
    if unknown:
        raise ValueError(f"pen colours must be among {sorted(PEN_HSV)}, not {sorted(unknown)}")
    out = Path(out)
    truths = []
    for n in range(studies):
        rng = np.random.default_rng([seed, n])
        label = f"study-{n:03d}"
        study = fake_study(rng, label)
        p = study.patient
        family, given = p.name.split("^")[:2]
        person, operator = f"{family}, {given}", " ".join(study.operator.split("^")[:2][::-1])
        barcode = f"{study.accession}-A1-{stain.upper()}"
        filename = f"{study.accession}_{family}"
        study.extra_phi += [barcode, filename, person, operator]
        planting = bool(pen or blur or folds)
        art_rng = np.random.default_rng([seed, n, 14]) if planting else None
        labels = np.zeros((height, width), np.uint8) if planting else None
        art: dict = {}
        rgb, mask, areas = _compose(rng, height, width, stain, fragments, noise_sd=noise_sd,
                                    stain_scale=stain_scale, folds=folds, art_rng=art_rng, labels=labels, truth=art)
        if planting:
            sites = _tissue_sites(mask, labels, art_rng)
            for k in range(blur):
                art.setdefault("blur", []).append(_plant_blur(art_rng, rgb, labels, sites[k % len(sites)]["centre"],
                                                              mpp, noise_sd))
            for k, colour in enumerate(pen):
                # pathologists mark around and across tissue: strokes pass the outline of a fragment, so part of
                # the ink lies on glass and part on tissue
                edge = sites[(k + blur) % len(sites)]["edge"]
                through = tuple(edge[int(art_rng.integers(len(edge)))])
                art.setdefault("pen", []).append(_plant_pen(art_rng, rgb, labels, colour, through, mask, noise_sd))
        label_img = _label_image([study.institution[:28], person, p.patient_id, study.accession,
                                  f"DOB {p.birth_date}  {stain.upper()}"], barcode)
        macro = _macro_image(label_img, rgb)
        d = study.study_date
        fields = {
            "AppMag": "20", "StripeWidth": "2040", "ScanScope ID": f"SS{1000 + int(rng.integers(9000))}",
            "Filename": filename, "Date": f"{d[4:6]}/{d[6:8]}/{d[2:4]}",
            "Time": f"{study.study_time[:2]}:{study.study_time[2:4]}:{study.study_time[4:6]}",
            "Time Zone": "GMT+00:00", "User": operator, "Barcode": barcode, "MPP": f"{mpp:.4f}",
            "Left": f"{rng.uniform(20, 30):.6f}", "Top": f"{rng.uniform(18, 26):.6f}",
            "LineCameraSkew": "-0.000424", "LineAreaXOffset": "0.019265", "LineAreaYOffset": "-0.000313",
            "Focus Offset": "0.000000", "ImageID": str(int(rng.integers(10 ** 6, 10 ** 7))),
            "OriginalWidth": str(width), "OriginalHeight": str(height), "Filtered": "5",
            "ICC Profile": "ScanScope v1",
        }
        folder = out / SPECIALTY / label
        folder.mkdir(parents=True, exist_ok=True)
        write_svs(folder / "slide.svs", rgb, mpp=mpp, fields=fields, label=label_img, macro=macro,
                  compression=compression)
        px_mm2 = (mpp / 1000.0) ** 2
        truth = {"specialty": SPECIALTY, "label": label, "study_uid": None, "phi": phi_values(study),
                 "truth": {
                     "tissue_area_mm2": float(mask.sum()) * px_mm2,
                     "fragment_areas_mm2": sorted(a * px_mm2 for a in areas),
                     "n_tissue_regions": len(areas), "mpp": mpp, "dimensions": [width, height],
                     "tissue_fraction": float(mask.mean()), "stain": stain,
                     "n_tiles_expected": expected_tiles(mask, mpp),
                     "tile_grid": {"target_mpp": TRUTH_TARGET_MPP, "tile_px": TRUTH_TILE_PX,
                                   "min_tissue_fraction": TRUTH_MIN_FRACTION},
                     **_stain_truth(rgb, mask)}}
        tpath = out / "_truth" / SPECIALTY / f"{label}.json"
        tpath.parent.mkdir(parents=True, exist_ok=True)
        if noise_sd != NOISE_SD or stain_scale != 1.0:
            truth["truth"].update(noise_sd=noise_sd, stain_scale=stain_scale)
        if planting:
            Image.fromarray(labels).save(tpath.parent / f"{label}_artefacts.png")
            truth["truth"]["artefacts"] = {**art, "labels": f"{label}_artefacts.png", "bits": ARTEFACT_BITS}
        tpath.write_text(json.dumps(truth, indent=2, sort_keys=True))
        truths.append(tpath)
    return truths


# --------------------------------------------------------------------------- malformed-but-readable cases
# {case: (edit of a copy of a study written here, reason processing must give; None: must still process)}
MALFORMED = {
    "zero_mpp": (lambda f: mf.set_slide_mpp(mf.slide_file(f), "0"), "invalid_mpp"),
    "nan_mpp": (lambda f: mf.set_slide_mpp(mf.slide_file(f), "nan"), "invalid_mpp"),
    "negative_mpp": (lambda f: mf.set_slide_mpp(mf.slide_file(f), "-0.5"), "invalid_mpp"),
    "no_mpp": (lambda f: mf.set_slide_mpp(mf.slide_file(f), ""), "missing_mpp"),
}
