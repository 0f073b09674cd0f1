"""Synthetic screening mammograms with planted micro-calcifications of known position.

Each study holds the four standard views (R/L x CC/MLO), or a seeded subset, as MG "for presentation"
images.  The pixels come from a small physical model so a detector meets what it would meet clinically:

* compressed breast of thickness T0 whose edge rolls off like a half-cylinder (so the periphery thins),
  a 1.5 mm skin shell that projects as a bright skin line, a pectoral muscle wedge in MLO views;
* fibroglandular tissue from power-law (1/f^3, as measured in mammograms) noise, concentrated behind the
  nipple and absent from the subcutaneous fat, plus a few vessels;
* calcifications as small ellipsoids of hydroxyapatite (0.1-0.5 mm, supersampled into the pixels);
* transmission exp(-line integral) with AEC-scaled photon count, detector blur, quantum + electronic
  noise, log, peripheral equalisation and a linear map to 12 or 14 stored bits (MONOCHROME2).

Truth (``truth`` in the per-study JSON): for every image, keyed both by SOPInstanceUID (``images``) and
by ``<laterality>_<view>`` (``views``), the calcification centres and the clusters with their members.
Coordinates: ``*_xy_px`` are (column, row) of the pixel grid of the stored image; ``*_xy_mm`` are the
same times ImagerPixelSpacing, i.e. millimetres in the detector plane from the top-left pixel centre.

Cluster rule (the one :func:`~imaging_tasks.mammography.calcifications.cluster_calcifications` applies by
default): at least
3 calcifications within 1 cm^2 (a disc of radius 5.64 mm), the classic CAD definition.  Planted clusters
have 5-15 members inside a disc of radius <= 4.5 mm, so they also meet the stricter BI-RADS 5th-edition
"grouped" rule (>= 5 within 1 cm).  Planted isolated specks (singles and sub-threshold pairs) are at least
15 mm from any other calcification, so they form no cluster under either rule.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
from scipy import ndimage

from imaging_tasks.synth.phi import dicom_dataset, fake_study, new_uid, phi_values, write_dicom
from imaging_tasks.synth import malformed as mf

SPECIALTY = "mammography"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
STANDARD_VIEWS = ("R_CC", "L_CC", "R_MLO", "L_MLO")
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
# PS3.3 C.8.11.1.1.1 / C.7.6.1.1.1: row direction \ column direction for each view as displayed.
PATIENT_ORIENTATION = {"L_CC": ["A", "R"], "R_CC": ["P", "L"], "L_MLO": ["A", "FR"], "R_MLO": ["P", "FL"]}

CLUSTER_RULE = {"min_count": 3, "area_mm2": 100.0, "radius_mm": float(np.sqrt(100.0 / np.pi)),
                "definition": ">= 3 calcifications within 1 cm^2 (disc of radius 5.64 mm)"}

# Linear attenuation at the effective energy of a W/Rh spectrum (~20 keV), per mm.
MU_FAT = 0.0456
MU_GLAND = 0.080
MU_SKIN = 0.080
MU_MUSCLE = 0.082
MU_VESSEL = 0.075
SKIN_MM = 1.5


def synthesize(out: pathlib.Path, studies: int, seed: int, *, rows: int = 1000, cols: int = 800,
               pixel_spacing_mm: float = 0.1, views: list[str] | None = None,
               clusters_per_image: tuple[int, int] = (0, 2), isolated_per_image: tuple[int, int] = (2, 5),
               **_ignored) -> list[pathlib.Path]:
    """Write ``studies`` MG studies under ``out/mammography/study-NNN/`` and their truth JSONs.

    ``views`` fixes the views (e.g. ``["L_CC", "L_MLO"]``); by default a study has all four, or (one
    in four) a seeded subset of 2-3, as happens with unilateral or incomplete exams.  The count ranges
    are inclusive.  Defaults: 1000 x 800 px at 0.1 mm (a 100 x 80 mm field), about 1.6 MB per image and
    2-3 s per study.  Size options meant for other specialties are ignored.
    """
    out = pathlib.Path(out)
    truth_paths = []
    for i in range(studies):
        rng = np.random.default_rng([seed, i])
        label = f"study-{i:03d}"
        truth_paths.append(_one_study(out, label, rng, rows=rows, cols=cols, spacing=float(pixel_spacing_mm),
                                      views=views, clusters=clusters_per_image, isolated=isolated_per_image))
    return truth_paths


def _one_study(out, label, rng, *, rows, cols, spacing, views, clusters, isolated) -> pathlib.Path:
    study = fake_study(rng, label)
    study.patient.sex = "F"
    if views is None:
        if rng.random() < 0.25:
            k = int(rng.integers(2, 4))
            views = [STANDARD_VIEWS[j] for j in sorted(rng.choice(4, size=k, replace=False))]
        else:
            views = list(STANDARD_VIEWS)
    unknown = set(views) - set(STANDARD_VIEWS)
    if unknown:
        raise ValueError(f"unknown views {sorted(unknown)}; use {', '.join(STANDARD_VIEWS)}")
    # Patient-level anatomy, shared by both breasts and all views.
    fov_x, fov_y = cols * spacing, rows * spacing
    anatomy = {
        "thickness_mm": float(rng.uniform(40, 62)),
        "depth_mm": float(rng.uniform(0.70, 0.85) * fov_x),
        "half_height_mm": float(rng.uniform(0.38, 0.45) * fov_y),
        "density": float(rng.choice([0.15, 0.25, 0.35, 0.5])),  # BI-RADS a..d as peak glandular fraction
    }
    bits = int(rng.choice([12, 14]))
    kvp = float(rng.integers(26, 33))
    study_dir = out / SPECIALTY / label
    study_dir.mkdir(parents=True, exist_ok=True)
    images_truth = {}
    views_truth = {}
    for n, key in enumerate(views, start=1):
        lat, view = key.split("_")
        img_rng = np.random.default_rng(rng.integers(0, 2**63))
        pixels, truth = _render_view(img_rng, lat, view, rows, cols, spacing, anatomy, bits, clusters, isolated)
        series_uid, sop_uid = new_uid(rng), new_uid(rng)
        ds = dicom_dataset(study, modality="MG", sop_class_uid=MG_FOR_PRESENTATION, series_uid=series_uid,
                           sop_uid=sop_uid, series_number=n, instance_number=1,
                           series_description=f"{lat} {view}")
        _mg_attributes(ds, rng, lat, view, pixels, spacing, bits, kvp, anatomy)
        fname = f"{n:02d}_{lat}{view}.dcm"
        write_dicom(ds, str(study_dir / fname))
        truth.update({"sop_instance_uid": sop_uid, "file": fname, "laterality": lat, "view": view,
                      "rows": rows, "cols": cols, "pixel_spacing_mm": spacing})
        images_truth[sop_uid] = truth
        views_truth[key] = truth
    truth_doc = {
        "specialty": SPECIALTY,
        "label": label,
        "study_uid": study.study_uid,
        "phi": phi_values(study),
        "truth": {
            "cluster_rule": CLUSTER_RULE,
            "coordinates": "xy_px = (column, row) of the stored pixel grid; xy_mm = xy_px * ImagerPixelSpacing",
            "bits_stored": bits,
            "anatomy": anatomy,
            "images": images_truth,
            "views": views_truth,
        },
    }
    truth_path = out / "_truth" / SPECIALTY / f"{label}.json"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth_path.write_text(json.dumps(truth_doc, indent=1, sort_keys=True))
    return truth_path


# ----------------------------------------------------------------------------------------------- anatomy

def _power_law_noise(rng, shape, spacing, beta=3.0, k0_per_mm=0.02, kc_per_mm=1.5) -> np.ndarray:
    """Gaussian field with a 1/f^beta power spectrum (rolled off above ``kc``), unit standard deviation.

    beta ~ 3 is what mammograms measure at scales above ~1 mm; finer tissue structure is smoothed by the
    roll-off so that the finest scale is left to quantum noise, as on real detectors.
    """
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0], d=spacing)[:, None]
    fx = np.fft.rfftfreq(shape[1], d=spacing)[None, :]
    k2 = fx * fx + fy * fy
    filt = (k2 + k0_per_mm**2) ** (-beta / 4.0) * np.exp(-k2 / kc_per_mm**2)
    field = np.fft.irfft2(np.fft.rfft2(white) * filt, s=shape)
    field -= field.mean()
    return field / field.std()


def _chord(depth_mm: np.ndarray, radius_mm: float) -> np.ndarray:
    """Path length through a half-cylinder of ``radius`` at ``depth`` inside its edge (full width beyond)."""
    d = np.clip(depth_mm, 0.0, radius_mm)
    return 2.0 * np.sqrt(np.maximum(2.0 * radius_mm * d - d * d, 0.0))


def _breast_geometry(rng, view, rows, cols, spacing, anatomy):
    """Breast mask, depth-inside-edge map (mm) and pectoral mask, chest wall at column 0."""
    y = (np.arange(rows) * spacing)[:, None]
    x = (np.arange(cols) * spacing)[None, :]
    fov_y = rows * spacing
    a = anatomy["depth_mm"] * rng.uniform(0.95, 1.02)
    if view == "CC":
        yc = fov_y * 0.5 + rng.uniform(-3, 3)
        b_up = b_down = anatomy["half_height_mm"] * rng.uniform(0.97, 1.03)
        tilt = rng.uniform(-0.05, 0.05)
    else:
        # MLO: the breast runs up into the axilla (off the top edge) and ends at the inframammary fold.
        yc = fov_y * 0.56 + rng.uniform(-3, 3)
        b_up = yc + 12.0
        b_down = min(anatomy["half_height_mm"] * 1.05, fov_y - yc - 3.0)
        a *= 0.95
        tilt = rng.uniform(-0.12, -0.02)
    yy = y - yc - tilt * x
    b = np.where(yy < 0, b_up, b_down)
    p = rng.uniform(2.0, 2.4)  # super-ellipse exponent: a flatter front than a pure ellipse
    mask = (np.abs(x / a) ** p + np.abs(yy / b) ** p) <= 1.0
    # Depth inside the skin: the chest wall (column 0) and the image top in MLO are not skin.
    pad = int(round(30.0 / spacing))
    padded = np.pad(mask, pad, mode="edge")
    depth = ndimage.distance_transform_edt(padded, sampling=spacing)[pad:-pad, pad:-pad].astype(np.float32)
    pectoral = np.zeros((rows, cols), dtype=np.float32)
    if view == "MLO":
        x0 = rng.uniform(0.22, 0.32) * cols * spacing
        y0 = rng.uniform(0.45, 0.65) * fov_y
        curve = rng.uniform(0.85, 1.15)
        edge = x0 * np.clip(1.0 - y / y0, 0.0, 1.0) ** curve
        pect = (x < edge).astype(np.float32)
        pectoral = ndimage.gaussian_filter(pect, sigma=1.0 / spacing) * mask
    return mask, depth, pectoral, {"a": a, "yc": yc, "b_up": b_up, "b_down": b_down, "tilt": tilt}


def _vessels(rng, shape, spacing, shape_info, depth, n):
    """Path length through a few tortuous vessels running from the chest wall toward the nipple."""
    rows, cols = shape
    lines = np.zeros(shape, dtype=np.float32)
    for _ in range(n):
        radius = rng.uniform(0.4, 0.9)
        pos = np.array([rng.uniform(0, 5), shape_info["yc"] + rng.uniform(-25, 25)])  # (x, y) mm
        ang = rng.uniform(-0.5, 0.5)
        for _step in range(int(rng.uniform(400, 1200))):
            ang += rng.normal(0, 0.04)
            pos = pos + 0.05 * np.array([np.cos(ang), np.sin(ang)])
            c, r = int(round(pos[0] / spacing)), int(round(pos[1] / spacing))
            if not (0 <= r < rows and 0 <= c < cols) or depth[r, c] < 8.0:
                break
            lines[r, c] = radius
    if not lines.any():
        return np.zeros(shape, dtype=np.float32)
    dist, idx = ndimage.distance_transform_edt(lines == 0, sampling=spacing, return_indices=True)
    rad = lines[idx[0], idx[1]]
    return (2.0 * np.sqrt(np.maximum(rad * rad - dist * dist, 0.0))).astype(np.float32)


# ----------------------------------------------------------------------------------------- calcifications

def _place(rng, ok, spacing, exclusions, tries=4000):
    """A random (x, y) mm position where ``ok`` holds, at least ``d`` from each ``(point, d)`` exclusion."""
    rr, cc = np.nonzero(ok)
    if rr.size == 0:
        return None
    for _ in range(tries):
        j = int(rng.integers(rr.size))
        p = np.array([cc[j] * spacing, rr[j] * spacing])
        if all(np.hypot(*(p - q)) >= d for q, d in exclusions):
            return p
    return None


def _plan_calcifications(rng, mask, depth, pectoral, spacing, n_clusters, n_isolated):
    """Cluster and isolated-speck positions in mm (chest wall at x=0)."""
    inset = np.zeros_like(mask)
    border = int(round(8.0 / spacing))
    inset[border:-border, border:-border] = True  # keep whole clusters inside the field of view
    allowed = mask & (pectoral < 0.05) & inset
    calcs, clusters = [], []
    centres = []  # (position, exclusion radius)
    core_ok = allowed & (depth >= 12.0)
    for ci in range(n_clusters):
        centre = _place(rng, core_ok, spacing, [(q, 25.0) for q, _ in centres])
        if centre is None:
            break
        region_r = rng.uniform(2.5, 4.5)
        n_members = int(rng.integers(5, 16))
        members = []
        for _ in range(2000):
            if len(members) == n_members:
                break
            rad = region_r * np.sqrt(rng.random())
            th = rng.uniform(0, 2 * np.pi)
            p = centre + rad * np.array([np.cos(th), np.sin(th)])
            if all(np.hypot(*(p - q)) >= 1.0 for q in members):
                members.append(p)
        idx0 = len(calcs)
        for p in members:
            calcs.append({"xy": p, "cluster": ci, "isolated": False,
                          "diameter_mm": float(rng.uniform(0.1, 0.5))})
        clusters.append({"index": ci, "members": list(range(idx0, len(calcs))), "region_radius_mm": region_r})
        centres.append((centre, region_r))
    iso_ok = allowed & (depth >= 6.0)
    group = 0
    for _ in range(n_isolated):
        # 15 mm from any other calcification (and from cluster edges): no 3 can share a 1 cm^2 disc.
        p = _place(rng, iso_ok, spacing, [(q, r + 15.0) for q, r in centres] + [(c["xy"], 15.0) for c in calcs])
        if p is None:
            break
        pts = [p]
        if rng.random() < 0.35:  # a sub-threshold pair: two benign specks 2-4 mm apart
            th = rng.uniform(0, 2 * np.pi)
            q = p + rng.uniform(2.0, 4.0) * np.array([np.cos(th), np.sin(th)])
            r, c = int(round(q[1] / spacing)), int(round(q[0] / spacing))
            if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and iso_ok[r, c]:
                pts.append(q)
        for q in pts:
            calcs.append({"xy": q, "cluster": None, "isolated": True, "isolated_group": group,
                          "diameter_mm": float(rng.uniform(0.2, 0.5))})
        group += 1
    for c in calcs:
        c["aspect"] = float(rng.uniform(1.0, 1.8))
        c["angle"] = float(rng.uniform(0, np.pi))
        c["mu_per_mm"] = float(rng.uniform(1.4, 2.2))  # hydroxyapatite minus displaced tissue at ~20 keV
    return calcs, clusters


def _render_calcs(calcs, shape, spacing, ss=5) -> np.ndarray:
    """Extra attenuation (line integral) of ellipsoidal calcifications, supersampled ``ss`` x ``ss``."""
    att = np.zeros(shape, dtype=np.float64)
    sub = (np.arange(ss) + 0.5) / ss - 0.5
    for c in calcs:
        d = c["diameter_mm"]
        a1, a2 = d / 2 * np.sqrt(c["aspect"]), d / 2 / np.sqrt(c["aspect"])
        a3 = d / 2  # depth semi-axis
        cx, cy = c["xy"] / spacing
        h = int(np.ceil(a1 / spacing)) + 2
        r0, c0 = int(round(cy)) - h, int(round(cx)) - h
        rr = r0 + np.arange(2 * h + 1)
        cc = c0 + np.arange(2 * h + 1)
        # Supersampled coordinates relative to the centre, in mm.
        ys = ((rr[:, None] + sub[None, :]).ravel() - cy) * spacing
        xs = ((cc[:, None] + sub[None, :]).ravel() - cx) * spacing
        X, Y = np.meshgrid(xs, ys)
        ca, sa = np.cos(c["angle"]), np.sin(c["angle"])
        u, v = X * ca + Y * sa, -X * sa + Y * ca
        q = 1.0 - (u / a1) ** 2 - (v / a2) ** 2
        chord = 2.0 * a3 * np.sqrt(np.maximum(q, 0.0))
        patch = chord.reshape(2 * h + 1, ss, 2 * h + 1, ss).mean(axis=(1, 3)) * c["mu_per_mm"]
        rs, cs = slice(max(r0, 0), min(r0 + 2 * h + 1, shape[0])), slice(max(c0, 0), min(c0 + 2 * h + 1, shape[1]))
        att[rs, cs] += patch[rs.start - r0:rs.stop - r0, cs.start - c0:cs.stop - c0]
    return att


def _render_view(rng, lat, view, rows, cols, spacing, anatomy, bits, clusters_range, isolated_range):
    shape = (rows, cols)
    mask, depth, pectoral, info = _breast_geometry(rng, view, rows, cols, spacing, anatomy)
    t0 = anatomy["thickness_mm"]
    radius = t0 / 2.0
    thickness = _chord(depth, radius) * mask
    skin = (thickness - _chord(depth - SKIN_MM, radius - SKIN_MM) * (depth > SKIN_MM)) * mask
    inner = thickness - skin
    # Fibroglandular fraction: patchy (sigmoid of 1/f^3 noise) inside a cone behind the nipple,
    # fading out in the subcutaneous fat (first ~4-12 mm under the skin).
    y = (np.arange(rows) * spacing)[:, None]
    x = (np.arange(cols) * spacing)[None, :]
    cone = np.exp(-((x - 0.4 * info["a"]) / (0.55 * info["a"])) ** 2
                  - ((y - info["yc"] - info["tilt"] * x) / (0.7 * anatomy["half_height_mm"])) ** 2)
    fat_layer = np.clip((depth - 4.0) / 8.0, 0.0, 1.0)
    texture = _power_law_noise(rng, shape, spacing)
    patchy = 1.0 / (1.0 + np.exp(-(1.8 * texture + 3.0 * (anatomy["density"] - 0.3))))
    gland_frac = anatomy["density"] * cone * fat_layer * patchy
    gland = inner * gland_frac
    muscle = inner * 0.45 * pectoral
    vessels = _vessels(rng, shape, spacing, info, depth, int(rng.integers(3, 7))) * mask
    line_integral = (MU_FAT * (inner - gland - muscle) + MU_GLAND * gland + MU_MUSCLE * muscle
                     + MU_SKIN * skin + (MU_VESSEL - MU_FAT) * vessels)
    n_cl = int(rng.integers(clusters_range[0], clusters_range[1] + 1))
    n_iso = int(rng.integers(isolated_range[0], isolated_range[1] + 1))
    calcs, clusters = _plan_calcifications(rng, mask, depth, pectoral, spacing, n_cl, n_iso)
    line_integral = line_integral + _render_calcs(calcs, shape, spacing)
    # Acquisition: AEC sets the exposure so ~6000 photons reach a 0.1 mm pixel behind typical tissue.
    typical = MU_FAT * t0 + (MU_GLAND - MU_FAT) * t0 * 0.2 * anatomy["density"]
    n0 = 6000.0 * (spacing / 0.1) ** 2 * np.exp(typical)
    transmitted = ndimage.gaussian_filter(np.exp(-line_integral), sigma=0.05 / spacing)
    counts = n0 * transmitted
    counts = counts + np.sqrt(counts) * rng.standard_normal(shape) + 3.0 * rng.standard_normal(shape)
    measured = -np.log(np.maximum(counts, 1.0) / n0)
    # "For presentation" processing: peripheral equalisation (add back the fat the rolled-off edge lacks)
    # and a linear map of log attenuation to the stored range; air is black.
    equalised = measured + 0.85 * MU_FAT * (t0 - thickness) * mask
    top = MU_GLAND * t0 * 1.1
    maxv = 2**bits - 1
    pixels = np.clip(np.round(maxv * equalised / top), 0, maxv).astype(np.uint16)
    pixels[~mask & (pixels < 0.05 * maxv)] = 0
    # Laterality: left breasts keep the chest wall at column 0, right ones are mirrored (PS3.3 C.8.11.1.1.1).
    flip = lat == "R"
    if flip:
        pixels = pixels[:, ::-1].copy()
    truth_calcs = []
    for i, c in enumerate(calcs):
        px, py = c["xy"] / spacing
        if flip:
            px = cols - 1 - px
        truth_calcs.append({"index": i, "centre_xy_px": [round(float(px), 3), round(float(py), 3)],
                            "centre_xy_mm": [round(float(px * spacing), 4), round(float(py * spacing), 4)],
                            "diameter_mm": round(c["diameter_mm"], 4), "aspect": round(c["aspect"], 3),
                            "cluster": c["cluster"], "isolated": c["isolated"],
                            "isolated_group": c.get("isolated_group")})
    truth_clusters = []
    for cl in clusters:
        pts = np.array([truth_calcs[m]["centre_xy_px"] for m in cl["members"]])
        cen = pts.mean(axis=0)
        rad = float(np.max(np.hypot(*(pts - cen).T))) * spacing
        truth_clusters.append({"index": cl["index"], "members": cl["members"], "n_members": len(cl["members"]),
                               "centre_xy_px": [round(float(v), 3) for v in cen],
                               "centre_xy_mm": [round(float(v * spacing), 4) for v in cen],
                               "radius_mm": round(rad, 4)})
    truth = {"calcifications": truth_calcs, "clusters": truth_clusters,
             "n_isolated": sum(1 for c in calcs if c["isolated"]),
             "compressed_thickness_mm": round(t0, 2)}
    return pixels, truth


# ------------------------------------------------------------------------------------------------ header

def _mg_attributes(ds, rng, lat, view, pixels, spacing, bits, kvp, anatomy) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    rows, cols = pixels.shape
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = lat
    ds.ViewPosition = view
    code, meaning = VIEW_CODES[view]
    vc = Dataset()
    vc.CodeValue, vc.CodingSchemeDesignator, vc.CodeMeaning = code, "SCT", meaning
    ds.ViewCodeSequence = Sequence([vc])
    ds.PatientOrientation = PATIENT_ORIENTATION[f"{lat}_{view}"]
    ds.BreastImplantPresent = "NO"
    ds.ImagerPixelSpacing = [f"{spacing:.4g}", f"{spacing:.4g}"]
    ds.DetectorType = "DIRECT"
    ds.DistanceSourceToDetector = "650"
    ds.DistanceSourceToPatient = f"{650 - 20 - anatomy['thickness_mm']:.1f}"
    ds.BodyPartThickness = f"{anatomy['thickness_mm']:.1f}"
    ds.CompressionForce = f"{rng.uniform(60, 140):.1f}"
    ds.KVP = f"{kvp:.0f}"
    ds.XRayTubeCurrent = int(rng.integers(80, 200))
    ds.ExposureTime = int(rng.integers(600, 1800))
    ds.Exposure = int(ds.XRayTubeCurrent * ds.ExposureTime / 1000)
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = "RHODIUM"
    ds.PositionerPrimaryAngle = "0" if view == "CC" else ("45" if lat == "R" else "-45")
    ds.OrganDose = f"{rng.uniform(0.9, 2.2):.2f}"
    ds.EntranceDoseInmGy = f"{rng.uniform(3.0, 8.0):.2f}"
    ds.AcquisitionDeviceProcessingDescription = "SYNTH-LOG EQUALISED"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    tissue = pixels[pixels > 0]
    lo, hi = (np.percentile(tissue, [1, 99.5]) if tissue.size else (0, 2**bits - 1))
    ds.WindowCenter = f"{(lo + hi) / 2:.0f}"
    ds.WindowWidth = f"{max(hi - lo, 1):.0f}"
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = pixels.astype("<u2").tobytes()


# --------------------------------------------------------------------------- malformed-but-readable cases
# {case: (edit of a copy of a study written here, reason processing must give; None: must still process)}
MALFORMED = {
    "no_pixel_spacing": (lambda f: mf.edit(mf.mg_images(f), mf.remove(("ImagerPixelSpacing", "PixelSpacing"))),
                         "missing_pixel_spacing"),
    "zero_pixel_spacing": (lambda f: mf.edit(mf.mg_images(f), mf.put("ImagerPixelSpacing", ["0", "0"])),
                           "invalid_pixel_spacing"),
    "nan_pixel_spacing": (lambda f: mf.edit(mf.mg_images(f), mf.put("ImagerPixelSpacing", ["nan", "nan"])),
                          "invalid_pixel_spacing"),
    "rgb": (lambda f: mf.to_rgb(mf.mg_images(f)[:1]), "unsupported_photometric"),
    "thumbnail": (lambda f: mf.crop_image(mf.mg_images(f)[:1], 48, 40), "image_too_small"),
    "blank": (lambda f: mf.blank_pixels(mf.mg_images(f)[-1:]), "blank_image"),
    "monochrome1": (lambda f: mf.to_monochrome1(mf.mg_images(f)), None),
    "zero_pixel_spacing_with_detector_spacing": (
        lambda f: mf.edit(mf.mg_images(f), mf.put("PixelSpacing", ["0", "0"])), None),
}
