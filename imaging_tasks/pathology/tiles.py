"""Whole-slide images: tissue detection, tiling at a target µm/px, per-tile stain features on torch.

Three steps so the DAG can fan the expensive one out: ``plan_tiles`` (one low-resolution read per slide:
tissue mask, area, tile list), ``tile_features`` (any slice of the tile list, batched on the GPU when
present) and ``summarize`` (order-independent, from the plan and all rows).  ``process_study`` runs them in
process for the CLI and tests.

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

import json
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
DAB_POSITIVE_OD = 0.15  # tile mean DAB OD above which a tile counts as DAB-positive
QC_MAX_SIDE = 1600
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide"}


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
    _qc_png(rgb, mask, tiles, side_l0, ds_x, ds_y, out_dir / "qc_tissue.png")
    return {"metrics": [{"name": "tissue_area_mm2", "value": area_mm2, "unit": "mm2"},
                        {"name": "n_tiles", "value": float(len(tiles)), "unit": "count"},
                        {"name": "n_tissue_regions", "value": float(n), "unit": "count"},
                        {"name": "slide_mpp", "value": mpp, "unit": "um/px"},
                        {"name": "tissue_threshold_od", "value": threshold, "unit": "OD"}],
            "findings": regions, "tiles": tiles, "mpp": mpp, "target_mpp": target_mpp, "tile_px": tile_px,
            "mask_um_per_px": [ds_x * mpp, ds_y * mpp], "outputs": ["tissue_mask.png", "qc_tissue.png"]}


def _qc_png(rgb: np.ndarray, mask: np.ndarray, tiles: list, side_l0: float, ds_x: float, ds_y: float,
            path: Path) -> None:
    """Overview with the tissue outline in green and the kept tiles in blue, for a reviewer's glance."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    scale = min(1.0, QC_MAX_SIDE / max(rgb.shape[:2]))
    img = rgb.copy()
    edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, int(round(2 / scale))))
    img[edge] = (0, 200, 0)
    pil = Image.fromarray(img)
    if scale < 1:
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.BOX)
    draw = ImageDraw.Draw(pil)
    sx, sy = scale / ds_x, scale / ds_y
    for x, y, *_ in tiles:
        draw.rectangle([x * sx, y * sy, (x + side_l0) * sx - 1, (y + side_l0) * sy - 1], outline=(30, 60, 220))
    pil.save(path)


