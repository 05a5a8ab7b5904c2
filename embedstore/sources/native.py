"""A read task's slices in native units, from whichever reader its file kind needs."""

from __future__ import annotations

from embedstore.sources.dicom_pixels import read_dicom_pixels
from embedstore.sources.limits import DEFAULT_MAX_PIXELS
from embedstore.sources.nifti import read_nifti_slices
from embedstore.sources.raster import read_raster
from embedstore.sources.records import NativeSlices, ReadTask


def read_native(task: ReadTask, apply_voi_lut: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> NativeSlices:
    """The task's slices in native units (the file read once), in the order of task.items; the
    modality as the items state it (DICOM, or declared), else as inferred (NIfTI)."""
    frames = [item.frame for item in task.items]
    first = task.items[0]
    if task.kind == "dicom":
        read = read_dicom_pixels(task.path, frames, apply_voi_lut)
        return NativeSlices(read.pixels, first.modality, read.windows, read.monochrome1, first.body_part,
                            read.voi_lut_applied)
    if task.kind == "nifti":
        volume, modality = read_nifti_slices(task.path, task.axis, first.modality)
        return NativeSlices(volume[frames], modality)
    return NativeSlices(read_raster(task.path, frames, max_pixels), first.modality)
