"""Longitudinal neuro sessions with a known disease stage: a few patients scanned 2-4 times, months apart, plus
the site's cognitive-score upload, so the progression path can be run end to end on real chain outputs.

Each patient follows the progression cohort's generative model (:mod:`imaging_tasks.progression.cohort`): a latent
stage ``s(y) = stage0 + rate * y`` (``y`` years since the first scan), amyloid-positive patients starting further
along and progressing faster; the cognitive scores are the cohort's own formulas
(:meth:`~imaging_tasks.progression.cohort.PatientTruth.expected_scores`) with its noise and rounding.  Each session
is one :func:`.synth.synthesize_study` T1 + static PET (DICOM) of the same subject:

* the same raw identity (PatientID, name, birth date) in every session, real StudyDates ``visit_gap_days`` apart;
* the same head (scale per axis) and the same brain (anatomy warp from one seed); pose, bias field, noise,
  uptakes and UIDs are each session's own;
* regional amyloid SUVR driven by the stage: the cohort's cortical-composite SUVR is ``base + A(s)``
  (``A = 0.65 sig(1.2 (s + 2))`` amyloid-positive, ``0.03 sig(s)`` negative); region ``r`` of
  :data:`.synth.PET_REGIONS` gets ``base + AMYLOID_WEIGHTS[r] * A(s)``, the rest of the cortex
  ``base + OTHER_GREY_MATTER_WEIGHT * A(s)``.  The weights over the four composite regions
  (:data:`COMPOSITE_REGIONS`) average 1, so their mean is the cohort's composite.  No atrophy is planted
  (volumes change only through the head and noise): SUVR carries the stage.

Written under ``out``: the sessions ``neuroimaging/<label>/t1|pet/*.dcm`` (a landing folder; labels ``p<i>-s<k>``
carry no identifier), their truth ``_truth/neuroimaging/<label>.json`` (:func:`.synth.synthesize_study`'s), the
upload ``cognitive_scores/scores.csv`` (``patient_id`` = the DICOM PatientID, ``date`` the real visit date
``YYYY-MM-DD``, ``score``, ``value``: what ``progression.store.ingest`` reads), the synth's PET regions as a
bring-your-own atlas ``atlas/regions.nii.gz`` + ``regions.tsv`` (grey matter >= 0.5 in each box set: the chain
then measures exactly the planted regions) and ``_truth/longitudinal.json`` (:data:`TRUTH_DEFINITION`).

``python -m imaging_tasks.neuroimaging.synth_longitudinal --out DIR [--sessions 4,2,1] [--seed 0]
[--mr-voxel-mm 3]`` writes it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import pathlib
from typing import Sequence

import numpy as np

from imaging_tasks.neuroimaging import synth

SCORES_FOLDER = "cognitive_scores"
ATLAS_FOLDER = "atlas"
# Regional amyloid load relative to the cortical composite: precuneus / posterior cingulate first, then frontal,
# parietal, lateral temporal; occipital cortex late and little (a control region).
AMYLOID_WEIGHTS = {"precuneus_posterior_cingulate": 1.2, "frontal": 1.0, "parietal": 0.95,
                   "lateral_temporal": 0.85, "occipital": 0.4}
COMPOSITE_REGIONS = ("precuneus_posterior_cingulate", "frontal", "parietal", "lateral_temporal")
OTHER_GREY_MATTER_WEIGHT = 0.3
FIRST_SCAN = (dt.date(2019, 1, 1), 1500)  # first scans fall in this many days from this date
TRUTH_DEFINITION = (
    "patients[]: raw identity (raw_id = the DICOM PatientID, name, birth_date), the cohort model's parameters "
    "(amyloid_positive, stage0, rate_per_year, reserve, mmse_deficit, adas_base, suvr_base) and sessions[] in "
    "scan order: label, study_uid, study_date (real, YYYYMMDD), day (true days since the first scan), stage, "
    "suvr_planted (the SUVR each PET region's grey matter was given, and other_grey_matter), expected_suvr (the "
    "synth's measurement truth: PSF-blurred, partial volume included, its own cerebellar reference), "
    "composite_suvr (the cohort's cortical-composite SUVR at that stage), visit_date (real YYYY-MM-DD of the "
    "cognitive assessment), visit_day, expected_scores (noise-free at the visit) and scores (as uploaded)")

_COMPOSITE = ("cortical_composite", "mean_suvr")


def write_region_atlas(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The synth's PET regions (grey matter >= 0.5 of each box set) as a label NIfTI in MNI152 space + labels TSV
    (index 1-5 in :data:`.synth.PET_REGIONS` order): ``(nifti, tsv)`` for the chain's ``atlas_uri`` /
    ``atlas_labels_uri``."""
    import SimpleITK as sitk

    folder = pathlib.Path(folder)
    gm = sitk.GetArrayFromImage(synth.head_phantom()["images"]["gm"]) >= 0.5
    masks = synth.pet_region_masks()
    ref = next(iter(masks.values()))
    labels = np.zeros(gm.shape, np.uint16)
    for k, img in enumerate(masks.values(), start=1):
        labels[(sitk.GetArrayFromImage(img) > 0.5) & gm] = k
    img = sitk.GetImageFromArray(labels)
    img.CopyInformation(ref)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(folder / "regions.nii.gz"))
    (folder / "regions.tsv").write_text("index\tname\n" + "".join(f"{k}\t{n}\n" for k, n in
                                                                  enumerate(masks, start=1)))
    return folder / "regions.nii.gz", folder / "regions.tsv"


