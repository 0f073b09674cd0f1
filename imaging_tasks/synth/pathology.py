"""Synthetic whole-slide images in the Aperio SVS layout, with known tissue area and PHI where scanners put it.

Tissue pixels are real IHC microscopy (scikit-image's ``immunohistochemistry`` image, shipped in the wheel),
mirrored to fill elliptical tissue sections on a glass-white background.  The level-0 tissue mask is known,
so the tissue area in mm² is exact ground truth.  PHI sits in the label and macro images (rendered text) and
in the Aperio ImageDescription (Filename, User, barcode), as real scanners write it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw

from imaging_tasks.synth.phi import fake_study, phi_values

SPECIALTY = "pathology"
TILE = 256
DOWNSAMPLES = (4, 16)
BACKGROUND = 238


def _texture(height: int, width: int) -> np.ndarray:
    """Real IHC pixels mirrored to cover the canvas (no interpolation: the colours stay real)."""
    from skimage.data import immunohistochemistry

    # x0.85: as a slightly thicker section attenuates light, so the IHC image's own glass-white lumens still
    # read as tissue (optical density > 0.15) and the elliptical section mask is exactly the tissue.
    ihc = (immunohistochemistry().astype(np.float32) * 0.85).round().astype(np.uint8)
    tile = np.concatenate([ihc, ihc[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    return np.tile(tile, reps)[:height, :width]


def _tissue_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A few elliptical tissue sections, as cut sections lie on a slide."""
    yy, xx = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(2, 4))):
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.12, 0.25) * height, rng.uniform(0.08, 0.2) * width
        theta = rng.uniform(0, np.pi)
        c, s = np.cos(theta), np.sin(theta)
        u = ((xx - cx) * c + (yy - cy) * s) / rx
        v = (-(xx - cx) * s + (yy - cy) * c) / ry
        mask |= u * u + v * v <= 1.0
    return mask


def _text_image(lines: list[str], size: tuple[int, int]) -> np.ndarray:
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((10, 10 + 18 * i), line, fill=(0, 0, 0))
    return np.asarray(img)


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def write_svs(path: Path, rgb: np.ndarray, *, mpp: float, description_fields: dict[str, str],
              label: np.ndarray, macro: np.ndarray) -> None:
    """Aperio layout: tiled level 0, stripped thumbnail, tiled reduced levels, stripped label and macro."""
    height, width = rgb.shape[:2]
    fields = "|".join(f"{k} = {v}" for k, v in {"AppMag": "20", "MPP": f"{mpp}", **description_fields}.items())
    head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) RAW"
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        kw = dict(photometric="rgb", compression="zlib", metadata=None)
        tif.write(rgb, tile=(TILE, TILE), description=f"{head}|{fields}", **kw)
        thumb = _downsample(rgb, 32)
        tif.write(thumb, description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]} - |{fields}", **kw)
        for factor in DOWNSAMPLES:
            level = _downsample(rgb, factor)
            tif.write(level, tile=(TILE, TILE), description=f"{head} -> {level.shape[1]}x{level.shape[0]} - |{fields}",
                      **kw)
        # label and macro uncompressed: openslide reads associated images only in a few compressions
        plain = dict(photometric="rgb", metadata=None)
        tif.write(label, description=f"Aperio Image Library v12.0.15\nlabel {label.shape[1]}x{label.shape[0]}",
                  subfiletype=1, **plain)
        tif.write(macro, description=f"Aperio Image Library v12.0.15\nmacro {macro.shape[1]}x{macro.shape[0]}",
                  subfiletype=9, **plain)


def synthesize(out: Path, studies: int, seed: int, *, width: int = 4096, height: int = 3072, mpp: float = 0.5,
               **_ignored) -> list[Path]:
    out = Path(out)
    truths = []
    for n in range(studies):
        rng = np.random.default_rng([seed, n])
        label = f"study-{n:03d}"
        study = fake_study(rng, label)
        barcode = f"{study.accession}-A1-HE"
        study.extra_phi += [barcode, f"{study.accession}.svs"]
        mask = _tissue_mask(rng, height, width)
        noise = rng.normal(0, 2.0, size=(height, width, 1))
        background = np.clip(BACKGROUND + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
        rgb = np.where(mask[..., None], _texture(height, width), background)
        p = study.patient
        label_img = _text_image([p.name.replace("^", " "), p.patient_id, study.accession, barcode], (400, 300))
        macro = _text_image([study.institution, p.name.replace("^", " "), p.patient_id, barcode], (800, 300))
        folder = out / SPECIALTY / label
        folder.mkdir(parents=True, exist_ok=True)
        slide_date = f"{study.study_date[4:6]}/{study.study_date[6:8]}/{study.study_date[2:4]}"
        write_svs(folder / "slide.svs", rgb, mpp=mpp, label=label_img, macro=macro, description_fields={
            "StripeWidth": "2040", "ScanScope ID": "SS" + study.accession[-4:], "Filename": f"{study.accession}",
            "Date": slide_date, "Time": f"{study.study_time[:2]}:{study.study_time[2:4]}:{study.study_time[4:6]}",
            "User": p.name.replace("^", " "), "Barcode": barcode, "Focus Offset": "0.000000"})
        truth = {"specialty": SPECIALTY, "label": label, "study_uid": None, "phi": phi_values(study) + [
                     p.name.replace("^", " ")],
                 "truth": {"tissue_area_mm2": float(mask.sum()) * (mpp / 1000.0) ** 2, "mpp": mpp,
                           "dimensions": [width, height], "tissue_fraction": float(mask.mean())}}
        tpath = out / "_truth" / SPECIALTY / f"{label}.json"
        tpath.parent.mkdir(parents=True, exist_ok=True)
        tpath.write_text(json.dumps(truth, indent=2, sort_keys=True))
        truths.append(tpath)
    return truths
