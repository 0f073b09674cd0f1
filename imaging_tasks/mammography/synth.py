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

import copy
import dataclasses
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
EXTRA_VIEWS = ("R_ML", "L_ML", "R_XCCL", "L_XCCL")
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique"),
              "ML": ("399260004", "medio-lateral"), "XCCL": ("399192008", "cranio-caudal exaggerated laterally")}
# PS3.3 C.8.11.1.1.1 / C.7.6.1.1.1: row direction \ column direction for each view as displayed.
PATIENT_ORIENTATION = {"L_CC": ["A", "R"], "R_CC": ["P", "L"], "L_MLO": ["A", "FR"], "R_MLO": ["P", "FL"],
                       "L_ML": ["A", "F"], "R_ML": ["P", "F"], "L_XCCL": ["A", "R"], "R_XCCL": ["P", "L"]}
# The breast outline each view is drawn with (ML: MLO-like, with a pectoral muscle; XCCL: CC-like).
GEOMETRY_VIEW = {"CC": "CC", "XCCL": "CC", "MLO": "MLO", "ML": "MLO"}
# Projection of 3-D lesion positions (see ``LESION_GEOMETRY``): obliquity of lateral-type views.
OBLIQUITY_DEG = {"MLO": 45.0, "ML": 0.0}
LESION_GEOMETRY = (
    "A lesion shared by the views of one breast has a 3-D position (x, medial, inferior) in mm: x = distance "
    "from the chest wall (posterior-anterior), medial / inferior = offsets from the breast axis. Rigid "
    "idealisation (no re-compression): every view keeps x as the distance of the projection from the chest-wall "
    "edge; cranio-caudal views (CC, XCCL) put it at image row y = yc + tilt*x + medial (rows run medially); "
    "MLO (obliquity 45 deg) and ML (0 deg) at y = yc + tilt*x + inferior*cos(theta) - medial*sin(theta) "
    "(rows run toward the feet; medial lesions project higher on the MLO than on the ML), with yc, tilt the "
    "view's breast axis (before the right breast is mirrored). So the distance from the chest wall of the "
    "same lesion is the same in its CC and MLO (up to pixel rounding, and mirrored with the image).")
DENSITY_DEFINITION = {
    "glandular_fraction": "gland path / path through the breast under the skin (skin excluded), per pixel",
    "breast_region": "breast mask minus the pectoral muscle (pectoral weight >= 0.5)",
    "dense_area_fraction": "share of breast-region pixels whose glandular fraction > 0.5",
    "dense_volume_fraction": "glandular volume / breast volume (skin included, pectoral muscle excluded), "
                             "sums of path lengths over the breast mask",
    "birads_density": "BI-RADS 4th-edition quartiles of the dense area fraction: a < 0.25 <= b < 0.5 <= c < "
                      "0.75 <= d",
}
VOI_CHOICES = ("linear", "sigmoid", "lut_sequence")
FLIP_CHOICES = ("none", "horizontal", "vertical", "rotate180", "random")
MU_MASS = 0.085
MARKER_LEVEL = 0.97  # lead markers: this share of the stored range (presentation, MONOCHROME2)

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
               density: float | dict | None = None, photometric: str = "MONOCHROME2", voi: str = "linear",
               presentation_intent: str = "PRESENTATION", flip: str = "none", markers: int = 0,
               masses: int = 0, shared_clusters: int = 0, extended_truth: bool | None = None, dose: float = 1.0,
               density_edge: float = 2.0,
               **_ignored) -> list[pathlib.Path]:
    """Write ``studies`` MG studies under ``out/mammography/study-NNN/`` and their truth JSONs.

    ``views`` fixes the views (e.g. ``["L_CC", "L_MLO"]``, also ``R_ML``, ``L_ML``, ``R_XCCL``,
    ``L_XCCL``); by default a study has the four standard views, or (one in four) a seeded subset of 2-3,
    as happens with unilateral or incomplete exams.  The count ranges are inclusive.  Defaults: 1000 x 800
    px at 0.1 mm (a 100 x 80 mm field), about 1.6 MB per image and 2-3 s per study.  Size options meant
    for other specialties are ignored.

    Variants, all off by default (the default files and truth are unchanged by their existence); the
    random draws they need come from a separate stream, so switching one on leaves the anatomy, the
    planted calcifications and the header of every image as they were (except what the option changes):

    * ``density``: target dense AREA fraction (0.05-0.8; see ``DENSITY_DEFINITION``), one number for
      both breasts or ``{"L": f, "R": f}``; every view of the breast is drawn with exactly that share of
      dense pixels (up to a few pixels); the truth gives the dense area and volume fractions measured
      on the generator's own maps.
    * ``photometric``: "MONOCHROME2" or "MONOCHROME1" (stored values mirrored, Presentation LUT Shape
      INVERSE, VOI mirrored so the displayed image is unchanged).
    * ``voi``: "linear" (Window Center/Width, VOI LUT Function LINEAR, as the default), "sigmoid" (VOI LUT
      Function SIGMOID) or "lut_sequence" (a VOI LUT Sequence with a non-linear table and no window).  The
      stored pixels are re-encoded so that ``pydicom.pixels.apply_voi_lut`` (then inversion over the
      output range for MONOCHROME1) gives back the default presentation image within ~2 output levels.
    * ``presentation_intent``: "PRESENTATION" or "PROCESSING" (the raw detector signal, linear in
      X-ray intensity: air bright, MG For Processing SOP class, PixelIntensityRelationship LIN).
    * ``flip``: storage as some vendors do: "none", "horizontal" (mirrored left-right), "vertical",
      "rotate180" or "random" (one of the four per image); PatientOrientation says what was stored.
    * ``markers``: number of lead markers per image in the background air: the first is the
      laterality + view letters (e.g. "LMLO"), the others label blocks; bright, not touching the breast.
    * ``masses``: masses per breast (round or spiculated), each placed at one 3-D position and drawn in
      every view of that breast (``LESION_GEOMETRY``) with a shared ``lesion_id``.
    * ``shared_clusters``: calcification clusters per breast planted at one 3-D position and drawn in every
      CC / MLO / ML view of that breast, with a shared ``lesion_id`` (besides ``clusters_per_image``).
    * ``density_edge``: with ``density``, the steepness of the gland/fat transition (0.25-4; default 2: nearly
      binary glandular regions with sub-mm edges, none narrower than ``MIN_DENSE_FEATURE_MM``; 0.5: a gradual
      projected thickness).
    * ``dose``: a factor on the AEC exposure (0.1-4): quantum noise scales as 1 / sqrt(dose), so 0.5 is a
      noisier image, as from a low-dose protocol or a thick dense breast at the AEC's limit.
    * ``extended_truth``: add the extended truth (boxes, lesion ids, density, pectoral area, flips, masks
      file); default: on exactly when one of the options above is used.
    """
    out = pathlib.Path(out)
    opts = _options(density, photometric, voi, presentation_intent, flip, markers, masses, shared_clusters,
                    extended_truth, dose, density_edge)
    truth_paths = []
    for i in range(studies):
        rng = np.random.default_rng([seed, i])
        extra = np.random.default_rng([seed, i, 15]) if opts.extended else None
        label = f"study-{i:03d}"
        truth_paths.append(_one_study(out, label, rng, rows=rows, cols=cols, spacing=float(pixel_spacing_mm),
                                      views=views, clusters=clusters_per_image, isolated=isolated_per_image,
                                      opts=opts, extra=extra))
    return truth_paths


