"""4-D MR inputs (BOLD, DWI): header classification, loading from DICOM through dcm2niix and from NIfTI (+ sidecar,
bval/bvec), checked against the truth the synthetic writer (``synth_dicom4d``) put in.

Everything is compared in world coordinates: dcm2niix flips the row axis, so the loaded array is matched to the
written one voxel by voxel through the two affines, and gradient directions are rotated to world by the loaded
affine and compared with the patient-frame vectors written (and with the voxel-axis vectors they came from).
A tensor fitted by dipy (the reference) on a loaded oblique DWI must point where the phantom's tensor points in
the world: a wrong sign, axis order or frame of the gradients fails it.  Series are small (16 x 18 x 10 voxels,
12 volumes) so the whole file stays well under a minute.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from imaging_tasks.errors import BadInput
from imaging_tasks.neuroimaging import series4d
from imaging_tasks.neuroimaging.series4d import classify_mr_series, load_4d_dicom, load_4d_nifti
from imaging_tasks.neuroimaging.synth_dicom4d import oblique_affine, write_4d_dicom
from imaging_tasks.synth import phi

KEY = b"test-key-for-neuro-series4d-0123456789"
SHAPE = (14, 16, 6)
N_VOL = 12
TR_S = 2.0
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


def _axial_affine() -> np.ndarray:
    aff = np.diag([3.0, 3.0, 3.5, 1.0])
    aff[:3, 3] = [-22.0, -30.0, -10.0]
    return aff


POSES = {"axial": _axial_affine(), "oblique": oblique_affine(shape=SHAPE)}


def _gradients(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    bvals = np.array([0.0, 0.0] + [1000.0] * 5 + [2000.0] * 5)
    bvecs = rng.normal(size=(N_VOL, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[:2] = 0.0
    return bvals, bvecs


_CACHE: dict = {}


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
    """Series written once per module and shared (read-only) by the tests: writing DICOM is the slow part."""
    _CACHE.clear()
    yield tmp_path_factory.mktemp("series")
    _CACHE.clear()


def _series(tmp: Path, kind: str, pose: str, style: str = "classic", seed: int = 0, n_vol: int = N_VOL,
            tr_s: float | None = TR_S, float_data: bool = False) -> dict:
    key = (kind, pose, style, seed, n_vol, tr_s, float_data)
    if key not in _CACHE:
        _CACHE[key] = _write(tmp, *key)
    return _CACHE[key]


def _write(tmp: Path, kind: str, pose: str, style: str, seed: int, n_vol: int, tr_s: float | None,
           float_data: bool) -> dict:
    rng = np.random.default_rng(seed)
    if float_data:  # needs RescaleSlope: stored up to half a slope
        data = (1000.0 + 40.0 * rng.standard_normal(SHAPE + (n_vol,))).astype(np.float32)
    else:
        data = rng.integers(0, 4000, SHAPE + (n_vol,)).astype(np.float32)
    bvals, bvecs = _gradients(rng) if kind == "dwi" else (None, None)
    if kind == "dwi" and n_vol != N_VOL:
        bvals, bvecs = bvals[:n_vol], bvecs[:n_vol]
    folder = tmp / f"{kind}-{pose}-{style}-{seed}-{n_vol}-{tr_s}-{float_data}"
    truth = write_4d_dicom(data, POSES[pose], folder, kind=kind, tr_s=tr_s, bvals=bvals, bvecs_voxel=bvecs,
                           style=style, rng=rng, study=phi.fake_study(rng, "s4d"))
    return {"data": data, "affine": POSES[pose], "bvals": bvals, "bvecs": bvecs, "folder": folder,
            "files": sorted(folder.iterdir()), "truth": truth}


def _headers(files) -> list:
    return [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]


def _reason(fn, *args, **kw) -> str:
    with pytest.raises(BadInput) as exc:
        fn(*args, **kw)
    return exc.value.reason


def _rotation(affine: np.ndarray) -> np.ndarray:
    m = np.asarray(affine, float)[:3, :3]
    return m / np.linalg.norm(m, axis=0)


def _assert_same_world_image(vol, written: dict, tol: float) -> None:
    """Every loaded voxel sits on a written voxel centre (to 1e-3 voxel) and holds its value (to ``tol``)."""
    data, affine = written["data"], written["affine"]
    assert vol.data.dtype == np.float32 and vol.data.shape[3] == data.shape[3]
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in vol.data.shape[:3]), indexing="ij"), -1).reshape(-1, 3)
    world = idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    src = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    assert np.max(np.abs(src - np.rint(src))) < 1e-3
    src = np.rint(src).astype(int)
    assert np.all(src >= 0) and np.all(src < np.array(data.shape[:3]))
    assert len({tuple(s) for s in src}) == len(src) == int(np.prod(data.shape[:3]))  # a bijection of the grids
    ours = vol.data.reshape(-1, vol.data.shape[3])
    theirs = data[src[:, 0], src[:, 1], src[:, 2]]
    assert np.max(np.abs(ours - theirs)) <= tol


def _assert_gradients(vol, written: dict) -> None:
    """b-values exact; loaded voxel-axis vectors rotated to world by the loaded affine = the written ones."""
    np.testing.assert_allclose(vol.bvals, written["bvals"], atol=1e-6)
    world_loaded = vol.bvecs @ _rotation(vol.affine).T
    world_truth = written["bvecs"] @ _rotation(written["affine"]).T
    weighted = written["bvals"] > 0
    assert np.all(np.linalg.norm(vol.bvecs[~weighted], axis=1) == 0)
    dots = np.sum(world_loaded[weighted] * world_truth[weighted], axis=1)
    assert np.min(np.abs(dots)) > 1 - 1e-5  # the same axis...
    assert np.all(dots > 0)  # ...and dcm2niix keeps the sign as well
    # The file holds the patient (LPS) frame direction the standard defines.
    lps_written = np.array(written["truth"]["gradients_lps"])
    np.testing.assert_allclose(world_truth[weighted], lps_written[weighted] @ RAS_FROM_LPS.T, atol=1e-9)


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("style", ["classic", "enhanced"])
@pytest.mark.parametrize("pose", ["axial", "oblique"])
@pytest.mark.parametrize("kind", ["bold", "dwi"])
def test_dicom_round_trip_in_world_coordinates(series_dir, tmp_path, kind, pose, style):
    written = _series(series_dir, kind, pose, style, seed={"bold": 1, "dwi": 2}[kind])
    assert classify_mr_series(_headers(written["files"])) == kind
    vol = load_4d_dicom(written["files"], kind)
    assert vol.kind == kind and vol.n_volumes == N_VOL
    _assert_same_world_image(vol, written, tol=1e-3)  # integer data: stored exactly
    if kind == "bold":
        assert vol.tr_s == pytest.approx(TR_S)
        np.testing.assert_allclose(vol.frame_times_s, np.arange(N_VOL) * TR_S)
        assert vol.bvals is None and vol.bvecs is None
    else:
        _assert_gradients(vol, written)
        assert vol.tr_s == pytest.approx(TR_S)


def test_rescaled_values_round_trip_within_half_a_slope(series_dir, tmp_path):
    written = _series(series_dir, "bold", "oblique", float_data=True, seed=3)
    slope = written["truth"]["slope"]
    assert slope != 1.0
    vol = load_4d_dicom(written["files"], "bold")
    _assert_same_world_image(vol, written, tol=slope * 0.5 + 1e-3)
    with pytest.raises(AssertionError):  # the check can see a one-step error
        _assert_same_world_image(vol, {**written, "data": written["data"] + 2 * slope}, tol=slope * 0.5 + 1e-3)


def test_dipy_tensor_on_loaded_oblique_dwi_points_along_the_true_world_direction(tmp_path):
    """A phantom with one prolate tensor along a known world direction, written oblique, loaded, fitted by dipy
    with the loaded gradients: the principal eigenvector rotated to world is that direction and FA the truth;
    the same fit with the x and y gradient components swapped (a wrong b-matrix) is far off."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel, fractional_anisotropy

    rng = np.random.default_rng(5)
    n_dirs = 12
    bvals = np.r_[0.0, np.full(n_dirs, 1000.0)]
    bvecs = rng.normal(size=(n_dirs + 1, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[0] = 0
    shape = (5, 6, 4)
    affine = oblique_affine(shape=shape, rotation_deg=(25.0, -15.0, 35.0))
    e1_world = np.array([0.6, -0.3, 0.74])
    e1_world /= np.linalg.norm(e1_world)
    evals = np.array([1.7e-3, 0.3e-3, 0.3e-3])
    basis = np.linalg.qr(np.c_[e1_world, rng.normal(size=(3, 2))])[0]
    basis[:, 0] *= np.sign(basis[:, 0] @ e1_world)
    d_world = basis @ np.diag(evals) @ basis.T
    rot = _rotation(affine)
    g_world = bvecs @ rot.T  # gradient directions in world, from the voxel-axis ones
    signal = 1000.0 * np.exp(-bvals * np.einsum("ni,ij,nj->n", g_world, d_world, g_world))
    data = np.broadcast_to(signal, shape + (len(bvals),)).astype(np.float32).copy()
    folder = tmp_path / "tensor"
    write_4d_dicom(data, affine, folder, kind="dwi", tr_s=8.0, bvals=bvals, bvecs_voxel=bvecs, rng=rng)
    vol = load_4d_dicom(sorted(folder.iterdir()), "dwi")

    def fit(bv):
        f = TensorModel(gradient_table(vol.bvals, bvecs=bv)).fit(vol.data)
        v1 = f.evecs[..., :, 0].reshape(-1, 3) @ _rotation(vol.affine).T
        return float(np.min(np.abs(v1 @ e1_world))), float(np.mean(f.fa))

    align, fa = fit(vol.bvecs)
    assert align > 0.9999
    assert fa == pytest.approx(float(fractional_anisotropy(evals)), abs=2e-3)
    align_bad, fa_bad = fit(vol.bvecs[:, [1, 0, 2]])
    assert align_bad < 0.99 or abs(fa_bad - fa) > 0.05


def test_nifti_loading_matches_dicom_and_follows_the_fsl_bvec_convention(series_dir, tmp_path):
    written = _series(series_dir, "dwi", "oblique", seed=2)
    from_dicom = load_4d_dicom(written["files"], "dwi")
    out = tmp_path / "nii"
    out.mkdir()
    niftis, _ = series4d.run_dcm2niix(written["files"], out)
    (nii,) = niftis
    stem = nii.with_suffix("")
    kw = dict(sidecar=stem.with_suffix(".json"), bval=stem.with_suffix(".bval"), bvec=stem.with_suffix(".bvec"))
    vol = load_4d_nifti(nii, "dwi", **kw)
    np.testing.assert_array_equal(vol.data, from_dicom.data)
    np.testing.assert_allclose(vol.affine, from_dicom.affine)
    np.testing.assert_allclose(vol.bvecs, from_dicom.bvecs)
    assert vol.tr_s == pytest.approx(TR_S)
    _assert_gradients(vol, written)
    assert np.linalg.det(vol.affine[:3, :3]) < 0

    # The same image stored with x reversed (positive determinant) and the *same* .bvec file: FSL's convention
    # makes the file valid for both storage orders, so the world gradients must not change.
    img = nib.load(str(nii))
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = img.shape[0] - 1
    flipped = nib.Nifti1Image(np.asarray(img.dataobj)[::-1], img.affine @ flip)
    flipped.header.set_xyzt_units("mm", "sec")
    flipped.header["pixdim"][4] = TR_S
    path = tmp_path / "flipped.nii.gz"
    nib.save(flipped, str(path))
    vol_f = load_4d_nifti(path, "dwi", bval=kw["bval"], bvec=kw["bvec"])
    assert np.linalg.det(vol_f.affine[:3, :3]) > 0
    _assert_same_world_image(vol_f, written, tol=1e-3)
    _assert_gradients(vol_f, written)
    np.testing.assert_allclose(vol_f.bvecs[:, 0], -vol.bvecs[:, 0], atol=1e-12)
    assert vol_f.tr_s == pytest.approx(TR_S)  # from pixdim[4] with its unit


def test_nifti_tr_from_sidecar_then_header_unit(tmp_path):
    data = np.random.default_rng(0).random((6, 6, 5, 12)).astype(np.float32)
    img = nib.Nifti1Image(data, _axial_affine())
    img.header.set_xyzt_units("mm", "msec")
    img.header["pixdim"][4] = 1500.0
    path = tmp_path / "bold.nii.gz"
    nib.save(img, str(path))
    assert load_4d_nifti(path, "bold").tr_s == pytest.approx(1.5)
    sidecar = tmp_path / "bold.json"
    sidecar.write_text(json.dumps({"RepetitionTime": 0.8}))
    assert load_4d_nifti(path, "bold", sidecar=sidecar).tr_s == pytest.approx(0.8)
    assert load_4d_nifti(path, "bold", sidecar={"RepetitionTime": 2.5}).tr_s == pytest.approx(2.5)
    bare = nib.Nifti1Image(data, _axial_affine())  # no time unit: nibabel's pixdim[4] = 1 is not a TR
    nib.save(bare, str(tmp_path / "bare.nii.gz"))
    assert _reason(load_4d_nifti, tmp_path / "bare.nii.gz", "bold") == "bold_no_tr"


# --------------------------------------------------------------------------- de-identification
@pytest.mark.parametrize("kind,style", [("bold", "classic"), ("dwi", "classic"), ("dwi", "enhanced")])
def test_series_survive_deidentification(series_dir, tmp_path, kind, style):
    """The project's DICOM de-identification (default options, and strict) keeps what classification and
    loading need; the output holds none of the planted PHI."""
    from imaging_tasks.deid.dicom import DeidOptions, deidentify_bytes

    written = _series(series_dir, kind, "oblique", style, seed={"bold": 1, "dwi": 2}[kind])
    options = [DeidOptions(), DeidOptions(strict=True)]
    for n, opts in enumerate(options):
        folder = tmp_path / f"deid-{n}"
        folder.mkdir()
        for i, f in enumerate(written["files"]):
            out, _ = deidentify_bytes(f.read_bytes(), KEY, opts)
            for value in written["truth"]["phi"]:
                assert value.encode() not in out
            (folder / f"{i:05d}.dcm").write_bytes(out)
        files = sorted(folder.iterdir())
        assert classify_mr_series(_headers(files)) == kind
        vol = load_4d_dicom(files, kind)
        _assert_same_world_image(vol, written, tol=1e-3)
        if opts.strict and style == "enhanced":
            # strict keeps only allow-listed attributes, and MRTimingAndRelatedParametersSequence (where an enhanced
            # object holds RepetitionTime) is not on deid.allowlist.STRICT_ALLOWED yet: TR is lost (None for DWI
            # is allowed; an enhanced BOLD would be refused with bold_no_tr).
            assert vol.tr_s in (None, pytest.approx(TR_S))
        else:
            assert vol.tr_s == pytest.approx(TR_S)
        if kind == "dwi":
            _assert_gradients(vol, written)


# --------------------------------------------------------------------------- classification of the rest
def test_existing_t1_and_pet_series_are_not_4d(tmp_path):
    """The project's synthetic T1 and (dynamic, 2-frame) PET writers, on small grids: "anatomical"."""
    from imaging_tasks.neuroimaging import synth

    rng = np.random.default_rng(2)
    study = phi.fake_study(rng, "t1pet")
    grid = sitk.Image([16, 16, 20], sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.0, 2.0))
    synth._write_mr(study, rng, tmp_path / "t1", grid, rng.integers(0, 1000, (20, 16, 16)))
    pet_grid = sitk.Image([12, 12, 10], sitk.sitkFloat32)
    pet_grid.SetSpacing((4.0, 4.0, 4.0))
    frames = [rng.uniform(0, 1e4, (10, 12, 12)).astype(np.float32) for _ in range(2)]
    synth._write_pet(study, rng, tmp_path / "pet", pet_grid, frames,
                     [{"start_s": 0.0, "duration_s": 300.0}, {"start_s": 300.0, "duration_s": 300.0}], 70.0, 2e8)
    t1 = _headers(sorted((tmp_path / "t1").iterdir()))
    assert classify_mr_series(t1) == "anatomical"
    assert series4d.count_volumes(t1) == 1
    assert classify_mr_series(_headers(sorted((tmp_path / "pet").iterdir()))) == "anatomical"
    # Multi-echo at the same positions is not time; a duplicated slice is not a volume.
    echo2 = []
    for ds in t1:
        d = pydicom.Dataset(ds)
        d.EchoNumbers = 2
        d.EchoTime = "8"
        echo2.append(d)
    assert classify_mr_series(t1 + echo2) == "anatomical"
    assert classify_mr_series(t1 + t1[:1]) == "anatomical"


def test_classification_from_other_vendor_conventions(series_dir, tmp_path):
    """Mosaic (one file per volume), a private Siemens b-value, NumberOfTemporalPositions alone."""
    written = _series(series_dir, "bold", "axial", n_vol=3, seed=4)
    headers = _headers(written["files"])
    one_slice = [ds for ds in headers if int(ds.InstanceNumber) % SHAPE[2] == 1]  # 3 volumes, one file each
    for ds in one_slice:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
        for kw in ("TemporalPositionIdentifier", "NumberOfTemporalPositions", "AcquisitionNumber", "AcquisitionTime"):
            delattr(ds, kw)
    one_slice[1].ImagePositionPatient = [0, 0, 50]  # mosaic positions need not repeat
    assert classify_mr_series(one_slice) == "bold"
    assert classify_mr_series(one_slice[:1]) == "anatomical"
    for ds in one_slice:
        block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        block.add_new(0x0C, "IS", "1000")
    assert classify_mr_series(one_slice) == "dwi"
    single = _headers(written["files"][:SHAPE[2]])  # one volume's files, fresh
    for ds in single:
        del ds.NumberOfTemporalPositions
    assert classify_mr_series(single) == "anatomical"
    for ds in single:
        ds.NumberOfTemporalPositions = 40  # declared alone
    assert classify_mr_series(single) == "bold"
    # Philips enhanced fMRI: an MR Diffusion Sequence with b = 0 and NONE in every frame is not diffusion.
    enhanced = _headers(_series(series_dir, "bold", "axial", "enhanced", seed=1)["files"])
    for frame in enhanced[0].PerFrameFunctionalGroupsSequence:
        item = pydicom.Dataset()
        item.DiffusionBValue, item.DiffusionDirectionality = 0.0, "NONE"
        frame.MRDiffusionSequence = pydicom.Sequence([item])
    assert classify_mr_series(enhanced) == "bold"
    item.DiffusionBValue, item.DiffusionDirectionality = 1000.0, "DIRECTIONAL"  # one weighted frame: diffusion
    assert classify_mr_series(enhanced) == "dwi"


# --------------------------------------------------------------------------- bad inputs
def _strip_diffusion(files, folder: Path, *, keep_image_type: bool) -> list[Path]:
    folder.mkdir()
    out = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(str(f))
        for kw in ("DiffusionBValue", "DiffusionGradientOrientation", "DiffusionDirectionality"):
            if kw in ds:
                delattr(ds, kw)
        if not keep_image_type:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            del ds.SequenceName
        path = folder / f"{i:05d}.dcm"
        ds.save_as(str(path))
        out.append(path)
    return out


def test_dwi_without_diffusion_attributes(series_dir, tmp_path):
    """Decision: with DIFFUSION in ImageType (kept by de-identification) the series is still "dwi" and loading
    refuses it with ``dwi_without_gradients``; with no diffusion evidence left it reads as "bold" by header, and
    loading it as DWI still gives ``dwi_without_gradients``."""
    written = _series(series_dir, "dwi", "axial", seed=2)
    hinted = _strip_diffusion(written["files"], tmp_path / "hinted", keep_image_type=True)
    assert classify_mr_series(_headers(hinted)) == "dwi"
    assert _reason(load_4d_dicom, hinted, "dwi") == "dwi_without_gradients"
    bare = _strip_diffusion(written["files"], tmp_path / "bare", keep_image_type=False)
    assert classify_mr_series(_headers(bare)) == "bold"
    assert _reason(load_4d_dicom, bare, "dwi") == "dwi_without_gradients"


def test_bad_dicom_series_give_their_reasons(series_dir, tmp_path):
    short = _series(series_dir, "bold", "axial", n_vol=5, seed=8)
    assert classify_mr_series(_headers(short["files"])) == "bold"
    assert _reason(load_4d_dicom, short["files"], "bold") == "bold_too_short"

    no_tr = _series(series_dir, "bold", "oblique", tr_s=None, seed=9)
    assert _reason(load_4d_dicom, no_tr["files"], "bold") == "bold_no_tr"

    good = _series(series_dir, "bold", "axial", seed=1)
    mixed = tmp_path / "mixed"
    shutil.copytree(good["folder"], mixed)
    for f in sorted(mixed.iterdir())[-SHAPE[2]:]:  # the last volume on another pixel spacing
        ds = pydicom.dcmread(str(f))
        ds.PixelSpacing = ["2.5", "2.5"]
        ds.save_as(str(f))
    assert _reason(load_4d_dicom, sorted(mixed.iterdir()), "bold") == "mixed_geometry"

    no_pixels = tmp_path / "no_pixels"
    no_pixels.mkdir()
    for f in good["files"]:
        ds = pydicom.dcmread(str(f))
        del ds.PixelData
        ds.save_as(str(no_pixels / f.name))
    with pytest.raises(BadInput) as exc:
        load_4d_dicom(sorted(no_pixels.iterdir()), "bold")
    assert exc.value.reason == "dicom_4d_conversion"
    assert str(tmp_path) not in exc.value.message and not re.search(r"/tmp|series4d-", exc.value.message)

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    assert _reason(load_4d_dicom, [*good["files"], junk], "bold") == "dicom_4d_conversion"
    assert _reason(load_4d_dicom, [], "dwi") == "dicom_4d_conversion"


def test_bad_nifti_inputs_give_their_reasons(tmp_path):
    rng = np.random.default_rng(1)
    img3 = nib.Nifti1Image(rng.random((6, 6, 5)).astype(np.float32), _axial_affine())
    nib.save(img3, str(tmp_path / "t1.nii.gz"))
    assert _reason(load_4d_nifti, tmp_path / "t1.nii.gz", "bold") == "not_4d"
    (tmp_path / "cut.nii.gz").write_bytes(b"\x1f\x8b" + b"0" * 50)
    assert _reason(load_4d_nifti, tmp_path / "cut.nii.gz", "dwi") == "unreadable_nifti"

    img = nib.Nifti1Image(rng.random((6, 6, 5, 8)).astype(np.float32), _axial_affine())
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.0
    nib.save(img, str(tmp_path / "dwi.nii.gz"))
    nii = tmp_path / "dwi.nii.gz"
    assert _reason(load_4d_nifti, nii, "bold") == "bold_too_short"
    assert _reason(load_4d_nifti, nii, "dwi") == "dwi_without_gradients"
    bvals, bvecs = _gradients(rng)
    (tmp_path / "ok.bval").write_text(" ".join(f"{b:g}" for b in bvals[:8]) + "\n")
    (tmp_path / "ok.bvec").write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs[:8].T) + "\n")
    vol = load_4d_nifti(nii, "dwi", bval=tmp_path / "ok.bval", bvec=tmp_path / "ok.bvec")
    assert np.linalg.det(_axial_affine()[:3, :3]) > 0  # positive determinant: FSL's x is negated
    np.testing.assert_allclose(vol.bvecs, bvecs[:8] * [-1.0, 1.0, 1.0], atol=1e-6)
    (tmp_path / "cols.bvec").write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs[:8]) + "\n")
    vol_c = load_4d_nifti(nii, "dwi", bval=tmp_path / "ok.bval", bvec=tmp_path / "cols.bvec")
    np.testing.assert_allclose(vol_c.bvecs, vol.bvecs)
    (tmp_path / "long.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    assert _reason(load_4d_nifti, nii, "dwi", bval=tmp_path / "long.bval",
                   bvec=tmp_path / "ok.bvec") == "dwi_volume_mismatch"
    (tmp_path / "bad.bval").write_text("0 1000 abc\n")
    assert _reason(load_4d_nifti, nii, "dwi", bval=tmp_path / "bad.bval",
                   bvec=tmp_path / "ok.bvec") == "dwi_gradients_unreadable"
    (tmp_path / "zero.bval").write_text(" ".join("0" for _ in range(8)) + "\n")
    assert _reason(load_4d_nifti, nii, "dwi", bval=tmp_path / "zero.bval",
                   bvec=tmp_path / "ok.bvec") == "dwi_without_gradients"
    (tmp_path / "bad.json").write_text("{not json")
    assert _reason(load_4d_nifti, nii, "dwi", sidecar=tmp_path / "bad.json") == "unreadable_sidecar"
