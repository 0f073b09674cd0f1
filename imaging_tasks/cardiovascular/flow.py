"""Blood flow from 2-D through-plane phase contrast and 4-D flow MR: net, forward and backward flow, regurgitant
fraction, peak velocity, with phase aliasing detected and unwrapped.

Which DICOM attributes are read, and why:

* **Which images are velocity images** (:func:`imaging_tasks.cardiovascular.series.component`):
  ComplexImageComponent (0008,9208) PHASE / MAGNITUDE when present, else ImageType tokens (P, PHASE, P_PCA,
  VELOCITY -> phase; M, MAG, MAGNITUDE, M_PCA, M_FFE -> magnitude).  An image of a flow series that says neither is
  a magnitude image (a Siemens magnitude series only shares the geometry and trigger times of its phase series).
* **VENC and encoding direction** (:func:`imaging_tasks.cardiovascular.series.velocity_encoding`), in order:
  the MR Velocity Encoding Sequence (0018,9197) at the top level or in the shared / per-frame functional groups,
  with Velocity Encoding Direction (0018,9090, patient LPS) and Velocity Encoding Maximum Value (0018,9217, cm/s);
  else the Siemens convention in the standard Sequence Name (0018,0024): ``*fl2d1_v150in`` (150 cm/s through the
  slice), ``_v150rl`` / ``_v150ap`` / ``_v150fh`` (patient axes of a 4-D flow).  A phase image whose VENC cannot be
  known is refused (``missing_venc``): without it neither the velocity scale nor aliasing can be judged.
* **Pixel -> velocity**: a Real World Value Mapping Sequence (0040,9096) item whose Measurement Units Code
  Sequence has CodeValue ``cm/s`` (UCUM) gives ``v = slope x stored + intercept`` directly (Philips habit); else the
  stored range maps linearly onto [-VENC, +VENC): unsigned ``v = VENC (stored - 2^(b-1)) / 2^(b-1)``, signed
  (PixelRepresentation 1) ``v = VENC stored / 2^(b-1)``, b = BitsStored.  A linear RescaleSlope/Intercept cancels
  out of that mapping (Siemens' slope 2, intercept -4096 on 0..4095 gives the same numbers), so it is not needed.
  Positive velocity is along the encoding direction; ``through`` is the slice normal, row x column of
  ImageOrientationPatient.
* **Timing**: frames are ordered by TriggerTime (0018,1060); each frame stands for the median trigger spacing
  (= RR / frames with retrospective gating; with prospective gating the unimaged end of diastole is credited no
  flow rather than stretching the frames over it).  The cycle length RR (reported, and the QC plot's axis) is
  NominalInterval (0018,1062) when present and not shorter than the frames' span, else trigger spacing x frames.
* **Geometry**: ImageOrientationPatient, ImagePositionPatient, PixelSpacing, Rows/Columns; slices of a 4-D flow
  are ordered along the normal and must be evenly spaced.

Pairing (:func:`acquisitions`): phase images are grouped per series and encoding direction; groups with the same
geometry, slice positions and trigger times but different directions form one acquisition (a 4-D flow stored as
three series, Siemens style).  Magnitude images come from the acquisition's own series, else from a series with
exactly that geometry and those trigger times; anything else is ``mismatched_magnitude_phase``.  One slice ->
2-D phase contrast ("pc"); a stack with three independent encodings -> 4-D flow ("flow4d").

Measurement (:func:`measure_pc`, :func:`measure_flow4d`):

* Vessel: the brightest pulsatile vessel, scored by mean magnitude x temporal standard deviation of velocity, or,
  with ``flow_plane``, the most pulsatile point within 15 mm of its point (projected onto a 2-D slice; a point
  more than 20 mm from the slice is taken to be meant for another series).  The lumen is the connected region
  around that point brighter than halfway between its blood and the tissue (time-averaged magnitude), and the
  region of interest is the lumen dilated by 1.5 pixels (4-D: 1.5 voxels) so the partial-volume rim, which carries
  flow, is inside; pixels without signal (air: random phase) are left out.
* 4-D flow: the velocity field is resampled trilinearly (torch ``grid_sample`` on the device) on the plane, with a
  spacing of half the smallest voxel size.  Automatic plane: through the vessel's centroid, normal = the mean
  systolic velocity direction there, then re-centred on the lumen.
* Per frame flow ``Q = sum(v . n x pixel area)`` (ml/s); per cycle net / forward / backward = sum of Q (or its
  positive / negative part) x frame interval; regurgitant fraction = backward / forward x 100; peak velocity = the
  largest |v| in the lumen.  "Forward": 2-D, the direction of the largest frame flow (systole), or the
  ``flow_plane`` normal's side of the slice; 4-D, the plane normal.
* Aliasing: velocities are unwrapped along the cycle (period 2 VENC) from the frame of lowest speed in the vessel,
  both ways round the cycle, each frame from the nearer side; where that path took a step close to +-VENC (either
  way was possible), a spatial check moves a voxel more than a VENC from the median of its neighbours by 2 VENC.
  Voxel-frames changed inside the vessel are counted (``aliased_voxel_frames``) and ``aliasing_detected`` is 1
  when any were; ``flow_unwrap=False`` reports them but measures the raw (wrapped) values.

Known limits: no background phase-offset (eddy current) correction (the phantoms have none); one region of
interest for all frames (no through-plane motion tracking); the magnitude lumen needs blood brighter than the
surrounding tissue, as in inflow-enhanced phase contrast.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from imaging_tasks.device import pick_device
from imaging_tasks.errors import BadInput, ConfigError

log = logging.getLogger(__name__)

MIN_FRAMES = 5  # fewer frames cannot resolve a systolic peak, let alone a backward lobe
# Lumen -> region of interest: the partial-volume rim carries flow (phantom without noise: 1 pixel misses <0.1 %
# in 2-D, 1 voxel misses ~0.5 % in 4-D after trilinear resampling; 1.5 misses <0.1 % in both); every further pixel
# only adds the noise of static tissue.
ROI_DILATE_PX = 1.5
ROI_DILATE_VOXELS_4D = 1.5
SIGNAL_FRACTION = 0.15  # of the 99.5th magnitude percentile: below it, air (random phase)
CANDIDATE_FRACTION = 0.2  # of the best pulsatility score: a vessel candidate
PARAM_MAX_DISTANCE_MM = 20.0  # a flow_plane point further than this from a 2-D slice is meant for another series
SEED_SEARCH_MM = 15.0  # the vessel is sought this far from a flow_plane point (2-D: projected on the slice)
DOUBTFUL_STEP = 0.7  # a frame-to-frame change above this x VENC makes temporal unwrapping uncertain
UCUM_CM_S = "cm/s"


# --------------------------------------------------------------------------- options
def parse_plane(text: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``"x,y,z; nx,ny,nz"`` (patient mm, LPS) -> (point, unit normal); None or blank -> None (automatic)."""
    if text is None or not str(text).strip():
        return None
    parts = str(text).split(";")
    try:
        if len(parts) != 2:
            raise ValueError
        point = np.array([float(v) for v in parts[0].split(",")])
        normal = np.array([float(v) for v in parts[1].split(",")])
        if point.shape != (3,) or normal.shape != (3,) or not np.all(np.isfinite(np.r_[point, normal])):
            raise ValueError
    except ValueError:
        raise ConfigError(f"flow_plane {str(text)[:60]!r} is not 'x,y,z; nx,ny,nz' (a point and a normal in patient "
                          "coordinates, mm, LPS); leave it empty to find the vessel automatically") from None
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise ConfigError("flow_plane normal is the zero vector; give the direction of forward flow")
    return point, normal / length


