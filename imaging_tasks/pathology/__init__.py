"""Pathology: whole-slide images: tissue detection, tiling at a target µm/px, torch stain features per tile batch.

Steps: :mod:`.tiles` (``plan_tiles`` -> ``tile_features`` over tile batches -> ``summarize``; ``process_study``
runs all three in process).  Synthetic slides from real IHC pixels: :mod:`.synth`.  Light: read at DAG parse time.
"""
from imaging_tasks.specialty import Option, Specialty, Step

SPECIALTY = Specialty(
    name="pathology",
    order=2,
    title="Pathology",
    summary="Whole-slide images: tissue, tiles, GPU stain features per tile batch",
    file_kind="slide",
    steps=(Step("process_study", "imaging_tasks.pathology.tiles:process_study", gpu=True,
                description="tissue detection, tiling and stain features in one process (the DAG fans the "
                            "features out over tile batches)"),),
    options=(
        Option("target_mpp", "number", 1.0, "Target resolution (µm per pixel)",
               "Tiles are read at this resolution: 0.25 ≈ 40x, 0.5 ≈ 20x, 1.0 ≈ 10x (0.1-16 µm/px)",
               minimum=0.1, maximum=16),
        Option("tile_px", "integer", 256, "Tile size (pixels)",
               "Edge of a square tile at the target resolution (32-2048 px)", minimum=32, maximum=2048),
        Option("min_tissue_fraction", "number", 0.5, "Tissue per tile (fraction)",
               "A tile is kept when at least this share of it is tissue (0-1)", minimum=0, maximum=1),
    ),
    synthesizer="imaging_tasks.pathology.synth:synthesize",
    fan_out="imaging_tasks.pathology.fanout",
    results="`results` holds `tissue_area_mm2`, tile counts and stain optical densities per slide and `findings` "
            "the stain hotspots.",
)
