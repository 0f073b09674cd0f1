"""Mammography: Micro-calcification detection and clustering on MG for-presentation images.

landing bucket -> index (headers only) -> de-identify (PS3.15) -> PHI audit
-> mammography processing (GPU queue) -> warehouse.
"""
import pendulum
from airflow.sdk import dag

from imaging_dags import (SPECIALTY_DEFAULTS, audit_phi, deidentify, index_studies, landing_sensor, load_metadata,
                          pipeline_params, process_study, schedule)

SPECIALTY = "mammography"


@dag(dag_id=SPECIALTY, schedule=schedule(), start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     params=pipeline_params(), default_args=SPECIALTY_DEFAULTS, max_active_runs=1, tags=["imaging", SPECIALTY],
     doc_md=__doc__)
def mammography():
    arrived = landing_sensor(SPECIALTY)
    studies = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=studies)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    processed = process_study.partial(specialty=SPECIALTY).expand(study=audited)
    load_metadata(SPECIALTY, processed)


mammography()
