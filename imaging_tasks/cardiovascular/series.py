"""Which series of a cardiac study goes to which step: calcium-scoring CT, cine MR, or phase-contrast flow.

A cardiac study often holds several acquisitions (a calcium-scoring CT and an MR exam under one accession, or a cine
stack beside 2-D phase-contrast planes and a 4-D flow).  Each step takes only its own series; this module decides
which those are, from headers alone (no pixel is read):

* ``calcium_ct``: single-frame CT Image Storage, not a localizer (what :mod:`.calcium` scores);
* ``flow``: an MR series with a velocity encoding (:func:`velocity_encoding`), or an MR series without one that has
  the exact geometry and trigger times of such a series (a magnitude series stored apart from its phase series,
  as Siemens does);
* ``cine``: any other MR series with TriggerTime (0018,1060), or one announcing several cardiac phases
  (CardiacNumberOfImages > 1) without trigger times, so that :mod:`.cine` refuses it with its reason rather than it
  being passed over in silence;
* ``other``: everything else (localizers, dose reports, MR without cardiac timing), left alone.

Velocity encoding, in order of preference (see :func:`velocity_encoding`):

1. the MR Velocity Encoding Sequence (0018,9197) of the Enhanced MR IODs, at the top level or in the shared or
   per-frame functional groups: Velocity Encoding Direction (0018,9090; a unit vector in patient coordinates) and
   Velocity Encoding Maximum Value (0018,9217, cm/s);
2. the Siemens convention carried in the standard Sequence Name (0018,0024), which survives de-identification
   where Siemens' private VENC tag does not: ``*fl2d1_v150in`` is 150 cm/s through-plane; ``_v150fh``, ``_v150rl``,
   ``_v150ap`` name the patient axes of a 4-D flow's three encodings (``through`` is also read).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imaging_tasks.preconditions import finite_float

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
KINDS = ("calcium_ct", "cine", "flow", "other")
PHASE_TOKENS = frozenset({"P", "PHASE", "P_PCA", "VELOCITY", "PHASE CONTRAST P"})
MAGNITUDE_TOKENS = frozenset({"M", "MAG", "MAGNITUDE", "M_PCA", "M_FFE", "M_SE", "PHASE CONTRAST M"})
# Siemens sequence names: "_v<VENC cm/s><direction>", e.g. *fl2d1_v150in, *fl3d1r_v200fh
_SIEMENS_VENC = re.compile(r"_v(\d+(?:\.\d+)?)(in|through|rl|ap|fh|lr|pa|hf)\b", re.IGNORECASE)
# Patient axes (LPS): +x towards the patient's left, +y posterior, +z head.
AXES = {"rl": (1.0, 0.0, 0.0), "lr": (1.0, 0.0, 0.0), "ap": (0.0, 1.0, 0.0), "pa": (0.0, 1.0, 0.0),
        "fh": (0.0, 0.0, 1.0), "hf": (0.0, 0.0, 1.0)}


@dataclass(frozen=True)
class VelocityEncoding:
    """VENC (cm/s: the speed that maps to the ends of the phase range) and the encoded direction: ``"through"``
    (the slice normal, row x column of ImageOrientationPatient) or a unit vector in patient coordinates (LPS)."""

    venc_cm_s: float
    direction: str | tuple[float, float, float]
    source: str  # "MRVelocityEncodingSequence" | "SequenceName"

    def vector(self, orientation: np.ndarray | None = None) -> np.ndarray:
        """The direction as a patient-space unit vector; ``orientation`` (ImageOrientationPatient, six numbers)
        is needed for ``"through"``."""
        if self.direction == "through":
            if orientation is None:
                raise ValueError("a through-plane encoding needs the slice orientation")
            o = np.asarray(orientation, float)
            n = np.cross(o[:3], o[3:])
            return n / np.linalg.norm(n)
        v = np.asarray(self.direction, float)
        return v / np.linalg.norm(v)


@dataclass
class Series:
    uid: str
    kind: str
    items: list = field(default_factory=list)  # [(path, header read without pixel data)]
    number: int | None = None
    description: str = ""

    @property
    def first(self):
        return self.items[0][1]


def _encoding_items(ds):
    """MR Velocity Encoding Sequence items: top level first, then shared, then the first per-frame group."""
    for holder in (ds, *_groups(ds, "SharedFunctionalGroupsSequence"),
                   *_groups(ds, "PerFrameFunctionalGroupsSequence")[:1]):
        seq = holder.get("MRVelocityEncodingSequence")
        if seq:
            yield from seq


def _groups(ds, keyword: str) -> list:
    seq = ds.get(keyword)
    return list(seq) if seq else []


def velocity_encoding(ds) -> VelocityEncoding | None:
    """The series' velocity encoding from its header (module docstring: which attributes), or None."""
    for item in _encoding_items(ds):
        venc = finite_float(item.get("VelocityEncodingMaximumValue"))
        low = finite_float(item.get("VelocityEncodingMinimumValue"))
        if venc is None and low is not None:
            venc = abs(low)
        direction = item.get("VelocityEncodingDirection")
        vec = [finite_float(v) for v in direction] if direction is not None and len(direction) == 3 else None
        if venc and venc > 0 and vec and None not in vec and np.linalg.norm(vec) > 0:
            return VelocityEncoding(float(venc), tuple(float(v) for v in vec), "MRVelocityEncodingSequence")
    name = str(ds.get("SequenceName", "") or "")
    m = _SIEMENS_VENC.search(name)
    if m and float(m.group(1)) > 0:
        code = m.group(2).lower()
        direction = "through" if code in ("in", "through") else AXES[code]
        return VelocityEncoding(float(m.group(1)), direction, "SequenceName")
    return None


