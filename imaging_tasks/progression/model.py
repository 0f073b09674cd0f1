"""Bring-your-own progression models: the contract, loading one by URI, predicting a patient's future scores.

A site's own sequence model runs here the same way as the reference one (:mod:`imaging_tasks.progression.train`).
Like the imaging models of :mod:`imaging_tasks.byo_model`, it is a file the deployment points at, never fetched
from a hub, with a JSON beside it (same URI, suffix ``.json``); the archive's sha256 travels with every prediction.

The model
---------
TorchScript (``torch.jit.save(torch.jit.script(module))``) or torch.export (``torch.export.save`` of a program
exported with the batch dimension dynamic; its time dimension may be fixed at some T >= ``max_sessions``, as
``nn.LSTM`` exports, and every batch is then zero-padded to T), at a local path, ``file://``, ``s3://`` or
``gs://`` URI; anything else (a ``torch.save`` checkpoint, another zip) is refused, told apart by content as
:func:`imaging_tasks.byo_model.archive_format` does.  ``forward(x, lengths)``:

* ``x``: float32 (N, T, F), each patient's sessions in time order, **normalised** with the JSON's
  ``normalization`` (``(value - mean) / std`` per feature, done here before the call), zero-padded after the
  patient's ``length`` sessions; the model must ignore the padding (a unidirectional RNN read at ``length - 1``
  does).
* ``lengths``: int64 (N,), sessions per patient, 1 <= length <= T.
* returns float32 (N, len(horizons_months), len(outputs)) **in score units**: de-normalisation of the outputs is
  inside the model, so the archive alone says what it predicts.  Nothing is clipped here (the reference model
  clips to the scores' ranges itself).

The JSON beside it (``#`` notes are explanation, not part of the file)::

    {
      "name": "progression-lstm",          # required: non-empty text, cited with every prediction
      "version": "2026.04.1",              # required: non-empty text, cited with every prediction
      "task": "progression",               # required: exactly this
      "features": ["roi:hippocampus:gm_volume", "score:MMSE", "days_since_first", "interval_days"],
                                           # required: the F columns of x, in order (names: features.py)
      "normalization": {"mean": [3.6, 26.1, 700.0, 250.0], "std": [0.5, 3.2, 600.0, 180.0]},
                                           # required: one finite number per feature each, every std > 0
      "horizons_months": [6, 12, 18, 24, 36],   # required: positive, increasing; counted from the last session
      "outputs": ["MMSE", "CDR_SB", "ADAS_Cog"],  # required: score names, each once
      "min_sessions": 2,                   # required: fewer sessions -> NotEnoughSessions, no prediction
      "max_sessions": 16,                  # required: only the latest max_sessions are fed
      "score_window_days": 90,             # optional (90): how far a score may be from its session (features.py)
      "description": "..."                 # optional; keys starting with "x_" are yours (not read)
    }

Any other key is refused.  Every problem of a JSON is reported at once in one
:class:`~imaging_tasks.errors.ConfigError` naming the field and what to do; so is a model whose output shape
does not match its JSON (checked at load with one dry run on zeros).

Loading is not cached: a DAG task loads once and predicts for every patient (:func:`predict_many`).
"""
from __future__ import annotations

import datetime as dt
import io
import math
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from imaging_tasks import storage
from imaging_tasks.errors import BadInput, ConfigError
from imaging_tasks.progression.features import (DAYS_PER_MONTH, WINDOW_DAYS, PatientSequence, feature_matrix,
                                                parse_feature)

TASK = "progression"
REQUIRED = ("name", "version", "task", "features", "normalization", "horizons_months", "outputs", "min_sessions",
            "max_sessions")
OPTIONAL = ("score_window_days", "description")
DOC = "see the module docstring of imaging_tasks.progression.model for the format"
_EXPORT_HOW = ("torch.jit.save(torch.jit.script(module)), or torch.export.export(module.eval(), (x, lengths), "
               "dynamic_shapes=...) with the batch and time dimensions dynamic and torch.export.save")


