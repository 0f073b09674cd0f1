"""Read a slide's tiles and compute their built-in columns in worker processes, in order, memory bounded.

``tile_chunks`` is the one way tiles are read for features: each worker process opens the slide once (pool
initializer), reads its chunk of tiles at their planned level and size, resizes them to ``tile_px``, and
computes the stain statistics (:mod:`.stain`) and QC columns (:mod:`.tile_qc`) right there, so only ~30 numbers
per tile travel back (plus the pixels when an encoder needs them).  Chunks come back in tile order with at most
``workers * prefetch`` chunks' worth of tiles in flight, so a 100,000-tile slide holds a few chunks in memory,
never the slide.  Work goes to the workers in units of ``WORK_UNIT`` tiles (reassembled into the caller's
chunks), so the last units balance across workers and the first results come early.

Why processes: a tile is ~100 small numpy / PIL calls whose Python glue holds the GIL, so threads would queue
on it.  Why ``forkserver`` (``spawn`` where there is none): the caller is often an Airflow
task, which runs threads (heartbeats, log shipping); ``fork`` from a threaded process copies locks held by
other threads and can deadlock the child.  The fork server is a fresh single-threaded interpreter started once
per caller, with numpy / PIL / OpenSlide already imported (preload), so workers start in milliseconds; ``spawn``
would re-import everything per worker (~1 s).  A daemonic caller (which may not have children) reads in
process instead, with a warning.

Resizing (read size != ``tile_px``): PIL ``resize(BILINEAR)`` without ``reducing_gap``, i.e. a triangle filter
whose support widens with the downscale factor: the same antialiased bilinear as torch's
``interpolate(mode="bilinear", antialias=True)`` of the torch path it replaced (``tests/pathology_reference.py``;
torch's implementation follows PIL's); PIL rounds in 8-bit fixed point, so pixels differ from torch by at most 1 grey level (tested).
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import types
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from imaging_tasks.errors import BadInput
from imaging_tasks.pathology import stain, tile_qc

log = logging.getLogger(__name__)

NUMERIC_COLUMNS = tuple(stain.STAIN_COLUMNS) + tile_qc.QC_COLUMNS
COLUMNS = NUMERIC_COLUMNS + tile_qc.FLAG_COLUMNS
MAX_DEFAULT_WORKERS = 4


@dataclass
class TileChunk:
    """Tiles ``start`` .. ``start + n`` of the list given to :func:`tile_chunks`: per-tile ``columns`` (float64
    arrays, the flags bool) and, when asked for, their ``pixels`` (n, tile_px, tile_px, 3) uint8 RGB."""

    start: int
    columns: dict[str, np.ndarray]
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


# ---------------------------------------------------------------------------------------------- one slide
def reference_od(slide) -> float:
    """The slide's single-layer tissue OD for the fold test (``tile_qc.FOLD_OD_RATIO`` times it): median summed
    OD of the overview's non-glass, non-ink pixels (summed OD > ``TISSUE_OD``), from one low-resolution read."""
    from imaging_tasks.pathology.tiles import TISSUE_OD, _overview

    rgb, _, _ = _overview(slide)
    step = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))
    rgb = rgb[::step, ::step]
    return tile_qc.slide_reference_od(rgb, stain.OD_LUT[rgb].sum(axis=-1) > TISSUE_OD)


