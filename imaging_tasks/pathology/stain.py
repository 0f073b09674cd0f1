"""Per-tile stain statistics in numpy, the same numbers as the torch definition it replaced (kept as the
reference in ``tests/pathology_reference.py``).

Why a second implementation: on a CPU the torch version costs ~30-90 ms per 256² tile, most of it
``torch.nanquantile`` sorting 65k pixels three times; a slide read loop delivers a tile every ~1.5 ms.  This
one costs ~1 ms per tile on one core (see the bench) because nothing is sorted and nothing is computed twice:

* optical density (Beer-Lambert, ``-log10(max(v, 1) / 255)``) comes from one 256-entry lookup table applied to
  the uint8 channels — every uint8 value has exactly one OD, so the table *is* the definition;
* haematoxylin / eosin / DAB (Ruifrok & Johnston) are one 3x3 matrix product of the three OD planes, clamped
  at 0, exactly as in torch;
* tissue is summed OD > ``TISSUE_OD``; means, standard deviations and the haematoxylin Sobel gradient are
  tissue-weighted sums (the same formulas, float32 like torch);
* p10 / p50 / p90 come from a per-tile histogram instead of a sort (see :data:`PCT_BIN_OD` for the tolerance).

Tolerance against the torch definition (tested on tiles of the synthetic slides and on planted constant-stain
tiles): tissue fraction exact, means / std / mean OD / gradient to float32 rounding (~1e-5 relative),
percentiles within one histogram bin (0.01 OD) and in practice within ~0.002 OD.
"""
from __future__ import annotations

import threading

import numpy as np

from imaging_tasks.pathology.tiles import HED_FROM_RGB, PERCENTILES, STAINS, TISSUE_OD

