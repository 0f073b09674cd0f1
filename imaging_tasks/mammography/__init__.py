"""Mammography: micro-calcification detection and clustering on MG for-presentation images.

Steps: :mod:`.calcifications`.  Synthetic exams with planted clusters: :mod:`.synth`.  Light: read at DAG parse time.
"""
from imaging_tasks.specialty import Option, Specialty, Step

SPECIALTY = Specialty(
    name="mammography",
    order=3,
    title="Mammography",
    summary="Mammography micro-calcification detection and clustering",
    file_kind="dicom",
    modalities=frozenset({"MG"}),
    steps=(Step("process_study", "imaging_tasks.mammography.calcifications:process_study", gpu=True,
                description="calcification detection and clustering on every for-presentation image"),),
    options=(
        Option("k_sigma", "number", 5.0, "Detection threshold (noise sigmas)",
               "A calcification candidate stands this many local noise sigmas above its background (2-10)",
               minimum=2, maximum=10),
        Option("min_count", "integer", 3, "Calcifications per cluster",
               "At least this many calcifications within 1 cm² make a cluster (2-10)", minimum=2, maximum=10),
    ),
    synthesizer="imaging_tasks.mammography.synth:synthesize",
    results="`results` holds `n_calcifications`, `n_clusters` (per side too) per study and `findings` one row per "
            "calcification cluster (position, size, member count).",
    bad_modality="CT",
)
