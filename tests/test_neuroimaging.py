"""Neuro session synthesis and preprocessing against the known bias field and brain region."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from imaging_tasks.errors import BadInput
from imaging_tasks.neuro import n4_correct, process_study, to_sitk
from imaging_tasks.synth.neuroimaging import bias_field, synthesize


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("neuro")
    record = json.loads(synthesize(out, 1, 5)[0].read_text())
    return out / "neuroimaging" / "study-000", record


def test_series_headers_carry_geometry_and_phi(session):
    import pydicom

    folder, record = session
    t1 = [pydicom.dcmread(p) for p in sorted((folder / "t1").glob("*.dcm"))[:2]]
    pet = pydicom.dcmread(sorted((folder / "pet").glob("*.dcm"))[0])
    assert t1[0].Modality == "MR" and pet.Modality == "PT" and pet.Units == "BQML"
    assert t1[0].StudyInstanceUID == pet.StudyInstanceUID == record["study_uid"]
    assert float(t1[1].ImagePositionPatient[2]) - float(t1[0].ImagePositionPatient[2]) == pytest.approx(2.0)
    assert str(t1[0].PatientName) in record["phi"]


def test_brain_volume_matches_truth(session, tmp_path):
    folder, record = session
    result = process_study(sorted(folder.rglob("*.dcm")), tmp_path, device="cpu")
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    # the phantom's brain region is known voxel for voxel; skull and scalp must not be counted (they add ~40 %)
    assert metrics["brain_volume_ml"] == pytest.approx(record["truth"]["brain_volume_ml"], rel=0.05)
    assert metrics["n_pet_series"] == 1 and metrics["n_mr_series"] == 1
    assert metrics["bias_cv_after"] < metrics["bias_cv_before"]
    assert {"t1_n4.nii.gz", "brain_mask.nii.gz", "qc_brain.png"} <= {p.name for p in tmp_path.iterdir()}


def test_n4_recovers_the_planted_bias_field(session):
    import SimpleITK as sitk

    from imaging_tasks.dicom_io import load_series

    folder, record = session
    volume = load_series(sorted((folder / "t1").glob("*.dcm")))
    _corrected, log_bias = n4_correct(to_sitk(volume))
    estimated = sitk.GetArrayFromImage(log_bias)
    true = np.log(bias_field(tuple(record["truth"]["shape_zyx"]), record["truth"]["bias_coeffs"]))
    head = volume.array > 200
    assert np.corrcoef(estimated[head], true[head])[0, 1] > 0.9


def test_pet_only_session_is_bad_input(session, tmp_path):
    folder, _ = session
    with pytest.raises(BadInput) as exc:
        process_study(sorted((folder / "pet").glob("*.dcm")), tmp_path)
    assert exc.value.reason == "no_mri"


def test_mr_only_option_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize(a, 1, 9, with_pet=False)
    synthesize(b, 1, 9, with_pet=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert not any("pet" in str(f) for f in files)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert all(digest(a / f) == digest(b / f) for f in files)
