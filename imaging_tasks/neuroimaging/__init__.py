"""Neuroimaging: T1 MRI (+ PET) sessions: N4 bias correction, brain extraction, brain and intracranial volume.

Steps: :mod:`.structural`.  Synthetic sessions with known anatomy and bias field: :mod:`.synth`.  A session is
ready with MR and PET, or MR alone once nothing new arrived for ``mr_only_wait_hours`` (:func:`session_ready`).
Light: read at DAG parse time.
"""
from __future__ import annotations

import datetime as dt

from imaging_tasks.specialty import Option, Specialty, Step


def session_ready(modalities: dict[str, int], newest: str | None, now: dt.datetime | None, options: dict) -> bool:
    """MR and PET together, or MR alone once nothing new has arrived for ``mr_only_wait_hours``."""
    if "MR" in modalities and "PT" in modalities:
        return True
    if "MR" not in modalities or newest is None:
        return False
    now = now or dt.datetime.now(dt.timezone.utc)
    return now - dt.datetime.fromisoformat(newest) >= dt.timedelta(hours=float(options["mr_only_wait_hours"]))


SPECIALTY = Specialty(
    name="neuroimaging",
    order=0,
    title="Neuroimaging",
    summary="MRI/PET sessions: N4, brain extraction, brain and intracranial volume",
    file_kind="dicom",
    modalities=frozenset({"MR", "PT"}),
    steps=(Step("process_study", "imaging_tasks.neuroimaging.structural:process_study", gpu=True,
                description="N4 bias correction, brain and intracranial masks, volumes"),),
    options=(
        Option("mr_only_wait_hours", "number", 6.0, "MR-only wait (hours)",
               "A session with MR but no PET yet is processed MR-only once nothing new arrived for this many "
               "hours (0-168)", minimum=0, maximum=168, stage="index", affects_results=False),
        Option("n4_shrink", "integer", 2, "N4 shrink factor",
               "N4 bias correction runs on the image shrunk by this factor (1-8; larger is faster, coarser)",
               minimum=1, maximum=8),
    ),
    synthesizer="imaging_tasks.neuroimaging.synth:synthesize",
    ready="imaging_tasks.neuroimaging:session_ready",
    results="`results` holds `brain_volume_ml`, `intracranial_volume_ml`, `brain_fraction` and bias-field figures "
            "per session.",
    bad_modality="CT",
)
