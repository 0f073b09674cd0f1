"""Deterministic tractography on the tensor's principal eigenvectors, many streamlines at once on the torch device.

The propagation rule is EuDX's (Garyfallidis 2012; dipy's ``EuDXDirectionGetter`` + ``LocalTracking``), so the
result can be checked against dipy streamline for streamline (in float32, so points agree to ~1e-4 voxel and a
stop that falls right on a threshold can rarely go the other way; issue 12 asks for count and mean length within
5% of dipy):

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

How it is made fast without a compiler (every step is a fixed list of ~35 batched torch kernels, so the cost is
kernels x rows, and the kernels are cheapest on arrays that stay in cache):

- float32 and a *structure-of-arrays* layout: every per-half array is (components, M) with the M halves
  contiguous, because torch's CPU kernels on (M, 8) rows (inner loops of 8) and on bool masks are several times
  slower than on long contiguous rows; the angle test is float arithmetic for the same reason;

- a *cell table*: for every grid cell (the 8 voxels around a point) that a streamline can live in, one row holds
  the 8 corners' FA and eigenvectors, so a point's whole neighbourhood is one row gather.  Cells whose 8 corners all
  have FA below ``fa_stop`` share one all-zero row (a point there is rejected either way, since trilinear FA cannot
  exceed its corners), eigenvectors are zeroed where a corner is off the grid or has no tensor (so such a corner
  never counts, which is dipy's rule) - the table is a few MB for a brain;
- a *pool* of a few thousand half-streamlines advances together; finished halves are dropped every step and the
  pool is topped up from the seed queue, so the arrays keep the size that fits the cache instead of starting huge
  and ending with a long tail of a few stragglers; a half that stops is only flagged and the arrays are compacted
  every few steps, and a half's cell row is re-fetched only when it moves into another cell;
- points are recorded per step (with the flags) and assembled into streamlines per block of seeds once every
  half of the block has finished, so memory is the output plus a bounded working set.

Positions are handled internally in padded-grid coordinates (index + 1, the cell table's frame) and returned in
voxel-index coordinates (what the maps are indexed by); :func:`save_streamlines` writes them in RAS+ mm.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

# the 8 trilinear corners, x-major (dipy sums them in another order: the same up to rounding)
_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
_TOTAL_WEIGHT = 0.5   # EuDX: at least half of the trilinear weight must agree to go on
_FA_MARGIN = 1e-5     # a cell counts as live when a corner's FA exceeds fa_stop - this (rounding head-room)


def seeds_from_mask(mask, per_axis: int = 1) -> np.ndarray:
    """Seed points (k, 3) in voxel coordinates: ``per_axis``^3 per mask voxel on a regular sub-grid
    (offsets (i + 0.5) / per_axis - 0.5), in dipy's ``seeds_from_mask(mask, eye(4), density=per_axis)`` order."""
    mask = np.asarray(mask, bool)
    d = int(per_axis)
    grid = np.mgrid[0:d, 0:d, 0:d].T.reshape(-1, 3) / d + 0.5 / d - 0.5
    return (np.argwhere(mask)[:, None, :] + grid[None]).reshape(-1, 3)


def voxel_sizes_mm(affine) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0))


