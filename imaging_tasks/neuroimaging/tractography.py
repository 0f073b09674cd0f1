"""Deterministic tractography on the tensor's principal eigenvectors, every seed at once on the torch device.

The propagation rule is EuDX's (Garyfallidis 2012; dipy's ``EuDXDirectionGetter`` + ``LocalTracking``), so the
result can be checked against dipy step for step:

- the next direction at a point is the trilinear-weighted sum of the principal eigenvectors of the 8 surrounding
  voxels, each flipped to agree with the previous direction (eigenvectors have no sign); a neighbour only counts
  if it has a fitted tensor (FA > 0) and its eigenvector is within ``max_angle_deg`` of the previous direction;
  when the neighbours that count carry less than half the weight (or the 8 voxels are not all on the grid), the
  streamline ends there;
- a step moves ``step_mm`` along that direction (divided by the voxel size per axis, as dipy does);
- the new point is kept only while the trilinearly interpolated FA there is above ``fa_stop`` (and the point is on
  the grid: -0.5 <= index < n - 0.5, dipy's rule); the first point failing ends the half;
- from each seed: the eigenvector of the nearest voxel gives the first direction; the streamline is tracked both
  ways (the backward half starts opposite to the forward half's first step) and the two halves are joined.

Instead of one streamline at a time, all halves of all seeds advance together: one step is a few gathers and
element-wise products over the still-active halves, which shrinks as they stop.  Points are in voxel-index
coordinates (what the maps are indexed by); :func:`save_streamlines` writes them in RAS+ mm.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# the 8 trilinear corners, x-major (dipy sums them in another order: the same up to rounding)
_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
_TOTAL_WEIGHT = 0.5   # EuDX: at least half of the trilinear weight must agree to go on


def seeds_from_mask(mask, per_axis: int = 1) -> np.ndarray:
    """Seed points (k, 3) in voxel coordinates: ``per_axis``^3 per mask voxel on a regular sub-grid
    (offsets (i + 0.5) / per_axis - 0.5), in dipy's ``seeds_from_mask(mask, eye(4), density=per_axis)`` order."""
    mask = np.asarray(mask, bool)
    d = int(per_axis)
    grid = np.mgrid[0:d, 0:d, 0:d].T.reshape(-1, 3) / d + 0.5 / d - 0.5
    return (np.argwhere(mask)[:, None, :] + grid[None]).reshape(-1, 3)


def voxel_sizes_mm(affine) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0))


class _Field:
    """The tensor field on the device, padded by one voxel so every trilinear corner is an index plus a constant.

    One table row per padded voxel: (v1x, v1y, v1z, FA).  v1 is zero where there is no tensor (FA == 0) and in the
    padding, so such neighbours never count; FA is edge-replicated into the padding, which reproduces dipy's
    ``trilinear_interpolate4d`` (the border voxels' values extend half a voxel outwards).  One gather per point
    then serves both the FA check at a new point and the direction taken from it on the next step.
    """

    def __init__(self, v1, fa, device, dtype):
        import torch

        self.torch = torch
        n = np.array(fa.shape)
        ok = fa > 0
        table = np.zeros(tuple(n + 2) + (4,))
        table[1:-1, 1:-1, 1:-1, :3] = np.where(ok[..., None], v1, 0.0)
        table[..., 3] = np.pad(fa, 1, mode="edge")
        self.table = torch.as_tensor(table.reshape(-1, 4), dtype=dtype, device=device)
        strides = np.array([(n[1] + 2) * (n[2] + 2), n[2] + 2, 1])
        self.strides = torch.as_tensor(strides, dtype=dtype, device=device)
        self.corner_offsets = torch.as_tensor(_CORNERS @ strides, device=device)
        self.corners = torch.as_tensor(_CORNERS, device=device)
        self.n = torch.as_tensor(n, dtype=dtype, device=device)
        self.ok_flat = torch.as_tensor(ok.reshape(-1), device=device)
        self.v1_flat = torch.as_tensor(np.asarray(v1).reshape(-1, 3), dtype=dtype, device=device)
        self.lin_strides = torch.as_tensor([n[1] * n[2], n[2], 1], device=device)
        self.n_long = torch.as_tensor(n, device=device)

    def sample(self, pos):
        """Corners of ``pos`` (M, 3): (table rows (M, 8, 4), trilinear weights (M, 8), FA (M,), FA on the grid
        (-0.5 <= p < n - 0.5), all 8 corners on the grid (dipy's condition for a direction))."""
        torch = self.torch
        on_grid = ((pos >= -0.5) & (pos < self.n - 0.5)).all(1)
        inside = ((pos >= 0) & (pos < self.n - 1)).all(1)
        q = torch.minimum((pos + 1).clamp(min=0), self.n + 0.999)
        f = torch.floor(q)
        d = q - f
        lin = (f @ self.strides).long().unsqueeze(1) + self.corner_offsets    # (M, 8)
        rows = self.table.index_select(0, lin.view(-1)).view(-1, 8, 4)        # (M, 8, 4)
        wx, wy, wz = (torch.stack([1 - d[:, k], d[:, k]], 1) for k in range(3))
        w = (wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]).reshape(-1, 8)
        fa = (w * rows[..., 3]).sum(1)
        return rows, w, fa, on_grid, inside

    @staticmethod
    def direction(rows, w, inside, prev, cos_thr):
        """EuDX's direction from a point's corners given ``prev`` (M, 3): (unit dir (M, 3), found (M,))."""
        import torch

        peaks = rows[..., :3]
        dot = torch.bmm(peaks, prev.unsqueeze(-1)).squeeze(-1)               # (M, 8)
        adot = dot.abs()
        wv = torch.where((adot >= cos_thr) & (adot > 0), w, torch.zeros_like(w))
        new = torch.bmm((wv * torch.sign(dot)).unsqueeze(1), peaks).squeeze(1)
        norm = new.norm(dim=1, keepdim=True)
        found = inside & (wv.sum(1) >= _TOTAL_WEIGHT) & (norm.squeeze(1) > 0)
        return new / torch.where(norm > 0, norm, torch.ones_like(norm)), found


