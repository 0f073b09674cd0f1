"""JSON sidecar de-identification (the ``<stem>.json`` beside a NIfTI upload): an allow-list, not a block-list.

Converters (dcm2niix) and BIDS curation put whatever the DICOM header had into the sidecar: institution, station,
device serial number, study description (often with the patient's name), acquisition date-times.  Only the
acquisition facts the neuroimaging chain needs are kept, each checked for its type (a number where a number is
expected, a short code where a code is): what a key of the wrong type holds is dropped too.

* PET (BIDS PET keys, and the ones dcm2niix writes): units, tracer and radionuclide, injected radioactivity and
  mass, half-life, frame start times and durations, decay correction.
* MR: field strength, TR/TE/TI, flip angle, acquisition type, slice thickness and spacing; for BOLD and DWI
  slice timing, task name, phase encoding and readout timing.
* Clock times are never kept (``TimeZero``, ``AcquisitionTime``, ``SeriesTime``, injection clock times, and every
  date).  What the chain uses is only their difference: BIDS ``InjectionStart``/``ScanStart`` are already seconds
  relative to ``TimeZero`` and are kept; where the sidecar has clock times only (dcm2niix style: an injection
  time such as ``RadiopharmaceuticalStartTime`` and ``AcquisitionTime``/``SeriesTime``), they become
  ``ScanStart = 0`` and ``InjectionStart = injection - scan start`` in seconds (wrapped into +-12 h), and the
  clock times go.  The DICOM path keeps times of day under the Modified Dates option (whole-day date shift), so
  both give the same injection-to-scan interval.
* Patient characteristics (``BodyWeight``/``PatientWeight`` in kg, ``PatientSize``/``BodyHeight``,
  ``PatientSex``, ``PatientAge``) only with the PS3.15 Retain Patient Characteristics option (SUV needs the
  weight; SUVR needs none of it).
* Device identity (``Manufacturer``, model, serial number, station, software versions) is dropped.

The PHI audit (``phi_audit.sidecar_identifying_values``) treats every string (and every long integer) of a
key not kept here as identifying, so a value this module failed to drop fails the study closed.
"""
from __future__ import annotations

import json
import math
import re

from imaging_tasks.errors import BadInput

# key -> kind: "number" (finite int/float), "numbers" (a number or a list of them), "bool", "code" (a short
# string of letters, digits and unit punctuation), "codes" (a code or a list of them).
PET_KEYS = {
    "Units": "code", "TracerName": "code", "TracerRadionuclide": "code", "TracerMolecularWeight": "number",
    "TracerMolecularWeightUnits": "code", "InjectedRadioactivity": "number", "InjectedRadioactivityUnits": "code",
    "InjectedMass": "number", "InjectedMassUnits": "code", "SpecificRadioactivity": "number",
    "SpecificRadioactivityUnits": "code", "ModeOfAdministration": "code", "InjectionStart": "number",
    "InjectionEnd": "number", "ScanStart": "number", "FrameTimesStart": "numbers", "FrameDuration": "numbers",
    "DecayCorrectionFactor": "numbers", "ImageDecayCorrected": "bool", "ImageDecayCorrectionTime": "number",
    "RadionuclideHalfLife": "number", "RadionuclidePositronFraction": "number", "RadionuclideTotalDose": "number",
    "DecayCorrection": "code", "AttenuationCorrection": "code", "ReconMethodName": "code",
}
MR_KEYS = {
    "MagneticFieldStrength": "number", "RepetitionTime": "number", "EchoTime": "numbers",
    "InversionTime": "number", "FlipAngle": "number", "MRAcquisitionType": "code", "ScanningSequence": "codes",
    "SequenceVariant": "codes", "PixelBandwidth": "number", "ImagingFrequency": "number",
    # BOLD and DWI (what the GLM and the tensor fit read, and what a reader of the outputs needs to judge them)
    "SliceTiming": "numbers", "TaskName": "code", "PhaseEncodingDirection": "code", "EffectiveEchoSpacing": "number",
    "TotalReadoutTime": "number", "MultibandAccelerationFactor": "number", "DelayTime": "number",
    "NumberOfVolumesDiscardedByScanner": "number",
}
COMMON_KEYS = {"Modality": "code", "SliceThickness": "number", "SpacingBetweenSlices": "number",
               "ImageType": "codes"}
PATIENT_CHARACTERISTICS = {"BodyWeight": "number", "PatientWeight": "number", "BodyHeight": "number",
                           "PatientSize": "number", "PatientSex": "code", "PatientAge": "code"}