@dataclass(frozen=True)
class ProgressionSpec:
    """The validated JSON plus where the model came from and its checksums (cited with every prediction)."""

    uri: str
    sha256: str
    config_uri: str
    config_sha256: str
    format: str  # "torchscript" | "torch.export"
    name: str
    version: str
    features: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    horizons_months: tuple[float, ...]
    outputs: tuple[str, ...]
    min_sessions: int
    max_sessions: int
    score_window_days: int = WINDOW_DAYS
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    input_sessions: int | None = None  # torch.export archives with a fixed T: every batch is padded to it

    def record(self) -> dict:
        """JSON-ready: which model, which bytes, what it takes and predicts."""
        return {"uri": self.uri, "sha256": self.sha256, "format": self.format, "config_uri": self.config_uri,
                "config_sha256": self.config_sha256, "name": self.name, "version": self.version,
                "features": list(self.features), "horizons_months": list(self.horizons_months),
                "outputs": list(self.outputs), "min_sessions": self.min_sessions, "max_sessions": self.max_sessions,
                "score_window_days": self.score_window_days, "input_sessions": self.input_sessions}

    def normalise(self, matrix: np.ndarray) -> np.ndarray:
        return ((np.asarray(matrix, np.float64) - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- the JSON

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_contract(text: str | bytes, *, where: str = "progression model JSON") -> dict:
    """Validate the JSON text; the fields of :class:`ProgressionSpec` (no uri/sha256/format).  All problems in one
    :class:`ConfigError`."""
    from imaging_tasks.byo_model import finish_fields, json_object

    raw = json_object(text, where=where, doc=DOC)
    problems: list[str] = []
    out: dict[str, Any] = {}
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        problems.append(f"missing {', '.join(repr(k) for k in missing)} (add them: every one is required)")
    unknown = sorted(k for k in raw if k not in REQUIRED + OPTIONAL and not str(k).startswith("x_"))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(REQUIRED + OPTIONAL)}, "
                        "and your own keys starting with 'x_')")

    for key in ("name", "version"):
        value = raw.get(key)
        if key in raw and not (isinstance(value, str) and value.strip()):
            problems.append(f"{key!r} is {value!r}; it must be non-empty text (it is cited with every prediction)")
        out[key] = value.strip() if isinstance(value, str) else ""
    if "task" in raw and raw["task"] != TASK:
        problems.append(f"'task' is {raw['task']!r}; a progression model's must be {TASK!r} (an imaging model "
                        "belongs to imaging_tasks.byo_model)")

    features = raw.get("features")
    out["features"] = ()
    if "features" in raw:
        if not (isinstance(features, list) and features):
            problems.append(f"'features' is {features!r}; it must be a non-empty list of feature names, in the "
                            "order of the model's input columns")
        else:
            bad = []
            for name in features:
                try:
                    parse_feature(name)
                except ValueError as exc:
                    bad.append(str(exc))
            repeated = sorted({f for f in features if isinstance(f, str) and features.count(f) > 1})
            if repeated:
                bad.append(f"feature(s) {', '.join(map(repr, repeated))} listed twice; list each once")
            if bad:
                problems.append("'features': " + "; ".join(bad))
            else:
                out["features"] = tuple(features)

    out["mean"] = out["std"] = ()
    norm = raw.get("normalization")
    if "normalization" in raw:
        n = len(features) if isinstance(features, list) else None
        if not isinstance(norm, dict):
            problems.append(f"'normalization' is {norm!r}; it must be {{\"mean\": [...], \"std\": [...]}}, one number "
                            "per feature each")
        else:
            extra = sorted(set(norm) - {"mean", "std"})
            if extra:
                problems.append(f"'normalization' has unknown key(s) {', '.join(map(repr, extra))}: it holds only "
                                "'mean' and 'std'")
            for key in ("mean", "std"):
                values = norm.get(key)
                if not (isinstance(values, list) and all(_is_number(v) for v in values)
                        and (key == "mean" or all(v > 0 for v in values))):
                    problems.append(f"'normalization.{key}' must be a list of finite numbers"
                                    + (", every one > 0 (a constant feature: use 1)" if key == "std" else "")
                                    + f", got {values!r}")
                elif n is not None and len(values) != n:
                    problems.append(f"'normalization.{key}' has {len(values)} number(s) but 'features' has {n}: give "
                                    "one per feature, in the same order")
                else:
                    out[key] = tuple(float(v) for v in values)

    horizons = raw.get("horizons_months")
    out["horizons_months"] = ()
    if "horizons_months" in raw:
        if not (isinstance(horizons, list) and horizons and all(_is_number(h) and h > 0 for h in horizons)
                and all(a < b for a, b in zip(horizons, horizons[1:]))):
            problems.append(f"'horizons_months' is {horizons!r}; it must be a non-empty list of positive, increasing "
                            "numbers of months after the last session, e.g. [6, 12, 18, 24, 36]")
        else:
            out["horizons_months"] = tuple(int(h) if float(h).is_integer() else float(h) for h in horizons)

    outputs = raw.get("outputs")
    out["outputs"] = ()
    if "outputs" in raw:
        if not (isinstance(outputs, list) and outputs and all(isinstance(o, str) and o.strip() for o in outputs)
                and len(set(outputs)) == len(outputs)):
            problems.append(f"'outputs' is {outputs!r}; it must be a non-empty list of score names, each once, in "
                            "the order of the model's last output dimension, e.g. [\"MMSE\", \"CDR_SB\", \"ADAS_Cog\"]")
        else:
            out["outputs"] = tuple(outputs)

    low, high = raw.get("min_sessions"), raw.get("max_sessions")
    if "min_sessions" in raw and not (_is_int(low) and low >= 1):
        problems.append(f"'min_sessions' is {low!r}; it must be a whole number >= 1")
    if "max_sessions" in raw and not (_is_int(high) and high >= 1):
        problems.append(f"'max_sessions' is {high!r}; it must be a whole number >= 1")
    elif _is_int(low) and _is_int(high) and high < low:
        problems.append(f"'max_sessions' ({high}) is below 'min_sessions' ({low}); it must be at least as large")
    out["min_sessions"] = low if _is_int(low) else 1
    out["max_sessions"] = high if _is_int(high) else 1

    window = raw.get("score_window_days", WINDOW_DAYS)
    if not (_is_int(window) and window >= 0):
        problems.append(f"'score_window_days' is {window!r}; it must be a whole number of days >= 0")
    out["score_window_days"] = window if _is_int(window) else WINDOW_DAYS
    return finish_fields(raw, out, problems, where=where, doc=DOC)


