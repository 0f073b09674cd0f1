"""Tube flow phantoms written as DICOM MR images: 2D through-plane phase contrast and 4D flow, with exact truth.

Why the truth is the analytic one: every pixel (voxel) value is the partial-volume average of the phantom over
the pixel area x slice thickness (supersampled on a regular sub-grid), and every frame is the average of the
waveform over its own acquisition window ``[TriggerTime, TriggerTime + RR/frames)``.  A flow measurement that
sums velocity x pixel area over a region covering the vessel, and frame flow x frame interval over the cycle,
therefore recovers the analytic net flow (area x integral of the mean velocity) up to the sub-grid's
discretisation of the vessel edge (< 0.3 %, measured: ``truth["phantom_flow_ml"]`` is the same sum done on the
noise-free images).  Forward and backward flow are exact as well, because the lobes of the waveform are separated
by at least one frame window (no frame mixes forward and backward flow).

The phantom: a body of static tissue (zero velocity, medium magnitude) in air (no signal, random phase); one
vessel ("ascending aorta": bright, pulsatile, with a forward systolic lobe and a backward diastolic lobe of known
volumes), optionally a second, smaller and dimmer vessel with another waveform ("descending aorta", flowing the
other way) so automatic vessel selection has to pick the brightest pulsatile one.  Profiles are plug (uniform) or
parabolic (Poiseuille: 2 x mean velocity on the axis, 0 at the wall).  Noise is complex Gaussian added to the
complex signal ``magnitude x exp(i pi v / VENC)``, so phase (velocity) noise grows where magnitude is low and a
velocity above the VENC wraps round (aliases) as on a scanner.

Vendor habits (how the velocity encoding and the pixel -> velocity mapping are stored):

* ``siemens``: magnitude and phase in separate series; the VENC and direction only in SequenceName
  (``*fl2d1_v150in``, ``*fl3d1r_v150rl`` / ``ap`` / ``fh``; the magnitude series carries none); ImageType
  ``M`` / ``P``; phase stored unsigned 12 bit 0..4095 with RescaleSlope 2 and RescaleIntercept -4096
  (``v = rescaled / 4096 x VENC``).
* ``philips``: magnitude and phase images in one series (ImageType ``M_PCA`` / ``P_PCA``), the velocity given by a
  RealWorldValueMappingSequence in cm/s (UCUM) on stored values that are *not* the full 12-bit range (so only
  the mapping gives the right numbers), VENC and direction in a top-level MRVelocityEncodingSequence.
* ``ge``: one series, ComplexImageComponent MAGNITUDE / PHASE, signed 16-bit phase
  (``v = VENC x stored / 32768``), MRVelocityEncodingSequence with the direction as a patient-space vector
  (for 4D flow along the grid's own row / column / slice axes, oblique to the patient axes).

``defect`` writes the bad inputs flow processing must refuse: ``"missing_venc"`` (a phase series whose VENC
cannot be known) and ``"mismatched_magnitude_phase"`` (magnitude images for two frames fewer than the phase
images: the same plane, but not the same acquisition).

Positive velocity is along the encoding direction: "through" = slice normal (row x column of
ImageOrientationPatient), rl = +x, ap = +y, fh = +z (patient LPS).
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field

import numpy as np

from imaging_tasks.synth import phi

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VENDORS = ("siemens", "philips", "ge")
PROFILES = ("plug", "parabolic")
TISSUE_LEVEL = 0.45  # static tissue magnitude relative to the main vessel's blood
MAG_FULL_SCALE = 3000.0  # stored magnitude of brightness 1.0
PHILIPS_OFFSET = 2048  # Philips-like phase: stored = round(v * 10 / (cm/s -> mm/s)) + offset
PHILIPS_SCALE = 0.1  # cm/s per stored unit (stored values are mm/s)


# --------------------------------------------------------------------------- waveform
@dataclass
class Waveform:
    """Mean (cross-section averaged) velocity over one cardiac cycle, in cm/s: a forward systolic sin^2 lobe
    of peak ``forward_cm_s`` over ``[0, systole)``, then after a gap a backward sin^2 lobe of peak
    ``backward_cm_s`` over ``[back_start, back_start + back_len)``, then rest (zero flow)."""

    rr_ms: float
    forward_cm_s: float
    backward_cm_s: float
    systole_ms: float
    back_start_ms: float
    back_len_ms: float

    def __call__(self, t_ms: np.ndarray) -> np.ndarray:
        t = np.mod(np.asarray(t_ms, float), self.rr_ms)
        u = np.zeros_like(t)
        s = t < self.systole_ms
        u[s] = self.forward_cm_s * np.sin(np.pi * t[s] / self.systole_ms) ** 2
        b = (t >= self.back_start_ms) & (t < self.back_start_ms + self.back_len_ms)
        u[b] = -self.backward_cm_s * np.sin(np.pi * (t[b] - self.back_start_ms) / self.back_len_ms) ** 2
        return u

    def frame_means(self, frames: int) -> np.ndarray:
        """Average of the mean velocity over each frame's window [k RR/frames, (k+1) RR/frames)."""
        sub = 400
        t = (np.arange(frames * sub) + 0.5) * self.rr_ms / (frames * sub)
        return self(t).reshape(frames, sub).mean(axis=1)

    def forward_integral_cm(self) -> float:
        """Integral of the forward lobe (cm/s x s = cm); sin^2 averages 1/2 over its lobe."""
        return self.forward_cm_s * self.systole_ms / 2000.0

    def backward_integral_cm(self) -> float:
        return self.backward_cm_s * self.back_len_ms / 2000.0


