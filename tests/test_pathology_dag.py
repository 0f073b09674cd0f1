"""The pathology DAG as a site runs it: slides of several formats in one landing, the site's encoder named by the
Airflow Variable, one task group per slide; and a feature task retried after a kill keeps the parts it wrote."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from imaging_tasks import storage
from imaging_tasks.deid.keys import DEMO_KEY
from imaging_tasks.pathology.synth_formats import synthesize_formats

SPECIALTY = "pathology"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return synthesize_formats(tmp_path_factory.mktemp("synth"), seed=5, formats=("dicom", "mirax", "ndpi"))


def _land(made: dict, landing: Path) -> None:
    land = landing / SPECIALTY
    land.mkdir(parents=True, exist_ok=True)
    shutil.copytree(made["dicom"]["main"].parent, land / "case-dicom")
    shutil.copy(made["mirax"]["main"], land / "case-mirax.mrxs")
    shutil.copytree(made["mirax"]["main"].with_suffix(""), land / "case-mirax")
    shutil.copy(made["ndpi"]["main"], land / "case-ndpi.ndpi")


def test_dag_runs_each_format_with_the_site_encoder(made, airflow_db, buckets, monkeypatch, tmp_path):
    import torch
    from airflow.dag_processing.dagbag import DagBag
    from byo_models import IMAGENET_MEAN, IMAGENET_STD, encoder_config, save_encoder

    from imaging_tasks.pathology.reader import tile_chunks
    from imaging_tasks.warehouse import DuckDBWarehouse

    _land(made, buckets["landing"])
    model = save_encoder(tmp_path, encoder_config(name="site-encoder", um_per_px=1.0))  # 64 px input, D = 16
    monkeypatch.setenv("AIRFLOW_VAR_IMAGING_PATHOLOGY_ENCODER_URI", model.as_uri())
    dag = DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags")).dags[SPECIALTY]
    run = dag.test(run_conf={"landing_quiet_seconds": 0, "tile_px": 64, "target_mpp": 1.0})
    assert run.state == "success"

    wh = DuckDBWarehouse(buckets["warehouse"])
    loaded = [s for (s,) in wh.query("SELECT study_id FROM ledger WHERE state = 'loaded'")]
    assert len(loaded) == 3  # one study per slide, whatever its number of files
    metric = {(s, m): v for s, m, v in wh.query("SELECT study_id, metric, value FROM results")}
    embeddings = {s: json.loads(p) for s, p in wh.query(
        "SELECT study_id, properties FROM findings WHERE kind = 'slide_embedding'")}
    assert set(embeddings) == set(loaded)
    for study in loaded:
        assert metric[(study, "n_tiles_computed")] == metric[(study, "n_tiles")] > 10
        derived = next((buckets["lake"] / "derived" / SPECIALTY).rglob(f"{study}/tile_features.parquet"))
        table = pq.read_table(derived)
        assert table.num_rows == metric[(study, "n_tiles")]
        emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        ok = table.column("qc_pass").to_numpy(zero_copy_only=False)
        assert embeddings[study]["model"] == "site-encoder" and embeddings[study]["dim"] == 16
        assert embeddings[study]["mean"] == pytest.approx(emb[ok].mean(axis=0), abs=1e-5)
        bag = np.load(derived.with_name("mil_bag.npz"))
        assert np.array_equal(bag["features"], emb[ok])

    # the embedding of the DAG's first tile = the model run by hand on that tile of the de-identified slide
    study = loaded[0]
    deid = storage.read_json(next((buckets["lake"] / "anonymized").rglob(f"{study}/_DEID.json")))
    from imaging_tasks.pipeline import fetch_instances
    from imaging_tasks.slide_files import main_slide_file

    slide = main_slide_file(fetch_instances(deid["instances"], tmp_path / "slide"))
    plan = json.loads(next((buckets["lake"] / "work" / SPECIALTY / "plans" / study).glob("plan.json")).read_text())
    chunk = next(tile_chunks(slide, plan["tiles"][:4], target_mpp=1.0, tile_px=64, workers=0, with_pixels=True))
    x = torch.from_numpy(chunk.pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    by_hand = torch.jit.load(str(model))(x).detach().numpy()
    derived = next((buckets["lake"] / "derived" / SPECIALTY).rglob(f"{study}/tile_features.parquet"))
    dag_emb = np.stack(pq.read_table(derived).column("embedding").to_numpy(zero_copy_only=False)[:4])
    assert dag_emb == pytest.approx(by_hand, abs=1e-5)


def test_a_retried_feature_task_keeps_the_parts_it_wrote(made, monkeypatch, tmp_path):
    """A feature task killed after two parts: the retry computes only the parts that are missing, and the slide's
    table is the same as an uninterrupted run's."""
    from imaging_tasks.pathology import fanout, features_io, slide_features
    from imaging_tasks.pipeline import Lake, audit_deidentified, deidentify_study, index_landing

    _land({"ndpi": made["ndpi"], "dicom": made["dicom"], "mirax": made["mirax"]}, tmp_path / "landing")
    for p in (tmp_path / "landing" / SPECIALTY).iterdir():  # the NDPI slide only
        if p.name != "case-ndpi.ndpi":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    monkeypatch.setattr(features_io, "PART_TILES", 4)
    lake = Lake(tmp_path / "lake", SPECIALTY)
    (study,) = index_landing(tmp_path / "landing" / SPECIALTY, lake, key=DEMO_KEY)["studies"]
    clean = deidentify_study(study, lake, key=DEMO_KEY, demo=True)
    audit_deidentified(clean, lake)
    options = {"tile_px": 64, "target_mpp": 1.0}
    plan = fanout.plan_slide(clean, lake, options=options)
    n_parts = len(slide_features.part_ranges(plan["n_tiles"]))
    assert n_parts >= 4

    real_iter, computed = slide_features.iter_parts, []

    def killed_after_two(*args, **kwargs):
        for n, item in enumerate(real_iter(*args, **kwargs)):
            if n == 2:
                raise SystemExit("killed")  # what a worker lost mid-slide looks like to the task
            yield item

    def counting(slide, tiles, ranges, **kwargs):
        computed.extend(ranges)
        yield from real_iter(slide, tiles, ranges, **kwargs)

    monkeypatch.setattr(slide_features, "iter_parts", killed_after_two)
    with pytest.raises(SystemExit):
        fanout.slide_features(plan, lake, options=options)
    monkeypatch.setattr(slide_features, "iter_parts", counting)
    features = fanout.slide_features(plan, lake, options=options)
    assert len(computed) == n_parts - 2 and computed[0][0] == 2 * 4  # the two written parts were kept
    done = fanout.finish_slide(features, lake)
    table = pq.read_table(storage.as_path(done["derived"]).path + "/tile_features.parquet")
    assert table.column("tile_index").to_pylist() == list(range(plan["n_tiles"]))

    whole = tmp_path / "whole"
    slide_path = next((tmp_path / "landing" / SPECIALTY).iterdir())
    slide_features.process_study([slide_path], whole, device="cpu", **options)  # the raw slide: same pixels
    reference = pq.read_table(whole / "tile_features.parquet")
    for name in ("x", "y", "tissue_fraction", "hematoxylin_od_p50", "qc_pass"):
        assert table.column(name).to_pylist() == reference.column(name).to_pylist(), name
