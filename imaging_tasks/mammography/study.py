"""The mammography step: one study = one screening exam, read per breast with its views side by side.

What :func:`process_study` does, per exam:

1. **Headers** (no pixel decoded yet): the MG images are picked (other objects, a CAD SR or a presentation
   state, are ignored; none -> ``wrong_modality``).  A view stored both "for presentation" and "for processing"
   (raw detector signal) is read from its presentation image; a view with only a for-processing image (an exam
   sent raw) is read from that one through :func:`.normalize.normalize`'s log conversion, and the exam notes it.
   Every chosen image's preconditions are checked (:func:`check_inputs`); one unusable image refuses the exam,
   so a screening exam is never reported on a subset of its views.
2. **Each image normalised** (:func:`.normalize.normalize`): grey levels (modality LUT; MONOCHROME1 inverted),
   laterality, view, and the canonical orientation (chest wall at column 0, nipple to the right).  Masks on the
   canonical grid: the breast (:func:`.normalize.breast_mask` on ``values``, the pre-VOI values, so a window that
   clips the fatty periphery does not cut the breast) and, on lateral / oblique views, the pectoral muscle
   (:func:`.normalize.pectoral_mask`).
3. **Calcifications**: :func:`.calcifications.detect_calcifications` on ``MammoImage.values`` (before the VOI:
   brighter = denser, linear in log attenuation for presentation images; the detector is invariant to a linear
   map of its input, so the window preset, MONOCHROME1 and 12/14-bit storage change nothing) with the breast as
   ``mask``; calcifications whose centre lies on the pectoral muscle are then dropped (:func:`detect_in_breast`),
   and the rest clustered (:func:`.calcifications.cluster_calcifications`).  Why not the breast minus the muscle
   as ``mask``: the detector skips ``rim_mm`` (3 mm) inside the mask's edge, meant for the skin line; at the
   muscle's edge it would lose clusters lying against the muscle (measured: a planted cluster 2 mm from it).
   Exception: with a SIGMOID VOI the detector reads the presentation ``pixels``.  A sigmoid never clips, so the
   presentation image keeps every detail, while the stored values under it need not be linear: the phantoms'
   sigmoid variant (like a vendor that stores values for its display curve) stores the logit of the picture, which
   saturates the stored range where the picture is near white and gave 211 false calcifications on one view from
   ``values`` against the 18 of the same exam stored with a linear window (``pixels``: the same 18).  A linear
   window does clip (dense tissue beyond it is flat white in ``pixels``), so there ``values`` are read.
4. **Bring-your-own detector** (``detector_uri``): :func:`.detector.detect_images` on the canonical presentation
   images (``MammoImage.pixels``: VOI applied, brighter = denser, chest wall left), all the exam's images in the
   model's batches.
5. **Density** (:func:`.density.percent_density` on the presentation ``pixels`` with the masks of step 2, as
   :func:`.density.density_for_image` does, the compressed thickness from BodyPartThickness when the header
   has it, and ``values`` where they are log-linear (:func:`.density.log_linear_values`: linear window or for
   processing) for the physics floor of the dense reference): percent dense area per view; a breast's density is
   the mean over its views, its BI-RADS category from that; the exam's is the denser breast's (BI-RADS
   convention: the category of the denser breast).
6. **Exam**: each finding's distance from the nipple (:func:`.exam.nipple_xy_px`: the breast's point farthest
   from the chest wall), lesions seen in both views of a breast and the per-breast summary
   (:func:`.exam.breast_summaries`), a QC montage (:func:`.exam.montage`).

Findings (``findings`` rows, JSON-ready):

* ``calcification_cluster``: ``laterality``, ``view``, ``image`` (index into the JSON's ``images``),
  ``centre_xy_px`` / ``centre_xy_mm`` on the canonical grid, ``stored_xy_px`` / ``stored_xy_mm`` the same point on
  the stored pixel grid of the image as sent (:meth:`.normalize.MammoImage.to_stored_xy`), ``nipple_distance_mm``,
  ``n_members``, ``radius_mm``, ``extent_mm``, ``mean_snr``, ``evidence``, ``suspicion``, ``seen_in_both_views``,
  ``other_view_finding`` (the partner's ``index``, or None);
* ``model_<label>`` (a bring-your-own detector's box): the same position fields plus ``box_xyxy_px`` /
  ``box_xyxy_mm`` (canonical) and ``stored_box_xyxy_px``, ``size_mm``, ``score``, ``model``, ``model_version``,
  ``model_sha256``;
* ``breast_summary`` (one per imaged breast): ``laterality``, ``views``, ``percent_density`` (mean percent dense
  area over its views), ``birads_density`` (a-d), ``dense_volume_fraction`` (mean, when estimable),
  ``n_findings``, ``n_clusters``, ``n_model_findings``, ``n_seen_in_both_views`` (lesions, i.e. pairs),
  ``highest_suspicion`` and ``highest_suspicion_finding`` (its ``index``).

**Suspicion** (a ranking aid within and across exams, not a calibrated probability of malignancy): for a built-in
cluster ``evidence / (evidence + SUSPICION_SCALE)`` with ``evidence`` = the sum over its members of their
detection ``score`` (the largest ``k_sigma`` at which each member is still accepted), so it grows with the member
count and with each member's conspicuity, stays below 1 (no saturation: a larger, brighter cluster always ranks
higher) and does not depend on the ``k_sigma`` the exam was read at (for the same members).
``SUSPICION_SCALE`` = 100: ten members at 10 noise sigmas give 0.5, three at 5 give 0.13.  For a model's box:
its score, clipped to [0, 1].

Outputs: ``mammography.json`` (exam, breasts, images with their calcifications and clusters, findings),
``qc_<laterality>_<view>.png`` per image (canonical orientation: breast outline green, pectoral outline blue,
dense tissue tinted, calcifications yellow dots, clusters red circles, yellow when seen in both views, model
boxes cyan, green when seen in both views) and ``qc_exam.png`` (the hanging R | L, CC above MLO, the same marks).
No header text other than the (de-identified) SOPInstanceUID reaches an output.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from imaging_tasks.device import pick_device
from imaging_tasks.dicom_io import read_full, read_header
from imaging_tasks.errors import BadInput
from imaging_tasks.mammography.calcifications import (CLUSTER_MIN_COUNT, CLUSTER_RADIUS_MM, cluster_calcifications,
                                                      detect_calcifications)
from imaging_tasks.preconditions import check_photometric, check_single_frame, image_size, rescale, stored_range

MG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.2": "FOR PRESENTATION",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "FOR PROCESSING",
}
# Smallest image worth looking at: a cluster disc (11.3 mm) inside the 3 mm skin rim needs ~17 mm; anything
# under 20 mm or 64 px a side is an icon, thumbnail or crop, not a mammogram (even a spot view is > 40 mm).
MIN_SIDE_MM, MIN_SIDE_PX = 20.0, 64
SUSPICION_SCALE = 100.0
DETECT_OPTIONS = ("k_sigma", "k_low", "spot_sigma_mm", "background_sigma_mm", "rim_mm", "max_area_mm2",
                  "max_elongation", "detector_blur_mm")
BIRADS_NUMBER = {"a": 1, "b": 2, "c": 3, "d": 4}
# QC colours (RGB)
CLUSTER, CLUSTER_BOTH = (255, 40, 40), (255, 220, 0)
MODEL, MODEL_BOTH = (0, 200, 255), (0, 255, 120)
QC_MAX_SIDE = 700


# --------------------------------------------------------------------------------------------- headers

def _spacing_mm(ds, what: str = "the MG image", notes: list | None = None) -> float:
    """PixelSpacing when present and valid, else ImagerPixelSpacing (the detector plane), square."""
    from imaging_tasks.mammography.normalize import _spacing

    return _spacing(ds, [] if notes is None else notes, what)


def _view(ds) -> tuple[str, str]:
    """(laterality, view) from the header alone (U / UNK when absent): for ordering, pairing and messages."""
    from imaging_tasks.mammography.normalize import _view as view_of

    lat = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "U").strip().upper()
    return (lat if lat in ("L", "R") else "U"), view_of(ds)


def _intent(ds) -> str:
    from imaging_tasks.mammography.normalize import _intent as intent_of

    return intent_of(ds)


def check_inputs(images: list[tuple[pathlib.Path, object]]) -> list[dict]:
    """Preconditions of the exam reading on every chosen MG image, from headers only.

    ``images`` are ``(path, header)`` pairs.  Returns per image what reading it needs (``spacing_mm``,
    ``photometric``, ``rescale``, ``stored_range``, ``notes``).  Each violation raises BadInput with the reason
    code in brackets, naming the view (never an identifier):

    1. Single-frame [``unsupported_frames``]: tomosynthesis belongs to a DBT pipeline.
    2. Grey-scale [``unsupported_photometric``]: SamplesPerPixel 1 and MONOCHROME1 or MONOCHROME2 (MONOCHROME1
       is inverted by :func:`.normalize.normalize`, so brighter = denser whatever the storage).
    3. A pixel spacing [``missing_pixel_spacing``]: PixelSpacing (calibrated) when valid, else
       ImagerPixelSpacing (detector plane, Type 1 in the MG IOD); finite and > 0 [``invalid_pixel_spacing``];
       square [``anisotropic_pixels``].  Spot size, the 3 mm skin rim, the 1 cm2 cluster rule and the areas of
       the density are in mm.
    4. At least :data:`MIN_SIDE_PX` pixels and :data:`MIN_SIDE_MM` mm a side [``image_too_small``]: a cluster
       disc (11.3 mm across) inside the 3 mm skin rim does not fit in less; smaller images are icons,
       thumbnails or crops.
    5. RescaleSlope/RescaleIntercept, where present, finite with a non-zero slope [``invalid_rescale``];
       absent means identity.

    After decoding, :func:`.normalize.normalize` refuses a constant image [``blank_image``] and an unusable VOI
    [``invalid_voi``].
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
    """Rescaled pixels on the STORED grid, brighter = denser (MONOCHROME1 inverted over the rescaled stored range).

    Not used by :func:`process_study` (which reads through :func:`.normalize.normalize`); kept for the FROC bench
    and tests that score detections against the stored-grid truth of the phantoms.
    """
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim != 2:
        raise BadInput("unsupported_frames", f"MG image has shape {arr.shape}; only single-frame 2-D mammograms "
                       "are supported (send tomosynthesis to a DBT pipeline)")
    if spec is None:
        spec = check_inputs([(None, ds)])[0]
    slope, intercept = spec["rescale"]
    arr = arr * slope + intercept
    if spec["photometric"] == "MONOCHROME1":
        lo, hi = (slope * v + intercept for v in spec["stored_range"])
        arr = (lo + hi) - arr
    if float(arr.max()) <= float(arr.min()):
        raise BadInput("blank_image", "an MG image has the same value in every pixel (blank or failed "
                       "export); send the image again")
    return arr


