"""Progression prediction: from a patient's imaging sessions (ROI features over time) and cognitive scores
(MMSE, CDR-SB, ADAS-Cog), a sequence model predicts the scores 6, 12, 18, 24 and 36 months after the last session.

Modules, each importing only those before it: ``features`` (warehouse-shaped rows -> per-patient sequences, the
feature vector a model contract names, pseudonymised score uploads), ``cohort`` (a synthetic cohort with known
truth), ``baselines`` (last value carried forward, per-patient linear fit), ``model`` (the bring-your-own
contract: TorchScript/torch.export archive + JSON, loading, ``predict``), ``train`` (the reference LSTM trainer
and the held-out evaluation against the baselines; imports torch at module level, so it is not imported here).
"""
from .baselines import predict_baseline
from .cohort import CohortParams, CohortTruth, synthesize_cohort
from .features import (NotEnoughSessions, PatientSequence, build_sequences, feature_matrix, longitudinal_table,
                       pseudonymise_scores, read_scores_upload)
from .model import ProgressionSpec, load_progression_model, parse_contract, predict, predict_many

__all__ = ["predict_baseline", "CohortParams", "CohortTruth", "synthesize_cohort", "NotEnoughSessions",
           "PatientSequence", "build_sequences", "feature_matrix", "longitudinal_table", "pseudonymise_scores",
           "read_scores_upload", "ProgressionSpec", "load_progression_model", "parse_contract", "predict",
           "predict_many"]
