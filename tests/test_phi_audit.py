"""The PHI audit step: it must find planted identifying values wherever they hide, and fail closed.

Each test plants a real leak (raw bytes, another character set, a chunk boundary, a warehouse row, a
DAG whose de-identifier was broken on purpose) and checks the audit refuses; the clean case passes.
"""
from __future__ import annotations

import io
import json

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from imaging_tasks.phi_audit import PHILeak, audit, dicom_identifying_values, find_leaks, scan_stream


def _dataset(name: str, charset: str | None = None) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, "MRN-7731902", "19511224"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.SOPClassUID = "CT", "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("name,charset", [("Müller^Jürgen", "ISO_IR 100"), ("Müller^Jürgen", "ISO_IR 192"),
                                          ("Yamada^Tarou=山田^太郎=やまだ^たろう", "\\ISO 2022 IR 87"),
                                          ("Wang^XiaoDong=王^小東", "GB18030"),
                                          ("Lyubov^Ivanova=Любовь^Иванова", "ISO_IR 144")])
def test_names_are_found_in_the_files_own_character_set(name, charset):
    """A non-ASCII name written in latin-1, UTF-8, ISO 2022, GB18030 or Cyrillic is still found."""
    ds = _dataset(name, charset)
    raw = _encoded(ds)
    values = dicom_identifying_values(pydicom.dcmread(io.BytesIO(raw)))
    assert "PatientName" in find_leaks(values, raw)
    ds.PatientName = "ANONYMIZED"
    ds.PatientID, ds.PatientBirthDate = "P0000", ""
    ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = "2.25.1"
    assert find_leaks(values, _encoded(ds)) == []


def test_scan_finds_values_across_chunk_boundaries():
    values = {"PatientID": {"MRN-7731902"}}
    blob = b"x" * 1021 + b"MRN-7731902" + b"y" * 2000
    for chunk in (7, 64, 1024, 1 << 20):
        assert scan_stream(values, io.BytesIO(blob), chunk=chunk) == ["PatientID"]
    assert scan_stream(values, io.BytesIO(blob.replace(b"MRN", b"XXX")), chunk=64) == []


def test_leak_errors_name_the_attribute_never_the_value(tmp_path):
    values = {"PatientName": {"Quintero^Pilar"}, "PatientID": {"MRN90011"}}
    (tmp_path / "out.dcm").write_bytes(b"....Quintero Pilar....")  # PN written with spaces in free text
    with pytest.raises(PHILeak) as err:
        audit(values, files=[str(tmp_path / "out.dcm")])
    assert "PatientName" in str(err.value) and "Quintero" not in str(err.value)
    with pytest.raises(PHILeak, match="PatientID") as err:
        audit(values, payloads=[("warehouse rows", {"studies": [{"comment": "seen MRN90011"}]})])
    assert "MRN90011" not in str(err.value)
    report = audit(values, files=[], payloads=[("XCom", {"study": "SABC"})])
    assert report["payloads"] == 1 and report["values"] == 2


def test_audit_study_passes_real_output_and_catches_a_raw_copy(tmp_path):
    """The pipeline's own output passes; a raw file slipped into anonymized/ is caught."""
    from imaging_tasks import pipeline
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.synth.cardiovascular import synthesize

    synthesize(tmp_path / "landing", 1, 5)
    lake = pipeline.Lake((tmp_path / "lake").as_uri(), "cardiovascular")
    summary = pipeline.index_landing((tmp_path / "landing" / "cardiovascular").as_uri(), lake, key=DEMO_KEY)
    study = pipeline.deidentify_study(summary["studies"][0], lake, key=DEMO_KEY, demo=True)
    report = pipeline.audit_study({**study, "manifest": summary["studies"][0]["manifest"]}, lake)
    assert report["files"] > 1 and report["values"] >= 5

    raw = next(p for p in (tmp_path / "landing" / "cardiovascular").rglob("*") if p.is_file() and
               not p.name.startswith("_") and "_truth" not in p.parts)
    (tmp_path / "lake" / "anonymized" / "cardiovascular" / study["patient"] / study["study"] / "x.bin").write_bytes(
        raw.read_bytes())
    with pytest.raises(PHILeak, match="Patient"):
        pipeline.audit_study(study, lake)


@pytest.mark.e2e
def test_dag_fails_closed_when_de_identification_leaks(airflow_db, buckets, monkeypatch):
    """Break the de-identifier on purpose: the audit task fails, nothing is processed or loaded."""
    import imaging_tasks.deid.dicom as deid_dicom
    import imaging_tasks.phi_audit as phi_audit
    from imaging_tasks.synth.cardiovascular import synthesize

    real = deid_dicom.deidentify_bytes

    def leaky(data, key, options=deid_dicom.DeidOptions(), *, demo=False):
        _out, info = real(data, key, options, demo=demo)
        return data, info  # the raw file, PHI and all

    monkeypatch.setattr(deid_dicom, "deidentify_bytes", leaky)
    monkeypatch.setattr(phi_audit, "assert_no_leaks", lambda *a, **k: None)  # defeat the inline check too
    synthesize(buckets["landing"], 1, 21)
    from pathlib import Path

    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags")).dags["cardiovascular"]
    run = dag.test()
    assert run.state == "failed"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["deidentify"] == "success" and states["audit_phi"] == "failed"
    assert states["process_study"] in ("upstream_failed", None) and states["load_metadata"] != "success"
    assert not (buckets["lake"] / "derived").exists()
    assert not buckets["warehouse"].exists() or _studies(buckets["warehouse"]) == 0


def _studies(path) -> int:
    from imaging_tasks.warehouse import DuckDBWarehouse

    return DuckDBWarehouse(path).count("studies")
