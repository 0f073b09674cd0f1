"""The tile table (Parquet), its parts, the slide summary and the MIL bag, against values computed by hand."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imaging_tasks.pathology import features_io as fio


def _columns(rng: np.random.Generator, n: int) -> dict:
    cols = {c: rng.uniform(0.0, 1.0, n).astype(np.float32) for c in fio.COMPUTED_COLUMNS}
    for flag in fio.QC_FLAGS:
        cols[flag] = rng.uniform(size=n) < 0.1
    cols["qc_pass"] = ~(cols["out_of_focus"] | cols["pen_mark"] | cols["fold"])
    return cols


def _tiles(n: int, side: int = 512) -> list:
    return [[(i % 40) * side, (i // 40) * side, 0, side, side] for i in range(n)]


def _parts(tmp_path, n: int, dim: int | None, rng, *, size: int = 300):
    tiles, parts, cols_all, emb_all = _tiles(n), [], [], []
    for a in range(0, n, size):
        b = min(a + size, n)
        cols = _columns(rng, b - a)
        emb = rng.normal(size=(b - a, dim)).astype(np.float32) if dim else None
        table = fio.tile_table(a, tiles[a:b], cols, slide_mpp=0.5, embeddings=emb,
                               meta={"start": a, "stop": b, "slide_mpp": 0.5, "encoder": {"name": "tiny"} if dim else None})
        parts.append(fio.write_table(table, tmp_path / f"part-{a:08d}.parquet"))
        cols_all.append(cols)
        emb_all.append(emb)
    cols = {c: np.concatenate([p[c] for p in cols_all]) for c in cols_all[0]}
    return tiles, parts, cols, (np.concatenate(emb_all) if dim else None)


def test_table_schema_rows_and_metadata(tmp_path):
    rng = np.random.default_rng(1)
    tiles, parts, cols, emb = _parts(tmp_path, 1000, 16, rng)
    out = fio.merge_parts(parts[::-1], tmp_path / "tile_features.parquet", n_tiles=1000)  # any order in
    table = pq.read_table(out)
    assert table.num_rows == len(tiles) == 1000
    assert table.schema.names == [*fio.TILE_COLUMNS, "embedding"]
    emb_type = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == 16 and emb_type.value_type == pa.float32()
    assert table.column("tile_index").to_pylist() == list(range(1000))
    assert table.column("x").to_pylist() == [t[0] for t in tiles] and table.column("y").to_pylist() == [t[1] for t in tiles]
    assert table.column("x_mm").to_numpy() == pytest.approx([t[0] * 0.5 / 1000 for t in tiles])
    assert np.array_equal(table.column("pen_fraction").to_numpy(), cols["pen_fraction"])
    assert np.array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), emb)
    meta = fio.table_meta(out)
    assert meta["schema"] == fio.SCHEMA_VERSION and meta["encoder"] == {"name": "tiny"} and "start" not in meta


def test_a_missing_or_repeated_part_is_an_error_not_a_short_table(tmp_path):
    rng = np.random.default_rng(2)
    _, parts, _, _ = _parts(tmp_path, 900, None, rng)
    with pytest.raises(ValueError, match="starts at tile 600, expected 300"):
        fio.merge_parts([parts[0], parts[2]], tmp_path / "a.parquet", n_tiles=900)
    with pytest.raises(ValueError, match="cover 600 of 900"):
        fio.merge_parts(parts[:2], tmp_path / "b.parquet", n_tiles=900)
    assert not (tmp_path / "b.parquet").exists()
    with pytest.raises(ValueError, match="missing"):
        fio.tile_table(0, _tiles(3), {"tissue_fraction": np.ones(3)}, slide_mpp=0.5)


def test_summary_streams_to_the_values_computed_by_hand(tmp_path):
    rng = np.random.default_rng(3)
    _, parts, cols, emb = _parts(tmp_path, 20000, 8, rng, size=4096)
    out = fio.merge_parts(parts, tmp_path / "t.parquet", n_tiles=20000)
    plan = {"metrics": [{"name": "n_tiles", "value": 20000.0, "unit": "count"}], "findings": []}
    s = fio.summarize_table(plan, out)
    metric = {m["name"]: m["value"] for m in s["metrics"]}
    ok = cols["qc_pass"]
    w = cols["tissue_fraction"][ok].astype(np.float64)
    for stain in fio.STAINS:
        assert metric[f"{stain}_od_mean"] == pytest.approx(np.average(cols[f"{stain}_od_mean"][ok], weights=w),
                                                           rel=1e-9)
    assert metric["dab_positive_tile_fraction"] == pytest.approx(np.mean(cols["dab_od_mean"][ok] > 0.15))
    assert metric["n_tiles_qc_pass"] == ok.sum() and metric["n_tiles_computed"] == 20000
    for flag in fio.QC_FLAGS:
        assert metric[f"{flag}_tile_fraction"] == pytest.approx(cols[flag].mean())
    assert s["embedding_mean"] == pytest.approx(emb[ok].astype(np.float64).mean(axis=0), abs=1e-6)
    hot = [f for f in s["findings"] if f["kind"] == "hematoxylin_hotspot"]
    expect = np.flatnonzero(ok)[np.argsort(-cols["hematoxylin_od_mean"][ok], kind="stable")[:3]]
    assert [f["hematoxylin_od_mean"] for f in hot] == pytest.approx(cols["hematoxylin_od_mean"][expect].tolist())


def test_every_tile_flagged_falls_back_to_all_tiles(tmp_path):
    cols = _columns(np.random.default_rng(4), 50)
    cols["fold"][:] = True
    cols["qc_pass"][:] = False
    out = fio.write_table(fio.tile_table(0, _tiles(50), cols, slide_mpp=0.5), tmp_path / "t.parquet")
    s = fio.summarize_table({"metrics": []}, out)
    metric = {m["name"]: m["value"] for m in s["metrics"]}
    assert metric["n_tiles_qc_pass"] == 0 and metric["fold_tile_fraction"] == 1.0
    w = cols["tissue_fraction"].astype(np.float64)
    assert metric["eosin_od_mean"] == pytest.approx(np.average(cols["eosin_od_mean"], weights=w))


@pytest.mark.parametrize("dim", [None, 12])
def test_mil_bag_holds_the_qc_passing_tiles(tmp_path, dim):
    rng = np.random.default_rng(5)
    tiles, parts, cols, emb = _parts(tmp_path, 700, dim, rng)
    out = fio.merge_parts(parts, tmp_path / "t.parquet", n_tiles=700)
    info = fio.write_mil_bag(out, tmp_path / "bag.npz", meta={"slide_mpp": 0.5})
    bag = np.load(tmp_path / "bag.npz")  # no pickle needed
    ok = cols["qc_pass"]
    assert info["n_tiles"] == ok.sum() == len(bag["features"])
    expect = emb[ok] if dim else np.stack([cols[c] for c in fio.BAG_BUILTIN], axis=1)[ok]
    assert bag["features"].dtype == np.float32 and np.array_equal(bag["features"], expect)
    assert np.array_equal(bag["coords_level0_px"], np.asarray(tiles)[ok][:, :2])
    assert np.array_equal(bag["tile_index"], np.flatnonzero(ok))
    meta = json.loads(str(bag["meta"]))
    assert meta["feature_dim"] == (dim or len(fio.BAG_BUILTIN)) and meta["slide_mpp"] == 0.5


def test_the_table_declares_every_column_the_reader_computes():
    from imaging_tasks.pathology.reader import COLUMNS

    assert sorted(fio.COMPUTED_COLUMNS) == sorted(COLUMNS)
