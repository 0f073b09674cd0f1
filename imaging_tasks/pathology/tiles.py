"""Whole-slide images: opening a slide, its calibration, tissue detection and the tile plan at a target µm/px.

``plan_tiles`` makes one low-resolution read per slide (tissue mask, area, tile list); the tiles' features are
computed by :mod:`.reader` (worker processes running :mod:`.stain` and :mod:`.tile_qc` where each tile is read)
and summarised by :mod:`.features_io`; :mod:`.slide_features` runs the lot for one slide.

Stain features use Ruifrok & Johnston colour deconvolution: optical density (Beer-Lambert) projected on
the haematoxylin, eosin and DAB absorption vectors, the standard first description of H&E and IHC tiles.

Preconditions (:func:`check_inputs` before the overview is read, the tissue check right after it; both in
``plan_tiles``, so the DAG quarantines the slide before any tile task is mapped):

* one slide file per study (``not_one_slide``) that OpenSlide opens and reads (``unreadable_slide``);
* microns per pixel recorded (``missing_mpp``), a finite number > 0 (``invalid_mpp``), the same in x and y
  within 2 % (``anisotropic_mpp``); no fallback (objective power only approximates it);
* at least one tile (``tile_px`` at ``target_mpp``) fits in the slide (``slide_too_small``);
* tissue found on the overview (``no_tissue``: a blank or glass-only scan).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from imaging_tasks.errors import BadInput

# Ruifrok & Johnston (2001) stain OD vectors (rows: haematoxylin, eosin, DAB), as in scikit-image's rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
STAINS = ("hematoxylin", "eosin", "dab")
PERCENTILES = (10, 50, 90)

# Within a tile, a pixel is tissue when its summed OD exceeds this (bright-field glass reads ~0.05-0.10).
TISSUE_OD = 0.15
# The slide-level mask threshold comes from Otsu on log summed OD, kept inside this range so an all-glass
# or all-tissue overview (one class, Otsu meaningless) still gets a sane cut.
MASK_OD_RANGE = (0.12, 0.40)
MASK_MIN_SIDE, MASK_MAX_SIDE = 1024, 4096  # mask resolution: ~2-50 µm/px whatever the slide size
MIN_REGION_MM2 = 0.005  # connected pieces smaller than this are dust or debris, not a tissue section
QC_MAX_SIDE = 1600


# --------------------------------------------------------------------------------------------- reading
def _unreadable(exc: Exception) -> BadInput:
    return BadInput("unreadable_slide", f"the slide cannot be read ({type(exc).__name__}); it is truncated, "
                    "corrupt or not a whole-slide format — re-scan or re-export it")


def open_slide(path: Path):
    """OpenSlide handle, or BadInput for anything OpenSlide cannot open and read a pixel of."""
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
        slide.read_region((0, 0), slide.level_count - 1, (1, 1))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise _unreadable(exc) from None
    return slide


def _read_rgb(slide, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 of a region; transparent (outside the scanned area) reads as glass-white, not black."""
    import openslide

    try:
        rgba = np.asarray(slide.read_region(location, level, size))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise _unreadable(exc) from None
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    if alpha.min() == 1.0:
        return np.ascontiguousarray(rgba[..., :3])
    return (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)


MAX_MPP_ANISOTROPY = 0.02


def _mpp_value(slide, key: str) -> float | None:
    text = slide.properties.get(key)
    if text is None or str(text).strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise BadInput("invalid_mpp", f"the slide records {value:g} microns per pixel ({key}); it must be a finite "
                       "number > 0; re-export it with the scanner's calibration")
    return value


def slide_mpp(slide) -> float:
    """Level-0 microns per pixel (x): recorded, finite, > 0 and square, else BadInput (see the module docstring)."""
    mpp = _mpp_value(slide, "openslide.mpp-x")
    if mpp is None:
        # OpenSlide drops a vendor value it cannot parse (e.g. Aperio "MPP = nan"): invalid, not missing.
        if str(slide.properties.get("aperio.MPP", "")).strip():
            raise BadInput("invalid_mpp", "the slide's microns per pixel (MPP) is not a number; re-export it with "
                           "the scanner's calibration")
        raise BadInput("missing_mpp", "the slide does not record its microns per pixel (MPP); "
                       "re-export it with the scanner's calibration")
    mpp_y = _mpp_value(slide, "openslide.mpp-y")
    if mpp_y is not None and abs(mpp_y - mpp) > MAX_MPP_ANISOTROPY * mpp:
        raise BadInput("anisotropic_mpp", f"the slide's pixels are not square ({mpp:g} x {mpp_y:g} um); tiles and "
                       "areas assume square pixels; re-export or resample the slide")
    return mpp


