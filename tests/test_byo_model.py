"""The bring-your-own TorchScript path (imaging_tasks.byo_model) with tiny models built and scripted here.

The models have hand-set weights, so what they should output is known: an intensity-band segmenter (per pixel,
logit_c = -(x - mu_c)^2 / s^2, elementwise, so batching cannot change a bit of it) and a tiny conv net (a fixed
3x3 blur followed by the same bands).  "By hand" below is torch.jit.load + the documented steps written out
independently of the module: it is what a researcher would run to check the pipeline's numbers.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from byo_models import LABELS, Bands, BlurBands, Embed, Pair, config, export_model, save_model
from imaging_tasks import byo_model
from imaging_tasks.errors import ConfigError

def phantom(n=20, shape=(48, 56), seed=0):
    """Beating LV-like frames: blood disk (bright), myocardial ring (grey), background (dark), noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    frames, truth = [], []
    for i in range(n):
        r_blood = 8 + 4 * np.cos(2 * np.pi * i / n)
        r = np.hypot(yy - shape[0] / 2 + 1.3, xx - shape[1] / 2 - 2.1)
        img = np.full(shape, 100.0)
        img[r < r_blood + 5] = 450.0
        img[r < r_blood] = 1000.0
        truth.append(np.where(r < r_blood, 1, np.where(r < r_blood + 5, 2, 0)))
        frames.append(img + rng.normal(0, 25, shape))
    return np.array(frames, dtype=np.float32), np.array(truth)


def by_hand(model_path, frames, cfg, spacing_yx=(1.0, 1.0)):
    """The documented steps, written out: normalise per frame, resize, model, resize back, argmax."""
    model = torch.jit.load(str(model_path)).eval()
    norm = cfg["normalization"]
    x = frames.astype(np.float64)
    out = []
    for f in x:
        if norm["method"] == "percentile":
            lo, hi = np.percentile(f, [norm["low"], norm["high"]])
            f = (np.clip(f, lo, hi) - lo) / (hi - lo)
        elif norm["method"] == "zscore":
            f = (f - f.mean()) / f.std()
        elif norm["method"] == "minmax":
            f = (f - f.min()) / (f.max() - f.min())
        out.append(f)
    t = torch.from_numpy(np.array(out).astype(np.float32)[:, None])
    native = frames.shape[1:]
    if cfg.get("input_size"):
        size = tuple(cfg["input_size"])
    elif cfg.get("pixel_spacing_mm"):
        size = tuple(int(np.floor(n * s / cfg["pixel_spacing_mm"] + 0.5)) for n, s in zip(native, spacing_yx))
    else:
        size = native
    if size != native:
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = model(t)
    if tuple(logits.shape[2:]) != native:
        logits = F.interpolate(logits, size=native, mode="bilinear", align_corners=False)
    return logits.argmax(dim=1).numpy().astype(np.uint8)


@pytest.fixture(autouse=True)
def fresh_cache():
    byo_model.clear_cache()
    yield
    byo_model.clear_cache()


def test_loads_from_relative_path_and_file_uri(tmp_path, monkeypatch):
    path = save_model(tmp_path, Bands(), config())
    monkeypatch.chdir(tmp_path)
    model, spec = byo_model.load_model("model.pt", device="cpu")
    assert isinstance(model, torch.jit.ScriptModule) and not model.training
    assert spec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.uri == str(path) and spec.config_uri == str(tmp_path / "model.json")
    assert spec.labels == LABELS and spec.input_size is None and spec.batch_size == 16
    assert spec.normalization == byo_model.Normalization("percentile", 1.0, 99.0)
    model2, spec2 = byo_model.load_model(path.as_uri(), device="cpu", task="segmentation")
    assert spec2.sha256 == spec.sha256 and spec2.config_sha256 == spec.config_sha256
    record = spec2.record()
    assert json.loads(json.dumps(record))["sha256"] == spec.sha256 and record["labels"] == LABELS


def test_labels_identical_to_by_hand_and_right(tmp_path):
    cfg = config()
    path = save_model(tmp_path, Bands(), cfg)
    frames, truth = phantom()
    labels, spec = byo_model.segment_frames(frames, (1.4, 1.4), str(path), device="cpu")
    assert labels.dtype == np.uint8 and labels.shape == frames.shape
    np.testing.assert_array_equal(labels, by_hand(path, frames, cfg))
    assert (labels == truth).mean() > 0.95  # the band model really segments the phantom
    blood = spec.labels["lv_blood_pool"]
    assert abs((labels == blood).sum() / (truth == 1).sum() - 1) < 0.05


