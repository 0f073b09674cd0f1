"""Coronary artery calcium scoring (Agatston, volume and mass scores) on non-contrast cardiac CT.

Conventions, chosen to match how the scores are defined and reported clinically:

* A calcified lesion is a 2-D, 8-connected region of >= ``threshold_hu`` (130 HU) voxels on one axial slice
  with area >= ``min_area_mm2`` (1 mm2).  Agatston scores each such region as area x density weight, the
  weight coming from the region's *peak* HU (130-199 -> 1, 200-299 -> 2, 300-399 -> 3, >= 400 -> 4).  The
  score is defined on 3 mm contiguous slices; other spacings are scaled by spacing/3 mm so totals stay
  comparable.
* Volume score: voxels of counted regions x voxel volume.  Mass score: calibration (mg HA per ml per HU,
  from a phantom) x HU x voxel volume, summed — the only one of the three that is comparable across
  scanners.
* 2-D regions touching across adjacent slices (26-connectivity) form one 3-D lesion; ``lesion_count``
  counts those, as a reader would.
* Scoring is restricted to a heart region of interest.  Clinically a reader clicks the coronary lesions;
  here :func:`heart_roi` takes the mediastinum between the lungs (convex hull of the lungs minus the lungs,
  small enclosed lung holes such as calcified granulomas included in the lungs) and removes bone, found as
  3-D dense structures larger than any coronary calcification (spine, sternum).  Aortic, valvular and
  annular calcium inside the mediastinum is *not* separated from coronary calcium: a known limitation of a
  geometric ROI, recorded in the output.

Preconditions (checked from headers before any pixel is read; :func:`check_inputs` has the why of each).
The study must hold a CT (``wrong_modality``) single-frame CT image series other than a scout
(``no_series``).  Of its series, the first (axial first, then thickness nearest 3 mm, then most slices) that
meets all of these is scored; if none does, the first one's reason is raised:

* grey-scale slices, MONOCHROME1 or MONOCHROME2 (``unsupported_photometric``);
* >= 3 slices (``too_few_slices``) covering >= 40 mm (``insufficient_coverage``, option ``min_coverage_mm``);
* PixelSpacing present (``missing_pixel_spacing``), finite and > 0 (``invalid_pixel_spacing``);
* ImageOrientationPatient (``missing_orientation``, ``invalid_orientation``), axial (``not_axial``);
* ImagePositionPatient (``missing_position``, ``invalid_position``);
* one geometry per series (``mixed_geometry``), distinct (``duplicate_slice_positions``) and evenly spaced
  (``irregular_slices``) positions; any file or instance order is fine (sorted along the slice normal);
* usable rescale (``invalid_rescale``, ``missing_rescale``); a missing RescaleSlope is taken as 1, a missing
  RescaleIntercept only when the pixels are visibly HU already (noted in ``lesions.json`` ``series``).

After loading: a contrast-enhanced scan is refused (``contrast_enhanced``).
"""
from __future__ import annotations

import json
import math
import pathlib
from collections import defaultdict

import numpy as np
from scipy import ndimage

from imaging_tasks.device import pick_device
from imaging_tasks.dicom_io import Volume
from imaging_tasks.errors import BadInput
from imaging_tasks.preconditions import Stack, check_spacing_values, check_stack, load_stack

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AGATSTON_SLICE_MM = 3.0
# mg hydroxyapatite per ml per HU: a 200 mg/ml HA insert reading 250 HU at 120 kVp.  Sites should pass their
# own phantom-measured value; results record the one used.
DEFAULT_CALIBRATION_MG_PER_HU_ML = 0.8
WEIGHT_BOUNDS_HU = (200.0, 300.0, 400.0)
IN_PLANE_8 = np.zeros((3, 3, 3), bool)
IN_PLANE_8[1] = True  # 8-connected within a slice, never across slices
FULL_26 = np.ones((3, 3, 3), bool)
MIN_SLICES = 3  # spacing measured between neighbours and seen to be regular: two gaps at least
MIN_COVERAGE_MM = 40.0  # half the craniocaudal extent of the smallest adult coronary tree
AXIAL_MIN_NORMAL_Z = 0.9  # |cos| of the slice normal with the patient z axis: within ~25 degrees
HU_AIR_BELOW = -500.0  # a chest CT in HU has air or lung below this; stored values offset by +1024 do not