def planted_suvr(suvr_base: float, composite: float) -> dict[str, float]:
    """Per PET region (and ``other_grey_matter``) the SUVR planted when the cohort's composite is ``composite``."""
    amyloid = composite - suvr_base
    out = {name: suvr_base + AMYLOID_WEIGHTS[name] * amyloid for name in synth.PET_REGIONS}
    out["other_grey_matter"] = suvr_base + OTHER_GREY_MATTER_WEIGHT * amyloid
    return {k: round(float(v), 6) for k, v in out.items()}


def _draw_patient(rng: np.random.Generator, positive: bool, n_sessions: int, gaps: tuple[int, int]):
    """Cohort-style parameters.  Amyloid-positive patients are the cohort's fast progressors (0.7-1.2 stage/year,
    its median is 0.55) starting just below the steepest part of the amyloid curve (stage -3 to -2; the curve is
    steepest at -2), so that their SUVR rises by more than the chain's measurement error from one visit to the
    next: about 0.1-0.25 SUVR per year in the precuneus early on."""
    from imaging_tasks.progression.cohort import PatientTruth

    if positive:
        stage0 = float(rng.uniform(-3.0, -2.0))
        rate = float(np.clip(np.exp(rng.normal(np.log(0.9), 0.2)), 0.7, 1.2))
    else:
        stage0 = float(rng.uniform(-4.5, -1.0))
        rate = float(np.exp(rng.normal(np.log(0.08), 0.6)))
    days = np.concatenate([[0], np.cumsum(rng.integers(gaps[0], gaps[1] + 1, size=n_sessions - 1))]).astype(int)
    first = FIRST_SCAN[0] + dt.timedelta(days=int(rng.integers(0, FIRST_SCAN[1])))
    age0 = float(rng.uniform(62.0, 84.0))
    head = rng.uniform(0.86, 0.97) * rng.uniform(0.97, 1.03, 3)
    # the cohort's own record, as the carrier of its formulas (stage, scores, composite SUVR); identifiers are not
    # its business here (the raw identity is drawn below, pseudonyms are the key holder's)
    truth = PatientTruth(
        patient_id="", raw_id="", shift_days=0, first_date=first.strftime("%Y%m%d"), amyloid_positive=positive,
        age0=age0, stage0=stage0, rate_per_year=rate, reserve=float(rng.normal()),
        mmse_deficit=float(rng.uniform(0.0, 2.5)), adas_base=float(rng.uniform(3.0, 10.0)),
        icv_ml=float(synth.head_phantom()["template_icv_ml"] * np.prod(head)),
        suvr_base=float(rng.uniform(0.95, 1.10)), score_noise=float(rng.uniform(0.6, 1.5)), feature_noise=1.0,
        session_days=tuple(int(d) for d in days))
    return truth, first, head


