"""Byte-level fast path of the DICOM de-identifier: the decisions of ``rules.py``, as the reference walker
(``reference.py``) takes them, without building pydicom objects for the whole file.

The raw file (explicit VR little/big endian, implicit VR little endian; the meta group always explicit little
endian) is walked element header by element header (``struct.unpack_from``): tags, VRs, 16/32-bit
lengths, sequences and items of defined or undefined length, encapsulated Pixel Data fragments.  Every
element's action comes from the shared rules (``rules.plan``, ``rules.code_for``, ``rules.resolve``,
``rules.shift_date``..., and the reference's own ``Walker.apply`` for the rare actions not written out
here); kept elements are copied as their original bytes, removed ones are skipped, and only the elements
whose value changes are decoded and re-encoded.  Sequences that are kept are walked and re-emitted with
undefined lengths.  The top-level additions (pseudonymous PatientName/PatientID, and what
``rules.mark_deidentified`` sets: PatientIdentityRemoved, DeidentificationMethod (+ Code Sequence),
LongitudinalTemporalInformationModified) are merged in tag order, and the file meta group is rebuilt as the
reference rebuilds it.

Equivalence with the reference path: pydicom parses both outputs to equal data sets, element by element,
and ``info`` is equal (``tests/test_deid_stream.py`` checks it over pydicom's test files and the synthetic
files of the other de-identification tests).  The reference decodes every value of the input, so the walk
here also checks what would make that decoding fail (numeric lengths, DS/IS strings, VRs, structure).

Whatever is not handled here raises :class:`Unsupported`, and ``deidentify_bytes`` runs the reference path
instead (so does any unforeseen exception here, and more than ``dicom_io.MAX_NESTING`` levels of sequences,
native pixels under a compressed transfer syntax, a character set stored under another VR, a last group
shorter than its group length: the reference refuses those with its reason): deflated, implicit big endian
or unknown transfer syntaxes, no file meta, the text-scrubbing options
(``clean_descriptors``, ``retain_patient_characteristics``), encapsulated Pixel Data that could hold overlay
bits, explicit-VR UN elements that pydicom would re-read as sequences, undefined lengths elsewhere,
out-of-order or duplicate tags, items carrying their own Specific Character Set, values that may not survive
a decode/encode round trip in the file's character set, values pydicom might fail to decode (DS/IS strings
outside the plain number forms), and inputs the reference refuses for structural reasons (truncation,
garbage: the reference gives its reason).  Refusals that depend only on values of a file
that parsed completely (missing required attributes, missing pixels, slide labels, burned-in annotation,
short Pixel Data) are raised here by the same functions as in the reference: every check of
``rules.REFUSAL_CHECKS`` and ``pixels.clean_pixel_data``, called with a small pydicom data set of the few
top-level values they read (``rules.CHECK_TAGS``) and placeholders telling which of ``rules.PRESENCE_TAGS``
are present.

``FALLBACKS`` counts the fallbacks of this process by cause; ``HANDLED["ok"]`` the files done here.
"""
from __future__ import annotations

import functools
import re
import warnings
from collections import Counter
from struct import Struct, pack, unpack_from

from pydicom.datadict import get_entry, keyword_for_tag, private_dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from imaging_tasks.dicom_io import MAX_NESTING
from imaging_tasks.errors import BadInput

from . import rules
from .pixels import clean_pixel_data
from .pseudonym import pseudo_id, uid_for
from .reference import Walker


class Unsupported(Exception):
    """Input (or option) the byte-level path does not handle: the caller falls back to the reference path."""


# Why the fast path declined, by cause (per process): for tests and the benchmark's coverage figures.
FALLBACKS: Counter = Counter()
HANDLED: Counter = Counter()
LAST_FALLBACK = ""

_VR16 = frozenset("AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_VR32 = frozenset("OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VR_BYTES = {vr.encode(): vr for vr in _VR16 | _VR32}
_AMBIGUOUS = frozenset({"US or SS", "OB or OW", "US or OW", "US or SS or OW"})
_NUM_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8, "UV": 8, "AT": 4}
_ZERO = {"US": b"\0\0", "SS": b"\0\0", "UL": b"\0" * 4, "SL": b"\0" * 4, "SV": b"\0" * 8, "UV": b"\0" * 8,
         "FL": pack("<f", 0.0), "FD": pack("<d", 0.0), "AT": b"\0" * 4}
# Text VRs decoded with the data set's character set (PN is written back from its original bytes by pydicom).
_CHARSET_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})
# Text VRs pydicom writes with the default encoding (write_string / write_number_string).
_PLAIN_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UR"})
_DS_RE = re.compile(rb"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*(?:\\\s*[+-]?(?:\d+\.?\d*|\.\d+)"
                    rb"(?:[eE][+-]?\d+)?\s*)*[ \x00]*")
_IS_RE = re.compile(rb"\s*[+-]?\d+\s*(?:\\\s*[+-]?\d+\s*)*[ \x00]*")
_KNOWN_VRS = _VR16 | _VR32 | _AMBIGUOUS
# What the parser checks in a value: 1 sequence, 2 DS, 3 IS, 4 charset text, 100 + n: n-byte numbers.
_VALUE_CHECK = {"SQ": 1, "DS": 2, "IS": 3, **{vr: 4 for vr in ("SH", "LO", "ST", "LT", "UT", "UC")},
                **{vr: 100 + n for vr, n in _NUM_SIZE.items()}}
_LATIN1_SETS = ("iso8859", "latin_1", "iso-8859-1")

ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
SPECIFIC_CHARSET = 0x00080005
_UNDEF = 0xFFFFFFFF
_ENCAP = "encapsulated"

