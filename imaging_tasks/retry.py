"""Retry transient faults of object stores and warehouses: bounded attempts, exponential backoff with jitter.

Two layers, each doing what it is placed to do, so retries are not stacked blindly:

* **per HTTP request, inside the SDKs** (left at their defaults, which are sensible): botocore re-sends a
  request on 5xx, throttling and connection errors (legacy mode: 5 attempts, random backoff up to 2^n s;
  ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` or a connection's ``config_kwargs`` change it); s3fs repeats a
  call whose connection dropped or whose body broke off mid-read, and ``SlowDown`` (5 attempts, 0.1-1.5 s);
  gcsfs repeats 408/429/5xx and connection errors (6 attempts, 1-32 s); google-cloud-bigquery retries API
  calls on 429/5xx/connection errors for up to 10 minutes and re-runs query jobs that failed for a transient
  reason (``backendError``, ``rateLimitExceeded``...).
* **per operation, here** (:func:`call`): a whole storage operation (write an object, read one, list a
  prefix, download, hash a stream) or warehouse step (a load job, a MERGE) is run again when what still
  surfaces is transient: faults outlasting the SDK's attempts, a response lost after the server applied a
  PUT, errors of multi-request operations (listing pages, streamed reads), load jobs that failed
  server-side for a transient reason.  Every operation retried here is idempotent (a PUT of the same bytes
  to the same key, a read, a ``WRITE_TRUNCATE`` load into a staging table, a MERGE on the key).

Only transient errors are retried (:func:`is_transient`): HTTP 5xx (not 501/505), 429, 408, throttling codes,
connection resets / refusals / timeouts, bodies cut short.  Missing buckets and objects, 403s, other 4xx,
:class:`~imaging_tasks.errors.ConfigError` and :class:`~imaging_tasks.errors.BadInput` fail at once.

Log lines name the operation, the attempt, the wait and the error's type and code, and the target as
``scheme://bucket`` only: object names can carry patient names, and error messages can quote them.
"""
from __future__ import annotations

import errno
import http.client
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from imaging_tasks.errors import BadInput, ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

# HTTP statuses worth another try: server errors (not "not implemented" / "version not supported"),
# request timeout, too many requests.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504, 509})
# Error codes of AWS (S3 and others) that mean "try again", whatever the status the service sent them with.
TRANSIENT_CODES = frozenset({
    "InternalError", "InternalFailure", "InternalServerError", "ServiceUnavailable", "ServiceUnavailableException",
    "SlowDown", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "Throttling",
    "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded", "EC2ThrottledException",
    "ProvisionedThroughputExceededException", "TransactionInProgressException", "OperationAborted",
})
# Reasons of Google APIs (BigQuery's errors[0]["reason"]) that mean "try again"; "quotaExceeded" does not.
TRANSIENT_REASONS = frozenset({
    "backendError", "internalError", "rateLimitExceeded", "badGateway", "jobBackendError", "jobInternalError",
    "jobRateLimitExceeded",
})
TRANSIENT_ERRNO = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE,
                             errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN})


