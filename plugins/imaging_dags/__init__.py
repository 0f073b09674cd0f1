"""Airflow glue shared by the four specialty DAGs: sensor, tasks, Params, defaults. No imaging maths here."""
from imaging_dags.dag import imaging_dag
from imaging_dags.docs import dag_doc
from imaging_dags.params import neuroimaging_params, pathology_params, pipeline_params
from imaging_dags.settings import schedule
from imaging_dags.tasks import (SPECIALTY_DEFAULTS, audit_phi, deidentify, finish_slide, index_studies, landing_sensor,
                                load_metadata, plan_tiles, process_study, ready_for_processing, tile_batches,
                                tile_features)

__all__ = ["schedule", "SPECIALTY_DEFAULTS", "audit_phi", "dag_doc", "imaging_dag", "deidentify", "finish_slide", "index_studies",
           "landing_sensor", "load_metadata", "neuroimaging_params", "pathology_params", "pipeline_params",
           "plan_tiles", "process_study", "ready_for_processing", "tile_batches", "tile_features"]
