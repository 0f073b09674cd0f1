"""Errors that send an input to quarantine rather than failing the run."""
from __future__ import annotations


class BadInput(Exception):
    """An input that cannot be processed; the pipeline quarantines it with ``reason`` and goes on.

    ``reason`` is a short stable code (e.g. ``not_dicom``, ``truncated``, ``wrong_modality``) for the
    warehouse; ``message`` says what was wrong and what to do.  Neither may contain PHI.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
