"""A beating left-ventricle phantom as a short-axis cine SSFP series, with volumes known from its definition.

Why this construction: the cine step (:mod:`imaging_tasks.cardiovascular.cine`) must be checked against numbers
it did not compute itself.  The phantom is defined in a heart frame (``w`` along the long axis, from the base
towards the apex; ``x``/``y`` in the short-axis plane), and everything the truth needs follows from that
definition by arithmetic:

* LV blood pool: a prolate half-ellipsoid truncated at the base plane (``w = 0``) with in-plane semi-axes
  ``R*e, R/e`` and length ``L``: cross-section area ``A(w) = pi R^2 (1 - w^2/L^2)`` for ``0 <= w <= L``.  Its
  volume follows a smooth waveform over the R-R interval (fast systolic ejection, rapid filling, diastasis,
  atrial kick) with a chosen EDV and ejection fraction; ``L`` shortens in systole (longitudinal shortening),
  ``R`` follows from the volume.
* Myocardium: an epicardial half-ellipsoid whose volume is the blood volume plus a constant myocardial volume
  (so LV mass is the same in every phase and the wall thickens in systole, as real myocardium does).
* Around it, for the algorithm to cope with: an RV blood pool (crescent around the septum, pulsatile), RV free
  wall, pericardial and groove fat (as bright as blood in SSFP), a static descending aorta (bright, round),
  lungs (dark), chest-wall tissue, subcutaneous fat, air; a smooth coil-sensitivity shading and Rician noise.

Truth ("the blood volume a perfect reader would measure in these slices") per phase is
``sum_k spacing/thickness * integral of A(w) over slice k's thickness``, integrated in closed form, i.e. the
Simpson (disc) volume of the ideal partial-volume images: each pixel of the rendered image holds the blood
fraction of its voxel (in-plane and through the slice thickness, supersampled).  With contiguous slices
(gap 0) it is exactly the LV blood volume inside the imaged slab.  ``anatomic_volumes_ml`` holds the whole
half-ellipsoid for reference.  EDV/ESV are the largest/smallest truth volume among the *acquired* phases.

Phase index = position in TriggerTime order (0-based); phase 0 is at the R wave unless ``trigger_offset`` moves
the sampling.  Slice index 0 is the most basal slice.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np

from imaging_tasks.synth import phi

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MYOCARDIUM_G_PER_ML = 1.05

# SSFP signal levels relative to blood (blood = 1).  Fat is nearly as bright as blood on SSFP.
SIGNAL = {"blood": 1.0, "myocardium": 0.28, "tissue": 0.32, "fat": 0.85, "lung": 0.06, "air": 0.0}

ORIENTATIONS = {
    # Base-to-apex long axis in patient LPS: the LV apex points left (+x), anterior (-y) and inferior (-z).
    "oblique": (0.58, -0.42, -0.70),
    "axial": (0.0, 0.0, -1.0),
    "double_oblique": (0.70, -0.55, -0.45),
}


def volume_waveform(phi_rr: np.ndarray, heart_rate_bpm: float) -> np.ndarray:
    """Normalised LV volume g in [0, 1] (1 = end diastole, 0 = end systole) at fractions ``phi_rr`` of R-R.

    Systole lasts ~330 ms (a larger share of a short R-R at a high heart rate); then rapid filling to 75 %,
    diastasis to 82 %, and the atrial kick back to 100 % at the next R wave.
    """
    p = np.mod(np.asarray(phi_rr, float), 1.0)
    ts = min(0.6, 0.33 * heart_rate_bpm / 60.0)
    fe = 0.35 * (1 - ts)
    fa = 0.85 if ts < 0.5 else 0.9
    g = np.empty_like(p)
    s = p < ts
    g[s] = 0.5 * (1 + np.cos(np.pi * p[s] / ts))
    e = (p >= ts) & (p < ts + fe)
    g[e] = 0.75 * 0.5 * (1 - np.cos(np.pi * (p[e] - ts) / fe))
    d = (p >= ts + fe) & (p < fa)
    g[d] = 0.75 + 0.07 * (p[d] - ts - fe) / max(fa - ts - fe, 1e-9)
    a = p >= fa
    g[a] = 0.82 + 0.18 * 0.5 * (1 - np.cos(np.pi * (p[a] - fa) / (1 - fa)))
    return g


def _half_ellipsoid_integral(w0: float, w1: float, area0: float, length: float) -> float:
    """Integral of A(w) = area0 (1 - w^2/L^2) over [w0, w1] clipped to [0, L] (mm^3 if area0 in mm^2)."""
    a, b = max(w0, 0.0), min(w1, length)
    if b <= a:
        return 0.0
    return area0 * ((b - a) - (b ** 3 - a ** 3) / (3 * length ** 2))


def _frame(long_axis, inplane_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column direction cosines of short-axis slices (normal = row x col = base-to-apex axis)."""
    u = np.asarray(long_axis, float)
    u = u / np.linalg.norm(u)
    ref = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    r0 = ref - (ref @ u) * u
    r0 /= np.linalg.norm(r0)
    c0 = np.cross(u, r0)  # r0 x c0 = u
    t = math.radians(inplane_deg)
    row = math.cos(t) * r0 + math.sin(t) * c0
    col = -math.sin(t) * r0 + math.cos(t) * c0
    return row, col, u


