"""Cardiovascular: CT calcium scoring (Agatston, volume and mass scores with a per-lesion table).

Steps: :mod:`.calcium`.  Synthetic studies with exact score truth: :mod:`.synth`.  This module stays light: it
is read at DAG parse time.
"""
from imaging_tasks.specialty import Option, Specialty, Step

SPECIALTY = Specialty(
    name="cardiovascular",
    order=1,
    title="Cardiovascular",
    summary="Cardiac CT calcium scoring (Agatston, volume, mass, lesions)",
    file_kind="dicom",
    modalities=frozenset({"CT"}),
    steps=(Step("process_study", "imaging_tasks.cardiovascular.calcium:process_study", gpu=True,
                description="calcium scoring on the axial calcium-scoring CT series"),),
    options=(
        Option("threshold_hu", "number", 130.0, "Calcium threshold (HU)",
               "Agatston's 130 HU; other values are for research (90-300 HU)", minimum=90, maximum=300),
        Option("min_area_mm2", "number", 1.0, "Smallest lesion (mm²)",
               "Lesions smaller than this in every slice are noise (0-10 mm²)", minimum=0, maximum=10),
    ),
    synthesizer="imaging_tasks.cardiovascular.synth:synthesize",
    results="`results` holds `agatston_score`, `calcium_volume_mm3`, `calcium_mass_mg`, `lesion_count` per study "
            "and `findings` one row per calcified lesion.",
    bad_modality="MR",
)
