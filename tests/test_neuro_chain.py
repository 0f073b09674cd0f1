"""The neuro session chain on synthetic sessions with known truth, step by step and end to end.

Two sessions through the whole chain (``imaging-tasks process``'s code path, ``specialties.run_steps``): a DICOM
session with a 4-frame PET and a NIfTI-upload session with a static PET, both with a planted non-linear warp.
Each step is checked against its truth: parenchymal and intracranial volume (3 %), PET->T1 (mean displacement
<= 1 mm over the brain), MNI152 atlas landmarks (mean <= 1.5 mm), SUVR per ROI (2 %) on a bring-your-own atlas
made of the phantom's PET regions, and the roi_features.json document.  Then bad sessions through the CLI with
relative paths: each quarantined with its reason, the good one loaded with its ROI rows.  (The DAG run is in
test_e2e_dags.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("brain_extraction/mri_brain.nii.gz", "brain_extraction/brain_mask.nii.gz", "pet_average/pet_mean.nii.gz",
           "pet_to_t1/pet_in_t1.nii.gz", "suvr/pet_suvr.nii.gz", "atlas_registration/atlas_in_t1.nii.gz",
           "roi_features.json", "brain_extraction/qc_brain.png", "pet_to_t1/qc_pet.png",
           "atlas_registration/qc_atlas.png", "suvr/qc_suvr.png")


def _session_files(data: Path, record: dict) -> list[Path]:
    return sorted(p for p in (data / record["session_folder"]).rglob("*") if p.is_file())


def _region_atlas(folder: Path) -> tuple[Path, Path, dict[int, str]]:
    """The synth's PET regions (grey matter >= 0.5 of each box set) as a label NIfTI in MNI space + labels TSV."""
    from imaging_tasks.neuroimaging import synth

    gm = sitk.GetArrayFromImage(synth.head_phantom()["images"]["gm"]) >= 0.5
    masks = synth.pet_region_masks()
    ref = next(iter(masks.values()))
    labels = np.zeros(gm.shape, np.uint16)
    names = {}
    for k, (name, img) in enumerate(masks.items(), start=1):
        labels[(sitk.GetArrayFromImage(img) > 0.5) & gm] = k
        names[k] = name
    img = sitk.GetImageFromArray(labels)
    img.CopyInformation(ref)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(folder / "regions.nii.gz"))
    (folder / "regions.tsv").write_text("index\tname\n" + "".join(f"{k}\t{n}\n" for k, n in names.items()))
    return folder / "regions.nii.gz", folder / "regions.tsv", names


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from imaging_tasks.neuroimaging.synth import synthesize
    from imaging_tasks.specialties import get, run_steps

    root = tmp_path_factory.mktemp("neurochain")
    truths = [json.loads(p.read_text()) for p in
              synthesize(root / "data", 2, 21, layout=["dicom", "nifti"], pet_frames=[4, 1], warp_mm=6.0)]
    atlas_nii, atlas_tsv, names = _region_atlas(root / "atlas")
    options = get("neuroimaging").options_for({"atlas_uri": str(atlas_nii), "atlas_labels_uri": str(atlas_tsv)})
    runs = []
    for record in truths:
        out = root / "out" / record["label"]
        result = run_steps("neuroimaging", _session_files(root / "data", record), out, device="cpu",
                           options=options)
        runs.append({"record": record, "truth": record["truth"], "out": out, "result": result,
                     "metrics": {m["name"]: m["value"] for m in result["metrics"]}})
    return {"root": root, "runs": runs, "names": names}


def _brain_points(out: Path, every: int = 20) -> np.ndarray:
    from imaging_tasks.neuroimaging.synth import image_points_mm

    t1 = sitk.ReadImage(str(out / "n4_bias" / "t1_n4.nii.gz"))
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "brain_extraction" / "brain_mask.nii.gz"))) > 0
    return image_points_mm(t1)[brain.ravel()][::every]


def _apply(transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])


def test_every_output_is_written(chain):
    for run in chain["runs"]:
        for name in OUTPUTS:
            assert (run["out"] / name).is_file(), name
        assert set(OUTPUTS) <= set(run["result"]["outputs"])


def test_parenchymal_and_intracranial_volumes_within_3_percent(chain):
    for run in chain["runs"]:
        m, t = run["metrics"], run["truth"]
        assert m["brain_volume_ml"] == pytest.approx(t["parenchyma_volume_ml"], rel=0.03)
        assert m["intracranial_volume_ml"] == pytest.approx(t["intracranial_volume_ml"], rel=0.03)
        assert m["grey_matter_volume_ml"] + m["white_matter_volume_ml"] == pytest.approx(m["brain_volume_ml"])


