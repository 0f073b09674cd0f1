"""``imaging-tasks``: every pipeline step from the command line, outside Airflow.

    imaging-tasks synth --specialty all --out data/landing --studies 2 --seed 0 [--bad-inputs]
    imaging-tasks run cardiovascular --landing data/landing/cardiovascular --lake data/lake \
        --warehouse data/warehouse.duckdb
    imaging-tasks deidentify SRC DST
    imaging-tasks process cardiovascular FILE... --out DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from imaging_tasks.specialties import SPECIALTIES


def _synth(args) -> int:
    from imaging_tasks.specialties import synthesizer
    from imaging_tasks.synth.bad_inputs import write_bad_inputs

    out = Path(args.out.removeprefix("file://"))
    chosen = SPECIALTIES if args.specialty == "all" else (args.specialty,)
    for specialty in chosen:
        # distinct patients per specialty, whichever subset is asked for
        truths = synthesizer(specialty)(out, args.studies, args.seed + 1000 * SPECIALTIES.index(specialty))
        bad = write_bad_inputs(out, specialty, args.seed) if args.bad_inputs else {}
        print(f"{specialty}: {len(truths)} stud(ies), {len(bad)} bad input(s) -> {out / specialty}")
    return 0


def _key():
    from imaging_tasks.deid.keys import load_key

    key, demo = load_key()
    if demo:
        print("warning: IMAGING_DEID_KEY is not set; using the DEMO key (outputs are marked DEMO)", file=sys.stderr)
    return key, demo


def _run(args) -> int:
    """The whole chain for one specialty, in process: what the DAG does, without Airflow."""
    from imaging_tasks import pipeline
    from imaging_tasks.warehouse import DuckDBWarehouse

    key, demo = _key()
    lake = pipeline.Lake(args.lake, args.specialty)
    run = pipeline.RunContext(run_id=args.run_id)
    summary = pipeline.index_landing(args.landing, lake, key=key, reprocess=args.reprocess)
    processed = []
    for study in summary["studies"]:
        clean = pipeline.deidentify_study(study, lake, key=key, demo=demo, run=run)
        if args.specialty == "pathology":
            plan = pipeline.plan_slide(clean, lake, run=run)
            feats = [pipeline.tile_features_batch(b, lake, run=run) for b in pipeline.tile_batches([plan])]
            processed.append(pipeline.finish_slide(plan, feats, lake, run=run))
        else:
            processed.append(pipeline.process_study(clean, lake, run=run))
    counts = pipeline.load(processed, lake, DuckDBWarehouse(args.warehouse), run=run)
    print(json.dumps({"studies": len(summary["studies"]), "skipped_done": len(summary["skipped_done"]),
                      "quarantined": summary["quarantined"], "rows": counts}, sort_keys=True))
    return 0


def _deidentify(args) -> int:
    """De-identify every DICOM file, slide and NIfTI under SRC into DST; bad files go to DST/quarantine."""
    import tempfile

    from imaging_tasks import storage
    from imaging_tasks.deid.dicom import deidentify_bytes
    from imaging_tasks.deid.nifti import deidentify_nifti
    from imaging_tasks.deid.pseudonym import pseudo_id
    from imaging_tasks.deid.slide import deidentify_svs
    from imaging_tasks.errors import BadInput
    from imaging_tasks.index import SLIDE_SUFFIXES

    key, demo = _key()
    report = {"deidentified": 0, "quarantined": [], "demo_key": demo}
    with tempfile.TemporaryDirectory(prefix="deid-cli-") as tmp:
        for n, obj in enumerate(storage.list_objects(args.src)):
            name = obj.relpath.lower()
            data = storage.read_bytes(obj.uri)
            try:
                if name.endswith(SLIDE_SUFFIXES) or name.endswith((".nii", ".nii.gz")):
                    gz = ".gz" if name.endswith(".gz") else ""
                    src = Path(tmp) / f"in-{n}{'.nii' + gz if '.nii' in name else Path(name).suffix}"
                    src.write_bytes(data)
                    dst = Path(tmp) / f"out-{n}{src.name[src.name.index('.'):]}"
                    if ".nii" in name:
                        deidentify_nifti(src, dst)
                        target = storage.join(args.dst, "nifti", pseudo_id(key, storage.sha256_bytes(data), "study")
                                              + ".nii" + gz)
                    else:
                        info = deidentify_svs(src, dst, key)
                        target = storage.join(args.dst, "slides", info["pseudo_patient"], info["pseudo_study"],
                                              "slide.svs")
                    storage.write_bytes(target, dst.read_bytes())
                else:
                    out, info = deidentify_bytes(data, key, demo=demo)
                    storage.write_bytes(storage.join(args.dst, "anonymized", info["pseudo_patient"],
                                                     info["pseudo_study"], info["series_uid"],
                                                     info["sop_uid"] + ".dcm"), out)
            except BadInput as exc:
                storage.quarantine(data, args.dst, specialty="cli", reason=exc.reason, message=exc.message,
                                   stage="deidentify", source_uri=obj.uri)
                report["quarantined"].append({"reason": exc.reason, "sha256": storage.sha256_bytes(data)})
                continue
            report["deidentified"] += 1
    storage.write_json(storage.join(args.dst, "deidentify-report.json"), report)
    print(f"de-identified {report['deidentified']} file(s), quarantined {len(report['quarantined'])}"
          f"{' (DEMO key)' if demo else ''}; report: {storage.join(args.dst, 'deidentify-report.json')}")
    return 0


def _process(args) -> int:
    from imaging_tasks.specialties import processor

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = processor(args.specialty)([Path(f) for f in args.files], out, device=args.device)
    print(json.dumps({"metrics": result["metrics"], "outputs": result["outputs"]}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imaging-tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic studies with PHI headers and ground truth")
    p.add_argument("--specialty", choices=[*SPECIALTIES, "all"], default="all")
    p.add_argument("--out", required=True, help="landing folder (a specialty sub-folder is created)")
    p.add_argument("--studies", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-inputs", action="store_true", help="also plant files the pipeline must quarantine")
    p.set_defaults(func=_synth)

    p = sub.add_parser("run", help="index, de-identify, process and load one specialty, without Airflow")
    p.add_argument("specialty", choices=SPECIALTIES)
    p.add_argument("--landing", required=True)
    p.add_argument("--lake", required=True)
    p.add_argument("--warehouse", required=True, help="DuckDB file")
    p.add_argument("--reprocess", action="store_true")
    p.add_argument("--run-id", default="cli")
    p.set_defaults(func=_run)

    p = sub.add_parser("deidentify", help="de-identify every DICOM file, slide and NIfTI under SRC into DST")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=_deidentify)

    p = sub.add_parser("process", help="run one specialty's algorithm on already de-identified local files")
    p.add_argument("specialty", choices=SPECIALTIES)
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_process)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='{"level": "%(levelname)s", "logger": "%(name)s", "msg": "%(message)s"}')
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
