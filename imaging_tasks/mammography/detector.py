"""Bring-your-own lesion detector for mammograms (masses, calcification clusters): a TorchScript or torch.export
model with a ``"task": "detection"`` JSON beside it (the contract: module docstring of
:mod:`imaging_tasks.byo_model`, "Detection output" and "Geometry").

:func:`load_detector` loads and checks it; :func:`detect` (one image) and :func:`detect_images` (several, run in
batches of the JSON's ``batch_size``) feed it the image, map its boxes back to the image's pixels and to mm, drop
boxes under the score threshold and apply non-maximum suppression per label (:func:`nms`, numpy: torchvision is
not needed).

Findings (dicts, JSON-ready, in decreasing score)::

    {"source": "byo_model", "label": "mass", "label_id": 1, "score": 0.93,
     "box_xyxy_px": [x0, y0, x1, y1],   # image pixel edges: pixel (row r, column c) covers c..c+1, r..r+1
     "centre_xy_px": [x, y],            # (column, row) on the pixel-index grid: ((x0 + x1) / 2 - 0.5, ...)
     "box_xyxy_mm": [...], "centre_xy_mm": [x, y],   # mm = pixel-index coordinate * spacing (pixel (0, 0)'s centre
                                        # at 0 mm), the frame of imaging_tasks.mammography.calcifications
     "size_mm": [width, height],
     "model": {"name": ..., "version": ... or None, "sha256": ..., "uri": ...}}

Coordinates are those of the image given (rows down, columns right).  When the image was reoriented before
detection (e.g. mirrored to a canonical chest-wall side), mapping findings back to the stored pixels is the
caller's business.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from imaging_tasks import byo_model
from imaging_tasks.byo_model import ModelSpec
from imaging_tasks.errors import ConfigError

NORMALIZATIONS = byo_model.PER_FRAME + ("none",)


def load_detector(uri, device=None) -> tuple[object, ModelSpec]:
    """``(model, spec)`` for a detection model URI; :class:`ConfigError` for a model that is not one."""
    model, spec = byo_model.load_model(uri, device=device, task="detection")
    problems = []
    if spec.channels != 1:
        problems.append(f"'channels' is {spec.channels}; a mammogram is one grey channel: use 'channels': 1")
    if spec.normalization.method not in NORMALIZATIONS:
        problems.append(f"normalization {spec.normalization.method!r} is for 8-bit images; a mammogram has no fixed "
                        f"0-255 scale: use one of {', '.join(NORMALIZATIONS)}")
    if spec.um_per_px is not None:
        problems.append("'um_per_px' is for microscopy; give the model's 'pixel_spacing_mm' (or 'input_size')")
    if problems:
        raise ConfigError(f"model JSON {spec.config_uri} does not describe a mammography detector: "
                          + "; ".join(problems) + f". Fix the file ({byo_model.DOC})")
    return model, spec


def model_record(spec: ModelSpec) -> dict:
    """What each finding cites of the model."""
    return {"name": spec.name, "version": spec.version or None, "sha256": spec.sha256, "uri": spec.uri}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of [x0, y0, x1, y1] boxes; area = (x1 - x0) * (y1 - y0); 0 where the union
    is empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def nms(boxes, scores, labels, iou: float = 0.5) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression per label, in decreasing score (ties: lower index first).

    A box is removed when its IoU with an already kept box of the same label is greater than ``iou``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"boxes, scores and labels differ in length: {len(boxes)}, {len(scores)}, {len(labels)}")
    if not 0 <= iou <= 1:
        raise ValueError(f"iou must be within 0..1, got {iou!r}")
    order = np.lexsort((np.arange(len(scores)), -scores))  # score descending, then index ascending
    removed = np.zeros(len(scores), dtype=bool)
    keep = []
    for pos, i in enumerate(order):
        if removed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1:]
        rest = rest[(labels[rest] == labels[i]) & ~removed[rest]]
        if len(rest):
            removed[rest[box_iou(boxes[i], boxes[rest])[0] > iou]] = True
    return np.asarray(keep, dtype=np.int64)


def _spacing(pixel_spacing_mm) -> tuple[float, float]:
    try:
        values = np.broadcast_to(np.asarray(pixel_spacing_mm, dtype=float), (2,))
    except (ValueError, TypeError):
        values = np.array([math.nan, math.nan])
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"pixel spacing must be one or two positive numbers (mm, [row, column]), "
                         f"got {pixel_spacing_mm!r}")
    return float(values[0]), float(values[1])


def _model_device(model):
    import torch

    for tensors in (model.parameters(), model.buffers()):
        for t in tensors:
            return t.device
    return torch.device("cpu")


def check_rows(spec: ModelSpec, rows: np.ndarray) -> np.ndarray:
    """The used rows (``score >= 0``) of one image's (M, 6) output, checked against the contract."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    score = rows[:, 4]
    where = f"model {spec.name} ({spec.uri})"
    bad_score = np.isnan(score) | (score == np.inf)
    if bad_score.any():
        raise ConfigError(f"{where} returned a score of {float(score[bad_score][0])}; scores must be finite (>= 0 "
                          "for a detection, < 0 for a padding row): fix the model")
    used = rows[score >= 0]
    if not np.isfinite(used).all():
        first = used[~np.isfinite(used).all(axis=1)][0].tolist()
        raise ConfigError(f"{where} returned a detection with non-finite values {first}: fix the model")
    flipped = (used[:, 2] < used[:, 0]) | (used[:, 3] < used[:, 1])
    if flipped.any():
        raise ConfigError(f"{where} returned box {used[flipped][0, :4].tolist()} with x1 < x0 or y1 < y0; boxes are "
                          "[x0, y0, x1, y1] with x0 <= x1, y0 <= y1 (see 'Detection output' in "
                          "imaging_tasks.byo_model): fix the model")
    known = np.array(sorted(spec.labels.values()), dtype=np.float64)
    unknown = ~np.isin(used[:, 5], known)
    if unknown.any():
        raise ConfigError(f"{where} returned label {float(used[unknown][0, 5])}, which is not a number in its JSON's "
                          f"labels {dict(spec.labels)} ({spec.config_uri}): fix 'labels' or the model")
    return used


