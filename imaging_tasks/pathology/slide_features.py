"""Features of one slide: the tile reader's built-in columns, plus an encoder's embedding, as Parquet parts.

The same functions serve the DAG (``fanout``: one task per slide writes parts to the work area, the next one
merges and publishes) and the in-process :func:`process_study` (CLI, tests).  Parts cover fixed ranges of the
plan's tiles (:data:`~.features_io.PART_TILES`), so a task retried after a kill computes only the ranges it had
not finished.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from imaging_tasks.errors import BadInput
from imaging_tasks.pathology import features_io

log = logging.getLogger(__name__)
READ_CHUNK = 128  # tiles per worker round trip (divides PART_TILES)


def part_ranges(n_tiles: int, size: int | None = None) -> list[tuple[int, int]]:
    size = size or features_io.PART_TILES
    return [(a, min(a + size, n_tiles)) for a in range(0, n_tiles, size)]


def part_name(start: int, stop: int) -> str:
    return f"part-{start:08d}-{stop:08d}.parquet"


class Encoder:
    """A loaded bring-your-own encoder and its device, checked against the run's tile grid once per slide."""

    def __init__(self, uri: str, *, device, target_mpp: float, tile_px: int):
        from imaging_tasks.pathology.encoder import check_encoder_grid, encoder_record, load_encoder

        self.model, self.spec = load_encoder(uri, device=device)
        check_encoder_grid(self.spec, target_mpp=target_mpp, tile_px=tile_px)
        self.device = device
        self.record = encoder_record(self.spec)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        from imaging_tasks.pathology.encoder import embed

        return embed(self.model, self.spec, pixels, device=self.device)


def iter_parts(slide_path: Path, tiles: list, ranges: list[tuple[int, int]], *, slide_mpp: float, target_mpp: float,
               tile_px: int, encoder: Encoder | None = None, workers: int | None = None, meta: dict | None = None,
               progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, int, object]]:
    """``(start, stop, Arrow table)`` for each range of tiles, in order, read once by the worker pool."""
    from imaging_tasks.pathology.reader import tile_chunks

    todo = [t for a, b in ranges for t in tiles[a:b]]
    if not todo:
        return
    pending: list[tuple[dict, np.ndarray | None]] = []
    held = 0
    k = 0  # the range being filled
    chunks = tile_chunks(slide_path, todo, target_mpp=target_mpp, tile_px=tile_px, workers=workers,
                         chunk=READ_CHUNK, with_pixels=encoder is not None)
    try:
        for chunk in chunks:
            emb = encoder(chunk.pixels) if encoder is not None else None
            pending.append((chunk.columns, emb))
            held += len(chunk)
            if progress is not None:
                progress(len(chunk))
            while k < len(ranges) and held >= ranges[k][1] - ranges[k][0]:
                a, b = ranges[k]
                cols, emb_part, pending, held = _take(pending, b - a)
                part_meta = {**(meta or {}), "start": a, "stop": b,
                             "encoder": encoder.record if encoder is not None else None}
                yield a, b, features_io.tile_table(a, tiles[a:b], cols, slide_mpp=slide_mpp, embeddings=emb_part,
                                                   meta=part_meta)
                k += 1
    finally:
        chunks.close()
    if k != len(ranges):
        raise BadInput("unreadable_slide", f"the tile reader stopped after {k} of {len(ranges)} ranges of tiles; "
                       "the slide may be truncated: re-scan or re-export it")


def _take(pending: list, n: int):
    """The first ``n`` tiles' columns (and embeddings) out of the buffered chunks; the rest stays buffered."""
    cols_parts, emb_parts, rest, need = [], [], [], n
    for cols, emb in pending:
        size = len(next(iter(cols.values())))
        if need <= 0:
            rest.append((cols, emb))
            continue
        take = min(size, need)
        cols_parts.append({c: v[:take] for c, v in cols.items()})
        emb_parts.append(None if emb is None else emb[:take])
        if take < size:
            rest.append(({c: v[take:] for c, v in cols.items()}, None if emb is None else emb[take:]))
        need -= take
    columns = {c: np.concatenate([p[c] for p in cols_parts]) for c in cols_parts[0]}
    emb = None if emb_parts[0] is None else np.concatenate(emb_parts)
    return columns, emb, rest, sum(len(next(iter(c.values()))) for c, _ in rest)


