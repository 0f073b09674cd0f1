"""``imaging-tasks``: every pipeline step from the command line, outside Airflow.

    imaging-tasks synth --specialty all --out data/landing --studies 2 --seed 0 [--bad-inputs]
    imaging-tasks run cardiovascular --landing data/landing/cardiovascular --lake data/lake \
        --warehouse data/warehouse.duckdb
    imaging-tasks deidentify SRC DST [--option retain-device-identity ...] [--quarantine Q] [--workers N]
    imaging-tasks process cardiovascular FILE... --out DIR
    imaging-tasks receive --landing URI --spool DIR [--port 11112] [--allow-ae AE ...] [--deidentify] ...
    imaging-tasks train-progression --out models/progression [--cohort synthetic --patients 200 | --sessions F --scores F]
    imaging-tasks ingest-scores --scores data/landing/cognitive_scores --warehouse data/warehouse.duckdb \
        [--fhir-base-url URL --lake data/lake]
    imaging-tasks predict-progression --model models/progression.pt --warehouse data/warehouse.duckdb
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from imaging_tasks import specialties


def _synth(args) -> int:
    from imaging_tasks.synth.bad_inputs import write_bad_inputs

    out = Path(args.out.removeprefix("file://"))
    chosen = specialties.names() if args.specialty == "all" else (args.specialty,)
    for specialty in chosen:
        # distinct patients per specialty, whichever subset is asked for
        offset = 1000 * specialties.get(specialty).order
        truths = specialties.synthesizer(specialty)(out, args.studies, args.seed + offset)
        bad = write_bad_inputs(out, specialty, args.seed) if args.bad_inputs else {}
        print(f"{specialty}: {len(truths)} stud(ies), {len(bad)} bad input(s) -> {out / specialty}")
    return 0


def _key(args):
    """The de-identification key, or a clear refusal (exit status 2) when none is configured."""
    from imaging_tasks.deid.keys import MissingKey, load_key

    try:
        key, demo = load_key(allow_demo=True if getattr(args, "demo_key", False) else None)
    except MissingKey as exc:
        print(f"imaging-tasks: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if demo:
        print("warning: using the public DEMO key (outputs are marked DEMO KEY); never use it on patient data",
              file=sys.stderr)
    return key, demo


def _run(args) -> int:
    """The whole chain for one specialty, in process: what the DAG does, without Airflow.

    One failing study never stops the others: it is recorded as failed in the ledger (the next run takes it
    again) and the exit status is 1; everything pending (this run's and any killed run's) is loaded.
    """
    from imaging_tasks import pipeline
    from imaging_tasks.contracts import is_ok
    from imaging_tasks.phi_audit import PHILeak
    from imaging_tasks.warehouse import open_warehouse

    record = specialties.get(args.specialty)
    options = _options(args, record)
    key, demo = _key(args)
    lake = pipeline.Lake(args.lake, args.specialty)
    run = pipeline.RunContext(run_id=args.run_id)
    summary = pipeline.index_landing(args.landing, lake, key=key, reprocess=args.reprocess, options=options, run=run)
    processed, failed = [], []
    for study in summary["studies"]:
        step = "deidentify"
        try:
            clean = pipeline.deidentify_study(study, lake, key=key, demo=demo, options=options, run=run)
            if not is_ok(clean):
                continue
            step = "audit_phi"
            pipeline.audit_deidentified(clean, lake, run=run)
            step = "process"
            if record.fan_out:  # the DAG's per-slide chain, in process
                plan = record.fan_out_step("plan_slide")(clean, lake, options=options, run=run)
                feats = record.fan_out_step("slide_features")(plan, lake, options=options, run=run)
                processed.append(record.fan_out_step("finish_slide")(feats, lake, run=run))
            else:
                processed.append(pipeline.process_study(clean, lake, options=options, run=run))
        except PHILeak as exc:  # recorded by the audit itself
            failed.append({"study": study["study"], "step": step, "reason": type(exc).__name__})
        except Exception as exc:  # noqa: BLE001 - one study's failure must not stop the others
            pipeline.record_failure(study, lake, step=step, exc=exc, run=run, detail=step != "deidentify")
            failed.append({"study": study["study"], "step": step, "reason": type(exc).__name__})
    counts = pipeline.load(processed, lake, open_warehouse(args.warehouse), run=run)
    loaded = counts.pop("loaded")
    counts.pop("failed")
    print(json.dumps({"studies": len(summary["studies"]), "skipped_done": len(summary["skipped_done"]),
                      "quarantined": summary["quarantined"], "loaded": len(loaded), "failed": failed,
                      "rows": counts}, sort_keys=True))
    return 1 if failed else 0


# CLI spelling -> DeidOptions field; "no-modified-dates" turns the default date option off.
OPTION_FLAGS = {
    "retain-patient-characteristics": "retain_patient_characteristics",
    "retain-device-identity": "retain_device_identity",
    "retain-institution-identity": "retain_institution_identity",
    "clean-descriptors": "clean_descriptors",
    "retain-safe-private": "retain_safe_private",
    "retain-uids": "retain_uids",
    "no-modified-dates": "retain_modified_dates",
    "strict": "strict",
}


def _deidentify(args) -> int:
    """De-identify every DICOM file, slide and NIfTI under SRC into DST (see imaging_tasks.deid.tree).

    Exit status 0 whatever the inputs hold: each bad input is quarantined (or skipped) with a reason in the
    report.  2 only for what no input can fix: no key, SRC missing.
    """
    if args.workers != 1:  # the workers' server imports the de-identifier while this process does
        _start_forkserver("imaging_tasks.deid.tree")
    from imaging_tasks import storage
    from imaging_tasks.deid.dicom import DeidOptions
    from imaging_tasks.deid.tree import REPORT_NAME, deidentify_tree

    key, demo = _key(args)
    if not storage.as_path(args.src).exists():
        print(f"imaging-tasks: SRC {args.src} does not exist (a folder or bucket URI is expected)", file=sys.stderr)
        return 2
    chosen = {OPTION_FLAGS[o]: o != "no-modified-dates" for o in args.option}
    report = deidentify_tree(args.src, args.dst, key=key, demo=demo, options=DeidOptions(**chosen),
                             quarantine=args.quarantine, workers=args.workers)
    kinds = ", ".join(f"{n} {k}" for k, n in report["by_kind"].items() if n)

    def by_reason(entries) -> str:
        reasons: dict[str, int] = {}
        for e in entries:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
        return f" ({', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))})" if reasons else ""

    print(f"de-identified {report['deidentified']} of {report['inputs']} input(s) ({kinds or 'none'}), quarantined "
          f"{len(report['quarantined'])}{by_reason(report['quarantined'])} to {report['quarantine']}, skipped "
          f"{len(report['skipped'])}{by_reason(report['skipped'])} in {report['seconds']:.1f} s"
          f"{' (DEMO key)' if demo else ''}; report: {storage.join(args.dst, REPORT_NAME)}")
    return 0


def _start_forkserver(*preload: str) -> None:
    """Start multiprocessing's fork server now, importing ``preload`` (a pool's workers fork from it, ready):
    its ~1 s of imports then overlap this process's own instead of following them."""
    import multiprocessing
    import multiprocessing.forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    multiprocessing.forkserver.ensure_running()


