"""De-identify a whole folder or bucket prefix: DICOM, whole-slide images and NIfTI, with a report.

The relative structure of SRC is kept, but every folder and file name is replaced by a keyed pseudonym
(landing trees are often named after patients: ``DOE^JOHN/CT 2024-03-01/IM0001``).  The same folder
maps to the same pseudonym under the same key, so series stay together and re-runs are byte-identical.
DICOM files are named after their new SOPInstanceUID.

Every output is audited against its own input's identifying values before it is written (fail closed);
bad inputs go to a separate quarantine location, never into DST, because quarantine keeps the raw file.

The report (``DST/deidentify-report.json``) accounts for every file under SRC, each named by a keyed
pseudonym of its relative path (``input``: ``pseudo_id(key, relpath, "input")``, never the path itself):
``deidentified_files`` (with the output's path under DST), ``quarantined`` (reason, message, sha256) or
``skipped`` (reason, message): names beginning with ``.`` or ``_`` (hidden files and folders: version control,
OS metadata, ground truth) are not de-identified, and are listed there as ``hidden_name``; a file that cannot
be read is ``unreadable_source``.  Each file is handled inside its own boundary: whatever goes wrong with one
input (a BadInput, an audit failure, an unexpected exception) quarantines that input and the batch goes on.
Relative SRC, DST and quarantine paths are taken from the current directory.
"""
from __future__ import annotations

import gzip
import logging
import tempfile
import time
from pathlib import Path, PurePosixPath

from imaging_tasks import storage
from imaging_tasks.dicom_io import read_header
from imaging_tasks.errors import BadInput
from imaging_tasks.formats import file_kind
from imaging_tasks.phi_audit import PHILeak, assert_no_leaks, dicom_identifying_values, retained_by, values_of_input

from .dicom import DeidOptions, deidentify_bytes, unexpected
from .nifti import deidentify_nifti
from .pseudonym import pseudo_id
from .slide import deidentify_svs

log = logging.getLogger(__name__)
REPORT_NAME = "deidentify-report.json"
HIDDEN_PREFIXES = (".", "_")


def _suffix(relpath: str, kind: str) -> str:
    name = relpath.lower()
    if kind == "nifti":
        return ".nii.gz" if name.endswith(".gz") else ".nii"
    if kind == "slide":
        return PurePosixPath(name).suffix
    return ".dcm"


def pseudo_dirs(key: bytes, relpath: str) -> list[str]:
    """Keyed pseudonyms for the folders of ``relpath`` (each folder's full path is hashed, so two
    patients' folders both called ``CT`` stay apart)."""
    parts = PurePosixPath(relpath).parts[:-1]
    return [pseudo_id(key, "/".join(parts[: i + 1]), "dir") for i in range(len(parts))]


def _hidden(relpath: str) -> bool:
    return any(part.startswith(HIDDEN_PREFIXES) for part in PurePosixPath(relpath).parts)


def list_inputs(src) -> tuple[list[storage.ObjectInfo], list[tuple[str, int]]]:
    """(files to de-identify, hidden files as (relpath, size)): every file under ``src``."""
    visible = storage.list_objects(src)
    root = storage.as_path(src)
    fs, base = root.fs, root.path.rstrip("/")
    hidden: list[tuple[str, int]] = []
    try:
        if storage.is_local(root) and not root.exists():
            return visible, hidden
        if not storage.is_local(root):
            fs.invalidate_cache(base)
        for name, info in sorted(fs.find(base, detail=True).items()):
            rel = name[len(base):].lstrip("/")
            if info.get("type") != "directory" and _hidden(rel):
                hidden.append((rel, int(info.get("size") or 0)))
    except FileNotFoundError:
        pass
    return visible, hidden


