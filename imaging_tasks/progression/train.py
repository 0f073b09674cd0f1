"""The reference progression model: a small LSTM trained on a cohort, written as a self-contained archive + JSON.

What it learns
--------------
From a patient's sessions up to some point (the model contract's features, :mod:`.features`), the scores at
each horizon after the last one.  Every prefix of a training patient's sessions (from ``min_sessions`` on) is a
training sample, so a 6-session patient teaches what 2, 3, ... 6 sessions say; evaluation uses each held-out
patient's whole sequence.  ``holdout`` (25 %) of the usable patients are held out by a seeded split and never
trained on, and the archive written is the model trained on the rest: the held-out errors describe that file.

Targets:

* synthetic cohort (``truth`` given): the true (noise-free) score at ``last day + h`` months
  (:meth:`~imaging_tasks.progression.cohort.CohortTruth.horizon_targets`);
* real data: the observed score nearest to ``last day + h`` months within ``target_window_days`` (default 90,
  under half the 6-month spacing of the horizons, so one visit never serves two horizons), any observation of
  the patient, matched to a session or not.  A horizon with no such visit is masked out of the loss (patients
  leave studies; their early horizons still teach).

The network
-----------
The features are normalised outside the model by the JSON's ``normalization`` (mean/std over the training
patients' sessions); ``nn.LSTM`` (one layer, ``hidden`` units) reads the sequence, its output at the last real
session (``lengths - 1``, so zero padding after it is never read) and that session's own inputs go through a
two-layer head to (horizons x outputs) normalised scores, de-normalised inside the model with the training
targets' mean/std per horizon and score, then clipped to the score's range.  So the archive maps normalised
inputs to score units on its own (:mod:`.model`).  Loss: Huber (delta 1) on normalised targets, masked;
AdamW, cosine learning-rate decay, gradient norm clipped at 1.

Reproducibility
---------------
Training runs under ``torch.manual_seed(seed)`` (the global generator forked, so the caller's random state is
untouched), ``torch.use_deterministic_algorithms(True)`` and one thread (both restored afterwards), with a
seeded ``torch.Generator`` for batch order and a seeded numpy split: same data and seed, same weights and the
same predictions.  The JSON's default ``version`` is a digest of the training data and settings, so it names
what was trained, not when.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from imaging_tasks import storage
from imaging_tasks.errors import BadInput
from imaging_tasks.progression import cohort
from imaging_tasks.progression.baselines import METHODS, predict_baseline
from imaging_tasks.progression.features import (DAYS_PER_MONTH, SCORE_RANGES, WINDOW_DAYS, PatientSequence,
                                                build_sequences, feature_matrix, fill, raw_matrix)
from imaging_tasks.progression.model import TASK, ProgressionSpec, parse_contract, run_model

HORIZONS_MONTHS = (6, 12, 18, 24, 36)
OUTPUTS = ("MMSE", "CDR_SB", "ADAS_Cog")
DEFAULT_FEATURES = cohort.FEATURES
TARGET_WINDOW_DAYS = 90


class ProgressionLSTM(nn.Module):
    """(x normalised (N, T, F), lengths (N,)) -> (N, H, O) scores; see the module docstring."""

    def __init__(self, n_features: int, n_horizons: int, n_outputs: int, hidden: int = 32, *,
                 target_mean=None, target_std=None, low=None, high=None):
        super().__init__()
        self.n_horizons = n_horizons
        self.n_outputs = n_outputs
        self.lstm = nn.LSTM(n_features, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden + n_features, hidden), nn.GELU(),
                                  nn.Linear(hidden, n_horizons * n_outputs))
        shape = (n_horizons, n_outputs)

        def buffer(value, default):
            return torch.as_tensor(value if value is not None else np.full(shape, default), dtype=torch.float32)

        self.register_buffer("target_mean", buffer(target_mean, 0.0))
        self.register_buffer("target_std", buffer(target_std, 1.0))
        self.register_buffer("low", buffer(low, -np.inf))
        self.register_buffer("high", buffer(high, np.inf))

    def normalised(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The head's output before de-normalisation (what the loss sees)."""
        out, _ = self.lstm(x)
        last = (lengths - 1).clamp(min=0, max=x.shape[1] - 1)
        rows = torch.arange(x.shape[0], device=x.device)
        joined = torch.cat([out[rows, last], x[rows, last]], dim=1)
        return self.head(joined).view(-1, self.n_horizons, self.n_outputs)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        y = self.normalised(x, lengths) * self.target_std + self.target_mean
        return torch.maximum(torch.minimum(y, self.high), self.low)


