"""Bring-your-own models (TorchScript or ``torch.export``): load one by URI with the small JSON beside it, run it in
batches.

Sites train their own networks; the pipeline runs them, the same way for every specialty (cine-MR LV
segmentation, pathology tile encoders, mammography lesion detectors).  Nothing is ever fetched from a model hub:
a model is a file the deployment points at.

The model
---------
One archive at a URI: a local path (relative paths are taken from the working directory), ``file://``, ``s3://``
or ``gs://`` (remote files are fetched with :func:`imaging_tasks.storage.download`, through the task's connection
inside Airflow).  Two kinds are run, told apart by what the file holds (not by its suffix):

* **TorchScript**: ``torch.jit.save`` of ``torch.jit.script(model)`` or ``torch.jit.trace(model, example)``; put
  in eval mode after loading.
* **torch.export** (``.pt2``): ``torch.export.save`` of ``torch.export.export(model.eval(), (example,),
  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})`` (``x`` being the forward argument's name), run through
  ``ExportedProgram.module()``.  The batch dimension must be exported dynamic (the last batch of a run is
  smaller; a fixed one is refused when the model is loaded), and the model must be in eval mode *before* export:
  the exported graph keeps the mode it was traced in (batch-norm statistics, dropout).  Channel and spatial sizes
  fixed in the export are checked against ``channels`` and ``input_size``.

Anything else (a ``torch.save``'d state dict or pickled module: it needs the training code to rebuild; a
compiled AOTInductor package; a truncated file) is refused.  The forward takes one float32 tensor (N, C, H, W) and
returns one tensor (a tuple or dict, e.g. deep-supervision heads, is refused: export a wrapper returning the final
tensor).  The archive's sha256 goes into :class:`ModelSpec` so results cite the exact model (``spec.record()``).

The JSON beside it
------------------
Same URI with the suffix replaced by ``.json`` (``s3://models/lv_seg.pt`` -> ``s3://models/lv_seg.json``); the
``#`` notes below are explanation, not part of the file::

    {
      "name": "lv-seg-2026-03",              # required: non-empty text, for logs and results
      "task": "segmentation",                # required: "segmentation" | "classification" | "embedding"
                                             #           | "detection"
      "input_size": [192, 192],              # required: [H, W] the model is fed, or null (see "Geometry")
      "pixel_spacing_mm": null,              # optional: [row, col] mm (or one number) the model was trained at
      "channels": 1,                         # required: C of the input tensor
      "normalization": {"method": "percentile", "low": 1, "high": 99},   # required (see "Normalization")
      "labels": {"lv_blood_pool": 1, "lv_myocardium": 2},                # required for segmentation/classification
      "output": "logits",                    # required: see the table below
      "batch_size": 16,                      # optional (16): images per forward pass
      "amp": true,                           # optional (true): float16 autocast on CUDA (never on the CPU)
      "channels_last": true,                 # optional (true): batches laid out channels-last in memory
      "version": "2026.03.1",                # optional: non-empty text, cited beside the name in results
      "description": "..."                   # optional free text; keys starting with "x_" are yours (not read)
    }

An embedding model (pathology tile encoder, :mod:`imaging_tasks.pathology.encoder`) looks like::

    {
      "name": "tile-encoder-v1", "task": "embedding", "output": "features",
      "input_size": [224, 224], "channels": 3,
      "normalization": {"method": "mean_std", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
      "um_per_px": 0.5,                      # microns per pixel the encoder was trained at (microscopy)
      "output_dim": 768,                     # D of its (N, D) output, checked on the first batch
      "batch_size": 64
    }

``um_per_px`` (a positive number) is the microscopy counterpart of ``pixel_spacing_mm``, with a different use:
it does not resize anything here; the pathology steps require it and refuse a run whose tile grid does not match
it (:func:`imaging_tasks.pathology.encoder.check_encoder_grid`).  Giving it together with ``pixel_spacing_mm`` is
refused.  ``output_dim`` (a positive integer, embedding models only) is optional here and required by the
pathology steps, which size their feature tables from it.  ``channels_last`` (true/false): the (N, C, H, W) input
batches are made ``torch.channels_last`` in memory and the model's 4-D weights converted when it is loaded (what
convolutions run fastest on, on CUDA especially); the values are the same.  Set it to false for a model that calls
``.view()`` on its input assuming the default layout.

A detection model (mammography masses and calcification clusters, :mod:`imaging_tasks.mammography.detector`)
looks like::

    {
      "name": "mass-detector", "version": "2026.03.1", "task": "detection", "output": "boxes",
      "labels": {"mass": 1, "calcification_cluster": 2},   # the numbers in the boxes' label column
      "input_size": null, "pixel_spacing_mm": 0.2,          # or "input_size": [1024, 832] (see "Geometry")
      "channels": 1, "normalization": {"method": "percentile", "low": 0.5, "high": 99.5},
      "batch_size": 4
    }

Any other key is refused (a misspelt ``"batchsize"`` would otherwise be silently ignored).

==============  ===============================  =========================================================
task            output                           labels, and the output tensor the model must return
==============  ===============================  =========================================================
segmentation    ``logits`` or ``probabilities``  {name: 1..K}, each number once, 0 is background;
                                                 output (N, K+1, h, w): channel k is the structure
                                                 numbered k, channel 0 background
classification  ``logits`` or ``probabilities``  {name: 0..K-1}, each number once; output (N, K)
embedding       ``features``                     none; output (N, D), D = ``output_dim`` when given
detection       ``boxes``                        {name: 1..K}, each number once, 0 is background (torchvision's
                                                 numbering); output (N, M, 6) float, see "Detection output"
==============  ===============================  =========================================================

Detection output
----------------
One float tensor (N, M, 6) for a batch of N images: up to M detections per image, each row
``[x0, y0, x1, y1, score, label]``.

* ``x0, y0, x1, y1``: the box in pixels *of the model's input* (after the resize of "Geometry"), x the column
  and y the row, as edges in torchvision's convention: the input pixel at (row r, column c) covers
  ``c <= x < c + 1``, ``r <= y < r + 1`` (a box around exactly that pixel is ``[c, r, c + 1, r + 1]``);
  ``x0 <= x1`` and ``y0 <= y1``, finite.
* ``score``: the model's confidence, higher is surer, a finite number >= 0 (a probability is the natural choice:
  the run's score threshold is compared with it).
* ``label``: the number of the class in ``labels`` (e.g. 1.0 for ``"mass"``), a whole number.
* padding: M is fixed by the model (e.g. its top-k); rows with ``score < 0`` (e.g. all -1) are unused and ignored,
  whatever their other columns hold.

Every row with ``score >= 0`` is checked: a non-finite value, ``x1 < x0`` or ``y1 < y0``, or a label that is not a
number in ``labels`` is a :class:`~imaging_tasks.errors.ConfigError` (so is a NaN or +inf score).  M may be 0.  This
is what a TorchScript model can return without lists or dicts (torchvision's detectors return a list of dicts:
export a wrapper that pads ``boxes``, ``scores`` and ``labels`` into this tensor).

Normalization
-------------
Per frame (statistics in float64 over that frame's native pixels, result in float32), for images without a fixed
intensity scale (MR, CT):

* ``zscore``: ``(x - mean) / std`` (population std); a constant frame becomes 0.
* ``minmax``: ``(x - min) / (max - min)``; a constant frame becomes 0.
* ``percentile``: ``lo, hi = numpy.percentile(x, [low, high])`` (linear interpolation, 0 <= low < high <= 100),
  then ``(clip(x, lo, hi) - lo) / (hi - lo)``; ``hi == lo`` gives 0.

Fixed, for 8-bit images (RGB tiles of a slide):

* ``mean_std``: ``(x / 255 - mean[c]) / std[c]`` per channel c, i.e. on values scaled to 0-1, the way
  torchvision's ``Normalize`` is written (ImageNet: mean ``[0.485, 0.456, 0.406]``, std ``[0.229, 0.224,
  0.225]``).  ``mean`` and ``std`` are lists of ``channels`` finite numbers, every std > 0; they are given here,
  inside ``normalization``, and nowhere else (top-level ``"mean"``/``"std"`` keys are refused, so there is one
  place to read them).  Frame segmentation of MR refuses it (MR has no 0-255 scale).

And ``none``: as given (a model that normalises inside itself); for 8-bit tiles that is the values scaled to 0-1
(``x / 255``).  ``low``/``high`` belong to ``percentile`` only, ``mean``/``std`` to ``mean_std`` only.

Geometry (segmentation, :func:`segment_frames`): with ``input_size``, each normalised frame is resized to
[H, W] (``torch.nn.functional.interpolate``, bilinear, ``align_corners=False``, no antialiasing; the aspect ratio
is not kept: the model sees what it was trained on); with ``pixel_spacing_mm`` (and ``input_size`` null) it is
resized so one pixel is that spacing (size ``floor(n * spacing / model_spacing + 0.5)``, at least 1; the model must
be fully convolutional); with neither the model sees the native frame.  Giving both is refused.  The output is
resized back to the native (Y, X) the same way (bilinear, ``align_corners=False``, in float32), the label is the
argmax over channels (the first channel on a tie), which is the label number by the table above.  Nothing else
(no largest component, no hole filling), so a by-hand run of these steps gives identical labels on the same
device (on CUDA with ``amp`` the by-hand run must use the same float16 autocast; ``"amp": false`` for float32).
Detection (:func:`imaging_tasks.mammography.detector.detect`) feeds the model the same way as segmentation: the
image normalised (one per-image method, or ``none``; ``mean_std`` is refused, a mammogram has no 0-255 scale),
resized to the model's grid (``input_size``, or ``pixel_spacing_mm`` as above with the image's spacing, or the
native size), one grey channel (``"channels": 1``).  Boxes are mapped back by the ratio of the sizes, which is
exact for this resize (``align_corners=False`` maps edges to edges): ``x * W / w`` and ``y * H / h`` for an image of
(H, W) pixels fed as (h, w); then clipped to the image (``0..W``, ``0..H``) and rows whose clipped box has no area
dropped; then rows with ``score < score_threshold`` dropped; then non-maximum suppression per label (greedy, in
decreasing score, ties in row order: a box is removed when its IoU with a kept box of the same label is *greater*
than ``iou``; IoU = intersection / union of the areas, ``(x1 - x0) * (y1 - y0)``, computed on the image's pixel
coordinates).  Findings come in decreasing score; their coordinates are given in image pixels and in mm (see
:func:`~imaging_tasks.mammography.detector.detect`).
Pathology tiles follow their own rule (8-bit antialiased resize of the tile, as PIL does, then ``mean_std``): see
:func:`imaging_tasks.pathology.encoder.embed`.

Errors
------
A missing model or JSON, unreadable or invalid JSON, a file that is neither TorchScript nor torch.export, a JSON
not matching the task or the labels it needs, or a model whose output does not match its JSON (found on the first
batch: shape, ``output_dim``; for a detection model also every batch's rows, as above) raise
:class:`~imaging_tasks.errors.ConfigError` saying what is wrong and what to do: retrying cannot help.

Caching
-------
A loaded model is kept per (URI, device) for the life of the process: a step calls this per study.  Each call
re-reads the JSON and checks the model file's size and modification time (a stat, or one metadata request
for a bucket), so a model or JSON replaced at the same URI is loaded afresh, never served stale.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from imaging_tasks import retry, storage
from imaging_tasks.errors import ConfigError

log = logging.getLogger(__name__)

TASKS = ("segmentation", "classification", "embedding", "detection")
# What each task's JSON and output must look like; a new consumer (e.g. detection) adds its row here.
_OUTPUTS = {"segmentation": ("logits", "probabilities"), "classification": ("logits", "probabilities"),
            "embedding": ("features",), "detection": ("boxes",)}
# labels must be FIRST..FIRST+K-1; embedding has none
_FIRST_LABEL = {"segmentation": 1, "classification": 0, "detection": 1}
NORMALIZATIONS = ("zscore", "minmax", "percentile", "mean_std", "none")
PER_FRAME = ("zscore", "minmax", "percentile")  # statistics of each frame; "mean_std" is fixed, for 8-bit images
_REQUIRED = ("name", "task", "input_size", "channels", "normalization", "output")
_OPTIONAL = ("labels", "pixel_spacing_mm", "um_per_px", "output_dim", "batch_size", "amp", "channels_last",
             "version", "description")
BOX_COLUMNS = ("x0", "y0", "x1", "y1", "score", "label")  # detection output: (N, M, 6), see "Detection output"
FORMATS = ("torchscript", "torch.export")
DEFAULT_BATCH_SIZE = 16
DOC = "see the module docstring of imaging_tasks.byo_model for the format"


@dataclass(frozen=True)
class Normalization:
    method: str  # one of NORMALIZATIONS
    low: float | None = None  # percentile only
    high: float | None = None
    mean: tuple[float, ...] | None = None  # mean_std only: one per channel, on values scaled to 0-1
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """What the JSON says, validated, plus where the model came from and its checksum (to cite in results)."""

    uri: str  # the model file as resolved: a local one (path or file://) as an absolute path
    sha256: str  # of the archive as loaded
    config_uri: str
    config_sha256: str  # of the JSON as read
    name: str
    task: str
    input_size: tuple[int, int] | None
    channels: int
    normalization: Normalization
    labels: Mapping[str, int]  # read-only; {} for embedding
    output: str
    batch_size: int = DEFAULT_BATCH_SIZE
    amp: bool = True
    pixel_spacing_mm: tuple[float, float] | None = None
    um_per_px: float | None = None  # microscopy: the scale the model was trained at
    output_dim: int | None = None  # embedding: D of the (N, D) output
    channels_last: bool = True
    format: str = "torchscript"  # one of FORMATS: what the archive holds
    version: str = ""  # the JSON's optional "version"
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))  # the "x_" keys

    def record(self) -> dict:
        """JSON-ready description for results files: which model, which bytes, which settings."""
        return {"uri": self.uri, "sha256": self.sha256, "format": self.format, "config_uri": self.config_uri,
                "config_sha256": self.config_sha256, "name": self.name, "version": self.version or None,
                "task": self.task,
                "input_size": list(self.input_size) if self.input_size else None, "channels": self.channels,
                "normalization": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in vars(self.normalization).items() if v is not None},
                "labels": dict(self.labels), "output": self.output, "output_dim": self.output_dim,
                "batch_size": self.batch_size, "amp": self.amp, "channels_last": self.channels_last,
                "pixel_spacing_mm": list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
                "um_per_px": self.um_per_px}


# ----------------------------------------------------------------------------------------------- the JSON

def config_uri(uri: str) -> str:
    """The JSON's URI for a model URI: the suffix replaced by ``.json`` (added when there is none)."""
    return str(storage.as_path(uri).with_suffix(".json"))