# --------------------------------------------------------------------------- pairing
@dataclass
class Acquisition:
    """One flow measurement's images, paired and ordered: [slice][frame] for magnitude and each encoding."""

    kind: str  # "pc" | "flow4d"
    series_numbers: list
    magnitude: list  # [slice][frame] -> (path, header)
    phase: list  # [encoding][slice][frame] -> (path, header)
    encodings: list  # VelocityEncoding per encoding
    vectors: np.ndarray  # (E, 3) unit encoding directions, patient LPS
    triggers_ms: list
    rr_ms: float
    rr_source: str
    frame_ms: float  # median trigger spacing: each frame's share of the cycle
    origin_mm: np.ndarray  # ImagePositionPatient of the first slice
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing_mm: tuple  # (slice, row, column)
    shape: tuple  # (slices, rows, cols)
    notes: list = field(default_factory=list)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)


def _floats(ds, keyword) -> list[float] | None:
    try:
        vals = ds.get(keyword)
        return [float(v) for v in vals] if vals is not None else None
    except (TypeError, ValueError):
        return None


def _image_geometry(ds, what: str) -> tuple:
    """(orientation, pixel spacing, rows, cols, position, trigger) of one image, or BadInput."""
    from imaging_tasks.preconditions import image_size, pixel_spacing

    iop = _floats(ds, "ImageOrientationPatient")
    pos = _floats(ds, "ImagePositionPatient")
    if not iop or len(iop) != 6:
        raise BadInput("missing_orientation", f"{what} has no usable ImageOrientationPatient; the velocity "
                       "direction and the vessel plane cannot be known; re-export the series")
    if not pos or len(pos) != 3:
        raise BadInput("missing_position", f"{what} has no usable ImagePositionPatient; re-export the series")
    try:
        trigger = float(ds.get("TriggerTime"))
    except (TypeError, ValueError):
        raise BadInput("missing_trigger_time", f"{what} has no TriggerTime; flow over the cardiac cycle needs the "
                       "frames' times; send the ECG-gated series as the scanner wrote it") from None
    return np.array(iop), pixel_spacing(ds, what), image_size(ds, what), np.array(pos), trigger


def _direction_key(enc, ds) -> tuple:
    """The encoding direction as a rounded patient-space vector ("through" resolved with the image's orientation),
    so a through-plane encoding named either way is one direction."""
    iop = _floats(ds, "ImageOrientationPatient")
    try:
        vec = enc.vector(np.array(iop) if iop and len(iop) == 6 else None)
    except ValueError:
        return ("through",)
    return tuple(round(float(v), 2) + 0.0 for v in vec)


def acquisitions(series_list) -> tuple[list[Acquisition], list[dict]]:
    """Pair the phase and magnitude images of the study's flow series (module docstring).

    Returns (acquisitions, refused): a series or acquisition that cannot be used (no VENC, no matching magnitude,
    incomplete, ...) is left out and listed in ``refused`` as {"series_numbers", "reason", "message"}, so the
    study's other acquisitions are still measured."""
    from imaging_tasks.cardiovascular.series import component, velocity_encoding

    phase_sets: dict[tuple, dict] = {}  # (series uid, direction key) -> info
    magnitude_sets: dict[str, dict] = {}
    number_of = {}
    refused: list[dict] = []
    for s in series_list:
        number_of[s.uid] = s.number
        what = f"flow series {s.number}"
        own_phase, own_mag = {}, []
        try:
            for path, ds in s.items:
                comp = component(ds)
                enc = velocity_encoding(ds)
                if comp == "phase" or (comp is None and enc is not None):
                    if enc is None:
                        raise BadInput("missing_venc", f"{what} holds phase images whose velocity encoding (VENC) "
                                       "cannot be known: neither MRVelocityEncodingSequence nor a Siemens "
                                       "SequenceName (e.g. *fl2d1_v150in) gives it, so velocities and aliasing "
                                       "cannot be measured; re-export the series with its velocity encoding")
                    key = (s.uid, _direction_key(enc, ds))
                    entry = own_phase.setdefault(key, {"uid": s.uid, "number": s.number, "enc": enc, "images": []})
                    entry["images"].append((path, ds))
                elif comp in ("magnitude", None):
                    own_mag.append((path, ds))
        except BadInput as exc:
            refused.append({"series_numbers": [s.number], "reason": exc.reason, "message": exc.message})
            continue
        phase_sets.update(own_phase)
        if own_mag:
            magnitude_sets[s.uid] = {"uid": s.uid, "number": s.number, "images": own_mag}

    groups: list[dict] = []
    for key in sorted(phase_sets, key=lambda k: (number_of.get(k[0]) is None, number_of.get(k[0]) or 0, k)):
        entry = phase_sets[key]
        try:
            sig = _signature(entry)
        except BadInput as exc:
            refused.append({"series_numbers": [entry["number"]], "reason": exc.reason, "message": exc.message})
            continue
        for g in groups:
            if g["signature"] == sig and key[1] not in g["directions"]:
                g["sets"].append(entry)
                g["directions"].add(key[1])
                break
        else:
            groups.append({"signature": sig, "sets": [entry], "directions": {key[1]}})
    mag_sigs = {}
    for uid, entry in magnitude_sets.items():
        try:
            mag_sigs[uid] = _signature(entry)
        except BadInput:
            mag_sigs[uid] = None

    out = []
    for g in groups:
        sig = g["signature"]
        numbers = sorted({e["number"] for e in g["sets"]}, key=lambda n: (n is None, n or 0))
        own = [uid for uid in {e["uid"] for e in g["sets"]} if uid in magnitude_sets]
        what = f"flow series {', '.join(str(n) for n in numbers)}"
        try:
            if own:
                mag = magnitude_sets[own[0]]
                if mag_sigs[own[0]] != sig:
                    raise BadInput("mismatched_magnitude_phase", f"{what}: the magnitude images do not have the "
                                   "geometry and trigger times of the phase images (another matrix, slice or frame "
                                   "count); they cannot be paired; send magnitude and phase of one acquisition")
            else:
                match = [uid for uid, s in mag_sigs.items() if s == sig]
                if not match:
                    raise BadInput("mismatched_magnitude_phase", f"{what}: no magnitude images share the phase "
                                   "images' geometry and trigger times (missing, or from another acquisition); the "
                                   "vessel cannot be delineated; send the magnitude series acquired with the phase "
                                   "series")
                mag = magnitude_sets[sorted(match, key=lambda u: (number_of.get(u) or 0))[0]]
                numbers = sorted(set(numbers) | {mag["number"]}, key=lambda n: (n is None, n or 0))
            out.extend(_build(g, mag, numbers, what))
        except BadInput as exc:
            refused.append({"series_numbers": numbers, "reason": exc.reason, "message": exc.message})
    return out, refused


