"""DICOM de-identification throughput and leakage: this project vs dicognito, deid and a bare pydicom loop.

    .venv/bin/python bench/deid_peers.py [--min-files 2000] [--processes 2] [--repeats 2] [--workdir DIR]

What it does, in one run:

1. Creates ``bench/.venv-peers`` (``python3 -m venv`` + ``pip install -r bench/requirements-peers.txt``) if
   missing: dicognito and deid (pydicom/deid) live there, apart from the project venv.
2. Builds the corpus: every file of ``pydicom.data.get_testdata_files()`` (the test files shipped inside the
   pydicom wheel) that pydicom reads, replicated to at least ``--min-files`` files, each copy with unique
   identifying values planted (patient name/ID/birth date, accession, institution, physician and operator
   names, study/series/instance UIDs, and the same kinds of values inside nested sequences and in a private
   block, including a private sequence).  ``manifest.json`` lists each file's planted strings.
3. Runs each tool with a ``multiprocessing`` pool of ``--processes`` workers over the same corpus, with the
   same discipline: read the file from disk, de-identify, write it to the tool's output folder.  Tools:

   * ``bare_pydicom``: ``dcmread`` + ``save_as``, nothing else (the practical ceiling);
   * ``ours``: ``imaging_tasks.deid.dicom.deidentify_bytes`` (basic profile + default options, fixed key):
     the byte-level fast path (``imaging_tasks.deid.stream``), the reference path where it declines; each
     file's path (fast, or fallback and its cause) is recorded;
   * ``ours_reference``: the same call with ``fast=False`` (the pydicom-object reference walker only);
   * ``dicognito``: ``Anonymizer(seed=...).anonymize(ds)`` + ``save_as`` (its CLI's core);
   * ``deid``: ``replace_identifiers(..., deid=DeidRecipe())``: the default ``deid.dicom`` recipe, saved to
     the output folder (``remove_private`` left at its default, False, as in deid's examples).

   Pass 1 runs every tool on the whole corpus: files/s, failures (exceptions; for ours, refusals with the
   BadInput reason, e.g. burned-in-annotation modalities), and the planted values that survive: the raw
   bytes of each output are searched for each of its own planted strings (count = files x values).
   Pass 2 times every tool again on the files that *all* tools wrote (same work for everyone), best of
   ``--repeats``: that is the headline files/s.
4. Prints a table, writes ``bench/results/deid_peers.json`` and a markdown table ``bench/results/deid_peers.md``.

The worker side of this script runs under either interpreter (``--worker TOOL``), so it imports nothing
from the project or the peers at module level.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS_VENV = BENCH / ".venv-peers"
PEERS_REQ = BENCH / "requirements-peers.txt"
RESULTS = BENCH / "results"
TOOLS = ("bare_pydicom", "ours", "ours_reference", "dicognito", "deid")
PEER_TOOLS = frozenset({"dicognito", "deid"})
BENCH_KEY = b"bench-deid-peers-fixed-key-v1"
DICOGNITO_SEED = "bench-deid-peers"
UID_ROOT = "1.2.826.0.1.3680043.10.999"


# ----------------------------------------------------------------------------------------- peers venv

def peers_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def ensure_peers_venv() -> None:
    stamp = PEERS_VENV / ".installed"
    if stamp.exists() and stamp.stat().st_mtime >= PEERS_REQ.stat().st_mtime and peers_python().exists():
        return
    if not peers_python().exists():
        print(f"creating {PEERS_VENV.relative_to(REPO)} ...", flush=True)
        subprocess.run(["python3", "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run([str(peers_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-r", str(PEERS_REQ)], check=True)
    stamp.touch()


def peer_versions() -> dict:
    code = ("import importlib.metadata as m, json;"
            "print(json.dumps({p: m.version(p) for p in ('dicognito', 'deid', 'pydicom')}))")
    out = subprocess.run([str(peers_python()), "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


# ----------------------------------------------------------------------------------------- corpus

def _plant(ds, i: int) -> dict[str, str]:
    """Set unique identifying values in ``ds``; returns label -> the string that must not survive."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    birth = (dt.date(1931, 1, 1) + dt.timedelta(days=i)).strftime("%Y%m%d")
    v = {
        "PatientName.family": f"PLNFAM{i:05d}", "PatientName.given": f"PLNGIV{i:05d}",
        "PatientID": f"PLPID{i:05d}", "PatientBirthDate": birth, "AccessionNumber": f"PLACC{i:05d}",
        "InstitutionName": f"PLINST{i:05d} HOSPITAL", "ReferringPhysicianName": f"PLREF{i:05d}",
        "PerformingPhysicianName": f"PLPERF{i:05d}", "OperatorsName": f"PLOPER{i:05d}",
        "StudyInstanceUID": f"{UID_ROOT}.{i}.1", "SeriesInstanceUID": f"{UID_ROOT}.{i}.2",
        "SOPInstanceUID": f"{UID_ROOT}.{i}.3",
        "nested:OtherPatientIDsSequence/PatientID": f"PLOPID{i:05d}",
        "nested:RequestAttributesSequence/AccessionNumber": f"PLRACC{i:05d}",
        "nested:RequestAttributesSequence/RequestedProcedureID": f"PLRPID{i:05d}",
        "nested:ReferencedStudySequence/ReferencedSOPInstanceUID": f"{UID_ROOT}.{i}.4",
        "nested:ReferencedPatientSequence/PatientName": f"PLNREF{i:05d}",
        "private:LO": f"PLPRIV{i:05d}",
        "private:SQ/PatientName": f"PLPSQ{i:05d}",
    }
    ds.PatientName = f"{v['PatientName.family']}^{v['PatientName.given']}"
    ds.PatientID = v["PatientID"]
    ds.PatientBirthDate = birth
    ds.AccessionNumber = v["AccessionNumber"]
    ds.InstitutionName = v["InstitutionName"]
    ds.ReferringPhysicianName = v["ReferringPhysicianName"]
    ds.PerformingPhysicianName = v["PerformingPhysicianName"]
    ds.OperatorsName = v["OperatorsName"]
    ds.StudyInstanceUID = v["StudyInstanceUID"]
    ds.SeriesInstanceUID = v["SeriesInstanceUID"]
    ds.SOPInstanceUID = v["SOPInstanceUID"]
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = v["SOPInstanceUID"]

    other = Dataset()
    other.PatientID = v["nested:OtherPatientIDsSequence/PatientID"]
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    req = Dataset()
    req.AccessionNumber = v["nested:RequestAttributesSequence/AccessionNumber"]
    req.RequestedProcedureID = v["nested:RequestAttributesSequence/RequestedProcedureID"]
    req.ScheduledProcedureStepID = f"PLSPS{i:05d}"
    ds.RequestAttributesSequence = Sequence([req])
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = v["nested:ReferencedStudySequence/ReferencedSOPInstanceUID"]
    ds.ReferencedStudySequence = Sequence([ref])
    refpat = Dataset()
    refpat.PatientName = v["nested:ReferencedPatientSequence/PatientName"]
    ds.ReferencedPatientSequence = Sequence([refpat])

    block = ds.private_block(0x0009, "PLANTED BENCH", create=True)
    block.add_new(0x01, "LO", v["private:LO"])
    inner = Dataset()
    inner.PatientName = v["private:SQ/PatientName"]
    block.add_new(0x02, "SQ", Sequence([inner]))
    return v


