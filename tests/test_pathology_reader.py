"""tile_chunks (pathology.reader): worker processes give the in-process numbers, in order, and stop cleanly."""
from __future__ import annotations

import multiprocessing
import time

import numpy as np
import openslide
import pytest

from imaging_tasks.errors import BadInput
from imaging_tasks.pathology import reader
from imaging_tasks.pathology.reader import COLUMNS, tile_chunks
from imaging_tasks.pathology.stain import stain_features_np
from imaging_tasks.pathology.synth import synthesize
from imaging_tasks.pathology.tile_qc import tile_qc_np
from imaging_tasks.pathology.tiles import plan_tiles


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("reader")
    synthesize(out, 1, 11, width=2048, height=1536, pen=("blue",), blur=1)
    path = out / "pathology" / "study-000" / "slide.svs"
    return path, {mpp: plan_tiles(path, out / f"plan{mpp}", target_mpp=mpp, tile_px=128)["tiles"] for mpp in (0.5, 1.0)}


def _gather(chunks) -> tuple[list[int], dict, np.ndarray | None]:
    chunks = list(chunks)
    columns = {k: np.concatenate([c.columns[k] for c in chunks]) for k in chunks[0].columns}
    pixels = None if chunks[0].pixels is None else np.concatenate([c.pixels for c in chunks])
    return [c.start for c in chunks], columns, pixels


@pytest.mark.parametrize("target_mpp", [0.5, 1.0])  # 1.0: 256 px reads resized to 128
def test_two_workers_give_the_in_process_columns_in_order(slide, target_mpp):
    path, plans = slide
    tiles = plans[target_mpp]
    assert len(tiles) > 8
    kw = dict(target_mpp=target_mpp, tile_px=128, chunk=7, with_pixels=True)
    starts0, cols0, px0 = _gather(tile_chunks(path, tiles, workers=0, **kw))
    starts2, cols2, px2 = _gather(tile_chunks(path, tiles, workers=2, prefetch=1, **kw))
    assert starts0 == starts2 == list(range(0, len(tiles), 7))
    assert set(cols0) == set(COLUMNS) and all(len(v) == len(tiles) for v in cols0.values())
    for k in COLUMNS:
        np.testing.assert_array_equal(cols0[k], cols2[k], err_msg=k)
    np.testing.assert_array_equal(px0, px2)
    assert px0.shape == (len(tiles), 128, 128, 3) and px0.dtype == np.uint8
    # the columns are the stain and QC functions of exactly these pixels (so order is the tiles' order)
    stain = stain_features_np(px0, target_mpp)
    np.testing.assert_array_equal(cols0["hematoxylin_od_mean"], stain["mean"][:, 0])
    np.testing.assert_array_equal(cols0["dab_od_p90"], stain["p90"][:, 2])
    qc = tile_qc_np(px0, target_mpp, reader.reference_od(openslide.OpenSlide(str(path))))
    np.testing.assert_array_equal(cols0["pen_fraction"], qc["pen_fraction"])
    np.testing.assert_array_equal(cols0["qc_pass"], qc["qc_pass"])
    assert cols0["pen_mark"].any() and cols0["qc_pass"].any()  # a stroke was planted; tissue is clean elsewhere


def test_resize_is_torchs_antialiased_bilinear_within_one_level(slide):
    import torch
    import torch.nn.functional as F

    path, plans = slide
    s = openslide.OpenSlide(str(path))
    for tile in plans[1.0][:4]:
        assert tile[3:] == [256, 256]
        _, ours = reader._read_tile(s, tile, 128)
        raw = np.asarray(s.read_region(tuple(tile[:2]), tile[2], tuple(tile[3:])))[..., :3]
        chw = torch.from_numpy(raw.copy()).permute(2, 0, 1)[None].float()
        ref = F.interpolate(chw, size=(128, 128), mode="bilinear", antialias=True, align_corners=False)
        ref = ref.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        assert np.abs(ours[..., :3].astype(int) - ref).max() <= 1


def test_closing_early_stops_the_workers(slide):
    path, plans = slide
    tiles = plans[0.5] * 20  # plenty of work left when the consumer stops
    before = set(multiprocessing.active_children())
    gen = tile_chunks(path, tiles, target_mpp=0.5, tile_px=128, workers=2, chunk=16)
    first = next(gen)
    assert first.start == 0 and len(first) == 16
    t0 = time.monotonic()
    gen.close()
    assert time.monotonic() - t0 < 20
    deadline = time.monotonic() + 10
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(multiprocessing.active_children()) - before


def test_work_in_flight_is_bounded(slide, monkeypatch):
    """A slow consumer does not make the reader run ahead: at most workers x prefetch chunks are submitted."""
    from concurrent.futures import ProcessPoolExecutor

    submitted = []
    real_submit = ProcessPoolExecutor.submit
    monkeypatch.setattr(ProcessPoolExecutor, "submit",
                        lambda self, fn, *a, **k: submitted.append(a[0]) or real_submit(self, fn, *a, **k))
    path, plans = slide
    tiles = plans[0.5] * 10
    gen = tile_chunks(path, tiles, target_mpp=0.5, tile_px=128, workers=2, chunk=8, prefetch=1)
    assert next(gen).start == 0
    time.sleep(1.5)  # the workers finish what they were given; nothing more is sent meanwhile
    assert len(tiles) // 8 > 20 and submitted == [0, 8, 16]  # 2 in flight, + 1 when the first was taken
    assert [c.start for c in gen][:2] == [8, 16]


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_slide_is_bad_input(slide, tmp_path, workers):
    path, plans = slide
    tiles = plans[0.5]
    data = path.read_bytes()
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"II*\x00" + bytes(5000))
    truncated = tmp_path / "truncated.svs"  # the header and the small levels are kept, level-0 tiles are not
    truncated.write_bytes(data[:len(data) // 3])
    for bad in (garbage, truncated):
        with pytest.raises(BadInput) as exc:
            for _ in tile_chunks(bad, tiles, target_mpp=0.5, tile_px=128, workers=workers, chunk=8, reference=1.0):
                pass
        assert exc.value.reason == "unreadable_slide"


def test_bad_arguments():
    with pytest.raises(ValueError):
        next(tile_chunks("x.svs", [[0, 0, 0, 8, 8]], target_mpp=0.5, tile_px=128, chunk=0))
    assert list(tile_chunks("missing.svs", [], target_mpp=0.5, tile_px=128, workers=2)) == []
