"""## Mammography: micro-calcifications
Micro-calcification detection and clustering on MG for-presentation images.

**Chain**: landing bucket → index (headers only) → de-identify (DICOM PS3.15) → PHI audit (fail closed)
→ only audited studies → calcification detection (GPU queue) → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, fhir_update, imaging_dag, index_studies, landing_sensor, load_metadata,
                          ready_for_processing, study_step)

SPECIALTY = "mammography"


@imaging_dag(SPECIALTY, summary=__doc__)
def mammography():
    arrived = landing_sensor(SPECIALTY)
    studies = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(batch=studies)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(batch=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined studies stop here
    processed = study_step(SPECIALTY, "process_study").expand(batch=ready)
    fhir_update(SPECIALTY, load_metadata(SPECIALTY, processed))   # optional: skipped without a FHIR server


mammography()
