"""Series rows, recomputed at the end of a run for each series whose slice count changed:
- `series`: what the series is (its first slice's identity and metadata) and how evenly its
  stored slices are spaced, once whatever the number of models;
- `series-<model_id>`: the mean of the series' slice vectors, per model (the reference study's 3D
  classification input).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from embedstore.models.spec import ModelSpec, cls_column
from embedstore.sources.series import spacing_stats
from embedstore.store import Store, among
from embedstore.store.schema import (
    SERIES_SCHEMA,
    SERIES_SEARCH_COLUMNS,
    model_series_schema,
    series_table_name,
    slices_table_name,
)
from embedstore.store.vectors import column_matrix

REFRESH_GROUP = 512  # series read back per query
SERIES_IDENTITY = ("patient_id", "study_uid", "modality", "body_part", "series_description", "study_date",
                   "pixel_spacing")
SPACING_COLUMNS = ("slice_spacing", "spacing_deviation", "spacing_deviation_rel", "n_missing_slices",
                   "uneven_spacing")


def refresh_series(store: Store, model_ids: list[str]) -> None:
    for uids in groups(stale(store, "items", "series", "series_uid")):
        slices = store.rows("items", in_series(uids), ["series_uid", "slice_index", *SERIES_IDENTITY,
                                                       "slice_position"])
        store.upsert("series", series_rows(slices), key="series_uid")
    for model_id in model_ids:
        spec = store.spec(model_id)
        for uids in groups(stale(store, slices_table_name(model_id), series_table_name(model_id), "key")):
            columns = ["series_uid", "slice_index", *vector_columns(spec)]
            slices = store.rows(slices_table_name(model_id), in_series(uids), columns)
            described = store.rows("series", in_series(uids), ["series_uid", *SERIES_SEARCH_COLUMNS])
            store.upsert(series_table_name(model_id), model_series_rows(spec, slices, described))


def vector_columns(spec: ModelSpec) -> list[str]:
    return ["cls", "patch_mean", *(cls_column(block) for block in spec.cls_layers)]


def stale(store: Store, slices_table: str, series_table: str, series_key: str) -> list[str]:
    """Series whose row in `series_table` is missing or counts a different number of slices."""
    slices = store.rows(slices_table, columns=["series_uid"])
    if not slices.num_rows:
        return []
    counts = slices.group_by("series_uid").aggregate([("series_uid", "count")])
    have = dict(zip(counts["series_uid"].to_pylist(), counts["series_uid_count"].to_pylist()))
    series = store.rows(series_table, columns=[series_key, "n_slices"])
    recorded = dict(zip(series[series_key].to_pylist(), series["n_slices"].to_pylist())) if series.num_rows else {}
    return sorted(uid for uid, n in have.items() if recorded.get(uid) != n)


def groups(uids: list[str]):
    for start in range(0, len(uids), REFRESH_GROUP):
        yield uids[start:start + REFRESH_GROUP]


def in_series(uids: list[str]) -> str:
    return among("series_uid", uids)


def ordered_groups(slices: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """Slices sorted by series then position; the unique series, their starts and their sizes."""
    slices = slices.sort_by([("series_uid", "ascending"), ("slice_index", "ascending")])
    uids = slices.column("series_uid").to_numpy(zero_copy_only=False)
    unique, starts, counts = np.unique(uids, return_index=True, return_counts=True)
    return slices, unique, starts, counts


def series_rows(slices: pa.Table) -> pa.Table:
    """One `series` row per series: its first slice's identity, spacing measured from the positions."""
    slices, unique, starts, counts = ordered_groups(slices)
    positions = slices.column("slice_position").to_numpy(zero_copy_only=False)
    spacing = [spacing_stats(list(positions[start:start + n])) for start, n in zip(starts, counts)]
    first = slices.take(pa.array(starts))
    columns = {
        "series_uid": list(unique), **{name: first.column(name) for name in SERIES_IDENTITY},
        "n_slices": pa.array(counts, pa.int32()),
        **{name: [getattr(stats, name) for stats in spacing] for name in SPACING_COLUMNS},
    }
    return pa.table({name: columns[name] for name in SERIES_SCHEMA.names}, schema=SERIES_SCHEMA)


def model_series_rows(spec: ModelSpec, slices: pa.Table, described: pa.Table) -> pa.Table:
    """One `series-<model_id>` row per series: the mean of each vector column over its slices."""
    slices, unique, starts, counts = ordered_groups(slices)
    by_uid = {row["series_uid"]: row for row in described.to_pylist()}
    columns = {"key": list(unique), "series_uid": list(unique), "n_slices": pa.array(counts, pa.int32()),
               **{name: [by_uid[uid][name] for uid in unique] for name in SERIES_SEARCH_COLUMNS}}
    for name in vector_columns(spec):
        means = np.add.reduceat(column_matrix(slices.column(name)), starts, axis=0) / counts[:, None]
        flat = pa.array(np.ascontiguousarray(means, dtype=np.float32).ravel())
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, spec.embed_dim)
    schema = model_series_schema(spec)
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)
