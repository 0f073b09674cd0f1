"""Mammography: the screening exam read per breast: micro-calcification clusters, a bring-your-own detector's
findings, breast density, lesions seen in both views, per-breast summaries and QC.

Step: :mod:`.study` (normalisation :mod:`.normalize`, detection :mod:`.calcifications`, density :mod:`.density`,
exam level :mod:`.exam`, BYO model :mod:`.detector`).  Synthetic exams with planted clusters: :mod:`.synth`.
Light: read at DAG parse time.
"""
from imaging_tasks.specialty import Option, Specialty, Step

SPECIALTY = Specialty(
    name="mammography",
    order=3,
    title="Mammography",
    summary="Mammography exam: calcification clusters, density, bring-your-own detector, per-breast summary",
    file_kind="dicom",
    modalities=frozenset({"MG"}),
    receives=({"modality": ["MG", "DX"], "sop_class": [
        "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # ... - For Processing
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image Storage
        "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.13.1.5"]},  # ... - For Processing
        {"modality": ["MG"]}),
    steps=(Step("process_study", "imaging_tasks.mammography.study:process_study", gpu=True,
                description="the exam: every view normalised, calcification clusters, density, an optional "
                            "bring-your-own detector, lesions seen in both views, per-breast summary, QC montage"),),
    options=(
        Option("k_sigma", "number", 6.0, "Detection threshold (noise sigmas)",
               "A calcification candidate stands this many local noise sigmas above its background (2-10); the "
               "default 6 is the FROC operating point over density, gland edge and dose (bench/mammo_froc.py): "
               "lower finds fainter clusters and more false ones",
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
    results="`results` holds per study `n_images`, `n_calcifications`, `n_clusters` (and `n_clusters_R`/`_L`), "
            "`max_cluster_members`, `n_seen_in_both_views`, `highest_suspicion_R`/`_L` (0-1), `percent_density_R`/"
            "`_L` and `percent_density` (%, the denser breast), `birads_density` (1-4 for a-d) and, with a detector, "
            "`n_detector_findings`. `findings` holds one row per calcification cluster (kind `calcification_cluster`) "
            "and per detector box (kind `model_<label>`, with the model's name, version and sha256), each with "
            "laterality, view, centre on the canonical and the stored grid (px, mm), nipple distance, `suspicion` and "
            "`seen_in_both_views`; and one `breast_summary` row per breast (density, BI-RADS category, counts, highest "
            "suspicion). Outputs: `mammography.json`, `qc_<side>_<view>.png`, `qc_exam.png`.",
    bad_modality="CT",
)
