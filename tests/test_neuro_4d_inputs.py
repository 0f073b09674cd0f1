"""BOLD and DWI inputs as users send them: NIfTI uploads (bold.nii.gz + events.tsv + bold.json, dwi.nii.gz +
dwi.bval + dwi.bvec) and DICOM series (with the events table beside the BOLD files), through the index,
de-identification and loading; bad inputs refused with their reasons.

The numerics of the GLM, the tensor fit and tractography are checked against nilearn and dipy in
``test_neuro_glm.py`` and ``test_neuro_dti.py``; the DAG runs them end to end in ``test_e2e_dags.py``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from imaging_tasks import storage
from imaging_tasks.deid.keys import DEMO_KEY
from imaging_tasks.deid.pseudonym import pseudo_id
from imaging_tasks.errors import BadInput
from imaging_tasks.neuroimaging.session import load_4d, load_session


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """One DICOM session (T1 + enhanced BOLD with events beside it + enhanced DWI) and one NIfTI upload session
    (mri + bold + events + bold.json + dwi + bval/bvec), both without PET."""
    from imaging_tasks.neuroimaging.synth import synthesize

    out = tmp_path_factory.mktemp("landing4d")
    paths = synthesize(out, 2, 21, with_pet=False, layout=["dicom", "nifti"], with_bold=True, with_dwi=True,
                       bold_volumes=24)  # short: the GLM runs on full runs in test_e2e_dags
    return out, [json.loads(p.read_text()) for p in paths]


def _study_id(truth: dict) -> str:
    if truth["layout"] == "nifti":
        patient, session = truth["session_folder"].split("/")[-2:]
        return pseudo_id(DEMO_KEY, f"{patient}/{session}", "study")
    return pseudo_id(DEMO_KEY, truth["study_uid"], "study")


def _deidentified(landing: Path, tmp_path: Path, truths: list[dict]) -> dict[str, list[Path]]:
    """Index and de-identify the landing folder as the DAG does; each study's fetched files."""
    from imaging_tasks.lake import Lake
    from imaging_tasks.pipeline import audit_deidentified, deidentify_study, fetch_instances, index_landing

    lake = Lake(str(tmp_path / "lake"), "neuroimaging")
    summary = index_landing(landing / "neuroimaging", lake, key=DEMO_KEY, options={"mr_only_wait_hours": 0})
    assert summary["quarantined"] == 0 if isinstance(summary.get("quarantined"), int) else True
    studies = {s["study"]: s for s in summary["studies"]}
    assert set(studies) == {_study_id(t) for t in truths}
    fetched = {}
    for sid, study in studies.items():
        out = deidentify_study(study, lake, key=DEMO_KEY, demo=True)
        assert out["status"] == "ok" and out["n_quarantined"] == 0
        audit_deidentified(out, lake)  # fails closed on any planted identifier that survived
        deid = storage.read_json(Path(out["anonymized"]) / "_DEID.json")
        fetched[sid] = fetch_instances(deid["instances"], tmp_path / "fetched" / sid)
    return fetched


def test_bold_and_dwi_uploads_are_indexed_deidentified_and_loaded(sessions, tmp_path):
    landing, truths = sessions
    fetched = _deidentified(landing, tmp_path, truths)
    for truth in truths:
        files = fetched[_study_id(truth)]
        names = sorted(f.name.split("-", 1)[-1] for f in files if not f.name.endswith(".dcm"))
        if truth["layout"] == "nifti":
            assert names == ["bold.json", "bold.nii.gz", "bold_events.tsv", "dwi.bval", "dwi.bvec", "dwi.nii.gz",
                             "mri.nii.gz"]
        else:  # the events table beside the BOLD DICOM files joined the DICOM study
            assert names == ["bold_events.tsv"]
        events_file = next(f for f in files if f.name.endswith("bold_events.tsv"))
        header = events_file.read_text().splitlines()[0].split("\t")
        assert header == ["onset", "duration", "trial_type", "modulation"]  # the planted notes column is gone
        for value in truth["phi"]:
            if len(value) >= 6:
                for f in files:
                    assert value.encode() not in f.read_bytes(), (f.name, "planted identifier survived")
        if truth["layout"] == "nifti":
            sidecar = json.loads(next(f for f in files if f.name.endswith("bold.json")).read_text())
            assert sidecar["RepetitionTime"] == truth["truth"]["bold"]["tr_s"] and "PatientName" not in sidecar

        session = load_session(files)
        bold, dwi, want = session.bold, session.dwi, truth["truth"]
        assert bold.data.shape[3] == want["bold"]["n_volumes"] and bold.tr_s == pytest.approx(want["bold"]["tr_s"])
        assert [(e.onset_s, e.duration_s, e.trial_type) for e in session.events] == \
            [(e["onset"], e["duration"], e["trial_type"]) for e in want["bold"]["events"]]
        assert dwi.data.shape[3] == want["dwi"]["n_volumes"] and int((dwi.bvals > 50).sum()) == 20
        # the gradient directions survive de-identification and conversion: unit vectors, and the same set
        # from DICOM (patient frame, converted by dcm2niix) as from the NIfTI upload (FSL voxel frame)
        assert np.allclose(np.linalg.norm(dwi.bvecs[dwi.bvals > 50], axis=1), 1.0, atol=1e-3)
        assert session.t1.GetSize()[2] > 16  # the T1 was picked, not the BOLD or DWI series
        again, events = load_4d(files, "bold")
        assert np.array_equal(again.data, bold.data) and len(events) == len(session.events)


