"""The catalog: every slice the sources hold, grouped into series and ordered, as read tasks.

A SOP instance found in several files (copies, re-exports in another transfer syntax) is one
task: the first file, with the others as alternates for the decode stage to fall back on.

Building it reads DICOM, NIfTI and raster headers (never pixel data), so a file that declares more
than `max_pixels` values per frame is refused before anything decodes it. A modality declared for
NIfTI and raster files (`--modality`) is set on their items; DICOM files keep their own. This is the
in-memory catalog of a few files (a query image); an ingest keeps its catalog in the store
(embedstore/catalog/) and plans each series with `catalog_of_scanned` from there.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from embedstore.errors import DECODE_ERROR, InputError, SourceUnavailableError, UsageError
from embedstore.sources.codec_output import CodecOutput, captured_output, with_output
from embedstore.sources.dicom import DicomHeader, read_header
from embedstore.sources.dicomweb import is_dicomweb, read_remote_header
from embedstore.sources.objects import is_object, read_object_header, scanned_object
from embedstore.sources.discover import FoundFile
from embedstore.sources.limits import DEFAULT_MAX_PIXELS
from embedstore.sources.nifti import NiftiLayout, nifti_layout, volume_items
from embedstore.sources.raster import RasterLayout, raster_layout, raster_tasks
from embedstore.sources.records import Failure, ReadTask, SliceItem
from embedstore.sources.series import series_items

# What `--modality` may declare for NIfTI and raster sources (DICOM Modality codes).
MODALITIES = ("CT", "MR", "CR", "DX", "MG", "US", "PT", "NM", "XA", "OT")


@dataclass
class Catalog:
    tasks: list[ReadTask] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return sum(len(task.items) for task in self.tasks)


def declared_modality(modality: str | None) -> str | None:
    """A `--modality` value in upper case; UsageError for one outside MODALITIES."""
    if modality is None:
        return None
    if modality.upper() not in MODALITIES:
        raise UsageError(f"unknown modality {modality!r}: use one of {', '.join(MODALITIES)}")
    return modality.upper()


def scan_file(found: FoundFile, axis: str = "axial",
              max_pixels: int = DEFAULT_MAX_PIXELS) -> DicomHeader | NiftiLayout | RasterLayout | Failure:
    """The catalog facts of a file from its header: DICOM attributes, NIfTI slice geometry along
    `axis`, raster page sizes (each checked against `max_pixels`).
    What the readers print (pydicom's warnings on odd values) goes into a failure's message, or
    nowhere: never onto the terminal. A DICOM header is parsed by pydicom alone, which only warns:
    catching its warnings is enough, and pointing descriptor 2 at a temporary file per header
    would cost more than the read itself."""
    if found.kind == "dicom":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scanned = _read_facts(found, axis, max_pixels)
        output = CodecOutput([f"{w.category.__name__}: {w.message}" for w in caught])
    else:
        with captured_output() as output:
            scanned = _read_facts(found, axis, max_pixels)
    if isinstance(scanned, Failure):
        scanned.message = with_output(scanned.message, output)
    return scanned


def _read_facts(found: FoundFile, axis: str, max_pixels: int) -> DicomHeader | NiftiLayout | RasterLayout | Failure:
    try:
        if is_object(found.path):
            if found.kind == "dicom":
                return read_object_header(found, max_pixels)
            return scanned_object(found, lambda local: _read_facts(local, axis, max_pixels))
        if found.kind == "dicom":
            if is_dicomweb(found.path):
                return read_remote_header(found.path, max_pixels)
            return read_header(found.path, max_pixels)
        if found.kind == "raster":
            return raster_layout(found.path, max_pixels)
        return nifti_layout(found.path, axis, max_pixels)
    except InputError as error:
        return Failure(found.path, "read", error.reason, error.message)
    except SourceUnavailableError:  # no fault of this file's: the run stops
        raise
    except Exception as error:  # a reader bug or an odd file must not end the run
        return Failure(found.path, "read", DECODE_ERROR, f"{type(error).__name__}: {error}")


def build_catalog(files: list[FoundFile], axis: str = "axial", max_pixels: int = DEFAULT_MAX_PIXELS,
                  modality: str | None = None) -> Catalog:
    """Read tasks for every slice in `files`; NIfTI volumes are cut along `axis`; NIfTI and raster
    items get the declared `modality`."""
    return catalog_of_scanned(((found, scan_file(found, axis, max_pixels)) for found in files), axis, modality)


def catalog_of_scanned(scanned_files: Iterable[tuple[FoundFile, DicomHeader | NiftiLayout | RasterLayout | Failure]],
                       axis: str = "axial", modality: str | None = None) -> Catalog:
    """Read tasks from header facts already read: DICOM files grouped into series and ordered, a
    SOP instance held by several files read from the first (the others its alternates)."""
    catalog = Catalog()
    dicom_series: dict[str, list[DicomHeader]] = defaultdict(list)
    alternates: dict[str, list[str]] = defaultdict(list)  # SOPInstanceUID → later files holding it
    for found, scanned in scanned_files:
        if isinstance(scanned, Failure):
            catalog.failures.append(scanned)
        elif found.kind == "dicom":
            if scanned.sop_uid in alternates:
                alternates[scanned.sop_uid].append(found.path)
                continue
            alternates[scanned.sop_uid] = []
            dicom_series[scanned.series_uid].append(scanned)
        elif found.kind == "raster":
            catalog.tasks.extend(raster_tasks(scanned, modality))
        else:
            catalog.tasks.append(ReadTask("nifti", found.path, volume_items(scanned, modality), axis=axis))
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