def _signature(entry) -> tuple:
    """Geometry + slice positions + trigger times of a set of images; equal for images acquired together.
    Also files the images by (position along the normal, trigger time) in ``entry["cells"]``."""
    first = entry["images"][0][1]
    what = f"flow series {entry['number']}"
    iop, spacing, size, pos0, _t = _image_geometry(first, what)
    normal = np.cross(iop[:3], iop[3:])
    positions, triggers, cells = set(), set(), defaultdict(list)
    for path, ds in entry["images"]:
        iop_i, spacing_i, size_i, pos, trig = _image_geometry(ds, what)
        if np.max(np.abs(iop_i - iop)) > 1e-3 or size_i != size or \
                max(abs(a - b) for a, b in zip(spacing_i, spacing)) > 1e-3:
            raise BadInput("mixed_geometry", f"{what}: orientation, matrix or pixel spacing differ between its "
                           "images; send one acquisition per series")
        along = round(float(pos @ normal), 1)
        positions.add(along)
        triggers.add(round(trig, 1))
        cells[(along, round(trig, 1))].append((path, ds))
    entry["cells"] = cells
    entry["positions"] = sorted(positions)
    entry["triggers"] = sorted(triggers)
    inplane = (round(float(pos0 @ iop[:3]), 0), round(float(pos0 @ iop[3:]), 0))
    return (tuple(np.round(iop, 3)), tuple(round(v, 3) for v in spacing), size, inplane,
            tuple(entry["positions"]), tuple(entry["triggers"]))


def _build(group: dict, mag: dict, numbers: list, what: str) -> list[Acquisition]:
    sets = group["sets"]
    first = sets[0]["images"][0][1]
    iop, spacing, size, _p, _t = _image_geometry(first, what)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    positions, triggers = sets[0]["positions"], sets[0]["triggers"]
    for entry in [*sets, mag]:
        cells = entry["cells"]
        if len(cells) != len(positions) * len(triggers) or any(len(v) != 1 for v in cells.values()):
            raise BadInput("incomplete_flow_series", f"{what}: not exactly one image per slice position and frame "
                           f"({len(positions)} positions x {len(triggers)} frames expected); send the complete "
                           "series")
    if len(triggers) < MIN_FRAMES:
        raise BadInput("too_few_frames", f"{what} has {len(triggers)} frame(s) over the cycle; at least {MIN_FRAMES} "
                       "are needed to resolve systole and backward flow")
    encodings = [e["enc"] for e in sets]
    vectors = np.array([e.vector(iop) for e in encodings])
    # Frame interval: the median trigger spacing.  With retrospective gating it is RR / frames; with prospective
    # gating the frames stop before the next R wave, and spreading them over the whole RR would inflate every
    # frame's volume (the unimaged end of diastole is credited no flow instead).
    frame_ms = float(np.median(np.diff(triggers)))
    try:
        rr = float(first.get("NominalInterval"))
    except (TypeError, ValueError):
        rr = float("nan")
    rr_source = "NominalInterval"
    if not math.isfinite(rr) or rr < triggers[-1] - triggers[0] + 0.5 * frame_ms:
        rr, rr_source = frame_ms * len(triggers), "trigger spacing x frames"

    def grid(entry):
        return [[entry["cells"][(p, t)][0] for t in triggers] for p in positions]

    pos0 = np.array(_floats(grid(sets[0])[0][0][1], "ImagePositionPatient"))
    if len(positions) > 1:
        gaps = np.diff(positions)
        dz = float(np.median(gaps))
        if np.any(np.abs(gaps - dz) > 0.01 * dz + 0.05):
            raise BadInput("irregular_slices", f"{what}: slice positions are not evenly spaced; send the complete "
                           "4-D flow series")
    else:
        try:
            dz = float(first.get("SliceThickness"))
        except (TypeError, ValueError):
            dz = 1.0
    common = dict(series_numbers=numbers, encodings=encodings, vectors=vectors, triggers_ms=list(triggers),
                  rr_ms=float(rr), rr_source=rr_source, frame_ms=frame_ms, row_dir=row, col_dir=col,
                  spacing_mm=(dz, spacing[0], spacing[1]))
    n_enc = len(sets)
    if n_enc == 3 and abs(np.linalg.det(vectors)) < 0.3:
        raise BadInput("unsupported_encoding", f"{what}: the three velocity encodings are not independent "
                       "directions; the velocity vector cannot be formed")
    if n_enc not in (1, 3):
        raise BadInput("unsupported_encoding", f"{what} has {n_enc} velocity encodings; 1 (through-plane) or 3 "
                       "(4-D flow) are supported")
    if n_enc == 1 and abs(float(vectors[0] @ normal)) < 0.9:
        raise BadInput("not_through_plane", f"{what} is a single-direction velocity encoding in the image plane; "
                       "flow through a vessel needs through-plane encoding (or three directions)")
    mag_grid = grid(mag)
    phase_grids = [grid(e) for e in sets]
    if len(positions) > 1 and n_enc == 3:
        return [Acquisition("flow4d", magnitude=mag_grid, phase=phase_grids, origin_mm=pos0,
                            shape=(len(positions), *size), **common)]
    # One or more single slices, each its own 2-D measurement.
    out = []
    for k in range(len(positions)):
        origin = np.array(_floats(mag_grid[k][0][1], "ImagePositionPatient"))
        out.append(Acquisition("pc", magnitude=[mag_grid[k]], phase=[[g[k]] for g in phase_grids],
                               origin_mm=origin, shape=(1, *size), **common))
    return out


