"""Arrow schemas of the store's tables (the public contract in docs/store-format.md)."""

from __future__ import annotations

import pyarrow as pa

# Bump on any incompatible change to the tables or the patch layout; readers refuse other versions.
STORE_FORMAT_VERSION = 2  # 2: DICOM metadata and geometry, intensity, series spacing


def vector(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def mm_list(size: int) -> pa.DataType:
    return pa.list_(pa.float64(), size)


# Kept per slice (and, from the series' first slice, per series). No names or birth dates, ever.
METADATA_FIELDS = [
    pa.field("body_part", pa.string()),
    pa.field("series_description", pa.string()),
    pa.field("study_date", pa.string()),  # YYYY-MM-DD
    pa.field("pixel_spacing", mm_list(2)),  # mm between rows, between columns
]


def slices_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("patient_id", pa.string()),
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False),
        pa.field("sop_uid", pa.string()),
        pa.field("frame", pa.int32(), nullable=False),
        pa.field("slice_index", pa.int32(), nullable=False),
        pa.field("modality", pa.string()),
        pa.field("rows", pa.int32(), nullable=False),
        pa.field("cols", pa.int32(), nullable=False),
        *METADATA_FIELDS,
        pa.field("slice_thickness", pa.float64()),
        pa.field("image_position", mm_list(3)),  # LPS mm of the first pixel (ImagePositionPatient)
        pa.field("image_orientation", mm_list(6)),  # row, column direction cosines
        pa.field("slice_position", pa.float64()),  # mm along the slice normal
        pa.field("intensity", pa.string(), nullable=False),  # e.g. ct:study, mr:p5-95, voi+inverted
        pa.field("cls", vector(dim), nullable=False),
        pa.field("patch_mean", vector(dim), nullable=False),
        pa.field("patch_shard", pa.string()),
        pa.field("patch_offset", pa.int64()),
        pa.field("run_id", pa.string(), nullable=False),
    ])


def series_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string()),
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False),
        pa.field("modality", pa.string()),
        pa.field("n_slices", pa.int32(), nullable=False),
        *METADATA_FIELDS,
        pa.field("slice_spacing", pa.float64()),  # median gap between slice positions, mm
        pa.field("spacing_deviation", pa.float64()),  # largest departure from it, mm
        pa.field("spacing_deviation_rel", pa.float64()),  # the same over the spacing (ITK's test: 1e-4)
        pa.field("n_missing_slices", pa.int32(), nullable=False),
        pa.field("uneven_spacing", pa.bool_(), nullable=False),  # deviation over dcm2niix's 0.2 mm
        pa.field("cls", vector(dim), nullable=False),
        pa.field("patch_mean", vector(dim), nullable=False),
    ])


FAILURES_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
])

RUNS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("ended_at", pa.timestamp("us", tz="UTC")),
    pa.field("config", pa.string(), nullable=False),  # JSON
    pa.field("n_embedded", pa.int64()),
    pa.field("n_skipped", pa.int64()),
    pa.field("n_failed", pa.int64()),
    pa.field("slices_per_s", pa.float64()),
    pa.field("stage_seconds", pa.string()),  # JSON: stage → seconds
])
