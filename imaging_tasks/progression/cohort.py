"""A synthetic Alzheimer's-continuum cohort with known truth, for developing and testing progression models.

Real cohorts have no ground truth at future horizons (patients drop out, visits drift), so methods are developed
here first: every patient's expected score on any day is known, so a prediction's error is measured against the
truth, not against one noisy future visit.

Generative model (days ``t`` since the patient's first session, years ``y = t / 365.25``)
---------------------------------------------------------------------------------------
* A latent disease stage ``s(y) = stage0 + rate * y``.  Amyloid-positive patients (``amyloid_positive_fraction``)
  start further along and progress faster (``rate`` log-normal around 0.55 stage/year against 0.08 for
  amyloid-negative ones; spread scaled by ``rate_spread``).
* Cognition follows a patient-specific stage ``c = s - 0.5 * reserve`` (``reserve`` ~ N(0, 1): cognitive
  reserve delays symptoms relative to pathology) through sigmoids ``sig(x) = 1 / (1 + exp(-x))``:
  ``MMSE = 30 - b - (29 - b) * sig(1.3 (c - 1.0))`` (``b`` ~ U(0, 2.5), the patient's baseline deficit),
  ``CDR_SB = 18 * sig(1.2 (c - 1.8))``, ``ADAS_Cog = a + (60 - a) * sig(1.1 (c - 1.2))`` (``a`` ~ U(3, 10)).
  These are the truth (:meth:`PatientTruth.expected_scores`).  Observations add Gaussian noise (SD 1.4, 0.8 and
  3.0 points times the patient's noise level) and are rounded as the instruments are scored (MMSE whole points,
  CDR-SB half points, ADAS-Cog thirds), clipped to their ranges.  Each session's visit has its scores 14 days
  before to 30 days after the scan; after the first visit each score is missing with ``missing_score_fraction``.
* Imaging follows the stage ``s`` itself (atrophy is ahead of symptoms), with ageing:
  ``age_factor = 1 - 0.004 (age - 60)``; hippocampus GM volume ``0.0026 ICV * age_factor * (1 - 0.30
  sig(s))``; entorhinal ``0.0012 ICV * age_factor * (1 - 0.35 sig(s + 0.5))``; amygdala ``0.0011 ICV * age_factor
  * (1 - 0.25 sig(s))``; precuneus ``0.0085 ICV * age_factor * (1 - 0.15 sig(s - 1))``; lateral occipital (a
  control region) ``0.011 ICV * age_factor``; whole-brain volume ``0.80 ICV (1 - 0.0025 (age - 60)) (1 - 0.06
  sig(s))``; intracranial volume ICV ~ N(1450, 140) ml.  Mean SUVR of a cortical composite: ``base + 0.65
  sig(1.2 (s + 2))`` for amyloid-positive patients (rising early, then plateauing), ``base + 0.03 sig(s)`` for
  negative ones (``base`` ~ U(0.95, 1.10)).  Multiplicative noise (2.5-4 % for the regions, 0.8 % whole brain,
  0.5 % ICV) and SUVR noise (0.03), times the patient's feature-noise level.
* Per patient: 2-10 sessions ``sessions`` apart by ``visit_gap_days`` (uniform), baseline age ``age_years``,
  noise levels U(0.6, 1.5) times ``score_noise`` / ``feature_noise``.  :class:`CohortParams` varies all of it, so
  a method can be checked on generators it was not developed on.

Rows are shaped like the warehouse (:mod:`imaging_tasks.progression.features`): patient IDs are keyed
pseudonyms and dates shifted per patient, under ``key``, from raw IDs (``MRN...``) and real dates that only the
truth holds (:meth:`CohortTruth.raw_score_rows` gives the scores as a site would upload them).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from imaging_tasks.progression.features import DAYS_PER_MONTH, SCORE_RANGES

ATLAS = "synthetic_ad"
COHORT_KEY = b"imaging-tasks synthetic progression cohort"  # synthetic data only: pseudonyms are not secrets here
# (roi, metric, unit) of every session, in the order rows are written
MEASURES = (("hippocampus", "gm_volume", "ml"), ("entorhinal", "gm_volume", "ml"), ("amygdala", "gm_volume", "ml"),
            ("precuneus", "gm_volume", "ml"), ("lateral_occipital", "gm_volume", "ml"),
            ("whole_brain", "brain_volume", "ml"), ("whole_brain", "intracranial_volume", "ml"),
            ("cortical_composite", "mean_suvr", "1"))
FEATURES = tuple(f"roi:{roi}:{metric}" for roi, metric, _ in MEASURES) + (
    "score:MMSE", "score:CDR_SB", "score:ADAS_Cog", "days_since_first", "interval_days")
SCORES = ("MMSE", "CDR_SB", "ADAS_Cog")
SCORE_SD = {"MMSE": 1.4, "CDR_SB": 0.8, "ADAS_Cog": 3.0}
SCORE_STEP = {"MMSE": 1.0, "CDR_SB": 0.5, "ADAS_Cog": 1 / 3}
_REGION_SD = {"hippocampus": 0.025, "entorhinal": 0.04, "amygdala": 0.04, "precuneus": 0.03,
              "lateral_occipital": 0.03}


@dataclass(frozen=True)
class CohortParams:
    """The generator's knobs (module docstring); the defaults are the cohort methods are developed on."""

    amyloid_positive_fraction: float = 0.5
    sessions: tuple[int, int] = (2, 10)  # inclusive range of sessions per patient
    visit_gap_days: tuple[int, int] = (90, 540)  # days between sessions, uniform
    age_years: tuple[float, float] = (58.0, 86.0)  # baseline age, uniform
    score_noise: float = 1.0  # times the instruments' noise SD
    feature_noise: float = 1.0  # times the imaging measurement noise
    missing_score_fraction: float = 0.1  # per score per visit after the first
    rate_spread: float = 1.0  # times the log-SD of progression rates


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class PatientTruth:
    patient_id: str  # pseudonym, as in the rows
    raw_id: str  # what the site calls the patient (never in the rows)
    shift_days: int  # the de-identification date shift of this patient (real date + shift = row date)
    first_date: str  # shifted YYYYMMDD of the first session: day 0
    amyloid_positive: bool
    age0: float
    stage0: float
    rate_per_year: float
    reserve: float
    mmse_deficit: float
    adas_base: float
    icv_ml: float
    suvr_base: float
    score_noise: float
    feature_noise: float
    session_days: tuple[int, ...]

    def stage(self, days) -> np.ndarray:
        return self.stage0 + self.rate_per_year * np.asarray(days, float) / 365.25

    def expected_scores(self, days) -> dict[str, np.ndarray]:
        """The noise-free scores on the given days since the first session."""
        c = self.stage(days) - 0.5 * self.reserve
        b, a = self.mmse_deficit, self.adas_base
        return {"MMSE": 30.0 - b - (29.0 - b) * _sig(1.3 * (c - 1.0)),
                "CDR_SB": 18.0 * _sig(1.2 * (c - 1.8)),
                "ADAS_Cog": a + (60.0 - a) * _sig(1.1 * (c - 1.2))}

    def expected_measures(self, days) -> dict[tuple[str, str], np.ndarray]:
        """The noise-free imaging values on the given days."""
        days = np.asarray(days, float)
        s = self.stage(days)
        age = self.age0 + days / 365.25
        ageing = 1.0 - 0.004 * (age - 60.0)
        icv = self.icv_ml
        suvr = (self.suvr_base + 0.65 * _sig(1.2 * (s + 2.0)) if self.amyloid_positive
                else self.suvr_base + 0.03 * _sig(s))
        return {("hippocampus", "gm_volume"): 0.0026 * icv * ageing * (1 - 0.30 * _sig(s)),
                ("entorhinal", "gm_volume"): 0.0012 * icv * ageing * (1 - 0.35 * _sig(s + 0.5)),
                ("amygdala", "gm_volume"): 0.0011 * icv * ageing * (1 - 0.25 * _sig(s)),
                ("precuneus", "gm_volume"): 0.0085 * icv * ageing * (1 - 0.15 * _sig(s - 1.0)),
                ("lateral_occipital", "gm_volume"): 0.011 * icv * ageing,
                ("whole_brain", "brain_volume"): 0.80 * icv * (1 - 0.0025 * (age - 60.0)) * (1 - 0.06 * _sig(s)),
                ("whole_brain", "intracranial_volume"): np.full_like(days, icv),
                ("cortical_composite", "mean_suvr"): suvr}


