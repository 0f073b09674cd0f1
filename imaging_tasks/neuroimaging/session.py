"""One neuro session's inputs as images in patient space: the T1, the PET frames and the PET acquisition facts
(and a BOLD run with its events, a DWI series with its gradients), from de-identified DICOM series or from NIfTI
uploads; all DICOM/NIfTI geometry handling of the chain lives here.

:func:`load_session` takes the study's fetched files (``pipeline.fetch_instances``: DICOM as ``00001.dcm``,
anything else keeps its name after the number, ``00002-pet.nii.gz``, ``00003-pet.json``) and returns a
:class:`Session`: ``t1`` (3-D float32 SimpleITK image, LPS), ``pet_frames`` (3-D float32 each, in Bq/ml when the
unit says so, else in the stored unit; empty without PET), ``pet_facts`` (units, frame starts and durations,
decay correction, injected dose, injection-to-scan interval, half-life, weight or None), ``source``,
``n_mr_series``, ``n_pet_series``.  A study is either DICOM or NIfTI (the index never mixes them).

**DICOM**: series are grouped by SeriesInstanceUID from headers (``structural.group_series``); the T1 is the
first T1-named volumetric MR series that passes ``structural.check_inputs`` (every precondition and reason code
of :mod:`.structural`), loaded by ``preconditions.load_stack``.  PET: the attenuation-corrected BQML series if
there are several (then the one with most instances); a dynamic series is split into frames by ImageIndex and
NumberOfSlices when NumberOfTimeSlices > 1 (PS3.3 C.8.9.4: ImageIndex = (time slice - 1) x NumberOfSlices + slice),
else by distinct FrameReferenceTime; each frame is a checked stack of its own (same checks as the T1, at least
:data:`MIN_PET_SLICES` slices), loaded with its per-slice RescaleSlope/Intercept, and all frames must share one
grid (``mixed_geometry``).  Facts: Units, DecayCorrection, ActualFrameDuration, the Radiopharmaceutical
Information Sequence's RadionuclideTotalDose, RadionuclideHalfLife and RadiopharmaceuticalStartTime, and
PatientWeight (present only when de-identification ran with Retain Patient Characteristics).  The
injection-to-scan interval is SeriesTime (or the earliest AcquisitionTime if that is earlier) minus
RadiopharmaceuticalStartTime: only the difference is used, and de-identification keeps both times of day
unchanged under its default Retain Longitudinal Temporal Information with Modified Dates option (dates move by
whole days, times stay: checked on the synthetic PET); without that option the times are removed and the
interval is None (no SUV; SUVR is unaffected).

**NIfTI** (``mri.nii[.gz]``, ``pet.nii[.gz]``, optional ``pet.json``/``mri.json`` sidecars, de-identified by
``deid.sidecar``): read with nibabel; geometry from the sform when its code is > 0, else the qform, else
nibabel's pixdim-only base affine (the NIfTI-1 order of methods 3, 2, 1, as nibabel, FSL and SPM use it); a
sheared sform falls back to the qform (SimpleITK grids have orthonormal directions); spatial units in metres or
microns are converted to mm.  RAS+ world coordinates become LPS by negating x and y; the voxel array is stored
(i, j, k) = (x, y, z) and transposed to SimpleITK's (z, y, x) order.  A 4-D PET is split into frames along the
4th axis; facts come from the sidecar (BIDS PET keys, or the ones dcm2niix writes).

**BOLD and DWI** (a session may also hold one BOLD run and one DWI series): NIfTI uploads ``bold.nii.gz`` with
its BIDS events table (``events.tsv`` or ``bold_events.tsv``, as de-identification names it) and an optional
``bold.json`` (RepetitionTime), ``dwi.nii.gz`` with ``dwi.bval`` / ``dwi.bvec``; or DICOM series told apart from
the T1 by their headers (``series4d.classify_mr_series``: more than one volume; diffusion attributes make it DWI),
converted by dcm2niix (``series4d.load_4d_dicom``), with the events table from the folder of the BOLD files (the
index attaches it to the study).  Several runs of one kind: the largest is processed, and a note says so.  They are
loaded here too, so that a bad one refuses the session at the first step: ``bold_without_events``, the events
table's reasons (``events_columns``, ``events_values``, ...), the gradient reasons of ``dti.check_gradients``
(``dwi_volume_mismatch``, ``dwi_no_b0``, ``dwi_too_few_directions``) and the loading reasons of :mod:`.series4d`
(``dwi_without_gradients``, ``bold_no_tr``, ``bold_too_short``, ``dicom_4d_conversion``, ``mixed_geometry``).  A
BOLD or DWI without a T1 is ``no_mri``: they are registered to the session's T1.  :func:`load_4d` reads only them,
for the 4-D steps.

Refused (``BadInput``): ``no_mri`` (PET without an MR; or nothing at all), ``mri_4d`` (a 4-D MR NIfTI: fMRI or
DWI, not a T1), ``unreadable_nifti`` (a NIfTI that does not read, e.g. cut short), ``nifti_geometry`` (no usable
affine), ``not_volumetric`` (a 2-D NIfTI), ``mixed_sources`` (DICOM and NIfTI in one study),
``nifti_unknown_name`` / ``duplicate_nifti`` (names the index would have refused), and
``pet_not_covering_mri``: less than :data:`MIN_PET_COVERAGE` (50 %) of the head in the T1 (its Otsu foreground,
found on a 4x shrunk copy) lies inside the PET field of view, in physical space.  The head rather than the
MR grid, since MR grids carry air margins of any size; the brain is not known yet at this step.  Half the head
lets a PET with a short axial field of view through (the later steps report ROI coverage) while a PET of another
body part, or one whose position headers are wrong, is refused.

**Conversion, measured** (the synthetic T1 of ``synth.synthesize(out, 1, 0)``: 100 slices of 96x110 at 2 mm;
warm file cache; this 2-core CPU while other jobs ran; best of 9, median in brackets;
``tests/test_neuro_inputs.py`` checks all three agree on geometry to 1e-3 mm, axial and oblique, and on voxel
values): ``dcm2niix`` v1.0.20260724 (subprocess, uncompressed NIfTI into a tmp folder) 0.04 s (0.05 s), and about
0.01 s more to read the NIfTI back; SimpleITK ``ImageSeriesReader`` (GDCM) 0.10 s (0.12 s); this module's
checked loader 0.36 s (0.56 s), about half of it reading and checking every header with pydicom, half decoding the
pixels.  The checked loader stays in the pipeline: 0.3-0.5 s is under 1 % of the 60 s session budget, and it is
the one that refuses what cannot be processed with a reason code (missing or mixed geometry, irregular or
duplicate slices, invalid rescale, blank images) where the converters guess, warn on stderr or reorder
silently; it also keeps one code path with the other specialties' DICOM checks.  dcm2niix (a pinned dependency)
is the reference the tests hold our geometry to; it flips the row axis (LAS voxel order), which the tests allow
for by comparing corner sets and resampled values in physical space.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from imaging_tasks.errors import BadInput
from imaging_tasks.formats import file_kind
from imaging_tasks.neuroimaging import SPECIALTY

NIFTI_STEMS = dict(SPECIALTY.nifti_uploads or {"mri": "MR", "pet": "PT"})  # the record's names, as indexed
MIN_PET_SLICES = 8  # a PET frame with fewer slices does not cover a brain at any usual PET voxel size
MIN_PET_COVERAGE = 0.5  # fraction of the T1 head (foreground) that must lie inside the PET field of view
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
ORTHO_TOL = 1e-4
_FETCHED = re.compile(r"^\d{5}-")  # pipeline.fetch_instances' numeric prefix
UNIT_SCALE_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}
ACTIVITY_TO_BQ = {"BQ": 1.0, "KBQ": 1e3, "MBQ": 1e6, "GBQ": 1e9, "CI": 3.7e10, "MCI": 3.7e7, "UCI": 3.7e4}
CONCENTRATION = {"BQ/ML": 1.0, "BQML": 1.0, "KBQ/ML": 1e3, "KBQML": 1e3, "MBQ/ML": 1e6}
# Half-lives (s) of the usual PET radionuclides, for sidecars that name the nuclide but not its half-life.
HALF_LIFE_S = {"18F": 6586.2, "11C": 1221.8, "15O": 122.24, "13N": 597.9, "68GA": 4062.6, "89ZR": 282_240.0,
               "64CU": 45_720.0, "82RB": 76.38}


@dataclass
class Session:
    t1: sitk.Image
    pet_frames: list[sitk.Image]
    pet_facts: dict
    source: str  # "dicom" | "nifti"
    n_mr_series: int
    n_pet_series: int
    notes: list[str] = field(default_factory=list)
    bold: object | None = None  # series4d.Volume4D of the BOLD run, with ``events`` beside it
    events: list | None = None  # glm.Event rows of the BOLD's events table
    dwi: object | None = None  # series4d.Volume4D with bvals/bvecs


# Sidecar file names as de-identification writes them (``<stem>.json``, ``bold_events.tsv``, ``dwi.bval``, ...)
_SIDECAR_SUFFIXES = (".json", "events.tsv", ".bval", ".bvec")


def _split(files: list[Path]) -> tuple[dict[str, Path], dict[str, Path], list[Path]]:
    """The fetched files as NIfTI by stem, sidecars by name (``bold_events.tsv``, ``dwi.bval``, ``pet.json``)
    and DICOM files."""
    niftis: dict[str, Path] = {}
    sidecars: dict[str, Path] = {}
    dicoms: list[Path] = []
    for f in map(Path, files):
        name = _FETCHED.sub("", f.name)
        if file_kind(name) == "nifti":
            stem = re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE).lower()
            if stem not in NIFTI_STEMS:
                raise BadInput("nifti_unknown_name", f"a NIfTI named {stem!r}: a session holds mri.nii.gz (the T1) "
                               f"and optionally {', '.join(s + '.nii.gz' for s in NIFTI_STEMS if s != 'mri')}; "
                               "rename it")
            if stem in niftis:
                raise BadInput("duplicate_nifti", f"two {stem} NIfTI files in one session; keep one")
            niftis[stem] = f
        elif name.lower().endswith(_SIDECAR_SUFFIXES):
            sidecars[name.lower()] = f
        else:
            dicoms.append(f)
    if niftis and dicoms:
        raise BadInput("mixed_sources", "the session holds both DICOM and NIfTI files; send one or the other")
    return niftis, sidecars, dicoms


def load_session(files: list[Path]) -> Session:
    """The session's T1, PET frames and PET facts, and its BOLD run (with events) and DWI series when it has
    them, from its fetched files (see the module docstring).  Loading the BOLD and DWI here too refuses a bad
    one (no events, no gradients, counts that disagree) before any processing."""
    niftis, sidecars, dicoms = _split(files)
    if niftis or (sidecars and not dicoms):
        session = _load_nifti_session(niftis, {k[:-5]: v for k, v in sidecars.items() if k.endswith(".json")})
        session.bold, session.events, session.dwi = _nifti_4d(niftis, sidecars, session.notes)
    else:
        session, bold_series, dwi_series = _load_dicom_session(dicoms)
        session.bold, session.events, session.dwi = _dicom_4d(bold_series, dwi_series, sidecars, session.notes)
    return session


def load_4d(files: list[Path], kind: str) -> tuple:
    """Only the session's BOLD (``kind="bold"``: ``(Volume4D, events)``) or DWI (``(Volume4D, None)``), or
    ``(None, None)`` when it has none: what the 4-D steps read, without loading the T1 and PET again."""
    from imaging_tasks.neuroimaging.structural import group_series

    niftis, sidecars, dicoms = _split(files)
    if niftis or not dicoms:
        bold, events, dwi = _nifti_4d({k: v for k, v in niftis.items() if k == kind}, sidecars, [])
    else:
        series = [s for s in group_series(dicoms) if s.modality == "MR"]
        found = _classified(series)
        bold, events, dwi = _dicom_4d(found["bold"] if kind == "bold" else [], found["dwi"] if kind == "dwi" else [],
                                      sidecars, [])
    return (bold, events) if kind == "bold" else (dwi, None)


def _classified(series: list) -> dict[str, list]:
    from imaging_tasks.neuroimaging.series4d import classify_mr_series

    kinds = {s.uid: classify_mr_series(s.headers) if s.modality == "MR" else "other" for s in series}
    return {k: [s for s in series if kinds[s.uid] == k] for k in ("bold", "dwi", "anatomical", "other")}


# --------------------------------------------------------------------------- BOLD and DWI
def _events(sidecars: dict[str, Path], has_bold: bool, notes: list[str]) -> list | None:
    from imaging_tasks.neuroimaging.glm import read_events

    path = sidecars.get("bold_events.tsv") or sidecars.get("events.tsv")  # as de-identified, or as uploaded
    if not has_bold:
        if path is not None:
            notes.append("an events table without a BOLD series: ignored")
        return None
    if path is None:
        raise BadInput("bold_without_events", "the session has a BOLD series but no events table; upload the "
                       "run's BIDS events.tsv (onset, duration, trial_type) beside it (bold_events.tsv or "
                       "events.tsv next to bold.nii.gz, or in the folder of the BOLD DICOM files)")
    return read_events(path)


def _checked_dwi(volume):
    from imaging_tasks.neuroimaging.dti import check_gradients

    volume.bvals, volume.bvecs = check_gradients(volume.bvals, volume.bvecs, volume.data.shape[3])
    return volume


def _nifti_4d(niftis: dict[str, Path], sidecars: dict[str, Path], notes: list[str]) -> tuple:
    from imaging_tasks.neuroimaging.series4d import load_4d_nifti

    bold = dwi = None
    if "bold" in niftis:
        bold = load_4d_nifti(niftis["bold"], "bold", sidecar=sidecars.get("bold.json"))
    events = _events(sidecars, bold is not None, notes)
    if "dwi" in niftis:
        dwi = _checked_dwi(load_4d_nifti(niftis["dwi"], "dwi", sidecar=sidecars.get("dwi.json"),
                                         bval=sidecars.get("dwi.bval"), bvec=sidecars.get("dwi.bvec")))
    return bold, events, dwi


def _dicom_4d(bold_series: list, dwi_series: list, sidecars: dict[str, Path], notes: list[str]) -> tuple:
    """The BOLD run and the DWI series of a DICOM session: the one with most files of each kind (a session
    with several runs gets the largest, and says so)."""
    from imaging_tasks.neuroimaging.series4d import load_4d_dicom

    picked = {}
    for kind, found in (("bold", bold_series), ("dwi", dwi_series)):
        if len(found) > 1:
            notes.append(f"{len(found)} {kind.upper()} series: the largest is processed, the others are not")
        picked[kind] = max(found, key=lambda s: len(s.paths)) if found else None
    bold = load_4d_dicom(picked["bold"].paths, "bold") if picked["bold"] else None
    events = _events(sidecars, bold is not None, notes)
    dwi = _checked_dwi(load_4d_dicom(picked["dwi"].paths, "dwi")) if picked["dwi"] else None
    return bold, events, dwi


# --------------------------------------------------------------------------- NIfTI
def nifti_geometry(header) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(spacing (3,), direction 3x3, origin (3,)) in LPS mm, and which affine was used, of a NIfTI header."""
    candidates = []
    if int(header["sform_code"]) > 0:
        candidates.append(("sform", header.get_sform()))
    if int(header["qform_code"]) > 0:
        candidates.append(("qform", header.get_qform()))
    if not candidates:
        candidates.append(("pixdim", header.get_base_affine()))
    scale = UNIT_SCALE_TO_MM.get(header.get_xyzt_units()[0], 1.0)
    for which, affine in candidates:
        lps = LPS_FROM_RAS @ (np.asarray(affine, dtype=float)[:3] * scale)
        matrix = lps[:, :3]
        spacing = np.linalg.norm(matrix, axis=0)
        if not np.all(np.isfinite(lps)) or np.any(spacing <= 0):
            continue
        direction = matrix / spacing
        if np.max(np.abs(direction.T @ direction - np.eye(3))) > ORTHO_TOL:
            continue  # sheared: not a SimpleITK grid
        return spacing, direction, lps[:, 3], which
    raise BadInput("nifti_geometry", "the NIfTI has no usable voxel-to-world affine (sform sheared or degenerate, "
                   "no valid qform); re-export it with its scanner geometry (dcm2niix writes both)")


