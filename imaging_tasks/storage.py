"""Buckets, through one code path for ``file://``, ``s3://`` and ``gs://``.

Locations are ``upath.UPath`` objects (fsspec underneath).  Airflow's ``ObjectStoragePath`` is a UPath,
so the glue can pass one carrying connection credentials and the domain code stays the same.  URIs travel
between steps as text (XCom, manifests); a remote one may name the connection it is read with, the
ObjectStoragePath way (``s3://aws_default@bucket/key``).  Outside Airflow such a URI has no meaning: the
glue runs each task (and each QC page request) inside :func:`resolving_uris`, which turns URI text back into an
authenticated path for that context only (no process-wide state); without it a URI naming a connection is
refused with a clear error.

"Upload finished" is decided by :class:`QuietPeriod` over :func:`arrivals` (counts, newest time and a
fingerprint of a listing): something arrived and nothing changed for a quiet period.

The lake layout (what goes where under a lake root) is documented once, in :mod:`imaging_tasks.lake`.

A study's outputs become visible only when ``_MANIFEST.json`` is written, last: readers that wait for
the manifest never see a half-written study.  Local writes go through a temporary name and a rename.

Remote operations (``s3://``, ``gs://``) are retried on transient faults (5xx, throttling, connection resets,
bodies cut short) with backoff, by :mod:`imaging_tasks.retry`, on top of the SDKs' own per-request retries;
every one of them is idempotent (a PUT of the same bytes to the same key, reads, listings).  A missing bucket,
a 403 or any other 4xx fails at once.  Local paths are not retried.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from upath import UPath

from imaging_tasks import retry
from imaging_tasks.errors import ConfigError

MANIFEST = "_MANIFEST.json"
CHUNK = 8 * 1024 * 1024
LOCAL_PROTOCOLS = ("", "file", "local")
_RESOLVER: ContextVar[Callable[[str], UPath] | None] = ContextVar("imaging_uri_resolver", default=None)


@contextmanager
def resolving_uris(resolver: Callable[[str], UPath] | None):
    """Within the block, remote URI text (``s3://``, ``gs://``, ...) is opened with ``resolver`` (None: plain
    UPath): the Airflow glue passes ``ObjectStoragePath`` so a URI read back from XCom or a manifest is opened with
    the connection it names.  Scoped to the current context (task, request, thread), never process-wide; local
    paths never go through the resolver."""
    token = _RESOLVER.set(resolver)
    try:
        yield
    finally:
        _RESOLVER.reset(token)


def _scheme(text: str) -> str:
    return text.split("://", 1)[0].lower() if "://" in text else ""


def as_path(location: Any) -> UPath:
    """A UPath for a URI, local path or an existing UPath/ObjectStoragePath (returned unchanged)."""
    if isinstance(location, UPath):
        return location
    text = os.fspath(location) if isinstance(location, os.PathLike) else str(location)
    if _scheme(text) not in LOCAL_PROTOCOLS:
        resolver = _RESOLVER.get()
        if resolver is not None:
            return resolver(text)
        if "@" in urlsplit(text).netloc:
            conn = urlsplit(text).netloc.rpartition("@")[0]
            raise ValueError(f"{_scheme(text)}:// URI names the Airflow connection {conn!r}: it can only be opened "
                             "inside Airflow (or within storage.resolving_uris); outside Airflow use "
                             f"{_scheme(text)}://<bucket>/... with the ambient cloud credentials")
    if not _scheme(text):  # a relative local path (the CLI's arguments): anchor it, listings are absolute
        text = os.path.abspath(text)
    return UPath(text)


def is_local(path: UPath) -> bool:
    return getattr(path, "protocol", "") in LOCAL_PROTOCOLS


def where(location: Any) -> str:
    """``scheme://bucket`` of a location, for log lines: never the object name (it can carry a patient name)."""
    path = as_path(location)
    if is_local(path):
        return "file://"
    return f"{path.protocol}://{urlsplit(str(path)).netloc.rpartition('@')[2]}"


