"""## Cardiovascular: CT calcium scoring
Agatston, volume and mass calcium scores per non-contrast cardiac CT study, with a per-lesion table.

**Chain**: landing bucket → index (headers only) → de-identify (DICOM PS3.15) → PHI audit (fail closed)
→ only audited studies → calcium scoring (GPU queue) → warehouse.
"""
import pendulum
from airflow.sdk import dag

from imaging_dags import (SPECIALTY_DEFAULTS, audit_phi, dag_doc, deidentify, index_studies, landing_sensor,
                          load_metadata, pipeline_params, process_study, ready_for_processing, schedule)

SPECIALTY = "cardiovascular"
RESULTS = ("`results` holds `agatston_score`, `calcium_volume_mm3`, `calcium_mass_mg`, `lesion_count` per study "
           "and `findings` one row per calcified lesion.")
PARAMS = pipeline_params()


@dag(dag_id=SPECIALTY, schedule=schedule(), start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     params=PARAMS, default_args=SPECIALTY_DEFAULTS, max_active_runs=1, tags=["imaging", SPECIALTY],
     description="Cardiac CT calcium scoring (Agatston, volume, mass, lesions); de-identified, to the warehouse",
     doc_md=dag_doc(SPECIALTY, __doc__, PARAMS, RESULTS))
def cardiovascular():
    arrived = landing_sensor(SPECIALTY)
    studies = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=studies)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined studies stop here
    processed = process_study.partial(specialty=SPECIALTY).expand(study=ready)
    load_metadata(SPECIALTY, processed)


cardiovascular()
