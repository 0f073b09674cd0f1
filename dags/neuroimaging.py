"""## Neuroimaging: T1 MRI (+ PET) sessions
N4 bias correction, brain extraction, brain and intracranial volume per MRI/PET session.

**Chain**: landing bucket → index (a session is ready with MR + PET, or MR alone after a wait) → de-identify
(DICOM PS3.15) → PHI audit (fail closed) → only audited sessions → N4 + brain extraction (GPU queue) → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, imaging_dag, index_studies, landing_sensor, load_metadata,
                          neuroimaging_params, process_study, ready_for_processing)

SPECIALTY = "neuroimaging"
RESULTS = ("`results` holds `brain_volume_ml`, `intracranial_volume_ml`, `brain_fraction` and bias-field figures "
           "per session.")
PARAMS = neuroimaging_params()


@imaging_dag(SPECIALTY, summary=__doc__, params=PARAMS, results=RESULTS,
             description=("MRI/PET sessions: N4, brain extraction, brain "
                          "and intracranial volume; de-identified, to warehouse"))
def neuroimaging():
    arrived = landing_sensor(SPECIALTY)
    sessions = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=sessions)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined sessions stop here
    processed = process_study.partial(specialty=SPECIALTY).expand(study=ready)
    load_metadata(SPECIALTY, processed)


neuroimaging()
