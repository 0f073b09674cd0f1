"""4-D MR series (BOLD, DWI) written as DICOM the way scanners write them, from an array with known geometry.

Why: the 4-D loaders (:mod:`.series4d`) must be checked against truth that does not come from the converter
they call.  Any ``(x, y, z, t)`` array with a RAS affine (what nibabel gives, what :mod:`.synth_fmri` and
:mod:`.synth_dwi` make) is written as one series; the truth (geometry, gradients in the patient frame, TR,
intensity scaling) is known exactly here, so a round trip through ``dcm2niix`` can be compared in world
coordinates, whatever axes the converter flips.

Styles:

* ``"classic"``: one MR Image Storage file per slice per volume (how Siemens/GE/Philips classic exports come).
  Per file: ImagePositionPatient / ImageOrientationPatient (oblique grids allowed: any orthonormal affine),
  PixelSpacing, SliceThickness, AcquisitionNumber = volume + 1, InstanceNumber running over volumes then
  slices, AcquisitionTime = series start + volume x TR.  BOLD: TemporalPositionIdentifier (volume + 1),
  NumberOfTemporalPositions, RepetitionTime (ms).  DWI: DiffusionBValue (0018,9087), DiffusionDirectionality
  (``DIRECTIONAL`` for b > 0, ``NONE`` for b = 0) and DiffusionGradientOrientation (0018,9089) as PS3.3
  C.8.13.5.9 defines it: a unit vector in the patient (LPS) frame; ImageType carries ``DIFFUSION``.
* ``"enhanced"``: one Enhanced MR Image Storage file, frames ordered volume-major, per-frame functional groups
  (Frame Content with DimensionIndexValues (stack position, temporal position), Plane Position, MR Diffusion
  with its Diffusion Gradient Direction Sequence for DWI, Frame VOI LUT), shared groups (Pixel Measures, Plane
  Orientation, MR Timing, Pixel Value Transformation).

Voxel layout: voxel ``(i, j, k)`` of volume ``t`` is column ``i``, row ``j`` of slice ``k``; the pixel data of a
slice is ``data[:, :, k, t].T``.  Intensities: integer-valued data inside uint16 are stored as they are;
anything else with one RescaleSlope/Intercept for the whole series (16-bit unsigned), so the stored values are
the data up to half a slope.  Gradients: ``bvecs_voxel`` are unit vectors along the array's voxel axes (dipy
convention, no FSL x flip); the patient-frame direction written is ``LPS_from_RAS @ R @ v`` with ``R`` the
affine's column-normalised rotation.  PHI is planted as in every synthetic series (``imaging_tasks.synth.phi``),
plus the series description.
"""
from __future__ import annotations

import datetime as dt
import pathlib

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imaging_tasks.synth import phi

MR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4.1"
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
KINDS = ("bold", "dwi")
STYLES = ("classic", "enhanced")
ORTHO_TOL = 1e-6


def _geometry(affine_ras: np.ndarray) -> dict:
    """Spacing, LPS rotation and origin of an orthogonal RAS affine; refuses shear (DICOM cannot hold it)."""
    a = np.asarray(affine_ras, dtype=float)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {a.shape}")
    lps = LPS_FROM_RAS @ a[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    rot = lps / spacing
    if np.max(np.abs(rot.T @ rot - np.eye(3))) > ORTHO_TOL:
        raise ValueError("affine is sheared: DICOM slices need orthogonal voxel axes")
    return {"spacing": spacing, "rot_lps": rot, "origin_lps": LPS_FROM_RAS @ a[:3, 3],
            "rot_ras": a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)}


def gradients_patient_lps(bvecs_voxel: np.ndarray, affine_ras: np.ndarray) -> np.ndarray:
    """Voxel-axis unit gradient vectors (n, 3) -> unit vectors in the DICOM patient (LPS) frame (zeros stay zero)."""
    v = np.asarray(bvecs_voxel, dtype=float).reshape(-1, 3)
    g = _geometry(affine_ras)
    out = v @ g["rot_lps"].T
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 0, out / np.where(norm > 0, norm, 1.0), 0.0)


