"""De-identification of DICOM objects (PS3.15 Basic Profile, table-driven), whole-slide images and NIfTI.

All pseudonyms are keyed (HMAC-SHA256 under the key from ``keys.load_key``), so outputs are
reproducible for the key holder and irreversible for everyone else.

Modules, each importing only those after it in this order: ``tree`` (a whole folder or bucket, with a report
and the PHI audit) -> ``dicom`` (the one entry point for DICOM, ``deidentify_bytes``) -> ``stream`` (byte-level
fast path) -> ``reference`` (pydicom walker) -> ``pixels`` -> ``rules`` (every decision both DICOM paths share)
-> ``allowlist``, ``profile`` (Table E.1-1); beside them ``slide`` (SVS/TIFF), ``nifti``, ``pseudonym``, ``keys``.
Outside ``deid`` they import only lower layers (``dicom_io``, ``storage``, ``formats``, ``errors``; ``tree`` also
``phi_audit``), never ``index`` or the pipeline; ``tests/test_import_graph.py`` holds them to it.
"""
from .dicom import DeidOptions, deidentify_bytes, deidentify_dataset
from .keys import DEMO_KEY, load_key
from .pseudonym import date_shift_days, pseudo_id, uid_for
from .slide import deidentify_svs

__all__ = ["DeidOptions", "deidentify_bytes", "deidentify_dataset", "deidentify_svs", "DEMO_KEY", "load_key",
           "uid_for", "pseudo_id", "date_shift_days"]
