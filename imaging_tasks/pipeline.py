"""The steps every specialty chains: index -> de-identify -> process -> load.

Each takes locations, a key and small dicts, and returns small dicts with pseudonyms, URIs and counts:
what a task may put in XCom.  The same functions back the ``imaging-tasks`` CLI and the Airflow tasks.
"""
from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import imaging_tasks
from imaging_tasks import metrics, storage
from imaging_tasks.contracts import StudyRecord, is_ok, study_record, with_facts, with_status
from imaging_tasks.errors import BadInput
from imaging_tasks.index import entry_to_manifest, index_objects
from imaging_tasks.lake import Lake, safe_name
from imaging_tasks.ledger import options_hash, warehouse_row
from imaging_tasks.progress import Progress
from imaging_tasks.specialties import get as get_specialty

log = logging.getLogger(__name__)
CODE_VERSION = imaging_tasks.__version__
DEID_MANIFEST = "_DEID.json"
STEP_RESULT = "step-result.json"  # an intermediate step's metrics, findings, tables; merged when the study publishes
# Per-study warehouse tables a step may fill through ``result["tables"]`` (beyond metrics and findings).
STUDY_TABLES = ("roi_features",)


@dataclass(frozen=True)
class RunContext:
    """Who is running a step; lineage rows are keyed by it."""

    dag_id: str = "imaging-tasks-cli"
    run_id: str = "cli"
    task_id: str = "cli"
    map_index: int = -1


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def record_lineage(lake: Lake, run: RunContext, *, study: str, inputs: list[dict], outputs: list[dict],
                   device: str | None, started: float, status: str = "success") -> None:
    """One processing_runs row per (task, study), written next to the run so the load step finds it."""
    ended = time.time()
    row = {"dag_id": run.dag_id, "run_id": run.run_id, "task_id": run.task_id, "map_index": run.map_index,
           "study_id": study, "specialty": lake.specialty, "inputs": inputs, "outputs": outputs,
           "code_version": CODE_VERSION, "device": device,
           "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
           "ended_at": dt.datetime.fromtimestamp(ended, dt.timezone.utc).isoformat(),
           "duration_s": round(ended - started, 3), "status": status}
    name = f"{safe_name(run.task_id)}.{run.map_index}.{study}.json"
    storage.write_json(storage.join(lake.runs(run.run_id), name), row)


def _quarantine(lake: Lake, data: bytes, exc: BadInput, *, stage: str, source_uri: str, suffix: str = "") -> dict:
    row = storage.quarantine(data, lake.root, specialty=lake.specialty, reason=exc.reason, message=exc.message,
                             stage=stage, source_uri=source_uri, suffix=suffix)
    log.warning("%s: quarantined an input at %s: %s (%s)%s; quarantine/%s/%s", lake.specialty, stage, exc.reason,
                exc.message, "" if row["first_seen"] else " [already in quarantine from an earlier run]",
                lake.specialty, row["input_sha256"][:16])
    if row.get("first_seen", True):
        metrics.input_quarantined(lake.specialty, stage, exc.reason)
    return row


def _suffix(name: str) -> str:
    """A file's suffix for its quarantined copy, ``.nii.gz`` whole."""
    return ".nii.gz" if str(name).lower().endswith(".nii.gz") else Path(str(name)).suffix


# --------------------------------------------------------------------------- index
def index_landing(landing: Any, lake: Lake, *, key: bytes, prefix: str = "", since: dt.datetime | None = None,
                  until: dt.datetime | None = None, reprocess: bool = False, now: dt.datetime | None = None,
                  options: dict | None = None,
                  run: RunContext = RunContext()) -> dict:
    """List what arrived (in [since, until) when given), group it into studies, skip studies already done.

    Done means *loaded* (or quarantined) with the same inputs, per the ledger; a study published but not yet
    loaded is left to the load step (which loads every pending study) rather than processed again.  Processing
    ``options`` that differ from those a loaded study was made with make it due again.  ``options``: the run's
    values of the specialty's options (index-stage ones decide readiness; result-changing ones key the ledger);
    missing ones take their defaults.
    """
    started = time.time()
    root = storage.join(landing, prefix) if prefix else storage.as_path(landing)
    swept = storage.sweep_temporary(lake.root)  # half-written files of a killed run
    if swept:
        log.info("lake: removed %d temporary file(s) left by a killed writer", swept)
    objects = storage.list_objects(root, since=since, until=until)

    def quarantine(obj: storage.ObjectInfo, exc: BadInput) -> dict:
        return _quarantine(lake, storage.read_bytes(obj.uri), exc, stage="index", source_uri=obj.uri,
                           suffix=_suffix(obj.relpath))

    result = index_objects(objects, specialty=lake.specialty, key=key, quarantine=quarantine, now=now,
                           options=options, prefix=prefix)
    ledger = lake.ledger
    opts = options_hash(get_specialty(lake.specialty).result_options(options))
    studies, skipped, newest, landing_bytes = [], [], {}, 0
    for entry in result.studies:
        record = ledger.get(entry.study)
        if not reprocess and ledger.is_done(record, entry.fingerprint, opts):
            skipped.append(entry.study)
            continue
        if not reprocess and record and record.get("state") == "published" and \
                record.get("fingerprint") == entry.fingerprint:
            ledger.ensure_pending(record)
            skipped.append(entry.study)  # its outputs exist: the load step loads it
            continue
        manifest_uri = lake.work("studies", f"{entry.study}.json")
        storage.write_json(manifest_uri, entry_to_manifest(entry))
        summary = entry.summary(str(manifest_uri))
        ledger.mark(summary, "arrived", step="index", run_id=run.run_id, options_hash=opts)
        studies.append(summary)
        newest[entry.study] = entry.newest
        landing_bytes += sum(int(f.get("size") or 0) for f in entry.files)
    summary = {"objects": len(objects), "studies": studies, "skipped_done": skipped, "waiting": result.waiting,
               "quarantined": len(result.quarantined),
               "quarantined_new": sum(1 for row in result.quarantined if row.get("first_seen", True))}
    log.info("index %s: %d object(s) -> %d stud(ies) to process, %d already done, %d waiting, %d quarantined",
             lake.specialty, len(objects), len(studies), len(skipped), len(result.waiting), len(result.quarantined))
    metrics.arrived(lake.specialty, studies, newest, landing_bytes)
    metrics.step_done(lake.specialty, "index", time.time() - started)
    return summary


