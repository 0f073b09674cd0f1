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
                     "FrameOfReferenceUID", "OtherPatientIDs", "DeviceSerialNumber", "StationName")
MIN_LEN = 6  # shorter values (sex, a 4-digit ID) match random bytes too often to be evidence


class PHILeak(RuntimeError):
    """Raised when an output still carries an input's identifying value: the task must fail, not publish."""


def dicom_identifying_values(ds: pydicom.Dataset) -> dict[str, set[str]]:
    """attribute -> identifying strings (whole values and person-name components), top level and nested."""
    found: dict[str, set[str]] = {}

    def visit(dataset: pydicom.Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif elem.keyword in DICOM_IDENTIFYING and elem.value not in (None, ""):
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
    """Names of attributes whose values occur in ``blob`` (raw bytes, as ASCII/UTF-8 or UTF-16)."""
    leaked = []
    for attribute, strings in values.items():
        for s in strings:
            if s.encode() in blob or s.encode("utf-16-le") in blob:
                leaked.append(attribute)
                break
    return sorted(leaked)


def assert_no_leaks(values: dict[str, set[str]], blob: bytes, what: str) -> None:
    leaked = find_leaks(values, blob)
    if leaked:
        raise PHILeak(f"{what}: identifying values of {', '.join(leaked)} survived de-identification; "
                      "nothing was published — fix the de-identification profile before re-running")