# --------------------------------------------------------------------------- pixels
def phase_to_velocity(stored: np.ndarray, ds, venc_cm_s: float) -> np.ndarray:
    """Stored phase pixel values -> velocity in cm/s (module docstring: which attributes, in which order)."""
    for item in ds.get("RealWorldValueMappingSequence") or []:
        units = item.get("MeasurementUnitsCodeSequence") or []
        code = str(units[0].get("CodeValue", "")) if units else ""
        slope, intercept = item.get("RealWorldValueSlope"), item.get("RealWorldValueIntercept")
        if code == UCUM_CM_S and slope is not None and intercept is not None:
            return stored.astype(np.float64) * float(slope) + float(intercept)
    bits = int(ds.get("BitsStored") or 16)
    half = 2.0 ** (bits - 1)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    return venc_cm_s * (stored.astype(np.float64) - (0.0 if signed else half)) / half


def load(acq: Acquisition) -> tuple[np.ndarray, np.ndarray]:
    """(magnitude (T, Z, Y, X), encoded velocity (E, T, Z, Y, X) in cm/s, still wrapped) as float32."""
    import pydicom

    from imaging_tasks.preconditions import rescale

    nz, ny, nx = acq.shape
    nt = len(acq.triggers_ms)
    mag = np.zeros((nt, nz, ny, nx), np.float32)
    vel = np.zeros((len(acq.phase), nt, nz, ny, nx), np.float32)

    def pixels(path, _header):
        # The files passed de-identification (read in full there); a plain read is enough here, and ~10x faster
        # than the validating reader on a 4-D flow's hundreds of files.
        try:
            ds = pydicom.dcmread(str(path))
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a broken file, reported as such
            raise BadInput("truncated_pixels", f"a flow image's pixel data cannot be decoded "
                           f"({type(exc).__name__}); re-send the series") from None
        if arr.shape != (ny, nx):
            raise BadInput("mixed_geometry", f"a flow image decodes to shape {arr.shape}, not the {ny}x{nx} its "
                           "header declares; re-export the series")
        return ds, arr

    for z in range(nz):
        for t in range(nt):
            ds, arr = pixels(*acq.magnitude[z][t])
            slope, intercept = rescale(ds, "a flow magnitude image")
            mag[t, z] = arr * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
            for e, grid in enumerate(acq.phase):
                ds, arr = pixels(*grid[z][t])
                vel[e, t, z] = phase_to_velocity(arr, ds, acq.encodings[e].venc_cm_s)
    return mag, vel


# --------------------------------------------------------------------------- aliasing
def unwrap(vel, venc, anchor: int, region):
    """Temporal then spatial unwrapping of one encoding's velocities (torch, any device).

    ``vel`` (T, *space) wrapped cm/s; ``region`` (*space) bool: where to unwrap (elsewhere returned as is).
    Temporal: from the ``anchor`` frame (lowest speed: taken as unaliased) both ways round the cycle, each frame
    from the nearer side, adding the multiple of 2 VENC that keeps frame-to-frame changes within +-VENC.
    Spatial: where the temporal path took a step above 0.7 VENC (either way round was possible), a voxel more
    than a VENC from the median of its region neighbours (same frame) moves by multiples of 2 VENC towards it.
    """
    import torch

    t_n = vel.shape[0]
    period = 2.0 * venc

    def wrap(d):
        return torch.remainder(d + venc, period) - venc

    order_f = [(anchor + k) % t_n for k in range(t_n)]
    order_b = [(anchor - k) % t_n for k in range(t_n)]
    out = vel.clone()
    doubtful = torch.zeros_like(vel, dtype=torch.bool)
    n_f = t_n // 2 + 1  # frames anchor .. anchor + T//2 from the forward path, the rest from the backward one
    for order, steps in ((order_b, t_n - n_f + 1), (order_f, n_f)):
        w = vel[order]
        raw = w[1:] - w[:-1]
        d = wrap(raw)
        path = torch.cat([w[:1], w[:1] + torch.cumsum(d, dim=0)])
        # A step close to +-VENC could have gone either way: the frames after it are in doubt.
        close = torch.cat([torch.zeros_like(w[:1], dtype=torch.bool), torch.abs(d) > DOUBTFUL_STEP * venc])
        doubt = torch.cumsum(close.to(torch.int32), dim=0) > 0
        for k in range(steps):
            out[order[k]] = torch.where(region, path[k], out[order[k]])
            doubtful[order[k]] = doubt[k] & region
    # Spatial consistency, only where the temporal path was in doubt: legitimately, neighbours differ by more
    # than a VENC at the edge of a fast plug flow, so a clear temporal path is never overruled.
    if not bool(doubtful.any()):
        return out
    nd = vel.dim() - 1
    x = torch.where(region, out, torch.full_like(out, float("nan")))
    pad = [1, 1] * nd
    xp = torch.nn.functional.pad(x.unsqueeze(1), pad, value=float("nan")).squeeze(1)
    shifts = [s for s in np.ndindex(*(3,) * nd) if any(v != 1 for v in s)]
    neigh = torch.stack([xp[(slice(None), *[slice(s_i, s_i + n) for s_i, n in zip(s, x.shape[1:])])]
                         for s in shifts])
    med = torch.nanmedian(neigh, dim=0).values
    jump = torch.round((out - med) / period)
    fix = doubtful & torch.isfinite(med) & (torch.abs(out - med) > venc)
    out = torch.where(fix, out - jump * period, out)
    return out