# ----------------------------------------------------------------------------------------------- targets

def horizon_targets(seq: PatientSequence, horizons_months: Iterable[float], outputs: Iterable[str], *,
                    truth=None, target_window_days: int = TARGET_WINDOW_DAYS) -> np.ndarray:
    """(H, O) targets after the last session of ``seq`` (module docstring), NaN where there is none."""
    horizons, outputs = list(horizons_months), list(outputs)
    last_day = seq.sessions[-1].day
    if truth is not None:
        return np.asarray(truth.horizon_targets(seq.patient_id, last_day, horizons, outputs), float)
    out = np.full((len(horizons), len(outputs)), np.nan)
    for o, score in enumerate(outputs):
        obs = [(s.day, s.value) for s in seq.scores if s.score == score]
        if not obs:
            continue
        days = np.array([d for d, _ in obs], float)
        values = np.array([v for _, v in obs], float)
        for h, months in enumerate(horizons):
            gap = np.abs(days - (last_day + months * DAYS_PER_MONTH))
            best = int(np.argmin(gap))
            if gap[best] <= target_window_days:
                out[h, o] = values[best]
    return out


def split_patients(patients: Iterable[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, test) patient lists: a seeded shuffle of the sorted IDs, ``holdout`` of them held out."""
    ordered = sorted(patients)
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction between 0 and 1, got {holdout}")
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_test = max(1, int(round(holdout * len(ordered))))
    test = sorted(ordered[i] for i in perm[:n_test])
    train = sorted(ordered[i] for i in perm[n_test:])
    return train, test


# ----------------------------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    model_uri: str  # <out>.pt
    config_uri: str  # <out>.json
    sha256: str  # of the archive written
    contract: dict  # the JSON written
    module: ProgressionLSTM  # the trained eager module (before scripting), in eval mode
    sequences: dict[str, PatientSequence]
    train_patients: list[str]
    test_patients: list[str]
    samples: int  # training prefixes
    skipped: dict[str, str] = field(default_factory=dict)  # patient -> why it could not be used at all
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    seconds: float = 0.0


def _eligible(sequences, features, min_sessions, max_sessions, window_days) -> tuple[list[str], dict[str, str]]:
    ok, skipped = [], {}
    for pid, seq in sequences.items():
        try:
            feature_matrix(seq, features, min_sessions=min_sessions, max_sessions=max_sessions,
                           window_days=window_days)
            ok.append(pid)
        except BadInput as exc:
            skipped[pid] = exc.reason
    return ok, skipped


def _samples(sequences, patients, features, horizons, outputs, *, min_sessions, max_sessions, window_days, truth,
             target_window_days):
    xs, ys = [], []
    for pid in patients:
        seq = sequences[pid]
        for n in range(min_sessions, len(seq.sessions) + 1):
            prefix = seq.prefix(n)
            try:
                x = feature_matrix(prefix, features, min_sessions=min_sessions, max_sessions=max_sessions,
                                   window_days=window_days)
            except BadInput:
                continue  # e.g. a score first measured at a later session: later prefixes have it
            y = horizon_targets(prefix, horizons, outputs, truth=truth, target_window_days=target_window_days)
            if np.isnan(y).all():
                continue
            xs.append(x)
            ys.append(y)
    return xs, ys


def _padded(matrices: list[np.ndarray], mean: np.ndarray, std: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [len(m) for m in matrices]
    x = np.zeros((len(matrices), max(lengths), len(mean)), np.float32)
    for i, m in enumerate(matrices):
        x[i, :len(m)] = (m - mean) / std
    return torch.from_numpy(x), torch.tensor(lengths, dtype=torch.int64)


def _out_base(out: Any) -> str:
    text = str(out)
    for suffix in (".pt", ".json"):
        if text.endswith(suffix):
            return text[:-len(suffix)]
    return text


def train_progression(sessions: Any, scores: Any = None, *, seed: int = 0, epochs: int = 60, hidden: int = 32,
                      out: Any, truth=None, features: Iterable[str] | None = None,
                      horizons_months: Iterable[float] = HORIZONS_MONTHS, outputs: Iterable[str] = OUTPUTS,
                      min_sessions: int = 2, max_sessions: int = 16, window_days: int = WINDOW_DAYS,
                      target_window_days: int = TARGET_WINDOW_DAYS, holdout: float = 0.25, lr: float = 5e-3,
                      weight_decay: float = 1e-4, batch_size: int = 64, name: str = "progression-lstm",
                      version: str | None = None, description: str = "") -> TrainResult:
    """Train on ``sessions`` / ``scores`` rows (or prebuilt ``{patient: PatientSequence}`` as ``sessions``), hold
    out ``holdout`` of the patients, write ``<out>.pt`` (TorchScript) and ``<out>.json`` (the contract).

    ``truth``: the synthetic cohort's :class:`~imaging_tasks.progression.cohort.CohortTruth` (targets are then the
    true scores); without it targets are observed scores (module docstring).  Patients that cannot be used at all
    (too few sessions, a feature never measured) are left out and listed in ``TrainResult.skipped``.
    """
    started = time.perf_counter()
    features = list(features or DEFAULT_FEATURES)
    horizons, outputs = list(horizons_months), list(outputs)
    if epochs < 1 or hidden < 1 or batch_size < 1:
        raise ValueError(f"epochs, hidden and batch_size must be >= 1 (got {epochs}, {hidden}, {batch_size})")
    if isinstance(sessions, Mapping) and all(isinstance(v, PatientSequence) for v in sessions.values()):
        sequences = dict(sessions)
    else:
        sequences = build_sequences(sessions, scores)
    eligible, skipped = _eligible(sequences, features, min_sessions, max_sessions, window_days)
    if len(eligible) < 4:
        raise BadInput("too_few_patients", f"{len(eligible)} patient(s) have >= {min_sessions} sessions and every "
                                           f"feature ({len(skipped)} left out: {_reasons(skipped)}); training needs "
                                           "many more: load more patients or drop features they lack")
    train_ids, test_ids = split_patients(eligible, holdout, seed)
    xs, ys = _samples(sequences, train_ids, features, horizons, outputs, min_sessions=min_sessions,
                      max_sessions=max_sessions, window_days=window_days, truth=truth,
                      target_window_days=target_window_days)
    if not xs:
        raise BadInput("no_targets", "no training patient has a score observed near any horizon after its sessions: "
                                     "load follow-up scores (or lower the horizons)")
    y = np.stack(ys)
    empty = [f"{o} at {h} months" for i, h in enumerate(horizons) for j, o in enumerate(outputs)
             if np.isnan(y[:, i, j]).all()]
    if empty:
        raise BadInput("no_targets", f"no training target for {', '.join(empty)}: no patient has such a follow-up "
                                     "score; drop that horizon/output or load more follow-up")

    # input normalisation: every session of the training patients once (as the JSON will say)
    rows = np.concatenate([fill(raw_matrix(sequences[p], features, window_days)) for p in train_ids])
    mean = np.nanmean(rows, axis=0)
    std = np.nanstd(rows, axis=0)
    std = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    t_mean = np.nanmean(y, axis=0)
    t_std = np.nanstd(y, axis=0)
    t_std = np.where(t_std > 1e-6, t_std, 1.0)
    low = np.array([[SCORE_RANGES.get(o, (-np.inf, np.inf))[0] for o in outputs]] * len(horizons))
    high = np.array([[SCORE_RANGES.get(o, (-np.inf, np.inf))[1] for o in outputs]] * len(horizons))

    x, lengths = _padded(xs, mean, std)
    target = torch.from_numpy(np.nan_to_num((y - t_mean) / t_std).astype(np.float32))
    mask = torch.from_numpy(~np.isnan(y))

    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            module = ProgressionLSTM(len(features), len(horizons), len(outputs), hidden, target_mean=t_mean,
                                     target_std=t_std, low=low, high=high)
            optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
            order = torch.Generator().manual_seed(seed)
            loss_fn = nn.HuberLoss(delta=1.0)
            module.train()
            for _ in range(epochs):
                total, count = 0.0, 0
                for batch in torch.randperm(len(x), generator=order).split(batch_size):
                    m = mask[batch]
                    loss = loss_fn(module.normalised(x[batch], lengths[batch])[m], target[batch][m])
                    optimiser.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                    optimiser.step()
                    total += loss.item() * len(batch)
                    count += len(batch)
                schedule.step()
                losses.append(total / count)
            module.eval()
            buffer = io.BytesIO()
            torch.jit.save(torch.jit.script(module), buffer)
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)
    archive = buffer.getvalue()

    settings = {"seed": seed, "epochs": epochs, "hidden": hidden, "lr": lr, "weight_decay": weight_decay,
                "batch_size": batch_size, "holdout": holdout, "window_days": window_days,
                "target_window_days": target_window_days, "targets": "truth" if truth is not None else "observed"}
    if version is None:
        digest = hashlib.sha256(json.dumps([features, horizons, outputs, min_sessions, max_sessions, settings],
                                           sort_keys=True).encode())
        for m, t in zip(xs, ys):
            digest.update(m.tobytes())
            digest.update(np.nan_to_num(t, nan=-1.0).tobytes())
        version = "trained-" + digest.hexdigest()[:12]
    contract = {
        "name": name, "version": version, "task": TASK, "features": features,
        "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
        "horizons_months": horizons, "outputs": outputs, "min_sessions": min_sessions, "max_sessions": max_sessions,
        "score_window_days": window_days,
        "description": description or (f"LSTM ({hidden} units) from imaging_tasks.progression.train; inputs "
                                       "normalised by 'normalization', outputs in score units (de-normalised and "
                                       "clipped inside the model)"),
        "x_training": {**settings, "train_patients": len(train_ids), "test_patients": len(test_ids),
                       "samples": len(xs), "skipped_patients": len(skipped),
                       "cohort": truth.describe() if hasattr(truth, "describe") else None,
                       "final_loss": losses[-1]},
    }
    text = json.dumps(contract, indent=2)
    parse_contract(text, where="the JSON the trainer wrote")  # never write a contract the loader refuses
    base = _out_base(out)
    sha = storage.write_bytes(base + ".pt", archive)
    storage.write_bytes(base + ".json", text.encode())
    where = storage.as_path(base + ".pt")
    model_uri = where.path if storage.is_local(where) else str(where)
    return TrainResult(model_uri=model_uri, config_uri=_out_base(model_uri) + ".json", sha256=sha, contract=contract,
                       module=module, sequences=sequences, train_patients=train_ids, test_patients=test_ids,
                       samples=len(xs), skipped=skipped, losses=losses, seconds=time.perf_counter() - started)


def _reasons(skipped: Mapping[str, str]) -> str:
    counts: dict[str, int] = {}
    for reason in skipped.values():
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items())) or "none"


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate(model, spec: ProgressionSpec, sequences: Mapping[str, PatientSequence], patients: Iterable[str], *,
             truth=None, target_window_days: int = TARGET_WINDOW_DAYS) -> dict:
    """Held-out mean absolute error per method (``model``, ``locf``, ``linear``), score and horizon.

    Each patient is predicted from its whole sequence; targets as in training (truth, or observed follow-up
    within ``target_window_days``).  Every method is scored on the same (patient, horizon, score) cells: those
    with a target where all three give a prediction.  Patients the model refuses are listed, not scored.
    """
    patients = list(patients)
    kept, matrices, refused = [], [], {}
    for pid in patients:
        try:
            matrices.append(feature_matrix(sequences[pid], spec.features, min_sessions=spec.min_sessions,
                                           max_sessions=spec.max_sessions, window_days=spec.score_window_days))
            kept.append(pid)
        except BadInput as exc:
            refused[pid] = exc.reason
    preds = {"model": run_model(model, spec, matrices)}
    for method in METHODS:
        preds[method] = np.stack([predict_baseline(method, sequences[p], spec.horizons_months, spec.outputs,
                                                   window_days=spec.score_window_days) for p in kept]) if kept \
            else np.zeros_like(preds["model"])
    targets = np.stack([horizon_targets(sequences[p], spec.horizons_months, spec.outputs, truth=truth,
                                        target_window_days=target_window_days) for p in kept]) if kept \
        else np.zeros_like(preds["model"])
    valid = ~np.isnan(targets)
    for values in preds.values():
        valid &= ~np.isnan(values)
    methods = ("model", *METHODS)
    mae = {m: {o: {} for o in spec.outputs} for m in methods}
    counts = {o: {} for o in spec.outputs}
    for h, horizon in enumerate(spec.horizons_months):
        for o, score in enumerate(spec.outputs):
            cell = valid[:, h, o]
            counts[score][str(horizon)] = int(cell.sum())
            for m in methods:
                mae[m][score][str(horizon)] = (float(np.mean(np.abs(preds[m][cell, h, o] - targets[cell, h, o])))
                                               if cell.any() else None)
    mean = {m: {o: _mean([v for v in mae[m][o].values() if v is not None]) for o in spec.outputs} for m in methods}
    return {"patients": len(kept), "refused": refused, "targets": "truth" if truth is not None else "observed",
            "horizons_months": list(spec.horizons_months), "outputs": list(spec.outputs), "mae": mae,
            "mean_over_horizons": mean, "cells": counts,
            "model": {"name": spec.name, "version": spec.version, "sha256": spec.sha256}}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def format_mae_table(result: dict) -> str:
    """The evaluation as a Markdown table: one row per score and horizon (and the mean over horizons), the
    three methods side by side, the best in bold."""
    methods = ("model", *METHODS)
    lines = [f"held-out MAE vs {result['targets']} scores, {result['patients']} patient(s)"
             + (f", {len(result['refused'])} refused" if result["refused"] else ""), "",
             "| score | horizon (months) | n | model (LSTM) | LOCF | linear |", "|---|---|---|---|---|---|"]

    def row(score, label, n, values):
        finite = [v for v in values if v is not None]
        best = min(finite) if finite else None
        cells = ["-" if v is None else (f"**{v:.3f}**" if v == best else f"{v:.3f}") for v in values]
        lines.append(f"| {score} | {label} | {n} | " + " | ".join(cells) + " |")

    for score in result["outputs"]:
        for horizon in result["horizons_months"]:
            key = str(horizon)
            row(score, key, result["cells"][score][key], [result["mae"][m][score][key] for m in methods])
        row(score, "mean", "", [result["mean_over_horizons"][m][score] for m in methods])
    return "\n".join(lines)


__all__ = ["HORIZONS_MONTHS", "OUTPUTS", "DEFAULT_FEATURES", "ProgressionLSTM", "TrainResult", "horizon_targets",
           "split_patients", "train_progression", "evaluate", "format_mae_table"]
