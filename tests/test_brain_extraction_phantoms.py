"""Brain extraction on a second, independently built family of head phantoms (tests/phantoms/independent_head).

Issue 20: tuned on the project's own synthetic heads, brain extraction reached Dice 0.943 and +12 % brain volume
on an independently built head (the brain contour ran along the outer edge of the CSF).  Every member of the
family goes through what the pipeline runs: DICOM series -> the checked loader -> N4 -> segment_brain, and is
held to the issue's targets: brain mask Dice >= 0.95 against GM + WM >= 0.5, parenchymal (GM + WM partial
volume) and intracranial volume within 3 %.  Counting the CSF envelope as brain reads +10-25 % here, trimming
the CSF off the intracranial space -15-25 %.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import independent_head as ih
from scipy import ndimage as ndi

from imaging_tasks.neuroimaging.session import load_session
from imaging_tasks.neuroimaging.structural import n4_correct
from imaging_tasks.neuroimaging.tissue import segment_brain


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """Each member built, written, loaded, corrected and segmented once for the whole module."""
    done = {}

    def run(name: str):
        if name not in done:
            phantom = ih.build(name)
            image = load_session(ih.write_dicom(phantom, tmp_path_factory.mktemp(name))).t1  # the pipeline's loader
            corrected, _log_bias = n4_correct(image)
            done[name] = phantom, image, segment_brain(corrected, device="cpu")
        return done[name]

    return run


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("name", [h.name for h in ih.FAMILY])
def test_brain_and_intracranial_volume_on_independent_heads(processed, name):
    """Measured over the six members: Dice 0.991-0.997, parenchyma -2.5 to +0.9 %, intracranial -2.4 to +1.7 %
    (intracranial Dice 0.987-0.995)."""
    phantom, image, seg = processed(name)
    # the series read back is the phantom's grid (any orientation, anisotropic voxels, rescale slope)
    assert image.GetSize() == phantom.image.GetSize()
    assert np.allclose(image.GetSpacing(), phantom.image.GetSpacing(), atol=1e-4)
    assert np.allclose(image.GetOrigin(), phantom.image.GetOrigin(), atol=1e-3)
    assert np.allclose(image.GetDirection(), phantom.image.GetDirection(), atol=1e-5)
    brain = sitk.GetArrayFromImage(seg.brain) > 0
    assert _dice(brain, phantom.brain_mask) >= 0.95
    assert seg.volumes_ml["brain"] == pytest.approx(phantom.truth["brain_volume_ml"], rel=0.03)
    assert seg.volumes_ml["intracranial"] == pytest.approx(phantom.truth["intracranial_volume_ml"], rel=0.03)
    assert _dice(sitk.GetArrayFromImage(seg.icv) > 0, phantom.icv_mask) >= 0.95


@pytest.mark.parametrize("name", ["thick-csf-bright-skull", "coarse-eyes"])
def test_fractions_sum_to_one_and_csf_stays_out_of_the_brain(processed, name):
    """GM + WM + CSF = 1 inside the intracranial mask and 0 outside; the volumes add up; the ventricles and the
    CSF envelope (truth parenchyma < 5 %) are outside the brain mask but inside the intracranial one."""
    phantom, _image, seg = processed(name)
    icv = sitk.GetArrayFromImage(seg.icv) > 0
    total = sum(sitk.GetArrayFromImage(getattr(seg, k)) for k in ("gm", "wm", "csf"))
    assert np.allclose(total[icv], 1, atol=1e-4) and not total[~icv].any()
    v = seg.volumes_ml
    assert v["grey_matter"] + v["white_matter"] + v["csf"] == pytest.approx(v["intracranial"], rel=1e-4)
    assert v["brain"] == pytest.approx(v["grey_matter"] + v["white_matter"])
    spacing = np.array(seg.icv.GetSpacing()[::-1])
    csf = (phantom.maps["brain"] < 0.05) & (phantom.maps["icv"] > 0.95)
    csf &= ndi.distance_transform_edt(phantom.maps["brain"] < 0.5, sampling=spacing) > 1.5 * spacing.max()
    assert csf.sum() * np.prod(spacing) / 1000 > 10  # ventricles and envelope (away from the parenchyma)
    brain = sitk.GetArrayFromImage(seg.brain) > 0
    assert brain[csf].mean() < 0.01 and icv[csf].mean() > 0.99


def test_shipped_real_average_t1_smoke():
    """nilearn's MNI152 T1 (an average of real scans, skull-stripped: background 0, no skull) goes through.

    Its own GM + WM maps sum to 1678 ml and its brain mask (with ventricles and sulcal CSF) holds 1883 ml;
    measured 1587 ml of brain (-5.5 %: with no skull the CSF level is read off the sulci's partial volume)
    and 1884 ml intracranial.
    """
    image, volumes = ih.mni_t1_smoke_image(2)
    seg = segment_brain(image, device="cpu")
    v = seg.volumes_ml
    assert v["brain"] == pytest.approx(volumes["gm_plus_wm_ml"], rel=0.10)
    assert v["brain"] < v["intracranial"] <= 1.1 * volumes["brain_mask_ml"]
