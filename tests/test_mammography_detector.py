"""Bring-your-own mammography detector (imaging_tasks.mammography.detector) with tiny scripted models.

"By hand" below is torch.jit.load + the documented steps (imaging_tasks.byo_model docstring, "Detection output"
and "Geometry") written out independently: min-max normalisation, bilinear resize, the model, boxes scaled by the
size ratio, clipped, thresholded, and a plain-Python greedy NMS per label.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from byo_models import (DETECTION_LABELS, Bands, BlobDetector, FixedBoxes, blobs_image, config, detector_config,
                        export_model, save_model)
from imaging_tasks import byo_model
from imaging_tasks.errors import ConfigError
from imaging_tasks.mammography import detector


@pytest.fixture(autouse=True)
def fresh_cache():
    byo_model.clear_cache()
    yield
    byo_model.clear_cache()


class InputFrame(torch.nn.Module):
    """One box over its whole input, [0, 0, w, h], score h * 1000 + w (tells the grid it was fed), label 1; and a
    box around exactly input pixel (row 2, column 3), label 2, score 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = float(x.shape[2]), float(x.shape[3])
        rows = torch.tensor([[0.0, 0.0, w, h, h * 1000.0 + w, 1.0], [3.0, 2.0, 4.0, 3.0, 0.5, 2.0]])
        return rows.unsqueeze(0).expand(x.shape[0], 2, 6).contiguous()


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def by_hand(model_path, image, cfg, spacing, score_threshold, iou=0.5):
    """[(label, score, [x0, y0, x1, y1] image px)] the documented way, in decreasing score."""
    model = torch.jit.load(str(model_path)).eval()
    f = image.astype(np.float64)
    f = (f - f.min()) / (f.max() - f.min())  # the configs below use minmax
    t = torch.from_numpy(f.astype(np.float32))[None, None]
    H, W = image.shape
    if cfg.get("input_size"):
        size = tuple(cfg["input_size"])
    elif cfg.get("pixel_spacing_mm"):
        size = tuple(int(math.floor(n * s / cfg["pixel_spacing_mm"] + 0.5)) for n, s in zip((H, W), spacing))
    else:
        size = (H, W)
    if size != (H, W):
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    if cfg.get("channels_last", True):  # as documented: weights and batches channels-last (sums in that order)
        model.to(memory_format=torch.channels_last)
        t = t.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        rows = model(t)[0].numpy().astype(np.float64)
    sx, sy = W / size[1], H / size[0]
    cands = []
    for i, (x0, y0, x1, y1, score, label) in enumerate(rows):
        if score < 0:
            continue
        box = [min(max(x0 * sx, 0.0), W), min(max(y0 * sy, 0.0), H), min(max(x1 * sx, 0.0), W),
               min(max(y1 * sy, 0.0), H)]
        if box[2] > box[0] and box[3] > box[1] and score >= score_threshold:
            cands.append((-score, i, int(label), box))
    kept = []
    for neg, _, label, box in sorted(cands):
        if all(k[0] != label or _iou(k[2], box) <= iou for k in kept):
            kept.append((label, -neg, box))
    return kept, len(cands)


