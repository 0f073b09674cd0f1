"""Neuro session inputs: NIfTI uploads indexed into pseudonymous sessions, de-identified end to end (NIfTI header
text, extensions and sidecars; PHI audit over them and the raw folder names), the session loader giving one
geometry from DICOM and NIfTI (oblique grids, 4-D PET), dcm2niix and SimpleITK agreeing with our DICOM loader to
1e-3 mm, and every bad input refused with its reason.

Phantoms are small (2-4 mm voxels, a few 10^4 voxels) and built here: an ellipsoid head with an off-centre
marker, so that a flipped or transposed axis changes the voxel values a test compares.
"""
from __future__ import annotations

import datetime as dt
import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from imaging_tasks import storage
from imaging_tasks.deid.pseudonym import pseudo_id
from imaging_tasks.errors import BadInput
from imaging_tasks.neuroimaging.session import load_session, read_nifti
from imaging_tasks.synth import phi

KEY = b"test-key-for-neuro-inputs-0123456789"
UTC = dt.timezone.utc
PATIENT, SESSION = "Okafor_Adaeze", "ses-20240305"  # raw folder names: PHI
PLANTED = ["Okafor^Adaeze", "Okafor", "Adaeze", "MRN48213377", "ACC7718203", "19700412", "2024-03-05T10:11:12",
           "St. Brigid Memorial", PATIENT, SESSION]
SOP = {"MR": "1.2.840.10008.5.1.4.1.1.4", "PT": "1.2.840.10008.5.1.4.1.1.128"}
PET_FACTS = {"dose_bq": 185.0e6, "half_life_s": 6586.2, "injection_to_scan_s": 2700.0, "weight_kg": 72.5}


# --------------------------------------------------------------------------- phantoms
def _rotation(deg) -> np.ndarray:
    tr = sitk.Euler3DTransform()
    tr.SetRotation(*np.deg2rad(deg))
    return np.array(tr.GetMatrix()).reshape(3, 3)


def _image(arr_zyx: np.ndarray, spacing, direction: np.ndarray, origin) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx.astype(np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(direction.ravel().tolist()))
    img.SetOrigin(tuple(float(v) for v in origin))
    return img


def _head(size_xyz, spacing, direction, centre, value, marker) -> sitk.Image:
    """An ellipsoid 'head' (radii 70/85/65 mm) with a bright off-centre marker, centred on ``centre`` (LPS)."""
    size = np.array(size_xyz)
    origin = np.asarray(centre) - direction @ ((size - 1) / 2 * np.asarray(spacing))
    img = _image(np.zeros(size[::-1]), spacing, direction, origin)
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), -1).reshape(-1, 3)
    pts = (idx * spacing) @ direction.T + origin - centre
    inside = ((pts / [70.0, 85.0, 65.0]) ** 2).sum(1) <= 1
    mark = np.linalg.norm(pts - [25.0, -30.0, 20.0], axis=1) <= 15
    vals = np.where(inside, value, 0.0) + np.where(mark, marker, 0.0) + 0.01 * value * (pts[:, 0] > 0) * inside
    arr = vals.reshape(*size).transpose(2, 1, 0)
    out = sitk.GetImageFromArray(np.rint(arr).astype(np.float32))
    out.CopyInformation(img)
    return out


@pytest.fixture(scope="module")
def oblique():
    """A T1 on an oblique 2.5/2.2/2.0 mm grid and three PET frames on a 4 mm grid rotated otherwise."""
    centre = np.array([3.0, -12.0, 25.0])
    t1 = _head((72, 84, 70), (2.5, 2.2, 2.0), _rotation((12, -7, 20)), centre, 800.0, 400.0)
    pet = [_head((48, 52, 42), (4.0, 4.0, 4.0), _rotation((-5, 4, -9)), centre + 2.0, 9000.0 + 500 * k,
                 3000.0) for k in range(3)]
    return t1, pet