# --------------------------------------------------------------------------- vessel finding
def _components(score: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    peak = float(score.max()) if score.size else 0.0
    if peak <= 0:
        return np.zeros(score.shape, np.int32), 0
    return ndimage.label(score > fraction * peak)


def _pulsatility(mag_mean: np.ndarray, vel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(signal mask, score = mean magnitude x temporal std of velocity, smoothed) for (E, T, *space) velocity."""
    signal = mag_mean > SIGNAL_FRACTION * np.percentile(mag_mean, 99.5)
    std = np.sqrt(np.sum(np.var(vel, axis=1), axis=0))
    score = np.where(signal, mag_mean * std, 0.0)
    size = (1, 3, 3) if score.shape[0] == 1 else 3
    return signal, ndimage.uniform_filter(score, size=size)


def _lumen(mag_mean: np.ndarray, seed: tuple, signal: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Connected region around ``seed`` brighter than halfway between its blood and the surrounding tissue;
    returns (mask, blood level, tissue level)."""
    sl = tuple(slice(max(0, s - 1), s + 2) for s in seed)
    blood = float(np.median(mag_mean[sl]))
    tissue = float(np.median(mag_mean[signal])) if signal.any() else 0.0
    if blood <= tissue:
        tissue = 0.5 * blood
    lab, _n = ndimage.label(mag_mean > 0.5 * (blood + tissue))
    if lab[seed] == 0:
        mask = np.zeros(mag_mean.shape, bool)
        mask[seed] = True
    else:
        mask = ndimage.binary_fill_holes(lab == lab[seed])
    return mask, blood, tissue


def _disk(radius_px: float, nd: int) -> np.ndarray:
    r = int(math.ceil(radius_px))
    grids = np.mgrid[tuple(slice(-r, r + 1) for _ in range(nd))]
    return np.sum(np.square(grids), axis=0) <= radius_px ** 2 + 1e-9


def flow_stats(q_ml_s: np.ndarray, frame_s: float) -> dict:
    """Net, forward, backward flow (ml per cycle) and regurgitant fraction (%) from frame flows (ml/s)."""
    q = np.asarray(q_ml_s, float)
    fwd = float(np.clip(q, 0, None).sum() * frame_s)
    bwd = float(np.clip(-q, 0, None).sum() * frame_s)
    return {"net_flow_ml": fwd - bwd, "forward_flow_ml": fwd, "backward_flow_ml": bwd,
            "regurgitant_fraction_pct": 100.0 * bwd / fwd if fwd > 0 else 0.0}


# --------------------------------------------------------------------------- 2-D phase contrast
def _unwrap_all(vel: np.ndarray, vencs: list, region: np.ndarray, weights_region: np.ndarray, dev):
    """Unwrap each encoding in ``region``; anchor = frame of lowest mean speed in ``weights_region``.
    Returns (unwrapped (E, T, *space) numpy, changed (T, *space) bool, anchor frame)."""
    import torch

    speed = np.sum(np.abs(vel), axis=0)  # (T, *space)
    anchor = int(np.argmin(speed[:, weights_region].mean(axis=1))) if weights_region.any() else 0
    reg = torch.as_tensor(region, device=dev)
    out = np.empty_like(vel)
    changed = np.zeros(vel.shape[1:], bool)
    for e, venc in enumerate(vencs):
        v = torch.as_tensor(vel[e], device=dev, dtype=torch.float32)
        u = unwrap(v, float(venc), anchor, reg)
        out[e] = u.cpu().numpy()
        changed |= np.abs(out[e] - vel[e]) > venc
    return out, changed, anchor


def measure_pc(mag: np.ndarray, vel_enc: np.ndarray, acq: Acquisition, *, plane=None, do_unwrap: bool = True,
               device=None) -> dict:
    """One 2-D phase-contrast measurement from (T, 1, Y, X) magnitude and (E, T, 1, Y, X) encoded velocity."""
    import torch

    dev = pick_device(device)
    notes = []
    m2 = mag[:, 0]
    v2 = vel_enc[:, :, 0]
    vencs = [e.venc_cm_s for e in acq.encodings]
    mag_mean = m2.mean(axis=0)
    signal, score = _pulsatility(mag_mean[None], v2[:, :, None])
    score, signal = score[0], signal[0]
    labels, n = _components(score, CANDIDATE_FRACTION)
    if n == 0:
        raise BadInput("no_vessel", "no pulsatile vessel found in the phase-contrast slice (no velocity variation "
                       "over the cycle where there is signal); check the series is a through-plane flow acquisition")
    peaks = ndimage.maximum(score, labels, index=np.arange(1, n + 1))
    chosen = int(np.argmax(peaks)) + 1
    seed = np.unravel_index(int(np.argmax(np.where(labels == chosen, score, -1))), score.shape)
    dy, dx = acq.spacing_mm[1], acq.spacing_mm[2]
    normal = acq.normal
    sign = None
    how = "auto: brightest pulsatile vessel"
    if plane is not None:
        point, pnormal = plane
        rel = point - acq.origin_mm
        dist = abs(float(rel @ normal))
        if dist > PARAM_MAX_DISTANCE_MM + acq.spacing_mm[0] / 2:
            notes.append(f"flow_plane point is {dist:.0f} mm from this slice: vessel found automatically")
        else:
            # The most pulsatile point near the given one: a point roughly on the vessel still finds it, and a
            # vessel less pulsatile than the automatic choice can be picked.
            ia, ib = np.indices(score.shape)
            near = np.hypot((ia - rel @ acq.col_dir / dy) * dy, (ib - rel @ acq.row_dir / dx) * dx) <= SEED_SEARCH_MM
            if np.any(near & signal):
                seed = np.unravel_index(int(np.argmax(np.where(near & signal, score, -1))), score.shape)
                how = "flow_plane point: most pulsatile point within 15 mm"
            else:
                notes.append("flow_plane point is outside the imaged body: vessel found automatically")
            if abs(float(pnormal @ normal)) >= 0.5:
                sign = 1.0 if float(pnormal @ normal) > 0 else -1.0
            else:
                notes.append("flow_plane normal lies nearly in the slice: forward = systolic direction")
    lumen, blood, tissue = _lumen(mag_mean, seed, signal)
    # Pixels without signal (air) carry no flow, only random phase: never in the region of interest.
    roi = ndimage.binary_dilation(lumen, structure=_disk(ROI_DILATE_PX, 2)) & signal
    # Unwrap where flow is: the candidates, dilated, and the region of interest.
    region = ndimage.binary_dilation(labels > 0, structure=_disk(ROI_DILATE_PX, 2)) | roi
    unwrapped, changed, anchor = _unwrap_all(v2, vencs, region, lumen, dev)
    aliased = int(np.sum(changed & roi[None]))
    use = unwrapped if do_unwrap else v2
    if len(vencs) == 1:
        through = use[0] * float(np.sign(acq.vectors[0] @ normal))
    else:  # three encodings on one slice: the velocity vector's through-plane part
        vxyz = np.einsum("ij,jt...->it...", np.linalg.inv(acq.vectors), use)
        through = np.einsum("i,it...->t...", normal, vxyz)
    th = torch.as_tensor(through, device=dev, dtype=torch.float64)
    roi_t = torch.as_tensor(roi, device=dev)
    pixel_cm2 = dy * dx / 100.0
    q = (th * roi_t).sum(dim=(1, 2)).cpu().numpy() * pixel_cm2
    if sign is None:
        sign = 1.0 if q[int(np.argmax(np.abs(q)))] >= 0 else -1.0
    q = q * sign
    lumen_t = torch.as_tensor(lumen, device=dev)
    n_lumen = max(int(lumen.sum()), 1)
    mean_v = ((th * lumen_t).sum(dim=(1, 2)) / n_lumen).cpu().numpy() * sign
    peak_frame = (th.abs() * lumen_t).amax(dim=(1, 2)).cpu().numpy()
    frac = np.clip((mag_mean - tissue) / max(blood - tissue, 1e-6), 0, 1)
    area_mm2 = float(np.sum(frac[roi]) * dy * dx)
    frame_s = acq.frame_ms / 1000.0
    centre = acq.origin_mm + seed[1] * dx * acq.row_dir + seed[0] * dy * acq.col_dir
    res = {"kind": "pc", "series_numbers": acq.series_numbers, "vessel": how, **flow_stats(q, frame_s),
           "peak_velocity_cm_s": float(peak_frame.max()), "venc_cm_s": float(max(vencs)),
           "venc_source": acq.encodings[0].source, "aliased_voxel_frames": aliased,
           "aliasing_detected": int(aliased > 0), "unwrapped": bool(do_unwrap), "anchor_frame": anchor,
           "vessel_area_mm2": area_mm2, "roi_pixels": int(roi.sum()), "lumen_pixels": int(lumen.sum()),
           "vessel_centre_mm": centre.round(2).tolist(),
           "forward_direction": (sign * normal).round(4).tolist(), "frames": len(acq.triggers_ms),
           "rr_ms": acq.rr_ms, "rr_source": acq.rr_source, "frame_ms": acq.frame_ms,
           "trigger_time_ms": list(acq.triggers_ms),
           "flow_ml_s": q.tolist(), "mean_velocity_cm_s": mean_v.tolist(),
           "peak_velocity_frame_cm_s": peak_frame.tolist(), "candidates": int(n), "notes": acq.notes + notes}
    res["_qc"] = {"image": mag_mean, "roi": roi}
    return res


# --------------------------------------------------------------------------- 4-D flow
def _orthonormal(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1.0, 0, 0]) if abs(n[0]) < 0.9 else np.array([0, 1.0, 0])
    e1 = np.cross(n, a)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(n, e1)


def resample_plane(volume, acq: Acquisition, point: np.ndarray, normal: np.ndarray, half_mm: float,
                   step_mm: float, dev):
    """Trilinear samples of ``volume`` (C, Z, Y, X) tensor on a square plane grid through ``point`` with
    ``normal``; returns (values (C, P, P), valid (P, P) bool numpy, e1, e2)."""
    import torch

    e1, e2 = _orthonormal(normal)
    n_p = int(2 * math.ceil(half_mm / step_mm) + 1)
    offs = (np.arange(n_p) - (n_p - 1) / 2) * step_mm
    a, b = np.meshgrid(offs, offs, indexing="ij")
    pts = point + a[..., None] * e1 + b[..., None] * e2  # (P, P, 3)
    rel = pts - acq.origin_mm
    dz, dy, dx = acq.spacing_mm
    k = rel @ acq.normal / dz
    j = rel @ acq.col_dir / dy
    i = rel @ acq.row_dir / dx
    nz, ny, nx = acq.shape
    valid = (i >= 0) & (i <= nx - 1) & (j >= 0) & (j <= ny - 1) & (k >= 0) & (k <= nz - 1)
    norm = np.stack([2 * i / max(nx - 1, 1) - 1, 2 * j / max(ny - 1, 1) - 1, 2 * k / max(nz - 1, 1) - 1], axis=-1)
    grid = torch.as_tensor(norm[None, None], dtype=torch.float32, device=dev)  # (1, 1, P, P, 3)
    out = torch.nn.functional.grid_sample(volume.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)
    return out[0, :, 0], valid, e1, e2


def measure_flow4d(mag: np.ndarray, vel_enc: np.ndarray, acq: Acquisition, *, plane=None, do_unwrap: bool = True,
                   device=None) -> dict:
    """One 4-D flow measurement: (T, Z, Y, X) magnitude, (3, T, Z, Y, X) encoded velocity."""
    import torch

    dev = pick_device(device)
    notes = []
    vencs = [e.venc_cm_s for e in acq.encodings]
    mag_mean = mag.mean(axis=0)
    signal, score = _pulsatility(mag_mean, vel_enc)
    labels, n = _components(score, CANDIDATE_FRACTION)
    if n == 0:
        raise BadInput("no_vessel", "no pulsatile vessel found in the 4-D flow volume; check the series")
    peaks = ndimage.maximum(score, labels, index=np.arange(1, n + 1))
    chosen = int(np.argmax(peaks)) + 1
    comp = labels == chosen
    region = ndimage.binary_dilation(labels > 0, structure=_disk(2, 3))
    unwrapped, changed, anchor = _unwrap_all(vel_enc, vencs, region, comp, dev)
    use = unwrapped if do_unwrap else vel_enc
    inv = np.linalg.inv(acq.vectors)
    vxyz = np.einsum("ij,j...->i...", inv, use).astype(np.float32)  # (3, T, Z, Y, X) patient LPS
    nt = vxyz.shape[1]
    dz, dy, dx = acq.spacing_mm
    zz, yy, xx = np.nonzero(comp)
    idx_pts = acq.origin_mm + np.outer(xx * dx, acq.row_dir) + np.outer(yy * dy, acq.col_dir) + \
        np.outer(zz * dz, acq.normal)
    how = "auto: brightest pulsatile vessel, mean systolic direction"
    if plane is not None:
        point, normal = plane
        how = "flow_plane"
    else:
        speed = np.sqrt(np.sum(vxyz[:, :, comp] ** 2, axis=0)).mean(axis=1)  # (T,)
        systole = speed >= 0.7 * speed.max()
        mean_vec = vxyz[:, systole][:, :, comp].mean(axis=(1, 2))
        normal = mean_vec / max(np.linalg.norm(mean_vec), 1e-9)
        point = idx_pts.mean(axis=0)
    step = min(acq.spacing_mm) / 2.0
    half = 0.5 * min(nx_mm for nx_mm in (acq.shape[1] * dy, acq.shape[2] * dx))
    volume = torch.as_tensor(np.concatenate([mag_mean[None], score[None], vxyz.reshape(3 * nt, *vxyz.shape[2:])]),
                             device=dev, dtype=torch.float32)
    sig_thr = SIGNAL_FRACTION * np.percentile(mag_mean, 99.5)
    for attempt in range(2):
        vals, valid, e1, e2 = resample_plane(volume, acq, point, normal, half, step, dev)
        mplane, splane = vals[0].cpu().numpy(), vals[1].cpu().numpy()
        # Seed: the most pulsatile bright point near the plane's centre (a flow_plane point only roughly on the
        # vessel still finds it); the lumen grows from there and the plane is re-centred on it once.
        ia, ib = np.indices(mplane.shape)
        c = (mplane.shape[0] - 1) / 2
        near = valid & (np.hypot(ia - c, ib - c) * step <= SEED_SEARCH_MM)
        seed = np.unravel_index(int(np.argmax(np.where(near, splane, -np.inf))), mplane.shape)
        lumen, blood, tissue_p = _lumen(np.where(valid, mplane, 0), seed, valid & (mplane > sig_thr))
        if attempt == 0:
            ci, cj = ndimage.center_of_mass(lumen)
            point = point + (ci - c) * step * e1 + (cj - c) * step * e2
    dil = ROI_DILATE_VOXELS_4D * max(acq.spacing_mm) / step
    roi = ndimage.binary_dilation(lumen, structure=_disk(dil, 2)) & (mplane > sig_thr)  # air: random phase
    if np.any(roi & ~valid):
        notes.append(f"{int(np.sum(roi & ~valid))} plane pixel(s) of the region of interest lie outside the volume")
    roi &= valid
    v_plane = vals[2:].reshape(3, nt, *mplane.shape)  # (3, T, P, P)
    n_t = torch.as_tensor(normal, dtype=torch.float32, device=dev)
    vn = torch.einsum("i,itab->tab", n_t, v_plane)
    roi_t = torch.as_tensor(roi, device=dev)
    lumen_t = torch.as_tensor(lumen & valid, device=dev)
    q = (vn * roi_t).sum(dim=(1, 2)).double().cpu().numpy() * (step * step / 100.0)
    speed_plane = torch.sqrt((v_plane ** 2).sum(dim=0))
    peak_frame = (speed_plane * lumen_t).amax(dim=(1, 2)).cpu().numpy()
    n_lumen = max(int(lumen.sum()), 1)
    mean_v = ((vn * lumen_t).sum(dim=(1, 2)) / n_lumen).cpu().numpy()
    frac = np.clip((mplane - tissue_p) / max(blood - tissue_p, 1e-6), 0, 1)
    area_mm2 = float(np.sum(frac[roi]) * step * step)
    aliased = int(np.sum(changed & comp[None]))
    frame_s = acq.frame_ms / 1000.0
    res = {"kind": "flow4d", "series_numbers": acq.series_numbers, "vessel": how, **flow_stats(q, frame_s),
           "peak_velocity_cm_s": float(peak_frame.max()), "venc_cm_s": float(max(vencs)),
           "venc_source": acq.encodings[0].source, "aliased_voxel_frames": aliased,
           "aliasing_detected": int(aliased > 0), "unwrapped": bool(do_unwrap), "anchor_frame": anchor,
           "vessel_area_mm2": area_mm2, "roi_pixels": int(roi.sum()), "lumen_pixels": int(lumen.sum()),
           "plane_point_mm": np.asarray(point).round(3).tolist(), "plane_normal": np.asarray(normal).round(5).tolist(),
           "plane_step_mm": step, "frames": nt, "rr_ms": acq.rr_ms, "rr_source": acq.rr_source,
           "frame_ms": acq.frame_ms,
           "trigger_time_ms": list(acq.triggers_ms), "flow_ml_s": q.tolist(), "mean_velocity_cm_s": mean_v.tolist(),
           "peak_velocity_frame_cm_s": peak_frame.tolist(), "candidates": int(n), "notes": acq.notes + notes}
    res["_qc"] = {"image": np.where(valid, mplane, 0), "roi": roi}
    return res


# --------------------------------------------------------------------------- QC pictures
def _curve_png(path: pathlib.Path, measurements: list[dict]) -> None:
    """Flow (ml/s) over the cycle (ms) of every measurement, forward positive, zero line dashed."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 640, 360, 56, 12, 24, 36
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    qs = [q for m in measurements for q in m["flow_ml_s"]] or [0.0]
    lo, hi = min(min(qs), 0.0), max(max(qs), 1e-6)
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    rr = max(m["rr_ms"] for m in measurements)

    def xy(t, q):
        return (left + (w - left - right) * t / rr, top + (h - top - bottom) * (hi - q) / (hi - lo))

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    y0 = xy(0, 0)[1]
    for x in range(left, w - right, 8):
        draw.line([(x, y0), (x + 4, y0)], fill=(120, 120, 120))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        q = lo + frac * (hi - lo)
        draw.text((4, xy(0, q)[1] - 6), f"{q:.0f}", fill=(0, 0, 0))
        t = frac * rr
        draw.text((xy(t, 0)[0] - 10, h - bottom + 4), f"{t:.0f}", fill=(0, 0, 0))
    draw.text((left, 4), "flow (ml/s) over the cardiac cycle (ms); forward positive", fill=(0, 0, 0))
    colours = [(200, 30, 30), (30, 90, 200), (30, 150, 60), (160, 60, 160), (200, 120, 0)]
    for n, m in enumerate(measurements):
        colour = colours[n % len(colours)]
        pts = [xy(t + m["frame_ms"] / 2, q) for t, q in zip(m["trigger_time_ms"], m["flow_ml_s"])]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for p in pts:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        label = (f"{m['kind']} series {'/'.join(str(s) for s in m['series_numbers'])}: net {m['net_flow_ml']:.1f} ml, "
                 f"RF {m['regurgitant_fraction_pct']:.1f}%" + (", aliasing unwrapped" if m["aliasing_detected"]
                                                               and m["unwrapped"] else ""))
        draw.text((left + 6, top + 4 + 12 * n), label, fill=colour)
    img.save(path)


def _roi_png(path: pathlib.Path, measurements: list[dict]) -> None:
    """Mean magnitude (2-D slice, or the 4-D plane) with the region of interest outlined, one panel each."""
    from PIL import Image

    panels = []
    for m in measurements:
        image, roi = m["_qc"]["image"], m["_qc"]["roi"]
        hi = float(np.percentile(image, 99.5)) or 1.0
        gray = (np.clip(image / hi, 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        rgb[roi & ~ndimage.binary_erosion(roi)] = (255, 200, 0)
        scale = max(1, int(round(256 / max(gray.shape))))
        panels.append(Image.fromarray(rgb).resize((gray.shape[1] * scale, gray.shape[0] * scale), Image.NEAREST))
    width = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    out = Image.new("RGB", (width, max(p.height for p in panels)), (0, 0, 0))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 4
    out.save(path)


# --------------------------------------------------------------------------- the step
METRIC_UNITS = {"net_flow_ml": "ml", "forward_flow_ml": "ml", "backward_flow_ml": "ml",
                "regurgitant_fraction_pct": "%", "peak_velocity_cm_s": "cm/s", "venc_cm_s": "cm/s",
                "aliased_voxel_frames": "", "aliasing_detected": "", "vessel_area_mm2": "mm2"}


def flow(files: list[pathlib.Path], out_dir: pathlib.Path, *, device=None, previous: dict | None = None,
         flow_plane: str | None = None, flow_unwrap: bool = True, **_options) -> dict:
    """Measure every flow acquisition of the study (2-D phase contrast and 4-D flow); writes flow.json,
    qc_flow_curve.png and qc_flow_roi.png.

    Metrics (``pc_`` for the first 2-D measurement in series-number order, ``flow4d_`` for the first 4-D one):
    net / forward / backward flow (ml per cycle), regurgitant fraction, peak velocity, VENC, aliased voxel-frames,
    aliasing detected (0/1), vessel area; ``flow_aliasing_detected`` over the whole study.  Findings: one per
    frame of those measurements (``pc_flow_frame`` / ``flow4d_flow_frame``) and, when the study has several, one
    ``flow_measurement`` per measurement.  A study without flow series returns empty results with a note.  When
    no flow acquisition can be measured, BadInput with the first one's reason; an unusable acquisition beside
    measurable ones is listed in flow.json (``refused``, with its reason) and counted
    (``flow_acquisitions_refused``).
    """
    from imaging_tasks.cardiovascular.series import of_kind

    plane = parse_plane(flow_plane)  # ConfigError before any file is read
    dev = pick_device(device)
    series = of_kind([pathlib.Path(f) for f in files], "flow")
    if not series:
        return {"metrics": [], "findings": [], "outputs": [], "note": "no flow series", "device": str(dev)}
    acqs, refused = acquisitions(series)
    measurements = []
    for acq in acqs:
        try:
            mag, vel = load(acq)
            fn = measure_pc if acq.kind == "pc" else measure_flow4d
            measurements.append(fn(mag, vel, acq, plane=plane, do_unwrap=bool(flow_unwrap), device=dev))
        except BadInput as exc:
            refused.append({"series_numbers": acq.series_numbers, "reason": exc.reason, "message": exc.message})
    if not measurements:
        first = refused[0]
        raise BadInput(first["reason"], first["message"])
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, findings = [], []
    for kind, prefix in (("pc", "pc_"), ("flow4d", "flow4d_")):
        first = next((m for m in measurements if m["kind"] == kind), None)
        if first is None:
            continue
        for name, unit in METRIC_UNITS.items():
            metrics.append({"name": prefix + name, "value": float(first[name]), "unit": unit})
        for k, t in enumerate(first["trigger_time_ms"]):
            findings.append({"kind": f"{kind}_flow_frame", "index": k, "trigger_time_ms": float(t),
                             "flow_ml_s": float(first["flow_ml_s"][k]),
                             "mean_velocity_cm_s": float(first["mean_velocity_cm_s"][k]),
                             "peak_velocity_cm_s": float(first["peak_velocity_frame_cm_s"][k])})
    metrics.append({"name": "flow_aliasing_detected", "value": float(any(m["aliasing_detected"] for m in measurements)),
                    "unit": ""})
    metrics.append({"name": "flow_measurements", "value": float(len(measurements)), "unit": ""})
    metrics.append({"name": "flow_acquisitions_refused", "value": float(len(refused)), "unit": ""})
    if len(measurements) > 1:
        for i, m in enumerate(measurements):
            findings.append({"kind": "flow_measurement", "index": i, "measurement_kind": m["kind"],
                             "series_number": m["series_numbers"][0] if m["series_numbers"] else None,
                             **{k: float(m[k]) for k in METRIC_UNITS}})
    _curve_png(out_dir / "qc_flow_curve.png", measurements)
    _roi_png(out_dir / "qc_flow_roi.png", measurements)
    table = {"measurements": [{k: v for k, v in m.items() if k != "_qc"} for m in measurements],
             "refused": refused, "flow_plane": flow_plane or None, "flow_unwrap": bool(flow_unwrap),
             "aliasing_detected": any(m["aliasing_detected"] for m in measurements)}
    (out_dir / "flow.json").write_text(json.dumps(table, indent=1))
    log.info("flow: %d measurement(s) (%s), %d refused, aliasing %s", len(measurements),
             ", ".join(m["kind"] for m in measurements), len(refused), table["aliasing_detected"])
    return {"metrics": metrics, "findings": findings, "outputs": ["flow.json", "qc_flow_curve.png",
                                                                   "qc_flow_roi.png"], "device": str(dev)}
