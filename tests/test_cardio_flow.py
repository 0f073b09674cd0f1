"""2-D phase contrast and 4-D flow against tube phantoms whose flows are known analytically (synth_flow).

Targets (issue 13): net flow within 2 %, regurgitant fraction within 2 percentage points, aliasing cases included,
for each vendor habit, plug and parabolic profiles, an oblique 4-D tube, the plane given by Param and found
automatically.  Bad inputs are refused with their reasons.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imaging_tasks.cardiovascular import flow as fl
from imaging_tasks.cardiovascular import synth_flow as sf
from imaging_tasks.errors import BadInput, ConfigError
from imaging_tasks.synth import phi

NET_TOL_PCT = 2.0
RF_TOL_POINTS = 2.0

PC_CASES = {
    "siemens_parabolic": dict(vendor="siemens"),
    "philips_plug": dict(vendor="philips", profile="plug", pixel_mm=1.6, size=72),
    "ge_parabolic_against_normal": dict(vendor="ge", forward_along_normal=False, angles_deg=(60.0, -20.0, 30.0)),
    "siemens_plug_aliased": dict(vendor="siemens", profile="plug", venc_cm_s=90.0, peak_velocity_cm_s=150.0),
    "ge_parabolic_aliased_rf30": dict(vendor="ge", venc_cm_s=90.0, peak_velocity_cm_s=200.0,
                                      regurgitant_fraction_pct=30.0, frames=24, rr_ms=750.0),
    "philips_plug_aliased_noisy": dict(vendor="philips", profile="plug", venc_cm_s=70.0, peak_velocity_cm_s=130.0,
                                       frames=16, noise=0.035),
}
FLOW4D_CASES = {
    "siemens_parabolic_oblique_auto": (dict(vendor="siemens", slices=8), {}),
    "philips_plug_param_plane": (dict(vendor="philips", profile="plug", slices=8, tilt_deg=40.0), {"plane": True}),
    "ge_parabolic_aliased_auto": (dict(vendor="ge", slices=8, venc_cm_s=80.0, frames=12,
                                       angles_deg=(15.0, -10.0, 30.0)), {}),
    "siemens_two_vessels_auto": (dict(vendor="siemens", slices=8, second_vessel=True, venc_cm_s=80.0,
                                      frames=12), {}),
}


def _files(folder):
    files = sorted(folder.glob("*.dcm"))
    random.Random(0).shuffle(files)  # pairing and ordering come from headers, not file names
    return files


def _metrics(res, prefix):
    return {m["name"][len(prefix):]: m["value"] for m in res["metrics"] if m["name"].startswith(prefix)}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    out = {}
    for i, (name, kw) in enumerate(PC_CASES.items()):
        rng = np.random.default_rng([13, i])
        out["pc_" + name] = (root / ("pc_" + name), sf.write_pc_series(root / ("pc_" + name),
                                                                       phi.fake_study(rng, name), rng, **kw))
    for i, (name, (kw, _opts)) in enumerate(FLOW4D_CASES.items()):
        rng = np.random.default_rng([14, i])
        out["4d_" + name] = (root / ("4d_" + name), sf.write_flow4d_series(root / ("4d_" + name),
                                                                           phi.fake_study(rng, name), rng, **kw))
    return out


def _check_against_truth(m, truth, peak_tol):
    assert m["net_flow_ml"] == pytest.approx(truth["net_flow_ml"], rel=NET_TOL_PCT / 100)
    assert abs(m["regurgitant_fraction_pct"] - truth["regurgitant_fraction_pct"]) <= RF_TOL_POINTS
    assert m["forward_flow_ml"] == pytest.approx(truth["forward_flow_ml"], rel=0.03)
    assert m["backward_flow_ml"] == pytest.approx(truth["backward_flow_ml"], abs=0.03 * truth["forward_flow_ml"])
    # Peak: the largest partial-volume (and frame-window) averaged velocity the images can show, plus noise.
    assert m["peak_velocity_cm_s"] == pytest.approx(truth["peak_velocity_sampled_cm_s"], rel=peak_tol)
    assert m["venc_cm_s"] == truth["venc_cm_s"]
    assert m["aliasing_detected"] == float(truth["aliased"])
    assert (m["aliased_voxel_frames"] > 0) == truth["aliased"]
    assert m["vessel_area_mm2"] == pytest.approx(truth["vessel_area_mm2"], rel=0.12)


# --------------------------------------------------------------------------- phantoms
def test_phantom_truth_is_the_analytic_flow(phantoms):
    """The noise-free images, summed as the measurement sums them, hold the analytic flow (the phantom is exact)."""
    for key, (_folder, truth) in phantoms.items():
        if key.startswith("pc_"):
            assert truth["phantom_flow_ml"]["net"] == pytest.approx(truth["net_flow_ml"], rel=2e-3)
            assert truth["phantom_flow_ml"]["backward"] == pytest.approx(truth["backward_flow_ml"], rel=5e-3)
    aliased = {k for k, (_f, t) in phantoms.items() if t["aliased"]}
    assert aliased == {"pc_siemens_plug_aliased", "pc_ge_parabolic_aliased_rf30", "pc_philips_plug_aliased_noisy",
                       "4d_ge_parabolic_aliased_auto", "4d_siemens_two_vessels_auto"}


@pytest.mark.parametrize("name", list(PC_CASES))
def test_pc_flow_matches_truth(phantoms, tmp_path, name):
    folder, truth = phantoms["pc_" + name]
    res = fl.flow(_files(folder), tmp_path, device="cpu")
    m = _metrics(res, "pc_")
    _check_against_truth(m, truth, peak_tol=0.05)
    frames = [f for f in res["findings"] if f["kind"] == "pc_flow_frame"]
    assert [f["index"] for f in frames] == list(range(truth["frames"]))
    # Per-frame flow follows the truth waveform (noise of a few ml/s per frame).
    q = np.array([f["flow_ml_s"] for f in frames])
    assert np.max(np.abs(q - np.array(truth["flow_ml_s"]))) < 0.05 * max(truth["flow_ml_s"]) + 3.0
    assert res["outputs"] == ["flow.json", "qc_flow_curve.png", "qc_flow_roi.png"]
    table = json.loads((tmp_path / "flow.json").read_text())
    assert table["measurements"][0]["series_numbers"] == truth["series_numbers"]
    assert table["measurements"][0]["vessel"].startswith("auto")
    assert Image.open(tmp_path / "qc_flow_curve.png").size == (640, 360)


@pytest.mark.parametrize("name", list(FLOW4D_CASES))
def test_flow4d_matches_truth(phantoms, tmp_path, name):
    folder, truth = phantoms["4d_" + name]
    opts = {"flow_plane": truth["plane"]} if FLOW4D_CASES[name][1].get("plane") else {}
    res = fl.flow(_files(folder), tmp_path, device="cpu", **opts)
    m = _metrics(res, "flow4d_")
    _check_against_truth(m, truth, peak_tol=0.08)
    meas = json.loads((tmp_path / "flow.json").read_text())["measurements"][0]
    axis = np.array(json.loads(json.dumps(truth["axis"])))
    # The plane is perpendicular to the oblique tube (automatic: mean systolic direction) and on its axis.
    assert abs(float(np.dot(meas["plane_normal"], axis))) > 0.995
    rel = np.array(meas["plane_point_mm"]) - np.array(truth["point_mm"])
    assert np.linalg.norm(rel - (rel @ axis) * axis) < 1.5
    assert len([f for f in res["findings"] if f["kind"] == "flow4d_flow_frame"]) == truth["frames"]


def test_pc_plane_param_picks_vessel_and_forward_side(phantoms, tmp_path):
    folder, truth = phantoms["pc_siemens_parabolic"]
    other = truth["other_vessels"][0]
    # The smaller vessel, chosen by its point; its forward direction given by the normal.
    plane = sf.plane_text(other["point_mm"], other["axis"])
    m = _metrics(fl.flow(_files(folder), tmp_path / "a", flow_plane=plane, device="cpu"), "pc_")
    assert m["net_flow_ml"] == pytest.approx(other["net_flow_ml"], rel=NET_TOL_PCT / 100)
    assert abs(m["regurgitant_fraction_pct"] - other["regurgitant_fraction_pct"]) <= RF_TOL_POINTS
    # The main vessel with its normal reversed: the same flow, counted the other way.
    point, normal = truth["plane"].split(";")
    reversed_plane = point + ";" + ",".join(str(-float(v)) for v in normal.split(","))
    m = _metrics(fl.flow(_files(folder), tmp_path / "b", flow_plane=reversed_plane, device="cpu"), "pc_")
    assert m["net_flow_ml"] == pytest.approx(-truth["net_flow_ml"], rel=NET_TOL_PCT / 100)


def test_flow4d_plane_param_point_need_not_be_on_the_axis(phantoms, tmp_path):
    """A flow_plane point 6 mm off the axis of the brighter vessel, with the smaller one nearby: the plane is
    re-centred on the lumen of the vessel the point is in."""
    folder, truth = phantoms["4d_siemens_two_vessels_auto"]
    axis = np.array(truth["axis"])
    side = np.cross(axis, [0.0, 0.0, 1.0])
    point = np.array(truth["point_mm"]) + 6.0 * side / np.linalg.norm(side)
    res = fl.flow(_files(folder), tmp_path, flow_plane=sf.plane_text(point, axis), device="cpu")
    m = _metrics(res, "flow4d_")
    assert m["net_flow_ml"] == pytest.approx(truth["net_flow_ml"], rel=NET_TOL_PCT / 100)
    assert abs(m["regurgitant_fraction_pct"] - truth["regurgitant_fraction_pct"]) <= RF_TOL_POINTS
    meas = json.loads((tmp_path / "flow.json").read_text())["measurements"][0]
    assert meas["vessel"] == "flow_plane"
    rel = np.array(meas["plane_point_mm"]) - np.array(truth["point_mm"])
    assert np.linalg.norm(rel - (rel @ axis) * axis) < 1.5


def test_flow_survives_deidentification(tmp_path):
    """VENC, direction, component and velocity mapping are read from standard attributes that de-identification
    keeps (SequenceName, MRVelocityEncodingSequence, RealWorldValueMappingSequence, ComplexImageComponent...)."""
    from imaging_tasks.deid.dicom import deidentify_bytes

    rng = np.random.default_rng(12)
    study = phi.fake_study(rng, "deid")
    truths = [sf.write_pc_series(tmp_path / "in", study, rng, vendor=v, series_number=10 * i + 3, frames=12,
                                 size=48, venc_cm_s=90.0, peak_velocity_cm_s=150.0, angles_deg=(25.0 * i, 0, 0))
              for i, v in enumerate(["siemens", "philips", "ge"])]
    (tmp_path / "out").mkdir()
    for f in sorted((tmp_path / "in").glob("*.dcm")):
        (tmp_path / "out" / f.name).write_bytes(deidentify_bytes(f.read_bytes(), b"k" * 32)[0])
    fl.flow(_files(tmp_path / "out"), tmp_path / "res", device="cpu")
    measured = json.loads((tmp_path / "res" / "flow.json").read_text())["measurements"]
    assert [m["venc_source"] for m in measured] == ["SequenceName", "MRVelocityEncodingSequence",
                                                    "MRVelocityEncodingSequence"]
    for m, truth in zip(measured, truths):
        assert m["net_flow_ml"] == pytest.approx(truth["net_flow_ml"], rel=NET_TOL_PCT / 100)
        assert m["aliasing_detected"] == 1


def test_aliasing_reported_but_not_corrected_without_unwrap(phantoms, tmp_path):
    folder, truth = phantoms["pc_siemens_plug_aliased"]
    m = _metrics(fl.flow(_files(folder), tmp_path, flow_unwrap=False, device="cpu"), "pc_")
    assert m["aliasing_detected"] == 1.0 and m["aliased_voxel_frames"] > 0
    assert m["peak_velocity_cm_s"] <= truth["venc_cm_s"]  # wrapped values never exceed the VENC
    assert abs(m["net_flow_ml"] - truth["net_flow_ml"]) > 0.1 * truth["net_flow_ml"]


def test_study_with_pc_and_4d_flow(tmp_path):
    """Several acquisitions in one study (separate Siemens series beside a GE-like 4-D flow): each measured."""
    rng = np.random.default_rng(7)
    study = phi.fake_study(rng, "both")
    pc = sf.write_pc_series(tmp_path / "in", study, rng, vendor="siemens", series_number=5, second_vessel=False)
    f4 = sf.write_flow4d_series(tmp_path / "in", study, rng, vendor="ge", series_number=9, slices=8, frames=8)
    pc2 = sf.write_pc_series(tmp_path / "in", study, rng, vendor="philips", series_number=12, venc_cm_s=100.0)
    res = fl.flow(_files(tmp_path / "in"), tmp_path / "out", device="cpu")
    m_pc, m_4d = _metrics(res, "pc_"), _metrics(res, "flow4d_")
    assert m_pc["net_flow_ml"] == pytest.approx(pc["net_flow_ml"], rel=NET_TOL_PCT / 100)  # the first by number
    assert m_4d["net_flow_ml"] == pytest.approx(f4["net_flow_ml"], rel=NET_TOL_PCT / 100)
    summary = [f for f in res["findings"] if f["kind"] == "flow_measurement"]
    assert [f["series_number"] for f in summary] == [5, 9, 12]
    assert summary[2]["net_flow_ml"] == pytest.approx(pc2["net_flow_ml"], rel=NET_TOL_PCT / 100)
    assert {m["name"]: m["value"] for m in res["metrics"]}["flow_measurements"] == 3.0


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("vendor", ["siemens", "philips", "ge"])
def test_phase_without_venc_refused(tmp_path, vendor):
    rng = np.random.default_rng(3)
    sf.write_pc_series(tmp_path, phi.fake_study(rng, "novenc"), rng, vendor=vendor, defect="missing_venc",
                       frames=8, size=32)
    with pytest.raises(BadInput) as exc:
        fl.flow(_files(tmp_path), tmp_path / "out", device="cpu")
    assert exc.value.reason == "missing_venc"


@pytest.mark.parametrize("vendor", ["siemens", "philips"])
def test_mismatched_magnitude_phase_refused(tmp_path, vendor):
    rng = np.random.default_rng(4)
    sf.write_pc_series(tmp_path, phi.fake_study(rng, "mismatch"), rng, vendor=vendor,
                       defect="mismatched_magnitude_phase", frames=8, size=32)
    with pytest.raises(BadInput) as exc:
        fl.flow(_files(tmp_path), tmp_path / "out", device="cpu")
    assert exc.value.reason == "mismatched_magnitude_phase"
    assert "series" in exc.value.message


def test_bad_series_beside_good_one_is_listed_not_fatal(tmp_path):
    rng = np.random.default_rng(5)
    study = phi.fake_study(rng, "mixed")
    good = sf.write_pc_series(tmp_path / "in", study, rng, vendor="ge", series_number=3, frames=12)
    sf.write_pc_series(tmp_path / "in", study, rng, vendor="philips", series_number=8, frames=12, size=32,
                       defect="mismatched_magnitude_phase", angles_deg=(0.0, 90.0, 0.0))
    sf.write_pc_series(tmp_path / "in", study, rng, vendor="ge", series_number=11, frames=12, size=32,
                       defect="missing_venc", angles_deg=(90.0, 0.0, 0.0))
    res = fl.flow(_files(tmp_path / "in"), tmp_path / "out", device="cpu")
    m = {x["name"]: x["value"] for x in res["metrics"]}
    assert m["pc_net_flow_ml"] == pytest.approx(good["net_flow_ml"], rel=NET_TOL_PCT / 100)
    assert m["flow_measurements"] == 1.0 and m["flow_acquisitions_refused"] == 2.0
    refused = json.loads((tmp_path / "out" / "flow.json").read_text())["refused"]
    assert sorted((r["series_numbers"][0], r["reason"]) for r in refused) == [
        (8, "mismatched_magnitude_phase"), (11, "missing_venc")]
    names = study.patient.name.split("^")
    assert not any(n in r["message"] for r in refused for n in names)


def test_study_without_flow_returns_empty(tmp_path):
    rng = np.random.default_rng(6)
    study = phi.fake_study(rng, "cine")
    for t in range(3):  # an MR series with cardiac timing but no phase images: cine, not flow
        ds = phi.dicom_dataset(study, modality="MR", sop_class_uid=sf.MR_IMAGE_STORAGE, series_uid="1.2.3.4",
                               sop_uid=phi.new_uid(rng), series_number=2, instance_number=t + 1,
                               series_description="cine")
        ds.TriggerTime = str(40.0 * t)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.zeros((4, 4), np.uint16).tobytes()
        phi.write_dicom(ds, str(tmp_path / f"{t}.dcm"))
    res = fl.flow(_files(tmp_path), tmp_path / "out", device="cpu")
    assert res["metrics"] == [] and res["findings"] == [] and res["outputs"] == []
    assert res["note"] == "no flow series"


@pytest.mark.parametrize("text", ["1,2; 0,0,1", "a,b,c; 0,0,1", "1,2,3", "1,2,3; 0,0,0", "1,2,3; 0,0,nan"])
def test_invalid_flow_plane_is_a_config_error(tmp_path, text):
    with pytest.raises(ConfigError):
        fl.flow([], tmp_path, flow_plane=text, device="cpu")


def test_parse_plane():
    assert fl.parse_plane(None) is None and fl.parse_plane("  ") is None
    point, normal = fl.parse_plane("1.5, -2, 30; 0, 0, -2")
    assert point.tolist() == [1.5, -2.0, 30.0] and normal.tolist() == [0.0, 0.0, -1.0]


# --------------------------------------------------------------------------- units
def test_phase_to_velocity_vendor_mappings():
    stored = np.array([0, 1024, 2048, 4095], np.uint16)
    siemens = Dataset()
    siemens.BitsStored, siemens.PixelRepresentation = 12, 0
    siemens.RescaleSlope, siemens.RescaleIntercept = 2, -4096  # cancels out of the VENC mapping
    assert np.allclose(fl.phase_to_velocity(stored, siemens, 150.0), (2.0 * stored - 4096) / 4096 * 150.0)
    ge = Dataset()
    ge.BitsStored, ge.PixelRepresentation = 16, 1
    assert np.allclose(fl.phase_to_velocity(np.array([-32768, 0, 16384], np.int16), ge, 200.0), [-200, 0, 100])
    philips = Dataset()
    philips.BitsStored, philips.PixelRepresentation = 12, 0
    units = Dataset()
    units.CodeValue, units.CodingSchemeDesignator = "cm/s", "UCUM"
    rw = Dataset()
    rw.RealWorldValueSlope, rw.RealWorldValueIntercept = 0.1, -204.8
    rw.MeasurementUnitsCodeSequence = Sequence([units])
    philips.RealWorldValueMappingSequence = Sequence([rw])
    assert np.allclose(fl.phase_to_velocity(stored, philips, 150.0), stored * 0.1 - 204.8)


def test_unwrap_recovers_a_wrapped_waveform():
    import torch

    t = np.arange(20)
    true = (170.0 * np.sin(np.pi * t / 8) ** 2 * (t < 8)
            - 30.0 * np.sin(np.pi * (t - 9) / 6) ** 2 * ((t >= 9) & (t < 15)))
    field = true[:, None, None] * np.array([[0.3, 0.9, 1.0], [0.8, 1.0, 0.9], [0.2, 0.7, 0.4]])[None]
    venc = 100.0
    wrapped = np.mod(field + venc, 2 * venc) - venc
    region = torch.ones((3, 3), dtype=torch.bool)
    out = fl.unwrap(torch.as_tensor(wrapped, dtype=torch.float32), venc, anchor=17, region=region).numpy()
    assert np.allclose(out, field, atol=1e-3)
    assert not np.allclose(wrapped, field)
