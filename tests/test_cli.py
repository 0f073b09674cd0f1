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
    import nibabel as nib
    import numpy as np

    src, dst = tmp_path / "src", tmp_path / "dst"
    _cli("synth", "--specialty", "cardiovascular", "--out", str(src), "--studies", "1", "--seed", "2", "--bad-inputs")
    _cli("synth", "--specialty", "pathology", "--out", str(src), "--studies", "1", "--seed", "2")
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.header["descrip"] = b"Quintero^Pilar MRN90011"
    nib.save(img, str(src / "Quintero_Pilar.nii.gz"))
    phi = [v for t in (src / "_truth").rglob("*.json") for v in json.loads(t.read_text())["phi"] if len(v) >= 6]
    out = _cli("deidentify", str(src), str(dst)).stdout
    report = json.loads((dst / "deidentify-report.json").read_text())
    assert report["demo_key"] is True and "de-identified" in out
    assert sorted(q["reason"] for q in report["quarantined"]) == ["empty_file", "not_dicom", "truncated_pixels"]
    published = [p for zone in ("anonymized", "slides", "nifti") for p in (dst / zone).rglob("*") if p.is_file()]
    assert any(p.suffix == ".svs" for p in published) and any(p.name.endswith(".nii.gz") for p in published)
    import gzip

    for p in published:
        blob = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
        assert not any(v.encode() in blob or v in str(p) for v in phi + ["Quintero", "MRN90011"])