def json_object(text: str | bytes, *, where: str, doc: str) -> dict:
    """The JSON object a model's JSON file holds, or a ConfigError saying what is wrong with the file (``doc``:
    where its format is described)."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc}); fix the file, {doc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a JSON object {{...}}, not {type(raw).__name__}; {doc}")
    return raw


def parse_config(text: str | bytes, *, where: str = "model JSON") -> dict:
    """Validate the JSON text; return the normalised fields of :class:`ModelSpec` (no uri/sha256).

    Every problem found is reported at once, in one :class:`ConfigError`, so the file is fixed in one go.
    """
    raw = json_object(text, where=where, doc=DOC)
    problems: list[str] = []
    out: dict[str, Any] = {}

    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        problems.append(f"missing {', '.join(repr(k) for k in missing)}")
    unknown = sorted(k for k in raw if k not in _REQUIRED + _OPTIONAL and not str(k).startswith("x_"))
    misplaced = [k for k in ("mean", "std") if k in unknown]
    if misplaced:  # the one place for them is the normalization object, so no two settings can disagree
        problems.append(f"{' and '.join(map(repr, misplaced))} go inside 'normalization': "
                        '{"method": "mean_std", "mean": [r, g, b], "std": [r, g, b]} (on values scaled to 0-1)')
        unknown = [k for k in unknown if k not in misplaced]
    if unknown:
        problems.append(f"unknown key(s) {', '.join(repr(k) for k in unknown)} (allowed: "
                        f"{', '.join(_REQUIRED + _OPTIONAL)}, and your own keys starting with 'x_')")

    name = raw.get("name")
    if "name" in raw and not (isinstance(name, str) and name.strip()):
        problems.append("'name' must be non-empty text")
    out["name"] = name.strip() if isinstance(name, str) else ""

    task = raw.get("task")
    if "task" in raw and task not in TASKS:
        problems.append(f"'task' is {task!r}; it must be one of {', '.join(TASKS)}")
    task = task if task in TASKS else None  # the checks below that depend on the task are left to a valid one
    out["task"] = task

    out["input_size"] = None
    size = raw.get("input_size")
    if size is not None:
        if (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
            out["input_size"] = (int(size[0]), int(size[1]))
        else:
            problems.append(f"'input_size' is {size!r}; it must be [height, width] in pixels (two positive "
                            "integers), or null to feed frames at their native size")

    out["pixel_spacing_mm"] = None
    spacing = raw.get("pixel_spacing_mm")
    if spacing is not None:
        values = [spacing, spacing] if _is_number(spacing) else spacing
        if isinstance(values, list) and len(values) == 2 and all(_is_number(v) and math.isfinite(v) and v > 0
                                                                 for v in values):
            out["pixel_spacing_mm"] = (float(values[0]), float(values[1]))
        else:
            problems.append(f"'pixel_spacing_mm' is {spacing!r}; it must be [row, column] in mm (positive "
                            "numbers), one number for square pixels, or null")
    if out["input_size"] is not None and out["pixel_spacing_mm"] is not None:
        problems.append("both 'input_size' and 'pixel_spacing_mm' are set: give one (a fixed input size, or a fixed "
                        "pixel spacing for a fully convolutional model), set the other to null")

    out["um_per_px"] = None
    um = raw.get("um_per_px")
    if um is not None:
        if _is_number(um) and math.isfinite(um) and um > 0:
            out["um_per_px"] = float(um)
        else:
            problems.append(f"'um_per_px' is {um!r}; it must be the microns per pixel the model was trained at "
                            "(a positive number, e.g. 0.5 for 20x)")
        if spacing is not None:
            problems.append("both 'um_per_px' and 'pixel_spacing_mm' are set: give one ('um_per_px' for microscopy, "
                            "'pixel_spacing_mm' for radiology), remove the other")

    channels = raw.get("channels")
    if "channels" in raw and not (_is_int(channels) and channels > 0):
        problems.append(f"'channels' is {channels!r}; it must be a positive integer (the model input's C)")
    out["channels"] = int(channels) if _is_int(channels) else 0

    out["normalization"] = None
    norm = raw.get("normalization")
    if "normalization" in raw:
        if not isinstance(norm, dict) or "method" not in norm:
            problems.append(f"'normalization' is {norm!r}; it must be an object like {{\"method\": \"zscore\"}} "
                            f"(methods: {', '.join(NORMALIZATIONS)})")
        elif norm["method"] not in NORMALIZATIONS:
            problems.append(f"unknown normalization method {norm['method']!r}; use one of "
                            f"{', '.join(NORMALIZATIONS)}")
        elif norm["method"] == "percentile":
            low, high = norm.get("low"), norm.get("high")
            extra = sorted(set(norm) - {"method", "low", "high"})
            if not (_is_number(low) and _is_number(high) and 0 <= low < high <= 100):
                problems.append(f"percentile normalization needs 0 <= 'low' < 'high' <= 100 (got low={low!r}, "
                                f"high={high!r}), e.g. {{\"method\": \"percentile\", \"low\": 1, \"high\": 99}}")
            elif extra:
                problems.append(f"normalization has unknown key(s) {', '.join(map(repr, extra))}")
            else:
                out["normalization"] = Normalization("percentile", float(low), float(high))
        elif norm["method"] == "mean_std":
            found = _mean_std_problems(norm, out["channels"])
            if found:
                problems.extend(found)
            else:
                out["normalization"] = Normalization("mean_std", mean=tuple(float(v) for v in norm["mean"]),
                                                     std=tuple(float(v) for v in norm["std"]))
        else:
            extra = sorted(set(norm) - {"method"})
            if extra:
                problems.append(f"normalization {norm['method']!r} takes no {', '.join(map(repr, extra))} "
                                "(only 'percentile' takes 'low'/'high', only 'mean_std' takes 'mean'/'std')")
            else:
                out["normalization"] = Normalization(norm["method"])

    output = raw.get("output")
    if task in _OUTPUTS and "output" in raw and output not in _OUTPUTS[task]:
        problems.append(f"'output' is {output!r}; a {task} model's output must be one of "
                        f"{', '.join(_OUTPUTS[task])}")
    out["output"] = output

    labels = raw.get("labels")
    out["labels"] = types.MappingProxyType({})
    if task in _FIRST_LABEL:
        first = _FIRST_LABEL[task]
        if labels is None:
            problems.append(f"missing 'labels': a {task} model needs {{name: number}} for its output channels, "
                            f"numbered from {first}, e.g. "
                            + (f"{{\"mass\": {first}, \"calcification_cluster\": {first + 1}}}" if task == "detection"
                               else f"{{\"lv_blood_pool\": {first}, \"lv_myocardium\": {first + 1}}}"))
        elif not (isinstance(labels, dict) and labels
                  and all(isinstance(k, str) and k and _is_int(v) for k, v in labels.items())):
            problems.append(f"'labels' is {labels!r}; it must be a non-empty object {{name: integer}}")
        elif sorted(labels.values()) != list(range(first, first + len(labels))):
            problems.append(f"'labels' numbers are {sorted(labels.values())}; they must be "
                            f"{first}..{first + len(labels) - 1}, each once, numbered like the model's output channels"
                            + (" (0 is background)" if first == 1 else ""))
        elif first + len(labels) > 256:
            problems.append("more than 255 labels do not fit a uint8 label map")
        else:
            out["labels"] = types.MappingProxyType({k: int(v) for k, v in labels.items()})
    elif labels not in (None, {}) and task in TASKS:
        problems.append(f"'labels' given for a {task} model, which has none; remove it")

    out["output_dim"] = None
    dim = raw.get("output_dim")
    if dim is not None:
        if task is not None and task != "embedding":
            problems.append(f"'output_dim' is for embedding models; a {task} model's output size comes from its "
                            "labels: remove it")
        elif not (_is_int(dim) and dim > 0):
            problems.append(f"'output_dim' is {dim!r}; it must be a positive integer, the D of the model's (N, D) "
                            "output")
        else:
            out["output_dim"] = int(dim)

    batch = raw.get("batch_size", DEFAULT_BATCH_SIZE)
    if not (_is_int(batch) and batch > 0):
        problems.append(f"'batch_size' is {batch!r}; it must be a positive integer")
    out["batch_size"] = int(batch) if _is_int(batch) and batch > 0 else DEFAULT_BATCH_SIZE

    amp = raw.get("amp", True)
    if not isinstance(amp, bool):
        problems.append(f"'amp' is {amp!r}; it must be true or false")
    out["amp"] = bool(amp)

    channels_last = raw.get("channels_last", True)
    if not isinstance(channels_last, bool):
        problems.append(f"'channels_last' is {channels_last!r}; it must be true or false")
    out["channels_last"] = bool(channels_last)

    version = raw.get("version")
    if version is not None and not (isinstance(version, str) and version.strip()):
        problems.append(f"'version' is {version!r}; it must be non-empty text (e.g. \"2026.03.1\"), or left out")
    out["version"] = version.strip() if isinstance(version, str) else ""

    return finish_fields(raw, out, problems, where=where, doc=DOC)


def finish_fields(raw: dict, out: dict, problems: list[str], *, where: str, doc: str) -> dict:
    """The end every model JSON's check shares: ``description`` (text), the ``x_`` keys kept as ``extra``, and
    one ConfigError listing every problem found, or the fields."""
    description = raw.get("description", "")
    if not isinstance(description, str):
        problems.append("'description' must be text")
    out["description"] = description if isinstance(description, str) else ""
    out["extra"] = types.MappingProxyType({k: v for k, v in raw.items() if str(k).startswith("x_")})
    if problems:
        raise ConfigError(f"{where} is invalid: " + "; ".join(problems) + f". Fix the file ({doc})")
    return out


def _mean_std_problems(norm: dict, channels: int) -> list[str]:
    """What is wrong with a ``mean_std`` normalization object (nothing: an empty list)."""
    problems = []
    extra = sorted(set(norm) - {"method", "mean", "std"})
    if extra:
        problems.append(f"normalization 'mean_std' takes no {', '.join(map(repr, extra))} (only 'mean' and 'std')")
    want = channels if channels > 0 else None
    example = '{"method": "mean_std", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}'
    for key in ("mean", "std"):
        values = norm.get(key)
        if values is None:
            problems.append(f"normalization 'mean_std' needs {key!r}: one number per channel, on values scaled to "
                            f"0-1, e.g. {example}")
        elif not (isinstance(values, list) and values and all(_is_number(v) and math.isfinite(v) for v in values)
                  and (key == "mean" or all(v > 0 for v in values))):
            problems.append(f"normalization {key!r} is {values!r}; it must be a list of finite numbers"
                            + (", every one > 0" if key == "std" else "") + f", one per channel (e.g. {example})")
        elif want is not None and len(values) != want:
            problems.append(f"normalization {key!r} has {len(values)} number(s), the model has 'channels': {want}: "
                            f"give one per channel (e.g. {example})")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------ loading

_CACHE: dict[tuple[str, str], tuple[Any, bytes, "_Archive", ModelSpec]] = {}  # (uri, device) -> (stamp, json, ...)
_LOCK = threading.Lock()
_EXPORT_HOW = ("torch.jit.script(model) or torch.jit.trace(model, example) and torch.jit.save, or "
               "torch.export.export(model.eval(), (example,), dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) "
               "and torch.export.save")
_WHICH_FILE = "a TorchScript or torch.export (.pt2) file: local path, file://, s3:// or gs://"


@dataclass(frozen=True)
class _Archive:
    """A loaded model and what its file says about itself (kept in the cache beside the JSON's spec)."""

    model: Any
    sha256: str
    format: str  # one of FORMATS
    channels_last: bool  # whether its weights were converted to channels-last
    input_dims: tuple[int | None, ...] | None  # torch.export: the input's (N, C, H, W), None where dynamic


def clear_cache() -> None:
    """Forget every loaded model (tests; a long-lived process that wants the memory back)."""
    with _LOCK:
        _CACHE.clear()


def load_model(uri: str | os.PathLike, *, device=None, task: str | None = None,
               required_labels: tuple[str, ...] = ()) -> tuple[Any, ModelSpec]:
    """``(model on the device, ready to run, its ModelSpec)`` for a model URI (see module docstring).

    The model is a TorchScript module in eval mode or a torch.export program's ``.module()``; either is called as
    ``model(x)``.  ``task`` (e.g. ``"segmentation"``) and ``required_labels`` are what the caller needs of the
    model: a model made for something else is refused with a :class:`ConfigError` before its weights are read.
    Cached per (URI, device); the same objects come back while the files are unchanged.
    """
    from imaging_tasks.device import pick_device

    if uri is None or not str(uri).strip():
        raise ConfigError(f"no model URI given: set the model URI option ({_WHICH_FILE}) with its JSON beside it")
    path = storage.as_path(uri)
    model_uri = path.path if storage.is_local(path) else str(path)  # one name for `x.pt`, `/abs/x.pt`, `file://...`
    if path.suffix.lower() == ".json":
        raise ConfigError(f"model URI {model_uri} names the JSON; give the model file beside it (e.g. .pt or .pt2)")
    json_uri = config_uri(model_uri)
    dev = pick_device(device)
    stamp = _stamp(path, model_uri)
    if not storage.exists(json_uri):
        raise ConfigError(f"model JSON {json_uri} not found: write it beside {model_uri} ({DOC})")
    config_bytes = storage.read_bytes(json_uri)
    fields = parse_config(config_bytes, where=f"model JSON {json_uri}")
    _check_needs(fields, json_uri, task, required_labels)

    key = (model_uri, str(dev))
    with _LOCK:
        cached = _CACHE.get(key)
        if cached and cached[0] == stamp and cached[1] == config_bytes:
            return cached[2].model, cached[3]
        if cached and cached[0] == stamp and cached[2].channels_last == fields["channels_last"]:
            archive = cached[2]  # the JSON changed, the model did not
        else:
            archive = _load_archive(path, model_uri, dev, fields["channels_last"])
        _check_signature(fields, archive, json_uri, model_uri)
        spec = ModelSpec(uri=model_uri, sha256=archive.sha256, config_uri=json_uri,
                         config_sha256=storage.sha256_bytes(config_bytes), format=archive.format, **fields)
        _CACHE[key] = (stamp, config_bytes, archive, spec)
    log.info("model %s (%s, %s, sha256 %s) loaded on %s", spec.name, spec.task, spec.format, spec.sha256[:12], dev)
    return archive.model, spec


def _stamp(path, model_uri: str):
    """Size and modification time of the model file (cache freshness); ConfigError when it is missing."""
    try:
        if storage.is_local(path):
            st = os.stat(path.path)
            return (st.st_size, st.st_mtime_ns)
        info = retry.call(path.fs.info, path.path, operation="stat", target=storage.where(path))
    except FileNotFoundError:
        raise ConfigError(f"model file {model_uri} not found: check the model URI option ({_WHICH_FILE})") from None
    if info.get("type") == "directory":
        raise ConfigError(f"model URI {model_uri} is a folder; give the model file in it")
    return tuple(str(info.get(k)) for k in ("size", "ETag", "etag", "md5Hash", "generation", "mtime",
                                             "LastModified", "updated", "created"))


def archive_format(data: bytes) -> str:
    """What a model file holds, from its content (suffixes lie): ``"torchscript"``, ``"torch.export"``,
    ``"checkpoint"`` (a ``torch.save`` zip: state dict or pickled module), ``"zip"`` (another zip) or ``"other"``.

    Both torch formats are zip archives with one top folder: torch.export writes ``archive_format`` = ``pt2``,
    TorchScript writes ``constants.pkl`` and a ``code/`` folder; ``torch.save`` writes ``data.pkl`` alone.
    """
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            marker = next((n for n in names if n.rsplit("/", 1)[-1] == "archive_format"), None)
            if marker is not None and archive.read(marker).strip() == b"pt2":
                return "torch.export"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return "other"
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    if any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names):
        return "checkpoint"
    return "zip"


