"""## Pathology: whole-slide images
Tissue detection, tiling at a target µm/px and torch stain features per tile batch, summarised per slide.

**Chain**: landing bucket → index → de-identify (label/macro removed, description scrubbed) → PHI audit
→ only audited slides → plan tiles → features fanned out over tile batches (GPU queue, ≤ 1,000 mapped tasks)
→ per-slide summary → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, finish_slide, imaging_dag, index_studies, landing_sensor,
                          load_metadata, plan_tiles, ready_for_processing, tile_batches, tile_features)

SPECIALTY = "pathology"


@imaging_dag(SPECIALTY, summary=__doc__)
def pathology():
    arrived = landing_sensor(SPECIALTY)
    slides = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=slides)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined slides stop here
    plans = plan_tiles.partial(specialty=SPECIALTY).expand(study=ready)
    features = tile_features.partial(specialty=SPECIALTY).expand(batch=tile_batches(SPECIALTY, plans))
    summaries = finish_slide.partial(specialty=SPECIALTY, features=features).expand(plan=plans)
    load_metadata(SPECIALTY, summaries)


pathology()
