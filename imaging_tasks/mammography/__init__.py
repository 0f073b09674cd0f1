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
        Option("detector_uri", "string", None, "Lesion detector (TorchScript or torch.export URI, optional)",
               "A bring-your-own detection model (file path, s3:// or gs://) with its JSON beside it (labels, input "
               "size or pixel spacing, normalisation): its boxes (masses, clusters...) go beside the built-in "
               "clusters with the model's name and version. Empty: built-in detection only",
               variable="imaging_mammography_detector_uri"),
        Option("detector_score_threshold", "number", 0.5, "Detector score threshold",
               "The bring-your-own detector's boxes scoring below this are dropped (0-1)", minimum=0, maximum=1),
    ),
    synthesizer="imaging_tasks.mammography.synth:synthesize",
    results="`results` holds `n_calcifications`, `n_clusters` (per side too) per study and `findings` one row per "
            "calcification cluster (position, size, member count) and, with a detector, one per box it found "
            "(kind `model_<label>`: score, box in mm, model name and version).",
    bad_modality="CT",
)
