"""MNI-space regions: reference regions, the shipped coordinate atlases, bring-your-own atlases, and the per-ROI
features of a session, each checked against planted or published truth."""
from __future__ import annotations

import json
import logging
import math
import socket

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from imaging_tasks.errors import BadInput
from imaging_tasks.neuroimaging import rois

GRID_RAS_ORIGIN = np.array([-98.0, -134.0, -72.0])  # nilearn's 2 mm MNI152 affine: RAS = origin + 2 * (i, j, k)


def _arr(img):
    return sitk.GetArrayFromImage(img)


def _nilearn_index(x, y, z):
    """(k, j, i) array index of an MNI point from nilearn's own affine (independent of the module's geometry)."""
    i, j, k = np.rint((np.array([x, y, z]) - GRID_RAS_ORIGIN) / 2.0).astype(int)
    return k, j, i


@pytest.fixture(scope="module")
def mni():
    from imaging_tasks.neuroimaging.atlas import mni_template

    return {k: _arr(v) for k, v in mni_template().items()}


@pytest.fixture(scope="module")
def atlases():
    return {name: rois.label_atlas(name) for name in rois.ATLASES}


@pytest.fixture(scope="module")
def ras():
    """MNI RAS mm of every voxel centre (arrays in z, y, x order), from nilearn's affine."""
    k, j, i = np.meshgrid(np.arange(95), np.arange(117), np.arange(99), indexing="ij")
    return GRID_RAS_ORIGIN[0] + 2.0 * i, GRID_RAS_ORIGIN[1] + 2.0 * j, GRID_RAS_ORIGIN[2] + 2.0 * k


# --------------------------------------------------------------------------- shipped coordinates
def test_coordinates_are_nilearns_and_read_offline(monkeypatch):
    def no_network(*_a, **_k):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from nilearn import datasets

    def key(rows):
        return sorted(tuple(round(float(v), 2) for v in r) for r in rows)

    ours = {n: rois.label_atlas(n).labels for n in ("seitzman300", "power264", "dosenbach160")}
    for name, bunch in (("seitzman300", datasets.fetch_coords_seitzman_2018()),
                        ("power264", datasets.fetch_coords_power_2011()),
                        ("dosenbach160", datasets.fetch_coords_dosenbach_2010())):
        theirs = bunch["rois"][["x", "y", "z"]].to_numpy()
        assert key(theirs) == key([(r["x_mm"], r["y_mm"], r["z_mm"]) for r in ours[name]]), name
    seitz = datasets.fetch_coords_seitzman_2018(ordered_regions=False)
    assert [r["network"] for r in ours["seitzman300"]] == list(seitz["networks"])
    assert [r["radius_mm"] for r in ours["seitzman300"]] == [float(v) for v in seitz["radius"]]
    assert [r["name"].split()[0] for r in ours["seitzman300"]] == list(seitz["regions"])
    dos = datasets.fetch_coords_dosenbach_2010(ordered_regions=False)
    assert [r["name"] for r in ours["dosenbach160"]] == list(dos["labels"])
    assert [r["network"] for r in ours["dosenbach160"]] == list(dos["networks"])


def test_atlas_counts_and_networks(atlases):
    expected = {"seitzman300": 300, "power264": 264, "dosenbach160": 160, "tissue": 3}
    for name, n in expected.items():
        atlas = atlases[name]
        a = _arr(atlas.image)
        assert atlas.image.GetPixelID() == sitk.sitkUInt16 and a.shape == (95, 117, 99)
        assert len(atlas.labels) == n
        index = [r["index"] for r in atlas.labels]
        assert sorted(index) == list(range(1, n + 1))
        assert len({r["name"] for r in atlas.labels}) == n  # names key the warehouse rows
        present = set(np.unique(a).tolist()) - {0}
        assert present == set(index), f"{name}: labels without voxels {sorted(set(index) - present)}"
    seitz = {r["network"] for r in atlases["seitzman300"].labels}
    assert len(seitz) == 14 and "unassigned" in seitz and {"DefaultMode", "Visual", "Salience"} <= seitz
    assert sum(r["network"] == "unassigned" for r in atlases["seitzman300"].labels) == 15
    assert {r["radius_mm"] for r in atlases["seitzman300"].labels} == {4.0, 5.0}
    assert {r["network"] for r in atlases["dosenbach160"].labels} == {
        "default", "fronto-parietal", "cingulo-opercular", "sensorimotor", "occipital", "cerebellum"}
    assert {r["network"] for r in atlases["power264"].labels} == {None}
    assert all(r["radius_mm"] == 5.0 for r in atlases["power264"].labels + atlases["dosenbach160"].labels)


