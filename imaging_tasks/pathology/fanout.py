"""The pathology fan-out: three steps per slide, mapped as one task group per slide in the DAG.

``plan_slide`` (tissue and the tile list) -> ``slide_features`` (the tile reader's worker processes and the
optional encoder over every tile, Parquet parts in the work area; a retry keeps the parts already written) ->
``finish_slide`` (one table, MIL bag, tile-QC picture, summary; published like any other study).  A slide's
tiles never leave its own three tasks, so a run maps three task instances per slide whatever its tile count, and
memory stays that of one part (:data:`~.features_io.PART_TILES` tiles).  Built on the generic steps of
:mod:`imaging_tasks.pipeline`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

from imaging_tasks import storage
from imaging_tasks.contracts import is_ok, with_status
from imaging_tasks.errors import BadInput
from imaging_tasks.lake import Lake
from imaging_tasks.pathology import SPECIALTY
from imaging_tasks.pipeline import DEID_MANIFEST, RunContext, fetch_instances, publish, quarantine_study, record_lineage
from imaging_tasks.progress import Progress

log = logging.getLogger(__name__)


def _fetch_slide(deid: dict, local: Path) -> Path:
    from imaging_tasks.slide_files import main_slide_file

    return main_slide_file(fetch_instances(deid["instances"], local))


def plan_slide(study: dict, lake: Lake, *, options: dict | None = None, run: RunContext = RunContext()) -> dict:
    """Tissue detection and the tile list, written to the work area for the slide's feature task.

    ``options``: the run's values of the specialty's options (missing ones take their defaults).
    """
    from imaging_tasks.pathology.tiles import plan_tiles

    opts = SPECIALTY.options_for(options)
    started = time.time()
    if not is_ok(study):
        return with_status(study, "skipped", n_tiles=0)
    deid = storage.read_json(storage.join(study["anonymized"], DEID_MANIFEST))
    with tempfile.TemporaryDirectory(prefix="plan-") as tmp:
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        try:
            slide = _fetch_slide(deid, Path(tmp) / "in")
            plan = plan_tiles(slide, out_dir, target_mpp=opts["target_mpp"], tile_px=opts["tile_px"],
                              min_tissue_fraction=opts["min_tissue_fraction"])
        except BadInput as exc:
            return quarantine_study(study, deid, lake, exc, run=run, started=started)
        storage.upload_dir(out_dir, lake.work("plans", study["study"]))
    plan_uri = lake.work("plans", study["study"], "plan.json")
    sha = storage.write_json(plan_uri, plan)
    record_lineage(lake, run, study=study["study"], inputs=[{"uri": i["uri"], "sha256": i["sha256"]}
                                                              for i in deid["instances"]],
                   outputs=[{"uri": str(plan_uri), "sha256": sha}], device=None, started=started)
    return with_status(study, "ok", plan=str(plan_uri), plan_sha256=sha, n_tiles=len(plan["tiles"]))


def _features_prefix(lake: Lake, plan: dict, encoder_uri: str | None, encoder_sha: str | None):
    """Where this plan's parts go: keyed by the plan and the encoder, so a retry finds (and keeps) exactly the
    parts computed for the same tiles with the same model, and a changed option never mixes in old ones."""
    key = hashlib.sha256(json.dumps([plan["plan_sha256"], encoder_uri, encoder_sha]).encode()).hexdigest()[:16]
    return lake.work("features", plan["study"], key)


def slide_features(plan: dict, lake: Lake, *, options: dict | None = None, device: str | None = None,
                   run: RunContext = RunContext()) -> dict:
    """Every tile's features (and embedding, with an encoder) as Parquet parts; parts already written by an earlier
    attempt of the same plan and encoder are kept, not recomputed."""
    from imaging_tasks.device import pick_device
    from imaging_tasks.pathology import features_io
    from imaging_tasks.pathology.slide_features import Encoder, iter_parts, part_name, part_ranges, plan_meta

    started = time.time()
    if not is_ok(plan):
        return plan
    opts = SPECIALTY.options_for(options)
    doc = storage.read_json(plan["plan"])
    dev = pick_device(device)
    encoder = Encoder(opts["encoder_uri"], device=dev, target_mpp=doc["target_mpp"], tile_px=doc["tile_px"]) \
        if opts.get("encoder_uri") else None
    prefix = _features_prefix(lake, plan, encoder.spec.uri if encoder else None, encoder.spec.sha256 if encoder else None)
    done = {o.relpath for o in storage.list_objects(prefix)}
    every = part_ranges(len(doc["tiles"]))
    ranges = [(a, b) for a, b in every if part_name(a, b) not in done]
    if len(ranges) < len(every):
        log.info("tile features pathology study %s: %d of %d part(s) already written by an earlier attempt; kept",
                 plan["study"], len(every) - len(ranges), len(every))
    deid = storage.read_json(storage.join(plan["anonymized"], DEID_MANIFEST))
    n_todo = sum(b - a for a, b in ranges)
    with tempfile.TemporaryDirectory(prefix="tiles-") as tmp:
        slide = _fetch_slide(deid, Path(tmp) / "in") if ranges else None
        with Progress(log, f"tile features pathology study {plan['study']} ({n_todo} tiles"
                           f"{', encoder ' + encoder.spec.name if encoder else ''}) on {dev}",
                      total=n_todo, unit="tile", every_n=2048) as progress:
            for a, b, table in iter_parts(slide, doc["tiles"], ranges, slide_mpp=doc["mpp"],
                                          target_mpp=doc["target_mpp"], tile_px=doc["tile_px"], encoder=encoder,
                                          meta=plan_meta(doc), progress=progress.advance):
                local = features_io.write_table(table, Path(tmp) / part_name(a, b))
                storage.write_file(storage.join(prefix, part_name(a, b)), local)
                local.unlink()
    record_lineage(lake, run, study=plan["study"], inputs=[{"uri": i["uri"], "sha256": i["sha256"]}
                                                             for i in deid["instances"]],
                   outputs=[{"uri": str(prefix), "sha256": None}], device=str(dev), started=started)
    return {**plan, "features": str(prefix), "device": str(dev),
            "encoder": encoder.spec.name if encoder else None}


def finish_slide(features: dict, lake: Lake, *, run: RunContext = RunContext()) -> dict:
    """One tile table from the parts, the MIL bag, the tile-QC picture and the summary; published like any other
    study (``derived/``), the summary into the warehouse."""
    from imaging_tasks.pathology import features_io
    from imaging_tasks.pathology.slide_features import slide_outputs

    started = time.time()
    if not is_ok(features):
        return features
    deid = storage.read_json(storage.join(features["anonymized"], DEID_MANIFEST))
    doc = storage.read_json(features["plan"])
    with tempfile.TemporaryDirectory(prefix="slide-") as tmp:
        parts_dir, out_dir = Path(tmp) / "parts", Path(tmp) / "out"
        out_dir.mkdir()
        parts = [storage.download(o.uri, parts_dir / o.relpath) for o in storage.list_objects(features["features"])
                 if o.relpath.endswith(".parquet")]
        table = features_io.merge_parts(parts, out_dir / "tile_features.parquet", n_tiles=len(doc["tiles"]))
        for p in parts:
            p.unlink()
        plan_dir = lake.work("plans", features["study"])
        storage.download(storage.join(plan_dir, "tissue_mask.png"), out_dir / "tissue_mask.png")
        qc_base = storage.download(storage.join(plan_dir, "qc_tissue.png"), Path(tmp) / "qc_tissue.png")
        result = slide_outputs(doc, table, out_dir, qc_base=qc_base)
        return publish(features, deid, lake, result, out_dir, run=run, started=started, device=features["device"])
