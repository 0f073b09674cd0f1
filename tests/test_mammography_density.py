"""Breast density (issue 15) against phantoms with a planted dense area fraction (synth ``density=``).

Images go through normalize() (presentation scale, brighter = denser) and its breast mask.  The pectoral muscle
on MLO views is the generator's truth mask in the first accuracy tests, to isolate the density method; the
gland-edge x dose grid at the end runs end to end with normalize's own breast and pectoral masks.
Small images (0.2 / 0.25 mm) keep the file fast.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pydicom
import pytest

from imaging_tasks.errors import BadInput
from imaging_tasks.mammography.density import birads_category, density_for_image, percent_density
from imaging_tasks.mammography.normalize import breast_mask, normalize, pectoral_mask
from imaging_tasks.mammography.synth import synthesize

TARGETS = (0.05, 0.2, 0.4, 0.6, 0.8)
GRIDS = {0.2: (500, 400), 0.25: (400, 320)}
SEEDS = (1, 2)
VIEWS = ["L_CC", "R_MLO"]
TOLERANCE = 0.05  # the target: within 5 points of the planted dense area fraction


def _views(out: pathlib.Path, seed: int, spacing: float, **kw) -> list[dict]:
    rows, cols = GRIDS[spacing]
    (tp,) = synthesize(out, 1, seed, rows=rows, cols=cols, pixel_spacing_mm=spacing, views=VIEWS,
                       clusters_per_image=(0, 0), isolated_per_image=(0, 0), **kw)
    doc = json.loads(tp.read_text())
    res = []
    for key, t in doc["truth"]["views"].items():
        ds = pydicom.dcmread(out / "mammography" / doc["label"] / t["file"])
        mi = normalize(ds)
        masks = dict(np.load(tp.parent / t["masks_file"]))
        # Work on the stored grid, where the truth masks are.
        pixels = mi.to_stored_array(mi.pixels)
        breast = mi.to_stored_array(breast_mask(mi.values, pixel_spacing_mm=mi.pixel_spacing_mm))
        res.append({"key": key, "ds": ds, "mi": mi, "truth": t["density"], "masks": masks, "pixels": pixels,
                    "breast": breast, "thickness": float(ds.BodyPartThickness),
                    "breast_truth": doc["truth"]["breasts"][key[0]]})
    return res


def _measure(v: dict, **kw) -> dict:
    return percent_density(v["pixels"], v["breast"], v["masks"]["pectoral"], v["mi"].pixel_spacing_mm,
                           compressed_thickness_mm=v["thickness"], **kw)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    rows = []
    for seed in SEEDS:
        for sp in GRIDS:
            for f in TARGETS:
                for v in _views(tmp_path_factory.mktemp(f"d{seed}_{sp}_{f}"), seed, sp, density=f):
                    rows.append({**v, "seed": seed, "spacing": sp, "target": f, "result": _measure(v)})
    return rows


def test_breast_mask_matches_truth(phantoms):
    for r in phantoms:
        b, t = r["breast"], r["masks"]["breast"]
        assert 2 * (b & t).sum() / (b.sum() + t.sum()) > 0.98, r["key"]


def test_percent_dense_area_within_five_points(phantoms):
    errors = []
    for r in phantoms:
        truth = r["truth"]["dense_area_fraction"]
        got = r["result"]["dense_area_fraction"]
        assert r["result"]["percent_dense_area"] == pytest.approx(100 * got, abs=1e-3)
        errors.append((r["seed"], r["spacing"], r["key"], truth, got))
    worst = max(errors, key=lambda e: abs(e[4] - e[3]))
    assert abs(worst[4] - worst[3]) <= TOLERANCE, worst
    # Tighter than the target on these phantoms (measured max ~2 points): catches a drift early.
    assert all(abs(g - t) <= 0.03 for *_, t, g in errors), errors


def test_dense_pixels_are_the_planted_ones(phantoms):
    for r in phantoms:
        got, truth = r["result"]["dense_mask"], r["masks"]["dense"]
        if truth.sum() < 1000:
            continue
        dice = 2 * (got & truth).sum() / (got.sum() + truth.sum())
        assert dice > 0.8, (r["key"], r["target"], dice)  # measured >= 0.84 (5% dense: small patches)


def test_monotone_in_truth(phantoms):
    groups: dict = {}
    for r in phantoms:
        groups.setdefault((r["seed"], r["spacing"], r["key"]), []).append(
            (r["truth"]["dense_area_fraction"], r["result"]["dense_area_fraction"],
             r["result"]["dense_volume_fraction"]))
    for key, vals in groups.items():
        vals.sort()
        assert len(vals) == len(TARGETS)
        assert all(b[1] > a[1] for a, b in zip(vals, vals[1:])), (key, vals)
        assert all(b[2] > a[2] for a, b in zip(vals, vals[1:])), (key, vals)


def test_volume_fraction_is_approximate_and_needs_thickness(phantoms):
    for r in phantoms:
        vol, truth = r["result"]["dense_volume_fraction"], r["truth"]["dense_volume_fraction"]
        # Documented bias of the linear two-reference model on windowed presentation images: +1..+15 points.
        assert -0.02 <= vol - truth <= 0.15, (r["key"], r["target"], vol, truth)
    r = phantoms[0]
    no_t = percent_density(r["pixels"], r["breast"], r["masks"]["pectoral"], r["mi"].pixel_spacing_mm)
    assert no_t["dense_volume_fraction"] is None and "thickness" in no_t["volume_note"]
    assert abs(no_t["dense_area_fraction"] - r["truth"]["dense_area_fraction"]) <= TOLERANCE


def test_categories_away_from_boundaries(phantoms):
    expected = {0.05: "a", 0.2: "a", 0.4: "b", 0.6: "c", 0.8: "d"}
    for r in phantoms:
        assert r["result"]["birads_density"] == expected[r["target"]], (r["key"], r["target"], r["result"])
    # Per breast (mean of its views) as the truth does it.
    by_breast: dict = {}
    for r in phantoms:
        by_breast.setdefault((r["seed"], r["spacing"], r["target"], r["key"][0]), []).append(r)
    for rs in by_breast.values():
        pct = float(np.mean([r["result"]["percent_dense_area"] for r in rs]))
        assert birads_category(pct) == rs[0]["breast_truth"]["birads_density"]


def test_birads_category_edges():
    assert [birads_category(p) for p in (0, 24.99, 25, 49.9, 50, 74.9, 75, 100)] == list("aabbccdd")
    for bad in (-1, 100.5, float("nan")):
        with pytest.raises(ValueError):
            birads_category(bad)


@pytest.mark.parametrize("variant", [dict(photometric="MONOCHROME1"), dict(voi="sigmoid"),
                                     dict(voi="lut_sequence"), dict(photometric="MONOCHROME1", voi="sigmoid")])
def test_vendor_variants_give_the_same_density(tmp_path, variant):
    base = _views(tmp_path / "base", 3, 0.2, density=0.45)
    var = _views(tmp_path / "var", 3, 0.2, density=0.45, **variant)
    for a, b in zip(base, var):
        assert a["key"] == b["key"]
        # Same presentation pixels -> same density: with the same breast mask (the density method alone) ...
        ra, rb = _measure(a), _measure({**b, "breast": a["breast"]})
        assert abs(ra["percent_dense_area"] - rb["percent_dense_area"]) <= 1.0, (a["key"], ra, rb)
        assert abs(ra["dense_volume_fraction"] - rb["dense_volume_fraction"]) <= 0.01
        assert ra["birads_density"] == rb["birads_density"]
        # ... and end to end with each file's own normalize() breast mask, which for the sigmoid VOI loses a
        # ~1-pixel rim at the skin line (~1% of the breast; measured 1.4-1.6 points): within 2 points.
        rc = _measure(b)
        assert abs(ra["percent_dense_area"] - rc["percent_dense_area"]) <= 2.0, (a["key"], ra, rc)


def test_with_normalize_pectoral_mask_where_it_finds_the_muscle(tmp_path):
    for seed in (4, 5):
        for v in _views(tmp_path / str(seed), seed, 0.2, density=0.15):
            if not v["key"].endswith("MLO"):
                continue
            mi = v["mi"]
            canon_breast = breast_mask(mi.values, pixel_spacing_mm=mi.pixel_spacing_mm)
            pect = mi.to_stored_array(pectoral_mask(mi.pixels, canon_breast, mi.view,
                                                     pixel_spacing_mm=mi.pixel_spacing_mm))
            t = v["masks"]["pectoral"]
            assert 2 * (pect & t).sum() / (pect.sum() + t.sum()) > 0.85
            res = percent_density(v["pixels"], v["breast"], pect, mi.pixel_spacing_mm,
                                  compressed_thickness_mm=v["thickness"])
            assert abs(res["dense_area_fraction"] - v["truth"]["dense_area_fraction"]) <= TOLERANCE
            # Leaving the muscle in the region counts it (it is as bright as half-glandular tissue): worse.
            res_in = percent_density(v["pixels"], v["breast"], None, mi.pixel_spacing_mm,
                                     compressed_thickness_mm=v["thickness"])
            assert res_in["breast_area_cm2"] > res["breast_area_cm2"]


def test_bad_inputs():
    img = np.random.default_rng(0).random((50, 50))
    with pytest.raises(BadInput) as e:
        percent_density(img, np.zeros((50, 50), bool), None, 0.1)
    assert e.value.reason == "breast_region_too_small"
    with pytest.raises(BadInput) as e:
        percent_density(img, np.ones((40, 50), bool), None, 0.1)
    assert e.value.reason == "density_shape_mismatch"
    with pytest.raises(BadInput) as e:
        percent_density(np.ones((50, 50)), np.ones((50, 50), bool), None, 0.1)
    assert e.value.reason == "blank_breast_region"


# ------------------------------------------------------------------ gland/fat edge x dose grid (issue 15)
# End to end: normalize(), its breast mask and its own pectoral mask.  density_edge 0.5 is a gradual
# gland/fat transition (much tissue at partial glandular fraction), 2 the default near-binary islands.
EDGE_GRID = [(f, e, 0.5 if (i + j) % 2 else 1.0) for i, f in enumerate(TARGETS) for j, e in enumerate((0.5, 1.0, 2.0))]
# Known gap (see density.py): at 5 % dense with the softest edge the densest tissue is only ~90 % glandular
# and the window top sits near it, so the dense reference is low: measured up to +6.3 points on one CC view.
KNOWN_GAP = {(0.05, 0.5): 0.07}


@pytest.fixture(scope="module")
def edge_grid(tmp_path_factory):
    out = {}
    for f, edge, dose in EDGE_GRID:
        base = tmp_path_factory.mktemp(f"edge{f}_{edge}")
        (tp,) = synthesize(base, 1, 2, rows=600, cols=480, pixel_spacing_mm=0.2, views=VIEWS, density=f,
                           density_edge=edge, dose=dose, clusters_per_image=(0, 0), isolated_per_image=(0, 0))
        doc = json.loads(tp.read_text())
        for key, t in doc["truth"]["views"].items():
            mi = normalize(pydicom.dcmread(base / "mammography" / doc["label"] / t["file"]))
            res = density_for_image(mi, compressed_thickness_mm=float(t["compressed_thickness_mm"]))
            out[(f, edge, dose, key)] = (t["density"]["dense_area_fraction"], res)
    return out


@pytest.mark.parametrize("f,edge,dose", EDGE_GRID)
def test_density_across_gland_edge_and_dose(edge_grid, f, edge, dose):
    for key in VIEWS:
        truth, res = edge_grid[(f, edge, dose, key)]
        err = res["dense_area_fraction"] - truth
        assert abs(err) <= KNOWN_GAP.get((f, edge), TOLERANCE), (key, truth, res["dense_area_fraction"])
    # The method is monotone in the planted truth whatever the edge: across the grid's targets.
    if f == TARGETS[-1]:
        for key in VIEWS:
            got = [edge_grid[(g, e, d, key)][1]["dense_area_fraction"] for g, e, d in EDGE_GRID if e == edge]
            assert got == sorted(got), (key, edge, got)


# ------------------------------------------------ default anatomy: a fatty breast is not called dense (issue 15)
# synthesize() without density=: glandular fraction = anatomy density x cone x soft texture, rarely > 0.5, so the
# true dense area is ~0 %.  The self-calibrated reference alone called these 6-41 % dense; the physics floor on
# the log-linear values (density.GLAND_FAT_RATIO) brings them within the target.  Measured at 0.2 mm, seeds 1-8,
# CC and MLO, dose 0.5 / 1: 0-5.3 points (5.3: seed 4 R_MLO, glandular fraction peaking just under 0.5).
DEFAULT_SEEDS = (1, 3)


@pytest.fixture(scope="module")
def default_anatomy(tmp_path_factory):
    out = []
    for seed in DEFAULT_SEEDS:
        for dose in (0.5, 1.0):
            base = tmp_path_factory.mktemp(f"default{seed}_{dose}")
            (tp,) = synthesize(base, 1, seed, rows=500, cols=400, pixel_spacing_mm=0.2, views=VIEWS, dose=dose,
                               extended_truth=True, clusters_per_image=(0, 0), isolated_per_image=(0, 0))
            doc = json.loads(tp.read_text())
            for key, t in doc["truth"]["views"].items():
                mi = normalize(pydicom.dcmread(base / "mammography" / doc["label"] / t["file"]))
                th = float(t["compressed_thickness_mm"])
                out.append({"key": key, "seed": seed, "dose": dose, "mi": mi, "thickness": th,
                            "truth": t["density"]["dense_area_fraction"],
                            "result": density_for_image(mi, compressed_thickness_mm=th)})
    return out


def test_fatty_default_anatomy_is_not_called_dense(default_anatomy):
    for r in default_anatomy:
        res = r["result"]
        assert r["truth"] < 0.02  # the premise: these phantoms have (almost) no dense tissue
        assert abs(res["dense_area_fraction"] - r["truth"]) <= TOLERANCE, (r["seed"], r["dose"], r["key"], res)
        assert res["dense_reference"] == "physics floor" and res["birads_density"] == "a"


def test_without_log_linear_values_the_self_calibration_over_calls(default_anatomy):
    # The same images with only the presentation pixels (as for a SIGMOID / LUT-sequence VOI): no floor, noted.
    r = default_anatomy[0]
    mi = r["mi"]
    breast = breast_mask(mi.values, pixel_spacing_mm=mi.pixel_spacing_mm)
    pect = pectoral_mask(mi.pixels, breast, mi.view, pixel_spacing_mm=mi.pixel_spacing_mm)
    res = percent_density(mi.pixels, breast, pect, mi.pixel_spacing_mm, compressed_thickness_mm=r["thickness"])
    assert res["dense_reference"] == "self-calibrated" and any("log-linear" in n for n in res["notes"])
    assert res["dense_area_fraction"] - r["truth"] > 0.1  # the failure the floor fixes (measured 27 %)
    # Values whose zero is not air (an offset): the floor is refused, the self-calibration kept.
    off = percent_density(mi.pixels, breast, pect, mi.pixel_spacing_mm, compressed_thickness_mm=r["thickness"],
                          values=mi.values + 0.3)
    assert off["dense_reference"] == "self-calibrated" and any("not air" in n for n in off["notes"])
