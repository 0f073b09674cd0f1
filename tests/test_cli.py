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


def test_deidentify_workers_give_the_outputs_and_report_of_one_process(tmp_path):
    """``--workers 2`` (a process pool) and ``--workers 1`` (in process), run as a user would (relative SRC, DST
    and quarantine from the current folder): byte-identical outputs with the same names, the same report (but
    its timing) and the same quarantine, on a corpus with a malformed file, a file that is not DICOM, two
    different inputs for one output (the first in listing order wins, in both) and a hidden file."""
    import os

    from pydicom.data import get_testdata_files

    names = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "JPEG2000.dcm", "rtstruct.dcm",
             "nested_priv_SQ.dcm", "ExplVR_BigEnd.dcm", "image_dfl.dcm", "MR_small_implicit.dcm",
             "liver_1frame.dcm", "waveform_ecg.dcm", "MR_small_RLE.dcm", "no_meta.dcm"]
    src = tmp_path / "in"
    for i, name in enumerate(names):
        data = Path(get_testdata_files(name)[0]).read_bytes()
        (src / f"DOE^JOHN {i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"DOE^JOHN {i % 3}" / f"IM{i:04d}").write_bytes(data)
    ct = Path(get_testdata_files("CT_small.dcm")[0]).read_bytes()
    (src / "DOE^JOHN 0" / "IM9998").write_bytes(ct[:-1000])  # malformed: cut inside Pixel Data
    (src / "DOE^JOHN 0" / "IM9999").write_bytes(ct[:-2] + b"\x01\x02")  # same instance, other pixels
    (src / "DOE^JOHN 1" / "notes.dcm").write_bytes(b"not a DICOM file")
    (src / "DOE^JOHN 1" / ".DS_Store").write_bytes(b"\0")
    env = {**os.environ, "IMAGING_DEID_KEY": "workers-test-key-0123456789"}
    env.pop("IMAGING_DEID_DEMO", None)
    runs = {}
    for workers in ("1", "2"):
        out = subprocess.run([sys.executable, "-m", "imaging_tasks.cli", "deidentify", "in", f"out{workers}",
                              "--quarantine", f"q{workers}", "--workers", workers], capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        dst = tmp_path / f"out{workers}"
        files = {str(p.relative_to(dst)): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
        report = json.loads(files.pop("deidentify-report.json"))
        assert report.pop("quarantine") == str(tmp_path / f"q{workers}")
        report.pop("seconds"), report.pop("files_per_second")
        quarantined = sorted(str(p.relative_to(tmp_path / f"q{workers}")) for p in (tmp_path / f"q{workers}").rglob(
            "input*"))
        runs[workers] = (files, report, quarantined)
    files, report, quarantined = runs["1"]
    assert runs["2"][0] == files  # names and bytes
    assert runs["2"][1] == report
    assert runs["2"][2] == quarantined
    assert not any(p.name.startswith(".") for p in (tmp_path / "out2").rglob("*"))  # no staged file left behind
    reasons = sorted(q["reason"] for q in report["quarantined"])
    assert {"truncated_pixels", "not_dicom", "duplicate_instance"} <= set(reasons), reasons
    assert report["deidentified"] >= 5 and [s["reason"] for s in report["skipped"]] == ["hidden_name"]


def _dies_on_crash_inputs(batch):
    """A worker's work on a batch that dies, as a crash in a C library would, on inputs named ``crash*``."""
    import os

    from imaging_tasks.deid import tree

    if any(obj.relpath.startswith("crash") for _n, obj in batch):
        os._exit(70)
    return tree._work(batch)


def test_a_worker_that_dies_costs_only_its_own_file(tmp_path):
    """A worker process dying (killed, out of memory, a segfault) breaks the pool without saying which file did it:
    the files whose results were lost run again one at a time, the one that kills its worker again is quarantined
    (deid_error), every other file is de-identified, in listing order, and no staged file is left behind."""
    from pydicom.data import get_testdata_files

    from imaging_tasks.deid import tree
    from imaging_tasks.deid.dicom import DeidOptions

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "MR_small_RLE.dcm", "liver_1frame.dcm"):
        data = Path(get_testdata_files(name)[0]).read_bytes()
        (src / f"a-{name}").write_bytes(data)
        (src / f"z-{name}").write_bytes(data)
    (src / "crash.dcm").write_bytes(Path(get_testdata_files("CT_small.dcm")[0]).read_bytes())
    objects, _hidden = tree.list_inputs(src)
    job = tree._Job(dst=str(dst), quarantine=str(tmp_path / "q"), key=b"workers-test-key-0123456789", demo=False,
                    options=DeidOptions(), tmp=str(tmp_path), staged=True, local=True)
    got = []
    for n, obj, done in tree._pooled(objects, job, 2, work=_dies_on_crash_inputs):
        got.append((n, obj, done))
        if done.status == "ok":
            done.publish(job)  # as deidentify_tree does, before the next (but its duplicate check)
    assert [n for n, _obj, _done in got] == list(range(len(objects)))
    outcome = {obj.relpath: done for _n, obj, done in got}
    assert outcome["crash.dcm"].status == "quarantined" and outcome["crash.dcm"].refusal[0] == "deid_error"
    assert all(done.status == "ok" for rel, done in outcome.items() if rel != "crash.dcm"), \
        {rel: (d.status, d.refusal) for rel, d in outcome.items()}
    assert not list(dst.rglob(".*")), "staged files of the dead workers left behind"
    assert len(list((tmp_path / "q").rglob("reason.json"))) == 1
