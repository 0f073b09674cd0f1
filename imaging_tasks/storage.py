"""Buckets and the lake layout, through one code path for ``file://``, ``s3://`` and ``gs://``.

Locations are ``upath.UPath`` objects (fsspec underneath).  Airflow's ``ObjectStoragePath`` is a UPath,
so the glue can pass one carrying connection credentials and the domain code stays the same.

Layout under a lake root::

    anonymized/<specialty>/<pseudo patient>/<pseudo study>/...   de-identified inputs
    derived/<specialty>/<pseudo patient>/<pseudo study>/...      outputs + QC PNGs + _MANIFEST.json
    quarantine/<specialty>/<sha256[:16]>/                         offending input + reason.json (PHI zone)
    work/<specialty>/<pseudo study>.json                          study manifests pointing at raw inputs (PHI zone)
    runs/<specialty>/<run id>/                                    lineage records of each task

A study's outputs become visible only when ``_MANIFEST.json`` is written, last: readers that wait for
the manifest never see a half-written study.  Local writes go through a temporary name and a rename.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upath import UPath

MANIFEST = "_MANIFEST.json"
CHUNK = 8 * 1024 * 1024


def as_path(location: Any) -> UPath:
    """A UPath for a URI, local path or an existing UPath/ObjectStoragePath (returned unchanged)."""
    if isinstance(location, UPath):
        return location
    text = os.fspath(location) if isinstance(location, os.PathLike) else str(location)
    return UPath(text)


def is_local(path: UPath) -> bool:
    return getattr(path, "protocol", "") in ("", "file", "local")


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
    """Every file under ``root`` (recursively) modified in [since, until); names starting '.' or '_' are skipped."""
    root = as_path(root)
    if not root.exists():
        return []
    fs, base = root.fs, root.path.rstrip("/")
    out = []
    for name, info in sorted(fs.find(base, detail=True).items()):
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
            return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    return None


def read_bytes(location: Any) -> bytes:
    return as_path(location).read_bytes()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of(location: Any) -> str:
    digest = hashlib.sha256()
    with as_path(location).open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes(location: Any, data: bytes) -> str:
    """Write atomically (tmp + rename locally; object PUTs are atomic already); return the sha256."""
    path = as_path(location)
    if is_local(path):
        target = Path(path.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    else:
        path.write_bytes(data)
    return sha256_bytes(data)


def write_json(location: Any, obj: Any) -> str:
    return write_bytes(location, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(location: Any) -> Any:
    return json.loads(as_path(location).read_bytes())


def download(src: Any, local: Path) -> Path:
    """Make a local copy for libraries that need a real file (openslide, SimpleITK)."""
    src = as_path(src)
    local.parent.mkdir(parents=True, exist_ok=True)
    if is_local(src):
        local.write_bytes(Path(src.path).read_bytes())
    else:
        src.fs.get(src.path, str(local))
    return local


def upload_dir(local_dir: Path, dest: Any) -> list[dict]:
    """Publish every file of ``local_dir`` under ``dest``; returns [{path, sha256, bytes}] sorted by path."""
    out = []
    for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        rel = file.relative_to(local_dir).as_posix()
        data = file.read_bytes()
        out.append({"path": rel, "sha256": write_bytes(join(dest, rel), data), "bytes": len(data)})
    return out


def publish_manifest(dest: Any, manifest: dict) -> str:
    """Write the manifest last; its presence means the study's outputs are complete."""
    return write_json(join(dest, MANIFEST), manifest)


def read_manifest(dest: Any) -> dict | None:
    path = join(dest, MANIFEST)
    return read_json(path) if path.exists() else None


def quarantine(data: bytes, quarantine_root: Any, *, specialty: str, reason: str, message: str, stage: str,
               source_uri: str, suffix: str = "") -> dict:
    """Copy an offending input into quarantine with reason.json; idempotent on the input's checksum.

    Returns the warehouse row: it carries the checksum and quarantine URI, never the raw source path
    (file names in landing buckets can hold patient names).
    """
    checksum = sha256_bytes(data)
    folder = join(quarantine_root, "quarantine", specialty, checksum[:16])
    reason_path = join(folder, "reason.json")
    row = {"input_sha256": checksum, "specialty": specialty, "stage": stage, "reason": reason,
           "message": message, "quarantine_uri": str(folder), "input_bytes": len(data)}
    if not reason_path.exists():
        write_bytes(join(folder, "input" + suffix), data)
        write_json(reason_path, {**row, "source_uri": source_uri,
                                 "quarantined_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    return row


def quarantine_rows(quarantine_root: Any, specialty: str) -> list[dict]:
    """All quarantine reasons of a specialty, as warehouse rows (source path dropped)."""
    rows = []
    for info in list_objects(join(quarantine_root, "quarantine", specialty)):
        if info.relpath.endswith("reason.json"):
            record = read_json(info.uri)
            record.pop("source_uri", None)
            rows.append(record)
    return rows
