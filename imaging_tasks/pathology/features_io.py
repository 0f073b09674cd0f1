"""Per-tile features on disk: Parquet tables, slide-level aggregates and a multiple-instance-learning bag.

A slide of 100,000 tiles with a 1,536-wide embedding is ~600 MB of floats: it never sits in memory or in one
JSON.  Tiles are written as Parquet parts while they are computed (one per range of tiles, so a retried task
keeps the parts it already wrote), merged part by part into one ``tile_features.parquet``, and summarised by
streaming over its record batches.

The table (one row per planned tile, in plan order) -- :data:`TILE_COLUMNS` plus, with an encoder,
``embedding`` (fixed-size list of float32, the encoder's output dimension).  The schema's metadata
(``imaging_tasks`` key, JSON) names the layout version, the slide's µm/px, the tile grid and the encoder
(name, sha256, dimension), so a reader never has to guess what a column means.

The bag (``mil_bag.npz``, plain ``numpy.load``, no pickle): ``features`` (N, D) float32 -- the embedding, or
the built-in stain vector (:data:`BAG_BUILTIN`) when no encoder ran -- of the N tiles that passed tile QC,
``coords_level0_px`` (N, 2) int64 (x, y of each tile's top-left corner), ``tile_index`` (N,) int32 (row in
the table) and ``meta`` (a JSON string).  It is what CLAM/TransMIL-style trainers read per slide.
"""
from __future__ import annotations

import heapq
import json
import zipfile
from pathlib import Path

import numpy as np

from imaging_tasks.pathology.tiles import PERCENTILES, STAINS

SCHEMA_VERSION = "imaging-tasks/pathology-tiles/1"
META_KEY = b"imaging_tasks"
PART_TILES = 4096  # tiles per Parquet part: the unit of resumption for a retried feature task
ROW_GROUP = 1024

# name -> (arrow type name, unit/meaning); the built-in columns every row has, in this order.
TILE_COLUMNS: dict[str, tuple[str, str]] = {
    "tile_index": ("int32", "row in the plan's tile list"),
    "x": ("int64", "level-0 px of the tile's left edge"),
    "y": ("int64", "level-0 px of the tile's top edge"),
    "level": ("int16", "pyramid level the tile was read from"),
    "x_mm": ("float64", "mm from the slide's left edge"),
    "y_mm": ("float64", "mm from the slide's top edge"),
    "tissue_fraction": ("float32", "share of the tile's pixels that are tissue (summed OD > 0.15)"),
    "mean_od": ("float32", "mean summed optical density over tissue pixels"),
    "h_gradient_od_per_um": ("float32", "mean haematoxylin Sobel gradient over tissue pixels, OD/µm"),
    **{f"{s}_od_{stat}": ("float32", f"{s} optical density over tissue pixels: {stat}")
       for s in STAINS for stat in ("mean", "std", *(f"p{p}" for p in PERCENTILES))},
    "focus_laplacian_var": ("float32", "variance of the Laplacian of grey (focus; low = blurred)"),
    "pen_fraction": ("float32", "share of the tile's pixels that are marker ink"),
    "fold_fraction": ("float32", "share of the tile's pixels that are folded (double-thickness) tissue"),
    "out_of_focus": ("bool", "tile QC: blurred"),
    "pen_mark": ("bool", "tile QC: marker ink"),
    "fold": ("bool", "tile QC: tissue fold"),
    "qc_pass": ("bool", "tile QC: none of the flags"),
}
QC_FLAGS = ("out_of_focus", "pen_mark", "fold")
# Computed per tile by the reader (everything except the plan's own columns).
COMPUTED_COLUMNS = tuple(c for c in TILE_COLUMNS if c not in ("tile_index", "x", "y", "level", "x_mm", "y_mm"))
# The bag's feature vector when no encoder ran: stain statistics and texture, in this order.
BAG_BUILTIN = ("tissue_fraction", "mean_od", "h_gradient_od_per_um",
               *(f"{s}_od_{stat}" for s in STAINS for stat in ("mean", "std", *(f"p{p}" for p in PERCENTILES))))
