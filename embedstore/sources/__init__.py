"""Sources: find files, read DICOM / NIfTI / raster images, group into series, order slices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedstore.preprocess import IntensityConfig, prepare_slices
from embedstore.sources.catalog import Catalog, build_catalog
from embedstore.sources.dicom import read_frames
from embedstore.sources.discover import FoundFile, check_sources, discover
from embedstore.sources.nifti import read_axial_slices
from embedstore.sources.raster import read_raster
from embedstore.sources.records import Failure, ReadTask, SliceItem

__all__ = [
    "Catalog", "DecodedFile", "Failure", "FoundFile", "ReadTask", "SliceItem",
    "build_catalog", "check_sources", "decode_task", "discover",
]


@dataclass
class DecodedFile:
    """A read task's slices, preprocessed and ready for the model."""

    task: ReadTask
    pixels: np.ndarray  # (n, C, S, S) float32 in [0, 1], in the order of task.items
    modality: str | None
    rows: int
    cols: int


def read_native(task: ReadTask) -> tuple[np.ndarray, str | None]:
    """The task's slices as (n, rows, cols) float32 in native units, and their modality."""
    if task.kind == "dicom":
        return read_frames(task.path, [item.frame for item in task.items]), task.items[0].modality
    if task.kind == "nifti":
        volume, modality = read_axial_slices(task.path)
        return volume[[item.frame for item in task.items]], modality
    return read_raster(task.path), None


def decode_task(task: ReadTask, config: IntensityConfig, image_size: int) -> DecodedFile:
    """Read one file once and preprocess the slices the task asks for; InputError on bad data."""
    native, modality = read_native(task)
    pixels = prepare_slices(native, modality, config, image_size)
    return DecodedFile(task, pixels, modality, native.shape[1], native.shape[2])
