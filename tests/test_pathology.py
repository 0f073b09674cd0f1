"""Whole-slide synthesis and processing against known tissue area, tile count and stain colours."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from imaging_tasks.errors import BadInput
from imaging_tasks.pathology.features_io import summarize_table, tile_table, write_table
from imaging_tasks.pathology.reader import tile_chunks
from imaging_tasks.pathology.slide_features import process_study
from imaging_tasks.pathology.stain import stain_features_np
from imaging_tasks.pathology.tiles import RGB_FROM_HED, plan_tiles
from imaging_tasks.pathology.synth import synthesize


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsi")
    truth = json.loads(synthesize(out, 1, 7)[0].read_text())
    return out / "pathology" / "study-000" / "slide.svs", truth


@pytest.fixture(scope="module")
def plan(slide, tmp_path_factory):
    return plan_tiles(slide[0], tmp_path_factory.mktemp("plan"))


def _metric(result: dict, name: str) -> float:
    return next(m["value"] for m in result["metrics"] if m["name"] == name)


def test_synthetic_slide_is_aperio_with_phi_in_label_macro_and_description(slide):
    import openslide

    path, truth = slide
    s = openslide.OpenSlide(str(path))
    assert s.properties["openslide.vendor"] == "aperio"
    assert {"label", "macro", "thumbnail"} <= set(s.associated_images)
    assert s.dimensions == tuple(truth["truth"]["dimensions"])
    assert [round(d) for d in s.level_downsamples] == [1, 4, 16]
    assert float(s.properties["openslide.mpp-x"]) == truth["truth"]["mpp"]
    assert s.properties["openslide.objective-power"] == "20"
    planted = {v for v in truth["phi"] if len(v) >= 6}
    for field in ("aperio.Filename", "aperio.User", "aperio.Barcode"):
        assert s.properties[field] in planted  # what the slide de-identifier must remove
    for kind in ("label", "macro"):
        ink = (np.asarray(s.associated_images[kind].convert("L")) < 60).mean()
        assert ink > 0.005  # rendered name / MRN / accession and a barcode, not a blank image


def test_tissue_area_and_regions_match_truth(slide, plan):
    _, truth = slide
    t = truth["truth"]
    assert _metric(plan, "tissue_area_mm2") == pytest.approx(t["tissue_area_mm2"], rel=0.05)
    regions = sorted(f["area_mm2"] for f in plan["findings"] if f["kind"] == "tissue_region")
    assert len(regions) == t["n_tissue_regions"]  # dust specks on the glass are not tissue
    assert regions == pytest.approx(t["fragment_areas_mm2"], rel=0.05)
    assert 0.1 < _metric(plan, "tissue_threshold_od") < 0.5


def test_tile_count_and_geometry(slide, plan, tmp_path):
    _, truth = slide
    t = truth["truth"]
    n = len(plan["tiles"])
    assert n > 10 and abs(n - t["n_tiles_expected"]) <= max(1, round(0.1 * t["n_tiles_expected"]))
    side_l0 = 256 * 1.0 / t["mpp"]  # 256 px at 1 µm/px on a 0.5 µm/px slide: 512 level-0 px, read at level 0
    width, height = t["dimensions"]
    for x, y, level, w, h in plan["tiles"]:
        assert (level, w, h) == (0, 512, 512) and x % side_l0 == 0 and y % side_l0 == 0
        assert x + side_l0 <= width and y + side_l0 <= height
    # tiles with >= 50 % tissue: their total area brackets the tissue area loosely
    assert 0.6 * t["tissue_area_mm2"] < n * (side_l0 * t["mpp"] / 1000) ** 2 < 1.3 * t["tissue_area_mm2"]
    fine = plan_tiles(slide[0], tmp_path, target_mpp=0.5)
    assert 3.2 * n < len(fine["tiles"]) < 4.8 * n
    coarse = plan_tiles(slide[0], tmp_path, target_mpp=2.0)  # 1024 level-0 px: read 256 px from level 1 (x4)
    assert coarse["tiles"] and all(tile[2:] == [1, 256, 256] for tile in coarse["tiles"])
    assert len(coarse["tiles"]) < n / 2.5
    assert {"qc_tissue.png", "tissue_mask.png"} <= {p.name for p in tmp_path.iterdir()}


def _stain_tile(od_h: float = 0.0, od_e: float = 0.0, od_d: float = 0.0, size: int = 64) -> np.ndarray:
    """A tile of known stain amounts (Beer-Lambert through the stain vectors)."""
    od = od_h * RGB_FROM_HED[0] + od_e * RGB_FROM_HED[1] + od_d * RGB_FROM_HED[2]
    rgb = (255.0 * 10 ** -od).round().astype(np.uint8)
    return np.broadcast_to(rgb, (1, size, size, 3)).copy()


@pytest.mark.parametrize("stain", [0, 1, 2])
def test_colour_deconvolution_recovers_the_pure_stain(stain):
    amounts = [0.0, 0.0, 0.0]
    amounts[stain] = 0.8
    f = stain_features_np(_stain_tile(*amounts))
    assert int(np.argmax(f["mean"][0])) == stain
    assert f["mean"][0, stain] == pytest.approx(0.8, rel=0.03)
    assert f["mean"][0, [i for i in range(3) if i != stain]] == pytest.approx([0, 0], abs=0.02)
    assert f["tissue_fraction"][0] == 1.0 and f["p50"][0, stain] == pytest.approx(0.8, rel=0.03)


def test_mixture_glass_and_texture():
    mix = stain_features_np(_stain_tile(0.5, 0.3))
    assert mix["mean"][0] == pytest.approx([0.5, 0.3, 0.0], abs=0.02)
    glass = stain_features_np(np.full((1, 32, 32, 3), 238, np.uint8))
    assert glass["tissue_fraction"][0] == 0.0 and glass["mean"][0].tolist() == [0.0, 0.0, 0.0]
    # Same mean haematoxylin, once flat and once as sharp "nuclei": only the second has edge texture.
    flat = _stain_tile(0.4, 0.3)
    spots = _stain_tile(0.2, 0.3)
    dark = _stain_tile(1.0, 0.3)[0, 0, 0]
    spots[0, 0::8], spots[0, 1::8] = dark, dark  # a quarter of the rows at OD 1.0: mean 0.4
    f = stain_features_np(np.concatenate([flat, spots]))
    assert f["h_gradient_od_per_um"][0] < 1e-3 and f["h_gradient_od_per_um"][1] > 0.02
    assert f["p90"][1, 0] > 0.8 and f["p10"][1, 0] < 0.3  # percentiles see the two populations


def test_features_on_the_slide_match_the_planted_stains_and_ignore_batching(slide, plan, tmp_path):
    path, truth = slide
    tiles = plan["tiles"][:12]

    def columns(**kw):
        chunks = list(tile_chunks(path, tiles, target_mpp=1.0, tile_px=256, **kw))
        assert [c.start for c in chunks] == list(range(0, len(tiles), kw.get("chunk", 128)))
        return {k: np.concatenate([c.columns[k] for c in chunks]) for k in chunks[0].columns}

    whole = columns(workers=0)
    split = columns(workers=2, chunk=5)  # worker processes, another chunking: the same numbers
    for k in whole:
        assert np.array_equal(whole[k], split[k]), k
    table = write_table(tile_table(0, tiles, whole, slide_mpp=truth["truth"]["mpp"]), tmp_path / "t.parquet")
    s = summarize_table(plan, table)
    t = truth["truth"]
    assert _metric(s, "hematoxylin_od_mean") == pytest.approx(t["hematoxylin_od_mean"], rel=0.1)
    assert _metric(s, "eosin_od_mean") == pytest.approx(t["eosin_od_mean"], rel=0.1)
    assert _metric(s, "dab_positive_tile_fraction") == 0.0  # an H&E slide
    assert _metric(s, "n_tiles_qc_pass") == 12  # a clean synthetic slide: no tile flagged


def test_process_study_in_process(slide, tmp_path):
    import pyarrow.parquet as pq

    path, truth = slide
    result = process_study([path], tmp_path, device="cpu")
    json.dumps(result)
    assert _metric(result, "n_tiles_computed") == _metric(result, "n_tiles") > 0
    assert _metric(result, "tissue_area_mm2") == pytest.approx(truth["truth"]["tissue_area_mm2"], rel=0.05)
    assert {f["kind"] for f in result["findings"]} == {"tissue_region", "hematoxylin_hotspot"}
    assert set(result["outputs"]) == {"qc_tissue.png", "tissue_mask.png", "tile_features.parquet", "mil_bag.npz"}
    assert all((tmp_path / o).exists() for o in result["outputs"]) and result["device"] == "cpu"
    table = pq.read_table(tmp_path / "tile_features.parquet")
    assert table.num_rows == _metric(result, "n_tiles") and {"eosin_od_p90", "h_gradient_od_per_um"} <= set(
        table.schema.names)
    assert len(np.load(tmp_path / "mil_bag.npz")["features"]) == _metric(result, "n_tiles_qc_pass")


def test_ihc_slide_is_dab_positive(tmp_path):
    truth = json.loads(synthesize(tmp_path, 1, 2, width=2048, height=1536, stain="ihc")[0].read_text())
    result = process_study([tmp_path / "pathology" / "study-000" / "slide.svs"], tmp_path / "o", device="cpu",
                           target_mpp=0.5)  # small slide: tiles read at level 0 as they are
    assert _metric(result, "tissue_area_mm2") == pytest.approx(truth["truth"]["tissue_area_mm2"], rel=0.05)
    assert _metric(result, "dab_od_mean") == pytest.approx(truth["truth"]["dab_od_mean"], rel=0.1)
    assert _metric(result, "dab_positive_tile_fraction") > 0.5


def test_truncated_foreign_and_uncalibrated_files_are_bad_input(slide, tmp_path):
    import tifffile

    path, _ = slide
    data = path.read_bytes()
    for n, cut in enumerate((4000, len(data) // 2)):
        truncated = tmp_path / f"truncated{n}.svs"
        truncated.write_bytes(data[:cut])
        with pytest.raises(BadInput) as exc:
            plan_tiles(truncated, tmp_path)
        assert exc.value.reason == "unreadable_slide"
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(BadInput):
        plan_tiles(text, tmp_path)
    flat = tmp_path / "flat.tif"  # a tiled TIFF OpenSlide opens, with no microns-per-pixel anywhere
    tifffile.imwrite(flat, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(BadInput) as exc:
        plan_tiles(flat, tmp_path)
    assert exc.value.reason == "missing_mpp"
    with pytest.raises(BadInput) as exc:
        process_study([path, flat], tmp_path)
    assert exc.value.reason == "not_one_slide"


def test_synthesis_is_deterministic_and_paths_carry_no_phi(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize(a, 2, 3, width=1024, height=768)
    synthesize(b, 2, 3, width=1024, height=768)

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 and all(digest(a / f) == digest(b / f) for f in files)
    truths = [json.loads((a / "_truth/pathology" / f"study-00{i}.json").read_text()) for i in range(2)]
    assert truths[0]["phi"] != truths[1]["phi"] and truths[0]["study_uid"] is None
    assert not any(v in str(f) for f in files for t in truths for v in t["phi"])