def _remote(operation: str, path: UPath, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` for a remote ``path``, retried on transient faults (see :mod:`imaging_tasks.retry`).
    A refusal (403) is not retried; it fails at once saying where and what to check."""
    target = where(path)
    try:
        return retry.call(fn, *args, operation=operation, target=target, **kwargs)
    except PermissionError as exc:
        exc.add_note(f"{operation} on {target} was refused (access denied): the connection's credentials or the "
                     "bucket policy do not allow it; not a transient fault, not retried")
        raise


def join(root: Any, *parts: str) -> UPath:
    path = as_path(root)
    for part in parts:
        path = path / part
    return path


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    relpath: str
    size: int
    modified: dt.datetime | None


def _is_hidden(relpath: str) -> bool:
    return any(part.startswith((".", "_")) for part in relpath.split("/"))


def list_objects(root: Any, *, since: dt.datetime | None = None, until: dt.datetime | None = None) -> list[ObjectInfo]:
    """Every file under ``root`` (recursively) modified in [since, until); names starting '.' or '_' are skipped.

    Object stores are listed afresh every call (no cached listing), so repeated calls see new arrivals.  A
    missing local folder or bucket prefix lists as empty; a missing bucket is an error.
    """
    root = as_path(root)
    fs, base = root.fs, root.path.rstrip("/")
    if is_local(root):
        if not root.exists():
            return []
        found = fs.find(base, detail=True)
    else:
        found = _remote("list", root, _find_remote, root, fs, base)
    out = []
    for name, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        rel = name[len(base):].lstrip("/")
        if _is_hidden(rel):
            continue
        modified = _modified(info)
        if since and modified and modified < since:
            continue
        if until and modified and modified >= until:
            continue
        out.append(ObjectInfo(uri=str(root / rel), relpath=rel, size=int(info.get("size") or 0), modified=modified))
    return out


def _forget_listings(fs, base: str) -> None:
    """Drop cached directory listings of ``base``, its parents and everything under it (fsspec's
    ``invalidate_cache`` spares the children: a stale sub-folder listing would hide objects uploaded since)."""
    fs.invalidate_cache(base)
    cache = getattr(fs, "dircache", None)
    if cache is not None:
        for key in [k for k in list(cache) if k.startswith(base + "/")]:
            cache.pop(key, None)


class MissingBucket(ConfigError, FileNotFoundError):
    """The bucket a URI names does not exist (or is invisible to the connection): a configuration error."""


def _find_remote(root: UPath, fs, base: str) -> dict:
    _forget_listings(fs, base)
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        found = {}
    if not found:
        bucket = base.split("/", 1)[0]
        fs.invalidate_cache(bucket)
        # s3fs's exists() on a bucket answers False for any error, transient ones included: a False is checked
        # by listing the bucket, which tells "no such bucket" / "access denied" from a fault worth retrying
        if not fs.exists(bucket):
            try:
                fs.ls(bucket, detail=False)
            except (FileNotFoundError, PermissionError) as exc:
                raise MissingBucket(f"bucket {root.protocol}://{bucket} does not exist or the connection cannot "
                                    "see it: check the landing/lake URI Variables and the connection") from exc
    return found


def _modified(info: dict) -> dt.datetime | None:
    for key in ("mtime", "LastModified", "updated", "last_modified"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
        if isinstance(value, str):
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, dt.datetime):
            return value.astimezone(dt.timezone.utc) if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    return None


@dataclass(frozen=True)
class Arrivals:
    """What a prefix holds, as counts (safe for logs and XCom: object names can carry patient names)."""

    objects: int
    bytes: int
    newest: dt.datetime | None  # latest modification time among the objects, as the store reports it
    fingerprint: str  # changes when an object is added, removed, resized or rewritten; reveals no names

    def counts(self) -> dict[str, int]:
        return {"objects": self.objects, "bytes": self.bytes}


def arrivals(objects: list[ObjectInfo]) -> Arrivals:
    """Summarise a listing (see :func:`list_objects`) for :class:`QuietPeriod`."""
    digest = hashlib.sha256()
    for o in sorted(objects, key=lambda o: o.relpath):
        digest.update(f"{o.relpath}\0{o.size}\0{o.modified.isoformat() if o.modified else ''}\n".encode())
    times = [o.modified for o in objects if o.modified]
    return Arrivals(objects=len(objects), bytes=sum(o.size for o in objects), newest=max(times, default=None),
                    fingerprint=digest.hexdigest())


class QuietPeriod:
    """Decides that an upload has finished: something arrived and nothing changed for ``quiet_s`` seconds.

    The last change is the later of two clocks: the newest object's modification time (which a fresh
    watcher, e.g. a rescheduled poke, can read back) and the moment this watcher saw the listing change
    (which catches objects stamped early by the store, e.g. S3 multipart uploads, stamped at their start).
    Whole-second stamps (S3 listings) count from the end of their second.  An object added during the quiet
    period restarts it.
    """

    def __init__(self, quiet_s: float):
        if quiet_s < 0:
            raise ValueError(f"quiet period must be >= 0 seconds, got {quiet_s}")
        self.quiet_s = float(quiet_s)
        self._fingerprint: str | None = None
        self._seen_change: dt.datetime | None = None

    def observe(self, found: Arrivals, now: dt.datetime) -> float:
        """Seconds still to wait after this listing: 0 when the upload is finished, ``inf`` when nothing arrived."""
        if self._fingerprint is not None and found.fingerprint != self._fingerprint:
            self._seen_change = now
        elif self._fingerprint is None and found.newest is None:
            self._seen_change = now  # the store gives no times: start the clock at the first sight
        self._fingerprint = found.fingerprint
        if not found.objects:
            return math.inf
        newest = found.newest
        if newest is not None and newest.microsecond == 0:
            newest += dt.timedelta(seconds=1)  # whole-second stamps (S3 listings): the write may be up to 1 s later
        last = max(t for t in (newest, self._seen_change) if t is not None)
        return max(0.0, self.quiet_s - (now - last).total_seconds())


def read_bytes(location: Any) -> bytes:
    path = as_path(location)
    if is_local(path):
        return path.read_bytes()
    return _remote("read", path, path.fs.cat_file, path.path)


def exists(location: Any) -> bool:
    """Whether the object (or folder) exists; remote checks are retried on transient faults."""
    path = as_path(location)
    if is_local(path):
        return path.exists()
    return _remote("exists", path, path.exists)


def remove(location: Any) -> bool:
    """Delete one object or file of our own bookkeeping (never raw data); False if it was not there."""
    path = as_path(location)
    try:
        if is_local(path):
            path.unlink()
        else:
            _remote("remove", path, path.unlink)
    except FileNotFoundError:
        return False
    return True


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of(location: Any) -> str:
    path = as_path(location)

    def digest_stream() -> str:  # a retry starts over: a stream broken mid-way is read again from the start
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()

    return digest_stream() if is_local(path) else _remote("hash", path, digest_stream)


def write_bytes(location: Any, data: bytes) -> str:
    """Write atomically (tmp + rename locally; object PUTs are atomic already); return the sha256.

    A remote write is one PUT of the whole object (a multipart upload above 100 MB, aborted if it fails, so no
    parts linger); a PUT retried after a lost response writes the same bytes to the same key again.
    """
    path = as_path(location)
    if is_local(path):
        target = Path(path.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(target)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    else:
        _remote("write", path, path.fs.pipe_file, path.path, data)
    return sha256_bytes(data)


def write_file(location: Any, local: Path) -> str:
    """:func:`write_bytes` for a local file, streamed (a 600 MB tile table never sits in memory); the sha256."""
    path = as_path(location)
    digest = hashlib.sha256()
    with open(local, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    if is_local(path):
        target = Path(path.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(target)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    else:
        _remote("write", path, path.fs.put_file, str(local), path.path)
    return digest.hexdigest()


TMP_SUFFIX = ".imaging-tmp"
_WRITER = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:32] or "host"
STALE_TMP_S = 6 * 3600  # a temporary file this old is abandoned whoever wrote it


def temporary_sibling(target: Path) -> Path:
    """A hidden name beside ``target`` for writing it whole before a rename; it names this host and process so
    :func:`sweep_temporary` can tell an abandoned one from one being written."""
    return target.with_name(f".{target.name}.{_WRITER}-{os.getpid()}-{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def sweep_temporary(root: Any, *, now: float | None = None) -> int:
    """Remove the temporary files a killed writer left under a local ``root``: those of this host whose process
    is gone, and any older than ``STALE_TMP_S``.  Object stores need nothing (their PUTs are atomic)."""
    path = as_path(root)
    if not is_local(path) or not path.exists():
        return 0
    now = time.time() if now is None else now
    removed = 0
    for folder, _dirs, files in os.walk(path.path):
        for name in files:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                removed += _remove_if_abandoned(os.path.join(folder, name), name[:-len(TMP_SUFFIX)], now)
    return removed


def sweep_temporary_siblings(target: Path, *, now: float | None = None) -> int:
    """:func:`sweep_temporary` for the temporary files of one local ``target`` only (and what a program writing
    them added, such as a database's ``.wal``), without walking its folder's subfolders."""
    now = time.time() if now is None else now
    prefix, removed = f".{target.name}.", 0
    if not target.parent.is_dir():
        return 0
    for entry in os.scandir(target.parent):
        if entry.name.startswith(prefix) and TMP_SUFFIX in entry.name and entry.is_file():
            removed += _remove_if_abandoned(entry.path, entry.name[:entry.name.index(TMP_SUFFIX)], now)
    return removed


def _remove_if_abandoned(full: str, stem: str, now: float) -> int:
    """1 if the temporary file ``full`` (``stem``: its name up to the suffix) was removed: written by a process of
    this host that is gone, or older than ``STALE_TMP_S`` whoever wrote it."""
    writer = stem.rsplit(".", 1)[-1].split("-")
    mine_and_dead = len(writer) == 3 and writer[0] == _WRITER and writer[1].isdigit() and not _alive(int(writer[1]))
    try:
        if mine_and_dead or now - os.path.getmtime(full) > STALE_TMP_S:
            os.remove(full)
            return 1
    except FileNotFoundError:
        pass
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(location: Any, obj: Any) -> str:
    return write_bytes(location, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(location: Any) -> Any:
    return json.loads(read_bytes(location))


def download(src: Any, local: Path) -> Path:
    """Make a local copy for libraries that need a real file (openslide, SimpleITK)."""
    src = as_path(src)
    local.parent.mkdir(parents=True, exist_ok=True)
    if is_local(src):
        shutil.copyfile(src.path, local)  # streamed: a multi-GB slide never sits in memory
    else:
        try:
            _remote("download", src, src.fs.get_file, src.path, str(local))
        except BaseException:
            local.unlink(missing_ok=True)  # no partial copy left for a later reader
            raise
    return local


def upload_dir(local_dir: Path, dest: Any) -> list[dict]:
    """Publish every file of ``local_dir`` under ``dest``; returns [{path, sha256, bytes}] sorted by path."""
    out = []
    for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        rel = file.relative_to(local_dir).as_posix()
        out.append({"path": rel, "sha256": write_file(join(dest, rel), file), "bytes": file.stat().st_size})
    return out


def publish_manifest(dest: Any, manifest: dict) -> str:
    """Write the manifest last; its presence means the study's outputs are complete."""
    return write_json(join(dest, MANIFEST), manifest)


def read_manifest(dest: Any) -> dict | None:
    try:
        return read_json(join(dest, MANIFEST))
    except FileNotFoundError:
        return None


def quarantine(data: bytes, quarantine_root: Any, *, specialty: str, reason: str, message: str, stage: str,
               source_uri: str, suffix: str = "") -> dict:
    """Copy an offending input into quarantine with reason.json; idempotent on the input's checksum.

    Returns the warehouse row: it carries the checksum and quarantine URI, never the raw source path
    (file names in landing buckets can hold patient names); ``first_seen`` (not stored) tells whether this
    call put it there or it was quarantined before.
    """
    checksum = sha256_bytes(data)
    folder = join(quarantine_root, "quarantine", specialty, checksum[:16])
    reason_path = join(folder, "reason.json")
    row = {"input_sha256": checksum, "specialty": specialty, "stage": stage, "reason": reason,
           "message": message, "quarantine_uri": str(folder), "input_bytes": len(data)}
    first_seen = not exists(reason_path)
    if first_seen:
        write_bytes(join(folder, "input" + suffix), data)
        write_json(reason_path, {**row, "source_uri": source_uri,
                                 "quarantined_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    return {**row, "first_seen": first_seen}


def quarantine_rows(quarantine_root: Any, specialty: str) -> list[dict]:
    """All quarantine reasons of a specialty, as warehouse rows (source path dropped)."""
    rows = []
    for info in list_objects(join(quarantine_root, "quarantine", specialty)):
        if info.relpath.endswith("reason.json"):
            record = read_json(info.uri)
            record.pop("source_uri", None)
            rows.append(record)
    return rows