def _load_archive(path, model_uri: str, dev, channels_last: bool) -> _Archive:
    import torch

    with tempfile.TemporaryDirectory(prefix="byo-model-") as tmp:
        local = Path(path.path) if storage.is_local(path) else storage.download(path, Path(tmp) / "model")
        if local.is_dir():
            raise ConfigError(f"model URI {model_uri} is a folder; give the model file in it")
        data = local.read_bytes()  # hash exactly the bytes that are loaded
    kind = archive_format(data)
    if kind == "torchscript":
        try:
            model = torch.jit.load(io.BytesIO(data), map_location=dev)
        except Exception as exc:  # noqa: BLE001  torch raises RuntimeError/ValueError/pickle errors alike
            raise ConfigError(f"model file {model_uri} is a TorchScript archive that cannot be loaded "
                              f"({_first_line(exc)}): it is damaged or from a newer PyTorch; export it again with "
                              f"{_EXPORT_HOW}") from exc
        model.eval()
        dims = None
    elif kind == "torch.export":
        model, dims = _load_exported(data, model_uri, dev)
    else:
        what = {"checkpoint": "it is a torch.save checkpoint (a state dict or pickled module needs the training code "
                              "to rebuild)",
                "zip": "it is a zip archive of neither kind",
                "other": "it is not a zip archive at all: truncated, or another kind of file"}[kind]
        raise ConfigError(f"model file {model_uri} is not a TorchScript archive nor a torch.export (.pt2) archive "
                          f"({what}); export it with {_EXPORT_HOW}")
    if channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D weights only; what convolutions run fastest on
    return _Archive(model=model, sha256=storage.sha256_bytes(data), format=kind, channels_last=channels_last,
                    input_dims=dims)


