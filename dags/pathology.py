"""Pathology: whole-slide images — tissue detection, tiling at a target µm/px, torch features per tile batch.

landing bucket -> index -> de-identify (label/macro removed, description scrubbed) -> PHI audit -> plan tiles
-> features fanned out over tile batches (GPU queue, <= 1,000 mapped tasks) -> per-slide summary -> warehouse.
"""
import pendulum
from airflow.sdk import Param, dag

from imaging_dags import (SPECIALTY_DEFAULTS, audit_phi, deidentify, finish_slide, index_studies, landing_sensor,
                          load_metadata, pipeline_params, plan_tiles, schedule, tile_batches, tile_features)

SPECIALTY = "pathology"


@dag(dag_id=SPECIALTY, schedule=schedule(), start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     params=pipeline_params(target_mpp=Param(1.0, type="number", exclusiveMinimum=0, description="µm per pixel"),
                            tile_px=Param(256, type="integer", minimum=32, maximum=2048)),
     default_args=SPECIALTY_DEFAULTS, max_active_runs=1, tags=["imaging", SPECIALTY], doc_md=__doc__)
def pathology():
    arrived = landing_sensor(SPECIALTY)
    slides = index_studies(SPECIALTY, arrived.output)
    clean = deidentify.partial(specialty=SPECIALTY).expand(study=slides)
    audited = audit_phi.partial(specialty=SPECIALTY).expand(study=clean)   # fail closed
    plans = plan_tiles.expand(study=audited)
    features = tile_features.expand(batch=tile_batches(plans))
    summaries = finish_slide.partial(features=features).expand(plan=plans)
    load_metadata(SPECIALTY, summaries)


pathology()