def check_inputs(slide, *, target_mpp: float, tile_px: int) -> float:
    """Preconditions of tiling one opened slide; returns its level-0 microns per pixel.

    1. Microns per pixel recorded [``missing_mpp``], a finite number > 0 [``invalid_mpp``], square within 2 %
       [``anisotropic_mpp``]: tissue area in mm2 and the tile grid at ``target_mpp`` are computed from it.
    2. Level-0 width and height hold at least one tile of ``tile_px`` pixels at ``target_mpp``
       [``slide_too_small``]: otherwise there is nothing to compute features on.
    The tissue check (``no_tissue``) needs the overview and is made in :func:`plan_tiles`.
    """
    mpp = slide_mpp(slide)
    side_l0 = tile_px * target_mpp / mpp
    w0, h0 = slide.dimensions
    if min(w0, h0) + 1e-6 < side_l0:
        raise BadInput("slide_too_small", f"the slide is {w0}x{h0} px ({w0 * mpp / 1000:.2f}x{h0 * mpp / 1000:.2f} "
                       f"mm); one {tile_px} px tile at {target_mpp:g} um/px needs {side_l0:.0f} px a side; send the "
                       "whole-slide scan, not a thumbnail or crop")
    return mpp


def _overview(slide) -> tuple[np.ndarray, float, float]:
    """The coarsest pyramid level still >= MASK_MIN_SIDE px (one read), and its level-0 px per px in x, y."""
    import openslide

    level = 0
    for i, (w, h) in enumerate(slide.level_dimensions):
        if max(w, h) >= MASK_MIN_SIDE:
            level = i  # levels go from fine to coarse
    w, h = slide.level_dimensions[level]
    if max(w, h) > MASK_MAX_SIDE:  # no suitable level (flat TIFF): let OpenSlide downscale
        try:
            rgb = np.asarray(slide.get_thumbnail((MASK_MAX_SIDE, MASK_MAX_SIDE)).convert("RGB"))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise _unreadable(exc) from None
    else:
        rgb = _read_rgb(slide, (0, 0), level, (w, h))
    w0, h0 = slide.dimensions
    return rgb, w0 / rgb.shape[1], h0 / rgb.shape[0]


# --------------------------------------------------------------------------------------------- tissue
def optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log10(np.clip(rgb.astype(np.float32), 1, 255) / 255.0)