def _load_exported(data: bytes, model_uri: str, dev) -> tuple[Any, tuple[int | None, ...]]:
    """``(ExportedProgram.module() on dev, its input's dims with None where dynamic)``."""
    import torch
    from torch.export.passes import move_to_device_pass

    try:
        program = torch.export.load(io.BytesIO(data))
        program = move_to_device_pass(program, dev)
        model = program.module()
    except Exception as exc:  # noqa: BLE001  deserialisation raises many kinds
        raise ConfigError(f"model file {model_uri} is a torch.export (.pt2) archive that cannot be loaded "
                          f"({_first_line(exc)}): it is damaged, from a newer PyTorch, or a compiled AOTInductor "
                          "package (save the ExportedProgram itself with torch.export.save)") from exc
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    shapes = [getattr(n.meta.get("val"), "shape", None) for n in inputs]
    if len(shapes) != 1 or shapes[0] is None or len(shapes[0]) != 4:
        raise ConfigError(f"model file {model_uri} is a torch.export program taking "
                          f"{[tuple(s) if s is not None else '?' for s in shapes]}; it must take one tensor "
                          "(N, C, H, W): export a wrapper whose forward takes that")
    dims = tuple(int(d) if isinstance(d, int) else None for d in shapes[0])
    if dims[0] is not None:
        raise ConfigError(f"model file {model_uri} was exported for batches of exactly {dims[0]}; runs end with a "
                          "smaller batch, so export the batch dimension dynamic: torch.export.export(model.eval(), "
                          "(example,), dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) ('x' being the "
                          "forward argument's name)")
    return model, dims