def _process(args) -> int:
    record = specialties.get(args.specialty)
    options = record.options_for(_options(args, record))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = specialties.run_steps(args.specialty, [Path(f) for f in args.files], out, device=args.device,
                                   step=args.step, options=options)
    print(json.dumps({"metrics": result["metrics"], "outputs": result["outputs"]}, indent=2))
    return 0


def _options(args, record) -> dict:
    """The specialty's options given as flags, checked against its schema (a bad value exits 2 with the rule)."""
    given = {o.name: getattr(args, o.name) for o in record.options if getattr(args, o.name, None) is not None}
    try:
        record.options_for(given, "index"), record.options_for(given, "process")
    except ValueError as exc:
        print(f"imaging-tasks: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return given


def _per_specialty(sub, command: str, help_text: str, add_arguments, func) -> None:
    """``imaging-tasks <command> <specialty> ...``: one parser per specialty, its options as flags."""
    p = sub.add_parser(command, help=help_text)
    per = p.add_subparsers(dest="specialty", required=True, metavar="SPECIALTY")
    for name in specialties.names():
        record = specialties.get(name)
        q = per.add_parser(name, help=record.summary, description=f"{record.title}: {record.summary}")
        add_arguments(q)
        for o in record.options:
            bounds = "" if o.minimum is None and o.maximum is None else f"; {o.minimum}..{o.maximum}"
            kind = {"number": float, "integer": int, "string": str}.get(o.type)
            q.add_argument(f"--{o.name.replace('_', '-')}", dest=o.name, default=None,
                           type=kind or (lambda v: v), metavar=o.type.upper(),
                           help=f"{o.title}: {o.description} (default {o.default}{bounds})")
        q.set_defaults(func=func)


def _run_arguments(p) -> None:
    p.add_argument("--landing", required=True)
    p.add_argument("--lake", required=True)
    p.add_argument("--warehouse", required=True,
                   help="DuckDB file (or duckdb://PATH), or bigquery://PROJECT/DATASET[?location=EU] "
                        "(ambient Google credentials)")
    p.add_argument("--reprocess", action="store_true")
    p.add_argument("--run-id", default="cli")
    p.add_argument("--demo-key", action="store_true", help="use the public demo key (synthetic data only)")


def _process_arguments(p) -> None:
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--step", default=None, help="run only this step (the earlier steps' outputs must be in "
                                                "OUT/<step>/ from an earlier run); default: all steps in order")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, got {text!r}")
    return value


def _receive(args) -> int:
    """A DICOM Storage SCP feeding the landing bucket (imaging_tasks.edge), until SIGTERM/SIGINT.

    Exit status 2 for what no retry can fix (bad routes, port taken, missing bucket, no key in edge mode).
    """
    import signal
    import threading

    from imaging_tasks.edge.completion import AirflowTarget
    from imaging_tasks.edge.routing import load_routes
    from imaging_tasks.edge.scp import Receiver, ReceiverSettings, TLSFiles
    from imaging_tasks.errors import ConfigError

    # the receiver's own lines (facts, no PHI) at INFO; pynetdicom's only from WARNING up (it can dump identifiers)
    logging.getLogger("imaging_tasks.edge").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("imaging-tasks: --tls-cert and --tls-key go together (the certificate and its private key)",
              file=sys.stderr)
        return 2
    if args.quarantine and not args.deidentify:
        print("imaging-tasks: --quarantine holds instances the de-identifier refuses; it needs --deidentify",
              file=sys.stderr)
        return 2
    key, demo = _key(args) if args.deidentify else (None, False)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # from here on a signal means: finish cleanly
        signal.signal(signum, lambda *_: stop.set())
    try:
        airflow = None
        if args.airflow_url:
            airflow = AirflowTarget(args.airflow_url,
                                    username=args.airflow_user or os.environ.get("AIRFLOW_RECEIVER_USER"),
                                    password=args.airflow_password or os.environ.get("AIRFLOW_RECEIVER_PASSWORD"),
                                    token=os.environ.get("IMAGING_AIRFLOW_TOKEN") or None)
        settings = ReceiverSettings(
            landing=args.landing, spool=args.spool, ae_title=args.ae_title, host=args.host, port=args.port,
            allow_ae=tuple(args.allow_ae), allow_hosts=tuple(args.allow_host),
            tls=TLSFiles(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None,
            routes=load_routes(args.routes) if args.routes else None, deidentify=args.deidentify, key=key,
            demo=demo, quarantine=args.quarantine, quiet_seconds=args.quiet_seconds, airflow=airflow,
            max_backoff_s=args.retry_cap_seconds, initial_backoff_s=min(0.5, args.retry_cap_seconds))
        receiver = Receiver(settings).start()
    except ConfigError as exc:
        print(f"imaging-tasks: {exc}", file=sys.stderr)
        return 2
    print(f"imaging-tasks receive: AE {args.ae_title} listening on {args.host}:{receiver.port}", file=sys.stderr,
          flush=True)
    try:
        while not stop.wait(300):
            logging.getLogger("imaging_tasks.edge").info("receiver: %s; %d instance(s) in the spool",
                                                         receiver.summary(), receiver.spool.count())
    finally:
        receiver.stop()
    return 0


def _receive_arguments(p) -> None:
    p.add_argument("--landing", required=True, help="landing bucket or folder (file://, s3://, gs://, a path); "
                   "instances go to <landing>/<specialty>/<study>/<series>/<sop>.dcm, named by UID hashes")
    p.add_argument("--spool", required=True, help="local folder holding acknowledged instances until they are "
                   "uploaded (survives restarts; one receiver per spool)")
    p.add_argument("--ae-title", default="IMAGING", help="this receiver's AE title (default IMAGING)")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    p.add_argument("--allow-ae", nargs="+", action="extend", default=[], metavar="AE",
                   help="accept associations only from these calling AE titles")
    p.add_argument("--allow-host", nargs="+", action="extend", default=[], metavar="IP/CIDR",
                   help="accept associations only from these addresses or networks")
    p.add_argument("--tls-cert", default=None, metavar="FILE", help="PEM certificate (chain): serve DICOM over TLS")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="its private key")
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="CA bundle: clients must present a certificate it signed (mutual TLS)")
    p.add_argument("--deidentify", action="store_true", help="edge mode: de-identify on receipt (the specialty's "
                   "PS3.15 options), upload only the result; refused instances stay in a local quarantine")
    p.add_argument("--quarantine", default=None, metavar="DIR",
                   help="local folder for instances the de-identifier refuses (default SPOOL/quarantine)")
    p.add_argument("--routes", default=None, metavar="FILE", help="JSON routing table replacing the built-in one "
                   '(a list of {"modality", "sop_class", "calling_ae", "specialty"}; see imaging_tasks/edge/routing.py)')
    p.add_argument("--quiet-seconds", type=float, default=30.0, metavar="S",
                   help="a study is complete once nothing arrived for it this long (default 30)")
    p.add_argument("--airflow-url", default=None, metavar="URL",
                   help="Airflow 3 API server: post an asset event (imaging_<specialty>_landing) per complete study")
    p.add_argument("--airflow-user", default=None,
                   help="Airflow user (default $AIRFLOW_RECEIVER_USER; or a token in $IMAGING_AIRFLOW_TOKEN)")
    p.add_argument("--airflow-password", default=None,
                   help="its password (prefer $AIRFLOW_RECEIVER_PASSWORD: arguments are visible to other users)")
    p.add_argument("--retry-cap-seconds", type=float, default=30.0, metavar="S",
                   help="longest wait between retries of uploads and asset events (default 30)")
    p.add_argument("--demo-key", action="store_true", help="edge mode with the public demo key (synthetic data only)")


