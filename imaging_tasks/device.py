"""Pick the torch device once: CUDA where present, else CPU, overridable for tests and pinning."""
from __future__ import annotations

import os


def pick_device(prefer: str | None = None):
    """Return a ``torch.device``; ``prefer`` (or ``IMAGING_DEVICE``) may force ``cpu`` or ``cuda:N``; a
    ``torch.device`` is returned as it is."""
    import torch

    if isinstance(prefer, torch.device):  # already picked (a step hands its device on to the maths)
        return prefer
    choice = prefer or os.environ.get("IMAGING_DEVICE") or "auto"
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {choice!r} requested but CUDA is not available; set IMAGING_DEVICE=auto or cpu")
    return torch.device(choice)
