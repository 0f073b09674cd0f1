"""Bring-your-own tile encoders (imaging_tasks.pathology.encoder) with a tiny convolutional encoder built here.

"By hand" below is what a researcher would run to check the pipeline's numbers: torch.jit.load or
torch.export.load, then the documented steps written out independently of the module (scale to 0-1, antialiased
bilinear resize, ImageNet mean/std, the model on the whole set at once).  Tiles are crops of real IHC microscopy.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from byo_models import (IMAGENET_MEAN, IMAGENET_STD, LayoutProbe, TinyEncoder, encoder_config, ihc_tiles,
                        save_encoder)
from imaging_tasks import byo_model
from imaging_tasks.byo_model import ModelSpec
from imaging_tasks.errors import ConfigError
from imaging_tasks.pathology import encoder


@pytest.fixture(autouse=True)
def fresh_cache():
    byo_model.clear_cache()
    yield
    byo_model.clear_cache()


def by_hand(path, tiles, cfg, *, antialias=True, normalise=True):
    """The documented steps, written out: 8-bit resize to input_size, /255, (x - mean) / std, the model, at once."""
    if path.suffix == ".pt2":
        model = torch.export.load(str(path)).module()
    else:
        model = torch.jit.load(str(path)).eval()
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    size = tuple(cfg["input_size"]) if cfg.get("input_size") else tuple(tiles.shape[1:3])
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=antialias, align_corners=False)
    x = torch.from_numpy(x.numpy().astype(np.float32) / np.float32(255.0))
    if normalise:
        mean = np.asarray(cfg["normalization"]["mean"], np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(cfg["normalization"]["std"], np.float32).reshape(1, 3, 1, 1)
        x = torch.from_numpy((x.numpy() - mean) / std)
    with torch.no_grad():
        return model(x).numpy()


def spec_for(cfg):
    """A ModelSpec straight from a JSON dict (no model file), for the grid rule."""
    return ModelSpec(uri="enc.pt", sha256="0" * 64, config_uri="enc.json", config_sha256="0" * 64,
                     **byo_model.parse_config(json.dumps(cfg)))


@pytest.mark.parametrize("kind", ["torchscript", "export"])
@pytest.mark.parametrize("tile_px", [96, 64])  # 96 is resized to the model's 64; 64 is fed as cut
def test_embed_equals_by_hand(tmp_path, kind, tile_px):
    cfg = encoder_config(batch_size=4)  # 10 tiles: batches of 4, 4, 2
    path = save_encoder(tmp_path, cfg, kind=kind)
    tiles = ihc_tiles(10, tile_px, seed=1)
    model, spec = encoder.load_encoder(path, device="cpu")
    assert spec.format == ("torch.export" if kind == "export" else "torchscript")
    features = encoder.embed(model, spec, tiles, device="cpu")
    assert features.dtype == np.float32 and features.shape == (10, 16)
    expected = by_hand(path, tiles, cfg)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    assert features.std(axis=0).mean() > 0.05  # different tissue, different features: the test can tell
    # The rule is the one documented, not any other: each of these by-hand variants is far off.
    assert np.abs(by_hand(path, tiles, cfg, normalise=False) - features).max() > 1e-2
    if tile_px != 64:
        assert np.abs(by_hand(path, tiles, cfg, antialias=False) - features).max() > 1e-3
    assert np.abs(by_hand(path, tiles[..., ::-1].copy(), cfg) - features).max() > 1e-2  # BGR is not RGB


def test_torch_export_and_torchscript_give_the_same_embeddings(tmp_path):
    cfg = encoder_config(batch_size=8)
    ts = save_encoder(tmp_path, cfg, kind="torchscript")
    pt2 = save_encoder(tmp_path, cfg, kind="export")
    tiles = ihc_tiles(13, 80, seed=2)
    model_ts, spec_ts = encoder.load_encoder(ts, device="cpu")
    model_ex, spec_ex = encoder.load_encoder(pt2, device="cpu")
    assert isinstance(model_ts, torch.jit.ScriptModule) and not isinstance(model_ex, torch.jit.ScriptModule)
    assert spec_ex.sha256 == hashlib.sha256(pt2.read_bytes()).hexdigest() != spec_ts.sha256
    np.testing.assert_allclose(encoder.embed(model_ex, spec_ex, tiles, "cpu"),
                               encoder.embed(model_ts, spec_ts, tiles, "cpu"), rtol=1e-5, atol=1e-6)


def test_channels_last_and_batch_size_do_not_change_results(tmp_path):
    tiles = ihc_tiles(9, 72, seed=3)
    results = []
    for channels_last in (True, False):
        for batch_size in (1, 4, 64):
            folder = tmp_path / f"{channels_last}-{batch_size}"
            folder.mkdir()
            path = save_encoder(folder, encoder_config(channels_last=channels_last, batch_size=batch_size))
            model, spec = encoder.load_encoder(path, device="cpu")
            assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
            results.append(encoder.embed(model, spec, tiles, "cpu"))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_model_gets_channels_last_rgb_normalised(tmp_path, channels_last):
    """A probe model reports what it was fed: the layout, and the per-channel means (R, G, B order, mean/std)."""
    cfg = encoder_config(input_size=None, output_dim=4, channels_last=channels_last)
    path = save_encoder(tmp_path, cfg, module=LayoutProbe())
    tiles = ihc_tiles(5, 40, seed=4)
    model, spec = encoder.load_encoder(path, device="cpu")
    out = encoder.embed(model, spec, tiles, "cpu")
    assert (out[:, 3] == float(channels_last)).all()
    expected = ((tiles / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).mean(axis=(1, 2))
    np.testing.assert_allclose(out[:, :3], expected, atol=2e-6)


def test_amp_never_on_cpu_and_empty_input(tmp_path, monkeypatch):
    path = save_encoder(tmp_path, encoder_config(amp=True))
    model, spec = encoder.load_encoder(path, device="cpu")
    seen = []
    real = torch.autocast

    def spy(device_type, *args, **kwargs):
        seen.append(kwargs.get("enabled", True))
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    encoder.embed(model, spec, ihc_tiles(5, 64), "cpu")
    assert seen and not any(seen)
    empty = encoder.embed(model, spec, np.zeros((0, 64, 64, 3), np.uint8), "cpu")
    assert empty.shape == (0, 16) and empty.dtype == np.float32
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\) uint8"):
        encoder.embed(model, spec, np.zeros((2, 64, 64, 3), np.float32), "cpu")


@pytest.mark.parametrize("changes, expected", [
    ({"um_per_px": ...}, "'um_per_px' is missing: give the microns per pixel"),
    ({"output_dim": ...}, "'output_dim' is missing"),
    ({"channels": 1, "normalization": {"method": "none"}}, "'channels' is 1; slide tiles are RGB"),
    ({"normalization": {"method": "zscore"}}, "'zscore' is per-image; a tile encoder takes"),
    ({"input_size": [64, 48]}, "tiles are square"),
    ({"normalization": {"method": "mean_std", "mean": [0.5, 0.5], "std": IMAGENET_STD}},
     "'mean' has 2 number(s), the model has 'channels': 3"),
    ({"normalization": {"method": "mean_std", "mean": IMAGENET_MEAN, "std": [0.2, 0.0, 0.2]}}, "every one > 0"),
    ({"normalization": {"method": "mean_std", "mean": IMAGENET_MEAN}}, "'mean_std' needs 'std'"),
    ({"normalization": {"method": "none"}, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
     "'mean' and 'std' go inside 'normalization': {\"method\": \"mean_std\""),
    ({"normalization": {"method": "zscore", "mean": IMAGENET_MEAN}}, "only 'mean_std' takes 'mean'/'std'"),
    ({"um_per_px": -0.5}, "'um_per_px' is -0.5"),
    ({"pixel_spacing_mm": 0.0005, "input_size": None}, "both 'um_per_px' and 'pixel_spacing_mm'"),
    ({"output_dim": 0}, "'output_dim' is 0"),
    ({"channels_last": 1}, "'channels_last' is 1"),
])
def test_bad_json_is_a_config_error_saying_what(tmp_path, changes, expected):
    path = save_encoder(tmp_path, encoder_config(**changes))
    with pytest.raises(ConfigError) as info:
        encoder.load_encoder(path, device="cpu")
    message = str(info.value)
    assert expected in message and str(tmp_path / "model.json") in message and "Fix the file" in message


def test_output_dim_checked_on_the_first_batch(tmp_path):
    path = save_encoder(tmp_path, encoder_config(output_dim=8))  # the model gives 16
    model, spec = encoder.load_encoder(path, device="cpu")
    with pytest.raises(ConfigError, match=r"outputs 16 features per input, its JSON .*model.json says "
                                          r"'output_dim': 8: set \"output_dim\": 16"):
        encoder.embed(model, spec, ihc_tiles(3, 64), "cpu")
    wrong_size = save_encoder(tmp_path, encoder_config(), kind="export", name="fixed.pt2",
                              example_shape=(2, 3, 32, 32))
    fixed = encoder_config(input_size=[32, 32])
    wrong_size.with_suffix(".json").write_text(json.dumps(fixed))
    model, spec = encoder.load_encoder(wrong_size, device="cpu")  # exported at 32x32: input_size [32, 32] agrees
    assert encoder.embed(model, spec, ihc_tiles(3, 64), "cpu").shape == (3, 16)
    wrong_size.with_suffix(".json").write_text(json.dumps(encoder_config(input_size=[64, 64])))
    with pytest.raises(ConfigError, match=r"exported for \[32, 32\] inputs, its JSON .* says "
                                          r"'input_size': \[64, 64\]"):
        encoder.load_encoder(wrong_size, device="cpu")
    wrong_size.with_suffix(".json").write_text(json.dumps(encoder_config(input_size=None)))
    with pytest.raises(ConfigError, match=r"exported for 32x32 inputs.*set \"input_size\": \[32, 32\]"):
        encoder.load_encoder(wrong_size, device="cpu")


def test_unloadable_archives_are_config_errors(tmp_path):
    cfg = encoder_config()
    good = save_encoder(tmp_path, None, kind="export", name="good.pt2").read_bytes()
    cases = {
        "garbage.pt2": (b"not a model at all " * 40, "not a zip archive at all"),
        "truncated.pt2": (good[:len(good) // 2], "not a zip archive at all"),
        "other.pt2": (_zip({"a/readme.txt": b"hello"}), "a zip archive of neither kind"),
        "weights.pt2": (_state_dict_bytes(), "torch.save checkpoint"),
        "broken.pt2": (_zip({"m/archive_format": b"pt2", "m/archive_version": b"0"}),
                       "torch.export (.pt2) archive that cannot be loaded"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).with_suffix(".json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError) as info:
            encoder.load_encoder(tmp_path / name, device="cpu")
        assert expected in str(info.value) and str(tmp_path / name) in str(info.value), name
        assert "torch.export.save" in str(info.value), name
    static = save_encoder(tmp_path, cfg, kind="export", name="static.pt2", dynamic_batch=False)
    with pytest.raises(ConfigError, match="exported for batches of exactly 2.*Dim\\('batch'\\)"):
        encoder.load_encoder(static, device="cpu")
    # Content decides, not the suffix: TorchScript named .pt2 loads as TorchScript.
    disguised = save_encoder(tmp_path, cfg, kind="torchscript", name="disguised.pt2")
    _, spec = encoder.load_encoder(disguised, device="cpu")
    assert spec.format == "torchscript"


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _state_dict_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(TinyEncoder().state_dict(), buf)
    return buf.getvalue()


def test_not_an_embedding_model(tmp_path):
    from byo_models import Bands, config, save_model

    path = save_model(tmp_path, Bands(), config())
    with pytest.raises(ConfigError, match="says task 'segmentation'; this step needs a 'embedding' model"):
        encoder.load_encoder(path, device="cpu")


@pytest.mark.parametrize("input_size, target_mpp, tile_px, seen", [
    ([224, 224], 0.5, 224, 0.5),        # the grid it was trained on
    ([224, 224], 0.4375, 256, 0.5),     # 256 px at 0.4375 shrunk to 224: 0.5 µm/px again
    ([224, 224], 0.5, 240, 0.5357),     # +7 %: within the tolerance
    ([224, 224], 0.46, 224, 0.46),      # -8 %: within
    (None, 0.5, 256, 0.5),              # fed as cut: the target is what it sees
])
def test_encoder_grid_accepted(input_size, target_mpp, tile_px, seen):
    spec = spec_for(encoder_config(input_size=input_size, um_per_px=0.5))
    assert encoder.check_encoder_grid(spec, target_mpp=target_mpp, tile_px=tile_px) == pytest.approx(seen, abs=1e-4)


@pytest.mark.parametrize("input_size, target_mpp, tile_px, fix", [
    ([224, 224], 0.5, 256, "set target_mpp to 0.4375 (or tile_px to 224 with target_mpp 0.5"),  # the usual slip
    ([224, 224], 1.0, 224, "set target_mpp to 0.5"),
    ([224, 224], 0.25, 224, "set target_mpp to 0.5"),
    (None, 0.44, 256, "set target_mpp to 0.5"),  # -12 %
])
def test_encoder_grid_refused_with_the_fix(input_size, target_mpp, tile_px, fix):
    spec = spec_for(encoder_config(input_size=input_size, um_per_px=0.5))
    with pytest.raises(ConfigError) as info:
        encoder.check_encoder_grid(spec, target_mpp=target_mpp, tile_px=tile_px)
    assert fix in str(info.value) and "trained at 0.5 µm/px" in str(info.value)
    if input_size is None:
        assert "tile_px to" not in str(info.value)


def test_encoder_record(tmp_path):
    path = save_encoder(tmp_path, encoder_config(x_site="ours"), kind="export")
    _, spec = encoder.load_encoder(path, device="cpu")
    record = json.loads(json.dumps(encoder.encoder_record(spec)))
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["config_sha256"] == hashlib.sha256(path.with_suffix(".json").read_bytes()).hexdigest()
    assert (record["name"], record["format"], record["output_dim"], record["um_per_px"], record["input_size"]) == (
        "tiny-encoder", "torch.export", 16, 0.5, [64, 64])
    assert record["normalization"] == {"method": "mean_std", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