@dataclass(frozen=True)
class CohortTruth:
    seed: int
    params: CohortParams
    patients: Mapping[str, PatientTruth]  # by pseudonym
    raw_scores: tuple[dict, ...]  # the score rows with raw IDs and real dates (what a site uploads)

    def scores_at(self, patient_id: str, days) -> dict[str, np.ndarray]:
        return self.patients[patient_id].expected_scores(days)

    def horizon_targets(self, patient_id: str, last_day: int, horizons_months, outputs) -> np.ndarray:
        """(H, O) true scores ``h`` months after ``last_day`` (days since the first session); NaN for an output
        the generator does not model."""
        days = last_day + np.asarray(horizons_months, float) * DAYS_PER_MONTH
        truth = self.scores_at(patient_id, days)
        return np.stack([truth.get(o, np.full(len(days), np.nan)) for o in outputs], axis=1)

    def raw_score_rows(self) -> list[dict]:
        return [dict(r) for r in self.raw_scores]

    def describe(self) -> dict:
        """JSON-ready summary (for a model's training record)."""
        return {"generator": "imaging_tasks.progression.cohort", "seed": self.seed, "patients": len(self.patients),
                "params": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.params).items()}}


def round_to(value: float, step: float) -> float:
    return round(round(value / step) * step, 4)


def as_scored(score: str, value: float) -> float:
    """A score value as its instrument reports it: clipped to the score's range, rounded to its step (MMSE whole
    points, CDR-SB half points, ADAS-Cog thirds)."""
    low, high = SCORE_RANGES[score]
    return round_to(float(np.clip(value, low, high)), SCORE_STEP[score])


