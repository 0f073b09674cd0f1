"""Neuroimaging: T1 MRI (+ PET) sessions, DICOM or NIfTI uploads, through the whole session chain.

Steps: :mod:`.chain` (N4 -> brain extraction -> PET averaging -> PET-to-T1 -> MNI152 atlas -> SUVR -> ROI features).  Synthetic sessions with known anatomy and bias field: :mod:`.synth`.  A session is
ready with MR and PET, or MR (or PET) alone once nothing new arrived for ``mr_only_wait_hours`` (:func:`session_ready`).
Light: read at DAG parse time.
"""
from __future__ import annotations

import datetime as dt

from imaging_tasks.specialty import Option, Specialty, Step


def session_ready(modalities: dict[str, int], newest: str | None, now: dt.datetime | None, options: dict) -> bool:
    """MR and PET together at once; anything else once nothing new has arrived for ``mr_only_wait_hours``.

    MR alone is then processed MR-only; PET alone goes on too, so that processing quarantines it (``no_mri``)
    rather than leaving it waiting for an MR that may never come.
    """
    if "MR" in modalities and "PT" in modalities:
        return True
    if newest is None:
        return False
    now = now or dt.datetime.now(dt.timezone.utc)
    return now - dt.datetime.fromisoformat(newest) >= dt.timedelta(hours=float(options["mr_only_wait_hours"]))


_CHAIN = "imaging_tasks.neuroimaging.chain"

SPECIALTY = Specialty(
    name="neuroimaging",
    order=0,
    title="Neuroimaging",
    summary="MRI/PET sessions: N4, brain extraction, PET averaging, PET-to-T1, MNI152 atlas, SUVR, ROI features",
    file_kind="dicom",
    modalities=frozenset({"MR", "PT"}),
    nifti_uploads={"mri": "MR", "pet": "PT"},  # <patient>/<session>/mri.nii.gz, pet.nii.gz (+ .json sidecars)
    steps=(
        Step("n4_bias", f"{_CHAIN}:n4_bias", gpu=False,
             description="load the session (DICOM or NIfTI), N4 bias correction of the T1"),
        Step("brain_extraction", f"{_CHAIN}:brain_extraction", gpu=True,
             description="GM/WM/CSF partial-volume classes, parenchymal brain and intracranial masks, volumes"),
        Step("pet_average", f"{_CHAIN}:pet_average", gpu=False,
             description="PET frames realigned to their mean and averaged; SUV factor where headers allow"),
        Step("pet_to_t1", f"{_CHAIN}:pet_to_t1", gpu=False,
             description="rigid mutual-information registration of the PET to the T1"),
        Step("atlas_registration", f"{_CHAIN}:atlas_registration", gpu=False,
             description="MNI152 to T1, affine then deformable; the ROI atlas in T1 space"),
        Step("suvr", f"{_CHAIN}:suvr", gpu=False, description="SUVR image against the reference region"),
        Step("roi_features", f"{_CHAIN}:roi_features", gpu=False,
             description="per-ROI GM volume, SUVR and normalised T1; whole-brain volumes"),
    ),
    options=(
        Option("mr_only_wait_hours", "number", 6.0, "MR-only wait (hours)",
               "A session with MR but no PET yet is processed MR-only once nothing new arrived for this many "
               "hours (0-168)", minimum=0, maximum=168, stage="index", affects_results=False),
        Option("retain_patient_characteristics", "boolean", False, "Keep weight, age and sex (for SUV)",
               "De-identify with the DICOM PS3.15 Retain Patient Characteristics option, so PatientWeight (and "
               "the sidecar's BodyWeight) stay and SUV can be computed. SUVR needs none of it.",
               stage="deidentify"),
        Option("n4_shrink", "integer", 2, "N4 shrink factor",
               "N4 bias correction runs on the image shrunk by this factor (1-8; larger is faster, coarser)",
               minimum=1, maximum=8),
        Option("reference_region", "string", "cerebellar_grey_matter", "SUVR reference region",
               "Region whose mean PET uptake divides the image: cerebellar grey matter (default), whole "
               "cerebellum or pons; defined in MNI space (see README)",
               enum=("cerebellar_grey_matter", "whole_cerebellum", "pons")),
        Option("atlas", "string", "seitzman300", "ROI atlas",
               "Built-in ROI atlas for roi_features: Seitzman-300 spheres (with network labels), Power-264, "
               "Dosenbach-160, or the MNI152 tissue classes. Ignored when a bring-your-own atlas URI is given.",
               enum=("seitzman300", "power264", "dosenbach160", "tissue")),
        Option("atlas_uri", "string", None, "Bring-your-own atlas NIfTI (URI, optional)",
               "A label image in MNI152 space (file path, s3:// or gs://); needs the labels TSV below"),
        Option("atlas_labels_uri", "string", None, "Bring-your-own atlas labels TSV (URI, optional)",
               "Tab-separated, columns index and name (optional network), one row per label of the atlas NIfTI"),
    ),
    synthesizer="imaging_tasks.neuroimaging.synth:synthesize",
    ready="imaging_tasks.neuroimaging:session_ready",
    results="`results` holds `brain_volume_ml` (parenchyma), `intracranial_volume_ml`, GM/WM/CSF volumes, "
            "bias-field, registration and SUVR figures per session; `roi_features` one row per atlas ROI and "
            "metric (GM volume, mean/median SUVR, normalised T1).",
    bad_modality="CT",
)