def _ras_affine(img: sitk.Image) -> np.ndarray:
    lps = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lps
    aff[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.array(img.GetOrigin())
    return aff


def _write_nifti(path: Path, frames: list[sitk.Image], *, dtype=np.float32, phi_text: bool = True,
                 slope: float | None = None) -> Path:
    """``frames`` as one (3-D or 4-D) NIfTI-1; ``slope``: stored as integers scaled by scl_slope."""
    import nibabel as nib

    data = np.stack([sitk.GetArrayFromImage(f).transpose(2, 1, 0) for f in frames], -1)
    data = data[..., 0] if len(frames) == 1 else data
    if slope is not None:
        data = np.rint(data / slope)
    img = nib.Nifti1Image(data.astype(dtype), _ras_affine(frames[0]))
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    img.header.set_xyzt_units("mm", "sec")
    if phi_text:
        img.header["descrip"] = b"Okafor^Adaeze MRN48213377"
        img.header["aux_file"] = b"ACC7718203"
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"PatientName=Okafor^Adaeze; Birth=19700412"))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _hhmmss(seconds: float) -> str:
    s = int(round(seconds)) % 86400
    return f"{s // 3600:02d}{s % 3600 // 60:02d}{s % 60:02d}"


def _write_dicom(folder: Path, frames: list[sitk.Image], modality: str, rng, study, *,
                 durations_s=(300.0, 300.0, 600.0)) -> list[Path]:
    """A single-frame DICOM series of the image(s): MR as uint16, PET as int16 with a RescaleSlope per slice and
    the PET timing/dose headers (several frames: a DYNAMIC series, ImageIndex over time slices)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    folder.mkdir(parents=True, exist_ok=True)
    series_uid, n = phi.new_uid(rng), frames[0].GetSize()[2]
    scan = int(study.study_time[:2]) * 3600 + int(study.study_time[2:4]) * 60 + int(study.study_time[4:6])
    paths, start = [], 0.0
    for t, img in enumerate(frames):
        arr = sitk.GetArrayFromImage(img)
        d, sp, size = np.array(img.GetDirection()).reshape(3, 3), img.GetSpacing(), img.GetSize()
        for k in range(n):
            ds = phi.dicom_dataset(study, modality=modality, sop_class_uid=SOP[modality], series_uid=series_uid,
                                   sop_uid=phi.new_uid(rng), series_number=3 if modality == "MR" else 5,
                                   instance_number=t * n + k + 1,
                                   series_description="T1w MPRAGE" if modality == "MR" else "PET Brain")
            ds.ImagePositionPatient = [f"{v:.10g}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))]
            ds.ImageOrientationPatient = [f"{v:.10g}" for v in (*d[:, 0], *d[:, 1])]
            ds.PixelSpacing = [f"{sp[1]:.10g}", f"{sp[0]:.10g}"]
            ds.SliceThickness = f"{sp[2]:.10g}"
            ds.Rows, ds.Columns = size[1], size[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            if modality == "MR":
                ds.PixelRepresentation = 0
                ds.PixelData = arr[k].astype("<u2").tobytes()
            else:
                slope = max(float(arr[k].max()), 1.0) / 32000.0
                ds.RescaleSlope, ds.RescaleIntercept, ds.PixelRepresentation = f"{slope:.8g}", "0", 1
                ds.PixelData = np.rint(arr[k] / float(ds.RescaleSlope)).astype("<i2").tobytes()
                ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["ATTN", "DECY"]
                ds.SeriesType = ["DYNAMIC" if len(frames) > 1 else "STATIC", "IMAGE"]
                ds.NumberOfSlices, ds.ImageIndex = n, t * n + k + 1
                if len(frames) > 1:
                    ds.NumberOfTimeSlices = len(frames)
                ds.FrameReferenceTime = f"{(start + durations_s[t] / 2) * 1000:.1f}"
                ds.ActualFrameDuration = int(durations_s[t] * 1000)
                ds.AcquisitionTime = _hhmmss(scan + start)
                ds.PatientWeight = f"{PET_FACTS['weight_kg']}"
                rad = Dataset()
                rad.RadiopharmaceuticalStartTime = _hhmmss(scan - PET_FACTS["injection_to_scan_s"])
                rad.RadionuclideTotalDose = f"{PET_FACTS['dose_bq']:.1f}"
                rad.RadionuclideHalfLife = f"{PET_FACTS['half_life_s']}"
                ds.RadiopharmaceuticalInformationSequence = Sequence([rad])
            path = folder / f"{t:02d}{k:04d}.dcm"
            phi.write_dicom(ds, str(path))
            paths.append(path)
        start += durations_s[t]
    return paths


def _pet_sidecar(n_frames: int, **extra) -> dict:
    durations = [300.0, 300.0, 600.0][:n_frames]
    return {"Units": "Bq/mL", "TracerName": "FDG", "TracerRadionuclide": "F18",
            "InjectedRadioactivity": PET_FACTS["dose_bq"] / 1e6, "InjectedRadioactivityUnits": "MBq",
            "TimeZero": "10:00:00", "ScanStart": 0, "InjectionStart": -PET_FACTS["injection_to_scan_s"],
            "FrameTimesStart": list(np.cumsum([0.0, *durations[:-1]])), "FrameDuration": durations,
            "ImageDecayCorrected": True, "ImageDecayCorrectionTime": 0, "BodyWeight": PET_FACTS["weight_kg"],
            **extra}


def _pet_as_loaded_from_dicom(frames: list[sitk.Image]) -> list[sitk.Image]:
    """The PET values the DICOM path stores (int16 x per-slice slope), so both sources hold the same numbers."""
    out = []
    for f in frames:
        arr = sitk.GetArrayFromImage(f)
        slopes = np.array([float(f"{max(float(s.max()), 1.0) / 32000.0:.8g}") for s in arr], dtype=np.float64)
        q = np.rint(arr / slopes[:, None, None]).astype(np.int16).astype(np.float32) * slopes[:, None, None]
        img = sitk.GetImageFromArray(q.astype(np.float32))
        img.CopyInformation(f)
        out.append(img)
    return out


def _corners(img: sitk.Image) -> np.ndarray:
    size = np.array(img.GetSize()) - 1
    return np.array([img.TransformIndexToPhysicalPoint(tuple(int(v) for v in size * np.array(c)))
                     for c in np.ndindex(2, 2, 2)])


def _same_corner_set(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance from each corner of ``a`` to the nearest corner of ``b`` (mm): a flipped or permuted
    voxel order still maps the same 8 corners."""
    dist = np.linalg.norm(a[:, None] - b[None], axis=2)
    assert sorted(dist.argmin(1).tolist()) == list(range(8))
    return float(dist.min(1).max())


