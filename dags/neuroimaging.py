"""## Neuroimaging: T1 MRI (+ PET) sessions
N4 bias correction, brain extraction, brain and intracranial volume per MRI/PET session.

**Chain**: landing bucket → index (a session is ready with MR + PET, or MR alone after a wait) → de-identify
(DICOM PS3.15) → PHI audit (fail closed) → only audited sessions → N4 + brain extraction (GPU queue) → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, imaging_dag, index_studies, landing_sensor, load_metadata,
                          ready_for_processing, study_step)

SPECIALTY = "neuroimaging"


@imaging_dag(SPECIALTY, summary=__doc__)
def neuroimaging():
    arrived = landing_sensor(SPECIALTY)
    sessions = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=sessions)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined sessions stop here
    processed = study_step(SPECIALTY, "process_study").expand(study=ready)
    load_metadata(SPECIALTY, processed)


neuroimaging()