def _check_signature(fields: dict, archive: _Archive, json_uri: str, model_uri: str) -> None:
    """Sizes fixed in an exported program must be those of the JSON (checked before any batch is run)."""
    if archive.input_dims is None:
        return
    _, c, h, w = archive.input_dims
    if c is not None and c != fields["channels"]:
        raise ConfigError(f"model file {model_uri} was exported for {c} input channel(s), its JSON {json_uri} says "
                          f"'channels': {fields['channels']}: fix one of them")
    size = fields["input_size"]
    fixed = (h, w) if h is not None and w is not None else None
    if fixed and size is None:
        raise ConfigError(f"model file {model_uri} was exported for {h}x{w} inputs, its JSON {json_uri} has "
                          f"'input_size': null: set \"input_size\": [{h}, {w}]")
    if size is not None and any(f is not None and f != g for f, g in zip((h, w), size)):
        fixed_text = ", ".join("any" if d is None else str(d) for d in (h, w))
        raise ConfigError(f"model file {model_uri} was exported for [{fixed_text}] inputs, its JSON "
                          f"{json_uri} says 'input_size': {list(size)}: fix one of them")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_needs(fields: dict, json_uri: str, task: str | None, required_labels: tuple[str, ...]) -> None:
    if task is not None and fields["task"] != task:
        raise ConfigError(f"model JSON {json_uri} says task {fields['task']!r}; this step needs a {task!r} model: "
                          "point the option at one")
    missing = [name for name in required_labels if name not in fields["labels"]]
    if missing:
        raise ConfigError(f"model JSON {json_uri} has no label(s) {', '.join(map(repr, missing))} (it has "
                          f"{', '.join(map(repr, fields['labels'])) or 'none'}); this step needs them: name the "
                          "model's output channels in 'labels'")