# ------------------------------------------------------------------------------------------------ loading

def load_progression_model(uri: Any) -> tuple[Any, ProgressionSpec]:
    """``(model in eval mode on the CPU, its ProgressionSpec)`` for a model URI (module docstring).

    The JSON is validated first (before any weights are read), then the archive is loaded and run once on zeros
    to check its output shape against ``horizons_months`` x ``outputs``.
    """
    import torch

    from imaging_tasks.byo_model import archive_format, config_uri

    if uri is None or not str(uri).strip():
        raise ConfigError("no progression model URI given: set it to a TorchScript or torch.export file (local "
                          "path, file://, s3:// or gs://) with its JSON beside it")
    path = storage.as_path(uri)
    model_uri = path.path if storage.is_local(path) else str(path)
    if path.suffix.lower() == ".json":
        raise ConfigError(f"progression model URI {model_uri} names the JSON; give the model file beside it (.pt)")
    json_uri = config_uri(model_uri)
    if not storage.exists(json_uri):
        raise ConfigError(f"progression model JSON {json_uri} not found: write it beside {model_uri} ({DOC})")
    config_bytes = storage.read_bytes(json_uri)
    fields = parse_contract(config_bytes, where=f"progression model JSON {json_uri}")
    if not storage.exists(model_uri):
        raise ConfigError(f"progression model file {model_uri} not found: check the model URI")
    with tempfile.TemporaryDirectory(prefix="progression-model-") as tmp:
        local = Path(path.path) if storage.is_local(path) else storage.download(path, Path(tmp) / "model")
        if local.is_dir():
            raise ConfigError(f"progression model URI {model_uri} is a folder; give the model file in it")
        data = local.read_bytes()  # hash exactly the bytes that are loaded
    kind = archive_format(data)
    fixed_t = None
    try:
        if kind == "torchscript":
            model = torch.jit.load(io.BytesIO(data), map_location="cpu")
            model.eval()
        elif kind == "torch.export":
            model, fixed_t = _load_exported(data, model_uri, fields)
        else:
            what = {"checkpoint": "a torch.save checkpoint (a state dict needs the training code to rebuild)",
                    "zip": "a zip archive of neither kind", "other": "not a zip archive: truncated, or another file"}
            raise ConfigError(f"progression model file {model_uri} is not TorchScript nor torch.export: it is "
                              f"{what[kind]}; export it with {_EXPORT_HOW}")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001  torch raises many kinds on a damaged archive
        raise ConfigError(f"progression model file {model_uri} ({kind}) cannot be loaded ({str(exc).strip()[:200]}): "
                          f"it is damaged or from a newer PyTorch; export it again with {_EXPORT_HOW}") from exc
    spec = ProgressionSpec(uri=model_uri, sha256=storage.sha256_bytes(data), config_uri=json_uri,
                           config_sha256=storage.sha256_bytes(config_bytes), format=kind, input_sessions=fixed_t,
                           **fields)
    _dry_run(model, spec)
    return model, spec


