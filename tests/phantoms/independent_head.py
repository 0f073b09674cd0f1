"""A second family of T1 head phantoms, built independently of :mod:`imaging_tasks.neuroimaging.synth`.

Why a second family: brain extraction tuned on one generator matched that generator (Dice 0.993) and missed
an independently built head (Dice 0.943, brain volume +12 %, issue 20).  Nothing here is shared with the
synth's code, and the head is made differently on purpose:

* tissue model: the T1 is a linear mix of grey- and white-matter fractions from the nilearn MNI152
  probability maps (1 mm) and CSF (the rest of the intracranial space), with intensities of each member's
  own (GM 0.55-0.70, WM 0.90-1.0, CSF 0.08-0.25 relative) and a smooth +-3 % texture per tissue; the synth
  instead pastes the MNI152 T1 template's own intensities.  The maps are population averages (deep white
  matter still "a few per cent CSF", most cortex a three-tissue mix): some members use them as they are
  (as the issue-20 phantom did), others sharpen them to a single head's boundaries (``sharpness``);
* the intracranial space is a Gaussian hull of the brain (sulci filled) grown by a CSF envelope whose
  thickness varies smoothly over the head between 1 and 5 mm; then a skull (optionally with bright marrow,
  the diploe, in its middle third) and a scalp of each member's thickness and brightness; optionally eyes
  (vitreous as dark as CSF) in orbital fat outside the skull;
* the image is blurred by a Gaussian point-spread function of the voxel size and sampled on an
  anisotropic axial, sagittal or coronal grid after a rotation of a few degrees about each axis and a
  per-axis head scale;
* a third-order polynomial or sum-of-Gaussians bias field spanning 1 -+ 5-20 %, Rician noise 1-4 % of
  white matter, stored as uint16 with or without a RescaleSlope, written by this module's own DICOM writer.

Truth, on the series grid and by construction: the GM + WM fraction (the same blur and resampling as the
image), so parenchyma = its partial-volume sum and the brain mask = GM + WM >= 0.5; the intracranial fraction
(brain + CSF inside the inner skull table); CSF = intracranial - GM - WM; GM and WM volumes split the
parenchyma in their template proportions.  :data:`FAMILY` is what the tests run (1.5-2 mm grids, ~10 s a
member); :data:`ISSUE20_1MM` is the issue's head at its 1.0 x 1.0 x 1.2 mm (~60 s).

Limits: CSF is brighter than the skull in every member (as on T1 scans: cortical bone has no signal); the
brain is cut at the bottom of the MNI152 grid (lower brainstem), where skull and scalp close under it.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import warnings

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MARGIN_MM = 34  # template room around the brain: CSF <= 5, skull <= 9, scalp <= 9 mm, eyes in front
# Sagittal: rows run anterior -> posterior, columns superior -> inferior; coronal: right -> left, S -> I.
ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclasses.dataclass(frozen=True)
class Head:
    """One member of the family; relative T1 intensities are fractions of white matter ~1."""

    name: str
    seed: int
    voxel_mm: tuple[float, float, float]  # along the row direction, the column direction, between slices
    sharpness: float = 2.0  # tissue fractions ~ MNI probability ** sharpness, renormalised (1: the raw maps)
    orientation: str = "axial"
    csf_mm: float = 3.0  # mean thickness of the CSF envelope beyond the brain's hull
    csf_variation: float = 0.0  # relative, smooth over the head (thickness kept within 1-5 mm)
    skull_mm: float = 6.0
    scalp_mm: float = 5.0
    gm: float = 0.62
    wm: float = 0.95
    csf: float = 0.15
    skull: float = 0.05
    scalp: float = 0.9
    diploe: float | None = None  # relative T1 of marrow in the middle third of the skull (None: none)
    eyes: bool = False
    bias: str = "polynomial"  # or "gaussians"
    bias_amplitude: float = 0.15  # the field spans 1 - a .. 1 + a over the head
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # head size per template axis
    noise: float = 0.02  # Rician sigma relative to white matter
    white_stored: float = 2000.0  # stored signal of white matter (before any RescaleSlope)
    rescale_slope: float | None = None  # written as RescaleSlope (stored = value / slope) when given


FAMILY = (
    # the head of issue 20 (raw probability maps, 3 mm CSF, +-15 % polynomial bias, rotated), on a 1.5 x 1.5 x
    # 1.8 mm grid (the issue's 1:1.2 anisotropy; ISSUE20_1MM is its 1.0 x 1.0 x 1.2 mm original)
    Head("issue20", 20, (1.5, 1.5, 1.8), sharpness=1.0, csf_mm=3.0, skull_mm=6.0, scalp_mm=5.0, gm=0.62, wm=0.95,
         csf=0.18, skull=0.05, scalp=1.0, bias="polynomial", bias_amplitude=0.15, rotation_deg=(3.0, -4.0, 2.5),
         scale=(0.97, 0.95, 0.96), noise=0.02),
    Head("thin-csf", 31, (1.5, 1.5, 1.5), sharpness=2.0, csf_mm=1.0, csf_variation=0.3, skull_mm=4.5, scalp_mm=7.0,
         gm=0.70, wm=1.00, csf=0.25, skull=0.02, scalp=1.2, bias="gaussians", bias_amplitude=0.20,
         rotation_deg=(-2.0, 3.0, -5.0), scale=(0.92, 0.94, 0.90), noise=0.04),
    Head("thick-csf-bright-skull", 42, (1.5, 1.5, 2.0), sharpness=3.0, csf_mm=4.5, csf_variation=0.15, skull_mm=8.0,
         scalp_mm=4.0, gm=0.58, wm=0.93, csf=0.25, skull=0.15, scalp=0.6, bias="polynomial", bias_amplitude=0.20,
         rotation_deg=(4.0, 2.0, 3.0), scale=(0.90, 0.88, 0.91), noise=0.01),
    Head("sagittal-diploe", 53, (1.6, 1.6, 2.0), sharpness=2.0, orientation="sagittal", csf_mm=2.5, csf_variation=0.5,
         skull_mm=7.0, scalp_mm=6.0, gm=0.64, wm=0.97, csf=0.20, skull=0.06, scalp=0.8, diploe=0.45, eyes=True,
         bias="gaussians", bias_amplitude=0.10, rotation_deg=(-3.0, -2.0, 4.0), scale=(0.95, 0.97, 0.93),
         noise=0.03, rescale_slope=0.5),
    Head("coronal-dim", 64, (1.8, 1.8, 1.4), sharpness=1.5, orientation="coronal", csf_mm=4.0, csf_variation=0.25,
         skull_mm=5.0, scalp_mm=8.0, gm=0.55, wm=0.90, csf=0.10, skull=0.03, scalp=1.1, bias="polynomial",
         bias_amplitude=0.05, rotation_deg=(2.0, 5.0, -3.0), scale=(0.89, 0.92, 0.94), noise=0.025),
    Head("coarse-eyes", 75, (2.0, 2.0, 2.0), sharpness=1.0, csf_mm=2.0, csf_variation=0.5, skull_mm=6.5, scalp_mm=5.5,
         gm=0.66, wm=0.92, csf=0.12, skull=0.04, scalp=0.7, eyes=True, bias="gaussians", bias_amplitude=0.18,
         rotation_deg=(-4.0, 4.0, 2.0), scale=(1.0, 0.98, 1.02), noise=0.015, white_stored=900.0,
         rescale_slope=0.25),
)
ISSUE20_1MM = dataclasses.replace(FAMILY[0], name="issue20-1mm", voxel_mm=(1.0, 1.0, 1.2))  # ~60 s: not in tests
MEMBERS = {h.name: h for h in (*FAMILY, ISSUE20_1MM)}


# --------------------------------------------------------------------------- template-space anatomy
@functools.lru_cache(maxsize=1)
def _template() -> dict:
    """MNI152 1 mm GM/WM maps, cropped with a margin; the brain's hull; distance outside it (mm)."""
    from nilearn import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm_img = datasets.load_mni152_gm_template(resolution=1)
        wm_img = datasets.load_mni152_wm_template(resolution=1)
    affine = np.asarray(gm_img.affine, dtype=float)
    if not np.allclose(affine[:3, :3], np.eye(3)) or not np.allclose(wm_img.affine, affine):
        raise RuntimeError("expected nilearn's MNI152 1 mm maps on one axis-aligned 1 mm grid")
    gm = np.clip(np.asarray(gm_img.dataobj, dtype=np.float32), 0, 1)
    wm = np.clip(np.asarray(wm_img.dataobj, dtype=np.float32), 0, 1)
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    support = (gm + wm) > 0.05
    lo = np.argwhere(support).min(0) - MARGIN_MM
    hi = np.argwhere(support).max(0) + MARGIN_MM + 1
    pad = [(max(0, -a), max(0, b - n)) for a, b, n in zip(lo, hi, gm.shape)]
    crop = tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, gm.shape))
    gm, wm, support = (np.pad(x[crop], pad) for x in (gm, wm, support))
    origin_ras = affine[:3, 3] + lo  # 1 mm voxels: index lo is the new first voxel
    # Hull: the brain with its sulci filled (Gaussian blur of the support at half height), no holes.
    blurred = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(support.astype(np.float32)), 3.0)
    hull = ndi.binary_fill_holes(sitk.GetArrayFromImage(blurred) >= 0.5) | support
    gm[~hull] = 0
    wm[~hull] = 0
    distance = sitk.SignedMaurerDistanceMap(sitk.GetImageFromArray(hull.astype(np.uint8)), insideIsPositive=False,
                                            squaredDistance=False, useImageSpacing=True, backgroundValue=0)
    outside_mm = np.maximum(sitk.GetArrayFromImage(distance), 0).astype(np.float32)
    return {"gm": gm, "wm": wm, "outside_mm": outside_mm, "origin_ras": origin_ras}