def _thickness_mm(ds) -> float | None:
    try:
        t = float(ds.get("BodyPartThickness", None))
    except (TypeError, ValueError):
        return None
    return t if math.isfinite(t) and t > 0 else None


def _safe_notes(notes: list[str]) -> list[str]:
    """normalize's notes without header free text (window preset / VOI LUT explanations)."""
    out = []
    for n in notes:
        if n.startswith("window preset "):
            out.append("window preset from WindowCenterWidthExplanation (text not copied)")
        elif n.startswith("VOI LUT: "):
            out.append("VOI LUT with an LUTExplanation (text not copied)")
        else:
            out.append(n)
    return out


# ------------------------------------------------------------------------------------------- one image

@dataclasses.dataclass
class Prepared:
    """What the exam reading uses of one image: the normalised image and its canonical masks."""

    image: object                 # normalize.MammoImage
    breast: np.ndarray            # canonical breast mask (with the pectoral muscle)
    pectoral: np.ndarray          # canonical pectoral mask (empty on CC views)



def prepare_image(ds) -> Prepared:
    """:func:`.normalize.normalize` and the breast and pectoral masks of one MG dataset (pixels loaded).

    Detection as :func:`process_study` runs it: :func:`detect_in_breast`; map centres back to the stored grid with
    ``p.image.to_stored_xy``.
    """
    from imaging_tasks.mammography.normalize import breast_mask, normalize, pectoral_mask

    mi = normalize(ds)
    sp = mi.pixel_spacing_mm
    breast = breast_mask(mi.values if mi.values is not None else mi.pixels, pixel_spacing_mm=sp)
    pect = pectoral_mask(mi.pixels, breast, mi.view, pixel_spacing_mm=sp)
    return Prepared(image=mi, breast=breast, pectoral=pect)