def test_detect_equals_by_hand_and_finds_the_blobs(tmp_path):
    # two lobes of one bright mass (its boxes overlap: NMS must merge them), a small bright spot, a faint blob
    blobs = ((30.0, 20.0, 3.0, 1.0), (30.0, 30.0, 3.0, 1.0), (70.0, 60.0, 1.5, 0.9), (60.0, 30.0, 3.0, 0.5))
    image = blobs_image((96, 80), blobs) * 900 + 100  # any scale: minmax normalisation
    cfg = detector_config()
    path = save_model(tmp_path, BlobDetector(), cfg)
    model, spec = detector.load_detector(path, device="cpu")
    findings = detector.detect(model, spec, image, 0.07, score_threshold=0.3, iou=0.15)
    expected, n_candidates = by_hand(path, image, cfg, (0.07, 0.07), 0.3, iou=0.15)
    assert n_candidates > len(expected)  # NMS removed something
    assert [(f["label_id"], f["score"], f["box_xyxy_px"]) for f in findings] == expected
    assert [f["score"] for f in findings] == sorted((f["score"] for f in findings), reverse=True)
    for f in findings:
        assert f["label"] == {1: "mass", 2: "calcification_cluster"}[f["label_id"]] and f["source"] == "byo_model"
        assert f["model"] == {"name": "blob-detector", "version": "0.1", "sha256": spec.sha256, "uri": str(path)}
        x0, y0, x1, y1 = f["box_xyxy_px"]
        assert f["centre_xy_px"] == [(x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5]
        assert f["centre_xy_mm"] == [f["centre_xy_px"][0] * 0.07, f["centre_xy_px"][1] * 0.07]
    json.dumps(findings)
    masses = [f for f in findings if f["label"] == "mass"]
    assert len(masses) == 1  # two overlapping peaks of the two-lobed mass, one kept
    assert abs(masses[0]["centre_xy_px"][0] - 25) <= 5 and abs(masses[0]["centre_xy_px"][1] - 30) <= 1
    spots = [f["centre_xy_px"] for f in findings if f["label"] == "calcification_cluster"]
    assert any(abs(x - 60) <= 1 and abs(y - 70) <= 1 for x, y in spots)  # the spot, at its pixel
    assert not any(abs(x - 30) <= 3 and abs(y - 60) <= 3 for x, y in spots)  # the faint blob is under 0.5


def test_detect_images_batches_like_one_at_a_time(tmp_path):
    cfg = detector_config(batch_size=2, input_size=[64, 48])
    path = save_model(tmp_path, BlobDetector(), cfg)
    model, spec = detector.load_detector(path, device="cpu")
    images = [blobs_image((96, 80), seed=s) for s in range(3)] + [blobs_image((70, 90), seed=9)]
    spacings = [0.1, (0.1, 0.12), 0.05, 0.1]
    together = detector.detect_images(model, spec, images, spacings, score_threshold=0.0)
    for image, sp, found in zip(images, spacings, together):
        assert found == detector.detect(model, spec, image, sp, score_threshold=0.0)
        sp = np.broadcast_to(sp, (2,))
        expected, _ = by_hand(path, image, cfg, sp, 0.0)
        assert [(f["label_id"], f["score"], f["box_xyxy_px"]) for f in found] == expected and expected


def test_torch_export_detector_same_findings(tmp_path):
    cfg = detector_config(input_size=[48, 40], channels_last=False)
    ts = save_model(tmp_path, BlobDetector(), cfg)
    pt2 = tmp_path / "model.pt2"
    torch.export.save(export_model(BlobDetector(), example_shape=(2, 1, 48, 40)), str(pt2))
    pt2.with_suffix(".json").write_text(json.dumps(cfg))
    image = blobs_image((96, 80), seed=4)
    found = detector.detect(*detector.load_detector(pt2, device="cpu"), image, 0.1, score_threshold=0.0)
    assert found and found[0]["model"]["uri"] == str(pt2)
    expected = detector.detect(*detector.load_detector(ts, device="cpu"), image, 0.1, score_threshold=0.0)
    strip = [{k: v for k, v in f.items() if k != "model"} for f in found]
    assert strip == [{k: v for k, v in f.items() if k != "model"} for f in expected]


def test_geometry_with_input_size(tmp_path):
    rows = [[10.0, 20.0, 30.0, 40.0, 0.9, 1.0],  # inside
            [-5.0, -5.0, 10.0, 10.0, 0.8, 2.0],  # clipped at the top-left corner
            [55.0, 10.0, 70.0, 20.0, 0.7, 2.0],  # clipped at the right edge
            [61.0, 61.0, 70.0, 70.0, 0.95, 1.0],  # wholly outside: dropped
            [1.0, 1.0, 2.0, 2.0, -1.0, 7.0]]  # padding (label 7 is not checked)
    path = save_model(tmp_path, FixedBoxes(rows), detector_config(input_size=[60, 60]))
    model, spec = detector.load_detector(path, device="cpu")
    image = np.random.default_rng(0).random((120, 90)).astype(np.float32)
    found = detector.detect(model, spec, image, (0.1, 0.07), score_threshold=0.0)
    assert [f["box_xyxy_px"] for f in found] == [[15.0, 40.0, 45.0, 80.0], [0.0, 0.0, 15.0, 20.0],
                                                 [82.5, 20.0, 90.0, 40.0]]
    first = found[0]
    assert first["centre_xy_px"] == [29.5, 59.5]
    assert first["centre_xy_mm"] == pytest.approx([29.5 * 0.07, 59.5 * 0.1])
    assert first["box_xyxy_mm"] == pytest.approx([14.5 * 0.07, 39.5 * 0.1, 44.5 * 0.07, 79.5 * 0.1])
    assert first["size_mm"] == pytest.approx([30 * 0.07, 40 * 0.1])
    assert [f["label"] for f in found] == ["mass", "calcification_cluster", "calcification_cluster"]


def test_geometry_with_pixel_spacing(tmp_path):
    path = save_model(tmp_path, InputFrame(), detector_config(pixel_spacing_mm=0.2))
    model, spec = detector.load_detector(path, device="cpu")
    image = np.random.default_rng(1).random((101, 80)).astype(np.float32)
    whole, pixel = detector.detect(model, spec, image, 0.1, score_threshold=0.0)
    assert whole["score"] == 51 * 1000 + 40  # fed floor(101 * 0.1 / 0.2 + 0.5) x floor(80 * 0.1 / 0.2 + 0.5)
    assert whole["box_xyxy_px"] == [0.0, 0.0, 80.0, 101.0]  # the model's whole input is the whole image
    assert pixel["box_xyxy_px"] == pytest.approx([6.0, 2 * 101 / 51, 8.0, 3 * 101 / 51], abs=1e-12)
    # anisotropic image pixels (row 0.1, column 0.25 mm): 101 x 80 px -> 51 x 100 at 0.2 mm
    whole, pixel = detector.detect(model, spec, image, (0.1, 0.25), score_threshold=0.0)
    assert whole["score"] == 51 * 1000 + 100 and whole["box_xyxy_px"] == [0.0, 0.0, 80.0, 101.0]
    assert pixel["box_xyxy_px"] == pytest.approx([3 * 0.8, 2 * 101 / 51, 4 * 0.8, 3 * 101 / 51], abs=1e-12)
    assert whole["size_mm"] == pytest.approx([80 * 0.25, 101 * 0.1])
    assert pixel["centre_xy_mm"] == pytest.approx([(3.5 * 0.8 - 0.5) * 0.25, (2.5 * 101 / 51 - 0.5) * 0.1])


def test_blob_positions_in_mm_through_a_resampling_model(tmp_path):
    """The blob detector at 0.2 mm on an image at 0.1 mm: findings where the blobs were planted (in mm)."""
    truth = ((40.0, 30.0), (100.0, 110.0))  # (row, column) px
    image = blobs_image((150, 140), tuple((r, c, 8.0, 1.0) for r, c in truth), seed=3)
    path = save_model(tmp_path, BlobDetector(), detector_config(pixel_spacing_mm=0.2))
    model, spec = detector.load_detector(path, device="cpu")
    found = [f for f in detector.detect(model, spec, image, 0.1, score_threshold=0.6) if f["label"] == "mass"]
    assert len(found) == 2
    for (r, c), f in zip(sorted(truth), sorted(found, key=lambda f: f["centre_xy_mm"][1])):
        assert abs(f["centre_xy_mm"][0] - c * 0.1) <= 0.2 and abs(f["centre_xy_mm"][1] - r * 0.1) <= 0.2
        assert f["size_mm"] == pytest.approx([2.4, 2.4])  # 12 model px of 0.2 mm


def test_nms_on_constructed_overlaps():
    boxes = np.array([[0, 0, 10, 10],     # 0: kept (best of label 1)
                      [3, 0, 13, 10],     # 1: IoU with 0 = 70/130 > 0.5: removed
                      [6, 0, 16, 10],     # 2: IoU with 1 > 0.5 but 1 is gone; with 0 = 40/160: kept
                      [0, 0, 10, 10],     # 3: same box as 0, label 2: kept (class-wise)
                      [0, 0, 10, 5],      # 4: IoU with 0 exactly 0.5: kept (removed only when greater)
                      [0, 0, 10, 10],     # 5: same as 0, same score: 0 wins the tie (lower index), 5 removed
                      [50, 50, 50, 60]], float)  # 6: no area: IoU 0 with everything, kept
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.9, 0.1])
    labels = np.array([1, 1, 1, 2, 1, 1, 1])
    assert detector.nms(boxes, scores, labels, 0.5).tolist() == [0, 2, 3, 4, 6]
    assert detector.nms(boxes, scores, labels, 0.49).tolist() == [0, 2, 3, 6]  # 4 goes too
    assert detector.nms(boxes, scores, np.ones(7), 0.5).tolist() == [0, 2, 4, 6]  # one label: 3 goes
    assert detector.nms(boxes, scores, labels, 1.0).tolist() == [0, 5, 1, 2, 3, 4, 6]  # nothing removed
    assert detector.nms(np.zeros((0, 4)), [], [], 0.5).tolist() == []
    np.testing.assert_allclose(detector.box_iou(boxes[:3], boxes[:3]),
                               [[1, 0.7 / 1.3, 0.25], [0.7 / 1.3, 1, 0.7 / 1.3], [0.25, 0.7 / 1.3, 1]])