def record_failure(study: dict, lake: Lake, *, step: str, exc: BaseException, run: RunContext,
                   attempt: int | None = None, detail: bool = True) -> dict:
    """A step failed for this study (a bug, an outage): the ledger says which step, why and which attempt.

    The study stays due (not done): the next attempt or run takes it again.  ``detail=False`` keeps the
    exception's message out (steps reading raw inputs, whose errors may quote them).
    """
    message = str(exc)[:500] if detail else None
    log.error("%s study %s: %s failed (attempt %s): %s%s", lake.specialty, study.get("study"), step, attempt or 1,
              type(exc).__name__, f": {message}" if message else "")
    metrics.study_failed(lake.specialty, step, type(exc).__name__)
    return lake.ledger.mark(study, "failed", step=step, run_id=run.run_id, reason=type(exc).__name__,
                            message=message, attempt=attempt)


# --------------------------------------------------------------------------- de-identification
def deidentify_study(study: dict, lake: Lake, *, key: bytes, demo: bool, options=None,
                     run: RunContext = RunContext()) -> dict:
    """De-identify one study's raw files into ``anonymized/``; bad files go to quarantine, the rest go on.

    Every output is audited against the identifying values of its own input before it is written.  ``options``:
    the run's option values (the specialty's ``deidentify``-stage options become PS3.15 options), or a
    ``DeidOptions``.
    """
    started = time.time()
    if options is None or isinstance(options, dict):  # the run's option values: the specialty's PS3.15 choices
        from imaging_tasks.deid.dicom import DeidOptions

        options = DeidOptions(**get_specialty(lake.specialty).options_for(options, "deidentify"))
    manifest = storage.read_json(study["manifest"])
    dest = lake.anonymized(study["patient"], study["study"])
    if get_specialty(lake.specialty).file_kind == "slide":
        instances, quarantined = _deidentify_slides(manifest["files"], dest, lake, key=key, demo=demo,
                                                    options=options)
    else:  # DICOM, NIfTI uploads, or DICOM with an upload beside it (a BOLD series' events table)
        dicoms = [f for f in manifest["files"] if not f.get("upload")]
        uploads = [f for f in manifest["files"] if f.get("upload")]
        instances, quarantined, seen = [], 0, {}
        if dicoms or not uploads:
            instances, quarantined, seen = _deidentify_dicoms(
                dicoms, dest, lake, key=key, demo=demo, options=options,
                what=f"de-identify {lake.specialty} study {study['study']}")
        if uploads:  # audited against the DICOM files' identifying values too (an events table beside them)
            more, refused = _deidentify_uploads(uploads, dest, lake, study=study["study"], options=options,
                                                also_identifying=seen)
            instances, quarantined = instances + more, quarantined + refused
    status = "ok" if instances else "quarantined"
    record = {"specialty": lake.specialty, "study": study["study"], "patient": study["patient"],
              "fingerprint": study["fingerprint"], "demo_key": demo, "instances": instances}
    if instances:
        storage.write_json(storage.join(dest, DEID_MANIFEST), record)
        lake.ledger.mark(study, "deidentified", step="deidentify", run_id=run.run_id, anonymized_uri=str(dest))
    else:
        lake.ledger.mark(study, "quarantined", step="deidentify", run_id=run.run_id, reason="no_usable_input",
                         message=f"all {quarantined} input file(s) of the study were quarantined; see the "
                                 "quarantine table for each file's reason")
        metrics.study_quarantined(lake.specialty, "deidentify", "no_usable_input")
    record_lineage(lake, run, study=study["study"],
                   inputs=[{"uri": "landing:" + study["study"], "sha256": i["source_sha256"]} for i in instances],
                   outputs=[{"uri": i["uri"], "sha256": i["sha256"]} for i in instances], device=None,
                   started=started, status=status)
    log.info("de-identify %s study %s: %d instance(s) written, %d quarantined, status %s, %.1f s",
             lake.specialty, study["study"], len(instances), quarantined, status, time.time() - started)
    metrics.stored(lake.specialty, "anonymized", sum(int(i.get("bytes") or 0) for i in instances))
    metrics.step_done(lake.specialty, "deidentify", time.time() - started)
    return with_facts(study, anonymized=str(dest), n_instances=len(instances), n_quarantined=quarantined,
                      status=status)


def _deidentify_dicoms(files: list[dict], dest, lake: Lake, *, key: bytes, demo: bool, options,
                       what: str = "de-identify") -> tuple[list, int, dict[str, set[str]]]:
    """Each DICOM file de-identified and audited; the instances written, the number quarantined, and the
    identifying values of all of them (what an upload beside them is audited against)."""
    from imaging_tasks.deid.dicom import DeidOptions, deidentify_bytes, reading_source
    from imaging_tasks.phi_audit import IdentifyingValues, assert_no_leaks, merge, retained_by

    options = options or DeidOptions()
    instances, quarantined, seen = [], 0, {}
    progress = Progress(log, what, total=len(files), unit="file")
    for f in files:
        progress.advance()
        data = storage.read_bytes(f["uri"])
        reader = IdentifyingValues(retained_by(options))  # read from the de-identifier's own parse: one per file
        try:
            with reading_source(reader.source):
                out, info = deidentify_bytes(data, key, options, demo=demo)  # refuses truncated/garbled files
            values = reader.values
        except BadInput as exc:
            _quarantine(lake, data, exc, stage="deidentify", source_uri=f["uri"], suffix=".dcm")
            quarantined += 1
            continue
        assert_no_leaks(values, out, f"study {info['pseudo_study']}")
        seen = merge(seen, values)
        uri = storage.join(dest, info["series_uid"], f"{info['sop_uid']}.dcm")
        sha = storage.write_bytes(uri, out)
        instances.append({"uri": str(uri), "sha256": sha, "bytes": len(out), "source_sha256": storage.sha256_bytes(data),
                          "study_uid": info["study_uid"], "series_uid": info["series_uid"], "sop_uid": info["sop_uid"],
                          "modality": info["modality"], "sop_class_uid": info["sop_class_uid"],
                          "header": info.get("header", {})})
    progress.close()
    return instances, quarantined, seen


