"""## Cardiovascular: calcium scoring, cine-MR LV function, phase-contrast and 4-D flow
Agatston, volume and mass calcium scores per non-contrast cardiac CT; LV volumes, ejection fraction and mass per
short-axis cine; net, forward and backward flow, regurgitant fraction and peak velocity per phase-contrast plane or
4-D flow. A study may hold any of these series; each step takes its own.

**Chain**: landing bucket → index (headers only) → de-identify (DICOM PS3.15) → PHI audit (fail closed)
→ only audited studies → route series → calcium scoring → cine function → flow (GPU queue) → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, fhir_update, imaging_dag, index_studies, landing_sensor, load_metadata,
                          ready_for_processing, study_step)

SPECIALTY = "cardiovascular"


@imaging_dag(SPECIALTY, summary=__doc__)
def cardiovascular():
    arrived = landing_sensor(SPECIALTY)
    studies = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(batch=studies)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(batch=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined studies stop here
    routed = study_step(SPECIALTY, "route_series").expand(batch=ready)     # which series each step takes
    calcium = study_step(SPECIALTY, "calcium_scoring").expand(batch=routed)
    cine = study_step(SPECIALTY, "cine_function").expand(batch=calcium)
    flow = study_step(SPECIALTY, "flow").expand(batch=cine)
    fhir_update(SPECIALTY, load_metadata(SPECIALTY, flow))   # optional: skipped without a FHIR server


cardiovascular()