def _copy_session(truth: dict, landing: Path, dest: Path) -> Path:
    src = landing / truth["session_folder"]
    shutil.copytree(src, dest)
    return dest


def test_bad_bold_and_dwi_uploads_are_refused_with_their_reason(sessions, tmp_path):
    """BOLD without events, DWI without gradients, a gradient count that disagrees with the volumes: each refuses
    the session at loading (the first step), with a reason and what to do."""
    landing, truths = sessions
    nifti = next(t for t in truths if t["layout"] == "nifti")
    cases = {
        "bold_without_events": lambda d: (d / "events.tsv").unlink(),
        "dwi_without_gradients": lambda d: (d / "dwi.bvec").unlink(),
        "dwi_volume_mismatch": lambda d: (d / "dwi.bval").write_text(
            " ".join((d / "dwi.bval").read_text().split()[:-3]) + "\n"),
    }
    for reason, damage in cases.items():
        folder = _copy_session(nifti, landing, tmp_path / reason)
        damage(folder)
        with pytest.raises(BadInput) as err:
            load_session(sorted(folder.iterdir()))
        assert err.value.reason == reason, (reason, err.value.reason)
        assert err.value.message and str(folder) not in err.value.message

    dicom = next(t for t in truths if t["layout"] == "dicom")
    folder = _copy_session(dicom, landing, tmp_path / "dicom_no_events")
    (folder / "bold" / "events.tsv").unlink()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with pytest.raises(BadInput) as err:
        load_session(files)
    assert err.value.reason == "bold_without_events"


def test_events_tables_find_their_study_or_are_refused(sessions, tmp_path):
    """An events table joins the study whose DICOM files share its folder; alone, or among two studies' files,
    it is quarantined with a reason at the index, and the studies go on."""
    from imaging_tasks.index import index_objects

    landing, truths = sessions
    dicom = next(t for t in truths if t["layout"] == "dicom")
    root = tmp_path / "landing"
    session = _copy_session(dicom, landing, root / "siteA" / "s1")
    (root / "orphan").mkdir()
    shutil.copy(session / "bold" / "events.tsv", root / "orphan" / "events.tsv")
    shutil.copy(session / "bold" / "events.tsv", session / "t1" / "bold_events.tsv")  # beside the T1: joins too
    (session / "bold" / "events.tsv").unlink()
    (root / "siteA" / "s1" / "dwi" / "sub.bval").write_text("0 1000\n")  # a name the pipeline does not know
    bad = []
    result = index_objects(storage.list_objects(root), specialty="neuroimaging", key=DEMO_KEY,
                           options={"mr_only_wait_hours": 0},
                           quarantine=lambda obj, exc: bad.append((obj.relpath, exc.reason)) or {})
    assert sorted(bad) == [("orphan/events.tsv", "events_without_bold"),
                           ("siteA/s1/dwi/sub.bval", "nifti_unknown_name")]
    [entry] = result.studies
    uploads = [f["upload"] for f in entry.files if f.get("upload")]
    assert [(u["stem"], u["kind"], u["beside"]) for u in uploads] == [("bold", "events", "dicom")]


def test_events_and_gradient_files_are_rebuilt_not_copied():
    from imaging_tasks.deid.tables import deidentify_events, deidentify_gradients

    raw = ("onset\tduration\ttrial_type\tresponse_time\tstim_file\n"
           "10\t16.0\tmotor\t0.43\tJane_Doe_face.png\n"
           "40\t16\tvisual\tn/a\tx.png\n").encode()
    out, info = deidentify_events(raw)
    assert out.decode() == "onset\tduration\ttrial_type\n10.0\t16.0\tmotor\n40.0\t16.0\tvisual\n"
    assert info["dropped"] == ["response_time", "stim_file"]
    for broken, reason in ((b"onset\ttrial_type\n1\ta\n", "events_columns"),
                           (b"onset\tduration\ttrial_type\n1\tlong\ta\n", "events_values"),
                           (b"", "events_empty"), (b"\xff\xfe\x00", "events_unreadable")):
        with pytest.raises(BadInput) as err:
            deidentify_events(broken)
        assert err.value.reason == reason
    assert deidentify_gradients(b"0 1000  1000\n", "bval")[0] == b"0 1000 1000\n"
    with pytest.raises(BadInput) as err:
        deidentify_gradients(b"0 1000 # patient Jane Doe\n", "bval")
    assert err.value.reason == "dwi_gradients_unreadable"
