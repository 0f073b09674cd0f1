"""## Cardiovascular: CT calcium scoring
Agatston, volume and mass calcium scores per non-contrast cardiac CT study, with a per-lesion table.

**Chain**: landing bucket → index (headers only) → de-identify (DICOM PS3.15) → PHI audit (fail closed)
→ only audited studies → calcium scoring (GPU queue) → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, imaging_dag, index_studies, landing_sensor, load_metadata,
                          pipeline_params, process_study, ready_for_processing)

SPECIALTY = "cardiovascular"
RESULTS = ("`results` holds `agatston_score`, `calcium_volume_mm3`, `calcium_mass_mg`, `lesion_count` per study "
           "and `findings` one row per calcified lesion.")
PARAMS = pipeline_params()


@imaging_dag(SPECIALTY, summary=__doc__, params=PARAMS, results=RESULTS,
             description=("Cardiac CT calcium scoring (Agatston, volume, "
                          "mass, lesions); de-identified, to the warehouse"))
def cardiovascular():
    arrived = landing_sensor(SPECIALTY)
    studies = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=studies)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined studies stop here
    processed = process_study.partial(specialty=SPECIALTY).expand(study=ready)
    load_metadata(SPECIALTY, processed)


cardiovascular()
