"""Tile QC (pathology.tile_qc) against artefacts planted with ground truth (pathology.synth), and its rules.

The slides vary what a threshold could be tuned to: stain (H&E, IHC), seed, sensor noise (SD 1-3 grey
levels), staining intensity (x0.85-1.2), ink colours drawn from ranges.  Tiles are 128 px at 0.5 µm/px
(a 64 µm field, as 256 px at 0.25 µm/px): the harder case for the fold test, which sees fewer blocks.
"""
from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
from PIL import Image

from imaging_tasks.pathology import tile_qc
from imaging_tasks.pathology.reader import tile_chunks
from imaging_tasks.pathology.stain import OD_LUT
from imaging_tasks.pathology.synth import ARTEFACT_BITS, NOISE_SD, artefact_fractions, synthesize
from imaging_tasks.pathology.tiles import RGB_FROM_HED, plan_tiles

SLIDES = [  # (stain, seed, noise_sd, stain_scale, pen colours, blurred patches, folds, fragments)
    ("he", 7, 1.8, 1.0, ("blue", "green", "black"), 1, 1, 4),
    ("ihc", 3, 3.0, 1.2, ("blue", "green", "black"), 1, 1, 4),
    ("he", 33, 1.0, 0.85, (), 1, 3, 3),
    ("ihc", 34, 2.5, 0.9, ("blue", "black"), 0, 2, 3),
]
TILE_PX, TARGET_MPP = 128, 0.5


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Per tile over all slides: the QC columns and flags, and the planted artefacts' share of the tile."""
    out = tmp_path_factory.mktemp("qc")
    cols: dict[str, list] = {}
    truth: dict[str, list] = {}
    for i, (stain, seed, noise, scale, pen, blur, folds, fragments) in enumerate(SLIDES):
        root = out / str(i)
        t = json.loads(synthesize(root, 1, seed, width=3072, height=2304, mpp=0.5, stain=stain, noise_sd=noise,
                                  stain_scale=scale, pen=pen, blur=blur, folds=folds,
                                  fragments=fragments)[0].read_text())["truth"]
        labels = np.asarray(Image.open(root / "_truth" / "pathology" / t["artefacts"]["labels"]))
        slide = root / "pathology" / "study-000" / "slide.svs"
        plan = plan_tiles(slide, root / "plan", target_mpp=TARGET_MPP, tile_px=TILE_PX)
        for k, v in artefact_fractions(labels, plan["tiles"], plan["tile_side_level0_px"]).items():
            truth.setdefault(k, []).append(v)
        for chunk in tile_chunks(slide, plan["tiles"], target_mpp=TARGET_MPP, tile_px=TILE_PX, workers=0):
            for k, v in chunk.columns.items():
                cols.setdefault(k, []).append(v)
    return ({k: np.concatenate(v) for k, v in cols.items()}, {k: np.concatenate(v) for k, v in truth.items()})


def test_flags_recover_planted_artefacts(scored):
    q, fr = scored
    inked = fr["pen"] >= 0.25
    blurred = (fr["blur"] >= 0.99) & (fr["pen"] == 0)  # wholly in the blurred patch (sharp ink on top excluded)
    folded = (fr["fold"] >= 0.75) & (fr["pen"] == 0)
    clean = (fr["pen"] == 0) & (fr["blur"] == 0) & (fr["blur_edge"] == 0) & (fr["fold"] == 0)
    assert inked.sum() >= 60 and blurred.sum() >= 20 and folded.sum() >= 15 and clean.sum() >= 100
    assert q["pen_mark"][inked].mean() >= 0.9
    assert q["out_of_focus"][blurred].mean() >= 0.9
    assert q["fold"][folded].mean() >= 0.85  # ~0.9: OD alone misses some folds of pale tissue (see tile_qc)
    # clean tissue: pen and focus flags (nearly) never; folds, whose test is OD against the slide's own, can
    # fire on the densest IHC nests (documented in tile_qc): a few percent
    assert q["pen_mark"][clean].mean() <= 0.01 and q["out_of_focus"][clean].mean() <= 0.01
    assert (~q["qc_pass"][clean]).mean() <= 0.07
    assert np.array_equal(q["qc_pass"], ~(q["out_of_focus"] | q["pen_mark"] | q["fold"]))
    # the measures, not only the flags, separate: focus on blurred tissue is sensor noise only
    assert np.nanmedian(q["focus_laplacian_var"][blurred]) < 0.5 * tile_qc.FOCUS_MIN_LAPLACIAN_VAR
    assert np.nanmedian(q["focus_laplacian_var"][clean]) > 3 * tile_qc.FOCUS_MIN_LAPLACIAN_VAR
    assert np.median(q["pen_fraction"][inked]) > 0.2 and q["pen_fraction"][clean].max() < tile_qc.PEN_MIN_FRACTION


def _od_tile(od: np.ndarray, size: int = 32) -> np.ndarray:
    rgb = np.clip(255.0 * 10 ** -np.asarray(od, float), 0, 255).round().astype(np.uint8)
    return np.broadcast_to(rgb, (size, size, 3)).copy()


def _pen_fraction(rgb: np.ndarray) -> float:
    od = np.moveaxis(OD_LUT[rgb], -1, 0)
    return float(tile_qc.pen_mask(od, od.sum(axis=0)).mean())


