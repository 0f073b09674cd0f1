"""Mammogram normalisation: one canonical image whatever the vendor's storage, breast and pectoral masks.

The vendor variants are built here from a synthetic study (imaging_tasks.mammography.synth, default options)
so that each presents the *same picture* by a different route: MONOCHROME1, a sigmoid VOI, a VOI LUT
sequence over re-encoded stored values, a modality rescale, window presets, mirrored and rotated storage.
They must normalise to the same pixels (within the rounding of their stored values: max |diff| below 2.5
original stored units over the window width; measured 0 for rescale / presets / mirrored / rotated /
transposed, 1e-4 for sigmoid, <= 1/(width-1) for MONOCHROME1 and the LUT sequence) and the same canonical
orientation.  A normaliser that skips any one step
(no inversion, window ignored, LUT ignored, rescale ignored, orientation ignored) differs by ~0.1-1.

Truth for the masks comes from the generator itself: its ``_breast_geometry`` is wrapped to record the
breast and pectoral maps it draws (chest wall at column 0, as the canonical grid).  Pectoral Dice >= 0.85 on
every MLO view (measured 0.992 / 0.996 here; 0.90-0.995 over 16 MLO views of seeds 1 and 7 while tuning;
the generator's boundary is slightly curved, the fitted one straight).  The recorder relies on
``_breast_geometry(rng, view, rows, cols, ...)`` returning ``(mask, depth, pectoral, info)``.
"""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import pydicom
import pytest
from scipy import ndimage
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imaging_tasks.errors import BadInput
from imaging_tasks.mammography import synth
from imaging_tasks.mammography.normalize import MammoImage, breast_mask, normalize, pectoral_mask

VARIANT_UNITS = 2.5  # max |diff| allowed, in original stored units over the window width


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One 4-view study, its truth, and the generator's breast / pectoral maps per view (canonical grid)."""
    out = tmp_path_factory.mktemp("mg_norm")
    drawn = []
    orig = synth._breast_geometry

    def recorder(*args, **kwargs):
        res = orig(*args, **kwargs)
        drawn.append((res[0].copy(), res[2] > 0.5))
        return res

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth, "_breast_geometry", recorder)
        (truth_path,) = synth.synthesize(out, 1, seed=1, views=["R_CC", "L_CC", "R_MLO", "L_MLO"])
    truth = json.loads(truth_path.read_text())
    files = sorted((out / "mammography" / truth["label"]).iterdir())
    assert len(files) == len(drawn) == 4
    views = {}
    for f, (breast, pect) in zip(files, drawn):
        ds = pydicom.dcmread(f)
        key = f"{ds.ImageLaterality}_{ds.ViewPosition}"
        views[key] = {"ds": ds, "breast": breast, "pectoral": pect, "truth": truth["truth"]["views"][key]}
    return views


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _with_pixels(ds: Dataset, arr: np.ndarray, bits: int) -> Dataset:
    new = copy.deepcopy(ds)
    new.BitsStored, new.HighBit = bits, bits - 1
    new.PixelData = np.ascontiguousarray(arr).astype("<u2").tobytes()
    return new


def _presentation(ds: Dataset) -> np.ndarray:
    """The original's picture (linear window, PS3.3 C.11.2.1.2.1) in [0, 1]: what every variant must show."""
    x = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1.0
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)


def _flip_po(value: str) -> str:
    return value.translate(str.maketrans("APRLHF", "PALRFH"))


# ------------------------------------------------------------------------------------------- variants

def monochrome1(ds):
    maxv = 2 ** int(ds.BitsStored) - 1
    new = _with_pixels(ds, maxv - ds.pixel_array.astype(np.int64), int(ds.BitsStored))
    new.PhotometricInterpretation = "MONOCHROME1"
    new.PresentationLUTShape = "INVERSE"
    new.WindowCenter = f"{maxv - float(ds.WindowCenter):g}"
    return new


def sigmoid(ds, invert=False):
    """Stored values re-encoded (16 bit) so that the SIGMOID VOI gives the original picture back."""
    t = np.clip(_presentation(ds), 1e-4, 1 - 1e-4)
    if invert:
        t = 1.0 - t
    centre, width = 32768.0, 6000.0
    x = np.round(centre + width / 4.0 * np.log(t / (1 - t)))
    new = _with_pixels(ds, x, 16)
    new.WindowCenter, new.WindowWidth, new.VOILUTFunction = "32768", "6000", "SIGMOID"
    if invert:
        new.PhotometricInterpretation = "MONOCHROME1"
        new.PresentationLUTShape = "INVERSE"
    return new


