"""Text sidecars of numbers and condition names: BIDS events tables (``events.tsv``) and FSL gradient files
(``.bval``, ``.bvec``), de-identified by rebuilding them from what they are allowed to hold.

Like the JSON sidecars (``deid.sidecar``) this is an allow-list: an events table keeps the columns a first-level
GLM reads (``onset``, ``duration``, ``trial_type``, ``modulation``) and drops every other column (``response``
columns, free-text notes, stimulus file names that may carry a name); numbers must parse as finite numbers
(``n/a`` is BIDS for missing), condition names must be short codes.  A gradient file must be numbers only.  The
output is written anew from the parsed values, so nothing of the input's bytes (comments, odd encodings,
trailing text) passes through.  What does not parse is refused with a reason; the session then misses that file
and its processing says so.
"""
from __future__ import annotations

import csv
import io
import math
import re

from imaging_tasks.errors import BadInput

EVENT_COLUMNS = ("onset", "duration", "trial_type", "modulation")
NUMERIC_COLUMNS = ("onset", "duration", "modulation")
_CODE = re.compile(r"[A-Za-z0-9_+\-./:()\[\] ]{1,64}")
MAX_BYTES = 4 << 20  # events tables and gradient files are kilobytes


def _text(data: bytes, what: str, reason: str) -> str:
    if len(data) > MAX_BYTES:
        raise BadInput(reason, f"the {what} is {len(data) >> 20} MiB, far larger than any real one; re-export it")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInput(reason, f"the {what} is not UTF-8 text; re-export it as plain text") from None


def _finite(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def deidentify_events(data: bytes) -> tuple[bytes, dict]:
    """The events table rebuilt from its allowed columns; ``info`` lists the kept and dropped column names."""
    text = _text(data, "events table", "events_unreadable")
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise BadInput("events_empty", "the events table is empty; it needs a header line (onset, duration, "
                       "trial_type) and one line per event")
    header = [c.strip().lower() for c in rows[0]]
    kept = [c for c in EVENT_COLUMNS if c in header]
    if "onset" not in kept or "duration" not in kept:
        raise BadInput("events_columns", "the events table has no onset and duration columns (BIDS events.tsv: "
                       "tab-separated, header onset, duration, trial_type); fix its header line")
    at = {c: header.index(c) for c in kept}
    out = io.StringIO()
    out.write("\t".join(kept) + "\n")
    for n, row in enumerate(rows[1:], start=2):
        cells = []
        for c in kept:
            cell = row[at[c]].strip() if at[c] < len(row) else "n/a"
            if c in NUMERIC_COLUMNS and cell != "n/a":
                value = _finite(cell)
                if value is None:
                    raise BadInput("events_values", f"line {n} of the events table: column {c} is not a number; "
                                   "onsets and durations are seconds from the first volume")
                cell = repr(value)
            elif c == "trial_type" and not _CODE.fullmatch(cell):
                raise BadInput("events_values", f"line {n} of the events table: trial_type is not a short condition "
                               "name (letters, digits, _-.: up to 64 characters); rename the condition")
            cells.append(cell)
        out.write("\t".join(cells) + "\n")
    dropped = sorted(set(header) - set(kept))
    return out.getvalue().encode(), {"kept": kept, "dropped": dropped, "n_events": len(rows) - 1}


def deidentify_gradients(data: bytes, kind: str) -> tuple[bytes, dict]:
    """An FSL ``.bval`` or ``.bvec`` file rebuilt from its numbers, line by line."""
    what = {"bval": "b-value file (.bval)", "bvec": "gradient direction file (.bvec)"}[kind]
    text = _text(data, what, "dwi_gradients_unreadable")
    lines = []
    for line in text.splitlines():
        tokens = line.replace(",", " ").split()
        if not tokens:
            continue
        values = [_finite(t) for t in tokens]
        if any(v is None for v in values):
            raise BadInput("dwi_gradients_unreadable", f"the {what} holds something other than numbers; FSL "
                           "format is whitespace-separated numbers only (dcm2niix writes it)")
        lines.append(" ".join(format(v, ".10g") for v in values))
    if not lines:
        raise BadInput("dwi_gradients_unreadable", f"the {what} is empty; re-export the DWI with its gradients")
    return ("\n".join(lines) + "\n").encode(), {"lines": len(lines), "values": sum(len(x.split()) for x in lines)}
