"""Pathology: whole-slide images: tissue detection, tiling at a target µm/px, stain features, tile QC and a
bring-your-own encoder per tile, Parquet tables, slide summaries and MIL bags.

Steps: :mod:`.tiles` (``plan_tiles``), :mod:`.reader` (worker processes computing :mod:`.stain` and
:mod:`.tile_qc` where tiles are read), :mod:`.encoder`, :mod:`.features_io` (Parquet, summary, bag);
:mod:`.slide_features` runs them for one slide (``process_study`` in process), :mod:`.fanout` as the DAG's three
tasks per slide.  Synthetic slides from real IHC pixels: :mod:`.synth`.  Light: read at DAG parse time.
"""
from imaging_tasks.specialty import Option, Specialty, Step

SPECIALTY = Specialty(
    name="pathology",
    order=2,
    batch_size=1,  # a slide is gigabytes to copy and audit: one per instance
    title="Pathology",
    summary="Whole-slide images: tissue, tiles, stain features, tile QC and a bring-your-own encoder per tile",
    file_kind="slide",
    receives=({"sop_class": ["1.2.840.10008.5.1.4.1.1.77.1.6"]},  # VL Whole Slide Microscopy Image Storage
              {"modality": ["SM"]}),
    steps=(Step("process_study", "imaging_tasks.pathology.slide_features:process_study", gpu=True,
                description="tissue detection, tiling, tile features, summary and bag of one slide in one process "
                            "(the DAG runs the same work as plan_tiles -> tile_features -> finish_slide per slide)"),),
    options=(
        Option("target_mpp", "number", 1.0, "Target resolution (µm per pixel)",
               "Tiles are read at this resolution: 0.25 ≈ 40x, 0.5 ≈ 20x, 1.0 ≈ 10x (0.1-16 µm/px)",
               minimum=0.1, maximum=16),
        Option("tile_px", "integer", 256, "Tile size (pixels)",
               "Edge of a square tile at the target resolution (32-2048 px)", minimum=32, maximum=2048),
        Option("min_tissue_fraction", "number", 0.5, "Tissue per tile (fraction)",
               "A tile is kept when at least this share of it is tissue (0-1)", minimum=0, maximum=1),
        Option("encoder_uri", "string", None, "Tile encoder (TorchScript or torch.export URI, optional)",
               "A bring-your-own tile encoder (file path, s3:// or gs://; .pt TorchScript or .pt2 torch.export) with "
               "its JSON beside it (input size, µm/px, mean/std, output dim): each tile's embedding goes into the "
               "tile table and the MIL bag, the slide's mean embedding into the warehouse. Empty: built-in "
               "features only", variable="imaging_pathology_encoder_uri"),
    ),
    synthesizer="imaging_tasks.pathology.synth:synthesize",
    fan_out="imaging_tasks.pathology.fanout",
    results="`results` holds `tissue_area_mm2`, tile counts, tile-QC fractions and stain optical densities per "
            "slide; `findings` the tissue regions, stain hotspots and (with an encoder) the slide's mean embedding; "
            "`derived/` the per-tile Parquet table and the MIL bag.",
)
