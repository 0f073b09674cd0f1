"""Synthetic whole-slide images in the formats besides Aperio SVS, each with ground truth and planted PHI.

* **DICOM whole-slide** (:func:`write_dicom_wsi`): VL Whole Slide Microscopy Image Storage, one series holding a
  pyramid of VOLUME instances (``TILED_FULL``, JPEG baseline frames, one file per level) plus a LABEL and an
  OVERVIEW instance whose pixels show the label text.  PHI sits in the headers where scanners write it
  (PatientName/ID/BirthDate, AccessionNumber, StudyID, ReferringPhysicianName, InstitutionName, ContainerIdentifier =
  the barcode, SpecimenIdentifier, dates, UIDs) and in the label's pixels.  OpenSlide 4 opens it (vendor
  ``dicom``) given any one file of the series, the others in the same folder.
* **Generic pyramidal TIFF** (:func:`write_generic_tiff`): tiled JPEG levels in the main IFD chain (reduced ones
  NewSubfileType 1), no Aperio description, calibration in the TIFF resolution tags (``ResolutionUnit`` cm),
  from which OpenSlide 4.0.1 derives ``openslide.mpp-x``/``-y`` (vendor ``generic-tiff``).  PHI in the text tags
  scanners and converters fill (ImageDescription, DocumentName, Artist, HostComputer, DateTime) and in a
  stripped ``label`` page (description ``label WxH``).
* **Hamamatsu NDPI** and **MIRAX**: written by :mod:`.synth_vendor` (see there) from the same composition.
* **OME-TIFF** (:func:`write_ome_tiff`): the pyramid as tifffile writes it (level 0 in the main chain, reduced
  levels in its SubIFDs), the OME-XML in page 0's ImageDescription with ``PhysicalSizeX/Y`` (µm) and PHI where
  converters put it (Image Name, Description, AcquisitionDate, Experimenter names/e-mail/user name, an
  annotation), and the label as a second OME image (a second page in the main chain).  OpenSlide 4.0.1 has no
  OME reader: it opens the file as ``generic-tiff``, sees level 0 only (SubIFDs are not read) and takes mpp from
  the resolution tags, which the writer fills like ``bfconvert``/``tifffile`` do.  The de-identifier
  (``deid.ome``) lifts the SubIFD levels into the main chain, so the de-identified copy is a full pyramid.

Pixels: the composition of :mod:`.synth` (real IHC-derived tissue, known fragment mask), so tissue area and the
tile count at the truth grid are exact ground truth whatever the container.  :func:`synthesize_formats` writes
one slide per format from one composition (slides are small by default, 2048 x 1536 px at 0.5 µm/px: the tests
run in seconds) and returns, per format, its files, the file to hand OpenSlide, the truth and the PHI planted.
"""
from __future__ import annotations

import datetime as dt
import io
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from imaging_tasks.synth.phi import fake_study, new_uid, phi_values

from .synth import GLASS_RGB, JPEG_QUALITY, TILE, _compose, _label_image, _macro_image, expected_tiles

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
DOWNSAMPLES = (1, 4, 16)
FORMATS = ("dicom", "generic", "ome", "ndpi", "mirax")
# The tile grid of the truth's n_tiles_expected: at 1 µm/px, 64 px tiles (128 px of a 0.5 µm/px level 0), fine
# enough that a 2048 x 1536 slide has ~200 grid cells and tile counts are a real check.
TRUTH_TARGET_MPP, TRUTH_TILE_PX, TRUTH_MIN_FRACTION = 1.0, 64, 0.5


def _levels(rgb: np.ndarray, downsamples=DOWNSAMPLES) -> list[np.ndarray]:
    pil = Image.fromarray(rgb)
    return [rgb if d == 1 else np.asarray(pil.reduce(d)) for d in downsamples]


# ----------------------------------------------------------------------------------------------- DICOM
def _jpeg(tile: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=JPEG_QUALITY)  # YCbCr 4:2:0, JFIF
    return buf.getvalue()


