"""Arrow schemas of the store's tables (the public contract in docs/store-format.md)."""

from __future__ import annotations

import pyarrow as pa

# Bump on any incompatible change to the tables or the patch layout; readers refuse other versions.
STORE_FORMAT_VERSION = 1


def vector(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


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