@dataclasses.dataclass(frozen=True)
class _Options:
    density: dict | None = None
    photometric: str = "MONOCHROME2"
    voi: str = "linear"
    intent: str = "PRESENTATION"
    flip: str = "none"
    markers: int = 0
    masses: int = 0
    shared_clusters: int = 0
    extended: bool = False
    dose: float = 1.0
    density_edge: float = 2.0

    def as_json(self) -> dict:
        return {"density": self.density, "photometric": self.photometric, "voi": self.voi,
                "presentation_intent": self.intent, "flip": self.flip, "markers": self.markers,
                "masses": self.masses, "shared_clusters": self.shared_clusters, "dose": self.dose,
                "density_edge": self.density_edge}


def _options(density, photometric, voi, intent, flip, markers, masses, shared_clusters, extended,
             dose=1.0, density_edge=2.0) -> _Options:
    if density is not None:
        density = dict(density) if isinstance(density, dict) else {"L": density, "R": density}
        if set(density) - {"L", "R"}:
            raise ValueError(f"density keys must be L and/or R, not {sorted(density)}")
        for k, v in density.items():
            if not 0.05 <= float(v) <= 0.8:
                raise ValueError(f"density {k}={v}: the target dense area fraction must be within 0.05-0.8")
        density = {k: float(v) for k, v in density.items()}
    if photometric not in ("MONOCHROME2", "MONOCHROME1"):
        raise ValueError(f"photometric {photometric!r}: use MONOCHROME2 or MONOCHROME1")
    if voi not in VOI_CHOICES:
        raise ValueError(f"voi {voi!r}: use one of {', '.join(VOI_CHOICES)}")
    if intent not in ("PRESENTATION", "PROCESSING"):
        raise ValueError(f"presentation_intent {intent!r}: use PRESENTATION or PROCESSING")
    if intent == "PROCESSING" and (photometric != "MONOCHROME2" or voi != "linear"):
        raise ValueError("a for-processing image is stored MONOCHROME2 with a linear window: drop photometric/voi")
    if flip not in FLIP_CHOICES:
        raise ValueError(f"flip {flip!r}: use one of {', '.join(FLIP_CHOICES)}")
    for name, v in (("markers", markers), ("masses", masses), ("shared_clusters", shared_clusters)):
        if int(v) != v or not 0 <= v <= 5:
            raise ValueError(f"{name}={v!r}: an integer 0-5")
    if not 0.25 <= float(density_edge) <= 4.0:
        raise ValueError(f"density_edge={density_edge!r}: the steepness of the gland/fat transition within 0.25-4")
    if not 0.1 <= float(dose) <= 4.0:
        raise ValueError(f"dose={dose!r}: a factor on the AEC exposure within 0.1-4 (noise scales as 1/sqrt)")
    used = (density is not None or photometric != "MONOCHROME2" or voi != "linear" or intent != "PRESENTATION"
            or flip != "none" or markers or masses or shared_clusters or float(dose) != 1.0)
    return _Options(density, photometric, voi, intent, flip, int(markers), int(masses), int(shared_clusters),
                    bool(used) if extended is None else bool(extended), float(dose), float(density_edge))


