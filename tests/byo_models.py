"""Tiny TorchScript models with hand-set weights, for the bring-your-own model path in tests (what their output
should be is known: an intensity-band segmenter, per pixel logit_c = -(x - mu_c)^2 / s^2, elementwise, so batching
cannot change a bit of it, and the same after a fixed 3x3 blur), and the JSON written beside them."""
from __future__ import annotations

import json

import torch

MUS = (0.1, 0.9, 0.45)  # background, blood pool, myocardium, in normalised intensity (percentile 1-99 -> 0..1)
LABELS = {"lv_blood_pool": 1, "lv_myocardium": 2}


class Bands(torch.nn.Module):
    """logit_c = -((x - mu_c) * (x - mu_c)) * inv_var: nearest band wins."""

    def __init__(self, mus=MUS, inv_var: float = 16.0):
        super().__init__()
        self.register_buffer("mu", torch.tensor(mus, dtype=torch.float32).view(1, -1, 1, 1))
        self.inv_var = inv_var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self.mu
        return -(d * d) * self.inv_var


class BlurBands(torch.nn.Module):
    """A fixed 3x3 blur (a real convolution, padding 1) then the bands."""

    def __init__(self, mus=MUS):
        super().__init__()
        self.blur = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
            self.blur.weight.copy_(kernel.view(1, 1, 3, 3))
        self.bands = Bands(mus)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bands(self.blur(x))


class Pair(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class Embed(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def config(**changes):
    base = {"name": "test-bands", "task": "segmentation", "input_size": None, "channels": 1,
            "normalization": {"method": "percentile", "low": 1, "high": 99}, "labels": LABELS,
            "output": "logits", "batch_size": 16, "amp": True}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}  # `key=...` removes a key


def save_model(folder, module, cfg=None, name="model.pt"):
    path = folder / name
    torch.jit.save(torch.jit.script(module), str(path))
    if cfg is not None:
        path.with_suffix(".json").write_text(json.dumps(cfg))
    return path