def test_detect_threshold_and_class_wise_nms_through_the_model(tmp_path):
    rows = [[0, 0, 10, 10, 0.9, 1], [3, 0, 13, 10, 0.8, 1], [6, 0, 16, 10, 0.7, 1], [0, 0, 10, 10, 0.6, 2],
            [20, 20, 30, 30, 0.2, 2], [0, 0, 0, 0, -1, 0]]
    path = save_model(tmp_path, FixedBoxes(rows), detector_config())
    model, spec = detector.load_detector(path, device="cpu")
    image = np.random.default_rng(2).random((40, 40)).astype(np.float32)
    found = detector.detect(model, spec, image, 0.1, score_threshold=0.25)
    assert [(f["label_id"], f["box_xyxy_px"][0]) for f in found] == [(1, 0.0), (1, 6.0), (2, 0.0)]
    assert [f["score"] for f in found] == pytest.approx([0.9, 0.7, 0.6])
    found = detector.detect(model, spec, image, 0.1, score_threshold=0.0, iou=0.1)
    assert [(f["label_id"], f["box_xyxy_px"][0]) for f in found] == [(1, 0.0), (2, 0.0), (2, 20.0)]


@pytest.mark.parametrize("changes, expected", [
    ({"labels": ...}, "missing 'labels': a detection model needs"),
    ({"labels": {"mass": 0, "calcification_cluster": 1}}, "0 is background"),
    ({"labels": {"mass": 1, "calcification_cluster": 3}}, "they must be 1..2"),
    ({"output": "logits"}, "a detection model's output must be one of boxes"),
    ({"task": "detect"}, "'task' is 'detect'"),
    ({"version": 3}, "'version' is 3"),
    ({"version": " "}, "'version' is ' '"),
    ({"output_dim": 6}, "'output_dim' is for embedding models"),
    ({"input_size": [64, 64], "pixel_spacing_mm": 0.2}, "give one"),
    ({"max_detections": 10}, "unknown key(s) 'max_detections'"),
])
def test_bad_detection_json_is_a_config_error(tmp_path, changes, expected):
    path = save_model(tmp_path, BlobDetector(), detector_config(**changes))
    with pytest.raises(ConfigError) as info:
        detector.load_detector(path, device="cpu")
    assert expected in str(info.value) and "Fix the file" in str(info.value)


