"""Neuro synthetic truth: anatomy warp, regional PET SUVR, 4-D PET, SUV facts and the NIfTI-upload layout.

One subject (same seed) is written as DICOM and as a NIfTI upload with three PET frames; the truth must be
self-consistent and must be what the written files show, so that pipeline tests built on it mean something.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from imaging_tasks.neuroimaging import synth

SEED = 11
FRAMES = 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same subject as a DICOM session and as a NIfTI upload, both with a 3-frame PET."""
    a, b = tmp_path_factory.mktemp("neuro-dicom"), tmp_path_factory.mktemp("neuro-nifti")
    rec_d = json.loads(synth.synthesize(a, 1, SEED, pet_frames=FRAMES)[0].read_text())
    rec_n = json.loads(synth.synthesize(b, 1, SEED, pet_frames=FRAMES, layout="nifti")[0].read_text())
    return (a / rec_d["session_folder"], rec_d), (b / rec_n["session_folder"], rec_n)


def _dicom_series(files):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    return reader.Execute()


def _pet_headers(folder):
    import pydicom

    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]


def test_same_subject_in_both_layouts(pair):
    (_fd, rd), (fn, rn) = pair
    assert (rd["layout"], rn["layout"]) == ("dicom", "nifti")
    assert rd["session_folder"] == "neuroimaging/study-000"
    td, tn = rd["truth"], rn["truth"]
    for key in ("pose", "warp"):
        assert td["mr"][key] == tn["mr"][key]
    assert td["pet"]["frames"] == tn["pet"]["frames"] and td["pet"]["suvr_true"] == tn["pet"]["suvr_true"]
    assert td["brain_volume_ml"] == tn["brain_volume_ml"]
    assert tn["mr"]["series_uid"] is None and td["mr"]["series_uid"]
    assert sorted(p.name for p in fn.iterdir()) == ["mri.nii.gz", "pet.json", "pet.nii.gz"]


def test_warp_inverse_round_trips_and_is_not_trivial(pair):
    (_f, rec), _ = pair
    truth = rec["truth"]
    warp = truth["mr"]["warp"]
    assert 3 <= len(warp["vectors_mm"]) <= 6 and warp["lipschitz_bound"] < 1
    assert warp["brain_displacement_mm"]["max"] > 1.5
    pts = np.random.default_rng(0).uniform(-80, 80, (2000, 3)) + np.array(truth["mr"]["pose"]["center_mm"])
    for series, frame in (("mr", 0), ("pet", 0), ("pet", 2)):
        back = synth.template_to_scanner(truth, synth.scanner_to_template(truth, pts, series, frame), series, frame)
        assert np.abs(back - pts).max() < 0.01
        again = synth.scanner_to_template(truth, synth.template_to_scanner(truth, pts, series, frame), series, frame)
        assert np.abs(again - pts).max() < 0.01
    # the warp is applied after the pose, in template space: removing it leaves exactly the affine pose
    affine_only = copy.deepcopy(truth)
    affine_only["mr"]["warp"]["vectors_mm"] = []
    q_aff = synth.scanner_to_template(affine_only, pts)
    assert np.allclose(synth.scanner_to_template(truth, pts) - q_aff, synth.warp_displacement(q_aff, warp))
    # single point in, single point out; T1 -> PET truth is the warp-free pose composition
    assert synth.scanner_to_template(truth, pts[0]).shape == (3,)
    p_pet = synth.mr_to_pet_points(truth, pts)
    assert np.allclose(synth.scanner_to_template(truth, p_pet, "pet"), synth.scanner_to_template(truth, pts), atol=1e-6)


def test_mr_shows_the_warped_anatomy(pair):
    """The written T1 (bias removed) matches the template through pose + warp, clearly better than pose alone."""
    _, (folder, rec) = pair
    truth = rec["truth"]
    mr = sitk.ReadImage(str(folder / "mri.nii.gz"))
    arr = sitk.GetArrayFromImage(mr).astype(float)
    arr /= synth.bias_field_at(synth.image_points_mm(mr), truth["bias_field"]).reshape(arr.shape)
    brain = synth.truth_on_grid(truth, mr, "brain") > 0.5
    affine_only = copy.deepcopy(truth)
    affine_only["mr"]["warp"]["vectors_mm"] = []
    err = {name: np.abs(arr - synth.truth_on_grid(t, mr, "t1") * truth["mr"]["intensity_scale"])[brain].mean()
           for name, t in (("warp", truth), ("affine", affine_only))}
    assert err["warp"] < 0.8 * err["affine"]  # measured 16 vs 26 (noise alone reads ~16)