def cac_category(agatston: float) -> str:
    """CAC-DRS Agatston category (0, A1 1-99, A2 100-299, A3 >= 300)."""
    if agatston <= 0:
        return "0"
    return "A1" if agatston < 100 else "A2" if agatston < 300 else "A3"


# --------------------------------------------------------------------------- scoring
def _score(volume_hu: np.ndarray, spacing_mm: tuple, *, threshold_hu: float, min_area_mm2: float,
           calibration_mg_per_hu_ml: float, roi, device) -> tuple[dict, np.ndarray]:
    import torch

    dev = pick_device(device)
    vol_np = np.asarray(volume_hu)
    if vol_np.ndim != 3:
        raise ValueError(f"volume_hu must be 3-D (z, y, x), got shape {vol_np.shape}")
    dz, dy, dx = check_spacing_values(spacing_mm, "calcium scoring")  # BadInput, not a ZeroDivisionError later
    pixel_mm2 = dy * dx
    voxel_mm3 = pixel_mm2 * dz
    slice_factor = dz / AGATSTON_SLICE_MM
    vol = torch.as_tensor(np.ascontiguousarray(vol_np, dtype=np.float32), device=dev)
    dense = vol >= threshold_hu
    if roi is not None:
        roi_np = np.asarray(roi, dtype=bool)
        if roi_np.shape != vol_np.shape:
            raise ValueError(f"roi shape {roi_np.shape} does not match volume shape {vol_np.shape}")
        dense &= torch.as_tensor(roi_np, device=dev)
    params = {"threshold_hu": float(threshold_hu), "min_area_mm2": float(min_area_mm2),
              "calibration_mg_per_hu_ml": float(calibration_mg_per_hu_ml), "spacing_mm": [dz, dy, dx],
              "slice_factor": slice_factor, "connectivity_2d": 8, "connectivity_3d": 26}
    empty = {"agatston": 0.0, "volume_mm3": 0.0, "mass_mg": 0.0, "lesion_count": 0, "lesion_slice_count": 0,
             "category": cac_category(0.0), "lesions": [], "params": params}
    labels2d, n = ndimage.label(dense.cpu().numpy(), structure=IN_PLANE_8)
    if n == 0:
        return empty, np.zeros(vol_np.shape, np.int32)

    # Per-region statistics in one pass on the device: pixel count, peak and summed HU, centroid.
    lab = torch.as_tensor(labels2d, device=dev).reshape(-1).long()
    pos = torch.nonzero(lab).squeeze(1)
    idx = lab[pos]
    hu = vol.reshape(-1)[pos]
    ny, nx = vol_np.shape[1], vol_np.shape[2]
    zyx = torch.stack([pos // (ny * nx), (pos // nx) % ny, pos % nx], dim=1).double()
    counts = torch.bincount(idx, minlength=n + 1)
    peak = torch.full((n + 1,), -math.inf, device=dev).scatter_reduce(0, idx, hu, "amax")
    sum_hu = torch.zeros(n + 1, dtype=torch.float64, device=dev).index_add_(0, idx, hu.double())
    sum_zyx = torch.zeros((n + 1, 3), dtype=torch.float64, device=dev).index_add_(0, idx, zyx)
    weight = 1 + sum((peak >= b).long() for b in WEIGHT_BOUNDS_HU)
    # Area is pixel count x pixel area, compared with a tiny tolerance so 1 mm2 exactly stays in.
    keep = (counts.double() * pixel_mm2 >= min_area_mm2 - 1e-9)
    keep[0] = False
    kept_ids = torch.nonzero(keep).squeeze(1)
    if kept_ids.numel() == 0:
        return empty, np.zeros(vol_np.shape, np.int32)

    kept_mask = keep[torch.as_tensor(labels2d, device=dev).long()].cpu().numpy()
    labels3d, n3 = ndimage.label(kept_mask, structure=FULL_26)
    lab3 = torch.as_tensor(labels3d, device=dev).reshape(-1).long()[pos]
    lesion_of = torch.zeros(n + 1, dtype=torch.long, device=dev).scatter_reduce(0, idx, lab3, "amax")

    rows = []
    stats = zip(kept_ids.tolist(), counts[kept_ids].tolist(), peak[kept_ids].tolist(), sum_hu[kept_ids].tolist(),
                sum_zyx[kept_ids].tolist(), weight[kept_ids].tolist(), lesion_of[kept_ids].tolist())
    for region, cnt, pk, shu, szyx, w, les in stats:
        area = cnt * pixel_mm2
        cz, cy, cx = (v / cnt for v in szyx)
        rows.append({"region": int(region), "lesion_id": int(les), "slice_index": int(round(cz)),
                     "area_mm2": area, "peak_hu": float(pk), "mean_hu": shu / cnt, "weight": int(w),
                     "agatston": area * w * slice_factor, "volume_mm3": cnt * voxel_mm3,
                     "mass_mg": calibration_mg_per_hu_ml * shu * voxel_mm3 / 1000.0,
                     "centroid_mm": [cz * dz, cy * dy, cx * dx]})
    rows.sort(key=lambda r: (r["slice_index"], r["centroid_mm"][1], r["centroid_mm"][2]))
    for i, r in enumerate(rows):
        r["index"] = i
    result = {"agatston": sum(r["agatston"] for r in rows), "volume_mm3": sum(r["volume_mm3"] for r in rows),
              "mass_mg": sum(r["mass_mg"] for r in rows), "lesion_count": int(n3), "lesion_slice_count": len(rows),
              "lesions": rows, "params": params}
    result["category"] = cac_category(result["agatston"])
    return result, labels3d


def calcium_score(volume_hu: np.ndarray, spacing_mm: tuple, *, threshold_hu: float = 130.0,
                  min_area_mm2: float = 1.0,
                  calibration_mg_per_hu_ml: float = DEFAULT_CALIBRATION_MG_PER_HU_ML,
                  roi: np.ndarray | None = None, device: str | None = None) -> dict:
    """Agatston, volume (mm3) and mass (mg) scores of a (z, y, x) HU volume with ``spacing_mm`` (z, y, x).

    Returns totals, ``lesion_count`` (3-D lesions), ``lesion_slice_count`` (scored 2-D regions), the CAC-DRS
    ``category`` and ``lesions``: one row per scored 2-D region with ``slice_index``, ``area_mm2``,
    ``peak_hu``, ``weight``, ``agatston``, ``volume_mm3``, ``mass_mg``, ``centroid_mm`` (z, y, x from the
    first voxel) and the ``lesion_id`` of the 3-D lesion it belongs to.  ``roi`` (bool, same shape) limits
    scoring to the heart; without it every dense voxel counts, bone included.
    """
    result, _ = _score(volume_hu, spacing_mm, threshold_hu=threshold_hu, min_area_mm2=min_area_mm2,
                       calibration_mg_per_hu_ml=calibration_mg_per_hu_ml, roi=roi, device=device)
    return result


# --------------------------------------------------------------------------- region of interest
def heart_roi(volume_hu: np.ndarray, spacing_mm: tuple, *, threshold_hu: float = 130.0,
              lung_hu: float = -400.0, bone_min_volume_mm3: float = 5000.0, bone_margin_mm: float = 2.0,
              max_lung_hole_mm2: float = 400.0) -> tuple[np.ndarray, dict]:
    """The mediastinum between the lungs, bone removed; returns (bool mask, description).

    Why geometric: no heart segmentation model may be downloaded here, and the lungs bound the heart on
    every axial slice that matters.  Bone is told from coronary calcium by size: spine and sternum are
    dense structures of many cm3, coronary calcifications rarely exceed 1 cm3.  Lung holes up to
    ``max_lung_hole_mm2`` (granulomas, vessels) belong to the lung; larger enclosed regions (a mediastinum
    encircled by touching lungs) do not.  When no lungs are found (a FOV cropped inside the chest wall)
    the ROI falls back to "everything but bone", and says so.
    """
    from skimage.morphology import convex_hull_image

    vol = np.asarray(volume_hu)
    dz, dy, dx = check_spacing_values(spacing_mm, "heart region of interest")
    air = vol < lung_hu
    lungs = np.zeros_like(air)
    max_hole_px = max_lung_hole_mm2 / (dy * dx)
    for k in range(vol.shape[0]):
        lab, n = ndimage.label(air[k], structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        inside = ~np.isin(lab, border) & (lab > 0)  # air not connected to the outside: lungs, airways
        holes = ndimage.binary_fill_holes(inside) & ~inside
        hl, hn = ndimage.label(holes)
        if hn:
            sizes = np.bincount(hl.ravel(), minlength=hn + 1)
            small = sizes <= max_hole_px
            small[0] = False
            inside |= small[hl]
        lungs[k] = inside
    dense = vol >= threshold_hu
    lab3, n3 = ndimage.label(dense, structure=FULL_26)
    bone = np.zeros_like(dense)
    if n3:
        vols = np.bincount(lab3.ravel(), minlength=n3 + 1) * (dz * dy * dx)
        big = vols >= bone_min_volume_mm3
        big[0] = False
        bone = big[lab3]
        r = max(1, int(math.ceil(bone_margin_mm / min(dy, dx))))
        disk = np.zeros((1, 2 * r + 1, 2 * r + 1), bool)
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disk[0] = (yy * dy) ** 2 + (xx * dx) ** 2 <= bone_margin_mm ** 2 + 1e-9
        bone = ndimage.binary_dilation(bone, structure=disk)
    lung_any = lungs.any(axis=0)
    if lung_any.sum() * dy * dx < 500.0:
        method = "bone_excluded_only"
        mediastinum = np.ones_like(dense)
    else:
        method = "lung_hull_minus_lungs_minus_bone"
        # Eroded so the hull's pixel-thin rim lateral to each lung (ribs, chest wall) stays out.
        hull = ndimage.binary_erosion(convex_hull_image(lung_any), iterations=max(1, round(1.5 / min(dy, dx))))
        mediastinum = hull[None] & ~lungs
    roi = mediastinum & ~bone
    voxel_ml = dz * dy * dx / 1000.0
    info = {"method": method, "roi_volume_ml": float(roi.sum() * voxel_ml),
            "bone_volume_ml": float(bone.sum() * voxel_ml),
            # Share of the mediastinum (bone included) at or above the threshold; high on contrast scans.
            "dense_fraction": float(dense[mediastinum].mean()) if mediastinum.any() else 0.0,
            "limitation": "aortic and valvular calcium inside the mediastinum is counted with coronary calcium"}
    return roi, info


# --------------------------------------------------------------------------- DICOM study handling
def _candidate_series(files: list[pathlib.Path]) -> tuple[list[list[tuple]], set[str]]:
    """Single-frame CT image series of the study (localizers left out), as ``(path, header)`` lists."""
    from imaging_tasks.dicom_io import read_header

    if not files:
        raise BadInput("no_series", "the study has no files; send the axial calcium-scoring CT series")
    series: dict[str, list] = defaultdict(list)
    modalities = set()
    for path in files:
        with open(path, "rb") as fh:
            ds = read_header(fh)  # BadInput (not_dicom, unreadable_dicom, ...) for unusable files
        modality = str(ds.get("Modality", "") or "")
        modalities.add(modality or "?")
        if modality != "CT" or str(ds.get("SOPClassUID", "")) != CT_IMAGE_STORAGE:
            continue  # enhanced (multi-frame) CT and non-image objects (dose reports) are not scored
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if "LOCALIZER" in image_type:
            continue
        series[str(ds.SeriesInstanceUID)].append((path, ds))
    return list(series.values()), modalities


def _axial_rank(ds) -> int:
    """0 axial, 1 orientation unknown (missing or garbled), 2 not axial: the order series are tried in."""
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        normal = np.cross(iop[:3], iop[3:])
    except (AttributeError, ValueError, TypeError):
        return 1
    if len(iop) != 6 or not np.all(np.isfinite(normal)):
        return 1
    return 0 if abs(normal[2]) >= AXIAL_MIN_NORMAL_Z else 2


def check_inputs(items: list[tuple], *, min_coverage_mm: float = MIN_COVERAGE_MM) -> Stack:
    """Preconditions of calcium scoring on one CT series, from headers only; returns it sorted and measured.

    ``items`` are ``(path, header)`` pairs of one single-frame CT image series (CT Image Storage, not a
    localizer), in any order.  Each violation raises BadInput with the reason code in brackets:

    1. Single-frame grey-scale slices: SamplesPerPixel 1 and PhotometricInterpretation MONOCHROME1 or
       MONOCHROME2 [``unsupported_photometric``]; for CT the Hounsfield units come from the rescale, the
       photometric interpretation only says how to display them, so MONOCHROME1 needs no inversion.
    2. At least :data:`MIN_SLICES` (3) distinct instances [``too_few_slices``]: the slice spacing, which scales
       the score to the 3 mm convention and links lesions across slices into 3-D lesions, is measured from
       neighbouring positions and must be seen to be regular (two gaps at least).
    3. PixelSpacing on every slice [``missing_pixel_spacing``], two finite numbers > 0
       [``invalid_pixel_spacing``]: lesion areas (the 1 mm2 rule, the score itself) are in mm2.  No fallback:
       ReconstructionDiameter / Columns is not guaranteed to equal it.
    4. ImageOrientationPatient [``missing_orientation``, ``invalid_orientation``] with an axial slice normal
       (within ~25 degrees of the patient z axis, gantry tilt included) [``not_axial``]: Agatston is defined
       on axial slices.
    5. ImagePositionPatient on every slice [``missing_position``, ``invalid_position``].
    6. One geometry for all slices: orientation, pixel spacing, Rows/Columns, positions on one line
       [``mixed_geometry``].
    7. Distinct positions [``duplicate_slice_positions``], evenly spaced [``irregular_slices``].  Files and
       instance numbers in any order are fine: slices are sorted along the normal.  A second copy of the same
       instance (same SOPInstanceUID) is ignored.
    8. Coverage (slices x spacing) >= ``min_coverage_mm`` (:data:`MIN_COVERAGE_MM`, 40 mm)
       [``insufficient_coverage``]: the coronary tree spans >= ~80 mm craniocaudally in adults; a scan
       covering less than half of that cannot hold it, and its total score would be a silent underestimate.
    9. RescaleSlope / RescaleIntercept (Type 1 for CT): zero slope or non-numbers [``invalid_rescale``].  A
       missing slope is taken as 1 (what CT scanners write), and noted.  A missing intercept is accepted only
       when the stored values are already Hounsfield units (checked on the pixels by :func:`load_volume`:
       air or lung below -500 HU present), else [``missing_rescale``]; missing on some slices only is
       always [``missing_rescale``].
    """
    stack = check_stack(items, what="the CT series", min_slices=MIN_SLICES, too_few_reason="too_few_slices",
                        too_few_why="the slice spacing that scales the Agatston score and links lesions across "
                                    "slices is measured between neighbouring slices and must be seen to be "
                                    "regular; send the complete axial calcium-scoring series")
    if abs(stack.normal[2]) < AXIAL_MIN_NORMAL_Z:
        raise BadInput("not_axial", "the CT series is not axial (slice normal more than ~25 degrees from the "
                       "patient's head-foot axis); Agatston scoring is defined on axial slices; send the axial "
                       "calcium-scoring series, not a reformat")
    if stack.coverage_mm < min_coverage_mm:
        raise BadInput("insufficient_coverage", f"the CT series covers {stack.coverage_mm:.0f} mm along the body "
                       f"axis ({stack.n_slices} slices of {stack.spacing_mm[0]:g} mm); calcium scoring needs at "
                       f"least {min_coverage_mm:g} mm (the coronary tree spans ~80 mm or more), otherwise the "
                       "total is an underestimate; send the whole-heart series")
    missing_intercept = sum(i is None for _s, i in stack.rescale)
    if 0 < missing_intercept < stack.n_slices:
        raise BadInput("missing_rescale", f"RescaleIntercept is missing on {missing_intercept} of "
                       f"{stack.n_slices} CT slices, so Hounsfield units differ between slices; re-export the "
                       "series")
    missing_slope = sum(s is None and i is not None for s, i in stack.rescale)
    if missing_slope:
        stack.notes.append(f"RescaleSlope absent on {missing_slope} slice(s): 1 assumed (what CT scanners write)")
    return stack


def load_volume(stack: Stack) -> Volume:
    """Hounsfield-unit volume of a checked series (see :func:`check_inputs`, item 9, for the rescale)."""
    values = [(1.0 if s is None else s, 0.0 if i is None else i) for s, i in stack.rescale]
    volume = load_stack(stack, values, "the CT series")
    if all(i is None for _s, i in stack.rescale):
        low = float(np.percentile(volume.array, 1))
        if low > HU_AIR_BELOW:
            raise BadInput("missing_rescale", "the CT series has no RescaleIntercept and its stored values are "
                           f"not Hounsfield units (no air or lung below {HU_AIR_BELOW:g}); calcium cannot be "
                           "thresholded at 130 HU; re-export the series with its rescale attributes")
        stack.notes.append("RescaleIntercept absent: stored values taken as HU (air/lung present below "
                           f"{HU_AIR_BELOW:g})")
    return volume


def _pick_series(files: list[pathlib.Path], *, min_coverage_mm: float = MIN_COVERAGE_MM) -> tuple[Stack, dict]:
    """The axial CT series to score, checked: axial first, then thickness nearest 3 mm, then most slices.

    A series that fails :func:`check_inputs` is passed over for the next one; when none passes, the first
    one's reason is raised.
    """
    candidates, modalities = _candidate_series(files)
    if not candidates:
        if "CT" not in modalities:
            raise BadInput("wrong_modality", f"calcium scoring needs a non-contrast cardiac CT, got modality "
                           f"{'/'.join(sorted(modalities))}; route this study to its own pipeline")
        raise BadInput("no_series", "no single-frame CT image series in the study (only scouts or enhanced "
                       "multi-frame CT); send the 3 mm axial calcium-scoring series")

    def thickness(items) -> float:
        try:
            return float(items[0][1].get("SliceThickness", 0) or 0)
        except (ValueError, TypeError):
            return 0.0

    ranked = sorted(candidates, key=lambda items: (_axial_rank(items[0][1]),
                                                   abs(thickness(items) - AGATSTON_SLICE_MM), -len(items)))
    first_error, passed_over = None, []
    for items in ranked:
        try:
            stack = check_inputs(items, min_coverage_mm=min_coverage_mm)
        except BadInput as exc:
            first_error = first_error or exc
            passed_over.append(exc.reason)
            continue
        info = {"n_series_axial_ct": sum(_axial_rank(c[0][1]) == 0 for c in candidates),
                "slice_thickness_mm": thickness(items), "series_passed_over": passed_over,
                "preconditions": stack.notes}
        return stack, info
    raise first_error


def _qc_png(path: pathlib.Path, vol: np.ndarray, roi: np.ndarray, labels3d: np.ndarray, lesions: list[dict]) -> None:
    """Axial MIP with scored lesions coloured by Agatston weight and boxed with their lesion id."""
    from PIL import Image, ImageDraw

    mip = vol.max(axis=0)
    gray = (np.clip((mip + 200.0) / 1200.0, 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    roi2d = roi.any(axis=0)
    edge = roi2d & ~ndimage.binary_erosion(roi2d)
    rgb[edge] = (0, 170, 255)
    colours = {1: (255, 255, 0), 2: (255, 165, 0), 3: (255, 64, 0), 4: (255, 0, 255)}
    weight_map = np.zeros(labels3d.shape[1:], np.int8)
    boxes = {}
    for les in lesions:
        z = les["slice_index"]
        on_slice = labels3d[z] == les["lesion_id"]
        weight_map[on_slice] = np.maximum(weight_map[on_slice], les["weight"])
    for w, colour in colours.items():
        rgb[weight_map == w] = colour
    for obj_id, sl in enumerate(ndimage.find_objects(labels3d), start=1):
        if sl is not None:
            boxes[obj_id] = (sl[2].start, sl[1].start, sl[2].stop, sl[1].stop)
    scale = max(1, int(round(512 / max(gray.shape))))
    img = Image.fromarray(rgb).resize((gray.shape[1] * scale, gray.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for obj_id, (x0, y0, x1, y1) in boxes.items():
        box = (x0 * scale - 3, y0 * scale - 3, x1 * scale + 2, y1 * scale + 2)
        draw.rectangle(box, outline=(0, 255, 0))
        draw.text((box[2] + 2, box[1] - 2), str(obj_id), fill=(0, 255, 0))
    draw.text((4, 4), "MIP; weight 1 yellow, 2 orange, 3 red, 4 magenta; ROI cyan", fill=(255, 255, 255))
    img.save(path)


def process_study(files: list[pathlib.Path], out_dir: pathlib.Path, *, device: str | None = None,
                  roi: str = "auto", threshold_hu: float = 130.0, min_area_mm2: float = 1.0,
                  calibration_mg_per_hu_ml: float = DEFAULT_CALIBRATION_MG_PER_HU_ML,
                  bone_min_volume_mm3: float = 5000.0, max_dense_fraction: float = 0.3,
                  min_coverage_mm: float = MIN_COVERAGE_MM) -> dict:
    """Score the study's axial calcium-scoring CT series; writes lesions.json and qc_calcium.png.

    ``roi="auto"`` scores inside :func:`heart_roi`; ``roi="none"`` scores the whole volume (for phantoms).
    A contrast-enhanced scan is refused: its blood pool is above 130 HU, so Agatston scoring is invalid.
    That is judged from the image (share of the ROI at or above the threshold exceeding
    ``max_dense_fraction``), because de-identification may blank the contrast header.
    Inputs are checked first (:func:`check_inputs`); anything unusable raises BadInput with its reason.
    """
    if roi not in ("auto", "none"):
        raise ValueError("roi must be 'auto' or 'none'")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    stack, series_info = _pick_series([pathlib.Path(f) for f in files], min_coverage_mm=min_coverage_mm)
    volume = load_volume(stack)  # may add a note to series_info["preconditions"] (the same list)
    vol = volume.array
    if roi == "auto":
        mask, roi_info = heart_roi(vol, volume.spacing_mm, threshold_hu=threshold_hu,
                                   bone_min_volume_mm3=bone_min_volume_mm3)
        if roi_info["method"] != "bone_excluded_only" and roi_info["dense_fraction"] > max_dense_fraction:
            raise BadInput("contrast_enhanced", f"{roi_info['dense_fraction']:.0%} of the mediastinum is >= "
                           f"{threshold_hu:g} HU: this looks like a contrast-enhanced scan, on which calcium "
                           "scores are invalid; send the non-contrast calcium-scoring series")
    else:
        mask, roi_info = None, {"method": "none"}
    result, labels3d = _score(vol, volume.spacing_mm, threshold_hu=threshold_hu, min_area_mm2=min_area_mm2,
                              calibration_mg_per_hu_ml=calibration_mg_per_hu_ml, roi=mask, device=device)

    # Patient coordinates of each region's centroid, for findings that survive resampling and reordering.
    direction = np.array(volume.direction).reshape(3, 3)
    origin = np.array(volume.origin_mm)
    for r in result["lesions"]:
        cz, cy, cx = r["centroid_mm"]
        r["centroid_patient_mm"] = (origin + direction @ np.array([cx, cy, cz])).round(3).tolist()
    by_lesion: dict[int, list[dict]] = defaultdict(list)
    for r in result["lesions"]:
        by_lesion[r["lesion_id"]].append(r)
    lesions_3d = []
    for les_id in sorted(by_lesion):
        regs = by_lesion[les_id]
        vol_mm3 = sum(r["volume_mm3"] for r in regs)
        centre = np.sum([np.array(r["centroid_patient_mm"]) * r["volume_mm3"] for r in regs], axis=0) / vol_mm3
        lesions_3d.append({"kind": "calcified_lesion", "index": les_id, "agatston": sum(r["agatston"] for r in regs),
                           "volume_mm3": vol_mm3, "mass_mg": sum(r["mass_mg"] for r in regs),
                           "peak_hu": max(r["peak_hu"] for r in regs), "weight": max(r["weight"] for r in regs),
                           "slices": len(regs), "max_area_mm2": max(r["area_mm2"] for r in regs),
                           "centroid_patient_mm": centre.round(3).tolist()})

    table = {"totals": {k: result[k] for k in ("agatston", "volume_mm3", "mass_mg", "lesion_count",
                                               "lesion_slice_count", "category")},
             "params": result["params"], "roi": roi_info, "series": series_info,
             "n_slices": int(vol.shape[0]), "lesions_3d": lesions_3d, "lesions_2d": result["lesions"]}
    (out_dir / "lesions.json").write_text(json.dumps(table, indent=1))
    qc_mask = mask if mask is not None else np.ones(vol.shape, bool)
    _qc_png(out_dir / "qc_calcium.png", vol, qc_mask, labels3d, result["lesions"])

    dz = volume.spacing_mm[0]
    metrics = [
        {"name": "agatston_score", "value": float(result["agatston"]), "unit": ""},
        {"name": "calcium_volume_mm3", "value": float(result["volume_mm3"]), "unit": "mm3"},
        {"name": "calcium_mass_mg", "value": float(result["mass_mg"]), "unit": "mg"},
        {"name": "lesion_count", "value": float(result["lesion_count"]), "unit": ""},
        {"name": "lesion_slice_count", "value": float(result["lesion_slice_count"]), "unit": ""},
        {"name": "slice_spacing_mm", "value": float(dz), "unit": "mm"},
    ]
    return {"metrics": metrics, "findings": lesions_3d, "outputs": ["lesions.json", "qc_calcium.png"],
            "device": str(dev)}


def calcium_scoring(files: list[pathlib.Path], out_dir: pathlib.Path, *, device: str | None = None,
                    previous: dict | None = None, **options) -> dict:
    """The chain's calcium step: :func:`process_study` on a study that holds a calcium-scoring CT series
    (``series.route_series`` kind ``calcium_ct``); an MR-only study passes with no numbers."""
    from imaging_tasks.cardiovascular.series import of_kind

    if not of_kind([pathlib.Path(f) for f in files], "calcium_ct"):
        return {"metrics": [], "findings": [], "outputs": [], "note": "no calcium-scoring CT series"}
    import inspect

    accepted = inspect.signature(process_study).parameters  # the chain passes every option; take ours
    return process_study(files, out_dir, device=device, **{k: v for k, v in options.items() if k in accepted})
