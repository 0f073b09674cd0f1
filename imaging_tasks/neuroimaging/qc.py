"""QC pictures of a neuro session: three orthogonal slices through the brain with contours, labels or a heat map.

One function for every picture the chain writes (brain mask over T1, PET over T1, atlas over T1, SUVR map), so
they all look alike: axial, coronal and sagittal views through the brain's centre of mass, resampled to square
millimetres, head up.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

MM_PER_PIXEL = 0.75


def _views(shape, centre, spacing_zyx):
    dz, dy, dx = spacing_zyx
    c = centre
    return [  # (slice selector, pixel height mm, pixel width mm); flipped so the head is up in coronal/sagittal
        (lambda a: a[c[0]], dy, dx),
        (lambda a: a[:, c[1], :][::-1], dz, dx),
        (lambda a: a[:, :, c[2]][::-1], dz, dy),
    ]


def _heat_rgb(values: np.ndarray, vmax: float) -> np.ndarray:
    """A black-body-like colour map (black, red, yellow, white) without matplotlib."""
    t = np.clip(values / max(vmax, 1e-9), 0, 1)
    return np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], -1) * 255


def _label_rgb(labels: np.ndarray) -> np.ndarray:
    """A stable pseudo-random colour per label (0 stays black)."""
    rng = np.random.default_rng(7)
    palette = rng.integers(60, 256, size=(int(labels.max()) + 1, 3))
    palette[0] = 0
    return palette[labels]


def overlay_png(image_zyx: np.ndarray, spacing_zyx, path: Path, *, centre_mask: np.ndarray | None = None,
                contours: tuple = (), heat: np.ndarray | None = None, heat_max: float | None = None,
                labels: np.ndarray | None = None, alpha: float = 0.5) -> Path:
    """Write ``path``: the grey image with mask ``contours`` ``[(mask, (r, g, b)), ...]`` drawn on it, and
    optionally a ``heat`` map (PET, SUVR) or a ``labels`` image blended over it at ``alpha``."""

    mask = centre_mask if centre_mask is not None and centre_mask.any() else None
    centre = [round(float(v)) for v in ndi.center_of_mass(mask)] if mask is not None else \
        [n // 2 for n in image_zyx.shape]
    inside = image_zyx[mask] if mask is not None else image_zyx
    hi = float(np.percentile(inside, 99.5)) or 1.0
    if heat is not None and heat_max is None:
        heat_max = float(np.percentile(heat[mask] if mask is not None else heat, 99.5)) or 1.0
    tiles = []
    for sel, ph, pw in _views(image_zyx.shape, centre, spacing_zyx):
        grey = np.clip(sel(image_zyx) / hi * 255, 0, 255)
        rgb = np.stack([grey] * 3, axis=-1)
        if heat is not None:
            h = sel(heat)
            shown = (h > 0.05 * heat_max)[..., None]
            rgb = np.where(shown, (1 - alpha) * rgb + alpha * _heat_rgb(h, heat_max), rgb)
        if labels is not None:
            lab = sel(labels).astype(np.int64)
            rgb = np.where((lab > 0)[..., None], (1 - alpha) * rgb + alpha * _label_rgb(lab), rgb)
        rgb = rgb.astype(np.uint8)
        for m, colour in contours:
            s = sel(m).astype(bool)
            rgb[s & ~ndi.binary_erosion(s)] = colour
        tiles.append((rgb, ph, pw))
    return _save_row(tiles, path)


def _save_row(tiles: list, path: Path, background=(0, 0, 0)) -> Path:
    """Write the views ``[(rgb uint8, pixel height mm, pixel width mm), ...]`` side by side, each resampled to
    square pixels of MM_PER_PIXEL, 8 pixels apart."""
    from PIL import Image

    images = [Image.fromarray(rgb).resize((max(1, int(rgb.shape[1] * pw / MM_PER_PIXEL)),
                                           max(1, int(rgb.shape[0] * ph / MM_PER_PIXEL))), Image.NEAREST)
              for rgb, ph, pw in tiles]
    canvas = Image.new("RGB", (sum(t.width for t in images) + 8 * (len(images) - 1), max(t.height for t in images)),
                       background)
    x = 0
    for t in images:
        canvas.paste(t, (x, 0))
        x += t.width + 8
    path = Path(path)
    canvas.save(path, optimize=True)
    return path


def design_matrix_png(X: np.ndarray, names: list[str], path: Path, *, cell_px: int = 18) -> Path:
    """The design matrix as it is usually shown: one grey column per regressor (each scaled to its own range),
    time running down, the regressor names written vertically above (PIL only: no plotting library)."""
    from PIL import Image, ImageDraw

    X = np.asarray(X, dtype=float)
    lo, hi = X.min(axis=0), X.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = np.where(hi > lo, (X - lo) / span, 0.5)
    body = Image.fromarray((scaled * 255).astype(np.uint8)).resize((X.shape[1] * cell_px, max(X.shape[0] * 2, 200)),
                                                                    Image.NEAREST)
    label_h = 8 + 6 * max((len(n) for n in names), default=1)
    canvas = Image.new("L", (body.width, body.height + label_h), 255)
    canvas.paste(body, (0, label_h))
    for k, name in enumerate(names):
        text = Image.new("L", (label_h, cell_px), 255)
        ImageDraw.Draw(text).text((2, 2), name, fill=0)
        canvas.paste(text.rotate(90, expand=True), (k * cell_px, 0))
    path = Path(path)
    canvas.save(path, optimize=True)
    return path


def glass_brain_png(stat_zyx: np.ndarray, brain_zyx: np.ndarray, spacing_zyx, path: Path, *,
                    threshold: float = 3.1, vmax: float | None = None) -> Path:
    """A glass brain of a statistic map: its maximum (red-yellow) and minimum (blue) projected along each axis over
    the brain's silhouette, so every cluster above ``threshold`` shows whatever slice it sits in."""
    stat = np.nan_to_num(np.asarray(stat_zyx, dtype=float))
    brain = np.asarray(brain_zyx, dtype=bool)
    vmax = vmax or max(float(np.abs(stat).max()), threshold + 1.0)
    tiles = []
    for axis, flip, ph, pw in ((0, False, spacing_zyx[1], spacing_zyx[2]), (1, True, spacing_zyx[0], spacing_zyx[2]),
                               (2, True, spacing_zyx[0], spacing_zyx[1])):
        hi, lo = stat.max(axis=axis), stat.min(axis=axis)
        silhouette = brain.any(axis=axis)
        if flip:  # head up, as overlay_png shows coronal and sagittal views
            hi, lo, silhouette = hi[::-1], lo[::-1], silhouette[::-1]
        edge = silhouette & ~ndi.binary_erosion(silhouette)
        rgb = np.where(silhouette[..., None], 235.0, 255.0) * np.ones(3)
        rgb[edge] = (90, 90, 90)
        pos, neg = hi >= threshold, lo <= -threshold
        rgb = np.where(pos[..., None], _heat_rgb(0.35 * vmax + 0.65 * hi, vmax), rgb)
        t = np.clip(-lo / vmax, 0, 1)[..., None]
        rgb = np.where(neg[..., None] & ~pos[..., None], np.concatenate([40 * (1 - t), 120 * (1 - t) + 60 * t,
                                                                        180 + 75 * t], -1), rgb)
        tiles.append((rgb.astype(np.uint8), ph, pw))
    return _save_row(tiles, path, background=(255, 255, 255))
