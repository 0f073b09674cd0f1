"""Per-tile quality control: out of focus, pen marks, folds; flags with documented thresholds, and a picture.

Computed where the tile is read (pathology.reader), from the same optical density planes as the stain
statistics (pathology.stain), so QC adds ~0.3 ms to a 256² tile.

Columns (per tile, at the target µm/px):

``focus_laplacian_var``
    Variance of the 4-neighbour Laplacian of the grey image (ITU-R 601 luma, PIL ``convert("L")``, grey
    levels 0-255), over the tile's tissue pixels (summed OD > ``TISSUE_OD``, ink left out; the one-pixel
    border too).  Tissue only, because glass (and ink on it) is flat whatever the focus: a half-glass tile
    would otherwise read as half as sharp.  NaN when under ``FOCUS_MIN_TISSUE`` of the tile is such tissue
    (nothing to judge; not flagged).
``pen_fraction``
    Share of the tile's pixels whose colour no haematoxylin / eosin / DAB mixture produces (rule below).
``fold_fraction``
    Share of the tile's area in ``FOLD_BLOCK_UM`` blocks whose mean summed OD (ink pixels left out) exceeds
    ``FOLD_OD_RATIO`` times the slide's reference OD (the median summed OD of its tissue on the overview,
    :func:`slide_reference_od`): a fold is the section lying on itself, so its OD is about twice the
    section's own.  Relative to the slide because staining intensity varies by ~±25 % between slides and a
    fixed OD cut either misses pale folds or flags dark staining; blocks because single nuclei are as dark
    as a fold, while a fold is dark over tens of µm.

Pen rule, in optical density (OD ratios do not change with ink or stain density, unlike RGB hue):

* blue, cyan and green inks absorb red more than green: ``od_red >= PEN_RED_OVER_GREEN * od_green``.  No
  stain does: Ruifrok's haematoxylin has 0.93, eosin 0.07, DAB 0.47; the bluest real counterstain to hand
  (the scikit-image IHC section's haematoxylin) stays under 1.13 for 99.9 % of its pixels (max 1.28, in
  its palest pixels), while blue / cyan / green marker inks give 1.3-3 (HSV: hue ~90-225°, saturation
  >= 0.45).  Or the colour needs a negative DAB amount below ``PEN_NEGATIVE_DAB_OD`` (absorbs red, not
  blue): blue ink over eosin-rich tissue, whose green absorption hides the red/green test;
* black ink is dark and neutral: summed OD >= ``PEN_BLACK_OD`` (RGB below ~80) with ``od_red >= 0.85 od_green``
  and ``od_blue >= 0.75 od_green`` (HSV: value < ~0.3, saturation < ~0.25).  Every stain mixture that
  dark has one channel well below green (haematoxylin: blue 0.41 x green; haematoxylin + DAB with blue >=
  0.75 x green has red <= 0.75 x green; eosin is green alone);
* and the pixel is not faint (summed OD >= ``PEN_MIN_OD``), where noise dominates the ratios.

Not detected (documented limits): violet-blue inks (hue ~240°, the hue of haematoxylin) and red ink (an
eosin / DAB colour); ink laid over dense tissue is counted only where it dominates the pixel's colour
(over glass, lumens, pale stroma); black carbon pigment (anthracosis) reads as black ink.

Flags: ``out_of_focus`` = focus_laplacian_var < ``FOCUS_MIN_LAPLACIAN_VAR``; ``pen_mark`` = pen_fraction >=
``PEN_MIN_FRACTION``; ``fold`` = fold_fraction >= ``FOLD_MIN_FRACTION``; ``qc_pass`` = none of them.
"""
from __future__ import annotations

import math

import numpy as np

from imaging_tasks.pathology.stain import _HED_T, OD_LUT

# Focus.  Sharp tissue in the synthetic slides (real IHC texture, 0.25-1 µm/px, sensor noise SD 1-4 grey
# levels, JPEG q80) gives >= ~90; a 1.5-3 µm defocus blur leaves only the sensor noise that JPEG kept,
# <= ~20 even at noise SD 4.  40 sits between, and is the order of the thresholds used on real bright-field
# tiles (~50-150 at 20x, lower at 40x where the optics oversample): a site whose sharp tissue falls under 40
# should lower it rather than lose its tiles.
FOCUS_MIN_LAPLACIAN_VAR = 40.0
FOCUS_MIN_TISSUE = 0.05
# Pen (see the module docstring).
PEN_MIN_OD = 0.3
PEN_RED_OVER_GREEN = 1.2
PEN_NEGATIVE_DAB_OD = -0.15
PEN_BLACK_OD = 1.5
PEN_BLACK_RED, PEN_BLACK_BLUE = 0.85, 0.75
# A tile is flagged from 2 % ink: clean tissue (H&E and IHC, all noise levels tested) stays under 0.3 %, and a
# stroke crossing a tile covers far more; a speck of ink at the very edge does not cost the tile.
PEN_MIN_FRACTION = 0.02
# Fold.  Doubled tissue has ~1.9x the section's median OD on average, but its 32 µm blocks spread from ~1.2x
# to 3x (pale stroma folded on pale stroma stays pale), and normal tissue's blocks pass 1.5x the median only
# in the densest nests (DAB-rich IHC).  1.5x on a quarter of the tile flagged, in the synthetic slides (H&E
# and IHC, staining x0.85-1.25, noise SD 1-4, tiles of 64 and 128 µm), >= 90 % of tiles three-quarters
# folded and ~85-88 % of tiles half folded, with ~4 % false flags on clean 64 µm tiles and < 1 % on 128 µm
# ones.  OD alone cannot do much better: a fold of pale tissue is as dark as dense unfolded tissue.
FOLD_BLOCK_UM = 32.0
FOLD_OD_RATIO = 1.5
FOLD_MIN_FRACTION = 0.25
DEFAULT_REFERENCE_OD = 0.9  # summed OD of typical single-thickness H&E / IHC tissue, when no slide reference