def _ramp(dist_mm: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Partial-volume fraction of a pixel whose centre lies ``dist_mm`` outside (+) / inside (-) an edge."""
    return np.clip(0.5 - dist_mm / pixel_mm, 0.0, 1.0)


def _ellipse_dist(x, y, cx, cy, ax, ay, angle=0.0):
    """Approximate signed distance (mm) to an ellipse boundary (exact for circles)."""
    c, s = math.cos(angle), math.sin(angle)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    rho = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    return (rho - 1.0) * math.sqrt(ax * ay)


def _paint(img, frac, level):
    img *= 1.0 - frac
    img += frac * level


def write_cine_series(folder: pathlib.Path, study, rng: np.random.Generator, *, series_number: int = 3,
                      slices: int = 10, phases: int = 20, matrix: int = 96, pixel_mm: float = 2.6,
                      slice_thickness_mm: float = 8.0, slice_gap_mm: float = 1.0, heart_rate_bpm: float = 65.0,
                      edv_ml: float = 130.0, ef_pct: float = 58.0, lv_mass_g: float = 125.0,
                      ellipticity: float = 1.05, longitudinal_shortening: float = 0.12,
                      orientation: str | tuple = "oblique", inplane_deg: float | None = None,
                      blood_to_myocardium: float | None = None, snr: float = 25.0, shading: float = 0.2,
                      intensity_scale: float = 1500.0, trigger_offset: float = 0.0, base_shift_mm: float = 0.0,
                      shuffle: bool = True, omit_trigger_time: bool = False, drop_phase_slices: int = 0,
                      supersample: int = 4, series_description: str = "SAX cine trueFISP") -> dict:
    """Write one short-axis cine stack (``slices`` x ``phases`` single-frame MR images) into ``folder``.

    Returns the truth dict (see the module docstring): ``edv_ml``, ``esv_ml``, ``sv_ml``, ``ef_pct``,
    ``lv_mass_g`` (ED, inside the slab), ``volumes_ml`` and ``myocardium_ml`` per phase, ``ed_phase``,
    ``es_phase``, ``anatomic_volumes_ml``, geometry and knobs.  Knobs: ``blood_to_myocardium`` (SSFP contrast,
    default 1/0.28), ``snr`` (blood signal / noise sigma, Rician), ``shading`` (coil sensitivity variation across
    the field of view), ``orientation`` ("oblique", "axial", "double_oblique" or a base-to-apex vector in LPS),
    ``inplane_deg`` (rotation of the image axes about the long axis; random when None), ``trigger_offset``
    (fraction of R-R at which phase 0 is sampled), ``base_shift_mm`` (first slice starts this far below the
    base plane), ``shuffle`` (file names and instance numbers in random order).  Bad-input knobs:
    ``omit_trigger_time`` (no TriggerTime; CardiacNumberOfImages kept), ``drop_phase_slices`` (that many slices
    lose one phase).
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if inplane_deg is None:
        inplane_deg = float(rng.uniform(0, 360))
    long_axis = ORIENTATIONS[orientation] if isinstance(orientation, str) else tuple(orientation)
    row_dir, col_dir, axis = _frame(long_axis, inplane_deg)
    sig = dict(SIGNAL)
    if blood_to_myocardium is not None:
        sig["myocardium"] = 1.0 / blood_to_myocardium
        sig["tissue"] = min(0.6, 1.15 / blood_to_myocardium)

    rr_ms = 60000.0 / heart_rate_bpm
    trig_ms = np.arange(phases) * rr_ms / phases
    phase_rr = np.mod(trig_ms / rr_ms + trigger_offset, 1.0)
    g = volume_waveform(phase_rr, heart_rate_bpm)
    esv_anat = edv_ml * (1 - ef_pct / 100.0)
    v_blood = (esv_anat + (edv_ml - esv_anat) * g) * 1000.0  # mm^3
    v_myo = lv_mass_g / MYOCARDIUM_G_PER_ML * 1000.0
    length_ed = 80.0 * (edv_ml / 130.0) ** (1 / 3)
    length = length_ed * (1 - longitudinal_shortening * (1 - g))
    r_endo = np.sqrt(v_blood / (2 / 3 * np.pi * length))
    apex_wall = 8.0 * (1 + 0.3 * (1 - g))
    length_epi = length + apex_wall
    r_epi = np.sqrt((v_blood + v_myo) / (2 / 3 * np.pi * length_epi))

    spacing = slice_thickness_mm + slice_gap_mm
    w_centre = base_shift_mm + slice_thickness_mm / 2 + spacing * np.arange(slices)

    # In-plane layout (mm, image coordinates: x along rows' direction = column index, y = row index).
    fov = matrix * pixel_mm
    coord = (np.arange(matrix) - (matrix - 1) / 2) * pixel_mm
    xx, yy = np.meshgrid(coord, coord)
    lv_c = (rng.uniform(-0.04, 0.04) * fov, rng.uniform(-0.04, 0.04) * fov)
    rv_angle = float(rng.uniform(0, 2 * np.pi))  # where the RV lies, seen from the LV centre
    rv_dir = np.array([math.cos(rv_angle), math.sin(rv_angle)])
    side = np.array([-rv_dir[1], rv_dir[0]])
    ell = ellipticity
    r_epi_ed = float(r_epi.max())

    # Truth, in closed form (see module docstring).
    vols, myo, anat = [], [], []
    slice_areas = np.zeros((slices, phases))
    slice_myo = np.zeros((slices, phases))
    for p in range(phases):
        a_endo = np.pi * r_endo[p] ** 2
        a_epi = np.pi * r_epi[p] ** 2
        vb = vm = 0.0
        for k, wc in enumerate(w_centre):
            w0, w1 = wc - slice_thickness_mm / 2, wc + slice_thickness_mm / 2
            ib = _half_ellipsoid_integral(w0, w1, a_endo, length[p])
            slice_areas[k, p] = ib / slice_thickness_mm
            ie = _half_ellipsoid_integral(w0, w1, a_epi, length_epi[p])
            vb += spacing / slice_thickness_mm * ib
            vm += spacing / slice_thickness_mm * (ie - ib)
            slice_myo[k, p] = (ie - ib) / slice_thickness_mm
        vols.append(vb / 1000.0)
        myo.append(vm / 1000.0)
        anat.append(v_blood[p] / 1000.0)
    vols_a = np.array(vols)
    ed, es = int(np.argmax(vols_a)), int(np.argmin(vols_a))

    # Rendering: static background once, heart per slice and phase.
    bias = 1.0 + shading * ((xx * math.cos(rv_angle + 1.0) + yy * math.sin(rv_angle + 1.0)) / fov)
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    n_thru = max(4, supersample + 2)
    thru = (np.arange(n_thru) + 0.5) / n_thru - 0.5
    half_box = int(math.ceil((r_epi_ed * ell + 2 * pixel_mm) / pixel_mm))
    ci = int(round(lv_c[1] / pixel_mm + (matrix - 1) / 2))
    cj = int(round(lv_c[0] / pixel_mm + (matrix - 1) / 2))
    i0, i1 = max(0, ci - half_box), min(matrix, ci + half_box + 1)
    j0, j1 = max(0, cj - half_box), min(matrix, cj + half_box + 1)
    by = (yy[i0:i1, j0:j1, None, None] + sub[None, None, :, None] * pixel_mm)
    bx = (xx[i0:i1, j0:j1, None, None] + sub[None, None, None, :] * pixel_mm)
    rho2 = ((bx - lv_c[0]) / ell) ** 2 + ((by - lv_c[1]) * ell) ** 2  # normalised to R^2

    images = np.zeros((slices, phases, matrix, matrix), np.float32)
    blood_frac = np.zeros((slices, phases), float)  # sum of rendered blood fractions (pixels), for the check
    for k, wc in enumerate(w_centre):
        base = np.zeros((matrix, matrix))
        _paint(base, _ramp(_ellipse_dist(xx, yy, 0, 0, 0.49 * fov, 0.42 * fov), pixel_mm), sig["fat"])
        _paint(base, _ramp(_ellipse_dist(xx, yy, 0, 0, 0.45 * fov, 0.38 * fov), pixel_mm), sig["tissue"])
        # Lungs: beyond the LV free wall and beyond the RV, leaving tissue/fat in between.
        for direction, dist, size in ((-rv_dir, r_epi_ed + 14, (0.16 * fov, 0.26 * fov)),
                                      (rv_dir, r_epi_ed + 42, (0.12 * fov, 0.24 * fov))):
            cx, cy = lv_c[0] + direction[0] * (dist + size[0]), lv_c[1] + direction[1] * (dist + size[0])
            _paint(base, _ramp(_ellipse_dist(xx, yy, cx, cy, size[0], size[1], rv_angle), pixel_mm), sig["lung"])
        ao = np.array(lv_c) + side * (r_epi_ed + 22) - rv_dir * 10
        _paint(base, _ramp(_ellipse_dist(xx, yy, ao[0], ao[1], 11, 11), pixel_mm), sig["blood"])
        for p in range(phases):
            img = base.copy()
            # Pericardial fat along the lateral wall (sized by this slice's end-diastolic epicardium, static)
            # and in the AV / interventricular grooves at the RV insertions.
            r_here = r_epi_ed * math.sqrt(max(0.0, 1 - (max(wc, 0.0) / float(length_epi.max())) ** 2))
            if r_here > 3:
                fat_c = np.array(lv_c) - rv_dir * (r_here * 0.3)
                _paint(img, _ramp(_ellipse_dist(xx, yy, fat_c[0], fat_c[1], r_here * 0.95 + 3, r_here * 1.0 + 3,
                                                rv_angle), pixel_mm), sig["fat"])
            size_rv = math.sqrt(max(0.0, 1 - (wc / (0.8 * length_ed)) ** 2)) if wc >= 0 else 0.0
            if size_rv > 0.05:
                rv_scale = size_rv * (0.75 + 0.25 * g[p])
                r_lv_here = r_epi[p] * math.sqrt(max(0.0, 1 - (max(wc, 0.0) / length_epi[p]) ** 2))
                rc = np.array(lv_c) + rv_dir * (r_lv_here * 0.85)
                ax_rv, ay_rv = 0.65 * r_epi_ed * rv_scale + 2, 1.25 * r_epi_ed * rv_scale + 2
                for gd in (-1, 1):
                    gc = np.array(lv_c) + rv_dir * r_lv_here * 0.6 + gd * side * (r_lv_here + 4)
                    _paint(img, _ramp(_ellipse_dist(xx, yy, gc[0], gc[1], 5, 5), pixel_mm), sig["fat"])
                _paint(img, _ramp(_ellipse_dist(xx, yy, rc[0], rc[1], ax_rv + 3.5, ay_rv + 3.5, rv_angle),
                                  pixel_mm), sig["myocardium"])
                _paint(img, _ramp(_ellipse_dist(xx, yy, rc[0], rc[1], ax_rv, ay_rv, rv_angle), pixel_mm),
                       sig["blood"])
            # LV: supersampled in-plane and through the slice thickness.
            f_epi = np.zeros(by.shape[:2])
            f_endo = np.zeros(by.shape[:2])
            for t in thru:
                w = wc + t * slice_thickness_mm
                if w < 0:
                    continue
                if w < length_epi[p]:
                    re2 = r_epi[p] ** 2 * (1 - (w / length_epi[p]) ** 2)
                    f_epi += (rho2 <= re2).mean(axis=(2, 3))
                if w < length[p]:
                    rb2 = r_endo[p] ** 2 * (1 - (w / length[p]) ** 2)
                    f_endo += (rho2 <= rb2).mean(axis=(2, 3))
            f_epi /= n_thru
            f_endo /= n_thru
            box = img[i0:i1, j0:j1]
            _paint(box, f_epi, sig["myocardium"])
            _paint(box, f_endo, sig["blood"])
            blood_frac[k, p] = f_endo.sum()
            images[k, p] = img * bias
    noise_sigma = 1.0 / snr
    n1 = rng.standard_normal(images.shape, dtype=np.float32) * noise_sigma
    n2 = rng.standard_normal(images.shape, dtype=np.float32) * noise_sigma
    mag = np.sqrt((images + n1) ** 2 + n2 ** 2)
    stored = np.clip(np.rint(mag * intensity_scale), 0, 4095).astype(np.uint16)
    rendered_ml = blood_frac * pixel_mm ** 2 * spacing / 1000.0

    # DICOM files.
    series_uid = phi.new_uid(rng)
    centre_patient = np.array([20.0, -10.0, 40.0]) + rng.uniform(-15, 15, 3)
    items = [(k, p) for k in range(slices) for p in range(phases)]
    dropped = set()
    for k in range(min(drop_phase_slices, slices)):
        dropped.add((slices // 2 + k) % slices)
    order = rng.permutation(len(items)) if shuffle else np.arange(len(items))
    files = []
    for inst0, idx in enumerate(order):
        k, p = items[int(idx)]
        if k in dropped and p == phases // 2:
            continue
        sop = phi.new_uid(rng)
        ds = phi.dicom_dataset(study, modality="MR", sop_class_uid=MR_IMAGE_STORAGE, series_uid=series_uid,
                               sop_uid=sop, series_number=series_number, instance_number=inst0 + 1,
                               series_description=series_description)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SS"
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "*tfi2d1_12"
        ds.RepetitionTime = "3.1"
        ds.EchoTime = "1.3"
        ds.FlipAngle = "55"
        ds.MagneticFieldStrength = "1.5"
        ds.BodyPartExamined = "HEART"
        ds.ProtocolName = "cine SAX"
        ds.PatientPosition = "HFS"
        ds.CardiacNumberOfImages = phases
        ds.NominalInterval = int(round(rr_ms))
        ds.HeartRate = int(round(heart_rate_bpm))
        if not omit_trigger_time:
            ds.TriggerTime = format(round(float(trig_ms[p]), 4), ".10g")
        pos = (centre_patient + axis * w_centre[k] - row_dir * ((matrix - 1) / 2 * pixel_mm + lv_c[0])
               - col_dir * ((matrix - 1) / 2 * pixel_mm + lv_c[1]))
        ds.ImagePositionPatient = [format(float(v), ".10g") for v in pos]
        ds.ImageOrientationPatient = [format(float(v), ".8f") for v in (*row_dir, *col_dir)]
        ds.SliceLocation = format(float(pos @ axis), ".10g")
        ds.PixelSpacing = [format(pixel_mm, ".10g")] * 2
        ds.SliceThickness = format(slice_thickness_mm, ".10g")
        ds.SpacingBetweenSlices = format(spacing, ".10g")
        ds.AcquisitionNumber = 1
        ds.Rows = ds.Columns = matrix
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = str(int(intensity_scale * 0.5)), str(int(intensity_scale))
        ds.PixelData = stored[k, p].astype("<u2").tobytes()
        name = f"MR-{series_number:02d}-{inst0 + 1:04d}.dcm"
        phi.write_dicom(ds, str(folder / name))
        files.append(name)

    return {
        "series_uid": series_uid, "series_number": series_number, "files": files,
        "edv_ml": float(vols_a[ed]), "esv_ml": float(vols_a[es]), "sv_ml": float(vols_a[ed] - vols_a[es]),
        "ef_pct": float(100.0 * (vols_a[ed] - vols_a[es]) / vols_a[ed]),
        "lv_mass_g": float(MYOCARDIUM_G_PER_ML * myo[ed]), "myocardium_ml": [float(v) for v in myo],
        "volumes_ml": [float(v) for v in vols_a], "rendered_volumes_ml": rendered_ml.sum(axis=0).tolist(),
        "anatomic_volumes_ml": [float(v) for v in anat],
        "ed_phase": ed, "es_phase": es,
        "slice_areas_mm2": np.round(slice_areas, 3).tolist(),  # [slice from base][phase]: mean over thickness
        "slice_myocardium_areas_mm2": np.round(slice_myo, 3).tolist(),
        "trigger_times_ms": [float(t) for t in trig_ms], "heart_rate_bpm": float(heart_rate_bpm),
        "rr_ms": float(rr_ms), "phases": phases, "slices": slices, "matrix": matrix,
        "pixel_spacing_mm": float(pixel_mm), "slice_thickness_mm": float(slice_thickness_mm),
        "spacing_between_slices_mm": float(spacing), "long_axis_lps": [float(v) for v in axis],
        "image_orientation": [float(v) for v in (*row_dir, *col_dir)], "snr": float(snr),
        "blood_to_myocardium": float(1.0 / sig["myocardium"]), "omit_trigger_time": omit_trigger_time,
        "dropped_phase_slices": sorted(dropped),
        "truth_definition": "sum over slices of spacing/thickness x integral of the LV blood cross-section over "
                            "the slice thickness (closed form); EDV/ESV = max/min over acquired phases",
    }


__all__ = ["write_cine_series", "volume_waveform", "MR_IMAGE_STORAGE", "MYOCARDIUM_G_PER_ML"]
