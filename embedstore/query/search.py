"""Exact nearest-neighbour search over stored slice vectors (cosine similarity)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedstore.errors import UsageError
from embedstore.store import Store, sql_literal

FEATURES = ("cls", "patch_mean")


@dataclass
class Neighbour:
    key: str
    path: str
    series_uid: str
    slice_index: int
    modality: str | None
    similarity: float


def slice_vectors(store: Store, model_id: str, feature: str = "cls"):
    """(keys, metadata table, L2-normalised (n, D) float32 matrix) of one model's slices."""
    if feature not in FEATURES:
        raise UsageError(f"feature must be one of {', '.join(FEATURES)}, not {feature!r}")
    rows = store.rows("slices", f"model_id = {sql_literal(model_id)}",
                      ["key", "path", "series_uid", "slice_index", "modality", feature])
    if not rows.num_rows:
        raise UsageError(f"store {store.path} has no slices for model {model_id}")
    dim = rows.schema.field(feature).type.list_size
    matrix = rows.column(feature).combine_chunks().flatten().to_numpy().reshape(-1, dim)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return rows, matrix / np.where(norms > 0, norms, 1.0)


def nearest_slices(store: Store, key: str, k: int = 5, feature: str = "cls") -> list[Neighbour]:
    """The k slices most similar to the slice `key` (itself excluded), same model only."""
    found = store.rows("slices", f"key = {sql_literal(key)}", ["model_id"])
    if not found.num_rows:
        raise UsageError(f"no slice with key {key!r} in store {store.path}")
    rows, matrix = slice_vectors(store, found.column("model_id")[0].as_py(), feature)
    keys = rows.column("key").to_pylist()
    query = matrix[keys.index(key)]
    similarity = matrix @ query
    similarity[keys.index(key)] = -np.inf
    order = np.argsort(-similarity, kind="stable")[:k]
    return [
        Neighbour(keys[i], rows.column("path")[i].as_py(), rows.column("series_uid")[i].as_py(),
                  rows.column("slice_index")[i].as_py(), rows.column("modality")[i].as_py(),
                  float(similarity[i]))
        for i in order
    ]
