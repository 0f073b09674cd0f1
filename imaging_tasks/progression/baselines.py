"""Baselines a progression model must beat, given exactly the score observations the model sees as inputs.

* **LOCF** (last value carried forward): the latest observation of each score is the prediction at every horizon.
  What a clinician assumes without a model; hard to beat at short horizons, blind to decline.
* **Linear**: per patient and score, least squares of value on day over that patient's observations, extrapolated
  to each horizon (LOCF when there is one observation, or all fall on one day).  Follows a steady decline, but a
  few noisy points give wild slopes far out, and it cannot bend with a sigmoid course.

Both use the score observations that belong to the sequence's sessions (``matched_scores``: what the model is
fed; all of them, where a model sees its last ``max_sessions`` only, so a baseline is never given less), horizons
counted from the last session's day, predictions clipped to the score's range when it is known
(:data:`~imaging_tasks.progression.features.SCORE_RANGES`).  A score the patient has no observation of gives NaN
(no guess).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from imaging_tasks.progression.features import DAYS_PER_MONTH, SCORE_RANGES, WINDOW_DAYS, PatientSequence

METHODS = ("locf", "linear")


def observations(seq: PatientSequence, score: str, *,
                 window_days: int = WINDOW_DAYS) -> tuple[np.ndarray, np.ndarray]:
    """(days, values) of one score's observations belonging to the sessions of ``seq``, by day."""
    matched = seq.matched_scores(window_days)
    found = sorted((m[score].day, m[score].value) for m in matched if score in m)
    days = np.array([d for d, _ in found], float)
    return days, np.array([v for _, v in found], float)


def _clip(values: np.ndarray, score: str) -> np.ndarray:
    low, high = SCORE_RANGES.get(score, (-np.inf, np.inf))
    return np.clip(values, low, high)


def predict_baseline(method: str, seq: PatientSequence, horizons_months: Iterable[float], outputs: Iterable[str], *,
                     window_days: int = WINDOW_DAYS) -> np.ndarray:
    """(H, O) predictions of ``method`` (``locf`` or ``linear``) from the last session of ``seq``."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; use one of {', '.join(METHODS)}")
    horizons = np.asarray(list(horizons_months), float)
    outputs = list(outputs)
    target_days = seq.sessions[-1].day + horizons * DAYS_PER_MONTH
    out = np.full((len(horizons), len(outputs)), np.nan)
    for j, score in enumerate(outputs):
        days, values = observations(seq, score, window_days=window_days)
        if not len(days):
            continue
        if method == "locf" or len(days) < 2 or np.ptp(days) == 0:
            out[:, j] = values[-1]
        else:
            slope, intercept = np.polyfit(days, values, 1)
            out[:, j] = intercept + slope * target_days
        out[:, j] = _clip(out[:, j], score)
    return out


__all__ = ["METHODS", "observations", "predict_baseline"]