def test_sphere_centres_land_on_their_mni_voxel(atlases):
    ref = atlases["power264"].image
    checked = 0
    for name in ("power264", "dosenbach160"):
        labels = atlases[name].labels
        a = _arr(atlases[name].image)
        centres = np.array([[r["x_mm"], r["y_mm"], r["z_mm"]] for r in labels])
        for r, c in zip(labels, centres):
            others = np.delete(centres, labels.index(r), axis=0)
            if np.all(c % 2 == 0) and np.min(np.linalg.norm(others - c, axis=1)) > 10.5:
                # an isolated sphere centred on a voxel centre: 81 voxels (lattice points within 2.5 voxels),
                # their centroid at the published centre, and the centre voxel is where nilearn's affine says
                kji = _nilearn_index(*c)
                assert a[kji] == r["index"]
                assert ref.TransformPhysicalPointToIndex((-c[0], -c[1], c[2])) == kji[::-1]  # LPS = RAS x, y flipped
                assert rois.mni_voxel(*c) == kji[::-1]
                vox = np.argwhere(a == r["index"])
                assert len(vox) == 81
                assert np.allclose(GRID_RAS_ORIGIN + 2.0 * vox[:, ::-1].mean(0), c, atol=1e-9)
                checked += 1
    assert checked >= 20
    # left is left: the left-hemisphere Dosenbach ROIs sit at low i (nilearn's RAS x increases with i)
    a = _arr(atlases["dosenbach160"].image)
    for r in atlases["dosenbach160"].labels:
        i_mean = np.argwhere(a == r["index"])[:, 2].mean()
        assert np.sign(GRID_RAS_ORIGIN[0] + 2 * i_mean) == np.sign(r["x_mm"]) or abs(r["x_mm"]) < 2


def test_overlapping_spheres_nearest_centre_wins(ras):
    x, y, z = ras
    a_c, b_c = np.array([10.0, -20.0, 30.0]), np.array([16.0, -20.0, 30.0])  # 6 mm apart, 5 mm radii
    out = rois._spheres([rois._roi(1, "a", None, a_c, 5.0), rois._roi(2, "b", None, b_c, 5.0)])
    da = np.sqrt((x - a_c[0]) ** 2 + (y - a_c[1]) ** 2 + (z - a_c[2]) ** 2)
    db = np.sqrt((x - b_c[0]) ** 2 + (y - b_c[1]) ** 2 + (z - b_c[2]) ** 2)
    expect = np.where((da <= 5) & (da <= db), 1, np.where(db <= 5, 2, 0))
    assert np.array_equal(out, expect)
    assert (out == 1).sum() == (out == 2).sum() > 30  # the tie plane x = 13 mm holds no voxel centre (odd)


def test_tissue_atlas_is_the_argmax_inside_the_brain(atlases, mni):
    a = _arr(atlases["tissue"].image)
    brain = mni["brain"] > 0
    probs = np.stack([mni["gm"], mni["wm"], mni["csf"]])
    assert np.array_equal(a[~brain], np.zeros((~brain).sum()))
    assert np.array_equal(a[brain], probs.argmax(0)[brain] + 1)
    assert [r["name"] for r in atlases["tissue"].labels] == ["grey_matter", "white_matter", "csf"]
    assert a[_nilearn_index(-26, -10, 30)] == 2  # corona radiata
    assert a[_nilearn_index(-16, -20, 24)] == a[_nilearn_index(16, -20, 24)] == 3  # lateral ventricles