def lut_sequence(ds):
    """Stored values square-root encoded with an offset of 1000; a VOI LUT (16-bit entries) maps them back."""
    maxv = 2 ** int(ds.BitsStored) - 1
    x = ds.pixel_array.astype(np.float64)
    enc = np.round(np.sqrt(x * maxv)).astype(np.int64)
    first = 1000
    new = _with_pixels(ds, enc + first, 16)
    grid = np.arange(maxv + 1, dtype=np.float64) ** 2 / maxv
    c, w = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1.0
    lut = np.round(np.clip((grid - c) / w + 0.5, 0, 1) * 65535).astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [maxv + 1, first, 16])  # LUT Descriptor
    item.LUTExplanation = "VENDOR SQRT"
    item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())  # LUT Data, as vendors write it
    new.VOILUTSequence = Sequence([item])
    for kw in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        del new[kw]
    return new


def rescaled(ds):
    """Modality LUT: stored = 2 (x + 100), RescaleSlope 0.5, RescaleIntercept -100; window in output units."""
    new = _with_pixels(ds, 2 * (ds.pixel_array.astype(np.int64) + 100), 16)
    new.RescaleSlope, new.RescaleIntercept = "0.5", "-100"
    return new


def presets(ds):
    new = copy.deepcopy(ds)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    new.WindowCenter = [f"{c * 0.6:.0f}", f"{c:.0f}"]
    new.WindowWidth = [f"{w * 2:.0f}", f"{w:.0f}"]
    new.WindowCenterWidthExplanation = ["SOFT", "STANDARD"]
    return new


def mirrored(ds):
    new = _with_pixels(ds, ds.pixel_array[:, ::-1], int(ds.BitsStored))
    row, col = list(ds.PatientOrientation)
    new.PatientOrientation = [_flip_po(row), col]
    return new


def rotated(ds):
    new = _with_pixels(ds, ds.pixel_array[::-1, ::-1], int(ds.BitsStored))
    new.PatientOrientation = [_flip_po(v) for v in ds.PatientOrientation]
    return new


def transposed(ds):
    new = _with_pixels(ds, ds.pixel_array.T, int(ds.BitsStored))
    new.Rows, new.Columns = ds.Columns, ds.Rows
    new.PatientOrientation = list(ds.PatientOrientation)[::-1]
    return new


VARIANTS = {
    "monochrome1": (monochrome1, {}),
    "sigmoid": (sigmoid, {}),
    "lut_sequence": (lut_sequence, {}),
    "rescaled": (rescaled, {}),
    "presets": (presets, {"voi_index": 1}),
    "mirrored": (mirrored, {}),
    "rotated": (rotated, {}),
    "transposed": (transposed, {}),
    "rotated_monochrome1_sigmoid": (lambda ds: rotated(sigmoid(ds, invert=True)), {}),
}


# ---------------------------------------------------------------------------------------------- tests

