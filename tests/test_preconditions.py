"""Every processor states and checks its preconditions: malformed-but-readable studies give a bad-input reason.

The studies are the project's synthetic ones with headers edited by :mod:`imaging_tasks.synth.malformed`
(each file stays valid DICOM, or a readable slide).  Each bad case must raise BadInput with its reason through
the processor's ``process_study``; the cases a processor must cope with (shuffled order, a re-sent instance,
a missing RescaleSlope, MONOCHROME1) must give exactly the unedited study's result.  Last, the issue's
scenario through the library pipeline: a CT study without PixelSpacing among two good ones is quarantined
with its reason and the two good ones load.
"""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from imaging_tasks.errors import BadInput
from imaging_tasks.synth import malformed


def _cases(specialty: str, bad: bool) -> list[str]:
    return [c for c, (_f, reason) in malformed.cases(specialty).items() if (reason is not None) == bad]


def _case_files(base: Path, tmp_path: Path, specialty: str, case: str) -> tuple[list[Path], str | None]:
    malformed.copy_study(base, tmp_path / case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reason = malformed.apply(specialty, case, sorted((tmp_path / case).rglob("*.*")))
    files = sorted(p for p in (tmp_path / case).rglob("*") if p.is_file())
    random.Random(case).shuffle(files)  # order must come from headers, never from the file list
    return files, reason


def _refused(process, files, out, reason, phi=()) -> BadInput:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid DS values some cases plant
        with pytest.raises(BadInput) as exc:
            process(files, out)
    assert exc.value.reason == reason, exc.value.message
    assert not any(v in str(exc.value) for v in phi if len(v) >= 6)  # messages never carry PHI or UIDs
    return exc.value


def _metrics(result: dict) -> dict[str, float]:
    return {m["name"]: m["value"] for m in result["metrics"]}


# --------------------------------------------------------------------------- cardiovascular
@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    from imaging_tasks.cardiovascular import calcium as cardio
    from imaging_tasks.cardiovascular import synth as cardiovascular

    out = tmp_path_factory.mktemp("ct")
    record = json.loads(cardiovascular.synthesize(out, 1, seed=3, rows=128, slices=16)[0].read_text())
    base = out / "cardiovascular" / "study-000"
    result = cardio.process_study(sorted(base.glob("*.dcm")), out / "good", device="cpu")
    return base, record, _metrics(result)


def test_good_ct_matches_its_truth(ct):
    _base, record, m = ct
    truth = record["truth"]
    assert m["agatston_score"] == truth["agatston"] > 0
    assert m["calcium_volume_mm3"] == truth["volume_mm3"]
    assert m["lesion_count"] == truth["lesion_count"]


@pytest.mark.parametrize("case", _cases("cardiovascular", bad=True))
def test_unusable_ct_is_refused_with_its_reason(ct, tmp_path, case):
    from imaging_tasks.cardiovascular import calcium as cardio

    base, record, _m = ct
    files, reason = _case_files(base, tmp_path, "cardiovascular", case)
    _refused(lambda f, o: cardio.process_study(f, o, device="cpu"), files, tmp_path / "out", reason, record["phi"])


@pytest.mark.parametrize("case", _cases("cardiovascular", bad=False))
def test_repairable_ct_gives_the_same_scores(ct, tmp_path, case):
    """Shuffled instance numbers and files, a re-sent instance, no RescaleSlope, MONOCHROME1: same scores."""
    from imaging_tasks.cardiovascular import calcium as cardio

    base, _record, good = ct
    files, _ = _case_files(base, tmp_path, "cardiovascular", case)
    result = cardio.process_study(files, tmp_path / "out", device="cpu")
    assert _metrics(result) == good
    series = json.loads((tmp_path / "out" / "lesions.json").read_text())["series"]
    if case == "no_rescale_slope":
        assert any("RescaleSlope" in n for n in series["preconditions"])  # the fallback is recorded
    if case == "resent_instance":
        assert any("duplicate" in n for n in series["preconditions"])


def test_a_bad_series_is_passed_over_for_a_good_one(ct, tmp_path):
    """A second copy of the series without PixelSpacing, ranked first (3 mm), loses to the good one (2.5 mm)."""
    from imaging_tasks.cardiovascular import calcium as cardio

    base, _record, good = ct
    files = malformed.copy_study(base, tmp_path / "study")
    axial = malformed.image_series(files, "CT")
    for n, p in enumerate(axial):
        ds = pydicom.dcmread(p)
        ds.SliceThickness = "2.5"
        ds.save_as(p)
        ds.SliceThickness = "3"
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".9"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".9"
        del ds.PixelSpacing
        ds.save_as(tmp_path / "study" / f"copy-{n:03d}.dcm")
    result = cardio.process_study(sorted((tmp_path / "study").glob("*.dcm")), tmp_path / "out", device="cpu")
    assert _metrics(result) == good
    series = json.loads((tmp_path / "out" / "lesions.json").read_text())["series"]
    assert series["series_passed_over"] == ["missing_pixel_spacing"]


def test_computations_guard_degenerate_spacing():
    from imaging_tasks.cardiovascular import calcium as cardio
    from imaging_tasks.mammography import calcifications as mammo

    vol = np.full((3, 16, 16), 40.0, np.float32)
    for spacing in ((3.0, 0.0, 0.5), (0.0, 0.5, 0.5), (3.0, float("nan"), 0.5), (3.0, -0.5, 0.5)):
        with pytest.raises(BadInput) as exc:
            cardio.calcium_score(vol, spacing)
        assert exc.value.reason == "invalid_pixel_spacing"
        with pytest.raises(BadInput):
            cardio.heart_roi(vol, spacing)
    with pytest.raises(BadInput) as exc:
        mammo.detect_calcifications(np.zeros((64, 64), np.float32), 0.0)
    assert exc.value.reason == "invalid_pixel_spacing"


# --------------------------------------------------------------------------- neuroimaging
@pytest.fixture(scope="module")
def mr(tmp_path_factory):
    from imaging_tasks.neuroimaging import synth as neuroimaging

    out = tmp_path_factory.mktemp("mr")
    record = json.loads(neuroimaging.synthesize(out, 1, 5, with_pet=False)[0].read_text())
    return out / "neuroimaging" / "study-000", record


@pytest.mark.parametrize("case", _cases("neuroimaging", bad=True))
def test_unusable_mr_is_refused_with_its_reason(mr, tmp_path, case):
    from imaging_tasks.specialties import run_steps

    base, record = mr
    files, reason = _case_files(base, tmp_path, "neuroimaging", case)
    # the chain's first step loads the session: what it cannot use is refused there, before any processing
    _refused(lambda f, o: run_steps("neuroimaging", f, o, device="cpu", step="n4_bias"), files, tmp_path / "out",
             reason, record["phi"])


def test_shuffled_mr_loads_as_the_ordered_volume(mr, tmp_path):
    """Sorted from positions, the shuffled T1 is the same volume, voxel for voxel and in geometry, as the
    ordered series (``test_neuroimaging`` checks what processing that volume gives against its truth)."""
    from imaging_tasks.neuroimaging import structural as neuro
    from imaging_tasks.dicom_io import load_series

    base, _record = mr
    files, _ = _case_files(base, tmp_path, "neuroimaging", "shuffled")
    _series, stack = neuro._pick_checked(neuro.group_series(files))
    volume = neuro.load_volume(stack)
    ordered = load_series(sorted((base / "t1").glob("*.dcm")))
    assert np.array_equal(volume.array, ordered.array)
    assert (volume.spacing_mm, volume.origin_mm, volume.direction) == \
        (ordered.spacing_mm, ordered.origin_mm, ordered.direction)


# --------------------------------------------------------------------------- mammography
@pytest.fixture(scope="module")
def mg(tmp_path_factory):
    from imaging_tasks.mammography import study as mammo
    from imaging_tasks.mammography import synth as mammography

    out = tmp_path_factory.mktemp("mg")
    record = json.loads(mammography.synthesize(out, 1, 11, rows=700, cols=560, views=["L_CC", "R_MLO"],
                                               clusters_per_image=(1, 1), isolated_per_image=(2, 3))[0].read_text())
    base = out / "mammography" / "study-000"
    mammo.process_study(sorted(base.glob("*.dcm")), out / "good", device="cpu")
    return base, record, json.loads((out / "good" / "mammography.json").read_text())


def _detections(doc: dict) -> list:
    return [(im["laterality"], im["view"], im["calcifications"], im["clusters"]) for im in doc["images"]]


def test_good_mammogram_finds_the_planted_clusters(mg):
    _base, record, doc = mg
    for im in doc["images"]:
        planted = record["truth"]["views"][f"{im['laterality']}_{im['view']}"]["clusters"]
        assert len(im["clusters"]) == len(planted) == 1
        stored_mm = [v * im["pixel_spacing_mm"] for v in im["clusters"][0]["stored_xy_px"]]  # the truth's grid
        dist = np.hypot(*np.subtract(stored_mm, planted[0]["centre_xy_mm"]))
        assert dist < 2.0


@pytest.mark.parametrize("case", _cases("mammography", bad=True))
def test_unusable_mammogram_is_refused_with_its_reason(mg, tmp_path, case):
    from imaging_tasks.mammography import study as mammo

    base, record, _doc = mg
    files, reason = _case_files(base, tmp_path, "mammography", case)
    _refused(lambda f, o: mammo.process_study(f, o, device="cpu"), files, tmp_path / "out", reason, record["phi"])


@pytest.mark.parametrize("case", _cases("mammography", bad=False))
def test_monochrome1_and_spacing_fallback_give_the_same_detections(mg, tmp_path, case):
    """MONOCHROME1 of the mirrored pixels is inverted back: the same calcifications and clusters, exactly."""
    from imaging_tasks.mammography import study as mammo

    base, _record, good = mg
    files, _ = _case_files(base, tmp_path, "mammography", case)
    mammo.process_study(files, tmp_path / "out", device="cpu")
    doc = json.loads((tmp_path / "out" / "mammography.json").read_text())
    assert _detections(doc) == _detections(good)
    if case == "monochrome1":
        assert {im["photometric"] for im in doc["images"]} == {"MONOCHROME1"}
        stored = [pydicom.dcmread(p).pixel_array for p in sorted(f for f in files if f.suffix == ".dcm")]
        assert all(a.min() > 0 for a in stored)  # really mirrored: the air is now the brightest stored value
    else:
        assert all(im["preconditions"] for im in doc["images"])  # the detector-spacing fallback is noted


# --------------------------------------------------------------------------- pathology
@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    from imaging_tasks.pathology import synth as pathology

    out = tmp_path_factory.mktemp("wsi")
    record = json.loads(pathology.synthesize(out, 1, 2, width=2048, height=1536)[0].read_text())
    return out / "pathology" / "study-000", record


def test_good_slide_matches_its_truth(wsi, tmp_path):
    from imaging_tasks.pathology import slide_features

    base, record = wsi
    result = slide_features.process_study([base / "slide.svs"], tmp_path, device="cpu", target_mpp=0.5)
    assert _metrics(result)["tissue_area_mm2"] == pytest.approx(record["truth"]["tissue_area_mm2"], rel=0.05)


@pytest.mark.parametrize("case", _cases("pathology", bad=True))
def test_uncalibrated_slide_is_refused_with_its_reason(wsi, tmp_path, case):
    from imaging_tasks.pathology import slide_features

    base, record = wsi
    files, reason = _case_files(base, tmp_path, "pathology", case)
    _refused(lambda f, o: slide_features.process_study(f, o, device="cpu"), files, tmp_path / "out", reason, record["phi"])


def test_blank_and_tiny_slides_are_refused(tmp_path):
    from imaging_tasks.pathology import slide_features
    from imaging_tasks.pathology import tiles as pathology
    from imaging_tasks.pathology import synth

    synth.synthesize(tmp_path / "blank", 1, 4, width=1024, height=768, fragments=0)
    synth.synthesize(tmp_path / "tiny", 1, 4, width=256, height=192, fragments=1)
    for name, reason in (("blank", "no_tissue"), ("tiny", "slide_too_small")):
        slide = tmp_path / name / "pathology" / "study-000" / "slide.svs"
        _refused(lambda f, o: slide_features.process_study(f, o, device="cpu"), [slide], tmp_path / f"out-{name}", reason)
        _refused(lambda f, o: pathology.plan_tiles(f[0], o), [slide], tmp_path / f"plan-{name}", reason)  # DAG path


# --------------------------------------------------------------------------- the pipeline
def test_ct_without_pixel_spacing_is_quarantined_and_the_others_load(tmp_path):
    """index -> de-identify -> process -> load: the broken study ends in quarantine with its reason, the two
    good ones in the warehouse with their true scores, and the next run has nothing left to redo."""
    from imaging_tasks import pipeline
    from imaging_tasks.deid.keys import DEMO_KEY
    from imaging_tasks.deid.pseudonym import pseudo_id
    from imaging_tasks.cardiovascular import synth as cardiovascular
    from imaging_tasks.warehouse import DuckDBWarehouse

    landing = tmp_path / "landing"
    truths = [json.loads(p.read_text()) for p in cardiovascular.synthesize(landing, 3, seed=31, rows=128, slices=16)]
    bad = truths[1]
    folder = landing / "cardiovascular" / bad["label"]
    malformed.apply("cardiovascular", "no_pixel_spacing", sorted(folder.glob("*.dcm")))

    lake = pipeline.Lake(str(tmp_path / "lake"), "cardiovascular")
    summary = pipeline.index_landing(landing / "cardiovascular", lake, key=DEMO_KEY)
    assert len(summary["studies"]) == 3 and summary["quarantined"] == 0
    processed = []
    for study in summary["studies"]:
        clean = pipeline.deidentify_study(study, lake, key=DEMO_KEY, demo=True)
        assert clean["status"] == "ok"  # de-identification has no quarrel with it: processing does
        processed.append(pipeline.process_study(clean, lake, device="cpu"))
    wh = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    pipeline.load(processed, lake, wh)

    pseudo = {t["label"]: pseudo_id(DEMO_KEY, t["study_uid"], "study") for t in truths}
    status = {p["study"]: (p["status"], p.get("reason")) for p in processed}
    assert status[pseudo[bad["label"]]] == ("quarantined", "missing_pixel_spacing")
    rows = wh.query("SELECT stage, reason, message FROM quarantine WHERE specialty = 'cardiovascular'")
    assert [(stage, reason) for stage, reason, _m in rows] == [("process", "missing_pixel_spacing")]
    assert not any(v in rows[0][2] for v in bad["phi"] if len(v) >= 6)
    loaded = dict(wh.query("SELECT study_id, value FROM results WHERE metric = 'agatston_score'"))
    assert loaded == {pseudo[t["label"]]: t["truth"]["agatston"] for t in truths if t is not bad}
    assert wh.count("studies") == 2

    again = pipeline.index_landing(landing / "cardiovascular", lake, key=DEMO_KEY)
    assert again["studies"] == [] and sorted(again["skipped_done"]) == sorted(pseudo.values())
