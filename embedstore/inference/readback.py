"""Stored rows back to pixels: the exact model input a row's vectors came from, decoded again from
its file through the ingest's own decode stage and the model's stored spec (intensity settings,
size, interpolation). Segmentation overlays and fine-tuning read images this way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedstore.intensity import IntensityConfig
from embedstore.models.spec import ModelSpec
from embedstore.preprocess import DecodeSettings, decode_task, unit_channels
from embedstore.sources.native import read_native
from embedstore.sources.records import ReadTask, SliceItem


@dataclass(frozen=True)
class StoredSlice:
    """Where a stored row's pixels are: its file, its kind and (NIfTI) axis, its frame."""

    key: str
    path: str
    kind: str  # dicom | nifti | raster
    axis: str
    frame: int


def stored_slice(item: dict) -> StoredSlice:
    """Where a stored item row (key, path, frame, kind, axis) reads from."""
    return StoredSlice(item["key"], item["path"], item["kind"], item["axis"] or "axial", int(item["frame"]))


def slice_item(item: dict, where: StoredSlice) -> SliceItem:
    """The catalog's item for a stored row: what the readers need to decode it as the ingest did."""
    return SliceItem(item_id=where.key, path=where.path, study_uid=item["study_uid"], series_uid=item["series_uid"],
                     slice_index=item["slice_index"], frame=where.frame, modality=item["modality"],
                     body_part=item["body_part"])


def read_unit_slice(item: dict, intensity: IntensityConfig) -> np.ndarray:
    """One stored row's slice at its native size, (C, H, W) float32 in [0, 1]: the ingest's intensity
    mapping (window, percentiles or VOI, MONOCHROME1 inverted) before the resize to the model's input."""
    where = stored_slice(item)
    task = ReadTask(where.kind, where.path, [slice_item(item, where)], axis=where.axis)
    native = read_native(task, intensity.uses_header_voi(item["modality"]))
    return unit_channels(native, intensity)[0][0]


def read_back(items: list[dict], spec: ModelSpec) -> np.ndarray:
    """(n, C, S, S) float32 in [0, 1], in the order of `items` (stored rows with key, path, frame,
    study_uid, series_uid, slice_index, modality, body_part): each slice decoded from its file as the
    ingest decoded it for this model. Rows of one file are read with one decode."""
    settings = DecodeSettings.for_specs([spec])
    tasks: dict[tuple[str, str], tuple[ReadTask, list[int]]] = {}
    for position, item in enumerate(items):
        where = stored_slice(item)
        task, positions = tasks.setdefault((where.path, where.axis), (ReadTask(where.kind, where.path, axis=where.axis), []))
        task.items.append(slice_item(item, where))
        positions.append(position)
    pixels = None
    for task, positions in tasks.values():
        decoded = decode_task(task, settings).pixels[spec.interpolation]
        if pixels is None:
            pixels = np.empty((len(items), *decoded.shape[1:]), dtype=np.float32)
        pixels[positions] = decoded
    return pixels
