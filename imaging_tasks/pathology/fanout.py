"""The pathology fan-out: plan the tiles of each slide, compute features over batches of tiles (the DAG maps
these over at most 1,000 tasks, whatever the number of slides), then gather each slide's batches and publish it
like any other study.  Built on the generic steps of :mod:`imaging_tasks.pipeline`.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from imaging_tasks import storage
from imaging_tasks.contracts import is_ok, with_status
from imaging_tasks.errors import BadInput
from imaging_tasks.pathology import SPECIALTY
from imaging_tasks.lake import Lake
from imaging_tasks.pipeline import DEID_MANIFEST, RunContext, fetch_instances, publish, quarantine_study, record_lineage
from imaging_tasks.progress import Progress

log = logging.getLogger(__name__)


def plan_slide(study: dict, lake: Lake, *, options: dict | None = None, run: RunContext = RunContext()) -> dict:
    """Tissue detection and the tile list, written to the work area for the mapped feature tasks.

    ``options``: the run's values of the specialty's options (``target_mpp``, ``tile_px``, ``min_tissue_fraction``;
    missing ones take their defaults).
    """
    from imaging_tasks.pathology.tiles import plan_tiles

    opts = SPECIALTY.options_for(options)
    target_mpp, tile_px = opts["target_mpp"], opts["tile_px"]

    started = time.time()
    if not is_ok(study):
        return with_status(study, "skipped", n_tiles=0)
    deid = storage.read_json(storage.join(study["anonymized"], DEID_MANIFEST))
    with tempfile.TemporaryDirectory(prefix="plan-") as tmp:
        slide = fetch_instances(deid["instances"][:1], Path(tmp) / "in")[0]
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        try:
            plan = plan_tiles(slide, out_dir, target_mpp=target_mpp, tile_px=tile_px,
                              min_tissue_fraction=opts["min_tissue_fraction"])
        except BadInput as exc:
            return quarantine_study(study, deid, lake, exc, run=run, started=started)
        storage.upload_dir(out_dir, lake.work("plans", study["study"]))
    plan_uri = lake.work("plans", study["study"], "plan.json")
    storage.write_json(plan_uri, {**plan, "target_mpp": target_mpp, "tile_px": tile_px})
    record_lineage(lake, run, study=study["study"], inputs=[{"uri": i["uri"], "sha256": i["sha256"]}
                                                              for i in deid["instances"]],
                   outputs=[{"uri": str(plan_uri), "sha256": storage.sha256_of(plan_uri)}], device=None,
                   started=started)
    return with_status(study, "ok", plan=str(plan_uri), slide=deid["instances"][0]["uri"], n_tiles=len(plan["tiles"]))


def tile_batches(plans: list[dict], *, max_batches: int = 1000, min_tiles_per_batch: int = 64) -> list[dict]:
    """Split every slide's tiles into batches, sized so the whole run maps to at most ``max_batches`` tasks."""
    plans = [p for p in plans if is_ok(p) and p["n_tiles"]]
    total = sum(p["n_tiles"] for p in plans)
    if not total:
        return []
    per_batch = max(min_tiles_per_batch, -(-total // max_batches))
    while sum(-(-p["n_tiles"] // per_batch) for p in plans) > max_batches:
        per_batch += 1
    return [{"study": p["study"], "plan": p["plan"], "slide": p["slide"], "start": start,
             "stop": min(start + per_batch, p["n_tiles"])}
            for p in plans for start in range(0, p["n_tiles"], per_batch)]


def tile_features_batch(batch: dict, lake: Lake, *, device: str | None = None, run: RunContext = RunContext()) -> dict:
    """Features of one batch of tiles, on the GPU when present; written to the work area."""
    from imaging_tasks.device import pick_device
    from imaging_tasks.pathology.tiles import tile_features

    started = time.time()
    plan = storage.read_json(batch["plan"])
    dev = str(pick_device(device))
    with tempfile.TemporaryDirectory(prefix="tiles-") as tmp:
        slide = storage.download(batch["slide"], Path(tmp) / "slide.svs")
        tiles = plan["tiles"][batch["start"]:batch["stop"]]
        with Progress(log, f"tile features pathology study {batch['study']} tiles {batch['start']}-{batch['stop']} "
                           f"on {dev}", total=len(tiles), unit="tile", every_n=512) as progress:
            rows = tile_features(slide, tiles, target_mpp=plan["target_mpp"], tile_px=plan["tile_px"], device=dev,
                                 progress=progress.advance)
    uri = lake.work("features", batch["study"], f"{batch['start']:08d}.json")
    sha = storage.write_json(uri, rows)
    record_lineage(lake, run, study=batch["study"],
                   inputs=[{"uri": batch["slide"], "sha256": None}], outputs=[{"uri": str(uri), "sha256": sha}],
                   device=dev, started=started)
    return {"study": batch["study"], "features": str(uri), "n_tiles": len(rows), "device": dev}


def finish_slide(plan: dict, features: list[dict], lake: Lake, *, run: RunContext = RunContext()) -> dict:
    """Gather a slide's feature batches, summarise and publish ``derived/`` like any other study."""
    from imaging_tasks.pathology.tiles import summarize

    started = time.time()
    if not is_ok(plan):
        return plan
    deid = storage.read_json(storage.join(plan["anonymized"], DEID_MANIFEST))
    plan_doc = storage.read_json(plan["plan"])
    mine = sorted((f for f in features if f and f["study"] == plan["study"]), key=lambda f: f["features"])
    rows = [row for f in mine for row in storage.read_json(f["features"])]
    result = summarize(plan_doc, rows)
    devices = sorted({f["device"] for f in mine}) or ["cpu"]
    with tempfile.TemporaryDirectory(prefix="slide-") as tmp:
        out_dir = Path(tmp)
        for o in plan_doc.get("outputs", []):
            storage.download(lake.work("plans", plan["study"], o), out_dir / o)
        storage.write_json(out_dir / "tile_features.json", rows)
        return publish(plan, deid, lake, result, out_dir, run=run, started=started, device=",".join(devices))