def make_waveform(rr_ms: float, frames: int, peak_mean_cm_s: float, regurgitant_fraction_pct: float,
                  systole_fraction: float = 0.35) -> Waveform:
    """A waveform whose backward/forward volume ratio is ``regurgitant_fraction_pct``; the gap between the
    lobes is at least one frame window so no frame mixes forward and backward flow."""
    dt = rr_ms / frames
    systole = systole_fraction * rr_ms
    gap = max(0.05 * rr_ms, dt)
    back_len = 0.3 * rr_ms
    back_start = systole + gap
    if back_start + back_len > rr_ms:
        raise ValueError("waveform lobes do not fit into the cycle; use more frames")
    backward = regurgitant_fraction_pct / 100.0 * peak_mean_cm_s * systole / back_len
    return Waveform(rr_ms, peak_mean_cm_s, backward, systole, back_start, back_len)


# --------------------------------------------------------------------------- geometry
@dataclass
class Tube:
    """A straight vessel: a point on its axis, the axis (unit, = direction of forward flow), radius, profile."""

    point_mm: np.ndarray
    axis: np.ndarray
    radius_mm: float
    profile: str
    brightness: float
    wave: Waveform
    name: str = "vessel"

    def peak_factor(self) -> float:
        return 2.0 if self.profile == "parabolic" else 1.0


@dataclass
class Grid:
    """Voxel centres: origin (patient mm of voxel (0,0,0)), row/col/normal unit vectors (LPS), spacing
    (slice, row, column) mm, shape (slices, rows, cols); thickness = the slab each slice averages over."""

    origin_mm: np.ndarray
    row_dir: np.ndarray  # direction of increasing column index
    col_dir: np.ndarray  # direction of increasing row index
    spacing_mm: tuple[float, float, float]  # (between slices, between rows, between columns)
    shape: tuple[int, int, int]
    thickness_mm: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def centres(self, k: int) -> np.ndarray:
        """(rows, cols, 3) patient coordinates of slice ``k``'s pixel centres."""
        dz, dy, dx = self.spacing_mm
        j, i = np.mgrid[0:self.shape[1], 0:self.shape[2]]
        return (self.origin_mm + k * dz * self.normal + (i * dx)[..., None] * self.row_dir
                + (j * dy)[..., None] * self.col_dir)