def _one_study(out, label, rng, *, rows, cols, spacing, views, clusters, isolated, opts=_Options(),
               extra=None) -> pathlib.Path:
    study = fake_study(rng, label)
    study.patient.sex = "F"
    if views is None:
        if rng.random() < 0.25:
            k = int(rng.integers(2, 4))
            views = [STANDARD_VIEWS[j] for j in sorted(rng.choice(4, size=k, replace=False))]
        else:
            views = list(STANDARD_VIEWS)
    unknown = set(views) - set(STANDARD_VIEWS) - set(EXTRA_VIEWS)
    if unknown:
        raise ValueError(f"unknown views {sorted(unknown)}; use {', '.join(STANDARD_VIEWS + EXTRA_VIEWS)}")
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
    lesions, per_view = {}, {}
    if opts.extended:
        seeds = _probe_seeds(rng, len(views))
        lesions, per_view = _plan_lesions(extra, views, seeds, rows, cols, spacing, anatomy, opts)
    for n, key in enumerate(views, start=1):
        lat, view = key.split("_")
        seed_n = rng.integers(0, 2**63)
        if opts.extended and seed_n != seeds[n - 1]:
            raise RuntimeError("mammography synth: the seed probe no longer mirrors the study's draws")
        img_rng = np.random.default_rng(seed_n)
        view_extra = np.random.default_rng(extra.integers(0, 2**63)) if opts.extended else None
        pixels, truth = _render_view(img_rng, lat, view, rows, cols, spacing, anatomy, bits, clusters, isolated,
                                     opts=opts, extra=view_extra, fixed=per_view.get(key))
        series_uid, sop_uid = new_uid(rng), new_uid(rng)
        processing = opts.intent == "PROCESSING"
        ds = dicom_dataset(study, modality="MG", sop_class_uid=MG_FOR_PROCESSING if processing else MG_FOR_PRESENTATION,
                           series_uid=series_uid, sop_uid=sop_uid, series_number=n, instance_number=1,
                           series_description=f"{lat} {view}")
        if opts.extended:
            masks = truth.pop("_masks")
            flips = _choose_flip(opts.flip, view_extra)
            pixels = _apply_flip(pixels, flips)
            masks = {k: _apply_flip(v, flips) for k, v in masks.items()}
            _flip_truth(truth, flips, rows, cols, spacing)
        _mg_attributes(ds, rng, lat, view, pixels, spacing, bits, kvp, anatomy)
        fname = f"{n:02d}_{lat}{view}.dcm"
        if opts.extended:
            ds.PatientOrientation = _flip_orientation(PATIENT_ORIENTATION[key], flips)
            _encode_variant(ds, pixels, bits, opts)
            truth["flips"] = flips
            truth["patient_orientation"] = list(ds.PatientOrientation)
            truth["photometric"] = str(ds.PhotometricInterpretation)
            truth["voi"] = opts.voi
            truth["presentation_intent"] = opts.intent
            mask_rel = f"{label}/{n:02d}_{lat}{view}_masks.npz"
            mask_path = out / "_truth" / SPECIALTY / mask_rel
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(mask_path, **masks)
            truth["masks_file"] = mask_rel
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
    if opts.extended:
        truth_doc["truth"].update({
            "options": opts.as_json(),
            "lesion_geometry": LESION_GEOMETRY,
            "density_definition": DENSITY_DEFINITION,
            "lesions": lesions,
            "breasts": _breast_summary(views_truth),
            "boxes": "box_xy_px = [x_min, y_min, x_max, y_max] in the centre_xy_px convention; box_xy_mm likewise",
        })
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


def _plan_calcifications(rng, mask, depth, pectoral, spacing, n_clusters, n_isolated, fixed=None):
    """Cluster and isolated-speck positions in mm (chest wall at x=0).

    ``fixed`` (extended options only): clusters planned for several views (they come first, members
    with their attributes) and ``avoid`` discs (masses) that nothing random may enter.
    """
    inset = np.zeros_like(mask)
    border = int(round(8.0 / spacing))
    inset[border:-border, border:-border] = True  # keep whole clusters inside the field of view
    allowed = mask & (pectoral < 0.05) & inset
    calcs, clusters = [], []
    centres = []  # (position, exclusion radius)
    avoid = []
    if fixed:
        for fc in fixed["clusters"]:
            ci = len(clusters)
            idx0 = len(calcs)
            for m in fc["members"]:
                calcs.append({"xy": np.asarray(m["xy"]), "cluster": ci, "isolated": False,
                              "diameter_mm": m["diameter_mm"], "aspect": m["aspect"], "angle": m["angle"],
                              "mu_per_mm": m["mu_per_mm"]})
            clusters.append({"index": ci, "members": list(range(idx0, len(calcs))),
                             "region_radius_mm": fc["region_radius_mm"], "lesion_id": fc["lesion_id"]})
            centres.append((np.asarray(fc["centre"]), fc["region_radius_mm"]))
        avoid = [(np.asarray(m["centre"]), m["diameter_mm"] / 2 * m["aspect"] ** 0.5 * 2.2) for m in fixed["masses"]]
    core_ok = allowed & (depth >= 12.0)
    for ci in range(len(clusters), len(clusters) + n_clusters):
        centre = _place(rng, core_ok, spacing, [(q, 25.0) for q, _ in centres] + [(q, r + 10.0) for q, r in avoid])
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
        p = _place(rng, iso_ok, spacing, [(q, r + 15.0) for q, r in centres] + [(c["xy"], 15.0) for c in calcs]
                   + [(q, r + 5.0) for q, r in avoid])
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
        if "aspect" in c:  # planted for several views: attributes fixed beforehand
            continue
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
        c["_footprint"] = (rs, cs, patch[rs.start - r0:rs.stop - r0, cs.start - c0:cs.stop - c0])
    return att


ELECTRONIC_NOISE = 3.0  # detector read noise, photons per pixel (standard deviation)
ROSE_SNR = 5.0  # Rose's criterion: an object is reliably seen when its ideal-observer SNR is at least ~5


def _ideal_snr(footprint, background_line_integral, n0) -> float:
    """The SNR of an ideal observer that knows the calcification's shape and place (a prewhitened matched
    filter on the quantum plus electronic noise, before the detector blur; no anatomical noise): sqrt of the
    sum over its footprint of (photons it removes)^2 / (photon variance).  It says whether a planted
    calcification can be seen at all at that dose behind that tissue, whatever the detector."""
    rs, cs, patch = footprint
    behind = n0 * np.exp(-background_line_integral[rs, cs])
    removed = behind * (1.0 - np.exp(-patch))
    return float(np.sqrt(np.sum(removed**2 / (behind + ELECTRONIC_NOISE**2))))