# Top-level attributes the reference adds (or overwrites) after its walk.
_ADDED = (0x00100010, 0x00100020, 0x00120062, 0x00120063, 0x00120064, 0x00280303)
# Source values read for the patient key and the refusal checks (all K in every option set, so the values after
# the walk are the source values).
_SOURCE_TAGS = tuple(sorted(set(rules.CHECK_TAGS) | set(rules.PATIENT_KEY_TAGS)))
# Top-level attributes whose presence (not value) the refusal checks read: pixel data, the pixel module,
# the content each SOP class requires (rules.REQUIRED_CONTENT).
_PRESENCE_TAGS = rules.PRESENCE_TAGS
_PRESENCE_GROUPS = rules.PRESENCE_GROUPS
# Read for the Pixel Data check and overlay clean-up (all K as well).
_PIXEL_TAGS = (0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102,
               0x00280103, 0x00280006)


def _tag_of(keyword: str) -> int:
    t = tag_for_keyword(keyword)
    assert t is not None, keyword
    return int(t)


# Final values read for ``info``.
_INFO_TAGS = frozenset([_tag_of(kw) for kw in rules.HEADER_FIELDS]
                       + [0x0020000D, 0x0020000E, 0x00080018, 0x00080060, 0x00080016])


@functools.lru_cache(maxsize=8192)
def _dict_vr(tag: int) -> str | None:
    try:
        return get_entry(tag)[0]
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def _private_vr(tag: int, creator: str) -> str:
    try:
        return private_dictionary_VR(tag, creator)
    except KeyError:
        return "UN"