# OD of every uint8 value; 0 is clamped to 1 as in the torch definition (a black pixel is OD 2.41, not inf).
OD_LUT = (-np.log10(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)
_HED_T = np.ascontiguousarray(HED_FROM_RGB.T.astype(np.float32))  # hed (3, N) = _HED_T @ od (3, N)

# Percentile histograms: PIL's float histogram (C, ~3x faster than np.bincount) with extrema (lo, hi) counts
# 256 bins of (hi - lo) / 255 from lo; with (-0.01, 2.54) and the values shifted down by 1e-6 the first bin
# holds the stain amounts clamped to exactly 0 (the usual case for DAB on an H&E slide, which then give 0 as
# torch does) and the others [0, 0.01), ..., [2.53, 2.54).  Values are assumed spread evenly inside the bin
# holding the wanted rank, so the result is within one bin (0.01 OD) of the order statistic torch.nanquantile
# interpolates, in practice within ~0.002 OD.  The rare values >= 2.54 OD (near-black pixels) are sorted
# exactly when a percentile falls among them.
PCT_BIN_OD = 0.01
PCT_BINS = 255  # value bins [0, 0.01) ... [2.53, 2.54), after one bin for exact zeros
_PCT_EXTREMA = (-PCT_BIN_OD, PCT_BIN_OD * (PCT_BINS - 1))  # PIL: 256 bins of (hi - lo) / 255 from lo
_PCT_TOP = PCT_BIN_OD * PCT_BINS
_Q = np.array([p / 100 for p in PERCENTILES])

# Column order of one tile's stain vector (see :func:`stain_vector`).
STAIN_COLUMNS = (["tissue_fraction", "mean_od", "h_gradient_od_per_um"]
                 + [f"{stain}_od_{stat}" for stat in ("mean", "std", *(f"p{p}" for p in PERCENTILES))
                    for stain in STAINS])


class _Buffers:
    """Work arrays reused from tile to tile (one tile size per slide): fresh 0.25-1 MB arrays per call cost page
    faults, and a small working set (~3 MB for 256² tiles, planes reused) stays in cache between the steps."""

    def __init__(self):
        self.shape = None

    def get(self, shape: tuple[int, int]) -> "_Buffers":
        if shape != self.shape:
            h, w = shape
            self.shape = shape
            self.idx = np.empty((h, w), np.intp)
            self.od = np.empty((3, h, w), np.float32)
            self.od_sum = np.empty((h, w), np.float32)
            self.hed = np.empty((3, h * w), np.float32)
            self.pad = np.empty((h + 2, w + 2), np.float32)
            self.scratch = np.empty((h + 2) * (w + 2), np.float32)
            self.p1 = np.empty((h, w), np.float32)
            self.p2 = np.empty((h, w), np.float32)
        return self


_LOCAL = threading.local()  # one set of buffers per thread: the functions here may run in several at once


def _buffers(shape: tuple[int, int], buf: _Buffers | None = None) -> _Buffers:
    if buf is None:
        buf = getattr(_LOCAL, "buf", None)
        if buf is None:
            buf = _LOCAL.buf = _Buffers()
    return buf.get(shape)


def tile_od(rgb: np.ndarray, buf: _Buffers | None = None):
    """OD planes (3, H, W) float32, summed OD (H, W) and the tissue mask of one (H, W, 3|4) uint8 tile.

    The returned arrays live in reusable buffers: valid until the next call."""
    b = _buffers(rgb.shape[:2], buf)
    for c in range(3):
        np.copyto(b.idx, rgb[..., c], casting="unsafe")
        np.take(OD_LUT, b.idx, out=b.od[c], mode="wrap")  # "raise" would buffer `out`
    np.add(b.od[0], b.od[1], out=b.od_sum)
    b.od_sum += b.od[2]
    return b.od, b.od_sum, b.od_sum > np.float32(TISSUE_OD)


def _sobel_mean(h: np.ndarray, weight: np.ndarray, count: float, b: _Buffers) -> float:
    """Tissue mean of |Sobel(h)| / 8 with replicate padding (torch: F.pad(mode="replicate") + conv2d)."""
    rows, cols = h.shape
    p = b.pad
    p[1:-1, 1:-1] = h
    p[0, 1:-1], p[-1, 1:-1] = h[0], h[-1]
    p[:, 0], p[:, -1] = p[:, 1], p[:, -2]
    gx, gy = b.p1, b.p2
    dx = b.scratch[:(rows + 2) * cols].reshape(rows + 2, cols)
    np.subtract(p[:, 2:], p[:, :-2], out=dx)  # horizontal difference, then [1, 2, 1] down the rows
    np.add(dx[:-2], dx[2:], out=gx)
    gx += dx[1:-1]
    gx += dx[1:-1]
    dy = b.scratch[:rows * (cols + 2)].reshape(rows, cols + 2)
    np.subtract(p[2:], p[:-2], out=dy)  # vertical difference, then [1, 2, 1] along the rows
    np.add(dy[:, :-2], dy[:, 2:], out=gy)
    gy += dy[:, 1:-1]
    gy += dy[:, 1:-1]
    gx *= gx
    gy *= gy
    gx += gy
    np.sqrt(gx, out=gx)
    return float(np.dot(gx.reshape(-1), weight)) / 8.0 / count


def _histograms(hed: np.ndarray, tissue_flat: np.ndarray, count: int) -> np.ndarray:
    """(3, PCT_BINS + 2) counts of the clamped stain amounts over tissue pixels: [exact zeros, [0, 0.01), ...,
    [2.53, 2.54), >= 2.54].  ``hed`` (3, N), clamped at 0, is overwritten: shifted down by 1e-6 so that exact
    zeros fall in a bin of their own ([-0.01, 0)), and non-tissue pixels set to -1, outside the histogram."""
    from PIL import Image

    hed -= np.float32(1e-6)
    if count < hed.shape[1]:
        np.copyto(hed, np.float32(-1.0), where=~tissue_flat)
    n = hed.shape[1]
    hist = np.empty((3, PCT_BINS + 2), np.int64)
    for k in range(3):
        hist[k, :-1] = Image.frombuffer("F", (n, 1), hed[k], "raw", "F", 0, 1).histogram(extrema=_PCT_EXTREMA)
    hist[:, -1] = count - hist[:, :-1].sum(axis=1)
    return hist


def percentiles_from_histograms(hist: np.ndarray, count: np.ndarray) -> np.ndarray:
    """(B, 3 stains, 3 percentiles) from (B, 3, PCT_BINS + 2) histograms and (B,) tissue counts; NaN where a
    percentile falls among the values >= 2.54 OD (the caller takes those exactly, see :func:`_percentiles`)."""
    count = np.asarray(count, np.float64)
    cum = np.cumsum(hist, axis=2)
    rank = _Q[None, :] * (count[:, None] - 1) + 0.5  # (B, q): torch's position as a continuous rank
    b = (cum[:, :, :, None] <= rank[:, None, None, :]).sum(axis=2)  # (B, stain, q): the bin holding it
    b = np.minimum(b, PCT_BINS + 1)
    at = np.take_along_axis(hist, b, axis=2)
    before = np.take_along_axis(cum, b, axis=2) - at
    out = (b - 1) * PCT_BIN_OD + (rank[:, None, :] - before) / np.maximum(at, 1) * PCT_BIN_OD
    out[b == 0] = 0.0  # among the exact zeros
    out[b == PCT_BINS + 1] = np.nan
    return out


def _percentiles(hed: np.ndarray, tissue_flat: np.ndarray, count: int) -> np.ndarray:
    """(3 stains, 3 percentiles) of one tile from its histograms; ``hed`` as in :func:`_histograms`."""
    hist = _histograms(hed, tissue_flat, count)
    out = percentiles_from_histograms(hist[None], [count])[0]
    if np.isnan(out).any():
        _exact_top(out, hed, hist, count)
    return out


def _exact_top(out: np.ndarray, hed: np.ndarray, hist: np.ndarray, count: int) -> None:
    """Fill the NaN percentiles (among the rare values >= 2.54 OD) with the exact order statistic."""
    cum_below = hist[:, :-1].sum(axis=1)
    pos = _Q * (count - 1)
    for k, i in zip(*np.nonzero(np.isnan(out))):
        top = np.sort(hed[k][hed[k] >= np.float32(_PCT_TOP - 1e-6)]) + np.float32(1e-6)
        j = min(max(pos[i] - cum_below[k], 0.0), len(top) - 1.0)
        j0 = int(j)
        j1 = min(j0 + 1, len(top) - 1)
        out[k, i] = top[j0] + (top[j1] - top[j0]) * (j - j0)


def stain_vector(od: np.ndarray, od_sum: np.ndarray, tissue: np.ndarray, um_per_px: float,
                 buf: _Buffers | None = None, hist_out: np.ndarray | None = None) -> np.ndarray:
    """One tile's statistics in :data:`STAIN_COLUMNS` order, from :func:`tile_od`'s outputs (float64 vector).

    With ``hist_out`` (3, PCT_BINS + 2) the percentiles may be left NaN and their histograms written there, for
    :func:`percentiles_from_histograms` over a whole chunk at once (saves ~0.1 ms a tile); tiles with values
    beyond the histogram get theirs here, exactly.  ``hist_out`` is zeroed for tiles without tissue."""
    b = _buffers(od_sum.shape, buf)
    n_px = od_sum.size
    tissue_flat = tissue.reshape(-1)
    count = int(np.count_nonzero(tissue_flat))
    out = np.zeros(len(STAIN_COLUMNS))
    out[0] = count / n_px
    if count == 0:
        if hist_out is not None:
            hist_out[:] = 0
        return out  # torch gives zeros for a tile without tissue pixels (sums over nothing / clamp(0, 1))
    weight = tissue_flat.astype(np.float32)
    hed = b.hed
    np.matmul(_HED_T, od.reshape(3, -1), out=hed)
    np.maximum(hed, np.float32(0), out=hed)
    out[1] = float(np.dot(od_sum.reshape(-1), weight)) / count
    out[2] = _sobel_mean(hed[0].reshape(od_sum.shape), weight, count, b) / um_per_px
    mean = (hed @ weight).astype(np.float64) / count
    # corrected two-pass: the deviations' own sum takes out the float32 error of the first mean, so a
    # constant tile has std ~1e-7 as in torch, not the ~1e-5 left by a float32 dot product over 65k pixels
    s1, s2 = np.empty(3), np.empty(3)
    dev = b.p1.reshape(-1)
    for k in range(3):
        np.subtract(hed[k], np.float32(mean[k]), out=dev)
        s1[k] = np.dot(dev, weight)
        dev *= dev
        s2[k] = np.dot(dev, weight)
    var = (s2 - s1 * s1 / count) / count
    mean += s1 / count
    out[3:6] = mean
    out[6:9] = np.sqrt(np.maximum(var, 0.0))
    if hist_out is None:
        out[9:18] = _percentiles(hed, tissue_flat, count).T.reshape(-1)  # p10 (H, E, D), p50 (...), p90 (...)
        return out
    hist_out[:] = _histograms(hed, tissue_flat, count)
    if hist_out[:, -1].any():  # values beyond the histogram: this tile's percentiles now, while hed is at hand
        pct = percentiles_from_histograms(hist_out[None], [count])[0]
        if np.isnan(pct).any():
            _exact_top(pct, hed, hist_out, count)
        out[9:18] = pct.T.reshape(-1)
    else:
        out[9:18] = np.nan
    return out


def fill_percentiles(rows: np.ndarray, hists: np.ndarray) -> None:
    """Complete the rows :func:`stain_vector` left NaN (``hist_out`` given), from their histograms, in place."""
    todo = np.isnan(rows[:, 9])
    if todo.any():
        count = hists[todo, 0].sum(axis=1)  # every tissue pixel is in some bin of each stain
        rows[todo, 9:18] = percentiles_from_histograms(hists[todo], count).transpose(0, 2, 1).reshape(-1, 9)


def stain_features_np(batch_rgb: np.ndarray, um_per_px: float = 1.0) -> dict[str, np.ndarray]:
    """Per-tile stain statistics of (B, H, W, 3) uint8 RGB, keyed and shaped as the torch reference (``tests/pathology_reference.py``).

    ``tissue_fraction``, ``mean_od``, ``h_gradient_od_per_um`` (B,); ``mean``, ``std``, ``p10``, ``p50``, ``p90``
    (B, 3) over tissue pixels, columns H, E, DAB.  ``um_per_px`` is the tiles' resolution (the gradient is per µm).
    """
    batch = np.asarray(batch_rgb)
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] not in (3, 4):
        raise ValueError("batch_rgb must be (B, H, W, 3) uint8 RGB")
    rows = np.empty((len(batch), len(STAIN_COLUMNS)))
    hists = np.empty((len(batch), 3, PCT_BINS + 2), np.int64)
    for i, rgb in enumerate(batch):
        od, od_sum, tissue = tile_od(rgb)
        rows[i] = stain_vector(od, od_sum, tissue, um_per_px, hist_out=hists[i])
    fill_percentiles(rows, hists)
    return columns_to_features(rows)


def columns_to_features(rows: np.ndarray) -> dict[str, np.ndarray]:
    """(B, len(STAIN_COLUMNS)) -> the dict layout of :func:`stain_features_np`."""
    out = {"tissue_fraction": rows[:, 0], "mean_od": rows[:, 1], "h_gradient_od_per_um": rows[:, 2],
           "mean": rows[:, 3:6], "std": rows[:, 6:9]}
    for i, p in enumerate(PERCENTILES):
        out[f"p{p}"] = rows[:, 9 + 3 * i:12 + 3 * i]
    return out
