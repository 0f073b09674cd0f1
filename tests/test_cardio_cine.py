"""Cine-MR LV function against beating-LV phantoms whose volumes are known from their definition.

Targets (issue 13): EF within 2 percentage points, EDV and ESV within 5 %, on phantoms varied in contrast,
noise, pixel size, slice count/thickness/gap, orientation (oblique short axis), heart rate, volumes, coil shading,
stored intensity scale and where in the cycle phase 0 falls; instance order is always shuffled.  Truth comes from
:mod:`imaging_tasks.cardiovascular.synth_cine` (closed-form integrals of the phantom), never from the code under
test.  Bad inputs are refused with their reason codes; a study without a cine series gives no numbers.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image

from imaging_tasks.cardiovascular import cine
from imaging_tasks.cardiovascular.synth_cine import write_cine_series
from imaging_tasks.errors import BadInput, ConfigError
from imaging_tasks.synth import phi

PHANTOMS = {
    "default": {},
    "low_contrast_noisy": dict(blood_to_myocardium=2.1, snr=9.0, heart_rate_bpm=72, phases=14),
    "fine_pixels_gaps": dict(pixel_mm=1.5, matrix=144, slices=12, slice_thickness_mm=6.0, slice_gap_mm=2.0,
                             phases=12, supersample=3),
    "coarse_pixels_thick": dict(pixel_mm=3.4, matrix=64, slices=8, slice_thickness_mm=10.0, slice_gap_mm=0.0),
    "axial_fast_heart_rate": dict(orientation="axial", heart_rate_bpm=115, phases=14, snr=15),
    "double_oblique_low_ef": dict(orientation="double_oblique", ef_pct=22, edv_ml=210, slices=12, phases=18,
                                  lv_mass_g=180, trigger_offset=0.55),
    "small_hyperdynamic_shaded": dict(ef_pct=72, edv_ml=85, heart_rate_bpm=48, shading=0.4, intensity_scale=300,
                                      ellipticity=1.15, slice_thickness_mm=7.0, slice_gap_mm=3.0, phases=14,
                                      orientation=(0.3, -0.6, -0.74)),
}
_CACHE: dict = {}


def _study(tmp_path_factory, name, **knobs):
    """Write the named phantom (once per module for the named ones: tests that damage files copy them first)."""
    if name in PHANTOMS and not knobs and name in _CACHE:
        return _CACHE[name]
    rng = np.random.default_rng(11 + (sorted(PHANTOMS).index(name) if name in PHANTOMS else 99))
    folder = tmp_path_factory.mktemp(name)
    truth = write_cine_series(folder, phi.fake_study(rng, name), rng, **{**PHANTOMS.get(name, {}), **knobs})
    if name in PHANTOMS and not knobs:
        _CACHE[name] = folder, truth
    return folder, truth


def _metrics(res):
    return {m["name"]: m["value"] for m in res["metrics"]}


def _cyclic_distance(a, b, n):
    d = abs(a - b) % n
    return min(d, n - d)


def test_phantom_truth_matches_its_rendered_partial_volumes(tmp_path_factory):
    """The phantom checks itself: the blood fractions it rendered add up to its closed-form truth."""
    _folder, truth = _study(tmp_path_factory, "default")
    assert truth["ed_phase"] == int(np.argmax(truth["volumes_ml"]))
    assert truth["ef_pct"] == pytest.approx(100 * (truth["edv_ml"] - truth["esv_ml"]) / truth["edv_ml"])
    np.testing.assert_allclose(truth["rendered_volumes_ml"], truth["volumes_ml"], rtol=0.01)
    # Constant myocardial volume: the wall thickens as the cavity empties, LV mass does not change.
    assert np.ptp(truth["myocardium_ml"]) < 0.01 * np.mean(truth["myocardium_ml"])


@pytest.mark.parametrize("name", sorted(PHANTOMS))
def test_lv_function_within_targets(tmp_path_factory, tmp_path, name):
    folder, truth = _study(tmp_path_factory, name)
    res = cine.cine_function(sorted(folder.glob("*.dcm")), tmp_path)
    m = _metrics(res)
    assert abs(m["lv_ef_pct"] - truth["ef_pct"]) <= 2.0, (m, truth["ef_pct"])
    assert m["lv_edv_ml"] == pytest.approx(truth["edv_ml"], rel=0.05)
    assert m["lv_esv_ml"] == pytest.approx(truth["esv_ml"], rel=0.05)
    assert m["lv_sv_ml"] == pytest.approx(m["lv_edv_ml"] - m["lv_esv_ml"])
    n = truth["phases"]
    assert _cyclic_distance(int(m["lv_ed_phase"]), truth["ed_phase"], n) <= 1
    assert _cyclic_distance(int(m["lv_es_phase"]), truth["es_phase"], n) <= 1
    assert m["cine_phases"] == n and m["cine_slices"] == truth["slices"]
    assert m["cine_heart_rate_bpm"] == pytest.approx(truth["heart_rate_bpm"], abs=0.6)  # NominalInterval in ms
    assert "lv_mass_g" not in m  # the classical path does not segment the myocardium
    # The whole volume curve, not only its extremes.
    measured = np.array([f["volume_ml"] for f in sorted(res["findings"], key=lambda f: f["index"])])
    np.testing.assert_allclose(measured, truth["volumes_ml"], rtol=0.05)
    assert [f["kind"] for f in res["findings"]] == ["lv_phase_volume"] * n
    np.testing.assert_allclose([f["trigger_time_ms"] for f in res["findings"]], truth["trigger_times_ms"], atol=0.01)
    assert set(res["outputs"]) == {"cine_volumes.json", "qc_cine_volume_curve.png", "qc_cine_ed_es.png"}
    table = json.loads((tmp_path / "cine_volumes.json").read_text())
    assert table["method"]["segmentation"] == "classical"
    assert len(table["areas_mm2"]) == truth["slices"] and len(table["areas_mm2"][0]) == n
    assert Image.open(tmp_path / "qc_cine_ed_es.png").size[0] >= truth["slices"] * truth["matrix"]
    assert Image.open(tmp_path / "qc_cine_volume_curve.png").size == (520, 320)


def test_duplicate_copies_and_other_cine_series(tmp_path_factory, tmp_path):
    """A second copy of an instance is ignored; of two cine series the first by series number is measured."""
    folder, truth = _study(tmp_path_factory, "default")
    work = tmp_path / "in"
    shutil.copytree(folder, work)
    first = sorted(work.glob("*.dcm"))[0]
    shutil.copy(first, work / "copy-of-first.dcm")
    rng = np.random.default_rng(5)
    ds0 = pydicom.dcmread(first, stop_before_pixels=True)
    other = write_cine_series(tmp_path / "other", phi.fake_study(rng, "x"), rng, series_number=9, slices=4,
                              phases=8, matrix=48, pixel_mm=5.0, edv_ml=60)
    for p in (tmp_path / "other").glob("*.dcm"):  # same study, later series number
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = ds0.StudyInstanceUID
        ds.save_as(work / ("other-" + p.name))
    res = cine.cine_function(sorted(work.glob("*.dcm")), tmp_path / "out")
    m = _metrics(res)
    assert m["lv_edv_ml"] == pytest.approx(truth["edv_ml"], rel=0.05)
    table = json.loads((tmp_path / "out" / "cine_volumes.json").read_text())
    assert table["series"]["number"] == truth["series_number"]
    assert table["series"]["other_cine_series"] == [other["series_number"]]
    assert any("duplicate" in n for n in table["series"]["preconditions"])


def test_study_without_cine_gives_empty_results(tmp_path_factory, tmp_path):
    folder, _truth = _study(tmp_path_factory, "nocine", slices=3, phases=8, matrix=32, pixel_mm=6.0)
    for p in folder.glob("*.dcm"):  # MR without any cardiac timing: not a cine series ("other")
        ds = pydicom.dcmread(p)
        del ds.TriggerTime, ds.CardiacNumberOfImages
        ds.save_as(p)
    for files in ([], sorted(folder.glob("*.dcm"))):
        res = cine.cine_function(files, tmp_path)
        assert res == {"metrics": [], "findings": [], "outputs": [], "note": "no cine series"}


# --------------------------------------------------------------------------- bad inputs
SMALL = dict(slices=5, phases=8, matrix=40, pixel_mm=6.0, supersample=2)


def _edit(paths, change):
    for p in paths:
        ds = pydicom.dcmread(p)
        change(ds)
        ds.save_as(p)


def _by_slice(folder):
    groups = {}
    for p in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        groups.setdefault(round(float(ds.SliceLocation), 2), []).append((float(ds.TriggerTime), p))
    return [sorted(v) for _k, v in sorted(groups.items())]


def _no_pixel_spacing(folder):
    _edit(folder.glob("*.dcm"), lambda ds: ds.__delattr__("PixelSpacing"))


def _same_trigger_time(folder):
    sl = _by_slice(folder)[2]
    _edit([sl[3][1]], lambda ds: setattr(ds, "TriggerTime", sl[2][0]))


def _one_slice_missing(folder):
    for _t, p in _by_slice(folder)[2]:
        p.unlink()


def _tilted_image(folder):
    _edit([_by_slice(folder)[1][0][1]], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]))


def _noise_only(folder):
    rng = np.random.default_rng(0)

    def change(ds):
        ds.PixelData = rng.integers(0, 60, (ds.Rows, ds.Columns)).astype("<u2").tobytes()
    _edit(folder.glob("*.dcm"), change)


@pytest.mark.parametrize("knobs, damage, reason", [
    (dict(omit_trigger_time=True), None, "missing_trigger_time"),
    (dict(drop_phase_slices=1), None, "unequal_phases"),
    (dict(phases=6), None, "too_few_phases"),
    (dict(slices=2), None, "too_few_slices"),
    ({}, _no_pixel_spacing, "missing_pixel_spacing"),
    ({}, _same_trigger_time, "duplicate_trigger_time"),
    ({}, _one_slice_missing, "irregular_slices"),
    ({}, _tilted_image, "mixed_geometry"),
    ({}, _noise_only, "lv_not_found"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_inputs_are_refused_with_reasons(tmp_path_factory, tmp_path, knobs, damage, reason):
    folder, _truth = _study(tmp_path_factory, "bad", **{**SMALL, **knobs})
    if damage:
        damage(folder)
    with pytest.raises(BadInput) as exc:
        cine.cine_function(sorted(folder.glob("*.dcm")), tmp_path)
    assert exc.value.reason == reason
    assert "Okafor" not in exc.value.message and "MRN" not in exc.value.message  # no PHI in messages
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_configuration_mistakes_fail_at_once(tmp_path):
    with pytest.raises(ConfigError, match="cine_model_uri"):
        cine.cine_function([], tmp_path, cine_segmentation="model")
    with pytest.raises(ConfigError, match="cine_segmentation"):
        cine.cine_function([], tmp_path, cine_segmentation="atlas")


def test_lv_function_arithmetic():
    areas = np.array([[1000.0, 500.0, 800.0], [600.0, 250.0, 500.0]])
    fn = cine.lv_function(areas, 10.0)
    np.testing.assert_allclose(fn["volumes_ml"], [16.0, 7.5, 13.0])
    assert (fn["ed_phase"], fn["es_phase"]) == (0, 1)
    assert fn["ef_pct"] == pytest.approx(100 * 8.5 / 16.0)


# --------------------------------------------------------------------------- bring-your-own model
def test_model_path_identical_to_running_the_model_by_hand(tmp_path_factory, tmp_path):
    """A tiny scripted intensity-band segmenter (blood / myocardium / background) as the BYO model: the step's
    volumes and LV mass equal voxel counts of the model run by hand, exactly."""
    torch = pytest.importorskip("torch")

    from byo_models import Bands, config, save_model

    model_path = save_model(tmp_path, Bands(mus=(0.05, 0.9, 0.3)), config(name="bands", batch_size=7), "bands.pt")
    folder, truth = _study(tmp_path_factory, "model", slices=5, phases=10, matrix=48, pixel_mm=5.0)
    res = cine.cine_function(sorted(folder.glob("*.dcm")), tmp_path / "out", cine_segmentation="model",
                             cine_model_uri=str(model_path), device="cpu")
    m = _metrics(res)

    # By hand: frames ordered along the slice normal, then by trigger time; percentile normalisation; argmax.
    headers = [(p, pydicom.dcmread(p)) for p in folder.glob("*.dcm")]
    iop = np.array(headers[0][1].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    headers.sort(key=lambda h: (round(float(np.dot(normal, np.array(h[1].ImagePositionPatient, float))), 2),
                                float(h[1].TriggerTime)))
    frames = []
    for _p, ds in headers:
        f = ds.pixel_array.astype(np.float32).astype(np.float64)
        lo, hi = np.percentile(f, [1, 99])
        frames.append((np.clip(f, lo, hi) - lo) / (hi - lo))
    model = torch.jit.load(str(model_path)).eval()
    with torch.no_grad():
        labels = model(torch.from_numpy(np.array(frames, np.float32)[:, None])).argmax(dim=1).numpy()
    labels = labels.reshape(truth["slices"], truth["phases"], *labels.shape[1:])
    positions = sorted({float(np.dot(normal, np.array(ds.ImagePositionPatient, float))) for _p, ds in headers})
    voxel_ml = 5.0 * 5.0 * float(np.median(np.diff(positions))) / 1000.0
    blood = (labels == 1).sum(axis=(0, 2, 3)) * voxel_ml
    myo = (labels == 2).sum(axis=(0, 2, 3)) * voxel_ml
    ed, es = int(np.argmax(blood)), int(np.argmin(blood))
    assert (m["lv_ed_phase"], m["lv_es_phase"]) == (ed, es)
    assert m["lv_edv_ml"] == pytest.approx(blood[ed], rel=1e-9)
    assert m["lv_esv_ml"] == pytest.approx(blood[es], rel=1e-9)
    assert m["lv_ef_pct"] == pytest.approx(100 * (blood[ed] - blood[es]) / blood[ed], rel=1e-9)
    assert m["lv_mass_g"] == pytest.approx(1.05 * myo[ed], rel=1e-9)
    found = sorted(res["findings"], key=lambda f: f["index"])
    np.testing.assert_allclose([f["volume_ml"] for f in found], blood, rtol=1e-9)
    np.testing.assert_allclose([f["myocardium_ml"] for f in found], myo, rtol=1e-9)
    table = json.loads((tmp_path / "out" / "cine_volumes.json").read_text())
    assert table["method"]["segmentation"] == "model" and table["method"]["model"]["name"] == "bands"
    assert res["device"] == "cpu"