def build_corpus(root: Path, min_files: int) -> dict:
    import pydicom
    from pydicom.data import get_testdata_files

    sources = []
    for path in sorted(get_testdata_files()):
        try:
            pydicom.dcmread(path)  # readable by pydicom at all (drops README, JSON, dumps, ICC, gz...)
        except Exception:  # noqa: BLE001
            continue
        sources.append(path)
    manifest_path = root / "manifest.json"
    replicas = math.ceil(min_files / len(sources))
    want = {"pydicom": pydicom.__version__, "sources": [Path(s).name for s in sources], "replicas": replicas}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if all(manifest.get(k) == want[k] for k in want):
            return manifest
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for old in corpus.iterdir():
        old.unlink()
    files, skipped = [], {}
    i = 0
    for r in range(replicas):
        for src in sources:
            ds = pydicom.dcmread(src)
            try:
                tokens = _plant(ds, i)
                name = f"{r:03d}_{Path(src).parent.name}_{Path(src).name}"
                if not name.endswith(".dcm"):
                    name += ".dcm"
                ds.save_as(corpus / name)
            except Exception as exc:  # noqa: BLE001 - a source pydicom cannot write back with the values
                skipped[Path(src).name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            files.append({"name": name, "source": Path(src).name, "tokens": tokens})
            i += 1
    manifest = {**want, "files": files, "skipped_sources": skipped,
                "total_bytes": sum((corpus / f["name"]).stat().st_size for f in files)}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


# ----------------------------------------------------------------------------------------- worker side

_HANDLER = None
_PATH = [""]


def _init_worker(tool: str) -> None:
    global _HANDLER
    import warnings
    warnings.simplefilter("ignore")
    if tool == "bare_pydicom":
        import pydicom

        def handler(src: str, dst: str) -> None:
            ds = pydicom.dcmread(src)
            ds.save_as(dst)
    elif tool in ("ours", "ours_reference"):
        sys.path.insert(0, str(REPO))
        from imaging_tasks.deid import stream
        from imaging_tasks.deid.dicom import deidentify_bytes
        fast = tool == "ours"

        def handler(src: str, dst: str) -> str:
            with open(src, "rb") as fh:
                data = fh.read()
            before = sum(stream.FALLBACKS.values())
            try:
                out, _info = deidentify_bytes(data, BENCH_KEY, fast=fast)
            finally:
                # which path did the work: the byte-level fast path, or the reference after a fallback (cause)
                declined = sum(stream.FALLBACKS.values()) != before
                path = (f"fallback:{stream.LAST_FALLBACK}" if declined else "fast") if fast else "reference"
                _PATH[0] = path
            with open(dst, "wb") as fh:
                fh.write(out)
            return path
    elif tool == "dicognito":
        import pydicom
        from dicognito.anonymizer import Anonymizer
        anonymizer = Anonymizer(seed=DICOGNITO_SEED)

        def handler(src: str, dst: str) -> None:
            ds = pydicom.dcmread(src)
            anonymizer.anonymize(ds)
            ds.save_as(dst)
    elif tool == "deid":
        os.environ.setdefault("MESSAGELEVEL", "ERROR")
        from deid.config import DeidRecipe
        from deid.dicom import replace_identifiers
        recipe = DeidRecipe()  # the default deid.dicom recipe

        def handler(src: str, dst: str) -> None:
            replace_identifiers(dicom_files=[src], deid=recipe, save=True, output_folder=os.path.dirname(dst),
                                overwrite=True)
    else:
        raise SystemExit(f"unknown tool {tool}")
    _HANDLER = handler


def _ready(_: int) -> int:
    time.sleep(0.2)  # both workers initialised before the clock starts
    return os.getpid()


def _process(job: tuple[str, str]) -> tuple[str, str, str, float, float, str]:
    src, dst = job
    _PATH[0] = ""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        _HANDLER(src, dst)
        status, detail = "ok", ""
    except Exception as exc:  # noqa: BLE001
        reason = getattr(exc, "reason", None)
        if type(exc).__name__ == "BadInput" and reason:
            status, detail = "refused", str(reason)
        else:
            status, detail = "error", type(exc).__name__
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return os.path.basename(src), status, detail, wall, cpu, _PATH[0]


def worker_main(tool: str, files_json: Path, out_dir: Path, result_json: Path, processes: int) -> None:
    import multiprocessing as mp
    names = json.loads(files_json.read_text())["files"]
    corpus = files_json.parent / "corpus"
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(corpus / n), str(out_dir / n)) for n in names]
    with mp.get_context("fork").Pool(processes, initializer=_init_worker, initargs=(tool,)) as pool:
        pool.map(_ready, range(processes), chunksize=1)
        t0 = time.perf_counter()
        rows = list(pool.imap_unordered(_process, jobs, chunksize=8))
        wall = time.perf_counter() - t0
    result_json.write_text(json.dumps({"tool": tool, "wall_s": wall, "files": len(jobs),
                                       "cpu_s": sum(r[4] for r in rows),
                                       "rows": [list(r) for r in rows]}))


