"""Hamamatsu NDPI and 3DHISTECH MIRAX: synthetic slides OpenSlide opens, de-identified copies with the same pixels
and none of the planted PHI, and tiling on the copies against the known tissue area."""
from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image

from imaging_tasks.deid import mirax as mx
from imaging_tasks.deid import ndpi as nd
from imaging_tasks.deid.slide import deidentify_svs
from imaging_tasks.errors import BadInput
from imaging_tasks.pathology import synth
from imaging_tasks.pathology import synth_vendor as sv
from imaging_tasks.pathology.tiles import plan_tiles
from imaging_tasks.phi_audit import find_leaks

openslide = pytest.importorskip("openslide")

KEY = b"vendor-slide-test-key-0123456789"
WIDTH, HEIGHT, MPP = 2048, 1536, 0.5
GRID = dict(target_mpp=1.0, tile_px=128)  # 256 level-0 px tiles: 8 x 6 on the slide


def _sha(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _leaks(strings, blob: bytes) -> list[str]:
    """Planted strings found in raw bytes, as ASCII/UTF-8 or UTF-16 (either byte order)."""
    return [s for s in strings for enc in ("utf-8", "utf-16-le", "utf-16-be") if s.encode(enc) in blob]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("vendor")
    rng = np.random.default_rng([14, 2])
    rgb, mask, _areas = synth._compose(rng, HEIGHT, WIDTH, "he", 2)
    phi = sv.vendor_phi(rng)
    (root / "in").mkdir()
    comment = f"Case {phi['accession']} {phi['patient_name']}"
    ndpi_src = root / "in" / "slide.ndpi"
    ndpi_rec = sv.write_ndpi(ndpi_src, rgb, mpp=MPP, phi=phi, jpeg_comment=comment)
    mrxs_src = root / "in" / "case.mrxs"
    mrxs_rec = sv.write_mirax(mrxs_src, rgb, mpp=MPP, phi=phi, slide_id="0f1e2d3c-4b5a-4697-8877-665544332211")
    before = _sha([ndpi_src, *mx.mirax_files(mrxs_src)])
    ndpi_dst, mrxs_dst = root / "out" / "slide.ndpi", root / "out" / "deid.mrxs"
    ndpi_info = deidentify_svs(ndpi_src, ndpi_dst, KEY)
    mrxs_info = mx.deidentify_mirax(mrxs_src, mrxs_dst, KEY)
    return SimpleNamespace(
        root=root, rgb=rgb, phi=phi, comment=comment, before=before,
        planted=sorted(set(ndpi_rec["phi"]) | set(mrxs_rec["phi"]) | {comment}),
        ndpi_src=ndpi_src, ndpi_dst=ndpi_dst, ndpi_info=ndpi_info, ndpi_rec=ndpi_rec,
        mrxs_src=mrxs_src, mrxs_dst=mrxs_dst, mrxs_info=mrxs_info, mrxs_rec=mrxs_rec,
        tissue_mm2=float(mask.sum()) * (MPP / 1000) ** 2, n_tiles=synth.expected_tiles(mask, MPP, **GRID))


def _same_pixels(a_path, b_path, levels) -> None:
    a, b = openslide.OpenSlide(str(a_path)), openslide.OpenSlide(str(b_path))
    try:
        assert a.level_dimensions == b.level_dimensions
        for level in levels:
            size = a.level_dimensions[level]
            assert np.array_equal(np.asarray(a.read_region((0, 0), level, size)),
                                  np.asarray(b.read_region((0, 0), level, size))), level
    finally:
        a.close()
        b.close()


def _ink(img) -> float:
    return float((np.asarray(img.convert("L")) < 60).mean())


# ----------------------------------------------------------------------------------------------- synthesis
def test_ndpi_opens_as_hamamatsu_with_phi_where_ndp_scan_puts_it(slides):
    s = openslide.OpenSlide(str(slides.ndpi_src))
    assert s.properties["openslide.vendor"] == "hamamatsu"
    assert s.dimensions == (WIDTH, HEIGHT) and float(s.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    assert s.properties["openslide.objective-power"] == "20"
    # three JPEG levels (1, 4, 16) plus OpenSlide's in-decoder 1/2, 1/4, 1/8 scalings of them
    assert [round(d) for d in s.level_downsamples] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert s.properties["hamamatsu.Reference"] == slides.phi["slide_label"]
    assert s.properties["hamamatsu.Operator"] == slides.phi["operator"]
    assert set(s.associated_images) == {"macro"} and _ink(s.associated_images["macro"]) > 0.005
    level0 = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3].astype(float)
    assert np.abs(level0 - slides.rgb).mean() < 4  # JPEG at quality 80, tiles in the right places
    raw = slides.ndpi_src.read_bytes()
    assert {slides.phi[k] for k in ("slide_label", "operator", "institution", "patient_family")} <= set(
        _leaks(slides.planted, raw))


def test_mirax_opens_with_label_macro_thumbnail_and_phi_in_slidedat(slides):
    s = openslide.OpenSlide(str(slides.mrxs_src))
    assert s.properties["openslide.vendor"] == "mirax"
    assert s.dimensions == (WIDTH, HEIGHT) and float(s.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    assert [round(d) for d in s.level_downsamples] == [1, 2, 4, 8]
    assert set(s.associated_images) == {"label", "macro", "thumbnail"}
    assert _ink(s.associated_images["label"]) > 0.005
    assert s.properties["mirax.GENERAL.SLIDE_NAME"] == slides.phi["slide_label"]
    for level, ds in ((0, 1), (2, 4)):
        w, h = s.level_dimensions[level]
        got = np.asarray(s.read_region((0, 0), level, (w, h)))[..., :3].astype(float)
        ref = np.asarray(Image.fromarray(slides.rgb).reduce(ds)).astype(float)
        assert np.abs(got - ref).mean() < 4, level  # camera images placed where they were cut from


def test_synthesize_vendor_records_truth(tmp_path):
    rec = sv.synthesize_vendor(tmp_path, "ndpi", seed=5, width=1024, height=768, mpp=0.25, fragments=1)
    s = openslide.OpenSlide(rec["path"])
    assert s.dimensions == (1024, 768) and float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert 0.001 < rec["tissue_area_mm2"] < 1024 * 768 * 0.25 ** 2 / 1e6 and rec["n_tiles_expected"] >= 0
    assert (tmp_path / "_truth_ndpi.json").is_file() and rec["phi"]
    with pytest.raises(ValueError):
        sv.write_ndpi(tmp_path / "x.ndpi", np.zeros((100, 100, 3), np.uint8), mpp=0.5)


# ----------------------------------------------------------------------------------------------- NDPI de-id
def test_ndpi_deidentified_copy(slides):
    src, dst, info = slides.ndpi_src, slides.ndpi_dst, slides.ndpi_info
    assert info["vendor"] == "hamamatsu" and info["mpp"] == pytest.approx(MPP)
    assert info["dimensions"] == [WIDTH, HEIGHT] and info["pages"] == 3
    assert {"page 3 (macro image)", "page 4 (scan map)", "JPEG COM segment"} <= set(info["removed"])
    assert any("65427" in r for r in info["removed"]) and any("65449" in r for r in info["removed"])
    _same_pixels(src, dst, levels=(0, 1, 2, 4))  # real levels 0, 2, 4 and a decoder-scaled one
    b = openslide.OpenSlide(str(dst))
    assert b.properties["openslide.vendor"] == "hamamatsu" and not b.associated_images
    assert float(b.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    assert b.properties["tiff.Make"] == "Hamamatsu" and not [k for k in b.properties if k.startswith("tiff.") and k
                                                             not in ("tiff.ResolutionUnit", "tiff.XResolution",
                                                                     "tiff.YResolution", "tiff.Make")]
    with tifffile.TiffFile(src) as ta, tifffile.TiffFile(dst) as tb:  # tifffile reads the copy as NDPI too
        assert tb.is_ndpi and tb.pages[0].is_ndpi and len(tb.pages) == 3
        assert np.array_equal(ta.pages[1].asarray(), tb.pages[1].asarray())
    raw = dst.read_bytes()
    assert _leaks(slides.planted, raw) == []
    # the audit's values, taken from the source: all present there, none in the copy
    fields = nd.ndpi_identifying_fields(src)
    assert {"Reference (slide label text)", "DateTime", "hamamatsu.Operator"} <= set(fields)
    assert find_leaks(fields, raw) == [] and find_leaks(fields, src.read_bytes())
    assert slides.phi["slide_label"] in nd.ndpi_identifying_values(src)
    # only allow-listed tags are left, on pyramid pages only
    with open(dst, "rb") as fh:
        _bo, ifds = nd._read_ifds(fh, dst.stat().st_size)
    assert len(ifds) == 3 and all(set(i.entries) <= set(nd.KEPT_NDPI_TAGS) | {273, 279} for i in ifds)
    # pseudonyms: study from the file, patient from the label text; deterministic output
    study, patient = nd.ndpi_pseudonyms(KEY, hashlib.sha256(src.read_bytes()).hexdigest(), src)
    assert (info["pseudo_study"], info["pseudo_patient"]) == (study, patient)
    again = slides.root / "again.ndpi"
    deidentify_svs(src, again, KEY)
    assert again.read_bytes() == raw
    assert _sha([src]) == {str(src): slides.before[str(src)]}


def test_ndpi_jpeg_strips_are_the_source_bytes_after_the_header(slides):
    """Entropy-coded data is copied verbatim: the level-0 strip ends with the same bytes, its header lost only
    the COM segment, and McuStarts still point just after each restart marker."""
    def level0(path):
        with open(path, "rb") as fh:
            bo, ifds = nd._read_ifds(fh, Path(path).stat().st_size)
            off, cnt = ifds[0].first(273, bo), ifds[0].first(279, bo)
            fh.seek(off)
            return fh.read(cnt), ifds[0].values(nd.MCU_STARTS, bo)
    (a, starts_a), (b, starts_b) = level0(slides.ndpi_src), level0(slides.ndpi_dst)
    removed = len(a) - len(b)
    assert removed == 4 + len(slides.comment.encode()) and a[-100000:] == b[-100000:]
    assert starts_b == [s - removed for s in starts_a] == sv.mcu_starts(b)
    assert all(b[s - 2] == 0xFF and 0xD0 <= b[s - 1] <= 0xD7 for s in starts_b[1:])


def test_ndpi_with_classic_4_byte_pointers_is_still_ndpi(slides, tmp_path):
    """A converter may write NDPI with classic 4-byte IFD pointers; OpenSlide still reads it as Hamamatsu (tag
    65420), so it must not slip into the generic TIFF path (which would keep the macro page)."""
    raw = bytearray(slides.ndpi_src.read_bytes())
    raw[8:12] = b"\x01\x00\x00\x00"  # the 8-byte first-IFD pointer now points nowhere: classic mode
    src = tmp_path / "classic.tif"
    src.write_bytes(bytes(raw))
    assert openslide.OpenSlide(str(src)).properties["openslide.vendor"] == "hamamatsu" and nd.is_ndpi(src)
    info = deidentify_svs(src, tmp_path / "out.ndpi", KEY)
    assert info["vendor"] == "hamamatsu" and "page 3 (macro image)" in info["removed"]
    _same_pixels(src, tmp_path / "out.ndpi", levels=(0, 4))
    assert (tmp_path / "out.ndpi").read_bytes()[8:12] == b"\0" * 4  # written back in NDPI mode


# ----------------------------------------------------------------------------------------------- MIRAX de-id
def test_mirax_deidentified_copy(slides):
    src, dst, info = slides.mrxs_src, slides.mrxs_dst, slides.mrxs_info
    assert info["vendor"] == "mirax" and info["mpp"] == pytest.approx(MPP)
    assert info["dimensions"] == [WIDTH, HEIGHT] and info["levels"] == 4
    for kind in ("label", "macro", "preview/thumbnail"):
        assert any(r.startswith(f"associated image {kind} ") for r in info["removed"])
    _same_pixels(src, dst, levels=(0, 2, 3))
    b = openslide.OpenSlide(str(dst))
    assert b.properties["openslide.vendor"] == "mirax" and not b.associated_images
    assert float(b.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    files = mx.mirax_files(dst)
    assert [p.name for p in files] == ["deid.mrxs", "Data0000.dat", "Data0001.dat", "Index.dat", "Slidedat.ini"]
    assert {Path(f) for f in info["files"]} == set(files)
    blob = b"".join(p.read_bytes() for p in files)
    assert _leaks(slides.planted, blob) == []  # incl. the scanner's SLIDE_ID
    fields = mx.mirax_identifying_fields(src)
    assert {"GENERAL.SLIDE_NAME", "GENERAL.PROJECT_NAME", "GENERAL.SLIDE_CREATIONDATETIME",
            "GENERAL.SLIDE_ID"} <= set(fields)
    assert "0.500000" not in mx.mirax_identifying_values(src)  # technical values are not evidence
    assert find_leaks(fields, blob) == [] and find_leaks(fields, b"".join(p.read_bytes() for p in mx.mirax_files(src)))
    # the label / macro / preview JPEGs are gone byte for byte; every pyramid tile is there byte for byte
    s_slide, d_slide = mx._describe(src), mx._describe(dst)
    s_levels, _ = mx._read_index(s_slide)
    d_levels, d_pos = mx._read_index(d_slide)
    s_data = [p.read_bytes() for p in s_slide.datafiles]
    d_data = [p.read_bytes() for p in d_slide.datafiles]
    assert d_pos is not None
    for s_recs, d_recs in zip(s_levels, d_levels, strict=True):
        assert [r[0] for r in s_recs] == [r[0] for r in d_recs]
        for (_, so, sl, sf), (_, do, dl, df) in zip(s_recs, d_recs, strict=True):
            assert s_data[sf][so:so + sl] == d_data[df][do:do + dl]
    for value, record in s_slide.associated.items():
        idx = mx._Index(s_slide.index_path.read_bytes())
        page = idx.i32(idx.i32(idx.i32(len(b"01.02") + len(s_slide.slide_id) + 4) + 4 * record) + 4)
        offset, size, fileno = idx.i32(page + 16), idx.i32(page + 20), idx.i32(page + 24)
        assert s_data[fileno][offset:offset + size] not in blob, value
    ini = (dst.with_suffix("") / "Slidedat.ini").read_text()
    keys = {line.split("=")[0] for line in ini.splitlines() if "=" in line}
    allowed = {k for _, k in mx.TECHNICAL_KEYS} | {"SLIDE_ID", "INDEXFILE", "FILE_COUNT"}
    assert all(k in allowed or k.startswith(("HIER_", "NONHIER_", "FILE_")) for k in keys), keys
    assert _sha(mx.mirax_files(src)) == {k: v for k, v in slides.before.items() if k != str(slides.ndpi_src)}


def test_mirax_replaces_an_existing_copy_and_refuses_itself(slides, tmp_path):
    dst = tmp_path / "x.mrxs"
    first = mx.deidentify_mirax(slides.mrxs_src, dst, KEY)
    assert "Slidedat.ini GENERAL.PROJECT_NAME" in first["removed"]
    assert not any(v in str(first) for v in slides.planted)  # names of what went, never values
    (dst.with_suffix("") / "stale.txt").write_text("left from before")
    second = mx.deidentify_mirax(slides.mrxs_src, dst, KEY)
    assert first == second and not (dst.with_suffix("") / "stale.txt").exists()
    with pytest.raises(ValueError):
        mx.deidentify_mirax(slides.mrxs_src, slides.mrxs_src, KEY)


# ----------------------------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("which", ["ndpi_dst", "mrxs_dst"])
def test_plan_tiles_on_the_deidentified_slide(slides, which, tmp_path):
    plan = plan_tiles(getattr(slides, which), tmp_path, **GRID)
    area = next(m["value"] for m in plan["metrics"] if m["name"] == "tissue_area_mm2")
    assert area == pytest.approx(slides.tissue_mm2, rel=0.08)
    assert plan["mpp"] == pytest.approx(MPP) and plan["tiles"]
    assert abs(len(plan["tiles"]) - slides.n_tiles) <= max(2, 0.1 * slides.n_tiles)


# ----------------------------------------------------------------------------------------------- bad inputs
def _reason(fn, *args) -> str:
    with pytest.raises(BadInput) as err:
        fn(*args)
    return err.value.reason


def test_broken_ndpi_is_bad_input(slides, tmp_path):
    raw = slides.ndpi_src.read_bytes()
    cut = tmp_path / "cut.ndpi"
    cut.write_bytes(raw[:len(raw) // 2])  # the IFDs (after each strip) of the later pages are gone
    assert _reason(deidentify_svs, cut, tmp_path / "o.ndpi", KEY) == "unreadable_slide"
    assert not (tmp_path / "o.ndpi").exists() and not list(tmp_path.glob(".o.ndpi*"))
    broken = bytearray(raw)  # first level's strip pointer sent past the end of the file
    with open(slides.ndpi_src, "rb") as fh:
        bo, ifds = nd._read_ifds(fh, len(raw))
    off = struct.unpack(bo + "Q", raw[4:12])[0]
    n = struct.unpack(bo + "H", raw[off:off + 2])[0]
    for i in range(n):
        if struct.unpack(bo + "H", raw[off + 2 + 12 * i:off + 4 + 12 * i])[0] == 273:
            broken[off + 2 + 12 * i + 8:off + 2 + 12 * i + 12] = struct.pack(bo + "I", len(raw) + 10)
    bad = tmp_path / "bad.ndpi"
    bad.write_bytes(bytes(broken))
    assert _reason(deidentify_svs, bad, tmp_path / "o.ndpi", KEY) == "unreadable_slide"
    huge = tmp_path / "huge.ndpi"  # sparse: NDPI's 64-bit extension is refused, not half-supported
    shutil.copyfile(slides.ndpi_src, huge)
    with open(huge, "r+b") as fh:
        fh.truncate(2 ** 32 + 4096)
    assert _reason(deidentify_svs, huge, tmp_path / "o.ndpi", KEY) == "unsupported_slide"


def _copy_mirax(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    shutil.copytree(src.with_suffix(""), dst.with_suffix(""))
    return dst


@pytest.mark.parametrize("damage", ["no_folder", "no_data_file", "cut_index", "cut_data", "no_mpp", "wrong_id"])
def test_broken_mirax_is_bad_input(slides, tmp_path, damage):
    src = _copy_mirax(slides.mrxs_src, tmp_path)
    folder = src.with_suffix("")
    if damage == "no_folder":
        shutil.rmtree(folder)
    elif damage == "no_data_file":
        (folder / "Data0001.dat").unlink()
    elif damage == "cut_index":
        raw = (folder / "Index.dat").read_bytes()
        (folder / "Index.dat").write_bytes(raw[:len(raw) // 2])
    elif damage == "cut_data":
        raw = (folder / "Data0001.dat").read_bytes()
        (folder / "Data0001.dat").write_bytes(raw[:len(raw) // 2])
    elif damage == "no_mpp":
        ini = (folder / "Slidedat.ini").read_text()
        (folder / "Slidedat.ini").write_text(ini.replace("MICROMETER_PER_PIXEL_X=0.500000\n", ""))
    elif damage == "wrong_id":
        ini = (folder / "Slidedat.ini").read_text()
        (folder / "Slidedat.ini").write_text(ini.replace("SLIDE_ID=0f1e", "SLIDE_ID=9f1e"))
    out = tmp_path / "out" / "o.mrxs"
    assert _reason(mx.deidentify_mirax, src, out, KEY) == "unreadable_slide"
    assert not out.exists() and not out.with_suffix("").exists()
    assert not list(tmp_path.glob("out/.*"))  # no temporary left behind
