"""Catalog rows: what a header read yields, as a `files` row (store/schema.py FILES_SCHEMA), and back.

Header facts go to the store as they are read and come back from it to plan the embedding, so one
conversion each way keeps the two in step. PatientIDs are pseudonymised here, before a row leaves the
process that read the header: the `files` table holds what the store's items hold.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from embedstore.sources.dicom import DicomHeader
from embedstore.sources.discover import FoundFile
from embedstore.sources.nifti import NiftiLayout, slice_count
from embedstore.sources.raster import RasterLayout
from embedstore.sources.records import Failure
from embedstore.store.privacy import pseudonymise
from embedstore.store.schema import FILES_SCHEMA

HEADER_TEXT = ("sop_uid", "series_uid", "study_uid", "modality", "body_part", "series_description", "study_date")


@dataclass(frozen=True)
class RowSettings:
    """What every header reader needs to turn what it read into rows (picklable: sent to workers)."""

    run_id: str
    patient_key: bytes | None  # None: the store keeps PatientIDs as read


def reader_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def file_row(found: FoundFile, scanned: DicomHeader | NiftiLayout | RasterLayout | Failure,
             settings: RowSettings, reader: str) -> dict:
    """One `files` row: the file's identity, and its header facts or why it has none."""
    row = {"path": found.path, "size": found.size, "mtime_ns": found.mtime_ns, "kind": found.kind,
           "catalog_run": settings.run_id, "reader": reader}
    if isinstance(scanned, Failure):
        return {**row, "reason": scanned.reason, "message": scanned.message[:2000]}
    if isinstance(scanned, DicomHeader):
        return {**row, **dicom_facts(scanned, settings.patient_key)}
    if isinstance(scanned, RasterLayout):
        return {**row, "n_frames": len(scanned.page_sizes), "layout": json.dumps({"page_sizes": scanned.page_sizes})}
    return {**row, "n_frames": scanned.n_volumes,
            "layout": json.dumps({"shape": list(scanned.shape), "affine": scanned.affine.tolist(),
                                  "n_volumes": scanned.n_volumes})}


def dicom_facts(header: DicomHeader, patient_key: bytes | None) -> dict:
    patient = header.patient_id
    if patient is not None and patient_key is not None:
        patient = pseudonymise(patient, patient_key)
    return {**{name: getattr(header, name) for name in HEADER_TEXT}, "patient_id": patient,
            "rows": header.rows, "cols": header.cols, "n_frames": header.n_frames,
            "instance_number": _int32(header.instance_number),
            "pixel_spacing": list(header.pixel_spacing) if header.pixel_spacing else None,
            "slice_thickness": header.slice_thickness,
            "positions": [list(p) if p else None for p in header.positions],
            "orientations": [list(o) if o else None for o in header.orientations]}


def _int32(value: int | None) -> int | None:
    """An InstanceNumber that fits the column (IS values can be out of range; they only order slices)."""
    return value if value is None or -2**31 <= value < 2**31 else None


def rows_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=FILES_SCHEMA)


def header_of(row: dict) -> DicomHeader:
    """The DicomHeader a `files` row was made from (PatientID as stored)."""
    return DicomHeader(
        path=row["path"], sop_uid=row["sop_uid"], series_uid=row["series_uid"], study_uid=row["study_uid"],
        patient_id=row["patient_id"], modality=row["modality"], rows=row["rows"], cols=row["cols"],
        n_frames=row["n_frames"], instance_number=row["instance_number"],
        orientations=[tuple(o) if o is not None else None for o in row["orientations"]],
        positions=[tuple(p) if p is not None else None for p in row["positions"]],
        body_part=row["body_part"], series_description=row["series_description"], study_date=row["study_date"],
        pixel_spacing=tuple(row["pixel_spacing"]) if row["pixel_spacing"] is not None else None,
        slice_thickness=row["slice_thickness"],
    )


def raster_layout_of(row: dict) -> RasterLayout:
    return RasterLayout(row["path"], [tuple(size) for size in json.loads(row["layout"])["page_sizes"]])


def nifti_layout_of(row: dict, axis: str) -> NiftiLayout:
    """The layout along `axis` of a NIfTI file catalogued along any axis: the grid is canonical."""
    layout = json.loads(row["layout"])
    shape = tuple(layout["shape"])
    return NiftiLayout(row["path"], axis, slice_count(shape, axis), layout["n_volumes"], shape,
                       np.array(layout["affine"]))