QC_COLUMNS = ("focus_laplacian_var", "pen_fraction", "fold_fraction")
FLAG_COLUMNS = ("out_of_focus", "pen_mark", "fold", "qc_pass")
# Picture colours (RGB): kept tiles blue as before, each rejection reason its own colour (none green: that is
# the tissue outline drawn under the tiles in qc_tissue.png).
FLAG_COLOURS = {"qc_pass": (30, 60, 220), "out_of_focus": (255, 160, 0), "pen_mark": (230, 30, 30),
                "fold": (220, 0, 200)}
FLAG_LABELS = {"qc_pass": "kept", "out_of_focus": "out of focus", "pen_mark": "pen mark", "fold": "fold"}


def pen_mask(od: np.ndarray, od_sum: np.ndarray) -> np.ndarray:
    """Ink pixels of OD planes (3, ...) and their sum (...), by the rule in the module docstring."""
    red, green, blue = od[0], od[1], od[2]
    dab = np.dot(_HED_T[2], od.reshape(3, -1)).reshape(od.shape[1:])
    coloured = (red >= np.float32(PEN_RED_OVER_GREEN) * green) | (dab <= np.float32(PEN_NEGATIVE_DAB_OD))
    coloured &= od_sum >= np.float32(PEN_MIN_OD)
    black = od_sum >= np.float32(PEN_BLACK_OD)
    black &= red >= np.float32(PEN_BLACK_RED) * green
    black &= blue >= np.float32(PEN_BLACK_BLUE) * green
    return coloured | black


def slide_reference_od(overview_rgb: np.ndarray, tissue_mask: np.ndarray) -> float:
    """The slide's own single-layer OD: median summed OD of its tissue pixels on the overview, ink left out."""
    step = max(1, int(math.sqrt(tissue_mask.size / 250_000)))  # a median needs no more than ~250k pixels
    od = np.moveaxis(OD_LUT[overview_rgb[::step, ::step, :3]], -1, 0)
    od_sum = od.sum(axis=0)
    keep = tissue_mask[::step, ::step] & ~pen_mask(od, od_sum)
    return float(np.median(od_sum[keep])) if keep.any() else DEFAULT_REFERENCE_OD