class _CellTable:
    """The field as cell rows on the device.  A point ``q`` in padded coordinates (voxel index + 1) lies in cell
    ``floor(q)`` (0..n per axis), whose corners are padded voxels ``floor(q) + {0,1}^3``; the padding ring
    replicates FA outwards (dipy's ``trilinear_interpolate4d`` extends border values half a voxel) and has no
    eigenvectors.

    ``rows_tab`` (C, 32): corner FA (8), then the corner eigenvectors as x (8), y (8), z (8), zero where the corner
    voxel has no tensor and for every corner of a cell that is not fully on the grid (dipy finds no direction
    there).  Row 0 is all zeros and stands for every cell no streamline can stay in (all corners FA < fa_stop).
    """

    def __init__(self, v1, fa, fa_stop, seeds, step_vox, device, dtype):
        import torch

        self.torch = torch
        n = np.array(fa.shape)
        cells = n + 1
        fa_p = np.pad(fa, 1, mode="edge")
        pk_p = np.zeros(tuple(n + 2) + (3,))
        pk_p[1:-1, 1:-1, 1:-1] = np.where((fa > 0)[..., None], v1, 0.0)
        fa_max = np.zeros(tuple(cells))
        for i, j, k in _CORNERS:
            np.maximum(fa_max, fa_p[i:i + cells[0], j:j + cells[1], k:k + cells[2]], out=fa_max)
        live = fa_max > fa_stop - _FA_MARGIN
        f = np.floor(np.clip(seeds + 1.0, 0.0, n + 0.999)).astype(np.int64)
        live[f[:, 0], f[:, 1], f[:, 2]] = True            # a seed's own cell: its first direction is taken there
        li, lj, lk = np.nonzero(live)
        interior = (li >= 1) & (li <= n[0] - 1) & (lj >= 1) & (lj <= n[1] - 1) & (lk >= 1) & (lk <= n[2] - 1)
        tab = np.zeros((len(li) + 1, 4, 8))
        for c, (i, j, k) in enumerate(_CORNERS):
            tab[1:, 0, c] = fa_p[li + i, lj + j, lk + k]
            tab[1:, 1:, c] = pk_p[li + i, lj + j, lk + k] * interior[:, None]
        cellmap = np.zeros(int(np.prod(cells)), np.int64)
        cellmap[np.ravel_multi_index((li, lj, lk), tuple(cells))] = np.arange(1, len(li) + 1)
        # Off the grid (index < -0.5 or >= n - 0.5) lies only in the outer ring of cells; when none of them is live
        # such points land on row 0 and fail the FA test anyway, and the explicit on-grid test can be skipped.
        self.check_grid = bool((~interior).any())
        self.cellmap = torch.as_tensor(cellmap, device=device)
        self.rows_tab = torch.as_tensor(tab.reshape(-1, 32), dtype=dtype, device=device)
        # the flat cell number as a mat-vec; exact in float32 below 2^24 cells (a 255^3 grid), float64 beyond
        self.idx_dtype = dtype if np.prod(cells) < 2 ** 24 else torch.float64
        self.cstrides = torch.as_tensor([cells[1] * cells[2], cells[2], 1], dtype=self.idx_dtype, device=device)
        self.lo = torch.full((3, 1), 0.5, dtype=dtype, device=device)
        self.hi = torch.as_tensor(n + 0.5, dtype=dtype, device=device).view(3, 1)
        self.qmin = torch.zeros((3, 1), dtype=dtype, device=device)
        self.qmax = torch.as_tensor(n + 0.999, dtype=dtype, device=device).view(3, 1)
        self.B = torch.as_tensor((1 - _CORNERS.T).astype(float), dtype=dtype, device=device).unsqueeze(2)  # (3,8,1)
        self.S = torch.as_tensor((2 * _CORNERS.T - 1).astype(float), dtype=dtype, device=device).unsqueeze(2)
        self.tiny = float(torch.finfo(dtype).tiny) ** 0.5

    # Every array of the step is laid out "structure of arrays", (components, M) with the M half-streamlines
    # contiguous: torch's CPU kernels are several times slower on (M, 8) rows (inner loops of 8) and on bool
    # masks of that size, so the angle test below is done in float arithmetic.
    def cells(self, q):
        """On-grid flag (None when not needed), cell rows (M,) and in-cell position (3, M) of padded points ``q``
        (3, M); clamps ``q`` in place to the cell range (that changes only points off the grid, rejected anyway)."""
        torch = self.torch
        on_grid = ((q >= self.lo) & (q < self.hi)).all(0) if self.check_grid else None
        q.clamp_(min=self.qmin, max=self.qmax)
        f = q.floor()
        lin = torch.mm(self.cstrides.view(1, 3), f if f.dtype == self.idx_dtype else f.to(self.idx_dtype))
        return on_grid, self.cellmap.index_select(0, lin.view(-1).long()), q - f

    def weights_fa(self, frac, cd):
        """Trilinear corner weights (8, M) from the in-cell position ``frac`` (3, M), and the interpolated FA."""
        torch = self.torch
        w = torch.addcmul(self.B[0], frac[0:1], self.S[0])      # (1 - d) or d per corner and axis, multiplied
        w.mul_(torch.addcmul(self.B[1], frac[1:2], self.S[1]))
        w.mul_(torch.addcmul(self.B[2], frac[2:3], self.S[2]))
        return w, (w * cd[0:8]).sum(0)

    def fetch(self, rows):
        """Cell data (32, M) of cell rows (M,)."""
        return self.rows_tab.index_select(0, rows).t().contiguous()

    def locate(self, q):
        """Cell data (32, M), rows (M,), weights (8, M), FA (M,), on-grid flag at padded points ``q`` (3, M)."""
        on_grid, rows, frac = self.cells(q)
        cd = self.fetch(rows)
        w, fa = self.weights_fa(frac, cd)
        return cd, rows, w, fa, on_grid

    def direction(self, cd, w, prev, cos_thr):
        """EuDX's direction from a point's cell data ``cd`` (32, M) and weights ``w`` (8, M) given ``prev``
        (3, M): (unit direction (3, M), found (M,))."""
        torch = self.torch
        dot = cd[8:16] * prev[0:1]
        dot.addcmul_(cd[16:24], prev[1:2])
        dot.addcmul_(cd[24:32], prev[2:3])
        # weight of the corners within the angle: 1 where |dot| > cos_thr, else 0 (cos_thr > 0, so |dot| > 0)
        wv = dot.abs().sub_(cos_thr).sign_().clamp_(min=0.0).mul_(w)
        found = wv.sum(0) >= _TOTAL_WEIGHT
        coef = torch.copysign(wv, dot)                          # each counted eigenvector flipped to agree
        m = cd.shape[1]
        new = (cd[8:32].view(3, 8, m) * coef.unsqueeze(0)).sum(1)
        return new.div_((new * new).sum(0).sqrt_().clamp_min_(self.tiny)), found


