"""Bring-your-own tile encoders: a TorchScript or torch.export model turns each RGB tile into D numbers.

The model and its JSON are those of :mod:`imaging_tasks.byo_model` (read its module docstring for the file
format), with ``"task": "embedding"``, ``"channels": 3``, ``"output": "features"`` and, required here,
``"um_per_px"`` (the microns per pixel the encoder was trained at) and ``"output_dim"`` (D).  Normalization is
``mean_std`` (per channel, on RGB scaled to 0-1) or ``none`` (the 0-1 values as they are); ``input_size`` is a
square [S, S] or null (tiles fed at the size they are cut).

What :func:`embed` does to a batch of tiles (B, H, W, 3) uint8, in this order, on the device:

1. when (H, W) is not ``input_size``: resized to it as 8-bit RGB, on the CPU, with
   ``torch.nn.functional.interpolate(uint8 (B, 3, H, W), size, mode="bilinear", antialias=True,
   align_corners=False)``: torch's uint8 kernel, which matches PIL's bilinear resize (what torchvision
   transforms on PIL images, the usual way encoders are trained, do: PIL and it differ by one grey level on
   ~0.3 % of pixels).  Antialiased, so shrinking 256 -> 224 averages rather than skips pixels; rounded to 8 bits,
   as PIL's is; the same on every device (there is no uint8 kernel on CUDA), and ~20x faster than resizing in
   float32 on the CPU;
2. to the device, to float32, and ``(x / 255 - mean[c]) / std[c]`` (``mean_std``) or ``x / 255`` (``none``),
   computed as one multiply-add per channel (``x * (1 / (255 std[c])) - mean[c] / std[c]``);
3. (B, 3, S, S) in ``torch.channels_last`` memory layout (``"channels_last": false`` makes it the default layout),
   ``spec.batch_size`` tiles per forward pass, under ``torch.inference_mode()``, float16 autocast on CUDA when
   ``"amp"`` (never on the CPU);
4. the (B, D) output as float32 numpy.

A by-hand run of these steps (uint8 resize, then ``(x / 255 - mean) / std`` written out plainly) with the same
model gives the same numbers to float32 rounding (the tests: within 1e-6).

The grid rule (:func:`check_encoder_grid`): a tile is ``tile_px`` pixels at the run's ``target_mpp`` and is
resized to ``input_size``, so the encoder sees ``target_mpp * tile_px / S`` µm per pixel.  That must be the
``um_per_px`` it was trained at within :data:`GRID_TOLERANCE` (10 %: a "20x, 0.5 µm/px" encoder was trained on
scanners from about 0.46 to 0.55 µm/px, while the common mistake, 256-px tiles shrunk to 224 at the same
target_mpp, is 14 % off).  A run that breaks the rule is refused before any tile is read, with the target_mpp
that fixes it.

The reader (:mod:`imaging_tasks.pathology.reader`) decodes tiles in worker processes ahead of the model; this
module embeds one chunk of pixels at a time.
"""
from __future__ import annotations

import numpy as np

from imaging_tasks import byo_model
from imaging_tasks.byo_model import ModelSpec
from imaging_tasks.errors import ConfigError

GRID_TOLERANCE = 0.10  # |seen µm/px / trained µm/px - 1| allowed
NORMALIZATIONS = ("mean_std", "none")
RESIZE = "uint8 bilinear, antialias=True, align_corners=False (torch, CPU)"  # what embed() resizes with


def load_encoder(uri, device=None) -> tuple[object, ModelSpec]:
    """``(model, spec)`` for a tile encoder URI; :class:`ConfigError` for a model that is not one (all at once)."""
    model, spec = byo_model.load_model(uri, device=device, task="embedding")
    where = f"model JSON {spec.config_uri}"
    problems = []
    if spec.channels != 3:
        problems.append(f"'channels' is {spec.channels}; slide tiles are RGB: a tile encoder takes 'channels': 3")
    if spec.um_per_px is None:
        problems.append("'um_per_px' is missing: give the microns per pixel the encoder was trained at (e.g. 0.5 "
                        "for 20x, 0.25 for 40x); the run's tile grid is checked against it")
    if spec.output_dim is None:
        problems.append("'output_dim' is missing: give D, the length of the encoder's feature vector (the feature "
                        "tables are sized from it)")
    if spec.normalization.method not in NORMALIZATIONS:
        problems.append(f"normalization {spec.normalization.method!r} is per-image; a tile encoder takes "
                        '{"method": "mean_std", "mean": [r, g, b], "std": [r, g, b]} (on RGB scaled to 0-1) '
                        'or {"method": "none"}')
    if spec.input_size is not None and spec.input_size[0] != spec.input_size[1]:
        problems.append(f"'input_size' is {list(spec.input_size)}; tiles are square: give [S, S] (or null)")
    if problems:
        raise ConfigError(f"{where} does not describe a tile encoder: " + "; ".join(problems)
                          + f". Fix the file ({byo_model.DOC})")
    return model, spec