# --------------------------------------------------------------------------- reference regions
def test_cerebellar_grey_matter_reference(mni, ras):
    x, y, z = ras
    m = _arr(rois.reference_region_mni("cerebellar_grey_matter")) > 0
    whole = _arr(rois.reference_region_mni("whole_cerebellum")) > 0
    assert rois.reference_region_mni("pons").GetPixelID() == sitk.sitkUInt8
    assert np.all(y[m] < -40) and np.all(z[m] < -20)
    assert np.all(z[m] <= -9 - 0.28 * np.abs(x[m]) - 6)  # below the tentorium's slope, minus the margin
    assert not np.any(m & (np.abs(x) < 12) & (y > -52))  # no brainstem (the template calls the medulla GM)
    assert np.all(mni["gm"][m] >= 0.5) and mni["gm"][m].mean() > 0.7
    # 73.5 ml measured: MNI space is ~1.2x a native brain whose cerebellar cortex is ~100 ml, less the
    # superior cerebellum left out against occipital spill-over (121.6 ml), less its surface voxels (the core)
    ml = m.sum() * 8 / 1000
    assert 60 < ml < 90
    # the core: every voxel's six neighbours are cerebellar grey matter too (one voxel off the surface)
    grown = m.copy()
    for axis in range(3):
        for shift in (-1, 1):
            grown |= np.roll(m, shift, axis=axis)
    assert np.all(mni["gm"][grown] >= 0.5) and grown.sum() > 1.3 * m.sum()
    assert abs(x[m].mean()) < 1 and abs((x[m] < 0).sum() / (x[m] > 0).sum() - 1) < 0.05  # the template is symmetric
    assert whole[m].all() and 1.3 < whole.sum() / m.sum() < 1.7
    assert np.all(mni["gm"][whole] + mni["wm"][whole] >= 0.5)
    # the cerebellum in the template's lateral-posterior corners above the plane is occipital cortex: kept out
    assert not m[_nilearn_index(-44, -70, -22)] and not m[_nilearn_index(50, -56, -24)]
    assert m[_nilearn_index(-30, -70, -40)] and m[_nilearn_index(30, -70, -40)]


def test_pons_reference(mni, ras):
    x, y, z = ras
    m = _arr(rois.reference_region_mni("pons")) > 0
    assert np.allclose([x[m].mean(), y[m].mean(), z[m].mean()], rois.PONS_CENTRE_MM, atol=1.0)
    assert np.all(np.sqrt(x[m] ** 2 + (y[m] + 25) ** 2 + (z[m] + 32) ** 2) <= 8)
    assert 1.5 < m.sum() * 8 / 1000 < 2.2
    assert np.all(mni["gm"][m] + mni["wm"][m] >= 0.5) and mni["wm"][m].mean() > 0.35  # brainstem: half WM
    assert not (m & (_arr(rois.reference_region_mni("whole_cerebellum")) > 0)).any()


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="cerebellar_grey_matter, whole_cerebellum, pons"):
        rois.reference_region_mni("occipital")
    with pytest.raises(ValueError, match="seitzman300"):
        rois.label_atlas("aal")


# --------------------------------------------------------------------------- bring your own
PLANTED = {1: ("left_blob", "alpha", (-30.0, -20.0, 50.0)), 2: ("right_blob", "", (30.0, -20.0, 50.0)),
           3: ("cerebellum_blob", "beta", (0.0, -62.0, -34.0))}


def _byo_arrays(spacing, shape, origin_ras):
    """A label volume (x, y, z order) with an 8 mm ball per planted label on a RAS grid."""
    idx = np.indices(shape).reshape(3, -1).T
    pts = origin_ras + idx * spacing
    out = np.zeros(len(idx), np.int16)
    for label, (_, _, c) in PLANTED.items():
        out[np.linalg.norm(pts - c, axis=1) <= 8.0] = label
    return out.reshape(shape)


def _write_tsv(path, rows, header="index\tname\tnetwork"):
    path.write_text(header + "\n" + "".join("\t".join(str(v) for v in r) + "\n" for r in rows))
    return path


@pytest.fixture()
def byo(tmp_path):
    """A 3 mm RAS NIfTI (nibabel) and a TSV naming the labels, one extra row with no voxel."""
    shape, origin = (66, 78, 62), np.array([-96.0, -132.0, -70.0])
    arr = _byo_arrays(3.0, shape, origin)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = origin
    image = tmp_path / "blobs.nii.gz"
    nib.save(nib.Nifti1Image(arr, affine), image)
    tsv = _write_tsv(tmp_path / "blobs.tsv", [(i, n, net) for i, (n, net, _) in PLANTED.items()] + [(4, "ghost", "")])
    return image, tsv, arr, affine


