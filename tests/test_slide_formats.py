"""Every slide format through the pipeline's library steps: index -> de-identify -> PHI audit -> tiling.

One composition (real IHC-derived tissue with a known mask) is written as DICOM whole-slide, generic pyramidal
TIFF, OME-TIFF, Hamamatsu NDPI and MIRAX (``pathology.synth_formats``), with PHI where each format keeps it,
and landed in one pathology landing folder beside broken inputs.  Each slide must become exactly one study with
all its files, come out of de-identification with none of the planted values in its bytes and no label image,
pass the audit, open in OpenSlide and tile to the ground truth; each broken input must be quarantined with its
reason while the others go on.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from imaging_tasks import storage
from imaging_tasks.deid.keys import DEMO_KEY
from imaging_tasks.errors import BadInput
from imaging_tasks.slide_files import main_slide_file, sniff
from imaging_tasks.pathology.synth_formats import (TRUTH_MIN_FRACTION, TRUTH_TARGET_MPP, TRUTH_TILE_PX,
                                                   synthesize_formats)
from imaging_tasks.pipeline import (DEID_MANIFEST, Lake, audit_deidentified, deidentify_study, fetch_instances,
                                    index_landing)

# the cut DICOM file: pydicom says so while the de-identifier refuses it
pytestmark = pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")

# format -> where the slide lands; its OpenSlide vendor (source, de-identified copy); sniffed format; output name
LANDED = {"dicom": "case-dicom/series", "generic": "case-generic.tif", "ome": "case-ome.ome.tif",
          "ndpi": "case-ndpi.ndpi", "mirax": "case-mirax.mrxs"}
VENDOR = {"dicom": ("dicom", "dicom"), "generic": ("generic-tiff", "generic-tiff"),
          "ome": ("generic-tiff", "generic-tiff"), "ndpi": ("hamamatsu", "hamamatsu"), "mirax": ("mirax", "mirax")}
SNIFFED = {"dicom": "dicom", "generic": "generic-tiff", "ome": "ome-tiff", "ndpi": "ndpi", "mirax": "mirax"}
OUTPUT = {"generic": "slide.tif", "ome": "slide.tif", "ndpi": "slide.ndpi", "mirax": "slide.mrxs"}


def _broken_dicom_series(src: Path, dst: Path, damage: str) -> None:
    """A copy of the DICOM series under new UIDs, damaged: ``frames`` (level 0 lost half its frames while
    NumberOfFrames still says 48), ``cut`` (level 2's file cut in half), ``label-only`` (no VOLUME instance)."""
    dst.mkdir(parents=True)
    series = generate_uid()
    names = ["label.dcm"] if damage == "label-only" else ["level-0.dcm", "level-1.dcm", "level-2.dcm"]
    for name in names:
        ds = pydicom.dcmread(src / name)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if damage == "frames" and name == "level-0.dcm":
            frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
            ds.PixelData = encapsulate(frames[: len(frames) // 2])
            ds["PixelData"].VR = "OB"
        ds.save_as(dst / name, enforce_file_format=True)
        if damage == "cut" and name == "level-2.dcm":
            (dst / name).write_bytes((dst / name).read_bytes()[:3000])


def _not_wsi(path: Path) -> None:
    from imaging_tasks.synth.phi import dicom_dataset, fake_study

    study = fake_study(np.random.default_rng(5), "ct")
    ds = dicom_dataset(study, modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=generate_uid(),
                       sop_uid=generate_uid(), series_number=1, instance_number=1, series_description="CT")
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Synthesise, land, index, de-identify and audit once for the whole module."""
    root = tmp_path_factory.mktemp("formats")
    made = synthesize_formats(root / "synth", seed=3)
    land = root / "landing" / "pathology"
    land.mkdir(parents=True)
    shutil.copytree(made["dicom"]["main"].parent, land / LANDED["dicom"])
    for fmt in ("generic", "ome", "ndpi"):
        shutil.copy(made[fmt]["main"], land / LANDED[fmt])
    shutil.copy(made["mirax"]["main"], land / "case-mirax.mrxs")
    shutil.copytree(made["mirax"]["main"].with_suffix(""), land / "case-mirax")
    # broken inputs, each with the reason it must get (and where)
    (land / "junk.svs").write_bytes(b"not a slide at all " * 64)
    (land / "notes.txt").write_text("scanner log")
    (land / "cut.tif").write_bytes(made["generic"]["main"].read_bytes()[:6000])
    _not_wsi(land / "ct-image.dcm")
    for damage in ("frames", "cut", "label-only"):
        _broken_dicom_series(made["dicom"]["main"].parent, land / f"case-dicom-{damage}", damage)
    shutil.copytree(made["mirax"]["main"].with_suffix(""), land / "orphan-folder")  # no orphan-folder.mrxs
    for f in (land / "orphan-folder").iterdir():  # other bytes: quarantine keeps one row per content
        f.write_bytes(f.read_bytes() + b"\n")
    (land / "lonely.mrxs").write_bytes(b"MIRAX index without its folder")
    shutil.copy(made["mirax"]["main"], land / "case-mirax-cut.mrxs")
    shutil.copytree(made["mirax"]["main"].with_suffix(""), land / "case-mirax-cut")
    (land / "case-mirax-cut" / "Data0001.dat").unlink()

    lake = Lake(root / "lake", "pathology")
    summary = index_landing(land, lake, key=DEMO_KEY)
    clean = {}
    for study in summary["studies"]:
        manifest = storage.read_json(study["manifest"])
        origin = Path(storage.as_path(manifest["files"][0]["uri"]).path).relative_to(land).parts[0]
        result = deidentify_study(study, lake, key=DEMO_KEY, demo=True)
        audit_deidentified(result, lake)
        clean[origin] = {"study": study, "manifest": manifest, "deid": result}
    reasons = {}
    for reason_file in (lake.root / "quarantine" / "pathology").glob("*/reason.json"):
        row = json.loads(reason_file.read_text())
        reasons[str(Path(storage.as_path(row["source_uri"]).path).relative_to(land))] = (row["stage"], row["reason"])
    return {"made": made, "land": land, "lake": lake, "summary": summary, "clean": clean, "reasons": reasons,
            "root": root}


def _case(run, fmt):
    return run["clean"][LANDED[fmt].split("/")[0]]


@pytest.mark.parametrize("fmt", list(LANDED))
def test_synthetic_slide_opens_with_planted_phi(run, fmt):
    made = run["made"][fmt]
    slide = openslide.OpenSlide(str(made["main"]))
    assert slide.properties["openslide.vendor"] == VENDOR[fmt][0]
    assert slide.dimensions == tuple(made["truth"]["dimensions"])
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(made["truth"]["mpp"])
    # OpenSlide 4.0.1 reads OME-TIFF as generic TIFF: the SubIFD pyramid is invisible to it (level 0 only)
    assert (slide.level_count == 1) == (fmt == "ome")
    assert sniff(made["main"])[0] == SNIFFED[fmt]
    raw = b"".join(f.read_bytes() for f in made["files"])
    found = [v for v in made["phi"] if len(v) >= 6 and v.encode() in raw]
    assert len(found) >= 3, found  # the de-identifier has real work in the headers of every format
    if fmt in ("dicom", "ndpi", "mirax"):  # the label/macro photos OpenSlide exposes
        assert {"label", "macro"} & set(slide.associated_images)


@pytest.mark.parametrize("fmt", list(LANDED))
def test_each_slide_is_one_study_with_all_its_files(run, fmt):
    case = _case(run, fmt)
    files = case["manifest"]["files"]
    expected = {"dicom": 5, "mirax": 5}.get(fmt, 1)  # DICOM: 3 levels + label + overview; MIRAX: .mrxs + 4
    assert len(files) == expected == case["study"]["n_files"]
    assert {f["slide"]["format"] for f in files} == {SNIFFED[fmt]}
    if fmt == "dicom":
        assert sorted(f["slide"]["role"] for f in files) == ["label", "overview", "volume", "volume", "volume"]
    # the study and patient are pseudonyms; the DICOM patient is named as in any DICOM study
    from imaging_tasks.deid.pseudonym import pseudo_id

    study = case["study"]
    assert study["study"].startswith("S") and study["patient"].startswith("P")
    if fmt == "dicom":
        ds = pydicom.dcmread(run["made"]["dicom"]["main"], stop_before_pixels=True)
        assert study["patient"] == pseudo_id(DEMO_KEY, ds.PatientID, "patient")
        assert study["study"] == pseudo_id(DEMO_KEY, ds.SeriesInstanceUID, "study")


def test_index_counts(run):
    origins = set(run["clean"])
    assert origins == {"case-dicom", "case-generic.tif", "case-ome.ome.tif", "case-ndpi.ndpi", "case-mirax.mrxs",
                       "cut.tif", "case-dicom-frames", "case-dicom-cut", "case-mirax-cut.mrxs"}


@pytest.mark.parametrize("fmt", list(LANDED))
def test_deidentified_copy_has_no_phi_no_label_and_tiles_to_the_truth(run, fmt, tmp_path):
    case, made = _case(run, fmt), run["made"][fmt]
    assert case["deid"]["status"] == "ok"
    deid = storage.read_json(storage.join(case["deid"]["anonymized"], DEID_MANIFEST))
    files = fetch_instances(deid["instances"], tmp_path / "in")
    raw = b"".join(f.read_bytes() for f in files)
    planted = [v for v in made["phi"] if len(v) >= 6]
    assert [v for v in planted if v.encode() in raw or v.encode("utf-16-le") in raw] == []
    main = main_slide_file(files)
    if fmt == "dicom":  # the series in one folder, without its label and overview instances
        assert len(files) == 3 and len({f.parent for f in files}) == 1
        assert case["deid"]["n_quarantined"] == 2
    else:
        assert main.name == OUTPUT[fmt]
    slide = openslide.OpenSlide(str(main))
    assert slide.properties["openslide.vendor"] == VENDOR[fmt][1]
    assert not {"label", "macro"} & set(slide.associated_images)
    assert slide.level_count >= 3  # the OME copy's pyramid is in the main chain now
    from imaging_tasks.pathology.tiles import plan_tiles

    plan = plan_tiles(main, tmp_path / "plan", target_mpp=TRUTH_TARGET_MPP, tile_px=TRUTH_TILE_PX,
                      min_tissue_fraction=TRUTH_MIN_FRACTION)
    metrics = {m["name"]: m["value"] for m in plan["metrics"]}
    truth = made["truth"]
    assert metrics["slide_mpp"] == pytest.approx(truth["mpp"])
    assert metrics["tissue_area_mm2"] == pytest.approx(truth["tissue_area_mm2"], rel=0.06)
    assert abs(len(plan["tiles"]) - truth["n_tiles_expected"]) <= max(3, 0.12 * truth["n_tiles_expected"])


def test_deidentified_generic_and_ome_keep_calibration_not_text(run, tmp_path):
    import tifffile

    for fmt in ("generic", "ome"):
        deid = storage.read_json(storage.join(_case(run, fmt)["deid"]["anonymized"], DEID_MANIFEST))
        path = fetch_instances(deid["instances"], tmp_path / fmt)[0]
        with tifffile.TiffFile(path) as tif:
            assert len(tif.pages) == 3 and not tif.is_ome  # levels only: label page / second OME image gone
            assert all(p.description == "" for p in tif.pages)
            assert not any(t.dtype == 2 for p in tif.pages for t in p.tags.values())  # no text tag at all
        assert deid["instances"][0]["header"]["mpp"] == pytest.approx(0.5)


def test_ome_calibration_from_physical_size_when_resolution_tags_are_missing(run, tmp_path):
    from imaging_tasks.deid.ome import deidentify_ome
    from imaging_tasks.pathology.synth_formats import ome_xml, write_ome_tiff

    rgb = np.asarray(openslide.OpenSlide(str(run["made"]["generic"]["main"])).read_region((0, 0), 0, (1024, 768)))
    xml = ome_xml(width=1024, height=768, mpp=250, name="Doe, Jane", description="case", acquired="2024-01-02T03:04:05",
                  experimenter={"LastName": "Example"}, comment="none", label_size=None)
    src = tmp_path / "nores.ome.tif"
    write_ome_tiff(src, rgb[..., :3], mpp=0.25, xml=xml.replace('PhysicalSizeXUnit="um"', 'PhysicalSizeXUnit="nm"')
                   .replace('PhysicalSizeYUnit="um"', 'PhysicalSizeYUnit="nm"'), label=None, resolution_tags=False)
    assert "openslide.mpp-x" not in openslide.OpenSlide(str(src)).properties  # uncalibrated for OpenSlide
    info = deidentify_ome(src, tmp_path / "out.tif", DEMO_KEY)
    assert info["resolution_from"] == "ome" and info["mpp"] == pytest.approx(0.25)
    out = openslide.OpenSlide(str(tmp_path / "out.tif"))
    assert float(out.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-3)
    assert [round(d) for d in out.level_downsamples] == [1, 4, 16]
    assert b"Doe, Jane" not in (tmp_path / "out.tif").read_bytes()


def test_broken_inputs_are_quarantined_with_reasons_and_the_rest_goes_on(run):
    reasons = run["reasons"]
    assert reasons["junk.svs"] == ("index", "unreadable_slide")
    assert reasons["notes.txt"] == ("index", "not_a_slide")
    assert reasons["ct-image.dcm"] == ("index", "not_wsi")
    assert reasons["lonely.mrxs"] == ("index", "mirax_incomplete")
    for name in ("Slidedat.ini", "Index.dat", "Data0000.dat", "Data0001.dat"):
        assert reasons[f"orphan-folder/{name}"] == ("index", "mirax_orphan")
    assert reasons["cut.tif"] == ("deidentify", "unreadable_slide")  # its first page parses: caught at the copy
    assert reasons["case-dicom/series/label.dcm"] == ("deidentify", "slide_label_image")
    assert reasons["case-dicom/series/overview.dcm"] == ("deidentify", "slide_label_image")
    for name in ("level-0.dcm", "level-1.dcm", "level-2.dcm"):  # frames missing: OpenSlide cannot read it
        assert reasons[f"case-dicom-frames/{name}"] == ("deidentify", "unreadable_slide")
    stage, reason = reasons["case-dicom-cut/level-2.dcm"]  # the DICOM de-identifier's own reason for a cut file
    assert stage == "deidentify" and reason not in ("incomplete_slide", "unreadable_slide")
    for name in ("level-0.dcm", "level-1.dcm"):  # the rest of that series cannot make a whole slide
        assert reasons[f"case-dicom-cut/{name}"] == ("deidentify", "incomplete_slide")
    assert reasons["case-dicom-label-only/label.dcm"] == ("index", "no_volume_image")
    cut = {k: v for k, v in reasons.items() if k.startswith("case-mirax-cut")}
    assert len(cut) == 4 and set(cut.values()) == {("deidentify", "unreadable_slide")}
    for origin in ("cut.tif", "case-dicom-frames", "case-dicom-cut", "case-mirax-cut.mrxs"):
        assert run["clean"][origin]["deid"]["status"] == "quarantined"
    for fmt in LANDED:
        assert _case(run, fmt)["deid"]["status"] == "ok"


def test_audit_catches_a_leak_in_each_format(run):
    """The audit's values per format are real: an output with the raw input's text appended fails it."""
    from imaging_tasks.phi_audit import PHILeak
    from imaging_tasks.pipeline import audit_study

    for fmt in LANDED:
        case = _case(run, fmt)
        deid = storage.read_json(storage.join(case["deid"]["anonymized"], DEID_MANIFEST))
        target = Path(storage.as_path(deid["instances"][-1]["uri"]).path)
        original = target.read_bytes()
        source = Path(storage.as_path(case["manifest"]["files"][0]["uri"]).path)
        leak = (source.with_suffix("") / "Slidedat.ini") if fmt == "mirax" else source
        try:
            target.write_bytes(original + leak.read_bytes())
            with pytest.raises(PHILeak):
                audit_study(case["deid"], run["lake"])
        finally:
            target.write_bytes(original)
        audit_study(case["deid"], run["lake"])


def test_main_slide_file_and_fetch_layout(tmp_path):
    (tmp_path / "a").mkdir()
    one = tmp_path / "slide.svs"
    one.write_bytes(b"x")
    assert main_slide_file([one]) == one
    mrxs = tmp_path / "slide.mrxs"
    assert main_slide_file([mrxs, tmp_path / "slide" / "Index.dat", tmp_path / "slide" / "Data0000.dat"]) == mrxs
    small, big = tmp_path / "a" / "1.dcm", tmp_path / "a" / "2.dcm"
    small.write_bytes(b"s"), big.write_bytes(b"bigger")
    assert main_slide_file([small, big]) == big
    other = tmp_path / "3.dcm"
    other.write_bytes(b"x")
    for bad in ([one, big], [small, other], []):
        with pytest.raises(BadInput) as err:
            main_slide_file(bad)
        assert err.value.reason == "not_one_slide"
    # fetch: slide instances as written, others numbered as before
    src = tmp_path / "src"
    src.mkdir()
    for name in ("x.dcm", "pet.nii.gz"):
        (src / name).write_bytes(name.encode())
    got = fetch_instances([{"uri": str(src / "x.dcm")}, {"uri": str(src / "pet.nii.gz")},
                           {"uri": str(src / "x.dcm"), "relpath": "slide/Index.dat"}], tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in got] == ["00000.dcm", "00001-pet.nii.gz",
                                                                          "slide/Index.dat"]
    with pytest.raises(ValueError):
        fetch_instances([{"uri": str(src / "x.dcm"), "relpath": "../escape.dcm"}], tmp_path / "out2")


def test_dicom_wsi_in_another_specialty_is_refused_as_before(run):
    from imaging_tasks.index import index_objects

    path = run["made"]["dicom"]["main"]
    obj = storage.ObjectInfo(uri=str(path), relpath="x/level-0.dcm", size=path.stat().st_size, modified=None)
    result = index_objects([obj], specialty="cardiovascular", key=DEMO_KEY, quarantine=lambda o, e: e.reason)
    assert result.studies == [] and result.quarantined == ["wrong_modality"]


def test_the_generic_slide_copier_hands_ome_tiff_to_the_ome_deidentifier(run, tmp_path):
    """Whoever calls ``deidentify_svs`` on an OME-TIFF (the CLI's tree de-identifier does) gets the OME path: the
    label, a second OME image the page copier cannot tell from a level, is dropped and the XML with it."""
    import tifffile

    from imaging_tasks.deid.slide import deidentify_svs

    info = deidentify_svs(run["made"]["ome"]["main"], tmp_path / "copy.tif", b"k" * 32)
    data = (tmp_path / "copy.tif").read_bytes()
    assert not [v for v in run["made"]["ome"]["phi"] if len(v) >= 6 and v.encode() in data]
    with tifffile.TiffFile(tmp_path / "copy.tif") as tif:
        assert not tif.is_ome and len(tif.pages) == 3
    assert info["mpp"] == pytest.approx(0.5)