def _frames(level: np.ndarray, tile: int) -> list[bytes]:
    """TILED_FULL frame order: row by row, left to right; edge tiles padded with glass to full size."""
    h, w = level.shape[:2]
    rows, cols = -(-h // tile), -(-w // tile)
    glass = np.array([round(c) for c in GLASS_RGB], np.uint8)
    out = []
    for r in range(rows):
        for c in range(cols):
            block = np.empty((tile, tile, 3), np.uint8)
            block[:] = glass
            part = level[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
            block[:part.shape[0], :part.shape[1]] = part
            out.append(_jpeg(block))
    return out


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _wsi_dataset(study, *, series_uid: str, sop_uid: str, instance: int, image_type: list[str], barcode: str,
                 specimen_id: str, specimen_uid: str, dimension_uid: str, width: int, height: int, rows: int,
                 cols: int, frames: int, spacing_mm: float, label_in_image: bool):
    """One VL WSI instance's header: the study's PHI (``synth.phi.dicom_dataset``) plus the whole-slide modules
    OpenSlide / libdicom read (Multi-frame Dimension TILED_FULL, Total Pixel Matrix, Shared Functional Groups with
    Pixel Measures, Optical Path, Specimen)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from imaging_tasks.synth.phi import dicom_dataset

    ds = dicom_dataset(study, modality="SM", sop_class_uid=WSI_SOP_CLASS, series_uid=series_uid, sop_uid=sop_uid,
                       series_number=1, instance_number=instance, series_description="H&E whole slide")
    ds.file_meta.TransferSyntaxUID = JPEG_BASELINE
    ds.ImageType = image_type
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "SynthCo", "SlideScan 9", "1.0"
    ds.AcquisitionDateTime = study.study_date + study.study_time
    ds.ContainerIdentifier = barcode
    ds.IssuerOfTheContainerIdentifierSequence = Sequence([Dataset()])
    ds.IssuerOfTheContainerIdentifierSequence[0].LocalNamespaceEntityID = study.institution
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    spec = Dataset()
    spec.SpecimenIdentifier, spec.SpecimenUID = specimen_id, specimen_uid
    spec.IssuerOfTheSpecimenIdentifierSequence = Sequence([])
    spec.SpecimenPreparationSequence = Sequence([])
    spec.SpecimenShortDescription = f"Biopsy {study.patient.name.split('^')[0]}"
    ds.SpecimenDescriptionSequence = Sequence([spec])
    ds.AcquisitionContextSequence = Sequence([])
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dimension_uid
    ds.VolumetricProperties = "VOLUME"
    ds.SpecimenLabelInImage = "YES" if label_in_image else "NO"
    ds.BurnedInAnnotation = "YES" if label_in_image else "NO"
    ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = width * spacing_mm, height * spacing_mm, 0.004
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    measures = Dataset()
    measures.PixelSpacing = [f"{spacing_mm:.8g}", f"{spacing_mm:.8g}"]
    measures.SliceThickness = 0.004
    frame_type = Dataset()
    frame_type.FrameType = image_type
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.IlluminationTypeCodeSequence = Sequence([_code("111744", "DCM", "Brightfield illumination")])
    path.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
    ds.OpticalPathSequence = Sequence([path])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    return ds


def write_dicom_wsi(folder: Path, rgb: np.ndarray, study, *, mpp: float, barcode: str, label: Image.Image,
                    macro: Image.Image, seed: int = 0) -> list[Path]:
    """A DICOM-WSI series in ``folder``: one VOLUME instance per pyramid level (``level-<n>.dcm``) plus
    ``label.dcm`` and ``overview.dcm``; returns the files, level 0 first."""
    from pydicom.encaps import encapsulate

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 77])
    series_uid, specimen_uid, dimension_uid = new_uid(rng), new_uid(rng), new_uid(rng)
    specimen_id = f"{study.accession}-A1"
    written = []
    for n, (factor, level) in enumerate(zip(DOWNSAMPLES, _levels(rgb), strict=True)):
        frames = _frames(level, TILE)
        image_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if factor == 1 else \
            ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds = _wsi_dataset(study, series_uid=series_uid, sop_uid=new_uid(rng), instance=n + 1, image_type=image_type,
                          barcode=barcode, specimen_id=specimen_id, specimen_uid=specimen_uid,
                          dimension_uid=dimension_uid, width=level.shape[1], height=level.shape[0], rows=TILE,
                          cols=TILE, frames=len(frames), spacing_mm=mpp * factor / 1000.0, label_in_image=False)
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        path = folder / f"level-{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    for n, (kind, img) in enumerate((("LABEL", label), ("OVERVIEW", macro)), start=len(written) + 1):
        arr = np.asarray(img.convert("RGB"))
        ds = _wsi_dataset(study, series_uid=series_uid, sop_uid=new_uid(rng), instance=n,
                          image_type=["ORIGINAL", "PRIMARY", kind, "NONE"], barcode=barcode, specimen_id=specimen_id,
                          specimen_uid=specimen_uid, dimension_uid=dimension_uid, width=arr.shape[1],
                          height=arr.shape[0], rows=arr.shape[0], cols=arr.shape[1], frames=1, spacing_mm=0.025,
                          label_in_image=True)
        ds.PixelData = encapsulate([_jpeg(arr)])
        ds["PixelData"].VR = "OB"
        path = folder / f"{kind.lower()}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------- TIFF
def _tiled(resolution_px_per_cm: float) -> dict:
    return dict(tile=(TILE, TILE), compression="jpeg", compressionargs={"level": JPEG_QUALITY}, photometric="rgb",
                resolution=(resolution_px_per_cm, resolution_px_per_cm), resolutionunit="CENTIMETER", metadata=None)


def write_generic_tiff(path: Path, rgb: np.ndarray, *, mpp: float, text: dict[str, str],
                       label: Image.Image | None) -> None:
    """Generic pyramidal TIFF: tiled JPEG levels in the main chain, calibration in the resolution tags.

    ``text``: the PHI-bearing text tags to fill: ``description``, ``document`` (DocumentName), ``artist``,
    ``host`` (HostComputer), ``datetime`` ("YYYY:MM:DD HH:MM:SS").  ``label``: a stripped page described
    ``label WxH`` (the convention deid.slide recognises), or None.
    """
    import tifffile

    extratags = [(269, "s", 0, text["document"], True), (315, "s", 0, text["artist"], True),
                 (316, "s", 0, text["host"], True), (306, "s", 0, text["datetime"], True)]
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for n, (factor, level) in enumerate(zip(DOWNSAMPLES, _levels(rgb), strict=True)):
            tif.write(level, subfiletype=0 if n == 0 else 1, software="SynthCo SlideScan 9",
                      description=text["description"] if n == 0 else None,
                      extratags=extratags if n == 0 else (), **_tiled(1e4 / (mpp * factor)))
        if label is not None:
            tif.write(np.asarray(label.convert("RGB")), subfiletype=1, rowsperstrip=64, compression="zlib",
                      photometric="rgb", metadata=None, software=False,
                      description=f"label {label.width}x{label.height}")


def _xml(text: str) -> str:
    from xml.sax.saxutils import escape

    return escape(text, {'"': "&quot;"})


def ome_xml(*, width: int, height: int, mpp: float, name: str, description: str, acquired: str,
            experimenter: dict[str, str], comment: str, label_size: tuple[int, int] | None) -> str:
    """OME-XML (2016-06) as converters write it for a bright-field RGB slide, with PHI where they put it."""
    ns = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
    who = " ".join(f'{k}="{_xml(v)}"' for k, v in experimenter.items())
    label = ""
    if label_size:
        lw, lh = label_size
        label = (f'<Image ID="Image:1" Name="label"><Pixels ID="Pixels:1" DimensionOrder="XYCZT" Type="uint8" '
                 f'SizeX="{lw}" SizeY="{lh}" SizeC="3" SizeZ="1" SizeT="1" Interleaved="true">'
                 '<Channel ID="Channel:1:0" SamplesPerPixel="3"/><TiffData IFD="1" PlaneCount="1"/></Pixels></Image>')
    return (f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns="{ns}" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'xsi:schemaLocation="{ns} {ns}/ome.xsd" Creator="SynthCo SlideScan 9">'
            f'<Experimenter ID="Experimenter:0" {who}/>'
            f'<Image ID="Image:0" Name="{_xml(name)}"><AcquisitionDate>{acquired}</AcquisitionDate>'
            f'<ExperimenterRef ID="Experimenter:0"/><Description>{_xml(description)}</Description>'
            f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="{width}" SizeY="{height}" SizeC="3" '
            f'SizeZ="1" SizeT="1" Interleaved="true" PhysicalSizeX="{mpp:g}" PhysicalSizeXUnit="um" '
            f'PhysicalSizeY="{mpp:g}" PhysicalSizeYUnit="um"><Channel ID="Channel:0:0" SamplesPerPixel="3"/>'
            '<TiffData IFD="0" PlaneCount="1"/></Pixels><AnnotationRef ID="Annotation:0"/></Image>'
            f'{label}<StructuredAnnotations><CommentAnnotation ID="Annotation:0"><Value>{_xml(comment)}</Value>'
            '</CommentAnnotation></StructuredAnnotations></OME>')


def write_ome_tiff(path: Path, rgb: np.ndarray, *, mpp: float, xml: str, label: Image.Image | None,
                   resolution_tags: bool = True) -> None:
    """OME-TIFF: level 0 in the main chain with the reduced levels in its SubIFDs (as tifffile and bfconvert
    write pyramids), the OME-XML ``xml`` in page 0's ImageDescription, the label as a second main-chain page
    (``TiffData IFD="1"`` of a second OME image).  ``resolution_tags=False`` leaves the TIFF resolution tags out
    (calibration in the OME-XML only, as some converters do)."""
    import tifffile

    levels = _levels(rgb)

    def opts(factor: int) -> dict:
        kw = _tiled(1e4 / (mpp * factor))
        if not resolution_tags:
            kw.pop("resolution"), kw.pop("resolutionunit")
        return kw

    with tifffile.TiffWriter(path, bigtiff=False, ome=False) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, description=xml, software=False, **opts(1))
        for factor, level in zip(DOWNSAMPLES[1:], levels[1:], strict=True):
            tif.write(level, subfiletype=1, software=False, **opts(factor))
        if label is not None:
            tif.write(np.asarray(label.convert("RGB")), rowsperstrip=64, compression="zlib", photometric="rgb",
                      metadata=None, software=False)


# ----------------------------------------------------------------------------------------------- entry
def synthesize_formats(out: Path, seed: int = 0, *, formats=FORMATS, width: int = 2048, height: int = 1536,
                       mpp: float = 0.5, stain: str = "he", fragments: int = 3) -> dict[str, dict]:
    """One slide per format in ``out/<format>/`` from one composition; returns per format
    ``{"files": [paths], "main": path to hand OpenSlide, "truth": {...}, "phi": [planted strings]}``.

    ``truth``: tissue_area_mm2, n_tissue_regions, n_tiles_expected (at this module's ``TRUTH_*`` grid), mpp,
    dimensions.  ``phi``: every identifying string planted in the headers (the label pixels carry them too); the
    de-identified copy must hold none of them.  ``ndpi`` and ``mirax`` are written by
    :mod:`.synth_vendor` (``write_ndpi``, ``write_mirax``) with this slide's PHI (``NDPI``: ``slide.ndpi``;
    MIRAX: ``slide.mrxs`` + ``slide/``).
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}; choose from {FORMATS}")
    out = Path(out)
    rng = np.random.default_rng([seed, 14])
    study = fake_study(rng, f"formats-{seed}")
    p = study.patient
    family, given = p.name.split("^")[:2]
    barcode = f"{study.accession}-A1-{stain.upper()}"
    operator_family, operator_given = study.operator.split("^")[:2]
    stamp = dt.datetime.strptime(study.study_date + study.study_time, "%Y%m%d%H%M%S")
    host = ("SCAN-" + study.institution.split()[0].upper())[:16]
    study.extra_phi += [barcode, f"{study.accession}_{family}", f"{family}, {given}", operator_given, host,
                        f"{operator_given.lower()}.{operator_family.lower()}@hospital.example",
                        f"{operator_given[0].lower()}{operator_family.lower()}", f"{study.accession}-A1",
                        stamp.strftime("%Y:%m:%d %H:%M:%S"), stamp.strftime("%Y-%m-%dT%H:%M:%S")]
    rgb, mask, areas = _compose(rng, height, width, stain, fragments)
    label = _label_image([study.institution[:28], f"{family}, {given}", p.patient_id, study.accession,
                          f"DOB {p.birth_date}  {stain.upper()}"], barcode)
    macro = _macro_image(label, rgb)
    px_mm2 = (mpp / 1000.0) ** 2
    truth = {"tissue_area_mm2": float(mask.sum()) * px_mm2, "n_tissue_regions": len(areas), "mpp": mpp,
             "dimensions": [width, height],
             "n_tiles_expected": expected_tiles(mask, mpp, target_mpp=TRUTH_TARGET_MPP, tile_px=TRUTH_TILE_PX,
                                                min_fraction=TRUTH_MIN_FRACTION),
             "tile_grid": {"target_mpp": TRUTH_TARGET_MPP, "tile_px": TRUTH_TILE_PX,
                           "min_tissue_fraction": TRUTH_MIN_FRACTION}}
    phi = phi_values(study)
    made: dict[str, dict] = {}
    if "dicom" in formats:
        files = write_dicom_wsi(out / "dicom", rgb, study, mpp=mpp, barcode=barcode, label=label, macro=macro,
                                seed=seed)
        made["dicom"] = {"files": files, "main": files[0]}
    if "generic" in formats:
        path = out / "generic" / "slide.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_generic_tiff(path, rgb, mpp=mpp, label=label, text={
            "description": f"{barcode} {family}, {given} {p.patient_id} H&E",
            "document": f"{study.accession}_{family}", "artist": f"{operator_given} {operator_family}",
            "host": host, "datetime": stamp.strftime("%Y:%m:%d %H:%M:%S")})
        made["generic"] = {"files": [path], "main": path}
    if "ome" in formats:
        path = out / "ome" / "slide.ome.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        xml = ome_xml(width=width, height=height, mpp=mpp, name=f"{study.accession}_{family}",
                      description=f"H&E biopsy of {family}, {given} ({p.patient_id})",
                      acquired=stamp.strftime("%Y-%m-%dT%H:%M:%S"), comment=f"Barcode {barcode}",
                      experimenter={"FirstName": operator_given, "LastName": operator_family,
                                    "Email": f"{operator_given.lower()}.{operator_family.lower()}@hospital.example",
                                    "UserName": f"{operator_given[0].lower()}{operator_family.lower()}",
                                    "Institution": study.institution},
                      label_size=label.size)
        write_ome_tiff(path, rgb, mpp=mpp, xml=xml, label=label)
        made["ome"] = {"files": [path], "main": path}
    vendor = {"patient_name": f"{family}, {given}", "patient_family": family, "patient_id": p.patient_id,
              "birth_date": p.birth_date, "accession": study.accession, "slide_label": barcode,
              "operator": f"{operator_given} {operator_family}", "institution": study.institution,
              "scan_date": study.study_date, "scan_time": study.study_time,
              "scanner_serial": f"SN{study.accession[-6:]}"}
    if "ndpi" in formats:
        from .synth_vendor import write_ndpi

        path = out / "ndpi" / "slide.ndpi"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = write_ndpi(path, rgb, mpp=mpp, phi=vendor, macro=macro)
        made["ndpi"] = {"files": [path], "main": path, "vendor_phi": record["phi"]}
    if "mirax" in formats:
        from .synth_vendor import write_mirax

        path = out / "mirax" / "slide.mrxs"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = write_mirax(path, rgb, mpp=mpp, phi=vendor, label_image=label,
                             slide_id=str(uuid.UUID(bytes=rng.bytes(16), version=4)))
        made["mirax"] = {"files": [Path(f) for f in record["files"]], "main": path, "vendor_phi": record["phi"]}
    for entry in made.values():
        entry.update(truth=truth, phi=sorted(set(phi) | set(entry.pop("vendor_phi", []))))
    return made


__all__ = ["synthesize_formats", "write_dicom_wsi", "write_generic_tiff", "write_ome_tiff", "ome_xml", "FORMATS",
           "WSI_SOP_CLASS"]
