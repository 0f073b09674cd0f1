"""The two kinds of failure the pipeline tells apart.

``BadInput``: one input cannot be processed; it is quarantined with a reason and the others go on.
``ConfigError``: the deployment is misconfigured (no key, unknown bucket, bad warehouse URI); retrying cannot
help, so tasks fail once, at once, with what to do.
"""
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


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the setting and how to fix it (never a secret)."""