@pytest.mark.parametrize("norm", [{"method": "zscore"}, {"method": "minmax"}])
def test_resizing_path_identical_to_by_hand(tmp_path, norm):
    mus = (-0.6, 2.0, 0.4) if norm["method"] == "zscore" else (0.0, 1.0, 0.4)
    cfg = config(input_size=[32, 40], normalization=norm, batch_size=64)
    path = save_model(tmp_path, BlurBands(mus), cfg)
    frames, truth = phantom(n=12, shape=(50, 47), seed=1)
    labels, spec = byo_model.segment_frames(frames, (1.5, 1.5), path, device="cpu")
    assert spec.input_size == (32, 40) and labels.shape == frames.shape
    np.testing.assert_array_equal(labels, by_hand(path, frames, cfg))
    assert (labels == truth).mean() > 0.85


def test_pixel_spacing_mode_identical_to_by_hand(tmp_path):
    cfg = config(pixel_spacing_mm=2.0)
    path = save_model(tmp_path, Bands(), cfg)
    frames, _ = phantom(n=5, shape=(48, 56), seed=2)
    labels, spec = byo_model.segment_frames(frames, (1.25, 1.5), path, device="cpu")
    assert byo_model.model_grid((48, 56), (1.25, 1.5), spec) == (30, 42)
    np.testing.assert_array_equal(labels, by_hand(path, frames, cfg, spacing_yx=(1.25, 1.5)))


def test_batch_boundaries_do_not_change_results(tmp_path):
    frames, _ = phantom(n=23, seed=3)
    results = []
    for batch_size in (1, 7, 16, 64):
        folder = tmp_path / f"b{batch_size}"
        folder.mkdir()
        path = save_model(folder, Bands(), config(batch_size=batch_size, input_size=[40, 40]))
        labels, spec = byo_model.segment_frames(frames, (1.0, 1.0), path, device="cpu")
        assert spec.batch_size == batch_size
        results.append(labels)
        model, spec = byo_model.load_model(path, device="cpu")
        x = np.random.default_rng(0).normal(size=(23, 1, 40, 40)).astype(np.float32)
        raw = byo_model.run_batches(model, spec, x, "cpu")
        assert raw.dtype == np.float32 and raw.shape == (23, 3, 40, 40)
        results.append(raw)
    for labels, raw in zip(results[2::2], results[3::2]):
        np.testing.assert_array_equal(labels, results[0])
        np.testing.assert_array_equal(raw, results[1])


def test_amp_never_on_cpu(tmp_path, monkeypatch):
    path = save_model(tmp_path, Bands(), config(amp=True))
    seen = []
    real = torch.autocast

    def spy(device_type, *args, **kwargs):
        seen.append((device_type, kwargs.get("enabled", True)))
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    frames, _ = phantom(n=3)
    byo_model.segment_frames(frames, (1.0, 1.0), path, device="cpu")
    assert seen and all(not enabled for _, enabled in seen)


