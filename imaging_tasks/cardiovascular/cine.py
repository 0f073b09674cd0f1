"""Left-ventricular function from a short-axis cine MR stack: EDV, ESV, stroke volume, ejection fraction.

The chain's step is :func:`cine_function`.  It takes the study's first cine series (series-number order;
:mod:`.series` decides what a cine series is; the others are noted), checks it from headers, loads it as an
array (slices along the slice normal, phases in TriggerTime order, rows, columns), segments the LV blood pool
in every slice and phase, and sums discs (Simpson: area x slice spacing) into a volume per phase.  End diastole
is the phase of largest volume, end systole the smallest.

Segmentation, chosen by the ``cine_segmentation`` option:

* ``"classical"`` (default, no model): per slice, bright regions (blood, fat) are separated from grey ones
  (myocardium, tissue) by Otsu's threshold on a 3x3 (cross) median-filtered copy; each bright region is
  followed through the cycle by centre and size.  The LV is found on the slice where a region is most clearly
  both *round* (its area fills the ellipse of its second moments; a crescent such as the RV does not) and
  *pulsatile* (its area changes through the cycle; static fat and the aorta do not), then followed slice by
  slice towards base and apex: the next slice's LV lies near the same centre and its area curve beats in step
  with this one (fat uncovered when the apex moves in systole beats in antiphase); towards the base of a
  failing heart, where the area hardly changes, a round region of about the same size continues the stack;
  past the last such slice, the region at the predicted centre is kept while its area curve still correlates
  (the apex in noise).  The threshold is then refined per slice to the midpoint of the LV's own blood and
  myocardium intensities (robust to contrast, coil shading and scaling), and each pixel at the
  blood-myocardium border counts with its partial-volume fraction ``(I - myocardium) / (blood - myocardium)``,
  which removes most of the bias of a binary count at coarse pixels and through thick slices.  The myocardium
  is not segmented, so LV mass is not reported on this path: a radial epicardial edge search was tried and
  measured the phantoms' mass 5-25 % low (the apical cap below the last blood-pool slice, and stretches where
  the epicardium borders tissue of myocardial intensity), which is not good enough to report.
* ``"model"``: a bring-your-own TorchScript model (``cine_model_uri``; :func:`imaging_tasks.byo_model
  .segment_frames`) labels every frame; volumes are its voxel counts x voxel volume, with no post-processing, so
  running the same model by hand gives identical numbers.  When it labels the myocardium, LV mass =
  myocardial volume at end diastole x 1.05 g/ml.

Preconditions (headers only, before any pixel is read), each a BadInput with its stable reason code:

* ``missing_trigger_time``: some image has no TriggerTime (0018,1060): phases cannot be ordered in the cycle;
* ``too_few_slices``: fewer than :data:`MIN_SLICES` slice positions; ``too_few_phases``: fewer than
  :data:`MIN_PHASES` phases (end systole would be missed);
* ``unequal_phases``: slices with different phase counts (an incomplete slice: its volume curve has holes);
* ``duplicate_trigger_time``: two images at one position and trigger time (two acquisitions in one series);
* geometry, via :func:`imaging_tasks.preconditions.check_stack` on one image per position:
  ``missing_pixel_spacing``, ``invalid_pixel_spacing``, ``missing_orientation``, ``invalid_orientation``,
  ``missing_position``, ``invalid_position``, ``mixed_geometry`` (orientation, matrix, pixel spacing or
  photometric interpretation differ between images, or positions off one line), ``irregular_slices``,
  ``unsupported_photometric``, ``unsupported_frames``, ``invalid_rescale``;
* after segmentation: ``lv_not_found`` when no round pulsatile blood pool is found (not a short-axis stack?).

Any instance order is fine: images are grouped by position along the normal and sorted by trigger time.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imaging_tasks.errors import BadInput, ConfigError
from imaging_tasks.preconditions import finite_float

log = logging.getLogger(__name__)

MIN_SLICES = 3
MIN_PHASES = 8  # 8 phases per R-R sample end systole within ~60 ms at 60 bpm; fewer miss it by more
MYOCARDIUM_G_PER_ML = 1.05
SEGMENTATIONS = ("classical", "model")
SAME_POSITION_MM = 0.5
# The LV blood pool's cross-section changes by >= ~30 % over the cycle even at the base of a failing heart; static
# bright regions (fat, a vessel) by a few % (noise).  Regions below this are not followed as the LV.
MIN_PULSATILITY = 0.15  # to seed the search (the best slice); neighbours need only beat with it:
FOLLOW_PULSATILITY = 0.04  # a basal slice of a failing heart changes area by little, but in phase with the next
FOLLOW_CORRELATION = 0.5
MIN_LV_SLICES = 2  # images closer than this along the normal are one slice position


# --------------------------------------------------------------------------- loading
@dataclass
class CineStack:
    """A checked cine series: items[slice][phase] = (path, header), slices along the normal, phases by time."""

    items: list[list[tuple]]
    trigger_ms: np.ndarray  # (slices, phases)
    spacing_mm: tuple[float, float, float]  # (slice spacing from positions, row spacing, column spacing)
    rows: int
    cols: int
    rr_ms: float | None
    rr_source: str
    slice_thickness_mm: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return len(self.items)

    @property
    def n_phases(self) -> int:
        return len(self.items[0])


def check_cine(items: list[tuple]) -> CineStack:
    """Preconditions of LV function on one cine series (module docstring); ``items`` are (path, header) pairs."""
    from imaging_tasks.preconditions import _orientation, check_stack, image_size, pixel_spacing, unique_instances

    what = "the cine series"
    unique, notes = unique_instances(items)
    no_time = sum(finite_float(ds.get("TriggerTime")) is None for _p, ds in unique)
    if no_time:
        raise BadInput("missing_trigger_time", f"{no_time} of {len(unique)} images of the cine series have no "
                       "TriggerTime (0018,1060); without it the phases cannot be ordered in the cardiac cycle and "
                       "end diastole / end systole cannot be found; re-export the series with its cardiac timing")
    iop = _orientation(unique[0][1], what)
    normal = np.cross(iop[:3], iop[3:])
    rows, cols = image_size(unique[0][1], what)
    spacing = pixel_spacing(unique[0][1], what)
    dy = spacing[0]
    positions = []
    for _path, ds in unique:
        if np.max(np.abs(_orientation(ds, what) - iop)) > 1e-4:
            raise BadInput("mixed_geometry", f"{what}: ImageOrientationPatient differs between images (several "
                           "stacks in one series); send one short-axis stack per series")
        other = pixel_spacing(ds, what)
        if image_size(ds, what) != (rows, cols) or max(abs(a - b) for a, b in zip(other, spacing)) > 1e-4 * dy:
            raise BadInput("mixed_geometry", f"{what}: Rows/Columns or PixelSpacing differ between images; send one "
                           "reconstruction per series")
        ipp = ds.get("ImagePositionPatient")
        vals = [finite_float(v) for v in ipp] if ipp is not None and len(ipp) == 3 else None
        if vals is None or None in vals:
            raise BadInput("missing_position", f"{what} has images without a usable ImagePositionPatient; slices "
                           "cannot be told apart; re-export the series with its Image Plane attributes")
        positions.append(float(np.dot(vals, normal)))
    order = np.argsort(positions, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and positions[i] - positions[groups[-1][0]] <= SAME_POSITION_MM:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    if len(groups) < MIN_SLICES:
        raise BadInput("too_few_slices", f"{what} has {len(groups)} slice position(s); at least {MIN_SLICES} are "
                       "needed to sum a ventricular volume; send the whole short-axis stack from base to apex")
    counts = sorted({len(g) for g in groups})
    if len(counts) > 1:
        raise BadInput("unequal_phases", f"{what}: slices have different numbers of phases ({counts[0]} to "
                       f"{counts[-1]}); a slice with missing phases leaves holes in the volume curve; send the "
                       "complete series")
    if counts[0] < MIN_PHASES:
        raise BadInput("too_few_phases", f"{what} has {counts[0]} phase(s) per slice; at least {MIN_PHASES} are "
                       "needed to sample end systole; send a cine with more cardiac phases")
    stack_items, times = [], []
    for g in groups:
        g = sorted(g, key=lambda i: finite_float(unique[i][1].get("TriggerTime")))
        t = [finite_float(unique[i][1].get("TriggerTime")) for i in g]
        if np.any(np.diff(t) <= 0):
            raise BadInput("duplicate_trigger_time", f"{what}: two images share one slice position and trigger "
                           "time (two acquisitions in one series?); which to use cannot be decided; send one")
        stack_items.append([unique[i] for i in g])
        times.append(t)
    # Geometry of the stack (spacing regular, positions on a line, photometric, rescale) on one phase.
    stack = check_stack([s[0] for s in stack_items], what=what, min_slices=MIN_SLICES,
                        too_few_reason="too_few_slices", too_few_why="a volume needs several slice positions")
    first = stack_items[0][0][1]
    rr, source = None, "none"
    nominal = finite_float(first.get("NominalInterval"))
    if nominal and nominal > 0:
        rr, source = nominal, "NominalInterval"
    else:
        hr = finite_float(first.get("HeartRate"))
        if hr and hr > 0:
            rr, source = 60000.0 / hr, "HeartRate"
    thickness = finite_float(first.get("SliceThickness"))
    return CineStack(items=stack_items, trigger_ms=np.array(times), spacing_mm=stack.spacing_mm, rows=rows,
                     cols=cols, rr_ms=rr, rr_source=source, slice_thickness_mm=thickness,
                     notes=notes + stack.notes)


def load_cine(stack: CineStack) -> np.ndarray:
    """Pixels (slices, phases, rows, cols) float32, rescaled; MONOCHROME1 inverted so blood is bright."""
    from imaging_tasks.dicom_io import parse
    from imaging_tasks.preconditions import rescale

    out = np.empty((stack.n_slices, stack.n_phases, stack.rows, stack.cols), np.float32)
    for s, row in enumerate(stack.items):
        for p, (path, header) in enumerate(row):
            # Values are left undecoded (parse's decode=False): the files were checked at de-identification and
            # only the pixels are needed here; the pixels are still checked against the declared size.
            ds = parse(Path(path).read_bytes(), decode=False)
            try:
                arr = ds.pixel_array
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types on short pixel data
                raise BadInput("truncated_pixels", f"a cine image's pixel data cannot be decoded "
                               f"({type(exc).__name__}); the file is truncated, re-send it") from None
            if arr.shape != (stack.rows, stack.cols):
                raise BadInput("mixed_geometry", f"a cine image decodes to shape {arr.shape}, not the "
                               f"{stack.rows}x{stack.cols} its header declares; re-export the series")
            slope, intercept = rescale(header, "the cine series")
            img = arr.astype(np.float32) * (1.0 if slope is None else slope)
            img += 0.0 if intercept is None else intercept
            if str(header.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
                img = img.max() - img
            out[s, p] = img
    return out


# --------------------------------------------------------------------------- classical segmentation
def _otsu(values: np.ndarray, bins: int = 256) -> float:
    v = values[np.isfinite(values)]
    hist, edges = np.histogram(v, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    mu0 = m / np.maximum(w0, 1)
    mu1 = (m[-1] - m) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def _shape(mask: np.ndarray, spacing_yx) -> tuple[float, float, np.ndarray]:
    """(fill, elongation, centroid_mm) of a region: fill = area / area of its second-moment ellipse (1 for an
    ellipse, less for a crescent), elongation = major / minor axis."""
    ys, xs = np.nonzero(mask)
    pts = np.stack([ys * spacing_yx[0], xs * spacing_yx[1]], 1)
    c = pts.mean(0)
    if len(pts) < 5:
        return 0.0, 1.0, c
    cov = np.cov((pts - c).T) + np.eye(2) * (spacing_yx[0] * spacing_yx[1]) / 12
    ev = np.clip(np.linalg.eigvalsh(cov), 1e-9, None)
    ellipse_area = 4 * math.pi * math.sqrt(ev[0] * ev[1])
    area = len(pts) * spacing_yx[0] * spacing_yx[1]
    return float(min(area / ellipse_area, 1.5)), float(math.sqrt(ev[1] / ev[0])), c


def _tracks(img: np.ndarray, thr: float, spacing_yx, min_area_mm2: float) -> list[dict]:
    """Bright regions of one slice (phases, rows, cols) followed through the cycle by centroid."""
    from scipy import ndimage

    px = spacing_yx[0] * spacing_yx[1]
    tracks: list[dict] = []
    n_phases = img.shape[0]
    for p in range(n_phases):
        lab, n = ndimage.label(img[p] > thr)
        if not n:
            continue
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * px
        boxes = ndimage.find_objects(lab)
        comps = []
        for r in np.nonzero(sizes >= min_area_mm2)[0]:
            if r == 0:
                continue
            box = boxes[r - 1]
            fill, elong, c = _shape(lab[box] == r, spacing_yx)
            c = c + np.array([box[0].start * spacing_yx[0], box[1].start * spacing_yx[1]])
            comps.append((float(sizes[r]), fill, elong, c))
        # Match regions to tracks by cost (centre distance and area change), best pairs first, so that a ring
        # around the LV (RV and fat joined) whose centroid falls on the LV's cannot take the LV's place.
        pairs = []
        for ci, (area, _f, _e, c) in enumerate(comps):
            radius = math.sqrt(area / math.pi)
            for ti, t in enumerate(tracks):
                d = math.hypot(*(t["sum"] / len(t["phases"]) - c))
                tol = 0.5 * max(radius, t["radius"]) + 3 * max(spacing_yx)
                if d <= tol:
                    pairs.append((d / tol + abs(math.log(area / t["areas"][-1])), ci, ti))
        used_c, used_t = set(), set()
        assignment = {}
        for _cost, ci, ti in sorted(pairs):
            if ci not in used_c and ti not in used_t:
                used_c.add(ci)
                used_t.add(ti)
                assignment[ci] = ti
        for ci, (area, fill, elong, c) in enumerate(comps):
            if ci in assignment:
                best = tracks[assignment[ci]]
            else:
                best = {"phases": [], "areas": [], "fills": [], "elongs": [], "centroids": [], "radius": 0.0,
                        "sum": np.zeros(2)}
                tracks.append(best)
            best["phases"].append(p)
            best["areas"].append(area)
            best["fills"].append(fill)
            best["elongs"].append(elong)
            best["centroids"].append(c)
            best["sum"] = best["sum"] + c
            best["radius"] = max(best["radius"], math.sqrt(area / math.pi))
    for t in tracks:
        areas = np.zeros(n_phases)
        areas[t["phases"]] = t["areas"]
        t["centre"] = np.median(t["centroids"], 0)
        # Over the phases where the region was seen: a region missing in a phase has merged with a neighbour
        # or vanished (apex in systole); either way its area there is unknown, not zero.
        present = np.asarray(t["areas"])
        t["pulsatility"] = float((np.percentile(present, 95) - np.percentile(present, 5)) / present.max())
        t["fill"] = float(np.median(t["fills"]))
        t["elong"] = float(np.median(t["elongs"]))
        t["presence"] = len(t["phases"]) / n_phases
        seedable = (t["presence"] >= 0.75 and t["fill"] >= 0.8 and t["pulsatility"] >= MIN_PULSATILITY
                    and float(np.max(areas)) >= 150.0)
        t["score"] = (t["pulsatility"] * t["fill"] ** 4 * t["presence"] / (1 + max(0.0, t["elong"] - 1.6) ** 2)
                      if seedable else 0.0)
    return tracks


def _correlation(a: dict, b: dict, n_phases: int) -> float:
    """Correlation of two tracks' area curves (phases where a region is missing count as area 0)."""
    x, y = np.zeros(n_phases), np.zeros(n_phases)
    x[a["phases"]] = a["areas"]
    y[b["phases"]] = b["areas"]
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _predicted_track(img: np.ndarray, thr: float, prev: dict, spacing_yx, min_area_mm2: float) -> dict | None:
    """The LV on a slice next to ``prev``'s: the bright region at prev's centre in every phase, no larger than
    prev's there; a track if its area curve correlates with prev's (>= 0.7), else None."""
    n_p = img.shape[0]
    px = spacing_yx[0] * spacing_yx[1]
    centre_px = prev["centre"] / np.array(spacing_yx)
    prev_areas = np.zeros(n_p)
    prev_areas[prev["phases"]] = prev["areas"]
    areas = np.zeros(n_p)
    for p in range(n_p):
        m = _region_at(img[p], thr, centre_px, 0.5 * prev["radius"] / min(spacing_yx))
        if m is not None and m.sum() * px <= 1.1 * prev_areas[p] + 4 * px:
            areas[p] = m.sum() * px
    if areas.max() < min_area_mm2 or areas.std() == 0:
        return None
    if float(np.corrcoef(areas, prev_areas)[0, 1]) < 0.7:
        return None
    phases = [p for p in range(n_p) if areas[p] > 0]
    return {"phases": phases, "areas": [float(areas[p]) for p in phases], "centre": prev["centre"],
            "radius": math.sqrt(areas.max() / math.pi), "fill": 1.0, "elong": 1.0, "presence": len(phases) / n_p,
            "pulsatility": float((areas.max() - areas.min()) / areas.max()), "score": 0.0}