def _laplacian_var(grey: np.ndarray, tissue: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior tissue pixels (NaN below FOCUS_MIN_TISSUE)."""
    inner = tissue[1:-1, 1:-1]
    n = int(np.count_nonzero(inner))
    if n < FOCUS_MIN_TISSUE * inner.size or n < 2:
        return math.nan
    g = grey
    lap = g[1:-1, :-2] + g[1:-1, 2:]
    lap += g[:-2, 1:-1]
    lap += g[2:, 1:-1]
    lap -= np.float32(4) * g[1:-1, 1:-1]
    flat, w = lap.reshape(-1), inner.reshape(-1).astype(np.float32)
    mean = float(np.dot(flat, w)) / n
    lap *= lap
    return max(0.0, float(np.dot(flat, w)) / n - mean * mean)


def _block_sums(x: np.ndarray, bs: int) -> np.ndarray:
    nb_y, nb_x = x.shape[0] // bs, x.shape[1] // bs
    return x[:nb_y * bs, :nb_x * bs].reshape(nb_y * bs, nb_x, bs).sum(axis=2).reshape(nb_y, bs, nb_x).sum(axis=1)


def _fold_fraction(od_sum: np.ndarray, ink: np.ndarray | None, um_per_px: float, reference_od: float) -> float:
    h, w = od_sum.shape
    bs = max(2, min(int(round(FOLD_BLOCK_UM / um_per_px)), min(h, w) // 2))
    if ink is None:
        sums = _block_sums(od_sum, bs)
        fold = sums > np.float32(FOLD_OD_RATIO * reference_od * bs * bs)
    else:
        clear = ~ink
        sums = _block_sums(np.where(clear, od_sum, np.float32(0)), bs)
        counts = _block_sums(clear.astype(np.float32), bs)
        fold = (counts >= 0.5 * bs * bs) & (sums > np.float32(FOLD_OD_RATIO * reference_od) * counts)
    return float(np.count_nonzero(fold)) * bs * bs / (h * w)


def qc_vector(od: np.ndarray, od_sum: np.ndarray, tissue: np.ndarray, grey: np.ndarray, um_per_px: float,
              reference_od: float) -> tuple[float, float, float]:
    """(focus_laplacian_var, pen_fraction, fold_fraction) of one tile from ``stain.tile_od``'s outputs and its
    grey image (H, W) float32."""
    ink = pen_mask(od, od_sum)
    n_ink = int(np.count_nonzero(ink))
    return (_laplacian_var(grey, tissue & ~ink if n_ink else tissue), n_ink / od_sum.size,
            _fold_fraction(od_sum, ink if n_ink else None, um_per_px, reference_od))


def grey_of(rgb) -> np.ndarray:
    """ITU-R 601 luma (PIL ``convert("L")``) as float32, of an (H, W, 3|4) uint8 array or a PIL image."""
    from PIL import Image

    img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    return np.asarray(img.convert("L"), dtype=np.float32)


def qc_flags(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Boolean flags from the three QC columns (NaN focus, i.e. too little tissue to judge, is not flagged)."""
    focus = np.asarray(columns["focus_laplacian_var"], float)
    with np.errstate(invalid="ignore"):
        out_of_focus = focus < FOCUS_MIN_LAPLACIAN_VAR
    pen = np.asarray(columns["pen_fraction"]) >= PEN_MIN_FRACTION
    fold = np.asarray(columns["fold_fraction"]) >= FOLD_MIN_FRACTION
    return {"out_of_focus": out_of_focus, "pen_mark": pen, "fold": fold, "qc_pass": ~(out_of_focus | pen | fold)}


def tile_qc_np(batch_rgb: np.ndarray, um_per_px: float, reference_od: float = DEFAULT_REFERENCE_OD
               ) -> dict[str, np.ndarray]:
    """QC columns and flags of (B, H, W, 3) uint8 tiles at ``um_per_px`` (see the module docstring)."""
    from imaging_tasks.pathology.stain import tile_od

    batch = np.asarray(batch_rgb)
    values = np.empty((len(batch), 3))
    for i, rgb in enumerate(batch):
        od, od_sum, tissue = tile_od(rgb)
        values[i] = qc_vector(od, od_sum, tissue, grey_of(rgb), um_per_px, reference_od)
    columns = dict(zip(QC_COLUMNS, values.T, strict=True))
    return {**columns, **qc_flags(columns)}


def draw_tile_qc(overview_rgb: np.ndarray, ds_x: float, ds_y: float, side_l0: float, xy: np.ndarray,
                 flags: dict[str, np.ndarray], *, max_side: int = 1600):
    """The overview with every tile outlined: kept tiles blue, rejected ones in the colour of their first
    reason (out of focus, pen mark, fold: :data:`FLAG_COLOURS`), and a legend with the counts.

    ``xy`` (N, 2) level-0 px tile origins; ``ds_x``, ``ds_y`` level-0 px per overview px; ``flags`` as
    :func:`qc_flags` returns (``qc_pass`` is derived when missing).  Returns a PIL image.
    """
    from PIL import Image, ImageDraw, ImageFont

    xy = np.asarray(xy, float).reshape(-1, 2)
    reasons = [k for k in ("out_of_focus", "pen_mark", "fold") if k in flags]
    bad = np.zeros(len(xy), bool)
    for k in reasons:
        bad |= np.asarray(flags[k], bool)
    scale = min(1.0, max_side / max(overview_rgb.shape[:2]))
    pil = Image.fromarray(np.ascontiguousarray(overview_rgb[..., :3]))
    if scale < 1:
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.BOX)
    draw = ImageDraw.Draw(pil)
    sx, sy = scale / ds_x, scale / ds_y
    width = max(1, round(min(side_l0 * sx, side_l0 * sy) / 12))
    order = np.argsort(bad, kind="stable")  # rejected tiles drawn last, on top
    counts = {"qc_pass": int((~bad).sum()), **{k: int(np.asarray(flags[k], bool).sum()) for k in reasons}}
    for i in order:
        reason = next((k for k in reasons if flags[k][i]), "qc_pass")
        x, y = xy[i]
        draw.rectangle([x * sx, y * sy, (x + side_l0) * sx - 1, (y + side_l0) * sy - 1],
                       outline=FLAG_COLOURS[reason], width=width if reason != "qc_pass" else 1)
    font = ImageFont.load_default(size=max(10, pil.height // 40))
    items = ["qc_pass", *reasons]
    line = font.size + 4
    box_w = max(int(draw.textlength(f"{FLAG_LABELS[k]} ({counts[k]})", font=font)) for k in items) + line + 12
    draw.rectangle([4, 4, 4 + box_w, 8 + line * len(items)], fill=(255, 255, 255), outline=(0, 0, 0))
    for j, k in enumerate(items):
        y0 = 6 + j * line
        draw.rectangle([8, y0 + 2, 8 + line - 6, y0 + line - 4], fill=FLAG_COLOURS[k])
        draw.text((12 + line, y0), f"{FLAG_LABELS[k]} ({counts[k]})", fill=(0, 0, 0), font=font)
    return pil