def _to_sitk(arr_ijk: np.ndarray, origin_ras: np.ndarray) -> sitk.Image:
    """A (i: R, j: A, k: S) 1 mm array as a SimpleITK image in LPS."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_ijk.transpose(2, 1, 0), dtype=np.float32))
    img.SetSpacing((1.0, 1.0, 1.0))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    img.SetOrigin((-float(origin_ras[0]), -float(origin_ras[1]), float(origin_ras[2])))
    return img


def _waves(rng: np.random.Generator, shape, wavelength_mm: float, n: int = 8, step: int = 3) -> np.ndarray:
    """A smooth random field in [-1, 1] on the 1 mm grid: a sum of ``n`` plane waves of about ``wavelength_mm``.

    Evaluated every ``step`` mm and interpolated linearly (the shortest wavelength used is 15 mm).
    """
    coarse_shape = [(s - 1) // step + 2 for s in shape]
    axes = [np.arange(s, dtype=np.float64) * step for s in coarse_shape]
    coarse = np.zeros(coarse_shape)
    for _ in range(n):
        k = rng.standard_normal(3)
        k *= 2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.3) * np.linalg.norm(k))
        phase = rng.uniform(0, 2 * np.pi)
        coarse += np.cos(k[0] * axes[0][:, None, None] + k[1] * axes[1][None, :, None] + k[2] * axes[2][None, None, :]
                         + phase)
    coarse /= np.abs(coarse).max() + 1e-6
    fine = sitk.GetImageFromArray(coarse.astype(np.float32))
    fine.SetSpacing((float(step),) * 3)
    ref = sitk.Image([int(s) for s in shape[::-1]], sitk.sitkFloat32)
    out = sitk.Resample(fine, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _shell(outside_mm: np.ndarray, radius_mm: np.ndarray | float) -> np.ndarray:
    """Fraction of each 1 mm voxel within ``radius_mm`` of the hull surface (hull voxels are 1)."""
    return np.clip(radius_mm + 1.0 - outside_mm, 0.0, 1.0)


def _sharpen(gm: np.ndarray, wm: np.ndarray, power: float) -> tuple[np.ndarray, np.ndarray]:
    """Subject-like tissue fractions from population probabilities: p ** power, renormalised over GM/WM/CSF.

    The MNI152 maps are averages over many brains: deep white matter still carries a few per cent of "CSF"
    and most cortical voxels mix all three tissues.  One head has sharper boundaries; ``power`` 1 keeps the
    maps as they are (each voxel's fractions = the probabilities, as the issue-20 phantom did).
    """
    if power == 1:
        return gm, wm
    csf = np.clip(1 - gm - wm, 0, 1)
    g, w, c = (np.power(v, power, dtype=np.float32) for v in (gm, wm, csf))
    total = np.maximum(g + w + c, 1e-12)
    inside = (gm + wm) > 0
    return np.where(inside, g / total, 0).astype(np.float32), np.where(inside, w / total, 0).astype(np.float32)


def _template_head(head: Head, rng: np.random.Generator) -> dict:
    """Template-space (1 mm) T1 signal and truth fractions of one member."""
    tp = _template()
    d = tp["outside_mm"]
    shape = d.shape
    thickness = np.clip(head.csf_mm * (1 + head.csf_variation * _waves(rng, shape, 120.0, 5)), 1.0, 5.0)
    icv = _shell(d, thickness)
    inner = _shell(d, thickness + head.skull_mm)
    skull = inner - icv
    scalp = _shell(d, thickness + head.skull_mm + head.scalp_mm) - inner
    gm, wm = _sharpen(tp["gm"], tp["wm"], head.sharpness)
    csf = np.clip(icv - gm - wm, 0.0, 1.0)
    texture = [1 + a * _waves(rng, shape, wl, 6) for a, wl in ((0.03, 25.0), (0.03, 35.0), (0.10, 15.0))]
    t1 = gm * (head.gm * texture[0]) + wm * (head.wm * texture[1]) + csf * head.csf
    if head.diploe is None:
        t1 += skull * head.skull
    else:
        marrow = _shell(d, thickness + 2 * head.skull_mm / 3) - _shell(d, thickness + head.skull_mm / 3)
        t1 += (skull - marrow) * head.skull + marrow * head.diploe
    t1 += scalp * (head.scalp * texture[2])
    if head.eyes:
        t1 = _add_eyes(t1, d, thickness + head.skull_mm, tp["origin_ras"], head)
    return {"t1": t1.astype(np.float32), "brain": gm + wm, "icv": icv.astype(np.float32),
            "sums": (float(gm.sum(dtype=np.float64)), float(wm.sum(dtype=np.float64)))}


def _add_eyes(t1, outside_mm, skull_outer_mm, origin_ras, head: Head) -> np.ndarray:
    """Vitreous (CSF-dark) spheres of 11 mm in 4 mm of orbital fat, moved forward until clear of the skull."""
    radius, fat = 11.0, 4.0
    ii = [np.arange(n, dtype=np.float32) + o for n, o in zip(t1.shape, origin_ras)]  # RAS mm per axis
    for side in (-1.0, 1.0):
        centre = np.array([side * 32.0, 40.0, -38.0])
        for _ in range(60):
            idx = tuple(int(round(c - o)) for c, o in zip(centre, origin_ras))
            box = tuple(slice(max(0, i - int(radius)), i + int(radius) + 1) for i in idx)
            if (outside_mm[box] - skull_outer_mm[box]).min() > 1.0:
                break
            centre[1] += 1.0
        r2 = (ii[0][:, None, None] - centre[0]) ** 2 + (ii[1][None, :, None] - centre[1]) ** 2 + \
            (ii[2][None, None, :] - centre[2]) ** 2
        outside_skull = outside_mm > skull_outer_mm
        t1 = np.where(outside_skull & (r2 <= (radius + fat) ** 2), head.scalp, t1)
        t1 = np.where(outside_skull & (r2 <= radius ** 2), head.csf, t1)
    return t1


# --------------------------------------------------------------------------- scanner grid
def _scanner_to_template(head: Head, centre_lps: np.ndarray, shift_mm: np.ndarray) -> sitk.AffineTransform:
    """Scanner LPS point -> template LPS point: p_t = R diag(1/scale) p_s + centre + shift (head at isocentre)."""
    euler = sitk.Euler3DTransform()
    euler.SetRotation(*(float(np.deg2rad(a)) for a in head.rotation_deg))
    matrix = np.array(euler.GetMatrix()).reshape(3, 3) @ np.diag(1.0 / np.asarray(head.scale))
    tr = sitk.AffineTransform(3)
    tr.SetMatrix(tuple(matrix.ravel().tolist()))
    tr.SetTranslation(tuple((centre_lps + shift_mm).tolist()))
    return tr


def _grid(head: Head, to_template: sitk.AffineTransform, corners_lps: np.ndarray) -> sitk.Image:
    """The series grid: the member's orientation and voxel size, covering the head (corners in template LPS)."""
    row, col = (np.array(v) for v in ORIENTATIONS[head.orientation])
    direction = np.column_stack([row, col, np.cross(row, col)])
    inverse = to_template.GetInverse()
    scanner = np.array([inverse.TransformPoint(tuple(float(v) for v in c)) for c in corners_lps])
    along = scanner @ direction  # coordinates along the row, column and slice directions
    lo, hi = along.min(0) - 4.0, along.max(0) + 4.0
    spacing = np.array(head.voxel_mm)
    size = np.ceil((hi - lo) / spacing).astype(int) + 1
    grid = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    grid.SetDirection(tuple(direction.ravel().tolist()))
    grid.SetOrigin(tuple((direction @ lo).tolist()))
    return grid


def _bias_field(head: Head, rng: np.random.Generator, grid: sitk.Image, head_mask: np.ndarray) -> np.ndarray:
    """Multiplicative field on the grid, spanning 1 - a .. 1 + a over the head (a = ``bias_amplitude``)."""
    size = grid.GetSize()
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij"), -1)[..., ::-1]
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    pts = (idx * np.array(grid.GetSpacing())) @ direction.T + np.array(grid.GetOrigin())  # (z, y, x, 3) LPS mm
    if head.bias == "polynomial":
        u = (pts / 100.0).astype(np.float32)
        powers = [[np.ones(pts.shape[:3], np.float32), u[..., k], u[..., k] ** 2, u[..., k] ** 3] for k in range(3)]
        log_field = np.zeros(pts.shape[:3], np.float32)
        for a in range(4):
            for b in range(4 - a):
                for c in range(4 - a - b):
                    if a + b + c:
                        coef = np.float32(rng.standard_normal() / (a + b + c))
                        log_field += coef * powers[0][a] * powers[1][b] * powers[2][c]
    elif head.bias == "gaussians":
        log_field = np.zeros(pts.shape[:3])
        for _ in range(4):
            centre = rng.uniform(-70, 70, 3)
            width = rng.uniform(50, 100)
            log_field += rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) * \
                np.exp(-((pts - centre) ** 2).sum(-1) / (2 * width ** 2))
    else:
        raise ValueError(f"unknown bias kind {head.bias!r}")
    lo, hi = log_field[head_mask].min(), log_field[head_mask].max()
    span = np.log(1 + head.bias_amplitude) - np.log(1 - head.bias_amplitude)
    return np.exp(np.log(1 - head.bias_amplitude) + (log_field - lo) / (hi - lo) * span).astype(np.float32)


