"""Where the de-identification key comes from, and the refusal to run without one.

Every pseudonym (UIDs, patient/study IDs, date shifts) is an HMAC under this key, so whoever holds it
can re-link outputs to inputs and nobody else can.  The only built-in key is the public demo key: it
must be asked for explicitly (``IMAGING_DEID_DEMO=1`` or ``--demo-key``), gives no protection, and every
output made with it is marked "DEMO KEY" in DeidentificationMethod and ``demo_key`` in the warehouse.
"""
from __future__ import annotations

import os

from imaging_tasks.errors import ConfigError

DEMO_KEY: bytes = b"imaging-tasks-demo-deid-key:PUBLIC-NOT-SECRET:v1"

DEFAULT_ENV_VAR = "IMAGING_DEID_KEY"
DEMO_ENV_VAR = "IMAGING_DEID_DEMO"
MIN_KEY_BYTES = 16  # an HMAC key shorter than this is guessable, and a guessed key reverses every pseudonym


class MissingKey(ConfigError):
    """No usable key: de-identification refuses to run rather than fall back to a public key."""


def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def load_key(env_var: str = DEFAULT_ENV_VAR, value: str | None = None, *,
             allow_demo: bool | None = None) -> tuple[bytes, bool]:
    """Return ``(key, is_demo)``: an explicit ``value`` wins, then the environment variable.

    Without either, the demo key is returned only if ``allow_demo`` (default: ``IMAGING_DEID_DEMO`` is
    set to 1/true); otherwise ``MissingKey`` is raised.  The key string is used as UTF-8 bytes with
    surrounding whitespace stripped (a trailing newline from a secrets file must not change every
    pseudonym).  An empty string counts as unset.
    """
    for candidate in (value, os.environ.get(env_var) if env_var else None):
        if candidate is not None and candidate.strip():
            key = candidate.strip().encode("utf-8")
            if len(key) < MIN_KEY_BYTES:
                raise MissingKey(f"the de-identification key is {len(key)} bytes long; use at least "
                                 f"{MIN_KEY_BYTES} random bytes (e.g. `openssl rand -hex 32`)")
            return key, False
    if allow_demo is None:
        allow_demo = _truthy(os.environ.get(DEMO_ENV_VAR))
    if allow_demo:
        return DEMO_KEY, True
    raise MissingKey(f"no de-identification key: set the Airflow connection `imaging_deid` (password = key) or "
                     f"the environment variable {env_var} (e.g. from a secrets manager; `openssl rand -hex 32` "
                     f"makes one). For synthetic/demo data only, set {DEMO_ENV_VAR}=1 to use the public demo key "
                     "(outputs are marked DEMO KEY).")


__all__ = ["DEMO_KEY", "DEFAULT_ENV_VAR", "DEMO_ENV_VAR", "MIN_KEY_BYTES", "MissingKey", "load_key"]
