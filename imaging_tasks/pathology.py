"""Whole-slide images: tissue detection, tiling at a target µm/px, per-tile stain features on torch.

The DAG fans ``tile_features`` out over tile batches; ``process_study`` runs the three steps in process
for the CLI.  Features use Ruifrok & Johnston colour deconvolution (haematoxylin, eosin, DAB), the
standard first description of H&E / IHC tiles.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from imaging_tasks.errors import BadInput

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image's rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
TISSUE_OD = 0.15  # summed optical density above which a pixel is tissue, not glass
MASK_DOWNSAMPLE = 4  # tissue mask resolution: fine enough for area within a few percent


def open_slide(path: Path):
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
        slide.read_region((0, 0), slide.level_count - 1, (1, 1))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise BadInput("unreadable_slide", f"the slide cannot be opened ({type(exc).__name__}); it is truncated, "
                       "corrupt or not a whole-slide format — re-scan or re-export it") from None
    return slide


def slide_mpp(slide) -> float:
    mpp = slide.properties.get("openslide.mpp-x")
    if not mpp:
        raise BadInput("missing_mpp", "the slide does not record its microns per pixel (MPP); "
                       "re-export it with the scanner's calibration")
    return float(mpp)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue = summed optical density above glass; small specks removed, holes filled."""
    from scipy import ndimage

    od = -np.log10(np.clip(rgb.astype(np.float32), 1, 255) / 255.0)
    mask = od.sum(axis=2) > TISSUE_OD
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= 64))
    return mask


def _read_level_image(slide, downsample: float) -> tuple[np.ndarray, float]:
    level = slide.get_best_level_for_downsample(downsample)
    w, h = slide.level_dimensions[level]
    rgb = np.asarray(slide.read_region((0, 0), level, (w, h)).convert("RGB"))
    return rgb, float(slide.level_downsamples[level])


def plan_tiles(slide_path: Path, out_dir: Path, *, target_mpp: float = 1.0, tile_px: int = 256,
               min_tissue_fraction: float = 0.5) -> dict:
    """Tissue area and the list of tiles (level-0 origin, read level and read size) worth computing on."""
    from PIL import Image
    from scipy import ndimage

    slide = open_slide(slide_path)
    mpp = slide_mpp(slide)
    rgb, ds = _read_level_image(slide, MASK_DOWNSAMPLE)
    mask = tissue_mask(rgb)
    px_mm = mpp * ds / 1000.0
    area_mm2 = float(mask.sum()) * px_mm * px_mm
    # tiles: tile_px pixels at target_mpp = this many level-0 pixels
    tile_l0 = tile_px * target_mpp / mpp
    read_level = slide.get_best_level_for_downsample(target_mpp / mpp)
    read_ds = float(slide.level_downsamples[read_level])
    read_size = max(1, round(tile_l0 / read_ds))
    w0, h0 = slide.dimensions
    tiles = []
    for y in np.arange(0, h0 - tile_l0 + 1e-6, tile_l0):
        for x in np.arange(0, w0 - tile_l0 + 1e-6, tile_l0):
            m = mask[int(y / ds):int(math.ceil((y + tile_l0) / ds)), int(x / ds):int(math.ceil((x + tile_l0) / ds))]
            if m.size and m.mean() >= min_tissue_fraction:
                tiles.append([int(round(x)), int(round(y)), read_level, read_size, read_size])
    labels, n = ndimage.label(mask)
    regions = []
    for i, (sl, size) in enumerate(zip(ndimage.find_objects(labels), ndimage.sum(mask, labels, range(1, n + 1)))):
        cy, cx = ndimage.center_of_mass(labels[sl] == i + 1)
        regions.append({"kind": "tissue_region", "index": i, "area_mm2": float(size) * px_mm * px_mm,
                        "centroid_mm": [round((sl[1].start + cx) * px_mm, 4), round((sl[0].start + cy) * px_mm, 4)]})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask * 255).astype(np.uint8)).save(out_dir / "tissue_mask.png", optimize=False)
    _qc_png(rgb, mask, tiles, ds, out_dir / "qc_tissue.png")
    return {"metrics": [{"name": "tissue_area_mm2", "value": area_mm2, "unit": "mm2"},
                        {"name": "n_tiles", "value": float(len(tiles)), "unit": ""},
                        {"name": "slide_mpp", "value": mpp, "unit": "um/px"}],
            "findings": regions, "tiles": tiles, "mpp": mpp, "outputs": ["tissue_mask.png", "qc_tissue.png"]}