def _hdr(tag: int, vr: str | None, length: int, implicit: bool, little: bool = True) -> bytes:
    e = "<" if little else ">"
    if implicit:
        return pack(e + "HHL", tag >> 16, tag & 0xFFFF, length)
    if vr in _VR32:
        return pack(e + "HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    if vr not in _VR16 or length > 0xFFFF:
        raise Unsupported("vr")
    return pack(e + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _split_multi(value: bytes) -> list[str]:
    """Values of a UI/DA/DT/string element as pydicom's default-encoding converters give them."""
    items = value.decode("latin-1").rstrip("\0 ").rstrip(" \x00").split("\\")
    return [] if items == [""] else items


def _string_value(vals: list[str], pad: str) -> bytes:
    s = "\\".join(vals)
    if len(s) & 1:
        s += pad
    return s.encode("latin-1")


# ----------------------------------------------------------------------------------------- parser

class _Parser:
    """Walks a little-endian data set; each element is a tuple
    ``(tag, vr, stored_vr, header_start, value_start, length, end, items)`` where ``vr`` is the VR pydicom
    gives the element, ``items`` the list of item element lists of a sequence (or _ENCAP)."""

    def __init__(self, buf: bytes, implicit: bool, encapsulated: bool, encodings, check_text: bool,
                 little: bool = True):
        self.buf = buf
        self.little = little
        self.e = e = "<" if little else ">"
        self.u_hhl, self.u_hh2sh, self.u_l = (Struct(e + f).unpack_from for f in ("HHL", "HH2sH", "L"))
        self.n = len(buf)
        self.implicit = implicit
        self.encapsulated = encapsulated
        self.encodings = encodings
        self.check_text = check_text
        self.value_checks = _VALUE_CHECK  # the output check only needs the structure: {"SQ": 1}
        # Why the fast path declines a file whose structure it still walks to the end (an item's own character
        # set): raised by the caller once the refusal checks ran, so a file the reference would refuse for a
        # top-level reason is refused here, not parsed a second time by the reference first.
        self.declined: str | None = None

    def dataset(self, pos: int, end: int, depth: int, undefined: bool) -> tuple[list, int]:
        buf, implicit, check_text, value_checks = self.buf, self.implicit, self.check_text, self.value_checks
        _unpack_hhl, _unpack_hh2sh, _unpack_l = self.u_hhl, self.u_hh2sh, self.u_l
        elems: list = []
        append = elems.append
        creators: dict[int, str | None] = {}
        last = -1
        first = True
        while pos < end:
            if pos + 8 > end:
                raise Unsupported("truncated")
            hstart = pos
            if implicit:
                group, el, length = _unpack_hhl(buf, pos)
                tag = group << 16 | el
                if first and depth == 0 and 0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B:
                    raise Unsupported("vr_mismatch")  # pydicom would read this data set as explicit VR
                stored = None
                vstart = pos + 8
            else:
                group, el, vrb, length = _unpack_hh2sh(buf, pos)
                tag = group << 16 | el
                stored = _VR_BYTES.get(vrb)
                if stored is None:
                    if tag == ITEM_END:
                        length = _unpack_l(buf, pos + 4)[0]
                    else:
                        raise Unsupported("vr_mismatch")
                    vstart = pos + 8
                elif stored in _VR32:
                    if pos + 12 > end:
                        raise Unsupported("truncated")
                    length = _unpack_l(buf, pos + 8)[0]
                    vstart = pos + 12
                else:
                    vstart = pos + 8
            if tag == ITEM_END:
                if not undefined or (length if implicit else _unpack_l(buf, pos + 4)[0]):
                    raise Unsupported("structure")
                return elems, pos + 8
            if group == 0xFFFE or tag <= last:
                raise Unsupported("structure")
            last = tag
            first = False
            # the VR pydicom gives the element (hooks.raw_element_vr)
            if stored is None or stored == "UN":
                if group & 1:
                    if 0x10 <= el <= 0xFF:
                        vr = "LO"
                    elif el & 0xFF00 and (group << 16 | el >> 8) in creators:
                        creator = creators[group << 16 | el >> 8]
                        if creator is None:
                            raise Unsupported("private_creator")
                        vr = _private_vr(tag, creator)
                    else:
                        vr = "UN"
                elif stored is None:
                    vr = _dict_vr(tag) or ("UL" if el == 0 else "UN")
                elif length < 0xFFFF:
                    vr = _dict_vr(tag) or "UN"
                    if vr == "SQ":
                        raise Unsupported("un_sequence")
                else:
                    vr = "UN"
            else:
                vr = stored
            if length == _UNDEF:
                if vr == "SQ":
                    items, pos = self.items(vstart, None, depth)
                elif tag == PIXEL_DATA and depth == 0 and self.encapsulated and not implicit:
                    pos = self.fragments(vstart)
                    items = _ENCAP
                else:
                    raise Unsupported("undefined_length")
                append((tag, vr, stored, hstart, vstart, length, pos, items))
                continue
            vend = vstart + length
            if vend > end:
                raise Unsupported("truncated")
            items = None
            kind = value_checks.get(vr)
            if kind is not None:
                if kind == 1:
                    items, _ = self.items(vstart, vend, depth)
                elif kind == 2:
                    if length and _DS_RE.fullmatch(buf, vstart, vend) is None:
                        raise Unsupported("number_string")
                elif kind == 3:
                    if length and _IS_RE.fullmatch(buf, vstart, vend) is None:
                        raise Unsupported("number_string")
                elif kind == 4:
                    if check_text:
                        raw = buf[vstart:vend]
                        if not raw.isascii() or b"\x1b" in raw:
                            self.text_round_trips(tag, vr, raw)
                elif length % (kind - 100):
                    raise Unsupported("value_length")
            elif vr not in _KNOWN_VRS:
                raise Unsupported("vr")
            if group & 1:
                if 0x10 <= el <= 0xFF:
                    creators[tag] = self.creator(buf[vstart:vend])
            elif tag == SPECIFIC_CHARSET and depth > 0:
                self.declined = self.declined or "nested_charset"
            append((tag, vr, stored, hstart, vstart, length, vend, items))
            pos = vend
        if undefined:
            raise Unsupported("truncated")
        if pos != end:
            raise Unsupported("structure")
        return elems, pos

    def items(self, pos: int, end: int | None, depth: int) -> tuple[list, int]:
        buf, n = self.buf, self.n
        out = []
        while True:
            if end is not None and pos >= end:
                if pos != end:
                    raise Unsupported("structure")
                return out, pos
            if pos + 8 > n:
                raise Unsupported("truncated")
            group, el, length = self.u_hhl(buf, pos)
            tag = group << 16 | el
            if tag == SEQ_END and end is None:
                if length:
                    raise Unsupported("structure")
                return out, pos + 8
            if tag != ITEM:
                raise Unsupported("structure")
            if depth >= MAX_NESTING:
                raise Unsupported("nesting")  # the reference refuses it (nesting_too_deep) or says why not
            if length == _UNDEF:
                elems, pos = self.dataset(pos + 8, n, depth + 1, True)
            else:
                iend = pos + 8 + length
                if iend > (n if end is None else end):
                    raise Unsupported("truncated")
                elems, pos = self.dataset(pos + 8, iend, depth + 1, False)
            out.append(elems)

    def fragments(self, pos: int) -> int:
        buf, n = self.buf, self.n
        while True:
            if pos + 8 > n:
                raise Unsupported("truncated")
            group, el, length = self.u_hhl(buf, pos)
            tag = group << 16 | el
            pos += 8
            if tag == SEQ_END:
                if length:
                    raise Unsupported("structure")
                return pos
            if tag != ITEM or length == _UNDEF or pos + length > n:
                raise Unsupported("structure")
            pos += length

    def creator(self, raw: bytes) -> str:
        """A private creator's value as pydicom's private-dictionary lookup sees it."""
        if b"\\" in raw:
            return None  # a multi-valued creator: pydicom's private dictionary lookup would fail
        if not raw.isascii():
            return "\0invalid"  # never in the private dictionary (decoded, it is not ASCII either)
        return raw.decode("ascii").rstrip("\0 ")

    def text_round_trips(self, tag: int, vr: str, raw: bytes) -> None:
        """Non-ASCII text in a character set where decode+encode might not give the same value back: it is
        copied verbatim here but re-encoded by the reference, so decline unless it decodes cleanly."""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                convert_raw_data_element(RawDataElement(Tag(tag), vr, len(raw), raw, 0, self.implicit, self.little),
                                         encoding=self.encodings)
            except Exception:  # noqa: BLE001 - a warning or an error: the reference may change the bytes
                raise Unsupported("charset") from None


# ----------------------------------------------------------------------------------------- rewriter

class _Rewriter:
    def __init__(self, buf: bytes, key: bytes, options, implicit: bool, encodings, walker, little: bool = True):
        self.buf = buf
        self.mv = memoryview(buf)
        self.key = key
        self.options = options
        self.columns = options.columns
        self.rmd = options.retain_modified_dates
        self.strict = options.strict
        self.safe_private = options.retain_safe_private
        self.implicit = implicit
        self.little = little
        self.encodings = encodings
        self.enc_key = tuple(encodings) if isinstance(encodings, list) else (encodings,)
        self.walker = walker
        self.final: dict[int, bytes] = {}  # top-level tag -> final element bytes (for info)
        self.pixel_index = -1

    # --- encoding helpers
    def element(self, tag: int, vr: str, value) -> bytes:
        """Bytes of a new element, written by pydicom as the reference writes it."""
        fp = DicomBytesIO()
        fp.is_little_endian = self.little
        fp.is_implicit_VR = self.implicit
        write_data_element(fp, DataElement(tag, vr, value), self.encodings)
        return fp.getvalue()

    def text(self, tag: int, vr: str, value: str) -> bytes:
        if vr in _PLAIN_TEXT_VRS or vr == "UI":
            v = _string_value([value] if value else [], "\0" if vr == "UI" else " ")
            return _hdr(tag, vr, len(v), self.implicit, self.little) + v
        return _encoded_text(tag, vr, value, self.enc_key, self.implicit, self.little)

    def convert(self, e) -> DataElement:
        tag, vr, stored, _h, vstart, length, vend, _items = e
        if vr in _AMBIGUOUS:
            raise Unsupported("ambiguous_vr")
        raw = RawDataElement(Tag(tag), stored, length, self.buf[vstart:vend], vstart, self.implicit, self.little)
        return convert_raw_data_element(raw, encoding=self.encodings)

    # --- walk
    def dataset(self, elems: list, depth: int, out: list, additions: list | None = None) -> None:
        mv = self.mv
        rs = re_ = -1  # pending verbatim run [rs, re_)
        creators: list = []
        kept_blocks: set = set()
        creator_values: dict[int, str] = {}
        ai, na = 0, len(additions) if additions else 0
        final = self.final if depth == 0 else None
        plan, columns, rmd, strict = rules.plan, self.columns, self.rmd, self.strict
        for e in elems:
            tag = e[0]
            if ai < na:
                while ai < na and additions[ai][0] < tag:
                    if rs >= 0:
                        out.append(mv[rs:re_])
                        rs = re_ = -1
                    out.append(additions[ai][1])
                    if additions[ai][0] in _INFO_TAGS:
                        final[additions[ai][0]] = additions[ai][1]
                    ai += 1
                if ai < na and additions[ai][0] == tag:
                    continue  # overwritten by the reference after its walk
            code, row = plan(tag, e[1], columns, rmd, strict)
            if code == "X":
                continue
            if code == "K" and e[7] is None:
                res = True
            elif code == "private":
                group, el = tag >> 16, tag & 0xFFFF
                if not self.safe_private:
                    continue
                if 0x10 <= el <= 0xFF:
                    creator_values[tag] = self.creator_value(e)
                    if rs >= 0:
                        out.append(mv[rs:re_])
                        rs = re_ = -1
                    creators.append((len(out), e))
                    out.append(b"")
                    continue
                if el >= 0x1000 and self.safe(e, creator_values):
                    kept_blocks.add((group, el >> 8))
                    res = True
                else:
                    continue
            elif code == "patient_id":  # depth > 0 here (depth 0: an addition)
                v = str(self.convert(e).value or "").strip()
                res = self.text(tag, e[1], pseudo_id(self.key, v, "patient") if v else "")
            elif code == "patient_name":
                pid = next((x for x in elems if x[0] == rules.PATIENT_ID), None)
                v = str(self.convert(pid).value or "").strip() if pid is not None else ""
                res = self.text(tag, e[1], pseudo_id(self.key, v, "patient") if v else "")
            else:
                res = self.apply(e, code, row, depth)
            if res is None:
                continue
            if res is True:
                if e[5] & 1 and e[5] != _UNDEF:
                    res = self.padded(e)  # pydicom pads odd values when it writes them back
                elif tag == PIXEL_DATA and depth == 0:
                    if rs >= 0:
                        out.append(mv[rs:re_])
                        rs = re_ = -1
                    self.pixel_index = len(out)
                    out.append(mv[e[3]:e[6]])
                    continue
            if res is True:
                if re_ == e[3]:
                    re_ = e[6]
                else:
                    if rs >= 0:
                        out.append(mv[rs:re_])
                    rs, re_ = e[3], e[6]
                if final is not None and tag in _INFO_TAGS:
                    final[tag] = self.buf[e[3]:e[6]]
                continue
            if rs >= 0:
                out.append(mv[rs:re_])
                rs = re_ = -1
            if isinstance(res, list):
                out.extend(res)
            else:
                if tag == PIXEL_DATA and depth == 0:
                    self.pixel_index = len(out)
                out.append(res)
                if final is not None and tag in _INFO_TAGS:
                    final[tag] = res
        if rs >= 0:
            out.append(mv[rs:re_])
        while ai < na:
            out.append(additions[ai][1])
            if additions[ai][0] in _INFO_TAGS:
                final[additions[ai][0]] = additions[ai][1]
            ai += 1
        for i, ce in creators:
            if (ce[0] >> 16, ce[0] & 0xFF) in kept_blocks:
                out[i] = self.mv[ce[3]:ce[6]]

    def padded(self, e) -> bytes:
        """A kept element of odd length, padded as pydicom's writers pad it."""
        tag, vr = e[0], e[1]
        pad = b"\0" if vr == "UI" or vr in rules.BINARY_VRS or vr in _AMBIGUOUS else b" "
        if vr in _AMBIGUOUS or (vr not in _PLAIN_TEXT_VRS and vr not in _CHARSET_TEXT_VRS and vr != "PN"
                                and vr != "UI" and vr not in rules.BINARY_VRS):
            raise Unsupported("odd_length")
        stored = e[2] if e[2] is not None else vr
        return _hdr(tag, stored, e[5] + 1, self.implicit, self.little) + self.buf[e[4]:e[6]] + pad

    def creator_value(self, e) -> str:
        raw = self.buf[e[4]:e[6]]
        if not raw:
            return ""
        if b"\x1b" in raw:
            raise Unsupported("private_creator")  # ISO 2022 escapes: decoded, it might read as a known name
        if not raw.isascii() or b"\\" in raw:
            return "\0no match"  # the reference's str(value) of such a creator is not in SAFE_PRIVATE either
        return raw.decode("ascii").rstrip("\0 ")

    def safe(self, e, creator_values: dict[int, str]) -> bool:
        """reference.Walker._safe_private on the raw element."""
        tag, vr, stored = e[0], e[1], e[2]
        if vr not in rules.SAFE_PRIVATE_VRS:
            return False
        group, element = tag >> 16, tag & 0xFFFF
        creator = creator_values.get((group << 16) | (element >> 8))
        if not creator:
            return False
        if (creator.strip().upper(), group, element & 0xFF) not in rules.SAFE_PRIVATE:
            return False
        if stored is not None and stored != vr:
            raise Unsupported("private_vr")  # kept, and the reference would write it with another VR
        return True

    def sequence(self, e, depth: int) -> list:
        tag, items = e[0], e[7]
        implicit = self.implicit
        item_start, item_delim, seq_delim = _DELIMITERS[self.little]
        chunks = [_hdr(tag, "SQ", _UNDEF, implicit, self.little)]
        for item in items:
            chunks.append(item_start)
            self.dataset(item, depth + 1, chunks)
            chunks.append(item_delim)
        chunks.append(seq_delim)
        return chunks

    def apply(self, e, code: str, row, depth: int):
        """Outcome of reference.Walker.apply for one element: None (removed), True (kept as it is),
        bytes or a list of chunks (rewritten)."""
        tag, vr = e[0], e[1]
        if vr == "SQ":
            if code == "X":
                return None
            if code == "Z":
                return _hdr(tag, "SQ", 0, self.implicit, self.little)
            if code == "D" and (keyword_for_tag(tag) or "").endswith("CodeSequence"):
                return _dummy_code_sequence(tag, self.implicit, self.enc_key, self.little)
            return self.sequence(e, depth)
        if code == "X":
            return None
        if vr in _AMBIGUOUS and code not in ("K", "U*"):
            raise Unsupported("ambiguous_vr")
        if code == "Z":
            return _hdr(tag, vr, 0, self.implicit, self.little)
        if code == "D":
            if vr == "UI":
                vals = _split_multi(self.buf[e[4]:e[6]])
                if vals:
                    return self.uids(tag, vals)
                return self.text(tag, "UI", uid_for(self.key, f"dummy:{tag:08X}"))
            if vr in rules.BINARY_VRS:
                return _hdr(tag, vr, 8, self.implicit, self.little) + b"\0" * 8
            if vr in _ZERO:
                z = _ZERO[vr]
                return _hdr(tag, vr, len(z), self.implicit, self.little) + z
            return self.text(tag, vr, rules.DUMMY_BY_VR.get(vr, rules.DUMMY_TEXT))
        if code == "U":
            if vr == "UI":
                vals = _split_multi(self.buf[e[4]:e[6]])
                return self.uids(tag, vals) if vals else True
            if vr == "UN":
                text = self.buf[e[4]:e[6]].decode("ascii", "replace")
                mapped = [uid_for(self.key, u) if u else "" for u in (x.strip("\0 ") for x in text.split("\\"))]
                v = _string_value(mapped, "\0")
                return _hdr(tag, "UI", len(v), self.implicit, self.little) + v
            raise Unsupported("u_on_non_uid")
        if code == "C":
            sources = rules.clean_sources(row, self.columns)
            if vr in ("DA", "DT", "TM") and rules.DATES_COLUMN in sources:
                if vr == "TM":
                    return True
                shift = rules.shift_date if vr == "DA" else rules.shift_datetime
                days = self.walker.shift_days
                vals = [shift(v, days) for v in _split_multi(self.buf[e[4]:e[6]])] or [""]
                v = _string_value(vals, " ")
                return _hdr(tag, vr, len(v), self.implicit, self.little) + v
            if vr == "CS":
                return True
            if vr == "AE" or (vr in rules.FREE_TEXT_VRS and sources - {rules.DATES_COLUMN}):
                return self.generic(e, code, row, depth)
            basic = rules.resolve(tag, row.basic) if row is not None else "X"
            return self.apply(e, "X" if basic == "C" else basic, row, depth)
        return True  # K, U* (and nothing else reaches here)

    def uids(self, tag: int, vals: list[str]) -> bytes:
        key = self.key
        v = _string_value([uid_for(key, u) if u.strip() else u for u in vals], "\0")
        return _hdr(tag, "UI", len(v), self.implicit, self.little) + v

    def generic(self, e, code: str, row, depth: int):
        """The reference's own apply() on a one-element data set (rare actions: AE pseudonyms, scrubbing)."""
        elem = self.convert(e)
        tmp = Dataset()
        tmp.add(elem)
        self.walker.apply(tmp, elem, code, row, depth)
        if e[0] not in tmp:
            return None
        fp = DicomBytesIO()
        fp.is_little_endian = self.little
        fp.is_implicit_VR = self.implicit
        write_data_element(fp, tmp[e[0]], self.encodings)
        return fp.getvalue()


_DELIMITERS = {little: (pack(e + "HHL", 0xFFFE, 0xE000, _UNDEF), pack(e + "HHL", 0xFFFE, 0xE00D, 0),
                        pack(e + "HHL", 0xFFFE, 0xE0DD, 0)) for little, e in ((True, "<"), (False, ">"))}


def _writer(implicit: bool, little: bool = True) -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian = little
    fp.is_implicit_VR = implicit
    return fp


def _encodings_arg(enc_key: tuple):
    return list(enc_key) if len(enc_key) != 1 or enc_key[0] is None else enc_key[0]


@functools.lru_cache(maxsize=1024)
def _encoded_text(tag: int, vr: str, value: str, enc_key: tuple, implicit: bool, little: bool = True) -> bytes:
    fp = _writer(implicit, little)
    write_data_element(fp, DataElement(tag, vr, value), _encodings_arg(enc_key))
    return fp.getvalue()


@functools.lru_cache(maxsize=256)
def _dummy_code_sequence(tag: int, implicit: bool, enc_key: tuple, little: bool = True) -> bytes:
    fp = _writer(implicit, little)
    write_data_element(fp, DataElement(tag, "SQ", Sequence([rules.dummy_code_item()])), _encodings_arg(enc_key))
    return fp.getvalue()


@functools.lru_cache(maxsize=256)
def _constant_additions(options, demo: bool, implicit: bool, enc_key: tuple, little: bool = True) -> tuple:
    """PatientIdentityRemoved, DeidentificationMethod (+ Code Sequence), LongitudinalTemporalInformationModified
    as the reference sets them (``rules.mark_deidentified``), written out."""
    ds = Dataset()
    rules.mark_deidentified(ds, options, demo)
    out = []
    for elem in ds:
        fp = _writer(implicit, little)
        write_data_element(fp, elem, _encodings_arg(enc_key))
        out.append((int(elem.tag), fp.getvalue()))
    return tuple(out)


def _meta_bytes(sop_class: str, sop_instance: str, ts: str) -> bytes:
    def ui(el: int, s: str) -> bytes:
        b = s.encode("latin-1")
        if len(b) & 1:
            b += b"\0"
        return pack("<HH2sH", 2, el, b"UI", len(b)) + b

    version = rules.IMPLEMENTATION_VERSION.encode()
    if len(version) & 1:
        version += b" "
    body = (pack("<HH2sHL", 2, 1, b"OB", 0, 2) + b"\0\1" + ui(2, sop_class) + ui(3, sop_instance) + ui(0x10, ts)
            + ui(0x12, PYDICOM_IMPLEMENTATION_UID) + pack("<HH2sH", 2, 0x13, b"SH", len(version)) + version)
    return pack("<HH2sHL", 2, 0, b"UL", 4, len(body)) + body


def _value_of(elem_bytes: bytes, implicit: bool) -> tuple[str | None, bytes]:
    if implicit:
        return None, elem_bytes[8:]
    vr = elem_bytes[4:6].decode()
    return vr, elem_bytes[12:] if vr in _VR32 else elem_bytes[8:]


@functools.lru_cache(maxsize=16384)
def _converted(tag: int, vr: str | None, value: bytes, enc_key: tuple, implicit: bool,
               little: bool = True) -> DataElement:
    """A raw element converted as pydicom converts it.  Cached: within a series most of these values repeat.
    The elements are shared between the small data sets below, which only read them."""
    raw = RawDataElement(Tag(tag), vr, len(value), value, 0, implicit, little)
    return convert_raw_data_element(raw, encoding=_encodings_arg(enc_key))


@functools.lru_cache(maxsize=1024)
def _keyword(tag: int) -> str:
    return keyword_for_tag(tag)


class _Values(dict):
    """What ``header_summary`` and ``info`` read of a Dataset: ``get(keyword)`` -> value, ``file_meta``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _small_dataset(pairs, implicit: bool, enc_key: tuple, little: bool = True) -> Dataset:
    """A pydicom data set of a few raw elements ``(tag, stored_vr, value_bytes)``, converted as pydicom does."""
    ds = Dataset()
    store = getattr(ds, "_dict", None)
    for tag, vr, value in pairs:
        elem = _converted(tag, vr, value, enc_key, implicit, little)
        if elem.VR in _AMBIGUOUS:
            raise Unsupported("ambiguous_vr")
        if store is not None:
            store[elem.tag] = elem  # plain elements of a fresh data set: what add() would do, minus its checks
        else:  # pragma: no cover - another pydicom layout
            ds.add(elem)
    return ds


# ----------------------------------------------------------------------------------------- entry point

def _read_meta(buf: bytes) -> tuple[int, dict[int, bytes]]:
    """(offset of the data set, meta values) for a file with a 128-byte preamble and 'DICM'."""
    if len(buf) >= 144 and buf[128:132] == b"DICM":
        pos = 132
    elif buf[:4] == b"DICM":  # 'DICM' + meta, no preamble
        pos = 4
    elif buf[:2] == b"\x02\x00" and buf[4:6] in _VR_BYTES:  # the meta group alone, no preamble nor 'DICM'
        pos = 0
    else:
        raise Unsupported("no_preamble")
    n = len(buf)
    meta: dict[int, bytes] = {}
    while pos + 8 <= n:
        group, el = unpack_from("<HH", buf, pos)
        if group != 2:
            break
        vr = _VR_BYTES.get(buf[pos + 4:pos + 6])
        if vr is None:
            raise Unsupported("meta")
        if vr in _VR32:
            length, start = unpack_from("<L", buf, pos + 8)[0], pos + 12
        else:
            length, start = unpack_from("<H", buf, pos + 6)[0], pos + 8
        if length == _UNDEF or start + length > n:
            raise Unsupported("meta")
        meta[el] = buf[start:start + length]
        pos = start + length
    return pos, meta


def deidentify_stream(data: bytes, key: bytes, options, *, demo: bool = False) -> tuple[bytes, dict]:
    """``dicom.deidentify_bytes`` on the raw bytes; raises Unsupported where the reference path must run."""
    out, info, _view = deidentify_stream_source(data, key, options, demo=demo, source_tags=None)
    return out, info


def deidentify_stream_source(data: bytes, key: bytes, options, *, demo: bool = False,
                             source_tags: frozenset[int] | None) -> tuple[bytes, dict, Dataset | None]:
    """:func:`deidentify_stream`, plus (``source_tags`` given) the input as this parse read it: a pydicom data
    set of the elements of ``source_tags`` at every depth, inside the sequences that lead to them, converted as
    pydicom converts them (:func:`_source_view`).  No second parse of the input."""
    global LAST_FALLBACK
    try:
        out, info, view = _deidentify(data, key, options, demo, source_tags)
    except Unsupported as exc:
        LAST_FALLBACK = str(exc) or "unsupported"
        FALLBACKS[LAST_FALLBACK] += 1
        raise
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - anything unforeseen here: the reference decides (and refuses)
        LAST_FALLBACK = f"error:{type(exc).__name__}"
        FALLBACKS[LAST_FALLBACK] += 1
        raise Unsupported(LAST_FALLBACK) from None
    HANDLED["ok"] += 1
    return out, info, view


def _deidentify(data: bytes, key: bytes, options, demo: bool,
                source_tags: frozenset[int] | None = None) -> tuple[bytes, dict, Dataset | None]:
    if options.clean_descriptors or options.retain_patient_characteristics:
        raise Unsupported("option_scrub")
    if not isinstance(data, bytes):
        data = bytes(data)
    start, meta = _read_meta(data)
    ts_raw = meta.get(0x10)
    if not ts_raw:
        raise Unsupported("no_transfer_syntax")
    ts = UID(ts_raw.decode("latin-1").rstrip("\0 "))
    if not ts.is_transfer_syntax or ts.is_deflated:
        raise Unsupported("transfer_syntax")
    implicit = ts.is_implicit_VR
    encapsulated = ts.is_encapsulated
    little = ts.is_little_endian
    if not little and (implicit or encapsulated):
        raise Unsupported("transfer_syntax")

    # Top-level header scan for the character set first: it decides how text is read everywhere.
    n = len(data)
    probe = _Parser(data, implicit, encapsulated, None, False, little)
    charset_value = _peek_charset(data, start, implicit, little)
    cs_ds = Dataset()
    if charset_value is not None:
        cs_ds.add(convert_raw_data_element(RawDataElement(Tag(SPECIFIC_CHARSET), None if implicit else "CS",
                                                          len(charset_value), charset_value, 0, implicit, little)))
    encodings = cs_ds._character_set
    enc_list = encodings if isinstance(encodings, list) else [encodings]
    check_text = not all(e in _LATIN1_SETS for e in enc_list)
    probe.encodings, probe.check_text = encodings, check_text
    elems, _ = probe.dataset(start, n, 0, False)
    top = {e[0]: e for e in elems}
    if SPECIFIC_CHARSET in top and top[SPECIFIC_CHARSET][2] not in (None, "CS", "UN"):
        raise Unsupported("charset_vr")  # pydicom reads the character set by its stored VR (and may fail)
    if encapsulated and PIXEL_DATA in top and top[PIXEL_DATA][7] != _ENCAP:
        raise Unsupported("pixel_encapsulation")  # native pixels under a compressed transfer syntax: refused there
    gl = top.get(elems[-1][0] & 0xFFFF0000) if elems and elems[-1][0] >> 16 != 0x7FE0 else None
    if gl is not None and gl[5] == 4 and \
            gl[6] + unpack_from("<L" if little else ">L", data, gl[4])[0] > n:
        raise Unsupported("group_length")  # the last group is shorter than declared: the reference refuses it

    def src(tags):
        return [(t, top[t][2], data[top[t][4]:top[t][6]]) for t in tags if t in top and top[t][7] is None]

    for t in _ADDED:  # existing elements the reference overwrites keep their VR there
        e = top.get(t)
        if e is not None and (e[2] not in (None, "UN", _dict_vr(t)) or e[1] != _dict_vr(t)):
            raise Unsupported("added_vr")
    enc_key = tuple(encodings) if isinstance(encodings, list) else (encodings,)
    pre = _small_dataset(src(_SOURCE_TAGS), implicit, enc_key, little)
    store = pre._dict  # presence only (the checks ask which of these exist): one placeholder per any-of group
    for group in _PRESENCE_GROUPS:
        if not any(t in store for t in group):
            t = next((t for t in group if t in top), None)
            if t is not None:
                store[Tag(t)] = RawDataElement(Tag(t), "UN", 0, b"", 0, implicit, little)
    for check in rules.REFUSAL_CHECKS:  # the whole file parsed and its values decode: the reference's checks now
        check(pre)
    if probe.declined:
        raise Unsupported(probe.declined)

    walker = Walker(key, options, pre)
    rw = _Rewriter(data, key, options, implicit, encodings, walker, little)
    pseudo = walker.patient_pseudo
    additions = sorted([(0x00100010, _encoded_text(0x00100010, "PN", pseudo, enc_key, implicit, little)),
                        (0x00100020, _encoded_text(0x00100020, "LO", pseudo, enc_key, implicit, little))]
                       + list(_constant_additions(options, demo, implicit, enc_key, little)))
    out: list = []
    rw.dataset(elems, 0, out, additions)

    # Pixel Data: the reference's own check and overlay clean-up, on the source values (all K).
    pix_elem = top.get(PIXEL_DATA)
    if pix_elem is not None:
        pix = _small_dataset(src(_PIXEL_TAGS), implicit, enc_key, little)
        if pix_elem[7] == _ENCAP:
            pix.add(DataElement(PIXEL_DATA, "OB", b""))
            try:
                bits_alloc = int(pix.BitsAllocated)
                bits_stored = int(pix.get("BitsStored", bits_alloc) or bits_alloc)
            except (AttributeError, TypeError, ValueError):
                bits_alloc = bits_stored = None
            if bits_alloc in (8, 16, 32) and bits_stored is not None and bits_stored < bits_alloc:
                raise Unsupported("encapsulated_overlay_bits")  # the reference decodes and may re-encode
            clean_pixel_data(pix, ts)  # missing_attribute as the reference
        else:
            if pix_elem[2] == "UN":
                raise Unsupported("pixel_vr")
            raw = data[pix_elem[4]:pix_elem[6]]
            pix.add(DataElement(PIXEL_DATA, "OW" if pix_elem[1] != "OB" else "OB", raw))
            if clean_pixel_data(pix, ts):
                if rw.pixel_index < 0:
                    raise Unsupported("pixel_position")
                new = pix.PixelData
                if len(new) != len(raw) or len(raw) & 1:
                    raise Unsupported("pixel_length")
                out[rw.pixel_index] = bytes(data[pix_elem[3]:pix_elem[4]]) + new

    # File meta, as the reference rebuilds it.
    final = rw.final
    info_ds = _Values({_keyword(t): _converted(t, *_value_of(b, implicit), enc_key, implicit, little).value
                       for t, b in final.items()})
    sop_class = info_ds.get("SOPClassUID") or (meta.get(2, b"").decode("latin-1").rstrip("\0 ") or None)
    sop_inst = info_ds.get("SOPInstanceUID") or uid_for(key, meta.get(3, b"").decode("latin-1").rstrip("\0 "))
    if not sop_class or not sop_inst:
        raise Unsupported("meta_values")
    body = b"".join(out)
    result = b"\0" * 128 + b"DICM" + _meta_bytes(str(sop_class), str(sop_inst), str(ts)) + body
    _verify(result, implicit, encapsulated, encodings, little, check_text)

    original_study = str(pre.get("StudyInstanceUID", "") or "").strip()
    info_ds.file_meta = _Values({"TransferSyntaxUID": ts})
    info = rules.deid_info(info_ds, pseudo_patient=pseudo, pseudo_study=pseudo_id(key, original_study, "study"))
    view = None if source_tags is None else _source_view(data, elems, source_tags, implicit, enc_key, little)
    return result, info, view


def _source_view(buf: bytes, elems: list, tags: frozenset[int], implicit: bool, enc_key: tuple,
                 little: bool) -> Dataset:
    """The elements of ``tags`` of a parsed data set (``_Parser.dataset``), at every depth, as a pydicom data
    set: each value converted from its raw bytes exactly as pydicom converts it when it reads the file (stored VR,
    or the dictionary's for implicit VR; the file's character set, which items cannot change here), inside the
    sequences and items that lead to them (sequences holding none are left out: nothing to read there)."""
    return _view(buf, elems, tags, implicit, enc_key, little) or Dataset()


def _view(buf: bytes, elems: list, tags: frozenset[int], implicit: bool, enc_key: tuple,
          little: bool) -> Dataset | None:
    ds = None
    for tag, _vr, stored, _h, vstart, _length, vend, children in elems:
        if isinstance(children, list):  # a sequence (encapsulated Pixel Data is the _ENCAP string); depth is
            items = [item for item in (_view(buf, child, tags, implicit, enc_key, little) for child in children)
                     if item is not None]  # bounded by the parser (MAX_NESTING)
            if not items:
                continue
            elem = DataElement(tag, "SQ", Sequence(items))
        elif tag in tags:
            elem = _converted(tag, stored, buf[vstart:vend], enc_key, implicit, little)
        else:
            continue
        if ds is None:
            ds = Dataset()
        ds._dict[Tag(tag)] = elem
    return ds


def _peek_charset(buf: bytes, pos: int, implicit: bool, little: bool = True) -> bytes | None:
    """Value of a top-level (0008,0005), found by walking the first top-level headers."""
    n = len(buf)
    e = "<" if little else ">"
    while pos + 8 <= n:
        group, el = unpack_from(e + "HH", buf, pos)
        tag = group << 16 | el
        if tag > SPECIFIC_CHARSET:
            return None
        if implicit:
            length, start = unpack_from(e + "L", buf, pos + 4)[0], pos + 8
        else:
            vr = _VR_BYTES.get(buf[pos + 4:pos + 6])
            if vr is None:
                raise Unsupported("vr_mismatch")
            if vr in _VR32:
                length, start = unpack_from(e + "L", buf, pos + 8)[0], pos + 12
            else:
                length, start = unpack_from(e + "H", buf, pos + 6)[0], pos + 8
        if length == _UNDEF:
            raise Unsupported("structure")  # an undefined-length element before (0008,0005): unusual
        if tag == SPECIFIC_CHARSET:
            return buf[start:start + length]
        pos = start + length
    return None


def _verify(out: bytes, implicit: bool, encapsulated: bool, encodings, little: bool = True,
            check_text: bool | None = None) -> None:
    """The read-back check of the output, at byte level (the reference parses its output back with pydicom;
    that would cost this path 190% of its time): the output must pass everything the input had to pass here
    before the fast path took it, i.e. what pydicom needs to read a file back and decode all its values -
    the meta group and every element, item and sequence length consistent and closed, the walk ending exactly
    at the end of the file, at most MAX_NESTING levels of sequences (pydicom reads undefined-length sequences
    recursively), known VRs, numeric values a whole number of values long, DS/IS strings that are numbers,
    text that decodes in the file's character set.  tests/test_deid_fuzz.py reads every output back with
    pydicom, element by element, to hold this to account."""
    start, meta = _read_meta(out)
    if unpack_from("<L", meta[0])[0] != start - 144:
        raise Unsupported("verify_meta")
    if check_text is None:
        enc_list = encodings if isinstance(encodings, list) else [encodings]
        check_text = not all(e in _LATIN1_SETS for e in enc_list)
    parser = _Parser(out, implicit, encapsulated, encodings, check_text, little)
    _elems, end = parser.dataset(start, len(out), 0, False)
    if end != len(out):
        raise Unsupported("verify")
    if parser.declined:
        raise Unsupported(parser.declined)


def verified(out: bytes) -> bool:
    """True if ``out`` (a Part-10 file with meta, e.g. the reference path's output) passes :func:`_verify`;
    False when this parser cannot tell (deflate, nested character sets, ...: the caller reads it back with
    pydicom) or it fails."""
    try:
        start, meta = _read_meta(out)
        ts = UID(meta.get(0x10, b"").decode("latin-1").rstrip("\0 "))
        if not ts.is_transfer_syntax or ts.is_deflated or (not ts.is_little_endian and
                                                           (ts.is_implicit_VR or ts.is_encapsulated)):
            return False
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
        charset = _peek_charset(out, start, implicit, little)
        cs_ds = Dataset()
        if charset is not None:
            cs_ds.add(convert_raw_data_element(RawDataElement(Tag(SPECIFIC_CHARSET), None if implicit else "CS",
                                                              len(charset), charset, 0, implicit, little)))
        _verify(out, implicit, ts.is_encapsulated, cs_ds._character_set, little)
        return True
    except Exception:  # noqa: BLE001 - Unsupported, or anything this parser does not foresee: pydicom decides
        return False


__all__ = ["Unsupported", "deidentify_stream", "deidentify_stream_source", "verified", "FALLBACKS", "HANDLED",
           "LAST_FALLBACK"]