def _load_exported(data: bytes, model_uri: str, fields: dict) -> tuple[Any, int | None]:
    """``(program.module(), its fixed number of sessions T or None)``; the input dimensions checked against the
    JSON.  ``nn.LSTM`` exports with T fixed (PyTorch 2.x specialises it): such a program is fed batches padded to
    T, which must hold ``max_sessions``; the batch dimension must be dynamic (batches vary in size)."""
    import torch

    program = torch.export.load(io.BytesIO(data))
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    shapes = [getattr(n.meta.get("val"), "shape", None) for n in inputs]
    if len(shapes) != 2 or shapes[0] is None or len(shapes[0]) != 3:
        raise ConfigError(f"progression model file {model_uri} is a torch.export program taking {len(shapes)} "
                          "input(s); it must take (x (N, T, F), lengths (N,)): export a wrapper with that forward")
    n, t, f = (int(d) if isinstance(d, int) else None for d in shapes[0])
    problems = []
    if n is not None:
        problems.append(f"it was exported for batches of exactly {n}: export the batch dimension dynamic "
                        "(dynamic_shapes={'x': {0: batch}, 'lengths': {0: batch}} with batch = "
                        "torch.export.Dim('batch'))")
    if f is not None and f != len(fields["features"]):
        problems.append(f"it takes {f} feature(s), its JSON lists {len(fields['features'])}: fix one of them")
    if t is not None and t < fields["max_sessions"]:
        problems.append(f"it was exported for {t} session(s), below the JSON's max_sessions "
                        f"{fields['max_sessions']}: export it with an example of max_sessions sessions, or lower "
                        "max_sessions")
    if problems:
        raise ConfigError(f"progression model file {model_uri}: " + "; ".join(problems))
    return program.module(), t


def _dry_run(model, spec: ProgressionSpec) -> None:
    import torch

    t = spec.input_sessions or max(spec.min_sessions, 2)
    with torch.inference_mode():
        try:
            y = model(torch.zeros(2, t, len(spec.features)), torch.tensor([t, 1], dtype=torch.int64))
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"progression model {spec.uri} fails on (x float32 (2, {t}, {len(spec.features)}), "
                              f"lengths int64 (2,)) ({str(exc).strip()[:200]}): its forward must take (x, lengths) "
                              f"with F = len(features) = {len(spec.features)} ({DOC})") from exc
    want = (2, len(spec.horizons_months), len(spec.outputs))
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != want:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"progression model {spec.uri} returns {got} for 2 patients; its JSON says (N, horizons, "
                          f"outputs) = {want}: fix the JSON's horizons_months/outputs or export the right model")