@dataclasses.dataclass
class Phantom:
    head: Head
    image: sitk.Image  # stored-unit signal (value = stored x slope) on the series grid
    truth: dict  # volumes (ml) and definitions
    maps: dict  # brain (GM + WM) and intracranial fractions on the series grid, numpy (z, y, x)

    @property
    def brain_mask(self) -> np.ndarray:
        """Truth brain mask: GM + WM fraction >= 0.5."""
        return self.maps["brain"] >= 0.5

    @property
    def icv_mask(self) -> np.ndarray:
        return self.maps["icv"] >= 0.5


@functools.lru_cache(maxsize=8)
def build(name: str) -> Phantom:
    """The member ``name`` of :data:`FAMILY` on its series grid (cached: each costs a few seconds)."""
    head = MEMBERS[name]
    rng = np.random.default_rng(head.seed)
    tp = _template()
    maps = _template_head(head, rng)
    sums = maps.pop("sums")
    # the head (every voxel with signal) in template LPS: its centre goes to the isocentre, its box sets the grid
    ref = _to_sitk(maps["icv"], tp["origin_ras"])
    occupied = np.argwhere(maps["t1"] > 0)
    lo, hi = occupied.min(0), occupied.max(0)
    centre_lps = np.array(ref.TransformContinuousIndexToPhysicalPoint(tuple(float(c) for c in (lo + hi) / 2)))
    corners = np.array([ref.TransformIndexToPhysicalPoint(tuple(int(c[i]) for i in range(3)))
                        for c in np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T])
    to_template = _scanner_to_template(head, centre_lps, rng.uniform(-4, 4, 3))
    grid = _grid(head, to_template, corners)

    # point-spread function: a Gaussian of FWHM ~ one voxel along each scanner axis, expressed on template axes
    a = np.array(to_template.GetMatrix()).reshape(3, 3) @ np.array(grid.GetDirection()).reshape(3, 3)
    sigma_scanner = 0.4 * np.array(head.voxel_mm)
    sigma_template = np.sqrt(((a * sigma_scanner) ** 2).sum(1))
    sampled = {}
    box = tuple(slice(max(0, a - 4), b + 5) for a, b in zip(lo, hi))  # the head, with room for the blur
    origin_box = tp["origin_ras"] + np.array([b.start for b in box])
    for key, arr in maps.items():
        img = sitk.SmoothingRecursiveGaussian(_to_sitk(np.ascontiguousarray(arr[box]), origin_box),
                                              tuple(sigma_template.tolist()))
        sampled[key] = sitk.GetArrayFromImage(sitk.Resample(img, grid, to_template, sitk.sitkLinear, 0.0,
                                                            sitk.sitkFloat32))
    for key in ("brain", "icv"):
        sampled[key] = np.clip(sampled[key], 0.0, 1.0)
    signal = np.clip(sampled.pop("t1"), 0.0, None)
    head_mask = signal > 0.3 * head.wm
    bias = _bias_field(head, rng, grid, head_mask)
    sigma = head.noise * head.white_stored
    s = signal / head.wm * head.white_stored * bias
    magnitude = np.sqrt((s + rng.normal(0, sigma, s.shape)) ** 2 + rng.normal(0, sigma, s.shape) ** 2)
    slope = head.rescale_slope or 1.0
    stored = np.clip(np.rint(magnitude / slope), 0, 65535)
    image = sitk.GetImageFromArray((stored * slope).astype(np.float32))
    image.CopyInformation(grid)

    voxel_ml = float(np.prod(head.voxel_mm)) / 1000.0
    brain, icv = sampled["brain"], sampled["icv"]
    # GM and WM separately from the template (1 mm^3 voxels scaled by the head size): no need to resample both
    template_ml = float(np.prod(head.scale)) / 1000.0
    gm_ml, wm_ml = (v * template_ml for v in sums)
    brain_ml = float(brain.sum(dtype=np.float64)) * voxel_ml
    truth = {
        "brain_volume_ml": brain_ml,
        "grey_matter_volume_ml": gm_ml * brain_ml / (gm_ml + wm_ml),
        "white_matter_volume_ml": wm_ml * brain_ml / (gm_ml + wm_ml),
        "csf_volume_ml": float(np.clip(icv - brain, 0, 1).sum(dtype=np.float64)) * voxel_ml,
        "intracranial_volume_ml": float(icv.sum(dtype=np.float64)) * voxel_ml,
        "brain_mask_ml": float((brain >= 0.5).sum()) * voxel_ml,
        "brain_volume_template_ml": gm_ml + wm_ml,
        "intracranial_volume_template_ml": float(maps["icv"].sum(dtype=np.float64)) * template_ml,
        "definition": "partial-volume sums of the blurred, resampled fractions on the series grid; brain = GM + "
                      "WM (parenchyma), intracranial = brain + CSF inside the inner skull table; GM and WM split "
                      "the brain volume in their template proportions",
    }
    return Phantom(head=head, image=image, truth=truth, maps={"brain": brain, "icv": icv})