def tissue_mask(rgb: np.ndarray, px_area_mm2: float) -> tuple[np.ndarray, float]:
    """Tissue = summed OD above an Otsu cut (glass vs stained section); specks removed, holes filled.

    Otsu runs on log OD: glass and tissue differ by a factor, and the long dark tail of nuclei and DAB
    would otherwise pull a linear cut into pale tissue.  Returns the mask and the OD threshold used.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    od = optical_density(rgb).sum(axis=2)
    log_od = np.log(np.maximum(od, 1e-3))
    cut = float(np.exp(threshold_otsu(log_od))) if np.ptp(log_od) > 0 else MASK_OD_RANGE[0]
    threshold = float(np.clip(cut, *MASK_OD_RANGE))
    mask = od > threshold
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_closing(mask, iterations=2, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, range(1, n + 1)) * px_area_mm2
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= MIN_REGION_MM2))
    return mask, threshold


def plan_tiles(slide_path: Path, out_dir: Path, *, target_mpp: float = 1.0, tile_px: int = 256,
               min_tissue_fraction: float = 0.5) -> dict:
    """Tissue area and the tiles (level-0 origin, read level, read size) worth computing features on.

    Tiles are tile_px pixels at target_mpp, on a grid from the slide origin; each is read from the finest
    pyramid level not finer than needed, at the size that covers the same field, and resized afterwards.
    Raises BadInput for a slide that fails :func:`check_inputs` or shows no tissue (``no_tissue``).
    """
    from scipy import ndimage

    if target_mpp <= 0 or tile_px < 8 or not 0 <= min_tissue_fraction <= 1:
        raise ValueError("target_mpp must be > 0, tile_px >= 8 and min_tissue_fraction within [0, 1]")
    slide = open_slide(slide_path)
    mpp = check_inputs(slide, target_mpp=target_mpp, tile_px=tile_px)
    rgb, ds_x, ds_y = _overview(slide)
    px_mm2 = (mpp * ds_x / 1000.0) * (mpp * ds_y / 1000.0)
    mask, threshold = tissue_mask(rgb, px_mm2)
    area_mm2 = float(mask.sum()) * px_mm2
    if not mask.any():
        raise BadInput("no_tissue", "no tissue was found on the slide (glass only, or a section too faint to "
                       "tell from glass); check the scan and re-scan the slide")

    side_l0 = tile_px * target_mpp / mpp  # tile field in level-0 pixels
    read_level = slide.get_best_level_for_downsample(side_l0 / tile_px)
    read_ds = float(slide.level_downsamples[read_level])
    read_size = max(1, int(round(side_l0 / read_ds)))
    w0, h0 = slide.dimensions
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    tiles = []
    for j in range(int((h0 + 1e-6) // side_l0)):
        for i in range(int((w0 + 1e-6) // side_l0)):
            x, y = int(round(i * side_l0)), int(round(j * side_l0))
            my0, my1 = int(y / ds_y), max(int(y / ds_y) + 1, int(math.ceil((y + side_l0) / ds_y)))
            mx0, mx1 = int(x / ds_x), max(int(x / ds_x) + 1, int(math.ceil((x + side_l0) / ds_x)))
            my1, mx1 = min(my1, mask.shape[0]), min(mx1, mask.shape[1])
            inside = integral[my1, mx1] - integral[my0, mx1] - integral[my1, mx0] + integral[my0, mx0]
            if inside >= min_tissue_fraction * (my1 - my0) * (mx1 - mx0):
                tiles.append([x, y, int(read_level), read_size, read_size])

    labels, n = ndimage.label(mask)
    regions = []
    if n:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        centres = ndimage.center_of_mass(mask, labels, range(1, n + 1))
        for i, (size, (cy, cx)) in enumerate(zip(sizes, centres, strict=True)):
            regions.append({"kind": "tissue_region", "index": i, "area_mm2": round(float(size) * px_mm2, 6),
                            "centroid_mm": [round((cx + 0.5) * ds_x * mpp / 1000, 4),
                                            round((cy + 0.5) * ds_y * mpp / 1000, 4)]})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray((mask * 255).astype(np.uint8)).save(out_dir / "tissue_mask.png")
    qc_sx, qc_sy = _qc_png(rgb, mask, out_dir / "qc_tissue.png")
    return {"metrics": [{"name": "tissue_area_mm2", "value": area_mm2, "unit": "mm2"},
                        {"name": "n_tiles", "value": float(len(tiles)), "unit": "count"},
                        {"name": "n_tissue_regions", "value": float(n), "unit": "count"},
                        {"name": "slide_mpp", "value": mpp, "unit": "um/px"},
                        {"name": "tissue_threshold_od", "value": threshold, "unit": "OD"}],
            "findings": regions, "tiles": tiles, "mpp": mpp, "target_mpp": target_mpp, "tile_px": tile_px,
            "mask_um_per_px": [ds_x * mpp, ds_y * mpp], "tile_side_level0_px": side_l0,
            "qc_downsample": [ds_x / qc_sx, ds_y / qc_sy], "outputs": ["tissue_mask.png", "qc_tissue.png"]}


def _qc_png(rgb: np.ndarray, mask: np.ndarray, path: Path) -> tuple[float, float]:
    """Overview with the tissue outline in green (the tile step draws its kept and rejected tiles over it);
    returns the picture's scale (x, y) relative to the overview."""
    from PIL import Image
    from scipy import ndimage

    scale = min(1.0, QC_MAX_SIDE / max(rgb.shape[:2]))
    img = rgb.copy()
    edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, int(round(2 / scale))))
    img[edge] = (0, 200, 0)
    pil = Image.fromarray(img)
    if scale < 1:
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.BOX)
    pil.save(path)
    return pil.width / rgb.shape[1], pil.height / rgb.shape[0]