def test_pet_to_t1_within_1_mm_of_the_planted_transform(chain):
    from imaging_tasks.neuroimaging.synth import mr_to_pet_points

    for run in chain["runs"]:
        points = _brain_points(run["out"])
        estimate = _apply(sitk.ReadTransform(str(run["out"] / "pet_to_t1" / "pet_to_t1.tfm")), points)
        error = np.linalg.norm(estimate - mr_to_pet_points(run["truth"], points), axis=1)
        assert error.mean() <= 1.0, f"{run['record']['label']}: mean {error.mean():.2f} mm"


def test_atlas_landmarks_within_1_5_mm_of_the_planted_warp(chain):
    from imaging_tasks.neuroimaging.atlas import load_transform
    from imaging_tasks.neuroimaging.synth import scanner_to_template

    for run in chain["runs"]:
        points = _brain_points(run["out"], every=40)
        truth = scanner_to_template(run["truth"], points)
        error = np.linalg.norm(_apply(load_transform(run["out"] / "atlas_registration" / "registration"), points)
                               - truth, axis=1)
        assert error.mean() <= 1.5, f"{run['record']['label']}: mean {error.mean():.2f} mm"


def _expected_suvr(truth: dict) -> dict[str, float]:
    """What a perfect registration measures with this pipeline's own reference region: noise-free, PSF-blurred
    activity averaged over each region's grey matter (>= 0.5) and over the cerebellar grey-matter reference as
    :mod:`rois` defines it, all in template space."""
    from imaging_tasks.neuroimaging import synth
    from imaging_tasks.neuroimaging.rois import reference_region_mni

    activity = synth.pet_activity_template(truth)
    reference = sitk.Resample(reference_region_mni("cerebellar_grey_matter"), activity, sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0)
    act = sitk.GetArrayFromImage(activity)
    ref_mean = float(act[sitk.GetArrayFromImage(reference) > 0].mean())
    gm = sitk.GetArrayFromImage(synth.head_phantom()["images"]["gm"]) >= 0.5
    return {name: float(act[(sitk.GetArrayFromImage(mask) > 0.5) & gm].mean()) / ref_mean
            for name, mask in synth.pet_region_masks().items()}


def test_suvr_per_roi_within_2_percent(chain):
    """The ROI's grey-matter SUVR (GM-fraction-weighted) against the grey-matter truth; the plain mean, which
    also averages the white matter and CSF a misregistered ROI edge catches, within 3 %."""
    for run in chain["runs"]:
        doc = json.loads((run["out"] / "roi_features.json").read_text())
        got = {r["name"]: r["gm_weighted_mean_suvr"] for r in doc["rois"]}
        plain = {r["name"]: r["mean_suvr"] for r in doc["rois"]}
        expected = _expected_suvr(run["truth"])
        assert set(got) == set(expected)
        for name, want in expected.items():
            assert got[name] == pytest.approx(want, rel=0.02), (run["record"]["label"], name)
            assert plain[name] == pytest.approx(want, rel=0.03), (run["record"]["label"], name)
        # the regions differ from each other by more than the tolerance: a flat SUVR would fail
        assert max(expected.values()) / min(expected.values()) > 1.1


def test_roi_features_document_and_rows(chain):
    from imaging_tasks.neuroimaging.rois import validate

    for run in chain["runs"]:
        doc = json.loads((run["out"] / "roi_features.json").read_text())
        validate(doc)
        assert doc["atlas"] == "regions" and doc["reference_region"] == "cerebellar_grey_matter"
        assert doc["whole_brain"]["brain_ml"] == pytest.approx(run["metrics"]["brain_volume_ml"], rel=1e-6)
        rows = run["result"]["tables"]["roi_features"]
        assert {r["roi"] for r in rows} == {*chain["names"].values(), "whole_brain"}
        assert all(set(r) == {"atlas", "roi", "metric", "value", "unit"} for r in rows)


def test_pet_frames_were_realigned_and_suv_needs_weight(chain):
    dicom, nifti = chain["runs"]
    assert dicom["metrics"]["pet_frames_averaged"] == 4 and nifti["metrics"]["pet_frames_averaged"] == 1
    # raw (not de-identified) inputs still carry the weight: the SUV factor matches the truth's
    assert dicom["metrics"]["suv_factor"] == pytest.approx(dicom["truth"]["pet"]["suv_factor"], rel=1e-3)