@dataclass(frozen=True)
class Policy:
    """How hard to try: ``attempts`` in all, waits of ``initial_s * multiplier**n`` (half fixed, half random,
    at most ``max_wait_s``), and no new attempt once ``budget_s`` seconds have passed since the first."""

    attempts: int = 4
    initial_s: float = 1.0
    multiplier: float = 2.0
    max_wait_s: float = 10.0
    budget_s: float = 120.0

    def wait(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds before retry number ``retry`` (1 = the first retry): exponential with equal jitter."""
        cap = min(self.max_wait_s, self.initial_s * self.multiplier ** (retry - 1))
        return cap / 2 + (rng or random).random() * cap / 2


DEFAULT = Policy()  # storage operations and warehouse steps; tests may swap it for a quicker one


# --------------------------------------------------------------------------------------------- classification
def _status_transient(status: Any) -> bool:
    try:
        return int(status) in TRANSIENT_STATUS
    except (TypeError, ValueError):
        return False


def _botocore(exc: BaseException) -> bool | None:
    try:
        from botocore import exceptions as bce
        from botocore.parsers import ResponseParserError
    except ImportError:  # pragma: no cover - botocore is installed with the amazon provider
        return None
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        status = (exc.response.get("ResponseMetadata", {}) if isinstance(exc.response, dict) else {}) \
            .get("HTTPStatusCode")
        return error.get("Code") in TRANSIENT_CODES or _status_transient(status) or \
            _status_transient(error.get("Code"))
    if isinstance(exc, bce.SSLError):  # a certificate that does not verify stays so
        return False
    if isinstance(exc, (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError, ResponseParserError)):
        return True  # connection refused/closed/reset, read/connect timeouts, body cut short, garbled reply
    if isinstance(exc, bce.BotoCoreError):
        return False  # no credentials, bad parameters, unknown service...
    return None


def _aiohttp(exc: BaseException) -> bool | None:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, aiohttp.ClientResponseError):
        return _status_transient(exc.status)
    if isinstance(exc, (aiohttp.ClientSSLError, aiohttp.InvalidURL)):
        return False
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return True
    return None


def _requests(exc: BaseException) -> bool | None:
    try:
        import requests
        import urllib3.exceptions
    except ImportError:  # pragma: no cover
        return None
    rex = requests.exceptions
    if isinstance(exc, rex.SSLError):
        return False
    if isinstance(exc, rex.HTTPError) and exc.response is not None:
        return _status_transient(exc.response.status_code)
    if isinstance(exc, (rex.ConnectionError, rex.ChunkedEncodingError, rex.Timeout, rex.ContentDecodingError)):
        return True
    if isinstance(exc, urllib3.exceptions.SSLError):
        return False
    if isinstance(exc, (urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError,
                        urllib3.exceptions.NewConnectionError)):
        return True
    return None


def _google(exc: BaseException) -> bool | None:
    try:
        from google.api_core import exceptions as gexc
    except ImportError:  # pragma: no cover
        gexc = None
    if gexc is not None:
        if isinstance(exc, gexc.RetryError):
            return False  # google's own Retry already spent its deadline on it: do not stack another
        if isinstance(exc, gexc.GoogleAPICallError):
            reasons = [e.get("reason") for e in (getattr(exc, "errors", None) or []) if isinstance(e, dict)]
            if reasons and reasons[0]:
                return reasons[0] in TRANSIENT_REASONS
            return _status_transient(exc.code)
    try:
        import google.auth.exceptions as gauth
    except ImportError:  # pragma: no cover
        gauth = None
    if gauth is not None:
        if isinstance(exc, gauth.TransportError):
            return True
        if isinstance(exc, gauth.GoogleAuthError):
            return False  # credentials refused or missing
    try:
        from gcsfs.retry import ChecksumError, HttpError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, HttpError):
        return _status_transient(exc.code)
    if isinstance(exc, ChecksumError):  # the body was damaged on the way; a fresh read is the cure
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """True for faults another attempt can cure: 5xx/429/408/throttling, connection resets, refusals, timeouts,
    truncated bodies; False for everything else (missing buckets or objects, 403/4xx, configuration and
    input errors, programming errors).  An error wrapping another (``raise X from Y``, e.g. s3fs turning an
    S3 ``InternalError`` into ``OSError(EIO)``) is judged by what it wraps."""
    seen = 0
    while exc is not None and seen < 8:
        seen += 1
        if isinstance(exc, (ConfigError, BadInput, FileNotFoundError, PermissionError, FileExistsError,
                            IsADirectoryError, NotADirectoryError)):
            return False
        for judge in (_botocore, _aiohttp, _requests, _google):
            verdict = judge(exc)
            if verdict is not None:
                return verdict
        if isinstance(exc, (ConnectionError, TimeoutError)):  # resets, refusals, broken pipes, socket timeouts
            return True
        if isinstance(exc, (http.client.IncompleteRead, http.client.RemoteDisconnected)):
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNO:
            return True
        exc = exc.__cause__  # explicit wrapping only (never __context__: an error raised while handling another)
    return False


def describe(exc: BaseException) -> str:
    """The error's type and code/status, never its message (messages can quote object names)."""
    parts = [type(exc).__name__]
    inner = exc.__cause__ if type(exc) is OSError and exc.__cause__ is not None else exc
    if inner is not exc:
        parts.append(f"from {type(inner).__name__}")
    response = getattr(inner, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        parts.append(" ".join(str(x) for x in (code, f"HTTP {status}" if status else None) if x))
    else:
        for attr in ("code", "status", "errno"):
            value = getattr(inner, attr, None)
            if isinstance(value, (int, str)) and not callable(value) and value:
                parts.append(f"{attr} {value}")
                break
    reasons = [e.get("reason") for e in (getattr(inner, "errors", None) or []) if isinstance(e, dict)]
    if reasons and reasons[0]:
        parts.append(f"reason {reasons[0]}")
    return " ".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------- retrying
def call(fn: Callable[..., T], *args, operation: str, target: str = "", policy: Policy | None = None,
         retry_if: Callable[[BaseException], bool] = is_transient, **kwargs) -> T:
    """``fn(*args, **kwargs)``, run again after a transient error (see the module docstring).

    ``operation`` and ``target`` (``scheme://bucket``, a table: never an object name) go into the log lines.
    The last error is re-raised unchanged (so callers' ``except`` clauses still work), with a note saying
    how many attempts were made; a non-transient error is re-raised at once.
    """
    policy = policy or DEFAULT
    where = f"{operation} {target}".strip()
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not retry_if(exc):
                raise
            elapsed = time.monotonic() - started
            wait = policy.wait(attempt)
            if attempt >= policy.attempts or elapsed + wait > policy.budget_s:
                log.error("%s: transient %s on attempt %d/%d; giving up after %.1f s", where, describe(exc), attempt,
                          policy.attempts, elapsed)
                exc.add_note(f"{where}: gave up after {attempt} attempt(s) over {elapsed:.1f} s of transient errors")
                raise
            log.warning("%s: transient %s on attempt %d/%d; retrying in %.2f s", where, describe(exc), attempt,
                        policy.attempts, wait)
            time.sleep(wait)


def retrying(operation: str, *, target: Callable[..., str] | None = None, policy: Policy | None = None,
             retry_if: Callable[[BaseException], bool] = is_transient):
    """Decorator form of :func:`call`; ``target(*args, **kwargs)`` names what is logged (``scheme://bucket``)."""
    def decorate(fn):
        import functools

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return call(fn, *args, operation=operation, target=target(*args, **kwargs) if target else "",
                        policy=policy, retry_if=retry_if, **kwargs)
        return wrapper
    return decorate
