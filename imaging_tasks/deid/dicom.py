"""The one entry point for de-identifying DICOM: :func:`deidentify_bytes` (the pipeline, the folder tool and the
tests all call it), and :func:`deidentify_dataset` for a data set already in memory.

How the work is split (each module imports only those after it: there is no import cycle):

* ``stream.py``: the byte-level fast path (raw bytes rewritten, kept elements copied verbatim);
* ``reference.py``: the reference walker on a pydicom data set, for everything the fast path declines;
* ``pixels.py``: the Pixel Data check and overlay clean-up both paths run;
* ``rules.py``: every decision (PS3.15 Annex E action codes, options, dummies, date shifts, the refusal checks,
  what is added to the output and what ``info`` reports); see its docstring for the profile itself.

Before anything is written: the input must be complete and parse (cut files, garbled structure, more than 64
levels of nesting are refused), pass every check of ``rules.REFUSAL_CHECKS`` (required attributes, the content its
SOP class cannot lack, slide label images, burned-in annotation), and the output is read back in full so nothing
unreadable is published.  :func:`deidentify_bytes` raises BadInput and nothing else: an unexpected error on one
file becomes ``BadInput("deid_error")`` (logged with its type and code location, never its message, which could
quote a value), so a batch quarantines the file and goes on.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from contextvars import ContextVar
from typing import Any, Callable, Collection

from pydicom.dataset import Dataset

from imaging_tasks.dicom_io import MAX_NESTING, check_readable
from imaging_tasks.errors import BadInput

from . import reference, rules, stream
from .rules import (BURNED_IN_MODALITIES, BURNED_IN_SOP_CLASSES, DEMO_MARK, REQUIRED_CONTENT, SAFE_PRIVATE,
                    DeidOptions, header_summary, method_values)

log = logging.getLogger(__name__)
# ``deidentify_bytes(source=(tags, read))``: which elements the caller reads, and what reads them.
SourceReader = tuple[Collection[int], Callable[[Dataset], Any]]
_SOURCE: ContextVar[SourceReader | None] = ContextVar("deid_source_reader", default=None)


@contextlib.contextmanager
def reading_source(source: SourceReader):
    """``deidentify_bytes`` calls made inside read the input with ``source`` as if given ``source=source``: for
    callers that reach it through a name others may wrap (the pipeline's step: a wrapper that calls the real
    function keeps working, one that does not leaves the reader unread, which its caller refuses)."""
    token = _SOURCE.set(source)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def deidentify_bytes(data: bytes, key: bytes, options: DeidOptions = DeidOptions(), *,
                     demo: bool = False, fast: bool = True, source: SourceReader | None = None) -> tuple[bytes, dict]:
    """Parse a DICOM file, de-identify it and serialize it; returns ``(bytes, info)``.

    ``info``: pseudo_patient, pseudo_study (folder names), study_uid/series_uid/sop_uid (new), modality,
    sop_class_uid and ``header`` (non-PHI fields for a warehouse instances table).  The date shift is
    deliberately not returned: with it, anyone holding a shifted date could recover the real one.

    ``fast``: first try the byte-level path of ``stream.py`` (same decisions and result, see
    tests/test_deid_stream.py); on anything it does not handle it raises Unsupported and the reference path
    (``reference.py``) runs.  ``fast=False``: the reference path only.  Either way the output is read back before
    it is returned, by the fast path's byte-level parser with every check its input had to pass (``stream._verify``:
    structure, lengths, nesting, VRs, numbers, text in its character set; about 8% of the fast path's time,
    where a full pydicom re-read costs 190% of it), or where that parser cannot judge (deflate, nested
    character sets...) by pydicom, in full (``dicom_io.check_readable``).

    ``source``: ``(tags, read)``, to read the input from the parse that de-identifies it, not from a second
    one (the PHI audit's identifying values, which every output is checked against before it is written, are
    read this way: ``phi_audit.dicom_identifying_values``).  ``read(ds)`` is called once when the output is
    ready, with the input as it was parsed: by the fast path, a data set of the elements of ``tags`` (ints) at
    every depth, inside the sequences that lead to them, each value converted from its raw bytes as pydicom
    converts it (``stream._source_view``); by the reference path, the whole data set pydicom read, before any
    change.  What it raises is raised (a BadInput as it is; anything else as ``deid_error``), after the
    de-identifier's own refusals: a file both refuse gets the de-identifier's reason.  Inside
    ``with reading_source(source)``, the same without the argument.

    Raises BadInput and nothing else, whatever ``data`` holds (see the module docstring).
    """
    source = source or _SOURCE.get()
    try:
        if fast:
            try:
                if source is None:
                    return stream.deidentify_stream(data, key, options, demo=demo)  # read back by stream._verify
                out, info, view = stream.deidentify_stream_source(data, key, options, demo=demo,
                                                                  source_tags=frozenset(source[0]))
                source[1](view)
                return out, info
            except stream.Unsupported:
                pass
        refused: list[BadInput] = []

        def read(ds: Dataset) -> None:  # its refusal comes after the de-identifier's own (read-back included)
            try:
                source[1](ds)
            except BadInput as exc:
                refused.append(exc)

        out, info = reference.deidentify(data, key, options, demo, read=read if source else None)
        if not stream.verified(out):  # the same byte-level read-back where it can judge, else pydicom's, in full
            check_readable(out)
        if refused:
            raise refused[0]
        return out, info
    except BadInput:
        raise
    except RecursionError:
        raise BadInput("nesting_too_deep", f"sequences nested deeper than this reader can follow (the limit is "
                       f"{MAX_NESTING} levels); the file is corrupt or crafted, re-export it") from None
    except Exception as exc:  # noqa: BLE001 - the file boundary: one bad file must not stop a batch
        raise unexpected(exc, "de-identification") from None


def deidentify_dataset(ds: Dataset, key: bytes, options: DeidOptions = DeidOptions(), *,
                       demo: bool = False) -> Dataset:
    """Return a de-identified copy of ``ds`` (the input is left untouched).

    Raises BadInput for objects that cannot be made safe here (``rules.PIXEL_PHI_CHECKS``: slide label images,
    burned-in annotation; truncated pixels).  A data set in memory is not checked for completeness as a file is
    (``deidentify_bytes``): headers read without their pixels are de-identified as they are.
    """
    out = copy.deepcopy(ds)
    for check in rules.PIXEL_PHI_CHECKS:
        check(out)
    reference.deidentify_inplace(out, key, options, demo)
    return out


def unexpected(exc: BaseException, what: str) -> BadInput:
    """BadInput("deid_error") for an exception nobody expected on this file; logged by type and code location
    (the innermost frame), never by message: a message may quote a value of the file."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb is not None else "?"
    log.warning("%s failed on one file with %s at %s; the file is quarantined", what, type(exc).__name__, where)
    return BadInput("deid_error", f"{what} failed on this file ({type(exc).__name__} at {where}); it was "
                    "quarantined - report it with the file's sha256")


__all__ = ["DeidOptions", "deidentify_dataset", "deidentify_bytes", "reading_source", "unexpected", "header_summary",
           "SAFE_PRIVATE", "BURNED_IN_MODALITIES", "BURNED_IN_SOP_CLASSES", "DEMO_MARK", "REQUIRED_CONTENT",
           "method_values"]
