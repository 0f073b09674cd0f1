"""The PHI audit step: it must find planted identifying values wherever they hide, and fail closed.

Each test plants a real leak (raw bytes, another character set, a chunk boundary, a warehouse row, a
DAG whose de-identifier was broken on purpose) and checks the audit refuses; the clean case passes.
"""
from __future__ import annotations

import io

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
    blob = b"\0" * 1021 + b"MRN-7731902" + b" " * 2000
    for chunk in (1, 7, 64, 1024, 1 << 20):
        assert scan_stream(values, io.BytesIO(blob), chunk=chunk) == ["PatientID"]
        assert scan_stream(values, io.BytesIO(blob.strip(b"\0 ")), chunk=chunk) == ["PatientID"]  # the whole data
        # the token boundary is judged across chunk edges: a word character right after the value hides it
        glued = b"\0" * 1021 + b"MRN-7731902" + b"7" + b" " * 2000
        assert scan_stream(values, io.BytesIO(glued), chunk=chunk) == []
        utf16 = b"\0" * 1020 + "MRN-7731902".encode("utf-16-le") + b" \0" * 100
        assert scan_stream(values, io.BytesIO(utf16), chunk=chunk) == ["PatientID"]
    assert scan_stream(values, io.BytesIO(blob.replace(b"MRN", b"XXX")), chunk=64) == []


# ----------------------------------------------------------------------------------------- token boundaries

def test_manufacturer_containing_the_institution_is_not_a_leak(tmp_path):
    """pydicom's MR_small files: InstitutionName TOSHIBA, kept Manufacturer TOSHIBA_MEC.  One token, not a
    leak: every MR_small variant is de-identified, through deidentify_bytes and through a folder run."""
    from pathlib import Path

    from pydicom.data import get_testdata_files

    from imaging_tasks.deid import deidentify_bytes
    from imaging_tasks.deid.tree import deidentify_tree
    from imaging_tasks.dicom_io import read_header

    paths = get_testdata_files("MR_small*.dcm")
    assert len(paths) >= 5
    for path in paths:
        data = Path(path).read_bytes()
        values = dicom_identifying_values(read_header(data))
        assert values["InstitutionName"] == {"TOSHIBA"}
        out, _ = deidentify_bytes(data, b"audit-test-key-00001")
        assert b"TOSHIBA_MEC" in out and find_leaks(values, out) == []
        assert find_leaks(values, out + b"\\TOSHIBA ") == ["InstitutionName"]  # the name alone still is one
    src = tmp_path / "src"
    src.mkdir()
    for i, path in enumerate(paths):  # one folder each: the variants share their SOP Instance UID
        (src / str(i)).mkdir()
        (src / str(i) / "mr.dcm").write_bytes(Path(path).read_bytes())
    report = deidentify_tree(src, tmp_path / "dst", key=b"audit-test-key-00001", demo=False)
    assert report["deidentified"] == len(paths) and not report["quarantined"], report["quarantined"]


def test_values_read_from_the_de_identifiers_parse_equal_a_header_read():
    """One parse per file: the identifying values every output is audited against are read from the parse that
    de-identifies the input (``deidentify_bytes(source=...)``), by the fast path (a data set of the identifying
    elements and every sequence) and by the reference path (pydicom's whole data set).  Over pydicom's test
    files and the charset files, with and without an option that retains attributes: the same values as a
    separate header read, and the same outcome; without ``source`` read, the values refuse to be used."""
    from pathlib import Path

    from pydicom.data import get_charset_files, get_testdata_files

    from imaging_tasks.deid import deidentify_bytes
    from imaging_tasks.deid.dicom import DeidOptions
    from imaging_tasks.dicom_io import read_header
    from imaging_tasks.errors import BadInput
    from imaging_tasks.phi_audit import IdentifyingValues, retained_by

    key, compared = b"audit-test-key-00001", {True: 0, False: 0}
    paths = [Path(p) for p in sorted(get_testdata_files()) + sorted(get_charset_files("*.dcm")) if Path(p).is_file()]
    for path in paths:
        data = path.read_bytes()
        for options in (DeidOptions(), DeidOptions(retain_uids=True, retain_institution_identity=True)):
            for fast in (True, False):
                reader = IdentifyingValues(retained_by(options))
                try:
                    deidentify_bytes(data, key, options, fast=fast, source=reader.source)
                except BadInput:
                    continue
                assert reader.values == dicom_identifying_values(read_header(data), retained_by(options)), path.name
                compared[fast] += 1
    assert compared[True] >= 100 and compared[False] >= 100, compared
    with pytest.raises(RuntimeError):
        IdentifyingValues().values  # noqa: B018 - never read: never mistaken for "no identifying values"


