"""Fail-closed check that identifying values read from an input do not survive in its outputs.

The audit reports which *attribute* leaked, never the value, so its own error cannot leak PHI.

How a value is matched (``find_leaks``, ``scan_stream``), in every encoding of ``_ENCODINGS`` (UTF-8, UTF-16,
Latin-1, ISO 2022 Japanese, EUC-KR, GB18030, Cyrillic, Shift-JIS) and, for person names, with the ``^``
separators written as spaces too:

* **on token boundaries**: an occurrence counts unless it is glued to a letter, digit or underscore (an ASCII
  "word" character, in the encoding's own code units) on a side where the value itself begins or ends with
  one.  ``TOSHIBA`` inside the kept Manufacturer ``TOSHIBA_MEC`` is not a leak (one token); ``TOSHIBA`` in
  ``seen at TOSHIBA, ward 3``, ``Dr^TOSHIBA``, ``"TOSHIBA"`` or ``(TOSHIBA)`` is.  Bytes outside ASCII count
  as boundaries (fail closed), so does the start or end of the data.  Ideographic scripts (CJK, kana, hangul)
  have no word boundaries: a value beginning or ending with such a character matches anywhere.
* **dates**: an 8-digit date (DA) also matches as the start of a longer digit run: ``20240102`` in the
  date-time ``20240102101112`` is the unshifted date.
* **short values**: a value is searched when it has at least ``MIN_LEN`` (6) characters, or at least 2 if it
  contains ideographic characters (names in those scripts are 2-4 characters of 2-3 bytes each); and then
  only in the encodings where it is at least ``MIN_LEN`` bytes long.  Shorter values (sex, a 4-digit ID, a
  3-letter surname) occur by chance in pixel data and in legitimate text too often to be evidence, and every
  attribute they come from is removed or replaced by the de-identification profile anyway (the audit is its
  second line).  A person name is searched whole (``DOE^JO`` and ``DOE JO``), by component group
  (alphabetic / ideographic / phonetic) and by component, each under this rule.
"""
from __future__ import annotations

import functools
import re
from typing import NamedTuple

import pydicom

from imaging_tasks.deid.rules import DUMMY_BY_VR, DUMMY_TEXT
from imaging_tasks.dicom_io import MAX_NESTING, read_header
from imaging_tasks.errors import BadInput
from imaging_tasks.formats import file_kind

# Attributes whose raw values must never appear in de-identified output.
DICOM_IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "AccessionNumber",
                     "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "OperatorsName",
                     "PerformingPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                     "FrameOfReferenceUID", "OtherPatientIDs", "DeviceSerialNumber", "StationName", "StudyDate",
                     "PatientMotherBirthName", "OtherPatientNames", "StudyID", "RequestingPhysician",
                     # whole-slide microscopy: the slide's barcode and specimen identifiers, label text
                     "ContainerIdentifier", "SpecimenIdentifier", "SpecimenUID", "LabelText", "BarcodeValue")
DICOM_IDENTIFYING_TAGS = frozenset(int(pydicom.datadict.tag_for_keyword(k)) for k in DICOM_IDENTIFYING)
MIN_LEN = 6  # characters of a value, and bytes of an encoded form, below which it is not evidence (see above)
MIN_IDEOGRAPHIC_LEN = 2


class PHILeak(RuntimeError):
    """Raised when an output still carries an input's identifying value: the task must fail, not publish."""


# Attributes an enabled PS3.15 option keeps on purpose: not leaks when that option is on.
RETAINED_BY_OPTION = {
    "retain_device_identity": {"DeviceSerialNumber", "StationName"},
    "retain_institution_identity": {"InstitutionName", "InstitutionAddress"},
    "retain_uids": {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "SpecimenUID"},
}


def retained_by(options) -> frozenset[str]:
    """Attributes kept by the options of a ``DeidOptions`` (None: the default profile keeps none)."""
    return frozenset(a for name, attrs in RETAINED_BY_OPTION.items() if getattr(options, name, False)
                     for a in attrs)


