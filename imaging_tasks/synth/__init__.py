"""Synthetic studies with realistic PHI and known ground truth."""
