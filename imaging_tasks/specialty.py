"""What a specialty is, as data: the one record generic code (index, pipeline, CLI, demo, Airflow glue) reads.

A specialty lives in one package, ``imaging_tasks/<name>/`` (or any installed package, see
:mod:`imaging_tasks.specialties`), whose ``__init__`` defines ``SPECIALTY = Specialty(...)``: accepted inputs, how
files group into a study and when a study is ready, its ordered processing steps, its options (one schema that
becomes the DAG's Params, the CLI's flags and the library's keyword arguments alike), what it writes, and where its
synthetic data with ground truth comes from.  The record names functions as ``"module:attribute"`` strings, so
reading it (at DAG parse time) imports nothing heavy.
"""
from __future__ import annotations

import datetime as dt
import importlib
from dataclasses import dataclass
from typing import Any, Callable

FILE_KINDS = ("dicom", "slide")


# A sidecar file's kind by its suffix (``<stem>.json`` is taken for every NIfTI stem; the others only where the
# record's ``upload_sidecars`` names them).
SIDECAR_KINDS = {".json": "sidecar", ".tsv": "events", ".bval": "bval", ".bvec": "bvec"}


def load_callable(ref: str) -> Callable:
    """``"package.module:attribute"`` -> the attribute (imported on first use, not when the record is read)."""
    module, _, attribute = ref.partition(":")
    if not module or not attribute:
        raise ValueError(f"{ref!r} is not a 'module:attribute' reference")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Option:
    """One processing or indexing option, with its type, default, bounds and meaning (units in the title)."""

    name: str
    type: str  # "number" | "integer" | "boolean" | "string"
    default: Any
    title: str
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple | None = None
    stage: str = "process"  # "process": passed to the steps; "index": used to decide when a study is ready;
    #                         "deidentify": a PS3.15 option of the de-identifier (a ``DeidOptions`` field)
    affects_results: bool = True  # part of the options hash: a study loaded with other values is due again
    variable: str | None = None  # an Airflow Variable that supplies the value when the run leaves it empty (a
    #                              site-wide setting such as a model URI; the run's Param still wins)

    def check(self, value: Any) -> Any:
        """The value, converted to the option's type, or a ValueError saying what is allowed."""
        if value is None:
            return self.default
        try:
            value = {"number": float, "integer": int, "boolean": _boolean, "string": str}[self.type](value)
        except (TypeError, ValueError):
            raise ValueError(f"option {self.name}: {value!r} is not a{'n' if self.type[0] in 'ai' else ''} "
                             f"{self.type}") from None
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"option {self.name}: {value} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"option {self.name}: {value} is above the maximum {self.maximum}")
        if self.enum is not None and value not in self.enum:
            raise ValueError(f"option {self.name}: {value!r} is not one of {', '.join(map(str, self.enum))}")
        return value


def _boolean(value: Any) -> bool:
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(value)
    return bool(value)


@dataclass(frozen=True)
class Step:
    """One processing step: ``function(files, out_dir, *, device=None, **options) -> {"metrics", "findings",
    "outputs"}`` on the study's de-identified files; its task id is ``name``; ``gpu`` routes it to the GPU
    queue and pool."""

    name: str
    function: str  # "module:attribute"
    gpu: bool = True
    description: str = ""


