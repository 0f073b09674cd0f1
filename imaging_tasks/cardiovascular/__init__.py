"""Cardiovascular: CT calcium scoring, cine-MR left-ventricular function, phase-contrast and 4-D flow.

Chain: :func:`.series.route_series` (which series goes to which step) -> :mod:`.calcium` (Agatston, volume and mass
scores, per-lesion table) -> :mod:`.cine` (LV volumes over the cycle, EF, mass) -> :mod:`.flow` (net, forward and
backward flow, regurgitant fraction, peak velocity, aliasing).  A study may hold any of the three; each step takes
its own series and passes when there is none.  Synthetic studies with exact truth: :mod:`.synth`.  This module
stays light: it is read at DAG parse time.
"""
from imaging_tasks.specialty import Option, Specialty, Step

_CV = "imaging_tasks.cardiovascular"

SPECIALTY = Specialty(
    name="cardiovascular",
    order=1,
    title="Cardiovascular",
    summary="Cardiac CT calcium scoring; cine-MR LV function (EDV, ESV, EF, mass); phase-contrast and 4-D flow",
    file_kind="dicom",
    modalities=frozenset({"CT", "MR"}),
    # cardiac MR (cine, phase contrast) looks like any MR in its header: neuroimaging claims MR by default, and a
    # site sends its cardiac scanner's AE title here with a rule in the receiver's routes file
    receives=({"modality": ["CT"]},),
    steps=(
        Step("route_series", f"{_CV}.series:route_series", gpu=False,
             description="sort the study's series into calcium-scoring CT, cine MR and flow MR (headers only)"),
        Step("calcium_scoring", f"{_CV}.calcium:calcium_scoring", gpu=True,
             description="calcium scoring on the axial calcium-scoring CT series"),
        Step("cine_function", f"{_CV}.cine:cine_function", gpu=True,
             description="LV blood pool in every phase and slice; EDV, ESV, stroke volume, EF, LV mass"),
        Step("flow", f"{_CV}.flow:flow", gpu=True,
             description="2-D phase-contrast and 4-D flow: net, forward, backward flow, regurgitant fraction, peak "
                         "velocity, aliasing unwrapped"),
    ),
    options=(
        Option("threshold_hu", "number", 130.0, "Calcium threshold (HU)",
               "Agatston's 130 HU; other values are for research (90-300 HU)", minimum=90, maximum=300),
        Option("min_area_mm2", "number", 1.0, "Smallest lesion (mm²)",
               "Lesions smaller than this in every slice are noise (0-10 mm²)", minimum=0, maximum=10),
        Option("cine_segmentation", "string", "classical", "Cine LV segmentation",
               "classical: locate the LV from motion and shape, threshold the blood pool per slice (no model); "
               "model: the bring-your-own TorchScript model below", enum=("classical", "model")),
        Option("cine_model_uri", "string", None, "Cine segmentation model (TorchScript URI, optional)",
               "A TorchScript LV segmentation model (file path, s3:// or gs://) with its JSON beside it (input size, "
               "normalisation, labels lv_blood_pool / lv_myocardium); used when the segmentation is 'model'",
               variable="imaging_cine_model_uri"),
        Option("flow_plane", "string", None, "Flow plane (optional)",
               "A point and a normal in patient coordinates (mm, LPS): 'x,y,z; nx,ny,nz'. 4-D flow is measured on "
               "this plane; for 2-D phase contrast the point picks the vessel and the normal sets 'forward'. "
               "Empty: the brightest pulsatile vessel, found automatically"),
        Option("flow_unwrap", "boolean", True, "Unwrap phase aliasing",
               "Correct velocities above the VENC (phase wraps) before measuring flow; aliasing is reported either "
               "way"),
    ),
    synthesizer="imaging_tasks.cardiovascular.synth:synthesize",
    results="`results` holds `agatston_score`, `calcium_volume_mm3`, `calcium_mass_mg`, `lesion_count` (CT); "
            "`lv_edv_ml`, `lv_esv_ml`, `lv_sv_ml`, `lv_ef_pct`, `lv_mass_g` (cine); `pc_net_flow_ml`, "
            "`pc_regurgitant_fraction_pct`, `pc_peak_velocity_cm_s` and the same with `flow4d_` (flow) per study; "
            "`findings` one row per calcified lesion, per cine phase (`lv_phase_volume`) and per flow frame.",
    bad_modality="PT",
)
