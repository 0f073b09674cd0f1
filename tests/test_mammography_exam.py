"""Exam level: nipple, lesions seen in both views, per-breast summaries and the montage, on constructed exams."""
from __future__ import annotations

import json

import numpy as np
import pytest

from imaging_tasks.mammography.exam import breast_summaries, cross_view_pairs, montage, nipple_xy_px


def _half_disc(rows=400, cols=300, centre_row=180, radius=220):
    """A canonical breast: a half disc against the chest wall (left edge), nipple at (radius - 1, centre_row)."""
    yy, xx = np.mgrid[:rows, :cols]
    return ((xx ** 2 + (yy - centre_row) ** 2) < radius ** 2) & (xx < cols)


def test_nipple_is_the_breast_point_farthest_from_the_chest_wall():
    x, y = nipple_xy_px(_half_disc())
    assert x == 219 and abs(y - 180) <= 1
    assert nipple_xy_px(np.zeros((10, 10), bool)) is None


def test_cross_view_pairs_are_one_to_one_by_nipple_distance():
    cc = [{"nipple_distance_mm": d} for d in (30.0, 62.0, 90.0)]
    mlo = [{"nipple_distance_mm": d} for d in (65.0, 33.0, 140.0, 31.0)]
    assert cross_view_pairs(cc, mlo) == [(0, 3), (1, 0)]  # 90 mm has no partner within 10 mm; 33 stays unused
    assert cross_view_pairs(cc, mlo, tolerance_mm=2.0) == [(0, 3)]


def test_breast_summaries_mark_findings_seen_in_both_views():
    images = [{"index": 0, "laterality": "R", "view": "CC"}, {"index": 1, "laterality": "R", "view": "MLO"},
              {"index": 2, "laterality": "L", "view": "CC"}, {"index": 3, "laterality": "L", "view": "MLO"}]
    findings = [
        {"index": 0, "image": 0, "kind": "calcification_cluster", "nipple_distance_mm": 40.0, "suspicion": 0.3},
        {"index": 1, "image": 1, "kind": "calcification_cluster", "nipple_distance_mm": 44.0, "suspicion": 0.6},
        {"index": 2, "image": 1, "kind": "mass", "nipple_distance_mm": 41.0, "suspicion": 0.9},  # other kind
        {"index": 3, "image": 2, "kind": "calcification_cluster", "nipple_distance_mm": 70.0, "suspicion": 0.2},
    ]
    out = {s["laterality"]: s for s in breast_summaries(images, findings)}
    assert findings[0]["seen_in_both_views"] and findings[1]["seen_in_both_views"]
    assert findings[0]["other_view_finding"] == 1 and findings[1]["other_view_finding"] == 0
    assert not findings[2]["seen_in_both_views"] and not findings[3]["seen_in_both_views"]
    assert out["R"]["n_seen_in_both_views"] == 1 and out["R"]["highest_suspicion_finding"] == 2
    assert out["R"]["highest_suspicion"] == pytest.approx(0.9) and out["L"]["n_findings"] == 1
    assert out["L"]["views"] == ["CC", "MLO"]


def test_montage_hangs_right_then_left_with_the_chest_walls_facing():
    breast = _half_disc().astype(np.float32) * 100
    images = [{"laterality": lat, "view": view, "pixels": breast, "marks": [(150, 180, 12, (255, 0, 0))]}
              for lat in ("R", "L") for view in ("CC", "MLO")]
    sheet = np.asarray(montage(images, height=200))
    assert sheet.shape == (400, 2 * 150, 3)
    top_left, top_right = sheet[:200, :150].mean(axis=2), sheet[:200, 150:].mean(axis=2)
    # chest walls in the middle: the right breast's tissue is at its picture's right edge, the left one's at its left
    assert top_left[100, 145] > 100 > top_left[100, 2] and top_right[100, 2] > 100 > top_right[100, 145]
    assert (sheet[..., 0].astype(int) - sheet[..., 1] > 100).any()  # findings drawn in red


# ------------------------------------------------------------------------- the exam through process_study
# Phantoms: 700 x 560 px at 0.1 mm (small, still a 1 cm2 cluster well inside the breast).  Truth is on the stored
# grid; findings carry the stored-grid point (stored_xy_*) beside the canonical one.

