"""Stored vectors as one contiguous matrix: the input of every query and evaluation.

A feature is `cls`, `patch_mean` or `cls+patch_mean` (the two concatenated, the reference study's
usual linear-probe input). Vectors come from one model only: rows of different model ids are never
mixed, and a store holding several models needs the model named.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from embedstore.errors import UsageError
from embedstore.store import Store, sql_literal

FEATURES = ("cls", "patch_mean", "cls+patch_mean")
LEVELS = ("slice", "series")
# Columns carried beside the vectors, for joins with labels and for results.
SLICE_COLUMNS = ["key", "path", "patient_id", "study_uid", "series_uid", "sop_uid", "slice_index", "modality"]
SERIES_COLUMNS = ["key", "patient_id", "study_uid", "series_uid", "modality", "n_slices"]


@dataclass
class Vectors:
    model_id: str
    feature: str
    level: str
    rows: pa.Table  # the identity columns, one row per vector
    matrix: np.ndarray  # (n, D) float32, C-contiguous, in the order of `rows`

    def __len__(self) -> int:
        return len(self.matrix)


def resolve_model_id(store: Store, model_id: str | None) -> str:
    models = sorted(set(store.rows("slices", columns=["model_id"]).column("model_id").to_pylist())) \
        if store.has_table("slices") else []
    if not models:
        raise UsageError(f"store {store.path} holds no embeddings yet")
    if model_id is None:
        if len(models) > 1:
            raise UsageError(f"store {store.path} holds {len(models)} models; name one with --model-id: "
                             + ", ".join(models))
        return models[0]
    if model_id not in models:
        raise UsageError(f"model {model_id} is not in store {store.path}; it holds: {', '.join(models)}")
    return model_id


def load_vectors(store: Store, model_id: str | None = None, feature: str = "cls", level: str = "slice",
                 where: str | None = None) -> Vectors:
    """One model's vectors at slice level, or series level (the mean of each series' slice
    vectors, as the `series` table stores them). `where` is an already validated filter."""
    if feature not in FEATURES:
        raise UsageError(f"feature must be one of {', '.join(FEATURES)}, not {feature!r}")
    if level not in LEVELS:
        raise UsageError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    model_id = resolve_model_id(store, model_id)
    parts = feature.split("+")
    table, identity = ("slices", SLICE_COLUMNS) if level == "slice" else ("series", SERIES_COLUMNS)
    condition = f"model_id = {sql_literal(model_id)}" + (f" AND ({where})" if where else "")
    rows = store.rows(table, condition, identity + parts)
    if not rows.num_rows:
        raise UsageError(f"no {level} vectors of model {model_id} match" + (f" {where}" if where else ""))
    rows = rows.sort_by("key")  # a stable order, whatever the fragments' order on disk
    matrix = np.concatenate([column_matrix(rows.column(part)) for part in parts], axis=1)
    return Vectors(model_id, feature, level, rows.select(identity), np.ascontiguousarray(matrix, dtype=np.float32))


def column_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as an (n, D) array: without a copy where Arrow's buffer allows."""
    array = column.combine_chunks()
    dim = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def l2_normalised(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)
