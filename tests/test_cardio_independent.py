"""Cine and phase-contrast phantoms built here, independently of ``synth_cine`` / ``synth_flow`` (other shapes,
binary edges without partial volume, other intensities and header habits), so the methods are not only right on
the generator they were developed against."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from imaging_tasks.cardiovascular import cine, flow


def _cine(folder, *, n_s=9, n_p=16, px=1.8, gap=10.0, blood=900, myo=250, tissue=400, noise=20, seed=0, ef=0.55,
          r_ed=25.0):
    rng = np.random.default_rng(seed)
    n = 128
    yy, xx = (np.mgrid[:n, :n] - n / 2) * px
    truth = np.zeros(n_p)
    series = generate_uid()
    for s in range(n_s):
        # radius tapering towards the apex (last slices)
        taper = np.sqrt(max(0.0, 1 - (s / (n_s - 0.5)) ** 2))
        for p in range(n_p):
            g = 0.5 * (1 + np.cos(2 * np.pi * p / n_p))   # 1 at ED (p=0), 0 at ES
            scale = np.sqrt((1 - ef) + ef * g)            # area scales linearly with volume
            r = r_ed * scale * taper
            img = np.full((n, n), 30.0)
            chest = (xx / 110) ** 2 + (yy / 85) ** 2 <= 1
            img[chest] = tissue
            wall = 8.0 + (1 - g) * 4
            rv = (((xx + 30) ** 2 + yy ** 2 <= (r_ed * taper + 14) ** 2)
                  & ((xx - 5) ** 2 + yy ** 2 > (r + wall + 4) ** 2))
            img[rv & chest] = blood * 0.95
            img[(xx ** 2 + yy ** 2 <= (r + wall) ** 2)] = myo
            lv = xx ** 2 + yy ** 2 <= r ** 2
            img[lv] = blood
            truth[p] += lv.sum() * px * px * gap / 1000
            img = img + rng.normal(0, noise, img.shape)
            ds = Dataset()
            ds.file_meta = FileMetaDataset(); ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            ds.SOPInstanceUID = generate_uid(); ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"; ds.Modality = "MR"; ds.SeriesInstanceUID = series
            ds.StudyInstanceUID = "1.2.3"; ds.SeriesNumber = 5; ds.InstanceNumber = s * n_p + p + 1
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]; ds.ImagePositionPatient = [0, 0, -s * gap]
            ds.PixelSpacing = [px, px]; ds.SliceThickness = gap; ds.TriggerTime = p * 50.0
            ds.Rows = ds.Columns = n; ds.SamplesPerPixel = 1; ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16; ds.BitsStored = 16; ds.HighBit = 15; ds.PixelRepresentation = 0
            ds.PixelData = np.clip(img, 0, 65535).astype("<u2").tobytes()
            ds.is_little_endian = True; ds.is_implicit_VR = False
            ds.save_as(str(folder / f"{s:02d}_{p:02d}.dcm"), enforce_file_format=True)
    return truth


def _pc(folder, *, venc=150.0, peak=120.0, back=-25.0, px=1.5, n_f=24, noise=0.01, seed=0, r=11.0):
    rng = np.random.default_rng(seed)
    n = 96
    yy, xx = (np.mgrid[:n, :n] - n / 2 + 0.5) * px
    rr2 = (xx - 8) ** 2 + (yy + 5) ** 2
    lumen = rr2 <= r * r
    shape = np.where(lumen, 2 * (1 - rr2 / (r * r)), 0.0)  # mean 1 over the lumen (continuous)
    rr_ms = 1000.0
    t = np.arange(n_f) * rr_ms / n_f
    mean_v = np.where(t < 350, peak / 2 * np.sin(np.pi * t / 350),
                      np.where(t < 550, back * np.sin(np.pi * (t - 350) / 200), 0.0))
    truth_q = np.array([(m * shape).sum() * px * px / 100 for m in mean_v])  # ml/s (cm/s * mm^2 /100)
    dt = rr_ms / n_f / 1000
    fwd = truth_q.clip(0).sum() * dt; bwd = -truth_q.clip(max=0).sum() * dt
    mag_uid, ph_uid = generate_uid(), generate_uid()
    for f in range(n_f):
        v = mean_v[f] * shape + rng.normal(0, noise * venc, (n, n))
        wrapped = (v + venc) % (2 * venc) - venc
        stored_p = np.round(wrapped / venc * 2048 + 2048).clip(0, 4095)
        mag = np.where(lumen, 800, 300) + rng.normal(0, 10, (n, n))
        body = xx ** 2 / 60 ** 2 + yy ** 2 / 50 ** 2 <= 1
        mag = np.where(body, mag, 20 + rng.normal(0, 5, (n, n)))
        for uid, num, arr, itype in ((mag_uid, 10, mag, "M"), (ph_uid, 11, stored_p, "P")):
            ds = Dataset()
            ds.file_meta = FileMetaDataset(); ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            ds.SOPInstanceUID = generate_uid(); ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"; ds.Modality = "MR"; ds.SeriesInstanceUID = uid
            ds.StudyInstanceUID = "1.2.3"; ds.SeriesNumber = num; ds.InstanceNumber = f + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", itype, "ND"]; ds.SequenceName = f"*fl2d1_v{int(venc)}in"
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]; ds.ImagePositionPatient = [-72, 20, 72]
            ds.PixelSpacing = [px, px]; ds.SliceThickness = 6; ds.TriggerTime = float(t[f]); ds.NominalInterval = rr_ms
            ds.Rows = ds.Columns = n; ds.SamplesPerPixel = 1; ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16; ds.BitsStored = 12; ds.HighBit = 11; ds.PixelRepresentation = 0
            if itype == "P":
                ds.RescaleSlope = 2; ds.RescaleIntercept = -4096
            ds.PixelData = np.clip(arr, 0, 4095).astype("<u2").tobytes()
            ds.save_as(str(folder / f"{num}_{f:02d}.dcm"), enforce_file_format=True)
    return {"net": fwd - bwd, "rf": 100 * bwd / fwd, "peak": float(np.abs(mean_v).max() * 2)}


@pytest.mark.parametrize("knobs", [{}, dict(blood=600, myo=300, tissue=350, noise=30, seed=1),
                                   dict(px=1.3, gap=8, r_ed=30, ef=0.35, seed=2)])
def test_cine_on_stacked_ellipses(tmp_path, knobs):
    truth = _cine(tmp_path, **knobs)
    res = cine.cine_function(sorted(tmp_path.glob("*.dcm")), tmp_path / "out", device="cpu")
    m = {x["name"]: x["value"] for x in res["metrics"]}
    edv, esv = truth.max(), truth.min()
    assert m["lv_edv_ml"] == pytest.approx(edv, rel=0.05) and m["lv_esv_ml"] == pytest.approx(esv, rel=0.05)
    assert m["lv_ef_pct"] == pytest.approx(100 * (edv - esv) / edv, abs=2.0)


@pytest.mark.parametrize("knobs", [{}, dict(venc=70, peak=160, back=-40, seed=3)])
def test_phase_contrast_on_a_binary_vessel(tmp_path, knobs):
    truth = _pc(tmp_path, **knobs)
    res = flow.flow(sorted(tmp_path.glob("*.dcm")), tmp_path / "out", device="cpu")
    m = {x["name"]: x["value"] for x in res["metrics"]}
    assert m["pc_net_flow_ml"] == pytest.approx(truth["net"], rel=0.02)
    assert m["pc_regurgitant_fraction_pct"] == pytest.approx(truth["rf"], abs=2.0)
    assert m["pc_aliasing_detected"] == float(truth["peak"] > knobs.get("venc", 150.0))
