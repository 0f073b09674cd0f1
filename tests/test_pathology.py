"""Whole-slide synthesis and processing against known tissue area and known stain colours."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from imaging_tasks.errors import BadInput
from imaging_tasks.pathology import (RGB_FROM_HED, plan_tiles, process_study, stain_features, summarize,
                                     tile_features)
from imaging_tasks.synth.pathology import synthesize


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsi")
    truth = json.loads(synthesize(out, 1, 7)[0].read_text())
    return out / "pathology" / "study-000" / "slide.svs", truth


def test_synthetic_slide_is_aperio_with_phi_in_label_macro_and_description(slide):
    import openslide

    path, truth = slide
    s = openslide.OpenSlide(str(path))
    assert s.properties["openslide.vendor"] == "aperio"
    assert {"label", "macro"} <= set(s.associated_images)
    assert s.dimensions == tuple(truth["truth"]["dimensions"])
    assert float(s.properties["openslide.mpp-x"]) == truth["truth"]["mpp"]
    description = s.properties["tiff.ImageDescription"]
    assert any(v in description for v in truth["phi"])  # the scrubber has work to do


def test_tissue_area_within_5_percent(slide, tmp_path):
    path, truth = slide
    plan = plan_tiles(path, tmp_path)
    area = next(m["value"] for m in plan["metrics"] if m["name"] == "tissue_area_mm2")
    assert area == pytest.approx(truth["truth"]["tissue_area_mm2"], rel=0.05)
    assert (tmp_path / "qc_tissue.png").exists() and (tmp_path / "tissue_mask.png").exists()
    assert sum(r["area_mm2"] for r in plan["findings"]) == pytest.approx(area)


def test_tiles_lie_on_tissue_and_scale_with_target_mpp(slide, tmp_path):
    path, truth = slide
    fine = plan_tiles(path, tmp_path, target_mpp=0.5, tile_px=256)
    coarse = plan_tiles(path, tmp_path, target_mpp=1.0, tile_px=256)
    assert len(fine["tiles"]) > 2 * len(coarse["tiles"]) > 0
    # each tile covers tile_px * target_mpp µm; the tiles' area cannot exceed the tissue's by much
    tile_mm2 = (256 * 1.0 / 1000) ** 2
    assert len(coarse["tiles"]) * tile_mm2 <= truth["truth"]["tissue_area_mm2"] * 1.5
    # every coarse tile is read from level 0 at 512 px (0.5 µm/px slide) or a level giving the same field
    for x, y, level, w, h in coarse["tiles"]:
        assert w == h and 0 <= x < truth["truth"]["dimensions"][0] and 0 <= y < truth["truth"]["dimensions"][1]


def _stain_tile(stain: int, od: float = 0.8) -> np.ndarray:
    """A tile of a single pure stain at a known optical density (Beer-Lambert through the stain vector)."""
    rgb = 255.0 * 10 ** (-od * RGB_FROM_HED[stain])
    return np.broadcast_to(rgb.round().astype(np.uint8), (1, 64, 64, 3)).copy()


@pytest.mark.parametrize("stain", [0, 1, 2])
def test_colour_deconvolution_recovers_the_pure_stain(stain):
    import torch

    f = stain_features(_stain_tile(stain), torch.device("cpu"))
    assert int(np.argmax(f["mean"][0])) == stain
    assert f["mean"][0, stain] == pytest.approx(0.8, rel=0.05)
    assert f["tissue_fraction"][0] == 1.0


def test_glass_is_not_tissue():
    import torch

    glass = np.full((1, 32, 32, 3), 240, np.uint8)
    assert stain_features(glass, torch.device("cpu"))["tissue_fraction"][0] == 0.0


def test_features_do_not_depend_on_batching(slide, tmp_path):
    path, _ = slide
    plan = plan_tiles(path, tmp_path)
    whole = tile_features(path, plan["tiles"], device="cpu")
    split = [r for i in range(0, len(plan["tiles"]), 3)
             for r in tile_features(path, plan["tiles"][i:i + 3], device="cpu", batch_size=2)]
    assert [(r["x"], r["y"]) for r in whole] == [(r["x"], r["y"]) for r in split]
    for a, b in zip(whole, split):
        assert a["hematoxylin_od_mean"] == pytest.approx(b["hematoxylin_od_mean"], rel=1e-5)
    s = summarize(plan, whole)
    assert {m["name"] for m in s["metrics"]} >= {"tissue_area_mm2", "hematoxylin_od_mean", "dab_od_mean"}


def test_process_study_in_process(slide, tmp_path):
    path, truth = slide
    result = process_study([path], tmp_path, device="cpu")
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    assert metrics["n_tiles_computed"] == metrics["n_tiles"] > 0
    assert metrics["dab_od_mean"] > 0.05  # the IHC texture is DAB-positive
    assert set(result["outputs"]) == {"qc_tissue.png", "tissue_mask.png", "tile_features.json"}


def test_truncated_or_foreign_file_is_bad_input(slide, tmp_path):
    path, _ = slide
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(BadInput) as exc:
        plan_tiles(truncated, tmp_path)
    assert exc.value.reason == "unreadable_slide"
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(BadInput):
        plan_tiles(text, tmp_path)


def test_synthesis_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize(a, 1, 3, width=1024, height=768)
    synthesize(b, 1, 3, width=1024, height=768)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and all(digest(a / f) == digest(b / f) for f in files)
    assert not any(v in str(f) for f in files for v in json.loads((a / "_truth/pathology/study-000.json").read_text())["phi"])