def track_deterministic(v1, fa, seeds_vox, *, voxel_size_mm=(1.0, 1.0, 1.0), step_mm: float = 0.5,
                        fa_stop: float = 0.2, max_angle_deg: float = 30.0, min_length_mm: float = 10.0,
                        max_length_mm: float = 250.0, device=None) -> list[np.ndarray]:
    """Streamlines (list of (k, 3) float arrays, voxel coordinates) from ``seeds_vox`` (S, 3) through the field
    ``v1`` (x,y,z,3) / ``fa`` (x,y,z), by the EuDX rule in the module docstring.

    Each half stops after ``ceil(max_length_mm / step_mm)`` steps; streamlines with fewer than 2 points, shorter
    than ``min_length_mm`` or longer than ``max_length_mm`` are dropped.  Output order follows the seeds.
    """
    import torch

    from imaging_tasks.device import pick_device

    dev = pick_device(device)
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    fa = np.nan_to_num(np.asarray(fa, dtype=np.float64))
    v1 = np.nan_to_num(np.asarray(v1, dtype=np.float64))
    field = _Field(v1, fa, dev, dtype)
    vs = torch.as_tensor(np.asarray(voxel_size_mm, dtype=np.float64), dtype=dtype, device=dev)
    step_vox = step_mm / vs
    cos_thr = float(np.cos(np.pi * max_angle_deg / 180.0))
    max_steps = int(np.ceil(max_length_mm / step_mm))
    seeds = torch.as_tensor(np.asarray(seeds_vox, dtype=np.float64).reshape(-1, 3), dtype=dtype, device=dev)
    n_seeds = len(seeds)

    # the first direction: the eigenvector of the nearest voxel (dipy's initial_direction), if it has a tensor
    near = torch.round(seeds).long()
    usable = ((near >= 0) & (near < field.n_long)).all(1)
    near_lin = (torch.minimum(near.clamp(min=0), field.n_long - 1) * field.lin_strides).sum(-1)
    usable &= field.ok_flat[near_lin]
    first = field.v1_flat[near_lin]

    # forward halves: their first step decides where the backward halves start (dipy: opposite to F[1] - F[0])
    rows0, w0, _, _, inside0 = field.sample(seeds)
    d1, found = field.direction(rows0, w0, inside0, first, cos_thr)
    p1 = seeds + d1 * step_vox
    rows1, w1, fa1, on_grid, inside1 = field.sample(p1)
    kept1 = usable & found & on_grid & (fa1 > fa_stop)
    vox_step = d1 * step_vox
    back = torch.where(kept1.unsqueeze(1), -vox_step / vox_step.norm(dim=1, keepdim=True).clamp(min=1e-30), -first)

    # state of the active halves: id (0..S-1 forward, S..2S-1 backward), position, previous direction, corners
    fwd, bwd = torch.nonzero(kept1).squeeze(1), torch.nonzero(usable).squeeze(1)
    ids = torch.cat([fwd, n_seeds + bwd])
    pos = torch.cat([p1[fwd], seeds[bwd]])
    prev = torch.cat([d1[fwd], back[bwd]])
    rows, w, inside = torch.cat([rows1[fwd], rows0[bwd]]), torch.cat([w1[fwd], w0[bwd]]), \
        torch.cat([inside1[fwd], inside0[bwd]])
    budget = torch.cat([torch.full((len(fwd),), max_steps - 1, device=dev),
                        torch.full((len(bwd),), max_steps, device=dev)])
    rec_ids, rec_pos = [fwd], [p1[fwd]]
    while len(ids):
        d, found = field.direction(rows, w, inside, prev, cos_thr)
        new = pos + d * step_vox
        rows, w, fa_new, on_grid, inside = field.sample(new)
        keep = found & on_grid & (fa_new > fa_stop)
        kept = torch.nonzero(keep).squeeze(1)
        rec_ids.append(ids.index_select(0, kept))
        rec_pos.append(new.index_select(0, kept))
        budget = budget - 1
        alive = torch.nonzero(keep & (budget > 0)).squeeze(1)
        ids, pos, prev, rows, w, inside, budget = (t.index_select(0, alive) for t in
                                                   (ids, new, d, rows, w, inside, budget))

    return _assemble(seeds.cpu().numpy(), usable.cpu().numpy(), torch.cat(rec_ids).cpu().numpy(),
                     torch.cat(rec_pos).cpu().numpy(), np.asarray(voxel_size_mm, dtype=np.float64),
                     min_length_mm, max_length_mm)