def test_byo_round_trip_3mm(byo, caplog):
    image, tsv, _, _ = byo
    with caplog.at_level(logging.WARNING, logger="imaging_tasks.neuroimaging.rois"):
        atlas = rois.label_atlas_from_files(image, tsv)
    assert "no voxel in the image" in caplog.text and "[4]" in caplog.text
    assert atlas.name == "blobs"
    assert [(r["index"], r["name"], r["network"]) for r in atlas.labels] == [
        (1, "left_blob", "alpha"), (2, "right_blob", None), (3, "cerebellum_blob", "beta")]
    a = _arr(atlas.image)
    assert atlas.image.GetPixelID() == sitk.sitkUInt16 and a.shape == (95, 117, 99)
    for r in atlas.labels:
        c = PLANTED[r["index"]][2]
        assert np.allclose([r["x_mm"], r["y_mm"], r["z_mm"]], c, atol=1.5)
        assert a[_nilearn_index(*c)] == r["index"]  # left stays left through RAS -> LPS -> resampling
        assert abs((a == r["index"]).sum() * 8 - 4 / 3 * math.pi * 8 ** 3) < 0.2 * 4 / 3 * math.pi * 8 ** 3


def test_byo_round_trip_1mm_lps_float(tmp_path):
    """A 1 mm float32 atlas written by SimpleITK in LPS orientation (identity direction): same answer."""
    shape, origin = (120, 150, 130), np.array([-60.0, -90.0, -60.0])
    arr = _byo_arrays(1.0, shape, origin).astype(np.float32)  # x, y, z along RAS
    lps = sitk.GetImageFromArray(np.ascontiguousarray(arr[::-1, ::-1, :].transpose(2, 1, 0)))  # flip x, y
    far = origin + (np.array(shape) - 1)  # RAS of the last voxel: becomes the LPS origin's x, y
    lps.SetOrigin((-far[0], -far[1], origin[2]))
    path = tmp_path / "lps_atlas.nii"
    sitk.WriteImage(lps, str(path))
    tsv = _write_tsv(tmp_path / "l.tsv", [(i, n) for i, (n, _, _) in PLANTED.items()], header="index\tname")
    atlas = rois.label_atlas_from_files(path, tsv, name="mine")
    assert atlas.name == "mine" and [r["network"] for r in atlas.labels] == [None] * 3
    a = _arr(atlas.image)
    for r in atlas.labels:
        c = PLANTED[r["index"]][2]
        assert np.allclose([r["x_mm"], r["y_mm"], r["z_mm"]], c, atol=1.0)
        assert a[_nilearn_index(*c)] == r["index"]


def _bad(tmp_path, arr, affine, rows=None, header="index\tname\tnetwork", name="bad.nii.gz"):
    image = tmp_path / name
    nib.save(nib.Nifti1Image(arr, affine), image)
    rows = rows if rows is not None else [(i, n, net) for i, (n, net, _) in PLANTED.items()]
    with pytest.raises(BadInput) as err:
        rois.label_atlas_from_files(image, _write_tsv(tmp_path / "bad.tsv", rows, header))
    return err.value


