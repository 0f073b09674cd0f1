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

import contextlib
import gzip
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imaging_tasks import storage
from imaging_tasks.errors import BadInput
from imaging_tasks.formats import file_kind
from imaging_tasks.phi_audit import IdentifyingValues, PHILeak, assert_no_leaks, retained_by, values_of_input

from .dicom import DeidOptions, deidentify_bytes, reading_source, unexpected
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
                    quarantine=None, workers: int | None = 1) -> dict:
    """De-identify every file under ``src`` into ``dst``; returns the report (also written to DST).

    ``workers``: processes de-identifying files side by side (1: all in this process; None: the machine's
    cores, fewer for a small tree: :func:`pool_size`).  Each worker reads its inputs, quarantines what it refuses
    and writes its outputs itself, under a temporary name beside the target (a bucket DST: a local staging
    file); this process decides, in listing order, what is kept (of two different outputs for one target, the
    first) and writes the report, so outputs and report are those of ``workers=1``, byte for byte.  At most a
    few files per worker are in flight, and no file's bytes travel between processes (bounded memory).
    """
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
    n_workers = pool_size(workers, len(objects))
    with tempfile.TemporaryDirectory(prefix="deid-tree-") as tmp:
        root = storage.as_path(dst)
        job = _Job(dst=str(root), quarantine=quarantine, key=key, demo=demo, options=options, tmp=tmp,
                   staged=n_workers > 1, local=storage.is_local(root))
        outcomes = _pooled(objects, job, n_workers) if n_workers > 1 else \
            ((n, obj, _handle(n, obj, job)) for n, obj in enumerate(objects))
        with contextlib.closing(outcomes):  # an error here stops the pool before its staging folder goes
            _collect(outcomes, report, written, job)
    report["seconds"] = round(time.time() - started, 3)
    report["files_per_second"] = round(len(objects) / report["seconds"], 1) if report["seconds"] else None
    storage.write_json(storage.join(dst, REPORT_NAME), report)
    log.info("de-identified tree", extra={k: v for k, v in report.items()
                                          if k not in ("quarantined", "skipped", "deidentified_files")})
    return report


def _collect(outcomes, report: dict, written: dict[str, str], job: _Job) -> None:
    """Each input's outcome into the report, in listing order, whichever process did the work; an output is
    written (or its staged file moved) here, unless another input's different output took its name first."""
    key, counts = job.key, report["by_kind"]
    for _n, obj, done in outcomes:
        kind = file_kind(obj.relpath)
        ident = pseudo_id(key, obj.relpath, "input")
        if done.status == "unreadable":
            report["skipped"].append({"input": ident, "reason": "unreadable_source",
                                      "message": f"the file could not be read ({done.error}); "
                                      "check it exists and is readable, then re-run"})
            continue
        if done.status == "ok":
            if written.setdefault(done.target, done.digest) == done.digest:
                done.publish(job)
                counts[kind] += 1
                report["deidentified"] += 1
                report["deidentified_files"].append(
                    {"input": ident, "kind": kind, "output": "/".join([*pseudo_dirs(key, obj.relpath),
                                                                       PurePosixPath(done.target).name])})
                continue
            done.discard()
            refusal = ("duplicate_instance", "another input of this folder has the same SOP Instance UID "
                       "and different content; the first one was written, this one is kept in quarantine "
                       "- find out which is right at the source", "deidentify")
            done = _quarantined(job, obj, done.data if done.data is not None else storage.read_bytes(obj.uri),
                                refusal)
        reason, message, _stage = done.refusal
        report["quarantined"].append({"input": ident, "kind": kind, "reason": reason, "message": message,
                                      "sha256": done.sha256})


# ------------------------------------------------------------------------------- one input, in any process

@dataclass(frozen=True)
class _Job:
    """What every input of a run shares (sent once to each worker process)."""

    dst: str
    quarantine: str
    key: bytes
    demo: bool
    options: DeidOptions
    tmp: str
    staged: bool  # outputs written by workers under a temporary name, kept or dropped by the parent
    local: bool  # DST is a local folder (a staged output is renamed into place)