# ------------------------------------------------------------------------------------------------ running

def run_batches(model, spec: ModelSpec, inputs: np.ndarray, device=None, *,
                post: Callable | None = None) -> np.ndarray:
    """Run ``inputs`` (N, C, H, W) float32 through the model, ``spec.batch_size`` at a time; outputs concatenated.

    Under ``torch.inference_mode()``, each batch through :func:`forward` (channels-last, float16 autocast on CUDA
    when ``spec.amp``, never on the CPU; the first batch's output checked against the spec).  Without ``post`` the
    outputs come back as float32 numpy; ``post(output_float32, start)`` may reduce each batch on the device first
    (e.g. resize and argmax), and its result's dtype is kept.  ``start`` is the batch's first index in ``inputs``.
    """
    import torch

    from imaging_tasks.device import pick_device

    dev = pick_device(device)
    inputs = np.asarray(inputs)
    if inputs.ndim != 4 or inputs.shape[1] != spec.channels:
        raise ValueError(f"inputs must be (N, {spec.channels}, H, W), got {inputs.shape}")
    if spec.input_size is not None and tuple(inputs.shape[2:]) != spec.input_size:
        raise ValueError(f"inputs must be {spec.input_size} (the model's input_size), got {inputs.shape[2:]}: "
                         "resize before running")
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    results = []
    with torch.inference_mode():
        for start in range(0, len(inputs), spec.batch_size):
            batch = torch.from_numpy(inputs[start:start + spec.batch_size]).to(dev)
            out = forward(model, spec, batch, check=start == 0)
            results.append((post(out, start) if post is not None else out).cpu().numpy())
    if not results:
        return np.zeros((0,), dtype=np.float32)
    return np.concatenate(results)