def slide_outputs(plan: dict, table: Path, out_dir: Path, *, qc_base: Path | None = None) -> dict:
    """From the merged tile table: slide summary, MIL bag and, over the plan's tissue picture ``qc_base``, the
    kept and rejected tiles (``qc_tissue.png`` in ``out_dir``)."""
    summary = features_io.summarize_table(plan, table)
    meta = features_io.table_meta(table)
    bag = features_io.write_mil_bag(table, out_dir / "mil_bag.npz",
                                    meta={"slide_mpp": plan["mpp"], "target_mpp": plan["target_mpp"],
                                          "tile_px": plan["tile_px"], "encoder": meta.get("encoder")})
    findings = summary["findings"]
    if summary["embedding_mean"] is not None:
        enc = meta.get("encoder") or {}
        findings.append({"kind": "slide_embedding", "index": 0, "model": enc.get("name"),
                         "model_sha256": enc.get("sha256"), "dim": int(summary["embedding_mean"].shape[0]),
                         "n_tiles": bag["n_tiles"],
                         "mean": [round(float(v), 6) for v in summary["embedding_mean"]]})
    outputs = ["tile_features.parquet", "mil_bag.npz"]
    if qc_base is not None and Path(qc_base).exists():
        _tile_qc_png(plan, table, Path(qc_base), out_dir / "qc_tissue.png")
        outputs.append("qc_tissue.png")
    return {"metrics": summary["metrics"], "findings": findings, "outputs": outputs}


def _tile_qc_png(plan: dict, table: Path, base: Path, out: Path) -> None:
    import pyarrow.parquet as pq
    from PIL import Image

    from imaging_tasks.pathology.tile_qc import draw_tile_qc

    rgb = np.asarray(Image.open(base).convert("RGB"))
    t = pq.read_table(table, columns=["x", "y", *features_io.QC_FLAGS])  # a few columns: ~20 bytes a tile
    xy = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], axis=1)
    flags = {f: t.column(f).to_numpy(zero_copy_only=False).astype(bool) for f in features_io.QC_FLAGS}
    ds_x, ds_y = plan["qc_downsample"]  # level-0 px per picture px
    draw_tile_qc(rgb, ds_x, ds_y, plan["tile_side_level0_px"], xy, flags).save(out)


def process_study(files: list[Path], out_dir: Path, *, device=None, target_mpp: float = 1.0, tile_px: int = 256,
                  min_tissue_fraction: float = 0.5, encoder_uri: str | None = None, workers: int | None = None,
                  **_options) -> dict:
    """Plan, features, table, bag and summary of one slide in process (the DAG splits the same work in three
    tasks per slide: see :mod:`.fanout`)."""
    import tempfile

    from imaging_tasks.device import pick_device
    from imaging_tasks.slide_files import main_slide_file
    from imaging_tasks.pathology.tiles import plan_tiles

    dev = pick_device(str(device) if device is not None else None)
    slide = main_slide_file([Path(f) for f in files])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slide-") as tmp:
        plan = plan_tiles(slide, Path(tmp), target_mpp=target_mpp, tile_px=tile_px,
                          min_tissue_fraction=min_tissue_fraction)
        (Path(tmp) / "tissue_mask.png").replace(out_dir / "tissue_mask.png")
        encoder = Encoder(encoder_uri, device=dev, target_mpp=target_mpp, tile_px=tile_px) if encoder_uri else None
        parts = []
        for a, b, table in iter_parts(slide, plan["tiles"], part_ranges(len(plan["tiles"])), slide_mpp=plan["mpp"],
                                      target_mpp=target_mpp, tile_px=tile_px, encoder=encoder, workers=workers,
                                      meta=plan_meta(plan)):
            parts.append(features_io.write_table(table, Path(tmp) / part_name(a, b)))
        table = features_io.merge_parts(parts, out_dir / "tile_features.parquet", n_tiles=len(plan["tiles"]))
        result = slide_outputs(plan, table, out_dir, qc_base=Path(tmp) / "qc_tissue.png")
    return {**result, "outputs": ["tissue_mask.png", *result["outputs"]], "device": str(dev)}


def plan_meta(plan: dict) -> dict:
    """What the tile table's metadata says about the grid (the encoder is added per part)."""
    return {"slide_mpp": plan["mpp"], "target_mpp": plan["target_mpp"], "tile_px": plan["tile_px"],
            "tile_side_level0_px": plan["tile_side_level0_px"]}
