"""Pixel Data, the one part of a DICOM object outside the header that de-identification changes.

Both paths call :func:`clean_pixel_data` on the source values: it checks native Pixel Data is as long as the
image pixel module says (``truncated_pixels`` otherwise) and clears overlays hidden in the unused high bits
(unsigned: zeroed; signed: replaced by the sign extension, which leaves every pixel value unchanged).  Burned-in
text cannot be removed here: such objects are refused by ``rules.check_burned_in`` before this runs.
"""
from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, RLELossless

from imaging_tasks.errors import BadInput


def clean_high_bits(words: np.ndarray, bits_stored: int, high_bit: int, signed: bool) -> np.ndarray:
    """Clear bits outside [high_bit-bits_stored+1, high_bit]; for signed data set them to the sign."""
    nbits = words.dtype.itemsize * 8
    low = max(high_bit + 1 - bits_stored, 0)
    mask = (((1 << bits_stored) - 1) << low) & ((1 << nbits) - 1)
    out = words & mask
    if signed and low == 0:
        negative = ((out >> (bits_stored - 1)) & 1).astype(bool)
        out = np.where(negative, out | (((1 << nbits) - 1) ^ mask), out)
    return out.astype(words.dtype)


def clean_pixel_data(ds: Dataset, ts: UID) -> bool:
    """Check Pixel Data is complete and clear overlays in unused high bits.  Returns True if changed."""
    if "PixelData" not in ds:
        return False
    try:
        bits_alloc = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored", bits_alloc) or bits_alloc)
        hb = ds.get("HighBit")
        high_bit = int(hb) if hb not in (None, "") else bits_stored - 1
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    except (AttributeError, TypeError, ValueError):
        raise BadInput("missing_attribute", "Pixel Data present but BitsAllocated/BitsStored are missing or "
                       "invalid; re-export the image from the source system") from None
    if not ts.is_encapsulated:
        try:
            for kw in ("Rows", "Columns", "SamplesPerPixel", "NumberOfFrames"):
                if kw in ds and ds[kw].value not in (None, ""):
                    int(ds[kw].value)  # IS values such as "1A" make the expected size meaningless
            expected = int(pydicom.pixels.utils.get_expected_length(ds, "bytes"))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise BadInput("missing_attribute", "Pixel Data present but the image pixel module (Rows, Columns, "
                           "SamplesPerPixel, NumberOfFrames, PhotometricInterpretation) is incomplete or "
                           "invalid") from None
        raw = ds.PixelData
        if len(raw) < expected:
            raise BadInput("truncated_pixels", f"Pixel Data holds {len(raw)} bytes but Rows x Columns x frames "
                           f"needs {expected}; the file is truncated, re-send it")
        if bits_alloc not in (8, 16, 32) or bits_stored >= bits_alloc:
            return False
        dtype = np.dtype(f"u{bits_alloc // 8}").newbyteorder("<" if ts.is_little_endian else ">")
        count = expected // dtype.itemsize
        words = np.frombuffer(raw, dtype=dtype, count=count)
        cleaned = clean_high_bits(words, bits_stored, high_bit, signed)
        if np.array_equal(cleaned, words):
            return False
        ds.PixelData = cleaned.astype(dtype).tobytes() + bytes(raw[count * dtype.itemsize:])
        return True
    if bits_stored >= bits_alloc or bits_alloc not in (8, 16, 32):
        return False
    # Encapsulated: RLE stores whole bytes, so it can carry high-bit overlays; JPEG-family streams normally
    # carry exactly BitsStored precision but one written at full precision can too.  A stream whose every frame
    # declares a precision within BitsStored (and the stored bits start at bit 0) cannot: it is not decoded
    # (~50 ms a frame).  Otherwise decode where a decoder is installed; RLE can be re-encoded here, the others
    # are refused if they carry overlay bits.
    if high_bit == bits_stored - 1 and _declared_precision(ds, ts) <= bits_stored:
        return False
    try:
        arr = pydicom.pixels.pixel_array(ds, correct_unused_bits=False)
    except Exception:  # noqa: BLE001 - no codec installed: nothing can be checked or rewritten
        return False
    words = arr.view(np.dtype(f"u{arr.dtype.itemsize}")) if arr.dtype.kind in "iu" else None
    if words is None or words.dtype.itemsize * 8 != bits_alloc:
        return False
    cleaned = clean_high_bits(words, bits_stored, high_bit, signed)
    if np.array_equal(cleaned, words):
        return False
    if ts != RLELossless:
        raise BadInput("overlay_in_pixels", "compressed Pixel Data has overlay bits above BitsStored and no "
                       "lossless re-encoder is available for its transfer syntax; decompress it before ingest")
    ds.compress(RLELossless, cleaned.view(arr.dtype), generate_instance_uid=False)
    return True