def _read_tile(slide, tile, tile_px: int):
    """One planned tile ``[x, y, level, w, h]`` at tile_px: (PIL image, (tile_px, tile_px, 3|4) uint8 array whose
    first three channels are RGB).

    Same pixels as ``tiles._read_rgb`` (transparent areas, outside the scan, blended to glass-white) followed by
    the resize in the module docstring, without its per-tile RGB copy: an opaque read (the usual case) is used
    as OpenSlide returns it (RGBA)."""
    import openslide
    from PIL import Image

    x, y, level, w, h = (int(v) for v in tile[:5])
    try:
        img = slide.read_region((x, y), level, (w, h))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise _unreadable_message(exc) from None
    rgba = np.asarray(img)
    if not np.all(rgba.view(np.uint32) >= np.uint32(0xFF000000)):  # alpha is the high byte (little-endian RGBA)
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgba = (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
        img = Image.fromarray(rgba)
    if (w, h) != (tile_px, tile_px):
        img = img.resize((tile_px, tile_px), Image.BILINEAR)
        rgba = np.asarray(img)
    return img, rgba


def compute_chunk(slide, tiles, *, target_mpp: float, tile_px: int, reference: float,
                  with_pixels: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read and compute one chunk of tiles with an open slide: (columns, pixels or None)."""
    values = np.empty((len(tiles), len(NUMERIC_COLUMNS)))
    hists = np.empty((len(tiles), 3, stain.PCT_BINS + 2), np.int64)
    pixels = np.empty((len(tiles), tile_px, tile_px, 3), np.uint8) if with_pixels else None
    n_stain = len(stain.STAIN_COLUMNS)
    for i, tile in enumerate(tiles):
        img, rgb = _read_tile(slide, tile, tile_px)
        od, od_sum, tissue = stain.tile_od(rgb)
        values[i, :n_stain] = stain.stain_vector(od, od_sum, tissue, target_mpp, hist_out=hists[i])
        grey = np.asarray(img.convert("L"), dtype=np.float32)  # ITU-R 601 luma of R, G, B (alpha ignored)
        values[i, n_stain:] = tile_qc.qc_vector(od, od_sum, tissue, grey, target_mpp, reference)
        if pixels is not None:
            pixels[i] = rgb[..., :3]
    stain.fill_percentiles(values[:, :n_stain], hists)  # (a view: filled in place)
    columns = dict(zip(NUMERIC_COLUMNS, values.T.copy(), strict=True))
    columns.update(tile_qc.qc_flags(columns))
    return columns, pixels


# ---------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _unreadable_message(exc: Exception) -> BadInput:
    return BadInput("unreadable_slide", f"a tile of the slide cannot be read ({type(exc).__name__}); it is "
                    "truncated, corrupt or not a whole-slide format — re-scan or re-export it")


def _init_worker(path: str, reference: float | None) -> None:
    """Pool initializer: one OpenSlide handle (and the slide's reference OD) per worker process.  A failure is
    kept and reported by the first chunk, as BadInput in the caller (an initializer exception would only
    break the pool with no reason)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # one core per worker: no BLAS threads oversubscribing the cores the workers fill
    except Exception:  # noqa: BLE001 - optional (installed with scikit-learn); numpy's products here are small
        pass
    _WORKER.clear()
    try:
        _WORKER["slide"], _WORKER["reference"] = _open(Path(path), reference)
    except BadInput as exc:
        _WORKER["error"] = (exc.reason, exc.message)


def _open(path: Path, reference: float | None):
    import openslide

    from imaging_tasks.pathology.tiles import open_slide

    slide = open_slide(path)
    try:
        ref = reference if reference is not None else reference_od(slide)
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise _unreadable_message(exc) from None
    return slide, ref


def _work(start: int, tiles: list, target_mpp: float, tile_px: int, with_pixels: bool):
    """One chunk in a worker: ("ok", start, columns, pixels) or ("bad", reason, message) for a BadInput."""
    import openslide

    if "error" in _WORKER:
        return ("bad", *_WORKER["error"])
    try:
        columns, pixels = compute_chunk(_WORKER["slide"], tiles, target_mpp=target_mpp, tile_px=tile_px,
                                        reference=_WORKER["reference"], with_pixels=with_pixels)
    except BadInput as exc:  # not picklable as such (two-argument constructor): sent as its parts
        return ("bad", exc.reason, exc.message)
    except (openslide.OpenSlideError, OSError) as exc:
        bad = _unreadable_message(exc)
        return ("bad", bad.reason, bad.message)
    return ("ok", start, columns, pixels)


def _context():
    """forkserver where the platform has it (numpy, PIL, OpenSlide preloaded in the server), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["imaging_tasks.pathology.reader", "openslide", "PIL.Image", "threadpoolctl"])
        return ctx
    return multiprocessing.get_context("spawn")


@contextmanager
def _caller_main_hidden():
    """While workers start, hide the caller's ``__main__`` from multiprocessing's preparation data.

    spawn / forkserver children re-import the parent's main module (as ``__mp_main__``) before running
    anything: for an Airflow task that is the ``airflow`` command, i.e. all of Airflow (seconds and hundreds of
    MB per worker), and for a script without a ``__main__`` guard it would re-run the script.  The workers only
    need this module, so they are started with a bare ``__main__`` in place for those few milliseconds."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


# ---------------------------------------------------------------------------------------------- entry
def tile_chunks(slide_path: Path, tiles: list, *, target_mpp: float, tile_px: int, workers: int | None = None,
                chunk: int = 128, with_pixels: bool = False, prefetch: int = 2,
                reference: float | None = None) -> Iterator[TileChunk]:
    """Columns (and optionally pixels) of ``tiles`` (``[x, y, level, w, h]`` as ``plan_tiles`` gives them) in
    chunks of ``chunk`` tiles, in order.

    ``workers``: processes reading and computing (default min(cores, 4)); 0 or 1 reads in this process (tests,
    debugging; same numbers).  At most ``workers * prefetch`` chunks are in flight.  ``reference``: the slide's
    single-layer OD for the fold test; by default computed from the slide's overview (:func:`reference_od`).
    Columns: :data:`COLUMNS`.  A slide or tile that cannot be read raises BadInput (``unreadable_slide``).
    Closing the generator early (``.close()``, ``break``) stops the workers and waits for the chunks they are on.
    """
    if chunk < 1 or prefetch < 1 or tile_px < 1 or not target_mpp > 0:
        raise ValueError("chunk, prefetch and tile_px must be >= 1 and target_mpp > 0")
    tiles = [list(t) for t in tiles]
    n_workers = default_workers() if workers is None else int(workers)
    if n_workers > 1 and multiprocessing.current_process().daemon:
        log.warning("tile_chunks: a daemonic process may not start workers; reading %d tiles in process",
                    len(tiles))
        n_workers = 1
    starts = range(0, len(tiles), chunk)
    if n_workers <= 1:
        yield from _in_process(Path(slide_path), tiles, starts, chunk, target_mpp, tile_px, with_pixels, reference)
        return
    yield from _pooled(Path(slide_path), tiles, starts, chunk, target_mpp, tile_px, with_pixels, reference,
                       min(n_workers, max(1, math.ceil(len(tiles) / chunk))), prefetch)


def _in_process(path, tiles, starts, chunk, target_mpp, tile_px, with_pixels, reference):
    import openslide

    if not tiles:
        return
    slide, ref = _open(path, reference)
    try:
        for start in starts:
            try:
                columns, pixels = compute_chunk(slide, tiles[start:start + chunk], target_mpp=target_mpp,
                                                tile_px=tile_px, reference=ref, with_pixels=with_pixels)
            except (openslide.OpenSlideError, OSError) as exc:
                raise _unreadable_message(exc) from None
            yield TileChunk(start, columns, pixels)
    finally:
        slide.close()


WORK_UNIT = 32  # tiles per task sent to a worker: small enough that the last ones balance across workers


def _concat(parts: list) -> tuple[dict, np.ndarray | None]:
    if len(parts) == 1:
        return parts[0]
    columns = {k: np.concatenate([c[k] for c, _ in parts]) for k in parts[0][0]}
    pixels = None if parts[0][1] is None else np.concatenate([p for _, p in parts])
    return columns, pixels


def _pooled(path, tiles, starts, chunk, target_mpp, tile_px, with_pixels, reference, n_workers, prefetch):
    """Work goes out in units of <= WORK_UNIT tiles (balance, early first results) and comes back reassembled into
    the caller's chunks; at most ``n_workers * prefetch * chunk`` tiles are in flight."""
    from concurrent.futures import ProcessPoolExecutor

    unit = max(1, min(chunk, WORK_UNIT))
    units = [(a, min(a + unit, start + chunk, len(tiles))) for start in starts
             for a in range(start, min(start + chunk, len(tiles)), unit)]
    max_units = max(1, n_workers * prefetch * math.ceil(chunk / unit))
    pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=_context(), initializer=_init_worker,
                               initargs=(str(path), reference))
    pending: deque = deque()  # (first tile, future) in tile order
    todo = iter(units)

    def submit(a: int, b: int) -> None:
        pending.append((a, pool.submit(_work, a, tiles[a:b], target_mpp, tile_px, with_pixels)))

    try:
        with _caller_main_hidden():  # the workers start during the first submissions
            for a, b in todo:
                submit(a, b)
                if len(pending) >= max_units:
                    break
        parts: list = []
        chunk_start = 0
        while pending:
            a, future = pending.popleft()
            result = future.result()
            nxt = next(todo, None)
            if nxt is not None:
                submit(*nxt)
            if result[0] == "bad":
                raise BadInput(result[1], result[2])
            parts.append(result[2:])
            done = a + len(next(iter(result[2].values())))
            if done - chunk_start >= chunk or done == len(tiles):
                columns, pixels = _concat(parts)
                yield TileChunk(chunk_start, columns, pixels)
                parts, chunk_start = [], done
    finally:
        for _, f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