def test_byo_bad_inputs(byo, tmp_path):
    _, tsv, arr, affine = byo
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip" * 20)
    with pytest.raises(BadInput) as err:
        rois.label_atlas_from_files(garbage, tsv)
    assert err.value.reason == "atlas_unreadable" and "NIfTI" in err.value.message
    png = tmp_path / "atlas.png"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(png))
    with pytest.raises(BadInput, match="atlas_unreadable"):
        rois.label_atlas_from_files(png, tsv)

    half = arr.astype(np.float32)
    half[half == 2] = 2.5
    assert _bad(tmp_path, half, affine).reason == "atlas_non_integer_labels"
    negative = arr.copy()
    negative[negative == 2] = -2
    assert _bad(tmp_path, negative, affine).reason == "atlas_non_integer_labels"

    e = _bad(tmp_path, arr, affine, rows=[(1, "left_blob", ""), (3, "cerebellum_blob", "")])
    assert e.reason == "atlas_labels_missing" and "[2]" in e.message

    shifted = affine.copy()
    shifted[:3, 3] = 0.0  # the classic broken header: origin at the corner voxel
    e = _bad(tmp_path, arr, shifted)
    assert e.reason == "atlas_not_mni" and "MNI152" in e.message

    assert _bad(tmp_path, np.stack([arr, arr], -1), affine).reason == "atlas_not_3d"
    assert _bad(tmp_path, np.zeros_like(arr), affine).reason == "atlas_empty"
    e = _bad(tmp_path, arr, affine, rows=[(1, "a"), (2, "b"), (3, "c")], header="label\tname")
    assert e.reason == "atlas_labels_unreadable" and "index" in e.message
    e = _bad(tmp_path, arr, affine, rows=[(1, "a", ""), (2, "a", ""), (3, "c", "")])
    assert e.reason == "atlas_labels_unreadable" and "'a'" in e.message
    e = _bad(tmp_path, arr, affine, rows=[(1, "whole_brain", ""), (2, "b", ""), (3, "c", "")])
    assert e.reason == "atlas_labels_unreadable"
    e = _bad(tmp_path, arr, affine, rows=[("x1", "a", ""), (2, "b", ""), (3, "c", "")])
    assert e.reason == "atlas_labels_unreadable" and "'x1'" in e.message
    # a background row (index 0) is fine
    rows = [(0, "Unknown", "")] + [(i, n, net) for i, (n, net, _) in PLANTED.items()]
    image = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(arr, affine), image)
    assert len(rois.label_atlas_from_files(image, _write_tsv(tmp_path / "ok.tsv", rows)).labels) == 3


# --------------------------------------------------------------------------- features
SP = (1.5, 1.5, 1.5)
VOXEL_ML = 1.5 ** 3 / 1000.0


@pytest.fixture(scope="module")
def session():
    """A 24 x 20 x 16 T1 grid (1.5 mm, oblique direction) with planted tissue, T1 and SUVR values per ROI.

    Arrays are (z, y, x).  ROI 1: z 2-5, 8 x 8 in-plane (256 voxels): 1/4 at gm 0.25 / SUVR 1.0 and 3/4 at gm 0.75 /
    SUVR 1.4, T1 60.  ROI 2: z 8-11 (256 voxels): gm 0.5, SUVR 2.0 except one NaN voxel, T1 80; 64 more ROI 2 voxels
    lie outside the intracranial mask (SUVR 9, T1 500: must not count).  ROI 3: in the atlas, absent from the grid.
    Elsewhere inside the intracranial mask wm = 1 - gm (halved, the rest CSF, at z 2-5), and T1 alternates 90/110
    in a checkerboard: the white-matter core (wm > 0.9) has median 100.
    """
    shape = (16, 20, 24)
    labels = np.zeros(shape, np.uint16)
    gm = np.zeros(shape, np.float32)
    wm = np.zeros(shape, np.float32)
    csf = np.zeros(shape, np.float32)
    t1 = np.where(np.indices(shape).sum(0) % 2 == 0, 90.0, 110.0).astype(np.float32)
    suvr = np.full(shape, 0.8, np.float32)
    icv = np.zeros(shape, np.uint8)
    icv[:, :, :20] = 1
    labels[2:6, 2:10, 2:10] = 1
    gm[2:6, 2:10, 2:10] = 0.75
    gm[2:6, 2:4, 2:10] = 0.25  # 1/4 of ROI 1
    suvr[2:6, 2:10, 2:10] = 1.4
    suvr[2:6, 2:4, 2:10] = 1.0
    t1[2:6, 2:10, 2:10] = 60.0
    labels[8:12, 2:10, 2:10] = 2
    gm[8:12, 2:10, 2:10] = 0.5
    suvr[8:12, 2:10, 2:10] = 2.0
    suvr[8, 2, 2] = np.nan
    t1[8:12, 2:10, 2:10] = 80.0
    labels[8:12, 2:10, 20:22] = 2  # outside the icv (x >= 20)
    suvr[8:12, 2:10, 20:22] = 9.0
    t1[8:12, 2:10, 20:22] = 500.0
    wm[:] = np.where(icv > 0, 1.0 - gm, 0.0)
    wm[2:6] *= 0.5  # a slab of CSF around ROI 1's level
    csf[:] = np.where(icv > 0, 1.0 - gm - wm, 0.0)
    brain = ((gm + wm) > 0.5).astype(np.uint8)

    direction = sitk.VersorTransform((0.3, 0.2, 0.1), 0.4).GetMatrix()

    def img(a):
        out = sitk.GetImageFromArray(a)
        out.SetSpacing(SP)
        out.SetOrigin((10.0, -20.0, 5.0))
        out.SetDirection(direction)
        return out

    images = dict(labels=img(labels), t1_n4=img(t1), gm=img(gm), wm=img(wm), csf=img(csf), brain=img(brain),
                  icv=img(icv), suvr=img(suvr))
    atlas = rois.LabelAtlas("planted", None, [{"index": 1, "name": "one", "network": "n1"},
                                              {"index": 2, "name": "two", "network": None},
                                              {"index": 3, "name": "three", "network": None}])
    truth = {k: float(v.sum(dtype=np.float64)) * VOXEL_ML for k, v in (("gm_ml", gm), ("wm_ml", wm), ("csf_ml", csf))}
    return images, atlas, truth