def test_mr_only_session_runs_the_chain_without_suvr(tmp_path):
    from imaging_tasks.neuroimaging.synth import synthesize
    from imaging_tasks.specialties import get, run_steps

    (record,) = [json.loads(p.read_text()) for p in synthesize(tmp_path / "data", 1, 4, with_pet=False,
                                                                 layout="nifti")]
    result = run_steps("neuroimaging", _session_files(tmp_path / "data", record), tmp_path / "out", device="cpu",
                       options=get("neuroimaging").options_for({"atlas": "dosenbach160"}))
    doc = json.loads((tmp_path / "out" / "roi_features.json").read_text())
    assert doc["atlas"] == "dosenbach160" and len(doc["rois"]) == 160
    assert doc["reference_region"] is None and all(r["mean_suvr"] is None for r in doc["rois"])
    assert not (tmp_path / "out" / "suvr" / "pet_suvr.nii.gz").exists()
    names = {m["name"] for m in result["metrics"]}
    assert "brain_volume_ml" in names and "suvr_reference_mean" not in names


def test_bad_sessions_are_quarantined_through_the_cli_with_relative_paths(tmp_path):
    """PET without MR (after the wait), a 4-D MR, a PET of another field of view, a corrupt NIfTI: each
    quarantined with its reason; the good MR-only session beside them is loaded with its ROI rows."""
    import nibabel as nib

    from imaging_tasks.neuroimaging.synth import synthesize
    from imaging_tasks.warehouse import DuckDBWarehouse

    records = [json.loads(p.read_text()) for p in synthesize(tmp_path / "gen", 2, 8, layout="nifti",
                                                               with_pet=[True, False])]
    landing = tmp_path / "landing" / "neuroimaging"
    src = tmp_path / "gen" / records[0]["session_folder"]
    good = tmp_path / "gen" / records[1]["session_folder"]

    def session(patient: str, **files: bytes) -> None:
        folder = landing / patient / "s1"
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name.replace("_", ".")).write_bytes(data)

    mri, pet = (src / "mri.nii.gz").read_bytes(), (src / "pet.nii.gz").read_bytes()
    session("goodpatient", mri_nii_gz=(good / "mri.nii.gz").read_bytes())
    session("petonly", pet_nii_gz=pet)
    img = nib.load(str(src / "mri.nii.gz"))
    four_d = nib.Nifti1Image(np.stack([np.asarray(img.dataobj)] * 3, -1), img.affine)
    four_d.to_filename(str(tmp_path / "mri4d.nii.gz"))
    session("fourdmri", mri_nii_gz=(tmp_path / "mri4d.nii.gz").read_bytes())
    far = nib.load(str(src / "pet.nii.gz"))
    affine = far.affine.copy()
    affine[2, 3] += 400.0  # the PET 40 cm down the table: another body part
    nib.Nifti1Image(np.asarray(far.dataobj), affine).to_filename(str(tmp_path / "far.nii.gz"))
    session("farpet", mri_nii_gz=mri, pet_nii_gz=(tmp_path / "far.nii.gz").read_bytes())
    session("corrupt", mri_nii_gz=mri[: len(mri) // 3])

    env = {**os.environ, "IMAGING_DEVICE": "cpu"}
    cli = [sys.executable, "-m", "imaging_tasks.cli", "run", "neuroimaging", "--landing", "landing/neuroimaging",
           "--lake", "lake", "--warehouse", "wh.duckdb", "--demo-key", "--mr-only-wait-hours", "0"]
    done = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    wh = DuckDBWarehouse(tmp_path / "wh.duckdb")
    reasons = sorted(r for (r,) in wh.query("SELECT reason FROM quarantine WHERE specialty = 'neuroimaging'"))
    assert reasons == sorted(["no_mri", "mri_4d", "pet_not_covering_mri", "unreadable_nifti"])
    states = sorted(s for (s,) in wh.query("SELECT state FROM ledger WHERE specialty = 'neuroimaging'"))
    assert states.count("loaded") == 1
    rois = wh.query("SELECT count(DISTINCT roi) FROM roi_features WHERE specialty = 'neuroimaging'")[0][0]
    assert rois == 300 + 1  # the default Seitzman-300 atlas and the whole-brain row
    for value in ("goodpatient", "fourdmri", "farpet"):
        assert value not in done.stdout + done.stderr
