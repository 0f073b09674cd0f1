"""De-identify a whole folder or bucket prefix: DICOM, whole-slide images and NIfTI, with a report.

The relative structure of SRC is kept, but every folder and file name is replaced by a keyed pseudonym
(landing trees are often named after patients: ``DOE^JOHN/CT 2024-03-01/IM0001``).  The same folder
maps to the same pseudonym under the same key, so series stay together and re-runs are byte-identical.
DICOM files are named after their new SOPInstanceUID.

Every output is audited against its own input's identifying values before it is written (fail closed);
bad inputs go to a separate quarantine location, never into DST, because quarantine keeps the raw file.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path, PurePosixPath

from imaging_tasks import storage
from imaging_tasks.errors import BadInput

from .dicom import DeidOptions, deidentify_bytes
from .pseudonym import pseudo_id

log = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
REPORT_NAME = "deidentify-report.json"


def kind_of(relpath: str) -> str:
    from imaging_tasks.index import SLIDE_SUFFIXES

    name = relpath.lower()
    if name.endswith(SLIDE_SUFFIXES):
        return "slide"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    return "dicom"


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


def deidentify_tree(src, dst, *, key: bytes, demo: bool, options: DeidOptions = DeidOptions(),
                    quarantine=None) -> dict:
    """De-identify every file under ``src`` into ``dst``; returns the report (also written to DST)."""
    from imaging_tasks.dicom_io import read_header
    from imaging_tasks.phi_audit import (PHILeak, assert_no_leaks, dicom_identifying_values, retained_by,
                                         values_of_input)

    from .nifti import deidentify_nifti
    from .slide import deidentify_svs

    quarantine = quarantine or str(dst).rstrip("/") + "-quarantine"
    started = time.time()
    counts = {"dicom": 0, "slide": 0, "nifti": 0}
    report = {"deidentified": 0, "by_kind": counts, "quarantined": [], "demo_key": demo,
              "options": [n for n in DeidOptions.__dataclass_fields__ if getattr(options, n)],
              "quarantine": str(quarantine)}
    objects = storage.list_objects(src)
    with tempfile.TemporaryDirectory(prefix="deid-tree-") as tmp:
        for n, obj in enumerate(objects):
            kind = kind_of(obj.relpath)
            data = storage.read_bytes(obj.uri)
            folder = storage.join(dst, *pseudo_dirs(key, obj.relpath))
            try:
                if kind == "dicom":
                    values = dicom_identifying_values(read_header(data), retained_by(options))
                    out, info = deidentify_bytes(data, key, options, demo=demo)
                    target = storage.join(folder, info["sop_uid"] + ".dcm")
                else:
                    local = Path(tmp) / f"in-{n}{_suffix(obj.relpath, kind)}"
                    local.write_bytes(data)
                    result = Path(tmp) / f"out-{n}{_suffix(obj.relpath, kind)}"
                    values = values_of_input(str(local))
                    if kind == "nifti":
                        deidentify_nifti(local, result)
                    else:
                        deidentify_svs(local, result, key)
                    out = result.read_bytes()
                    stem = pseudo_id(key, storage.sha256_bytes(data), "file")
                    target = storage.join(folder, stem + _suffix(obj.relpath, kind))
                blob = out
                if kind == "nifti" and target.name.endswith(".gz"):
                    import gzip
                    blob = gzip.decompress(out)
                assert_no_leaks(values, blob, f"{kind} output {target.name}")
            except BadInput as exc:
                row = storage.quarantine(data, quarantine, specialty="deidentify", reason=exc.reason,
                                         message=exc.message, stage="deidentify", source_uri=obj.uri)
                report["quarantined"].append({"kind": kind, "reason": exc.reason, "message": exc.message,
                                              "sha256": row["input_sha256"]})
                continue
            except PHILeak as exc:  # never expected: the profile failed on this input; keep it out of DST
                row = storage.quarantine(data, quarantine, specialty="deidentify", reason="phi_audit_failed",
                                         message=str(exc), stage="audit", source_uri=obj.uri)
                report["quarantined"].append({"kind": kind, "reason": "phi_audit_failed", "message": str(exc),
                                              "sha256": row["input_sha256"]})
                continue
            storage.write_bytes(target, out)
            counts[kind] += 1
            report["deidentified"] += 1
    report["seconds"] = round(time.time() - started, 3)
    report["files_per_second"] = round(len(objects) / report["seconds"], 1) if report["seconds"] else None
    storage.write_json(storage.join(dst, REPORT_NAME), report)
    log.info("de-identified tree", extra={k: v for k, v in report.items() if k != "quarantined"})
    return report


__all__ = ["deidentify_tree", "pseudo_dirs", "kind_of", "REPORT_NAME"]