# --------------------------------------------------------------------------- DICOM
def write_dicom(ph: Phantom, folder: pathlib.Path) -> list[pathlib.Path]:
    """The phantom as one MR series (one file per slice), Explicit VR Little Endian, no patient data."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    head, img = ph.head, ph.image
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slope = head.rescale_slope or 1.0
    stored = np.rint(sitk.GetArrayFromImage(img) / slope).astype(np.uint16)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    dx, dy, dz = img.GetSpacing()
    uid = functools.partial(generate_uid, prefix="1.2.826.0.1.3680043.10.1042.")
    study, series, frame = (uid(entropy_srcs=[head.name, what]) for what in ("study", "series", "frame"))
    paths = []
    for k in range(stored.shape[0]):
        sop = uid(entropy_srcs=[head.name, "instance", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "MR"
        ds.PatientName, ds.PatientID = "PHANTOM^HEAD", f"PHANTOM-{head.seed}"
        ds.SeriesDescription = f"T1 3D {head.orientation} phantom"
        ds.SeriesNumber, ds.InstanceNumber = 7, stored.shape[0] - k  # instance order need not follow position
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.ImagePositionPatient = [f"{v:.5f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.PixelSpacing = [f"{dy:.5f}", f"{dx:.5f}"]  # between rows, between columns
        ds.SliceThickness = f"{dz:.5f}"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if head.rescale_slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", "0"
        ds.PixelData = stored[k].astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@functools.lru_cache(maxsize=1)
def mni_t1_smoke_image(resolution: int = 2) -> tuple[sitk.Image, dict]:
    """nilearn's shipped MNI152 T1 (skull-stripped average of real scans) in LPS with its GM/WM/mask volumes.

    Not a phantom: a real-data smoke test (no skull, background 0; sulcal CSF, real contrast).
    """
    from nilearn import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = datasets.load_mni152_template(resolution=resolution)
        gm = datasets.load_mni152_gm_template(resolution=resolution)
        wm = datasets.load_mni152_wm_template(resolution=resolution)
        mask = datasets.load_mni152_brain_mask(resolution=resolution)
    affine = np.asarray(t1.affine, dtype=float)
    vox = float(abs(affine[0, 0]))
    arr = np.asarray(t1.dataobj, dtype=np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)) * 1000.0)
    img.SetSpacing((vox,) * 3)
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    img.SetOrigin((-affine[0, 3], -affine[1, 3], affine[2, 3]))
    ml = vox ** 3 / 1000.0
    g, w = (np.asarray(x.dataobj, dtype=np.float64) for x in (gm, wm))
    return img, {"gm_plus_wm_ml": float((g + w).sum() * ml), "brain_mask_ml": float((np.asarray(mask.dataobj) > 0)
                                                                                   .sum() * ml)}