def _features(session, **over):
    images, atlas, _ = session
    kw = {k: v for k, v in images.items() if k != "labels"}
    kw.update(over)
    return rois.roi_features(images["labels"], atlas, **kw)


def test_roi_features_match_the_planted_values(session):
    _, _, truth = session
    doc = _features(session, reference_region="cerebellar_grey_matter")
    rois.validate(doc)
    json.dumps(doc, allow_nan=False)
    assert (doc["schema"], doc["version"], doc["atlas"], doc["reference_region"]) == (
        "imaging-tasks/roi-features", 1, "planted", "cerebellar_grey_matter")
    wb = doc["whole_brain"]
    # planted closed forms: GM = 256 x (0.25/4 + 0.75 x 3/4) + 256 x 0.5 voxels' worth, WM 1-gm (halved at z 2-5)
    gm_vox = 256 * (0.25 * 0.25 + 0.75 * 0.75) + 256 * 0.5
    assert wb["grey_matter_ml"] == pytest.approx(gm_vox * VOXEL_ML, rel=1e-9) == pytest.approx(truth["gm_ml"])
    wm_vox = (16 * 400 - gm_vox) - 0.5 * (4 * 400 - 256 * 0.625)  # 1 - gm inside the ICV, halved at z 2-5
    assert wb["white_matter_ml"] == pytest.approx(wm_vox * VOXEL_ML, rel=1e-9) == pytest.approx(truth["wm_ml"])
    assert wb["csf_ml"] == pytest.approx(truth["csf_ml"], rel=1e-9)
    assert wb["brain_ml"] == pytest.approx((gm_vox + wm_vox) * VOXEL_ML, rel=1e-9)
    assert wb["intracranial_ml"] == pytest.approx(16 * 20 * 20 * VOXEL_ML, rel=1e-12)
    assert wb["grey_matter_ml"] + wb["white_matter_ml"] + wb["csf_ml"] == pytest.approx(wb["intracranial_ml"])

    one, two, three = doc["rois"]
    assert (one["index"], one["name"], one["network"], one["voxels"]) == (1, "one", "n1", 256)
    assert one["gm_volume_ml"] == pytest.approx(256 * (0.25 * 0.25 + 0.75 * 0.75) * VOXEL_ML, rel=1e-9)
    assert one["mean_suvr"] == pytest.approx(0.25 * 1.0 + 0.75 * 1.4, abs=1e-6)
    assert one["median_suvr"] == pytest.approx(1.4, abs=1e-6)
    assert one["gm_weighted_mean_suvr"] == pytest.approx((0.25 * 0.25 * 1.0 + 0.75 * 0.75 * 1.4) / 0.625, abs=1e-6)
    assert one["t1_normalised"] == pytest.approx(0.6, abs=1e-6)
    assert two["voxels"] == 256  # the 64 voxels outside the intracranial mask do not count
    assert two["gm_volume_ml"] == pytest.approx(128 * VOXEL_ML, rel=1e-9)
    assert two["mean_suvr"] == pytest.approx(2.0, abs=1e-6) and two["median_suvr"] == pytest.approx(2.0, abs=1e-6)
    assert two["gm_weighted_mean_suvr"] == pytest.approx(2.0, abs=1e-6)  # NaN voxel skipped, 9.0 outside ICV ignored
    assert two["t1_normalised"] == pytest.approx(0.8, abs=1e-6)
    assert three == {"index": 3, "name": "three", "network": None, "voxels": 0, "gm_volume_ml": 0.0,
                     "mean_suvr": None, "median_suvr": None, "gm_weighted_mean_suvr": None, "t1_normalised": None}