def _deidentify_uploads(files: list[dict], dest, lake: Lake, *, study: str, options,
                        also_identifying: dict[str, set[str]] | None = None) -> tuple[list, int]:
    """A NIfTI-upload session: each NIfTI loses its header text and extensions (voxels byte-identical,
    ``deid.nifti``) and is written as ``<stem>.nii.gz``; each JSON sidecar keeps only allow-listed acquisition facts
    (``deid.sidecar``; body weight only with the Retain Patient Characteristics option) as ``<stem>.json``; events
    tables and gradient files are rebuilt from their allowed columns and numbers (``deid.tables``) as
    ``<stem>_events.tsv``, ``<stem>.bval``, ``<stem>.bvec``.

    Every output is audited before it is written against the identifying values of all the session's inputs
    (``also_identifying``: those of the study's DICOM files, when an events table sits beside a DICOM series)
    and the raw folder names (from the work manifest).  Instances carry no DICOM UIDs: series
    ``<study>-<stem>``, SOP ``<kind>-`` + the output's sha256 prefix.
    """
    import gzip

    from imaging_tasks.deid.nifti import deidentify_nifti, nifti_facts
    from imaging_tasks.deid.sidecar import deidentify_sidecar
    from imaging_tasks.deid.tables import deidentify_events, deidentify_gradients
    from imaging_tasks.phi_audit import assert_no_leaks, merge, upload_identifying_values, values_of_input

    values = merge(also_identifying or {}, *(values_of_input(f["uri"]) for f in files),
                   *(upload_identifying_values(f["upload"]) for f in files if f.get("upload")))
    retain = bool(getattr(options, "retain_patient_characteristics", False))
    instances, quarantined = [], 0
    ordered = sorted(files, key=lambda f: (f["upload"]["kind"] != "nifti", f["upload"]["stem"]))
    with tempfile.TemporaryDirectory(prefix="deid-nifti-") as tmp:
        for i, f in enumerate(ordered):
            up = f["upload"]
            data = storage.read_bytes(f["uri"])
            try:
                if up["kind"] == "nifti":
                    src = Path(tmp) / f"in-{i}{_suffix(f['uri'])}"
                    src.write_bytes(data)
                    dst = Path(tmp) / f"out-{i}.nii.gz"
                    info = deidentify_nifti(src, dst)
                    out, name, kind = dst.read_bytes(), f"{up['stem']}.nii.gz", "nifti"
                    blob = gzip.decompress(out)
                    header = {"SeriesDescription": up["stem"], "format": "nifti", **nifti_facts(dst),
                              "cleared_fields": info["cleared_fields"],
                              "removed_extensions": info["removed_extensions"]}
                elif up["kind"] == "events":
                    out, info = deidentify_events(data)
                    blob, name, kind = out, f"{up['stem']}_events.tsv", "events"
                    header = {"SeriesDescription": up["stem"], "format": "tsv", **info}
                elif up["kind"] in ("bval", "bvec"):
                    out, info = deidentify_gradients(data, up["kind"])
                    blob, name, kind = out, f"{up['stem']}.{up['kind']}", up["kind"]
                    header = {"SeriesDescription": up["stem"], "format": up["kind"], **info}
                else:
                    out, info = deidentify_sidecar(data, retain_patient_characteristics=retain)
                    blob, name, kind = out, f"{up['stem']}.json", "sidecar"
                    header = {"SeriesDescription": up["stem"], "format": "json", "kept": info["kept"],
                              "dropped": info["dropped"], "derived": info["derived"]}
            except BadInput as exc:
                _quarantine(lake, data, exc, stage="deidentify", source_uri=f["uri"], suffix=_suffix(f["uri"]))
                quarantined += 1
                continue
            assert_no_leaks(values, blob, f"study {study} {name}")
            uri = storage.join(dest, name)
            sha = storage.write_bytes(uri, out)
            instances.append({"uri": str(uri), "sha256": sha, "bytes": len(out),
                              "source_sha256": storage.sha256_bytes(data), "study_uid": None,
                              "series_uid": f"{study}-{up['stem']}", "sop_uid": f"{kind}-{sha[:16]}",
                              "modality": up["modality"], "sop_class_uid": None, "header": header})
    return instances, quarantined