def image_from_xyz(arr: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """A nibabel-style array ((x, y, z), RAS+ affine) as a float32 SimpleITK image in LPS: the one conversion
    between the 4-D steps' arrays (BOLD, DWI, as nibabel, nilearn and dipy hold them) and the chain's images."""
    lps = LPS_FROM_RAS @ np.asarray(affine_ras, dtype=float)[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr, dtype=np.float32).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple((lps / spacing).ravel().tolist()))
    img.SetOrigin(tuple((LPS_FROM_RAS @ np.asarray(affine_ras, dtype=float)[:3, 3]).tolist()))
    return img


def read_nifti(path: Path, what: str) -> list[sitk.Image]:
    """The volumes of a NIfTI as 3-D float32 SimpleITK images in LPS (one per 4th-axis index), scaling applied."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError("not NIfTI")
        data = np.asanyarray(img.dataobj.get_unscaled())  # stored type: a 4-D PET is scaled frame by frame
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)  # nibabel: 1 and 0 when unset
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip, zlib and numpy raise many types on cut files
        raise BadInput("unreadable_nifti", f"{what} does not read as a NIfTI ({type(exc).__name__}); the file is "
                       "corrupt or cut short, re-export it") from None
    spacing, direction, origin, _which = nifti_geometry(img.header)
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3 or min(data.shape[:3]) < 2:
        raise BadInput("not_volumetric", f"{what} has shape {tuple(data.shape)}: not a 3-D volume; send the 3-D "
                       "image")
    if data.ndim > 4:
        raise BadInput("unreadable_nifti", f"{what} has {data.ndim} dimensions; a session holds 3-D images and "
                       "4-D PET only")
    out = []
    for t in range(1 if data.ndim == 3 else data.shape[3]):
        arr = (data if data.ndim == 3 else data[..., t]).astype(np.float32)
        if (slope, inter) != (1.0, 0.0):
            arr = arr * np.float32(slope) + np.float32(inter)
        if not np.all(np.isfinite(arr)):
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetDirection(tuple(float(v) for v in direction.ravel()))
        image.SetOrigin(tuple(float(v) for v in origin))
        out.append(image)
    return out


def _sidecar(path: Path | None) -> dict:
    import json

    if path is None:
        return {}
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError, OSError):
        raise BadInput("unreadable_sidecar", "the JSON sidecar does not read as JSON; re-export it") from None
    return doc if isinstance(doc, dict) else {}


def _load_nifti_session(niftis: dict[str, Path], sidecars: dict[str, Path]) -> Session:
    if "mri" not in niftis:
        found = ", ".join(sorted(niftis)) or "no NIfTI"
        raise BadInput("no_mri", f"the session has no mri.nii.gz (found {found}); PET alone cannot be processed, "
                       "upload the T1 as <patient>/<session>/mri.nii.gz")
    mri = read_nifti(niftis["mri"], "mri.nii.gz")
    if len(mri) > 1:
        raise BadInput("mri_4d", f"mri.nii.gz is 4-D ({len(mri)} volumes: fMRI, DWI or several echoes?); the chain "
                       "needs one 3-D T1-weighted volume; upload the T1 as mri.nii.gz")
    t1 = mri[0]
    _check_not_blank(t1)
    frames, facts, notes = [], {}, []
    if "pet" in niftis:
        frames = read_nifti(niftis["pet"], "pet.nii.gz")
        facts, notes = nifti_pet_facts(_sidecar(sidecars.get("pet")), len(frames))
        scale = facts.pop("_scale")
        if scale != 1.0:  # kBq/ml (...) into Bq/ml
            frames = [sitk.Cast(f * scale, sitk.sitkFloat32) for f in frames]
        facts["pet_mr_coverage"] = check_coverage(t1, frames[0])
    return Session(t1=t1, pet_frames=frames, pet_facts=facts, source="nifti", n_mr_series=1,
                   n_pet_series=int("pet" in niftis), notes=notes)


def _number(doc: dict, key: str) -> float | None:
    v = doc.get(key)
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else None


def _numbers(doc: dict, key: str, n: int) -> list[float] | None:
    v = doc.get(key)
    v = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    if isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  for x in v):
        return [float(x) for x in v]
    return None


def _nuclide(text) -> str | None:
    """'18Fluorine', '^18^Fluorine', 'F18', 'F-18', '[18F]' -> '18F'."""
    if not isinstance(text, str):
        return None
    t = re.sub(r"[^A-Z0-9]", "", text.upper())
    names = {"FLUORINE": "F", "CARBON": "C", "OXYGEN": "O", "NITROGEN": "N", "GALLIUM": "GA", "ZIRCONIUM": "ZR",
             "COPPER": "CU", "RUBIDIUM": "RB"}
    for name, symbol in names.items():
        t = t.replace(name, symbol)
    m = re.fullmatch(r"(\d+)([A-Z]{1,2})|([A-Z]{1,2})(\d+)", t)
    if not m:
        return None
    return f"{m[1]}{m[2]}" if m[1] else f"{m[4]}{m[3]}"


def nifti_pet_facts(doc: dict, n_frames: int) -> tuple[dict, list[str]]:
    """PET facts from a (de-identified) sidecar; ``_scale`` multiplies the voxels into Bq/ml where the unit is a
    multiple of it (kBq/ml...)."""
    notes = []
    units_raw = str(doc.get("Units") or "").strip()
    key = units_raw.upper().replace(" ", "")
    scale = CONCENTRATION.get(key)
    units = "BQML" if scale is not None else (units_raw or None)
    durations = _numbers(doc, "FrameDuration", n_frames)
    starts = _numbers(doc, "FrameTimesStart", n_frames)
    if ("FrameDuration" in doc and durations is None) or ("FrameTimesStart" in doc and starts is None):
        notes.append(f"sidecar frame timing does not match the {n_frames} frame(s) of pet.nii.gz; ignored")
    dose = _number(doc, "InjectedRadioactivity")
    if dose is not None:
        factor = ACTIVITY_TO_BQ.get(str(doc.get("InjectedRadioactivityUnits") or "MBq").upper().replace(" ", ""))
        dose = dose * factor if factor else None
    if dose is None:
        dose = _number(doc, "RadionuclideTotalDose")  # dcm2niix: Bq, as in DICOM
    injection, scan = _number(doc, "InjectionStart"), _number(doc, "ScanStart")
    half_life = _number(doc, "RadionuclideHalfLife") or HALF_LIFE_S.get(_nuclide(doc.get("TracerRadionuclide")) or "")
    weight = _number(doc, "BodyWeight") or _number(doc, "PatientWeight")
    decay = str(doc.get("DecayCorrection") or "").strip().upper() or None
    if decay is None and isinstance(doc.get("ImageDecayCorrected"), bool):
        when = _number(doc, "ImageDecayCorrectionTime")
        if not doc["ImageDecayCorrected"]:
            decay = "NONE"
        elif when is not None and injection is not None and abs(when - injection) < 1e-3:
            decay = "ADMIN"
        elif when is not None and abs(when - (scan if scan is not None else 0.0)) < 1e-3:
            decay = "START"
    return {"units": units, "frame_durations_s": durations, "frame_starts_s": starts, "decay_correction": decay,
            "injected_dose_bq": dose, "injection_to_scan_s": (scan - injection) if None not in (scan, injection)
            else None, "half_life_s": half_life, "weight_kg": weight if weight and weight > 0 else None,
            "tracer": doc.get("TracerName") if isinstance(doc.get("TracerName"), str) else None,
            "source": "nifti", "_scale": scale or 1.0}, notes


# --------------------------------------------------------------------------- DICOM
def _clock(value) -> float | None:
    """Seconds since midnight of a DICOM TM (HHMMSS.FFFFFF, or HH:MM:SS)."""
    text = str(value or "").strip().replace(":", "")
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d+)?", text)
    if not m:
        return None
    return int(m[1]) * 3600 + int(m[2] or 0) * 60 + int(m[3] or 0) + float(m[4] or 0)


def _load_dicom_session(files: list[Path]) -> tuple[Session, list, list]:
    """The session from its DICOM files, and its BOLD and DWI series (classified from headers, kept out of the
    T1's candidates)."""
    from imaging_tasks.neuroimaging.structural import _pick_checked, group_series, load_volume, to_sitk

    if not files:
        raise BadInput("no_mri", "the session holds no image; send the T1 MR (and the PET) of the session")
    series = group_series(files)
    four_d = _classified(series)
    if (four_d["bold"] or four_d["dwi"]) and not four_d["anatomical"]:
        raise BadInput("no_mri", "the session has BOLD or DWI series but no T1 MR series; the chain registers "
                       "them to the session's T1: send the T1 too")
    series = [s for s in series if s not in four_d["bold"] and s not in four_d["dwi"]]
    _t1, stack = _pick_checked(series)  # no_mri, not_volumetric and the geometry checks of structural
    t1 = to_sitk(load_volume(stack))
    pets = [s for s in series if s.modality == "PT"]
    frames, facts, notes = [], {}, list(stack.notes)
    if pets:
        frames, facts, pet_notes = load_pet_series(_pick_pet(pets))
        notes += pet_notes
        facts["pet_mr_coverage"] = check_coverage(t1, frames[0])
    session = Session(t1=t1, pet_frames=frames, pet_facts=facts, source="dicom",
                      n_mr_series=sum(1 for s in series if s.modality == "MR"), n_pet_series=len(pets), notes=notes)
    return session, four_d["bold"], four_d["dwi"]


def _pick_pet(pets: list) -> object:
    """Attenuation-corrected BQML first, then the series with most instances."""
    def rank(s):
        h = s.headers[0]
        corrected = "ATTN" in [str(v).upper() for v in (h.get("CorrectedImage") or [])]
        return (str(h.get("Units", "")).upper() != "BQML", not corrected, -len(s.paths))
    return sorted(pets, key=rank)[0]


def _frame_keys(headers: list) -> list[int]:
    """Frame index of each PET slice (see the module docstring)."""
    first = headers[0]

    def intval(ds, k):
        try:
            return int(ds.get(k))
        except (TypeError, ValueError):
            return None

    n_time, n_slices = intval(first, "NumberOfTimeSlices") or 1, intval(first, "NumberOfSlices")
    index = [intval(h, "ImageIndex") for h in headers]
    if n_time > 1 and n_slices and all(i is not None and i > 0 for i in index):
        return [(i - 1) // n_slices for i in index]
    refs = []
    for h in headers:
        try:
            refs.append(float(h.get("FrameReferenceTime")))
        except (TypeError, ValueError):
            refs.append(None)
    if None not in refs and len(set(refs)) > 1:
        order = sorted(set(refs))
        return [order.index(r) for r in refs]
    return [0] * len(headers)


def load_pet_series(series) -> tuple[list[sitk.Image], dict, list[str]]:
    """A PET series (structural.Series) as frames (checked stacks, rescaled per slice) and its facts."""
    from imaging_tasks.neuroimaging.structural import to_sitk
    from imaging_tasks.preconditions import check_stack, load_stack

    keys = _frame_keys(series.headers)
    frames, stacks, notes = [], [], []
    for k in sorted(set(keys)):
        items = [(p, h) for p, h, key in zip(series.paths, series.headers, keys, strict=True) if key == k]
        what = "the PET series" if len(set(keys)) == 1 else f"PET frame {k + 1}"
        stack = check_stack(items, what=what, min_slices=MIN_PET_SLICES, too_few_reason="not_volumetric",
                            too_few_why="a PET frame must cover the brain; send the whole reconstructed series")
        values = [(1.0 if s is None else s, 0.0 if i is None else i) for s, i in stack.rescale]
        frames.append(to_sitk(load_stack(stack, values, what)))
        stacks.append(stack)
        notes += stack.notes
    ref = frames[0]
    for k, f in enumerate(frames[1:], 2):
        if f.GetSize() != ref.GetSize() or not np.allclose(f.GetOrigin(), ref.GetOrigin(), atol=1e-3) or \
                not np.allclose(f.GetSpacing(), ref.GetSpacing(), rtol=1e-4) or \
                not np.allclose(f.GetDirection(), ref.GetDirection(), atol=1e-4):
            raise BadInput("mixed_geometry", f"PET frame {k} has another grid than frame 1; the frames of one "
                           "series must share one grid; send one reconstruction per series")
    return frames, dicom_pet_facts(stacks), notes


def dicom_pet_facts(stacks: list) -> dict:
    """PET facts from the de-identified headers of each frame's first slice (see the module docstring)."""
    first = stacks[0].headers[0]

    def num(ds, k):
        try:
            v = float(ds.get(k))
            return v if np.isfinite(v) else None
        except (TypeError, ValueError):
            return None

    rad = None
    seq = first.get("RadiopharmaceuticalInformationSequence")
    if seq:
        rad = seq[0]
    durations = [num(s.headers[0], "ActualFrameDuration") for s in stacks]
    acq = [_clock(h.get("AcquisitionTime")) for s in stacks for h in s.headers]
    frame_acq = [min((_clock(h.get("AcquisitionTime")) for h in s.headers if h.get("AcquisitionTime")),
                     default=None) for s in stacks]
    series_time = _clock(first.get("SeriesTime"))
    known = [a for a in acq if a is not None]
    scan = min([t for t in (series_time, min(known) if known else None) if t is not None], default=None)
    injection = _clock(rad.get("RadiopharmaceuticalStartTime")) if rad is not None else None
    interval = None
    if scan is not None and injection is not None:
        interval = (scan - injection + 43200.0) % 86400.0 - 43200.0  # across midnight
    starts = None
    if scan is not None and None not in frame_acq:
        starts = [round((a - scan) % 86400.0, 3) for a in frame_acq]
    elif None not in durations:
        starts = [float(v) for v in np.cumsum([0.0, *[d / 1000.0 for d in durations[:-1]]])]
    weight = num(first, "PatientWeight")
    units = str(first.get("Units", "") or "").strip().upper() or None
    return {"units": units,
            "frame_durations_s": None if None in durations else [d / 1000.0 for d in durations],
            "frame_starts_s": starts,
            "decay_correction": str(first.get("DecayCorrection", "") or "").strip().upper() or None,
            "injected_dose_bq": num(rad, "RadionuclideTotalDose") if rad is not None else None,
            "injection_to_scan_s": round(interval, 3) if interval is not None else None,
            "half_life_s": num(rad, "RadionuclideHalfLife") if rad is not None else None,
            "weight_kg": weight if weight and weight > 0 else None,
            "tracer": str(rad.get("Radiopharmaceutical", "") or "") or None if rad is not None else None,
            "source": "dicom"}


# --------------------------------------------------------------------------- checks
def _check_not_blank(t1: sitk.Image) -> None:
    arr = sitk.GetArrayViewFromImage(t1)
    if float(arr.max()) <= float(arr.min()):
        raise BadInput("blank_image", "every voxel of the T1 has the same value (a blank or failed reconstruction); "
                       "upload the T1")


def head_points_mm(t1: sitk.Image, shrink: int = 4) -> np.ndarray:
    """LPS points (N, 3) of the T1's head: its Otsu foreground on a shrunk copy."""
    small = sitk.Shrink(t1, [min(shrink, max(1, n // 8)) for n in t1.GetSize()])
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.Cast(small, sitk.sitkFloat32), 0, 1, 128)) > 0
    idx = np.argwhere(mask)[:, ::-1].astype(float)  # (x, y, z) indices
    d = np.array(small.GetDirection()).reshape(3, 3)
    return idx * np.array(small.GetSpacing()) @ d.T + np.array(small.GetOrigin())


def fov_contains(image: sitk.Image, points_mm: np.ndarray) -> np.ndarray:
    """Whether each LPS point lies inside the image's field of view (voxel boxes included)."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    cont = (points_mm - np.array(image.GetOrigin())) @ d / np.array(image.GetSpacing())  # continuous index
    size = np.array(image.GetSize())
    return np.all((cont >= -0.5) & (cont <= size - 0.5), axis=1)


def check_coverage(t1: sitk.Image, pet: sitk.Image) -> float:
    """The fraction of the T1 head inside the PET field of view; BadInput ``pet_not_covering_mri`` below
    :data:`MIN_PET_COVERAGE`."""
    points = head_points_mm(t1)
    covered = float(fov_contains(pet, points).mean()) if len(points) else 0.0
    if covered < MIN_PET_COVERAGE:
        raise BadInput("pet_not_covering_mri", f"only {covered:.0%} of the head in the T1 lies inside the PET field "
                       f"of view (at least {MIN_PET_COVERAGE:.0%} is needed); the PET and MR do not show the same "
                       "anatomy (another body part, another session, or wrong position headers); send the PET of "
                       "this session's head")
    return round(covered, 4)


__all__ = ["Session", "load_session", "read_nifti", "nifti_geometry", "nifti_pet_facts", "load_pet_series",
           "dicom_pet_facts", "check_coverage", "fov_contains", "head_points_mm", "MIN_PET_COVERAGE"]