def _region_at(img: np.ndarray, thr: float, centre_px: np.ndarray, max_dist_px: float) -> np.ndarray | None:
    """The bright connected region containing (or nearest to) ``centre_px``; None if none is close."""
    from scipy import ndimage

    lab, n = ndimage.label(img > thr)
    if not n:
        return None
    cy, cx = int(round(centre_px[0])), int(round(centre_px[1]))
    if 0 <= cy < img.shape[0] and 0 <= cx < img.shape[1] and lab[cy, cx]:
        return lab == lab[cy, cx]
    ys, xs = np.nonzero(lab)
    d = np.hypot(ys - centre_px[0], xs - centre_px[1])
    i = int(np.argmin(d))
    if d[i] > max_dist_px:
        return None
    return lab == lab[ys[i], xs[i]]


def _split_leak(mask: np.ndarray, centre_px: np.ndarray, ref_area_px: float) -> np.ndarray:
    """A region grown into a neighbour through a thin bridge: opened until it is no larger than 1.4x the
    reference, keeping the part at the LV centre."""
    from scipy import ndimage

    if mask.sum() <= 1.4 * ref_area_px:
        return mask
    for it in (1, 2):
        opened = ndimage.binary_opening(mask, iterations=it)
        lab, n = ndimage.label(opened)
        if not n:
            break
        cy, cx = int(round(centre_px[0])), int(round(centre_px[1]))
        r = lab[cy, cx] if 0 <= cy < mask.shape[0] and 0 <= cx < mask.shape[1] else 0
        if not r:
            continue
        part = ndimage.binary_dilation(lab == r, iterations=it) & mask
        if part.sum() <= 1.4 * ref_area_px:
            return part
    return mask