KEPT = {**PET_KEYS, **MR_KEYS, **COMMON_KEYS}
ALL_KEPT = frozenset({*KEPT, *PATIENT_CHARACTERISTICS})  # kept under some option (the PHI audit's exclusions)

# Clock times of injection and of the scan start, as converters spell them (first present wins).
INJECTION_CLOCK = ("InjectionTime", "RadiopharmaceuticalStartTime", "InjectionStartTime")
SCAN_CLOCK = ("AcquisitionTime", "SeriesTime", "ScanStartTime")
_CODE = re.compile(r"[A-Za-z0-9_+\-./^%()\[\] ]{1,64}")
_CLOCK = re.compile(r"(?:\d{4}-\d{2}-\d{2}[T ])?(\d{2}):?(\d{2}):?(\d{2}(?:\.\d+)?)")
MAX_BYTES = 1 << 20  # a sidecar is a few kB; anything near this is not one


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid(kind: str, value) -> bool:
    if kind == "number":
        return _number(value)
    if kind == "numbers":
        return _number(value) or (isinstance(value, list) and 0 < len(value) <= 10_000 and all(map(_number, value)))
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "code":
        return isinstance(value, str) and bool(_CODE.fullmatch(value))
    if kind == "codes":
        return _valid("code", value) or (isinstance(value, list) and 0 < len(value) <= 32
                                         and all(_valid("code", v) for v in value))
    raise ValueError(kind)


def clock_seconds(value) -> float | None:
    """Seconds since midnight of a clock time (``hh:mm:ss[.f]``, ``hhmmss[.f]``, or the time of an ISO
    date-time); None when it is not one."""
    if not isinstance(value, str):
        return None
    m = _CLOCK.fullmatch(value.strip())
    if not m:
        return None
    h, mi, s = int(m[1]), int(m[2]), float(m[3])
    return h * 3600 + mi * 60 + s if h < 24 and mi < 60 and s < 61 else None


def _wrap(seconds: float) -> float:
    """A clock-time difference in (-12 h, 12 h]: an injection and its scan are on the same day or across midnight."""
    return round(-((-seconds + 43200.0) % 86400.0 - 43200.0), 3)


def _first_clock(doc: dict, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        seconds = clock_seconds(doc.get(k))
        if seconds is not None:
            return seconds
    return None


def deidentify_sidecar(data: bytes, *, retain_patient_characteristics: bool = False) -> tuple[bytes, dict]:
    """``(json bytes, info)``: only allow-listed keys of the right type; info = kept keys, number dropped (key
    names are not reported: a key can itself be a value) and the intervals derived from clock times.

    Raises BadInput("unreadable_sidecar") for a file that is not one JSON object in UTF-8."""
    try:
        if len(data) > MAX_BYTES:
            raise ValueError("too large")
        doc = json.loads(data.decode("utf-8-sig"))
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadInput("unreadable_sidecar", "the JSON sidecar is not one JSON object in UTF-8 (at most 1 MB); "
                       "re-export it (dcm2niix -b y writes one per NIfTI)") from None
    allowed = {**KEPT, **(PATIENT_CHARACTERISTICS if retain_patient_characteristics else {})}
    kept = {k: v for k, v in doc.items() if k in allowed and _valid(allowed[k], v)}
    derived = []
    injection = _first_clock(doc, INJECTION_CLOCK)
    if "InjectionStart" not in kept and injection is not None:
        zero = clock_seconds(doc.get("TimeZero"))
        if zero is not None:  # BIDS: times relative to TimeZero; a kept ScanStart stays as it is
            kept["InjectionStart"] = _wrap(injection - zero)
            derived = ["InjectionStart"]
        else:
            scan = _first_clock(doc, SCAN_CLOCK)
            if scan is not None:  # the scan start becomes the time zero
                kept["InjectionStart"], kept["ScanStart"] = _wrap(injection - scan), 0.0
                derived = ["InjectionStart", "ScanStart"]
    out = json.dumps(kept, sort_keys=True, indent=1, ensure_ascii=True).encode("ascii") + b"\n"
    return out, {"kept": sorted(kept), "dropped": len(doc) - len(set(kept) & set(doc)), "derived": derived}


__all__ = ["deidentify_sidecar", "clock_seconds", "KEPT", "ALL_KEPT", "PATIENT_CHARACTERISTICS"]
