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
        "batch_size": Param(None, type=["null", "integer"], minimum=1, maximum=1000,
                            title="Studies per task instance (optional)",
                            description="Each mapped step runs over batches of this many studies; each study keeps "
                                        "its own outcome and a retry redoes only the failed ones. Empty: the "
                                        "[imaging] batch_size setting, else 32 (1 for neuroimaging sessions and "
                                        "slides) spread over at least 8 instances. Large nights grow batches so a "
                                        "step maps at most 250 instances.",
                            section=INPUTS),
        **extra,
    }


def specialty_params(specialty: str) -> dict[str, Param]:
    """The common Params, then the specialty's options from its record, in a section of their own: the same
    schema the CLI's flags and the library's keyword arguments come from."""
    from imaging_tasks.specialties import get

    record = get(specialty)
    extra = {}
    for o in record.options:
        schema = {k: v for k, v in (("minimum", o.minimum), ("maximum", o.maximum)) if v is not None}
        if o.enum is not None:
            schema["enum"] = list(o.enum)
        section = {"process": "processing", "deidentify": "de-identification"}.get(o.stage, "inputs")
        # an option without a default is optional: typed nullable, else the form calls it required
        description = o.description + (f" Empty: the Airflow Variable {o.variable}, if set." if o.variable else "")
        extra[o.name] = Param(o.default, type=o.type if o.default is not None else ["null", o.type], title=o.title,
                              description=description, section=f"{record.title} {section}", **schema)
    return pipeline_params(**extra)


def run_options(specialty: str, params, *, variable=None) -> dict:
    """The run's values of the specialty's options (what the library steps take as ``options``).

    An option the run leaves empty takes its Variable's value where the record names one (``Option.variable``,
    e.g. a site's model URI), read here, inside the task, never at parse time; ``variable(name)`` reads it
    (default: ``airflow.sdk.Variable``)."""
    from imaging_tasks.specialties import get

    out = {}
    for o in get(specialty).options:
        value = (params or {}).get(o.name)
        if value in (None, "") and o.variable:
            value = (variable or _task_variable)(o.variable)
        if value not in (None, ""):
            out[o.name] = value
    return out


def _task_variable(name: str):
    from airflow.sdk import Variable

    return Variable.get(name, default=None)
