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


# --------------------------------------------------------------------------------------------- tile encoders

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class TinyEncoder(torch.nn.Module):
    """conv 3->8 (stride 2) -> ReLU -> conv 8->16 (stride 2) -> ReLU -> global mean -> linear to ``dim``.

    Weights drawn from ``seed`` (a fixed generator, not the global one), so every build is the same model.  Real
    convolutions over all three channels, so a wrong channel order, normalisation or resize changes its output.
    """

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(16, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y))
        return self.head(y.mean(dim=(2, 3)))


class LayoutProbe(torch.nn.Module):
    """(N, 4): the per-channel means of its input and 1.0 when the input arrived channels-last (TorchScript only:
    torch.export would bake the layout check in as a constant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flag = torch.full((x.shape[0], 1), float(x.is_contiguous(memory_format=torch.channels_last)), device=x.device)
        return torch.cat([x.mean(dim=(2, 3)), flag], dim=1)


def encoder_config(**changes):
    base = {"name": "tiny-encoder", "task": "embedding", "input_size": [64, 64], "channels": 3,
            "normalization": {"method": "mean_std", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            "output": "features", "output_dim": 16, "um_per_px": 0.5, "batch_size": 4}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def export_model(module, example_shape=(2, 3, 64, 64), dynamic_batch=True):
    """torch.export of ``module`` in eval mode with a dynamic batch dimension (what the docs ask users for)."""
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    return torch.export.export(module.eval(), (torch.zeros(example_shape),), dynamic_shapes=shapes)


def save_encoder(folder, cfg=None, *, kind="torchscript", module=None, name=None, **export_args):
    """The tiny encoder (or ``module``) saved as TorchScript (``model.pt``) or torch.export (``model.pt2``)."""
    module = (module if module is not None else TinyEncoder()).eval()
    path = folder / (name or ("model.pt2" if kind == "export" else "model.pt"))
    if kind == "export":
        torch.export.save(export_model(module, **export_args), str(path))
    else:
        torch.jit.save(torch.jit.script(module), str(path))
    if cfg is not None:
        path.with_suffix(".json").write_text(json.dumps(cfg))
    return path


def ihc_tiles(n: int = 10, size: int = 96, seed: int = 0):
    """(n, size, size, 3) uint8 crops of real IHC microscopy (scikit-image's immunohistochemistry sample, shipped
    in the wheel), at random positions."""
    import numpy as np
    from skimage import data

    image = data.immunohistochemistry()
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, image.shape[0] - size, n)
    xs = rng.integers(0, image.shape[1] - size, n)
    return np.stack([image[y:y + size, x:x + size] for y, x in zip(ys, xs)])


# ------------------------------------------------------------------------------------------------ detectors

DETECTION_LABELS = {"mass": 1, "calcification_cluster": 2}


class BlobDetector(torch.nn.Module):
    """Bright blobs by a fixed convolution and max-pool peak picking, as (N, k, 6) boxes (the detection contract).

    Channel 0 ("mass", label 1) is the mean over a ``big`` x ``big`` window, channel 1 ("calcification_cluster",
    label 2) over a ``small`` x ``small`` one (one real Conv2d, padding to keep the size).  A peak is a pixel equal
    to the max over its ``window`` x ``window`` neighbourhood of its channel with a response above ``level``; the
    ``k`` highest responses over both channels become rows [x0, y0, x1, y1, score, label]: a square of half-side
    ``half[c]`` around the peak pixel's centre, score = the response; rows beyond the peaks have score -1 (padding).
    """

    def __init__(self, k: int = 24, big: int = 9, small: int = 3, window: int = 3, level: float = 0.5,
                 half=(6.0, 2.5)):
        super().__init__()
        self.k, self.window, self.level = k, window, level
        self.conv = torch.nn.Conv2d(1, 2, big, padding=big // 2, bias=False)
        with torch.no_grad():
            weight = torch.zeros(2, 1, big, big)
            weight[0] = 1.0 / (big * big)
            lo = (big - small) // 2
            weight[1, 0, lo:lo + small, lo:lo + small] = 1.0 / (small * small)
            self.conv.weight.copy_(weight)
        self.register_buffer("half_side", torch.tensor(half, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.conv(x)
        pooled = torch.nn.functional.max_pool2d(r, self.window, 1, self.window // 2)
        score = torch.where((r == pooled) & (r > self.level), r, torch.full_like(r, -1.0))
        n, c, h, w = score.shape
        top, idx = score.reshape(n, c * h * w).topk(min(self.k, c * h * w), dim=1)
        ch = torch.div(idx, h * w, rounding_mode="floor")
        pos = idx - ch * (h * w)
        cy = torch.div(pos, w, rounding_mode="floor").float() + 0.5
        cx = (pos - torch.div(pos, w, rounding_mode="floor") * w).float() + 0.5
        half = self.half_side[ch]
        return torch.stack([cx - half, cy - half, cx + half, cy + half, top, (ch + 1).float()], dim=2)


class FixedBoxes(torch.nn.Module):
    """Returns the same (M, 6) rows for every image of the batch, whatever it holds (geometry and NMS checks)."""

    def __init__(self, rows):
        super().__init__()
        rows = torch.tensor(rows, dtype=torch.float32)
        self.register_buffer("rows", rows if rows.ndim == 2 else rows.reshape(-1, 6))  # (M, 6); any width to test

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows.unsqueeze(0).expand(x.shape[0], self.rows.shape[0], self.rows.shape[1]).contiguous()


def detector_config(**changes):
    base = {"name": "blob-detector", "version": "0.1", "task": "detection", "output": "boxes",
            "labels": DETECTION_LABELS, "input_size": None, "channels": 1, "normalization": {"method": "minmax"},
            "batch_size": 2}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def blobs_image(shape=(96, 80), blobs=((30.0, 20.0, 4.0, 1.0), (60.0, 55.0, 3.0, 0.8)), noise=0.01, seed=0):
    """(H, W) float32: Gaussian blobs (row, column, sigma px, amplitude) on a dark background, a little noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = np.full(shape, 0.1)
    for r, c, s, a in blobs:
        img += a * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * s * s))
    return (img + rng.normal(0, noise, shape)).astype(np.float32)