def deidentify_tree(src, dst, *, key: bytes, demo: bool, options: DeidOptions = DeidOptions(),
                    quarantine=None) -> dict:
    """De-identify every file under ``src`` into ``dst``; returns the report (also written to DST)."""
    quarantine = str(storage.as_path(quarantine or str(dst).rstrip("/") + "-quarantine"))
    started = time.time()
    counts = {"dicom": 0, "slide": 0, "nifti": 0}
    report = {"inputs": 0, "deidentified": 0, "by_kind": counts, "quarantined": [], "skipped": [],
              "deidentified_files": [], "demo_key": demo,
              "options": [n for n in DeidOptions.__dataclass_fields__ if getattr(options, n)],
              "quarantine": str(quarantine)}
    objects, hidden = list_inputs(src)
    report["inputs"] = len(objects) + len(hidden)
    for rel, size in hidden:
        report["skipped"].append({"input": pseudo_id(key, rel, "input"), "reason": "hidden_name", "bytes": size,
                                  "message": "a file or folder name beginning with '.' or '_' (version control, "
                                  "OS metadata, ground truth): not de-identified; rename it to include it"})
    written: dict[str, str] = {}  # output -> sha256: two inputs never silently overwrite each other
    with tempfile.TemporaryDirectory(prefix="deid-tree-") as tmp:
        for n, obj in enumerate(objects):
            kind = file_kind(obj.relpath)
            ident = pseudo_id(key, obj.relpath, "input")
            try:
                data = storage.read_bytes(obj.uri)
            except Exception as exc:  # noqa: BLE001 - vanished, unreadable: nothing to quarantine
                report["skipped"].append({"input": ident, "reason": "unreadable_source",
                                          "message": f"the file could not be read ({type(exc).__name__}); "
                                          "check it exists and is readable, then re-run"})
                continue
            target, out, refusal = _one(data, obj, kind, n, Path(tmp), dst, key=key, demo=demo, options=options)
            if refusal is None:
                digest = storage.sha256_bytes(out)
                if written.setdefault(str(target), digest) != digest:
                    refusal = ("duplicate_instance", "another input of this folder has the same SOP Instance UID "
                               "and different content; the first one was written, this one is kept in quarantine "
                               "- find out which is right at the source", "deidentify")
            if refusal is None:
                storage.write_bytes(target, out)
                counts[kind] += 1
                report["deidentified"] += 1
                report["deidentified_files"].append(
                    {"input": ident, "kind": kind, "output": "/".join([*pseudo_dirs(key, obj.relpath), target.name])})
                continue
            reason, message, stage = refusal
            row = storage.quarantine(data, quarantine, specialty="deidentify", reason=reason, message=message,
                                     stage=stage, source_uri=obj.uri)
            report["quarantined"].append({"input": ident, "kind": kind, "reason": reason, "message": message,
                                          "sha256": row["input_sha256"]})
    report["seconds"] = round(time.time() - started, 3)
    report["files_per_second"] = round(len(objects) / report["seconds"], 1) if report["seconds"] else None
    storage.write_json(storage.join(dst, REPORT_NAME), report)
    log.info("de-identified tree", extra={k: v for k, v in report.items()
                                          if k not in ("quarantined", "skipped", "deidentified_files")})
    return report


def _one(data: bytes, obj: storage.ObjectInfo, kind: str, n: int, tmp: Path, dst, *, key: bytes, demo: bool,
         options: DeidOptions):
    """One input, inside its own boundary: ``(target, bytes, None)`` to write, or ``(None, None, (reason,
    message, stage))`` to quarantine."""
    folder = storage.join(dst, *pseudo_dirs(key, obj.relpath))
    try:
        if kind == "dicom":
            out, info = deidentify_bytes(data, key, options, demo=demo)
            values = dicom_identifying_values(read_header(data), retained_by(options))
            target = storage.join(folder, info["sop_uid"] + ".dcm")
        else:
            local = tmp / f"in-{n}{_suffix(obj.relpath, kind)}"
            local.write_bytes(data)
            result = tmp / f"out-{n}{_suffix(obj.relpath, kind)}"
            values = values_of_input(str(local))
            if kind == "nifti":
                deidentify_nifti(local, result)
            else:
                deidentify_svs(local, result, key)
            out = result.read_bytes()
            local.unlink(missing_ok=True)
            result.unlink(missing_ok=True)
            stem = pseudo_id(key, storage.sha256_bytes(data), "file")
            target = storage.join(folder, stem + _suffix(obj.relpath, kind))
        blob = out
        if kind == "nifti" and target.name.endswith(".gz"):
            blob = gzip.decompress(out)
        assert_no_leaks(values, blob, f"{kind} output {target.name}")
        return target, out, None
    except BadInput as exc:
        return None, None, (exc.reason, exc.message, "deidentify")
    except PHILeak as exc:  # never expected: the profile failed on this input; keep it out of DST
        return None, None, ("phi_audit_failed", str(exc), "audit")
    except Exception as exc:  # noqa: BLE001 - the file boundary: one input never stops the batch
        bad = unexpected(exc, f"de-identification of a {kind} file")
        return None, None, (bad.reason, bad.message, "deidentify")


__all__ = ["deidentify_tree", "list_inputs", "pseudo_dirs", "REPORT_NAME"]
