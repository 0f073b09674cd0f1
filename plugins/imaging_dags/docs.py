"""The ``doc_md`` every imaging DAG shows in the UI: what it does, its Params, its outputs, how to re-run.

Built from the DAG file's own docstring and its Params, so the page never drifts from the code.
"""
from __future__ import annotations

from airflow.sdk import Param


def _param_rows(params: dict[str, Param]) -> str:
    rows = ["| Param | default (nightly) | meaning |", "|---|---|---|"]
    for name, p in params.items():
        schema = getattr(p, "schema", {}) or {}
        default = getattr(p, "value", None)
        shown = "empty" if default is None else f"`{default}`"
        meaning = (schema.get("title") or name) + (": " + p.description if getattr(p, "description", None) else "")
        rows.append(f"| `{name}` | {shown} | {meaning.replace('|', '/')} |")
    return "\n".join(rows)


def dag_doc(specialty: str, summary: str, params: dict[str, Param], outputs: str) -> str:
    """Markdown for ``doc_md``; ``summary`` is the DAG file's docstring, ``outputs`` its specialty's results."""
    return f"""{summary.strip()}

### Params
Every field can be left as it is: the defaults are what the nightly run uses.

{_param_rows(params)}

### Outputs
- **Results and QC pictures**: the *Imaging QC* pages (*Imaging QC* in the navigation bar, the *Imaging QC*
  tab of a run, or the *Study QC* link of each mapped study task), read from the lake.
- **Lake**: `derived/{specialty}/<patient P…>/<study S…>/` holds `results.json`, QC PNGs, tables and
  `_MANIFEST.json` (written last); `anonymized/{specialty}/…` the de-identified copies; `quarantine/{specialty}/…`
  what was refused, with `reason.json`.
- **Warehouse** (DuckDB by default, BigQuery in production): tables `studies`, `series`, `instances`, `results`,
  `findings`, `quarantine`, `processing_runs`; {outputs}
- **Asset** `imaging_{specialty}_warehouse`: an event per run that loaded rows, with counts and URIs in `extra`.

### Running it
- **Nightly**: at the `[imaging] schedule` cron (default 02:00 UTC) a run takes what arrived in its data interval;
  an interval with nothing in it ends at once (skipped), never blocking a manual run.
- **From the UI**: *Trigger* with the defaults processes everything under the landing bucket not yet done.
  Tick *Reprocess published studies* to redo studies whose results exist (rows are replaced, never duplicated).
- **Backfill** from the CLI: `airflow backfill create --dag-id {specialty} --from-date 2026-03-01 --to-date 2026-03-07`
  (add `--dag-run-conf '{{"reprocess": true}}'` to redo studies already done).
- **Without Airflow**: `imaging-tasks run {specialty} --landing <folder> --lake <folder> --warehouse <file.duckdb>`.
- Configuration errors (no de-identification key, unknown bucket, bad warehouse URI) fail once, without retries,
  with what to set; one bad input is quarantined with a reason and the other studies go on.
"""
