"""The de-identification command as whole processes, side by side: ``imaging-tasks deidentify`` (2 worker
processes, and 1), dicognito's command line and a bare pydicom read+write loop (1 and 2 processes).

    .venv/bin/python bench/deid_scale.py [--replicas 20] [--repeats 3] [--workdir DIR] [--baseline-tree DIR]

What it does:

1. Creates ``bench/.venv-peers`` if missing (``deid_peers.ensure_peers_venv``: dicognito pinned in
   ``bench/requirements-peers.txt``).
2. Builds the corpus with ``deid_peers.build_corpus``: every file of ``pydicom.data.get_testdata_files()`` that
   pydicom reads and writes back, ``--replicas`` times (default 20), each copy with unique identifying values
   planted, in one flat folder.
3. Runs each row as a whole process (interpreter start, imports, listing, every file read, de-identified and
   written, exit), its output folder emptied before each run (not timed), the rows interleaved round by round,
   best of ``--repeats``; wall time from launch to exit, CPU time of the process and its children:

   * ``ours_w2`` / ``ours_w1``: ``imaging-tasks deidentify CORPUS OUT --workers 2`` / ``--workers 1`` (basic
     profile, default options, a fixed key; the PHI audit of every output included, the report written);
   * ``before`` (with ``--baseline-tree DIR``, a copy of ``imaging_tasks`` from an earlier commit, e.g.
     ``git archive HEAD imaging_tasks | tar -x -C DIR``): the same command from that tree (one process);
   * ``dicognito``: its command line's loop (``dicognito.__main__``: ``dcmread``, ``Anonymizer.anonymize``,
     save) over the corpus in one process (it has no parallel mode), going on past a file it fails on (its own
     command line aborts the run at the first, here after 78 files) and without its burned-in guard, as in
     deid_peers.py;
   * ``bare_1`` / ``bare_2``: ``dcmread`` + ``save_as`` of every file, 1 process / a 2-process pool (fork: the
     loop starts no thread), imports included: the practical ceiling.

4. Also times, in this process, the de-identification step's per-file work on the corpus's distinct sources:
   de-identify + read the input's identifying values + audit the output, with the values read by a second parse
   (``dicom_io.read_header``, before) and from the de-identifier's own parse (``deidentify_bytes(source=...)``,
   now).
5. Prints a table and writes ``bench/results/deid_scale.json`` and ``bench/results/deid_scale.md``.

Targets (issue 17): ``ours_w2`` >= 3x ``dicognito`` and >= 80% of ``bare_2``, in files/s over the whole corpus.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import deid_peers  # noqa: E402 - the corpus and the peers venv, shared with deid_peers.py

RESULTS = BENCH / "results"
KEY = "bench-deid-scale-fixed-key-v1"
ROWS = ("ours_w2", "ours_w1", "before", "dicognito", "bare_1", "bare_2")

BARE = r"""
import multiprocessing as mp, os, sys, warnings
warnings.simplefilter("ignore")
import pydicom

def one(job):
    src, dst = job
    try:
        pydicom.dcmread(src).save_as(dst)
        return 1
    except Exception:
        return 0

if __name__ == "__main__":
    corpus, out, processes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    jobs = [(os.path.join(corpus, n), os.path.join(out, n)) for n in sorted(os.listdir(corpus))]
    if processes == 1:
        done = sum(map(one, jobs))
    else:
        with mp.get_context("fork").Pool(processes) as pool:
            done = sum(pool.imap_unordered(one, jobs, chunksize=8))
    print(done)
"""


DICOGNITO = r"""
import os, sys, warnings
warnings.simplefilter("ignore")
import pydicom
from dicognito.anonymizer import Anonymizer

corpus, out, seed = sys.argv[1:4]
anonymizer, done = Anonymizer(seed=seed), 0
for name in sorted(os.listdir(corpus)):
    try:
        with pydicom.dcmread(os.path.join(corpus, name)) as ds:
            anonymizer.anonymize(ds)
            ds.save_as(os.path.join(out, name))
        done += 1
    except Exception:
        pass
