"""Whole-slide tiling throughput on one large synthetic slide, in one run: a bare OpenSlide loop, this project's
tile features (built in, with a small encoder, and the whole per-slide task), the torch path from before issue 14
and TIAToolbox's patch extractors.

    .venv/bin/python bench/wsi.py [--width 20000 --height 15000] [--mpp 0.25] [--tile-px 256] [--target-mpp 0.25]
                                  [--workers 2] [--repeats 2] [--out bench/results/wsi] [--skip tiatoolbox ...]

The slide (an Aperio SVS written by ``pathology.synth.synthesize`` from the real IHC section in scikit-image, 5
fragments with seed 227: ~40 % tissue) is built in its own process and cached under ``$TMPDIR/wsi_bench/<recipe>``
(``--rebuild`` redoes it).  ``plan_tiles`` gives the tiles every row works on; its tissue area is compared with
the synthesizer's truth.  With the page cache warm, ``--repeats`` rounds run the rows interleaved (a row slower
than 60 s runs once) and each row keeps its best wall time:

* ``bare_1`` / ``bare_N``: ``OpenSlide.read_region`` + ``numpy.asarray`` per tile, in 1 / ``--workers`` processes;
* ``ours_1`` / ``ours_N``: ``reader.tile_chunks(..., workers=1 | N)``: every tile's stain + QC columns;
* ``legacy``: ``tile_features`` of ``tests/pathology_reference.py`` (the library's torch path before issue 14) on
  the first ``--legacy-tiles`` tiles; its values are compared with ``tile_chunks``' columns on the same tiles;
* ``encoder``: ``tile_chunks(..., with_pixels=True)`` + ``encoder.embed`` with a tiny TorchScript net built here;
* ``task``: ``slide_features.process_study`` (plan, features, Parquet, summary, MIL bag, QC picture): what one
  DAG task costs per slide;
* ``tia_*``: TIAToolbox's extractors in ``bench/.venv-tiatoolbox`` (made by ``ensure_tia_venv``), run by this
  script under that venv's interpreter (``--tia-worker``): hence only the standard library at module level.

Tiles/s is wall time; CPU ms/tile (user + system of this process, its reaped children and the fork server's)
takes out the load other processes put on a shared machine.  Writes ``<out>.json`` (everything) and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TIA_VENV = BENCH / ".venv-tiatoolbox"
TIA_REQ = BENCH / "requirements-tiatoolbox.txt"
# The only torch that installs from this machine's disk (the CPU wheel); any other version would download a
# multi-GB CUDA build.  tiatoolbox 2.1.3 declares torch<2.13.0, so it is installed --no-deps from a pinned freeze.
TORCH_PIN = "torch==2.13.0"
SEED, FRAGMENTS = 227, 5  # ~39.4 % tissue on a 4:3 slide (the fragment layout scales with the slide)
MIN_TISSUE_FRACTION = 0.5  # plan_tiles' default; TIAToolbox's min_mask_ratio is set to the same
POOL_CHUNK = 32
TIA_MODES = {"tia_points": "TIAToolbox PointsPatchExtractor, the same planned tiles, 1 process",
             "tia_sliding": "TIAToolbox SlidingWindowPatchExtractor, whole slide (no mask), 1 process",
             "tia_sliding_otsu": "TIAToolbox SlidingWindowPatchExtractor, input_mask='otsu', min_mask_ratio 0.5, "
                                 "1 process"}


# =========================================================================================== TIAToolbox side
# (runs under bench/.venv-tiatoolbox/bin/python: standard library + numpy + tiatoolbox only)

def tia_worker(job_path: Path) -> None:
    """Times TIAToolbox's extractors on the job's slide; prints the runs as JSON.

    ``tiatoolbox/tools/__init__.py`` imports every tool, among them ``registration``, which imports torchvision;
    PyPI's torchvision is a CUDA build that cannot load against the CPU torch this venv must use, so the package
    is registered empty and only the patch extraction module (and what it imports itself) is loaded.
    """
    import types

    import numpy as np

    t0 = time.perf_counter()
    import tiatoolbox

    tools = types.ModuleType("tiatoolbox.tools")
    tools.__path__ = [str(Path(tiatoolbox.__file__).parent / "tools")]
    sys.modules.setdefault("tiatoolbox.tools", tools)
    from tiatoolbox.tools import patchextraction as pe

    import_s = time.perf_counter() - t0
    job = json.loads(Path(job_path).read_text())
    path, tile_px, target_mpp = job["slide"], int(job["tile_px"]), float(job["target_mpp"])
    scale = float(job["slide_mpp"]) / target_mpp  # level-0 px -> px at target_mpp
    half = int((tile_px - 1) / 2)  # PointsPatchExtractor takes centres and subtracts this
    centres = np.array([[round(x * scale) + half, round(y * scale) + half] for x, y, *_ in job["tiles"]])
    common = dict(input_img=path, patch_size=(tile_px, tile_px), resolution=target_mpp, units="mpp")
    make = {"tia_points": lambda: pe.PointsPatchExtractor(locations_list=centres, **common),
            "tia_sliding": lambda: pe.SlidingWindowPatchExtractor(stride=(tile_px, tile_px), within_bound=True,
                                                                  **common),
            "tia_sliding_otsu": lambda: pe.SlidingWindowPatchExtractor(
                stride=(tile_px, tile_px), within_bound=True, input_mask="otsu",
                min_mask_ratio=float(job["min_mask_ratio"]), **common)}
    out = {"tiatoolbox": tiatoolbox.__version__, "import_s": round(import_s, 3), "runs": {}}
    for rnd in range(int(job["repeats"])):
        for mode in TIA_MODES:
            gc.collect()
            load = os.getloadavg()[0]
            c0, t0 = time.process_time(), time.perf_counter()
            ext = make[mode]()
            t1, c_setup = time.perf_counter(), time.process_time()
            shapes = [np.asarray(patch).shape for patch in ext]
            t2, c1 = time.perf_counter(), time.process_time()
            out["runs"].setdefault(mode, []).append({
                "round": rnd, "n": len(shapes), "setup_s": t1 - t0, "iterate_s": t2 - t1, "cpu_s": c1 - c_setup,
                "setup_cpu_s": c_setup - c0, "patch_shape": list(shapes[0]) if shapes else None,
                "reader": type(ext.wsi).__name__, "load1": load})
    print(json.dumps(out))


# =========================================================================================== TIAToolbox venv

def ensure_tia_venv() -> tuple[Path | None, str | None]:
    """(python of bench/.venv-tiatoolbox, None), or (None, why it could not be installed).

    Created with ``python3 -m venv`` from ``requirements-tiatoolbox.txt`` (a ``pip freeze``: exact pins, installed
    ``--no-deps`` so pip never re-resolves): ``torch==2.13.0`` first, under a constraints file pinning it, so pip
    takes the CPU wheel on this machine's disk and never a CUDA build.  A stamp newer than the requirements file
    marks a finished install.
    """
    py, stamp = TIA_VENV / "bin" / "python", TIA_VENV / ".installed"
    if stamp.exists() and py.exists() and stamp.stat().st_mtime >= TIA_REQ.stat().st_mtime:
        return py, None
    log = TIA_VENV.parent / ".venv-tiatoolbox-install.log"
    try:
        if not py.exists():
            print("creating bench/.venv-tiatoolbox ...", flush=True)
            subprocess.run(["python3", "-m", "venv", str(TIA_VENV)], check=True, capture_output=True, text=True)
        constraints = TIA_VENV / "constraints.txt"
        constraints.write_text(TORCH_PIN + "\n")
        pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]
        print(f"installing {TORCH_PIN} then tiatoolbox into bench/.venv-tiatoolbox (log: {log}) ...", flush=True)
        with open(log, "w") as fh:
            for cmd in (pip + [TORCH_PIN], pip + ["--no-deps", "-r", str(TIA_REQ)]):
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, timeout=3600).returncode:
                    errors = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("ERROR")]
                    raise RuntimeError(f"`pip {' '.join(cmd[3:])}` failed" + (f": {errors[-1][:300]}" if errors else "")
                                       + f" (log: {log})")
        check = subprocess.run([str(py), "-c", "import torch, tiatoolbox; print(torch.__version__)"],
                               capture_output=True, text=True, timeout=600)
        if check.returncode or not check.stdout.strip().startswith("2.13.0"):
            raise RuntimeError(f"the venv does not import torch 2.13.0 + tiatoolbox: {check.stderr.strip()[-300:]}")
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    stamp.touch()
    return py, None


def run_tiatoolbox(path: str, tiles: list, slide_mpp: float, args) -> dict:
    """TIAToolbox's rows (best iteration time of each mode), from the worker in its venv."""
    py, why = ensure_tia_venv()
    if py is None:
        note = f"not installed: {why}"
        return {"status": note, "rows": [_row("tiatoolbox", "TIAToolbox", None, 0, note)]}
    with tempfile.TemporaryDirectory(prefix="wsi_bench_tia_") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"slide": path, "tiles": tiles, "slide_mpp": slide_mpp, "tile_px": args.tile_px,
                                   "target_mpp": args.target_mpp, "repeats": args.repeats,
                                   "min_mask_ratio": MIN_TISSUE_FRACTION}))
        print("  tiatoolbox (subprocess in bench/.venv-tiatoolbox) ...", flush=True)
        done = subprocess.run([str(py), __file__, "--tia-worker", str(job)], capture_output=True, text=True,
                              timeout=3600)
    if done.returncode:
        note = f"failed: worker exited {done.returncode}: {done.stderr.strip()[-600:]}"
        return {"status": note, "rows": [_row("tiatoolbox", "TIAToolbox", None, 0, note)]}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    for mode, label in TIA_MODES.items():
        runs = out["runs"][mode]
        b = min(runs, key=lambda r: r["iterate_s"])
        note = f"setup {b['setup_s']:.2f} s (not in tiles/s); reader {b['reader']}"
        if mode != "tia_points":
            note += f"; {b['n']} patches (planned tiles: {len(tiles)})"
        rows.append(_row(mode, f"{label} (tiatoolbox {out['tiatoolbox']})", {**b, "wall_s": b["iterate_s"]},
                         len(runs), note))
    return {"status": "ran", "version": out["tiatoolbox"], "import_s": out["import_s"], "runs": out["runs"],
            "rows": rows}