DAB_POSITIVE_OD = 0.15  # tile mean DAB OD above which a tile counts as DAB-positive


def tile_schema(embedding_dim: int | None = None, meta: dict | None = None):
    """The Arrow schema of the tile table (``embedding`` only with an encoder), metadata attached."""
    import pyarrow as pa

    fields = [pa.field(name, pa.bool_() if kind == "bool" else getattr(pa, kind)(), nullable=False)
              for name, (kind, _) in TILE_COLUMNS.items()]
    if embedding_dim:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), int(embedding_dim)), nullable=False))
    metadata = {META_KEY: json.dumps({"schema": SCHEMA_VERSION, **(meta or {})}).encode()}
    return pa.schema(fields, metadata=metadata)


def table_meta(path: Path) -> dict:
    """The ``imaging_tasks`` metadata of a tile table or part."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def tile_table(start: int, tiles: list, columns: dict, *, slide_mpp: float, embeddings: np.ndarray | None = None,
               meta: dict | None = None):
    """Rows ``start .. start + len(tiles)`` of a slide's table as an Arrow table (plan columns + computed)."""
    import pyarrow as pa

    n = len(tiles)
    arr = np.asarray(tiles, dtype=np.int64).reshape(n, -1)
    missing = [c for c in COMPUTED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"tile columns missing: {', '.join(missing)}")
    values = {"tile_index": np.arange(start, start + n, dtype=np.int32), "x": arr[:, 0], "y": arr[:, 1],
              "level": arr[:, 2].astype(np.int16),
              "x_mm": np.round(arr[:, 0] * slide_mpp / 1000, 4), "y_mm": np.round(arr[:, 1] * slide_mpp / 1000, 4),
              **{c: columns[c] for c in COMPUTED_COLUMNS}}
    dim = None if embeddings is None else int(np.asarray(embeddings).shape[1])
    schema = tile_schema(dim, meta)
    arrays = [pa.array(np.asarray(values[f.name]).reshape(n), type=f.type) for f in schema if f.name != "embedding"]
    if dim:
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), type=pa.float32())
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, dim))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_table(table, path: Path) -> Path:
    """One Parquet file (zstd), written beside and renamed into place: a killed writer leaves no half part."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP)
    tmp.replace(path)
    return path


def merge_parts(parts: list[Path], out: Path, *, n_tiles: int) -> Path:
    """Concatenate parts (in tile order) into one table, a part at a time; every tile exactly once."""
    import pyarrow.parquet as pq

    parts = sorted(parts, key=lambda p: table_meta(p).get("start", 0))
    expected = 0
    writer = None
    try:
        for part in parts:
            table = pq.read_table(part)
            first = int(table.column("tile_index")[0].as_py()) if table.num_rows else expected
            if first != expected:
                raise ValueError(f"tile feature part {part.name} starts at tile {first}, expected {expected}: a part "
                                 "is missing or repeated; rerun the tile_features task of this slide")
            expected += table.num_rows
            if writer is None:
                meta = {k: v for k, v in table_meta(part).items() if k not in ("start", "stop")}
                schema = table.schema.with_metadata({META_KEY: json.dumps(meta).encode()})
                tmp = Path(out).with_name(Path(out).name + ".partial")
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata), row_group_size=ROW_GROUP)
    finally:
        if writer is not None:
            writer.close()
    if expected != n_tiles:
        raise ValueError(f"tile features cover {expected} of {n_tiles} planned tiles: rerun the tile_features task "
                         "of this slide")
    if writer is None:  # a slide with no tile: an empty table of the right shape
        write_table(tile_schema(None, {}).empty_table(), out)
    else:
        Path(out).with_name(Path(out).name + ".partial").replace(out)
    return Path(out)


# --------------------------------------------------------------------------------------------- aggregates
def _batches(path: Path, columns: list[str]):
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(path).iter_batches(batch_size=8192, columns=columns)


def summarize_table(plan: dict, path: Path, *, hotspots: int = 3) -> dict:
    """Slide-level metrics and findings from the plan and the tile table, streaming (bounded memory).

    Stain summaries are over tiles that pass tile QC (a pen mark or a fold is not the patient's stain); when
    none pass, over every tile.  Means are weighted by each tile's tissue fraction.  Returns ``metrics``,
    ``findings`` and ``embedding_mean`` (None without an encoder).
    """
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    stat_cols = ["h_gradient_od_per_um", "hematoxylin_od_mean", "eosin_od_mean", "dab_od_mean"]
    wanted = ["tile_index", "x_mm", "y_mm", "qc_pass", "tissue_fraction", *QC_FLAGS, *stat_cols]
    n = n_pass = 0
    flags = dict.fromkeys(QC_FLAGS, 0)
    # Keyed by "QC-passing tiles only" (True) or every tile (False): which applies is known only at the end.
    acc = {k: {"tiles": 0, "weight": 0.0, "tissue": 0.0, "dab_positive": 0,
               "weighted": dict.fromkeys(stat_cols, 0.0), "plain": dict.fromkeys(stat_cols, 0.0)}
           for k in (True, False)}
    top: dict[bool, list] = {True: [], False: []}
    emb_sum = None
    for batch in _batches(path, wanted + (["embedding"] if "embedding" in names else [])):
        cols = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in wanted}
        ok = cols["qc_pass"].astype(bool)
        n += len(ok)
        n_pass += int(ok.sum())
        for f in QC_FLAGS:
            flags[f] += int(cols[f].sum())
        w = cols["tissue_fraction"].astype(np.float64)
        for passing, sel in ((True, ok), (False, np.ones_like(ok))):
            a = acc[passing]
            a["tiles"] += int(sel.sum())
            a["weight"] += float(w[sel].sum())
            a["dab_positive"] += int((cols["dab_od_mean"][sel] > DAB_POSITIVE_OD).sum())
            for c in stat_cols:
                v = cols[c][sel].astype(np.float64)
                a["weighted"][c] += float((w[sel] * v).sum())
                a["plain"][c] += float(v.sum())
            idx = np.flatnonzero(sel)
            order = np.lexsort((cols["tile_index"][idx], -cols["hematoxylin_od_mean"][idx]))
            for i in idx[order[:hotspots]]:  # this batch's best candidates only
                item = (float(cols["hematoxylin_od_mean"][i]), -int(cols["tile_index"][i]),
                        {"x_mm": float(cols["x_mm"][i]), "y_mm": float(cols["y_mm"][i]),
                         "hematoxylin_od_mean": float(cols["hematoxylin_od_mean"][i]),
                         "tissue_fraction": float(w[i])})
                (heapq.heappush if len(top[passing]) < hotspots else heapq.heappushpop)(top[passing], item)
        if "embedding" in names and ok.any():
            emb = batch.column("embedding")
            dim = emb.type.list_size
            values = emb.values.to_numpy().reshape(-1, dim)[ok].astype(np.float64)
            emb_sum = values.sum(axis=0) if emb_sum is None else emb_sum + values.sum(axis=0)

    metrics = list(plan["metrics"])
    findings = list(plan.get("findings", []))
    metrics += [{"name": "n_tiles_computed", "value": float(n), "unit": "count"},
                {"name": "n_tiles_qc_pass", "value": float(n_pass), "unit": "count"},
                *({"name": f"{f}_tile_fraction", "value": flags[f] / n if n else 0.0, "unit": "fraction"}
                  for f in QC_FLAGS)]
    if n:
        a = acc[bool(n_pass)]
        # weighted by tissue fraction; every tile alike in the (unplanned) case of no tissue pixel at all
        sums, weight = (a["weighted"], a["weight"]) if a["weight"] > 0 else (a["plain"], float(a["tiles"]))
        means = {st: sums[f"{st}_od_mean"] / weight for st in STAINS}
        metrics += [{"name": f"{st}_od_mean", "value": means[st], "unit": "OD"} for st in STAINS]
        metrics += [
            {"name": "hematoxylin_eosin_ratio", "value": means["hematoxylin"] / max(means["eosin"], 1e-6),
             "unit": "ratio"},
            {"name": "dab_positive_tile_fraction", "value": a["dab_positive"] / a["tiles"], "unit": "fraction"},
            {"name": "h_gradient_od_per_um", "value": sums["h_gradient_od_per_um"] / weight, "unit": "OD/um"},
            {"name": "tile_tissue_fraction_mean", "value": a["weight"] / a["tiles"], "unit": "fraction"},
        ]
        # The most haematoxylin-dense tiles: where nuclei crowd (tumour, inflammation), for review first.
        for i, (_, _, row) in enumerate(sorted(top[bool(n_pass)], key=lambda t: (-t[0], -t[1]))):
            findings.append({"kind": "hematoxylin_hotspot", "index": i, **row})
    return {"metrics": metrics, "findings": findings,
            "embedding_mean": None if emb_sum is None else (emb_sum / n_pass).astype(np.float32)}


# --------------------------------------------------------------------------------------------- MIL bag
def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_mil_bag(table_path: Path, out: Path, *, meta: dict | None = None) -> dict:
    """The QC-passing tiles' feature vectors and coordinates as an ``.npz`` (see the module docstring), written
    batch by batch into the archive (memory: one batch, whatever the slide size)."""
    import pyarrow.parquet as pq

    names = pq.read_schema(table_path).names
    use_embedding = "embedding" in names
    cols = ["tile_index", "x", "y", "qc_pass"] + (["embedding"] if use_embedding else list(BAG_BUILTIN))
    n = dim = 0
    for batch in _batches(table_path, cols):
        ok = batch.column("qc_pass").to_numpy(zero_copy_only=False).astype(bool)
        n += int(ok.sum())
        dim = batch.column("embedding").type.list_size if use_embedding else len(BAG_BUILTIN)
    if not dim:
        dim = len(BAG_BUILTIN)

    def rows(batch):
        ok = batch.column("qc_pass").to_numpy(zero_copy_only=False).astype(bool)
        if use_embedding:
            feats = batch.column("embedding").values.to_numpy().reshape(-1, dim)[ok]
        else:
            feats = np.stack([batch.column(c).to_numpy() for c in BAG_BUILTIN], axis=1)[ok]
        xy = np.stack([batch.column("x").to_numpy(), batch.column("y").to_numpy()], axis=1)[ok]
        return (np.ascontiguousarray(feats, dtype=np.float32), np.ascontiguousarray(xy, dtype=np.int64),
                np.ascontiguousarray(batch.column("tile_index").to_numpy()[ok], dtype=np.int32))

    info = {"schema": "imaging-tasks/mil-bag/1", "n_tiles": n, "feature_dim": dim,
            "features": "embedding" if use_embedding else list(BAG_BUILTIN), **(meta or {})}
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for k, (name, dtype, shape) in enumerate((("features", np.float32, (n, dim)),
                                                  ("coords_level0_px", np.int64, (n, 2)),
                                                  ("tile_index", np.int32, (n,)))):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                fh.write(_npy_header(np.dtype(dtype), shape))
                for batch in _batches(table_path, cols):
                    fh.write(rows(batch)[k].tobytes())
        text = json.dumps(info)
        with zf.open("meta.npy", "w") as fh:
            arr = np.array(text)
            fh.write(_npy_header(arr.dtype, ()))
            fh.write(arr.tobytes())
    tmp.replace(out)
    return info


__all__ = ["BAG_BUILTIN", "COMPUTED_COLUMNS", "PART_TILES", "QC_FLAGS", "TILE_COLUMNS", "merge_parts",
           "summarize_table", "table_meta", "tile_schema", "tile_table", "write_mil_bag", "write_table"]
