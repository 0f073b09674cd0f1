"""## Pathology: whole-slide images
Tissue detection, tiling at a target µm/px, stain features, tile QC and (optionally) a bring-your-own encoder's
embedding per tile, as Parquet; a slide summary and a MIL bag per slide.

**Chain**: landing bucket → index → de-identify (label/macro removed, description scrubbed) → PHI audit
→ only audited slides → per slide: plan tiles → tile features (worker processes; encoder on the GPU queue)
→ slide summary → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, fhir_update, imaging_dag, index_studies, landing_sensor, load_metadata,
                          per_slide, ready_for_processing)

SPECIALTY = "pathology"


@imaging_dag(SPECIALTY, summary=__doc__)
def pathology():
    arrived = landing_sensor(SPECIALTY)
    slides = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(batch=slides)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(batch=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited, batched=False)       # one by one; quarantined ones stop here
    summaries = per_slide(SPECIALTY).expand(study=ready)   # plan_tiles → tile_features → finish_slide, per slide
    fhir_update(SPECIALTY, load_metadata(SPECIALTY, summaries))   # optional: skipped without a FHIR server


pathology()