# ----------------------------------------------------------------------------------------- driver

def run_tool(tool: str, names: list[str], work: Path, out_dir: Path, processes: int) -> dict:
    files_json = work / f"files_{tool}.json"
    files_json.write_text(json.dumps({"files": names}))
    result_json = work / f"result_{tool}.json"
    python = peers_python() if tool in PEER_TOOLS else Path(sys.executable)
    env = dict(os.environ, PYTHONPATH=str(REPO), MESSAGELEVEL="ERROR")
    with open(work / f"{tool}.log", "ab") as log:
        subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", tool, "--files", str(files_json),
                        "--out", str(out_dir), "--result", str(result_json), "--processes", str(processes)],
                       check=True, env=env, stdout=log, stderr=log)
    return json.loads(result_json.read_text())


def _searchable(blob: bytes) -> bytes:
    """The bytes to search: a Deflated Explicit VR Little Endian data set is inflated (else nothing shows)."""
    if b"1.2.840.10008.1.2.1.99" not in blob[:2048]:
        return blob
    import io
    import zlib
    from pydicom.filereader import _read_file_meta_info, read_preamble
    try:
        fp = io.BytesIO(blob)
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        return blob + zlib.decompress(blob[fp.tell():], -zlib.MAX_WBITS)
    except Exception:  # noqa: BLE001 - not deflated after all: search it as it is
        return blob