def seen_um_per_px(spec: ModelSpec, *, target_mpp: float, tile_px: int) -> float:
    """µm per pixel of what the encoder is fed: tiles of ``tile_px`` at ``target_mpp``, resized to its input."""
    side = spec.input_size[0] if spec.input_size is not None else tile_px
    return float(target_mpp) * int(tile_px) / side


def check_encoder_grid(spec: ModelSpec, *, target_mpp: float, tile_px: int) -> float:
    """The µm/px the encoder will see; :class:`ConfigError` when it is not the one it was trained at.

    The rule (module docstring): ``target_mpp * tile_px / input_size`` within :data:`GRID_TOLERANCE` of
    ``spec.um_per_px``.  The message gives the target_mpp that fixes the run for this tile_px, and the tile_px
    that avoids resizing altogether.
    """
    if spec.um_per_px is None:
        raise ConfigError(f"model JSON {spec.config_uri} has no 'um_per_px': give the microns per pixel the encoder "
                          "was trained at")
    if not (target_mpp > 0 and tile_px > 0):
        raise ValueError(f"target_mpp and tile_px must be positive, got {target_mpp!r}, {tile_px!r}")
    seen = seen_um_per_px(spec, target_mpp=target_mpp, tile_px=tile_px)
    if abs(seen / spec.um_per_px - 1) <= GRID_TOLERANCE:
        return seen
    side = spec.input_size[0] if spec.input_size is not None else tile_px
    fix = spec.um_per_px * side / tile_px
    resized = f", resized to {side} px," if side != tile_px else ""
    no_resize = (f" (or tile_px to {side} with target_mpp {spec.um_per_px:g}, which feeds tiles unresized)"
                 if side != tile_px else "")
    raise ConfigError(f"encoder {spec.name} was trained at {spec.um_per_px:g} µm/px, but {tile_px}-px tiles at "
                      f"target_mpp {target_mpp:g}{resized} show it {seen:.4g} µm/px "
                      f"({(seen / spec.um_per_px - 1):+.0%}, "
                      f"more than ±{GRID_TOLERANCE:.0%}): set target_mpp to {fix:.4g}{no_resize}")


def embed(model, spec: ModelSpec, pixels, device=None) -> np.ndarray:
    """(B, D) float32 features of ``pixels`` (B, H, W, 3) uint8 RGB tiles, by the steps in the module docstring.

    ``pixels`` is a numpy array (or a torch tensor, on any device); the model is the one :func:`load_encoder`
    gave for the same device.
    """
    import torch
    import torch.nn.functional as F

    from imaging_tasks.device import pick_device

    dev = pick_device(device)
    batch_all = pixels if torch.is_tensor(pixels) else torch.from_numpy(np.ascontiguousarray(pixels))
    if batch_all.ndim != 4 or batch_all.shape[-1] != 3 or batch_all.dtype != torch.uint8:
        raise ValueError(f"pixels must be (B, H, W, 3) uint8 RGB tiles, got {tuple(batch_all.shape)} "
                         f"{batch_all.dtype}")
    dim = spec.output_dim or 0
    if not len(batch_all):
        return np.zeros((0, dim), dtype=np.float32)
    size = spec.input_size
    norm = spec.normalization
    if norm.method not in NORMALIZATIONS:
        raise ConfigError(f"model JSON {spec.config_uri}: normalization {norm.method!r} is not one a tile encoder "
                          f"takes ({', '.join(NORMALIZATIONS)}); load it with load_encoder")
    # (x / 255 - mean) / std as x * scale + shift: two in-place passes instead of four allocating ones
    mean = np.asarray(norm.mean if norm.method == "mean_std" else (0.0,) * 3, np.float64)
    std = np.asarray(norm.std if norm.method == "mean_std" else (1.0,) * 3, np.float64)
    scale = torch.tensor(1.0 / (255.0 * std), dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    shift = torch.tensor(-mean / std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for start in range(0, len(batch_all), spec.batch_size):
            x = batch_all[start:start + spec.batch_size].permute(0, 3, 1, 2)  # NHWC as NCHW is channels-last
            if size is not None and tuple(x.shape[2:]) != size:
                x = F.interpolate(x.cpu(), size=size, mode="bilinear", antialias=True, align_corners=False)
            # uint8 crosses to the device (a quarter of float32's bytes)
            x = x.to(dev).float().mul_(scale).add_(shift)
            if not spec.channels_last:
                x = x.contiguous()
            out.append(byo_model.forward(model, spec, x, check=start == 0).cpu().numpy())
    return np.concatenate(out)


def encoder_record(spec: ModelSpec) -> dict:
    """Provenance for feature files and the warehouse: which encoder, which bytes, what it was fed, D."""
    return {"name": spec.name, "uri": spec.uri, "sha256": spec.sha256, "format": spec.format,
            "config_uri": spec.config_uri, "config_sha256": spec.config_sha256, "output_dim": spec.output_dim,
            "input_size": list(spec.input_size) if spec.input_size else None, "um_per_px": spec.um_per_px,
            "normalization": spec.record()["normalization"], "resize": RESIZE, "amp": spec.amp,
            "channels_last": spec.channels_last, "batch_size": spec.batch_size}