def _render_view(rng, lat, view, rows, cols, spacing, anatomy, bits, clusters_range, isolated_range,
                 opts=_Options(), extra=None, fixed=None):
    shape = (rows, cols)
    mask, depth, pectoral, info = _breast_geometry(rng, GEOMETRY_VIEW[view], rows, cols, spacing, anatomy)
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
    target = opts.density.get(lat) if opts.density else None
    if target is None:
        gland_frac = anatomy["density"] * cone * fat_layer * patchy
    else:
        gland_frac = _gland_fraction_for_target(target, texture, cone, fat_layer, mask, pectoral, inner > 0,
                                                spacing, opts.density_edge)
    gland = inner * gland_frac
    muscle = inner * 0.45 * pectoral
    vessels = _vessels(rng, shape, spacing, info, depth, int(rng.integers(3, 7))) * mask
    line_integral = (MU_FAT * (inner - gland - muscle) + MU_GLAND * gland + MU_MUSCLE * muscle
                     + MU_SKIN * skin + (MU_VESSEL - MU_FAT) * vessels)
    n_cl = int(rng.integers(clusters_range[0], clusters_range[1] + 1))
    n_iso = int(rng.integers(isolated_range[0], isolated_range[1] + 1))
    calcs, clusters = _plan_calcifications(rng, mask, depth, pectoral, spacing, n_cl, n_iso, fixed=fixed)
    background = line_integral
    line_integral = line_integral + _render_calcs(calcs, shape, spacing)
    mass_truth = []
    if fixed and fixed["masses"]:
        mass_att, mass_truth = _render_masses(fixed["masses"], shape, spacing, inner)
        line_integral = line_integral + mass_att
    # Acquisition: AEC sets the exposure so ~6000 photons reach a 0.1 mm pixel behind typical tissue.
    typical = MU_FAT * t0 + (MU_GLAND - MU_FAT) * t0 * 0.2 * anatomy["density"]
    if target is not None:
        typical = MU_FAT * t0 + (MU_GLAND - MU_FAT) * t0 * 0.5 * target
    n0 = 6000.0 * (spacing / 0.1) ** 2 * np.exp(typical)
    if opts.dose != 1.0:
        n0 = n0 * opts.dose
    transmitted = ndimage.gaussian_filter(np.exp(-line_integral), sigma=0.05 / spacing)
    counts = n0 * transmitted
    counts = counts + np.sqrt(counts) * rng.standard_normal(shape) + ELECTRONIC_NOISE * rng.standard_normal(shape)
    measured = -np.log(np.maximum(counts, 1.0) / n0)
    # "For presentation" processing: peripheral equalisation (add back the fat the rolled-off edge lacks)
    # and a linear map of log attenuation to the stored range; air is black.
    equalised = measured + 0.85 * MU_FAT * (t0 - thickness) * mask
    top = MU_GLAND * t0 * 1.1
    maxv = 2**bits - 1
    pixels = np.clip(np.round(maxv * equalised / top), 0, maxv).astype(np.uint16)
    pixels[~mask & (pixels < 0.05 * maxv)] = 0
    marker_truth = []
    if opts.markers:
        marker_mask, marker_truth = _markers(extra, opts.markers, f"{lat}{view}", mask, spacing)
        pixels = np.maximum(pixels, np.round(MARKER_LEVEL * maxv * marker_mask).astype(np.uint16))
    if opts.intent == "PROCESSING":
        # The detector signal before processing: linear in the photons (air bright), dark offset 50,
        # unattenuated beam at 85 % of the range; lead markers stop the beam.
        signal = counts / n0
        if opts.markers:
            signal = signal * (1.0 - 0.98 * marker_mask)
        pixels = np.clip(np.round(50 + 0.85 * (maxv - 50) * signal), 0, maxv).astype(np.uint16)
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
                            "ideal_snr": round(_ideal_snr(c["_footprint"], background, n0), 2),
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
                               "radius_mm": round(rad, 4),
                               "n_visible_members": sum(truth_calcs[m]["ideal_snr"] >= ROSE_SNR
                                                        for m in cl["members"])})
    truth = {"calcifications": truth_calcs, "clusters": truth_clusters,
             "n_isolated": sum(1 for c in calcs if c["isolated"]),
             "compressed_thickness_mm": round(t0, 2)}
    if opts.extended:
        _extend_view_truth(truth, calcs, clusters, mass_truth, marker_truth, lat, view, cols, spacing,
                           mask, pectoral, gland, inner, thickness, muscle, target)
        truth["breast_axis"] = {"yc_mm": round(float(info["yc"]), 4), "tilt": round(float(info["tilt"]), 6),
                                "obliquity_deg": OBLIQUITY_DEG.get(view)}
        truth["_masks"] = {k: (v[:, ::-1].copy() if flip else v) for k, v in truth["_masks"].items()}
    return pixels, truth


# ------------------------------------------------------------------------------- variants (extended options)

MIN_DENSE_FEATURE_MM = 1.5  # the narrowest dense region a path-fraction map may hold (see below)