def _deidentify_slides(files: list[dict], dest, lake: Lake, *, key: bytes, demo: bool = False,
                       options=None) -> tuple[list, int]:
    """One slide study (``index._index_slides``), de-identified by format into the study's anonymized folder.

    * Aperio SVS, generic TIFF, NDPI, OME-TIFF: ``deid.slide.deidentify_svs`` (byte copy, label/macro dropped,
      text allow-listed; NDPI through ``deid.ndpi``; OME-TIFF through ``deid.ome``: the first image's pyramid as a
      generic pyramidal TIFF, OME-XML and other images dropped).  Written as ``slide_files.OUTPUT_NAMES[format]``
      (``slide.svs``, ``slide.tif``, ``slide.ndpi``): a suffix OpenSlide recognises.
    * DICOM whole-slide: each instance through the DICOM de-identifier (``deid.dicom``) like any DICOM study,
      written as ``<series uid>/<sop uid>.dcm`` (one folder: OpenSlide reads the series from it).  Label and
      overview instances are refused by it (``slide_label_image``) and quarantined; the slide goes on without
      them.  A refused VOLUME instance makes the slide incomplete: its other files are quarantined too
      (``incomplete_slide``).
    * MIRAX: ``deid.mirax.deidentify_mirax`` into ``slide.mrxs`` + ``slide/``.

    Every copy is opened with OpenSlide (first and last pixel of every level) before anything is written to the
    lake; one that does not open sends the slide's inputs to quarantine (``unreadable_slide``).  Every output file
    is audited against the identifying values of its inputs, read by format (``phi_audit.slide_file_values``,
    ``dicom_identifying_values``, ``mirax_values``), streamed.
    Instances carry ``relpath`` (their path under the study's folder) and ``format``: ``fetch_instances`` lays
    them out as written.  Returns ``(instances, number of input files quarantined)``.
    """
    from imaging_tasks.slide_files import sniff

    rows = []
    for f in files:
        row = dict(f)
        if not row.get("slide"):  # a manifest written before slide formats: one single-file slide
            try:
                fmt = sniff(row["uri"])[0]
            except BadInput:
                fmt = "unreadable"
            row["slide"] = {"format": fmt, "role": "main"}
        rows.append(row)
    mirax = [r for r in rows if r["slide"]["format"] == "mirax"]
    dicom = [r for r in rows if r["slide"]["format"] == "dicom"]
    singles = [r for r in rows if r["slide"]["format"] not in ("mirax", "dicom")]
    instances, quarantined = [], 0
    with tempfile.TemporaryDirectory(prefix="deid-slide-") as tmp:
        tmp = Path(tmp)
        if mirax:
            made, refused = _deidentify_mirax(mirax, dest, lake, key=key, tmp=tmp / "mirax")
            instances, quarantined = instances + made, quarantined + refused
        if dicom:
            from imaging_tasks.deid.dicom import DeidOptions

            made, refused = _deidentify_dicom_slide(dicom, dest, lake, key=key, demo=demo,
                                                    options=options or DeidOptions(), tmp=tmp / "dicom")
            instances, quarantined = instances + made, quarantined + refused
        for i, row in enumerate(singles):
            made, refused = _deidentify_single_slide(row, dest, lake, key=key, tmp=tmp / f"single-{i}",
                                                     name=None if len(singles) == 1 else f"slide-{i}")
            instances, quarantined = instances + made, quarantined + refused
    return instances, quarantined


def _refuse_slide(lake: Lake, rows: list[dict], exc: BadInput) -> int:
    """Every input file of a slide to quarantine with one reason; returns how many."""
    for r in rows:
        _quarantine(lake, storage.read_bytes(r["uri"]), exc, stage="deidentify", source_uri=r["uri"],
                    suffix=_suffix(r["uri"]))
    return len(rows)


def _slide_instance(path: Path, dest, relpath: str, *, source_sha256: str, fmt: str, header: dict,
                    series_uid: str | None = None, sop_uid: str | None = None, study_uid: str | None = None,
                    sop_class_uid: str | None = None) -> dict:
    """Write one de-identified slide file to the lake (streamed) and describe it as an instance."""
    uri = storage.join(dest, *relpath.split("/"))
    sha = storage.write_file(uri, path)
    return {"uri": str(uri), "sha256": sha, "bytes": path.stat().st_size, "source_sha256": source_sha256,
            "study_uid": study_uid, "series_uid": series_uid, "sop_uid": sop_uid or f"slide-{sha[:16]}",
            "modality": "SM", "sop_class_uid": sop_class_uid, "header": {"format": fmt, **header},
            "relpath": relpath, "format": fmt}


def _deidentify_single_slide(row: dict, dest, lake: Lake, *, key: bytes, tmp: Path,
                             name: str | None) -> tuple[list, int]:
    from imaging_tasks.deid.slide import deidentify_svs
    from imaging_tasks.slide_files import OUTPUT_NAMES, check_readable
    from imaging_tasks.phi_audit import audit, slide_file_values

    fmt = row["slide"]["format"]
    src = storage.download(row["uri"], tmp / f"in{_suffix(row['uri'])}")
    out_name = OUTPUT_NAMES.get(fmt, "slide.tif")
    if name:
        out_name = name + Path(out_name).suffix
    dst = tmp / "out" / out_name
    try:
        if fmt in ("aperio", "generic-tiff", "ndpi", "ome-tiff"):  # it hands NDPI and OME-TIFF to their own paths
            info = deidentify_svs(src, dst, key, digest=row.get("sha256"))
        else:
            raise BadInput("unreadable_slide", "not a readable whole-slide file (neither DICOM nor a TIFF whose "
                           "first page parses); check it is a complete slide and re-send it")
        check_readable(dst)
    except BadInput as exc:
        return [], _refuse_slide(lake, [row], exc)
    audit(slide_file_values(src, fmt), files=[dst])
    header = {k: v for k, v in info.items() if k in ("mpp", "removed", "dimensions", "vendor", "resolution_from")}
    return [_slide_instance(dst, dest, out_name, source_sha256=row.get("sha256") or storage.sha256_of(src),
                            fmt=fmt, header=header)], 0


