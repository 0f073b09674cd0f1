"""## Neuroimaging: MRI + PET + BOLD + DWI sessions, DICOM or NIfTI uploads, to ROI features
The session chain: N4 bias correction → brain extraction (GM/WM/CSF, parenchyma, intracranial volume) → PET
frame averaging → PET-to-T1 registration → MNI152 atlas registration → SUVR → fMRI first-level GLM (BOLD +
events) → DTI tensor maps → tractography → ROI features (`roi_features.json` and the `roi_features` table: GM
volume, SUVR, contrast betas, FA, MD per ROI).  A session without PET, BOLD or DWI passes those steps through.

**Chain**: landing bucket → index (a session is ready with MR + PET, or MR alone after a wait) → de-identify
(DICOM PS3.15, NIfTI headers and sidecars, events tables, gradient files) → PHI audit (fail closed) → only audited
sessions → the ten steps, one task each (brain extraction, GLM, DTI and tractography on the GPU queue) → warehouse.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
from imaging_dags import (audit_phi, deidentify, fhir_update, imaging_dag, index_studies, landing_sensor, load_metadata,
                          ready_for_processing, study_step)

SPECIALTY = "neuroimaging"


@imaging_dag(SPECIALTY, summary=__doc__)
def neuroimaging():
    arrived = landing_sensor(SPECIALTY)
    sessions = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(batch=sessions)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(batch=clean)   # fail closed
    ready = ready_for_processing(SPECIALTY, audited)                       # quarantined sessions stop here
    n4 = study_step(SPECIALTY, "n4_bias").expand(batch=ready)
    brain = study_step(SPECIALTY, "brain_extraction").expand(batch=n4)                 # GPU
    pet = study_step(SPECIALTY, "pet_average").expand(batch=brain)
    pet_t1 = study_step(SPECIALTY, "pet_to_t1").expand(batch=pet)
    atlas = study_step(SPECIALTY, "atlas_registration").expand(batch=pet_t1)
    suvr = study_step(SPECIALTY, "suvr").expand(batch=atlas)
    glm = study_step(SPECIALTY, "fmri_glm").expand(batch=suvr)                         # GPU
    tensors = study_step(SPECIALTY, "dti").expand(batch=glm)                           # GPU
    tracts = study_step(SPECIALTY, "tractography").expand(batch=tensors)               # GPU
    features = study_step(SPECIALTY, "roi_features").expand(batch=tracts)
    fhir_update(SPECIALTY, load_metadata(SPECIALTY, features))   # optional: skipped without a FHIR server


neuroimaging()