@pytest.mark.parametrize("changes, expected", [
    ({"labels": ...}, "missing 'labels'"),
    ({"normalization": {"method": "histogram"}}, "unknown normalization method 'histogram'"),
    ({"input_size": "192x192"}, "'input_size' is '192x192'"),
    ({"input_size": [192]}, "[height, width]"),
    ({"input_size": [192.0, 192]}, "[height, width]"),
    ({"labels": {"lv_blood_pool": 1, "lv_myocardium": 3}}, "they must be 1..2"),
    ({"labels": {"lv_blood_pool": 0}}, "0 is background"),
    ({"task": "segmentaton"}, "'task' is 'segmentaton'"),
    ({"batchsize": 8}, "unknown key(s) 'batchsize'"),
    ({"amp": "yes"}, "'amp' is 'yes'"),
    ({"batch_size": 0}, "'batch_size' is 0"),
    ({"output": "softmax"}, "'output' is 'softmax'"),
    ({"channels": ...}, "missing 'channels'"),
    ({"normalization": {"method": "percentile", "low": 99, "high": 1}}, "0 <= 'low' < 'high' <= 100"),
    ({"normalization": {"method": "zscore", "low": 1}}, "takes no 'low'"),
    ({"input_size": [64, 64], "pixel_spacing_mm": 1.5}, "give one"),
    ({"output_dim": 4}, "'output_dim' is for embedding models"),
    ({"channels_last": "yes"}, "'channels_last' is 'yes'"),
    ({"mean": [0.5], "std": [0.2]}, "'mean' and 'std' go inside 'normalization'"),
    ({"std": [0.2]}, "'std' go inside 'normalization'"),
    ({"um_per_px": 0}, "'um_per_px' is 0"),
    ({"um_per_px": 0.5, "pixel_spacing_mm": 1.0}, "both 'um_per_px' and 'pixel_spacing_mm'"),
    ({"normalization": {"method": "mean_std", "mean": [0.5], "std": [0]}}, "every one > 0"),
    ({"normalization": {"method": "mean_std", "mean": [0.5, 0.5], "std": [0.2]}},
     "'mean' has 2 number(s), the model has 'channels': 1"),
    ({"normalization": {"method": "mean_std", "mean": [0.5], "std": [0.2], "low": 1}}, "takes no 'low'"),
    ({"normalization": {"method": "mean_std", "std": [0.2]}}, "'mean_std' needs 'mean'"),
    ({"normalization": {"method": "percentile", "low": 1, "high": 99, "mean": [0.5]}}, "unknown key(s) 'mean'"),
])
def test_bad_json_is_a_config_error_saying_what(tmp_path, changes, expected):
    path = save_model(tmp_path, Bands(), config(**changes))
    with pytest.raises(ConfigError) as info:
        byo_model.load_model(path, device="cpu")
    message = str(info.value)
    assert expected in message and str(tmp_path / "model.json") in message and "Fix the file" in message


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        byo_model.parse_config(json.dumps(config(labels=..., amp=1, input_size="big")))
    assert all(s in str(info.value) for s in ("missing 'labels'", "'amp' is 1", "'input_size' is 'big'"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        byo_model.parse_config("{'name': 1}")


def test_missing_files_and_non_torchscript(tmp_path):
    with pytest.raises(ConfigError, match="model file .*nope.pt not found"):
        byo_model.load_model(tmp_path / "nope.pt", device="cpu")
    path = save_model(tmp_path, Bands())  # no JSON
    with pytest.raises(ConfigError, match=f"model JSON {tmp_path / 'model.json'} not found: write it beside"):
        byo_model.load_model(path, device="cpu")
    torch.save(Bands().state_dict(), tmp_path / "weights.pt")  # a state dict, not TorchScript
    (tmp_path / "weights.json").write_text(json.dumps(config()))
    with pytest.raises(ConfigError, match="not a TorchScript archive.*torch.jit.save"):
        byo_model.load_model(tmp_path / "weights.pt", device="cpu")
    with pytest.raises(ConfigError, match="no model URI given"):
        byo_model.segment_frames(np.zeros((1, 4, 4), np.float32), (1, 1), None, device="cpu")


def test_model_output_not_matching_labels(tmp_path):
    path = save_model(tmp_path, Bands(mus=(0.1, 0.9, 0.45, 0.7)), config())  # 4 channels, 2 labels
    with pytest.raises(ConfigError, match=r"outputs shape \(3, 4, 48, 56\).*2 labels need \(N, 3, H, W\)"):
        byo_model.segment_frames(phantom(n=3)[0], (1.0, 1.0), path, device="cpu")
    path = save_model(tmp_path, Pair(), config(), name="pair.pt")
    with pytest.raises(ConfigError, match="returns tuple, not one tensor"):
        byo_model.segment_frames(phantom(n=3)[0], (1.0, 1.0), path, device="cpu")
    path = save_model(tmp_path, BlurBands(), config(channels=3), name="rgb.pt")
    with pytest.raises(ConfigError, match="channels 3.*'channels': 1"):
        byo_model.segment_frames(phantom(n=3)[0], (1.0, 1.0), path, device="cpu")
    model, spec = byo_model.load_model(path, device="cpu")
    with pytest.raises(ConfigError, match=r"failed on a batch of shape \(2, 3, 8, 8\).*channels/input_size"):
        byo_model.run_batches(model, spec, np.zeros((2, 3, 8, 8), np.float32), "cpu")


def test_task_and_required_labels(tmp_path):
    path = save_model(tmp_path, Bands(mus=(0.1, 0.9)), config(labels={"rv_blood_pool": 1}))
    with pytest.raises(ConfigError, match="no label\\(s\\) 'lv_blood_pool' \\(it has 'rv_blood_pool'\\)"):
        byo_model.segment_frames(phantom(n=2)[0], (1.0, 1.0), path, device="cpu")
    labels, _ = byo_model.segment_frames(phantom(n=2)[0], (1.0, 1.0), path, device="cpu",
                                         required_labels=("rv_blood_pool",))
    assert set(np.unique(labels)) <= {0, 1}
    emb = save_model(tmp_path, Embed(), config(task="embedding", labels=..., output="features"), name="enc.pt")
    with pytest.raises(ConfigError, match="says task 'embedding'; this step needs a 'segmentation' model"):
        byo_model.segment_frames(phantom(n=2)[0], (1.0, 1.0), emb, device="cpu")
    model, spec = byo_model.load_model(emb, device="cpu", task="embedding")  # the generic runner, another task
    x = np.random.default_rng(1).normal(size=(5, 1, 6, 6)).astype(np.float32)
    out = byo_model.run_batches(model, spec, x, "cpu")
    np.testing.assert_allclose(out[:, 0], x.mean(axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)


def test_cache_returns_same_objects_until_the_files_change(tmp_path):
    path = save_model(tmp_path, Bands(), config())
    first = byo_model.load_model(path, device="cpu")
    again = byo_model.load_model(path.as_uri(), device="cpu")
    assert again[0] is first[0] and again[1] is first[1]
    path.with_suffix(".json").write_text(json.dumps(config(batch_size=4)))  # JSON changed: same model, new spec
    model, spec = byo_model.load_model(path, device="cpu")
    assert model is first[0] and spec.batch_size == 4 and spec.sha256 == first[1].sha256
    torch.jit.save(torch.jit.script(Bands(mus=(0.2, 0.8, 0.5))), str(path))  # model replaced at the same URI
    model, spec = byo_model.load_model(path, device="cpu")
    assert model is not first[0] and spec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != first[1].sha256


def test_remote_uri_is_downloaded(tmp_path):
    """A non-local URI goes through storage.download (fsspec's in-memory file system stands in for a bucket)."""
    import fsspec

    path = save_model(tmp_path, Bands(), config())
    fs = fsspec.filesystem("memory")
    fs.pipe("/byo-test/lv/model.ts", path.read_bytes())
    fs.pipe("/byo-test/lv/model.json", path.with_suffix(".json").read_bytes())
    try:
        frames, _ = phantom(n=4)
        labels, spec = byo_model.segment_frames(frames, (1.0, 1.0), "memory://byo-test/lv/model.ts", device="cpu")
        assert spec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert spec.config_uri.endswith("byo-test/lv/model.json")
        np.testing.assert_array_equal(labels, by_hand(path, frames, config()))
        with pytest.raises(ConfigError, match="model file memory://byo-test/lv/other.ts not found"):
            byo_model.load_model("memory://byo-test/lv/other.ts", device="cpu")
    finally:
        fs.rm("/byo-test", recursive=True)


def test_normalisation_of_constant_frames_and_empty_input(tmp_path):
    flat = np.full((2, 5, 5), 7.0, np.float32)
    for method in ("zscore", "minmax"):
        assert not byo_model.normalize_frames(flat, byo_model.Normalization(method)).any()
    assert not byo_model.normalize_frames(flat, byo_model.Normalization("percentile", 1, 99)).any()
    path = save_model(tmp_path, Bands(), config())
    labels, _ = byo_model.segment_frames(np.zeros((0, 8, 9), np.float32), (1.0, 1.0), path, device="cpu")
    assert labels.shape == (0, 8, 9) and labels.dtype == np.uint8


# ------------------------------------------------------------------------ torch.export, mean_std, new keys

def save_exported(folder, module, cfg, example_shape, name="model.pt2", dynamic_spatial=False):
    shapes = {0: torch.export.Dim("batch")}
    if dynamic_spatial:
        shapes.update({2: torch.export.Dim("h", min=2), 3: torch.export.Dim("w", min=2)})
    program = torch.export.export(module.eval(), (torch.zeros(example_shape),), dynamic_shapes={"x": shapes})
    path = folder / name
    torch.export.save(program, str(path))
    path.with_suffix(".json").write_text(json.dumps(cfg))
    return path


def test_torch_export_segmentation_identical_to_torchscript(tmp_path):
    """The same network as TorchScript and as a torch.export archive: the same labels, through both geometries."""
    frames, truth = phantom(n=7, shape=(50, 47), seed=4)
    cfg = config(input_size=[32, 40], normalization={"method": "minmax"}, batch_size=3)
    mus = (0.0, 1.0, 0.4)
    ts = save_model(tmp_path, BlurBands(mus), cfg)
    pt2 = save_exported(tmp_path, BlurBands(mus), cfg, (2, 1, 32, 40))
    labels, spec = byo_model.segment_frames(frames, (1.5, 1.5), pt2, device="cpu")
    assert spec.format == "torch.export" and spec.record()["format"] == "torch.export"
    assert spec.sha256 == hashlib.sha256(pt2.read_bytes()).hexdigest()
    np.testing.assert_array_equal(labels, byo_model.segment_frames(frames, (1.5, 1.5), ts, device="cpu")[0])
    np.testing.assert_array_equal(labels, by_hand(ts, frames, cfg))
    assert (labels == truth).mean() > 0.85
    native = config()  # input_size null: frames at their native size, so H and W exported dynamic
    fcn = save_exported(tmp_path, Bands(), native, (2, 1, 16, 16), name="fcn.pt2", dynamic_spatial=True)
    labels, _ = byo_model.segment_frames(frames, (1.5, 1.5), fcn, device="cpu")
    np.testing.assert_array_equal(labels, by_hand(save_model(tmp_path, Bands(), native, name="fcn.pt"), frames,
                                                  native))


def test_archive_format_from_content(tmp_path):
    ts = save_model(tmp_path, Bands(), name="a.pt")
    program = export_model(Embed(), example_shape=(2, 1, 8, 8))
    torch.export.save(program, str(tmp_path / "b.pt2"))
    torch.save(Bands().state_dict(), tmp_path / "c.pt")
    assert byo_model.archive_format(ts.read_bytes()) == "torchscript"
    assert byo_model.archive_format((tmp_path / "b.pt2").read_bytes()) == "torch.export"
    assert byo_model.archive_format((tmp_path / "c.pt").read_bytes()) == "checkpoint"
    assert byo_model.archive_format(b"\x00" * 100) == "other"
    # a torch.export archive under a .pt name is still run as one
    (tmp_path / "d.pt").write_bytes((tmp_path / "b.pt2").read_bytes())
    (tmp_path / "d.json").write_text(json.dumps(config(task="embedding", labels=..., output="features",
                                                       output_dim=2, input_size=[8, 8])))
    model, spec = byo_model.load_model(tmp_path / "d.pt", device="cpu", task="embedding")
    x = np.random.default_rng(2).normal(size=(3, 1, 8, 8)).astype(np.float32)
    out = byo_model.run_batches(model, spec, x, "cpu")
    assert spec.format == "torch.export"
    np.testing.assert_allclose(out, np.stack([x.mean(axis=(1, 2, 3)), x.max(axis=(1, 2, 3))], 1), rtol=1e-6)


def test_mean_std_parsed_and_refused_for_mr_frames(tmp_path):
    cfg = config(normalization={"method": "mean_std", "mean": [0.5], "std": [0.25]}, um_per_px=0.5,
                 channels_last=False)
    path = save_model(tmp_path, Bands(), cfg)
    _, spec = byo_model.load_model(path, device="cpu")
    assert spec.normalization == byo_model.Normalization("mean_std", mean=(0.5,), std=(0.25,))
    assert spec.um_per_px == 0.5 and spec.channels_last is False and spec.output_dim is None
    record = json.loads(json.dumps(spec.record()))
    assert record["normalization"] == {"method": "mean_std", "mean": [0.5], "std": [0.25]}
    assert record["um_per_px"] == 0.5 and record["channels_last"] is False and record["format"] == "torchscript"
    with pytest.raises(ConfigError, match="'mean_std', which is for 8-bit images; MR frames have no fixed scale"):
        byo_model.segment_frames(phantom(n=2)[0], (1.0, 1.0), path, device="cpu")
    with pytest.raises(ValueError, match="not a per-frame normalization"):
        byo_model.normalize_frames(np.zeros((1, 4, 4)), spec.normalization)


def test_cache_reloads_when_channels_last_changes(tmp_path):
    from byo_models import TinyEncoder, encoder_config, save_encoder

    path = save_encoder(tmp_path, encoder_config())
    first, spec = byo_model.load_model(path, device="cpu")
    assert spec.channels_last and first.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    path.with_suffix(".json").write_text(json.dumps(encoder_config(batch_size=2)))
    assert byo_model.load_model(path, device="cpu")[0] is first  # only the JSON's batch size changed
    path.with_suffix(".json").write_text(json.dumps(encoder_config(channels_last=False)))
    model, spec = byo_model.load_model(path, device="cpu")
    assert model is not first and not spec.channels_last
    assert not model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert TinyEncoder().conv1.weight.shape == model.conv1.weight.shape