def test_tissue_volumes(pair):
    _, (folder, rec) = pair
    t = rec["truth"]
    assert t["parenchyma_volume_ml"] == pytest.approx(t["grey_matter_volume_ml"] + t["white_matter_volume_ml"],
                                                      abs=0.01)
    # parenchyma excludes the ventricles the MNI brain mask holds; GM + WM + CSF fill the intracranial space
    assert 0.8 < t["parenchyma_volume_ml"] / t["brain_volume_ml"] < 0.95
    total = t["grey_matter_volume_ml"] + t["white_matter_volume_ml"] + t["csf_volume_ml"]
    assert total == pytest.approx(t["intracranial_volume_ml"], rel=0.01)
    mr = sitk.ReadImage(str(folder / "mri.nii.gz"))
    gm = synth.truth_on_grid(t, mr, "gm")
    assert gm.sum() * np.prod(mr.GetSpacing()) / 1000 == pytest.approx(t["grey_matter_volume_ml"], rel=1e-4)


def test_dicom_and_nifti_geometry_and_values_agree(pair):
    import nibabel as nib

    (fd, rd), (fn, rn) = pair
    mr_d = _dicom_series(sorted((fd / "t1").glob("*.dcm")))
    mr_n = sitk.ReadImage(str(fn / "mri.nii.gz"))
    for a, b in ((mr_d, mr_n),):
        assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
        assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    assert mr_n.GetSize()[2] == rn["truth"]["mr"]["n_slices"]
    assert np.array_equal(sitk.GetArrayFromImage(mr_d), sitk.GetArrayFromImage(mr_n))
    # nibabel sees the same grid in RAS: LPS -> RAS flips x and y
    nii = nib.load(str(fn / "mri.nii.gz"))
    d = np.array(mr_n.GetDirection()).reshape(3, 3) * np.array(mr_n.GetSpacing())
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = d, mr_n.GetOrigin()
    assert np.allclose(nii.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-3)
    assert nii.header["sform_code"] > 0 and nii.header["qform_code"] > 0
    # PET: 4-D NIfTI, one 3-D frame per DICOM frame group, same grid and values (within the int16 scaling)
    pet_n = sitk.ReadImage(str(fn / "pet.nii.gz"))
    assert pet_n.GetDimension() == 4 and pet_n.GetSize()[3] == FRAMES
    arr_n = sitk.GetArrayFromImage(pet_n)
    headers = _pet_headers(fd / "pet")
    n_slices = int(headers[0].NumberOfSlices)
    files = sorted((fd / "pet").glob("*.dcm"))
    for f in range(FRAMES):
        frame_files = [p for p, h in zip(files, headers) if (int(h.ImageIndex) - 1) // n_slices == f]
        img = _dicom_series(sorted(frame_files, key=lambda p: int(p.stem)))
        assert np.allclose(img.GetOrigin(), pet_n.GetOrigin()[:3], atol=1e-3)
        assert np.allclose(img.GetSpacing(), pet_n.GetSpacing()[:3])
        diff = np.abs(sitk.GetArrayFromImage(img) - arr_n[f])
        assert diff.max() <= arr_n[f].max() / 32000 + 1e-3


def test_4d_dicom_frames_are_grouped_by_their_headers(pair):
    (fd, rd), _ = pair
    frames = rd["truth"]["pet"]["frames"]
    headers = _pet_headers(fd / "pet")
    n_slices = int(headers[0].NumberOfSlices)
    assert n_slices == rd["truth"]["pet"]["n_slices"] and len(headers) == FRAMES * n_slices
    assert {int(h.NumberOfTimeSlices) for h in headers} == {FRAMES}
    assert {h.SeriesType[0] for h in headers} == {"DYNAMIC"} and len({h.SeriesInstanceUID for h in headers}) == 1
    assert sorted(int(h.ImageIndex) for h in headers) == list(range(1, FRAMES * n_slices + 1))
    groups = {}
    for h in headers:
        assert int(h.InstanceNumber) == int(h.ImageIndex)
        groups.setdefault((int(h.ImageIndex) - 1) // n_slices, []).append(h)
    positions = None
    for f, group in sorted(groups.items()):
        assert len(group) == n_slices
        pos = sorted(tuple(float(v) for v in h.ImagePositionPatient) for h in group)
        assert len(set(pos)) == n_slices and (positions is None or pos == positions)
        positions = pos
        start, dur = frames[f]["start_s"], frames[f]["duration_s"]
        assert {float(h.FrameReferenceTime) for h in group} == {(start + dur / 2) * 1000}
        assert {int(h.ActualFrameDuration) for h in group} == {int(dur * 1000)}
        t0 = group[0].SeriesTime
        clock = [int(t[:2]) * 3600 + int(t[2:4]) * 60 + int(t[4:6]) for t in (t0, group[0].AcquisitionTime)]
        assert clock[1] - clock[0] == start
    assert [f["start_s"] for f in frames] == [0.0, 300.0, 600.0]


def test_frames_carry_the_planted_motion(pair):
    """Frame 0 moved by the truth's frame transform matches frame f: residual about half the unmoved one."""
    _, (fn, rn) = pair
    truth = rn["truth"]
    pet = sitk.ReadImage(str(fn / "pet.nii.gz"))
    size = list(pet.GetSize()[:3]) + [0]
    frames = [sitk.Extract(pet, size, [0, 0, 0, f]) for f in range(FRAMES)]
    assert truth["pet"]["frames"][0]["rotation_deg"] == [0.0, 0.0, 0.0]
    for f in range(1, FRAMES):
        moved = sitk.Resample(frames[0], frames[f], synth.frame_transform(truth, f), sitk.sitkLinear, 0.0)
        target = sitk.GetArrayFromImage(frames[f])
        rms_truth = np.sqrt(((target - sitk.GetArrayFromImage(moved)) ** 2).mean())
        rms_still = np.sqrt(((target - sitk.GetArrayFromImage(frames[0])) ** 2).mean())
        assert rms_truth < 0.7 * rms_still  # measured 0.48-0.49
        # and the truth's own frame-f mapping puts grey matter where frame f is hot
        gm = synth.truth_on_grid(truth, frames[f], "gm", "pet", f)
        assert np.corrcoef(gm.ravel(), target.ravel())[0, 1] > np.corrcoef(
            synth.truth_on_grid(truth, frames[f], "gm", "pet", 0).ravel(), target.ravel())[0, 1]


def test_regional_suvr_truth_is_what_the_pet_shows(pair):
    """ROI SUVR on the written PET with the true masks reproduces expected_suvr (the partial-volume truth).

    Measured within 1.5 % per region over seeds (4 mm resampling and noise); the planted suvr_true differs by
    2-25 % (partial volume), so a region left at the grey-matter default or a missing PSF fails.
    """
    _, (fn, rn) = pair
    truth = rn["truth"]
    pet_t = truth["pet"]
    assert set(pet_t["suvr_true"]) == set(synth.PET_REGIONS) | {"other_grey_matter", "white_matter",
                                                                 "cerebellar_grey_matter"}
    assert pet_t["suvr_true"]["cerebellar_grey_matter"] == 1.0
    assert all(1.0 <= pet_t["suvr_true"][r] <= 2.5 for r in synth.PET_REGIONS)
    assert pet_t["expected_suvr"] == synth.expected_suvr(truth)  # everything needed is in the truth record
    for r, ratio in pet_t["partial_volume_ratio"].items():
        assert ratio == pytest.approx(pet_t["expected_suvr"][r] / pet_t["suvr_true"][r], rel=1e-5)
    # before the PSF, grey matter in each region carries exactly its planted SUVR x the reference uptake
    up = pet_t["uptake_bqml"]
    tissue = {k: sitk.GetArrayFromImage(synth.head_phantom()["images"][k]) for k in ("gm", "wm", "csf")}
    sharp = sitk.GetArrayFromImage(synth.pet_activity_template(truth, blurred=False))
    grey_act = (sharp - tissue["wm"] * up["white_matter"] - tissue["csf"] * up["csf"]) / np.maximum(tissue["gm"], 1e-6)
    for name, mask in synth.pet_region_masks().items():
        core = (sitk.GetArrayFromImage(mask) > 0) & (tissue["gm"] > 0.3)
        assert np.allclose(grey_act[core], pet_t["suvr_true"][name] * up["cerebellum"], rtol=1e-3)
    pet = sitk.ReadImage(str(fn / "pet.nii.gz"))
    frame0 = sitk.Extract(pet, list(pet.GetSize()[:3]) + [0], [0, 0, 0, 0])
    act = sitk.GetArrayFromImage(frame0)
    gm = synth.truth_on_grid(truth, frame0, "gm", "pet") >= 0.5
    ref = act[gm & (synth.truth_on_grid(truth, frame0, "cereb", "pet") > 0.5)].mean()
    for name in synth.PET_REGIONS:
        region = gm & (synth.truth_on_grid(truth, frame0, name, "pet") > 0.5)
        assert region.sum() > 100
        assert act[region].mean() / ref == pytest.approx(pet_t["expected_suvr"][name], rel=0.03)
        assert 0.7 < pet_t["partial_volume_ratio"][name] < 1.0  # measured 0.75-0.98 over seeds


def test_suv_factor_follows_from_dicom_headers_and_sidecar(pair):
    (fd, rd), (fn, rn) = pair
    h = _pet_headers(fd / "pet")[0]
    rad = h.RadiopharmaceuticalInformationSequence[0]
    assert h.DecayCorrection == "START"

    def secs(t):
        return int(t[:2]) * 3600 + int(t[2:4]) * 60 + int(t[4:6])

    elapsed = secs(h.SeriesTime) - secs(rad.RadiopharmaceuticalStartTime)
    dose = float(rad.RadionuclideTotalDose) * 2 ** (-elapsed / float(rad.RadionuclideHalfLife))
    assert float(h.PatientWeight) * 1000 / dose == pytest.approx(rd["truth"]["pet"]["suv_factor"], rel=1e-6)
    side = json.loads((fn / "pet.json").read_text())
    assert side["Units"] == "Bq/mL" and side["InjectedRadioactivityUnits"] == "MBq"
    dose = side["InjectedRadioactivity"] * 1e6 * 2 ** (side["InjectionStart"] / side["RadionuclideHalfLife"])
    assert side["BodyWeight"] * 1000 / dose == pytest.approx(rn["truth"]["pet"]["suv_factor"], rel=1e-6)
    assert side["FrameTimesStart"] == [f["start_s"] for f in rn["truth"]["pet"]["frames"]]
    assert side["FrameDuration"] == [300.0] * FRAMES


def test_nifti_upload_really_carries_the_planted_phi(pair):
    """So that an audit finding none after de-identification means something."""
    import nibabel as nib

    _, (fn, rn) = pair
    phi = set(rn["phi"])
    patient_folder, session_folder = fn.parent.name, fn.name
    assert {patient_folder, session_folder} <= phi
    mri = gzip.decompress((fn / "mri.nii.gz").read_bytes())
    side = json.loads((fn / "pet.json").read_text())
    name = side["PatientName"]
    assert name in phi and side["PatientID"] == patient_folder and side["AcquisitionDateTime"] in phi
    assert side["PatientBirthDate"] in phi
    assert mri.count(name.encode()) >= 2  # descrip and the comment extension
    hdr = nib.load(str(fn / "mri.nii.gz")).header
    assert name in hdr["descrip"].tobytes().decode()
    assert any(e.get_code() == 6 and name.encode() in e.get_content() for e in hdr.extensions)
    assert name.encode() in gzip.decompress((fn / "pet.nii.gz").read_bytes())[:348]


def test_per_study_options_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        synth.synthesize(out, 2, 3, with_pet=False, layout=["nifti", "dicom"], warp_mm=[4.0, 0.0])
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all(hashlib.sha256((a / f).read_bytes()).digest() == hashlib.sha256((b / f).read_bytes()).digest()
               for f in files)
    recs = [json.loads((a / "_truth" / "neuroimaging" / f"study-00{i}.json").read_text()) for i in range(2)]
    assert [r["layout"] for r in recs] == ["nifti", "dicom"]
    assert (a / recs[0]["session_folder"] / "mri.nii.gz").is_file()
    assert not (a / recs[0]["session_folder"] / "pet.nii.gz").exists()
    assert recs[1]["truth"]["mr"]["warp"]["vectors_mm"] == [] and recs[0]["truth"]["mr"]["warp"]["vectors_mm"]
    with pytest.raises(ValueError):
        synth.synthesize(tmp_path / "c", 2, 3, layout=["nifti"])
    with pytest.raises(ValueError):
        synth.synthesize(tmp_path / "d", 1, 3, layout="analyze")