def test_pen_rule_separates_ink_colours_from_every_stain_mixture():
    """The documented rule, over grids: no H / E / DAB mixture at any density is ink; marker colours are."""
    grid = np.linspace(0, 1.5, 7)
    for h in grid:
        for e in grid:
            for d in grid:
                od = h * RGB_FROM_HED[0] + e * RGB_FROM_HED[1] + d * RGB_FROM_HED[2]
                assert _pen_fraction(_od_tile(od)) == 0.0, (h, e, d)
    rng = np.random.default_rng(1)
    for hue, sat, val in [(215, 0.6, 0.7), (205, 0.8, 0.55), (225, 0.5, 0.78), (140, 0.6, 0.5), (110, 0.45, 0.65),
                          (165, 0.75, 0.4), (0, 0.05, 0.12), (200, 0.1, 0.18)]:
        ink = np.array(colorsys.hsv_to_rgb(hue / 360, sat, val)) * 255
        black = sat < 0.2
        for density in (1.0, 1.3) if black else (0.6, 1.0, 1.3):  # coloured inks: OD ratios ignore density
            od = -np.log10(np.clip(ink, 1, 255) / 255) * density
            noisy = np.clip(_od_tile(od).astype(float) + rng.normal(0, 2, (32, 32, 3)), 0, 255).astype(np.uint8)
            assert _pen_fraction(noisy) > 0.9, (hue, sat, val, density)
    glass = np.full((32, 32, 3), 238, np.uint8)
    assert _pen_fraction(glass) == 0.0
    assert _pen_fraction(np.full((32, 32, 3), 100, np.uint8)) == 0.0  # a mid grey is not black ink (too faint)


def test_focus_fold_and_flags_on_constructed_tiles():
    rng = np.random.default_rng(2)
    from scipy import ndimage

    texture = ndimage.gaussian_filter(rng.normal(0, 1, (128, 128)), 1.0)
    od_h = 0.6 + 0.5 * texture / texture.std()
    sharp = _od_tile(np.clip(od_h, 0.05, None)[..., None] * RGB_FROM_HED[0], 128)
    blurred = ndimage.gaussian_filter(sharp.astype(float), (4, 4, 0)).round().astype(np.uint8)
    glass = np.full((128, 128, 3), 238, np.uint8)
    doubled = _od_tile(2 * np.clip(od_h, 0.05, None)[..., None] * RGB_FROM_HED[0], 128)
    q = tile_qc.tile_qc_np(np.stack([sharp, blurred, glass, doubled]), um_per_px=0.5,
                           reference_od=float(OD_LUT[sharp].sum(-1).mean()))
    assert q["focus_laplacian_var"][0] > 10 * q["focus_laplacian_var"][1]
    assert q["out_of_focus"].tolist() == [False, True, False, False]
    assert np.isnan(q["focus_laplacian_var"][2])  # nothing to judge on glass: NaN, not a flag
    assert q["fold_fraction"][0] == 0.0 and q["fold_fraction"][3] == 1.0
    assert q["fold"].tolist() == [False, False, False, True]
    assert q["qc_pass"].tolist() == [True, False, True, False]


def test_draw_tile_qc_colours_each_reason_and_has_a_legend():
    overview = np.full((400, 600, 3), 240, np.uint8)
    xy = np.array([[0, 400], [480, 400], [960, 400], [1440, 400]])
    flags = {"out_of_focus": np.array([False, True, False, False]), "pen_mark": np.array([False, False, True, False]),
             "fold": np.array([False, False, False, True])}
    img = np.asarray(tile_qc.draw_tile_qc(overview, 4.0, 4.0, 400.0, xy, flags))
    assert img.shape == (400, 600, 3)
    for i, key in enumerate(["qc_pass", "out_of_focus", "pen_mark", "fold"]):
        x0 = xy[i, 0] // 4
        edge = img[150, x0 + 99]  # right edge of tile i (rows 100-199), below the legend
        assert tuple(edge) == tile_qc.FLAG_COLOURS[key], key
    legend = img[:60, :150]
    for colour in tile_qc.FLAG_COLOURS.values():  # a swatch of every colour in the legend box
        assert (legend == colour).all(axis=-1).sum() >= 20


def test_artefacts_leave_the_rest_of_the_slide_as_it_was(tmp_path):
    """Planting uses its own random stream: tissue and its truth are the same with and without artefacts, and
    the defaults written explicitly give the same bytes as not writing them."""
    a = json.loads(synthesize(tmp_path / "a", 1, 5, width=1024, height=768)[0].read_text())
    b = json.loads(synthesize(tmp_path / "b", 1, 5, width=1024, height=768, noise_sd=NOISE_SD, stain_scale=1.0,
                              pen=(), blur=0, folds=0)[0].read_text())
    c = json.loads(synthesize(tmp_path / "c", 1, 5, width=1024, height=768, pen=("green",), blur=1,
                              folds=1)[0].read_text())
    slide = "pathology/study-000/slide.svs"
    assert (tmp_path / "a" / slide).read_bytes() == (tmp_path / "b" / slide).read_bytes() and a == b
    assert "artefacts" not in a["truth"] and set(c["truth"]["artefacts"]) >= {"pen", "blur", "fold", "labels"}
    for key in ("tissue_area_mm2", "fragment_areas_mm2", "n_tiles_expected"):
        assert c["truth"][key] == a["truth"][key]
    labels = np.asarray(Image.open(tmp_path / "c" / "_truth" / "pathology" / c["truth"]["artefacts"]["labels"]))
    for name in ("pen", "blur", "fold"):
        assert (labels & ARTEFACT_BITS[name]).any(), name
    with pytest.raises(ValueError):
        synthesize(tmp_path / "d", 1, 5, width=1024, height=768, pen=("red",))
