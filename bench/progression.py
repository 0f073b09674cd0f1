"""Progression prediction: the reference LSTM against LOCF and a per-patient linear fit, and what one prediction costs.

    .venv/bin/python bench/progression.py [--patients 200] [--seed 0] [--epochs 60] [--repeats 50] [--no-shifted]

1. Synthesises the development cohort (``synthesize_cohort(patients, seed)``), trains the reference LSTM
   (``train_progression``: 75 % of the patients, every prefix of their sessions, targets = the true scores at each
   horizon; seeded, deterministic, one thread) and writes the archive + JSON to a temporary folder.
2. Held-out MAE per score and horizon (6-36 months) against the truth, for the model, LOCF and the linear fit,
   on the 25 % held-out patients (``evaluate``): the same cells for all three.
3. Unless ``--no-shifted``: the same on a cohort from another generator (noisier scores and images, visits 2-12
   months apart, more amyloid-positive and older patients, more missing scores, wider rates), trained with the
   same settings, and the development model applied to it without retraining.
4. Latency of ``predict`` for one 10-session patient: warm (model loaded once; median, p90, min of ``--repeats``
   calls after one warm-up) and cold (``load_progression_model`` + ``predict``; the first call in the process,
   which also pays for the TorchScript runtime's first use, and the median of 10 more).
5. Prints the tables and writes ``bench/results/progression.json`` and ``bench/results/progression.md``.

Torch runs on one thread throughout (what a DAG task on a shared worker gets; the training forces it anyway).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH.parent))

SHIFTED = dict(amyloid_positive_fraction=0.7, visit_gap_days=(60, 360), age_years=(65.0, 90.0), score_noise=1.7,
               feature_noise=1.6, missing_score_fraction=0.25, rate_spread=1.5)


def _load() -> float:
    return os.getloadavg()[0]


def _train_and_evaluate(folder: Path, patients: int, seed: int, epochs: int, params=None) -> dict:
    from imaging_tasks.progression.cohort import synthesize_cohort
    from imaging_tasks.progression.model import load_progression_model
    from imaging_tasks.progression.train import evaluate, train_progression

    started = time.perf_counter()
    sessions, scores, truth = synthesize_cohort(patients, seed=seed, params=params)
    synth_s = time.perf_counter() - started
    result = train_progression(sessions, scores, seed=seed, epochs=epochs, out=folder / "progression", truth=truth)
    model, spec = load_progression_model(result.model_uri)
    report = evaluate(model, spec, result.sequences, result.test_patients, truth=truth)
    return {"result": result, "model": model, "spec": spec, "truth": truth, "report": report,
            "synth_s": synth_s, "train_s": result.seconds}


def _latency(model_uri: str, seq, repeats: int) -> dict:
    from imaging_tasks.progression.model import load_progression_model, predict

    started = time.perf_counter()
    model, spec = load_progression_model(model_uri)
    predict(model, spec, seq)
    first_cold = time.perf_counter() - started
    cold = []
    for _ in range(10):
        started = time.perf_counter()
        m, s = load_progression_model(model_uri)
        predict(m, s, seq)
        cold.append(time.perf_counter() - started)
    predict(model, spec, seq)  # warm-up
    warm = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(model, spec, seq)
        warm.append(time.perf_counter() - started)
    warm.sort()
    return {"sessions": len(seq.sessions), "warm_median_ms": 1e3 * statistics.median(warm),
            "warm_p90_ms": 1e3 * warm[int(0.9 * (len(warm) - 1))], "warm_min_ms": 1e3 * warm[0],
            "warm_repeats": repeats, "cold_first_ms": 1e3 * first_cold,
            "cold_median_ms": 1e3 * statistics.median(cold), "cold_repeats": len(cold)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-shifted", action="store_true", help="skip the other-generator cohort")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from imaging_tasks.progression.cohort import CohortParams
    from imaging_tasks.progression.train import evaluate, format_mae_table

    load_start = _load()
    started = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="bench-progression-") as tmp:
        tmp = Path(tmp)
        (tmp / "dev").mkdir()
        dev = _train_and_evaluate(tmp / "dev", args.patients, args.seed, args.epochs)
        print(format_mae_table(dev["report"]), flush=True)
        sequences = dev["result"].sequences
        ten = sorted(p for p, s in sequences.items() if len(s.sessions) == 10)
        if not ten:
            raise SystemExit("no 10-session patient in the cohort: use more --patients")
        latency = _latency(dev["result"].model_uri, sequences[ten[0]], args.repeats)
        print(json.dumps({"latency": latency}), flush=True)
        shifted = transfer = None
        if not args.no_shifted:
            (tmp / "shifted").mkdir()
            shifted = _train_and_evaluate(tmp / "shifted", args.patients, args.seed + 11, args.epochs,
                                          CohortParams(**SHIFTED))
            r = shifted["result"]
            transfer = evaluate(dev["model"], dev["spec"], r.sequences, r.test_patients, truth=shifted["truth"])
            print("\nother generator, retrained:\n" + format_mae_table(shifted["report"]), flush=True)
            print("\nother generator, development model as is:\n" + format_mae_table(transfer), flush=True)
        spec = dev["spec"]
        summary = {
            "run_at": started.isoformat(timespec="seconds"), "machine": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg_start": load_start, "loadavg_end": _load(),
            "settings": vars(args),
            "model": {"name": spec.name, "version": spec.version, "sha256": spec.sha256,
                      "archive_bytes": Path(dev["result"].model_uri).stat().st_size, "features": list(spec.features),
                      "train_patients": len(dev["result"].train_patients),
                      "test_patients": len(dev["result"].test_patients), "samples": dev["result"].samples,
                      "synth_s": dev["synth_s"], "train_s": dev["train_s"]},
            "held_out": dev["report"], "latency": latency,
            "shifted_generator": None if shifted is None else {
                "params": SHIFTED, "seed": args.seed + 11, "train_s": shifted["train_s"],
                "retrained": shifted["report"], "development_model": transfer},
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "progression.json").write_text(json.dumps(summary, indent=2, default=str))
    md = [f"# Progression prediction ({started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"1 thread; load average {load_start:.2f} at start, {summary['loadavg_end']:.2f} at end)", "",
          f"Development cohort: {args.patients} synthetic patients, seed {args.seed}; trained on "
          f"{summary['model']['train_patients']} ({summary['model']['samples']} session prefixes, {args.epochs} "
          f"epochs, {dev['train_s']:.1f} s), scored on the {summary['model']['test_patients']} held out against the "
          "true scores.  Best per row in bold.", "", format_mae_table(dev["report"]), "",
          f"## Latency of one `predict` (a {latency['sessions']}-session patient)", "",
          "| | median ms | p90 ms | min ms | calls |", "|---|---:|---:|---:|---:|",
          f"| warm (model loaded once) | {latency['warm_median_ms']:.2f} | {latency['warm_p90_ms']:.2f} | "
          f"{latency['warm_min_ms']:.2f} | {latency['warm_repeats']} |",
          f"| cold: load + predict | {latency['cold_median_ms']:.1f} | | | {latency['cold_repeats']} |",
          f"| cold, first in the process | {latency['cold_first_ms']:.1f} | | | 1 |"]
    if shifted is not None:
        params = ", ".join(f"{k}={v}" for k, v in SHIFTED.items())
        md += ["", "## Another generator", "", f"`CohortParams({params})`, seed {args.seed + 11}.", "",
               "Retrained with the same settings:", "", format_mae_table(shifted["report"]), "",
               "The development model as is (no retraining):", "", format_mae_table(transfer)]
    (RESULTS / "progression.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS / 'progression.json'} and {RESULTS / 'progression.md'}")


if __name__ == "__main__":
    main()
