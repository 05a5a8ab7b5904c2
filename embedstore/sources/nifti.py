"""NIfTI volumes: canonical (RAS+) orientation, slices along a chosen axis, each file decompressed once.

Orientation comes from the header's sform when its code is set, else the qform, else the voxel
sizes alone (nibabel's rule). Slices are shown the way DICOM shows that plane (axial: rows anterior →
posterior, columns patient right → left; coronal: rows superior → inferior; sagittal: columns
anterior → posterior), and each slice gets DICOM-style geometry in LPS millimetres, so the same
volume embeds and sorts alike from either format. A 4D file gives one series per volume (fMRI, DWI
and perfusion volumes are different images, not repeats).

NIfTI has no modality field. Unless `--modality` declares one, a volume has the modality its
description or intent name names (CT, MR or MRI, PET; one of them only), else it is CT when its
values look like Hounsfield units: at least 5% of voxels near air (-1100 to -900) and a range that
fits HU (the 0.1st to 99.9th percentiles within -3100 to 4000: padding values to bone, metal
aside). Anything else is MR: an SPM-normalised T1 (-610 to 30393) has no air at -1000 and a range
far above HU.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass

import numpy as np

from embedstore.errors import CORRUPT_NIFTI, TRUNCATED, UNREADABLE, InputError
from embedstore.sources.limits import DEFAULT_MAX_PIXELS, check_declared_size
from embedstore.sources.records import SliceItem

AIR_HU = (-1100.0, -900.0)  # air, and the -1024 scanners store outside the body
MIN_AIR_SHARE = 0.05  # a CT field of view holds air around the body; MR background sits near 0
HU_RANGE = (-3100.0, 4000.0)  # padding values (-3024, -2048) up to dense bone and contrast
RANGE_QUANTILE = 0.001  # the extreme 0.1% at either end (a few metal voxels) does not count
MODALITY_SAMPLE = 1_000_000  # voxels looked at: a random sample tells as much as the whole volume
# Words of a description or intent name that name a modality ("T1 MRI", "CT head", "PET/CT" names two).
HEADER_WORDS = {"CT": "CT", "MR": "MR", "MRI": "MR", "PET": "PT"}
HEADER_MODALITY = re.compile(r"(?<![A-Za-z])(CT|MRI?|PET)(?![A-Za-z])")
AXES = ("axial", "coronal", "sagittal")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# Per axis, in canonical voxel indices (x: R, y: A, z: S): the voxel of pixel (row 0, col 0) of
# slice 0 as a fraction of the far corner, and the index steps per row, per column and per slice.
VIEWS = {
    "axial": ((1, 1, 0), (0, -1, 0), (-1, 0, 0), (0, 0, 1)),
    "coronal": ((1, 1, 1), (0, 0, -1), (-1, 0, 0), (0, -1, 0)),
    "sagittal": ((0, 1, 1), (0, 0, -1), (0, -1, 0), (1, 0, 0)),
}


@dataclass
class NiftiLayout:
    path: str
    axis: str
    n_slices: int  # per volume
    n_volumes: int
    shape: tuple[int, int, int]  # canonical (RAS+) voxel grid
    affine: np.ndarray  # canonical voxel → world (RAS+ mm)


def _load(path: str, stage: str = "read"):
    import nibabel  # imported where NIfTI is read: DICOM-only processes never load it

    try:
        open(path, "rb").close()  # nibabel reports a file it may not read as one it cannot recognise
        return nibabel.load(path)
    except PermissionError as error:
        raise InputError(UNREADABLE, f"file cannot be read: {error.strerror}", stage) from None
    except Exception as error:  # nibabel raises ImageFileError, gzip/zlib errors, ValueError...
        raise InputError(CORRUPT_NIFTI, f"NIfTI header cannot be read: {error}", stage) from None


def nifti_layout(path: str, axis: str = "axial", max_pixels: int = DEFAULT_MAX_PIXELS) -> NiftiLayout:
    """Slice and volume counts and the canonical affine, from the header alone (no voxel data);
    InputError for a volume that holds no voxel or declares more than `max_pixels` per slice."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    image = _load(path)
    shape = image.shape
    if len(shape) < 3 or len(shape) > 4:
        declared = int(image.header["dim"][0])  # nibabel shows a 0-d image as shape (1,)
        raise InputError(CORRUPT_NIFTI, f"NIfTI header declares {declared} dimension{'s' * (declared != 1)} "
                         f"(shape {tuple(shape)}): an image has 3 or 4")
    if 0 in shape:
        raise InputError(CORRUPT_NIFTI, f"NIfTI image has a zero-length dimension (shape {shape}): no voxel to read")
    orientation = io_orientation(image.affine)
    canonical_shape = [0, 0, 0]
    for source_axis, (target_axis, _) in enumerate(orientation):
        canonical_shape[int(target_axis)] = shape[source_axis]
    affine = image.affine @ inv_ornt_aff(orientation, shape[:3])
    along = slicing_axis(axis)
    n_volumes = int(shape[3]) if len(shape) == 4 else 1
    slice_shape = tuple(int(n) for i, n in enumerate(canonical_shape) if i != along)
    check_declared_size(slice_shape, canonical_shape[along] * n_volumes, max_pixels)
    return NiftiLayout(path, axis, int(canonical_shape[along]), n_volumes,
                       tuple(int(n) for n in canonical_shape), affine)