def test_header_semantics_and_canonical_orientation(study):
    for key, v in study.items():
        m = normalize(v["ds"])
        lat, view = key.split("_")
        assert isinstance(m, MammoImage)
        assert (m.laterality, m.view, m.intent, m.voi) == (lat, view, "PRESENTATION", "LINEAR")
        assert m.pixels.dtype == np.float32 and m.pixels.shape == (1000, 800)
        assert 0.0 <= float(m.pixels.min()) and float(m.pixels.max()) <= 1.0
        assert m.pixel_spacing_mm == pytest.approx(0.1)
        # The synth stores right breasts mirrored (chest wall on the right): one left-right flip.
        assert m.flips == (("flip_lr",) if lat == "R" else ())
        assert m.patient_orientation[0] == "A"
        assert m.patient_orientation[1] == {"CC": {"L": "R", "R": "L"}[lat], "MLO": {"L": "FR", "R": "FL"}[lat]}[view]
        # Chest wall on the left: the generator's breast map (drawn chest wall at column 0) is the breast here.
        expected = _presentation(v["ds"])
        np.testing.assert_allclose(m.pixels, expected[:, ::-1] if lat == "R" else expected, atol=1e-6)
        assert m.pixels[v["breast"]].mean() > 5 * m.pixels[~v["breast"]].mean()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_vendor_variants_normalise_to_the_same_pixels(study, name):
    make, opts = VARIANTS[name]
    for key in ("R_MLO", "L_CC"):
        ds = study[key]["ds"]
        ref = normalize(ds)
        var = _roundtrip(make(ds))
        m = normalize(var, **opts)
        assert (m.laterality, m.view, m.patient_orientation) == (ref.laterality, ref.view, ref.patient_orientation)
        assert m.pixels.shape == ref.pixels.shape
        diff = np.abs(m.pixels.astype(np.float64) - ref.pixels)
        # Rounding of the re-encoded stored values: a couple of original stored units over the window width
        # (MONOCHROME1 alone shifts by exactly 1/(width-1): LINEAR windows centre at c-0.5).
        tol = VARIANT_UNITS / (float(ds.WindowWidth) - 1.0)
        assert float(diff.max()) < tol, (name, key, float(diff.max()), tol)
        assert float(diff.mean()) < tol / VARIANT_UNITS, (name, key, float(diff.mean()))
        # The recorded flips take the variant's stored grid to the canonical one and back.
        back = m.to_stored_array(m.pixels)
        assert back.shape == m.stored_shape
        pt = np.array([[123.0, 456.0]])
        st = m.to_stored_xy(pt)
        np.testing.assert_allclose(m.to_canonical_xy(st), pt)
        assert back[int(st[0, 1]), int(st[0, 0])] == m.pixels[456, 123]
        # Each variant really is a different encoding (the test would be vacuous otherwise).
        if name != "presets":
            assert var.pixel_array.shape != ds.pixel_array.shape or not np.array_equal(var.pixel_array, ds.pixel_array)


def test_findings_map_back_to_stored_pixels(study):
    """Truth calcification centres (stored grid) survive the round trip and land on the same bright pixel."""
    v = study["R_CC"]
    m = normalize(v["ds"])
    pres = _presentation(v["ds"])
    pts = np.array([c["centre_xy_px"] for c in v["truth"]["calcifications"]])
    assert len(pts) >= 2
    canon = m.to_canonical_xy(pts)
    np.testing.assert_allclose(canon[:, 0], m.stored_shape[1] - 1 - pts[:, 0])
    np.testing.assert_allclose(m.to_stored_xy(canon), pts)
    for (sx, sy), (cx, cy) in zip(np.round(pts).astype(int), np.round(canon).astype(int)):
        assert m.pixels[cy, cx] == pytest.approx(pres[sy, sx], abs=1e-6)


def test_view_and_laterality_sources(study):
    ds = copy.deepcopy(study["L_MLO"]["ds"])
    ds.ViewPosition = "CC"  # the code sequence wins over a wrong ViewPosition
    assert normalize(ds).view == "MLO"
    ml = copy.deepcopy(ds)
    ml.ViewCodeSequence[0].CodeValue, ml.ViewCodeSequence[0].CodeMeaning = "399260004", "medio-lateral"
    assert normalize(ml).view == "ML"
    xccl = copy.deepcopy(ds)
    xccl.ViewCodeSequence[0].CodeValue = "R-1024A"  # legacy SRT code
    assert normalize(xccl).view == "XCCL"
    meaning_only = copy.deepcopy(ds)
    meaning_only.ViewCodeSequence[0].CodeValue = "99999"
    meaning_only.ViewCodeSequence[0].CodeMeaning = "cranio-caudal exaggerated medially"
    assert normalize(meaning_only).view == "XCCM"
    no_code = copy.deepcopy(ds)
    del no_code.ViewCodeSequence
    no_code.ViewPosition = "LM"
    assert normalize(no_code).view == "LM"
    # Laterality: series Laterality, then PatientOrientation, then the chest-wall side of the image.
    r = copy.deepcopy(study["R_CC"]["ds"])
    del r.ImageLaterality
    r.Laterality = "R"
    assert normalize(r).laterality == "R"
    del r.Laterality
    m = normalize(r)
    assert m.laterality == "R" and any("PatientOrientation" in n for n in m.notes)
    del r.PatientOrientation
    m = normalize(r)
    assert (m.laterality, m.flips) == ("R", ("flip_lr",))
    assert any("chest wall" in n for n in m.notes)
    np.testing.assert_allclose(m.pixels, normalize(study["R_CC"]["ds"]).pixels)