def _assert_same_grid(a: sitk.Image, b: sitk.Image, tol_mm: float = 1e-3) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.abs(_corners(a) - _corners(b)).max() < tol_mm


# --------------------------------------------------------------------------- index
def _upload_tree(root: Path, oblique, *, pet: bool = True) -> Path:
    t1, frames = oblique
    folder = root / "neuroimaging" / PATIENT / SESSION
    _write_nifti(folder / "mri.nii.gz", [t1], dtype=np.int16)
    if pet:
        _write_nifti(folder / "pet.nii.gz", _pet_as_loaded_from_dicom(frames))
        sidecar = _pet_sidecar(3, PatientName="Okafor^Adaeze", PatientBirthDate="19700412",
                               AcquisitionDateTime="2024-03-05T10:11:12", InstitutionName="St. Brigid Memorial",
                               PatientID="MRN48213377")
        (folder / "pet.json").write_text(json.dumps(sidecar))
    return root / "neuroimaging"


def _index(landing: Path, specialty="neuroimaging", now=None, prefix=""):
    from imaging_tasks.index import index_objects

    bad = []
    root = landing / prefix if prefix else landing
    result = index_objects(storage.list_objects(root), specialty=specialty, key=KEY, now=now, prefix=prefix,
                           quarantine=lambda obj, exc: bad.append((obj.relpath, exc.reason, exc.message)) or {})
    return result, bad


