"""Where the de-identification key comes from.

Every pseudonym (UIDs, patient/study IDs, date shifts) is an HMAC under this key, so whoever holds it
can re-link outputs to inputs and nobody else can.  The demo key below is public: outputs made with it
are reproducible for tests but give no protection, and are marked "DEMO KEY" in DeidentificationMethod.
"""
from __future__ import annotations

import os

DEMO_KEY: bytes = b"imaging-tasks-demo-deid-key:PUBLIC-NOT-SECRET:v1"

DEFAULT_ENV_VAR = "IMAGING_DEID_KEY"


def load_key(env_var: str = DEFAULT_ENV_VAR, value: str | None = None) -> tuple[bytes, bool]:
    """Return ``(key, is_demo)``: an explicit ``value`` wins, then the environment variable, else the demo key.

    The key string is used as UTF-8 bytes (surrounding whitespace stripped, so a trailing newline from a
    secrets file does not silently change every pseudonym).  An empty string counts as unset.
    """
    for candidate in (value, os.environ.get(env_var) if env_var else None):
        if candidate is not None and candidate.strip():
            return candidate.strip().encode("utf-8"), False
    return DEMO_KEY, True


__all__ = ["DEMO_KEY", "DEFAULT_ENV_VAR", "load_key"]
