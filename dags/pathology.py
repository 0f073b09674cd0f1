"""## Pathology: whole-slide images
Tissue detection, tiling at a target µm/px and torch stain features per tile batch, summarised per slide.

**Chain**: landing bucket → index → de-identify (label/macro removed, description scrubbed) → PHI audit
→ only audited slides → plan tiles → features fanned out over tile batches (GPU queue, ≤ 1,000 mapped tasks)
→ per-slide summary → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, finish_slide, imaging_dag, index_studies, landing_sensor,
                          load_metadata, pathology_params, plan_tiles, ready_for_processing, tile_batches,
                          tile_features)

SPECIALTY = "pathology"
RESULTS = ("`results` holds `tissue_area_mm2`, tile counts and stain optical densities per slide and `findings` "
           "the stain hotspots.")
PARAMS = pathology_params()


@imaging_dag(SPECIALTY, summary=__doc__, params=PARAMS, results=RESULTS,
             description=("Whole-slide images: tissue, tiles, GPU stain "
                          "features per tile batch; de-identified, to warehouse"))
def pathology():
    arrived = landing_sensor(SPECIALTY)
    slides = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=slides)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined slides stop here
    plans = plan_tiles.expand(study=ready)
    features = tile_features.expand(batch=tile_batches(plans))
    summaries = finish_slide.partial(features=features).expand(plan=plans)
    load_metadata(SPECIALTY, summaries)


pathology()
