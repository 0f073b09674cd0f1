"""Non-contrast cardiac CT (coronary calcium scoring) with calcified lesions whose scores are known exactly.

Why the construction is exact: lesions are planted as pixel masks with uniform (or core/rim) integer HU and
sharp edges, on 3.0 mm contiguous axial slices (the Agatston convention) at 0.75 mm pixels, so every 2-D
lesion area is an integer multiple of 0.5625 mm2 — exactly representable in binary floating point.  The
Agatston score (area x density weight of the slice's peak HU), the volume score (voxels x voxel volume) and
the mass score (calibration x HU x volume) follow by arithmetic, not by measurement.  Everything else in
the phantom is kept below the 130 HU threshold (noise is clipped) except bone, which sits outside the heart
or in large connected structures (spine, sternum, ribs) that :func:`imaging_tasks.cardiovascular.calcium.heart_roi`
excludes, plus one calcified lung granuloma that must be excluded because it is inside a lung.

Slice indices in the truth count from the most inferior slice (ascending patient z), the order
:func:`imaging_tasks.dicom_io.load_series` stacks a series in.  Instance number 1 is the most superior
slice, as in a cranio-caudal acquisition.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from imaging_tasks.synth import phi
from imaging_tasks.synth import malformed as mf

SPECIALTY = "cardiovascular"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SLICE_MM = 3.0  # Agatston scoring is defined on 3 mm contiguous slices
THRESHOLD_HU = 130.0
MIN_AREA_MM2 = 1.0
# Mass score calibration (mg hydroxyapatite per ml per HU).  A phantom insert of 200 mg/ml HA reading
# 250 HU gives 0.8, typical at 120 kVp; sites measure their own.  Recorded in the truth of every study.
CALIBRATION_MG_PER_HU_ML = 0.8
# (lowest, highest) peak HU of each Agatston density weight 1..4; the last range is open in the standard.
WEIGHT_RANGES = {1: (130, 199), 2: (200, 299), 3: (300, 399), 4: (400, 900)}
HALO_HU = 110  # partial-volume rim around every lesion: dense-looking but below the threshold

# Tissue classes: (mean HU, noise sigma, clip low, clip high).  Clipping keeps non-bone tissue < 130 HU.
AIR, FAT, SOFT, LUNG, BLOOD, CANCELLOUS, CORTICAL, CSF, MARROW = range(9)
TISSUES = {
    AIR: (-1000, 8, -1024, -960),
    FAT: (-95, 12, -150, -40),
    SOFT: (45, 12, -20, 100),
    LUNG: (-850, 25, -950, -700),
    BLOOD: (40, 12, -20, 100),
    CANCELLOUS: (230, 25, 150, 350),
    CORTICAL: (650, 40, 450, 900),
    CSF: (10, 10, -20, 60),
    MARROW: (180, 20, 140, 260),
}
CONTRAST_BLOOD = (350, 20, 250, 450)  # a CT angiogram: enhanced blood pool, Agatston does not apply


def weight_for(peak_hu: float) -> int:
    """Agatston density weight of a 2-D lesion from its peak HU."""
    return 1 if peak_hu < 200 else 2 if peak_hu < 300 else 3 if peak_hu < 400 else 4


def _ellipse(x, y, cx, cy, ax, ay):
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _disc(radius_px: float) -> list[tuple[int, int]]:
    """Pixel offsets (dr, dc) of a digital disc; radius 0 is a single pixel."""
    r = int(np.floor(radius_px))
    return [(dr, dc) for dr in range(-r, r + 1) for dc in range(-r, r + 1) if dr * dr + dc * dc <= radius_px ** 2]


def _anatomy(rng: np.random.Generator, rows: int, n_slices: int, pixel_mm: float, contrast: bool):
    """Tissue-class map (z, y, x) of a scaled chest, and the heart geometry lesions are placed in."""
    fov = rows * pixel_mm
    c = (np.arange(rows) - (rows - 1) / 2) * pixel_mm
    x, y = np.meshgrid(c, c)  # x: patient left (+), y: posterior (+)
    F = fov
    heart = {"cx": F * (0.05 + rng.uniform(-0.02, 0.02)), "cy": F * (-0.07 + rng.uniform(-0.015, 0.015)),
             "ax": F * 0.2 * rng.uniform(0.92, 1.05), "ay": F * 0.16 * rng.uniform(0.92, 1.05),
             "zc": (n_slices - 1) / 2 + rng.uniform(-1.0, 1.0), "az_slices": n_slices * 0.58}
    base = np.full((rows, rows), AIR, np.int8)
    base[_ellipse(x, y, 0, 0, 0.47 * F, 0.40 * F)] = FAT
    base[_ellipse(x, y, 0, 0, 0.435 * F, 0.365 * F)] = SOFT
    base[_ellipse(x, y, -0.21 * F, 0.02 * F, 0.17 * F, 0.26 * F)] = LUNG
    base[_ellipse(x, y, 0.22 * F, 0.04 * F, 0.155 * F, 0.25 * F)] = LUNG
    base[_ellipse(x, y, 0.10 * F, 0.17 * F, 0.05 * F, 0.05 * F)] = BLOOD  # descending aorta
    # Spine: vertebral body (cortex + cancellous), canal with CSF inside a posterior arch.
    base[_ellipse(x, y, 0, 0.22 * F, 0.07 * F, 0.07 * F)] = CORTICAL
    base[_ellipse(x, y, 0, 0.22 * F, 0.058 * F, 0.058 * F)] = CANCELLOUS
    base[_ellipse(x, y, 0, 0.335 * F, 0.052 * F, 0.05 * F)] = CORTICAL
    base[_ellipse(x, y, 0, 0.335 * F, 0.035 * F, 0.033 * F)] = CSF
    # Sternum and ribs: bone in the chest wall, outside the mediastinum.
    base[_ellipse(x, y, 0, -0.36 * F, 0.06 * F, 0.022 * F)] = CORTICAL
    base[_ellipse(x, y, 0, -0.36 * F, 0.045 * F, 0.011 * F)] = MARROW
    for angle in (0, 25, 155, 180, 205, 335):
        t = np.deg2rad(angle)
        base[_ellipse(x, y, 0.44 * F * np.cos(t), 0.37 * F * np.sin(t), 0.018 * F, 0.018 * F)] = CORTICAL
    classes = np.repeat(base[None], n_slices, axis=0)
    for k in range(n_slices):
        f = 1.0 - ((k - heart["zc"]) / heart["az_slices"]) ** 2
        if f <= 0:
            continue
        s = np.sqrt(f)
        sl = classes[k]
        sl[_ellipse(x, y, heart["cx"], heart["cy"], heart["ax"] * s + 0.02 * F, heart["ay"] * s + 0.02 * F)] = FAT
        sl[_ellipse(x, y, heart["cx"], heart["cy"], heart["ax"] * s, heart["ay"] * s)] = BLOOD
    tissues = dict(TISSUES)
    if contrast:
        tissues[BLOOD] = CONTRAST_BLOOD
    return classes, heart, tissues, (x, y)


def _render(rng: np.random.Generator, classes: np.ndarray, tissues: dict) -> np.ndarray:
    noise = rng.standard_normal(classes.shape, dtype=np.float32)
    hu = np.empty(classes.shape, np.float32)
    for cls, (mean, sigma, lo, hi) in tissues.items():
        sel = classes == cls
        hu[sel] = np.clip(mean + sigma * noise[sel], lo, hi)
    return np.rint(hu).astype(np.int16)


def _plan_lesions(rng: np.random.Generator, heart: dict, n_slices: int, rows: int, pixel_mm: float):
    """Lesion specs (pixel centre, slices, per-slice radius, HU) that do not touch each other."""
    centre_px = (rows - 1) / 2
    specs = []
    classes = [1, 2, 3, 4] + [int(w) for w in rng.integers(1, 5, size=int(rng.integers(0, 4)))]
    kinds = [("lesion", w) for w in classes] + [("tiny", 0)] * int(rng.integers(1, 3))
    for kind, w in kinds:
        for _attempt in range(500):
            if kind == "tiny":
                n = 1
                radii = [0.0]
            else:
                n = int(rng.integers(1, 4))
                mid = float(rng.choice([1.0, 1.5, 2.0, 2.3, 3.0, 3.6, 4.2]))
                if n == 1:
                    radii = [mid]
                elif n == 2:
                    radii = [mid, float(rng.choice([0.0, 1.0, 1.5, 2.0]))]
                else:
                    radii = [float(rng.choice([0.0, 1.0, 1.5])), mid, float(rng.choice([0.0, 1.0, 1.5]))]
            z0 = int(rng.integers(0, n_slices - n + 1))
            f = min(1.0 - ((k - heart["zc"]) / heart["az_slices"]) ** 2 for k in range(z0, z0 + n))
            if f < 0.45:
                continue
            # Uniform in the inner 70% of the heart's cross-section, so the lesion sits in the mediastinum.
            t, rr = rng.uniform(0, 2 * np.pi), 0.7 * np.sqrt(rng.uniform()) * np.sqrt(f)
            px = int(round(centre_px + (heart["cx"] + rr * heart["ax"] * np.cos(t)) / pixel_mm))
            py = int(round(centre_px + (heart["cy"] + rr * heart["ay"] * np.sin(t)) / pixel_mm))
            rmax = max(radii)
            clash = any(
                (s["z0"] - 1 <= z0 + n - 1 and z0 <= s["z0"] + s["n"]) and
                np.hypot(px - s["col"], py - s["row"]) < rmax + max(s["radii"]) + 5
                for s in specs)
            if clash:
                continue
            if kind == "tiny":
                hu, core = int(rng.integers(150, 700)), None
            else:
                lo, hi = WEIGHT_RANGES[w]
                peak = lo if rng.uniform() < 0.3 else int(rng.integers(lo, hi + 1))
                # Half the lesions of weight > 1 have a dense core on the middle slice only: the weight comes
                # from the peak, not the mean, and differs between the lesion's slices.
                if w > 1 and rng.uniform() < 0.5:
                    hu, core = int(rng.integers(130, lo)), peak
                else:
                    hu, core = peak, None
            specs.append({"kind": kind, "row": py, "col": px, "z0": z0, "n": n, "radii": radii, "hu": hu,
                          "core_hu": core})
            break
        else:
            raise RuntimeError("could not place a lesion without overlap; use a larger matrix or more slices")
    return specs


def _plant(hu: np.ndarray, specs: list[dict], pixel_mm: float, z_of, xy_of, cal: float) -> tuple[list, list]:
    """Paint lesions (and their sub-threshold halo) and compute their exact scores."""
    area_px = pixel_mm * pixel_mm
    voxel_ml = area_px * SLICE_MM / 1000.0
    lesions, ignored = [], []
    rows = hu.shape[1]
    for s in specs:
        slices = []
        mid = s["z0"] + s["n"] // 2 if s["n"] != 2 else s["z0"]
        for i, radius in enumerate(s["radii"]):
            k = s["z0"] + i
            offs = _disc(radius)
            pix = {(s["row"] + dr, s["col"] + dc) for dr, dc in offs}
            halo = {(r + a, c + b) for r, c in pix for a in (-1, 0, 1) for b in (-1, 0, 1)} - pix
            for r, c in halo:
                hu[k, r, c] = HALO_HU
            core = set()
            if s["core_hu"] is not None and k == mid:
                core = {(s["row"] + dr, s["col"] + dc) for dr, dc in _disc(max(0.0, radius / 2))}
            values = []
            for r, c in sorted(pix):
                assert 0 <= r < rows and 0 <= c < rows
                v = s["core_hu"] if (r, c) in core else s["hu"]
                hu[k, r, c] = v
                values.append(v)
            n_px = len(pix)
            area = n_px * area_px
            peak = max(values)
            counted = area >= MIN_AREA_MM2
            w = weight_for(peak)
            slices.append({"slice_index": k, "z_mm": z_of(k), "pixels": n_px, "area_mm2": area, "peak_hu": peak,
                           "mean_hu": sum(values) / n_px, "weight": w, "counted": counted,
                           "agatston": area * w * (SLICE_MM / 3.0) if counted else 0.0,
                           "volume_mm3": area * SLICE_MM if counted else 0.0,
                           "mass_mg": cal * sum(values) * voxel_ml if counted else 0.0})
        entry = {"row": s["row"], "col": s["col"], "position_mm": xy_of(s["row"], s["col"]),
                 "base_hu": s["hu"], "core_hu": s["core_hu"], "slices": slices}
        if any(sl["counted"] for sl in slices):
            entry.update(index=len(lesions), peak_hu=max(sl["peak_hu"] for sl in slices),
                         agatston=sum(sl["agatston"] for sl in slices),
                         volume_mm3=sum(sl["volume_mm3"] for sl in slices),
                         mass_mg=sum(sl["mass_mg"] for sl in slices))
            lesions.append(entry)
        else:
            ignored.append(entry)
    return lesions, ignored


def _plant_granuloma(rng, hu: np.ndarray, classes: np.ndarray, z_of, xy_of) -> dict | None:
    """A calcified lung granuloma: dense, but inside a lung, so not coronary calcium."""
    nz, rows, _ = classes.shape
    offs = _disc(2.0)
    for _ in range(500):
        k = int(rng.integers(0, nz - 1))
        r, c = int(rng.integers(4, rows - 4)), int(rng.integers(4, rows - 4))
        box = classes[k:k + 2, r - 4:r + 5, c - 4:c + 5]
        if box.shape == (2, 9, 9) and np.all(box == LUNG):
            for kk in (k, k + 1):
                for dr, dc in offs:
                    hu[kk, r + dr, c + dc] = 600
            return {"slices": [k, k + 1], "z_mm": [z_of(k), z_of(k + 1)], "position_mm": xy_of(r, c),
                    "hu": 600}
    return None


def _localizer(study, rng, hu: np.ndarray, pixel_mm: float, x0: float, z_top: float, series_uid: str):
    """A coronal scout: a real exam's extra CT series that the scorer must skip."""
    proj = hu.astype(np.float32).mean(axis=1)[::-1]  # (z descending, x)
    ds = phi.dicom_dataset(study, modality="CT", sop_class_uid=CT_IMAGE_STORAGE, series_uid=series_uid,
                           sop_uid=phi.new_uid(rng), series_number=1, instance_number=1,
                           series_description="Topogram 0.6 T20f")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.ImagePositionPatient = [_ds(x0), "0", _ds(z_top)]
    ds.PixelSpacing = [_ds(SLICE_MM), _ds(pixel_mm)]
    _pixels(ds, np.rint(proj).astype(np.int16))
    ds.KVP = "120"
    return ds


