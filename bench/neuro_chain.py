"""The neuro session chain: per-step and per-session wall time, and registration accuracy and time against ANTs.

    .venv/bin/python bench/neuro_chain.py [--sessions 3] [--seed 7] [--mr-voxel-mm 2] [--n4-shrink 2] [--no-ants]
                                          [--workdir DIR]

What it does, in one run:

1. Writes ``--sessions`` synthetic sessions with known truth (``imaging_tasks.neuroimaging.synth``: MNI152-based
   T1 with a planted pose, head scale and smooth non-linear warp; PET with regional SUVR; the first session with
   a 4-frame dynamic PET, the second as a NIfTI upload), 2 mm T1 (``--mr-voxel-mm 1`` for a 1 mm one), 4 mm PET.
2. Runs the chain on each, one step at a time through ``specialties.run_steps`` (the ``imaging-tasks process``
   path), timing each step's wall clock.  A warm-up session runs first and is not counted (it pays the one-off
   imports and the MNI152 / atlas loads a long-lived worker pays once).
3. Accuracy against the truth: PET->T1 mean displacement over the brain (mm), MNI152 landmark error (mean and
   max over brain voxels, mm), parenchymal and intracranial volume error (%).
4. ANTs (antspyx, pinned in ``bench/requirements-ants.txt``, installed into ``bench/.venv-ants`` on first use,
   kept out of the project venv) on the same pairs: PET mean -> T1 ``Rigid`` (Mattes MI) and MNI152 (brain-
   masked) -> the session's brain-masked T1 ``SyN`` (affine + SyN), timed in the same way; the same error
   measures on the same points (ANTs maps fixed-space points to moving space with its forward transforms).
5. Prints a table and writes ``bench/results/neuro_chain.json`` and ``.md``.

The ANTs side runs under the other interpreter (``--ants-worker``), so this file imports nothing heavy at module
level.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ANTS_VENV = BENCH / ".venv-ants"
ANTS_REQ = BENCH / "requirements-ants.txt"
RESULTS = BENCH / "results"


# --------------------------------------------------------------------------- ANTs worker (runs in .venv-ants)
def ants_worker(job: Path) -> None:
    import ants
    import numpy as np
    import pandas as pd

    spec = json.loads(job.read_text())
    fixed, moving = ants.image_read(spec["fixed"]), ants.image_read(spec["moving"])
    if spec.get("fixed_mask"):
        fixed = fixed * ants.image_read(spec["fixed_mask"])
    if spec.get("moving_mask"):
        moving = moving * ants.image_read(spec["moving_mask"])
    started = time.perf_counter()
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=spec["type"], random_seed=1)
    seconds = time.perf_counter() - started
    points = np.load(spec["points"])
    mapped = ants.apply_transforms_to_points(3, pd.DataFrame(points, columns=["x", "y", "z"]), reg["fwdtransforms"])
    np.save(spec["out"], mapped[["x", "y", "z"]].to_numpy())
    print(json.dumps({"seconds": seconds}))


def _ants_python() -> Path:
    python = ANTS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ANTS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(ANTS_REQ)], check=True)
    return python


def run_ants(workdir: Path, name: str, *, fixed, moving, kind: str, points, fixed_mask=None, moving_mask=None):
    import numpy as np

    np.save(workdir / f"{name}-points.npy", points)
    job = workdir / f"{name}.json"
    job.write_text(json.dumps({"fixed": str(fixed), "moving": str(moving), "type": kind,
                               "fixed_mask": str(fixed_mask) if fixed_mask else None,
                               "moving_mask": str(moving_mask) if moving_mask else None,
                               "points": str(workdir / f"{name}-points.npy"), "out": str(workdir / f"{name}-out.npy")}))
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(os.cpu_count() or 2)}
    done = subprocess.run([str(_ants_python()), __file__, "--ants-worker", str(job)], capture_output=True, text=True,
                          env=env, check=True)
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return np.load(workdir / f"{name}-out.npy"), seconds


# --------------------------------------------------------------------------- ours
def _files(data: Path, record: dict) -> list[Path]:
    return sorted(p for p in (data / record["session_folder"]).rglob("*") if p.is_file())


def run_chain(files, out: Path, n4_shrink: int = 2) -> tuple[dict[str, float], dict[str, float]]:
    """Each step's wall time, and every step's metrics."""
    from imaging_tasks.specialties import get, run_steps

    record = get("neuroimaging")
    options = record.options_for({"n4_shrink": n4_shrink}, "process")
    times, values = {}, {}
    for step in record.steps:
        started = time.perf_counter()
        result = run_steps("neuroimaging", files, out, device="cpu", step=step.name, options=options)
        times[step.name] = time.perf_counter() - started
        values.update({m["name"]: m["value"] for m in result["metrics"]})
    return times, values


def _mean_max(a, b):
    import numpy as np

    e = np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1)
    return float(e.mean()), float(e.max())


def measure(session_out: Path, truth: dict, values: dict, workdir: Path, label: str, use_ants: bool) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from imaging_tasks.neuroimaging import atlas as atlas_mod
    from imaging_tasks.neuroimaging import synth

    t1_path = session_out / "n4_bias" / "t1_n4.nii.gz"
    brain_path = session_out / "brain_extraction" / "brain_mask.nii.gz"
    t1 = sitk.ReadImage(str(t1_path))
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(brain_path))) > 0
    points = synth.image_points_mm(t1)[brain.ravel()][::10]
    row: dict = {"session": label}
    reg = atlas_mod.load_transform(session_out / "atlas_registration" / "registration")
    mni_true = synth.scanner_to_template(truth, points)
    ours = np.array([reg.TransformPoint(tuple(map(float, p))) for p in points])
    row["atlas_error_mm"] = _mean_max(ours, mni_true)
    if truth.get("pet"):
        tr = sitk.ReadTransform(str(session_out / "pet_to_t1" / "pet_to_t1.tfm"))
        pet_true = synth.mr_to_pet_points(truth, points)
        row["pet_to_t1_error_mm"] = _mean_max([tr.TransformPoint(tuple(map(float, p))) for p in points], pet_true)
    row["brain_volume_error_percent"] = (values.get("brain_volume_ml", float("nan"))
                                         / truth["parenchyma_volume_ml"] - 1) * 100
    row["icv_error_percent"] = (values.get("intracranial_volume_ml", float("nan"))
                                / truth["intracranial_volume_ml"] - 1) * 100
    if use_ants:
        mni = atlas_mod.mni_template()
        sitk.WriteImage(mni["t1"], str(workdir / "mni_t1.nii.gz"))
        sitk.WriteImage(sitk.Cast(mni["brain"], sitk.sitkFloat32), str(workdir / "mni_brain.nii.gz"))
        brain_f = workdir / f"{label}-brain.nii.gz"
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(brain_path)), sitk.sitkFloat32), str(brain_f))
        mapped, seconds = run_ants(workdir, f"{label}-syn", fixed=t1_path, moving=workdir / "mni_t1.nii.gz",
                                   kind="SyN", points=points, fixed_mask=brain_f,
                                   moving_mask=workdir / "mni_brain.nii.gz")
        row["ants_atlas_error_mm"] = _mean_max(mapped, mni_true)
        row["ants_atlas_seconds"] = seconds
        if truth.get("pet"):
            mapped, seconds = run_ants(workdir, f"{label}-rigid", fixed=t1_path,
                                       moving=session_out / "pet_average" / "pet_mean.nii.gz", kind="Rigid",
                                       points=points)
            row["ants_pet_to_t1_error_mm"] = _mean_max(mapped, pet_true)
            row["ants_pet_to_t1_seconds"] = seconds
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--mr-voxel-mm", type=float, default=2.0)
    parser.add_argument("--n4-shrink", type=int, default=2, help="4 suits a 1 mm T1 (a ~4 mm fit grid)")
    parser.add_argument("--no-ants", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--ants-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ants_worker:
        ants_worker(args.ants_worker)
        return 0
    from imaging_tasks.neuroimaging.synth import synthesize

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="neuro-chain-bench-"))
    data = workdir / "data"
    n = args.sessions + 1  # + the warm-up
    layouts = ["dicom", "dicom", "nifti"] + ["dicom"] * max(0, n - 3)
    frames = [1, 4, 1] + [1] * max(0, n - 3)
    records = [json.loads(p.read_text()) for p in synthesize(data, n, args.seed, layout=layouts[:n],
                                                             pet_frames=frames[:n], mr_voxel_mm=args.mr_voxel_mm)]
    rows = []
    for k, record in enumerate(records):
        out = workdir / "out" / record["label"]
        times, values = run_chain(_files(data, record), out, args.n4_shrink)
        if k == 0:
            print(f"warm-up session: {sum(times.values()):.1f} s (not counted)", flush=True)
            continue
        row = {**measure(out, record["truth"], values, workdir, record["label"], not args.no_ants),
               "layout": record["layout"], "pet_frames": (record["truth"].get("pet") or {}).get("n_frames", 0),
               "step_seconds": {s: round(v, 2) for s, v in times.items()}, "session_seconds": sum(times.values())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
               "target_session_seconds": 60, "mr_voxel_mm": args.mr_voxel_mm, "n4_shrink": args.n4_shrink,
               "sessions": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = "neuro_chain" if args.mr_voxel_mm == 2.0 else f"neuro_chain_{args.mr_voxel_mm:g}mm"
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    steps = list(rows[0]["step_seconds"]) if rows else []
    lines = ["| session | " + " | ".join(steps) + " | total s | PET->T1 mm (ours / ANTs) | atlas mm mean/max (ours / "
             "ANTs SyN) | reg. s ours / ANTs (PET, atlas) | brain vol % | ICV % |",
             "|" + "---|" * (len(steps) + 7)]
    for r in rows:
        pet = r.get("pet_to_t1_error_mm")
        lines.append(
            f"| {r['session']} ({r['layout']}, {r['pet_frames']} fr) | " +
            " | ".join(f"{r['step_seconds'][s]:.1f}" for s in steps) + f" | {r['session_seconds']:.1f} | " +
            (f"{pet[0]:.2f} / {r.get('ants_pet_to_t1_error_mm', [float('nan')])[0]:.2f}" if pet else "-") + " | " +
            f"{r['atlas_error_mm'][0]:.2f}/{r['atlas_error_mm'][1]:.2f} / "
            f"{r.get('ants_atlas_error_mm', [float('nan')] * 2)[0]:.2f}/"
            f"{r.get('ants_atlas_error_mm', [float('nan')] * 2)[1]:.2f} | "
            f"{r['step_seconds'].get('pet_to_t1', 0):.1f} / {r.get('ants_pet_to_t1_seconds', float('nan')):.1f}, "
            f"{r['step_seconds'].get('atlas_registration', 0):.1f} / {r.get('ants_atlas_seconds', float('nan')):.1f} | "
            f"{r['brain_volume_error_percent']:+.1f} | {r['icv_error_percent']:+.1f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
