"""De-identification of DICOM objects (PS3.15 Basic Profile, table-driven) and whole-slide images.

All pseudonyms are keyed (HMAC-SHA256 under the key from ``keys.load_key``), so outputs are
reproducible for the key holder and irreversible for everyone else.
"""
from .dicom import DeidOptions, deidentify_bytes, deidentify_dataset
from .keys import DEMO_KEY, load_key
from .pseudonym import date_shift_days, pseudo_id, uid_for
from .slide import deidentify_svs

__all__ = ["DeidOptions", "deidentify_bytes", "deidentify_dataset", "deidentify_svs", "DEMO_KEY", "load_key",
           "uid_for", "pseudo_id", "date_shift_days"]
