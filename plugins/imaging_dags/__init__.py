"""Airflow glue shared by the specialty DAGs: sensor, tasks, Params, defaults. No imaging maths here."""
from imaging_dags.dag import imaging_dag
from imaging_dags.params import pipeline_params, specialty_params
from imaging_dags.settings import schedule
from imaging_dags.tasks import (SPECIALTY_DEFAULTS, audit_phi, deidentify, fhir_update, finish_slide, index_studies,
                                landing_sensor, load_metadata, per_slide, plan_tiles, ready_for_processing,
                                study_step, tile_features)

__all__ = ["schedule", "SPECIALTY_DEFAULTS", "audit_phi", "imaging_dag", "deidentify", "fhir_update", "finish_slide",
           "index_studies", "landing_sensor", "load_metadata", "pipeline_params", "plan_tiles", "ready_for_processing",
           "per_slide", "specialty_params", "study_step", "tile_features"]
