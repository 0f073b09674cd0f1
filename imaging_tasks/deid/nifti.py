"""NIfTI de-identification: the header's free-text fields and every header extension go, voxels stay byte-identical.

NIfTI has no patient fields, but converters put names, IDs and protocol text into ``descrip``,
``aux_file``, ``intent_name`` and ``db_name``, and whole DICOM headers into extensions (dcm2niix's
code 2 / AFNI's code 4 / comments).  The rewrite keeps the voxel bytes exactly as stored (no rescaling),
so derived numbers cannot change.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from imaging_tasks.errors import BadInput

TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def deidentify_nifti(src: Path, dst: Path) -> dict:
    """Write ``dst``: header text cleared, extensions dropped, data copied byte for byte."""
    import nibabel as nib

    src, dst = Path(src), Path(dst)
    raw = src.read_bytes()
    try:
        data = gzip.decompress(raw) if _is_gz(src) else raw
        img = nib.load(str(src))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or len(img.header.binaryblock) > len(data):
            raise ValueError("not a single-file NIfTI")
    except Exception as exc:
        raise BadInput("unreadable_nifti", f"the file is not a readable single-file NIfTI ({type(exc).__name__}); "
                       "re-export it as .nii or .nii.gz") from None
    expected = int(np.prod(img.header.get_data_shape(), dtype=np.int64)) * img.header.get_data_dtype().itemsize
    if len(data) - int(img.dataobj.offset) < expected:  # the copy below would pass a cut file on unnoticed
        raise BadInput("unreadable_nifti", f"the file is cut short: {max(len(data) - int(img.dataobj.offset), 0)} "
                       f"bytes of voxel data where its header declares {expected}; re-send the whole file")
    header = img.header.copy()
    # nibabel moves scaling and offset out of the loaded header into the data proxy: put them back
    header["scl_slope"], header["scl_inter"] = img.dataobj.slope, img.dataobj.inter
    old_offset = int(img.dataobj.offset)  # where the voxels start in the file (the loaded header says 0)
    removed = [f for f in TEXT_FIELDS if f in header and bytes(header[f].tobytes()).strip(b"\0 ")]
    for name in TEXT_FIELDS:
        if name in header:
            header[name] = b""
    n_ext = len(header.extensions)
    header.extensions.clear()
    block = header.binaryblock
    new_offset = len(block) + 4  # header + the 4-byte extension flag (all zero: no extensions)
    header["vox_offset"] = new_offset
    out = header.binaryblock + b"\0\0\0\0" + data[old_offset:]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(gzip.compress(out, mtime=0) if _is_gz(dst) else out)
    return {"cleared_fields": removed, "removed_extensions": n_ext, "voxel_bytes": len(data) - old_offset}


def nifti_facts(path: Path) -> dict:
    """Small technical facts of a (de-identified) NIfTI for the warehouse instances table: shape, voxel size,
    data type, frames and which of qform/sform is set.  No text field is read."""
    import nibabel as nib

    header = nib.load(str(path)).header
    shape = [int(n) for n in header.get_data_shape()]
    return {"shape": shape, "voxel_mm": [round(float(z), 6) for z in header.get_zooms()[:3]],
            "datatype": str(header.get_data_dtype()), "n_frames": shape[3] if len(shape) > 3 else 1,
            "qform_code": int(header["qform_code"]), "sform_code": int(header["sform_code"])}