def test_roi_features_without_pet_and_with_a_wm_reference(session):
    images, _, _ = session
    doc = _features(session, suvr=None, reference_region="pons")
    rois.validate(doc)
    assert doc["reference_region"] is None
    assert all(r[k] is None for r in doc["rois"] for k in ("mean_suvr", "median_suvr", "gm_weighted_mean_suvr"))
    assert doc["rois"][0]["t1_normalised"] == pytest.approx(0.6, abs=1e-6)
    ref = (sitk.GetArrayFromImage(images["t1_n4"]) == 110.0) & (sitk.GetArrayFromImage(images["wm"]) > 0.9)
    ref = ref.astype(np.uint8)
    mask = sitk.GetImageFromArray(ref)
    mask.CopyInformation(images["icv"])
    doc = _features(session, wm_reference=mask)
    assert doc["rois"][0]["t1_normalised"] == pytest.approx(60 / 110, abs=1e-6)


def test_roi_features_refuses_mismatched_grids(session):
    images, _, _ = session
    other = sitk.Image(images["gm"])
    other.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="gm is not on the label image"):
        _features(session, gm=other)


def test_feature_rows_flatten_the_document(session):
    doc = _features(session, reference_region="cerebellar_grey_matter")
    rows = rois.feature_rows(doc)
    assert all(set(r) == {"roi", "atlas", "metric", "value", "unit"} and r["atlas"] == "planted" for r in rows)
    whole = {r["metric"]: (r["value"], r["unit"]) for r in rows if r["roi"] == "whole_brain"}
    assert whole["grey_matter_volume"] == (doc["whole_brain"]["grey_matter_ml"], "ml")
    assert set(whole) == {"grey_matter_volume", "white_matter_volume", "csf_volume", "brain_volume",
                          "intracranial_volume"}
    one = {r["metric"]: (r["value"], r["unit"]) for r in rows if r["roi"] == "one"}
    assert one == {"voxels": (256.0, "count"), "gm_volume": (doc["rois"][0]["gm_volume_ml"], "ml"),
                   "mean_suvr": (doc["rois"][0]["mean_suvr"], "1"), "median_suvr": (doc["rois"][0]["median_suvr"], "1"),
                   "gm_weighted_mean_suvr": (doc["rois"][0]["gm_weighted_mean_suvr"], "1"),
                   "t1_normalised": (doc["rois"][0]["t1_normalised"], "1")}
    three = [r for r in rows if r["roi"] == "three"]  # nulls get no row
    assert {r["metric"] for r in three} == {"voxels", "gm_volume"}
    assert len(rows) == 5 + 6 + 6 + 2
    assert len({(r["roi"], r["metric"]) for r in rows}) == len(rows)  # the warehouse key is unique


@pytest.mark.parametrize("use_jsonschema", [True, False])
def test_schema_rejects_wrong_documents(session, use_jsonschema):
    good = _features(session)
    rois.validate(good, use_jsonschema=use_jsonschema)

    def broken(edit):
        doc = json.loads(json.dumps(good))
        edit(doc)
        with pytest.raises(ValueError, match="roi-features"):
            rois.validate(doc, use_jsonschema=use_jsonschema)

    broken(lambda d: d.pop("whole_brain"))
    broken(lambda d: d.update(version=2))
    broken(lambda d: d.update(schema="something-else"))
    broken(lambda d: d["rois"][0].update(mean_suvr="1.2"))
    broken(lambda d: d["rois"][0].update(voxels=-1))
    broken(lambda d: d["rois"][0].update(voxels=1.5))
    broken(lambda d: d["rois"][0].update(extra=1))
    broken(lambda d: d["rois"][1].pop("t1_normalised"))
    broken(lambda d: d["whole_brain"].update(brain_ml=-3.0))
    broken(lambda d: d["rois"][0].update(mean_suvr=float("nan")))
    broken(lambda d: d["whole_brain"].update(csf_ml=float("inf")))
