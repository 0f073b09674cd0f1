"""Keyed, deterministic pseudonyms: the same input under the same key gives the same output in every
file and every run, so references between files survive and re-runs are byte-identical.

HMAC-SHA256 rather than a plain hash: UIDs and MRNs have little entropy (dates, counters, site roots),
so an unkeyed SHA/MD5 mapping is reversed by enumerating candidates.  Each use gets its own message
prefix (``uid:``, ``patient:``, ``date:``) so one pseudonym never reveals another.
"""
from __future__ import annotations

import base64
import hashlib
import hmac

# Storage folder names and DICOM IDs start with a letter telling what they name.
_PREFIX = {"patient": "P", "study": "S", "series": "R", "instance": "I", "accession": "A", "ae": "AE"}

# Date shifts lie in [-MAX_SHIFT_DAYS, -1]: always into the past, never zero (an unshifted date would
# leak), at most two years so seasonal context stays roughly plausible.
MAX_SHIFT_DAYS = 730


def _mac(key: bytes, message: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("the de-identification key must be non-empty bytes")
    return hmac.new(bytes(key), message, hashlib.sha256).digest()


def _norm_uid(uid: str) -> str:
    # Padding (trailing NUL or space) is not part of a UID; without this the same UID read from two
    # writers would map to two pseudonyms.
    return str(uid).strip().rstrip("\0").strip()


def uid_for(key: bytes, uid: str) -> str:
    """Replacement UID: ``2.25.<128-bit int>`` (at most 44 characters, no leading zeros)."""
    digest = _mac(key, b"uid:" + _norm_uid(uid).encode("ascii", "replace"))
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def pseudo_id(key: bytes, value: str, kind: str) -> str:
    """Identifier pseudonym such as ``P`` + 16 base32 characters for ``kind="patient"``.

    Uppercase A-Z/2-7 only, so it is valid in LO/PN/SH... values and as a file or folder name.
    """
    digest = _mac(key, f"{kind}:{value}".encode("utf-8"))
    body = base64.b32encode(digest[:10]).decode("ascii")  # 80 bits -> exactly 16 chars, no padding
    return _PREFIX.get(kind, kind[:1].upper() or "X") + body


def date_shift_days(key: bytes, patient_id: str) -> int:
    """Days to add to every date of one patient, in [-MAX_SHIFT_DAYS, -1]; intervals are preserved."""
    n = int.from_bytes(_mac(key, b"date:" + str(patient_id).encode("utf-8"))[:8], "big")
    return -(n % MAX_SHIFT_DAYS + 1)


__all__ = ["uid_for", "pseudo_id", "date_shift_days", "MAX_SHIFT_DAYS"]