def track_deterministic(v1, fa, seeds_vox, *, voxel_size_mm=(1.0, 1.0, 1.0), step_mm: float = 0.5,
                        fa_stop: float = 0.2, max_angle_deg: float = 30.0, min_length_mm: float = 10.0,
                        max_length_mm: float = 250.0, device=None, pool: int | None = None,
                        block_seeds: int = 16384) -> list[np.ndarray]:
    """Streamlines (list of (k, 3) float arrays, voxel coordinates) from ``seeds_vox`` (S, 3) through the field
    ``v1`` (x,y,z,3) / ``fa`` (x,y,z), by the EuDX rule in the module docstring.

    Each half stops after ``ceil(max_length_mm / step_mm)`` points; streamlines with fewer than 2 points, shorter
    than ``min_length_mm`` or longer than ``max_length_mm`` are dropped.  Output order follows the seeds.
    ``pool`` half-streamlines advance together (default 4096 on CPU, where the arrays stay in cache, 2^18 on a GPU);
    ``block_seeds`` seeds are assembled at a time (bounds the memory beyond the output).  float32 on every device:
    the streamlines are float32 arrays, dipy's to ~1e-4 voxel (a rare stop right at a threshold may differ).
    """
    import torch

    from imaging_tasks.device import pick_device

    dev = pick_device(device)
    dtype = torch.float32
    pool = int(pool or (4096 if dev.type == "cpu" else 1 << 18))
    fa = np.nan_to_num(np.asarray(fa, dtype=np.float64))
    v1 = np.nan_to_num(np.asarray(v1, dtype=np.float64))
    seeds = np.asarray(seeds_vox, dtype=np.float64).reshape(-1, 3)
    n = np.array(fa.shape)
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    step_vox_np = step_mm / vs
    table = _CellTable(v1, fa, fa_stop, seeds, step_vox_np, dev, dtype)
    cos_thr = max(float(np.cos(np.pi * max_angle_deg / 180.0)), np.finfo(np.float64).tiny)   # and |dot| > 0
    max_points = int(np.ceil(max_length_mm / step_mm))

    # the first direction: the eigenvector of the nearest voxel (dipy's initial_direction), if it has a tensor
    near = np.round(seeds).astype(np.int64)
    usable = ((near >= 0) & (near < n)).all(1)
    near = np.clip(near, 0, n - 1)
    usable &= fa[near[:, 0], near[:, 1], near[:, 2]] > 0
    first = v1[near[:, 0], near[:, 1], near[:, 2]]
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # the step kernels are small (a pool of a few thousand rows): intra-op threads only add hand-off costs and,
        # on a busy machine, spinning; one thread measured ~5x less CPU than two here
        torch.set_num_threads(1)
    try:
        return _track(torch, table, seeds, usable, first, step_vox_np, cos_thr, fa_stop, max_points, pool,
                      block_seeds, step_mm, min_length_mm, max_length_mm, dev, dtype)
    finally:
        torch.set_num_threads(threads)