def _dice(a, b) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _markers(breast: np.ndarray, maxv: int) -> np.ndarray:
    """Canonical-grid overlay (-1: none) of lead letters (solid saturated blocks), a text label (thin strokes)
    and a lead ball on a 1 px wire touching the skin, all in the air on the nipple side."""
    out = np.full(breast.shape, -1, dtype=np.int64)
    for r0, c0 in ((40, 730), (880, 720)):
        out[r0:r0 + 60, c0:c0 + 45] = maxv
        out[r0 + 15:r0 + 45, c0 + 12:c0 + 30] = maxv // 3
    for k in range(6):
        out[960:990, 560 + 14 * k:562 + 14 * k] = int(0.8 * maxv)
        out[960:962, 560 + 14 * k:570 + 14 * k] = int(0.8 * maxv)
    assert not (breast & (out >= 0)).any()
    edge_col = int(np.nonzero(breast[500])[0].max())
    out[500, edge_col:edge_col + 40] = int(0.6 * maxv)
    out[490:511, edge_col + 40:edge_col + 61] = maxv
    return out


def test_breast_mask_ignores_markers_and_labels(study):
    for key, v in study.items():
        ds = v["ds"]
        m = normalize(ds)
        clean = breast_mask(m.values, pixel_spacing_mm=m.pixel_spacing_mm)
        truth = v["breast"]
        assert _dice(clean, truth) > 0.98, (key, _dice(clean, truth))
        maxv = 2 ** int(ds.BitsStored) - 1
        overlay = m.to_stored_array(_markers(truth, maxv))
        stored = ds.pixel_array.astype(np.int64)
        marked = _with_pixels(ds, np.where(overlay >= 0, overlay, stored), int(ds.BitsStored))
        mm = normalize(marked)
        mask = breast_mask(mm.values, pixel_spacing_mm=mm.pixel_spacing_mm)
        marker_px = mm.values != m.values
        assert marker_px.sum() > 5000
        # Nothing of a marker is kept except, for the one on a wire, the wire's first bridge_mm (2 mm).
        far = ndimage.distance_transform_edt(~truth) * 0.1 > 2.5
        assert not (mask & marker_px & far).any(), key
        assert _dice(mask, clean) > 0.999, key


def test_pectoral_mask_dice_on_mlo(study):
    for key, v in study.items():
        m = normalize(v["ds"])
        breast = breast_mask(m.values, pixel_spacing_mm=m.pixel_spacing_mm)
        pect = pectoral_mask(m.pixels, breast, m.view, pixel_spacing_mm=m.pixel_spacing_mm)
        if m.view == "CC":
            assert not pect.any() and not v["pectoral"].any()
            continue
        assert _dice(pect, v["pectoral"]) >= 0.85, (key, _dice(pect, v["pectoral"]))
        # The same on a rotated MONOCHROME1 sigmoid variant (its normalised pixels are the same).
        mv = normalize(_roundtrip(rotated(sigmoid(v["ds"], invert=True))))
        pv = pectoral_mask(mv.pixels, breast_mask(mv.values, pixel_spacing_mm=0.1), mv.view, pixel_spacing_mm=0.1)
        assert _dice(pv, v["pectoral"]) >= 0.85
    # No muscle -> no pectoral: the CC views (no muscle drawn) searched as if they were MLO.
    for key in ("R_CC", "L_CC"):
        m = normalize(study[key]["ds"])
        breast = breast_mask(m.values, pixel_spacing_mm=0.1)
        assert not pectoral_mask(m.pixels, breast, "MLO", pixel_spacing_mm=0.1).any()


def test_for_processing_image(study):
    """Raw detector signal (linear in dose, lower value = less intensity) normalises to the log attenuation."""
    ds = study["L_MLO"]["ds"]
    x = ds.pixel_array.astype(np.float64)
    maxv = 2 ** int(ds.BitsStored) - 1
    raw = np.round(60000.0 * np.exp(-4.0 * x / maxv))
    new = _with_pixels(ds, raw, 16)
    new.PresentationIntentType = "FOR PROCESSING"
    new.SOPClassUID = synth.MG_FOR_PROCESSING
    new.PixelIntensityRelationship, new.PixelIntensityRelationshipSign = "LIN", 1
    for kw in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        del new[kw]
    m = normalize(_roundtrip(new))
    assert (m.intent, m.voi, m.flips) == ("PROCESSING", "LOG_STRETCH", ())
    inside = (m.pixels > 0.01) & (m.pixels < 0.99)
    assert inside.mean() > 0.5
    r = np.corrcoef(m.pixels[inside], x[inside])[0, 1]
    assert r > 0.999
    ref = normalize(ds)
    assert _dice(breast_mask(m.values, pixel_spacing_mm=0.1), breast_mask(ref.values, pixel_spacing_mm=0.1)) > 0.98


