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
    # carry exactly BitsStored precision but one written at full precision can too.  Decode where a
    # decoder is installed; RLE can be re-encoded here, the others are refused if they carry overlay bits.
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


__all__ = ["clean_pixel_data", "clean_high_bits"]