def component(ds) -> str | None:
    """``"phase"`` or ``"magnitude"`` from ComplexImageComponent, else from ImageType; None if neither says."""
    cic = str(ds.get("ComplexImageComponent", "") or "").upper()
    if cic in ("PHASE", "MAGNITUDE"):
        return cic.lower()
    for frame_group in _groups(ds, "SharedFunctionalGroupsSequence"):
        for item in frame_group.get("MRImageFrameTypeSequence") or []:
            cic = str(item.get("ComplexImageComponent", "") or "").upper()
            if cic in ("PHASE", "MAGNITUDE"):
                return cic.lower()
    tokens = {str(v).strip().upper() for v in (ds.get("ImageType") or [])}
    if tokens & PHASE_TOKENS:
        return "phase"
    if tokens & MAGNITUDE_TOKENS:
        return "magnitude"
    return None


def _is_flow(ds) -> bool:
    return velocity_encoding(ds) is not None or component(ds) == "phase"


def _has_timing(ds) -> bool:
    if ds.get("TriggerTime") not in (None, ""):
        return True
    try:
        return int(ds.get("CardiacNumberOfImages") or 0) > 1
    except (TypeError, ValueError):
        return False


def geometry_key(ds) -> tuple:
    """Orientation, position, matrix and trigger time of one image, rounded: equal for a magnitude image and the
    phase image acquired with it."""
    def rounded(keyword, nd=2):
        vals = ds.get(keyword)
        try:
            return tuple(round(float(v), nd) for v in vals) if vals is not None else None
        except (TypeError, ValueError):
            return None
    return (rounded("ImageOrientationPatient", 4), rounded("ImagePositionPatient"), ds.get("Rows"),
            ds.get("Columns"), finite_float(ds.get("TriggerTime")))


def plane_key(ds) -> tuple | None:
    """Orientation and distance along the slice normal (to 0.5 mm): the plane an image lies in, whatever its
    matrix or field of view."""
    try:
        o = np.array([float(v) for v in ds.ImageOrientationPatient])
        n = np.cross(o[:3], o[3:])
        d = float(np.dot(n, [float(v) for v in ds.ImagePositionPatient]))
    except (AttributeError, TypeError, ValueError):
        return None
    if o.shape != (6,) or not np.isfinite(d):
        return None
    return tuple(np.round(o, 3)), round(d * 2) / 2