def _qc_png(rgb: np.ndarray, mask: np.ndarray, tiles: list, ds: float, path: Path) -> None:
    """Thumbnail with the tissue outline in green and the tile grid in blue."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    img = rgb.copy()
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
    img[edge] = (0, 200, 0)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for x, y, _level, w, _h in tiles:
        size = w * 1.0
        draw.rectangle([x / ds, y / ds, x / ds + size, y / ds + size], outline=(30, 60, 220))
    pil.save(path)


def _read_tiles(slide, tiles: list, tile_px: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(tiles), tile_px, tile_px, 3), np.uint8)
    for i, (x, y, level, w, h) in enumerate(tiles):
        region = slide.read_region((int(x), int(y)), int(level), (int(w), int(h))).convert("RGB")
        if region.size != (tile_px, tile_px):
            region = region.resize((tile_px, tile_px), Image.BILINEAR)
        out[i] = np.asarray(region)
    return out


def stain_features(batch_rgb, device) -> dict[str, "np.ndarray"]:
    """Per-tile H, E and DAB optical-density statistics on the device; input (B, H, W, 3) uint8."""
    import torch

    x = torch.as_tensor(batch_rgb, device=device).float()
    od = -torch.log10(torch.clamp(x, min=1.0) / 255.0)  # (B, H, W, 3)
    hed = od @ torch.as_tensor(HED_FROM_RGB, dtype=od.dtype, device=device)  # (B, H, W, 3)
    hed = torch.clamp(hed, min=0.0)
    tissue = od.sum(dim=-1) > TISSUE_OD  # (B, H, W)
    frac = tissue.float().mean(dim=(1, 2))
    weights = tissue.float().unsqueeze(-1)
    count = weights.sum(dim=(1, 2)).clamp(min=1.0)
    mean = (hed * weights).sum(dim=(1, 2)) / count  # (B, 3)
    var = (((hed - mean[:, None, None, :]) ** 2) * weights).sum(dim=(1, 2)) / count
    flat = hed.reshape(hed.shape[0], -1, 3)
    p90 = torch.quantile(flat, 0.9, dim=1)  # (B, 3) over all pixels
    return {"tissue_fraction": frac.cpu().numpy(), "mean_od": (od.sum(-1) * tissue).sum(dim=(1, 2)).div(
                count.squeeze(-1)).cpu().numpy(),
            "mean": mean.cpu().numpy(), "std": var.sqrt().cpu().numpy(), "p90": p90.cpu().numpy()}


def tile_features(slide_path: Path, tiles: list, *, target_mpp: float = 1.0, tile_px: int = 256,
                  device=None, batch_size: int = 64) -> list[dict]:
    """One row per tile: position (level-0 px and mm) and stain statistics."""
    from imaging_tasks.device import pick_device

    dev = pick_device(str(device) if device is not None else None)
    slide = open_slide(slide_path)
    mpp = slide_mpp(slide)
    rows = []
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start:start + batch_size]
        f = stain_features(_read_tiles(slide, chunk, tile_px), dev)
        for i, (x, y, *_rest) in enumerate(chunk):
            row = {"x": int(x), "y": int(y), "x_mm": round(x * mpp / 1000, 4), "y_mm": round(y * mpp / 1000, 4),
                   "tissue_fraction": float(f["tissue_fraction"][i]), "mean_od": float(f["mean_od"][i])}
            for j, stain in enumerate(("hematoxylin", "eosin", "dab")):
                row[f"{stain}_od_mean"] = float(f["mean"][i, j])
                row[f"{stain}_od_std"] = float(f["std"][i, j])
                row[f"{stain}_od_p90"] = float(f["p90"][i, j])
            rows.append(row)
    return rows


def summarize(plan: dict, rows: list[dict]) -> dict:
    """Slide-level metrics from the plan and the tile rows (order-independent)."""
    metrics = [m for m in plan["metrics"]]
    if rows:
        for stain in ("hematoxylin", "eosin", "dab"):
            values = np.array([r[f"{stain}_od_mean"] for r in rows])
            metrics.append({"name": f"{stain}_od_mean", "value": float(values.mean()), "unit": "OD"})
        dab = np.array([r["dab_od_mean"] for r in rows])
        metrics.append({"name": "dab_positive_tile_fraction", "value": float((dab > 0.15).mean()), "unit": ""})
    metrics.append({"name": "n_tiles_computed", "value": float(len(rows)), "unit": ""})
    return {"metrics": metrics, "findings": plan.get("findings", [])}


def process_study(files: list[Path], out_dir: Path, *, device=None, target_mpp: float = 1.0, tile_px: int = 256,
                  **_options) -> dict:
    """All three steps in process, for one slide (the DAG fans tile_features out instead)."""
    from imaging_tasks.device import pick_device

    if len(files) != 1:
        raise BadInput("not_one_slide", f"a pathology study is one slide file, got {len(files)}")
    dev = pick_device(str(device) if device is not None else None)
    plan = plan_tiles(files[0], out_dir, target_mpp=target_mpp, tile_px=tile_px)
    rows = tile_features(files[0], plan["tiles"], target_mpp=target_mpp, tile_px=tile_px, device=dev)
    (Path(out_dir) / "tile_features.json").write_text(json.dumps(rows))
    result = summarize(plan, rows)
    return {**result, "outputs": plan["outputs"] + ["tile_features.json"], "device": str(dev)}