# JPEG start-of-frame markers (not DHT C4, JPG C8, DAC CC), and JPEG-LS's SOF55 (F7): each is followed by its
# length (2 bytes) and the sample precision (1 byte).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_J2K_START = b"\xff\x4f\xff\x51"  # SOC then SIZ: a JPEG 2000 codestream's first bytes (after any JP2 boxes)
UNKNOWN_PRECISION = 1 << 16


def _jpeg_precision(frame: bytes) -> int:
    """The sample precision a JPEG or JPEG-LS frame's SOF segment declares (UNKNOWN_PRECISION if none)."""
    if frame[:2] != b"\xff\xd8":
        return UNKNOWN_PRECISION
    i = 2
    while i + 4 < len(frame):
        if frame[i] != 0xFF:
            return UNKNOWN_PRECISION
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            return frame[i + 4] if i + 4 < len(frame) else UNKNOWN_PRECISION
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # segments without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return UNKNOWN_PRECISION
        i += 2 + int.from_bytes(frame[i + 2:i + 4], "big")
    return UNKNOWN_PRECISION


def _j2k_precision(frame: bytes) -> int:
    """The largest component bit depth a JPEG 2000 frame's SIZ segment declares (UNKNOWN_PRECISION if none)."""
    at = frame.find(_J2K_START, 0, 4096)
    if at < 0:
        return UNKNOWN_PRECISION
    siz = at + 2
    components_at = siz + 2 + 2 + 2 + 32  # marker, Lsiz, Rsiz, then Xsiz ... YTOsiz (eight 4-byte values)
    if components_at + 2 > len(frame):
        return UNKNOWN_PRECISION
    count = int.from_bytes(frame[components_at:components_at + 2], "big")
    depths = frame[components_at + 2:components_at + 2 + 3 * count:3]
    if count == 0 or len(depths) != count:
        return UNKNOWN_PRECISION
    return max((d & 0x7F) + 1 for d in depths)


def _declared_precision(ds: Dataset, ts: UID) -> int:
    """The largest sample precision the frames of encapsulated JPEG-family Pixel Data declare in their own
    headers; UNKNOWN_PRECISION for other syntaxes (RLE keeps whole bytes) or a header that cannot be read."""
    from pydicom.encaps import generate_frames

    if ts in JPEG_2000_SYNTAXES:
        read = _j2k_precision
    elif ts in JPEG_SYNTAXES:
        read = _jpeg_precision
    else:
        return UNKNOWN_PRECISION
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return max((read(bytes(f)) for f in generate_frames(ds.PixelData, number_of_frames=frames)),
                   default=UNKNOWN_PRECISION)
    except Exception:  # noqa: BLE001 - an unreadable stream is decoded (and refused) as before
        return UNKNOWN_PRECISION


JPEG_SYNTAXES = frozenset(UID(u) for u in (
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"))
JPEG_2000_SYNTAXES = frozenset(UID(u) for u in (
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"))

__all__ = ["clean_pixel_data", "clean_high_bits"]
