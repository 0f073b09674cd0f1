"""Fail-closed check that identifying values read from an input do not survive in its outputs.

The audit reports which *attribute* leaked, never the value, so its own error cannot leak PHI.
"""
from __future__ import annotations

import re

import pydicom

# Attributes whose raw values must never appear in de-identified output.
DICOM_IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "AccessionNumber",
                     "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "OperatorsName",
                     "PerformingPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                     "FrameOfReferenceUID", "OtherPatientIDs", "DeviceSerialNumber", "StationName", "StudyDate",
                     "PatientMotherBirthName", "OtherPatientNames", "StudyID", "RequestingPhysician")
MIN_LEN = 6  # shorter values (sex, a 4-digit ID) match random bytes too often to be evidence


class PHILeak(RuntimeError):
    """Raised when an output still carries an input's identifying value: the task must fail, not publish."""


# Attributes an enabled PS3.15 option keeps on purpose: not leaks when that option is on.
RETAINED_BY_OPTION = {
    "retain_device_identity": {"DeviceSerialNumber", "StationName"},
    "retain_institution_identity": {"InstitutionName", "InstitutionAddress"},
    "retain_uids": {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"},
}


def retained_by(options) -> frozenset[str]:
    """Attributes kept by the options of a ``DeidOptions`` (None: the default profile keeps none)."""
    return frozenset(a for name, attrs in RETAINED_BY_OPTION.items() if getattr(options, name, False)
                     for a in attrs)


def dicom_identifying_values(ds: pydicom.Dataset, retained: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """attribute -> identifying strings (whole values and person-name components), top level and nested;
    attributes in ``retained`` (kept by an option) are left out."""
    found: dict[str, set[str]] = {}

    def visit(dataset: pydicom.Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif elem.keyword in DICOM_IDENTIFYING and elem.keyword not in retained and elem.value not in (None, ""):
                values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
                for v in values:
                    text = str(v)
                    parts = {text, *re.split(r"[\^= ]+", text)} if elem.VR == "PN" else {text}
                    found.setdefault(elem.keyword, set()).update(p for p in parts if len(p) >= MIN_LEN)

    visit(ds)
    return found


def slide_identifying_values(description: str, technical_fields: set[str]) -> dict[str, set[str]]:
    """Values of Aperio description fields that are not purely technical (Filename, User, Date, ...)."""
    found: dict[str, set[str]] = {}
    for field in description.split("|")[1:]:
        name, _, value = field.partition("=")
        name, value = name.strip(), value.strip()
        if name and name not in technical_fields and len(value) >= MIN_LEN:
            found.setdefault(name, set()).add(value)
    return found


def find_leaks(values: dict[str, set[str]], blob: bytes) -> list[str]:
    """Names of attributes whose values occur in ``blob`` (raw bytes, in any encoding of ``_ENCODINGS``)."""
    return sorted({attr for attr, needle in _compile(values) if needle in blob})


def assert_no_leaks(values: dict[str, set[str]], blob: bytes, what: str) -> None:
    leaked = find_leaks(values, blob)
    if leaked:
        raise PHILeak(f"{what}: identifying values of {', '.join(leaked)} survived de-identification; "
                      "nothing was published — fix the de-identification profile before re-running")


# --------------------------------------------------------------------------- the audit step
# Encodings an identifying value may have been written in (SpecificCharacterSet terms ISO_IR 100/192,
# ISO 2022 IR 87/149, GB18030, ISO_IR 144...): a value is searched for in each it can be encoded in.
_ENCODINGS = ("utf-8", "utf-16-le", "latin-1", "iso2022_jp", "euc_kr", "gb18030", "cp1251", "iso8859_5",
              "shift_jis")
_CHUNK = 8 << 20


def _variants(text: str) -> set[bytes]:
    out = set()
    for enc in _ENCODINGS:
        try:
            out.add(text.encode(enc))
        except (UnicodeEncodeError, LookupError):
            pass
    if "^" in text:  # PN components may be written with spaces by free-text fields
        out.add(text.replace("^", " ").encode("utf-8"))
    return {v for v in out if len(v) >= MIN_LEN}


def _compile(values: dict[str, set[str]]) -> list[tuple[str, bytes]]:
    return sorted({(attr, v) for attr, strings in values.items() for s in strings for v in _variants(s)})


def scan_stream(values: dict[str, set[str]], fh, *, chunk: int = _CHUNK) -> list[str]:
    """Attributes whose values occur in a binary stream, read in chunks (slides are gigabytes)."""
    needles = _compile(values)
    if not needles:
        return []
    overlap = max(len(v) for _a, v in needles) - 1
    leaked, tail = set(), b""
    while True:
        block = fh.read(chunk)
        if not block:
            return sorted(leaked)
        window = tail + block
        leaked.update(a for a, v in needles if a not in leaked and v in window)
        tail = window[-overlap:] if overlap else b""


def values_of_input(uri: str) -> dict[str, set[str]]:
    """Identifying values held by one raw input (DICOM header, slide description, NIfTI text fields).

    Reads headers only where the format allows; an input that cannot be parsed yields nothing (it was
    quarantined, and quarantine is the PHI zone).
    """
    import gzip

    from imaging_tasks import storage
    from imaging_tasks.index import SLIDE_SUFFIXES

    name = str(uri).lower()
    path = storage.as_path(uri)
    try:
        if name.endswith(SLIDE_SUFFIXES):
            from imaging_tasks.deid.slide import TECHNICAL_FIELDS, read_description
            return slide_identifying_values(read_description(path), set(TECHNICAL_FIELDS))
        if name.endswith((".nii", ".nii.gz")):
            data = path.read_bytes()
            return nifti_identifying_values(gzip.decompress(data) if name.endswith(".gz") else data)
        from imaging_tasks.dicom_io import read_header
        with path.open("rb") as fh:
            return dicom_identifying_values(read_header(fh))
    except Exception:  # noqa: BLE001 - BadInput, OSError, or what tifffile/nibabel raise on garbled input
        return {}


def nifti_identifying_values(data: bytes) -> dict[str, set[str]]:
    """Text fields of a NIfTI-1/2 header and the printable runs of its extensions."""
    import io

    import nibabel as nib

    found: dict[str, set[str]] = {}
    try:
        klass = nib.Nifti2Header if int.from_bytes(data[:4], "little") == 540 or \
            int.from_bytes(data[:4], "big") == 540 else nib.Nifti1Header
        header = klass.from_fileobj(io.BytesIO(data))
    except Exception:  # noqa: BLE001
        return found
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        if field in header:
            text = bytes(header[field].tobytes()).split(b"\0")[0].decode("latin-1").strip()
            if len(text) >= MIN_LEN:
                found.setdefault(field, set()).add(text)
    for ext in header.extensions:
        runs = re.findall(rb"[\x20-\x7e]{%d,}" % MIN_LEN, bytes(ext.content))  # raw bytes, whatever the code
        found.setdefault("extension", set()).update(r.decode("ascii").strip() for r in runs[:200])
    return {k: v for k, v in found.items() if v}


def audit(values: dict[str, set[str]], *, files=(), payloads=()) -> dict:
    """Prove none of ``values`` survives in ``files`` (URIs; raw bytes, gzip content too) or ``payloads``
    (anything JSON-serialisable: XComs, warehouse rows).  Raises PHILeak naming attributes, never values.
    """
    import gzip
    import json

    from imaging_tasks import storage

    n_bytes, n_files = 0, 0
    for uri in files:
        path = storage.as_path(uri)
        opener = gzip.open if str(uri).lower().endswith(".gz") else None
        with path.open("rb") as raw:
            fh = opener(raw) if opener else raw
            leaked = scan_stream(values, fh)
            n_bytes += raw.tell() if hasattr(raw, "tell") else 0
        n_files += 1
        if leaked:
            raise PHILeak(f"output file {path.name}: identifying values of {', '.join(leaked)} survived "
                          "de-identification; fail closed - nothing downstream runs on this study. Fix the "
                          "de-identification profile, delete the study's anonymized/ folder and re-run")
    for label, payload in payloads:
        blob = json.dumps(payload, default=str, ensure_ascii=False, sort_keys=True).encode("utf-8")
        assert_no_leaks(values, blob, label)
    return {"files": n_files, "bytes": n_bytes, "payloads": len(payloads),
            "values": sum(len(v) for v in values.values())}


def merge(*value_maps: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in value_maps:
        for k, v in m.items():
            out.setdefault(k, set()).update(v)
    return out