def slicing_axis(axis: str) -> int:
    return int(np.flatnonzero(VIEWS[axis][3])[0])


def slice_count(canonical_shape: tuple[int, int, int], axis: str) -> int:
    """Slices per volume along `axis` of a canonical (RAS+) grid."""
    return int(canonical_shape[slicing_axis(axis)])


def volume_items(layout: NiftiLayout, modality: str | None = None) -> list[SliceItem]:
    """One item per slice of every volume, with DICOM-style geometry; `modality` as declared."""
    path, axis = layout.path, layout.axis
    origin, step_row, step_col, step_slice = _world_steps(layout)
    row_mm, col_mm = float(np.linalg.norm(step_row)), float(np.linalg.norm(step_col))
    orientation = tuple(float(v) for v in np.concatenate([step_col / col_mm, step_row / row_mm]))
    normal = np.cross(orientation[:3], orientation[3:])
    items = []
    for volume in range(layout.n_volumes):
        tag = f":t{volume}" if layout.n_volumes > 1 else ""
        series = f"file:{path}" + (f"#{axis}" if axis != "axial" else "") + (f"#t{volume}" if tag else "")
        for index in range(layout.n_slices):
            position = origin + index * step_slice
            items.append(SliceItem(
                item_id=f"nifti:{path}:{axis}{tag}:{index}",
                kind="nifti",
                axis=axis,
                path=path,
                study_uid=f"file:{path}",
                series_uid=series,
                slice_index=index,
                frame=volume * layout.n_slices + index,
                modality=modality,
                pixel_spacing=(row_mm, col_mm),
                slice_thickness=float(np.linalg.norm(step_slice)),
                image_position=tuple(float(v) for v in position),
                image_orientation=orientation,
                slice_position=float(position @ normal),
            ))
    return items


def _world_steps(layout: NiftiLayout) -> tuple[np.ndarray, ...]:
    """LPS position of the first pixel of slice 0, and the LPS step per row, column and slice."""
    corner, *steps = (np.array(v, dtype=float) for v in VIEWS[layout.axis])
    extent = np.array(layout.shape, dtype=float) - 1
    linear = RAS_TO_LPS @ layout.affine[:3, :3]
    origin = RAS_TO_LPS @ (layout.affine[:3, :3] @ (corner * extent) + layout.affine[:3, 3])
    return (origin, *(linear @ step for step in steps))