def _scaling(data: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(slope, intercept, uint16 stored values) for the whole series."""
    lo, hi = float(np.min(data)), float(np.max(data))
    if np.all(data == np.rint(data)) and lo >= 0 and hi <= 65535:
        return 1.0, 0.0, data.astype(np.uint16)
    slope = (hi - lo) / 65000.0 if hi > lo else 1.0
    slope = float(f"{slope:.8g}")
    intercept = float(f"{lo:.8g}")
    stored = np.clip(np.rint((data - intercept) / slope), 0, 65535).astype(np.uint16)
    return slope, intercept, stored


def _clock(hhmmss: str, offset_s: float) -> str:
    t = dt.datetime(2000, 1, 1, int(hhmmss[:2]), int(hhmmss[2:4]), int(hhmmss[4:6])) + dt.timedelta(seconds=offset_s)
    return t.strftime("%H%M%S.%f")


def write_4d_dicom(data_xyzt, affine_ras, folder, *, kind: str, tr_s: float | None = None, bvals=None,
                   bvecs_voxel=None, style: str = "classic", study: phi.Study | None = None,
                   rng: np.random.Generator | None = None, series_number: int = 7,
                   series_description: str | None = None) -> dict:
    """Write one BOLD or DWI series into ``folder``; returns its truth record.

    ``data_xyzt`` (x, y, z, t); ``affine_ras`` 4x4 (orthogonal, oblique allowed); ``tr_s`` RepetitionTime in
    seconds (None: not written, for the bad-input tests); DWI: ``bvals`` (t,) s/mm^2 and ``bvecs_voxel`` (t, 3).
    ``study``: the patient/study (PHI) to plant, else a fake one from ``rng``.

    Truth record: ``series_uid``, ``files``, ``n_volumes``, ``shape``, ``affine_ras``, ``tr_s``, ``bvals``,
    ``gradients_lps`` (n, 3: what DiffusionGradientOrientation holds; zeros for b = 0), ``slope``,
    ``intercept``, ``style``, ``phi`` (the planted identifying strings).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    data = np.asarray(data_xyzt)
    if data.ndim != 4:
        raise ValueError(f"data must be (x, y, z, t), got shape {data.shape}")
    nx, ny, nz, nt = data.shape
    geo = _geometry(affine_ras)
    rng = rng if rng is not None else np.random.default_rng(0)
    study = study or phi.fake_study(rng, "series4d")
    gradients = np.zeros((nt, 3))
    b = None
    if kind == "dwi" and bvals is not None:
        b = np.asarray(bvals, dtype=float).reshape(-1)
        if b.shape[0] != nt or bvecs_voxel is None or np.asarray(bvecs_voxel).reshape(-1, 3).shape[0] != nt:
            raise ValueError("bvals and bvecs_voxel need one entry per volume")
        gradients = gradients_patient_lps(bvecs_voxel, affine_ras)
        gradients[b <= 0] = 0.0
    slope, intercept, stored = _scaling(data)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = phi.new_uid(rng)
    description = series_description or ("fMRI BOLD ep2d task" if kind == "bold" else "DTI ep2d diff 2mm")
    common = dict(study=study, geo=geo, kind=kind, tr_s=tr_s, b=b, gradients=gradients, slope=slope,
                  intercept=intercept, series_uid=series_uid, series_number=series_number,
                  description=description, rng=rng)
    if style == "classic":
        files = _write_classic(stored, folder, **common)
    else:
        files = _write_enhanced(stored, folder, **common)
    return {"series_uid": series_uid, "files": files, "n_volumes": nt, "shape": [nx, ny, nz, nt],
            "affine_ras": np.asarray(affine_ras, dtype=float).tolist(), "tr_s": tr_s,
            "bvals": None if b is None else b.tolist(), "gradients_lps": gradients.tolist(),
            "slope": slope, "intercept": intercept, "style": style, "kind": kind, "phi": phi.phi_values(study)}


def _sequence_name(kind: str, b: np.ndarray | None, t: int) -> str:
    if kind == "bold":
        return "*epfid2d1_64"
    if b is None:
        return "*ep_b0"
    return "*ep_b0" if b[t] <= 0 else f"*ep_b{int(round(b[t]))}#{t}"


def _mr_attributes(ds, kind: str, tr_s: float | None) -> None:
    ds.ScanningSequence = ["EP"]
    ds.SequenceVariant = ["SK", "SS"]
    ds.ScanOptions = "FS"
    ds.MRAcquisitionType = "2D"
    if tr_s is not None:
        ds.RepetitionTime = f"{tr_s * 1000.0:.6g}"
    ds.EchoTime = "30" if kind == "bold" else "89"
    ds.FlipAngle = "90"
    ds.MagneticFieldStrength, ds.ImagingFrequency, ds.ImagedNucleus = "3", "123.25", "1H"
    ds.EchoNumbers = 1
    ds.EchoTrainLength = 1
    ds.ProtocolName = "fmri_task" if kind == "bold" else "dti_30dir"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "HEAD"
    ds.PositionReferenceIndicator = ""
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0


def _write_classic(stored, folder, *, study, geo, kind, tr_s, b, gradients, slope, intercept, series_uid,
                   series_number, description, rng) -> list[str]:
    """One file per slice per volume.  One data set is built (PHI planted by ``phi.dicom_dataset``) and only what
    changes between files is rewritten before each save: building it anew per file took most of the time."""
    nx, ny, nz, nt = stored.shape
    rot, sp, origin = geo["rot_lps"], geo["spacing"], geo["origin_lps"]
    ds = phi.dicom_dataset(study, modality="MR", sop_class_uid=MR_SOP_CLASS, series_uid=series_uid,
                           sop_uid=phi.new_uid(rng), series_number=series_number, instance_number=1,
                           series_description=description)
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*rot[:, 0], *rot[:, 1])]
    ds.PixelSpacing = [f"{sp[1]:.6f}", f"{sp[0]:.6f}"]
    ds.SliceThickness = f"{sp[2]:.6f}"
    ds.SpacingBetweenSlices = f"{sp[2]:.6f}"
    ds.Rows, ds.Columns = ny, nx
    _mr_attributes(ds, kind, tr_s)
    ds.RescaleSlope = f"{slope:.8g}"
    ds.RescaleIntercept = f"{intercept:.8g}"
    ds.RescaleType = "US"
    if kind == "bold":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.NumberOfTemporalPositions = nt
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
    ref_sop = ds.RequestAttributesSequence[0].ReferencedStudySequence[0].ReferencedSOPSequence[0]
    files = []
    for t in range(nt):
        ds.SequenceName = _sequence_name(kind, b, t)
        ds.AcquisitionNumber = t + 1
        ds.AcquisitionTime = ds.ContentTime = _clock(study.study_time, t * (tr_s or 0.0))
        if kind == "bold":
            ds.TemporalPositionIdentifier = t + 1
        elif b is not None:
            ds.DiffusionBValue = float(b[t])
            ds.DiffusionDirectionality = "DIRECTIONAL" if b[t] > 0 else "NONE"
            if b[t] > 0:
                ds.DiffusionGradientOrientation = [float(v) for v in gradients[t]]
            elif "DiffusionGradientOrientation" in ds:
                del ds.DiffusionGradientOrientation
        for k in range(nz):
            inst = t * nz + k + 1
            if inst > 1:
                uid = phi.new_uid(rng)
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ref_sop.ReferencedSOPInstanceUID = uid
            ds.InstanceNumber = inst
            pos = origin + rot[:, 2] * sp[2] * k
            ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
            ds.SliceLocation = f"{float(np.dot(rot[:, 2], pos)):.6f}"
            ds.PixelData = np.ascontiguousarray(stored[:, :, k, t].T).astype("<u2").tobytes()
            path = folder / f"{inst:05d}.dcm"
            phi.write_dicom(ds, str(path))
            files.append(str(path))
    return files