def test_index_groups_nifti_uploads_into_pseudonymous_sessions(tmp_path, oblique):
    landing = _upload_tree(tmp_path, oblique)
    mr_only = landing / "Quintero_Pilar" / "baseline"
    _write_nifti(mr_only / "mri.nii", [oblique[0]], dtype=np.int16, phi_text=False)
    bad = {"Okafor_Adaeze/mri.nii.gz": "nifti_layout", "extra/Okafor_Adaeze/s1/mri.nii.gz": "nifti_layout",
           f"{PATIENT}/{SESSION}/flair.nii.gz": "nifti_unknown_name", f"{PATIENT}/{SESSION}/notes.json": "nifti_unknown_name",
           "Doe_John/s1/mri.nii.gz": "unreadable_nifti"}
    for rel, _reason in bad.items():
        (landing / rel).parent.mkdir(parents=True, exist_ok=True)
        (landing / rel).write_bytes((landing / PATIENT / SESSION / "mri.nii.gz").read_bytes())
    (landing / "Doe_John/s1/mri.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 40))
    # mri.nii beside mri.nii.gz: the first in listing order (mri.nii) is kept, the other refused
    (landing / f"{PATIENT}/{SESSION}/mri.nii").write_bytes(
        gzip.decompress((landing / PATIENT / SESSION / "mri.nii.gz").read_bytes()))
    bad[f"{PATIENT}/{SESSION}/mri.nii.gz"] = "duplicate_nifti"

    now = dt.datetime.now(UTC)
    result, quarantined = _index(landing, now=now)
    assert {rel: reason for rel, reason, _ in quarantined} == bad
    assert all("<patient>/<session>/" in msg for _rel, reason, msg in quarantined if reason.startswith("nifti_"))
    [entry] = result.studies  # the MR-only session waits for its PET
    assert entry.study == pseudo_id(KEY, f"{PATIENT}/{SESSION}", "study")
    assert entry.patient == pseudo_id(KEY, PATIENT, "patient")
    assert entry.modalities == {"MR": 1, "PT": 1} and len(entry.files) == 3
    assert result.waiting == [pseudo_id(KEY, "Quintero_Pilar/baseline", "study")]
    record = json.dumps(entry.summary("file:///lake/work/m.json"))
    for raw in (PATIENT, SESSION, "Okafor", "Quintero", "baseline"):
        assert raw not in record  # pseudonyms and counts only; raw names stay in the work manifest
    assert {f["upload"]["stem"] for f in entry.files} == {"mri", "pet"}

    later, _ = _index(landing, now=now + dt.timedelta(hours=7))  # MR alone once the wait has passed
    assert pseudo_id(KEY, "Quintero_Pilar/baseline", "study") in [e.study for e in later.studies]
    scoped, _ = _index(landing, now=now, prefix=PATIENT)  # a run limited to the patient folder: same study id
    assert [e.study for e in scoped.studies] == [entry.study]

    cardio = tmp_path / "cardio"
    _write_nifti(cardio / "a" / "b" / "mri.nii.gz", [oblique[0]], phi_text=False)
    _none, refused = _index(cardio, specialty="cardiovascular")
    assert [(r, why) for r, why, _ in refused] == [("a/b/mri.nii.gz", "not_dicom")]
    assert "neuroimaging" in refused[0][2] and "<patient>/<session>/" in refused[0][2]


# --------------------------------------------------------------------------- de-identification end to end
def _raw_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def test_nifti_session_deidentified_end_to_end(tmp_path, oblique):
    import nibabel as nib

    from imaging_tasks.deid.dicom import DeidOptions
    from imaging_tasks.lake import Lake
    from imaging_tasks.phi_audit import PHILeak
    from imaging_tasks.pipeline import audit_study, deidentify_study, fetch_instances, index_landing

    landing = _upload_tree(tmp_path / "landing", oblique)
    broken = landing / "Doe_Jane" / "visit1"  # MR fine, PET cut short: header reads, voxels do not
    _write_nifti(broken / "mri.nii.gz", [oblique[0]], dtype=np.int16, phi_text=False)
    pet = gzip.compress(_raw_bytes(landing / PATIENT / SESSION / "pet.nii.gz"))
    (broken / "pet.nii.gz").write_bytes(pet[: len(pet) // 2])
    lake = Lake(str(tmp_path / "lake"), "neuroimaging")
    summary = index_landing(landing, lake, key=KEY)
    studies = {s["study"]: s for s in summary["studies"]}
    study = studies[pseudo_id(KEY, f"{PATIENT}/{SESSION}", "study")]

    out = deidentify_study(study, lake, key=KEY, demo=True)
    assert out["status"] == "ok" and out["n_instances"] == 3
    dest = Path(out["anonymized"])
    assert sorted(p.name for p in dest.iterdir()) == ["_DEID.json", "mri.nii.gz", "pet.json", "pet.nii.gz"]
    for f in dest.iterdir():
        blob = _raw_bytes(f)
        for value in PLANTED:
            assert value.encode() not in blob, (f.name, value)
    src = nib.load(str(landing / PATIENT / SESSION / "pet.nii.gz"))
    dst = nib.load(str(dest / "pet.nii.gz"))
    assert np.array_equal(np.asanyarray(dst.dataobj), np.asanyarray(src.dataobj))  # voxels untouched
    assert np.allclose(dst.affine, src.affine) and len(dst.header.extensions) == 0
    sidecar = json.loads((dest / "pet.json").read_text())
    assert sidecar["Units"] == "Bq/mL" and sidecar["InjectionStart"] == -2700.0 and "TimeZero" not in sidecar
    assert "BodyWeight" not in sidecar  # patient characteristics only with the option
    deid = json.loads((dest / "_DEID.json").read_text())
    assert {i["series_uid"] for i in deid["instances"]} == {f"{study['study']}-mri", f"{study['study']}-pet"}
    assert {i["modality"] for i in deid["instances"]} == {"MR", "PT"}
    assert audit_study(out, lake)["values"] > 0  # the standalone audit passes, and had values to look for

    # the audit would catch a sidecar value or a folder name that survived
    for leaked, attribute in (('"Okafor^Adaeze"', "sidecar:PatientName"), (f'"{SESSION}"', "upload_session_folder")):
        (dest / "pet.json").write_text(json.dumps(sidecar)[:-1] + f', "x": {leaked}}}')
        with pytest.raises(PHILeak, match=attribute):
            audit_study(out, lake)
    (dest / "pet.json").write_text(json.dumps(sidecar))

    files = fetch_instances(deid["instances"], tmp_path / "fetched")
    assert sorted(f.name for f in files) == ["00000-mri.nii.gz", "00001-pet.nii.gz", "00002-pet.json"]
    session = load_session(files)
    assert session.source == "nifti" and len(session.pet_frames) == 3 and session.n_pet_series == 1
    facts = session.pet_facts
    assert facts["units"] == "BQML" and facts["weight_kg"] is None and facts["decay_correction"] == "START"
    assert facts["injected_dose_bq"] == pytest.approx(PET_FACTS["dose_bq"])
    assert facts["injection_to_scan_s"] == pytest.approx(PET_FACTS["injection_to_scan_s"])
    assert facts["frame_durations_s"] == [300.0, 300.0, 600.0] and facts["half_life_s"] == 6586.2

    # Retain Patient Characteristics keeps the weight (for SUV)
    again = deidentify_study(study, lake, key=KEY, demo=True, options=DeidOptions(retain_patient_characteristics=True))
    assert json.loads((Path(again["anonymized"]) / "pet.json").read_text())["BodyWeight"] == PET_FACTS["weight_kg"]

    # the cut PET is quarantined with its reason; the session's MR goes on
    other = studies[pseudo_id(KEY, "Doe_Jane/visit1", "study")]
    done = deidentify_study(other, lake, key=KEY, demo=True)
    assert done["n_instances"] == 1 and done["n_quarantined"] == 1
    reasons = [r["reason"] for r in storage.quarantine_rows(lake.root, "neuroimaging")]
    assert reasons == ["unreadable_nifti"]


# --------------------------------------------------------------------------- loader: one geometry from both sources
@pytest.fixture(scope="module")
def sources(tmp_path_factory, oblique):
    """The oblique session as DICOM (MR + dynamic PET) and as NIfTI (mri + 4-D pet + sidecar, and a 3-D pet)."""
    t1, frames = oblique
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(5)
    study = phi.fake_study(rng, "s")
    dicom = _write_dicom(root / "dicom" / "t1", [t1], "MR", rng, study) + \
        _write_dicom(root / "dicom" / "pet", frames, "PT", rng, study)
    nifti = root / "nifti"
    _write_nifti(nifti / "00000-mri.nii.gz", [t1], dtype=np.uint16)
    _write_nifti(nifti / "00001-pet.nii.gz", _pet_as_loaded_from_dicom(frames))
    (nifti / "00002-pet.json").write_text(json.dumps(_pet_sidecar(3)))
    static = root / "static"  # a 3-D PET in kBq/ml, stored as int16 x scl_slope
    _write_nifti(static / "mri.nii", [t1], dtype=np.uint16)
    kbq = [sitk.Cast(_pet_as_loaded_from_dicom(frames[:1])[0] / 1000.0, sitk.sitkFloat32)]
    _write_nifti(static / "pet.nii.gz", kbq, dtype=np.int16, slope=0.001)
    (static / "pet.json").write_text(json.dumps({"Units": "kBq/mL"}))
    return {"dicom": dicom, "nifti": sorted(nifti.iterdir()), "static": sorted(static.iterdir()), "root": root}


def test_dicom_and_nifti_sessions_load_to_the_same_images(sources, oblique):
    t1, frames = oblique
    a, b = load_session(sources["dicom"]), load_session(sources["nifti"])
    assert (a.source, b.source) == ("dicom", "nifti") and a.n_mr_series == 1 and a.n_pet_series == 1
    _assert_same_grid(a.t1, t1)
    _assert_same_grid(b.t1, t1)
    assert np.allclose(a.t1.GetDirection(), t1.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(a.t1), sitk.GetArrayFromImage(t1))
    assert np.array_equal(sitk.GetArrayFromImage(b.t1), sitk.GetArrayFromImage(t1))
    assert len(a.pet_frames) == len(b.pet_frames) == 3
    expected = _pet_as_loaded_from_dicom(frames)
    for fa, fb, fe in zip(a.pet_frames, b.pet_frames, expected):
        _assert_same_grid(fa, fe)
        _assert_same_grid(fb, fe)
        assert np.allclose(sitk.GetArrayFromImage(fa), sitk.GetArrayFromImage(fe), rtol=1e-5, atol=1e-3)
        assert np.allclose(sitk.GetArrayFromImage(fb), sitk.GetArrayFromImage(fe), rtol=1e-5, atol=1e-3)
    assert sitk.GetArrayFromImage(a.pet_frames[2]).max() > sitk.GetArrayFromImage(a.pet_frames[0]).max()  # order
    for facts in (a.pet_facts, b.pet_facts):
        assert facts["units"] == "BQML" and facts["decay_correction"] == "START"
        assert facts["frame_durations_s"] == [300.0, 300.0, 600.0]
        assert facts["frame_starts_s"] == [0.0, 300.0, 600.0]
        assert facts["injected_dose_bq"] == pytest.approx(PET_FACTS["dose_bq"])
        assert facts["injection_to_scan_s"] == pytest.approx(PET_FACTS["injection_to_scan_s"])
        assert facts["half_life_s"] == pytest.approx(PET_FACTS["half_life_s"])
        assert facts["weight_kg"] == pytest.approx(PET_FACTS["weight_kg"])
        assert facts["pet_mr_coverage"] > 0.95
    static = load_session(sources["static"])  # a 3-D PET: one frame, in Bq/ml, nothing else to invent
    assert len(static.pet_frames) == 1 and static.pet_facts["units"] == "BQML"
    assert static.pet_facts["injection_to_scan_s"] is None and static.pet_facts["frame_durations_s"] is None
    _assert_same_grid(static.pet_frames[0], expected[0])
    assert np.allclose(sitk.GetArrayFromImage(static.pet_frames[0]), sitk.GetArrayFromImage(expected[0]), atol=1.0)


def test_dicom_pet_facts_survive_deidentification(tmp_path, sources):
    """The injection-to-scan interval, dose and half-life come through the default de-identification (times
    of day kept, dates shifted by whole days); the weight only with Retain Patient Characteristics."""
    from imaging_tasks.deid.dicom import DeidOptions, deidentify_bytes

    mr = [f for f in sources["dicom"] if f.parent.name == "t1"]
    pet = [f for f in sources["dicom"] if f.parent.name == "pet"]
    for name, options in (("default", DeidOptions()), ("retain", DeidOptions(retain_patient_characteristics=True))):
        folder = tmp_path / name
        folder.mkdir()
        for n, f in enumerate(pet):
            (folder / f"{n:05d}.dcm").write_bytes(deidentify_bytes(f.read_bytes(), KEY, options)[0])
        facts = load_session([*mr, *sorted(folder.iterdir())]).pet_facts
        assert facts["injection_to_scan_s"] == pytest.approx(PET_FACTS["injection_to_scan_s"])
        assert facts["injected_dose_bq"] == pytest.approx(PET_FACTS["dose_bq"])
        assert facts["frame_starts_s"] == [0.0, 300.0, 600.0]
        assert facts["weight_kg"] == (None if name == "default" else pytest.approx(PET_FACTS["weight_kg"]))


def _dcm2niix(folder: Path, out: Path) -> Path:
    import dcm2niix

    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(dcm2niix.bin), "-z", "n", "-b", "n", "-f", "converted", "-o", str(out), str(folder)],
                   check=True, capture_output=True)
    return out / "converted.nii"


@pytest.mark.parametrize("pose", ["axial", "oblique"])
def test_dcm2niix_simpleitk_and_our_loader_agree(tmp_path, oblique, pose):
    """Voxel-to-world maps within 1e-3 mm at the 8 corners (dcm2niix may flip or reorder axes: the corner sets
    are compared, in LPS), and the same voxel values at the same physical points."""
    import nibabel as nib

    t1 = oblique[0]
    if pose == "axial":
        t1 = sitk.Image(t1)
        t1.SetDirection(tuple(np.eye(3).ravel()))
    rng = np.random.default_rng(9)
    folder = tmp_path / "t1"
    _write_dicom(folder, [t1], "MR", rng, phi.fake_study(rng, "d"))
    ours = load_session(sorted(folder.iterdir())).t1

    converted = _dcm2niix(folder, tmp_path / "out")
    affine = nib.load(str(converted)).affine  # RAS, independent of our NIfTI reader
    size = np.array(nib.load(str(converted)).shape[:3]) - 1
    corners_ras = np.array([affine[:3, :3] @ (size * np.array(c)) + affine[:3, 3] for c in np.ndindex(2, 2, 2)])
    assert _same_corner_set(corners_ras * [-1, -1, 1], _corners(ours)) < 1e-3
    theirs = read_nifti(converted, "dcm2niix output")[0]
    assert _same_corner_set(_corners(theirs), _corners(ours)) < 1e-3
    on_ours = sitk.Resample(theirs, ours, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    assert np.array_equal(sitk.GetArrayFromImage(on_ours), sitk.GetArrayFromImage(ours))

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    itk = reader.Execute()
    assert _same_corner_set(_corners(itk), _corners(ours)) < 1e-3
    on_ours = sitk.Resample(sitk.Cast(itk, sitk.sitkFloat32), ours, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    assert np.array_equal(sitk.GetArrayFromImage(on_ours), sitk.GetArrayFromImage(ours))


# --------------------------------------------------------------------------- bad inputs
def test_bad_sessions_are_refused_with_their_reason(tmp_path, sources, oblique):
    t1, frames = oblique

    def reason(files) -> str:
        with pytest.raises(BadInput) as exc:
            load_session(files)
        return exc.value.reason

    mri4d = _write_nifti(tmp_path / "a" / "mri.nii.gz", [t1, t1], phi_text=False)
    assert reason([mri4d]) == "mri_4d"
    cut = tmp_path / "b" / "mri.nii"
    cut.parent.mkdir()
    cut.write_bytes(_raw_bytes(sources["static"][0])[:-5000])
    assert reason([cut]) == "unreadable_nifti"
    pet_only = [f for f in sources["nifti"] if "pet" in f.name]
    assert reason(pet_only) == "no_mri"
    assert reason([f for f in sources["dicom"] if f.parent.name == "pet"]) == "no_mri"
    far = []
    for f in frames:
        moved = sitk.Image(f)
        moved.SetOrigin(tuple(np.array(f.GetOrigin()) + [0.0, 0.0, 300.0]))  # the PET of another body part
        far.append(moved)
    far_pet = _write_nifti(tmp_path / "c" / "pet.nii.gz", far, phi_text=False)
    mri = [f for f in sources["nifti"] if "mri" in f.name]
    assert reason([*mri, far_pet]) == "pet_not_covering_mri"
    half = []  # a PET whose field of view takes in about 70 % of the head still loads, and says how much
    for f in frames:
        moved = sitk.Image(f)
        moved.SetOrigin(tuple(np.array(f.GetOrigin()) + np.array(f.GetDirection()).reshape(3, 3)[:, 2] * 50.0))
        half.append(moved)
    partial = load_session([*mri, _write_nifti(tmp_path / "d" / "pet.nii.gz", half, phi_text=False)])
    assert 0.5 <= partial.pet_facts["pet_mr_coverage"] < 0.95
    assert reason([*mri, *sources["dicom"][:3]]) == "mixed_sources"