@dataclass
class Rendered:
    """Noise-free partial-volume images: magnitude (slices, rows, cols) and, per tube, the average of the
    velocity profile shape (mean velocity 1 cm/s) over each voxel."""

    magnitude: np.ndarray
    shapes: list[np.ndarray] = field(default_factory=list)


def rotation(angles_deg) -> np.ndarray:
    """Rotation matrix from (about x, about y, about z) angles in degrees, applied in that order."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def render(grid: Grid, tubes: list[Tube], body_centre_mm: np.ndarray, body_radii_mm: tuple[float, float],
           supersample: tuple[int, int, int]) -> Rendered:
    """Supersampled partial-volume average of magnitude and of each tube's velocity profile shape.

    The body is an elliptic cylinder of static tissue along the grid normal (radii along row, col)."""
    sz, sy, sx = supersample
    dz, dy, dx = grid.spacing_mm
    offs = [((a + 0.5) / n - 0.5) for n in (sz, sy, sx) for a in range(n)]
    oz = np.array(offs[:sz]) * grid.thickness_mm
    oy = np.array(offs[sz:sz + sy]) * dy
    ox = np.array(offs[sz + sy:]) * dx
    sub = (oz[:, None, None, None] * grid.normal + oy[None, :, None, None] * grid.col_dir
           + ox[None, None, :, None] * grid.row_dir).reshape(-1, 3)  # (S, 3)
    nz, ny, nx = grid.shape
    mag = np.zeros(grid.shape)
    shapes = [np.zeros(grid.shape) for _ in tubes]
    for k in range(nz):
        pts = grid.centres(k)[:, :, None, :] + sub[None, None]  # (ny, nx, S, 3)
        rel = pts - body_centre_mm
        body = ((rel @ grid.row_dir) / body_radii_mm[0]) ** 2 + ((rel @ grid.col_dir) / body_radii_mm[1]) ** 2 <= 1
        level = np.where(body, TISSUE_LEVEL, 0.0)
        for ti, tube in enumerate(tubes):
            d = pts - tube.point_mm
            along = d @ tube.axis
            r2 = np.sum(d * d, axis=-1) - along ** 2
            inside = r2 < tube.radius_mm ** 2
            level = np.where(inside, tube.brightness, level)
            if tube.profile == "plug":
                shape = inside.astype(float)
            else:
                shape = np.where(inside, 2.0 * (1.0 - r2 / tube.radius_mm ** 2), 0.0)
            shapes[ti][k] = shape.mean(axis=-1)
        mag[k] = level.mean(axis=-1)
    return Rendered(mag, shapes)


def _tube_flows(tubes: list[Tube]) -> list[dict]:
    out = []
    for tube in tubes:
        area_cm2 = math.pi * (tube.radius_mm / 10.0) ** 2
        fwd = tube.wave.forward_integral_cm() * area_cm2
        bwd = tube.wave.backward_integral_cm() * area_cm2
        out.append({"name": tube.name, "net_flow_ml": fwd - bwd, "forward_flow_ml": fwd, "backward_flow_ml": bwd,
                    "regurgitant_fraction_pct": 100.0 * bwd / fwd if fwd else 0.0,
                    "peak_velocity_cm_s": tube.peak_factor() * max(tube.wave.forward_cm_s, tube.wave.backward_cm_s),
                    "vessel_area_mm2": math.pi * tube.radius_mm ** 2, "profile": tube.profile,
                    "radius_mm": tube.radius_mm, "axis": tube.axis.round(6).tolist(),
                    "point_mm": tube.point_mm.round(4).tolist()})
    return out


# --------------------------------------------------------------------------- DICOM encoding
def _velocity_to_stored(v: np.ndarray, venc: float, vendor: str) -> np.ndarray:
    """Wrapped velocity (cm/s, in [-VENC, VENC)) -> stored pixel values per vendor habit."""
    if vendor == "siemens":  # unsigned 12 bit, 2048 = 0 cm/s
        return np.clip(np.round(v / venc * 2048.0 + 2048.0), 0, 4095).astype(np.uint16)
    if vendor == "philips":  # mm/s offset by 2048; only the real-world value mapping says so
        return np.clip(np.round(v / PHILIPS_SCALE) + PHILIPS_OFFSET, 0, 4095).astype(np.uint16)
    return np.clip(np.round(v / venc * 32768.0), -32768, 32767).astype(np.int16)  # ge: signed


def _direction_token(direction) -> str:
    return direction if isinstance(direction, str) else "vec"


def _siemens_sequence_name(kind: str, venc: float, direction) -> str:
    base = "*fl2d1" if kind == "pc" else "*fl3d1r"
    if direction is None:
        return base
    token = {"through": "in"}.get(direction, direction)
    return f"{base}_v{int(round(venc))}{token}"


def _enc_vector(direction, grid: Grid) -> np.ndarray:
    if isinstance(direction, str):
        return {"through": grid.normal, "rl": np.array([1.0, 0, 0]), "ap": np.array([0, 1.0, 0]),
                "fh": np.array([0, 0, 1.0])}[direction]
    v = np.asarray(direction, float)
    return v / np.linalg.norm(v)


def _image(study, rng, *, series_uid, series_number, instance, description, grid: Grid, k: int,
           trigger_ms: float, frames: int, rr_ms: float, pixels: np.ndarray, kind: str, component: str,
           vendor: str, venc: float | None, direction, image_type: list[str], cache: dict | None = None,
           defect_missing_venc: bool = False):
    """One image's dataset.  Images of one series and component differ only in UID, instance number, position,
    trigger time and pixels: with ``cache`` the dataset built for the first one is restamped (4-D flow writes
    hundreds of files; building each from scratch doubles the time)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    dz, dy, dx = grid.spacing_mm
    pos = grid.origin_mm + k * dz * grid.normal
    key = (series_uid, component, repr(direction))
    if cache is not None and key in cache:
        ds = cache[key]
        uid = phi.new_uid(rng)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ref = ds.RequestAttributesSequence[0].ReferencedStudySequence[0].ReferencedSOPSequence[0]
        ref.ReferencedSOPInstanceUID = uid
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.SliceLocation = f"{float(pos @ grid.normal):.4f}"
        ds.TriggerTime = f"{trigger_ms:.3f}"
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        return ds
    ds = phi.dicom_dataset(study, modality="MR", sop_class_uid=MR_IMAGE_STORAGE, series_uid=series_uid,
                           sop_uid=phi.new_uid(rng), series_number=series_number, instance_number=instance,
                           series_description=description)
    ds.Manufacturer = {"siemens": "SynthCo-S", "philips": "SynthCo-P", "ge": "SynthCo-G"}[vendor]
    ds.ImageType = image_type
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*grid.row_dir, *grid.col_dir)]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
    ds.SliceThickness = f"{grid.thickness_mm:g}"
    if grid.shape[0] > 1:
        ds.SpacingBetweenSlices = f"{dz:g}"
    ds.SliceLocation = f"{float(pos @ grid.normal):.4f}"
    ds.TriggerTime = f"{trigger_ms:.3f}"
    ds.NominalInterval = f"{rr_ms:g}"
    ds.HeartRate = f"{60000.0 / rr_ms:.0f}"
    ds.CardiacNumberOfImages = frames
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "SP"
    ds.MRAcquisitionType = "2D" if kind == "pc" else "3D"
    ds.AcquisitionNumber = 1
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    signed = pixels.dtype == np.int16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if vendor == "siemens":
        ds.SequenceName = _siemens_sequence_name(kind, venc, direction if component == "phase" else None) \
            if venc is not None else ("*fl2d1" if kind == "pc" else "*fl3d1r")
        if component == "phase":
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "2", "-4096", "US"
    else:
        ds.SequenceName = "PCA" if vendor == "philips" else "fgre_pc"
    if vendor == "ge":
        ds.ComplexImageComponent = "PHASE" if component == "phase" else "MAGNITUDE"
    if vendor in ("philips", "ge") and component == "phase" and venc is not None:
        item = Dataset()
        item.VelocityEncodingDirection = [float(v) for v in _enc_vector(direction, grid)]
        item.VelocityEncodingMinimumValue = -float(venc)
        item.VelocityEncodingMaximumValue = float(venc)
        ds.MRVelocityEncodingSequence = Sequence([item])
    if vendor == "philips" and component == "phase":
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        units = Dataset()
        units.CodeValue, units.CodingSchemeDesignator, units.CodeMeaning = "cm/s", "UCUM", "centimeter per second"
        rw = Dataset()
        rw.RealWorldValueFirstValueMapped = 0
        rw.RealWorldValueLastValueMapped = 4095
        rw.RealWorldValueSlope = PHILIPS_SCALE
        rw.RealWorldValueIntercept = -PHILIPS_OFFSET * PHILIPS_SCALE
        rw.LUTExplanation = "velocity"
        rw.LUTLabel = "cm/s"
        rw.MeasurementUnitsCodeSequence = Sequence([units])
        ds.RealWorldValueMappingSequence = Sequence([rw])
    if defect_missing_venc and vendor == "siemens":
        ds.SequenceName = "*fl2d1" if kind == "pc" else "*fl3d1r"
    if cache is not None:
        cache[key] = ds
    return ds


