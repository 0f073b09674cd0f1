"""Which specialty an incoming instance belongs to: an ordered table of rules, the first match wins.

A rule matches on any of Modality, SOP Class UID and the calling AE title (each optional; a rule without any
matches everything); what it names is a specialty's landing folder.  The built-in table is made of what each
specialty's record says it ``receives`` (rules naming SOP classes first); for the four built-in ones:

====================================================================  ===============
rule                                                                  specialty
====================================================================  ===============
SOP class VL Whole Slide Microscopy, or Modality SM                   pathology
Modality MG or DX with a mammography SOP class (Digital Mammography   mammography
For Presentation / For Processing, Breast Tomosynthesis, Breast
Projection For Presentation / For Processing); any other MG
Modality CT (CT, Enhanced CT, ...)                                    cardiovascular
Modality MR, PT                                                       neuroimaging
====================================================================  ===============

Cardiac MR (cine, phase contrast) looks like any MR in its header; a site sends it to cardiovascular with a
calling-AE rule placed first (the cardiac scanner's or the cardiology PACS's AE title), in a routes file.

A routes file (``--routes FILE``) replaces the whole table: a JSON list of objects with the keys ``modality``,
``sop_class``, ``calling_ae`` (each a string or a list of strings), ``specialty`` (required) and an optional
``comment``.  Modalities match case-insensitively; SOP classes are dotted UIDs or pynetdicom/pydicom names
(``CTImageStorage``); AE titles are ``fnmatch`` patterns (``CARDIO_*``).  It is checked when it is loaded: an
unknown key or specialty, an empty list, an unknown SOP class name is a ConfigError naming the rule.

An instance no rule matches is refused (see :mod:`imaging_tasks.edge.scp` for the status).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from imaging_tasks.errors import ConfigError

KEYS = ("modality", "sop_class", "calling_ae", "specialty", "comment")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class Rule:
    specialty: str
    modality: tuple[str, ...] = ()  # upper case; empty: any
    sop_class: tuple[str, ...] = ()  # dotted UIDs; empty: any
    calling_ae: tuple[str, ...] = ()  # fnmatch patterns; empty: any
    comment: str = ""

    def matches(self, modality: str | None, sop_class: str | None, calling_ae: str | None) -> bool:
        if self.modality and (modality or "").strip().upper() not in self.modality:
            return False
        if self.sop_class and (sop_class or "").strip() not in self.sop_class:
            return False
        if self.calling_ae:
            ae = (calling_ae or "").strip()
            if not any(fnmatchcase(ae, pattern) for pattern in self.calling_ae):
                return False
        return True

    def describe(self) -> str:
        parts = [f"{name}={'|'.join(values)}" for name, values in
                 (("calling_ae", self.calling_ae), ("modality", self.modality), ("sop_class", self.sop_class))
                 if values]
        return f"{' '.join(parts) or 'any instance'} -> {self.specialty}"


@dataclass(frozen=True)
class RoutingTable:
    rules: tuple[Rule, ...]
    source: str = "built-in table"

    def route(self, modality: str | None, sop_class: str | None, calling_ae: str | None) -> str | None:
        """The specialty of the first matching rule, None when none matches (the instance is refused)."""
        for rule in self.rules:
            if rule.matches(modality, sop_class, calling_ae):
                return rule.specialty
        return None

    def specialties(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(rule.specialty for rule in self.rules))


def default_table() -> RoutingTable:
    """The built-in table: every installed specialty's ``receives`` rules (its record), those naming SOP classes
    first, then by the specialties' order."""
    from imaging_tasks import specialties

    records = [specialties.get(name) for name in specialties.names()]
    claimed = [(0 if "sop_class" in rule else 1, record.order, i, {**rule, "specialty": record.name})
               for record in records for i, rule in enumerate(record.receives)]
    if not claimed:
        return RoutingTable(())
    return parse_routes([rule for *_, rule in sorted(claimed, key=lambda c: c[:3])], source="built-in table")


def load_routes(path: str | Path) -> RoutingTable:
    """The routing table of a routes file (see the module docstring); ConfigError saying what to fix."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"routes file {path} does not exist: give --routes an existing JSON file, or leave it "
                          "out to use the built-in table") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"routes file {path} is not readable JSON ({type(exc).__name__}: {exc}); it must be a "
                          'list of rules like {"modality": "CT", "specialty": "cardiovascular"}') from None
    return parse_routes(raw, source=str(path))


def parse_routes(raw, source: str = "routes") -> RoutingTable:
    from imaging_tasks import specialties

    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: expected a non-empty JSON list of rules (with no rule every instance would "
                          'be refused), e.g. [{"modality": "CT", "specialty": "cardiovascular"}]')
    known = specialties.names()
    rules = []
    for number, item in enumerate(raw, start=1):
        where = f"{source}: rule {number}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} is {type(item).__name__}, not an object with the keys {', '.join(KEYS)}")
        unknown = sorted(set(item) - set(KEYS))
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                              f"{', '.join(KEYS)} (check the spelling)")
        specialty = item.get("specialty")
        if specialty not in known:
            raise ConfigError(f"{where} names the specialty {specialty!r}, which is not installed; use one of "
                              f"{', '.join(known)}")
        rules.append(Rule(specialty=specialty,
                          modality=tuple(v.upper() for v in _strings(item, "modality", where)),
                          sop_class=tuple(_sop_class(v, where) for v in _strings(item, "sop_class", where)),
                          calling_ae=_strings(item, "calling_ae", where),
                          comment=str(item.get("comment") or "")))
    return RoutingTable(tuple(rules), source=source)


def _strings(item: dict, key: str, where: str) -> tuple[str, ...]:
    value = item.get(key)
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ConfigError(f"{where}: {key} must be a non-empty string or a list of non-empty strings, got "
                          f"{value!r}; leave the key out to match any {key}")
    return tuple(v.strip() for v in values)


def _sop_class(value: str, where: str) -> str:
    """A dotted UID as it is; a name (``CTImageStorage``) looked up in pynetdicom's and pydicom's tables."""
    if _UID.match(value):
        return value
    from pynetdicom import sop_class

    uid = getattr(sop_class, value, None)
    if uid is None:
        import pydicom.uid

        uid = getattr(pydicom.uid, value, None)
    if not isinstance(uid, str) or not _UID.match(uid):
        raise ConfigError(f"{where}: sop_class {value!r} is neither a dotted UID nor a known SOP class name "
                          "(e.g. CTImageStorage, 1.2.840.10008.5.1.4.1.1.2)")
    return str(uid)