def _ds(v: float) -> str:
    return format(float(v), ".10g")


def _pixels(ds, arr: np.ndarray) -> None:
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PixelData = (arr.astype(np.int32) + 1024).astype("<i2").tobytes()


def _per_study(name: str, value, studies: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * studies
    if len(values) != studies:
        raise ValueError(f"{name} has {len(values)} values for {studies} studies")
    return values


FLOW_CHOICES = (None, "pc", "4d", "both")


def synthesize(out: pathlib.Path, studies: int, seed: int, *, rows: int = 192, slices: int = 24,
               pixel_mm: float = 0.75, contrast: bool = False, with_cine: bool | list = False,
               with_flow: str | None | list = None) -> list[pathlib.Path]:
    """Write ``studies`` calcium-scoring CT studies (plus a scout each) and their exact score truth.

    ``contrast=True`` makes CT angiograms instead (enhanced blood pool), which calcium scoring must refuse.
    Keep ``pixel_mm`` a binary fraction (0.75, 0.625, 0.5) so areas stay exact in floating point.
    ``with_cine`` adds a short-axis cine stack (:mod:`.synth_cine`), ``with_flow`` a 2-D phase-contrast plane
    ("pc"), a 4-D flow ("4d") or both (:mod:`.synth_flow`) to the same study, each with its truth under
    ``truth["cine"]`` / ``truth["flow"]``; one value for all studies or a list with one per study.  The MR series
    draw from their own random streams, so a study's CT is the same with or without them.
    """
    out = pathlib.Path(out)
    cine_of, flow_of = _per_study("with_cine", with_cine, studies), _per_study("with_flow", with_flow, studies)
    if any(f not in FLOW_CHOICES for f in flow_of):
        raise ValueError(f"with_flow must be one of {FLOW_CHOICES}")
    truth_paths = []
    for idx in range(studies):
        rng = np.random.default_rng([seed, idx])
        label = f"study-{idx:03d}"
        study = phi.fake_study(rng, label)
        loc_uid, ax_uid = phi.new_series_uids(rng, 2)
        classes, heart, tissues, _ = _anatomy(rng, rows, slices, pixel_mm, contrast)
        hu = _render(rng, classes, tissues)

        x0 = -(rows - 1) / 2 * pixel_mm  # centre of the first pixel, patient x
        z_min = -SLICE_MM * (slices - 1) / 2 - 120.0

        def z_of(k: int) -> float:
            return z_min + SLICE_MM * k

        def xy_of(r: int, c: int) -> list[float]:
            return [x0 + c * pixel_mm, x0 + r * pixel_mm]

        specs = _plan_lesions(rng, heart, slices, rows, pixel_mm)
        lesions, ignored = _plant(hu, specs, pixel_mm, z_of, xy_of, CALIBRATION_MG_PER_HU_ML)
        granuloma = _plant_granuloma(rng, hu, classes, z_of, xy_of)

        folder = out / SPECIALTY / label
        folder.mkdir(parents=True, exist_ok=True)
        phi.write_dicom(_localizer(study, rng, hu, pixel_mm, x0, z_of(slices - 1), loc_uid),
                        str(folder / "LOC-0001.dcm"))
        for k in range(slices):
            inst = slices - k  # instance 1 is the most superior slice
            ds = phi.dicom_dataset(study, modality="CT", sop_class_uid=CT_IMAGE_STORAGE, series_uid=ax_uid,
                                   sop_uid=phi.new_uid(rng), series_number=2, instance_number=inst,
                                   series_description="CaScore 3.0 Qr36" + (" CTA" if contrast else ""))
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
            ds.ImagePositionPatient = [_ds(x0), _ds(x0), _ds(z_of(k))]
            ds.SliceLocation = _ds(z_of(k))
            ds.SliceThickness = _ds(SLICE_MM)
            ds.PixelSpacing = [_ds(pixel_mm), _ds(pixel_mm)]
            ds.ReconstructionDiameter = _ds(rows * pixel_mm)
            ds.PatientPosition = "HFS"
            ds.BodyPartExamined = "HEART"
            ds.ProtocolName = "Calcium Score"
            ds.KVP = "120"
            ds.XRayTubeCurrent = 80
            ds.ExposureTime = 165
            ds.ConvolutionKernel = "Qr36"
            ds.AcquisitionNumber = 1
            if contrast:
                ds.ContrastBolusAgent = "Iohexol 350"
            _pixels(ds, hu[k])
            phi.write_dicom(ds, str(folder / f"CT-{inst:04d}.dcm"))

        mr_truth = _write_mr(folder, study, np.random.default_rng([seed, idx, 13]), cine_of[idx], flow_of[idx])
        counted = [sl for les in lesions for sl in les["slices"] if sl["counted"]]
        truth = {
            "contrast": contrast,
            "agatston": sum(sl["agatston"] for sl in counted),
            "volume_mm3": sum(sl["volume_mm3"] for sl in counted),
            "mass_mg": sum(sl["mass_mg"] for sl in counted),
            "lesion_count": len(lesions),
            "lesion_slice_count": len(counted),
            "calibration_mg_per_hu_ml": CALIBRATION_MG_PER_HU_ML,
            "threshold_hu": THRESHOLD_HU,
            "min_area_mm2": MIN_AREA_MM2,
            "slice_thickness_mm": SLICE_MM,
            "pixel_spacing_mm": pixel_mm,
            "slice_index_order": "ascending patient z (most inferior first), as dicom_io.load_series stacks",
            "lesions": lesions,
            "ignored_lesions": ignored,
            "distractors": {"lung_granuloma": granuloma},
            "heart": {k: float(v) for k, v in heart.items()},
            **mr_truth,
        }
        record = {"specialty": SPECIALTY, "label": label, "study_uid": study.study_uid,
                  "phi": phi.phi_values(study), "truth": truth}
        tpath = out / "_truth" / SPECIALTY / f"{label}.json"
        tpath.parent.mkdir(parents=True, exist_ok=True)
        tpath.write_text(json.dumps(record, indent=1))
        truth_paths.append(tpath)
    return truth_paths


def _write_mr(folder: pathlib.Path, study, rng: np.random.Generator, cine: bool, flow: str | None) -> dict:
    """The study's cardiac MR series (cine stack, phase-contrast plane, 4-D flow) and their truth."""
    from imaging_tasks.cardiovascular import synth_cine, synth_flow

    truth = {}
    if cine:
        truth["cine"] = synth_cine.write_cine_series(folder, study, rng, series_number=3)
    if flow:
        truth["flow"] = {}
        if flow in ("pc", "both"):
            truth["flow"]["pc"] = synth_flow.write_pc_series(folder, study, rng, series_number=20)
        if flow in ("4d", "both"):
            truth["flow"]["flow4d"] = synth_flow.write_flow4d_series(folder, study, rng, series_number=30)
    return truth


# --------------------------------------------------------------------------- malformed-but-readable cases
# {case: (edit of a copy of a study written here, reason processing must give; None: must still process)}
MALFORMED = {
    "no_pixel_spacing": (lambda f: mf.edit(mf.ct_series(f), mf.remove(("PixelSpacing",))), "missing_pixel_spacing"),
    "zero_pixel_spacing": (lambda f: mf.edit(mf.ct_series(f), mf.put("PixelSpacing", ["0", "0"])),
                           "invalid_pixel_spacing"),
    "negative_pixel_spacing": (lambda f: mf.edit(mf.ct_series(f), mf.put("PixelSpacing", ["-0.75", "-0.75"])),
                               "invalid_pixel_spacing"),
    "nan_pixel_spacing": (lambda f: mf.edit(mf.ct_series(f), mf.put("PixelSpacing", ["nan", "nan"])),
                          "invalid_pixel_spacing"),
    "one_slice": (lambda f: mf.keep_slices(mf.ct_series(f), 1), "too_few_slices"),
    "two_slices": (lambda f: mf.keep_slices(mf.ct_series(f), 2), "too_few_slices"),
    "short_coverage": (lambda f: mf.keep_slices(mf.ct_series(f), 8), "insufficient_coverage"),
    "missing_slice": (lambda f: mf.drop_middle_slice(mf.ct_series(f)), "irregular_slices"),
    "duplicate_position": (lambda f: mf.duplicate_position(mf.ct_series(f)), "duplicate_slice_positions"),
    "no_position_on_a_slice": (lambda f: mf.missing_position_on_one_slice(mf.ct_series(f)), "missing_position"),
    "no_orientation": (lambda f: mf.edit(mf.ct_series(f), mf.remove(("ImageOrientationPatient",))),
                       "missing_orientation"),
    "tilted_slice": (lambda f: mf.tilt_one_slice(mf.ct_series(f)), "mixed_geometry"),
    "cropped_slice": (lambda f: mf.crop_one_slice(mf.ct_series(f)), "mixed_geometry"),
    "coronal": (lambda f: mf.make_coronal(mf.ct_series(f)), "not_axial"),
    "rgb": (lambda f: mf.to_rgb(mf.ct_series(f)), "unsupported_photometric"),
    "no_rescale": (lambda f: mf.edit(mf.ct_series(f), mf.remove(("RescaleSlope", "RescaleIntercept"))),
                   "missing_rescale"),
    "zero_rescale_slope": (lambda f: mf.edit(mf.ct_series(f), mf.put("RescaleSlope", "0")), "invalid_rescale"),
    # must still process, with the unedited study's scores
    "shuffled": (lambda f: mf.shuffle_instance_numbers(mf.ct_series(f)), None),
    "resent_instance": (lambda f: mf.duplicate_instance(mf.ct_series(f)), None),
    "no_rescale_slope": (lambda f: mf.edit(mf.ct_series(f), mf.remove(("RescaleSlope",))), None),
    "monochrome1": (lambda f: mf.relabel_monochrome1(mf.ct_series(f)), None),
}