@dataclass(frozen=True)
class Specialty:
    name: str
    title: str
    summary: str
    file_kind: str  # "dicom": DICOM files grouped by StudyInstanceUID; "slide": one whole-slide file per study
    modalities: frozenset = frozenset()  # accepted DICOM modalities; anything else is quarantined
    steps: tuple[Step, ...] = ()
    options: tuple[Option, ...] = ()
    synthesizer: str = ""  # "module:attribute": synthesize(out, studies, seed, **size_options) -> [truth paths]
    ready: str | None = None  # "module:attribute": ready(modalities: dict, newest: datetime, now, options) -> bool
    results: str = ""  # what the warehouse holds for it (doc text)
    bad_modality: str = "CT"  # a modality it refuses (synthetic bad inputs)
    fan_out: str | None = None  # module with plan_slide / slide_features / finish_slide: the DAG runs them as one
    #                             mapped task group per study (plan_tiles -> tile_features -> finish_slide)
    batch_size: int | None = None  # studies per mapped task instance when the run and setting do not say (None:
    #   imaging_tasks.batches.DEFAULT_BATCH_SIZE); 1 for studies whose steps take minutes
    order: int = 100  # position in listings; ``imaging-tasks synth`` seeds it with seed + 1000 x order
    nifti_uploads: dict | None = None  # NIfTI file stem -> modality (e.g. {"mri": "MR", "pet": "PT"}): a DICOM
    #   specialty that also takes NIfTI uploads laid out as <patient>/<session>/<stem>.nii[.gz] (+ <stem>.json
    #   sidecars) under its landing folder; each patient/session folder is one study (see imaging_tasks.index)
    upload_sidecars: dict | None = None  # further sidecar file name -> the NIfTI stem it belongs to, e.g.
    #   {"events.tsv": "bold", "dwi.bval": "dwi"}; its kind is its suffix (tsv events, bval, bvec).  An events
    #   table may also sit beside the DICOM files of one study (a DICOM BOLD series): the index attaches it there.
    progression: bool = False  # its sessions' ROI features (warehouse roi_features) feed the progression model
    #   (imaging_tasks.progression): longitudinal tables, predictions
    receives: tuple = ()  # what the DICOM receiver routes here by default: rules like {"modality": ["CT"]} or
    #   {"modality": ["MG"], "sop_class": ["1.2.840..."]} (imaging_tasks.edge.routing: a rule naming SOP classes is
    #   tried before modality-only ones).  A modality two specialties take is claimed by one; the other gets it
    #   through a site's routes file (by calling AE title).

    def __post_init__(self):
        if self.file_kind not in FILE_KINDS:
            raise ValueError(f"specialty {self.name}: file_kind must be one of {FILE_KINDS}")
        if self.file_kind == "dicom" and not self.modalities:
            raise ValueError(f"specialty {self.name}: a DICOM specialty must accept at least one modality")
        if self.nifti_uploads is not None:
            if self.file_kind != "dicom":
                raise ValueError(f"specialty {self.name}: NIfTI uploads need file_kind 'dicom' (series grouping)")
            bad = {s: m for s, m in self.nifti_uploads.items()
                   if m not in self.modalities or not s or not s.replace("_", "").isalnum() or s != s.lower()}
            if bad:
                raise ValueError(f"specialty {self.name}: nifti_uploads {bad} must map lower-case file stems to "
                                 f"accepted modalities ({', '.join(sorted(self.modalities))})")
        for name, stem in (self.upload_sidecars or {}).items():
            if stem not in (self.nifti_uploads or {}) or name != name.lower() or \
                    not name.endswith(tuple(SIDECAR_KINDS)):
                raise ValueError(f"specialty {self.name}: upload_sidecars {name!r} -> {stem!r} must name a lower-case "
                                 f"file ending in {', '.join(SIDECAR_KINDS)} and one of the nifti_uploads stems")

    def __hash__(self) -> int:  # a frozen record holding a dict: hashed by name (one record per name)
        return hash(self.name)

    # ------------------------------------------------------------------ options
    def options_for(self, values: dict | None, stage: str = "process") -> dict[str, Any]:
        """Checked values of the options of ``stage`` (defaults where a value is missing or None)."""
        values = values or {}
        return {o.name: o.check(values.get(o.name)) for o in self.options if o.stage == stage}

    def result_options(self, values: dict | None) -> dict[str, Any]:
        """The result-changing options that differ from their defaults (a default run hashes the same anywhere)."""
        values = values or {}
        out = {}
        for o in self.options:
            if o.affects_results and values.get(o.name) is not None:
                value = o.check(values[o.name])
                if value != o.default:
                    out[o.name] = value
        return out

    # ------------------------------------------------------------------ behaviour
    def is_ready(self, modalities: dict[str, int], newest: str | None, now: dt.datetime | None,
                 options: dict | None = None) -> bool:
        if self.ready is None:
            return True
        return load_callable(self.ready)(modalities, newest, now, self.options_for(options, "index"))

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"specialty {self.name} has no step {name!r}; steps: {[s.name for s in self.steps]}")

    def step_call(self, name: str, options: dict | None) -> tuple[int, Callable, dict[str, Any]]:
        """Step ``name``'s position in the chain, its function, and the keyword arguments it takes from the
        process-stage ``options`` (checked, defaults filled; all of them when it accepts ``**options``)."""
        import inspect

        index = [s.name for s in self.steps].index(self.step(name).name)
        fn = load_callable(self.steps[index].function)
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        return index, fn, {k: v for k, v in self.options_for(options, "process").items() if takes_all or k in params}

    def fan_out_step(self, name: str) -> Callable:
        """One function of the fan-out module (``plan_slide``, ``slide_features``, ``finish_slide``); a specialty
        without a fan-out has none."""
        if not self.fan_out:
            raise ValueError(f"specialty {self.name} has no tile fan-out; its steps are {[s.name for s in self.steps]}")
        return load_callable(f"{self.fan_out}:{name}")

    def synthesize(self, out, studies: int, seed: int, **size_options):
        return load_callable(self.synthesizer)(out, studies, seed, **size_options)