# --------------------------------------------------------------------------------------------- features
def stain_features(batch_rgb, device, um_per_px: float = 1.0) -> dict[str, np.ndarray]:
    """Per-tile stain statistics on ``device``; input (B, H, W, 3) uint8 RGB (numpy or torch).

    Returns numpy arrays: ``tissue_fraction``, ``mean_od`` and ``h_gradient_od_per_um`` (B,), and
    ``mean``, ``std``, ``p10``, ``p50``, ``p90`` (B, 3) over tissue pixels, columns H, E, DAB.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(batch_rgb) if not torch.is_tensor(batch_rgb) else batch_rgb, device=device)
    od = -torch.log10(x.float().clamp(min=1.0) / 255.0)  # (B, H, W, 3)
    hed = (od @ torch.as_tensor(HED_FROM_RGB, dtype=od.dtype, device=od.device)).clamp(min=0.0)
    od_sum = od.sum(dim=-1)
    tissue = od_sum > TISSUE_OD  # (B, H, W)
    w = tissue.float()
    count = w.sum(dim=(1, 2)).clamp(min=1.0)  # (B,)
    mean = (hed * w[..., None]).sum(dim=(1, 2)) / count[:, None]
    var = (((hed - mean[:, None, None, :]) ** 2) * w[..., None]).sum(dim=(1, 2)) / count[:, None]
    flat = hed.reshape(hed.shape[0], -1, 3).masked_fill(~tissue.reshape(hed.shape[0], -1, 1), float("nan"))
    q = torch.nanquantile(flat, torch.tensor([p / 100 for p in PERCENTILES], device=od.device), dim=1)
    q = torch.nan_to_num(q, nan=0.0)  # tiles without tissue pixels
    # Texture: haematoxylin edge strength (Sobel), i.e. how sharply nuclei stand out, per µm.
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=od.device) / 8.0
    h = F.pad(hed[..., 0][:, None], (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(h, sobel[None, None]), F.conv2d(h, sobel.t()[None, None])
    grad = torch.sqrt(gx ** 2 + gy ** 2)[:, 0] / um_per_px
    return {"tissue_fraction": w.mean(dim=(1, 2)).cpu().numpy(),
            "mean_od": ((od_sum * w).sum(dim=(1, 2)) / count).cpu().numpy(),
            "h_gradient_od_per_um": ((grad * w).sum(dim=(1, 2)) / count).cpu().numpy(),
            "mean": mean.cpu().numpy(), "std": var.sqrt().cpu().numpy(),
            **{f"p{p}": q[i].cpu().numpy() for i, p in enumerate(PERCENTILES)}}


def _read_batch(slide, tiles: list, tile_px: int, device):
    """Tiles read at their planned level and size, resized (antialiased) to tile_px on the device."""
    import torch
    import torch.nn.functional as F

    sizes = {(int(t[3]), int(t[4])) for t in tiles}
    if len(sizes) != 1:
        raise ValueError("a batch mixes read sizes; plan_tiles gives one size per slide")
    arr = np.stack([_read_rgb(slide, (int(x), int(y)), int(level), (int(w), int(h)))
                    for x, y, level, w, h in tiles])
    batch = torch.from_numpy(arr).to(device)
    if arr.shape[1:3] == (tile_px, tile_px):
        return batch
    chw = batch.permute(0, 3, 1, 2).float()
    chw = F.interpolate(chw, size=(tile_px, tile_px), mode="bilinear", antialias=True, align_corners=False)
    return chw.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def tile_features(slide_path: Path, tiles: list, *, target_mpp: float = 1.0, tile_px: int = 256,
                  device=None, batch_size: int = 64, progress=None) -> list[dict]:
    """One row per tile (same order): level-0 position in px and mm, and its stain statistics.

    ``progress(n)`` is called after every batch of ``n`` tiles (progress lines in long task logs).
    """
    from imaging_tasks.device import pick_device

    dev = pick_device(str(device) if device is not None else None)
    slide = open_slide(slide_path)
    mpp = slide_mpp(slide)
    rows = []
    for start in range(0, len(tiles), max(1, int(batch_size))):
        chunk = tiles[start:start + batch_size]
        f = stain_features(_read_batch(slide, chunk, tile_px, dev), dev, um_per_px=target_mpp)
        for i, (x, y, level, *_rest) in enumerate(chunk):
            row = {"x": int(x), "y": int(y), "level": int(level),
                   "x_mm": round(x * mpp / 1000, 4), "y_mm": round(y * mpp / 1000, 4),
                   "tissue_fraction": float(f["tissue_fraction"][i]), "mean_od": float(f["mean_od"][i]),
                   "h_gradient_od_per_um": float(f["h_gradient_od_per_um"][i])}
            for j, stain in enumerate(STAINS):
                row[f"{stain}_od_mean"] = float(f["mean"][i, j])
                row[f"{stain}_od_std"] = float(f["std"][i, j])
                for p in PERCENTILES:
                    row[f"{stain}_od_p{p}"] = float(f[f"p{p}"][i, j])
            rows.append(row)
        if progress is not None:
            progress(len(chunk))
    return rows


# --------------------------------------------------------------------------------------------- summary
def summarize(plan: dict, rows: list[dict], *, hotspots: int = 3) -> dict:
    """Slide-level metrics and findings from the plan and all tile rows (any order, any batching)."""
    metrics = list(plan["metrics"])
    findings = list(plan.get("findings", []))
    metrics.append({"name": "n_tiles_computed", "value": float(len(rows)), "unit": "count"})
    if rows:
        rows = sorted(rows, key=lambda r: (r["y"], r["x"]))
        weight = np.array([r["tissue_fraction"] for r in rows])
        weight = weight if weight.sum() > 0 else np.ones(len(rows))
        means = {}
        for stain in STAINS:
            means[stain] = float(np.average([r[f"{stain}_od_mean"] for r in rows], weights=weight))
            metrics.append({"name": f"{stain}_od_mean", "value": means[stain], "unit": "OD"})
        metrics += [
            {"name": "hematoxylin_eosin_ratio", "value": means["hematoxylin"] / max(means["eosin"], 1e-6),
             "unit": "ratio"},
            {"name": "dab_positive_tile_fraction", "unit": "fraction",
             "value": float(np.mean([r["dab_od_mean"] > DAB_POSITIVE_OD for r in rows]))},
            {"name": "h_gradient_od_per_um", "unit": "OD/um",
             "value": float(np.average([r["h_gradient_od_per_um"] for r in rows], weights=weight))},
            {"name": "tile_tissue_fraction_mean", "value": float(np.mean(weight)), "unit": "fraction"},
        ]
        # The most haematoxylin-dense tiles: where nuclei crowd (tumour, inflammation), for review first.
        top = sorted(rows, key=lambda r: -r["hematoxylin_od_mean"])[:hotspots]
        for i, r in enumerate(top):
            findings.append({"kind": "hematoxylin_hotspot", "index": i, "x_mm": r["x_mm"], "y_mm": r["y_mm"],
                             "hematoxylin_od_mean": r["hematoxylin_od_mean"],
                             "tissue_fraction": r["tissue_fraction"]})
    return {"metrics": metrics, "findings": findings}


def process_study(files: list[Path], out_dir: Path, *, device=None, target_mpp: float = 1.0, tile_px: int = 256,
                  min_tissue_fraction: float = 0.5, batch_size: int = 64, **_options) -> dict:
    """All three steps in process for one slide (the DAG fans tile_features out over tile batches)."""
    from imaging_tasks.device import pick_device

    files = [Path(f) for f in files]
    slides = [f for f in files if f.suffix.lower() in SLIDE_SUFFIXES] or files
    if len(slides) != 1:
        raise BadInput("not_one_slide", f"a pathology study is one slide file, got {len(slides)}; "
                       "send each slide as its own study")
    dev = pick_device(str(device) if device is not None else None)
    out_dir = Path(out_dir)
    plan = plan_tiles(slides[0], out_dir, target_mpp=target_mpp, tile_px=tile_px,
                      min_tissue_fraction=min_tissue_fraction)
    rows = tile_features(slides[0], plan["tiles"], target_mpp=target_mpp, tile_px=tile_px, device=dev,
                         batch_size=batch_size)
    (out_dir / "tile_features.json").write_text(json.dumps(rows))
    result = summarize(plan, rows)
    return {**result, "outputs": plan["outputs"] + ["tile_features.json"], "device": str(dev)}
