"""Regions in MNI152 space: SUVR reference regions, ROI label atlases, and the per-ROI features of a session.

Everything here lives on one grid: nilearn's MNI152 (ICBM 2009 symmetric) template at 2 mm, 99 x 117 x 95
voxels, as the LPS SimpleITK images of :func:`imaging_tasks.neuroimaging.atlas.mni_template` (nilearn's RAS
affine with the x and y axes' signs flipped; the voxel order is nilearn's).  Nothing is downloaded: the
coordinates are read, in place, from the files the nilearn wheel ships in ``nilearn/datasets/data``
(``nilearn.datasets.fetch_coords_power_2011`` / ``_dosenbach_2010`` / ``_seitzman_2018`` read the same files
without touching the network, but reorder the rows; reading them directly keeps each ROI's published number).
All ``x_mm/y_mm/z_mm`` are MNI (RAS) millimetres, as published.

* Reference regions (:func:`reference_region_mni`): uint8 masks that the SUVR step carries into the T1.
* Atlases (:func:`label_atlas`): ``seitzman300``, ``power264``, ``dosenbach160`` (spheres around published
  centres) and ``tissue`` (GM/WM/CSF); :func:`label_atlas_from_files` brings your own (NIfTI + labels TSV).
* :func:`roi_features` measures a session's ROIs on the T1 grid; it returns the versioned ``roi_features.json``
  document (:data:`ROI_FEATURES_SCHEMA`, :func:`validate`); :func:`feature_rows` flattens it for the warehouse.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from imaging_tasks.errors import BadInput

log = logging.getLogger(__name__)

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse

# --------------------------------------------------------------------------- reference-region geometry (MNI mm)
# Posterior-fossa box: behind the brainstem and below the occipital/temporal lobes' lowest level.
CEREBELLUM_MAX_Y_MM = -40.0
CEREBELLUM_MAX_Z_MM = -20.0
# The tentorium is a tent: highest at the midline, sloping down laterally.  Its dark dural gap in the shipped
# MNI152 T1 (the darkest voxel between cerebellar and cerebral parenchyma, per column, |x| 6-54 mm,
# y -46..-90 mm) fits z = -9.1 - 0.28 |x| + 0.027 y (residual <= 4 mm); the y term moves it < 1.5 mm over the
# cerebellum, so it is left out.  Voxels within TENTORIUM_MARGIN_MM below it are dropped too: that is where
# occipital and temporal cortex spill into a PET voxel (PET resolution 4-8 mm FWHM), the reason amyloid and tau
# studies prefer the inferior cerebellum as reference.
TENTORIUM_Z0_MM = -9.0
TENTORIUM_SLOPE = 0.28  # mm of descent per mm away from the midline
TENTORIUM_MARGIN_MM = 6.0
# The template's tissue maps call the medulla "grey matter" (p 0.5-0.8); the brainstem lies in front of the 4th
# ventricle, the vermis behind it (nodulus at y ~ -52 mm): drop |x| < 12 mm in front of y = -52 mm.
BRAINSTEM_HALF_WIDTH_MM = 12.0
BRAINSTEM_BACK_Y_MM = -52.0
# Pons: a sphere in the middle of the pons (the shipped template's brainstem spans z -20..-44 mm at y = -25 mm,
# the basis pontis bulging forward to y ~ -15 mm).  8 mm keeps it clear of the 4th ventricle, the interpeduncular
# cistern and the cerebellar peduncles.
REFERENCE_CORE_ERODE_VOX = 1  # cerebellar references: one 2 mm voxel off the surface (6-connected erosion)
PONS_CENTRE_MM = (0.0, -25.0, -32.0)
PONS_RADIUS_MM = 8.0
TISSUE_THRESHOLD = 0.5  # probability (GM, or GM + WM) at which a template voxel counts as that tissue

REFERENCE_REGIONS = ("cerebellar_grey_matter", "whole_cerebellum", "pons")
ATLASES = ("seitzman300", "power264", "dosenbach160", "tissue")
SPHERE_RADIUS_MM = 5.0  # Power 2011 and Dosenbach 2010 (the papers' own 10 mm-diameter ROIs); Seitzman lists its own
TISSUE_LABELS = ((1, "grey_matter"), (2, "white_matter"), (3, "csf"))

# --------------------------------------------------------------------------- bring-your-own checks
MNI_OVERLAP_MIN = 0.5  # fraction of a BYO atlas's labelled voxels that must fall in the (dilated) MNI brain
MNI_OVERLAP_DILATE_MM = 4.0  # cortical atlases reach the pial surface; tolerate that much beyond the mask
RESERVED_ROI_NAMES = ("whole_brain",)  # feature_rows uses it for the whole-brain values

# --------------------------------------------------------------------------- features
WM_CORE_FRACTION = 0.9  # white-matter "core" for T1 normalisation: wm fraction above this, inside the brain
SCHEMA_NAME = "imaging-tasks/roi-features"
SCHEMA_VERSION = 1


@dataclass
class LabelAtlas:
    """A label image on the MNI 2 mm grid (uint16, 0 = background) and one dict per label.

    Each label: ``index`` (its value in ``image``), ``name`` (unique in the atlas), ``network`` (str or None),
    ``x_mm, y_mm, z_mm`` (MNI RAS mm: sphere centre, or the centroid for a bring-your-own atlas; None for the
    tissue atlas), plus ``radius_mm`` for sphere atlases.  ``image`` may be None when only the labels travel
    (e.g. read back from the atlas step's JSON).
    """

    name: str
    image: sitk.Image | None
    labels: list[dict] = field(default_factory=list)


# =========================================================================== the MNI grid
def _template() -> dict[str, sitk.Image]:
    from imaging_tasks.neuroimaging.atlas import mni_template

    return mni_template()


@functools.lru_cache(maxsize=1)
def _grid() -> tuple[sitk.Image, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The MNI reference image (no pixels needed by callers) and the tissue arrays (z, y, x order):
    ``(reference, gm, wm, csf, brain)``."""
    t = _template()
    arr = {k: sitk.GetArrayFromImage(v) for k, v in t.items()}
    ref = sitk.Image(t["t1"].GetSize(), sitk.sitkUInt8)
    ref.CopyInformation(t["t1"])
    return ref, arr["gm"].astype(np.float32), arr["wm"].astype(np.float32), arr["csf"].astype(np.float32), \
        arr["brain"] > 0


def _index_to_ras(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(3x3 matrix, offset) taking a voxel index (x, y, z) of ``image`` to MNI RAS mm."""
    d = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    return RAS_FROM_LPS @ d, RAS_FROM_LPS @ np.array(image.GetOrigin())


def _ras_to_index(image: sitk.Image, ras: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (x, y, z) of MNI RAS points (n x 3)."""
    m, o = _index_to_ras(image)
    return np.linalg.solve(m, (np.atleast_2d(ras) - o).T).T


def mni_voxel(x_mm: float, y_mm: float, z_mm: float) -> tuple[int, int, int]:
    """The (x, y, z) index of the MNI-grid voxel whose centre is nearest to an MNI (RAS) point."""
    ref = _grid()[0]
    return tuple(int(v) for v in np.rint(_ras_to_index(ref, np.array([x_mm, y_mm, z_mm]))[0]))


@functools.lru_cache(maxsize=1)
def _ras_coordinates() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI RAS mm of every voxel centre as three (z, y, x)-ordered arrays: X, Y, Z."""
    ref = _grid()[0]
    m, o = _index_to_ras(ref)
    nx, ny, nz = ref.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return tuple((m[a, 0] * i + m[a, 1] * j + m[a, 2] * k + o[a]).astype(np.float32) for a in range(3))


def _image(arr: np.ndarray, pixel) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.CopyInformation(_grid()[0])
    return sitk.Cast(img, pixel)


# =========================================================================== reference regions
def _posterior_fossa() -> np.ndarray:
    """Cerebellum region: the posterior-fossa box, below the tentorium minus its margin, without the brainstem."""
    x, y, z = _ras_coordinates()
    tentorium = TENTORIUM_Z0_MM - TENTORIUM_SLOPE * np.abs(x)
    brainstem = (np.abs(x) < BRAINSTEM_HALF_WIDTH_MM) & (y > BRAINSTEM_BACK_Y_MM)
    return (y < CEREBELLUM_MAX_Y_MM) & (z < CEREBELLUM_MAX_Z_MM) & (z < tentorium - TENTORIUM_MARGIN_MM) & ~brainstem


@functools.lru_cache(maxsize=None)
def _reference_array(name: str) -> np.ndarray:
    _, gm, wm, _, _ = _grid()
    if name in ("cerebellar_grey_matter", "whole_cerebellum"):
        tissue = gm if name == "cerebellar_grey_matter" else gm + wm
        region = _posterior_fossa() & (tissue >= TISSUE_THRESHOLD)
        # its core: the cerebellar surface is where the PET falls off steeply (cortex next to CSF), so a
        # sub-millimetre registration error there moves the mean; eroded, it does not (see the docstring)
        return ndi.binary_erosion(region, ndi.generate_binary_structure(3, 1)) if REFERENCE_CORE_ERODE_VOX \
            else region
    x, y, z = _ras_coordinates()
    cx, cy, cz = PONS_CENTRE_MM
    sphere = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= PONS_RADIUS_MM ** 2
    return sphere & (gm + wm >= TISSUE_THRESHOLD)


def reference_region_mni(name: str) -> sitk.Image:
    """A SUVR reference region as a uint8 mask on the MNI 2 mm grid.

    Defined from the shipped MNI152 tissue maps and fixed MNI coordinates, so it is the same region in every
    session once the atlas registration carries it into the T1:

    * ``cerebellar_grey_matter`` (default): GM probability >= 0.5 inside the cerebellum region, which is
      y < -40 mm and z < -20 mm, and at least 6 mm below the tentorium, whose slope (z = -9 - 0.28 |x| mm) was
      fitted to the dark dural gap between cerebellum and occipital/temporal lobes in the shipped T1, minus the
      brainstem (|x| < 12 mm in front of y = -52 mm; the template labels the medulla grey matter).  It is an
      *inferior* cerebellar grey-matter region: the superior cerebellum next to the occipital cortex is left
      out against PET spill-over.  Of that region (~122 ml in MNI space, ~1.2x a native brain) the *core* is
      kept: one 2 mm voxel is eroded off its surface (~70 ml remain).  The cerebellar surface is where the PET
      falls off steeply (cortex against CSF and bone), so a registration error of half a millimetre there
      moved the reference mean by up to 1.6 % on the synthetic sessions (0.5 mm mean landmark error); the
      core's mean moved by up to 1.1 %, and every SUVR with it.
    * ``whole_cerebellum``: GM + WM probability >= 0.5 in the same region (~145 ml before the same erosion):
      grey matter plus the cerebellar white matter, again without its superior-most part and the brainstem.
    * ``pons``: an 8 mm sphere at MNI (0, -25, -32) mm, the middle of the pons in the shipped template, inside
      GM + WM >= 0.5 (~2 ml).  The template's tissue maps call the brainstem half grey, half white matter
      (p ~0.5 each), so a white-matter threshold would leave a patchy mask; the parenchyma is used instead.

    Unknown ``name`` raises ValueError listing the valid ones.
    """
    if name not in REFERENCE_REGIONS:
        raise ValueError(f"unknown reference region {name!r}; choose one of {', '.join(REFERENCE_REGIONS)}")
    return _image(_reference_array(name).astype(np.uint8), sitk.sitkUInt8)


# =========================================================================== built-in atlases
def nilearn_data_dir() -> Path:
    """``nilearn/datasets/data`` of the installed wheel, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed; it ships the MNI152 template and the ROI coordinates")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _roi(index: int, name: str, network: str | None, xyz, radius: float | None) -> dict:
    out = {"index": int(index), "name": name, "network": network,
           "x_mm": float(xyz[0]), "y_mm": float(xyz[1]), "z_mm": float(xyz[2])}
    if radius is not None:
        out["radius_mm"] = float(radius)
    return out


def _seitzman() -> list[dict]:
    """Seitzman 2020 (the "2018" file): 300 ROIs, one line each, with their own radius (4 or 5 mm) and network
    (``unassigned`` for 15 of them); the anatomical-label file gives each ROI's region (cortexL, cerebellum...)."""
    data = nilearn_data_dir()
    lines = (data / "seitzman_2018_ROIs_300inVol_MNI_allInfo.txt").read_text().split("\n")
    rows = [ln.split() for ln in lines[1:] if ln.strip()]
    anat = (data / "seitzman_2018_ROIs_anatomicalLabels.txt").read_text().split("\n")
    regions = dict((int(k), v) for k, v in (item.split("=") for item in anat[0].strip().split(",")))
    region_of = [regions[int(float(v))] for v in anat[1:] if v.strip()]
    if len(rows) != 300 or len(region_of) != 300:
        raise RuntimeError(f"nilearn's Seitzman files hold {len(rows)} ROIs / {len(region_of)} regions, not 300")
    return [_roi(n, f"{region_of[n - 1]} {n}", r[5], [float(v) for v in r[:3]], float(r[3]))
            for n, r in enumerate(rows, start=1)]


def _power() -> list[dict]:
    """Power 2011: 264 centres (ROI, X, Y, Z).  nilearn ships no network assignment for them: network None."""
    with open(nilearn_data_dir() / "power_2011.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [_roi(int(r["ROI"]), f"ROI {int(r['ROI'])}", None, (r["X"], r["Y"], r["Z"]), SPHERE_RADIUS_MM)
            for r in rows]


def _dosenbach() -> list[dict]:
    """Dosenbach 2010: 160 centres with a region name and one of 6 networks; names repeat, so (as nilearn
    does) the ROI number is appended: ``"vmPFC 1"``."""
    with open(nilearn_data_dir() / "dosenbach_2010.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [_roi(int(r["number"]), f"{r['name']} {int(r['number'])}", r["network"], (r["x"], r["y"], r["z"]),
                 SPHERE_RADIUS_MM) for r in rows]


def _spheres(rois: list[dict]) -> np.ndarray:
    """A label array (z, y, x) with a sphere per ROI: voxel centres within the radius of the ROI centre;
    where spheres overlap, the nearest centre wins (ties: the lower index)."""
    ref = _grid()[0]
    size = ref.GetSize()
    x, y, z = _ras_coordinates()
    labels = np.zeros(x.shape, np.uint16)
    best = np.full(x.shape, np.inf, np.float32)
    for roi in sorted(rois, key=lambda r: r["index"]):
        centre = np.array([roi["x_mm"], roi["y_mm"], roi["z_mm"]])
        r = roi["radius_mm"]
        c = _ras_to_index(ref, centre)[0]
        reach = r / min(ref.GetSpacing()) + 1
        lo = np.maximum(np.floor(c - reach).astype(int), 0)
        hi = np.minimum(np.ceil(c + reach).astype(int) + 1, size)
        if np.any(hi <= lo):
            continue  # outside the grid: no voxels (reported by the atlas's voxel count)
        box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        d = np.sqrt((x[box] - centre[0]) ** 2 + (y[box] - centre[1]) ** 2 + (z[box] - centre[2]) ** 2)
        win = (d <= r + 1e-6) & (d < best[box])
        labels[box][win] = roi["index"]
        best[box][win] = d[win]
    return labels


@functools.lru_cache(maxsize=None)
def _built_in(name: str) -> tuple[np.ndarray, tuple]:
    if name == "tissue":
        _, gm, wm, csf, brain = _grid()
        arr = np.where(brain, np.argmax(np.stack([gm, wm, csf]), axis=0) + 1, 0).astype(np.uint16)
        rois = [{"index": i, "name": n, "network": None, "x_mm": None, "y_mm": None, "z_mm": None}
                for i, n in TISSUE_LABELS]
        return arr, tuple(rois)
    rois = {"seitzman300": _seitzman, "power264": _power, "dosenbach160": _dosenbach}[name]()
    return _spheres(rois), tuple(rois)


def label_atlas(name: str) -> LabelAtlas:
    """A built-in atlas on the MNI 2 mm grid.

    * ``seitzman300``: Seitzman et al. 2020, 300 cortical, subcortical and cerebellar ROIs with their network
      labels (13 networks + ``unassigned``), spheres of each ROI's own published radius (4 or 5 mm).
    * ``power264``: Power et al. 2011, 264 ROIs, 5 mm spheres (the paper's 10 mm diameter); no networks (the
      nilearn file has none).
    * ``dosenbach160``: Dosenbach et al. 2010, 160 ROIs with 6 networks, 5 mm spheres.
    * ``tissue``: 1 grey matter, 2 white matter, 3 CSF: the most probable class of the MNI152 maps inside the
      template's brain mask (CSF = 1 - GM - WM there, nilearn ships no CSF map).

    Spheres are voxel centres within the radius of the published centre; where two overlap the nearest centre
    wins.  Every published centre lies inside the grid; at 2 mm a 5 mm sphere is ~60 voxels and a 4 mm one ~30,
    and none is swallowed by its neighbours (tests count them).  Unknown ``name`` raises ValueError.
    """
    if name not in ATLASES:
        raise ValueError(f"unknown atlas {name!r}; choose one of {', '.join(ATLASES)} or bring your own")
    arr, rois = _built_in(name)
    return LabelAtlas(name, _image(arr, sitk.sitkUInt16), [dict(r) for r in rois])


# =========================================================================== bring your own
def _read_label_nifti(path: Path) -> sitk.Image:
    try:
        io = sitk.ImageFileReader.GetImageIOFromFileName(str(path))  # "" when no reader recognises the file
        if io != "NiftiImageIO":
            raise RuntimeError(f"recognised as {io}" if io else "no image format recognised")
        img = sitk.ReadImage(str(path), imageIO="NiftiImageIO")
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        raise BadInput("atlas_unreadable", f"the atlas image is not a readable NIfTI file ({first}); upload the "
                                           "label atlas as .nii or .nii.gz") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise BadInput("atlas_non_integer_labels", "the atlas image has vector (multi-component) voxels; a label "
                                                   "atlas holds one integer label per voxel")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise BadInput("atlas_not_3d", f"the atlas image is {img.GetDimension()}-D with size {img.GetSize()}; a "
                                       "label atlas is one 3-D volume (a 4-D probabilistic atlas must be turned "
                                       "into a label image first, e.g. by argmax)")
    return img


def _integer_labels(img: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayFromImage(img)
    if np.issubdtype(arr.dtype, np.integer):
        bad = arr < 0
    else:
        finite = np.isfinite(arr)
        bad = ~finite | (np.abs(arr - np.rint(np.where(finite, arr, 0))) > 1e-3) | (arr < 0)
    if bad.any() or (arr.size and float(np.nanmax(np.where(np.isfinite(arr), arr, 0))) > 65535):
        example = arr[bad][:3].tolist() if bad.any() else [float(np.max(arr))]
        raise BadInput("atlas_non_integer_labels", f"the atlas image holds values that are not labels (e.g. "
                                                   f"{example}); a label atlas holds integers 0..65535, 0 for "
                                                   "background: a probability map or an interpolated atlas is "
                                                   "not a label image")
    return np.rint(arr).astype(np.int64)


def _read_labels_tsv(path: Path) -> dict[int, dict]:
    def bad(what: str) -> BadInput:
        return BadInput("atlas_labels_unreadable", f"the atlas labels TSV {what}; it needs a header row with tab-"
                                                   "separated columns index and name (and optionally network), "
                                                   "one row per label")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise bad(f"cannot be read as UTF-8 text ({type(exc).__name__})") from None
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    columns = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
    if "index" not in columns or "name" not in columns:
        raise bad(f"has columns {sorted(columns)} but no 'index' and 'name'")
    out: dict[int, dict] = {}
    names: set[str] = set()
    for line, row in enumerate(reader, start=2):
        raw_index = (row.get(columns["index"]) or "").strip()
        name = (row.get(columns["name"]) or "").strip()
        network = ((row.get(columns["network"]) or "").strip() or None) if "network" in columns else None
        try:
            value = float(raw_index)
            if not value.is_integer() or value < 0:
                raise ValueError
            index = int(value)
        except ValueError:
            raise bad(f"has index {raw_index!r} on line {line}, not a non-negative integer") from None
        if index == 0:
            continue  # background rows in lookup tables are common; 0 is never an ROI
        if not name:
            raise bad(f"has no name for index {index} (line {line})")
        if index in out:
            raise bad(f"lists index {index} twice")
        if name in names or name in RESERVED_ROI_NAMES:
            raise bad(f"has the name {name!r} twice or reserved ({', '.join(RESERVED_ROI_NAMES)} is taken); "
                      "names must be unique, they key the warehouse rows")
        names.add(name)
        out[index] = {"name": name, "network": network}
    if not out:
        raise bad("has no label rows")
    return out


def _mni_overlap(img: sitk.Image, arr: np.ndarray) -> float:
    """Fraction of the labelled voxels whose centre falls in the MNI brain mask (dilated by 4 mm)."""
    ref, _, _, _, brain = _grid()
    zyx = np.argwhere(arr > 0)
    if len(zyx) > 200_000:  # a fine atlas: a regular subsample answers the same question
        zyx = zyx[:: len(zyx) // 200_000 + 1]
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps = zyx[:, ::-1] @ d.T + np.array(img.GetOrigin())
    idx = np.rint(_ras_to_index(ref, lps @ RAS_FROM_LPS.T)).astype(int)
    size = np.array(ref.GetSize())
    inside = np.all((idx >= 0) & (idx < size), axis=1)
    grown = ndi.binary_dilation(brain, iterations=int(round(MNI_OVERLAP_DILATE_MM / min(ref.GetSpacing()))))
    hits = grown[idx[inside, 2], idx[inside, 1], idx[inside, 0]]
    return float(hits.sum()) / max(len(zyx), 1)


def label_atlas_from_files(nifti_path, labels_tsv_path, name: str | None = None) -> LabelAtlas:
    """Bring your own: a NIfTI label image in MNI space (any grid and orientation) plus a labels TSV.

    The TSV has a header row with tab-separated ``index`` and ``name`` (and optionally ``network``); index 0
    rows are ignored (background).  The image is resampled by nearest neighbour onto the MNI 2 mm grid.
    Raises :class:`BadInput` with:

    * ``atlas_unreadable``: not a readable NIfTI file;
    * ``atlas_not_3d``: not one 3-D volume (e.g. a 4-D probabilistic atlas);
    * ``atlas_non_integer_labels``: values that are not integers 0..65535 (a probability map, an atlas
      resampled with linear interpolation);
    * ``atlas_labels_unreadable``: TSV not UTF-8, no ``index``/``name`` columns, bad or repeated indices, empty
      or repeated names (names key the warehouse rows; ``whole_brain`` is reserved);
    * ``atlas_empty``: no non-zero voxel (before, or after resampling);
    * ``atlas_labels_missing``: labels in the image that the TSV does not name;
    * ``atlas_not_mni``: 50% or less of the labelled voxels fall in the MNI152 brain mask dilated by 4 mm: the
      image is in subject or another template space, or its header's origin is wrong.  (It cannot see a
      left-right flip; that is for the atlas's provider to get right.)

    TSV rows whose label is absent from the image, or vanishes on the 2 mm grid (an ROI smaller than a voxel),
    are dropped with a warning.  ``name`` defaults to the file name without ``.nii``/``.nii.gz``.
    """
    nifti_path, labels_tsv_path = Path(nifti_path), Path(labels_tsv_path)
    img = _read_label_nifti(nifti_path)
    arr = _integer_labels(img)
    table = _read_labels_tsv(labels_tsv_path)
    present = set(np.unique(arr).tolist()) - {0}
    if not present:
        raise BadInput("atlas_empty", "the atlas image has no non-zero label; check that the right file was given")
    unnamed = sorted(present - set(table))
    if unnamed:
        raise BadInput("atlas_labels_missing", f"{len(unnamed)} label(s) in the atlas image have no row in the "
                                               f"labels TSV (e.g. {unnamed[:10]}); add a row (index, name) for "
                                               "each label")
    overlap = _mni_overlap(img, arr)
    if overlap <= MNI_OVERLAP_MIN:
        raise BadInput("atlas_not_mni", f"only {overlap:.0%} of the atlas's labelled voxels lie in the MNI152 "
                                        "brain; the atlas must be in MNI152 space (check its space and the "
                                        "NIfTI header's sform/qform)")
    ref = _grid()[0]
    labels_img = sitk.GetImageFromArray(arr.astype(np.uint32))
    labels_img.CopyInformation(img)
    on_grid = sitk.Resample(labels_img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt32)
    grid_arr = sitk.GetArrayFromImage(on_grid).astype(np.uint16)
    kept = set(np.unique(grid_arr).tolist()) - {0}
    absent = sorted(set(table) - present)
    lost = sorted(present - kept)
    if absent:
        log.warning("atlas labels TSV: %d row(s) have no voxel in the image and are dropped (e.g. %s)",
                    len(absent), absent[:10])
    if lost:
        log.warning("atlas: %d label(s) have no voxel on the 2 mm MNI grid (smaller than a voxel) and are "
                    "dropped (e.g. %s)", len(lost), lost[:10])
    if not kept:
        raise BadInput("atlas_empty", "no label of the atlas is left on the 2 mm MNI grid")
    x, y, z = _ras_coordinates()
    flat = grid_arr.ravel()
    order = np.array(sorted(kept))
    counts = np.bincount(flat, minlength=int(order.max()) + 1)
    centroid = [np.bincount(flat, weights=c.ravel().astype(np.float64), minlength=counts.size) for c in (x, y, z)]
    rois = [_roi(int(i), table[int(i)]["name"], table[int(i)]["network"],
                 [round(float(c[i] / counts[i]), 2) for c in centroid], None) for i in order]
    if name is None:
        name = nifti_path.name
        for suffix in (".gz", ".nii"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
    return LabelAtlas(name, _image(grid_arr, sitk.sitkUInt16), rois)


# =========================================================================== per-session features
def _clean(value) -> float | None:
    """A finite float, or None (NaN and infinities are never written)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _same_grid(reference: sitk.Image, **images) -> None:
    for key, img in images.items():
        if img is None:
            continue
        if img.GetSize() != reference.GetSize() or not np.allclose(img.GetSpacing(), reference.GetSpacing()) \
                or not np.allclose(img.GetOrigin(), reference.GetOrigin(), atol=1e-3) \
                or not np.allclose(img.GetDirection(), reference.GetDirection(), atol=1e-6):
            raise ValueError(f"roi_features: {key} is not on the label image's (T1) grid; resample it first")


def roi_features(labels_in_t1: sitk.Image, atlas: LabelAtlas, *, t1_n4: sitk.Image, gm: sitk.Image,
                 wm: sitk.Image, csf: sitk.Image, brain: sitk.Image, icv: sitk.Image, suvr: sitk.Image | None = None,
                 wm_reference: sitk.Image | None = None, reference_region: str | None = None) -> dict:
    """The ``roi_features.json`` document (schema :data:`ROI_FEATURES_SCHEMA`), measured on the T1 grid.

    All inputs share the T1 grid (ValueError otherwise).  ``voxel_ml`` is the T1 voxel volume.

    * ``whole_brain``: ``grey_matter_ml``, ``white_matter_ml``, ``csf_ml`` = sum of the fractions x voxel_ml;
      ``brain_ml`` = grey + white matter (the parenchyma, as the segmentation defines it);
      ``intracranial_ml`` = voxels of ``icv`` x voxel_ml.
    * Per ROI of ``atlas.labels`` (in their order), over the ROI's voxels inside the intracranial mask (the
      atlas carried into the T1 can poke past the brain; skull and scalp would bias every mean, CSF inside is
      tissue of the ROI and stays, which also keeps the tissue atlas's CSF label measurable):
      ``voxels``; ``gm_volume_ml`` = sum of GM fractions x voxel_ml; ``mean_suvr`` and ``median_suvr`` of the
      SUVR image; ``gm_weighted_mean_suvr`` = sum(gm x suvr) / sum(gm): the grey-matter signal with less
      CSF and white-matter dilution (a crude partial-volume correction; amyloid tracers bind white matter, so
      a sphere's plain mean mixes tissues); ``t1_normalised`` = mean T1 (N4) in the ROI / median T1 in the
      white-matter core (``wm_reference`` if given, else wm fraction > 0.9 inside ``brain``): a scanner-free
      intensity.
    * SUVR values are None without ``suvr`` (no PET), and for an ROI with no voxels; any value that would be
      NaN or infinite is None.  ``reference_region`` names the SUVR reference (None without PET).
    """
    _same_grid(labels_in_t1, t1_n4=t1_n4, gm=gm, wm=wm, csf=csf, brain=brain, icv=icv, suvr=suvr,
               wm_reference=wm_reference)
    voxel_ml = float(np.prod(labels_in_t1.GetSpacing())) / 1000.0
    a = {k: sitk.GetArrayViewFromImage(v) for k, v in
         dict(labels=labels_in_t1, t1=t1_n4, gm=gm, wm=wm, csf=csf, brain=brain, icv=icv).items()}
    icv_mask = a["icv"] > 0
    g64 = a["gm"].astype(np.float64)
    w64 = a["wm"].astype(np.float64)
    whole = {"grey_matter_ml": _clean(g64.sum() * voxel_ml), "white_matter_ml": _clean(w64.sum() * voxel_ml),
             "csf_ml": _clean(a["csf"].astype(np.float64).sum() * voxel_ml),
             "brain_ml": _clean((g64.sum() + w64.sum()) * voxel_ml),
             "intracranial_ml": _clean(float(icv_mask.sum()) * voxel_ml)}
    core = (sitk.GetArrayViewFromImage(wm_reference) > 0) if wm_reference is not None else \
        ((a["wm"] > WM_CORE_FRACTION) & (a["brain"] > 0))
    t1_core = a["t1"][core].astype(np.float64)
    t1_core = t1_core[np.isfinite(t1_core)]
    wm_level = float(np.median(t1_core)) if t1_core.size else float("nan")
    wm_level = wm_level if math.isfinite(wm_level) and wm_level > 0 else None

    # Group the ROI voxels by label once (sorting), rather than one full-image mask per ROI.
    sel = icv_mask & (a["labels"] > 0)
    lab = a["labels"][sel].astype(np.int64)
    order = np.argsort(lab, kind="stable")
    lab = lab[order]
    gm_v = g64[sel][order]
    t1_v = a["t1"][sel].astype(np.float64)[order]
    suvr_v = sitk.GetArrayViewFromImage(suvr)[sel].astype(np.float64)[order] if suvr is not None else None
    rows = []
    for roi in atlas.labels:
        index = int(roi["index"])
        lo, hi = np.searchsorted(lab, index, "left"), np.searchsorted(lab, index, "right")
        n = int(hi - lo)
        g = gm_v[lo:hi]
        out = {"index": index, "name": roi["name"], "network": roi.get("network"), "voxels": n,
               "gm_volume_ml": _clean(g.sum() * voxel_ml), "mean_suvr": None, "median_suvr": None,
               "gm_weighted_mean_suvr": None, "t1_normalised": None}
        if n and wm_level is not None:
            out["t1_normalised"] = _clean(t1_v[lo:hi].mean() / wm_level)
        if n and suvr_v is not None:
            s = suvr_v[lo:hi]
            ok = np.isfinite(s)
            if ok.any():
                out["mean_suvr"] = _clean(s[ok].mean())
                out["median_suvr"] = _clean(np.median(s[ok]))
                if g[ok].sum() > 0:
                    out["gm_weighted_mean_suvr"] = _clean((g[ok] * s[ok]).sum() / g[ok].sum())
        rows.append(out)
    return {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "atlas": atlas.name,
            "reference_region": reference_region if suvr is not None else None,
            "voxel_ml": _clean(voxel_ml), "whole_brain": whole, "rois": rows}


# --------------------------------------------------------------------------- warehouse rows
# document key -> (warehouse metric, unit); "1" is the project's unit for dimensionless values.
WHOLE_BRAIN_METRICS = {"grey_matter_ml": ("grey_matter_volume", "ml"), "white_matter_ml": ("white_matter_volume", "ml"),
                       "csf_ml": ("csf_volume", "ml"), "brain_ml": ("brain_volume", "ml"),
                       "intracranial_ml": ("intracranial_volume", "ml")}
ROI_METRICS = {"voxels": ("voxels", "count"), "gm_volume_ml": ("gm_volume", "ml"), "mean_suvr": ("mean_suvr", "1"),
               "median_suvr": ("median_suvr", "1"), "gm_weighted_mean_suvr": ("gm_weighted_mean_suvr", "1"),
               "t1_normalised": ("t1_normalised", "1")}


def feature_rows(doc: dict) -> list[dict]:
    """The document as warehouse rows ``{roi, atlas, metric, value, unit}``: whole-brain values with
    ``roi = "whole_brain"``, then each ROI by name.  Null values get no row (a missing row is a missing
    measurement; the document keeps the null)."""
    atlas = doc["atlas"]
    rows = [{"roi": "whole_brain", "atlas": atlas, "metric": metric, "value": float(doc["whole_brain"][key]),
             "unit": unit} for key, (metric, unit) in WHOLE_BRAIN_METRICS.items()
            if doc["whole_brain"].get(key) is not None]
    for roi in doc["rois"]:
        rows.extend({"roi": roi["name"], "atlas": atlas, "metric": metric, "value": float(roi[key]), "unit": unit}
                    for key, (metric, unit) in ROI_METRICS.items() if roi.get(key) is not None)
    return rows


# --------------------------------------------------------------------------- schema
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_VOLUME = {"type": ["number", "null"], "minimum": 0}
ROI_FEATURES_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "imaging-tasks/roi-features/1",
    "title": "roi_features.json: per-ROI and whole-brain features of one neuroimaging session",
    "type": "object",
    "required": ["schema", "version", "atlas", "reference_region", "voxel_ml", "whole_brain", "rois"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "version": {"const": SCHEMA_VERSION},
        "atlas": {"type": "string", "minLength": 1},
        "reference_region": {"type": ["string", "null"]},
        "voxel_ml": {"type": "number", "exclusiveMinimum": 0},
        "whole_brain": {
            "type": "object",
            "required": list(WHOLE_BRAIN_METRICS),
            "additionalProperties": False,
            "properties": {k: _VOLUME for k in WHOLE_BRAIN_METRICS},
        },
        "rois": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "name", "network", *ROI_METRICS],
                "additionalProperties": False,
                "properties": {
                    "index": {"type": "integer", "minimum": 1},
                    "name": {"type": "string", "minLength": 1},
                    "network": {"type": ["string", "null"]},
                    "voxels": {"type": "integer", "minimum": 0},
                    "gm_volume_ml": _VOLUME,
                    "mean_suvr": _NUMBER_OR_NULL,
                    "median_suvr": _NUMBER_OR_NULL,
                    "gm_weighted_mean_suvr": _NUMBER_OR_NULL,
                    "t1_normalised": _NUMBER_OR_NULL,
                },
            },
        },
    },
}


def _non_finite(doc, path="") -> str | None:
    if isinstance(doc, float) and not math.isfinite(doc):
        return path or "/"
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        found = _non_finite(value, f"{path}/{key}")
        if found:
            return found
    return None


_TYPES = {"object": dict, "array": list, "string": str, "null": type(None)}


def _type_ok(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def _tiny_validate(value, schema: dict, path: str = "") -> str | None:
    """The subset of JSON Schema :data:`ROI_FEATURES_SCHEMA` uses, for when ``jsonschema`` is not installed."""
    where = path or "/"
    if "const" in schema and value != schema["const"]:
        return f"{where}: {value!r} is not {schema['const']!r}"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_type_ok(value, k) for k in kinds):
            return f"{where}: {value!r} is not of type {' or '.join(kinds)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{where}: {value!r} is less than the minimum {schema['minimum']}"
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            return f"{where}: {value!r} is not above {schema['exclusiveMinimum']}"
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        return f"{where}: {value!r} is too short"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                return f"{where}: {key!r} is a required property"
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                err = _tiny_validate(item, props[key], f"{path}/{key}")
                if err:
                    return err
            elif schema.get("additionalProperties") is False:
                return f"{where}: additional property {key!r} is not allowed"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            err = _tiny_validate(item, schema["items"], f"{path}/{i}")
            if err:
                return err
    return None


def validate(doc: dict, *, use_jsonschema: bool = True) -> None:
    """Check a document against :data:`ROI_FEATURES_SCHEMA` (with ``jsonschema`` when installed, else a small
    validator of the same subset) and that no number is NaN or infinite; ValueError says where it fails."""
    err = None
    try:
        if not use_jsonschema:
            raise ImportError
        import jsonschema
    except ImportError:
        err = _tiny_validate(doc, ROI_FEATURES_SCHEMA)
    else:
        try:
            jsonschema.validate(doc, ROI_FEATURES_SCHEMA)
        except jsonschema.ValidationError as exc:
            err = f"/{'/'.join(str(p) for p in exc.absolute_path)}: {exc.message}"
    if err is None:
        bad = _non_finite(doc)
        err = f"{bad}: NaN or infinite number (write null)" if bad else None
    if err:
        raise ValueError(f"roi_features document does not match {SCHEMA_NAME} v{SCHEMA_VERSION}: {err}")