def forward(model, spec: ModelSpec, batch, *, check: bool = False):
    """One batch (N, C, H, W) float32 on the model's device through the model; its output as float32.

    The batch is made channels-last when ``spec.channels_last``; float16 autocast runs on CUDA when ``spec.amp``
    (never on the CPU).  ``check`` (the first batch of a run): a failure, or an output not matching the spec
    (shape, ``output_dim``), is a :class:`ConfigError`.  The caller holds ``torch.inference_mode()``.
    """
    import torch

    if spec.channels_last and batch.ndim == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    amp = spec.amp and batch.device.type == "cuda"
    try:
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = model(batch)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  the first batch tells whether model and JSON agree
        if not check:
            raise
        raise ConfigError(f"model {spec.name} ({spec.uri}) failed on a batch of shape {tuple(batch.shape)} "
                          f"({_first_line(exc)}); check the JSON's channels/input_size against what the "
                          "model takes") from exc
    if check:
        _check_output(spec, out, len(batch))
    return out.float()


def _check_output(spec: ModelSpec, out, n: int) -> None:
    import torch

    where = f"model {spec.name} ({spec.uri})"
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{where} returns {type(out).__name__}, not one tensor: export a wrapper whose forward "
                          "returns the final output tensor only")
    shape = tuple(out.shape)
    if spec.task == "segmentation":
        want = len(spec.labels) + 1
        if len(shape) != 4 or shape[0] != n or shape[1] != want:
            raise ConfigError(f"{where} outputs shape {shape} for {n} frames; its JSON's {len(spec.labels)} labels "
                              f"need (N, {want}, H, W) (background + one channel per label): fix 'labels' or the model")
    elif spec.task == "classification":
        if len(shape) != 2 or shape[0] != n or shape[1] != len(spec.labels):
            raise ConfigError(f"{where} outputs shape {shape} for {n} inputs; its JSON's {len(spec.labels)} labels "
                              f"need (N, {len(spec.labels)}): fix 'labels' or the model")
    elif spec.task == "embedding":
        if len(shape) != 2 or shape[0] != n:
            raise ConfigError(f"{where} outputs shape {shape} for {n} inputs; an embedding model must return (N, D)")
        if spec.output_dim is not None and shape[1] != spec.output_dim:
            raise ConfigError(f"{where} outputs {shape[1]} features per input, its JSON {spec.config_uri} says "
                              f"'output_dim': {spec.output_dim}: set \"output_dim\": {shape[1]} if this is the "
                              "right model")
    elif spec.task == "detection":
        if len(shape) != 3 or shape[0] != n or shape[2] != len(BOX_COLUMNS):
            raise ConfigError(f"{where} outputs shape {shape} for {n} images; a detection model must return "
                              f"(N, M, 6): one row [{', '.join(BOX_COLUMNS)}] per detection, padded with score < 0 "
                              "(see 'Detection output' in the module docstring of imaging_tasks.byo_model)")


