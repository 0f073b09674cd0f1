"""Airflow glue shared by the four specialty DAGs: sensor, tasks, defaults. No imaging maths here."""
from imaging_dags.settings import schedule
from imaging_dags.tasks import (SPECIALTY_DEFAULTS, audit_phi, deidentify, finish_slide, index_studies, landing_sensor,
                                load_metadata, pipeline_params, plan_tiles, process_study, tile_batches,
                                tile_features)

__all__ = ["schedule", "SPECIALTY_DEFAULTS", "audit_phi", "deidentify", "finish_slide", "index_studies", "landing_sensor",
           "load_metadata", "pipeline_params", "plan_tiles", "process_study", "tile_batches", "tile_features"]
