"""Neuroimaging: T1 MRI (+ PET, BOLD, DWI) sessions, DICOM or NIfTI uploads, through the whole session chain.

Steps: :mod:`.chain` (N4 -> brain extraction -> PET averaging -> PET-to-T1 -> MNI152 atlas -> SUVR), then
:mod:`.chain4d` (fMRI first-level GLM -> DTI -> tractography), then ROI features over all of them.  Synthetic sessions with known anatomy and bias field: :mod:`.synth`.  A session is
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
_CHAIN4D = "imaging_tasks.neuroimaging.chain4d"

SPECIALTY = Specialty(
    name="neuroimaging",
    order=0,
    batch_size=1,  # a session's chain takes minutes: an instance start is nothing beside it
    title="Neuroimaging",
    summary="MRI/PET sessions: N4, brain extraction, PET averaging, PET-to-T1, MNI152 atlas, SUVR, ROI features",
    file_kind="dicom",
    modalities=frozenset({"MR", "PT"}),
    receives=({"modality": ["MR", "PT"]},),
    progression=True,
    # <patient>/<session>/mri.nii.gz, pet.nii.gz, bold.nii.gz, dwi.nii.gz (+ <stem>.json sidecars) and these:
    nifti_uploads={"mri": "MR", "pet": "PT", "bold": "MR", "dwi": "MR"},
    upload_sidecars={"events.tsv": "bold", "bold_events.tsv": "bold", "dwi.bval": "dwi", "dwi.bvec": "dwi"},
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
        Step("fmri_glm", f"{_CHAIN4D}:fmri_glm", gpu=True,
             description="BOLD first-level GLM (HRF design, drift, motion; OLS or AR(1)): beta, t, z maps per contrast"),
        Step("dti", f"{_CHAIN4D}:dti", gpu=True,
             description="diffusion tensor fit (weighted least squares): FA, MD, AD, RD, principal direction"),
        Step("tractography", f"{_CHAIN4D}:tractography", gpu=True,
             description="deterministic tensor tractography from white-matter seeds: streamlines (TRK), lengths"),
        Step("roi_features", f"{_CHAIN}:roi_features", gpu=False,
             description="per-ROI GM volume, SUVR, normalised T1, contrast betas, FA and MD; whole-brain volumes"),
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
        Option("fmri_contrasts", "string", None, "fMRI contrasts (optional)",
               "Comma-separated contrasts of the events' trial types, e.g. 'faces - houses, faces'; empty: each "
               "condition against baseline"),
        Option("fmri_noise_model", "string", "ar1", "fMRI noise model",
               "ar1: voxel-wise AR(1) prewhitening (as nilearn and SPM); ols: ordinary least squares",
               enum=("ar1", "ols")),
        Option("fmri_hrf_model", "string", "spm", "fMRI HRF model",
               "SPM canonical haemodynamic response, optionally with its time derivative",
               enum=("spm", "spm + derivative")),
        Option("fmri_high_pass_hz", "number", 0.01, "fMRI high-pass cut-off (Hz)",
               "Cosine drift regressors remove slower signal than this (0.001-0.1 Hz; 0.01 Hz = 100 s)",
               minimum=0.001, maximum=0.1),
        Option("fmri_motion_regressors", "boolean", True, "fMRI motion regressors",
               "Realign the BOLD volumes (rigid) and add the six motion parameters to the design"),
        Option("dti_fa_stop", "number", 0.2, "Tractography FA threshold",
               "Streamlines stop where FA falls below this (0.05-0.6); seeds are white-matter voxels above it",
               minimum=0.05, maximum=0.6),
        Option("dti_max_angle_deg", "number", 30.0, "Tractography maximum turn (degrees)",
               "Streamlines stop at a sharper turn than this between steps (5-90 degrees)", minimum=5, maximum=90),
        Option("dti_step_mm", "number", 0.5, "Tractography step (mm)",
               "Integration step along the principal direction (0.1-2 mm)", minimum=0.1, maximum=2),
    ),
    synthesizer="imaging_tasks.neuroimaging.synth:synthesize",
    ready="imaging_tasks.neuroimaging:session_ready",
    results="`results` holds `brain_volume_ml` (parenchyma), `intracranial_volume_ml`, GM/WM/CSF volumes, "
            "bias-field, registration and SUVR figures per session, BOLD and DWI figures (volumes, contrasts, "
            "streamline count and lengths); `roi_features` one row per atlas ROI and metric (GM volume, "
            "mean/median SUVR, normalised T1, each contrast's mean beta and t, mean FA and MD).",
    bad_modality="CT",
)