@pytest.mark.parametrize("changes, expected", [
    ({"channels": 3}, "'channels' is 3; a mammogram is one grey channel"),
    ({"normalization": {"method": "mean_std", "mean": [0.5], "std": [0.2]}}, "'mean_std' is for 8-bit images"),
    ({"um_per_px": 0.5}, "'um_per_px' is for microscopy"),
])
def test_json_valid_but_not_a_mammography_detector(tmp_path, changes, expected):
    path = save_model(tmp_path, BlobDetector(), detector_config(**changes))
    byo_model.load_model(path, device="cpu", task="detection")  # a valid detection JSON ...
    with pytest.raises(ConfigError, match="does not describe a mammography detector") as info:
        detector.load_detector(path, device="cpu")  # ... but not for mammograms
    assert expected in str(info.value)


def test_wrong_model_or_output_is_a_config_error(tmp_path):
    seg = save_model(tmp_path, Bands(), config(), name="seg.pt")
    with pytest.raises(ConfigError, match="says task 'segmentation'; this step needs a 'detection' model"):
        detector.load_detector(seg, device="cpu")
    image = np.random.default_rng(3).random((32, 32)).astype(np.float32)
    bad = {
        "five.pt": ([[0, 0, 1, 1, 0.5]], r"outputs shape \(1, 1, 5\) for 1 images.*\(N, M, 6\)"),
        "label.pt": ([[0, 0, 1, 1, 0.5, 3]], r"label 3.0.*not a number in its JSON's labels"),
        "fraction.pt": ([[0, 0, 1, 1, 0.5, 1.5]], r"label 1.5"),
        "nan.pt": ([[0, float("nan"), 1, 1, 0.5, 1]], "non-finite values"),
        "flipped.pt": ([[5, 0, 1, 1, 0.5, 1]], r"x1 < x0 or y1 < y0"),
        "nanscore.pt": ([[0, 0, 1, 1, float("nan"), 1]], "score of nan"),
    }
    for name, (rows, pattern) in bad.items():
        path = save_model(tmp_path, FixedBoxes(rows), detector_config(), name=name)
        model, spec = detector.load_detector(path, device="cpu")
        with pytest.raises(ConfigError, match=pattern):
            detector.detect(model, spec, image, 0.1, score_threshold=0.0)
    empty = save_model(tmp_path, FixedBoxes(np.zeros((0, 6)).tolist()), detector_config(), name="empty.pt")
    model, spec = detector.load_detector(empty, device="cpu")
    assert detector.detect(model, spec, image, 0.1, score_threshold=0.0) == []
    with pytest.raises(ValueError, match="pixel spacing"):
        detector.detect(model, spec, image, 0.0, score_threshold=0.0)


