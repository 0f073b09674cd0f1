"""Brain tissue segmentation of a bias-corrected T1: intracranial mask, GM/WM/CSF partial-volume fractions, brain.

Why a tissue model rather than a brain threshold: a threshold between "tissue" and "dark" puts the brain
boundary wherever the CSF around the brain happens to fall relative to it.  On an independently built head
with brighter CSF (issue 20) the old contour ran along the outer edge of the CSF envelope: brain +12 %.

1. **Levels, read where each tissue is.**  A rough brain (a third of the white-matter level, 4 mm erosion to
   cut it free of the scalp, largest component, grown back): white matter is the median of its eroded upper
   intensities, the noise sd the robust spread of neighbour differences there.  The parenchyma seed is the
   same extraction at 0.45 x white matter (T1: CSF <= 0.35, grey matter >= 0.55); grey matter is the
   intensity mode 2-4 mm inside the seed's surface (the cortical ribbon).  Read in space rather than fitted
   to the histogram: where tissue boundaries are blurred there is little pure grey matter or CSF, and
   mixture fits put those levels 5-15 % off (the brain volume 5-10 %).
2. **Intracranial space.**  Around the seed, inside the head, the dark voxels (lightly smoothed) are CSF and
   bone: bone is their 5th percentile, CSF their mode or the peak or shoulder above the bone
   (:func:`band_levels`).  CSF voxels within ``BAND_MM`` of the seed and connected to it are added down to
   40 % of the way from the bone level to the CSF level, holes filled.  A voxel half CSF, half bone sits at
   the midpoint, so the boundary follows the inner skull table whatever the CSF thickness (1-5 mm) or the
   skull and scalp brightness; 40 % rather than 50 % because the blur of the dark table pulls the outermost
   CSF voxels down (on the phantoms the midpoint under-counted by 1 % on average, up to 3.5 % behind bright
   marrow).  An opening of ``OPEN_MM`` that keeps the main body cuts leaks through a thin inner table into
   the marrow (diploe); bright voxels away from the seed (scalp, muscle, marrow, optic nerves) never carry
   the growth.
3. **Fractions.**  States along the T1 path bone -> CSF -> GM -> WM (one mixed pair at a time, 5 % steps,
   means from the levels); their prior weights are learned from the intracranial histogram with the measured
   noise sd (EM on the weights alone, on torch: a deconvolution, so neither many pure voxels nor uniform
   mixing is assumed).  A voxel's fractions are its posterior-expected state; bone partial volume at the
   mask's edge counts as CSF.
4. **Spatial prior.**  A voxel where CSF meets a mix of grey and white matter (cortex thinner than a voxel,
   or a blurred boundary) has the intensity of pure grey matter and would count as all parenchyma.  So the
   parenchymal end of each CSF/GM mixture is the local parenchyma, with the white-matter share of the
   voxel's neighbourhood (Gaussian, ``LOCAL_SIGMA_MM``; two passes).  On heads with sharp boundaries this
   under-counts by 1-2 %; without it, heads whose fractions are blurred (population probability maps used
   as fractions) over-count by 3-5 %.

Volumes are partial-volume sums (fraction x voxel volume); the intracranial volume is the mask's.  The brain
mask is the largest connected component of GM + WM >= 0.5: ventricles and sulcal CSF stay out.

Limits: T1 contrast (WM > GM > CSF > bone) with the CSF darker than 0.45 of white matter and brighter than
the bone next to it (cortical bone has no signal on T1).  One CSF brightness: it is read around the brain,
so CSF inside the brain that is brighter than the envelope (not seen on real scans; the project's synthetic
heads have it) reads as partial volume.  Voxels where CSF meets white matter directly (ventricle walls)
read partly as grey matter; lesions, blood or contrast agent are classified by intensity like any tissue.
Deep white matter counts as pure parenchyma: a few per cent of "CSF" spread through it (as population
probability maps have) cannot be seen in one image.  A thin inner skull table (about one voxel) in front of
bright marrow, with thin CSF and high noise, can still move the intracranial boundary by a voxel.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from imaging_tasks.errors import BadInput

END_MEMBERS = ("bone", "csf", "gm", "wm")  # in T1 order
PATH_STEP = 0.05  # fraction step of the path states
ROUGH_FRACTION = 0.33  # first brain: a third of the white-matter level (CSF and bone below, cortex above)
SEED_WM_FRACTION = 0.45  # parenchyma seed: between CSF (<= 0.35 of WM on T1) and grey matter (>= 0.55)
CORTEX_DEPTH_MM = (2.0, 4.0)  # where the grey-matter level is read: this deep inside the parenchyma's surface
ERODE_MM = 4.0  # cuts scalp, optic nerves and bridges through the skull
BAND_MM = 8.0  # how far outside the parenchyma seed the CSF can reach (envelope <= ~5 mm, partial volume)
ICV_CUT = 0.4  # the intracranial boundary: this far from the bone level to the CSF level
LEVEL_BAND_MM = 15.0  # how far out the bone and CSF levels are read (CSF <= 5 mm, then the whole skull)
BAND_SMOOTH_MM = 0.7  # Gaussian sigma of the intensities the intracranial boundary is decided on (noise)
OPEN_MM = 2.0  # opening radius of the intracranial mask (at least 1.5 voxels)
LOCAL_SIGMA_MM = 1.5  # neighbourhood of the local parenchyma composition
LOCAL_PASSES = 2
MIN_ICV_ML = 300.0  # below this the "head" is a failure of extraction or not a head at all


@dataclass
class BrainSegmentation:
    """Masks (uint8) and fractions (float32, summing to 1 inside ``icv``) on the T1 grid; volumes in ml."""

    brain: sitk.Image  # parenchyma: largest component of GM + WM >= 0.5
    icv: sitk.Image  # brain + CSF up to the inner skull table
    gm: sitk.Image
    wm: sitk.Image
    csf: sitk.Image
    volumes_ml: dict[str, float]  # grey_matter, white_matter, csf, brain (= GM + WM), intracranial
    model: dict = field(default_factory=dict)  # fitted levels (relative to WM), noise, thresholds, timings


# --------------------------------------------------------------------------- array helpers
def largest_component(mask: np.ndarray, full_connectivity: bool = False) -> np.ndarray:
    structure = np.ones((3, 3, 3), bool) if full_connectivity else None
    labels, n = ndi.label(mask, structure=structure)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def otsu(values: np.ndarray, bins: int = 256) -> float:
    lo, hi = np.percentile(values, [0.5, 99.5])
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi + 1e-6))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    return float(centres[int(np.argmax(w0 * w1 * (mu0 - mu1) ** 2))])


def bright_level(values: np.ndarray) -> float:
    """White-matter level: median of the upper Otsu class (white matter, fat) of tissue intensities.

    The median of an Otsu class rather than the histogram mode, because grey matter can outnumber white matter.
    """
    upper = values[values > otsu(values)]
    return float(np.median(upper)) if upper.size else float(np.median(values))


def distance_to(target: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from every voxel to the nearest ``target`` voxel, 0 on it; ``spacing`` in (z, y, x) order.

    SimpleITK's Maurer transform: the same distances as scipy's exact transform, multi-threaded (4x faster
    on 2 cores).
    """
    img = sitk.GetImageFromArray(np.asarray(target, dtype=np.uint8))
    img.SetSpacing(tuple(float(v) for v in np.asarray(spacing)[::-1]))
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True,
                                        backgroundValue=0)
    return np.maximum(sitk.GetArrayFromImage(dist), 0)