def _train_progression(args) -> int:
    """Train the reference progression LSTM (imaging_tasks.progression.train), write OUT.pt + OUT.json, and print
    its held-out MAE per score and horizon beside last-value-carried-forward and a per-patient linear fit.

    The synthetic cohort (default) is scored against its true scores; uploaded data against observed follow-up.
    A raw score upload (--scores) is pseudonymised with the de-identification key, exactly as the studies were.
    Exit status 2 for what retrying cannot fix: unusable inputs, too few patients, no key.
    """
    from imaging_tasks.errors import BadInput, ConfigError
    from imaging_tasks.progression import features as pf
    from imaging_tasks.progression.model import load_progression_model
    from imaging_tasks.progression.train import evaluate, format_mae_table, train_progression

    if args.sessions and not args.scores:
        print("imaging-tasks: --sessions needs --scores (the cognitive scores are the training targets)",
              file=sys.stderr)
        return 2
    try:
        truth = None
        if args.sessions:
            sessions = pf.read_session_rows(args.sessions)
            if args.scores_pseudonymised:
                scores = pf.read_table_rows(args.scores)
            else:
                key, _demo = _key(args)
                scores = pf.read_scores_upload(args.scores, key)
            source = f"{args.sessions} + {args.scores}"
        else:
            from imaging_tasks.progression.cohort import synthesize_cohort

            sessions, scores, truth = synthesize_cohort(args.patients, args.seed)
            source = f"synthetic cohort ({args.patients} patients, seed {args.seed})"
        features = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
        result = train_progression(sessions, scores, seed=args.seed, epochs=args.epochs, hidden=args.hidden,
                                   out=args.out, truth=truth, features=features, name=args.name,
                                   version=args.version)
        model, spec = load_progression_model(result.model_uri)
        report = evaluate(model, spec, result.sequences, result.test_patients, truth=truth)
    except (BadInput, ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"imaging-tasks: {exc}", file=sys.stderr)
        return 2
    print(format_mae_table(report))
    print(f"\ntrained on {source}: {len(result.train_patients)} patient(s), {result.samples} sample(s), "
          f"{len(result.test_patients)} held out, {len(result.skipped)} unusable, {result.seconds:.1f} s")
    print(f"model {spec.name} {spec.version}: {result.model_uri} (sha256 {result.sha256[:16]}...), "
          f"contract {result.config_uri}")
    return 0