# =========================================================================================== slide

def build_worker(out: Path, width: int, height: int, mpp: float, stain: str) -> None:
    """Runs in its own process: synthesize one slide into ``out`` and write ``recipe.json``."""
    sys.path.insert(0, str(REPO))
    from imaging_tasks.pathology import synth

    t0 = time.perf_counter()
    truths = synth.synthesize(out, 1, SEED, width=width, height=height, mpp=mpp, stain=stain, fragments=FRAGMENTS,
                              compression="jpeg")
    (out / "recipe.json").write_text(json.dumps({
        "slide": "pathology/study-000/slide.svs", "truth": json.loads(Path(truths[0]).read_text())["truth"],
        "width": width, "height": height, "mpp": mpp, "stain": stain, "fragments": FRAGMENTS, "seed": SEED,
        "compression": "jpeg", "jpeg_quality": synth.JPEG_QUALITY, "tile": synth.TILE,
        "downsamples": list(synth.DOWNSAMPLES), "synth_sha256": hashlib.sha256(Path(synth.__file__).read_bytes())
        .hexdigest(), "build_s": round(time.perf_counter() - t0, 1),
        "build_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}, indent=2))


def build_slide(args) -> tuple[Path, dict]:
    """(slide path, recipe dict) from the cache, built first when missing (or ``--rebuild``)."""
    cache = Path(tempfile.gettempdir()) / "wsi_bench"
    root = cache / f"w{args.width}_h{args.height}_mpp{args.mpp:g}_{args.stain}_f{FRAGMENTS}_s{SEED}_jpeg"
    cached = (root / "recipe.json").exists() and not args.rebuild
    if not cached:
        tmp = cache / f"{root.name}.building-{os.getpid()}"
        print(f"building the slide ({args.width} x {args.height} px at {args.mpp:g} um/px) in {root} ...", flush=True)
        try:
            subprocess.run([sys.executable, __file__, "--build-worker", str(tmp), str(args.width), str(args.height),
                            str(args.mpp), args.stain], check=True)
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    recipe = {**json.loads((root / "recipe.json").read_text()), "cached": cached}
    return root / recipe["slide"], recipe


def slide_facts(path: Path) -> dict:
    import openslide

    with openslide.OpenSlide(str(path)) as s:
        return {"dimensions": list(s.dimensions), "levels": [list(d) for d in s.level_dimensions],
                "mpp": float(s.properties["openslide.mpp-x"]), "vendor": s.properties.get("openslide.vendor"),
                "file_mb": round(path.stat().st_size / 2 ** 20, 1),
                "openslide_library": openslide.__library_version__, "openslide_python": openslide.__version__}


def warm_page_cache(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass
    return time.perf_counter() - t0


# =========================================================================================== rows

def _cpu_s() -> float:
    """User + system CPU seconds of this process, its reaped children, and multiprocessing's fork server and the
    children it reaped (utime, stime, cutime, cstime of /proc/<pid>/stat): ``reader.tile_chunks`` starts its
    workers from a fork server, so they are the server's children, not ours."""
    from multiprocessing import forkserver

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    pid = forkserver._forkserver._forkserver_pid
    if pid:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def timed(fn) -> dict:
    """Runs ``fn() -> (tiles, extra)``: tiles, wall and CPU seconds, 1-min load at the start, and ``extra``."""
    gc.collect()
    load = os.getloadavg()[0]
    c0, t0 = _cpu_s(), time.perf_counter()
    n, extra = fn()
    return {"n": n, "wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "load1": load, **extra}


def bare_loop(path: str, tiles: list) -> tuple[int, dict]:
    import numpy as np
    import openslide

    with openslide.OpenSlide(path) as slide:
        for x, y, level, w, h in tiles:
            np.asarray(slide.read_region((x, y), level, (w, h)))
    return len(tiles), {}


_POOL_SLIDE = None


def _pool_init(path: str) -> None:
    global _POOL_SLIDE
    import openslide

    _POOL_SLIDE = openslide.OpenSlide(path)


def _pool_read(chunk: list) -> int:
    import numpy as np

    for x, y, level, w, h in chunk:
        np.asarray(_POOL_SLIDE.read_region((x, y), level, (w, h)))
    return len(chunk)


def bare_pool(path: str, tiles: list, workers: int) -> tuple[int, dict]:
    import multiprocessing as mp

    chunks = [tiles[i:i + POOL_CHUNK] for i in range(0, len(tiles), POOL_CHUNK)]
    with mp.get_context("fork").Pool(workers, initializer=_pool_init, initargs=(path,)) as pool:
        n = sum(pool.imap_unordered(_pool_read, chunks))
        pool.close()
        pool.join()  # workers reaped inside the timed window: their CPU time counts
    return n, {}


def build_encoder(folder: Path, args) -> Path:
    """A small conv net (3 strided convs, global mean, linear head; ~26k weights, seeded), scripted and saved with
    its JSON (``imaging_tasks.byo_model`` format, an embedding model as ``pathology.encoder`` wants it)."""
    import torch
    from torch import nn

    class TinyEncoder(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
            self.head = nn.Linear(64, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_encoder.pt"
    torch.jit.save(torch.jit.script(TinyEncoder(args.encoder_dim).eval()), str(path))
    side = args.encoder_input
    path.with_suffix(".json").write_text(json.dumps({
        "name": "bench-tiny-encoder", "task": "embedding", "output": "features", "channels": 3,
        "input_size": [side, side],
        "normalization": {"method": "mean_std", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        # what the encoder sees: tile_px at target_mpp resized to input_size (the grid rule holds exactly)
        "um_per_px": round(args.target_mpp * args.tile_px / side, 6), "output_dim": args.encoder_dim,
        "batch_size": 64, "amp": True,
        "description": "bench/wsi.py: 3 strided convs + linear, random seeded weights (throughput only)"}, indent=2))
    return path


# =========================================================================================== the run

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The module docstring and bench/README.md ('wsi.py') say what each row is.")
    ap.add_argument("--width", type=int, default=20000, help="slide width, level-0 px (default 20000)")
    ap.add_argument("--height", type=int, default=15000, help="slide height, level-0 px (default 15000)")
    ap.add_argument("--mpp", type=float, default=0.25, help="slide microns per pixel (default 0.25)")
    ap.add_argument("--stain", choices=("ihc", "he"), default="ihc",
                    help="ihc: the IHC section's own pixels; he: restained to H&E (default ihc)")
    ap.add_argument("--tile-px", type=int, default=256, help="tile edge at the target resolution (default 256)")
    ap.add_argument("--target-mpp", type=float, default=0.25, help="tiling resolution, um/px (default 0.25)")
    ap.add_argument("--workers", type=int, default=2, help="processes for the pooled rows (default 2)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds, rows interleaved; best wall time per row (default 2; a row slower than 60 s "
                         "runs once)")
    ap.add_argument("--legacy-tiles", type=int, default=256,
                    help="tiles for the legacy row and the value check (default 256)")
    ap.add_argument("--encoder-input", type=int, default=224, help="tiny encoder's input_size S (default 224)")
    ap.add_argument("--encoder-dim", type=int, default=64, help="tiny encoder's output_dim D (default 64)")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=("bare", "ours", "legacy", "encoder", "task", "tiatoolbox"), help="rows to leave out")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached slide")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "wsi",
                    help="results stem: writes OUT.json and OUT.md (default bench/results/wsi)")
    ap.add_argument("--build-worker", nargs=5, metavar=("OUT", "W", "H", "MPP", "STAIN"), help=argparse.SUPPRESS)
    ap.add_argument("--tia-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.repeats = max(1, args.repeats)
    if args.tia_worker:
        tia_worker(args.tia_worker)
    elif args.build_worker:
        out, w, h, mpp, stain = args.build_worker
        build_worker(Path(out), int(w), int(h), float(mpp), stain)
    else:
        run(args)
    return 0


def run(args) -> None:
    import numpy as np

    sys.path.insert(0, str(REPO))
    from imaging_tasks.pathology import encoder, reader, slide_features
    from imaging_tasks.pathology.tiles import plan_tiles

    # The torch path from before issue 14 left the library; it lives on in tests/ as the reference definition the
    # tests hold the fast path to (not a package: its directory goes on the path).
    sys.path.insert(0, str(REPO / "tests"))
    import pathology_reference

    started, load_start = dt.datetime.now(dt.timezone.utc), os.getloadavg()
    slide, recipe = build_slide(args)
    facts, truth = slide_facts(slide), recipe["truth"]
    how = "cached" if recipe["cached"] else f"built in {recipe['build_s']} s"
    print(f"slide: {slide} ({facts['dimensions'][0]} x {facts['dimensions'][1]} px, {facts['file_mb']} MB, {how}, "
          f"truth tissue {truth['tissue_fraction']:.1%} = {truth['tissue_area_mm2']:.2f} mm2)", flush=True)

    grid = {"target_mpp": args.target_mpp, "tile_px": args.tile_px}
    with tempfile.TemporaryDirectory(prefix="wsi_bench_plan_") as tmp:
        t0 = time.perf_counter()
        plan = plan_tiles(slide, Path(tmp), min_tissue_fraction=MIN_TISSUE_FRACTION, **grid)
        plan_s = time.perf_counter() - t0
    metrics = {m["name"]: m["value"] for m in plan["metrics"]}
    tiles = [[int(v) for v in t[:5]] for t in plan["tiles"]]
    area, true_area = float(metrics["tissue_area_mm2"]), float(truth["tissue_area_mm2"])
    print(f"plan_tiles: {len(tiles)} tiles of {args.tile_px} px at {args.target_mpp:g} um/px in {plan_s:.2f} s; "
          f"tissue {area:.2f} mm2 vs truth {true_area:.2f} mm2 ({area / true_area - 1:+.1%})", flush=True)
    warm_s = warm_page_cache(slide)
    path, n, keep = str(slide), args.workers, min(args.legacy_tiles, len(tiles))

    def ours(workers):
        chunks = [len(c) for c in reader.tile_chunks(path, tiles, workers=workers, **grid)]
        return sum(chunks), {}

    legacy_rows = []

    def legacy():
        legacy_rows[:] = pathology_reference.tile_features(slide, tiles[:keep], device="cpu", **grid)
        return len(legacy_rows), {}

    def embed_all():
        embs = [encoder.embed(model, spec, c.pixels, "cpu")
                for c in reader.tile_chunks(path, tiles, workers=n, with_pixels=True, **grid)]
        return sum(map(len, embs)), {"embedding_dim": embs[0].shape[1],
                                     "finite": all(bool(np.isfinite(e).all()) for e in embs)}

    def task():
        with tempfile.TemporaryDirectory(prefix="wsi_bench_task_") as out:
            res = slide_features.process_study([slide], Path(out), device="cpu", workers=n, **grid)
        done = {m["name"]: m["value"] for m in res["metrics"]}
        return int(done["n_tiles_computed"]), {"outputs": res["outputs"]}

    rows = {}  # name -> {"label", "fn", "runs"}
    for name, group, label, fn in [
            ("bare_1", "bare", "bare OpenSlide read_region loop, 1 process", lambda: bare_loop(path, tiles)),
            (f"bare_{n}", "bare", f"bare OpenSlide read_region loop, {n} processes", lambda: bare_pool(path, tiles, n)),
            ("ours_1", "ours", "ours: reader.tile_chunks, workers=1 (in process), stain + QC columns", lambda: ours(1)),
            (f"ours_{n}", "ours", f"ours: reader.tile_chunks, workers={n}, stain + QC columns", lambda: ours(n)),
            ("legacy", "legacy", f"before: tests/pathology_reference.tile_features (torch, in process), first {keep} "
             "tiles", legacy),
            ("encoder", "encoder", f"ours + tiny encoder ({args.encoder_input} px input, {args.encoder_dim}-D, CPU): "
             f"tile_chunks(workers={n}, with_pixels=True) + encoder.embed", embed_all),
            ("task", "task", f"ours: whole slide task, slide_features.process_study(workers={n}): plan + features + "
             "Parquet + summary + MIL bag + QC picture", task)]:
        if group not in args.skip:
            rows[name] = {"label": label, "fn": fn, "runs": []}

    encoder_info = None
    if "encoder" in rows:
        model, spec = encoder.load_encoder(str(build_encoder(Path(tempfile.gettempdir()) / "wsi_bench" / "encoder",
                                                             args)), "cpu")
        encoder.check_encoder_grid(spec, **grid)
        encoder_info = {"input_size": list(spec.input_size), "output_dim": spec.output_dim,
                        "um_per_px": spec.um_per_px, "sha256": spec.sha256, "batch_size": spec.batch_size,
                        "channels_last": spec.channels_last,
                        "weights": "3 convs (3-16 k4s4, 16-32 k3s2, 32-64 k3s2) + linear 64-D, seeded"}

    for rnd in range(args.repeats):
        for name, row in rows.items():
            if rnd and row["runs"][-1]["wall_s"] > 60:
                continue
            print(f"  round {rnd + 1}: {name} ...", end=" ", flush=True)
            r = timed(row["fn"])
            row["runs"].append(r)
            print(f"{r['n']} tiles, {r['wall_s']:.2f} s, {r['n'] / r['wall_s']:.1f} tiles/s", flush=True)

    value_check = None
    if legacy_rows:  # largest |tile_chunks column - reference value| per shared column, over the same tiles
        chunks = list(reader.tile_chunks(path, tiles[:keep], workers=1, **grid))
        value_check = {k: float(np.max(np.abs(np.concatenate([c.columns[k] for c in chunks])
                                              - [r[k] for r in legacy_rows])))
                       for k in sorted(chunks[0].columns) if k in legacy_rows[0]}

    tia = ({"status": "skipped (--skip tiatoolbox)", "rows": []} if "tiatoolbox" in args.skip
           else run_tiatoolbox(path, tiles, plan["mpp"], args))

    table = [_row(name, row["label"], min(row["runs"], key=lambda r: r["wall_s"]), len(row["runs"]))
             for name, row in rows.items()] + tia.pop("rows")
    tps = {r["name"]: r["tiles_per_s"] for r in table if r["tiles_per_s"]}
    for r in table:
        r["pct_of_bare_1"] = round(100 * r["tiles_per_s"] / tps["bare_1"], 1) if "bare_1" in tps and r[
            "tiles_per_s"] else None
    ratios = {f"{a} / {b}": round(tps[a] / tps[b], 3)
              for a, b in (("ours_1", "bare_1"), (f"ours_{n}", "bare_1"), (f"ours_{n}", f"bare_{n}"))
              if a in tps and b in tps}
    result = {
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": [round(v, 2) for v in load_start],
                    "loadavg_end": [round(v, 2) for v in os.getloadavg()]},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("build_worker", "tia_worker")},
        "slide": {"path": str(slide), **facts, "recipe": {k: v for k, v in recipe.items() if k != "truth"},
                  "page_cache_warm_s": round(warm_s, 2)},
        "truth": truth,
        "plan": {"seconds": round(plan_s, 3), "n_tiles": len(tiles), "tissue_area_mm2": area,
                 "tissue_area_truth_mm2": true_area, "tissue_area_ratio": round(area / true_area, 4),
                 "metrics": metrics},
        "encoder": encoder_info, "value_check_max_abs_diff": value_check,
        "value_check_tiles": len(legacy_rows), "tiatoolbox": tia, "rows": table, "ratios": ratios,
        "runs": {name: row["runs"] for name, row in rows.items()}, "versions": _versions(), "code": _code_state(),
    }
    md = markdown(result, args)
    print("\n" + md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    args.out.with_suffix(".md").write_text(md)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


def _row(name, label, b, runs, note="") -> dict:
    if not b:
        return {"name": name, "label": label, "tiles": None, "wall_s": None, "tiles_per_s": None,
                "cpu_ms_per_tile": None, "runs": runs, "note": note}
    return {"name": name, "label": label, "tiles": b["n"], "wall_s": round(b["wall_s"], 3),
            "tiles_per_s": round(b["n"] / b["wall_s"], 1), "cpu_ms_per_tile": round(1000 * b["cpu_s"] / b["n"], 2),
            "runs": runs, "load1": round(b["load1"], 2), "note": note}


def _code_state() -> dict:
    """Which code was measured: the git commit, and the sha256 of the modules the rows run (they may be
    uncommitted work in progress)."""
    git = ["git", "-C", str(REPO)]
    out = {"git_head": subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "git_dirty_files": len(subprocess.run(git + ["status", "--porcelain"], capture_output=True,
                                                 text=True).stdout.splitlines())}
    for f in ["tests/pathology_reference.py"] + [f"imaging_tasks/pathology/{m}.py" for m in (
            "reader", "stain", "tile_qc", "tiles", "encoder", "slide_features", "features_io", "synth")]:
        out[Path(f).name] = hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:16]
    return out


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("openslide-python", "openslide-bin", "torch", "numpy", "pillow", "pyarrow", "tifffile", "imagecodecs"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def markdown(res: dict, args) -> str:
    s, p, m, t, r0 = res["slide"], res["plan"], res["machine"], res["truth"], res["slide"]["recipe"]
    lines = [
        f"Slide: {s['dimensions'][0]} x {s['dimensions'][1]} px at {s['mpp']:g} um/px, Aperio SVS, JPEG Q"
        f"{r0['jpeg_quality']} {r0['tile']}-px tiles, levels "
        f"{', '.join('x'.join(map(str, lv)) for lv in s['levels'])}, {s['file_mb']} MB; real IHC pixels (skimage "
        f"`immunohistochemistry`, stain={r0['stain']}), {r0['fragments']} fragments, truth tissue "
        f"{t['tissue_fraction']:.1%} ({t['tissue_area_mm2']:.2f} mm2).",
        f"plan_tiles ({args.target_mpp:g} um/px, {args.tile_px} px): {p['n_tiles']} tiles in {p['seconds']:.2f} s; "
        f"tissue area {p['tissue_area_mm2']:.2f} mm2 vs truth {p['tissue_area_truth_mm2']:.2f} mm2 "
        f"(ratio {p['tissue_area_ratio']:.3f}, {100 * (p['tissue_area_ratio'] - 1):+.1f}%).",
        f"Machine: {m['cpus']} cores, load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at "
        f"end (1 min); best of {args.repeats} interleaved rounds per row; page cache warm.",
        "",
        "| row | what | tiles | wall s | tiles/s | CPU ms/tile | % of bare loop (1 proc) | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        cells = [r["name"], r["label"], r["tiles"], r["wall_s"], r["tiles_per_s"], r["cpu_ms_per_tile"],
                 r["pct_of_bare_1"], r["note"].replace("|", "/")]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    lines.append("")
    if res["ratios"]:
        lines.append("Built-in features vs the bare loop (issue-14 target >= 70%): "
                     + "; ".join(f"{k}: {100 * v:.0f}%" for k, v in res["ratios"].items()) + ".")
    if vc := res["value_check_max_abs_diff"]:
        worst = sorted(vc.items(), key=lambda kv: -kv[1])[:6]
        lines.append(f"Value check, tile_chunks columns vs tests/pathology_reference.tile_features on the first "
                     f"{res['value_check_tiles']} tiles, largest |difference| (OD units; tissue_fraction a fraction): "
                     + ", ".join(f"{k} {v:.3g}" for k, v in worst) + f" ({len(vc)} shared columns).")
    if e := res["encoder"]:
        lines.append(f"Encoder: TorchScript, {e['weights']}; input {e['input_size']}, um_per_px {e['um_per_px']}, "
                     f"batch {e['batch_size']}, channels_last {e['channels_last']}; torch threads: default.")
    tia = res["tiatoolbox"]
    lines.append(f"TIAToolbox {tia['version']} in bench/.venv-tiatoolbox (import {tia['import_s']:.1f} s, not timed); "
                 "tiles/s over iteration only, its setup (slide open, and for 'otsu' its tissue mask at 1.25x) in the "
                 "note." if tia["status"] == "ran" else f"TIAToolbox: {tia['status']}.")
    lines.append(f"Pooled rows: {args.workers} worker processes, each opening the slide once.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
