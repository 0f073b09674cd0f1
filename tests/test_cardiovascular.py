"""Calcium scoring against phantoms whose Agatston, volume and mass scores are known by construction."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from imaging_tasks.cardiovascular import calcium as cardio
from imaging_tasks.device import pick_device
from imaging_tasks.errors import BadInput
from imaging_tasks.cardiovascular import synth
from imaging_tasks.synth import phi


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    out = tmp_path_factory.mktemp("cardio")
    truths = synth.synthesize(out, 2, seed=20240)
    return out, [json.loads(p.read_text()) for p in truths]


def _files(out, label):
    return sorted((out / "cardiovascular" / label).glob("*.dcm"))


def test_scores_match_truth_exactly(studies, tmp_path):
    out, records = studies
    for rec in records:
        truth = rec["truth"]
        files = _files(out, rec["label"])
        random.Random(0).shuffle(files)  # grouping and ordering come from headers, not file names
        res = cardio.process_study(files, tmp_path / rec["label"],
                                   calibration_mg_per_hu_ml=truth["calibration_mg_per_hu_ml"])
        m = {x["name"]: x for x in res["metrics"]}
        # Areas are multiples of 0.5625 mm2 and weights integers: exact in binary floating point.
        assert m["agatston_score"]["value"] == truth["agatston"]
        assert m["calcium_volume_mm3"]["value"] == truth["volume_mm3"]
        assert m["calcium_mass_mg"]["value"] == pytest.approx(truth["mass_mg"], rel=1e-12)
        assert m["lesion_count"]["value"] == truth["lesion_count"] == len(truth["lesions"])
        assert m["lesion_slice_count"]["value"] == truth["lesion_slice_count"]
        assert m["calcium_volume_mm3"]["unit"] == "mm3" and m["calcium_mass_mg"]["unit"] == "mg"
        assert truth["agatston"] > 0 and {sl["weight"] for les in truth["lesions"] for sl in les["slices"]
                                          if sl["counted"]} == {1, 2, 3, 4}
        assert len(res["findings"]) == truth["lesion_count"]
        assert res["device"] == str(pick_device())
        assert set(res["outputs"]) == {"lesions.json", "qc_calcium.png"}
        assert Image.open(tmp_path / rec["label"] / "qc_calcium.png").size[0] >= 192

        # Every scored slice of every planted lesion is found with its exact area, peak HU and weight.
        table = json.loads((tmp_path / rec["label"] / "lesions.json").read_text())
        rows = table["lesions_2d"]
        px = truth["pixel_spacing_mm"]
        for les in truth["lesions"]:
            ids = set()
            for sl in (s for s in les["slices"] if s["counted"]):
                hits = [r for r in rows if r["slice_index"] == sl["slice_index"]
                        and abs(r["centroid_mm"][1] / px - les["row"]) < 0.5
                        and abs(r["centroid_mm"][2] / px - les["col"]) < 0.5]
                assert len(hits) == 1, (les, sl)
                hit = hits[0]
                assert (hit["area_mm2"], hit["peak_hu"], hit["weight"]) == (sl["area_mm2"], sl["peak_hu"], sl["weight"])
                assert hit["agatston"] == sl["agatston"]
                assert hit["mass_mg"] == pytest.approx(sl["mass_mg"], rel=1e-12)
                ids.add(hit["lesion_id"])
            assert len(ids) == 1  # the slices of one planted lesion form one 3-D lesion

        # Sub-1 mm2 specks, the granuloma in a lung, spine, sternum and ribs are not scored.
        scored = {(r["slice_index"], round(r["centroid_mm"][1] / px), round(r["centroid_mm"][2] / px)) for r in rows}
        for tiny in truth["ignored_lesions"]:
            assert (tiny["slices"][0]["slice_index"], tiny["row"], tiny["col"]) not in scored
        assert truth["distractors"]["lung_granuloma"] is not None
        assert table["roi"]["method"] == "lung_hull_minus_lungs_minus_bone"


def test_roi_is_what_keeps_bone_out(studies, tmp_path):
    out, records = studies
    rec = records[0]
    res = cardio.process_study(_files(out, rec["label"]), tmp_path, roi="none")
    agatston = {m["name"]: m["value"] for m in res["metrics"]}["agatston_score"]
    assert agatston > 10 * rec["truth"]["agatston"]  # spine, sternum and ribs are all >= 130 HU


def _blob(vol, z, r, c, radius, hu):
    yy, xx = np.mgrid[:vol.shape[1], :vol.shape[2]]
    vol[z][(yy - r) ** 2 + (xx - c) ** 2 <= radius ** 2] = hu


def test_density_weights_thresholds_and_min_area():
    vol = np.full((3, 64, 64), 40.0, np.float32)
    sp = (3.0, 0.5, 0.5)  # 0.25 mm2 pixels
    vol[0, 2:4, 2:4] = 129  # below threshold: nothing
    vol[0, 10:12, 10:12] = 130  # 1.0 mm2 exactly at the threshold: weight 1
    vol[0, 20:22, 20:22] = 199
    vol[0, 30:32, 30:32] = 200  # weight 2
    vol[0, 40:42, 40:42] = 299
    vol[0, 50:52, 50:52] = 300  # weight 3
    vol[1, 10:12, 10:12] = 399
    vol[1, 58:60, 58:60] = 400  # weight 4
    vol[1, 30:33, 30:31] = 900  # 0.75 mm2: below 1 mm2, ignored whatever its density
    vol[2, 40:44, 40:44] = 150  # 4 mm2 rim ...
    vol[2, 41, 41] = 450  # ... with a dense core: weight 4 from the peak, not the mean
    res = cardio.calcium_score(vol, sp, calibration_mg_per_hu_ml=1.0)
    expected = 1.0 * (1 + 1 + 2 + 2 + 3 + 3 + 4) + 4.0 * 4
    assert res["agatston"] == expected
    assert res["lesion_slice_count"] == 8
    assert res["volume_mm3"] == (7 * 4 + 16) * 0.25 * 3.0
    hu_sum = 4 * (130 + 199 + 200 + 299 + 300 + 399 + 400) + 15 * 150 + 450
    assert res["mass_mg"] == pytest.approx(hu_sum * 0.75 / 1000.0, rel=1e-12)
    cored = [r for r in res["lesions"] if r["slice_index"] == 2][0]
    assert (cored["peak_hu"], cored["weight"], cored["agatston"]) == (450.0, 4, 16.0)
    # Regions on adjacent slices that touch form one 3-D lesion (the 130 and 399 blobs).
    assert res["lesion_count"] == 7
    # 1.5 mm slices are scaled to the 3 mm convention.
    assert cardio.calcium_score(vol, (1.5, 0.5, 0.5))["agatston"] == expected / 2
    assert cardio.calcium_score(np.full((2, 8, 8), 40.0), sp)["agatston"] == 0.0


def test_roi_mask_restricts_scoring():
    vol = np.full((1, 40, 40), 40.0, np.float32)
    _blob(vol, 0, 10, 10, 3, 500)
    _blob(vol, 0, 30, 30, 3, 500)
    roi = np.zeros(vol.shape, bool)
    roi[0, :20, :20] = True
    full = cardio.calcium_score(vol, (3.0, 1.0, 1.0))
    half = cardio.calcium_score(vol, (3.0, 1.0, 1.0), roi=roi)
    assert full["lesion_count"] == 2 and half["lesion_count"] == 1
    assert half["agatston"] == full["agatston"] / 2 == 29 * 4


def test_mr_study_is_bad_input(tmp_path):
    rng = np.random.default_rng(1)
    study = phi.fake_study(rng, "study-000")
    ds = phi.dicom_dataset(study, modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                           series_uid=phi.new_uid(rng), sop_uid=phi.new_uid(rng), series_number=1,
                           instance_number=1, series_description="T1 SE")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = [1, 1]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.zeros((8, 8), "<u2").tobytes()
    path = tmp_path / "mr.dcm"
    phi.write_dicom(ds, str(path))
    with pytest.raises(BadInput) as exc:
        cardio.process_study([path], tmp_path / "out")
    assert exc.value.reason == "wrong_modality"
    with pytest.raises(BadInput) as exc:
        cardio.process_study([], tmp_path / "out")
    assert exc.value.reason == "no_series"


def test_scout_only_and_contrast_scans_are_bad_input(studies, tmp_path):
    out, records = studies
    scout = [f for f in _files(out, records[0]["label"]) if f.name.startswith("LOC")]
    with pytest.raises(BadInput) as exc:
        cardio.process_study(scout, tmp_path / "scout")
    assert exc.value.reason == "no_series"
    synth.synthesize(tmp_path / "cta", 1, seed=5, rows=128, slices=16, contrast=True)
    with pytest.raises(BadInput) as exc:
        cardio.process_study(_files(tmp_path / "cta", "study-000"), tmp_path / "cta-out")
    assert exc.value.reason == "contrast_enhanced"


def test_synthesis_is_deterministic(tmp_path):
    kw = dict(rows=128, slices=16)
    a = synth.synthesize(tmp_path / "a", 2, seed=9, **kw)
    synth.synthesize(tmp_path / "b", 2, seed=9, **kw)
    c = synth.synthesize(tmp_path / "c", 1, seed=10, **kw)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 2 * (16 + 1) + 2
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()
    rec = json.loads(a[0].read_text())
    assert rec["study_uid"] and rec["phi"] and rec["specialty"] == "cardiovascular"
    # No PHI in file or folder names.
    names = " ".join(str(p) for p in files_a)
    assert not any(v in names for v in rec["phi"])