def _item(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _write_enhanced(stored, folder, *, study, geo, kind, tr_s, b, gradients, slope, intercept, series_uid,
                    series_number, description, rng) -> list[str]:
    nx, ny, nz, nt = stored.shape
    rot, sp, origin = geo["rot_lps"], geo["spacing"], geo["origin_lps"]
    ds = phi.dicom_dataset(study, modality="MR", sop_class_uid=ENHANCED_MR_SOP_CLASS, series_uid=series_uid,
                           sop_uid=phi.new_uid(rng), series_number=series_number, instance_number=1,
                           series_description=description)
    _mr_attributes(ds, kind, tr_s)
    for attr in ("RepetitionTime", "EchoTime", "FlipAngle", "ScanningSequence", "SequenceVariant", "ScanOptions",
                 "EchoNumbers", "EchoTrainLength", "PatientPosition"):
        if attr in ds:
            delattr(ds, attr)
    ds.PatientPosition = "HFS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION" if kind == "dwi" else "M", "NONE"]
    ds.PulseSequenceName = "epfid2d1" if kind == "bold" else "ep_b"
    ds.AcquisitionContrast = "DIFFUSION" if kind == "dwi" else "T2_STAR"
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.EchoPulseSequence = "GRADIENT" if kind == "bold" else "SPIN"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = study.study_date + study.study_time
    ds.Rows, ds.Columns = ny, nx
    ds.NumberOfFrames = nz * nt
    if kind == "bold":
        ds.NumberOfTemporalPositions = nt
    dim_org = phi.new_uid(rng)
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dim_org)])
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=dim_org, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="In-Stack Position Number"),
        _item(DimensionOrganizationUID=dim_org, DimensionIndexPointer=0x00209128,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="Temporal Position Index"),
    ])
    timing = _item(FlipAngle=90.0, EchoTrainLength=1)
    if tr_s is not None:
        timing.RepetitionTime = float(tr_s * 1000.0)
    shared = _item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=[f"{sp[1]:.6f}", f"{sp[0]:.6f}"],
                                              SliceThickness=f"{sp[2]:.6f}",
                                              SpacingBetweenSlices=f"{sp[2]:.6f}")]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=[f"{v:.8f}" for v in
                                                                          (*rot[:, 0], *rot[:, 1])])]),
        MRTimingAndRelatedParametersSequence=Sequence([timing]),
        MREchoSequence=Sequence([_item(EffectiveEchoTime=30.0 if kind == "bold" else 89.0)]),
        PixelValueTransformationSequence=Sequence([_item(RescaleSlope=f"{slope:.8g}",
                                                         RescaleIntercept=f"{intercept:.8g}",
                                                         RescaleType="US")]),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    t0 = dt.datetime.strptime(study.study_date + study.study_time, "%Y%m%d%H%M%S")
    for t in range(nt):
        when = (t0 + dt.timedelta(seconds=t * (tr_s or 0.0))).strftime("%Y%m%d%H%M%S.%f")
        for k in range(nz):
            pos = origin + rot[:, 2] * sp[2] * k
            content = _item(StackID="1", InStackPositionNumber=k + 1, TemporalPositionIndex=t + 1,
                            DimensionIndexValues=[k + 1, t + 1], FrameAcquisitionNumber=t + 1,
                            FrameAcquisitionDateTime=when, FrameReferenceDateTime=when,
                            FrameAcquisitionDuration=float((tr_s or 1.0) * 1000.0))
            frame = _item(FrameContentSequence=Sequence([content]),
                          PlanePositionSequence=Sequence([_item(ImagePositionPatient=[f"{v:.6f}" for v in pos])]),
                          FrameVOILUTSequence=Sequence([_item(WindowCenter="500", WindowWidth="1000")]))
            if kind == "dwi":
                diff = _item(DiffusionBValue=0.0, DiffusionDirectionality="NONE")
                if b is not None:
                    diff.DiffusionBValue = float(b[t])
                    if b[t] > 0:
                        diff.DiffusionDirectionality = "DIRECTIONAL"
                        diff.DiffusionGradientDirectionSequence = Sequence(
                            [_item(DiffusionGradientOrientation=[float(v) for v in gradients[t]])])
                frame.MRDiffusionSequence = Sequence([diff])
            frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    pixels = np.ascontiguousarray(stored.transpose(3, 2, 1, 0))  # (t, z, y, x): frames volume-major, rows, cols
    ds.PixelData = pixels.astype("<u2").tobytes()
    path = folder / "00001.dcm"
    phi.write_dicom(ds, str(path))
    return [str(path)]


def oblique_affine(voxel_mm=(3.0, 3.0, 3.5), rotation_deg=(10.0, -6.0, 15.0), shape=(16, 18, 10),
                   centre_ras=(2.0, -10.0, 20.0)) -> np.ndarray:
    """A RAS affine with the given voxel size, rotated (about x, then y, then z) and centred on ``centre_ras``.

    Tests and synthetic sessions use it for oblique acquisitions.
    """
    ax, ay, az = np.deg2rad(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = rz @ ry @ rx @ np.diag(voxel_mm)
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = np.asarray(centre_ras, float) - m @ ((np.asarray(shape, float) - 1) / 2)
    return aff


__all__ = ["ENHANCED_MR_SOP_CLASS", "KINDS", "MR_SOP_CLASS", "STYLES", "gradients_patient_lps", "oblique_affine",
           "write_4d_dicom"]