def _assemble(seeds, usable, rec_ids, rec_pos, vs, min_length_mm, max_length_mm) -> list[np.ndarray]:
    """Join each seed's backward half (reversed), the seed and its forward half, in seed order."""
    n = len(seeds)
    order = np.argsort(rec_ids, kind="stable")          # records were appended step by step: stable = step order
    rec_ids, rec_pos = rec_ids[order], rec_pos[order]
    counts = np.bincount(rec_ids, minlength=2 * n)
    k_fwd, k_bwd = counts[:n], counts[n:]
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    step_no = np.arange(len(rec_ids)) - start[rec_ids] + 1           # 1-based step within its half
    seed_of = rec_ids % n
    is_bwd = rec_ids >= n
    slot = np.where(is_bwd, k_bwd[seed_of] - step_no, k_bwd[seed_of] + step_no)
    total = k_fwd + k_bwd + 1
    offsets = np.concatenate([[0], np.cumsum(total)[:-1]])
    points = np.empty((int(total.sum()), 3))
    points[offsets[seed_of] + slot] = rec_pos
    points[offsets + k_bwd] = seeds
    lines = np.split(points, offsets[1:])
    seg = np.linalg.norm(np.diff(points, axis=0) * vs, axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    ends = offsets + total - 1
    lengths = cum[ends] - cum[offsets]
    keep = usable & (total >= 2) & (lengths >= min_length_mm) & (lengths <= max_length_mm)
    return [lines[i] for i in np.flatnonzero(keep)]


def to_world(streamlines_vox, affine) -> list[np.ndarray]:
    """Voxel-index points -> RAS+ mm with the image ``affine``."""
    a = np.asarray(affine, dtype=np.float64)
    return [s @ a[:3, :3].T + a[:3, 3] for s in streamlines_vox]


def streamline_lengths_mm(streamlines_vox, affine) -> np.ndarray:
    """Polyline length of each streamline (voxel coordinates) in mm under ``affine``."""
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    return np.array([float(np.linalg.norm(np.diff(s, axis=0) @ lin.T, axis=1).sum()) for s in streamlines_vox])


def length_histogram(lengths_mm, *, bin_mm: float = 10.0, max_mm: float | None = None):
    """(counts, bin edges mm) of streamline lengths, ``bin_mm`` wide from 0 to ``max_mm`` (default: the longest)."""
    lengths_mm = np.asarray(lengths_mm, dtype=np.float64)
    top = max_mm if max_mm is not None else (float(lengths_mm.max()) if len(lengths_mm) else bin_mm)
    edges = np.arange(0.0, top + bin_mm, bin_mm)
    counts, edges = np.histogram(lengths_mm, bins=edges)
    return counts, edges


def save_streamlines(streamlines_vox, affine, shape, path) -> Path:
    """Write streamlines (voxel coordinates of the image with ``affine`` and 3-D ``shape``) as TRK or TCK (by the
    suffix of ``path``) through nibabel; readers get RAS+ mm."""
    import nibabel as nib
    from nibabel.streamlines import Field

    path = Path(path)
    affine = np.asarray(affine, dtype=np.float64)
    tractogram = nib.streamlines.Tractogram([np.asarray(s, dtype=np.float32) for s in streamlines_vox],
                                            affine_to_rasmm=affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".trk":
        header = {Field.VOXEL_TO_RASMM: affine, Field.VOXEL_SIZES: voxel_sizes_mm(affine),
                  Field.DIMENSIONS: np.asarray(shape[:3], dtype=np.int16),
                  Field.VOXEL_ORDER: "".join(nib.aff2axcodes(affine))}
        nib.streamlines.save(tractogram, str(path), header=header)
    elif path.suffix == ".tck":
        nib.streamlines.save(tractogram, str(path))
    else:
        raise ValueError(f"streamline format by suffix: .trk or .tck, got {path.suffix!r}")
    return path