def synthesize_longitudinal(out: pathlib.Path, *, sessions: Sequence[int] = (4, 2, 1), seed: int = 0,
                            amyloid_positive: Sequence[bool] | None = None,
                            visit_gap_days: tuple[int, int] = (240, 450), warp_mm: float = 4.0,
                            **study_options) -> dict:
    """Write ``len(sessions)`` patients with ``sessions[i]`` sessions each under ``out`` (module docstring);
    returns the truth record (also in ``out/_truth/longitudinal.json``).

    ``amyloid_positive``: per patient (default: alternating, the first positive).  ``study_options`` go to every
    :func:`.synth.synthesize_study` (e.g. ``mr_voxel_mm``); the session's identity, date, head, anatomy and
    regional SUVRs are this module's.  Deterministic in ``seed``.
    """
    from imaging_tasks.progression.cohort import SCORE_SD, as_scored
    from imaging_tasks.synth import phi

    out = pathlib.Path(out)
    sessions = [int(n) for n in sessions]
    if not sessions or min(sessions) < 1:
        raise ValueError(f"sessions must be one count >= 1 per patient, got {sessions}")
    if not 0 < visit_gap_days[0] <= visit_gap_days[1]:
        raise ValueError(f"visit_gap_days must be 0 < low <= high, got {visit_gap_days}")
    positives = list(amyloid_positive) if amyloid_positive is not None else [i % 2 == 0 for i in range(len(sessions))]
    if len(positives) != len(sessions):
        raise ValueError(f"amyloid_positive has {len(positives)} values for {len(sessions)} patients")
    root = np.random.default_rng(seed)
    patients, score_rows = [], []
    for i, (n, positive) in enumerate(zip(sessions, positives)):
        rng = np.random.default_rng(root.integers(0, 2**63))
        truth, first, head = _draw_patient(rng, bool(positive), n, visit_gap_days)
        person = phi.fake_patient(rng)
        birth = first - dt.timedelta(days=int(round(truth.age0 * 365.25)))
        person = dataclasses.replace(person, birth_date=birth.strftime("%Y%m%d"), age=f"{int(truth.age0):03d}Y")
        anatomy_seed = int(rng.integers(0, 2**63))
        days = np.asarray(truth.session_days)
        composite = truth.expected_measures(days)[_COMPOSITE]
        record = {"raw_id": person.patient_id, "name": person.name, "birth_date": person.birth_date,
                  **{k: getattr(truth, k) for k in ("amyloid_positive", "age0", "stage0", "rate_per_year", "reserve",
                                                    "mmse_deficit", "adas_base", "suvr_base", "score_noise")},
                  "head_scale_xyz": [round(float(v), 6) for v in head], "sessions": []}
        for k, day in enumerate(days):
            label = f"p{i}-s{k}"
            scan = first + dt.timedelta(days=int(day))
            suvr = planted_suvr(truth.suvr_base, float(composite[k]))
            study = synth.synthesize_study(out, label, np.random.default_rng(rng.integers(0, 2**63)), patient=person,
                                           study_date=scan.strftime("%Y%m%d"), head_scale_xyz=head,
                                           anatomy_seed=anatomy_seed, region_suvr=suvr, warp_mm=warp_mm,
                                           **study_options)
            visit = scan + dt.timedelta(days=int(rng.integers(-14, 31)))
            visit_day = int(day) + (visit - scan).days
            expected = {s: float(v[0]) for s, v in truth.expected_scores([visit_day]).items()}
            observed = {}
            for score, value in expected.items():
                observed[score] = as_scored(score, value + rng.normal(0.0, SCORE_SD[score] * truth.score_noise))
                score_rows.append({"patient_id": person.patient_id, "date": visit.isoformat(), "score": score,
                                   "value": observed[score]})
            pet = study["truth"]["pet"]
            record["sessions"].append({
                "label": label, "study_uid": study["study_uid"], "study_date": scan.strftime("%Y%m%d"),
                "day": int(day), "stage": round(float(truth.stage(day)), 6), "suvr_planted": suvr,
                "expected_suvr": pet["expected_suvr"], "composite_suvr": round(float(composite[k]), 6),
                "visit_date": visit.isoformat(), "visit_day": visit_day,
                "expected_scores": {s: round(v, 4) for s, v in expected.items()}, "scores": observed})
        patients.append(record)
    uploads = out / SCORES_FOLDER
    uploads.mkdir(parents=True, exist_ok=True)
    with open(uploads / "scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["patient_id", "date", "score", "value"])
        writer.writeheader()
        writer.writerows(score_rows)
    atlas_nii, atlas_tsv = write_region_atlas(out / ATLAS_FOLDER)
    record = {"generator": "imaging_tasks.neuroimaging.synth_longitudinal", "seed": seed,
              "definition": TRUTH_DEFINITION, "amyloid_weights": AMYLOID_WEIGHTS,
              "other_grey_matter_weight": OTHER_GREY_MATTER_WEIGHT, "composite_regions": list(COMPOSITE_REGIONS),
              "landing": synth.SPECIALTY, "scores_upload": f"{SCORES_FOLDER}/scores.csv",
              "atlas": {"nifti": atlas_nii.relative_to(out).as_posix(), "labels": atlas_tsv.relative_to(out).as_posix()},
              "patients": patients}
    path = out / "_truth" / "longitudinal.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imaging_tasks.neuroimaging.synth_longitudinal",
                                description="longitudinal synthetic neuro sessions + cognitive-score upload")
    p.add_argument("--out", required=True, help="folder to write (sessions under OUT/neuroimaging)")
    p.add_argument("--sessions", default="4,2,1", help="sessions per patient, comma-separated (default 4,2,1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mr-voxel-mm", type=float, default=2.0, help="T1 voxel size (default 2; 3 runs the chain "
                   "about twice as fast with the same SUVR accuracy)")
    args = p.parse_args(argv)
    record = synthesize_longitudinal(pathlib.Path(args.out), sessions=[int(v) for v in args.sessions.split(",")],
                                     seed=args.seed, mr_voxel_mm=args.mr_voxel_mm)
    print(json.dumps({"patients": len(record["patients"]), "sessions": sum(len(p["sessions"]) for p in
                                                                           record["patients"]),
                      "landing": record["landing"], "scores_upload": record["scores_upload"],
                      "atlas": record["atlas"]}))
    return 0


__all__ = ["AMYLOID_WEIGHTS", "COMPOSITE_REGIONS", "OTHER_GREY_MATTER_WEIGHT", "TRUTH_DEFINITION",
           "planted_suvr", "synthesize_longitudinal", "write_region_atlas"]

if __name__ == "__main__":
    raise SystemExit(main())