def survivors(manifest: dict, out_dir: Path, ok: set[str]) -> tuple[int, dict[str, int], int]:
    """(files x values found, per label, outputs pydicom cannot re-read) over the files the tool wrote."""
    import pydicom
    total, per_label, unreadable = 0, {}, 0
    for f in manifest["files"]:
        if f["name"] not in ok:
            continue
        path = out_dir / f["name"]
        blob = _searchable(path.read_bytes())
        for label, token in f["tokens"].items():
            if token.encode() in blob or token.encode("utf-16-le") in blob:
                total += 1
                per_label[label] = per_label.get(label, 0) + 1
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001
            unreadable += 1
    return total, per_label, unreadable


def markdown(results: dict) -> str:
    m = results["corpus"]
    lines = [
        f"Corpus: {m['files']} files ({m['sources']} pydicom test files x {m['replicas']}, "
        f"{m['megabytes']:.0f} MB), {m['planted_values']} planted identifying values; "
        f"{results['processes']} worker processes per tool, {results['cpu_count']} cores.",
        "",
        "| tool | files/s, common subset (wall) | files/s, common subset (by CPU time) | files/s, whole corpus "
        "| written | refused | errors | planted values surviving | unreadable outputs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tool in TOOLS:
        r = results["tools"][tool]
        lines.append(
            f"| {r['label']} | {r['common_files_per_s']:.1f} | {r['common_cpu_files_per_s']:.1f} | "
            f"{r['full_files_per_s']:.1f} | {r['ok']} | "
            f"{r['refused']} | {r['errors']} | {r['survivors']} / {r['planted_checked']} | {r['unreadable_outputs']} |")
    t = results["targets"]
    ours = results["tools"]["ours"]
    paths, written = ours.get("paths", {}), ours.get("written_paths", {})
    total, total_w = sum(paths.values()), sum(written.values())
    fallbacks = {k.split(":", 1)[1]: v for k, v in sorted(paths.items(), key=lambda kv: -kv[1])
                 if k.startswith("fallback:")}
    if total:
        lines += [
            "",
            f"Fast path coverage (ours, whole corpus): {paths.get('fast', 0)} of {total} files "
            f"({paths.get('fast', 0) / total:.0%}) done by the byte-level path, {written.get('fast', 0)} of the "
            f"{total_w} written ({written.get('fast', 0) / max(total_w, 1):.0%}); fallbacks to the reference "
            f"path by cause: " + (", ".join(f"{k} {v}" for k, v in fallbacks.items()) or "none") + ".",
        ]
    lines += [
        "",
        f"Common subset: {results['common_files']} files that every tool wrote. "
        f"ours / fastest peer ({t['fastest_peer']}): {t['ours_vs_fastest_peer']:.2f}x wall, "
        f"{t['ours_vs_fastest_peer_cpu']:.2f}x by CPU time (target >= 3); ours / bare pydicom: "
        f"{t['ours_vs_bare']:.0%} wall, {t['ours_vs_bare_cpu']:.0%} by CPU time (target >= 50%).",
        "Wall files/s is measured with 2 worker processes; by-CPU-time files/s is files x 2 / (CPU seconds "
        "summed over the per-file calls), which takes out the load of other processes on a shared machine.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-files", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats on the common subset (best kept)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "deid_peers_bench")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--worker")
    parser.add_argument("--files", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.files, args.out, args.result, args.processes)
        return 0

    tools = [t for t in args.tools.split(",") if t]
    ensure_peers_venv()
    import pydicom
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    for log in work.glob("*.log"):
        log.unlink()
    t0 = time.perf_counter()
    manifest = build_corpus(work, args.min_files)
    names = [f["name"] for f in manifest["files"]]
    n_tokens = len(manifest["files"][0]["tokens"]) if names else 0
    print(f"corpus: {len(names)} files from {len(manifest['sources'])} pydicom test files "
          f"({manifest['total_bytes'] / 1e6:.0f} MB) in {work / 'corpus'} [{time.perf_counter() - t0:.1f} s]",
          flush=True)

    per_tool: dict[str, dict] = {}
    status: dict[str, dict[str, tuple[str, str]]] = {}
    for tool in tools:
        out_dir = work / "out" / tool
        if out_dir.exists():
            for old in out_dir.iterdir():
                old.unlink()
        res = run_tool(tool, names, work, out_dir, args.processes)
        status[tool] = {r[0]: (r[1], r[2]) for r in res["rows"]}
        ok = {n for n, (s, _) in status[tool].items() if s == "ok"}
        surv, per_label, unreadable = survivors(manifest, out_dir, ok)
        refused_reasons: dict[str, int] = {}
        error_types: dict[str, int] = {}
        for s, d in status[tool].values():
            if s == "refused":
                refused_reasons[d] = refused_reasons.get(d, 0) + 1
            elif s == "error":
                error_types[d] = error_types.get(d, 0) + 1
        paths: dict[str, int] = {}
        written_paths: dict[str, int] = {}
        for r in res["rows"]:
            if len(r) > 5 and r[5]:
                paths[r[5]] = paths.get(r[5], 0) + 1
                if r[1] == "ok":
                    written_paths[r[5]] = written_paths.get(r[5], 0) + 1
        per_tool[tool] = {
            "paths": paths, "written_paths": written_paths,
            "label": tool, "full_wall_s": res["wall_s"], "full_files_per_s": len(names) / res["wall_s"],
            "ok": len(ok), "refused": sum(refused_reasons.values()), "refused_reasons": refused_reasons,
            "errors": sum(error_types.values()), "error_types": error_types,
            "failed_sources": sorted({f["source"] for f in manifest["files"] if status[tool][f["name"]][0] != "ok"}),
            "survivors": surv, "survivors_by_value": per_label, "planted_checked": len(ok) * n_tokens,
            "unreadable_outputs": unreadable,
        }
        print(f"  {tool:<13} whole corpus: {len(names) / res['wall_s']:8.1f} files/s  ok {len(ok)}  "
              f"refused {per_tool[tool]['refused']}  errors {per_tool[tool]['errors']}  survivors {surv}",
              flush=True)

    common = [n for n in names if all(status[t][n][0] == "ok" for t in tools)]
    for tool in tools:
        per_tool[tool]["common_wall_s"] = per_tool[tool]["common_cpu_s"] = math.inf
    for _ in range(args.repeats):  # round robin, so a burst of load elsewhere hits every tool alike
        for tool in tools:
            res = run_tool(tool, common, work, work / "out_common" / tool, args.processes)
            per_tool[tool]["common_wall_s"] = min(per_tool[tool]["common_wall_s"], res["wall_s"])
            per_tool[tool]["common_cpu_s"] = min(per_tool[tool]["common_cpu_s"], res["cpu_s"])
    for tool in tools:
        r = per_tool[tool]
        r["common_files_per_s"] = len(common) / r["common_wall_s"] if common else 0.0
        # CPU time summed over the workers' per-file calls: the same work rate with the load of other
        # processes on the machine taken out (wall files/s on an otherwise idle machine approaches it)
        r["common_cpu_files_per_s"] = len(common) * args.processes / r["common_cpu_s"] if common else 0.0
        r["common_ms_cpu_per_file"] = 1000 * r["common_cpu_s"] / len(common) if common else 0.0
        print(f"  {tool:<13} common subset ({len(common)} files): {r['common_files_per_s']:8.1f} files/s wall, "
              f"{r['common_cpu_files_per_s']:8.1f} files/s by CPU time ({r['common_ms_cpu_per_file']:.2f} ms CPU/file)",
              flush=True)

    versions = peer_versions() if PEER_TOOLS & set(tools) else {}
    labels = {"bare_pydicom": f"bare pydicom {pydicom.__version__} read+write",
              "ours": "ours (imaging_tasks.deid, byte-level fast path)",
              "ours_reference": "ours, reference path only (fast=False)",
              "dicognito": f"dicognito {versions.get('dicognito', '?')}",
              "deid": f"deid {versions.get('deid', '?')} (default recipe)"}
    for tool in tools:
        per_tool[tool]["label"] = labels[tool]
    peers = [t for t in tools if t in PEER_TOOLS]
    fastest = max(peers, key=lambda t: per_tool[t]["common_files_per_s"]) if peers else None
    targets = {"fastest_peer": fastest}
    for metric, suffix in (("common_files_per_s", ""), ("common_cpu_files_per_s", "_cpu")):
        ours = per_tool.get("ours", {}).get(metric, 0.0)
        targets["ours_vs_fastest_peer" + suffix] = ours / per_tool[fastest][metric] if fastest else None
        targets["ours_vs_bare" + suffix] = (ours / per_tool["bare_pydicom"][metric]
                                            if "bare_pydicom" in per_tool else None)
    results = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "cpu_count": os.cpu_count(), "processes": args.processes, "repeats": args.repeats,
        "corpus": {"files": len(names), "sources": len(manifest["sources"]), "replicas": manifest["replicas"],
                   "megabytes": manifest["total_bytes"] / 1e6, "planted_values": len(names) * n_tokens,
                   "values_per_file": n_tokens, "skipped_sources": manifest["skipped_sources"],
                   "pydicom": manifest["pydicom"]},
        "common_files": len(common), "peer_versions": versions, "tools": per_tool, "targets": targets,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deid_peers.json").write_text(json.dumps(results, indent=1))
    if set(tools) == set(TOOLS):
        md = markdown(results)
        (RESULTS / "deid_peers.md").write_text(md)
        print()
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