def _deidentify_dicom_slide(rows: list[dict], dest, lake: Lake, *, key: bytes, demo: bool, options,
                            tmp: Path) -> tuple[list, int]:
    """A DICOM-WSI series: each instance through the DICOM de-identifier into ``<series>/<sop>.dcm``; see
    :func:`_deidentify_slides` for what is refused."""
    from imaging_tasks.deid.dicom import deidentify_bytes, reading_source
    from imaging_tasks.dicom_io import read_header
    from imaging_tasks.slide_files import check_readable, main_slide_file
    from imaging_tasks.phi_audit import IdentifyingValues, audit, dicom_identifying_values, merge, retained_by

    made, refused, seen = [], [], {}
    for r in rows:
        data = storage.read_bytes(r["uri"])
        reader = IdentifyingValues(retained_by(options))  # read from the de-identifier's own parse: one per file
        try:
            with reading_source(reader.source):
                out, info = deidentify_bytes(data, key, options, demo=demo)
            seen = merge(seen, reader.values)
        except BadInput as exc:
            try:  # a refused instance's values still audit the others (a header read, for refused files only)
                seen = merge(seen, dicom_identifying_values(read_header(data), retained_by(options)))
            except BadInput:
                pass
            _quarantine(lake, data, exc, stage="deidentify", source_uri=r["uri"], suffix=".dcm")
            refused.append(r)
            continue
        relpath = f"{info['series_uid']}/{info['sop_uid']}.dcm"
        local = tmp / relpath
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(out)
        made.append((r, info, local, relpath, storage.sha256_bytes(data)))
    if any(r["slide"].get("role") == "volume" for r in refused) and made:
        exc = BadInput("incomplete_slide", f"{len(refused)} instance(s) of this DICOM whole-slide series were "
                       "refused, a VOLUME image among them (see their own quarantine rows); the slide cannot be "
                       "read whole without it; fix or re-export the series and send it again")
        return [], len(refused) + _refuse_slide(lake, [m[0] for m in made], exc)
    if not made:
        return [], len(refused)
    try:
        check_readable(main_slide_file([m[2] for m in made]))
    except BadInput as exc:
        return [], len(refused) + _refuse_slide(lake, [m[0] for m in made], exc)
    for _r, info, local, _relpath, _sha in made:  # every file audited before any is written
        audit(seen, files=[local])
    instances = []
    for r, info, local, relpath, source_sha in made:
        instances.append(_slide_instance(local, dest, relpath, source_sha256=source_sha, fmt="dicom",
                                         header={**info.get("header", {}), "role": r["slide"].get("role")},
                                         series_uid=info["series_uid"], sop_uid=info["sop_uid"],
                                         study_uid=info["study_uid"], sop_class_uid=info["sop_class_uid"]))
    return instances, len(refused)


def _deidentify_mirax(rows: list[dict], dest, lake: Lake, *, key: bytes, tmp: Path) -> tuple[list, int]:
    """A MIRAX slide (``X.mrxs`` + ``X/``) through ``deid.mirax`` into ``slide.mrxs`` + ``slide/``."""
    from imaging_tasks.slide_files import check_readable, mirax_digest
    from imaging_tasks.deid.mirax import deidentify_mirax, mirax_files
    from imaging_tasks.phi_audit import audit, mirax_values
    main = [r for r in rows if r["slide"].get("role") == "main"]
    if len(main) != 1:
        return [], _refuse_slide(lake, rows, BadInput("mirax_incomplete", "a MIRAX slide needs exactly one .mrxs"))
    for r in rows:
        storage.download(r["uri"], tmp / "in" / Path(*PurePosixPath(r["slide"]["path"]).parts))
    src = tmp / "in" / Path(*PurePosixPath(main[0]["slide"]["path"]).parts)
    dst = tmp / "out" / "slide.mrxs"
    try:
        values = mirax_values(str(src))
        info = deidentify_mirax(src, dst, key, digest=mirax_digest(rows))
        check_readable(dst)
    except BadInput as exc:
        return [], _refuse_slide(lake, rows, exc)
    # each output file's source: the input of the same name (``slide.mrxs`` <- ``X.mrxs``, ``slide/F`` <- ``X/F``)
    source = {"slide.mrxs": main[0]["sha256"],
              **{"slide/" + PurePosixPath(r["slide"]["path"]).name: r["sha256"] for r in rows if r is not main[0]}}
    outputs = [Path(p) for p in mirax_files(dst)]
    for path in outputs:  # every file audited before any is written
        audit(values, files=[path])
    instances = []
    for path in outputs:
        relpath = path.relative_to(dst.parent).as_posix()
        header = {k: v for k, v in info.items() if k in ("mpp", "removed", "dimensions")} \
            if relpath == "slide.mrxs" else {"role": "data"}
        instances.append(_slide_instance(path, dest, relpath, fmt="mirax", header=header,
                                         source_sha256=source.get(relpath, mirax_digest(rows))))
    return instances, 0


# --------------------------------------------------------------------------- PHI audit
def _input_values(study: dict, lake: Lake) -> dict[str, set[str]]:
    from imaging_tasks.phi_audit import merge, upload_identifying_values, values_of_input

    manifest = storage.read_json(study.get("manifest") or lake.work("studies", f"{study['study']}.json"))
    return merge(*(values_of_input(f["uri"], (f.get("slide") or {}).get("format")) for f in manifest["files"]),
                 *(upload_identifying_values(f["upload"]) for f in manifest["files"] if f.get("upload")))


def _files_under(root) -> list[str]:
    root = storage.as_path(root)
    return [o.uri for o in storage.list_objects(root)] + \
        [str(storage.join(root, n)) for n in (DEID_MANIFEST, storage.MANIFEST) if storage.exists(storage.join(root, n))]


def audit_deidentified(study: dict, lake: Lake, *, run: RunContext = RunContext()) -> dict:
    """The standalone audit after de-identification: passes (ledger: audited) or raises ``PHILeak`` (ledger:
    failed at the audit, reason ``phi_audit_failed``; the study goes no further and is not retried blindly)."""
    from imaging_tasks.phi_audit import PHILeak

    started = time.time()
    try:
        report = audit_study(study, lake)
    except PHILeak as exc:
        lake.ledger.mark(study, "failed", step="audit_phi", run_id=run.run_id, reason="phi_audit_failed",
                         message=str(exc))  # names attributes, never values
        metrics.study_failed(lake.specialty, "audit_phi", "phi_audit_failed")
        raise
    lake.ledger.mark(study, "audited", step="audit_phi", run_id=run.run_id)
    metrics.step_done(lake.specialty, "audit_phi", time.time() - started)
    return report