def segment_classical(cine: np.ndarray, spacing_mm: tuple[float, float, float]) -> dict:
    """LV blood pool of a (slices, phases, rows, cols) cine: per-pixel blood fractions and per-slice areas.

    Returns ``fractions`` (float32, same shape: partial-volume blood fraction, 0 outside the LV), ``masks``
    (bool: the thresholded region), ``areas_mm2`` (slices, phases), ``centres_px`` per slice (NaN where the LV
    is absent) and per-slice ``levels`` (blood, myocardium intensities).
    """
    from scipy import ndimage

    n_s, n_p = cine.shape[:2]
    sy, sx = spacing_mm[1], spacing_mm[2]
    px_mm2 = sy * sx
    scale = float(np.percentile(cine, 99.5)) or 1.0
    data = cine / scale
    # Regions are found on a 3x3 median-filtered copy: at low SNR single noisy pixels would otherwise bridge the
    # septum or punch holes in the blood pool; the partial-volume fractions use the unfiltered intensities.
    cross = np.zeros((1, 1, 3, 3), bool)
    cross[0, 0, 1, :] = cross[0, 0, :, 1] = True
    smooth = ndimage.median_filter(data, footprint=cross)
    min_area = max(40.0, 4 * px_mm2)

    # 1. Bright regions per slice, followed through the cycle; score round + pulsatile.
    thresholds, all_tracks = [], []
    for s in range(n_s):
        body = smooth[s][smooth[s] > _otsu(smooth[s].ravel())]
        thr = _otsu(body) if body.size > 100 else 0.5
        thresholds.append(thr)
        all_tracks.append(_tracks(smooth[s], thr, (sy, sx), min_area))
    best = [max(ts, key=lambda t: t["score"]) if ts else None for ts in all_tracks]
    scores = [b["score"] if b else 0.0 for b in best]
    s0 = int(np.argmax(scores))
    if scores[s0] <= 0:
        raise BadInput("lv_not_found", "no round, pulsatile blood pool was found in the cine series (is it a "
                       "short-axis stack through the left ventricle?); check the series or use a segmentation model")

    # 2. Follow the LV from the best slice towards base and apex by centre continuity.
    chosen: list[dict | None] = [None] * n_s
    chosen[s0] = best[s0]
    for direction in (1, -1):
        prev = best[s0]
        s = s0 + direction
        while 0 <= s < n_s:
            # The next slice's LV: near the axis, round, and beating with this slice (area curves correlated:
            # fat uncovered by the apex moving in systole beats in antiphase) - or, towards the base of a failing
            # heart whose basal area hardly changes, a region of about the same (large) size.
            largest = max(max(c["areas"]) for c in chosen if c is not None)

            def follows(t, prev=prev, largest=largest):
                near = np.linalg.norm(t["centre"] - prev["centre"]) <= max(12.0, 0.6 * prev["radius"])
                if not near or t["fill"] <= 0.5:
                    return False
                corr = _correlation(t, prev, n_p)
                if t["fill"] > 0.75 and t["pulsatility"] >= FOLLOW_PULSATILITY and corr >= FOLLOW_CORRELATION:
                    return True
                if t["pulsatility"] >= 0.3 and corr >= 0.7 and max(t["areas"]) <= max(prev["areas"]):
                    return True  # the apex: small, ragged in noise and partial volume, but beating in step
                size = max(t["areas"]) / max(prev["areas"])
                return (max(prev["areas"]) >= 0.6 * largest and 0.75 <= size <= 1.4 and t["fill"] >= 0.85
                        and t["presence"] >= 0.9)

            cands = [t for t in all_tracks[s] if follows(t)]
            if not cands:
                break
            t = max(cands, key=lambda t: (t["pulsatility"] + 0.5) * t["presence"]
                    / (1 + np.linalg.norm(t["centre"] - prev["centre"]) / 10))
            chosen[s] = t
            prev = t
            s += direction

        # Past the last followed slice (the apex in noise, where the Otsu regions are ragged): look for the blood
        # pool where the LV axis predicts it, and keep it while it beats in step with the slice before.
        while 0 <= s < n_s and chosen[s] is None:
            t = _predicted_track(smooth[s], thresholds[s - direction], prev, (sy, sx), min_area)
            if t is None:
                break
            chosen[s] = prev = t
            s += direction

    if sum(c is not None for c in chosen) < MIN_LV_SLICES:
        raise BadInput("lv_not_found", "a round, pulsatile blood pool was found on one slice only, not along a "
                       "short-axis stack (is it a short-axis stack through the left ventricle?); check the series "
                       "or use a segmentation model")
    fractions = np.zeros(cine.shape, np.float32)
    masks = np.zeros(cine.shape, bool)
    areas = np.zeros((n_s, n_p))
    centres = np.full((n_s, 2), np.nan)
    levels = [None] * n_s
    for s in range(n_s):
        t = chosen[s]
        if t is None:
            continue
        centre_px = t["centre"] / np.array([sy, sx])
        centres[s] = centre_px
        ref_area_px = max(t["areas"]) / px_mm2
        # 3. Blood and myocardium levels of this slice from the LV region and the ring just outside it.
        regions = []
        for p in range(n_p):
            m = _region_at(smooth[s, p], thresholds[s], centre_px, 0.5 * t["radius"] / min(sy, sx) + 2)
            regions.append(None if m is None else _split_leak(m, centre_px, ref_area_px))
        blood_px, ring_px = [], []
        for p, m in enumerate(regions):
            if m is None:
                continue
            core = ndimage.binary_erosion(m, iterations=1)
            blood_px.append(data[s, p][core if core.any() else m])
            ring = ndimage.binary_dilation(m, iterations=2) & ~ndimage.binary_dilation(m, iterations=1)
            ring_px.append(data[s, p][ring])
        if not blood_px:
            continue
        blood = float(np.median(np.concatenate(blood_px)))
        myo = float(np.median(np.concatenate(ring_px)))
        if blood - myo <= 0.05 * blood:
            continue
        thr = 0.5 * (blood + myo)
        levels[s] = (blood * scale, myo * scale)
        # 4. Final region per phase at the refined threshold, with partial-volume border pixels.
        for p in range(n_p):
            m = _region_at(smooth[s, p], thr, centre_px, 0.5 * t["radius"] / min(sy, sx) + 2)
            if m is not None:
                m = _split_leak(m, centre_px, ref_area_px)
                # Not the LV: larger than the LV ever is on this slice (fat met when the apex leaves the slice
                # in systole), or a speck.
                if m.sum() > 1.25 * ref_area_px + 4 or (m.sum() * px_mm2 < 0.25 * min_area
                                                        and p not in t["phases"]):
                    m = None
            frac = (data[s, p] - myo) / (blood - myo)
            if m is None:
                # Apex in systole: blood only as partial volume, below the midpoint; sum it near the axis.
                yy, xx = np.ogrid[:cine.shape[2], :cine.shape[3]]
                r_px = max(2.0, 0.5 * math.sqrt(min(t["areas"]) / math.pi) / min(sy, sx))
                near = (yy - centre_px[0]) ** 2 + (xx - centre_px[1]) ** 2 <= r_px ** 2
                if frac[near].mean() < 0.2:
                    continue
                region = near & (frac > 0.2)
                f = np.where(region, np.clip(frac, 0.0, 1.0), 0.0)
            else:
                band = ndimage.binary_dilation(m, iterations=1)
                inner = ndimage.binary_erosion(m, iterations=1)
                # Border pixels unclipped: noise averages out instead of biasing the area (clipped at 0 and 1 it
                # would not); the wide limits only stop an odd pixel of fat or lung from counting much.
                f = np.where(inner, 1.0, np.where(band, np.clip(frac, -0.5, 1.5), 0.0))
                masks[s, p] = m
            fractions[s, p] = f
            areas[s, p] = float(f.sum()) * px_mm2
    return {"fractions": fractions, "masks": masks, "areas_mm2": areas, "centres_px": centres, "levels": levels,
            "slices_with_lv": [s for s in range(n_s) if chosen[s] is not None], "best_slice": s0}


