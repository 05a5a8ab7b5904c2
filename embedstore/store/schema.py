"""Arrow schemas of the store's tables (the public contract in docs/store-format.md).

Format 3 keeps what a slice *is* apart from what a model *made of it*:
- `items`: one row per slice or frame, written once whatever the number of models;
- `series`: one row per series (geometry and spacing, measured from the items);
- `models`: one row per model, its spec (models/spec.py);
- `slices-<model_id>` and `series-<model_id>`: one model's vectors, any width, in tables of their
  own, so adding or dropping a model never rewrites another model's files. They carry a copy of the
  few metadata columns a `--where` filters on and a result shows, so a filtered ANN search is one
  table's prefilter rather than a join (LanceDB has none) or an `IN` list of keys.
"""

from __future__ import annotations

import pyarrow as pa

from embedstore.models.spec import ModelSpec, cls_column

# Bump on any incompatible change to the tables or the patch layout; readers refuse other versions.
STORE_FORMAT_VERSION = 3  # 3: items once, a table pair per model, model specs, multi-layer features

SLICES_PREFIX = "slices-"
SERIES_PREFIX = "series-"


def slices_table_name(model_id: str) -> str:
    return SLICES_PREFIX + model_id


def series_table_name(model_id: str) -> str:
    return SERIES_PREFIX + model_id


def vector(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def mm_list(size: int) -> pa.DataType:
    return pa.list_(pa.float64(), size)


# Copied beside every model's vectors: what `--where` filters on and what a search result shows.
SEARCH_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    pa.field("patient_id", pa.string()),
    pa.field("study_uid", pa.string(), nullable=False),
    pa.field("series_uid", pa.string(), nullable=False),
    pa.field("sop_uid", pa.string()),
    pa.field("slice_index", pa.int32(), nullable=False),
    pa.field("modality", pa.string()),
    pa.field("body_part", pa.string()),
    pa.field("series_description", pa.string()),
    pa.field("study_date", pa.string()),  # YYYY-MM-DD
]
SEARCH_COLUMNS = tuple(f.name for f in SEARCH_FIELDS)

ITEMS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # the item_id: dicom:<SOPInstanceUID>:<frame>, ...
    *SEARCH_FIELDS,
    pa.field("frame", pa.int32(), nullable=False),
    pa.field("rows", pa.int32(), nullable=False),
    pa.field("cols", pa.int32(), nullable=False),
    pa.field("pixel_spacing", mm_list(2)),  # mm between rows, between columns
    pa.field("slice_thickness", pa.float64()),
    pa.field("image_position", mm_list(3)),  # LPS mm of the first pixel (ImagePositionPatient)
    pa.field("image_orientation", mm_list(6)),  # row, column direction cosines
    pa.field("slice_position", pa.float64()),  # mm along the slice normal
    pa.field("run_id", pa.string(), nullable=False),  # the run that first embedded it
    pa.field("kind", pa.string()),  # the reader its file needs: dicom | nifti | raster
    pa.field("axis", pa.string()),  # a NIfTI slice's slicing axis (axial, coronal, sagittal); null otherwise
])
ITEM_COLUMNS = tuple(ITEMS_SCHEMA.names)
ITEM_READER_COLUMNS = ("kind", "axis")  # added to format 3 after its first release: `embedstore migrate` adds them

SERIES_SCHEMA = pa.schema([
    pa.field("series_uid", pa.string(), nullable=False),
    pa.field("patient_id", pa.string()),
    pa.field("study_uid", pa.string(), nullable=False),
    pa.field("modality", pa.string()),
    pa.field("body_part", pa.string()),
    pa.field("series_description", pa.string()),
    pa.field("study_date", pa.string()),
    pa.field("pixel_spacing", mm_list(2)),
    pa.field("n_slices", pa.int32(), nullable=False),  # items stored
    pa.field("slice_spacing", pa.float64()),  # median gap between slice positions, mm
    pa.field("spacing_deviation", pa.float64()),  # largest departure from it, mm
    pa.field("spacing_deviation_rel", pa.float64()),  # the same over the spacing (ITK's test: 1e-4)
    pa.field("n_missing_slices", pa.int32(), nullable=False),
    pa.field("uneven_spacing", pa.bool_(), nullable=False),  # deviation over dcm2niix's 0.2 mm
])
# Series columns copied beside a model's series vectors (filters and results).
SERIES_SEARCH_COLUMNS = ("patient_id", "study_uid", "modality", "body_part", "series_description", "study_date")


def vector_fields(spec: ModelSpec) -> list[pa.Field]:
    dim = spec.embed_dim
    return [pa.field("cls", vector(dim), nullable=False), pa.field("patch_mean", vector(dim), nullable=False),
            *(pa.field(cls_column(block), vector(dim), nullable=False) for block in spec.cls_layers)]


