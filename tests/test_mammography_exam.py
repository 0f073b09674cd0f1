"""Exam level: nipple, lesions seen in both views, per-breast summaries and the montage, on constructed exams."""
from __future__ import annotations

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
