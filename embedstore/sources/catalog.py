"""The catalog: every slice the sources hold, grouped into series and ordered, as read tasks.

A SOP instance found in several files (copies, re-exports in another transfer syntax) is one
task: the first file, with the others as alternates for the decode stage to fall back on.

Building it reads DICOM headers and NIfTI headers (never pixel data). `map_fn` lets the caller run
the header reads in its worker pool; it defaults to the built-in `map`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable

from embedstore.errors import DECODE_ERROR, InputError
from embedstore.sources.dicom import DicomHeader, read_header
from embedstore.sources.discover import FoundFile
from embedstore.sources.nifti import NiftiLayout, nifti_layout, volume_items
from embedstore.sources.raster import raster_item
from embedstore.sources.records import Failure, ReadTask, SliceItem
from embedstore.sources.series import series_items


@dataclass
class Catalog:
    tasks: list[ReadTask] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return sum(len(task.items) for task in self.tasks)


def scan_file(found: FoundFile, axis: str = "axial") -> DicomHeader | NiftiLayout | Failure:
    """The catalog facts of a DICOM or NIfTI file: its header, or its slice geometry along `axis`."""
    try:
        if found.kind == "dicom":
            return read_header(found.path)
        return nifti_layout(found.path, axis)
    except InputError as error:
        return Failure(found.path, "read", error.reason, error.message)
    except Exception as error:  # a reader bug or an odd file must not end the run
        return Failure(found.path, "read", DECODE_ERROR, f"{type(error).__name__}: {error}")


def build_catalog(files: list[FoundFile], map_fn: Callable[..., Iterable] = map, axis: str = "axial") -> Catalog:
    """Read tasks for every slice in `files`; NIfTI volumes are cut along `axis`."""
    catalog = Catalog()
    dicom_series: dict[str, list[DicomHeader]] = defaultdict(list)
    alternates: dict[str, list[str]] = defaultdict(list)  # SOPInstanceUID → later files holding it
    catalog.tasks.extend(ReadTask("raster", f.path, [raster_item(f.path)]) for f in files if f.kind == "raster")
    with_headers = [f for f in files if f.kind != "raster"]  # rasters need no header read
    for found, scanned in zip(with_headers, map_fn(partial(scan_file, axis=axis), with_headers)):
        if isinstance(scanned, Failure):
            catalog.failures.append(scanned)
        elif found.kind == "dicom":
            if scanned.sop_uid in alternates:
                alternates[scanned.sop_uid].append(found.path)
                continue
            alternates[scanned.sop_uid] = []
            dicom_series[scanned.series_uid].append(scanned)
        else:
            catalog.tasks.append(ReadTask("nifti", found.path, volume_items(scanned), axis=axis))
    for headers in dicom_series.values():
        items, failures = series_items(headers)
        for task in _tasks_by_file("dicom", items):
            task.alternates = alternates[task.items[0].sop_uid]
            catalog.tasks.append(task)
        catalog.failures.extend(failures)
    return catalog


def _tasks_by_file(kind: str, items: list[SliceItem]) -> list[ReadTask]:
    by_path: dict[str, ReadTask] = {}
    for item in items:
        by_path.setdefault(item.path, ReadTask(kind, item.path)).items.append(item)
    return list(by_path.values())