def read_nifti_slices(path: str, axis: str = "axial", modality: str | None = None) -> tuple[np.ndarray, str]:
    """Every slice of every volume as (volumes × slices, rows, cols) float32, volume by volume in
    slice order, and the modality: as declared, else inferred. The file is read and decompressed once."""
    import nibabel

    image = _load(path, "decode")
    try:
        canonical = nibabel.as_closest_canonical(image)
        data = np.asarray(canonical.dataobj, dtype=np.float32)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise InputError(TRUNCATED, f"NIfTI data is truncated or corrupt: {error}", stage="decode") from None
    except Exception as error:
        # nibabel reports an uncompressed file that ends early as "Expected N bytes, got M"
        reason = TRUNCATED if str(error).startswith("Expected") and "bytes" in str(error) else CORRUPT_NIFTI
        raise InputError(reason, f"NIfTI data cannot be read: {error}", stage="decode") from None
    volumes = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
    slices = np.concatenate([_view(volume, axis) for volume in volumes])
    return slices, modality or _header_modality(image.header) or _modality_from_values(slices)


def _header_modality(header) -> str | None:
    """The modality the description or intent name names, when it names exactly one."""
    text = " ".join(header[field].item().decode("latin-1") for field in ("descrip", "intent_name"))
    named = {HEADER_WORDS[word] for word in HEADER_MODALITY.findall(text)}
    return named.pop() if len(named) == 1 else None


def _modality_from_values(slices: np.ndarray) -> str:
    """CT when the values look like Hounsfield units (see the module's docstring), else MR."""
    values = slices.reshape(-1)
    if values.size > MODALITY_SAMPLE:
        values = values[np.random.default_rng(0).integers(0, values.size, MODALITY_SAMPLE)]
    values = values[np.isfinite(values)]
    if not values.size:
        return "MR"
    air = np.count_nonzero((values >= AIR_HU[0]) & (values <= AIR_HU[1])) / values.size
    low, high = np.quantile(values, (RANGE_QUANTILE, 1 - RANGE_QUANTILE))
    return "CT" if air >= MIN_AIR_SHARE and low >= HU_RANGE[0] and high <= HU_RANGE[1] else "MR"


def _view(volume: np.ndarray, axis: str) -> np.ndarray:
    """(x, y, z) canonical voxels → (slice, row, col) as in VIEWS."""
    if axis == "axial":  # [k, r, c] = V[X-1-c, Y-1-r, k]
        view = volume[::-1, ::-1, :].transpose(2, 1, 0)
    elif axis == "coronal":  # [k, r, c] = V[X-1-c, Y-1-k, Z-1-r]
        view = volume[::-1, ::-1, ::-1].transpose(1, 2, 0)
    else:  # sagittal: [k, r, c] = V[k, Y-1-c, Z-1-r]
        view = volume[:, ::-1, ::-1].transpose(0, 2, 1)
    return np.ascontiguousarray(view)


def volume_from_slices(slices: np.ndarray, path: str, axis: str = "axial") -> np.ndarray:
    """The inverse of read_nifti_slices for the file at `path`: slices (volumes × slices, rows, cols)
    cut along `axis` → an array in the file's own voxel order and shape, to be saved with its affine
    (segmentation predictions that overlay the image they were made from)."""
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    image = _load(path)
    to_file = ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), io_orientation(image.affine))
    n_volumes = int(image.shape[3]) if len(image.shape) == 4 else 1
    per_volume = np.split(slices, n_volumes)
    volumes = [apply_orientation(_unview(view, axis), to_file) for view in per_volume]
    return volumes[0] if len(image.shape) == 3 else np.stack(volumes, axis=3)


def _unview(view: np.ndarray, axis: str) -> np.ndarray:
    """(slice, row, col) → canonical (x, y, z) voxels: _view undone."""
    if axis == "axial":
        volume = view.transpose(2, 1, 0)[::-1, ::-1, :]
    elif axis == "coronal":
        volume = view.transpose(2, 0, 1)[::-1, ::-1, ::-1]
    else:
        volume = view.transpose(0, 2, 1)[:, ::-1, ::-1]
    return np.ascontiguousarray(volume)