# --------------------------------------------------------------------------- model segmentation
def segment_model(cine: np.ndarray, spacing_mm, uri: str, device=None) -> dict:
    """LV blood pool (and myocardium, if the model labels it) from a BYO model: voxel counts, no post-processing."""
    from imaging_tasks.byo_model import segment_frames

    n_s, n_p, ny, nx = cine.shape
    labels, spec = segment_frames(cine.reshape(n_s * n_p, ny, nx).astype(np.float32), spacing_mm[1:], uri,
                                  device=device)
    labels = np.asarray(labels).reshape(n_s, n_p, ny, nx)
    px_mm2 = spacing_mm[1] * spacing_mm[2]
    blood = labels == int(spec.labels["lv_blood_pool"])
    out = {"masks": blood, "fractions": blood.astype(np.float32),
           "areas_mm2": blood.sum(axis=(2, 3)) * px_mm2, "model": spec.record()}
    if "lv_myocardium" in spec.labels:
        myo = labels == int(spec.labels["lv_myocardium"])
        out["myocardium"] = myo
        out["myocardium_areas_mm2"] = myo.sum(axis=(2, 3)) * px_mm2
    return out


# --------------------------------------------------------------------------- QC pictures
def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _qc_curve(path: Path, times_ms: np.ndarray, volumes: np.ndarray, ed: int, es: int, title: str) -> None:
    from PIL import Image, ImageDraw

    w, h, m = 520, 320, 50
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    t_max = float(times_ms.max()) or 1.0
    v_max = float(volumes.max()) * 1.1 or 1.0

    def xy(t, v):
        return m + (w - 2 * m) * t / t_max, h - m - (h - 2 * m) * v / v_max

    d.line([(m, m), (m, h - m), (w - m, h - m)], fill=(0, 0, 0))
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        v = v_max * frac
        d.text((4, xy(0, v)[1] - 6), f"{v:.0f}", fill=(0, 0, 0), font=_font())
    d.text((w // 2 - 40, h - m + 18), "trigger time (ms)", fill=(0, 0, 0), font=_font())
    d.text((w - m - 20, h - m + 4), f"{t_max:.0f}", fill=(0, 0, 0), font=_font())
    d.text((4, 8), title, fill=(0, 0, 0), font=_font())
    pts = [xy(t, v) for t, v in zip(times_ms, volumes)]
    d.line(pts, fill=(30, 60, 200), width=2)
    for i, (x, y) in enumerate(pts):
        colour = (200, 0, 0) if i == ed else (0, 150, 0) if i == es else (30, 60, 200)
        r = 5 if i in (ed, es) else 2
        d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    d.text((pts[ed][0] + 6, pts[ed][1] - 14), "ED", fill=(200, 0, 0), font=_font())
    d.text((pts[es][0] + 6, pts[es][1] + 4), "ES", fill=(0, 150, 0), font=_font())
    img.save(path)


def _qc_montage(path: Path, cine: np.ndarray, masks: np.ndarray, ed: int, es: int, myo=None) -> None:
    """Every slice (columns) at ED (top row) and ES (bottom row), with the blood-pool contour (and myocardium)."""
    from PIL import Image
    from scipy import ndimage

    n_s = cine.shape[0]
    scale = float(np.percentile(cine, 99.5)) or 1.0
    tiles = []
    for p in (ed, es):
        row = []
        for s in range(n_s):
            g = np.clip(cine[s, p] / scale * 255, 0, 255).astype(np.uint8)
            rgb = np.stack([g, g, g], -1)
            m = masks[s, p]
            edge = m & ~ndimage.binary_erosion(m)
            rgb[edge] = (255, 40, 40) if p == ed else (40, 255, 40)
            if myo is not None:
                e2 = myo[s, p] & ~ndimage.binary_erosion(myo[s, p])
                rgb[e2] = (255, 200, 0)
            row.append(rgb)
        tiles.append(np.concatenate(row, 1))
    mont = np.concatenate(tiles, 0)
    zoom = 2 if mont.shape[1] < 1600 else 1
    Image.fromarray(mont).resize((mont.shape[1] * zoom, mont.shape[0] * zoom), Image.NEAREST).save(path)


# --------------------------------------------------------------------------- the step
def lv_function(areas_mm2: np.ndarray, slice_spacing_mm: float) -> dict:
    """Volumes (ml) per phase by disc summation, ED/ES phases, EDV, ESV, SV, EF."""
    volumes = np.asarray(areas_mm2).sum(axis=0) * slice_spacing_mm / 1000.0
    ed, es = int(np.argmax(volumes)), int(np.argmin(volumes))
    edv, esv = float(volumes[ed]), float(volumes[es])
    return {"volumes_ml": volumes, "ed_phase": ed, "es_phase": es, "edv_ml": edv, "esv_ml": esv,
            "sv_ml": edv - esv, "ef_pct": 100.0 * (edv - esv) / edv if edv > 0 else float("nan")}


def _cine_series(files: list[Path]) -> list:
    from imaging_tasks.cardiovascular.series import of_kind

    return of_kind(files, "cine")


def cine_function(files: list[Path], out_dir: Path, *, device=None, previous: dict | None = None,
                  cine_segmentation: str = "classical", cine_model_uri: str | None = None, **_options) -> dict:
    """The chain's cine step: LV volumes per phase, EDV, ESV, SV, EF (and LV mass from a model labelling the
    myocardium) on the study's first cine series; writes cine_volumes.json, qc_cine_volume_curve.png and
    qc_cine_ed_es.png.  A study without a cine series returns no numbers and a note."""
    import time

    t0 = time.monotonic()
    if cine_segmentation not in SEGMENTATIONS:
        raise ConfigError(f"cine_segmentation must be one of {', '.join(SEGMENTATIONS)}, got "
                          f"{cine_segmentation!r}")
    if cine_segmentation == "model" and not cine_model_uri:
        raise ConfigError("cine_segmentation is 'model' but cine_model_uri is not set: give the URI of a "
                          "TorchScript segmentation model (with its JSON beside it) or use 'classical'")
    series = _cine_series([Path(f) for f in files])
    if not series:
        return {"metrics": [], "findings": [], "outputs": [], "note": "no cine series"}
    chosen = series[0]
    stack = check_cine(chosen.items)
    cine = load_cine(stack)
    dz, dy, dx = stack.spacing_mm
    dev_name = "cpu"
    myo_areas = None
    myo_masks = None
    if cine_segmentation == "model":
        from imaging_tasks.device import pick_device

        dev_name = str(pick_device(device))
        seg = segment_model(cine, stack.spacing_mm, cine_model_uri, device=device)
        method = {"segmentation": "model", "model": seg["model"],
                  "volume": "voxel count x voxel volume (no post-processing)"}
        myo_areas = seg.get("myocardium_areas_mm2")
        myo_masks = seg.get("myocardium")
    else:
        seg = segment_classical(cine, stack.spacing_mm)
        method = {"segmentation": "classical",
                  "description": "Otsu bright regions tracked through the cycle; LV = round + pulsatile region "
                                 "on the long axis; per-slice threshold at the blood/myocardium midpoint; border "
                                 "pixels weighted by partial-volume fraction; Simpson disc summation",
                  "slices_with_lv": seg["slices_with_lv"], "lv_mass": "not measured (no myocardium segmentation)",
                  "levels_blood_myocardium": [None if v is None else [float(v[0]), float(v[1])]
                                              for v in seg["levels"]]}
    fn = lv_function(seg["areas_mm2"], dz)
    volumes, ed, es = fn["volumes_ml"], fn["ed_phase"], fn["es_phase"]
    times = stack.trigger_ms.mean(axis=0)
    myo_ml = None if myo_areas is None else np.asarray(myo_areas).sum(axis=0) * dz / 1000.0
    mass_g = None if myo_ml is None or float(myo_ml[ed]) <= 0 else float(myo_ml[ed]) * MYOCARDIUM_G_PER_ML
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _qc_curve(out_dir / "qc_cine_volume_curve.png", times, volumes, ed, es,
              f"LV volume (ml); EDV {fn['edv_ml']:.0f} ESV {fn['esv_ml']:.0f} EF {fn['ef_pct']:.0f}%")
    _qc_montage(out_dir / "qc_cine_ed_es.png", cine, seg["masks"], ed, es, myo_masks)

    rr = stack.rr_ms
    seconds = time.monotonic() - t0
    metrics = [
        {"name": "lv_edv_ml", "value": fn["edv_ml"], "unit": "ml"},
        {"name": "lv_esv_ml", "value": fn["esv_ml"], "unit": "ml"},
        {"name": "lv_sv_ml", "value": fn["sv_ml"], "unit": "ml"},
        {"name": "lv_ef_pct", "value": float(fn["ef_pct"]), "unit": "%"},
    ]
    if mass_g is not None:
        metrics.append({"name": "lv_mass_g", "value": mass_g, "unit": "g"})
    metrics += [
        {"name": "lv_ed_phase", "value": float(ed), "unit": ""},
        {"name": "lv_es_phase", "value": float(es), "unit": ""},
        {"name": "cine_phases", "value": float(stack.n_phases), "unit": ""},
        {"name": "cine_slices", "value": float(stack.n_slices), "unit": ""},
    ]
    if rr:
        metrics.append({"name": "cine_heart_rate_bpm", "value": 60000.0 / rr, "unit": "bpm"})
    metrics.append({"name": "cine_seconds", "value": seconds, "unit": "s"})
    findings = []
    for p in range(stack.n_phases):
        row = {"kind": "lv_phase_volume", "index": p, "trigger_time_ms": float(times[p]),
               "volume_ml": float(volumes[p])}
        if myo_ml is not None:
            row["myocardium_ml"] = float(myo_ml[p])
        findings.append(row)
    table = {
        "series": {"number": chosen.number, "slices": stack.n_slices, "phases": stack.n_phases,
                   "spacing_mm": list(stack.spacing_mm), "slice_thickness_mm": stack.slice_thickness_mm,
                   "rr_ms": rr, "rr_source": stack.rr_source, "preconditions": stack.notes,
                   "other_cine_series": [s.number for s in series[1:]]},
        "method": method,
        "edv_ml": fn["edv_ml"], "esv_ml": fn["esv_ml"], "sv_ml": fn["sv_ml"], "ef_pct": fn["ef_pct"],
        "ed_phase": ed, "es_phase": es,
        "lv_mass_g": mass_g,
        "volumes_ml": [float(v) for v in volumes],
        "myocardium_ml": None if myo_ml is None else [float(v) for v in myo_ml],
        "trigger_times_ms": [float(t) for t in times],
        "areas_mm2": np.round(np.asarray(seg["areas_mm2"], float), 3).tolist(),  # [slice][phase]
        "seconds": seconds,
    }
    (out_dir / "cine_volumes.json").write_text(json.dumps(table, indent=1))
    log.info("cine LV function: series %s, %d slices x %d phases, %s segmentation, ED phase %d, ES phase %d, "
             "%.1f s", chosen.number, stack.n_slices, stack.n_phases, cine_segmentation, ed, es, seconds)
    return {"metrics": metrics, "findings": findings,
            "outputs": ["cine_volumes.json", "qc_cine_volume_curve.png", "qc_cine_ed_es.png"], "device": dev_name}
