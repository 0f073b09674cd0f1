"""Which arrivals a run is about: the data interval for scheduled and backfill runs, everything otherwise.

Param ``window``: ``auto`` (the default: interval for scheduled/backfill runs, all for manual and
asset-triggered runs), ``interval`` or ``all``.
"""
from __future__ import annotations

import datetime as dt


def run_window(context) -> tuple[dt.datetime | None, dt.datetime | None]:
    choice = context["params"].get("window", "auto")
    run_type = str(getattr(context["dag_run"], "run_type", "manual")).lower()
    if choice == "all" or (choice == "auto" and not any(t in run_type for t in ("scheduled", "backfill"))):
        return None, None
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is None or end is None or start == end:
        return None, None
    return start, end
