"""## Cardiovascular: CT calcium scoring
Agatston, volume and mass calcium scores per non-contrast cardiac CT study, with a per-lesion table.

**Chain**: landing bucket → index (headers only) → de-identify (DICOM PS3.15) → PHI audit (fail closed)
→ only audited studies → calcium scoring (GPU queue) → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, imaging_dag, index_studies, landing_sensor, load_metadata,
                          ready_for_processing, study_step)

SPECIALTY = "cardiovascular"


@imaging_dag(SPECIALTY, summary=__doc__)
def cardiovascular():
    arrived = landing_sensor(SPECIALTY)
    studies = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=studies)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined studies stop here
    processed = study_step(SPECIALTY, "process_study").expand(study=ready)
    load_metadata(SPECIALTY, processed)


cardiovascular()