def test_spec_records_version_and_labels(tmp_path):
    path = save_model(tmp_path, BlobDetector(), detector_config())
    _, spec = detector.load_detector(path, device="cpu")
    assert spec.task == "detection" and spec.output == "boxes" and dict(spec.labels) == DETECTION_LABELS
    record = json.loads(json.dumps(spec.record()))
    assert record["version"] == "0.1" and record["task"] == "detection"
    _, seg = byo_model.load_model(save_model(tmp_path, Bands(), config(), name="seg.pt"), device="cpu")
    assert seg.version == "" and seg.record()["version"] is None


def test_the_mammography_step_runs_the_site_detector_beside_the_built_in_clusters(tmp_path):
    """process_study with ``detector_uri``: the model's boxes are findings beside the clusters, with the model's
    name and version, and the same as detect() run by hand on the same images as the step feeds it (each view
    normalised to the canonical presentation image: normalize(ds).pixels), mapped back to the stored grid."""
    import json as _json

    import pydicom

    from imaging_tasks.mammography.normalize import normalize
    from imaging_tasks.mammography.study import process_study
    from imaging_tasks.mammography.synth import synthesize

    (truth_path,) = synthesize(tmp_path / "in", 1, seed=4, views=["L_CC", "L_MLO"], rows=400, cols=320,
                               pixel_spacing_mm=0.2)
    label = _json.loads(truth_path.read_text())["label"]
    files = sorted((tmp_path / "in" / "mammography" / label).iterdir())
    model = save_model(tmp_path, BlobDetector(k=8, big=15, small=5, level=0.2),
                       detector_config(pixel_spacing_mm=0.4, normalization={"method": "percentile", "low": 1,
                                                                            "high": 99}), "det.pt")
    result = process_study(files, tmp_path / "out", device="cpu", detector_uri=str(model),
                           detector_score_threshold=0.3)
    boxes = [f for f in result["findings"] if f.get("source") == "byo_model"]
    clusters = [f for f in result["findings"] if f["kind"] == "calcification_cluster"]
    assert boxes and {(f["model"], f["model_version"]) for f in boxes} == {("blob-detector", "0.1")}
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    assert metrics["n_detector_findings"] == len(boxes) and metrics["n_clusters"] == len(clusters)
    det = detector.load_detector(model, device="cpu")
    by_hand = []
    for path in files:
        mi = normalize(pydicom.dcmread(path))
        for f in detector.detect(*det, mi.pixels, mi.pixel_spacing_mm, score_threshold=0.3, device="cpu"):
            stored = mi.to_stored_xy(f["centre_xy_px"])[0]
            by_hand.append((f"model_{f['label']}", round(f["score"], 6), mi.view, round(float(stored[0]), 2),
                            round(float(stored[1]), 2)))
    assert sorted((f["kind"], round(f["score"], 6), f["view"], round(f["stored_xy_px"][0], 2),
                   round(f["stored_xy_px"][1], 2)) for f in boxes) == sorted(by_hand)
    for f in boxes:
        assert f["suspicion"] == pytest.approx(min(f["score"], 1.0), abs=1e-4) and f["model_sha256"] == det[1].sha256