def test_a_folder_run_parses_each_dicom_once(tmp_path, monkeypatch):
    """The folder tool (and the pipeline's step, the same calls) on files the byte-level path handles: no pydicom
    parse at all - neither the de-identifier nor the audit's values read the input a second time."""
    from pathlib import Path

    from pydicom.data import get_testdata_files

    from imaging_tasks.deid.tree import deidentify_tree

    src = tmp_path / "src"
    for i, name in enumerate(("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "liver_1frame.dcm")):
        (src / str(i)).mkdir(parents=True)
        (src / str(i) / name).write_bytes(Path(get_testdata_files(name)[0]).read_bytes())
    parses = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: parses.append(1) or real(*a, **k))
    report = deidentify_tree(src, tmp_path / "dst", key=b"audit-test-key-00001", demo=False, workers=1)
    assert report["deidentified"] == 4 and not report["quarantined"], report["quarantined"]
    assert parses == []


VALUES = {"InstitutionName": {"TOSHIBA"}, "PatientName": {"Quintero^Pilar", "Quintero", "Pilar"},
          "PatientID": {"MRN-7731902"}, "StudyDate": {"20240102"}}


@pytest.mark.parametrize("blob,leaked", [
    (b"Seen at TOSHIBA, ward 3", "InstitutionName"),  # embedded in free text, with spaces and punctuation
    (b"(TOSHIBA)", "InstitutionName"),
    (b'{"site": "TOSHIBA"}', "InstitutionName"),  # a JSON payload
    (b"TOSHIBA", "InstitutionName"),  # the whole data
    (b"\x00\x08TOSHIBA\x00", "InstitutionName"),  # a whole value between binary bytes
    (b"Dr^Quintero^Ana", "PatientName"),  # inside another person name
    (b"report of QUINTERO-PILAR".replace(b"QUINTERO", b"Quintero").replace(b"PILAR", b"Pilar"), "PatientName"),
    ("seen: Quintero Pilar".encode("utf-16-le"), "PatientName"),  # UTF-16
    ("MRN-7731902".encode("utf-16-le"), "PatientID"),
    (b"AT20240102101112.5", None),  # glued to letters on the left: another token
    (b"20240102101112.5", "StudyDate"),  # the unshifted date as the date part of a date-time
    (b"id MRN-7731902/2", "PatientID"),
])
def test_real_leaks_are_caught_on_token_boundaries(blob, leaked):
    assert find_leaks(VALUES, blob) == ([leaked] if leaked else [])


@pytest.mark.parametrize("blob", [b"TOSHIBA_MEC", b"XTOSHIBA", b"TOSHIBA2", b"Quinteros", b"MRN-77319021",
                                  b"220240102", "TOSHIBA_MEC".encode("utf-16-le")])
def test_a_value_inside_a_longer_token_is_not_a_leak(blob):
    assert find_leaks(VALUES, blob) == []


def test_a_leak_in_a_private_element_is_caught():
    """A written DICOM file carrying the name in a private LO and the ID in UTF-16 inside a private OB."""
    ds = _dataset("Quintero^Pilar")
    values = dicom_identifying_values(pydicom.dcmread(io.BytesIO(_encoded(ds))))
    clean = _dataset("P0000^X")
    clean.PatientID, clean.PatientBirthDate = "P0000", ""
    assert find_leaks(values, _encoded(clean)) == []
    block = clean.private_block(0x0009, "ACME", create=True)
    block.add_new(0x01, "LO", "Quintero")
    assert find_leaks(values, _encoded(clean)) == ["PatientName"]
    del clean[0x00091001]
    block.add_new(0x02, "OB", b"\x01\x02" + "MRN-7731902".encode("utf-16-le") + b"\xff\xfe")
    assert find_leaks(values, _encoded(clean)) == ["PatientID"]


def test_short_values_rule():
    """Values under 6 characters are no evidence (not searched), except ideographic ones from 2 characters;
    a person name is also searched whole, so a short family name still counts inside the full name."""
    from imaging_tasks.phi_audit import long_enough

    assert not long_enough("12345") and not long_enough("Li") and long_enough("MRN-77")
    assert long_enough("小東") and not long_enough("王")
    ds = _dataset("Li^Wu", "ISO_IR 192")
    ds.PatientID = "1234"
    values = dicom_identifying_values(pydicom.dcmread(io.BytesIO(_encoded(ds))))
    assert "PatientName" not in values and "PatientID" not in values  # too short to be evidence
    ds = _dataset("Li^Weiwei")
    values = dicom_identifying_values(pydicom.dcmread(io.BytesIO(_encoded(ds))))
    assert values["PatientName"] == {"Li^Weiwei", "Weiwei"}
    assert find_leaks(values, b"patient Li Weiwei") == ["PatientName"]
    ds = _dataset("Wang^XiaoDong=王^小東", "GB18030")
    values = dicom_identifying_values(pydicom.dcmread(io.BytesIO(_encoded(ds))))
    assert "小東" in values["PatientName"]
    assert find_leaks(values, "病人小東先生".encode("utf-8")) == ["PatientName"]  # no word boundaries in CJK


def test_garbled_headers_are_bad_inputs_not_crashes():
    """The audit's walk raises BadInput for values that do not decode and for nesting past the limit."""
    from pydicom.dataelem import RawDataElement
    from pydicom.sequence import Sequence
    from pydicom.tag import Tag

    from imaging_tasks.errors import BadInput

    ds = _dataset("Quintero^Pilar")
    ds._dict[Tag(0x00100020)] = RawDataElement(Tag(0x00100020), "ZZ", 4, b"abcd", 0, False, True)
    with pytest.raises(BadInput, match="unreadable_dicom"):
        dicom_identifying_values(ds)
    deep = inner = Dataset()
    for _ in range(70):
        item = Dataset()
        inner.ReferencedImageSequence = Sequence([item])
        inner = item
    inner.PatientName = "Quintero^Pilar"
    with pytest.raises(BadInput, match="nesting_too_deep"):
        dicom_identifying_values(deep)


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
    from imaging_tasks.cardiovascular.synth import synthesize

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
    """Break the de-identifier on purpose: the audit fails the study closed (no retry), nothing is processed or
    loaded, and the run fails naming it."""
    import imaging_tasks.deid.dicom as deid_dicom
    import imaging_tasks.phi_audit as phi_audit
    from imaging_tasks.cardiovascular.synth import synthesize

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
    # the audit's batch goes on for its other studies; the leaking one is failed, never retried, never processed
    assert states["deidentify"] == "success" and states["audit_phi"] == "success"
    assert states["route_series"] in ("skipped", None) and states["load_metadata"] == "failed"
    (record,) = _ledger_rows(buckets["lake"])
    assert (record["state"], record["step"], record["reason"]) == ("failed", "audit_phi", "phi_audit_failed")
    assert not (buckets["lake"] / "derived").exists()
    assert not buckets["warehouse"].exists() or _studies(buckets["warehouse"]) == 0


def _ledger_rows(lake) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in (lake / "ledger" / "cardiovascular" / "studies").glob("*.json")]


def _studies(path) -> int:
    from imaging_tasks.warehouse import DuckDBWarehouse

    return DuckDBWarehouse(path).count("studies")