# ------------------------------------------------------------------------------------------- segmentation

def normalize_frames(frames: np.ndarray, norm: Normalization) -> np.ndarray:
    """Per-frame normalisation of (N, ...) frames as documented (statistics in float64), returned as float32."""
    x = np.asarray(frames, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("frames hold NaN or infinite values")
    if norm.method not in PER_FRAME + ("none",):
        raise ValueError(f"{norm.method!r} is not a per-frame normalization ({', '.join(PER_FRAME)}, none)")
    if norm.method == "none" or x.size == 0:
        return x.astype(np.float32)
    axes = tuple(range(1, x.ndim))
    if norm.method == "zscore":
        centre, scale = x.mean(axis=axes, keepdims=True), x.std(axis=axes, keepdims=True)
    elif norm.method == "minmax":
        centre = x.min(axis=axes, keepdims=True)
        scale = x.max(axis=axes, keepdims=True) - centre
    elif norm.method == "percentile":
        lo, hi = np.percentile(x.reshape(len(x), -1), [norm.low, norm.high], axis=1)
        lo, hi = (v.reshape((-1,) + (1,) * (x.ndim - 1)) for v in (lo, hi))
        x = np.clip(x, lo, hi)
        centre, scale = lo, hi - lo
    else:  # parse_config admits no other
        raise ValueError(f"unknown normalization {norm.method!r}")
    out = np.zeros_like(x)
    np.divide(x - centre, scale, out=out, where=np.broadcast_to(scale > 0, x.shape))
    return out.astype(np.float32)


def model_grid(native_yx: tuple[int, int], pixel_spacing_yx, spec: ModelSpec) -> tuple[int, int]:
    """The (H, W) the model is fed for frames of ``native_yx`` pixels (see "Geometry" in the module docstring)."""
    if spec.input_size is not None:
        return spec.input_size
    if spec.pixel_spacing_mm is not None:
        return tuple(max(1, int(math.floor(n * s / t + 0.5)))  # type: ignore[return-value]
                     for n, s, t in zip(native_yx, pixel_spacing_yx, spec.pixel_spacing_mm))
    return tuple(native_yx)  # type: ignore[return-value]


def segment_frames(frames: np.ndarray, pixel_spacing_yx, uri: str, *, device=None,
                   required_labels: tuple[str, ...] = ("lv_blood_pool",)) -> tuple[np.ndarray, ModelSpec]:
    """Label every frame of (N, Y, X) with a segmentation model: ``(labels (N, Y, X) uint8, spec)``.

    ``spec.labels`` says which number is which structure.  ``required_labels`` are those the caller needs (the
    default is the cine LV function step's).  Steps, exactly (module docstring, "Geometry"): per-frame
    normalisation, bilinear resize to the model's grid, the model in batches, bilinear resize of its float32 output
    back to (Y, X), argmax over channels.
    """
    import torch
    import torch.nn.functional as F

    from imaging_tasks.device import pick_device

    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (N, Y, X), got shape {frames.shape}")
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(pixel_spacing_yx, dtype=float), (2,)))
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"pixel spacing must be two positive numbers (mm), got {pixel_spacing_yx!r}")
    dev = pick_device(device)
    model, spec = load_model(uri, device=dev, task="segmentation", required_labels=required_labels)
    if spec.channels != 1:
        raise ConfigError(f"model JSON {spec.config_uri} says channels {spec.channels}; frame segmentation feeds "
                          "one grey-scale channel: use a model with 'channels': 1")
    if spec.normalization.method not in PER_FRAME + ("none",):
        raise ConfigError(f"model JSON {spec.config_uri} says normalization {spec.normalization.method!r}, which is "
                          "for 8-bit images; MR frames have no fixed scale: use one of "
                          f"{', '.join(PER_FRAME)} (per frame) or none")
    native = tuple(frames.shape[1:])
    if not len(frames):
        return np.zeros((0,) + native, dtype=np.uint8), spec
    grid = model_grid(native, spacing, spec)
    x = torch.from_numpy(normalize_frames(frames, spec.normalization)[:, None])
    if grid != native:
        x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)

    def to_labels(out, _start):
        if tuple(out.shape[2:]) != native:
            out = F.interpolate(out, size=native, mode="bilinear", align_corners=False)
        # max(dim).indices is argmax (first maximal channel on a tie), many times faster than argmax on the CPU
        return out.max(dim=1).indices.to(torch.uint8)

    labels = run_batches(model, spec, x.numpy(), dev, post=to_labels)
    return labels, spec