def _ideographic(ch: str) -> bool:
    return ord(ch) >= 0x2E80  # CJK radicals and ideographs, kana, hangul, and the rest of the BMP's East Asian


def long_enough(text: str) -> bool:
    """The short-value rule: is ``text`` evidence enough to search for (see the module docstring)?"""
    text = text.strip()
    if len(text) >= MIN_LEN:
        return True
    return len(text) >= MIN_IDEOGRAPHIC_LEN and any(_ideographic(c) for c in text)


def _name_parts(text: str) -> set[str]:
    """A person name whole, by component group (alphabetic=ideographic=phonetic) and by component."""
    parts = {text}
    for group in text.split("="):
        parts.add(group)
        parts.update(re.split(r"[\^ ]+", group))
    return {p.strip(" ^") for p in parts}


def dicom_identifying_values(ds: pydicom.Dataset, retained: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """attribute -> identifying strings (whole values and person-name parts), top level and nested;
    attributes in ``retained`` (kept by an option) are left out.

    Raises BadInput (and nothing else) for a data set whose values do not decode or that nests more than
    ``dicom_io.MAX_NESTING`` levels: the walk is iterative, every value is read here, so a garbled header is
    refused at the file boundary instead of aborting a batch.
    """
    try:
        found: dict[str, set[str]] = {}
        stack = [(ds, 0)]
        while stack:
            dataset, depth = stack.pop()
            for elem in dataset:
                if elem.VR == "SQ":
                    if elem.value and depth + 1 > MAX_NESTING:
                        raise BadInput("nesting_too_deep", f"sequences nested more than {MAX_NESTING} levels "
                                       "deep; the file is corrupt or crafted, re-export it")
                    stack.extend((item, depth + 1) for item in elem.value or ())
                elif elem.keyword in DICOM_IDENTIFYING and elem.keyword not in retained and \
                        elem.value not in (None, ""):
                    multi = isinstance(elem.value, (list, tuple, pydicom.multival.MultiValue))
                    for v in (elem.value if multi else [elem.value]):
                        text = str(v)
                        if text.strip() == DUMMY_BY_VR.get(elem.VR, DUMMY_TEXT):
                            continue  # the placeholder a de-identification wrote (an input de-identified at the
                            # edge): it identifies nobody, and de-identifying the input again writes it again
                        parts = _name_parts(text) if elem.VR == "PN" else {text.strip()}
                        found.setdefault(elem.keyword, set()).update(p for p in parts if long_enough(p))
        return {k: v for k, v in found.items() if v}
    except BadInput:
        raise
    except RecursionError:
        raise BadInput("nesting_too_deep", "sequences nested too deep to read; the file is corrupt or crafted, "
                       "re-export it") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on garbled values
        raise BadInput("unreadable_dicom", f"the header's values could not be decoded ({type(exc).__name__}); "
                       "the file is likely corrupt, re-send it") from None


class IdentifyingValues:
    """The identifying values (:func:`dicom_identifying_values`) of the input ``deid.deidentify_bytes`` is given,
    read from the parse that de-identifies it (``deidentify_bytes(..., source=reader.source)``, or the call made
    inside ``with deid.dicom.reading_source(reader.source)``): one parse per file instead of a second header
    read.  The values are still this module's reading of the input, never the
    de-identifier's; :attr:`values` raises unless the input was read (fail closed: an unread input never passes
    as one without identifying values)."""

    def __init__(self, retained: frozenset[str] = frozenset()):
        self.retained = retained
        self._values: dict[str, set[str]] | None = None
        self.source = (DICOM_IDENTIFYING_TAGS, self._read)

    def _read(self, ds: pydicom.Dataset) -> None:
        self._values = dicom_identifying_values(ds, self.retained)

    @property
    def values(self) -> dict[str, set[str]]:
        if self._values is None:
            raise RuntimeError("the input's identifying values were not read: pass source=reader.source to "
                               "deidentify_bytes")
        return self._values


def slide_identifying_values(description: str, technical_fields: set[str]) -> dict[str, set[str]]:
    """Values of Aperio description fields that are not purely technical (Filename, User, Date, ...)."""
    found: dict[str, set[str]] = {}
    for field in description.split("|")[1:]:
        name, _, value = field.partition("=")
        name, value = name.strip(), value.strip()
        if name and name not in technical_fields and len(value) >= MIN_LEN:
            found.setdefault(name, set()).add(value)
    return found


def find_leaks(values: dict[str, set[str]], blob: bytes) -> list[str]:
    """Names of attributes whose values occur in ``blob`` (raw bytes, in any encoding of ``_ENCODINGS``, on
    token boundaries: see the module docstring)."""
    return sorted({n.attr for n in _compile(values) if _occurs(n, blob, True, True)})


def assert_no_leaks(values: dict[str, set[str]], blob: bytes, what: str) -> None:
    leaked = find_leaks(values, blob)
    if leaked:
        raise PHILeak(f"{what}: identifying values of {', '.join(leaked)} survived de-identification; "
                      "nothing was published — fix the de-identification profile before re-running")


# --------------------------------------------------------------------------- the audit step
# Encodings an identifying value may have been written in (SpecificCharacterSet terms ISO_IR 100/192,
# ISO 2022 IR 87/149, GB18030, ISO_IR 144...): a value is searched for in each it can be encoded in.
_ENCODINGS = ("utf-8", "utf-16-le", "latin-1", "iso2022_jp", "euc_kr", "gb18030", "cp1251", "iso8859_5",
              "shift_jis")
_CHUNK = 8 << 20
_WORD = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_DATE = re.compile(r"(1[89]|2[01])\d\d(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])")


class _Needle(NamedTuple):
    attr: str
    raw: bytes
    unit: int  # bytes per code unit: 2 for UTF-16, else 1
    left: bool  # the value begins with a word character: an occurrence needs a boundary before it
    right: bool  # ... ends with one (not for dates, which also match as the start of a date-time)


def _wordy(ch: str) -> bool:
    return (ch.isalnum() or ch == "_") and not _ideographic(ch)


def _variants(text: str) -> set[tuple[bytes, int]]:
    out = set()
    for enc in _ENCODINGS:
        try:
            out.add((text.encode(enc), 2 if enc == "utf-16-le" else 1))
        except (UnicodeEncodeError, LookupError):
            pass
    if "^" in text:  # PN components may be written with spaces by free-text fields
        spaced = text.replace("^", " ").strip()
        out.add((spaced.encode("utf-8"), 1))
        out.add((spaced.encode("utf-16-le"), 2))
    return {(v, u) for v, u in out if len(v) >= MIN_LEN}


def _compile(values: dict[str, set[str]]) -> tuple[_Needle, ...]:
    """The byte patterns of ``values``; compiled once per set of values (an audit scans hundreds of files, a
    4-D flow study ~600, against the same values: encoding them for every file cost seconds)."""
    return _compile_frozen(tuple(sorted((attr, tuple(sorted(strings))) for attr, strings in values.items())))


@functools.lru_cache(maxsize=16)
def _compile_frozen(values: tuple) -> tuple[_Needle, ...]:
    needles = set()
    for attr, strings in values:
        for s in strings:
            s = s.strip()
            if not s:
                continue
            left, right = _wordy(s[0]), _wordy(s[-1]) and not _DATE.fullmatch(s)
            needles.update(_Needle(attr, v, u, left, right) for v, u in _variants(s))
    return tuple(sorted(needles))


def _word_at(blob: bytes, pos: int, unit: int) -> bool:
    if unit == 1:
        return blob[pos] in _WORD
    return blob[pos + 1] == 0 and blob[pos] in _WORD


def _occurs(n: _Needle, blob: bytes, at_start: bool, at_end: bool) -> bool | None:
    """Whether ``n`` occurs in ``blob`` on token boundaries.  ``at_start``/``at_end``: the blob begins/ends
    the data (else an occurrence whose neighbours lie outside it is left undecided: the caller's next window
    sees it whole)."""
    raw, unit, size = n.raw, n.unit, len(blob)
    i = blob.find(raw)
    while i >= 0:
        j = i + len(raw)
        ok = True
        if n.left:
            if i >= unit:
                ok = not _word_at(blob, i - unit, unit)
            elif not at_start:
                ok = False  # context outside this window: decided in the previous one
        if ok and n.right:
            if j + unit <= size:
                ok = not _word_at(blob, j, unit)
            elif not at_end:
                ok = False  # decided in the next window
        if ok:
            return True
        i = blob.find(raw, i + 1)
    return False


def scan_stream(values: dict[str, set[str]], fh, *, chunk: int = _CHUNK) -> list[str]:
    """Attributes whose values occur in a binary stream, read in chunks (slides are gigabytes)."""
    needles = _compile(values)
    if not needles:
        return []
    overlap = max(len(n.raw) for n in needles) + 4  # a match and a code unit of context on each side
    leaked, tail, first = set(), b"", True
    block = fh.read(chunk)
    while True:
        following = fh.read(chunk) if block else b""
        window = tail + block
        last = not following
        leaked.update(n.attr for n in needles if n.attr not in leaked and _occurs(n, window, first, last))
        if last:
            return sorted(leaked)
        tail = window[-overlap:]
        first = len(window) <= overlap and first
        block = following


def values_of_input(uri: str, fmt: str | None = None) -> dict[str, set[str]]:
    """Identifying values held by one raw input (DICOM header, slide text by slide format, NIfTI text fields,
    JSON sidecar values).

    ``fmt``: the slide format the index recorded for the file (``slide_files.SLIDE_FORMATS``), None
    to tell by the name (a slide suffix is sniffed, anything else read as DICOM, NIfTI or sidecar).  A MIRAX
    slide's values come from its ``.mrxs`` row (which reads the folder beside it); its data files yield none
    of their own.  Reads headers only where the format allows; an input that cannot be parsed yields nothing
    (it was quarantined, and quarantine is the PHI zone).
    """
    import gzip

    from imaging_tasks import storage

    kind = file_kind(uri)
    path = storage.as_path(uri)
    try:
        if fmt == "mirax":
            return mirax_values(uri) if str(uri).lower().endswith(".mrxs") else {}
        if fmt == "dicom":
            with path.open("rb") as fh:
                return dicom_identifying_values(read_header(fh))
        if fmt is not None or kind == "slide":
            return slide_file_values(path, fmt)
        if kind == "nifti":
            data = path.read_bytes()
            return nifti_identifying_values(gzip.decompress(data) if str(uri).lower().endswith(".gz") else data)
        if str(uri).lower().endswith(".json"):  # a NIfTI upload's sidecar (DICOM landings refuse .json at the index)
            return sidecar_identifying_values(path.read_bytes())
        with path.open("rb") as fh:
            return dicom_identifying_values(read_header(fh))
    except Exception:  # noqa: BLE001 - BadInput, OSError, or what tifffile/nibabel raise on garbled input
        return {}


# --------------------------------------------------------------------------- slide formats
# TIFF text tags naming the device make, model and software (not a person, a place or a date): not searched.
TIFF_TECHNICAL_TEXT_TAGS = frozenset({271, 272, 305})
_ASCII = 2
# OME-XML attributes that describe pixels and structure (sizes, types, references), not the patient or operator.
OME_TECHNICAL_ATTRIBUTES = frozenset({
    "ID", "DimensionOrder", "Type", "SizeX", "SizeY", "SizeZ", "SizeC", "SizeT", "PhysicalSizeX", "PhysicalSizeY",
    "PhysicalSizeZ", "PhysicalSizeXUnit", "PhysicalSizeYUnit", "PhysicalSizeZUnit", "Interleaved", "BigEndian",
    "SignificantBits", "SamplesPerPixel", "IFD", "PlaneCount", "FirstC", "FirstZ", "FirstT", "TheC", "TheZ", "TheT",
    "Color", "TimeIncrement", "TimeIncrementUnit", "Namespace",
})


def slide_file_values(location, fmt: str | None = None) -> dict[str, set[str]]:
    """Identifying values of one slide file, by format (sniffed when ``fmt`` is None): every TIFF text tag of every
    page but make/model/software (:func:`tiff_text_values`: DocumentName, Artist, HostComputer, DateTime...) plus,
    by format, the Aperio description fields that are not technical, the generic ImageDescription whole, or the
    OME-XML's text and non-structural attributes (:func:`ome_identifying_values`); NDPI through ``deid.ndpi``'s
    reader (Reference, DateTime, serial, property-map values...); a DICOM-WSI instance's header; a MIRAX slide
    (its ``.mrxs``) through :func:`mirax_values`.  Raises when the file cannot be read: the de-identifier calls
    it on an input it is about to copy, where nothing found must not mean nothing to find."""
    from imaging_tasks.deid.slide import TECHNICAL_FIELDS  # here: tifffile only if needed
    from imaging_tasks.slide_files import sniff

    found, description = sniff(location)
    fmt = fmt or found
    if fmt == "ndpi":  # deid.ndpi's own reader: tifffile misreads NDPI's 8-byte IFD pointers
        from imaging_tasks.deid.ndpi import ndpi_identifying_fields
        from imaging_tasks.slide_files import local_file

        with local_file(location) as path:
            return {f"ndpi:{k}": v for k, v in ndpi_identifying_fields(path).items()}
    if fmt == "dicom":
        from imaging_tasks import storage

        with storage.as_path(location).open("rb") as fh:
            return dicom_identifying_values(read_header(fh))
    if fmt == "mirax":
        return mirax_values(location)
    values = tiff_text_values(location)
    if fmt == "aperio":
        return merge(values, slide_identifying_values(description, set(TECHNICAL_FIELDS)))
    if fmt == "ome-tiff":
        return merge(values, ome_identifying_values(description))
    text = description.strip()
    return merge(values, {"tiff:ImageDescription": {text}} if long_enough(text) else {})


def tiff_text_values(location) -> dict[str, set[str]]:
    """Values of the TIFF text (ASCII) tags of every page and SubIFD but ImageDescription (read by format) and
    make/model/software: whole, each line, and each ``key=value`` line's value (NDPI's property map).
    Attribute: ``tiff:<tag name>``."""
    import tifffile

    from imaging_tasks import storage

    found: dict[str, set[str]] = {}
    with storage.as_path(location).open("rb") as fh, tifffile.TiffFile(fh) as tif:
        pages = list(tif.pages)
        for offset in pages[0].subifds or ():
            tif.filehandle.seek(offset)
            pages.append(tifffile.TiffPage(tif, index=(0, 0)))
        for page in pages:
            for tag in page.tags.values():
                if int(tag.dtype) != _ASCII or tag.code == 270 or tag.code in TIFF_TECHNICAL_TEXT_TAGS:
                    continue
                text = tag.value if isinstance(tag.value, str) else str(tag.value)
                parts = {text.strip()}
                for line in re.split(r"[\r\n\0]+", text):
                    parts.add(line.strip())
                    parts.add(line.partition("=")[2].strip())
                found.setdefault(f"tiff:{tag.name}", set()).update(p for p in parts if long_enough(p))
    return {k: v for k, v in found.items() if v}


def ome_identifying_values(xml: str) -> dict[str, set[str]]:
    """Every text value and every attribute of an OME-XML document but the structural ones
    (:data:`OME_TECHNICAL_ATTRIBUTES`, references, the schema location): Image Name and Description,
    AcquisitionDate, Experimenter names, e-mail and user name, institution, annotation values...
    Attribute: ``ome:<element>`` or ``ome:<element>@<attribute>``.  Nothing for text that is not XML."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except (ET.ParseError, ValueError):
        return {}
    found: dict[str, set[str]] = {}
    for el in root.iter():
        name = el.tag.rsplit("}", 1)[-1]
        if el.text and long_enough(el.text):
            found.setdefault(f"ome:{name}", set()).add(el.text.strip())
        for attr, value in el.attrib.items():
            attr = attr.rsplit("}", 1)[-1]
            if attr in OME_TECHNICAL_ATTRIBUTES or attr == "schemaLocation" or name.endswith("Ref"):
                continue
            if long_enough(value):
                found.setdefault(f"ome:{name}@{attr}", set()).add(value.strip())
    return found


def mirax_values(mrxs_uri) -> dict[str, set[str]]:
    """A MIRAX slide's identifying values (``deid.mirax.mirax_identifying_fields``: Slidedat.ini's values outside
    its technical allow-list, SLIDE_ID...), read from the ``.mrxs`` and the folder beside it; a bucket slide's
    folder is copied to a temporary folder first.  Attribute: ``mirax:<GROUP.KEY>``."""
    import tempfile
    from pathlib import Path

    from imaging_tasks import storage
    from imaging_tasks.deid.mirax import mirax_identifying_fields

    path = storage.as_path(mrxs_uri)
    if storage.is_local(path):
        fields = mirax_identifying_fields(Path(path.path))
    else:
        with tempfile.TemporaryDirectory(prefix="mirax-audit-") as tmp:
            local = storage.download(path, Path(tmp) / path.name)
            folder = path.parent / path.name[: -len(".mrxs")]
            for obj in storage.list_objects(folder):
                storage.download(obj.uri, Path(tmp) / local.stem / obj.relpath)
            fields = mirax_identifying_fields(local)
    found = {f"mirax:{k}": {str(v).strip() for v in vs if long_enough(str(v))} for k, vs in fields.items()}
    return {k: v for k, v in found.items() if v}


def nifti_identifying_values(data: bytes) -> dict[str, set[str]]:
    """Text fields of a NIfTI-1/2 header and the printable runs of its extensions."""
    import io

    import nibabel as nib

    found: dict[str, set[str]] = {}
    try:
        klass = nib.Nifti2Header if int.from_bytes(data[:4], "little") == 540 or \
            int.from_bytes(data[:4], "big") == 540 else nib.Nifti1Header
        header = klass.from_fileobj(io.BytesIO(data))
    except Exception:  # noqa: BLE001
        return found
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        if field in header:
            text = bytes(header[field].tobytes()).split(b"\0")[0].decode("latin-1").strip()
            if len(text) >= MIN_LEN:
                found.setdefault(field, set()).add(text)
    for ext in header.extensions:
        runs = re.findall(rb"[\x20-\x7e]{%d,}" % MIN_LEN, bytes(ext.content))  # raw bytes, whatever the code
        found.setdefault("extension", set()).update(r.decode("ascii").strip() for r in runs[:200])
    return {k: v for k, v in found.items() if v}


# Sidecar keys whose values identify (DICOM_IDENTIFYING's attributes as converters name them, and their kin):
# matched anywhere in a top-level key, case-insensitive.  Technical words (``iterations``, ``dcm2niix``) are not
# searched: they may legitimately appear in derived outputs.
SIDECAR_IDENTIFYING_KEY = re.compile(
    r"name|id$|uid|date|time|birth|address|institution|physician|operator|performing|referring|requesting|station|"
    r"serial|description|comment|accession|patient|protocol|location|department|contact|phone|mail|subject|"
    r"session|participant|device", re.IGNORECASE)


def sidecar_identifying_values(data: bytes) -> dict[str, set[str]]:
    """Values of a JSON sidecar's identifying keys (:data:`SIDECAR_IDENTIFYING_KEY`) that the sidecar
    de-identifier keeps under no option (``deid.sidecar.ALL_KEPT``), at any depth below them, plus any string
    anywhere that holds a date: strings, and integers of 6+ digits (IDs, serial numbers).  A value that is also
    the value of a kept key of the same file is left out (it is in the output on purpose).  Attribute:
    ``sidecar:<key>``."""
    import json

    from imaging_tasks.deid.sidecar import ALL_KEPT

    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        doc = {"": doc}
    found: dict[str, set[str]] = {}
    kept: set[str] = set()
    for top, value in doc.items():
        flat = value if isinstance(value, list) else [value]
        if top in ALL_KEPT and all(not isinstance(v, (dict, list)) for v in flat):
            kept.update(str(v).strip() for v in flat)
            continue
        identifying = bool(SIDECAR_IDENTIFYING_KEY.search(str(top)))
        person = re.search(r"(patient|physician|operator|referring|requesting)\w*name", str(top), re.IGNORECASE)
        stack = [value]
        while stack:  # what identifies under a key not kept, at any depth
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, (str, int)) and not isinstance(item, bool):
                text = str(item).strip()
                if not (identifying or (isinstance(item, str) and _DATE.search(text.replace("-", "")))):
                    continue
                if isinstance(item, str) or len(text.lstrip("-")) >= MIN_LEN:
                    parts = _name_parts(text) if person and isinstance(item, str) else {text}  # as a DICOM PN
                    found.setdefault(f"sidecar:{top}", set()).update(p for p in parts if long_enough(p))
    found = {k: v - kept for k, v in found.items()}
    return {k: v for k, v in found.items() if v}


def upload_identifying_values(upload: dict) -> dict[str, set[str]]:
    """The raw patient and session folder names of a NIfTI upload (the index's ``upload`` row): they name
    the patient as well as any header does."""
    found = {f"upload_{part}_folder": {str(upload.get(part) or "").strip()} for part in ("patient", "session")}
    return {k: {t for t in v if long_enough(t)} for k, v in found.items() if any(long_enough(t) for t in v)}


def audit(values: dict[str, set[str]], *, files=(), payloads=()) -> dict:
    """Prove none of ``values`` survives in ``files`` (URIs; raw bytes, gzip content too) or ``payloads``
    (anything JSON-serialisable: XComs, warehouse rows).  Raises PHILeak naming attributes, never values.
    """
    import gzip
    import json

    from imaging_tasks import storage

    n_bytes, n_files = 0, 0
    for uri in files:
        path = storage.as_path(uri)
        opener = gzip.open if str(uri).lower().endswith(".gz") else None
        with path.open("rb") as raw:
            fh = opener(raw) if opener else raw
            leaked = scan_stream(values, fh)
            n_bytes += raw.tell() if hasattr(raw, "tell") else 0
        n_files += 1
        if leaked:
            raise PHILeak(f"output file {path.name}: identifying values of {', '.join(leaked)} survived "
                          "de-identification; fail closed - nothing downstream runs on this study. Fix the "
                          "de-identification profile, delete the study's anonymized/ folder and re-run")
    for label, payload in payloads:
        blob = json.dumps(payload, default=str, ensure_ascii=False, sort_keys=True).encode("utf-8")
        assert_no_leaks(values, blob, label)
    return {"files": n_files, "bytes": n_bytes, "payloads": len(payloads),
            "values": sum(len(v) for v in values.values())}


def merge(*value_maps: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in value_maps:
        for k, v in m.items():
            out.setdefault(k, set()).update(v)
    return out
