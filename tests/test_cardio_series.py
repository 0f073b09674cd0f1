"""Which series of a cardiac study goes to which step, and where the velocity encoding is read from."""
from __future__ import annotations

import json
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imaging_tasks.cardiovascular import series as cs
from imaging_tasks.errors import BadInput
from imaging_tasks.synth import phi

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
AXIAL = ["1", "0", "0", "0", "1", "0"]


@pytest.mark.parametrize("name, venc, direction", [
    ("*fl2d1_v150in", 150.0, "through"),
    ("fl2d_v200through", 200.0, "through"),
    ("*fl3d1r_v120fh", 120.0, (0.0, 0.0, 1.0)),
    ("*fl3d1r_v120rl", 120.0, (1.0, 0.0, 0.0)),
    ("*fl3d1r_v80.5ap", 80.5, (0.0, 1.0, 0.0)),
])
def test_siemens_sequence_name(name, venc, direction):
    ds = Dataset()
    ds.SequenceName = name
    enc = cs.velocity_encoding(ds)
    assert enc.venc_cm_s == venc and enc.direction == direction and enc.source == "SequenceName"


@pytest.mark.parametrize("where", ["top", "shared", "per_frame"])
def test_velocity_encoding_sequence_wins_wherever_it_sits(where):
    item = Dataset()
    item.VelocityEncodingDirection = [0.0, 0.6, 0.8]
    item.VelocityEncodingMinimumValue = -250.0
    item.VelocityEncodingMaximumValue = 250.0
    ds = Dataset()
    ds.SequenceName = "*fl2d1_v150in"  # the standard attribute is preferred over the vendor convention
    holder = ds
    if where != "top":
        holder = Dataset()
        keyword = "SharedFunctionalGroupsSequence" if where == "shared" else "PerFrameFunctionalGroupsSequence"
        setattr(ds, keyword, Sequence([holder]))
    holder.MRVelocityEncodingSequence = Sequence([item])
    enc = cs.velocity_encoding(ds)
    assert enc.venc_cm_s == 250.0 and enc.source == "MRVelocityEncodingSequence"
    assert np.allclose(enc.vector(), [0.0, 0.6, 0.8])


def test_no_encoding_and_bad_values():
    assert cs.velocity_encoding(Dataset()) is None
    ds = Dataset()
    ds.SequenceName = "*tfi2d1_12"  # a cine SSFP: no venc
    assert cs.velocity_encoding(ds) is None
    item = Dataset()
    item.VelocityEncodingDirection = [0.0, 0.0, 0.0]
    item.VelocityEncodingMaximumValue = 150.0
    ds.MRVelocityEncodingSequence = Sequence([item])
    assert cs.velocity_encoding(ds) is None  # a zero direction is no encoding


def test_through_plane_vector_is_the_slice_normal():
    enc = cs.VelocityEncoding(150.0, "through", "SequenceName")
    assert np.allclose(enc.vector([1, 0, 0, 0, 0, -1]), [0, 1, 0])
    with pytest.raises(ValueError):
        enc.vector()


@pytest.mark.parametrize("image_type, cic, expected", [
    (["ORIGINAL", "PRIMARY", "P", "ND"], None, "phase"),
    (["ORIGINAL", "PRIMARY", "M", "ND"], None, "magnitude"),
    (["ORIGINAL", "PRIMARY", "M_PCA", "M", "PCA"], None, "magnitude"),
    (["ORIGINAL", "PRIMARY", "VELOCITY MAP"], "PHASE", "phase"),
    (["ORIGINAL", "PRIMARY", "OTHER"], None, None),
])
def test_component(image_type, cic, expected):
    ds = Dataset()
    ds.ImageType = image_type
    if cic:
        ds.ComplexImageComponent = cic
    assert cs.component(ds) == expected


def _mr(study, rng, series_uid, number, *, z=0.0, trigger=None, sequence_name="",
        image_type=("ORIGINAL", "PRIMARY", "M")):
    ds = phi.dicom_dataset(study, modality="MR", sop_class_uid=MR_IMAGE_STORAGE, series_uid=series_uid,
                           sop_uid=phi.new_uid(rng), series_number=number, instance_number=1,
                           series_description="x")
    ds.ImageType = list(image_type)
    ds.ImageOrientationPatient = AXIAL
    ds.ImagePositionPatient = ["0", "0", str(z)]
    ds.PixelSpacing = ["1", "1"]
    if trigger is not None:
        ds.TriggerTime = str(trigger)
    if sequence_name:
        ds.SequenceName = sequence_name
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((4, 4), "<u2").tobytes()
    return ds


def test_study_series_routes_each_kind(tmp_path):
    rng = np.random.default_rng(0)
    study = phi.fake_study(rng, "s")
    cine, mag, pha, bare, plain = phi.new_series_uids(rng, 5)
    files = []

    def write(ds, name):
        path = tmp_path / f"{name}.dcm"
        phi.write_dicom(ds, str(path))
        files.append(path)

    for z in (0, 8):
        for t in (0, 40):
            write(_mr(study, rng, cine, 3, z=z, trigger=t, sequence_name="*tfi2d1_12"), f"cine-{z}-{t}")
    for t in (0, 40):  # Siemens: magnitude and phase in two series; only the phase says P, both carry the venc name
        write(_mr(study, rng, mag, 5, z=20, trigger=t, sequence_name="*fl2d1_v150in"), f"mag-{t}")
        write(_mr(study, rng, pha, 6, z=20, trigger=t, sequence_name="*fl2d1_v150in",
                  image_type=("ORIGINAL", "PRIMARY", "P")), f"pha-{t}")
        # a magnitude series with no flow marker at all, matching the phase series' geometry and timing
        write(_mr(study, rng, bare, 7, z=20, trigger=t), f"bare-{t}")
    write(_mr(study, rng, plain, 9, z=50), "survey")  # no cardiac timing: not for us
    odd = _mr(study, rng, phi.new_uid(rng), 8, z=20.2, trigger=0)  # a magnitude in the flow plane, other matrix:
    odd.Rows = odd.Columns = 8                                      # flow's (refused there as a mismatch), not cine
    odd.PixelData = np.zeros((8, 8), "<u2").tobytes()
    write(odd, "odd")
    kinds = {s.number: s.kind for s in cs.study_series(files)}
    assert kinds == {3: "cine", 5: "flow", 6: "flow", 7: "flow", 8: "flow", 9: "other"}
    assert [s.number for s in cs.of_kind(files, "flow")] == [5, 6, 7, 8]
    assert [len(s.items) for s in cs.of_kind(files, "cine")] == [4]

    out = cs.route_series(files, tmp_path / "out")
    assert out["series"] == {"cine": 1, "flow": 4, "other": 1}
    routed = json.loads((tmp_path / "out" / "series.json").read_text())
    assert [(s["number"], s["kind"]) for s in routed["series"]] == sorted(kinds.items())
    with pytest.raises(BadInput) as exc:
        cs.route_series([tmp_path / "survey.dcm"], tmp_path / "out2")
    assert exc.value.reason == "no_series"


def test_route_refuses_other_modalities(tmp_path):
    rng = np.random.default_rng(1)
    study = phi.fake_study(rng, "s")
    ds = _mr(study, rng, phi.new_uid(rng), 1)
    ds.Modality = "PT"
    phi.write_dicom(ds, str(tmp_path / "pet.dcm"))
    with pytest.raises(BadInput) as exc:
        cs.route_series([tmp_path / "pet.dcm"], tmp_path / "out")
    assert exc.value.reason == "wrong_modality" and "PT" in str(exc.value)
