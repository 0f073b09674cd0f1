"""The `imaging-tasks` command line: synth, deidentify and run, outside Airflow."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imaging_tasks.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, check=True)


def test_deidentify_folder_of_dicom_slides_and_nifti(tmp_path):
    import gzip

    import nibabel as nib
    import numpy as np
    import pydicom

    src, dst = tmp_path / "src", tmp_path / "dst"
    _cli("synth", "--specialty", "cardiovascular", "--out", str(src), "--studies", "1", "--seed", "2", "--bad-inputs")
    _cli("synth", "--specialty", "pathology", "--out", str(src), "--studies", "1", "--seed", "2")
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.header["descrip"] = b"Quintero^Pilar MRN90011"
    (src / "Quintero_Pilar").mkdir()
    nib.save(img, str(src / "Quintero_Pilar" / "Quintero_Pilar.nii.gz"))
    phi = [v for t in (src / "_truth").rglob("*.json") for v in json.loads(t.read_text())["phi"] if len(v) >= 6]
    n_inputs = sum(1 for p in src.rglob("*") if p.is_file() and not any(
        part.startswith(("_", ".")) for part in p.relative_to(src).parts))

    out = _cli("deidentify", str(src), str(dst), "--option", "retain-device-identity").stdout
    report = json.loads((dst / "deidentify-report.json").read_text())
    assert report["demo_key"] is True and out.startswith("de-identified ")
    assert report["options"] == ["retain_modified_dates", "retain_device_identity"]
    assert sorted(q["reason"] for q in report["quarantined"]) == ["empty_file", "not_dicom", "truncated_pixels"]
    assert report["deidentified"] + len(report["quarantined"]) == n_inputs  # nothing lost
    # quarantine keeps raw inputs, so it is kept out of DST
    assert len(list((tmp_path / "dst-quarantine").rglob("reason.json"))) == 3
    published = [p for p in dst.rglob("*") if p.is_file() and p.name != "deidentify-report.json"]
    assert len(published) == report["deidentified"]
    assert any(p.suffix == ".svs" for p in published) and any(p.name.endswith(".nii.gz") for p in published)
    dicoms = [p for p in published if p.suffix == ".dcm"]
    assert report["by_kind"]["dicom"] == len(dicoms) > 0
    for p in dicoms:
        ds = pydicom.dcmread(p)
        assert p.stem == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert "113109" in {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    for p in published:  # neither bytes nor names carry identifying values
        blob = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
        rel = str(p.relative_to(dst))
        assert not any(v.encode() in blob or v in rel for v in phi + ["Quintero", "MRN90011"])
        assert all(part[0] in "DF" or part.endswith(".dcm") for part in Path(rel).parts), rel

    # same key, same outputs byte for byte (and names)
    _cli("deidentify", str(src), str(tmp_path / "again"), "--option", "retain-device-identity")
    again = {str(p.relative_to(tmp_path / "again")): p.read_bytes() for p in (tmp_path / "again").rglob("*")
             if p.is_file() and p.name != "deidentify-report.json"}
    assert again == {str(p.relative_to(dst)): p.read_bytes() for p in published}


def test_deidentify_refuses_without_a_key(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("IMAGING_DEID_KEY", "IMAGING_DEID_DEMO")}
    (tmp_path / "src").mkdir()
    proc = subprocess.run([sys.executable, "-m", "imaging_tasks.cli", "deidentify", str(tmp_path / "src"),
                           str(tmp_path / "dst")], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 2 and "IMAGING_DEID_KEY" in proc.stderr
    assert not (tmp_path / "dst").exists()
    proc = subprocess.run([sys.executable, "-m", "imaging_tasks.cli", "deidentify", str(tmp_path / "src"),
                           str(tmp_path / "dst")], capture_output=True, text=True, cwd=REPO,
                          env={**env, "IMAGING_DEID_KEY": "a-real-secret-key-0123456789"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "dst" / "deidentify-report.json").read_text())["demo_key"] is False
