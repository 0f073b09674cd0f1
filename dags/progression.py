"""## Progression: batch predictions
Each patient's future cognitive scores (e.g. MMSE, CDR-SB, ADAS-Cog at 6 to 36 months) from their imaging sessions
(ROI features in the warehouse) and cognitive scores, by the site's sequence model (`imaging_tasks.progression`).

**Runs** when new sessions land in the warehouse (the asset the progression specialty's load emits), one run at
a time.  **Chain**: cognitive-score uploads (`<landing>/cognitive_scores/`, CSV or Parquet: patient_id, date,
score, value) pseudonymised like the studies → `cognitive_scores` → predictions for the patients whose sessions
or scores changed → `predictions` (asset `imaging_progression_predictions`).  The model: the run's Param
`model_uri`, else the Variable `imaging_progression_model_uri`; neither set: `predict` is skipped.
"""
# An Airflow DAG file (Airflow parses files naming both "airflow" and "dag"): the chain, top to bottom.
import pendulum
from airflow.sdk import dag

from imaging_dags.notifiers import notify_run_failed
from imaging_dags.progression import DEFAULT_ARGS, ingest_scores, predict, progression_params, sessions_asset


@dag(schedule=[sessions_asset()], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, params=progression_params(), on_failure_callback=notify_run_failed,
     tags=["imaging", "progression"], description="Progression predictions from sessions and cognitive scores",
     doc_md=__doc__)
def progression():
    ingest_scores() >> predict()   # scores first, so a new upload's patients are predicted in the same run


progression()
