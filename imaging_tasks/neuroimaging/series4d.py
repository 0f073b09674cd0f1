"""4-D MR inputs (BOLD fMRI, DWI): which series is which from the headers alone, and loading them from DICOM (via
the pinned ``dcm2niix``) or from NIfTI (+ BIDS sidecar, FSL ``.bval``/``.bvec``) into one :class:`Volume4D`.

**Classification** (:func:`classify_mr_series`, headers only, no pixels): a series is 4-D when it holds more than
one volume.  Volumes are counted from every place scanners put time: NumberOfTemporalPositions (> 1); the files
(or, in an enhanced multi-frame object, the frames) that share one slice position but differ in
TemporalPositionIdentifier / TemporalPositionIndex, AcquisitionNumber, acquisition time, TriggerTime or
diffusion weighting (same position *and* same values is a duplicate, not a volume; a different EchoNumbers at one
position is another echo, not another volume); a Siemens MOSAIC series (ImageType ``MOSAIC``: every file is a
whole volume, so more than one distinct file is 4-D).  A 4-D series is ``"dwi"`` when it carries diffusion
evidence, else ``"bold"``.  Diffusion evidence is what de-identification keeps (``deid.rules`` keeps unlisted
coded/numeric attributes, and the safe-private list under Retain Safe Private): DiffusionBValue (0018,9087) > 0,
DiffusionDirectionality DIRECTIONAL / ISOTROPIC / BMATRIX, a non-zero DiffusionGradientOrientation (top level or in
an MRDiffusionSequence, per frame or shared), the Siemens (0019,xx0C/0D/0E), GE (0043,xx39) and Philips
(2001,xx03) private b-value/direction tags, ``DIFFUSION`` in ImageType, or a Siemens diffusion SequenceName
(``*ep_b1000#3``; SequenceName is allow-listed).  Mere presence is not evidence: Philips puts an MR Diffusion
Sequence with b = 0 and directionality NONE into every frame of an enhanced fMRI object.
Anything else (one volume, a multi-echo or a localizer series, any non-MR modality such as a 4-D PET) is
``"anatomical"``: "not a 4-D MR series", which the T1 picker uses to skip BOLD and DWI.

Decision on a DWI series whose diffusion attributes were stripped: with ``DIFFUSION`` in ImageType or a diffusion
SequenceName left it still classifies as ``"dwi"`` and loading refuses it with ``dwi_without_gradients``; with no
diffusion evidence at all it is indistinguishable from fMRI by header and classifies as ``"bold"`` (loading it as
DWI, e.g. because its upload said so, still gives ``dwi_without_gradients``).

**Loading DICOM** (:func:`load_4d_dicom`): headers are checked first (one series, all MR, one echo, one grid: Rows,
Columns, PixelSpacing, ImageOrientationPatient agree to 1e-4, else ``mixed_geometry``), then ``dcm2niix -m y``
(stack the whole series: see :func:`run_dcm2niix` for why) converts the files
(linked under neutral names into a temporary folder) to an uncompressed NIfTI + BIDS sidecar (+ ``.bval``/``.bvec``),
read back with nibabel.  What dcm2niix does is the field's reference: slice/volume sorting, the row flip (its
NIfTI is LAS-like: voxel order differs from the DICOM rows, world coordinates do not), scaling, the per-vendor
diffusion conventions (it warns "assuming Philips" for 0018,9087 from an unknown manufacturer and still reads the
patient-frame vectors correctly; checked in ``tests/test_neuro_series4d.py``).  It is not asked to judge what it
cannot: more than one NIfTI out of one series means it split it (mixed echoes, sizes, orientations) and is
refused as ``mixed_geometry``; nothing out is ``dicom_4d_conversion`` with its error lines, paths removed.

**Loading NIfTI** (:func:`load_4d_nifti`): nibabel's affine (sform, else qform, else pixdim); TR from the BIDS
sidecar's RepetitionTime (seconds), else pixdim[4] when the header gives a time unit (s, ms, us): a NIfTI
written without a time unit has pixdim[4] = 1 by default in several writers, which is not a TR.

**Gradients**: the FSL ``.bvec`` convention is "along the voxel axes, x negated when the affine's determinant is
positive" (FSL and dcm2niix write it so; dcm2niix output has a negative determinant, where nothing changes).
:class:`Volume4D` holds ``bvecs`` along the array's voxel axes with no such flip (dipy's ``gradient_table``
convention for the same array): world RAS direction = ``R @ bvec``, ``R`` the affine's column-normalised 3x3.  b=0
volumes have zero vectors; others are normalised to unit length.

Refusals (``BadInput``): ``dicom_4d_conversion``, ``mixed_geometry``, ``not_4d``, ``unreadable_nifti``,
``unreadable_sidecar``, ``bold_no_tr``, ``bold_too_short`` (fewer than :data:`MIN_BOLD_VOLUMES` volumes),
``dwi_without_gradients`` (no b-values/vectors, or every b-value 0), ``dwi_gradients_unreadable``,
``dwi_volume_mismatch``.  Messages never quote paths or header values that could identify anyone.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imaging_tasks.errors import BadInput

KINDS = ("bold", "dwi")
MIN_BOLD_VOLUMES = 10
GEOMETRY_TOL = 1e-4
POSITION_DECIMALS = 2  # slice positions equal to 0.01 mm are one position
DCM2NIIX_TIMEOUT_S = 600
TIME_UNIT_TO_S = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
_SIEMENS_DIFFUSION_SEQUENCE = re.compile(r"^\*?ep_b\d", re.IGNORECASE)
# Private diffusion tags de-identification may keep (deid.rules.SAFE_PRIVATE): (creator, group, offset, meaning)
# Presence alone is no evidence: Philips writes an MR Diffusion Sequence (b = 0, directionality NONE) into every
# frame of an enhanced fMRI object, and GE writes its user CVs (0019,xxBB-BD) for every scan.  Evidence is a b-value
# > 0, a directional/isotropic/b-matrix directionality, or a non-zero gradient vector.
_PRIVATE_DIFFUSION = (
    ("SIEMENS MR HEADER", 0x0019, 0x0C, "b"), ("SIEMENS MR HEADER", 0x0019, 0x0D, "directionality"),
    ("SIEMENS MR HEADER", 0x0019, 0x0E, "vector"), ("GEMS_PARM_01", 0x0043, 0x39, "b"),
    ("PHILIPS MR IMAGING DD 001", 0x2001, 0x03, "b"),
)
_DIFFUSION_DIRECTIONALITY = {"DIRECTIONAL", "ISOTROPIC", "BMATRIX"}


@dataclass
class Volume4D:
    """A BOLD or DWI series as arrays: ``data`` (x, y, z, t) float32, ``affine`` 4x4 RAS mm (voxel -> world),
    ``tr_s`` (seconds; may be None for DWI), ``bvals`` (t,) s/mm^2 and ``bvecs`` (t, 3) voxel-axis unit vectors
    (DWI only), ``notes`` (what the conversion warned about, without paths)."""

    data: np.ndarray
    affine: np.ndarray
    kind: str
    tr_s: float | None = None
    bvals: np.ndarray | None = None
    bvecs: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_volumes(self) -> int:
        return int(self.data.shape[3])

    @property
    def frame_times_s(self) -> np.ndarray | None:
        """Volume start times (nilearn's default slice_time_ref = 0); None without a TR."""
        return None if self.tr_s is None else np.arange(self.n_volumes) * float(self.tr_s)


# --------------------------------------------------------------------------- classification
def _value(ds, keyword, default=None):
    try:
        v = ds.get(keyword, default)
    except Exception:  # noqa: BLE001 - a malformed value is as good as absent for classification
        return default
    return default if v is None or v == "" else v


def _number(v) -> float | None:
    try:
        if isinstance(v, (list, tuple)) or (hasattr(v, "__len__") and not isinstance(v, (str, bytes))):
            v = list(v)[0]
        x = float(v)
    except (TypeError, ValueError, IndexError):
        return None
    return x if np.isfinite(x) else None


def _first(ds, *path):
    """Item 0 of nested sequences by keyword, or None."""
    for keyword in path:
        seq = _value(ds, keyword)
        if not seq:
            return None
        ds = seq[0]
    return ds


def _private(ds, creator: str, group: int, offset: int):
    try:
        block = ds.private_block(group, creator)
        return block[offset].value
    except (KeyError, ValueError):
        return None


def _weighted_direction(v) -> bool:
    try:
        return bool(np.any(np.abs(np.asarray([float(x) for x in v])) > 1e-6))
    except (TypeError, ValueError):
        return False


def _diffusion_of(*items) -> tuple[bool, float | None]:
    """(diffusion evidence, b-value) from an image's header items (top level and functional-group items)."""
    evidence, b = False, None
    for ds in items:
        if ds is None:
            continue
        for source in (ds, _first(ds, "MRDiffusionSequence")):
            if source is None:
                continue
            v = _number(_value(source, "DiffusionBValue"))
            if v is not None:
                b = v if b is None else max(b, v)
                evidence = evidence or v > 0
            if str(_value(source, "DiffusionDirectionality", "")).upper() in _DIFFUSION_DIRECTIONALITY:
                evidence = True
            vec = _value(source, "DiffusionGradientOrientation")
            grad = _first(source, "DiffusionGradientDirectionSequence")
            if (vec is not None and _weighted_direction(vec)) or (
                    grad is not None and _weighted_direction(_value(grad, "DiffusionGradientOrientation", []))):
                evidence = True
        groups = {tag >> 16 for tag in ds.keys() if tag >> 16 & 1}  # private lookups are slow: only where present
        for creator, group, offset, meaning in _PRIVATE_DIFFUSION:
            v = _private(ds, creator, group, offset) if group in groups else None
            if v is None:
                continue
            if meaning == "b":
                num = _number(v)
                if num is not None and creator.startswith("GEMS"):
                    num = num % 1e9  # GE slop_int_6: b-value with a vendor offset in the billions
                if num is not None:
                    b = num if b is None else max(b, num)
                    evidence = evidence or num > 0
            elif meaning == "directionality":
                evidence = evidence or str(v).strip().upper() in _DIFFUSION_DIRECTIONALITY
            else:
                evidence = evidence or _weighted_direction(v if not isinstance(v, bytes) else [])
        image_type = {str(t).strip().upper() for t in (_value(ds, "ImageType") or [])}
        if "DIFFUSION" in image_type or _SIEMENS_DIFFUSION_SEQUENCE.match(str(_value(ds, "SequenceName", ""))):
            evidence = True
    return evidence, b


def _records(headers) -> list[dict]:
    """One record per 2-D image (a classic file, or a frame of an enhanced multi-frame object)."""
    out = []
    for f, ds in enumerate(headers):
        image_type = {str(t).strip().upper() for t in (_value(ds, "ImageType") or [])}
        per_frame = _value(ds, "PerFrameFunctionalGroupsSequence")
        shared = _first(ds, "SharedFunctionalGroupsSequence")
        if per_frame:
            for fr in per_frame:
                content = _first(fr, "FrameContentSequence")
                pos = _first(fr, "PlanePositionSequence") or (shared and _first(shared, "PlanePositionSequence"))
                echo = _first(fr, "MREchoSequence") or (shared and _first(shared, "MREchoSequence"))
                diff_item = fr if "MRDiffusionSequence" in fr else shared
                evidence, b = _diffusion_of(ds, diff_item)
                grad = _first(diff_item, "MRDiffusionSequence", "DiffusionGradientDirectionSequence") \
                    if diff_item is not None else None
                out.append({
                    "position": _position(pos), "echo": _number(_value(echo, "EffectiveEchoTime")) if echo else None,
                    "time": (_value(content, "TemporalPositionIndex"), _value(content, "FrameAcquisitionNumber"),
                             str(_value(content, "FrameAcquisitionDateTime", "")), b,
                             _vector(grad, "DiffusionGradientOrientation")) if content else (f,),
                    "diffusion": evidence, "mosaic": False, "file": f})
            continue
        evidence, b = _diffusion_of(ds)
        out.append({
            "position": _position(ds), "echo": _number(_value(ds, "EchoNumbers")),
            "time": (_value(ds, "TemporalPositionIdentifier"), _value(ds, "AcquisitionNumber"),
                     str(_value(ds, "AcquisitionTime", "")), _number(_value(ds, "TriggerTime")), b,
                     _vector(ds, "DiffusionGradientOrientation")),
            "diffusion": evidence, "mosaic": "MOSAIC" in image_type,
            "file": str(_value(ds, "SOPInstanceUID", "")) or f})
    return out


def _position(ds) -> tuple | None:
    v = _value(ds, "ImagePositionPatient") if ds is not None else None
    try:
        return tuple(round(float(x), POSITION_DECIMALS) for x in v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _vector(ds, keyword) -> tuple | None:
    v = _value(ds, keyword) if ds is not None else None
    try:
        return tuple(round(float(x), 6) for x in v) if v is not None else None
    except (TypeError, ValueError):
        return None


def count_volumes(headers, records: list[dict] | None = None) -> int:
    """How many volumes (time points or diffusion weightings) a series' headers describe (see module docstring)."""
    records = _records(headers) if records is None else records
    n = 1
    for ds in headers:
        declared = _number(_value(ds, "NumberOfTemporalPositions"))
        if declared is not None and declared > 1:
            n = max(n, int(declared))
    mosaic = [r for r in records if r["mosaic"]]
    if mosaic:
        n = max(n, len({r["file"] for r in mosaic}))  # every mosaic file is a whole volume
    groups: dict[tuple, set] = {}
    for r in records:
        if r["position"] is None:
            continue
        groups.setdefault((r["position"], r["echo"]), set()).add(r["time"])
    if groups:
        n = max(n, max(len(times) for times in groups.values()))
    return n


def classify_mr_series(headers) -> str:
    """``"dwi"``, ``"bold"`` or ``"anatomical"`` for one series' headers (pydicom Datasets; pixels not needed)."""
    headers = list(headers)
    if not headers or any(str(_value(ds, "Modality", "")).upper() != "MR" for ds in headers):
        return "anatomical"
    records = _records(headers)
    if count_volumes(headers, records) < 2:
        return "anatomical"
    return "dwi" if any(r["diffusion"] for r in records) else "bold"


# --------------------------------------------------------------------------- gradients
def read_fsl_text(path, what: str) -> np.ndarray:
    """Numbers of an FSL ``.bval``/``.bvec`` text file as a 2-D float array (rows as written).  NaN passes (dipy's
    own ``small_64D.bvec`` has it as the b=0 vector): :func:`gradients_from_fsl` allows it only there."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="strict")
        rows = [[float(x) for x in line.replace(",", " ").split()] for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError):
        raise BadInput("dwi_gradients_unreadable", f"the {what} file does not read as FSL text (numbers separated by "
                       "spaces); re-export it (dcm2niix writes .bval/.bvec beside the NIfTI)") from None
    if not rows or len({len(r) for r in rows}) != 1 or np.any(np.isinf(rows)):
        raise BadInput("dwi_gradients_unreadable", f"the {what} file is empty, ragged or holds infinite numbers; "
                       "re-export it")
    return np.asarray(rows, dtype=float)


def gradients_from_fsl(bvals_rows: np.ndarray, bvecs_rows: np.ndarray, affine: np.ndarray | None,
                       n_volumes: int) -> tuple[np.ndarray, np.ndarray]:
    """(bvals (n,), bvecs (n, 3) along the voxel axes, unit or zero) from FSL arrays (either orientation).

    ``affine``: the image's, for FSL's x-flip rule; None takes the vectors as written (dipy's
    ``read_bvals_bvecs``, for files that follow dipy's convention rather than FSL's)."""
    bvals = bvals_rows.reshape(-1) if 1 in bvals_rows.shape else None
    if bvecs_rows.shape[0] == 3 and (bvecs_rows.shape[1] == n_volumes or bvecs_rows.shape[1] != 3):
        bvecs = bvecs_rows.T
    elif bvecs_rows.shape[1] == 3:
        bvecs = bvecs_rows
    else:
        bvecs = None
    if bvals is None or bvecs is None:
        raise BadInput("dwi_gradients_unreadable", f"b-values of shape {bvals_rows.shape} / vectors of shape "
                       f"{bvecs_rows.shape}: expected one row of b-values and 3 rows (or 3 columns) of vectors")
    if len(bvals) != n_volumes or len(bvecs) != n_volumes:
        raise BadInput("dwi_volume_mismatch", f"{len(bvals)} b-values and {len(bvecs)} gradient vectors for "
                       f"{n_volumes} volumes; send the .bval/.bvec written with this NIfTI")
    if np.any(~np.isfinite(bvals)) or np.any(bvals < 0):
        raise BadInput("dwi_gradients_unreadable", "missing or negative b-values; re-export the .bval")
    bvecs = bvecs.astype(float).copy()
    if np.any(np.isnan(bvecs[bvals > 0])):
        raise BadInput("dwi_gradients_unreadable", "a diffusion-weighted volume has no gradient direction (NaN in the "
                       ".bvec); re-export the .bvec")
    bvecs[np.isnan(bvecs)] = 0.0  # the b = 0 volumes'
    if affine is not None and np.linalg.det(np.asarray(affine, float)[:3, :3]) > 0:  # FSL: x negated if det > 0
        bvecs[:, 0] = -bvecs[:, 0]
    norm = np.linalg.norm(bvecs, axis=1)
    weighted = bvals > 0
    # b = 0 volumes get zero vectors; isotropic (trace) volumes with b > 0 and no direction keep zero vectors too
    # (the tensor fit's gradient check decides whether enough directions remain).
    bvecs = np.where((norm > 1e-6)[:, None] & weighted[:, None], bvecs / np.where(norm > 1e-6, norm, 1.0)[:, None],
                     0.0)
    if not np.any(weighted) or not np.any(norm[weighted] > 1e-6):
        raise BadInput("dwi_without_gradients", "every volume has b = 0 or no gradient direction: no diffusion "
                       "weighting to fit; send the series with its b-values and directions")
    return bvals.astype(float), bvecs


# --------------------------------------------------------------------------- NIfTI
def _sidecar_doc(sidecar) -> dict:
    if sidecar is None:
        return {}
    if isinstance(sidecar, dict):
        return sidecar
    try:
        doc = json.loads(Path(sidecar).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise BadInput("unreadable_sidecar", "the JSON sidecar does not read as JSON; re-export it") from None
    if not isinstance(doc, dict):
        raise BadInput("unreadable_sidecar", "the JSON sidecar is not a JSON object; re-export it")
    return doc


def _tr_from(doc: dict, header, notes: list[str]) -> float | None:
    tr = _number(doc.get("RepetitionTime"))
    if tr is not None and tr > 0:
        if tr > 100:
            notes.append(f"sidecar RepetitionTime {tr:g} read as milliseconds (BIDS says seconds)")
            tr /= 1000.0
        return float(tr)
    if header is None:
        return None
    unit = header.get_xyzt_units()[1]
    pixdim = float(header["pixdim"][4])
    if unit in TIME_UNIT_TO_S and np.isfinite(pixdim) and pixdim > 0:
        notes.append("TR from the NIfTI header (pixdim[4], time unit %s)" % unit)
        return pixdim * TIME_UNIT_TO_S[unit]
    return None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _finish(data: np.ndarray, affine: np.ndarray, kind: str, tr_s: float | None, bvals_rows, bvecs_rows,
            notes: list[str]) -> Volume4D:
    n = int(data.shape[3])
    if kind == "bold":
        if tr_s is None:
            raise BadInput("bold_no_tr", "the BOLD series has no repetition time (RepetitionTime in the DICOM or the "
                           "JSON sidecar, or a NIfTI pixdim[4] with a time unit); the GLM needs volume times")
        if n < MIN_BOLD_VOLUMES:
            raise BadInput("bold_too_short", f"the BOLD series has {n} volumes; a first-level GLM needs at least "
                           f"{MIN_BOLD_VOLUMES}; send the whole run")
        return Volume4D(data, affine, kind, float(tr_s), None, None, notes)
    if bvals_rows is None or bvecs_rows is None:
        raise BadInput("dwi_without_gradients", "the DWI series has no b-values or gradient directions (DICOM "
                       "diffusion attributes, or .bval/.bvec beside the NIfTI); send them with the series")
    bvals, bvecs = gradients_from_fsl(bvals_rows, bvecs_rows, affine, n)
    return Volume4D(data, affine, kind, tr_s, bvals, bvecs, notes)


def load_4d_nifti(nifti, kind: str, *, sidecar=None, bval=None, bvec=None) -> Volume4D:
    """A BOLD or DWI NIfTI (+ BIDS JSON sidecar path or dict, + FSL ``.bval``/``.bvec`` paths) as a Volume4D."""
    import nibabel as nib

    _check_kind(kind)
    try:
        img = nib.load(str(nifti))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # noqa: BLE001 - any failure to read is the file's problem
        raise BadInput("unreadable_nifti", f"the {kind} NIfTI does not read ({type(exc).__name__}); the file is cut "
                       "short or not a NIfTI, re-export it") from None
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[3] < 2:
        raise BadInput("not_4d", f"the {kind} NIfTI has shape {tuple(data.shape)}: not a 4-D series (x, y, z, "
                       "volumes); send the whole series as one 4-D NIfTI")
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise BadInput("nifti_geometry", "the NIfTI has no usable voxel-to-world affine; re-export it with its "
                       "scanner geometry")
    notes: list[str] = []
    tr_s = _tr_from(_sidecar_doc(sidecar), img.header, notes)
    rows = (None, None)
    if kind == "dwi" and bval is not None and bvec is not None:
        rows = (read_fsl_text(bval, "b-value"), read_fsl_text(bvec, "gradient vector"))
    return _finish(data, affine, kind, tr_s, *rows, notes)


# --------------------------------------------------------------------------- DICOM
def _read_headers(paths) -> list:
    import pydicom

    headers = []
    for p in paths:
        try:
            headers.append(pydicom.dcmread(str(p), stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - the file boundary
            raise BadInput("dicom_4d_conversion", f"a file of the series does not read as DICOM "
                           f"({type(exc).__name__}); remove it or re-export the series") from None
    return headers


def _geometry_key(ds) -> list[tuple]:
    """(rows, columns, pixel spacing, orientation) of each image of a header (frames of an enhanced object)."""
    def vec(v):
        try:
            return tuple(float(x) for x in v)
        except (TypeError, ValueError):
            return None
    rows, cols = _value(ds, "Rows"), _value(ds, "Columns")
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = _value(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame:
        keys = []
        for fr in per_frame:
            meas = _first(fr, "PixelMeasuresSequence") or (shared and _first(shared, "PixelMeasuresSequence"))
            orient = _first(fr, "PlaneOrientationSequence") or (shared and _first(shared, "PlaneOrientationSequence"))
            keys.append((rows, cols, vec(_value(meas, "PixelSpacing")) if meas else None,
                         vec(_value(orient, "ImageOrientationPatient")) if orient else None))
        return keys
    return [(rows, cols, vec(_value(ds, "PixelSpacing")), vec(_value(ds, "ImageOrientationPatient")))]


def check_series_headers(headers) -> None:
    """One MR series on one grid, else ``mixed_geometry`` (the converter would split or guess)."""
    series = {str(_value(ds, "SeriesInstanceUID", "")) for ds in headers}
    if len(series) > 1:
        raise BadInput("mixed_geometry", f"the files belong to {len(series)} series; load one series at a time")
    if any(str(_value(ds, "Modality", "")).upper() != "MR" for ds in headers):
        raise BadInput("mixed_geometry", "the series holds non-MR images; a BOLD or DWI series is MR only")
    echoes = {r["echo"] for r in _records(headers)}
    if len(echoes) > 1:
        raise BadInput("mixed_geometry", f"the series holds {len(echoes)} echoes; multi-echo series are not "
                       "supported here, send one echo (or its combination) as the series")
    keys = [k for ds in headers for k in _geometry_key(ds)]
    ref = keys[0]
    for k in keys[1:]:
        if k[:2] != ref[:2] or (k[2] is None) != (ref[2] is None) or (k[3] is None) != (ref[3] is None):
            raise BadInput("mixed_geometry", "the images of the series differ in matrix size or lack pixel spacing / "
                           "orientation; one 4-D series has one grid")
        for a, b in ((k[2], ref[2]), (k[3], ref[3])):
            if a is not None and (len(a) != len(b) or np.max(np.abs(np.subtract(a, b))) > GEOMETRY_TOL):
                raise BadInput("mixed_geometry", "the images of the series differ in pixel spacing or orientation; one "
                               "4-D series has one grid")


_PATH = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s'\"]*")


def _clean_lines(text: str, limit: int = 6) -> list[str]:
    """dcm2niix's warning/error lines without paths, deduplicated."""
    out: list[str] = []
    for line in text.splitlines():
        if not re.match(r"^\s*(warning|error|unsupported|unable)", line, re.IGNORECASE):
            continue
        line = _PATH.sub("<path>", line.strip())[:200]
        if line not in out:
            out.append(line)
    return out[:limit]


def run_dcm2niix(paths, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Convert the files with the pinned dcm2niix into ``out_dir``; (NIfTI files written, cleaned messages)."""
    import dcm2niix

    src = out_dir / "in"
    dst = out_dir / "out"
    src.mkdir()
    dst.mkdir()
    for n, p in enumerate(paths):  # neutral names: dcm2niix output and messages never carry the raw file names
        link = src / f"{n:06d}.dcm"
        try:
            os.symlink(os.path.abspath(p), link)
        except OSError:
            shutil.copyfile(p, link)
    # -m y: stack every file of the series into one image.  The default (-m 2) splits a series whose
    # ProtocolName is gone (de-identification removes it) and whose SequenceName varies per volume, as Siemens
    # diffusion series do (*ep_b0, *ep_b1000#1, ...): de-identified DWI came out as one NIfTI per volume.  What
    # forcing could wrongly merge (other series, grids, echoes) is refused from the headers beforehand.
    cmd = [str(dcm2niix.bin), "-m", "y", "-z", "n", "-b", "y", "-ba", "y", "-f", "series", "-i", "n", "-w", "1",
           "-o", str(dst), str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=DCM2NIIX_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BadInput("dicom_4d_conversion", f"dcm2niix did not finish within {DCM2NIIX_TIMEOUT_S} s") from None
    messages = _clean_lines(proc.stdout + "\n" + proc.stderr)
    return sorted(dst.glob("*.nii")), messages


def load_4d_dicom(paths, kind: str) -> Volume4D:
    """One BOLD or DWI DICOM series (classic per-slice files, enhanced multi-frame, mosaic) as a Volume4D."""
    import nibabel as nib

    _check_kind(kind)
    paths = [Path(p) for p in paths]
    if not paths:
        raise BadInput("dicom_4d_conversion", "no DICOM files were given for the series")
    headers = _read_headers(paths)
    check_series_headers(headers)
    with tempfile.TemporaryDirectory(prefix="series4d-") as tmp:
        niftis, messages = run_dcm2niix(paths, Path(tmp))
        notes = [f"dcm2niix: {m}" for m in messages if not m.lower().startswith("error")]
        if not niftis:
            detail = "; ".join(messages) or "no message"
            raise BadInput("dicom_4d_conversion", f"dcm2niix wrote no image from the series ({detail}); check that it "
                           "is a complete image series")
        if len(niftis) > 1:
            shapes = []
            for f in niftis:
                try:
                    shapes.append(tuple(nib.load(str(f)).shape))
                except Exception:  # noqa: BLE001
                    shapes.append(("?",))
            raise BadInput("mixed_geometry", f"dcm2niix split the series into {len(niftis)} images (shapes {shapes}): "
                           "it mixes echoes, matrix sizes or orientations; send one 4-D acquisition per series")
        nii = niftis[0]
        try:
            img = nib.load(str(nii))
            data = np.asarray(img.get_fdata(dtype=np.float32))
        except Exception as exc:  # noqa: BLE001
            raise BadInput("dicom_4d_conversion", f"dcm2niix output does not read ({type(exc).__name__})") from None
        if data.ndim != 4 or data.shape[3] < 2:
            if kind == "bold":
                raise BadInput("bold_too_short", f"the BOLD series converts to one volume of shape {data.shape}; a "
                               f"first-level GLM needs at least {MIN_BOLD_VOLUMES} volumes")
            raise BadInput("not_4d", f"the DWI series converts to one volume of shape {data.shape}; a DWI series holds "
                           "several diffusion weightings")
        affine = np.asarray(img.affine, dtype=float)
        doc = _sidecar_doc(nii.with_suffix(".json")) if nii.with_suffix(".json").exists() else {}
        notes_tr: list[str] = []
        tr_s = _tr_from(doc, None, notes_tr)  # DICOM: RepetitionTime only, never a converter's guess
        bval, bvec = nii.with_suffix(".bval"), nii.with_suffix(".bvec")
        rows = (None, None)
        if kind == "dwi" and bval.exists() and bvec.exists():
            rows = (read_fsl_text(bval, "b-value"), read_fsl_text(bvec, "gradient vector"))
        return _finish(data, affine, kind, tr_s, *rows, notes + notes_tr)


__all__ = ["KINDS", "MIN_BOLD_VOLUMES", "Volume4D", "check_series_headers", "classify_mr_series", "count_volumes",
           "gradients_from_fsl", "load_4d_dicom", "load_4d_nifti", "read_fsl_text", "run_dcm2niix"]
