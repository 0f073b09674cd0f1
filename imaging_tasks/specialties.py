"""Where each specialty's synthesis and processing live; imported lazily so nothing heavy loads early."""
from __future__ import annotations

import importlib
from typing import Callable

PROCESSORS = {
    "neuroimaging": "imaging_tasks.neuro",
    "cardiovascular": "imaging_tasks.cardio",
    "pathology": "imaging_tasks.pathology",
    "mammography": "imaging_tasks.mammo",
}
SPECIALTIES = tuple(PROCESSORS)


def _check(specialty: str) -> None:
    if specialty not in PROCESSORS:
        raise ValueError(f"unknown specialty {specialty!r}; choose one of {', '.join(SPECIALTIES)}")


def processor(specialty: str) -> Callable:
    """The specialty's ``process_study(files, out_dir, *, device=None, **options)``."""
    _check(specialty)
    return importlib.import_module(PROCESSORS[specialty]).process_study


def synthesizer(specialty: str) -> Callable:
    """The specialty's ``synthesize(out, studies, seed, **size_options)``."""
    _check(specialty)
    return importlib.import_module(f"imaging_tasks.synth.{specialty}").synthesize