def audit_study(study: dict, lake: Lake, *, payloads: list[tuple[str, Any]] = (), derived: bool = False) -> dict:
    """Prove that no identifying value of the study's raw inputs survives in what was made from them.

    Independent of the de-identifier: values are re-read from the raw inputs, and the outputs are read
    back from the lake (what was actually written), together with ``payloads`` (XComs, warehouse rows).
    Raises ``phi_audit.PHILeak`` (naming attributes, never values): the caller must fail closed.
    """
    from imaging_tasks.phi_audit import audit

    values = _input_values(study, lake)
    files = _files_under(lake.anonymized(study["patient"], study["study"]))
    if derived:
        files += _files_under(lake.derived(study["patient"], study["study"]))
    report = audit(values, files=files, payloads=[("XCom", study), *payloads])
    log.info("PHI audit %s study %s passed: %d identifying value(s) absent from %d file(s), %d bytes, "
             "%d payload(s)", lake.specialty, study["study"], report["values"], report["files"], report["bytes"],
             report["payloads"])
    return {"study": study["study"], **report}


# --------------------------------------------------------------------------- processing
def process_study(study: dict, lake: Lake, *, step: str | None = None, device: str | None = None,
                  options: dict | None = None, run: RunContext = RunContext()) -> dict:
    """Run one of the specialty's processing steps (``step``; None: all of them, in order) on the de-identified
    study.  A step before the last writes its outputs to the work area (``work/<specialty>/steps/<S…>/<step>/``)
    and returns the study for the next; the last one also receives every earlier step's output folder
    (``previous={name: folder}``) and publishes ``derived/`` (all steps' outputs, metrics and findings) with a
    manifest.

    ``options``: values of the specialty's process-stage options (checked against its schema; missing ones take
    their defaults); each step gets those its function takes as keyword arguments.
    """
    record = get_specialty(lake.specialty)
    names = [s.name for s in record.steps] if step is None else [step]
    if is_ok(study) and names and names[0] == record.steps[0].name:  # its queue wait since the index
        metrics.processing_started(lake.specialty, lambda: metrics.arrival_time(lake.ledger.get(study["study"])))
    for name in names:
        started = time.time()
        study = _run_step(record, name, study, lake, device=device, options=options, run=run)
        if study.get("status") == "skipped":
            break
        metrics.step_done(lake.specialty, name, time.time() - started,
                          device=_device_name(device) if record.step(name).gpu else "cpu")
        if not is_ok(study):
            break
    return study


def _device_name(device: str | None) -> str | None:
    """The device a step runs on, as ``_run_step`` picks it (for the metrics); None where torch cannot tell."""
    try:
        from imaging_tasks.device import pick_device

        return str(pick_device(device))
    except Exception:  # noqa: BLE001 - only a metric's label depends on it
        return None


def _run_step(record, name: str, study: dict, lake: Lake, *, device: str | None, options: dict | None,
              run: RunContext) -> dict:
    from imaging_tasks.device import pick_device

    started = time.time()
    if not is_ok(study):
        return with_status(study, "skipped")
    order = [s.name for s in record.steps]
    index, fn, kwargs = record.step_call(name, options)
    deid = storage.read_json(storage.join(study["anonymized"], DEID_MANIFEST))
    dev = str(pick_device(device)) if record.step(name).gpu else "cpu"  # a CPU step never imports torch (~2 s)
    with tempfile.TemporaryDirectory(prefix=f"{lake.specialty}-") as tmp:
        files = fetch_instances(deid["instances"], Path(tmp) / "in")
        previous = {}
        for earlier in order[:index]:  # what the steps before this one wrote
            folder = Path(tmp) / "steps" / earlier
            for info in storage.list_objects(_step_dir(lake, study, earlier)):
                storage.download(info.uri, folder / info.relpath)
            previous[earlier] = folder
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        try:
            result = fn(files, out_dir, device=dev, **({"previous": previous} if index else {}), **kwargs)
        except BadInput as exc:
            return quarantine_study(study, deid, lake, exc, run=run, started=started)
        if index < len(order) - 1:  # an intermediate step: keep its outputs for the next
            storage.write_json(out_dir / STEP_RESULT, {"metrics": result.get("metrics", []),
                                                          "findings": result.get("findings", []),
                                                          "tables": result.get("tables") or {}})
            outputs = storage.upload_dir(out_dir, _step_dir(lake, study, name))
            record_lineage(lake, run, study=study["study"],
                           inputs=[{"uri": i["uri"], "sha256": i["sha256"]} for i in deid["instances"]],
                           outputs=[{"uri": str(storage.join(_step_dir(lake, study, name), o["path"])),
                                     "sha256": o["sha256"]} for o in outputs], device=dev, started=started)
            log.info("%s study %s: step %s done on %s in %.1f s", lake.specialty, study["study"], name, dev,
                     time.time() - started)
            return with_facts(study, steps_done=[*study.get("steps_done", []), name])
        for earlier, folder in previous.items():  # the published study holds every step's outputs and numbers
            partial = storage.read_json(folder / STEP_RESULT) if (folder / STEP_RESULT).exists() else {}
            tables = dict(partial.get("tables") or {})
            for table, table_rows in (result.get("tables") or {}).items():
                tables[table] = [*tables.get(table, []), *table_rows]
            result = {**result, "metrics": [*partial.get("metrics", []), *result.get("metrics", [])],
                      "findings": [*partial.get("findings", []), *result.get("findings", [])], "tables": tables}
            for f in folder.rglob("*"):
                if f.is_file() and f.name != STEP_RESULT:
                    target = out_dir / earlier / f.relative_to(folder)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(f.read_bytes())
        return publish(study, deid, lake, result, out_dir, run=run, started=started, device=dev)


def _step_dir(lake: Lake, study: dict, step: str):
    return lake.work("steps", study["study"], step)


