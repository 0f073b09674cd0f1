"""The numpy stain statistics (pathology.stain) against the torch definition they replace (tests/pathology_reference.py).

Tolerance (documented in pathology.stain): tissue fraction exact; means, standard deviations, mean OD and the
haematoxylin gradient to float32 rounding; percentiles within one histogram bin (0.01 OD) of
torch.nanquantile.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from imaging_tasks.pathology.stain import PCT_BIN_OD, STAIN_COLUMNS, stain_features_np
from imaging_tasks.pathology.synth import synthesize
from imaging_tasks.pathology.tiles import RGB_FROM_HED, _read_rgb, open_slide, plan_tiles
from pathology_reference import stain_features

KEYS = ("tissue_fraction", "mean_od", "h_gradient_od_per_um", "mean", "std", "p10", "p50", "p90")


@pytest.fixture(scope="module")
def slide_tiles(tmp_path_factory):
    """Real-looking tiles (256 px at 0.5 µm/px, read at level 0) of an H&E and an IHC synthetic slide."""
    out = tmp_path_factory.mktemp("stain")
    batches = {}
    for stain, seed in (("he", 7), ("ihc", 2)):
        json.loads(synthesize(out / stain, 1, seed, width=2048, height=1536, stain=stain)[0].read_text())
        path = out / stain / "pathology" / "study-000" / "slide.svs"
        plan = plan_tiles(path, out / f"plan_{stain}", target_mpp=0.5, tile_px=256)
        slide = open_slide(path)
        tiles = plan["tiles"][:12]
        batches[stain] = np.stack([_read_rgb(slide, (x, y), lvl, (w, h)) for x, y, lvl, w, h in tiles])
    return batches


def _stain_tile(od_h=0.0, od_e=0.0, od_d=0.0, size=64) -> np.ndarray:
    od = od_h * RGB_FROM_HED[0] + od_e * RGB_FROM_HED[1] + od_d * RGB_FROM_HED[2]
    rgb = (255.0 * 10 ** -od).round().astype(np.uint8)
    return np.broadcast_to(rgb, (1, size, size, 3)).copy()


def _compare(batch: np.ndarray, um_per_px: float) -> dict:
    ref = stain_features(batch, "cpu", um_per_px=um_per_px)
    new = stain_features_np(batch, um_per_px)
    assert set(new) == set(ref) == set(KEYS)
    for k in KEYS:
        assert new[k].shape == np.asarray(ref[k]).shape, k
    np.testing.assert_array_equal(new["tissue_fraction"], ref["tissue_fraction"])
    for k in ("mean_od", "h_gradient_od_per_um", "mean", "std"):
        np.testing.assert_allclose(new[k], ref[k], rtol=1e-4, atol=2e-6, err_msg=k)
    for k in ("p10", "p50", "p90"):
        np.testing.assert_allclose(new[k], ref[k], rtol=0, atol=PCT_BIN_OD, err_msg=k)
    return {"ref": ref, "new": new}


@pytest.mark.parametrize("stain", ["he", "ihc"])
def test_slide_tiles_match_the_torch_definition(slide_tiles, stain):
    batch = slide_tiles[stain]
    assert len(batch) >= 5 and batch.shape[1:] == (256, 256, 3)
    r = _compare(batch, um_per_px=0.5)
    ref, new = r["ref"], r["new"]
    assert ref["tissue_fraction"].min() > 0.3  # tissue tiles: the percentiles are real ones
    # in practice far inside the one-bin bound
    for k in ("p10", "p50", "p90"):
        assert np.abs(new[k] - ref[k]).mean() < 0.2 * PCT_BIN_OD, k
    if stain == "ihc":
        assert new["mean"][:, 2].mean() > 0.1  # DAB present: the DAB column is not all zeros


@pytest.mark.parametrize("amounts", [(0.8, 0, 0), (0, 0.8, 0), (0, 0, 0.8), (0.5, 0.3, 0), (0.12, 0.05, 0.02),
                                     (1.2, 0.4, 0), (0.3, 0, 1.2)])
def test_planted_constant_stains(amounts):
    batch = _stain_tile(*amounts)
    r = _compare(batch, um_per_px=1.0)
    new = r["new"]
    for j, amount in enumerate(amounts):
        if amount:
            assert new["mean"][0, j] == pytest.approx(amount, rel=0.03, abs=0.01)
            for p in ("p10", "p50", "p90"):
                assert new[p][0, j] == pytest.approx(new["mean"][0, j], abs=PCT_BIN_OD)
        else:  # an absent stain reads ~0 (uint8 rounding); where torch's percentile is exactly 0, so is ours
            for p in ("p10", "p50", "p90"):
                assert new[p][0, j] < PCT_BIN_OD and (new[p][0, j] == 0.0) == (r["ref"][p][0, j] == 0.0)
    assert new["std"][0].max() < 1e-5 and new["h_gradient_od_per_um"][0] < 1e-5


def test_mixed_populations_glass_and_texture():
    glass = np.full((1, 32, 32, 3), 238, np.uint8)
    flat, spots = _stain_tile(0.4, 0.3), _stain_tile(0.2, 0.3)
    dark = _stain_tile(1.0, 0.3)[0, 0, 0]
    spots[0, 0::8], spots[0, 1::8] = dark, dark
    half = _stain_tile(0.6, 0.2)
    half[0, :, :32] = 238  # half glass: statistics over the tissue half only
    r = _compare(np.concatenate([flat, spots, half]), um_per_px=0.5)
    new = r["new"]
    assert new["p90"][1, 0] > 0.8 and new["p10"][1, 0] < 0.3
    assert new["tissue_fraction"][2] == 0.5 and new["mean"][2, 0] == pytest.approx(0.6, abs=0.02)
    g = stain_features_np(glass, 1.0)
    assert g["tissue_fraction"][0] == 0 and not np.any(g["mean"]) and not np.any(g["p50"])


def test_near_black_pixels_beyond_the_histogram_are_exact():
    """Stain amounts >= 2.54 OD fall outside the histogram; a percentile among them is taken exactly."""
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 6, (1, 64, 64, 3)).astype(np.uint8)  # near black: OD ~2-2.4 per channel
    tile[0, :8] = _stain_tile(0.5, 0.2, size=64)[0, :8]
    r = _compare(tile, um_per_px=1.0)
    assert r["ref"]["p90"].max() > 2.54  # the case is exercised
    np.testing.assert_allclose(r["new"]["p90"][0, 0], r["ref"]["p90"][0, 0], atol=1e-4)  # H: exact path


def test_column_order_is_the_feature_names():
    assert STAIN_COLUMNS[:3] == ["tissue_fraction", "mean_od", "h_gradient_od_per_um"]
    assert "hematoxylin_od_p90" in STAIN_COLUMNS and "dab_od_std" in STAIN_COLUMNS and len(STAIN_COLUMNS) == 18
    with pytest.raises(ValueError):
        stain_features_np(np.zeros((2, 8, 8, 3), np.float32), 1.0)