def study_series(files: list[Path]) -> list[Series]:
    """Every DICOM series of the study with its kind (module docstring), sorted by series number.

    Unreadable files raise BadInput (``not_dicom`` ...), as everywhere: they were checked at de-identification.
    """
    from imaging_tasks.dicom_io import read_header

    by_uid: dict[str, Series] = {}
    for path in files:
        if Path(path).suffix.lower() != ".dcm":
            continue  # sidecars and tables are not series
        with open(path, "rb") as fh:
            ds = read_header(fh, decode=False)
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid not in by_uid:
            try:
                number = int(ds.get("SeriesNumber"))
            except (TypeError, ValueError):
                number = None
            by_uid[uid] = Series(uid, "other", number=number, description=str(ds.get("SeriesDescription", "") or ""))
        by_uid[uid].items.append((Path(path), ds))

    for s in by_uid.values():
        modality = str(s.first.get("Modality", "") or "")
        if modality == "CT" and str(s.first.get("SOPClassUID", "")) == CT_IMAGE_STORAGE:
            localizer = "LOCALIZER" in {str(v).upper() for v in (s.first.get("ImageType") or [])}
            s.kind = "other" if localizer else "calcium_ct"
        elif modality == "MR":
            if any(_is_flow(ds) for _p, ds in s.items):
                s.kind = "flow"
            elif any(_has_timing(ds) for _p, ds in s.items):
                s.kind = "cine"
    flow_keys = {geometry_key(ds) for s in by_uid.values() if s.kind == "flow" for _p, ds in s.items}
    flow_planes = {plane_key(ds) for s in by_uid.values() if s.kind == "flow" for _p, ds in s.items}
    for s in by_uid.values():  # a magnitude series stored apart from its phase series
        if s.kind != "cine" or not flow_keys:
            continue
        if all(geometry_key(ds) in flow_keys for _p, ds in s.items):
            s.kind = "flow"
        elif all(component(ds) == "magnitude" and plane_key(ds) in flow_planes for _p, ds in s.items):
            s.kind = "flow"  # in a flow plane but not matching it: flow.py refuses the pair with its reason
    return sorted(by_uid.values(), key=lambda s: (s.number is None, s.number or 0, s.uid))


def of_kind(files: list[Path], kind: str) -> list[Series]:
    """The study's series of one kind, in series-number order."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    return [s for s in study_series(files) if s.kind == kind]


def summary(series: list[Series]) -> dict:
    """Counts per kind and each series' number, kind and instance count (no descriptions: free text)."""
    counts = defaultdict(int)
    for s in series:
        counts[s.kind] += 1
    return {"counts": dict(counts),
            "series": [{"number": s.number, "kind": s.kind, "instances": len(s.items)} for s in series]}


def route_series(files: list[Path], out_dir: Path, *, device: str | None = None, **_options) -> dict:
    """The chain's first step: which of the study's series each later step takes (``series.json``).

    A study with none of the three kinds is refused here, once, rather than by each step: ``wrong_modality`` when
    it holds neither CT nor MR, ``no_series`` when it does but nothing in it can be scored (scouts only, MR without
    cardiac timing, enhanced multi-frame CT).
    """
    import json

    from imaging_tasks.errors import BadInput

    series = study_series([Path(f) for f in files])
    info = summary(series)
    if not any(s.kind != "other" for s in series):
        modalities = sorted({str(s.first.get("Modality", "") or "?") for s in series}) or ["none"]
        if not {"CT", "MR"} & set(modalities):
            raise BadInput("wrong_modality", f"the cardiovascular pipeline takes cardiac CT (calcium scoring) and "
                           f"cardiac MR (cine, phase contrast, 4-D flow); this study holds {'/'.join(modalities)}; "
                           "route it to its own pipeline")
        raise BadInput("no_series", "no series this pipeline can use: send the axial calcium-scoring CT series, a "
                       "short-axis cine stack (with TriggerTime) or phase-contrast / 4-D flow series (with their "
                       f"velocity encoding); found {len(series)} series of kinds "
                       f"{', '.join(sorted(info['counts']))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "series.json").write_text(json.dumps(info, indent=1))
    # No metrics: the series table has the series; the study's key numbers (what the QC pages list first) are the
    # measurements of the steps that follow.
    return {"metrics": [], "findings": [], "outputs": ["series.json"], "series": info["counts"]}
