"""The pre-issue-14 torch path, kept as the reference definition the fast numpy path (``pathology.stain``,
``pathology.reader``) must reproduce within its documented tolerance; tests and ``bench/wsi.py`` (its "before"
row) use it.  Not part of the library: one way to compute features there.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from imaging_tasks.pathology.tiles import HED_FROM_RGB, PERCENTILES, STAINS, TISSUE_OD, _read_rgb, open_slide, slide_mpp


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
