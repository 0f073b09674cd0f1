"""Mammography generator variants (issue 15): density with known dense fraction, MONOCHROME1 / VOI LUT
storage, masses and calcification clusters shared by the CC and MLO of a breast, ML / XCCL views, vendor
flips, lead markers, for-processing images.

Every variant draws its randomness from a stream of its own, so the same seed with and without an option
gives the same anatomy: the tests compare a variant with the default image of the same seed, which a
wrong encoding (a window centre not mirrored, a LUT not inverted, truth not moved with a flip) fails.
Small images (0.2-0.25 mm pixels) keep the file fast.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from scipy import ndimage

from imaging_tasks.mammography.synth import MG_FOR_PROCESSING, synthesize

SMALL = dict(rows=400, cols=320, pixel_spacing_mm=0.25, clusters_per_image=(1, 1), isolated_per_image=(2, 2))
FOUR = ["R_CC", "L_CC", "R_MLO", "L_MLO"]


def _study(out: pathlib.Path, seed: int = 3, **kw) -> tuple[dict, dict[str, pydicom.Dataset], pathlib.Path]:
    (tp,) = synthesize(out, 1, seed, **{**SMALL, "views": FOUR, **kw})
    doc = json.loads(tp.read_text())
    files = {}
    for key, t in doc["truth"]["views"].items():
        files[key] = pydicom.dcmread(out / "mammography" / doc["label"] / t["file"])
    return doc, files, tp.parent


def _presentation(ds: pydicom.Dataset) -> np.ndarray:
    """Displayed image in [0, 1] (brighter = denser): modality LUT, VOI LUT, MONOCHROME1 inversion."""
    arr = ds.pixel_array
    if float(ds.get("RescaleSlope", 1)) != 1 or float(ds.get("RescaleIntercept", 0)) != 0:
        arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        top = 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    else:
        top = 2 ** int(ds.BitsStored) - 1
    arr = arr / top
    return 1.0 - arr if ds.PhotometricInterpretation == "MONOCHROME1" else arr


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    return _study(tmp_path_factory.mktemp("default"))


def test_extended_truth_alone_changes_no_pixels(default, tmp_path):
    doc0, files0, _ = default
    assert "lesions" not in doc0["truth"] and "density" not in doc0["truth"]["views"]["L_CC"]
    doc, files, _ = _study(tmp_path, extended_truth=True)
    for key in FOUR:
        assert files[key].PixelData == files0[key].PixelData
        assert files[key].WindowCenter == files0[key].WindowCenter
        t = doc["truth"]["views"][key]
        assert t["calcifications"][0]["centre_xy_px"] == doc0["truth"]["views"][key]["calcifications"][0]["centre_xy_px"]
        assert t["flips"] == {"horizontal": False, "vertical": False}
        assert (t["pectoral"] is None) == key.endswith("CC")
        assert t["pectoral"] is None or t["pectoral"]["area_px"] > 1000


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("voi", ["linear", "sigmoid", "lut_sequence"])
def test_voi_and_photometric_variants_present_the_default_image(default, tmp_path, photometric, voi):
    _, files0, _ = default
    doc, files, _ = _study(tmp_path, photometric=photometric, voi=voi)
    for key in ("L_CC", "R_MLO"):
        ds, ds0 = files[key], files0[key]
        assert ds.PhotometricInterpretation == photometric
        assert ds.PresentationLUTShape == ("INVERSE" if photometric == "MONOCHROME1" else "IDENTITY")
        if voi == "lut_sequence":
            assert "WindowCenter" not in ds and len(ds.VOILUTSequence[0].LUTData) == 2 ** ds.BitsStored
        else:
            assert ds.VOILUTFunction == ("SIGMOID" if voi == "sigmoid" else "LINEAR")
        want, got = _presentation(ds0), _presentation(ds)
        diff = np.abs(got - want)
        if voi == "linear":
            assert diff.max() < 1e-9  # mirrored values and window: exact
        else:
            # Different stored values: only rounding separates them (~1e-3 of the output range).
            assert not np.array_equal(ds.pixel_array, ds0.pixel_array)
            assert diff.max() < 3e-3 and diff.mean() < 5e-4
        assert int(ds.pixel_array.max()) < 2 ** ds.BitsStored


@pytest.mark.parametrize("target", [0.08, 0.45, 0.78])
def test_density_has_the_target_dense_area_fraction(tmp_path, target):
    doc, files, truth_dir = _study(tmp_path, seed=5, density=target, clusters_per_image=(0, 0))
    means = {}
    for key, t in doc["truth"]["views"].items():
        d = t["density"]
        assert d["target_dense_area_fraction"] == target
        assert d["dense_area_fraction"] == pytest.approx(target, abs=0.003)
        masks = np.load(truth_dir / t["masks_file"])
        region = masks["breast"] & ~masks["pectoral"]
        assert masks["dense"].sum() == d["dense_px"] and region.sum() == d["breast_region_px"]
        assert not (masks["dense"] & ~region).any()
        # The dense pixels are what the image shows as dense: brighter than the rest of the breast.
        img = _presentation(files[key])
        dense, fat = img[masks["dense"]].mean(), img[region & ~masks["dense"]].mean()
        assert dense > fat + 0.05
        means[key] = d["dense_volume_fraction"]
    for lat in ("L", "R"):
        b = doc["truth"]["breasts"][lat]
        assert b["birads_density"] == "abcd"[min(int(b["dense_area_fraction"] / 0.25), 3)]
        assert b["birads_density"] == {0.08: "a", 0.45: "b", 0.78: "d"}[target]
    # The volume fraction follows the area fraction (the dense regions are mostly gland).
    assert all(abs(v - target) < 0.12 for v in means.values()), means


def test_density_per_breast_and_validation(tmp_path):
    doc, _, _ = _study(tmp_path, seed=6, density={"L": 0.2, "R": 0.6}, views=["L_CC", "R_CC"])
    assert doc["truth"]["breasts"]["L"]["dense_area_fraction"] == pytest.approx(0.2, abs=0.003)
    assert doc["truth"]["breasts"]["R"]["dense_area_fraction"] == pytest.approx(0.6, abs=0.003)
    for bad in (dict(density=0.9), dict(density={"X": 0.3}), dict(voi="gamma"), dict(photometric="RGB"),
                dict(flip="sideways"), dict(presentation_intent="PROCESSING", photometric="MONOCHROME1"),
                dict(masses=-1), dict(views=["L_XX"])):
        with pytest.raises(ValueError):
            synthesize(tmp_path / "bad", 1, 1, **{**SMALL, **bad})


def _from_chest_wall(x_px: float, t: dict) -> float:
    """Distance (mm) of a stored column from the chest-wall edge, undoing laterality mirror and flips."""
    mirrored = (t["laterality"] == "R") != t["flips"]["horizontal"]
    return ((t["cols"] - 1 - x_px) if mirrored else x_px) * t["pixel_spacing_mm"]


def test_shared_clusters_and_masses_follow_the_projection_geometry(tmp_path):
    doc, files, _ = _study(tmp_path, seed=7, shared_clusters=1, masses=1, pixel_spacing_mm=0.2, rows=500,
                           cols=400, clusters_per_image=(0, 0))
    views = doc["truth"]["views"]
    lesions = doc["truth"]["lesions"]
    kinds = sorted(v["kind"] for v in lesions.values())
    assert kinds.count("calcification_cluster") == 2 and kinds.count("mass") == 2  # one each per breast
    for lid, les in lesions.items():
        lat = les["laterality"]
        assert sorted(les["views"]) == [f"{lat}_CC", f"{lat}_MLO"]
        pos = les["position_mm"]
        for key, where in les["views"].items():
            t = views[key]
            group = "clusters" if les["kind"] == "calcification_cluster" else "masses"
            (idx,) = where.values()
            item = t[group][idx]
            assert item["lesion_id"] == lid and item["shared"] is True
            x, y = item["centre_xy_px"]
            # Same distance from the chest wall in both views (cluster centre = mean of projected members).
            tol = 0.6 if group == "masses" else les["region_radius_mm"]
            assert _from_chest_wall(x, t) == pytest.approx(pos["x"], abs=tol)
            ax = t["breast_axis"]
            if key.endswith("CC"):
                v = pos["medial"]
            else:
                th = np.deg2rad(ax["obliquity_deg"])
                v = pos["inferior"] * np.cos(th) - pos["medial"] * np.sin(th)
            assert y * t["pixel_spacing_mm"] == pytest.approx(ax["yc_mm"] + ax["tilt"] * pos["x"] + v, abs=tol)
            x0, y0, x1, y1 = item["box_xy_px"]
            assert x0 <= x <= x1 and y0 <= y <= y1
            img = _presentation(files[key])
            if group == "clusters":
                assert item["n_members"] == les["n_members"] >= 5
                members = [c for c in t["calcifications"] if c.get("lesion_id") == lid]
                assert len(members) == les["n_members"]
                assert (x1 - x0) * t["pixel_spacing_mm"] <= 2 * les["region_radius_mm"] + 1.0
                # The specks are drawn there: robust contrast (3x3 max over the 2-4 mm ring's median, in ring
                # MADs) has a median >= 2.5 over the members; random breast positions measured ~0.2-0.8.
                zs = []
                for c in members:
                    cx, cy = (int(round(v)) for v in c["centre_xy_px"])
                    yy, xx = np.mgrid[-20:21, -20:21]
                    ring = img[cy - 20:cy + 21, cx - 20:cx + 21][(np.hypot(yy, xx) >= 10) & (np.hypot(yy, xx) <= 20)]
                    med = np.median(ring)
                    zs.append((img[cy - 1:cy + 2, cx - 1:cx + 2].max() - med) / (1.4826 * np.median(np.abs(ring - med))))
                assert np.median(zs) >= 2.5, zs
            else:
                d = item["diameter_mm"] / t["pixel_spacing_mm"]
                w, h = x1 - x0 + 1, y1 - y0 + 1
                assert d / 1.3 - 2 <= min(w, h) and max(w, h) <= d * 1.3 + 2
                sx0, sy0, sx1, sy1 = item.get("spicule_box_xy_px", item["box_xy_px"])
                assert sx0 <= x0 and sx1 >= x1 and (item["kind"] == "round") == ("spicule_box_xy_px" not in item)
                inside = img[int(y) - int(d / 4):int(y) + int(d / 4) + 1, int(x) - int(d / 4):int(x) + int(d / 4) + 1]
                pad = int(d / 2)
                around = img[max(sy0 - pad, 0):sy1 + pad + 1, max(sx0 - pad, 0):sx1 + pad + 1].copy()
                around[sy0 - max(sy0 - pad, 0):sy1 - max(sy0 - pad, 0) + 1,
                       sx0 - max(sx0 - pad, 0):sx1 - max(sx0 - pad, 0) + 1] = np.nan
                assert inside.mean() > np.nanmedian(around) + 0.03  # the mass is visibly denser


def test_flip_moves_pixels_truth_and_orientation(default, tmp_path):
    doc0, files0, _ = default
    doc, files, truth_dir = _study(tmp_path, flip="rotate180")
    for key in FOUR:
        ds, ds0 = files[key], files0[key]
        np.testing.assert_array_equal(ds.pixel_array, ds0.pixel_array[::-1, ::-1])
        opposite = {"A": "P", "P": "A", "L": "R", "R": "L", "H": "F", "F": "H"}
        assert list(ds.PatientOrientation) == ["".join(opposite[c] for c in v) for v in ds0.PatientOrientation]
        t, t0 = doc["truth"]["views"][key], doc0["truth"]["views"][key]
        assert t["flips"] == {"horizontal": True, "vertical": True}
        rows, cols = t["rows"], t["cols"]
        for c, c0 in zip(t["calcifications"], t0["calcifications"]):
            assert c["centre_xy_px"] == pytest.approx([cols - 1 - c0["centre_xy_px"][0], rows - 1 - c0["centre_xy_px"][1]], abs=1e-3)
            assert c["centre_xy_mm"] == pytest.approx([v * 0.25 for v in c["centre_xy_px"]], abs=1e-3)
        masks = np.load(truth_dir / t["masks_file"])
        # The breast mask is stored flipped too: the chest wall (full-height tissue edge) is on the other side.
        chest_col = 0 if (key[0] == "L") == (not t["flips"]["horizontal"]) else cols - 1
        assert masks["breast"][:, chest_col].sum() > 0.5 * rows * (0.5 if key.endswith("CC") else 0.6)


def test_random_flip_ml_xccl_views_and_markers(tmp_path):
    views = ["L_ML", "R_XCCL", "R_CC", "L_MLO"]
    doc, files, truth_dir = _study(tmp_path, seed=9, views=views, markers=3, flip="random")
    codes = {"ML": "399260004", "XCCL": "399192008", "CC": "399162004", "MLO": "399368009"}
    for key in views:
        ds, t = files[key], doc["truth"]["views"][key]
        view = key.split("_")[1]
        assert ds.ViewPosition == view and ds.ViewCodeSequence[0].CodeValue == codes[view]
        assert list(ds.PatientOrientation) == t["patient_orientation"]
        assert (t["pectoral"] is None) == (view in ("CC", "XCCL"))
        assert len(t["markers"]) >= 2 and t["markers"][0]["text"] == key.replace("_", "")
        masks = np.load(truth_dir / t["masks_file"])
        air_mm = ndimage.distance_transform_edt(~masks["breast"], sampling=0.25)
        img = ds.pixel_array
        maxv = 2 ** ds.BitsStored - 1
        for m in t["markers"]:
            x0, y0, x1, y1 = m["box_xy_px"]
            patch = img[y0:y1 + 1, x0:x1 + 1]
            assert patch.max() >= 0.95 * maxv  # lead: bright
            assert air_mm[y0:y1 + 1, x0:x1 + 1].min() >= 4.0  # in the air, >= 4 mm from the breast
            assert 0 < x0 and x1 < t["cols"] - 1  # not touching the image edges (chest wall included)
    flips = {tuple(doc["truth"]["views"][k]["flips"].values()) for k in views}
    assert len(flips) >= 2  # "random" is per image


def test_for_processing_images(tmp_path):
    doc, files, truth_dir = _study(tmp_path, presentation_intent="PROCESSING", views=["L_CC"], density=0.5)
    ds = files["L_CC"]
    t = doc["truth"]["views"]["L_CC"]
    assert ds.SOPClassUID == MG_FOR_PROCESSING == ds.file_meta.MediaStorageSOPClassUID
    assert ds.PresentationIntentType == "FOR PROCESSING" and ds.PixelIntensityRelationship == "LIN"
    masks = np.load(truth_dir / t["masks_file"])
    img = ds.pixel_array.astype(float)
    # Linear in the transmitted intensity: air brightest, dense tissue darker than fat.
    assert np.median(img[~masks["breast"]]) > np.percentile(img[masks["breast"]], 99)
    fat = masks["breast"] & ~masks["dense"] & (ndimage.distance_transform_edt(masks["breast"], sampling=0.25) > 10)
    assert img[masks["dense"]].mean() < img[fat].mean()