def detection_input(mi) -> np.ndarray:
    """What the built-in detector reads of a MammoImage: ``values`` (pre-VOI), or ``pixels`` under a SIGMOID VOI
    (module docstring, step 3)."""
    return mi.pixels if mi.voi == "SIGMOID" or mi.values is None else mi.values


def detect_in_breast(prep: Prepared, *, device=None, **detect_options) -> list[dict]:
    """Calcifications of one prepared image (canonical grid): :func:`.calcifications.detect_calcifications` on
    :func:`detection_input` inside the breast, without those centred on the pectoral muscle (re-indexed)."""
    mi = prep.image
    cands = detect_calcifications(detection_input(mi), mi.pixel_spacing_mm, device=device, mask=prep.breast,
                                  **detect_options)
    h, w = prep.pectoral.shape
    kept = [c for c in cands if not prep.pectoral[min(h - 1, max(0, int(round(c["centre_xy_px"][1])))),
                                                  min(w - 1, max(0, int(round(c["centre_xy_px"][0]))))]]
    for i, c in enumerate(kept):
        c["index"] = i
    return kept


def suspicion(evidence: float) -> float:
    """``evidence / (evidence + SUSPICION_SCALE)`` (see the module docstring)."""
    e = max(float(evidence), 0.0)
    return round(e / (e + SUSPICION_SCALE), 4)