SMALL = dict(rows=700, cols=560, isolated_per_image=(2, 3), extended_truth=True)
FOUR = ["R_CC", "L_CC", "R_MLO", "L_MLO"]


def _read(out, truth_path, name="res", **options):
    import json

    from imaging_tasks.mammography.study import process_study

    truth = json.loads(truth_path.read_text())
    files = sorted((out / "mammography" / truth["label"]).iterdir())
    result = process_study(files, out / name, device="cpu", **options)
    doc = json.loads((out / name / "mammography.json").read_text())
    return truth, result, doc


def _dist(a, b) -> float:
    return float(np.hypot(a[0] - b[0], a[1] - b[1]))


@pytest.fixture(scope="module")
def exam(tmp_path_factory):
    from imaging_tasks.mammography.synth import synthesize

    out = tmp_path_factory.mktemp("mg_exam")
    (tp,) = synthesize(out, 1, seed=7, views=FOUR, clusters_per_image=(0, 1), shared_clusters=1, **SMALL)
    return (out, *_read(out, tp))


def test_shared_clusters_are_found_in_both_views_and_on_their_stored_pixels(exam):
    _out, truth, result, doc = exam
    clusters = [f for f in result["findings"] if f["kind"] == "calcification_cluster"]
    by_index = {f["index"]: f for f in clusters}
    n_shared = 0
    for lid, lesion in truth["truth"]["lesions"].items():
        matched = {}
        for key in lesion["views"]:
            lat, view = key.split("_")
            (planted,) = [c for c in truth["truth"]["views"][key]["clusters"] if c["lesion_id"] == lid]
            mine = [f for f in clusters if (f["laterality"], f["view"]) == (lat, view)]
            best = min(mine, key=lambda f: _dist(f["stored_xy_mm"], planted["centre_xy_mm"]), default=None)
            assert best is not None, f"{lid} not found in {key}"
            # canonical -> stored mapping: the cluster sits on the planted stored pixels
            assert _dist(best["stored_xy_px"], planted["centre_xy_px"]) * 0.1 < 1.0, (key, best, planted)
            matched[view] = best
        if len(matched) == 2:
            n_shared += 1
            cc, mlo = matched["CC"], matched["MLO"]
            assert cc["seen_in_both_views"] and mlo["seen_in_both_views"], lid
            assert by_index[cc["other_view_finding"]] is mlo and by_index[mlo["other_view_finding"]] is cc
    assert n_shared == 2  # one per breast
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    assert metrics["n_seen_in_both_views"] >= n_shared
    for f in clusters:  # documented suspicion: monotone in evidence, in (0, 1)
        assert 0 < f["suspicion"] < 1 and f["nipple_distance_mm"] > 0
    ranked = sorted(clusters, key=lambda f: f["evidence"])
    assert [f["suspicion"] for f in ranked] == sorted(f["suspicion"] for f in clusters)


def test_exam_outputs_summaries_and_qc(exam):
    from PIL import Image

    out, truth, result, doc = exam
    for name in result["outputs"]:
        assert (out / "res" / name).is_file()
    assert {"mammography.json", "qc_exam.png", "qc_R_CC.png", "qc_L_MLO.png"} <= set(result["outputs"])
    sheet = Image.open(out / "res" / "qc_exam.png")
    assert sheet.height == 1200 and sheet.width > 600  # 2 x 2 hanging of 600-px rows
    rgb = np.asarray(sheet.convert("RGB")).astype(int)
    assert ((rgb[..., 0] > 200) & (rgb[..., 1] > 200) & (rgb[..., 2] < 60)).any()  # clusters seen in both: yellow
    summaries = {f["laterality"]: f for f in result["findings"] if f["kind"] == "breast_summary"}
    assert set(summaries) == {"R", "L"}
    metrics = {m["name"]: m for m in result["metrics"]}
    for lat, s in summaries.items():
        assert s["views"] == ["CC", "MLO"] and s["birads_density"] in "abcd"
        assert metrics[f"percent_density_{lat}"]["value"] == s["percent_density"]
        assert metrics[f"highest_suspicion_{lat}"]["value"] == s["highest_suspicion"]
        mine = [f for f in result["findings"] if f["kind"] == "calcification_cluster" and f["laterality"] == lat]
        assert s["n_clusters"] == len(mine) and s["highest_suspicion"] == max(f["suspicion"] for f in mine)
    assert metrics["birads_density"]["unit"] == "category" and 1 <= metrics["birads_density"]["value"] <= 4
    text = json.dumps(result) + (out / "res" / "mammography.json").read_text()
    for value in truth["phi"]:
        if len(value) > 6 and value != truth["study_uid"]:
            assert value not in text