def _image_types(vendor: str, component: str) -> list[str]:
    if vendor == "siemens":
        return ["ORIGINAL", "PRIMARY", "M" if component == "magnitude" else "P", "ND"]
    if vendor == "philips":
        return ["ORIGINAL", "PRIMARY", "M_PCA" if component == "magnitude" else "P_PCA",
                "M" if component == "magnitude" else "P", "PCA"]
    return ["ORIGINAL", "PRIMARY", "OTHER"]


def _noisy(mag: np.ndarray, v_enc: np.ndarray, venc: float, sigma: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude and wrapped velocity from the complex signal mag x exp(i pi v / VENC) plus complex noise."""
    s = mag * np.exp(1j * np.pi * v_enc / venc)
    s = s + sigma * (rng.standard_normal(mag.shape) + 1j * rng.standard_normal(mag.shape))
    return np.abs(s), venc / np.pi * np.angle(s)


def _write_acquisition(folder: pathlib.Path, study, rng, *, kind: str, vendor: str, grid: Grid, tubes: list[Tube],
                       rendered: Rendered, frames: int, rr_ms: float, venc: float, directions: list,
                       noise: float, series_number: int, defect: str | None) -> dict:
    """Write magnitude + one phase image per encoding direction for every slice and frame."""
    folder.mkdir(parents=True, exist_ok=True)
    frame_u = [t.wave.frame_means(frames) for t in tubes]  # (frames,) mean velocity per tube
    enc = [_enc_vector(d, grid) for d in directions]
    # Series layout per vendor: (series offset, description) for magnitude and each direction.
    label = "PC" if kind == "pc" else "4D flow"
    if vendor == "siemens":
        layout = {"magnitude": 0, **{i: 1 + i for i in range(len(directions))}}
        descs = {0: f"{label} magnitude", **{1 + i: f"{label} phase {_direction_token(d)}"
                                              for i, d in enumerate(directions)}}
    else:
        layout = {"magnitude": 0, **{i: 0 for i in range(len(directions))}}
        descs = {0: f"{label}"}
    uids = {off: phi.new_uid(rng) for off in set(layout.values())}
    instance = {off: 0 for off in uids}
    nz = grid.shape[0]
    mag_frames = frames
    if defect == "mismatched_magnitude_phase":
        mag_frames = frames - 2
    truth_alias = 0
    cache: dict = {}
    peak_sampled = 0.0
    phantom_q = np.zeros(frames)
    pix_area_cm2 = grid.spacing_mm[1] * grid.spacing_mm[2] / 100.0
    main_axis = tubes[0].axis
    for f in range(frames):
        trigger = f * rr_ms / frames
        vel = np.zeros(grid.shape + (3,))
        for t, u, shape in zip(tubes, frame_u, rendered.shapes):
            vel += (u[f] * shape)[..., None] * t.axis
        main = frame_u[0][f] * rendered.shapes[0]
        peak_sampled = max(peak_sampled, float(np.abs(main).max()))
        if kind == "pc":
            phantom_q[f] = float(np.sum(main * abs(main_axis @ grid.normal))) * pix_area_cm2  # forward positive
        mag_noisy = None
        for di, e in enumerate(enc):
            v_enc = vel @ e
            truth_alias += int(np.sum((np.abs(v_enc) >= venc) & (rendered.shapes[0] > 0)))
            m_noisy, v_wrapped = _noisy(rendered.magnitude, v_enc, venc, noise, rng)
            if mag_noisy is None:
                mag_noisy = m_noisy
            off = layout[di]
            for k in range(nz):
                instance[off] += 1
                pix = _velocity_to_stored(v_wrapped[k], venc, vendor)
                d_token = None if defect == "missing_venc" else directions[di]
                ds = _image(study, rng, series_uid=uids[off], series_number=series_number + off,
                            instance=instance[off], description=descs.get(off, label), grid=grid, k=k,
                            trigger_ms=trigger, frames=frames, rr_ms=rr_ms, pixels=pix, kind=kind,
                            component="phase", vendor=vendor, venc=None if defect == "missing_venc" else venc,
                            direction=d_token if d_token is not None else directions[di],
                            image_type=_image_types(vendor, "phase"), cache=cache,
                            defect_missing_venc=defect == "missing_venc")
                phi.write_dicom(ds, str(folder / f"{series_number + off:03d}_{instance[off]:05d}.dcm"))
        if f >= mag_frames:
            continue
        off = layout["magnitude"]
        for k in range(nz):
            instance[off] += 1
            m = mag_noisy[k]
            pix = np.clip(np.round(m * MAG_FULL_SCALE), 0, 4095).astype(np.uint16)
            ds = _image(study, rng, series_uid=uids[off], series_number=series_number + off, instance=instance[off],
                        description=descs.get(off, label), grid=grid, k=k, trigger_ms=trigger,
                        frames=mag_frames, rr_ms=rr_ms, pixels=pix, kind=kind, component="magnitude",
                        vendor=vendor, venc=venc, direction=None, image_type=_image_types(vendor, "magnitude"),
                        cache=cache)
            phi.write_dicom(ds, str(folder / f"{series_number + off:03d}_{instance[off]:05d}.dcm"))
    flows = _tube_flows(tubes)
    truth = dict(flows[0])
    truth.update({"kind": kind, "vendor": vendor, "venc_cm_s": float(venc), "frames": frames, "rr_ms": float(rr_ms),
                  "aliased": bool(truth_alias > 0), "aliased_voxel_frames_noise_free": truth_alias,
                  "peak_velocity_sampled_cm_s": peak_sampled,
                  "flow_ml_s": [float(u * math.pi * (tubes[0].radius_mm / 10) ** 2) for u in frame_u[0]],
                  "series_numbers": sorted(series_number + off for off in uids),
                  "defect": defect, "other_vessels": flows[1:]})
    if kind == "pc":
        # The same sums the measurement does, on the noise-free images: the phantom's own discretisation.
        dt_s = rr_ms / frames / 1000.0
        truth["phantom_flow_ml"] = {"net": float(phantom_q.sum() * dt_s),
                                    "forward": float(np.clip(phantom_q, 0, None).sum() * dt_s),
                                    "backward": float(np.clip(-phantom_q, 0, None).sum() * dt_s)}
    return truth


def plane_text(point, normal) -> str:
    """A ``flow_plane`` option value: "x,y,z; nx,ny,nz" (patient mm, LPS)."""
    return f"{point[0]:.3f},{point[1]:.3f},{point[2]:.3f}; {normal[0]:.6f},{normal[1]:.6f},{normal[2]:.6f}"


# --------------------------------------------------------------------------- public writers
def write_pc_series(folder, study, rng, *, vendor: str = "siemens", series_number: int = 20, size: int = 64,
                    pixel_mm: float = 2.0, slice_mm: float = 6.0, frames: int = 20, rr_ms: float = 900.0,
                    venc_cm_s: float = 150.0, peak_velocity_cm_s: float = 120.0,
                    regurgitant_fraction_pct: float = 15.0, profile: str = "parabolic", radius_mm: float = 12.0,
                    second_vessel: bool = True, noise: float = 0.02, angles_deg=(-30.0, 10.0, 5.0),
                    centre_mm=(5.0, -20.0, 40.0), forward_along_normal: bool = True,
                    defect: str | None = None, supersample: int = 8) -> dict:
    """A through-plane 2D phase-contrast acquisition (magnitude + phase, one slice, ``frames`` over the cycle)
    of a tube perpendicular to the slice; returns its truth.

    ``peak_velocity_cm_s`` is the peak local velocity (on the axis for a parabolic profile);
    ``regurgitant_fraction_pct`` is backward / forward volume.  A VENC below the peak velocity gives aliasing.
    ``forward_along_normal=False`` makes forward flow run against the slice normal (negative phase in systole).
    ``angles_deg`` rotates the slice (an oblique plane: row, column and normal all off the patient axes).
    ``truth["plane"]`` is a ``flow_plane`` text (vessel centre; forward direction) for the main vessel.
    """
    if vendor not in VENDORS or profile not in PROFILES:
        raise ValueError(f"vendor must be one of {VENDORS}, profile one of {PROFILES}")
    folder = pathlib.Path(folder)
    rot = rotation(angles_deg)
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    normal = np.cross(row_dir, col_dir)
    centre = np.asarray(centre_mm, float)
    half = (size - 1) / 2.0 * pixel_mm
    origin = centre - half * row_dir - half * col_dir
    grid = Grid(origin, row_dir, col_dir, (slice_mm, pixel_mm, pixel_mm), (1, size, size), slice_mm)
    sign = 1.0 if forward_along_normal else -1.0
    peak_mean = peak_velocity_cm_s / (2.0 if profile == "parabolic" else 1.0)
    fov = size * pixel_mm
    a_point = centre - 0.15 * fov * row_dir - 0.08 * fov * col_dir
    tubes = [Tube(a_point, sign * normal, radius_mm, profile, 1.0,
                  make_waveform(rr_ms, frames, peak_mean, regurgitant_fraction_pct), "ascending_aorta")]
    if second_vessel:
        d_point = centre + 0.22 * fov * row_dir + 0.18 * fov * col_dir
        tubes.append(Tube(d_point, -sign * normal, radius_mm * 0.65, profile, 0.7,
                          make_waveform(rr_ms, frames, peak_mean * 0.55, 3.0, systole_fraction=0.4),
                          "descending_aorta"))
    rendered = render(grid, tubes, centre, (0.42 * fov, 0.36 * fov), (3, supersample, supersample))
    truth = _write_acquisition(folder, study, rng, kind="pc", vendor=vendor, grid=grid, tubes=tubes,
                               rendered=rendered, frames=frames, rr_ms=rr_ms, venc=venc_cm_s,
                               directions=["through"], noise=noise, series_number=series_number, defect=defect)
    truth["plane"] = plane_text(a_point, sign * normal)
    truth["slice_normal"] = normal.round(6).tolist()
    return truth


def write_flow4d_series(folder, study, rng, *, vendor: str = "siemens", series_number: int = 30,
                        size: int | None = None,
                        slices: int = 8, voxel_mm: float = 3.0, frames: int = 10, rr_ms: float = 900.0,
                        venc_cm_s: float = 150.0, peak_velocity_cm_s: float = 140.0,
                        regurgitant_fraction_pct: float = 15.0, profile: str = "parabolic",
                        radius_mm: float = 12.0, tilt_deg: float = 30.0, second_vessel: bool = False,
                        noise: float = 0.02, angles_deg=(0.0, 0.0, 20.0), centre_mm=(10.0, -30.0, 60.0),
                        defect: str | None = None, supersample: int = 4) -> dict:
    """A 4D flow acquisition: a slab of ``slices`` x ``size`` x ``size`` voxels, ``frames`` over the cycle, three
    velocity encodings + magnitude (one file per slice x frame x component); returns its truth.

    The tube runs through the slab tilted ``tilt_deg`` from the slab normal (oblique to the grid), through the
    slab's centre.  ``second_vessel`` adds a smaller, dimmer vessel along the slab normal (the matrix then
    defaults to 32 instead of 24 so both fit in the body; the file count does not change).  Encodings:
    Siemens-like rl/ap/fh, Philips-like patient-axis vectors, GE-like the grid's own row/column/normal vectors
    (``angles_deg`` rotates the grid, so those are oblique to the patient axes).
    ``truth["plane"]`` is a ``flow_plane`` text perpendicular to the tube at the slab centre.
    """
    if vendor not in VENDORS or profile not in PROFILES:
        raise ValueError(f"vendor must be one of {VENDORS}, profile one of {PROFILES}")
    folder = pathlib.Path(folder)
    if size is None:  # two vessels need room in the body; the matrix costs pixels, not files
        size = 32 if second_vessel else 24
    rot = rotation(angles_deg)
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    normal = np.cross(row_dir, col_dir)
    centre = np.asarray(centre_mm, float)
    half = (size - 1) / 2.0 * voxel_mm
    half_z = (slices - 1) / 2.0 * voxel_mm
    origin = centre - half * row_dir - half * col_dir - half_z * normal
    grid = Grid(origin, row_dir, col_dir, (voxel_mm, voxel_mm, voxel_mm), (slices, size, size), voxel_mm)
    tilt = math.radians(tilt_deg)
    axis = math.cos(tilt) * normal + math.sin(tilt) * (row_dir + col_dir) / math.sqrt(2)
    peak_mean = peak_velocity_cm_s / (2.0 if profile == "parabolic" else 1.0)
    fov = size * voxel_mm
    a_point = centre - 0.12 * fov * row_dir + 0.1 * fov * col_dir if second_vessel else centre
    tubes = [Tube(a_point, axis, radius_mm, profile, 1.0,
                  make_waveform(rr_ms, frames, peak_mean, regurgitant_fraction_pct, systole_fraction=0.4),
                  "ascending_aorta")]
    if second_vessel:
        d_point = centre + 0.2 * fov * row_dir - 0.18 * fov * col_dir
        tubes.append(Tube(d_point, -normal, radius_mm * 0.6, profile, 0.7,
                          make_waveform(rr_ms, frames, peak_mean * 0.5, 3.0, systole_fraction=0.4),
                          "descending_aorta"))
    if vendor == "siemens":
        directions = ["rl", "ap", "fh"]
    elif vendor == "philips":
        directions = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    else:
        directions = [row_dir.tolist(), col_dir.tolist(), normal.tolist()]
    rendered = render(grid, tubes, centre, (0.47 * fov, 0.44 * fov), (supersample,) * 3)
    truth = _write_acquisition(folder, study, rng, kind="flow4d", vendor=vendor, grid=grid, tubes=tubes,
                               rendered=rendered, frames=frames, rr_ms=rr_ms, venc=venc_cm_s,
                               directions=directions, noise=noise, series_number=series_number, defect=defect)
    truth["plane"] = plane_text(a_point, axis)
    truth["tilt_deg"] = float(tilt_deg)
    return truth


__all__ = ["write_pc_series", "write_flow4d_series", "plane_text", "make_waveform", "Waveform", "Tube", "Grid",
           "render"]
