"""The trigger form of every imaging DAG: submittable as it stands, validated while one types.

Every field has a title with its unit, bounds and enums live in the JSON schema (the UI checks them as one
types, the API refuses what breaks them), optional fields are typed optional (``["null", ...]``: an empty
``type="string"`` field is *required* in the form and blocks the Trigger button), and the defaults are what
the nightly schedule uses.  Sections group the fields; a specialty adds its own section.
"""
from __future__ import annotations

from airflow.sdk import Param

INPUTS = "Which inputs"
UPLOADS = "Upload detection"

WINDOW_DISPLAY = {
    "auto": "auto: the data interval for scheduled and backfill runs, everything for manual runs",
    "interval": "interval: only what arrived in this run's data interval",
    "all": "all: everything under the prefix not yet done",
}


def pipeline_params(**extra: Param) -> dict[str, Param]:
    """The common Params, then the specialty's (``extra``); defaults are the nightly run's."""
    return {
        "prefix": Param(None, type=["null", "string"], maxLength=1024, pattern=r"^(?!.*\.\.)[^\\]*$",
                        title="Landing sub-prefix (optional)",
                        description="Only inputs under this sub-folder of the specialty's landing bucket, e.g. "
                                    "site-a/2026-03. Leave empty for the whole bucket.",
                        section=INPUTS),
        "window": Param("auto", type="string", enum=list(WINDOW_DISPLAY), values_display=WINDOW_DISPLAY,
                        title="Arrival window",
                        description="Which arrivals this run takes: by data interval, or everything not yet done.",
                        section=INPUTS),
        "reprocess": Param(False, type="boolean", title="Reprocess published studies",
                           description="Redo studies whose results are already published (their warehouse rows "
                                       "are replaced, never duplicated).",
                           section=INPUTS),
        "landing_quiet_seconds": Param(None, type=["null", "integer"], minimum=0, maximum=86_400,
                                       title="Upload quiet period (seconds, optional)",
                                       description="An upload counts as finished after this many seconds without a "
                                                   "new object. Empty: the [imaging] landing_quiet_seconds setting "
                                                   "(default 120 s).",
                                       section=UPLOADS),
        **extra,
    }


def neuroimaging_params() -> dict[str, Param]:
    return pipeline_params(
        mr_only_wait_hours=Param(6.0, type="number", minimum=0, maximum=168,
                                 title="MR-only wait (hours)",
                                 description="A session with MR but no PET yet is processed MR-only once nothing "
                                             "new arrived for this many hours (0-168).",
                                 section="Neuroimaging"))


def pathology_params() -> dict[str, Param]:
    return pipeline_params(
        target_mpp=Param(1.0, type="number", minimum=0.1, maximum=16,
                         title="Target resolution (µm per pixel)",
                         description="Tiles are read at this resolution: 0.25 ≈ 40x, 0.5 ≈ 20x, 1.0 ≈ 10x "
                                     "(0.1-16 µm/px).",
                         section="Pathology tiling"),
        tile_px=Param(256, type="integer", minimum=32, maximum=2048,
                      title="Tile size (pixels)",
                      description="Edge of a square tile at the target resolution (32-2048 px).",
                      section="Pathology tiling"))


def run_option(params, name: str, default):
    """A Param's value at run time; a missing or empty (None) value falls back to the nightly default."""
    value = (params or {}).get(name)
    return default if value is None or value == "" else value


# Params that change a study's results, with their nightly defaults: a study loaded with other values is due again.
PROCESSING_DEFAULTS = {"target_mpp": 1.0, "tile_px": 256}


def processing_options(params) -> dict:
    """The run's result-changing options that differ from the defaults (so a default run, from the DAG or the
    CLI, hashes the same)."""
    return {k: params[k] for k, default in PROCESSING_DEFAULTS.items()
            if (params or {}).get(k) is not None and params[k] != default}
