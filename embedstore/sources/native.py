"""A read task's slices in native units, from whichever reader its file kind needs."""

from __future__ import annotations

import os
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Iterator

from embedstore.sources.dicom_pixels import read_dicom_pixels
from embedstore.sources.dicomweb import is_dicomweb, retrieve
from embedstore.sources.limits import DEFAULT_MAX_PIXELS
from embedstore.sources.nifti import read_nifti_slices
from embedstore.sources.objects import download, is_object
from embedstore.sources.raster import read_raster
from embedstore.sources.records import NativeSlices, ReadTask


def read_native(task: ReadTask, apply_voi_lut: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> NativeSlices:
    """The task's slices in native units (the file read once), in the order of task.items; the
    modality as the items state it (DICOM, or declared), else as inferred (NIfTI). A DICOMweb
    instance or an object in a bucket is fetched to a temporary file first."""
    with readable(task.path) as path:
        return _read_native(task, path, apply_voi_lut, max_pixels)


def is_remote(path: str) -> bool:
    """A PACS instance or a bucket object: reading it waits on the network."""
    return is_dicomweb(path) or is_object(path)


def fetch(path: str) -> str:
    """A temporary file holding a PACS instance or a bucket object; the caller removes it."""
    return retrieve(path) if is_dicomweb(path) else download(path)


# Remote files being fetched ahead (DecodePool), by path: `readable` takes a fetch from here, or its
# error (a failure of that file, or the source gone), instead of fetching itself.
FETCHES: dict[str, Future] = {}


@contextmanager
def readable(path: str) -> Iterator[str]:
    """A local file with the contents `path` names, for the time of the `with`."""
    if not is_remote(path):
        yield path
        return
    ahead = FETCHES.pop(path, None)
    local = ahead.result() if ahead is not None else fetch(path)
    try:
        yield local
    finally:
        os.unlink(local)


def _read_native(task: ReadTask, path: str, apply_voi_lut: bool, max_pixels: int) -> NativeSlices:
    frames = [item.frame for item in task.items]
    first = task.items[0]
    if task.kind == "dicom":
        read = read_dicom_pixels(path, frames, apply_voi_lut)
        return NativeSlices(read.stored, first.modality, read.windows, read.monochrome1, first.body_part,
                            read.voi_lut_applied, read.rescale)
    if task.kind == "nifti":
        volume, modality = read_nifti_slices(path, task.axis, first.modality)
        return NativeSlices(volume[frames], modality)
    return NativeSlices(read_raster(path, frames, max_pixels), first.modality)