def test_bad_inputs(study):
    ds = study["L_CC"]["ds"]
    blank = _with_pixels(ds, np.zeros_like(ds.pixel_array), int(ds.BitsStored))
    with pytest.raises(BadInput) as exc:
        normalize(blank)
    assert exc.value.reason == "blank_image"
    bad_voi = copy.deepcopy(ds)
    bad_voi.VOILUTFunction = "GAMMA"
    with pytest.raises(BadInput) as exc:
        normalize(bad_voi)
    assert exc.value.reason == "invalid_voi"
    rgb = copy.deepcopy(ds)
    rgb.PhotometricInterpretation = "RGB"
    with pytest.raises(BadInput) as exc:
        normalize(rgb)
    assert exc.value.reason == "unsupported_photometric"
    nospace = copy.deepcopy(ds)
    del nospace.ImagerPixelSpacing
    with pytest.raises(BadInput) as exc:
        normalize(nospace)
    assert exc.value.reason == "missing_pixel_spacing"


# --------------------------------------------- pectoral across density, gland edge, dose, markers (issue 15)
# (density, density_edge, dose, markers, photometric/voi variant): a fractional design over the ranges; the
# dense cases are the ones a brightness threshold fails (muscle as bright as, or darker than, the gland).
PECTORAL_GRID = [(0.1, 0.5, 0.5, 2, {}), (0.1, 2.0, 1.0, 0, {}), (0.4, 0.5, 1.0, 2, {"photometric": "MONOCHROME1"}),
                 (0.4, 2.0, 0.5, 0, {"voi": "sigmoid"}), (0.75, 0.5, 0.5, 0, {}), (0.75, 2.0, 1.0, 2, {})]


@pytest.fixture(scope="module")
def pectoral_grid(tmp_path_factory):
    out = {}
    for i, (f, edge, dose, markers, variant) in enumerate(PECTORAL_GRID):
        base = tmp_path_factory.mktemp(f"pect{i}")
        (tp,) = synth.synthesize(base, 1, 3 + i, rows=600, cols=480, pixel_spacing_mm=0.2,
                                 views=["L_MLO", "R_ML", "R_CC"], density=f, density_edge=edge, dose=dose,
                                 markers=markers, clusters_per_image=(0, 0), isolated_per_image=(0, 0), **variant)
        doc = json.loads(tp.read_text())
        for key, t in doc["truth"]["views"].items():
            m = normalize(pydicom.dcmread(base / "mammography" / doc["label"] / t["file"]))
            breast = breast_mask(m.values, pixel_spacing_mm=m.pixel_spacing_mm)
            info: dict = {}
            pect = pectoral_mask(m.pixels, breast, m.view, pixel_spacing_mm=m.pixel_spacing_mm, debug=info)
            as_mlo = pectoral_mask(m.pixels, breast, "MLO", pixel_spacing_mm=m.pixel_spacing_mm)
            truth = dict(np.load(tp.parent / t["masks_file"]))["pectoral"]
            out[(i, key)] = (m.to_stored_array(pect), truth, m.to_stored_array(as_mlo), info)
    return out


@pytest.mark.parametrize("i", range(len(PECTORAL_GRID)))
def test_pectoral_mask_across_density_edge_dose_markers(pectoral_grid, i):
    for key in ("L_MLO", "R_ML"):
        pect, truth, _, info = pectoral_grid[(i, key)]
        assert truth.sum() > 1000
        assert _dice(pect, truth) >= 0.8, (PECTORAL_GRID[i], key, _dice(pect, truth), info)
    pect, truth, as_mlo, _ = pectoral_grid[(i, "R_CC")]
    assert not truth.any() and not pect.any()
    # A CC searched as if it were an MLO: its chest-wall corner is air, no muscle triangle fits.
    assert as_mlo.sum() < 0.005 * as_mlo.size, PECTORAL_GRID[i]