def model_slices_schema(spec: ModelSpec) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),  # the item_id
        *SEARCH_FIELDS,
        pa.field("intensity", pa.string(), nullable=False),  # e.g. ct:study, mr:p5-95, voi+inverted
        *vector_fields(spec),
        pa.field("patch_shard", pa.string()),  # Zarr group under patches/, null without patches
        pa.field("patch_offset", pa.int64()),
        pa.field("run_id", pa.string(), nullable=False),
    ])


# SHA-256 of the row's other columns (store/digests.py), set at commit; null in rows written before it
# existed (stores migrated from format 2 gain the column at their first ingest).
ROW_DIGEST = pa.field("row_digest", pa.string())


def with_row_digest(schema: pa.Schema) -> pa.Schema:
    """A model's slices table as stored: its columns, then `row_digest`."""
    return schema.append(ROW_DIGEST)


def model_series_schema(spec: ModelSpec) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),  # the series_uid
        pa.field("series_uid", pa.string(), nullable=False),
        *(SERIES_SCHEMA.field(name) for name in SERIES_SEARCH_COLUMNS),
        pa.field("n_slices", pa.int32(), nullable=False),  # slices of this model averaged
        *vector_fields(spec),
    ])


MODELS_SCHEMA = pa.schema([
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("timm_name", pa.string(), nullable=False),
    pa.field("weights_source", pa.string(), nullable=False),
    pa.field("weights_digest", pa.string(), nullable=False),
    pa.field("weights_file", pa.string()),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("image_size", pa.int32(), nullable=False),
    pa.field("patch_size", pa.int32(), nullable=False),
    pa.field("grid_h", pa.int32(), nullable=False),
    pa.field("grid_w", pa.int32(), nullable=False),
    pa.field("num_prefix_tokens", pa.int32(), nullable=False),
    pa.field("embed_dim", pa.int32(), nullable=False),
    pa.field("num_blocks", pa.int32(), nullable=False),
    pa.field("mean", pa.list_(pa.float64()), nullable=False),
    pa.field("std", pa.list_(pa.float64()), nullable=False),
    pa.field("interpolation", pa.string(), nullable=False),
    pa.field("window", pa.string(), nullable=False),
    pa.field("mr_percentiles", pa.list_(pa.float64()), nullable=False),
    pa.field("preprocess_version", pa.int32(), nullable=False),
    pa.field("cls_layers", pa.list_(pa.int32()), nullable=False),
    pa.field("patch_layers", pa.list_(pa.int32()), nullable=False),
    pa.field("embedstore_version", pa.string(), nullable=False),
])

# The catalog (embedstore/catalog/): one row per file found under an ingest's sources, with what
# its header says, written as headers are read. A rerun reads again only files whose size or mtime
# changed; `reason` is set (and the header columns null) for a file whose header could not be used.
FILES_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("mtime_ns", pa.int64(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # dicom | nifti | raster
    pa.field("reason", pa.string()),  # a failure's reason code; null for a usable header
    pa.field("message", pa.string()),
    pa.field("sop_uid", pa.string()),
    pa.field("series_uid", pa.string()),  # as in the header: ingest may split it by geometry
    pa.field("study_uid", pa.string()),
    pa.field("patient_id", pa.string()),  # pseudonymised as the store's items are
    pa.field("modality", pa.string()),
    pa.field("body_part", pa.string()),
    pa.field("series_description", pa.string()),
    pa.field("study_date", pa.string()),  # YYYY-MM-DD
    pa.field("rows", pa.int32()),
    pa.field("cols", pa.int32()),
    pa.field("n_frames", pa.int32()),  # DICOM frames; raster pages; NIfTI volumes
    pa.field("instance_number", pa.int32()),
    pa.field("pixel_spacing", pa.list_(pa.float64())),
    pa.field("slice_thickness", pa.float64()),
    pa.field("positions", pa.list_(pa.list_(pa.float64()))),  # ImagePositionPatient per frame
    pa.field("orientations", pa.list_(pa.list_(pa.float64()))),  # ImageOrientationPatient per frame
    pa.field("layout", pa.string()),  # JSON: NIfTI grid and affine, raster page sizes
    pa.field("catalog_run", pa.string(), nullable=False),  # the run that read the header
    pa.field("reader", pa.string(), nullable=False),  # host:pid of the process that read it
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
    pa.field("model_ids", pa.list_(pa.string()), nullable=False),
    pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("ended_at", pa.timestamp("us", tz="UTC")),
    pa.field("config", pa.string(), nullable=False),  # JSON
    pa.field("n_embedded", pa.int64()),  # slices embedded, summed over models
    pa.field("n_skipped", pa.int64()),
    pa.field("n_failed", pa.int64()),
    pa.field("slices_per_s", pa.float64()),
    pa.field("stage_seconds", pa.string()),  # JSON: stage → seconds
])
