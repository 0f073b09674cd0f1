"""Micro-calcification detection and clustering on screening mammograms (MG "for presentation").

Why this shape: a micro-calcification is a sub-millimetre spot brighter than its surroundings, while the
fibroglandular background varies on scales of millimetres and its noise level depends on the local
density (fewer photons behind dense tissue).  So the detector is a difference of Gaussians tuned to the
spot size (the background subtracted with a mask-normalised Gaussian so the air outside does not leak
in), divided by a *local* robust noise estimate; spots are accepted at ``k_sigma`` local standard
deviations and a size/shape test drops structures that are too large or linear (vessel and gland edges).

Clustering follows the classic CAD rule: a cluster is >= 3 calcifications within 1 cm^2, made
operational as DBSCAN with ``radius_mm`` = 5.64 mm (the radius of a 1 cm^2 disc) and ``min_count`` = 3:
a calcification with >= 3 calcifications (itself included) within that disc is a core, cores within the
radius of each other join, and other calcifications within the radius of a core join its cluster.
``min_count=5`` gives the BI-RADS 5th-edition "grouped" threshold instead.  Isolated specks and pairs
are never clusters.

Coordinates: ``*_xy_px`` are (column, row) of the stored pixel grid, ``*_xy_mm`` the same times the pixel
spacing (PixelSpacing when the image is calibrated, else ImagerPixelSpacing, i.e. the detector plane).

Preconditions (checked on every "for presentation" MG image's header before any pixel is decoded; one
unusable image refuses the study, so a screening exam is never reported on a subset of its views;
:func:`check_inputs` has the why of each):

* the study holds MG images (``wrong_modality``), "for presentation" ones (``for_processing_only``);
* single-frame (``unsupported_frames``), grey-scale: MONOCHROME2, or MONOCHROME1 which is *inverted*
  (brighter = denser for the detector), never refused; RGB/YBR/PALETTE refused (``unsupported_photometric``);
* PixelSpacing or ImagerPixelSpacing present (``missing_pixel_spacing``), finite and > 0
  (``invalid_pixel_spacing``; an invalid PixelSpacing falls back to a valid ImagerPixelSpacing, noted),
  square (``anisotropic_pixels``);
* at least 64 x 64 pixels and 20 x 20 mm (``image_too_small``);
* RescaleSlope/Intercept usable where present (``invalid_rescale``; absent means identity);
* after decoding: not a blank (constant) image (``blank_image``).
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from imaging_tasks.device import pick_device
from imaging_tasks.dicom_io import read_full, read_header
from imaging_tasks.errors import BadInput
from imaging_tasks.preconditions import (check_photometric, check_single_frame, check_spacing_values, image_size,
                                         pixel_spacing, rescale, stored_range)

MG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2": "FOR PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "FOR PROCESSING",
}
CLUSTER_RADIUS_MM = math.sqrt(100.0 / math.pi)  # a disc of 1 cm^2
CLUSTER_MIN_COUNT = 3
# Smallest image worth looking at: a cluster disc (11.3 mm) inside the 3 mm skin rim needs ~17 mm; anything
# under 20 mm or 64 px a side is an icon, thumbnail or crop, not a mammogram (even a spot view is > 40 mm).
MIN_SIDE_MM, MIN_SIDE_PX = 20.0, 64


# -------------------------------------------------------------------------------------------- detection

def _gauss1d(sigma_px: float, torch, device):
    radius = max(1, int(math.ceil(3.5 * sigma_px)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    return k / k.sum()


def _blur(t, sigma_px: float):
    """Separable Gaussian on a (1, 1, H, W) tensor, reflecting at the image border."""
    import torch
    import torch.nn.functional as F

    k = _gauss1d(sigma_px, torch, t.device)
    r = (k.numel() - 1) // 2
    h, w = t.shape[-2:]
    if r >= min(h, w):  # reflect padding needs r < size; replicate is fine for such tiny images
        t = F.pad(t, (r, r, 0, 0), mode="replicate")
    else:
        t = F.pad(t, (r, r, 0, 0), mode="reflect")
    t = F.conv2d(t, k.view(1, 1, 1, -1))
    t = F.pad(t, (0, 0, r, r), mode="replicate" if r >= min(h, w) else "reflect")
    return F.conv2d(t, k.view(1, 1, -1, 1))


def breast_mask(image: np.ndarray) -> np.ndarray:
    """The breast (and pectoral muscle) against the air: Otsu threshold, largest component, holes filled."""
    from skimage.filters import threshold_otsu

    step = max(1, int(max(image.shape) // 512))
    small = image[::step, ::step]
    if float(small.max()) <= float(small.min()):
        return np.zeros(image.shape, dtype=bool)
    thr = threshold_otsu(small)
    # The air is nearly uniform; halfway between it and the Otsu level keeps the thin periphery.
    air = float(np.median(small[small < thr])) if np.any(small < thr) else float(small.min())
    fg = image > (air + 0.5 * (thr - air))
    labels, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))


def detect_calcifications(image: np.ndarray, pixel_spacing_mm: float, *, device=None, mask: np.ndarray | None = None,
                          k_sigma: float = 5.0, k_low: float = 3.0, spot_sigma_mm: float = 0.075,
                          background_sigma_mm: float = 0.3, rim_mm: float = 3.0, max_area_mm2: float = 0.5,
                          max_elongation: float = 4.0, detector_blur_mm: float = 0.05) -> list[dict]:
    """Candidate micro-calcifications in a MONOCHROME2 mammogram (brighter = denser).

    ``k_sigma`` is the acceptance threshold in local noise standard deviations of the DoG response for a
    point-like spot; the spot extent is where the response is at least half its local peak.  A calcium
    spot's peak contrast grows with its diameter, while the tissue texture that survives the filter gives
    broad, faint bumps; so a spot larger than the footprint of a point (system blur + filter) must reach
    ``k_sigma * sqrt(area / point_area)``.  The ``rim_mm`` under the skin line is skipped: the skin/air
    step dominates the response there, and specks in it are dermal.
    Returns dicts with ``centre_xy_px``, ``centre_xy_mm``, ``area_mm2``, ``diameter_mm`` (equivalent
    circle), ``contrast`` (peak above local background, stored pixel units), ``snr`` and ``score`` (the largest
    ``k_sigma`` at which the spot is still accepted).
    """
    import torch
    import torch.nn.functional as F

    dev = pick_device(device) if not isinstance(device, torch.device) else device
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    (sp,) = check_spacing_values([pixel_spacing_mm], "calcification detection")
    breast = breast_mask(img) if mask is None else np.asarray(mask, dtype=bool)
    interior = ndimage.distance_transform_edt(breast) * sp > rim_mm
    if not interior.any():
        return []
    t = torch.from_numpy(img).to(dev)[None, None]
    m = torch.from_numpy(breast.astype(np.float32)).to(dev)[None, None]
    inner = torch.from_numpy(interior).to(dev)[None, None]
    spot = _blur(t, max(0.6, spot_sigma_mm / sp))
    # Mask-normalised background so the black air outside the breast does not pull it down.
    bg = _blur(t * m, background_sigma_mm / sp) / _blur(m, background_sigma_mm / sp).clamp_min(1e-3)
    resp = spot - bg
    # Noise: robust global sigma to clip outliers, then a local RMS over ~2 mm blocks smoothed over ~6 mm.
    vals = resp[inner]
    med = vals.median()
    sigma_g = 1.4826 * (vals - med).abs().median().clamp_min(1e-6)
    clipped = ((resp - med).clamp(-3 * sigma_g, 3 * sigma_g) ** 2) * inner
    block = max(2, int(round(2.0 / sp)))
    h, w = img.shape
    ph, pw = (-h) % block, (-w) % block
    num = F.avg_pool2d(F.pad(clipped, (0, pw, 0, ph)), block)
    den = F.avg_pool2d(F.pad(inner.float(), (0, pw, 0, ph)), block)
    num, den = _blur(num, 1.5), _blur(den, 1.5)
    var = num / den.clamp_min(1e-3)
    var = torch.where(den > 1e-3, var, torch.full_like(var, float(sigma_g**2)))
    var = F.interpolate(var, scale_factor=block, mode="bilinear", align_corners=False)[..., :h, :w]
    # 0.995: the share of a Gaussian's variance that survives clamping at +-3 sigma.
    sigma_local = (var / 0.995).sqrt().clamp_min(float(sigma_g) * 0.25)
    resp = resp - med
    z = resp / sigma_local
    # Spot extent: above k_low and at least half the brightest response within ~0.3 mm.
    win = 2 * max(1, int(round(0.25 / sp))) + 1
    local_max = F.max_pool2d(resp, win, stride=1, padding=win // 2)
    core = (z > k_low) & (resp >= 0.5 * local_max) & inner
    core_np = core[0, 0].cpu().numpy()
    z_np = z[0, 0].cpu().numpy()
    resp_np = resp[0, 0].cpu().numpy()
    labels, n = ndimage.label(core_np, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    # Per-spot statistics over the few labelled pixels only (bincount, not whole-image passes).
    rr, cc = np.nonzero(labels)
    lab = labels[rr, cc] - 1
    zv, rv = z_np[rr, cc], resp_np[rr, cc]
    area_px = np.bincount(lab, minlength=n).astype(float)
    peak_z = np.full(n, -np.inf)
    np.maximum.at(peak_z, lab, zv)
    peak_c = np.full(n, -np.inf)
    np.maximum.at(peak_c, lab, rv)
    wv = np.clip(rv, 1e-6, None)
    wsum = np.bincount(lab, wv, n)
    cy, cx = np.bincount(lab, wv * rr, n) / wsum, np.bincount(lab, wv * cc, n) / wsum
    # Second moments for elongation: vessels and gland edges give line-like spots.
    my, mx = np.bincount(lab, rr, n) / area_px, np.bincount(lab, cc, n) / area_px
    dy, dx = rr - my[lab], cc - mx[lab]
    syy = np.bincount(lab, dy * dy, n) / area_px + 1 / 12
    sxx = np.bincount(lab, dx * dx, n) / area_px + 1 / 12
    sxy = np.bincount(lab, dx * dy, n) / area_px
    tr, det = sxx + syy, sxx * syy - sxy * sxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    elong = np.sqrt((tr / 2 + disc) / np.maximum(tr / 2 - disc, 1e-6))
    # Half-maximum area of a blurred point: 2*pi*ln2*sigma^2 (1.5x margin) with sigma from filter,
    # pixel and detector blur.
    point_area = 1.5 * 2 * math.pi * math.log(2) * (max(0.6 * sp, spot_sigma_mm) ** 2 + sp * sp / 12
                                                   + detector_blur_mm**2)
    area_mm2 = area_px * sp * sp
    needed = k_sigma * np.sqrt(np.maximum(area_mm2 / point_area, 1.0))
    keep = (peak_z >= needed) & (area_mm2 <= max_area_mm2) & (elong <= max_elongation)
    out = []
    for j in np.nonzero(keep)[0]:
        area_mm2 = float(area_px[j]) * sp * sp
        out.append({
            "index": len(out),
            "centre_xy_px": [round(float(cx[j]), 3), round(float(cy[j]), 3)],
            "centre_xy_mm": [round(float(cx[j]) * sp, 4), round(float(cy[j]) * sp, 4)],
            "area_mm2": round(area_mm2, 5),
            "diameter_mm": round(2.0 * math.sqrt(area_mm2 / math.pi), 4),
            "contrast": round(float(peak_c[j]), 3),
            "snr": round(float(peak_z[j]), 2),
            # the largest k_sigma that still accepts this spot: thresholding ``score`` at t keeps exactly what
            # detection at k_sigma = t keeps (the FROC sweep in mammography.froc relies on it)
            "score": float(peak_z[j] / math.sqrt(max(float(area_px[j]) * sp * sp / point_area, 1.0))),
            "elongation": round(float(elong[j]), 3),
        })
    return out


# ------------------------------------------------------------------------------------------- clustering

def cluster_calcifications(cands: list[dict], *, radius_mm: float = CLUSTER_RADIUS_MM,
                           min_count: int = CLUSTER_MIN_COUNT) -> list[dict]:
    """Group candidates into clusters: >= ``min_count`` within a disc of ``radius_mm`` (DBSCAN).

    The default (3 within 5.64 mm, i.e. 1 cm^2) is the classic CAD cluster definition.  Each cluster gives
    its member indices (into ``cands``), centroid, ``radius_mm`` (largest member distance from the centroid)
    and ``extent_mm`` (largest member-to-member distance).
    """
    if len(cands) < min_count:
        return []
    pts = np.array([c["centre_xy_mm"] for c in cands], dtype=float)
    tree = cKDTree(pts)
    nbrs = tree.query_ball_point(pts, r=radius_mm)
    core = np.array([len(nb) >= min_count for nb in nbrs])
    parent = list(range(len(pts)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.nonzero(core)[0]:
        for j in nbrs[i]:
            if core[j]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    assign = {}
    for i in range(len(pts)):
        if core[i]:
            assign[i] = find(i)
        else:  # border point: joins the nearest core within the radius
            cores = [j for j in nbrs[i] if core[j]]
            if cores:
                nearest = min(cores, key=lambda j: float(np.hypot(*(pts[i] - pts[j]))))
                assign[i] = find(nearest)
    groups: dict[int, list[int]] = {}
    for i, root in assign.items():
        groups.setdefault(root, []).append(i)
    clusters = []
    for root in sorted(groups):
        members = sorted(groups[root])
        p = pts[members]
        cen = p.mean(axis=0)
        radius = float(np.max(np.hypot(*(p - cen).T)))
        extent = float(np.max(np.hypot(*(p[:, None, :] - p[None, :, :]).transpose(2, 0, 1)))) if len(p) > 1 else 0.0
        px = np.array([cands[m]["centre_xy_px"] for m in members], dtype=float).mean(axis=0)
        clusters.append({
            "index": len(clusters),
            "members": members,
            "n_members": len(members),
            "centre_xy_mm": [round(float(v), 4) for v in cen],
            "centre_xy_px": [round(float(v), 3) for v in px],
            "radius_mm": round(radius, 4),
            "extent_mm": round(extent, 4),
            "mean_snr": round(float(np.mean([cands[m].get("snr", 0.0) for m in members])), 2),
        })
    return clusters


# --------------------------------------------------------------------------------------------- study I/O

def _spacing_mm(ds, what: str = "the MG image", notes: list | None = None) -> float:
    """PixelSpacing when present and valid, else ImagerPixelSpacing (the detector plane), square."""
    errors = []
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            row_sp, col_sp = pixel_spacing(ds, what, tag)
        except BadInput as exc:
            errors.append(exc)
            continue
        if abs(row_sp - col_sp) > 1e-3 * max(row_sp, col_sp):
            raise BadInput("anisotropic_pixels", f"{tag} {row_sp}/{col_sp} mm is not square; "
                           "resample the image to square pixels before sending it")
        if errors and errors[0].reason == "invalid_pixel_spacing" and notes is not None:
            notes.append("PixelSpacing invalid: ImagerPixelSpacing (detector plane) used")
        return row_sp
    invalid = [e for e in errors if e.reason == "invalid_pixel_spacing"]
    if invalid:
        raise invalid[0]
    raise BadInput("missing_pixel_spacing", f"{what} has neither PixelSpacing nor ImagerPixelSpacing; "
                   "re-export it with the detector spacing")


def _view(ds) -> tuple[str, str]:
    lat = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "U").upper()
    view = str(ds.get("ViewPosition", "") or "").upper()
    if not view and ds.get("ViewCodeSequence"):
        meaning = str(ds.ViewCodeSequence[0].get("CodeMeaning", "")).lower()
        view = {"cranio-caudal": "CC", "medio-lateral oblique": "MLO"}.get(meaning, "")
    return lat, view or "UNK"


def check_inputs(images: list[tuple[pathlib.Path, object]]) -> list[dict]:
    """Preconditions of detection on every "for presentation" MG image of a study, from headers only.

    ``images`` are ``(path, header)`` pairs.  Returns per image what reading it needs (``spacing_mm``,
    ``photometric``, ``rescale``, ``stored_range``, ``notes``).  Each violation raises BadInput with the reason
    code in brackets, naming the view (never an identifier):

    1. Single-frame [``unsupported_frames``]: tomosynthesis belongs to a DBT pipeline.
    2. Grey-scale [``unsupported_photometric``]: SamplesPerPixel 1 and MONOCHROME1 or MONOCHROME2.  The
       detector expects brighter = denser (MONOCHROME2); MONOCHROME1 (for presentation its Presentation LUT
       Shape is INVERSE) is inverted over the stored range, so it gives what the MONOCHROME2 rendering would.
    3. A pixel spacing [``missing_pixel_spacing``]: PixelSpacing (calibrated) when valid, else
       ImagerPixelSpacing (detector plane, Type 1 in the MG IOD); finite and > 0 [``invalid_pixel_spacing``];
       square [``anisotropic_pixels``].  Spot size, the 3 mm skin rim and the 1 cm2 cluster rule are in mm.
    4. At least :data:`MIN_SIDE_PX` pixels and :data:`MIN_SIDE_MM` mm a side [``image_too_small``]: a cluster
       disc (11.3 mm across) inside the 3 mm skin rim does not fit in less; smaller images are icons,
       thumbnails or crops.
    5. RescaleSlope/RescaleIntercept, where present, finite with a non-zero slope [``invalid_rescale``];
       absent means identity (the detector is invariant to a linear map of the values anyway).
    """
    specs = []
    for _path, hdr in images:
        lat, view = _view(hdr)
        what = f"the {lat} {view} MG image"
        notes: list[str] = []
        check_single_frame(hdr, what)
        photometric = check_photometric(hdr, what)
        spacing = _spacing_mm(hdr, what, notes)
        rows, cols = image_size(hdr, what)
        if min(rows, cols) < MIN_SIDE_PX or min(rows, cols) * spacing < MIN_SIDE_MM:
            raise BadInput("image_too_small", f"{what} is {rows}x{cols} px ({rows * spacing:.0f}x{cols * spacing:.0f} "
                           f"mm); at least {MIN_SIDE_PX} px and {MIN_SIDE_MM:g} mm a side are needed to hold a 1 cm2 "
                           "cluster inside the skin rim; send the full-resolution image, not a thumbnail or crop")
        slope, intercept = rescale(hdr, what)
        slope = 1.0 if slope is None else slope
        intercept = 0.0 if intercept is None else intercept
        specs.append({"spacing_mm": spacing, "photometric": photometric, "rescale": (slope, intercept),
                      "stored_range": stored_range(hdr), "notes": notes})
    return specs


def _pixels(ds, spec: dict | None = None) -> np.ndarray:
    """Rescaled pixels, brighter = denser: MONOCHROME1 is inverted over the rescaled stored range."""
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim != 2:
        raise BadInput("unsupported_frames", f"MG image has shape {arr.shape}; only single-frame 2-D mammograms "
                       "are supported (send tomosynthesis to a DBT pipeline)")
    if spec is None:
        spec = check_inputs([(None, ds)])[0]
    slope, intercept = spec["rescale"]
    arr = arr * slope + intercept
    if spec["photometric"] == "MONOCHROME1":
        # Invert over the range the stored values can take, not over this image's own extremes: a value means
        # the same whatever else is in the image, and MONOCHROME1 of (max - v) gives exactly MONOCHROME2 of v.
        lo, hi = (slope * v + intercept for v in spec["stored_range"])
        arr = (lo + hi) - arr
    if float(arr.max()) <= float(arr.min()):
        raise BadInput("blank_image", "an MG image has the same value in every pixel (blank or failed "
                       "export); send the image again")
    return arr


def _qc_png(path: pathlib.Path, image: np.ndarray, spacing: float, cands, clusters, title: str) -> None:
    from PIL import Image, ImageDraw

    f = max(1, int(math.ceil(max(image.shape) / 700)))
    h, w = (image.shape[0] // f) * f, (image.shape[1] // f) * f
    small = image[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    tissue = small[small > np.percentile(small, 40)] if small.size else small
    lo, hi = (np.percentile(tissue, [1, 99.7]) if tissue.size else (0.0, 1.0))
    grey = np.clip((small - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    img = Image.fromarray(grey).convert("RGB")
    draw = ImageDraw.Draw(img)
    for c in cands:
        x, y = (v / f for v in c["centre_xy_px"])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=(255, 220, 0))
    for cl in clusters:
        x, y = (v / f for v in cl["centre_xy_px"])
        r = (cl["radius_mm"] + 2.0) / spacing / f
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 40, 40), width=2)
        draw.text((x + r + 2, y - 6), f"{cl['n_members']}", fill=(255, 40, 40))
    draw.text((6, 6), f"{title}: {len(cands)} calcifications, {len(clusters)} clusters", fill=(0, 255, 0))
    img.save(path)


def process_study(files: list[pathlib.Path], out_dir: pathlib.Path, *, device: str | None = None,
                  **options) -> dict:
    """Detect and cluster micro-calcifications in every "for presentation" MG image of one study.

    Non-MG objects (a CAD SR, a presentation state) are ignored; a study without MG images raises
    ``BadInput("wrong_modality")``.  "For processing" (raw, linear) images are skipped because the
    detector's noise model assumes the log-domain presentation image; a study with only those raises
    ``BadInput("for_processing_only")``.  Options: ``radius_mm``, ``min_count`` (cluster rule),
    ``detector_uri`` / ``detector_score_threshold`` (a bring-your-own detection model, :mod:`.detector`, run on
    every image beside the built-in detector; its findings are of kind ``model_<label>``, never mixed with the
    built-in ``calcification_cluster``) and any keyword of :func:`detect_calcifications`.  Every image is checked first (:func:`check_inputs`); one
    unusable image raises BadInput with its reason for the whole study.
    Writes ``calcifications.json`` and one ``qc_<laterality>_<view>.png`` per image.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    radius_mm = float(options.pop("radius_mm", CLUSTER_RADIUS_MM))
    min_count = int(options.pop("min_count", CLUSTER_MIN_COUNT))
    detector_uri = options.pop("detector_uri", None)
    detector_threshold = float(options.pop("detector_score_threshold", 0.5))
    detect_opts = {k: options[k] for k in ("k_sigma", "k_low", "spot_sigma_mm", "background_sigma_mm", "rim_mm",
                                           "max_area_mm2", "max_elongation", "detector_blur_mm") if k in options}
    if not files:
        raise BadInput("empty_study", "the study has no files; nothing to process")
    modalities, presentation, processing = set(), [], 0
    for path in sorted(pathlib.Path(p) for p in files):
        with open(path, "rb") as fh:
            hdr = read_header(fh)
        modality = str(hdr.get("Modality", ""))
        modalities.add(modality)
        if modality != "MG":
            continue
        intent = str(hdr.get("PresentationIntentType", "") or MG_SOP_CLASSES.get(str(hdr.SOPClassUID), ""))
        if intent.upper() == "FOR PROCESSING":
            processing += 1
        else:
            presentation.append((path, hdr))
    if not presentation:
        if processing:
            raise BadInput("for_processing_only", f"the study holds {processing} MG 'for processing' image(s) but "
                           "no 'for presentation' image; send the presentation images the modality produces")
        raise BadInput("wrong_modality", f"no MG images in the study (found modalities {sorted(modalities)}); "
                       "route it to the pipeline for that modality")

    specs = check_inputs(presentation)  # every image's preconditions before any pixel is decoded
    detector = None
    if detector_uri:  # a configuration error fails the study at once, before any image is decoded
        from imaging_tasks.mammography.detector import detect, load_detector

        detector = load_detector(detector_uri, device=dev)

    def order(item):
        lat, view = _view(item[1])
        return ({"R": 0, "L": 1}.get(lat, 2), {"CC": 0, "MLO": 1}.get(view, 2), view,
                int(item[1].get("InstanceNumber", 0) or 0), str(item[1].SOPInstanceUID))

    images, findings, outputs, seen = [], [], [], {}
    for (path, _hdr), spec in sorted(zip(presentation, specs, strict=True), key=lambda pair: order(pair[0])):
        ds = read_full(path.read_bytes())
        spacing = spec["spacing_mm"]
        lat, view = _view(ds)
        arr = _pixels(ds, spec)
        cands = detect_calcifications(arr, spacing, device=dev, **detect_opts)
        clusters = cluster_calcifications(cands, radius_mm=radius_mm, min_count=min_count)
        key = f"{lat}_{view}"
        seen[key] = seen.get(key, 0) + 1
        name = f"qc_{key}.png" if seen[key] == 1 else f"qc_{key}_{seen[key]}.png"
        _qc_png(out_dir / name, arr, spacing, cands, clusters, f"{lat} {view}")
        outputs.append(name)
        for cl in clusters:
            findings.append({"kind": "calcification_cluster", "index": len(findings), "laterality": lat,
                             "view": view, "image": len(images), "centre_mm": cl["centre_xy_mm"],
                             "n_members": cl["n_members"], "extent_mm": cl["extent_mm"],
                             "radius_mm": cl["radius_mm"], "mean_snr": cl["mean_snr"]})
        if detector is not None:
            for box in detect(*detector, arr, spacing, score_threshold=detector_threshold, device=dev):
                findings.append({"kind": f"model_{box['label']}", "index": len(findings), "laterality": lat, "view": view,
                                 "image": len(images), "source": box["source"], "score": box["score"],
                                 "centre_mm": box["centre_xy_mm"], "box_mm": box["box_xyxy_mm"],
                                 "size_mm": box["size_mm"], "model": box["model"]["name"],
                                 "model_version": box["model"]["version"], "model_sha256": box["model"]["sha256"]})
        images.append({"index": len(images), "laterality": lat, "view": view,
                       "sop_instance_uid": str(ds.SOPInstanceUID), "rows": int(arr.shape[0]),
                       "cols": int(arr.shape[1]), "pixel_spacing_mm": spacing, "qc": name,
                       "photometric": spec["photometric"], "preconditions": spec["notes"],
                       "calcifications": cands, "clusters": clusters})
    doc = {"cluster_rule": {"radius_mm": radius_mm, "min_count": min_count,
                            "definition": f">= {min_count} calcifications within {math.pi * radius_mm**2:.0f} mm^2 "
                                          f"(DBSCAN, radius {radius_mm:.2f} mm)"},
           "detector": detect_opts, "coordinates": "xy_px = (column, row); xy_mm = xy_px * pixel spacing",
           "images": images}
    (out_dir / "calcifications.json").write_text(json.dumps(doc, indent=1))
    outputs.insert(0, "calcifications.json")
    n_cands = sum(len(im["calcifications"]) for im in images)
    n_clusters = sum(len(im["clusters"]) for im in images)
    metrics = [{"name": "n_images", "value": float(len(images)), "unit": "count"},
               {"name": "n_calcifications", "value": float(n_cands), "unit": "count"},
               {"name": "n_clusters", "value": float(n_clusters), "unit": "count"}]
    for lat in ("R", "L"):
        metrics.append({"name": f"n_clusters_{lat}", "value": float(sum(len(im["clusters"]) for im in images
                                                                        if im["laterality"] == lat)),
                        "unit": "count"})
    metrics.append({"name": "max_cluster_members", "value": float(max((f.get("n_members", 0) for f in findings),
                                                                      default=0)), "unit": "count"})
    if detector is not None:
        metrics.append({"name": "n_detector_findings", "unit": "count",
                        "value": float(sum(1 for f in findings if f.get("source") == "byo_model"))})
    return {"metrics": metrics, "findings": findings, "outputs": outputs, "device": str(dev)}


__all__ = ["detect_calcifications", "cluster_calcifications", "breast_mask", "process_study",
           "CLUSTER_RADIUS_MM", "CLUSTER_MIN_COUNT"]