def _ingest_scores(args) -> int:
    """The progression DAG's ``ingest_scores`` outside Airflow: the score uploads under --scores (and, with
    --fhir-base-url, the FHIR server's score Observations) pseudonymised with the de-identification key into the
    warehouse's ``cognitive_scores``, each upload / Observation version once.  Prints counts, never an ID.
    Exit status 2 for what retrying cannot fix (no key, a bad setting, the server refusing the credentials)."""
    from imaging_tasks.errors import ConfigError
    from imaging_tasks.progression import store
    from imaging_tasks.specialties import progression_specialty
    from imaging_tasks.warehouse import open_warehouse

    key, _demo = _key(args)
    specialty = args.specialty or progression_specialty()
    try:
        warehouse = open_warehouse(args.warehouse)
        counts = {"uploads": store.ingest(args.scores, warehouse, specialty, key, quiet_s=args.quiet_seconds)}
        if args.fhir_base_url:
            if not args.lake:
                raise ConfigError("--fhir-base-url needs --lake: the Observation versions loaded and the watermark "
                                  "are kept there")
            from imaging_tasks import fhir
            from imaging_tasks.progression.fhir_scores import parse_codes

            client = fhir.FhirClient(args.fhir_base_url)
            try:  # a refused read (fhir.FhirRefused) is a ConfigError: exit 2 below
                counts["fhir"] = store.ingest_fhir(client, warehouse, specialty, key, lake_root=args.lake,
                                                   codes=parse_codes(args.fhir_score_codes),
                                                   patient_system=args.fhir_patient_system)
            finally:
                client.close()
    except ConfigError as exc:
        print(f"imaging-tasks: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=1))
    return 0


def _predict_progression(args) -> int:
    """The progression DAG's ``predict`` outside Airflow: the patients whose sessions or scores changed since their
    last prediction by this model version, predicted and saved (``predictions``; refusals with their reason in
    ``prediction_refusals``).  Prints counts.  Exit status 2 for a model that cannot be used."""
    from imaging_tasks.errors import BadInput, ConfigError
    from imaging_tasks.progression.model import load_progression_model
    from imaging_tasks.progression.store import check_model, predict_changed
    from imaging_tasks.specialties import progression_specialty
    from imaging_tasks.warehouse import open_warehouse

    try:
        model, spec = load_progression_model(args.model)
        check_model(spec)
    except (BadInput, ConfigError, FileNotFoundError) as exc:
        print(f"imaging-tasks: {exc}", file=sys.stderr)
        return 2
    counts = predict_changed(open_warehouse(args.warehouse), args.specialty or progression_specialty(), model, spec,
                             run_id=args.run_id)
    print(json.dumps({"model": spec.name, "version": spec.version, **counts}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imaging-tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic studies with PHI headers and ground truth")
    p.add_argument("--specialty", choices=[*specialties.names(), "all"], default="all")
    p.add_argument("--out", required=True, help="landing folder (a specialty sub-folder is created)")
    p.add_argument("--studies", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-inputs", action="store_true", help="also plant files the pipeline must quarantine")
    p.set_defaults(func=_synth)

    _per_specialty(sub, "run", "index, de-identify, process and load one specialty, without Airflow",
                   _run_arguments, _run)

    p = sub.add_parser("deidentify", help="de-identify every DICOM file, slide and NIfTI under SRC into DST")
    p.add_argument("src", help="folder or bucket URI (file://, s3://, gs://) holding the raw files")
    p.add_argument("dst", help="folder or bucket URI for the de-identified tree and deidentify-report.json")
    p.add_argument("--option", action="append", default=[], choices=sorted(OPTION_FLAGS),
                   help="PS3.15 option (repeatable); default: basic profile + retain modified dates; 'strict' "
                        "keeps only allow-listed attributes (imaging_tasks/deid/allowlist.py)")
    p.add_argument("--quarantine", default=None, help="where refused inputs go (default: DST-quarantine)")
    p.add_argument("--workers", type=_positive, default=None, metavar="N",
                   help="processes de-identifying files side by side (default: the machine's cores, "
                        f"{os.cpu_count() or 1} here, fewer for a small tree; 1: in this process); the outputs "
                        "and report are the same for any N")
    p.add_argument("--demo-key", action="store_true", help="use the public demo key (synthetic data only)")
    p.set_defaults(func=_deidentify)

    _per_specialty(sub, "process", "run one specialty's processing on already de-identified local files",
                   _process_arguments, _process)

    p = sub.add_parser("receive", help="DICOM Storage SCP: receive C-STORE pushes into the landing bucket")
    _receive_arguments(p)
    p.set_defaults(func=_receive)
    p = sub.add_parser("train-progression", help="train the reference progression model (LSTM) and compare it "
                                                 "with LOCF and a per-patient linear fit on held-out patients")
    p.add_argument("--out", required=True, help="writes OUT.pt (TorchScript) and OUT.json (the model contract); a "
                   "path (relative to the working directory) or a file://, s3://, gs:// URI")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--cohort", choices=["synthetic"], default="synthetic",
                        help="train on the synthetic cohort with known truth (the default without --sessions)")
    source.add_argument("--sessions", default=None, metavar="FILE", help="session rows: a DuckDB warehouse "
                        "(studies joined with roi_features) or a CSV/Parquet of patient_id, study_id, study_date, "
                        "atlas, roi, metric, value")
    p.add_argument("--scores", default=None, metavar="FILE", help="cognitive scores (CSV/Parquet: patient_id, "
                   "date, score, value) as the site exports them: pseudonymised here with the de-identification key")
    p.add_argument("--scores-pseudonymised", action="store_true",
                   help="--scores already holds patient pseudonyms and shifted dates (skip pseudonymisation)")
    p.add_argument("--patients", type=int, default=200, help="synthetic cohort size (default 200)")
    p.add_argument("--seed", type=int, default=0, help="cohort, split and training seed (default 0)")
    p.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    p.add_argument("--hidden", type=int, default=32, help="LSTM units (default 32)")
    p.add_argument("--features", default=None, help="comma-separated feature names (default: the synthetic "
                   "cohort's ROI volumes, SUVR, the three scores and the two time features)")
    p.add_argument("--name", default="progression-lstm", help="the model's name in its JSON and predictions")
    p.add_argument("--version", default=None, help="its version (default: a digest of the data and settings)")
    p.add_argument("--demo-key", action="store_true", help="pseudonymise --scores with the public demo key "
                   "(synthetic data only)")
    p.set_defaults(func=_train_progression)
    warehouse_help = ("DuckDB file (or duckdb://PATH), or bigquery://PROJECT/DATASET[?location=EU] (ambient Google "
                      "credentials)")
    specialty_help = "the specialty whose sessions feed progression (default: the one the registry marks)"
    p = sub.add_parser("ingest-scores", help="cognitive-score uploads (and FHIR Observations) pseudonymised into "
                                             "the warehouse, each once")
    p.add_argument("--scores", required=True, help="folder of CSV/Parquet uploads (patient_id, date, score, value; "
                   "raw IDs and real dates), e.g. data/landing/cognitive_scores; a path or file://, s3://, gs:// URI")
    p.add_argument("--warehouse", required=True, help=warehouse_help)
    p.add_argument("--specialty", default=None, help=specialty_help)
    p.add_argument("--quiet-seconds", type=float, default=0.0,
                   help="an upload modified more recently than this is still arriving and waits (default 0)")
    p.add_argument("--fhir-base-url", default=None, help="also read score Observations from this FHIR R4 server")
    p.add_argument("--lake", default=None, help="lake root (with --fhir-base-url: where the Observation versions "
                   "loaded and the watermark are kept)")
    p.add_argument("--fhir-patient-system", default=None, help="system of the Patient identifier that is the "
                   "DICOM PatientID (default: the Patient's only identifier)")
    p.add_argument("--fhir-score-codes", default=None, help='JSON {"system|code": score}; default LOINC 72107-6 '
                   "(MMSE)")
    p.add_argument("--demo-key", action="store_true", help="use the public demo key (synthetic data only)")
    p.set_defaults(func=_ingest_scores)
    p = sub.add_parser("predict-progression", help="predict for the patients whose sessions or scores changed "
                                                   "since their last prediction by the model")
    p.add_argument("--model", required=True, help="the model file (.pt / .pt2, its JSON beside it): a path or "
                   "file://, s3://, gs:// URI")
    p.add_argument("--warehouse", required=True, help=warehouse_help)
    p.add_argument("--specialty", default=None, help=specialty_help)
    p.add_argument("--run-id", default="cli", help="recorded on every prediction row (default cli)")
    p.set_defaults(func=_predict_progression)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='{"level": "%(levelname)s", "logger": "%(name)s", "msg": "%(message)s"}')
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
