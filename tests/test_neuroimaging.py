"""Neuro sessions: MNI152-based T1 + PET synthesis and the chain's T1 steps (N4, brain extraction), checked against
the planted truth."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from imaging_tasks.errors import BadInput
from imaging_tasks.neuroimaging.structural import to_sitk
from imaging_tasks.neuroimaging import synth

SEED = 5


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("neuro")
    record = json.loads(synth.synthesize(out, 1, SEED)[0].read_text())
    return out / "neuroimaging" / "study-000", record


def structural_steps(files, out):
    """The chain's first two steps (``imaging-tasks process neuroimaging --step ...``): outputs in
    ``out/n4_bias/`` and ``out/brain_extraction/``; their metrics and outputs merged."""
    from imaging_tasks.specialties import run_steps

    merged = {"metrics": [], "outputs": []}
    for step in ("n4_bias", "brain_extraction"):
        result = run_steps("neuroimaging", files, out, device="cpu", step=step)
        merged["metrics"] += result["metrics"]
        merged["outputs"] += result["outputs"]
    return merged


@pytest.fixture(scope="module")
def processed(session, tmp_path_factory):
    folder, _record = session
    out = tmp_path_factory.mktemp("neuro-out")
    result = structural_steps(sorted(folder.rglob("*.dcm")), out)
    return out, result, {m["name"]: m["value"] for m in result["metrics"]}


def _series(folder):
    from imaging_tasks.dicom_io import load_series

    return to_sitk(load_series(sorted(folder.glob("*.dcm"))))


def test_session_layout_and_headers(session):
    import pydicom

    folder, record = session
    t1 = [pydicom.dcmread(p) for p in sorted((folder / "t1").glob("*.dcm"))]
    pet = [pydicom.dcmread(p) for p in sorted((folder / "pet").glob("*.dcm"))]
    assert len(t1) == record["truth"]["mr"]["n_slices"] and len(pet) == record["truth"]["pet"]["n_slices"]
    assert (t1[0].Modality, t1[0].SOPClassUID) == ("MR", "1.2.840.10008.5.1.4.1.1.4")
    assert (pet[0].Modality, pet[0].SOPClassUID, pet[0].Units) == ("PT", "1.2.840.10008.5.1.4.1.1.128", "BQML")
    assert {d.StudyInstanceUID for d in t1 + pet} == {record["study_uid"]}
    assert {str(d.PatientID) for d in t1 + pet} == {str(t1[0].PatientID)}
    # geometry: evenly stacked along the orientation normal, at the slice thickness
    for series, mm in ((t1, 2.0), (pet, 4.0)):
        iop = np.array(series[0].ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        steps = np.diff([np.dot(normal, np.array(d.ImagePositionPatient, float)) for d in series])
        assert np.allclose(steps, mm, atol=1e-3)
        assert [float(v) for v in series[0].PixelSpacing] == [mm, mm] and float(series[0].SliceThickness) == mm
    assert len({d.RescaleSlope for d in pet}) > 1  # per-slice PET scaling, as scanners write it
    assert str(t1[0].PatientName) in record["phi"] and record["study_uid"] in record["phi"]
    # the subject is the template scaled by the planted head size: the truth volume follows it
    truth = record["truth"]
    scale = np.prod(truth["mr"]["pose"]["scale"])
    assert truth["brain_volume_ml"] == pytest.approx(truth["brain_volume_template_ml"] * scale, rel=0.01)
    assert truth["pet"]["pose"]["scale"] == truth["mr"]["pose"]["scale"]


def test_pet_carries_the_planted_regional_uptake(session):
    """PET read back through RescaleSlope and its own pose shows the planted regional contrast.

    Partial volume (6 mm PSF, 4 mm voxels) pulls grey matter down and white matter up; here the cores read
    ~80 % (cerebral grey), ~87 % (cerebellar grey) and ~108 % (white) of the truth, the grey/cerebellum ratio
    ~0.92 of it.
    A wrong slope, grid or pose collapses these contrasts.
    """
    import SimpleITK as sitk

    folder, record = session
    truth = record["truth"]
    pet = _series(folder / "pet")
    act = sitk.GetArrayFromImage(pet)
    gm, cb, wm = (synth.truth_on_grid(truth, pet, k, "pet") for k in ("gm", "cereb", "wm"))
    up = truth["pet"]["uptake_bqml"]
    cerebrum, cerebellum, white = act[(gm > 0.8) & (cb < 0.5)], act[(gm > 0.8) & (cb > 0.5)], act[wm > 0.95]
    assert 0.65 < cerebrum.mean() / up["grey_matter"] < 1.0
    assert 0.75 < cerebellum.mean() / up["cerebellum"] < 1.0
    assert 1.0 < white.mean() / up["white_matter"] < 1.3
    assert cerebrum.mean() / cerebellum.mean() == pytest.approx(truth["pet"]["suvr_grey_matter"], rel=0.2)
    assert truth["pet"]["reference_region"] == "cerebellum"


def _parenchyma_truth(truth: dict, reference) -> tuple[float, np.ndarray]:
    """Planted parenchyma (GM + WM partial-volume sum, ml) and its fractions on the T1 grid."""
    fraction = synth.truth_on_grid(truth, reference, "gm") + synth.truth_on_grid(truth, reference, "wm")
    ml = truth.get("parenchyma_volume_ml") or float(fraction.sum()) * float(np.prod(reference.GetSpacing())) / 1000
    return ml, fraction


def test_brain_and_intracranial_volume_match_truth(session, processed):
    """``brain_volume_ml`` is the parenchyma (GM + WM), ``intracranial_volume_ml`` brain + CSF to the skull.

    Against the planted GM + WM partial-volume sum and intracranial space; the brain mask against GM + WM >=
    0.5 (Dice).  Held to 3 %, as on the independent phantoms (tests/test_brain_extraction_phantoms.py).  (With
    the generator's CSF envelope once darker than its sulci, CSF_T1 = 0.12, sulcal CSF read as partly
    parenchyma: +3.7 to +4.2 %; with one CSF brightness, +0.6 %.)  Counting the CSF envelope as brain
    (issue 20) reads +27 %, the MNI brain mask (ventricles and sulcal CSF in) +13 %.  The tissue volumes add
    up to the intracranial volume.
    """
    import SimpleITK as sitk

    _folder, record = session
    out, _result, m = processed
    truth = record["truth"]
    mask_img = sitk.ReadImage(str(out / "brain_extraction" / "brain_mask.nii.gz"))
    parenchyma_ml, parenchyma = _parenchyma_truth(truth, mask_img)
    assert m["brain_volume_ml"] == pytest.approx(parenchyma_ml, rel=0.03)
    assert m["intracranial_volume_ml"] == pytest.approx(truth["intracranial_volume_ml"], rel=0.03)
    assert m["brain_volume_ml"] < 0.9 * m["intracranial_volume_ml"]
    assert m["grey_matter_volume_ml"] + m["white_matter_volume_ml"] == pytest.approx(m["brain_volume_ml"])
    assert m["brain_volume_ml"] + m["csf_volume_ml"] == pytest.approx(m["intracranial_volume_ml"], rel=1e-4)
    mask = sitk.GetArrayFromImage(mask_img) > 0
    true = parenchyma >= 0.5
    assert 2 * (mask & true).sum() / (mask.sum() + true.sum()) >= 0.95


def test_n4_recovers_the_planted_bias_field(session, processed):
    """The estimated field matches the planted one inside the brain; what N4 leaves is about half of it.

    Measured over seeds: correlation 0.87-0.98, residual log-field spread 0.41-0.52 of the planted one
    (lower correlation when the planted field is weak and anatomy is a larger share of what N4 sees; a third,
    finer N4 level that soaks up anatomy drops it to 0.6-0.9).  The white-matter CV metric is mostly the MNI
    template's own white-matter variation (~5.6 %), so it drops clearly only when the field is strong in white
    matter; this seed gives 6.0 % -> 5.7 %.
    """
    import SimpleITK as sitk

    _folder, record = session
    out, _result, m = processed
    field = sitk.ReadImage(str(out / "n4_bias" / "bias_field.nii.gz"))
    mask_img = sitk.ReadImage(str(out / "brain_extraction" / "brain_mask.nii.gz"))
    inside = sitk.GetArrayFromImage(sitk.Resample(mask_img, field, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
    estimated = np.log(sitk.GetArrayFromImage(field))[inside]
    planted = np.log(synth.bias_field_at(synth.image_points_mm(field), record["truth"]["bias_field"]))
    planted = planted.reshape(inside.shape)[inside]
    assert np.corrcoef(estimated, planted)[0, 1] > 0.8
    assert (planted - estimated).std() < 0.6 * planted.std()
    assert m["bias_field_cv_after"] < m["bias_field_cv_before"]


def test_outputs_and_no_phi(session, processed):
    from PIL import Image

    _folder, record = session
    out, result, m = processed
    assert {"n4_bias/t1_n4.nii.gz", "n4_bias/bias_field.nii.gz", "brain_extraction/brain_mask.nii.gz",
            "brain_extraction/intracranial_mask.nii.gz", "brain_extraction/gm_fraction.nii.gz",
            "brain_extraction/wm_fraction.nii.gz", "brain_extraction/csf_fraction.nii.gz",
            "brain_extraction/qc_brain.png"} <= set(result["outputs"])
    assert all((out / name).is_file() for name in result["outputs"])
    assert Image.open(out / "brain_extraction" / "qc_brain.png").size[0] > 300
    assert m["n_pet_series"] == 1 and m["n_mr_series"] == 1
    json.dumps(result)
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    assert not any(v.encode() in b for v in record["phi"] if len(v) >= 6 for b in blobs)


def test_pet_only_or_localizer_only_session_is_bad_input(session, tmp_path):
    folder, _ = session
    with pytest.raises(BadInput) as exc:
        structural_steps(sorted((folder / "pet").glob("*.dcm")), tmp_path)
    assert exc.value.reason == "no_mri"
    with pytest.raises(BadInput) as exc:
        structural_steps(sorted((folder / "t1").glob("*.dcm"))[:5], tmp_path)
    assert exc.value.reason == "not_volumetric"


def test_mr_only_option_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth.synthesize(a, 1, 9, with_pet=False)
    synth.synthesize(b, 1, 9, with_pet=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert not (a / "neuroimaging" / "study-000" / "pet").exists()
    assert json.loads((a / "_truth" / "neuroimaging" / "study-000.json").read_text())["truth"]["pet"] is None
    assert all(hashlib.sha256((a / f).read_bytes()).digest() == hashlib.sha256((b / f).read_bytes()).digest()
               for f in files)
    with pytest.raises(ValueError):
        synth.synthesize(tmp_path / "c", 2, 9, with_pet=[True])
