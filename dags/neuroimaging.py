"""Neuroimaging: T1 MRI (and PET) sessions — N4 bias correction, brain extraction, brain/intracranial volume.

landing bucket -> index (a session is ready with MR+PET, or MR alone after a wait) -> de-identify (PS3.15) -> PHI audit
-> N4 + brain extraction (GPU queue) -> warehouse.
"""
import pendulum
from airflow.sdk import Param, dag

from imaging_dags import (SPECIALTY_DEFAULTS, audit_phi, deidentify, index_studies, landing_sensor, load_metadata,
                          pipeline_params, process_study, schedule)

SPECIALTY = "neuroimaging"


@dag(dag_id=SPECIALTY, schedule=schedule(), start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     params=pipeline_params(mr_only_wait_hours=Param(6.0, type="number", minimum=0,
                                                     description="process an MR-only session after this wait")),
     default_args=SPECIALTY_DEFAULTS, max_active_runs=1, tags=["imaging", SPECIALTY], doc_md=__doc__)
def neuroimaging():
    arrived = landing_sensor(SPECIALTY)
    sessions = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=sessions)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    processed = process_study.partial(specialty=SPECIALTY).expand(study=audited)
    load_metadata(SPECIALTY, processed)


neuroimaging()