def detect_images(model, spec: ModelSpec, images: Sequence[np.ndarray], pixel_spacings_mm: Sequence, *,
                  score_threshold: float, iou: float = 0.5, device=None) -> list[list[dict]]:
    """:func:`detect` for several images: one findings list per image.

    Images fed at the same model grid are run together, ``spec.batch_size`` at a time.  ``device``: where the
    model is (default: that of its first parameter or buffer, else the CPU).
    """
    import torch
    import torch.nn.functional as F

    if spec.task != "detection":
        raise ConfigError(f"model JSON {spec.config_uri} says task {spec.task!r}; detection needs a 'detection' model")
    if spec.normalization.method not in NORMALIZATIONS or spec.channels != 1:
        raise ConfigError(f"model JSON {spec.config_uri}: a mammography detector takes 'channels': 1 and one of "
                          f"{', '.join(NORMALIZATIONS)} normalization (load it with load_detector)")
    try:
        threshold = float(score_threshold)
    except (TypeError, ValueError):
        threshold = math.nan
    if isinstance(score_threshold, bool) or not math.isfinite(threshold):
        raise ValueError(f"score_threshold must be a finite number, got {score_threshold!r}")
    if len(images) != len(pixel_spacings_mm):
        raise ValueError(f"{len(images)} images but {len(pixel_spacings_mm)} pixel spacings")
    dev = torch.device(device) if device is not None else _model_device(model)
    prepared, grids = [], []
    for image, spacing in zip(images, pixel_spacings_mm):
        image = np.asarray(image)
        if image.ndim != 2 or min(image.shape) < 1:
            raise ValueError(f"an image must be (H, W) with pixels, got shape {image.shape}")
        sp = _spacing(spacing)
        grids.append(tuple(byo_model.model_grid(image.shape, sp, spec)))
        prepared.append((image, sp))

    outputs: list[np.ndarray | None] = [None] * len(images)
    for grid in dict.fromkeys(grids):
        idx = [i for i, g in enumerate(grids) if g == grid]
        x = []
        for i in idx:
            image = prepared[i][0]
            t = torch.from_numpy(byo_model.normalize_frames(image[None], spec.normalization)[:, None])
            if grid != tuple(image.shape):
                t = F.interpolate(t, size=grid, mode="bilinear", align_corners=False)
            x.append(t)
        out = byo_model.run_batches(model, spec, torch.cat(x).numpy(), dev)
        for k, i in enumerate(idx):
            outputs[i] = out[k]

    results = []
    for (image, sp), grid, out in zip(prepared, grids, outputs):
        results.append(_findings(spec, out, image.shape, grid, sp, threshold, iou))
    return results


def detect(model, spec: ModelSpec, image: np.ndarray, pixel_spacing_mm, *, score_threshold: float,
           iou: float = 0.5, device=None) -> list[dict]:
    """Findings of the detector on one (H, W) image (float, brighter = denser), in decreasing score.

    ``pixel_spacing_mm``: one number or [row, column] mm.  Steps (``byo_model`` docstring, "Geometry"): normalise,
    resize to the model's grid, run, map the boxes back (``x * W / w``, ``y * H / h``), clip to the image and drop
    empty boxes, drop ``score < score_threshold``, NMS per label at ``iou`` (removed: IoU > ``iou``).
    """
    return detect_images(model, spec, [image], [pixel_spacing_mm], score_threshold=score_threshold, iou=iou,
                         device=device)[0]


def _findings(spec: ModelSpec, out: np.ndarray, shape, grid, spacing, score_threshold: float,
              iou: float) -> list[dict]:
    rows = check_rows(spec, out)
    h, w = shape
    boxes = rows[:, :4] * np.array([w / grid[1], h / grid[0], w / grid[1], h / grid[0]])
    boxes = np.clip(boxes, 0.0, np.array([w, h, w, h], dtype=np.float64))
    scores, labels = rows[:, 4], rows[:, 5].astype(np.int64)
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (scores >= score_threshold)
    boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
    keep = nms(boxes, scores, labels, iou)
    names = {v: k for k, v in spec.labels.items()}
    sr, sc = spacing
    model = model_record(spec)
    findings = []
    for i in keep:
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        cx, cy = (x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5
        findings.append({
            "source": "byo_model", "label": names[int(labels[i])], "label_id": int(labels[i]),
            "score": float(scores[i]),
            "box_xyxy_px": [x0, y0, x1, y1],
            "centre_xy_px": [cx, cy],
            "box_xyxy_mm": [(x0 - 0.5) * sc, (y0 - 0.5) * sr, (x1 - 0.5) * sc, (y1 - 0.5) * sr],
            "centre_xy_mm": [cx * sc, cy * sr],
            "size_mm": [(x1 - x0) * sc, (y1 - y0) * sr],
            "model": dict(model),
        })
    return findings