# ------------------------------------------------------------------------------------------------ predicting

def _shifted_plus(date: str, days: float) -> str:
    when = dt.datetime.strptime(date, "%Y%m%d").date() + dt.timedelta(days=int(round(days)))
    return when.strftime("%Y%m%d")


def run_model(model, spec: ProgressionSpec, matrices: list[np.ndarray]) -> np.ndarray:
    """(N, H, O) float64 score-unit outputs for N (T_i, F) raw feature matrices (normalised and padded here)."""
    import torch

    if not matrices:
        return np.zeros((0, len(spec.horizons_months), len(spec.outputs)))
    lengths = [len(m) for m in matrices]
    x = np.zeros((len(matrices), spec.input_sessions or max(lengths), len(spec.features)), np.float32)
    for i, m in enumerate(matrices):
        x[i, :len(m)] = spec.normalise(m)
    with torch.inference_mode():
        y = model(torch.from_numpy(x), torch.tensor(lengths, dtype=torch.int64))
    out = y.detach().cpu().double().numpy()
    if not np.isfinite(out).all():
        raise ConfigError(f"progression model {spec.uri} returned non-finite values: the archive is broken or was "
                          "trained on other features; retrain or export it again")
    return out


def predict_many(model, spec: ProgressionSpec, sequences: Iterable[PatientSequence]) -> tuple[list[dict], list[dict]]:
    """``(predictions, refused)`` for many patients in one forward pass: a patient the model cannot take (too
    few sessions, a feature never measured) is refused with its reason and message, the others go on."""
    kept, matrices, refused = [], [], []
    for seq in sequences:
        try:
            matrices.append(feature_matrix(seq, spec.features, min_sessions=spec.min_sessions,
                                           max_sessions=spec.max_sessions, window_days=spec.score_window_days))
            kept.append(seq)
        except BadInput as exc:
            refused.append({"patient_id": seq.patient_id, "reason": exc.reason, "message": exc.message})
    values = run_model(model, spec, matrices)
    return [r for seq, per in zip(kept, values) for r in _records(spec, seq, per)], refused


def _records(spec: ProgressionSpec, seq: PatientSequence, values: np.ndarray) -> list[dict]:
    last = seq.sessions[-1]
    return [{"patient_id": seq.patient_id, "as_of_study_id": last.study_id, "as_of_date": last.date,
             "horizon_months": horizon, "target_date": _shifted_plus(last.date, horizon * DAYS_PER_MONTH),
             "score": score, "value": float(values[h, o]), "model_name": spec.name, "model_version": spec.version,
             "model_sha256": spec.sha256}
            for h, horizon in enumerate(spec.horizons_months) for o, score in enumerate(spec.outputs)]


def predict(model, spec: ProgressionSpec, patient_sequence: PatientSequence) -> list[dict]:
    """One patient's predictions, one dict per (horizon, score): ``horizon_months``, ``score``, ``value`` (score
    units), with ``patient_id``, ``as_of_study_id`` / ``as_of_date`` (the last session, shifted date),
    ``target_date`` (shifted) and ``model_name`` / ``model_version`` / ``model_sha256``.

    :class:`~imaging_tasks.progression.features.NotEnoughSessions` below the model's ``min_sessions``;
    ``BadInput("missing_features")`` when a feature was never measured for the patient.
    """
    matrix = feature_matrix(patient_sequence, spec.features, min_sessions=spec.min_sessions,
                            max_sessions=spec.max_sessions, window_days=spec.score_window_days)
    return _records(spec, patient_sequence, run_model(model, spec, [matrix])[0])


__all__ = ["TASK", "ProgressionSpec", "parse_contract", "load_progression_model", "run_model", "predict",
           "predict_many"]