def _block(arr: np.ndarray, f: int) -> np.ndarray:
    h, w = (arr.shape[0] // f) * f, (arr.shape[1] // f) * f
    return np.asarray(arr[:h, :w], dtype=np.float32).reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _stored(mi, xy_px) -> list[float]:
    return [round(float(v), 3) for v in mi.to_stored_xy(xy_px)[0]]


def _stored_box(mi, box) -> list[float]:
    """A canonical box (pixel-edge convention) on the stored grid: its corners mapped as pixel centres."""
    x0, y0, x1, y1 = box
    p = mi.to_stored_xy([[x0 - 0.5, y0 - 0.5], [x1 - 0.5, y1 - 0.5]])
    return [round(float(v), 3) for v in (p[:, 0].min() + 0.5, p[:, 1].min() + 0.5,
                                         p[:, 0].max() + 0.5, p[:, 1].max() + 0.5)]


# --------------------------------------------------------------------------------------------- the exam

def _choose(files) -> tuple[list[tuple[pathlib.Path, object]], list[str]]:
    """The MG images to read (see the module docstring, step 1) and the exam's notes about the choice."""
    modalities, presentation, processing = set(), [], []
    for path in sorted(pathlib.Path(p) for p in files):
        with open(path, "rb") as fh:
            hdr = read_header(fh)
        modality = str(hdr.get("Modality", ""))
        modalities.add(modality)
        if modality != "MG":
            continue
        (processing if _intent(hdr) == "PROCESSING" else presentation).append((path, hdr))
    if not presentation and not processing:
        raise BadInput("wrong_modality", f"no MG images in the study (found modalities {sorted(modalities)}); "
                       "route it to the pipeline for that modality")
    covered = {_view(h) for _p, h in presentation}
    raw = [(p, h) for p, h in processing if _view(h) not in covered or _view(h)[0] == "U"]
    if presentation and raw:  # an unknown laterality cannot be paired: only raw-only exams use such images
        raw = [(p, h) for p, h in raw if _view(h) not in covered]
    notes = []
    if len(processing) > len(raw):
        notes.append(f"{len(processing) - len(raw)} 'for processing' image(s) not read: the same view's 'for "
                     "presentation' image is")
    if raw:
        views = ", ".join(sorted(f"{lat} {view}" for lat, view in (_view(h) for _p, h in raw)))
        notes.append(f"'for processing' image(s) read through the log conversion of normalize (no presentation "
                     f"image of {views}): grey levels are not the vendor's presentation processing")
    return presentation + raw, notes


def _order(item):
    lat, view = _view(item[1])
    return ({"R": 0, "L": 1}.get(lat, 2), {"CC": 0, "MLO": 1}.get(view, 2), view,
            int(item[1].get("InstanceNumber", 0) or 0), str(item[1].SOPInstanceUID))


def process_study(files: list[pathlib.Path], out_dir: pathlib.Path, *, device: str | None = None,
                  **options) -> dict:
    """Read one mammography exam (see the module docstring): calcification clusters, a bring-your-own detector's
    findings, density per view and breast, lesions seen in both views, per-breast summaries and QC pictures.

    Options: ``radius_mm``, ``min_count`` (cluster rule), ``detector_uri`` / ``detector_score_threshold`` (a
    bring-your-own detection model, :mod:`.detector`), ``cross_view_tolerance_mm`` (nipple-distance difference
    of a lesion seen in both views, default :data:`.exam.CROSS_VIEW_TOLERANCE_MM`) and any keyword of
    :func:`.calcifications.detect_calcifications` (``k_sigma``...).  Raises BadInput (the study is quarantined)
    for an exam without MG images (``wrong_modality``) or with one unusable image (:func:`check_inputs`).
    Returns ``{"metrics", "findings", "outputs", "device"}``.
    """
    from imaging_tasks.mammography import exam
    from imaging_tasks.mammography.density import birads_category, log_linear_values, percent_density

    out_dir = pathlib.Path(out_dir)
    dev = pick_device(device)
    radius_mm = float(options.pop("radius_mm", CLUSTER_RADIUS_MM))
    min_count = int(options.pop("min_count", CLUSTER_MIN_COUNT))
    detector_uri = options.pop("detector_uri", None)
    detector_threshold = float(options.pop("detector_score_threshold", 0.5))
    tolerance_mm = float(options.pop("cross_view_tolerance_mm", exam.CROSS_VIEW_TOLERANCE_MM))
    detect_opts = {k: options[k] for k in DETECT_OPTIONS if k in options}
    if not files:
        raise BadInput("empty_study", "the study has no files; nothing to process")
    chosen, exam_notes = _choose(files)
    specs = check_inputs(chosen)  # every image's preconditions before any pixel is decoded
    detector = None
    if detector_uri:  # a configuration error fails the study at once, before any image is decoded
        from imaging_tasks.mammography.detector import load_detector

        detector = load_detector(detector_uri, device=dev)
    out_dir.mkdir(parents=True, exist_ok=True)

    images, per_image, model_inputs = [], [], []
    for (path, _hdr), spec in sorted(zip(chosen, specs, strict=True), key=lambda pair: _order(pair[0])):
        ds = read_full(path.read_bytes())
        prep = prepare_image(ds)
        mi, sp = prep.image, prep.image.pixel_spacing_mm
        cands = detect_in_breast(prep, device=dev, **detect_opts)
        clusters = cluster_calcifications(cands, radius_mm=radius_mm, min_count=min_count)
        for c in cands:
            c["stored_xy_px"] = _stored(mi, c["centre_xy_px"])
        for cl in clusters:
            cl["stored_xy_px"] = _stored(mi, cl["centre_xy_px"])
            cl["evidence"] = round(float(sum(cands[m]["score"] for m in cl["members"])), 3)
        nipple = exam.nipple_xy_px(prep.breast)
        try:
            # = density.density_for_image(mi, pectoral=...), without segmenting the breast a second time
            dens = percent_density(mi.pixels, prep.breast, prep.pectoral, sp,
                                   compressed_thickness_mm=_thickness_mm(ds), values=log_linear_values(mi))
        except BadInput as exc:  # density is a summary: a view it cannot measure is noted, not refused
            dens = {"error": exc.reason, "notes": [exc.message]}
        dense_mask = dens.pop("dense_mask", None)
        f = max(1, int(math.ceil(max(mi.pixels.shape) / QC_MAX_SIDE)))
        per_image.append({"preview": _block(mi.pixels, f), "factor": f, "breast": _block(prep.breast, f) > 0.5,
                          "pectoral": _block(prep.pectoral, f) > 0.5,
                          "dense": None if dense_mask is None else _block(dense_mask, f) > 0.5,
                          "image": mi, "cands": cands, "clusters": clusters, "nipple": nipple})
        if detector is not None:
            model_inputs.append((mi.pixels, sp))
        images.append({"index": len(images), "laterality": mi.laterality, "view": mi.view,
                       "sop_instance_uid": str(ds.SOPInstanceUID), "intent": mi.intent,
                       "photometric": mi.photometric, "voi": mi.voi, "flips": list(mi.flips),
                       "detection_input": "pixels" if detection_input(mi) is mi.pixels else "values",
                       "stored_shape": list(mi.stored_shape), "rows": int(mi.pixels.shape[0]),
                       "cols": int(mi.pixels.shape[1]), "pixel_spacing_mm": sp,
                       "preconditions": spec["notes"], "notes": _safe_notes(mi.notes),
                       "nipple_xy_px": None if nipple is None else [round(v, 1) for v in nipple],
                       "breast_area_cm2": round(float(prep.breast.sum()) * sp * sp / 100.0, 3),
                       "pectoral_area_cm2": round(float(prep.pectoral.sum()) * sp * sp / 100.0, 3),
                       "density": dens, "calcifications": cands, "clusters": clusters})

    boxes_per_image = [[] for _ in images]
    if detector is not None:
        from imaging_tasks.mammography.detector import detect_images

        boxes_per_image = detect_images(*detector, [im for im, _ in model_inputs], [s for _, s in model_inputs],
                                        score_threshold=detector_threshold, device=dev)
        del model_inputs

    findings: list[dict] = []
    for im, pi, boxes in zip(images, per_image, boxes_per_image, strict=True):
        mi, sp, nipple = pi["image"], im["pixel_spacing_mm"], pi["nipple"]
        nipple_mm = None if nipple is None else (nipple[0] * sp, nipple[1] * sp)

        def place(centre_px, centre_mm):
            stored = _stored(mi, centre_px)
            return {"laterality": im["laterality"], "view": im["view"], "image": im["index"],
                    "centre_xy_px": [round(float(v), 3) for v in centre_px],
                    "centre_xy_mm": [round(float(v), 4) for v in centre_mm],
                    "stored_xy_px": stored, "stored_xy_mm": [round(v * sp, 4) for v in stored],
                    "nipple_distance_mm": None if nipple_mm is None else
                    round(exam.nipple_distance_mm(centre_mm, nipple_mm), 3)}

        for cl in pi["clusters"]:
            findings.append({"kind": "calcification_cluster", "index": len(findings),
                             **place(cl["centre_xy_px"], cl["centre_xy_mm"]),
                             "n_members": cl["n_members"], "radius_mm": cl["radius_mm"],
                             "extent_mm": cl["extent_mm"], "mean_snr": cl["mean_snr"],
                             "evidence": cl["evidence"], "suspicion": suspicion(cl["evidence"])})
        for box in boxes:
            findings.append({"kind": f"model_{box['label']}", "index": len(findings),
                             **place(box["centre_xy_px"], box["centre_xy_mm"]),
                             "source": box["source"], "score": box["score"],
                             "suspicion": round(min(max(float(box["score"]), 0.0), 1.0), 4),
                             "box_xyxy_px": box["box_xyxy_px"], "box_xyxy_mm": box["box_xyxy_mm"],
                             "stored_box_xyxy_px": _stored_box(mi, box["box_xyxy_px"]), "size_mm": box["size_mm"],
                             "model": box["model"]["name"], "model_version": box["model"]["version"],
                             "model_sha256": box["model"]["sha256"]})
    # a finding without a nipple (no breast found) cannot be paired across views
    pairable = [f for f in findings if f["nipple_distance_mm"] is not None]
    summaries = exam.breast_summaries(images, pairable, tolerance_mm=tolerance_mm)
    for f in findings:
        f.setdefault("seen_in_both_views", False)
        f.setdefault("other_view_finding", None)

    breasts = []
    for s in summaries:
        lat = s["laterality"]
        views = [im for im in images if im["laterality"] == lat]
        measured = [im["density"] for im in views if "percent_dense_area" in im["density"]]
        pct = round(float(np.mean([d["percent_dense_area"] for d in measured])), 3) if measured else None
        vols = [d["dense_volume_fraction"] for d in measured if d.get("dense_volume_fraction") is not None]
        mine = [f for f in findings if f["laterality"] == lat]
        breasts.append({**s, "percent_density": pct, "birads_density": None if pct is None else birads_category(pct),
                        "dense_volume_fraction": round(float(np.mean(vols)), 5) if vols else None,
                        "n_clusters": sum(f["kind"] == "calcification_cluster" for f in mine),
                        "n_model_findings": sum(f["kind"].startswith("model_") for f in mine),
                        "density_views": {im["view"]: im["density"].get("percent_dense_area") for im in views}})
    dense_breasts = [b for b in breasts if b["percent_density"] is not None]
    exam_pct = max((b["percent_density"] for b in dense_breasts), default=None)
    exam_density = {"percent_density": exam_pct,
                    "birads_density": None if exam_pct is None else birads_category(exam_pct),
                    "rule": "the denser breast (BI-RADS: the category of the denser breast); a breast = the mean "
                            "percent dense area of its views"}

    outputs = ["mammography.json"]
    for im, pi in zip(images, per_image):
        name = _qc_name(im, images)
        im["qc"] = name
        _qc_view(out_dir / name, im, pi, findings)
        outputs.append(name)
    sheet = exam.montage([{"laterality": im["laterality"], "view": im["view"], "pixels": pi["preview"],
                           "marks": _marks(im, pi, findings)} for im, pi in zip(images, per_image)])
    _legend(sheet)
    sheet.save(out_dir / "qc_exam.png")
    outputs.append("qc_exam.png")

    summary_rows = [{"kind": "breast_summary", "index": len(findings) + n, **b} for n, b in enumerate(breasts)]
    doc = {"exam": {"breasts": breasts, "density": exam_density, "notes": exam_notes,
                    "cross_view_tolerance_mm": tolerance_mm},
           "cluster_rule": {"radius_mm": radius_mm, "min_count": min_count,
                            "definition": f">= {min_count} calcifications within {math.pi * radius_mm**2:.0f} mm^2 "
                                          f"(DBSCAN, radius {radius_mm:.2f} mm)"},
           "detector": detect_opts,
           "suspicion": f"clusters: E / (E + {SUSPICION_SCALE:g}), E = the sum of the members' scores; model boxes: "
                        "the score",
           "coordinates": "canonical grid (normalize: chest wall at column 0): xy_px = (column, row), xy_mm = xy_px "
                          "* pixel spacing; stored_xy_* = the same point on the stored pixel grid",
           "images": images, "findings": findings + summary_rows}
    (out_dir / "mammography.json").write_text(json.dumps(doc, indent=1))
    return {"metrics": _metrics(images, findings, breasts, exam_density, detector is not None),
            "findings": findings + summary_rows, "outputs": outputs, "device": str(dev)}


def _metrics(images, findings, breasts, exam_density, with_detector: bool) -> list[dict]:
    clusters = [f for f in findings if f["kind"] == "calcification_cluster"]
    metrics = [{"name": "n_images", "value": float(len(images)), "unit": "count"},
               {"name": "n_calcifications", "value": float(sum(len(im["calcifications"]) for im in images)),
                "unit": "count"},
               {"name": "n_clusters", "value": float(len(clusters)), "unit": "count"}]
    for lat in ("R", "L"):
        metrics.append({"name": f"n_clusters_{lat}", "value": float(sum(f["laterality"] == lat for f in clusters)),
                        "unit": "count"})
    metrics.append({"name": "max_cluster_members", "value": float(max((f["n_members"] for f in clusters), default=0)),
                    "unit": "count"})
    if with_detector:
        metrics.append({"name": "n_detector_findings", "unit": "count",
                        "value": float(sum(f["kind"].startswith("model_") for f in findings))})
    metrics.append({"name": "n_seen_in_both_views", "unit": "count",
                    "value": float(sum(b["n_seen_in_both_views"] for b in breasts))})
    for b in breasts:
        lat = b["laterality"]
        metrics.append({"name": f"highest_suspicion_{lat}", "unit": "score",
                        "value": float(b["highest_suspicion"] or 0.0)})
        if b["percent_density"] is not None:
            metrics.append({"name": f"percent_density_{lat}", "value": float(b["percent_density"]), "unit": "%"})
    if exam_density["percent_density"] is not None:
        metrics.append({"name": "percent_density", "value": float(exam_density["percent_density"]), "unit": "%"})
        metrics.append({"name": "birads_density", "value": float(BIRADS_NUMBER[exam_density["birads_density"]]),
                        "unit": "category"})
    return metrics


# ------------------------------------------------------------------------------------------------- QC

def _qc_name(im, images) -> str:
    key = f"{im['laterality']}_{im['view']}"
    n = sum(1 for other in images[:im["index"] + 1] if (other["laterality"], other["view"]) == (im["laterality"],
                                                                                               im["view"]))
    return f"qc_{key}.png" if n == 1 else f"qc_{key}_{n}.png"


def _marks(im, pi, findings) -> list[tuple]:
    """(x, y, radius, colour) on the preview grid of one image's findings."""
    f, sp = pi["factor"], im["pixel_spacing_mm"]
    out = []
    for fd in findings:
        if fd["image"] != im["index"]:
            continue
        x, y = (v / f for v in fd["centre_xy_px"])
        if fd["kind"] == "calcification_cluster":
            r = (fd["radius_mm"] + 3.0) / sp / f
            colour = CLUSTER_BOTH if fd["seen_in_both_views"] else CLUSTER
        else:
            x0, y0, x1, y1 = fd["box_xyxy_px"]
            r = 0.5 * math.hypot(x1 - x0, y1 - y0) / f + 2
            colour = MODEL_BOTH if fd["seen_in_both_views"] else MODEL
        out.append((x, y, max(r, 4.0), colour))
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def _qc_view(path: pathlib.Path, im: dict, pi: dict, findings: list[dict]) -> None:
    from PIL import Image, ImageDraw

    px = pi["preview"]
    inside = px[pi["breast"]] if pi["breast"].any() else px.ravel()
    lo, hi = np.percentile(inside, [1, 99.7]) if inside.size else (0.0, 1.0)
    grey = np.clip((px - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2) * 255
    if pi["dense"] is not None:  # dense tissue tinted magenta
        rgb[pi["dense"]] = 0.75 * rgb[pi["dense"]] + 0.25 * np.array([255, 0, 255])
    rgb[_outline(pi["breast"])] = (0, 255, 0)
    if pi["pectoral"].any():
        rgb[_outline(pi["pectoral"])] = (60, 120, 255)
    img = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    f = pi["factor"]
    for c in pi["cands"]:
        x, y = (v / f for v in c["centre_xy_px"])
        draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], outline=(255, 220, 0))
    for fd in findings:
        if fd["image"] != im["index"]:
            continue
        x, y = (v / f for v in fd["centre_xy_px"])
        if fd["kind"] == "calcification_cluster":
            r = (fd["radius_mm"] + 2.0) / im["pixel_spacing_mm"] / f
            colour = CLUSTER_BOTH if fd["seen_in_both_views"] else CLUSTER
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=2)
            draw.text((x + r + 2, y - 6), f"{fd['n_members']} ({fd['suspicion']:.2f})", fill=colour)
        else:
            x0, y0, x1, y1 = (v / f for v in fd["box_xyxy_px"])
            colour = MODEL_BOTH if fd["seen_in_both_views"] else MODEL
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
            draw.text((x1 + 2, y0), f"{fd['kind'][6:]} {fd['score']:.2f}", fill=colour)
    dens = im["density"]
    d = f", {dens['percent_dense_area']:.0f}% dense ({dens['birads_density']})" if "percent_dense_area" in dens else ""
    n_cl = sum(1 for fd in findings if fd["image"] == im["index"] and fd["kind"] == "calcification_cluster")
    draw.text((6, 6), f"{im['laterality']} {im['view']}: {len(pi['cands'])} calcifications, {n_cl} clusters{d}",
              fill=(0, 255, 0))
    img.save(path)


def _legend(sheet) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(sheet)
    y = sheet.height - 16
    x = 8
    for text, colour in (("cluster", CLUSTER), ("cluster, both views", CLUSTER_BOTH), ("model", MODEL),
                         ("model, both views", MODEL_BOTH)):
        draw.text((x, y), text, fill=colour)
        x += 8 * len(text) + 16


__all__ = ["process_study", "prepare_image", "detect_in_breast", "detection_input", "Prepared", "check_inputs", "suspicion",
           "SUSPICION_SCALE"]