def erode(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    return distance_to(~mask, spacing) > radius_mm


def dilate(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    return distance_to(mask, spacing) <= radius_mm


def _extract(arr: np.ndarray, threshold: float, spacing, fill: bool = True) -> np.ndarray:
    """Above ``threshold``, eroded free of the scalp, largest component, grown back inside the threshold."""
    tissue = arr > threshold
    core = largest_component(erode(tissue, ERODE_MM, spacing))
    grown = dilate(core, ERODE_MM, spacing) & tissue
    return ndi.binary_fill_holes(grown) if fill else grown


def noise_sd(arr: np.ndarray, mask: np.ndarray) -> float:
    """Noise sd from differences of in-plane neighbours inside ``mask`` (MAD: robust to the odd edge)."""
    diffs = []
    for axis in (1, 2):
        a, m = np.swapaxes(arr, 0, axis), np.swapaxes(mask, 0, axis)
        both = m[1:] & m[:-1]
        diffs.append((a[1:] - a[:-1])[both])
    d = np.concatenate(diffs)
    if d.size < 100:
        raise BadInput("no_brain_found", "no white-matter core was found to measure the noise on; the series is "
                       "probably not a T1 of the head")
    return float(np.median(np.abs(d - np.median(d))) / 0.6745 / np.sqrt(2))


def _smoothing_noise_factor(sigma_vox) -> float:
    """How much a Gaussian filter of ``sigma_vox`` (per axis, voxels) scales the sd of white noise."""
    delta = np.zeros((9, 9, 9))
    delta[4, 4, 4] = 1.0
    return float(np.sqrt((ndi.gaussian_filter(delta, sigma_vox) ** 2).sum()))


# --------------------------------------------------------------------------- intracranial space
def band_levels(values: np.ndarray, noise: float, gm_level: float) -> tuple[float, float]:
    """Bone and CSF levels of the dark voxels around the parenchyma (smoothed intensities).

    Bone: the 5th percentile (the darkest tissue there).  CSF, on the histogram up to the bone/GM midpoint
    (CSF/GM and CSF/bone partial-volume voxels spread to both sides of the CSF level):

    * the histogram's mode, when it lies clearly above the bone (a thick envelope: most dark voxels are CSF,
      even where bone and CSF overlap in the noise);
    * else, the mode being bone: the highest peak above bone + 2 noise sd that rises clearly above the dip
      before it; failing that (a thin envelope is only a shoulder on the bone peak) the maximum of what is
      left once a Gaussian matched to the bone peak's dark side is taken away.
    """
    bone = float(np.percentile(values, 5))
    hi = (bone + gm_level) / 2
    lo = float(np.percentile(values, 0.5))
    sel = values[(values >= lo) & (values < hi)]
    csf = bone + 2 * noise
    if sel.size < 50 or hi <= csf:
        return bone, csf
    bins = int(np.clip((hi - lo) / max(noise / 2, 1e-12), 32, 400))
    hist, edges = np.histogram(sel, bins=bins, range=(lo, hi))
    x = (edges[:-1] + edges[1:]) / 2
    h = ndi.gaussian_filter1d(hist.astype(float), 1.5, mode="constant")
    mode = int(np.argmax(h))
    if x[mode] > bone + 1.5 * noise:
        return bone, float(x[mode])
    above = x > bone + 2 * noise
    dip = np.minimum.accumulate(np.where(above, h, np.inf))
    peaks = [i for i in range(1, bins - 1)
             if above[i] and h[i] > h[i - 1] and h[i] >= h[i + 1] and h[i] >= 1.1 * dip[i]]
    if peaks:
        return bone, float(x[max(peaks, key=lambda i: h[i])])
    darker = np.flatnonzero(h[:mode] < h[mode] * np.exp(-0.5))
    width = max(float(x[mode] - x[darker[-1]]), noise) if darker.size else noise
    rest = np.where(above, h - h[mode] * np.exp(-0.5 * ((x - x[mode]) / width) ** 2), -np.inf)
    return bone, max(csf, float(x[int(np.argmax(rest))]))


def intracranial_mask(arr: np.ndarray, seed: np.ndarray, head: np.ndarray, gm_level: float, noise: float,
                      spacing) -> tuple[np.ndarray, dict]:
    """Parenchyma seed + the CSF around it up to the inner skull table (module docstring, step 2)."""
    sigma_vox = BAND_SMOOTH_MM / np.asarray(spacing)
    smooth = ndi.gaussian_filter(arr, sigma=sigma_vox)
    dist = distance_to(seed, spacing)
    band = (dist > 0) & (dist <= BAND_MM)
    # the levels are read farther out too (the whole skull, under a thick CSF envelope), but there only inside
    # the head: air (as dark as bone, or darker) can lie that far out, not within the band
    inside = erode(ndi.binary_fill_holes(head), 2.0, spacing)
    dark = (dist > 0) & ((dist <= BAND_MM) | ((dist <= LEVEL_BAND_MM) & inside)) & (smooth < gm_level)
    if dark.sum() < 200:
        raise BadInput("no_brain_found", "no dark CSF/bone layer around the brain was found; the series is "
                       "probably not a T1 of the whole head (or is skull-stripped with a bright background)")
    bone, csf = band_levels(smooth[dark], noise * _smoothing_noise_factor(sigma_vox), gm_level)
    threshold = bone + ICV_CUT * (csf - bone)
    seed_floor = float(np.percentile(arr[seed], 1))
    # near the parenchyma a tissue-bright voxel is cortex the seed missed; farther out it is scalp or marrow
    grow = band & (smooth >= threshold) & ((smooth < seed_floor) | (dist <= 2.0))
    labels, _n = ndi.label(grow | seed)
    keep = np.unique(labels[seed])
    grown = ndi.binary_fill_holes(np.isin(labels, keep[keep > 0]))
    # Opening that keeps the main body: a gap in a thin inner table (noise, or bright marrow behind it) lets
    # the growth into the diploe; such channels are thinner than twice the radius and vanish on erosion.
    radius = max(OPEN_MM, 1.5 * float(np.max(spacing)))
    core = largest_component(erode(grown, radius, spacing))
    icv = ndi.binary_fill_holes(dilate(core, radius, spacing) & grown) if core.any() else grown
    return icv, {"bone": bone, "csf": csf, "icv_threshold": threshold}


def cortex_level(arr: np.ndarray, seed: np.ndarray, spacing, noise: float) -> float:
    """Grey-matter level: the intensity mode 2-4 mm inside the parenchyma's surface (the cortical ribbon).

    Below the CSF partial volume of the surface layer, above the white matter under the ribbon.  Read
    spatially because the histogram's grey-matter peak is fragile: where tissue boundaries are blurred
    there is little pure grey matter, and a mixture fit put the level 15 % off.
    """
    depth = distance_to(~seed, spacing)
    ribbon = arr[seed & (depth > CORTEX_DEPTH_MM[0]) & (depth <= CORTEX_DEPTH_MM[1])]
    if ribbon.size < 100:
        raise BadInput("no_brain_found", "no cortical ribbon was found; the series is probably not a T1 of the head")
    hist, edges = np.histogram(ribbon, bins=400)
    peak = int(np.argmax(ndi.gaussian_filter1d(hist.astype(float), max(1.0, noise / (edges[1] - edges[0])))))
    return float(edges[peak] + edges[peak + 1]) / 2


# --------------------------------------------------------------------------- mixture model (torch)
def path_states(step: float = PATH_STEP) -> np.ndarray:
    """(bone, csf, gm, wm) fractions along the T1 path bone -> CSF -> GM -> WM, one mixed pair at a time."""
    t = np.round(np.arange(-1, 2 + step / 2, step), 6)
    bone = np.clip(-t, 0, 1)
    wm = np.clip(t - 1, 0, 1)
    gm = np.clip(np.minimum(t, 2 - t), 0, 1)
    return np.stack([bone, 1 - bone - gm - wm, gm, wm], 1)


def deconvolve(values: np.ndarray, levels: np.ndarray, sigma: float, device, iterations: int = 200,
               bins: int = 400) -> np.ndarray:
    """Prior weights of the path states (levels fixed, noise ``sigma``) that best explain the histogram (EM)."""
    import torch

    lo, hi = np.percentile(values, [0.02, 99.98])
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    x = torch.as_tensor((edges[:-1] + edges[1:]) / 2, dtype=torch.float64, device=device)
    h = torch.as_tensor(hist, dtype=torch.float64, device=device)
    m = torch.as_tensor(path_states() @ levels, dtype=torch.float64, device=device)
    loglik = -0.5 * ((x[:, None] - m[None, :]) / sigma) ** 2
    w = torch.full((m.shape[0],), 1.0 / m.shape[0], dtype=torch.float64, device=device)
    for _ in range(iterations):
        r = torch.softmax(loglik + torch.log(w.clamp(min=1e-12))[None, :], dim=1) * h[:, None]
        w = r.sum(0) / h.sum()
    return w.cpu().numpy()


def posterior_fractions(values: np.ndarray, levels: np.ndarray, sigma: float, weights: np.ndarray,
                        wm_share: np.ndarray | None, device, chunk: int = 400_000) -> np.ndarray:
    """Posterior-expected (CSF + bone, GM, WM) fractions of each voxel over the path states.

    With ``wm_share`` (white-matter share of the parenchyma around each voxel), the parenchymal end of the
    CSF/GM mixtures is that local parenchyma (module docstring, step 4).
    """
    import torch

    f4 = torch.as_tensor(path_states(), dtype=torch.float32, device=device)
    lv = torch.as_tensor(levels, dtype=torch.float32, device=device)
    base = f4 @ lv
    log_w = torch.log(torch.as_tensor(weights, dtype=torch.float32, device=device).clamp(min=1e-12))
    f3 = torch.stack([f4[:, 0] + f4[:, 1], f4[:, 2], f4[:, 3]], 1)  # bone counts as CSF inside the mask
    a = f4[:, 2] * ((f4[:, 1] > 0) & (f4[:, 2] > 0)).to(torch.float32)  # GM fraction of the CSF/GM mixtures
    move = torch.tensor([0.0, -1.0, 1.0], device=device)
    out = np.empty((values.size, 3), dtype=np.float32)
    for start in range(0, values.size, chunk):
        x = torch.as_tensor(values[start:start + chunk], dtype=torch.float32, device=device)
        if wm_share is None:
            m, frac = base[None, :], f3[None, :, :].expand(x.numel(), -1, -1)
        else:
            r = torch.as_tensor(wm_share[start:start + chunk], dtype=torch.float32, device=device)[:, None]
            m = base[None, :] + a[None, :] * r * (lv[3] - lv[2])
            frac = f3[None, :, :] + (a[None, :] * r)[:, :, None] * move
        post = torch.softmax(log_w[None, :] - 0.5 * ((x[:, None] - m) / float(sigma)) ** 2, dim=1)
        out[start:start + chunk] = torch.einsum("vs,vsk->vk", post, frac).cpu().numpy()
    return out


def _local_wm_share(frac: np.ndarray, index: np.ndarray, shape, spacing) -> np.ndarray:
    """White-matter share of the parenchyma in a Gaussian neighbourhood of each voxel (normalised convolution)."""
    sigma = LOCAL_SIGMA_MM / np.asarray(spacing)
    out = []
    for values in (frac[:, 1] + frac[:, 2], frac[:, 2]):
        vol = np.zeros(int(np.prod(shape)), dtype=np.float32)
        vol[index] = values
        out.append(ndi.gaussian_filter(vol.reshape(shape), sigma).ravel()[index])
    return np.clip(out[1] / np.maximum(out[0], 1e-3), 0, 1)


# --------------------------------------------------------------------------- the segmentation
def segment_brain(t1_n4: sitk.Image, *, device=None) -> BrainSegmentation:
    """GM/WM/CSF fractions, intracranial and brain masks and volumes of an N4-corrected T1 (module docstring)."""
    import torch

    dev = torch.device("cpu") if device is None else torch.device(str(device))
    started = time.perf_counter()
    arr = sitk.GetArrayFromImage(t1_n4).astype(np.float32)
    spacing = np.array(t1_n4.GetSpacing()[::-1], dtype=float)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    head = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.Cast(t1_n4, sitk.sitkFloat32), 0, 1, 200)) > 0
    if head.sum() < 100:
        raise BadInput("no_brain_found", "the T1 image has no foreground; check that the series is not blank")

    # 1.-2. rough brain -> white matter and noise -> parenchyma seed -> grey matter -> intracranial space
    rough = _extract(arr, ROUGH_FRACTION * bright_level(arr[head]), spacing)
    if rough.any():
        rough = _extract(arr, ROUGH_FRACTION * bright_level(arr[rough]), spacing)
    if rough.sum() * voxel_ml < MIN_ICV_ML / 2:
        raise BadInput("no_brain_found", f"no brain-sized region found ({rough.sum() * voxel_ml:.0f} ml); the "
                       "series is probably not a T1 of the head")
    # white matter: the core of the upper intensities, eroded off the grey/white border
    wm_core = erode(rough & (arr > np.percentile(arr[rough], 60)), 3.0, spacing)
    if wm_core.sum() < 100:
        raise BadInput("no_brain_found", "no white-matter core was found; the series is probably not a T1 of "
                       "the head")
    wm_level = float(np.median(arr[wm_core]))
    # noise from neighbour differences in the white-matter core (smooth there: what differs is noise)
    noise = noise_sd(arr, wm_core)
    seed = _extract(arr, SEED_WM_FRACTION * wm_level, spacing, fill=False)
    gm_level = cortex_level(arr, seed, spacing, noise)
    icv, found = intracranial_mask(arr, seed, head, gm_level, noise, spacing)
    if icv.sum() * voxel_ml < MIN_ICV_ML:
        raise BadInput("no_brain_found", f"the intracranial space found is {icv.sum() * voxel_ml:.0f} ml "
                       f"(< {MIN_ICV_ML:.0f} ml); the series is probably not a T1 of the head")
    t_icv = time.perf_counter()

    # 3.-4. state weights, fractions with the local parenchyma composition
    index = np.flatnonzero(icv.ravel())
    values = arr.ravel()[index]
    levels = np.array([found["bone"], found["csf"], gm_level, wm_level])
    weights = deconvolve(values.astype(np.float64), levels, noise, dev)
    frac = posterior_fractions(values, levels, noise, weights, None, dev)
    for _ in range(LOCAL_PASSES):
        frac = posterior_fractions(values, levels, noise, weights, _local_wm_share(frac, index, arr.shape, spacing),
                                   dev)

    maps = np.zeros((3, arr.size), dtype=np.float32)
    maps[:, index] = frac.T
    maps = maps.reshape((3,) + arr.shape)
    brain = largest_component((maps[1] + maps[2]) >= 0.5, full_connectivity=True)
    vols = {name: float(maps[k].sum(dtype=np.float64)) * voxel_ml
            for k, name in enumerate(("csf", "grey_matter", "white_matter"))}
    vols["brain"] = vols["grey_matter"] + vols["white_matter"]
    vols["intracranial"] = float(icv.sum()) * voxel_ml
    wm = float(levels[3])
    model = {
        "levels_relative_to_wm": {k: float(v) / wm for k, v in zip(END_MEMBERS, levels)},
        "noise_sd_relative_to_wm": noise / wm,
        "icv_threshold_relative_to_wm": found["icv_threshold"] / wm,
        "seconds": {"intracranial": round(t_icv - started, 3), "total": round(time.perf_counter() - started, 3)},
    }
    return BrainSegmentation(brain=_like(brain.astype(np.uint8), t1_n4), icv=_like(icv.astype(np.uint8), t1_n4),
                             gm=_like(maps[1], t1_n4), wm=_like(maps[2], t1_n4), csf=_like(maps[0], t1_n4),
                             volumes_ml=vols, model=model)


def _like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img
