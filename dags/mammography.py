"""## Mammography: micro-calcifications
Micro-calcification detection and clustering on MG for-presentation images.

**Chain**: landing bucket → index (headers only) → de-identify (DICOM PS3.15) → PHI audit (fail closed)
→ only audited studies → calcification detection (GPU queue) → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, imaging_dag, index_studies, landing_sensor, load_metadata,
                          pipeline_params, process_study, ready_for_processing)

SPECIALTY = "mammography"
RESULTS = ("`results` holds `n_calcifications`, `n_clusters` (per side too) per study and `findings` one row per "
           "calcification cluster (position, size, member count).")
PARAMS = pipeline_params()


@imaging_dag(SPECIALTY, summary=__doc__, params=PARAMS, results=RESULTS,
             description="Mammography micro-calcification detection and clustering; de-identified, to the warehouse")
def mammography():
    arrived = landing_sensor(SPECIALTY)
    studies = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=studies)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined studies stop here
    processed = process_study.partial(specialty=SPECIALTY).expand(study=ready)
    load_metadata(SPECIALTY, processed)


mammography()