@pytest.fixture(scope="module")
def dense_exam(tmp_path_factory):
    from imaging_tasks.mammography.synth import synthesize

    out = tmp_path_factory.mktemp("mg_dense")
    (tp,) = synthesize(out, 1, seed=7, views=FOUR, clusters_per_image=(0, 0), density={"R": 0.15, "L": 0.35},
                       **SMALL)
    return (out, *_read(out, tp))


def test_breast_density_within_five_points_and_the_exam_takes_the_denser_breast(dense_exam):
    from imaging_tasks.mammography.density import birads_category

    _out, truth, result, doc = dense_exam
    summaries = {f["laterality"]: f for f in result["findings"] if f["kind"] == "breast_summary"}
    for lat, planted in truth["truth"]["breasts"].items():
        got = summaries[lat]["percent_density"]
        assert abs(got - 100 * planted["dense_area_fraction"]) <= 5.0, (lat, got, planted, summaries[lat])
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    assert metrics["percent_density"] == max(s["percent_density"] for s in summaries.values())
    assert metrics["birads_density"] == "abcd".index(birads_category(metrics["percent_density"])) + 1
    assert doc["exam"]["density"]["birads_density"] == birads_category(metrics["percent_density"])


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """One two-view exam stored five ways: as generated, MONOCHROME1, a sigmoid VOI, a VOI LUT sequence, and
    mirrored / flipped storage (PatientOrientation says so), each read by process_study."""
    from imaging_tasks.mammography.synth import synthesize

    out = tmp_path_factory.mktemp("mg_variants")
    kinds = {"base": {}, "monochrome1": {"photometric": "MONOCHROME1", "flip": "rotate180"},
             "sigmoid": {"voi": "sigmoid", "flip": "horizontal"},
             "lut_sequence": {"voi": "lut_sequence", "flip": "vertical"}}
    runs = {}
    for name, kw in kinds.items():
        (tp,) = synthesize(out / name, 1, seed=5, views=["L_CC", "R_MLO"], clusters_per_image=(1, 1), **SMALL, **kw)
        runs[name] = _read(out / name, tp)
    return runs


def test_storage_variants_of_one_exam_give_the_same_findings(variants):
    _truth, base, base_doc = variants["base"]
    ref = [f for f in base["findings"] if f["kind"] == "calcification_cluster"]
    assert len(ref) >= 2
    base_metrics = {m["name"]: m["value"] for m in base["metrics"]}
    for name, (truth, result, doc) in variants.items():
        got = [f for f in result["findings"] if f["kind"] == "calcification_cluster"]
        assert len(got) == len(ref), name
        for f in ref:  # canonical grid: the same whatever the storage
            twin = min((g for g in got if (g["laterality"], g["view"]) == (f["laterality"], f["view"])),
                       key=lambda g: _dist(g["centre_xy_mm"], f["centre_xy_mm"]))
            assert _dist(twin["centre_xy_mm"], f["centre_xy_mm"]) < 0.5, name
            assert twin["n_members"] == f["n_members"] and twin["seen_in_both_views"] == f["seen_in_both_views"]
        for im in doc["images"]:  # and the stored-grid point lands on the planted pixels of this storage
            planted = truth["truth"]["images"][im["sop_instance_uid"]]["clusters"]
            for cl in im["clusters"]:
                assert min(_dist(cl["stored_xy_px"], p["centre_xy_px"]) for p in planted) * 0.1 < 2.0, name
        metrics = {m["name"]: m["value"] for m in result["metrics"]}
        assert metrics["n_clusters"] == base_metrics["n_clusters"], name
        assert abs(metrics["n_calcifications"] - base_metrics["n_calcifications"]) <= 2, name
    flips = {name: {tuple(im["flips"]) for im in doc["images"]} for name, (_t, _r, doc) in variants.items()}
    assert len(set(map(frozenset, flips.values()))) > 1  # the variants really were stored differently
