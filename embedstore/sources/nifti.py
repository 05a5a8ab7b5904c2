"""NIfTI volumes: canonical (RAS+) orientation, axial slices, the file decompressed once.

A slice is shown the way a DICOM axial slice is (rows anterior → posterior, columns patient right →
left), so the same volume embeds alike from either format. NIfTI carries no modality: a volume
with values below -500 (air in Hounsfield units) is taken as CT, anything else as MR. A 4D volume
contributes its first 3D volume.
"""

from __future__ import annotations

import gzip
import zlib

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from embedstore.errors import CORRUPT_NIFTI, TRUNCATED, InputError
from embedstore.sources.records import SliceItem

CT_AIR_THRESHOLD = -500.0


def _load(path: str):
    try:
        return nib.load(path)
    except Exception as error:  # nibabel raises ImageFileError, gzip/zlib errors, ValueError...
        raise InputError(CORRUPT_NIFTI, f"NIfTI header cannot be read: {error}") from None


def count_axial_slices(path: str) -> int:
    """Number of axial slices, from the header alone (no voxel data is read)."""
    image = _load(path)
    if len(image.shape) < 3:
        raise InputError(CORRUPT_NIFTI, f"NIfTI image has {len(image.shape)} dimensions, expected 3 or 4")
    superior_axis = int(np.flatnonzero(io_orientation(image.affine)[:, 0] == 2)[0])
    return int(image.shape[superior_axis])


def volume_items(path: str, n_slices: int) -> list[SliceItem]:
    return [
        SliceItem(
            item_id=f"nifti:{path}:axial:{index}",
            path=path,
            study_uid=f"file:{path}",
            series_uid=f"file:{path}",
            slice_index=index,
            frame=index,
        )
        for index in range(n_slices)
    ]


def read_axial_slices(path: str) -> tuple[np.ndarray, str]:
    """All axial slices as (n, rows, cols) float32, inferior → superior, and the inferred modality."""
    image = _load(path)
    try:
        canonical = nib.as_closest_canonical(image)
        volume = np.asarray(canonical.dataobj, dtype=np.float32)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise InputError(TRUNCATED, f"NIfTI data is truncated or corrupt: {error}", stage="decode") from None
    except Exception as error:
        raise InputError(CORRUPT_NIFTI, f"NIfTI data cannot be read: {error}", stage="decode") from None
    if volume.ndim == 4:
        volume = volume[..., 0]
    # (x: R, y: A, z: S) → (z, rows: A→P, cols: R→L)
    slices = np.ascontiguousarray(volume[::-1, ::-1, :].transpose(2, 1, 0))
    modality = "CT" if slices.size and float(slices.min()) < CT_AIR_THRESHOLD else "MR"
    return slices, modality
