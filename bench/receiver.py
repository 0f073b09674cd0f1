"""The DICOM edge, side by side: instances/s through ``imaging-tasks receive`` (plain and edge mode) and through a
bare pynetdicom Storage SCP that only writes each instance to a file.

    .venv/bin/python bench/receiver.py [--instances 2000] [--repeats 2] [--workdir DIR]

What it does:

1. Builds the corpus once: the synthetic cardiovascular generator's CT files (calcium-scoring slices and a
   scout, ~70 KB each) plus pydicom's ``CT_small.dcm``, copied to ``--instances`` files, each with its own Study,
   Series and SOP Instance UIDs (20 instances a study) and PatientName, so nothing is a resend.
2. Runs each receiver as its own process on a free port on 127.0.0.1 and sends the corpus from this process over
   one association (pynetdicom ``send_c_store`` of each file path, explicit VR little endian):

   * ``bare``: pynetdicom's AE with a C-STORE handler that writes ``event.encoded_dataset()`` to a file named by
     the SOP Instance UID and answers success: the ceiling (no fsync, no routing, no upload);
   * ``plain``: ``imaging-tasks receive --landing file://... --spool ...``: each instance fsync'ed into the spool
     before it is acknowledged, routed, then uploaded by the receiver's uploader thread to the landing folder;
   * ``edge``: the same with ``--deidentify --demo-key``: de-identified and PHI-audited on receipt.

   Two times per row: *acknowledged* (association start to the last C-STORE response: what the sender sees) and
   *landed* (to the last instance present in the landing folder, after its upload). Best of ``--repeats``,
   rows interleaved round by round.
3. Prints a table and writes ``bench/results/receiver.json`` and ``bench/results/receiver.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PER_STUDY = 20

BARE_SCP = r'''
import os, sys
from pynetdicom import AE, evt, AllStoragePresentationContexts
out, port = sys.argv[1], int(sys.argv[2])

def store(event):
    with open(os.path.join(out, event.request.AffectedSOPInstanceUID + ".dcm"), "wb") as fh:
        fh.write(event.encoded_dataset())
    return 0x0000

ae = AE(ae_title="BARE")
ae.supported_contexts = AllStoragePresentationContexts
print("ready", flush=True)
ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, store)])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_corpus(folder: Path, n: int) -> tuple[list[Path], int]:
    """``n`` DICOM files with unique UIDs and names; returns the paths and their total size in bytes."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from imaging_tasks.specialties import synthesizer

    synth = folder / "synth"
    synthesizer("cardiovascular")(synth, 2, 7)
    sources = [p for p in sorted(synth.rglob("*")) if p.is_file() and not p.name.endswith(".json")]
    sources = [p for p in sources if pydicom.dcmread(p, stop_before_pixels=True).get("Modality") == "CT"][:40]
    sources.append(Path(get_testdata_file("CT_small.dcm")))
    out = folder / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    paths, size = [], 0
    study = series = None
    for i in range(n):
        if i % PER_STUDY == 0:
            study, series = generate_uid(), generate_uid()
        ds = pydicom.dcmread(sources[i % len(sources)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = f"Bench^Patient{i // PER_STUDY:05d}", f"PID{i // PER_STUDY:05d}"
        ds.InstanceNumber = i % PER_STUDY + 1
        path = out / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        size += path.stat().st_size
    shutil.rmtree(synth)
    return paths, size


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the receiver exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.dcm")) if folder.exists() else 0


def send(paths: list[Path], port: int, landed: Path, timeout: float) -> tuple[float, float]:
    """Acknowledged and landed seconds for sending ``paths`` over one association."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage
    from pydicom.uid import ExplicitVRLittleEndian

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    start = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING")
    if not assoc.is_established:
        raise RuntimeError("association refused")
    bad = 0
    for p in paths:
        status = assoc.send_c_store(p)
        if not status or status.Status != 0x0000:
            bad += 1
    assoc.release()
    acked = time.perf_counter() - start
    if bad:
        raise RuntimeError(f"{bad} instance(s) not stored")
    deadline = time.monotonic() + timeout
    while _count(landed) < len(paths):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {_count(landed)} of {len(paths)} landed after {timeout} s")
        time.sleep(0.05)
    return acked, time.perf_counter() - start


def run_row(row: str, paths: list[Path], work: Path) -> tuple[float, float]:
    for sub in ("landing", "spool", "bare"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    port = free_port()
    if row == "bare":
        cmd, landed = [sys.executable, "-c", BARE_SCP, str(work / "bare"), str(port)], work / "bare"
    else:
        cmd = [sys.executable, "-m", "imaging_tasks.cli", "receive", "--landing", (work / "landing").as_uri(),
               "--spool", str(work / "spool"), "--host", "127.0.0.1", "--port", str(port), "--quiet-seconds", "600"]
        cmd += ["--deidentify", "--demo-key"] if row == "edge" else []
        landed = work / "landing"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(work / f"{row}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        _wait_listening(port, proc)
        return send(paths, port, landed, timeout=600)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", default="bare,plain,edge")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=str(RESULTS / "receiver"))
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-receiver-")).resolve()
    os.environ.setdefault("IMAGING_DEID_DEMO", "1")
    paths, size = build_corpus(work, args.instances)
    rows = args.rows.split(",")
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for row in rows:
            acked, landed = run_row(row, paths, work)
            print(f"{row:6s} acknowledged {acked:7.2f} s  landed {landed:7.2f} s", flush=True)
            if row not in best or landed < best[row][1]:
                best[row] = (acked, landed)
    n = len(paths)
    table = {row: {"acknowledged_s": round(a, 2), "landed_s": round(l, 2),
                   "acknowledged_per_s": round(n / a, 1), "landed_per_s": round(n / l, 1),
                   "landed_MB_per_s": round(size / l / 1e6, 1)} for row, (a, l) in best.items()}
    bare = table.get("bare", {}).get("landed_per_s")
    for values in table.values():
        if bare:
            values["of_bare"] = round(values["landed_per_s"] / bare, 3)
    result = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "instances": n,
              "bytes": size, "repeats": args.repeats, "machine": f"{platform.node()} {os.cpu_count()} cores",
              "rows": table}
    lines = [f"# DICOM receiver: {n} CT instances ({size / 1e6:.0f} MB), one association, best of {args.repeats}",
             "", "| receiver | acknowledged s | inst/s acked | landed s | inst/s landed | MB/s | of bare |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row, v in table.items():
        lines.append(f"| {row} | {v['acknowledged_s']} | {v['acknowledged_per_s']} | {v['landed_s']} | "
                     f"{v['landed_per_s']} | {v['landed_MB_per_s']} | {v.get('of_bare', '')} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
