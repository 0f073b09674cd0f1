"""The DAG files import cleanly, stay light at parse time, and every task is operable (owner, retries)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAG_IDS = {"neuroimaging", "cardiovascular", "pathology", "mammography"}
OTHER_DAG_IDS = {"progression"}  # not a specialty chain: predictions from the neuroimaging warehouse
HEAVY = ("torch", "SimpleITK", "openslide", "pydicom", "nibabel", "nilearn", "skimage", "duckdb", "scipy",
         "tifffile", "imaging_tasks.neuroimaging.structural", "imaging_tasks.cardiovascular.calcium",
         "imaging_tasks.pathology.tiles", "imaging_tasks.mammography.calcifications",
         "imaging_tasks.mammography.study")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_all_dag_files_import(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == DAG_IDS | OTHER_DAG_IDS


def test_every_task_has_owner_retries_and_timeout(dagbag):
    for dag_id in DAG_IDS | OTHER_DAG_IDS:
        for t in dagbag.dags[dag_id].tasks:
            assert t.owner == "imaging-data-eng", (dag_id, t.task_id)
            assert t.retries >= 1, (dag_id, t.task_id)
            assert t.execution_timeout is not None, (dag_id, t.task_id)


def test_processing_runs_on_gpu_queue_and_pool(dagbag):
    gpu_tasks = {"cardiovascular": "calcium_scoring", "neuroimaging": "brain_extraction",
                 "mammography": "process_study", "pathology": "tile_features"}
    for dag_id, task_id in gpu_tasks.items():
        t = dagbag.dags[dag_id].get_task(task_id)
        assert (t.queue, t.pool) == ("gpu", "gpu"), dag_id
    # CPU steps of a chain stay off the GPU pool
    assert dagbag.dags["neuroimaging"].get_task("pet_to_t1").pool != "gpu"


def test_neuro_chain_is_one_task_per_step_in_order(dagbag):
    from imaging_tasks.specialties import get

    dag = dagbag.dags["neuroimaging"]
    steps = [s.name for s in get("neuroimaging").steps]
    assert steps == ["n4_bias", "brain_extraction", "pet_average", "pet_to_t1", "atlas_registration", "suvr",
                     "fmri_glm", "dti", "tractography", "roi_features"]
    assert {s.name for s in get("neuroimaging").steps if s.gpu} == {"brain_extraction", "fmri_glm", "dti",
                                                                     "tractography"}
    assert dag.get_task(steps[0]).upstream_task_ids == {"ready_for_processing"}
    for earlier, later in zip(steps, steps[1:]):
        assert dag.get_task(later).upstream_task_ids == {earlier}
    assert steps[-1] in dag.get_task("load_metadata").upstream_task_ids


def test_pathology_maps_one_task_group_per_slide(dagbag):
    from airflow.sdk.definitions.taskgroup import MappedTaskGroup

    dag = dagbag.dags["pathology"]
    chain = ("plan_tiles", "tile_features", "finish_slide")
    assert dag.get_task("plan_tiles").upstream_task_ids == {"ready_for_processing"}
    for earlier, later in zip(chain, chain[1:]):
        assert dag.get_task(later).upstream_task_ids == {earlier}
    assert "finish_slide" in dag.get_task("load_metadata").upstream_task_ids
    groups = [dag.get_task(t).task_group for t in chain]
    assert all(g is groups[0] for g in groups) and isinstance(groups[0], MappedTaskGroup)  # one of each per slide
    assert "tile_batches" not in dag.task_ids


def test_chain_is_sensor_deid_process_load(dagbag):
    for dag_id in DAG_IDS:
        dag = dagbag.dags[dag_id]
        assert dag.get_task("index_studies").upstream_task_ids == {"wait_for_landing"}
        assert dag.get_task("deidentify").upstream_task_ids == {"index_studies"}
        # the load runs whatever failed upstream (the good studies land), then fails the run if anything failed
        assert dag.get_task("load_metadata").trigger_rule == "all_done"


def test_parsing_imports_no_heavy_module():
    """Parse each DAG file in a fresh interpreter and list what got imported."""
    code = (
        "import sys, json, runpy; sys.path.insert(0, %r)\n"
        "for f in %r: runpy.run_path(f)\n"
        "print(json.dumps(sorted(m for m in sys.modules)))\n"
    ) % (str(REPO / "plugins"), [str(p) for p in sorted((REPO / "dags").glob("*.py"))])
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    heavy = sorted(m for m in loaded if m in HEAVY or m.split(".")[0] in HEAVY)
    assert heavy == []


def test_failures_name_the_study_and_hide_raw_detail_where_asked():
    from imaging_dags.tasks import StudyFailed, naming_study

    with pytest.raises(StudyFailed, match=r"cardiovascular study S123: processing failed \(ValueError: bad spacing\)"):
        with naming_study("cardiovascular", {"study": "S123"}, "processing"):
            raise ValueError("bad spacing")
    with pytest.raises(StudyFailed) as exc:
        with naming_study("neuroimaging", {"study": "S9"}, "de-identification", detail=False):
            raise OSError("/landing/Doe^Jane/0001.dcm unreadable")
    assert "Doe" not in str(exc.value) and "S9" in str(exc.value)