def synthesize_cohort(n_patients: int = 200, seed: int = 0, params: CohortParams | None = None, *,
                      key: bytes = COHORT_KEY, specialty: str | None = None
                      ) -> tuple[list[dict], list[dict], CohortTruth]:
    """``(session rows, score rows, truth)`` of ``n_patients`` patients (module docstring), deterministic in
    ``seed``; different seeds give different patients (their raw IDs include the seed).  The session rows are
    the warehouse's of ``specialty`` (default: the one whose ROI features feed progression)."""
    from imaging_tasks.deid.pseudonym import date_shift_days, pseudo_id
    from imaging_tasks.deid.rules import shift_date
    from imaging_tasks.specialties import progression_specialty

    specialty = specialty or progression_specialty()

    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    p = params or CohortParams()
    if not (1 <= p.sessions[0] <= p.sessions[1] and 0 < p.visit_gap_days[0] <= p.visit_gap_days[1]):
        raise ValueError(f"bad CohortParams {p}: sessions must be 1 <= low <= high, visit gaps 0 < low <= high")
    rng = np.random.default_rng(seed)
    session_rows: list[dict] = []
    score_rows: list[dict] = []
    raw_scores: list[dict] = []
    truths: dict[str, PatientTruth] = {}
    for i in range(n_patients):
        raw_id = f"MRN{seed:04d}{i:05d}"
        pid, shift = pseudo_id(key, raw_id, "patient"), date_shift_days(key, raw_id)
        positive = bool(rng.random() < p.amyloid_positive_fraction)
        if positive:
            stage0 = rng.uniform(-2.5, 2.0)
            rate = float(np.exp(rng.normal(np.log(0.55), 0.45 * p.rate_spread)))
        else:
            stage0 = rng.uniform(-4.5, -1.0)
            rate = float(np.exp(rng.normal(np.log(0.08), 0.6 * p.rate_spread)))
        n = int(rng.integers(p.sessions[0], p.sessions[1] + 1))
        gaps = rng.integers(p.visit_gap_days[0], p.visit_gap_days[1] + 1, size=n - 1)
        days = np.concatenate([[0], np.cumsum(gaps)]).astype(int)
        real_first = dt.date(2008, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3650)))
        truth = PatientTruth(
            patient_id=pid, raw_id=raw_id, shift_days=shift,
            first_date=shift_date(real_first.strftime("%Y%m%d"), shift), amyloid_positive=positive,
            age0=float(rng.uniform(*p.age_years)), stage0=float(stage0), rate_per_year=rate,
            reserve=float(rng.normal()), mmse_deficit=float(rng.uniform(0.0, 2.5)),
            adas_base=float(rng.uniform(3.0, 10.0)), icv_ml=float(np.clip(rng.normal(1450, 140), 1100, 1850)),
            suvr_base=float(rng.uniform(0.95, 1.10)), score_noise=float(rng.uniform(0.6, 1.5) * p.score_noise),
            feature_noise=float(rng.uniform(0.6, 1.5) * p.feature_noise), session_days=tuple(int(d) for d in days))
        truths[pid] = truth
        measures = truth.expected_measures(days)
        for k, day in enumerate(days):
            real = real_first + dt.timedelta(days=int(day))
            study_id = pseudo_id(key, f"{raw_id}/{k}", "study")
            for roi, metric, unit in MEASURES:
                clean = float(measures[(roi, metric)][k])
                if metric == "mean_suvr":
                    value = clean + rng.normal(0.0, 0.03 * truth.feature_noise)
                else:
                    sd = _REGION_SD.get(roi, 0.005 if metric == "intracranial_volume" else 0.008)
                    value = clean * (1.0 + rng.normal(0.0, sd * truth.feature_noise))
                session_rows.append({"specialty": specialty, "patient_id": pid, "study_id": study_id,
                                     "study_date": shift_date(real.strftime("%Y%m%d"), shift), "atlas": ATLAS,
                                     "roi": roi, "metric": metric, "value": round(float(value), 5), "unit": unit})
            visit = real + dt.timedelta(days=int(rng.integers(-14, 31)))
            visit_day = day + (visit - real).days
            expected = truth.expected_scores([visit_day])
            for score in SCORES:
                observed = expected[score][0] + rng.normal(0.0, SCORE_SD[score] * truth.score_noise)
                if k > 0 and rng.random() < p.missing_score_fraction:
                    continue
                value = as_scored(score, observed)
                raw_scores.append({"patient_id": raw_id, "date": visit.isoformat(), "score": score, "value": value})
                score_rows.append({"patient_id": pid, "date": shift_date(visit.strftime("%Y%m%d"), shift),
                                   "score": score, "value": value})
    return session_rows, score_rows, CohortTruth(seed, p, truths, tuple(raw_scores))


__all__ = ["ATLAS", "COHORT_KEY", "MEASURES", "FEATURES", "SCORES", "CohortParams", "PatientTruth", "CohortTruth",
           "synthesize_cohort"]