@dataclass
class _Done:
    """One input's outcome.  ``ok``: ``target``, ``digest`` and the output itself: ``out`` (in process) or a
    file ``staged`` by a worker; ``quarantined``: ``refusal`` (reason, message, stage) and the input's
    ``sha256`` (already in quarantine); ``unreadable``: ``error``, the exception's type."""

    status: str
    target: str = ""
    digest: str = ""
    out: bytes | None = None
    staged: str = ""
    data: bytes | None = None  # the input, in process only (a duplicate is quarantined from it)
    refusal: tuple | None = None
    sha256: str = ""
    error: str = ""

    def publish(self, job: _Job) -> None:
        """Write the output to its target (a staged file: moved there)."""
        if not self.staged:
            storage.write_bytes(self.target, self.out)
        elif job.local:
            os.replace(self.staged, storage.as_path(self.target).path)
        else:
            storage.write_file(self.target, Path(self.staged))
            Path(self.staged).unlink(missing_ok=True)

    def discard(self) -> None:
        if self.staged:
            Path(self.staged).unlink(missing_ok=True)


def _handle(n: int, obj: storage.ObjectInfo, job: _Job) -> _Done:
    """Read one input, de-identify and audit it (:func:`_one`); a refused input is quarantined here, where its
    bytes are; a worker stages its output (``job.staged``)."""
    try:
        data = storage.read_bytes(obj.uri)
    except Exception as exc:  # noqa: BLE001 - vanished, unreadable: nothing to quarantine
        return _Done("unreadable", error=type(exc).__name__)
    target, out, refusal = _one(data, obj, file_kind(obj.relpath), n, Path(job.tmp), job.dst, key=job.key,
                                demo=job.demo, options=job.options)
    if refusal is not None:
        return _quarantined(job, obj, data, refusal)
    done = _Done("ok", target=str(target), digest=storage.sha256_bytes(out))
    if not job.staged:
        done.out, done.data = out, data
        return done
    if job.local:
        final = Path(target.path)
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = storage.temporary_sibling(final)  # swept like any writer's if this run is killed
    else:
        staged = Path(job.tmp) / f"staged-{n}"
    try:
        staged.write_bytes(out)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    done.staged = str(staged)
    return done


def _died(job: _Job, obj: storage.ObjectInfo) -> _Done:
    """The input whose worker process died twice: quarantined from here."""
    try:
        data = storage.read_bytes(obj.uri)
    except Exception as exc:  # noqa: BLE001 - vanished meanwhile
        return _Done("unreadable", error=type(exc).__name__)
    return _quarantined(job, obj, data, ("deid_error", "the process de-identifying this file died (killed, out of "
                                         "memory or a crash in a library); it was quarantined - report it with the "
                                         "file's sha256", "deidentify"))


def _quarantined(job: _Job, obj: storage.ObjectInfo, data: bytes, refusal: tuple) -> _Done:
    reason, message, stage = refusal
    row = storage.quarantine(data, job.quarantine, specialty="deidentify", reason=reason, message=message,
                             stage=stage, source_uri=obj.uri)
    return _Done("quarantined", refusal=refusal, sha256=row["input_sha256"])


# ------------------------------------------------------------------------------- worker processes

FILES_PER_WORKER = 64  # a worker process costs ~0.3 s to start: fewer files than this each do not pay for it
_WORKER_JOB: list = []