print(done)
"""


def command(row: str, corpus: Path, out: Path, baseline: Path | None) -> tuple[list[str], dict]:
    env = dict(os.environ, IMAGING_DEID_KEY=KEY, PYTHONWARNINGS="ignore")
    env.pop("IMAGING_DEID_DEMO", None)
    if row in ("ours_w2", "ours_w1"):
        return [sys.executable, "-m", "imaging_tasks.cli", "deidentify", str(corpus), str(out),
                "--quarantine", str(out) + "-q", "--workers", row[-1]], dict(env, PYTHONPATH=str(REPO))
    if row == "before":
        return [sys.executable, "-m", "imaging_tasks.cli", "deidentify", str(corpus), str(out),
                "--quarantine", str(out) + "-q"], dict(env, PYTHONPATH=str(baseline))
    if row == "dicognito":
        return [str(deid_peers.peers_python()), "-c", DICOGNITO, str(corpus), str(out), deid_peers.DICOGNITO_SEED], env
    return [sys.executable, "-c", BARE, str(corpus), str(out), row[-1]], env


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (/proc/stat): a pool's workers are children of a forkserver,
    not of the command, so the command's own rusage would miss them; this counts every process (run the bench
    on an otherwise quiet machine)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run(row: str, corpus: Path, work: Path, baseline: Path | None) -> dict:
    out = work / "out" / row
    for folder in (out, Path(str(out) + "-q")):
        shutil.rmtree(folder, ignore_errors=True)
    out.mkdir(parents=True)
    argv, env = command(row, corpus, out, baseline)
    busy0 = machine_busy_s()
    t0 = time.perf_counter()
    with open(work / f"{row}.stdout", "wb") as so, open(work / f"{row}.stderr", "wb") as se:
        proc = subprocess.Popen(argv, env=env, cwd=work, stdout=so, stderr=se)
        _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    busy = machine_busy_s() - busy0
    stdout, stderr = (work / f"{row}.stdout").read_bytes(), (work / f"{row}.stderr").read_bytes()
    proc.returncode = os.waitstatus_to_exitcode(status)
    written = sum(1 for p in out.rglob("*") if p.is_file() and p.name != "deidentify-report.json")
    return {"wall_s": wall, "cpu_s": busy,
            "max_rss_mb": usage.ru_maxrss / 1024, "exit": proc.returncode, "written": written,
            "stdout": stdout.decode(errors="replace")[-400:], "stderr": stderr.decode(errors="replace")[-400:]}


def per_file_step(corpus: Path, names: list[str]) -> dict:
    """ms per file of de-identify + identifying values + audit, values read by a second parse vs one parse."""
    import warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(REPO))
    from imaging_tasks.deid.dicom import DeidOptions, deidentify_bytes
    from imaging_tasks.dicom_io import read_header
    from imaging_tasks.errors import BadInput
    from imaging_tasks.phi_audit import IdentifyingValues, assert_no_leaks, dicom_identifying_values, retained_by

    key, options = KEY.encode(), DeidOptions()
    datas = []
    for name in names:
        data = (corpus / name).read_bytes()
        try:
            deidentify_bytes(data, key, options)
            datas.append(data)
        except BadInput:
            pass

    def two_parses(data: bytes) -> None:
        out, _info = deidentify_bytes(data, key, options)
        assert_no_leaks(dicom_identifying_values(read_header(data), retained_by(options)), out, "bench")

    def one_parse(data: bytes) -> None:
        reader = IdentifyingValues(retained_by(options))
        out, _info = deidentify_bytes(data, key, options, source=reader.source)
        assert_no_leaks(reader.values, out, "bench")

    times: dict[str, list[float]] = {"two_parses": [], "one_parse": []}
    for _ in range(5):
        for label, fn in (("two_parses", two_parses), ("one_parse", one_parse)):
            t0 = time.perf_counter()
            for data in datas:
                fn(data)
            times[label].append(1000 * (time.perf_counter() - t0) / len(datas))
    return {"files": len(datas), **{f"{k}_ms": {"best": min(v), "median": statistics.median(v)}
                                     for k, v in times.items()}}


def markdown(res: dict) -> str:
    c = res["corpus"]
    lines = [f"Corpus: {c['files']} files ({c['sources']} pydicom test files x {c['replicas']}, "
             f"{c['megabytes']:.0f} MB), "
             f"machine: {res['cpu_count']} cores, load average {res['load'][0]} at start, {res['load'][1]} at end; "
             f"whole processes, best of {res['repeats']} interleaved rounds.", "",
             "| row | command | wall s | files/s | machine CPU s | peak RSS MB (command process) | outputs written |",
             "|---|---|---:|---:|---:|---:|---:|"]
    labels = {"ours_w2": "`imaging-tasks deidentify --workers 2`", "ours_w1": "`imaging-tasks deidentify --workers 1`",
              "before": "`imaging-tasks deidentify` before (baseline tree, 1 process)",
              "dicognito": f"dicognito {res.get('dicognito_version', '?')}: its CLI's loop, 1 process",
              "bare_1": "bare pydicom dcmread + save_as, 1 process", "bare_2": "bare pydicom, 2-process pool"}
    for row, r in res["rows"].items():
        lines.append(f"| {row} | {labels[row]} | {r['wall_s']:.2f} | {c['files'] / r['wall_s']:.0f} | "
                     f"{r['cpu_s']:.1f} | {r['max_rss_mb']:.0f} | {r['written']} |")
    t = {k: (v if v is not None else float("nan")) for k, v in res["targets"].items()}
    lines += ["", "Targets (files/s over the whole corpus): ours_w2 / dicognito = "
              f"{t.get('ours_w2_vs_dicognito', float('nan')):.2f}x (target >= 3); ours_w2 / bare_2 = "
              f"{t.get('ours_w2_vs_bare_2', float('nan')):.0%} (target >= 80%); ours_w2 / bare_1 = "
              f"{t.get('ours_w2_vs_bare_1', float('nan')):.0%}; ours_w2 / ours_w1 = "
              f"{t.get('ours_w2_vs_ours_w1', float('nan')):.2f}x."]
    p = res.get("per_file")
    if p:
        lines += ["", f"Per file, in process ({p['files']} distinct sources that de-identify, best of 5): de-identify "
                  f"+ identifying values + output audit, values from a second parse {p['two_parses_ms']['best']:.2f} "
                  f"ms, from the de-identifier's own parse {p['one_parse_ms']['best']:.2f} ms."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "deid_scale_bench")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="a folder holding an earlier imaging_tasks package: adds the 'before' row")
    parser.add_argument("--rows", default=",".join(r for r in ROWS if r != "before"))
    args = parser.parse_args()

    deid_peers.ensure_peers_venv()
    from pydicom.data import get_testdata_files
    import pydicom

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    readable = 0
    for path in get_testdata_files():
        try:
            pydicom.dcmread(path)
            readable += 1
        except Exception:  # noqa: BLE001 - folders, JSON, dumps: what build_corpus drops too
            pass
    manifest = deid_peers.build_corpus(work, readable * args.replicas)  # exactly --replicas copies of each
    corpus = work / "corpus"
    names = [f["name"] for f in manifest["files"]]
    rows = [r for r in args.rows.split(",") if r]
    if args.baseline_tree and "before" not in rows:
        rows.insert(2, "before")
    load0 = os.getloadavg()[0]
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for row in rows:
            r = run(row, corpus, work, args.baseline_tree)
            if r["exit"] != 0:
                print(f"  {row}: exit {r['exit']}: {r['stderr']}", flush=True)
            print(f"  {row:<10} {r['wall_s']:7.2f} s  {len(names) / r['wall_s']:7.0f} files/s  "
                  f"CPU {r['cpu_s']:6.1f} s  written {r['written']}", flush=True)
            if row not in results or r["wall_s"] < results[row]["wall_s"]:
                results[row] = r
    per_file = per_file_step(corpus, sorted({f["name"] for f in manifest["files"] if f["name"].startswith("000_")}))
    load1 = os.getloadavg()[0]
    fps = {row: len(names) / r["wall_s"] for row, r in results.items()}
    targets = {f"ours_w2_vs_{other}": (fps["ours_w2"] / fps[other]) if "ours_w2" in fps and other in fps else None
               for other in ("dicognito", "bare_2", "bare_1", "ours_w1", "before")}
    try:
        dicognito_version = deid_peers.peer_versions()["dicognito"]
    except Exception:  # noqa: BLE001
        dicognito_version = "?"
    res = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"python": platform.python_version(), "platform": platform.platform()},
           "cpu_count": os.cpu_count(), "load": [round(load0, 2), round(load1, 2)], "repeats": args.repeats,
           "corpus": {"files": len(names), "sources": len(manifest["sources"]), "replicas": manifest["replicas"],
                      "megabytes": manifest["total_bytes"] / 1e6, "skipped_sources": manifest["skipped_sources"]},
           "dicognito_version": dicognito_version, "rows": results, "files_per_s": fps, "targets": targets,
           "per_file": per_file}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deid_scale.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (RESULTS / "deid_scale.md").write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
