"""The registry of specialties: every installed package that declares one, the built-in ones included.

The built-in specialties (``imaging_tasks/<name>/``) are declared in this project's ``pyproject.toml`` exactly as
an outside package declares its own, so a hospital adds a specialty without forking: a package whose
distribution declares the entry point ::

    [project.entry-points."imaging_tasks.specialties"]
    dermatology = "derm_imaging:SPECIALTY"

pointing at an :class:`imaging_tasks.specialty.Specialty`; it then has a DAG file like the built-in ones (see the
README, "Adding a specialty").  Reading the registry imports only the records (light by contract).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from imaging_tasks.errors import ConfigError
from imaging_tasks.specialty import Specialty, load_callable

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "imaging_tasks.specialties"


@lru_cache(maxsize=1)
def _registry() -> dict[str, Specialty]:
    found: dict[str, Specialty] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=_built_in_first):
        try:
            record = ep.load()
        except Exception as exc:  # one broken plug-in must not take the built-in specialties down
            log.error("specialty entry point %s (%s) could not be loaded: %s: %s", ep.name, ep.value,
                      type(exc).__name__, exc)
            continue
        if not isinstance(record, Specialty):
            log.error("specialty entry point %s (%s) is not a Specialty record; ignored", ep.name, ep.value)
            continue
        if record.name in found and found[record.name] is not record:
            log.error("specialty %s from entry point %s clashes with one already registered; ignored", record.name,
                      ep.value)
            continue
        found[record.name] = record
    found = dict(sorted(found.items(), key=lambda item: (item[1].order, item[0])))
    if not found:
        raise ConfigError(f"no specialty is registered (entry point group {ENTRY_POINT_GROUP!r}): install the project "
                          "(`pip install -e .`, which `make install` does) so its built-in specialties are found")
    return found


def _built_in_first(ep) -> tuple:
    return (not ep.value.startswith("imaging_tasks."), ep.name)


def refresh() -> None:
    """Forget what was found (after installing a package at run time, in tests)."""
    _registry.cache_clear()


def names() -> tuple[str, ...]:
    return tuple(_registry())


def get(name: str) -> Specialty:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown specialty {name!r}; choose one of {', '.join(registry)} (or install a package "
                         f"declaring one under the entry point group {ENTRY_POINT_GROUP!r})")
    return registry[name]


def progression_specialty() -> str:
    """The installed specialty whose record says its ROI features feed progression (``progression=True``):
    the sessions and the warehouse asset the progression model and DAG read."""
    chosen = [n for n in names() if get(n).progression]
    if len(chosen) != 1:
        from imaging_tasks.errors import ConfigError

        raise ConfigError(f"progression needs exactly one installed specialty with progression=True in its record, "
                          f"found {chosen or 'none'}: set it in one record (imaging_tasks.specialty.Specialty)")
    return chosen[0]


def run_steps(specialty: str, files: list[Path], out: Path, *, device: str | None = None, step: str | None = None,
              options: dict | None = None) -> dict:
    """Run the specialty's steps on local files (the CLI's ``process``), without a lake: each step but the last
    writes to ``out/<step>/``, the last to ``out``; ``step`` runs one step, reading the earlier ones' folders.

    ``options``: values of the process-stage options (checked; missing ones take their defaults); each step gets
    those its function accepts.  Returns the merged metrics, findings and tables of the steps run, and every
    output path relative to ``out``.
    """
    record = get(specialty)
    order = [s.name for s in record.steps]
    chosen = order if step is None else [record.step(step).name]
    merged: dict = {"metrics": [], "findings": [], "outputs": [], "tables": {}}
    for name in chosen:
        index, fn, kwargs = record.step_call(name, options)
        last = index == len(order) - 1
        step_out = Path(out) if last else Path(out) / name
        step_out.mkdir(parents=True, exist_ok=True)
        if index:
            kwargs["previous"] = {earlier: Path(out) / earlier for earlier in order[:index]}
        result = fn(list(files), step_out, device=device, **kwargs)
        merged["metrics"] += result.get("metrics", [])
        merged["findings"] += result.get("findings", [])
        merged["outputs"] += [o if last else f"{name}/{o}" for o in result.get("outputs", [])]
        for table, rows in (result.get("tables") or {}).items():
            merged["tables"].setdefault(table, []).extend(rows)
    return merged


def synthesizer(specialty: str) -> Callable:
    """The specialty's ``synthesize(out, studies, seed, **size_options)``."""
    return load_callable(get(specialty).synthesizer)
