"""NIfTI headers lose their free text and extensions; voxels and geometry stay exactly as they were."""
from __future__ import annotations

import numpy as np
import pytest

from imaging_tasks.deid.nifti import deidentify_nifti
from imaging_tasks.errors import BadInput

PHI = [b"Okafor^Adaeze", b"MRN48213377", b"ACC7718203", b"St. Brigid"]


def _make(path, nifti2=False):
    import nibabel as nib

    data = (np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5) * 3 - 40)
    affine = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(data, affine)
    img.header["descrip"] = b"Okafor^Adaeze MRN48213377"
    img.header["aux_file"] = b"ACC7718203"
    img.header["intent_name"] = b"St. Brigid"
    img.header.set_slope_inter(0.5, 10.0)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"PatientName=Okafor^Adaeze; ID=MRN48213377"))
    nib.save(img, str(path))
    return data, affine


@pytest.mark.parametrize("name,nifti2", [("t1.nii", False), ("t1.nii.gz", False), ("t1_n2.nii", True)])
def test_header_text_and_extensions_go_voxels_stay(tmp_path, name, nifti2):
    import gzip

    import nibabel as nib

    src, dst = tmp_path / name, tmp_path / "out" / name
    data, affine = _make(src, nifti2)
    before = nib.load(str(src))
    info = deidentify_nifti(src, dst)
    assert set(info["cleared_fields"]) >= {"descrip", "aux_file", "intent_name"} and info["removed_extensions"] == 1
    raw = dst.read_bytes()
    raw = gzip.decompress(raw) if name.endswith(".gz") else raw
    for value in PHI:
        assert value not in raw
    after = nib.load(str(dst))
    assert np.array_equal(np.asanyarray(after.dataobj), np.asanyarray(before.dataobj))
    assert np.array_equal(after.get_fdata(), data * 0.5 + 10.0)
    assert np.allclose(after.affine, affine) and after.header.get_data_dtype() == np.int16
    assert len(after.header.extensions) == 0
    # same input -> same bytes (gzip without a timestamp)
    deidentify_nifti(src, tmp_path / "again" / name)
    assert (tmp_path / "again" / name).read_bytes() == dst.read_bytes()


def test_not_a_nifti_is_bad_input(tmp_path):
    bad = tmp_path / "x.nii"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(BadInput) as exc:
        deidentify_nifti(bad, tmp_path / "y.nii")
    assert exc.value.reason == "unreadable_nifti"