def pool_size(workers: int | None, files: int) -> int:
    """Worker processes for ``files`` inputs: ``workers`` (at most one per file), or for None the machine's cores,
    fewer for a small tree (at least FILES_PER_WORKER files each); 1 (in process) when bucket URIs resolve through
    Airflow connections (``storage.resolving_uris``: a worker process could not open them)."""
    if storage._RESOLVER.get() is not None:
        return 1
    if workers is None:
        return max(1, min(os.cpu_count() or 1, files // FILES_PER_WORKER))
    return max(1, min(workers, files))


def _init_worker(job: _Job, level: int, fmt: str | None) -> None:
    if fmt:
        logging.basicConfig(level=level, format=fmt)
    _WORKER_JOB[:] = [job]


def _work(batch: list[tuple[int, storage.ObjectInfo]]) -> list[_Done]:
    return [_handle(n, obj, _WORKER_JOB[0]) for n, obj in batch]


def _pooled(objects: list[storage.ObjectInfo], job: _Job, workers: int, *, work=_work):
    """``(n, obj, _Done)`` for every input, in listing order, from a pool of ``workers`` processes (forkserver:
    no fork of a process that may run threads).  Files go out in small batches, at most ``4 x workers`` batches
    in flight.  A worker that dies (killed, out of memory, a crash in a C library) breaks the pool without
    saying which file did it: the files in flight whose results were lost then run again one at a time in a
    fresh pool, the one that kills its worker again is quarantined (``deid_error``), and the others go on.
    The caller publishes or discards each staged output before it asks for the next outcome: what is still
    staged when the pool is done is swept.  ``work``: what a worker runs on a batch (:func:`_work`; tests give
    one that dies)."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # workers fork from a server that imported the de-identifier once
    root = logging.getLogger()
    fmt = root.handlers[0].formatter._fmt if root.handlers and root.handlers[0].formatter else None

    def pool(size: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(size, mp_context=context, initializer=_init_worker,
                                   initargs=(job, root.level, fmt))

    def lost(future) -> bool:
        return not future.done() or future.cancelled() or future.exception() is not None

    chunk = max(1, min(16, len(objects) // (workers * 16)))
    items = list(enumerate(objects))
    batches = iter([items[i:i + chunk] for i in range(0, len(items), chunk)])
    in_flight: deque = deque()
    executor = pool(workers)
    try:
        while True:
            while len(in_flight) < 4 * workers:
                batch = next(batches, None)
                if batch is None:
                    break
                in_flight.append((batch, executor.submit(work, batch)))
            if not in_flight:
                return
            batch, future = in_flight[0]
            try:
                results = future.result()
            except BrokenProcessPool:
                results = None
            if results is not None:
                in_flight.popleft()
                yield from ((n, obj, done) for (n, obj), done in zip(batch, results))
                continue
            executor.shutdown(wait=True, cancel_futures=True)
            log.warning("a de-identification worker process died; the files whose results it took with it run "
                        "again one at a time")
            executor = pool(1)
            while in_flight:
                batch, future = in_flight.popleft()
                if not lost(future):
                    yield from ((n, obj, done) for (n, obj), done in zip(batch, future.result()))
                    continue
                for n, obj in batch:
                    try:
                        done = executor.submit(work, [(n, obj)]).result()[0]
                    except BrokenProcessPool:
                        executor.shutdown(wait=True, cancel_futures=True)
                        executor = pool(1)
                        done = _died(job, obj)
                    yield n, obj, done
            executor.shutdown(wait=True)
            executor = pool(workers)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if job.local:  # what dead workers staged, or live ones for results never asked for (the caller failed)
            storage.sweep_temporary(job.dst)


def _one(data: bytes, obj: storage.ObjectInfo, kind: str, n: int, tmp: Path, dst, *, key: bytes, demo: bool,
         options: DeidOptions):
    """One input, inside its own boundary: ``(target, bytes, None)`` to write, or ``(None, None, (reason,
    message, stage))`` to quarantine."""
    folder = storage.join(dst, *pseudo_dirs(key, obj.relpath))
    try:
        if kind == "dicom":  # one parse: the audit's values are read from the de-identifier's parse
            reader = IdentifyingValues(retained_by(options))
            with reading_source(reader.source):
                out, info = deidentify_bytes(data, key, options, demo=demo)
            values = reader.values
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


__all__ = ["deidentify_tree", "list_inputs", "pseudo_dirs", "pool_size", "REPORT_NAME"]