def fetch_instances(instances: list[dict], local: Path) -> list[Path]:
    """The study's de-identified files in a local folder, numbered in instance order: DICOM as ``00001.dcm``,
    anything else keeps its name after the number (``00001-pet.nii.gz``, ``00002-pet.json``), so a step can
    tell the MR from the PET NIfTI and find a sidecar.

    A slide's instances carry ``relpath`` (``pipeline._deidentify_slides``) and are laid out as written, which is
    what OpenSlide needs: a MIRAX ``slide.mrxs`` with its ``slide/`` folder beside it, a DICOM-WSI series'
    files together in one folder, ``slide.svs`` / ``slide.tif`` / ``slide.ndpi`` as they are.  Returns the
    local paths in instance order."""
    out = []
    for n, inst in enumerate(instances):
        if inst.get("relpath"):
            rel = PurePosixPath(inst["relpath"])
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise ValueError(f"instance {n}: relpath must be a relative path inside the study folder")
            target = Path(*rel.parts)
        else:
            name = Path(inst["uri"]).name
            target = f"{n:05d}.dcm" if name.lower().endswith(".dcm") else f"{n:05d}-{name}"
        out.append(storage.download(inst["uri"], local / target))
    return out


def publish(study: dict, deid: dict, lake: Lake, result: dict, out_dir: Path, *, run: RunContext, started: float,
             device: str) -> dict:
    results = {"metrics": result.get("metrics", []), "findings": result.get("findings", [])}
    if result.get("tables"):
        results["tables"] = result["tables"]
    storage.write_json(out_dir / "results.json", results)
    dest = lake.derived(study["patient"], study["study"])
    outputs = storage.upload_dir(out_dir, dest)
    metrics.stored(lake.specialty, "derived", sum(int(o.get("bytes") or 0) for o in outputs))
    manifest = {"specialty": lake.specialty, "study": study["study"], "patient": study["patient"],
                "fingerprint": study["fingerprint"], "code_version": CODE_VERSION,
                "inputs": [{"uri": i["uri"], "sha256": i["sha256"]} for i in deid["instances"]],
                "outputs": outputs, "metrics": results["metrics"], "n_findings": len(results["findings"])}
    storage.publish_manifest(dest, manifest)
    lake.ledger.mark(study, "published", step=run.task_id if run.task_id != "cli" else "process", run_id=run.run_id,
                     anonymized_uri=study["anonymized"], derived_uri=str(dest))
    record_lineage(lake, run, study=study["study"], inputs=manifest["inputs"],
                   outputs=[{"uri": str(storage.join(dest, o["path"])), "sha256": o["sha256"]} for o in outputs],
                   device=device, started=started)
    log.info("processed %s study %s on %s in %.1f s: %s; %d finding(s)", lake.specialty, study["study"], device,
             time.time() - started, ", ".join(f"{m['name']}={m['value']:.4g}" if isinstance(m["value"], (int, float))
                                              else f"{m['name']}={m['value']}" for m in results["metrics"][:6]) or
             "no metrics", len(results["findings"]))
    metrics.count(lake.specialty, "studies.processed")
    return with_status(study, "ok", derived=str(dest), metrics={m["name"]: m["value"] for m in results["metrics"]})


def quarantine_study(study: dict, deid: dict, lake: Lake, exc: BadInput, *, run: RunContext, started: float) -> dict:
    """A study the algorithm cannot use: its de-identified instance list goes to quarantine with the reason."""
    import json

    listing = json.dumps({"study": study["study"], "instances": deid["instances"]}, sort_keys=True).encode()
    _quarantine(lake, listing, exc, stage="process", source_uri=study["anonymized"], suffix=".json")
    lake.ledger.mark(study, "quarantined", step="process", run_id=run.run_id, reason=exc.reason, message=exc.message)
    metrics.study_quarantined(lake.specialty, "process", exc.reason)
    record_lineage(lake, run, study=study["study"], inputs=[], outputs=[], device=None, started=started,
                   status="quarantined")
    return with_status(study, "quarantined", reason=exc.reason)


# --------------------------------------------------------------------------- load
def warehouse_rows(processed: list[dict], lake: Lake, *, run: RunContext,
                   lineage_runs: Any = ()) -> dict[str, list[dict]]:
    """Rows for every table from the published manifests, the quarantine folder and the lineage of this run
    (and of ``lineage_runs``: earlier runs whose studies are loaded now)."""
    rows: dict[str, list[dict]] = {t: [] for t in ("studies", "series", "instances", "results", "findings",
                                                   *STUDY_TABLES)}
    for item in processed:
        if not is_ok(item):
            continue
        deid = storage.read_json(storage.join(item["anonymized"], DEID_MANIFEST))
        derived = storage.read_manifest(item["derived"])
        results = storage.read_json(storage.join(item["derived"], "results.json"))
        spec, study = lake.specialty, item["study"]
        series: dict[str, dict] = {}
        for inst in deid["instances"]:
            header = inst.get("header", {})
            sid = inst["series_uid"] or f"{study}-slide"
            s = series.setdefault(sid, {"specialty": spec, "series_uid": sid, "study_id": study,
                                        "modality": inst["modality"], "series_number": header.get("SeriesNumber"),
                                        "series_description": header.get("SeriesDescription"), "n_instances": 0})
            s["n_instances"] += 1
            rows["instances"].append({"specialty": spec, "sop_uid": inst["sop_uid"], "series_uid": sid,
                                      "study_id": study, "sop_class_uid": inst["sop_class_uid"],
                                      "modality": inst["modality"], "uri": inst["uri"], "sha256": inst["sha256"],
                                      "bytes": inst["bytes"], "header": header})
        rows["series"].extend(series.values())
        first = deid["instances"][0]
        rows["studies"].append({
            "specialty": spec, "study_id": study, "patient_id": item["patient"], "study_uid": first["study_uid"],
            "study_date": first.get("header", {}).get("StudyDate"),
            "modalities": sorted({i["modality"] for i in deid["instances"]}), "n_series": len(series),
            "n_instances": len(deid["instances"]), "anonymized_uri": item["anonymized"],
            "derived_uri": item["derived"], "status": "processed", "demo_key": deid.get("demo_key", False),
            "updated_at": _now()})
        for m in results["metrics"]:
            rows["results"].append({"specialty": spec, "study_id": study, "metric": m["name"], "value": m["value"],
                                    "unit": m.get("unit"), "run_id": run.run_id,
                                    "code_version": derived["code_version"]})
        for n, f in enumerate(results["findings"]):
            rows["findings"].append({"specialty": spec, "study_id": study, "kind": f.get("kind", "finding"),
                                     "finding_index": f.get("index", n), "properties": f})
        for table, table_rows in (results.get("tables") or {}).items():
            if table not in STUDY_TABLES:
                raise ValueError(f"{spec} study {study}: results.json names table {table!r}, which is not a per-study "
                                 f"table of the warehouse schema ({', '.join(STUDY_TABLES)})")
            rows[table].extend({**r, "specialty": spec, "study_id": study} for r in table_rows)
    rows["quarantine"] = storage.quarantine_rows(lake.root, lake.specialty)
    rows["processing_runs"] = [storage.read_json(o.uri) for rid in sorted({run.run_id, *lineage_runs})
                               for o in storage.list_objects(lake.runs(rid))]
    return rows