def _track(torch, table, seeds, usable, first, step_vox_np, cos_thr, fa_stop, max_points, pool, block_seeds,
           step_mm, min_length_mm, max_length_mm, dev, dtype) -> list[np.ndarray]:
    tracker = _Pool(table, torch.as_tensor(step_vox_np, dtype=dtype, device=dev).view(3, 1), cos_thr, fa_stop, max_points,
                    dev, dtype)
    out: list[np.ndarray] = []
    n_seeds, intake, done = len(seeds), 0, 0
    while done < n_seeds:
        block_end = min(n_seeds, done + block_seeds)
        # advance until every half of the seeds [done, block_end) has finished, feeding new seeds as halves end
        while True:
            if tracker.size < pool * 3 // 4 and intake < n_seeds:
                take = min(n_seeds - intake, max(256, (pool - tracker.size) // 2))
                sel = intake + np.flatnonzero(usable[intake:intake + take])
                tracker.add(sel, seeds[sel], first[sel])
                intake += take
                continue
            if intake >= block_end and tracker.min_id() >= 2 * block_end:
                break
            tracker.step()
        out.extend(_assemble(tracker.take_records(2 * block_end), seeds, done, block_end, step_mm, min_length_mm,
                             max_length_mm))
        done = block_end
    return out


class _Pool:
    """The half-streamlines in flight, sorted by half id (2 x seed + 0 forward / 1 backward): padded position
    ``q``, previous direction, corner weights, cell row and cell data of the current point, and an ``alive`` flag.

    Halves that stop are only flagged (their cell row is not refetched and their points are masked out of the
    records); the arrays are compacted every ``compact_every`` steps, so most steps copy nothing.  A half's cell
    data is fetched from the table only when it moves into another cell (about one step in three at 0.25 voxel
    steps)."""

    compact_every = 8

    def __init__(self, table, step_vox, cos_thr, fa_stop, max_points, device, dtype):
        import torch

        self.torch, self.table, self.step_vox = torch, table, step_vox
        self.cos_thr, self.fa_stop, self.max_points = cos_thr, fa_stop, max_points
        self.device, self.dtype = device, dtype
        self.q = torch.zeros((3, 0), dtype=dtype, device=device)
        self.prev, self.w = self.q.clone(), torch.zeros((8, 0), dtype=dtype, device=device)
        self.rows = self.ids = torch.zeros(0, dtype=torch.long, device=device)
        self.cd = torch.zeros((32, 0), dtype=dtype, device=device)
        self.alive = torch.zeros(0, dtype=torch.bool, device=device)
        self.clock = 0                     # global step number: a half's j-th point is recorded at start + j - 1
        self.batches: deque = deque()      # (start clock, last half id + 1) of intake batches still in flight
        self.records: list = []            # (q (3, m), ids (m,), alive (m,) or None, clock, first id, last id)
        self.last_id = -1
        self.start_of = np.zeros(0, np.int64)

    @property
    def size(self) -> int:
        return len(self.ids)

    def min_id(self) -> int:
        return int(self.ids[0]) if len(self.ids) else 1 << 62

    def _keep(self, found, fa, on_grid):
        keep = found & (fa > self.fa_stop)
        return keep & on_grid if on_grid is not None else keep

    def _fields(self):
        return self.q, self.prev, self.w, self.rows, self.ids, self.cd, self.alive

    def _set(self, fields):
        self.q, self.prev, self.w, self.rows, self.ids, self.cd, self.alive = fields

    def compact(self):
        idx = torch_nonzero(self.torch, self.alive)
        if len(idx) < len(self.alive):
            self._set([x.index_select(-1, idx) for x in self._fields()])

    def add(self, seed_idx, seeds, first):
        """Take the seeds ``seed_idx`` (usable ones): both first steps, then the halves that survive them join."""
        torch, t = self.torch, self.table
        if not len(seed_idx):
            return
        self.compact()
        q0 = torch.as_tensor(seeds.T, dtype=self.dtype, device=self.device) + 1.0
        first = torch.as_tensor(first.T, dtype=self.dtype, device=self.device)
        cd0, _, w0, _, _ = t.locate(q0.clone())
        d1, found = t.direction(cd0, w0, first, self.cos_thr)
        q1 = torch.addcmul(q0, d1, self.step_vox)
        cd1, rows1, w1, fa1, grid1 = t.locate(q1)
        kept1 = self._keep(found, fa1, grid1)
        # the backward half starts opposite to the forward half's first step (or to the first direction)
        vox = d1 * self.step_vox
        back = torch.where(kept1, -vox / torch.linalg.vector_norm(vox, dim=0).clamp_min(t.tiny), -first)
        d1b, foundb = t.direction(cd0, w0, back, self.cos_thr)
        q1b = torch.addcmul(q0, d1b, self.step_vox)
        cd1b, rows1b, w1b, fa1b, grid1b = t.locate(q1b)
        kept1b = self._keep(foundb, fa1b, grid1b)
        ids = torch.as_tensor(2 * np.asarray(seed_idx, np.int64), device=self.device)
        ids = torch.stack([ids, ids + 1], 1).view(-1)
        alive = torch_nonzero(torch, torch.stack([kept1, kept1b], 1).view(-1))

        def pair(a, b):
            return torch.stack([a, b], -1).view(a.shape[:-1] + (-1,)).index_select(-1, alive)

        q, prev, w, rows, cd = pair(q1, q1b), pair(d1, d1b), pair(w1, w1b), pair(rows1, rows1b), pair(cd1, cd1b)
        ids = ids.index_select(0, alive)
        hi = int(2 * seed_idx[-1] + 2)
        self.batches.append((self.clock, hi))          # their first point counts as recorded at the current clock
        if len(self.start_of) < hi:
            self.start_of = np.concatenate([self.start_of, np.zeros(hi - len(self.start_of), np.int64)])
        self.start_of[2 * int(seed_idx[0]):hi] = self.clock
        if len(ids):
            self.last_id = int(ids[-1])     # an upper bound of the pool's ids from now on (they only grow)
            self.records.append((q, ids, None, self.clock, int(ids[0]), self.last_id))
        new = (q, prev, w, rows, ids, cd, torch.ones(len(ids), dtype=torch.bool, device=self.device))
        self._set([torch.cat([a, b], -1) for a, b in zip(self._fields(), new)])

    def step(self):
        torch, t = self.torch, self.table
        self.clock += 1
        # halves that already have max_points points end here (the oldest intake batches: a prefix of the pool)
        while self.batches and self.batches[0][0] <= self.clock - self.max_points:
            _, id_end = self.batches.popleft()
            cut = int(torch.searchsorted(self.ids, torch.tensor([id_end], device=self.device)))
            if cut:
                self._set([x[..., cut:] for x in self._fields()])
        if self.clock % self.compact_every == 0:
            self.compact()
        if not len(self.ids):
            return
        d, found = t.direction(self.cd, self.w, self.prev, self.cos_thr)
        q = torch.addcmul(self.q, d, self.step_vox)
        on_grid, rows, frac = t.cells(q)
        moved = torch_nonzero(torch, rows != self.rows)
        if len(moved):
            self.cd.index_copy_(1, moved, t.rows_tab.index_select(0, rows.index_select(0, moved)).t())
        w, fa = t.weights_fa(frac, self.cd)
        alive = self._keep(found, fa, on_grid).logical_and_(self.alive)
        self.q, self.prev, self.w, self.rows, self.alive = q, d, w, rows, alive
        self.records.append((q, self.ids, alive, self.clock, int(self.ids[0]), self.last_id))

    def take_records(self, id_end):
        """Points of the halves with id < ``id_end`` (all finished): (q (m, 3) voxel index, ids (m,), point number
        (m,) 1-based within its half), torch on the device; the others' points stay.  Each record's ids are sorted
        (the pool is), so the halves taken are a prefix of every record."""
        torch = self.torch
        parts, rest = [], []
        for q, ids, alive, clock, lo, hi in self.records:
            cut = len(ids) if hi < id_end else 0 if lo >= id_end else \
                int(torch.searchsorted(ids, torch.tensor([id_end], device=self.device)))
            if cut:
                parts.append((q[:, :cut], ids[:cut], None if alive is None else alive[:cut], clock))
            if cut < len(ids):
                rest.append((q[:, cut:], ids[cut:], None if alive is None else alive[cut:], clock, id_end, hi))
        self.records = rest
        if not parts:
            return None
        q = torch.cat([p[0] for p in parts], 1).sub_(1.0)
        ids = torch.cat([p[1] for p in parts])
        clock = torch.repeat_interleave(torch.tensor([p[3] for p in parts], device=self.device),
                                        torch.tensor([len(p[1]) for p in parts], device=self.device))
        alive = None if all(p[2] is None for p in parts) else \
            torch.cat([torch.ones(len(p[1]), dtype=torch.bool, device=self.device) if p[2] is None else p[2]
                       for p in parts])
        start_of = torch.as_tensor(self.start_of, device=self.device)
        return q, ids, clock.sub_(start_of.index_select(0, ids)).add_(1), alive


def torch_nonzero(torch, mask):
    """Indices (k,) of the True entries of a 1-D bool tensor."""
    return torch.nonzero(mask).squeeze(1)


def _assemble(records, seeds, start, end, step_mm, min_length_mm, max_length_mm) -> list[np.ndarray]:
    """Streamlines of the seeds [start, end): each seed's backward half (reversed), the seed, its forward half.

    Every step is ``step_mm`` long (a unit direction times ``step_mm`` / voxel size per axis), so a streamline of k
    points is (k - 1) x ``step_mm`` long; that is what the length limits are held to."""
    import torch

    n = end - start
    if records is None:
        kf = kb = np.zeros(n, np.int64)
    else:
        q, ids, j, alive = records
        h = ids - 2 * start
        if alive is None:
            k = torch.bincount(h, minlength=2 * n).cpu().numpy()
        else:   # records hold the stopped halves' rows until the pool is compacted: count only the live ones
            k = torch.bincount(h, weights=alive.to(torch.float64), minlength=2 * n).cpu().numpy().round()
            k = k.astype(np.int64)
        kf, kb = k[0::2], k[1::2]
    total = kf + kb + 1
    offsets = np.zeros(n, np.int64)
    np.cumsum(total[:-1], out=offsets[1:])
    at_seed = offsets + kb
    m = int(total.sum())
    flat = torch.empty(3 * (m + 1), dtype=torch.float32)       # one spare row takes the stopped halves' points
    if records is not None:
        at = torch.as_tensor(at_seed, device=h.device)
        dest = at.index_select(0, h >> 1).add_((1 - 2 * (h & 1)) * j)   # forward after the seed, backward before
        if alive is not None:
            dest = torch.where(alive, dest, m)
        dest = dest.cpu().mul_(3)
        q = q.cpu()
        for c in range(3):     # three flat scatters: measured faster than one of (m, 3) rows
            flat.index_copy_(0, dest + c if c else dest, q[c])
    points = flat.numpy().reshape(-1, 3)[:m]
    points[at_seed] = seeds[start:end]
    lengths = (total - 1) * step_mm
    keep = (total >= 2) & (lengths >= min_length_mm) & (lengths <= max_length_mm)
    lines = np.split(points, offsets[1:])
    return [lines[n] for n in np.flatnonzero(keep)]


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