def _gland_fraction_for_target(target, texture, cone, fat_layer, mask, pectoral, has_inner, spacing, edge=2.0
                               ) -> np.ndarray:
    """Glandular fraction of the path under the skin with exactly ``target`` of the breast region > 0.5.

    A score (patchy 1/f^3 texture, concentrated in the cone behind the nipple, kept out of the subcutaneous
    fat and the pectoral muscle) is thresholded at its (1 - target) quantile over the breast region; the
    fraction is a steep sigmoid of the score that crosses 0.5 at that threshold.

    The score is first opened (grey-level) with a disc of ``MIN_DENSE_FEATURE_MM`` across: this map is a glandular
    fraction of the *whole path* through the breast, and a sub-millimetre island of it would be a gland column a
    fraction of a millimetre wide and centimetres deep, which breasts do not have (fibroglandular structures
    that small are that small in depth too, and their projections overlap into smooth texture).  Without the
    opening, a steep sigmoid turns texture peaks near the threshold into full-thickness specks brighter than
    any calcification.
    """
    score = 1.8 * texture + np.log(cone + 1e-6) - 3.0 * (1.0 - fat_layer) - 20.0 * pectoral
    r = max(1, int(round(MIN_DENSE_FEATURE_MM / 2 / spacing)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    score = ndimage.grey_opening(score, footprint=xx * xx + yy * yy <= r * r)
    score = np.where(has_inner, score, -1e6)  # the skin shell itself is never dense
    region = mask & (pectoral < 0.5)
    t = float(np.quantile(score[region], 1.0 - target))
    return (0.5 + 0.5 * np.tanh(edge * (score - t))) * (1.0 - 0.45 * pectoral)  # = sigmoid(2 edge (score - t))


def _probe_seeds(rng, n) -> list:
    """The per-view seeds the study loop will draw (a copy of ``rng`` runs the loop's draws)."""
    probe = copy.deepcopy(rng)
    seeds = []
    for _ in range(n):
        seeds.append(probe.integers(0, 2**63))
        new_uid(probe), new_uid(probe)
        # _mg_attributes: compression force, tube current, exposure time, organ dose, entrance dose.
        probe.uniform(60, 140), probe.integers(80, 200), probe.integers(600, 1800)
        probe.uniform(0.9, 2.2), probe.uniform(3.0, 8.0)
    return seeds


def _project(pos, view, info) -> np.ndarray:
    """(x, y) mm on the unmirrored grid of ``view`` of a 3-D position (x, medial, inferior): LESION_GEOMETRY."""
    x = pos[0]
    if GEOMETRY_VIEW[view] == "CC":
        v = pos[1]
    else:
        th = np.deg2rad(OBLIQUITY_DEG[view])
        v = pos[2] * np.cos(th) - pos[1] * np.sin(th)
    return np.array([x, info["yc"] + info["tilt"] * x + v])


def _place_3d(rng, keys, geoms, spacing, anatomy, min_depth, radius, placed, tries=6000):
    hh = anatomy["half_height_mm"]
    for _ in range(tries):
        p = np.array([rng.uniform(5.0, anatomy["depth_mm"]), rng.uniform(-hh, hh), rng.uniform(-hh, hh)])
        ok = True
        for key in keys:
            view, allowed, depth, info = geoms[key]
            xy = _project(p, view, info)
            r, c = int(round(xy[1] / spacing)), int(round(xy[0] / spacing))
            if not (0 <= r < allowed.shape[0] and 0 <= c < allowed.shape[1]) or not allowed[r, c] \
                    or depth[r, c] < min_depth:
                ok = False
                break
            if any(np.hypot(*(xy - _project(q, view, info))) < radius + rq + 5.0 for q, rq in placed):
                ok = False
                break
        if ok:
            return p
    return None


def _plan_lesions(rng, views, seeds, rows, cols, spacing, anatomy, opts):
    """Masses and clusters shared by the views of one breast: 3-D positions projected into each view."""
    geoms = {}
    border = int(round(8.0 / spacing))
    for key, seed in zip(views, seeds):
        view = key.split("_")[1]
        mask, depth, pectoral, info = _breast_geometry(np.random.default_rng(seed), GEOMETRY_VIEW[view], rows,
                                                       cols, spacing, anatomy)
        inset = np.zeros_like(mask)
        inset[border:-border, border:-border] = True
        geoms[key] = (view, mask & (pectoral < 0.05) & inset, depth, info)
    lesions, per_view = {}, {key: {"clusters": [], "masses": []} for key in views}
    for lat in ("R", "L"):
        keys = [k for k in views if k.startswith(lat + "_")]
        if not keys:
            continue
        placed = []
        for j in range(opts.masses):
            d = float(rng.uniform(6.0, 18.0))
            kind = "spiculated" if rng.random() < 0.5 else "round"
            aspect = float(rng.uniform(1.0, 1.4))
            reach = d / 2 * np.sqrt(aspect) * (2.2 if kind == "spiculated" else 1.0)
            pos = _place_3d(rng, keys, geoms, spacing, anatomy, d / 2 * np.sqrt(aspect) + 6.0, reach, placed)
            if pos is None:
                continue
            placed.append((pos, reach))
            lid = f"{lat}-M{j + 1}"
            spicules = [(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(1.4, 2.2)), float(rng.uniform(0.4, 0.8)))
                        for _ in range(int(rng.integers(8, 18)))] if kind == "spiculated" else []
            lobes = [(int(k), float(rng.uniform(0, 0.06)), float(rng.uniform(0, 2 * np.pi))) for k in (3, 5, 7)]
            lesions[lid] = {"kind": "mass", "mass_kind": kind, "laterality": lat, "diameter_mm": round(d, 3),
                            "position_mm": {"x": round(float(pos[0]), 3), "medial": round(float(pos[1]), 3),
                                            "inferior": round(float(pos[2]), 3)}, "views": {}}
            for key in keys:
                view, _, _, info = geoms[key]
                lesions[lid]["views"][key] = {"masses": len(per_view[key]["masses"])}
                per_view[key]["masses"].append({
                    "lesion_id": lid, "kind": kind, "centre": _project(pos, view, info), "diameter_mm": d,
                    "aspect": aspect, "angle": float(rng.uniform(0, np.pi)), "spicules": spicules, "lobes": lobes})
        cl_keys = [k for k in keys if k.split("_")[1] in ("CC", "MLO", "ML")]
        for j in range(opts.shared_clusters if cl_keys else 0):
            region_r = float(rng.uniform(2.5, 4.5))
            pos = _place_3d(rng, cl_keys, geoms, spacing, anatomy, 12.0, region_r + 5.0, placed)
            if pos is None:
                continue
            placed.append((pos, region_r + 5.0))
            n_members = int(rng.integers(5, 16))
            offsets = []
            for _ in range(4000):
                if len(offsets) == n_members:
                    break
                off = rng.uniform(-region_r, region_r, size=3)
                if np.linalg.norm(off) > region_r:
                    continue
                if all(np.hypot(*(_project(pos + off, geoms[k][0], geoms[k][3])
                                  - _project(pos + o, geoms[k][0], geoms[k][3]))) >= 1.0
                       for k in cl_keys for o in offsets):
                    offsets.append(off)
            attrs = [{"diameter_mm": float(rng.uniform(0.15, 0.5)), "aspect": float(rng.uniform(1.0, 1.8)),
                      "angle": float(rng.uniform(0, np.pi)), "mu_per_mm": float(rng.uniform(1.4, 2.2))}
                     for _ in offsets]
            lid = f"{lat}-C{j + 1}"
            lesions[lid] = {"kind": "calcification_cluster", "laterality": lat, "n_members": len(offsets),
                            "region_radius_mm": round(region_r, 3),
                            "position_mm": {"x": round(float(pos[0]), 3), "medial": round(float(pos[1]), 3),
                                            "inferior": round(float(pos[2]), 3)}, "views": {}}
            for key in cl_keys:
                view, _, _, info = geoms[key]
                lesions[lid]["views"][key] = {"clusters": len(per_view[key]["clusters"])}
                per_view[key]["clusters"].append({
                    "lesion_id": lid, "centre": _project(pos, view, info), "region_radius_mm": region_r,
                    "members": [dict(a, xy=_project(pos + o, view, info)) for o, a in zip(offsets, attrs)]})
    return lesions, per_view


def _render_masses(masses, shape, spacing, inner):
    """Extra attenuation of masses (replacing fat) and their truth on the unmirrored grid.

    Round: an ellipsoid (depth semi-axis d/2) with a 0.3 mm soft margin.  Spiculated: a lobulated
    ellipsoid core plus 8-17 tapering spicules reaching 1.4-2.2 core radii.  ``box_xy_px`` bounds the core
    (pixels where its path > 0); ``spicule_box_xy_px`` also the spicules.
    """
    att = np.zeros(shape, dtype=np.float64)
    truth = []
    for m in masses:
        d, asp = m["diameter_mm"], m["aspect"]
        a1, a2, a3 = d / 2 * np.sqrt(asp), d / 2 / np.sqrt(asp), d / 2
        reach = a1 * (2.3 if m["kind"] == "spiculated" else 1.1) + 1.0
        cx, cy = m["centre"]
        r0, r1 = max(int((cy - reach) / spacing), 0), min(int((cy + reach) / spacing) + 2, shape[0])
        c0, c1 = max(int((cx - reach) / spacing), 0), min(int((cx + reach) / spacing) + 2, shape[1])
        Y, X = np.mgrid[r0:r1, c0:c1].astype(np.float64) * spacing
        X, Y = X - cx, Y - cy
        ca, sa = np.cos(m["angle"]), np.sin(m["angle"])
        u, v = X * ca + Y * sa, -X * sa + Y * ca
        rho2 = (u / a1) ** 2 + (v / a2) ** 2
        if m["kind"] == "spiculated":
            phi = np.arctan2(v, u)
            scale = 1.0 + sum(amp * np.sin(k * phi + ph) for k, amp, ph in m["lobes"])
            rho2 = rho2 / scale**2
        core = 2.0 * a3 * np.sqrt(np.maximum(1.0 - rho2, 0.0))
        path = core.copy()
        if m["kind"] == "spiculated":
            for phi0, lf, w0 in m["spicules"]:
                dx, dy = np.cos(phi0), np.sin(phi0)
                length = lf * d / 2
                t = np.clip(X * dx + Y * dy, 0.0, length)
                dist = np.hypot(X - t * dx, Y - t * dy)
                w = w0 * (1.0 - t / length) + 0.08
                path = np.maximum(path, 2.0 * np.sqrt(np.maximum(w * w - dist * dist, 0.0)))
        else:
            path = ndimage.gaussian_filter(path, sigma=0.3 / spacing)
        path = np.minimum(path, inner[r0:r1, c0:c1])
        att[r0:r1, c0:c1] += (MU_MASS - MU_FAT) * path
        rr, cc = np.nonzero(core > 0)
        sr, sc = np.nonzero(path > 0.05)
        truth.append({"lesion_id": m["lesion_id"], "kind": m["kind"], "centre_xy_px": [cx / spacing, cy / spacing],
                      "diameter_mm": round(d, 3), "aspect": round(asp, 3),
                      "box_xy_px": [c0 + cc.min(), r0 + rr.min(), c0 + cc.max(), r0 + rr.max()],
                      "spicule_box_xy_px": ([c0 + sc.min(), r0 + sr.min(), c0 + sc.max(), r0 + sr.max()]
                                            if m["kind"] == "spiculated" else None)})
    return att, truth


# 5 x 7 bitmaps of the letters of view names.
_FONT = {
    "L": ["10000"] * 6 + ["11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "C": ["01111", "10000", "10000", "10000", "10000", "10000", "01111"],
    "M": ["10001", "11011", "10101", "10101", "10001", "10001", "10001"],
    "O": ["01110", "10001", "10001", "10001", "10001", "10001", "01110"],
    "X": ["10001", "10001", "01010", "00100", "01010", "10001", "10001"],
}


def _markers(rng, n, text, mask, spacing):
    """Lead markers in the air: ``text`` letters 6 mm high, then label blocks; >= 4 mm from the breast,
    >= 10 mm from the chest wall (column 0) and >= 2 mm from the edges.  Returns a [0, 1] map and truth."""
    rows, cols = mask.shape
    out = np.zeros(mask.shape, dtype=np.float64)
    forbidden = ndimage.distance_transform_edt(~mask, sampling=spacing) < 4.0
    forbidden[:, :int(round(10.0 / spacing))] = True
    e = max(int(round(2.0 / spacing)), 1)
    forbidden[:e], forbidden[-e:], forbidden[:, -e:] = True, True, True
    truth = []
    for j in range(n):
        if j == 0:
            cell = max(int(round(6.0 / spacing / 7)), 1)
            glyphs = [np.array([[ch == "1" for ch in row] for row in _FONT[ch]]) for ch in text]
            gap = np.zeros((7, 1), dtype=bool)
            bitmap = np.concatenate(sum(([g, gap] for g in glyphs), [])[:-1], axis=1)
            bitmap = np.kron(bitmap, np.ones((cell, cell), dtype=bool))
            kind = "lead_letters"
        else:
            h, w = int(round(rng.uniform(5, 8) / spacing)), int(round(rng.uniform(10, 20) / spacing))
            bitmap = np.ones((max(h, 2), max(w, 2)), dtype=bool)
            kind = "label"
        h, w = bitmap.shape
        if h >= rows or w >= cols:
            continue
        # Top-left corners whose box is entirely allowed (summed-area table of the forbidden map).
        sat = np.pad(forbidden.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        bad = sat[h:, w:] - sat[:-h, w:] - sat[h:, :-w] + sat[:-h, :-w]
        rr, cc = np.nonzero(bad == 0)
        if rr.size == 0:
            continue
        k = int(rng.integers(rr.size))
        r0, c0 = int(rr[k]), int(cc[k])
        out[r0:r0 + h, c0:c0 + w] = np.maximum(out[r0:r0 + h, c0:c0 + w], bitmap)
        forbidden[max(r0 - e, 0):r0 + h + e, max(c0 - e, 0):c0 + w + e] = True
        ys, xs = np.nonzero(bitmap)
        truth.append({"kind": kind, "text": text if kind == "lead_letters" else None,
                      "box_xy_px": [c0 + xs.min(), r0 + ys.min(), c0 + xs.max(), r0 + ys.max()]})
    return out, truth


def _box_mm(box, spacing):
    return [round(float(v) * spacing, 4) for v in box]


def _extend_view_truth(truth, calcs, clusters, masses, markers, lat, view, cols, spacing, mask, pectoral, gland,
                       inner, thickness, muscle, target) -> None:
    """Boxes, lesion ids, density, pectoral area and masks (on the stored grid before any vendor flip)."""
    mirror = lat == "R"

    def mx(x):
        return cols - 1 - x if mirror else x

    def mbox(b):
        return [min(mx(b[0]), mx(b[2])), b[1], max(mx(b[0]), mx(b[2])), b[3]]

    for tc, cl in zip(truth["clusters"], clusters):
        pts = np.array([truth["calcifications"][m]["centre_xy_px"] for m in cl["members"]])
        rad = np.array([calcs[m]["diameter_mm"] / 2 * np.sqrt(calcs[m]["aspect"]) for m in cl["members"]]) / spacing
        box = [float(np.min(pts[:, 0] - rad)), float(np.min(pts[:, 1] - rad)),
               float(np.max(pts[:, 0] + rad)), float(np.max(pts[:, 1] + rad))]
        tc["lesion_id"] = cl.get("lesion_id") or f"{lat}_{view}-C{cl['index'] + 1}"
        tc["shared"] = "lesion_id" in cl
        tc["box_xy_px"] = [round(v, 3) for v in box]
        tc["box_xy_mm"] = _box_mm(box, spacing)
    for c, tcalc in zip(calcs, truth["calcifications"]):
        if c["cluster"] is not None:
            tcalc["lesion_id"] = truth["clusters"][c["cluster"]]["lesion_id"]
    out_masses = []
    for i, m in enumerate(masses):
        cx, cy = m["centre_xy_px"]
        box = mbox(m["box_xy_px"])
        entry = {"index": i, "lesion_id": m["lesion_id"], "kind": m["kind"], "shared": True,
                 "centre_xy_px": [round(float(mx(cx)), 3), round(float(cy), 3)],
                 "centre_xy_mm": [round(float(mx(cx) * spacing), 4), round(float(cy * spacing), 4)],
                 "diameter_mm": m["diameter_mm"], "aspect": m["aspect"],
                 "box_xy_px": [int(v) for v in box], "box_xy_mm": _box_mm(box, spacing)}
        if m["spicule_box_xy_px"] is not None:
            sbox = mbox(m["spicule_box_xy_px"])
            entry["spicule_box_xy_px"] = [int(v) for v in sbox]
            entry["spicule_box_xy_mm"] = _box_mm(sbox, spacing)
        out_masses.append(entry)
    truth["masses"] = out_masses
    truth["markers"] = [dict(m, box_xy_px=[int(v) for v in mbox(m["box_xy_px"])],
                             box_xy_mm=_box_mm(mbox(m["box_xy_px"]), spacing)) for m in markers]
    region = mask & (pectoral < 0.5)
    frac = np.where(inner > 0, gland / np.maximum(inner, 1e-9), 0.0)
    dense = region & (frac > 0.5)
    n_region = int(region.sum())
    truth["density"] = {
        "target_dense_area_fraction": target,
        "dense_area_fraction": round(float(dense.sum()) / max(n_region, 1), 5),
        "dense_volume_fraction": round(float(gland[mask].sum()) / max(float((thickness - muscle)[mask].sum()), 1e-9), 5),
        "breast_region_px": n_region,
        "dense_px": int(dense.sum()),
    }
    pect = mask & (pectoral >= 0.5)
    truth["pectoral"] = ({"area_px": int(pect.sum()), "area_mm2": round(float(pect.sum()) * spacing**2, 2)}
                         if GEOMETRY_VIEW[view] == "MLO" else None)
    truth["_masks"] = {"breast": mask.astype(bool), "pectoral": pect, "dense": dense}


def _breast_summary(views_truth) -> dict:
    out = {}
    for lat in ("R", "L"):
        ts = [t for k, t in views_truth.items() if k.startswith(lat + "_") and "density" in t]
        if not ts:
            continue
        area = float(np.mean([t["density"]["dense_area_fraction"] for t in ts]))
        vol = float(np.mean([t["density"]["dense_volume_fraction"] for t in ts]))
        out[lat] = {"views": sorted(k for k in views_truth if k.startswith(lat + "_")),
                    "target_dense_area_fraction": ts[0]["density"]["target_dense_area_fraction"],
                    "dense_area_fraction": round(area, 5), "dense_volume_fraction": round(vol, 5),
                    "birads_density": "abcd"[min(int(area / 0.25), 3)]}
    return out


def _choose_flip(flip, rng) -> dict:
    if flip == "random":
        flip = ("none", "horizontal", "vertical", "rotate180")[int(rng.integers(4))]
    return {"horizontal": flip in ("horizontal", "rotate180"), "vertical": flip in ("vertical", "rotate180")}


def _apply_flip(arr, flips):
    if flips["horizontal"]:
        arr = arr[:, ::-1]
    if flips["vertical"]:
        arr = arr[::-1, :]
    return np.ascontiguousarray(arr)


_OPPOSITE = {"A": "P", "P": "A", "L": "R", "R": "L", "H": "F", "F": "H"}


def _flip_orientation(po, flips) -> list[str]:
    po = list(po)
    if flips["horizontal"]:
        po[0] = "".join(_OPPOSITE[ch] for ch in po[0])
    if flips["vertical"]:
        po[1] = "".join(_OPPOSITE[ch] for ch in po[1])
    return po


def _flip_truth(truth, flips, rows, cols, spacing) -> None:
    """Move every ``*_xy_px`` point (2 values) or box (4 values) of the view's truth with the storage flip."""
    if not (flips["horizontal"] or flips["vertical"]):
        return

    def fx(x):
        return cols - 1 - x if flips["horizontal"] else x

    def fy(y):
        return rows - 1 - y if flips["vertical"] else y

    for group in ("calcifications", "clusters", "masses", "markers"):
        for item in truth.get(group, []):
            for key in [k for k in item if k.endswith("_xy_px") and item[k] is not None]:
                v = item[key]
                if len(v) == 2:
                    new = [fx(v[0]), fy(v[1])]
                else:
                    new = [min(fx(v[0]), fx(v[2])), min(fy(v[1]), fy(v[3])),
                           max(fx(v[0]), fx(v[2])), max(fy(v[1]), fy(v[3]))]
                item[key] = [round(float(a), 3) if isinstance(a, float) else a for a in new]
                item[key[:-3] + "_mm"] = [round(float(a) * spacing, 4) for a in new]


def _linear_window(x, c, w, maxv) -> np.ndarray:
    """pydicom's VOI LUT Function LINEAR (PS3.3 C.11.2.1.2.1) onto [0, maxv]."""
    y = ((np.asarray(x, dtype=np.float64) - (c - 0.5)) / (w - 1) + 0.5) * maxv
    return np.clip(y, 0.0, maxv)


LUT_GAMMA = 0.6  # the VOI LUT Sequence variant stores maxv * (p / maxv) ** LUT_GAMMA


def _encode_variant(ds, pixels, bits, opts) -> None:
    """Re-store the MONOCHROME2 / linear-window image as the chosen variant (same presentation image)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    maxv = 2**bits - 1
    if opts.intent == "PROCESSING":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PROCESSING"
        ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PROCESSING
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1  # lower value = less X-ray intensity
        ds.AcquisitionDeviceProcessingDescription = "NONE (RAW)"
        return
    if opts.photometric == "MONOCHROME2" and opts.voi == "linear":
        return
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    target = _linear_window(pixels, c, w, maxv) / maxv  # the presentation image in [0, 1]
    if opts.voi == "linear":
        stored = pixels.astype(np.int64)
    elif opts.voi == "sigmoid":
        cs, ws = float(f"{maxv / 2:.1f}"), float(f"{maxv / 4.5:.1f}")
        eps = 0.25 / maxv
        p = np.clip(target, eps, 1 - eps)
        stored = np.clip(np.round(cs + ws / 4.0 * np.log(p / (1 - p))), 0, maxv).astype(np.int64)
    else:
        stored = np.round(maxv * (pixels.astype(np.float64) / maxv) ** LUT_GAMMA).astype(np.int64)
        s = np.arange(maxv + 1, dtype=np.float64)
        lut = np.round(_linear_window(maxv * (s / maxv) ** (1.0 / LUT_GAMMA), c, w, maxv)).astype(np.int64)
    if opts.photometric == "MONOCHROME1":
        stored = maxv - stored
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PresentationLUTShape = "INVERSE"
        ds.PixelIntensityRelationshipSign = -int(ds.PixelIntensityRelationshipSign)
        if opts.voi == "linear":
            c = maxv - c + 1
        elif opts.voi == "sigmoid":
            cs = maxv - cs
        else:
            lut = maxv - lut[::-1]
    if opts.voi == "linear":
        ds.WindowCenter = f"{c:.0f}"
    elif opts.voi == "sigmoid":
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = f"{cs:.1f}", f"{ws:.1f}", "SIGMOID"
    else:
        for kw in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
            delattr(ds, kw)
        item = Dataset()
        item.add_new(0x00283002, "US", [maxv + 1, 0, bits])  # LUT Descriptor
        item.LUTExplanation = "SYNTH NONLINEAR"
        item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUT Data
        ds.VOILUTSequence = Sequence([item])
    ds.PixelData = stored.astype("<u2").tobytes()


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