def pending_loads(lake: Lake) -> list[dict]:
    """Every study whose latest state (published, quarantined, failed) has not reached the warehouse yet."""
    return lake.ledger.pending()


def _as_item(record: dict) -> StudyRecord:
    """The study record of a ledger record (a study published by this or an earlier run)."""
    return study_record(specialty=record["specialty"], study=record["study"], patient=record["patient"],
                        fingerprint=record.get("fingerprint") or "", anonymized=record.get("anonymized_uri"),
                        derived=record.get("derived_uri"))


def load(processed: list[dict], lake: Lake, warehouse, *, run: RunContext = RunContext()) -> dict[str, Any]:
    """Load every pending study of the specialty (any run's: a killed or failed run is repaired by the next), plus
    the ``processed`` studies given (reloaded even if loaded before), in one transaction where the store has them.

    Per-study tables are replaced whole, so no stale rows remain and a rerun converges.  Each study's rows and
    outputs are audited for PHI first; a study that fails the audit is not loaded (ledger: failed,
    ``phi_audit_failed``) and the others are.  Returns the row counts per table and ``failed``: the studies of
    this load that ended failed (the caller makes the run fail after loading the rest).
    """
    from imaging_tasks.phi_audit import PHILeak

    started = time.time()
    ledger = lake.ledger
    pending = pending_loads(lake)
    items = {r["study"]: _as_item(r) for r in pending if r["state"] == "published"}
    for item in processed:
        if is_ok(item) and item.get("derived"):
            items.setdefault(item["study"], item)
    earlier = {h["run_id"] for r in pending for h in r.get("history", []) if h.get("run_id")}
    rows = warehouse_rows(list(items.values()), lake, run=run, lineage_runs=earlier)
    leaked = {}
    for study, item in items.items():  # fail closed, per study
        mine = {t: [r for r in rs if r.get("study_id") == study] for t, rs in rows.items()}
        try:
            audit_study(item, lake, payloads=[("warehouse rows", mine)], derived=True)
        except PHILeak as exc:
            leaked[study] = ledger.mark(item, "failed", step="load_audit", run_id=run.run_id,
                                        reason="phi_audit_failed", message=str(exc))
            metrics.study_failed(lake.specialty, "load_audit", "phi_audit_failed")
    if leaked:
        rows = {t: [r for r in rs if r.get("study_id") not in leaked] for t, rs in rows.items()}
        items = {k: v for k, v in items.items() if k not in leaked}
    loaded_states = {**{r["study"]: r for r in pending}, **leaked}
    # studies reloaded on request (reprocess/retry) that were not pending: their rows say loaded too
    reloaded = [r for r in (ledger.get(s) for s in items if s not in loaded_states) if r]
    rows["ledger"] = [warehouse_row({**r, "state": "loaded" if r["study"] in items else r["state"]})
                      for r in (*loaded_states.values(), *reloaded)]
    scoped = {"series", "instances", "results", "findings", *STUDY_TABLES}
    # every loaded study's per-study rows are replaced, even where it now has none (e.g. no findings)
    studies = [(lake.specialty, s) for s in items]
    counts: dict[str, Any] = {}
    with warehouse.transaction() as tx:  # DuckDB: all tables or none; BigQuery: each MERGE converges
        for table, table_rows in rows.items():
            if table in scoped:
                counts[table] = tx.upsert(table, table_rows, replace_scope=("specialty", "study_id"), scopes=studies)
            else:
                counts[table] = tx.upsert(table, table_rows)
    ledger.mark_loaded([*pending, *reloaded], run_id=run.run_id)
    failed = sorted({r["study"] for r in loaded_states.values() if r["state"] == "failed"})
    log.info("loaded %s into the warehouse: %d stud(ies) (%d from earlier runs), %d quarantined, %d failed; rows: %s",
             lake.specialty, len(items), sum(1 for r in pending if r["state"] == "published"
                                             and r.get("run_id") != run.run_id),
             sum(1 for r in loaded_states.values() if r["state"] == "quarantined"), len(failed),
             ", ".join(f"{k}={v}" for k, v in counts.items()))
    counts["failed"] = [{"study": s, "step": loaded_states[s].get("step"), "reason": loaded_states[s].get("reason"),
                         "attempt": loaded_states[s].get("attempt")} for s in failed]
    counts["loaded"] = [{"study": s, "derived": item.get("derived")} for s, item in items.items()]
    metrics.count(lake.specialty, "studies.loaded", len(items))
    metrics.step_done(lake.specialty, "load", time.time() - started)
    return counts
