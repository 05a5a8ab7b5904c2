"""Similarity search over stored vectors: by a stored slice, a stored series, or an image file
embedded on the fly with the store's own model and preprocessing.

Levels:
- `slice` and `series`: cosine similarity between the query vector and each stored slice (or
  series) vector. A query of several slices (a series, a volume file) is pooled to its mean first.
- `study`: a study's score is the best match of each query slice among the study's slices,
  averaged over the query slices (so a study that contains every query slice's look-alike ranks
  first, however many other slices it has).
The query's own slice, series or study is left out of its results. Slice and series search use
the column's ANN index when `embedstore index` built one, and exact search otherwise (and always
for the study level).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from embedstore.errors import UsageError
from embedstore.search.exact import exact_top_k
from embedstore.search.index import ann_search, index_for, model_condition
from embedstore.store.vectors import FEATURES, Vectors, l2_normalised, load_vectors, resolve_model_id
from embedstore.search.where import validated_where
from embedstore.store import Store, sql_literal

LEVELS = ("slice", "series", "study")


@dataclass
class Hit:
    rank: int
    similarity: float
    level: str
    key: str  # slice key, series key, or the study UID
    study_uid: str
    series_uid: str | None
    path: str | None
    slice_index: int | None
    modality: str | None


@dataclass
class Query:
    description: str
    model_id: str
    vectors: np.ndarray  # (n, D): the query's slices (one row for a single slice or a series vector)
    own_key: str | None = None  # left out of slice results
    own_series: str | None = None
    own_study: str | None = None


def search(store: Store, query: Query, k: int = 10, level: str = "slice", feature: str = "cls",
           where: str | None = None) -> list[Hit]:
    if level not in LEVELS:
        raise UsageError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    if k < 1:
        raise UsageError("--k must be at least 1")
    table = "series" if level == "series" else "slices"
    condition = validated_where(where, store.table(table).schema.names) if where else None
    pooled = query.vectors.mean(0, keepdims=True)
    own = query.own_key if level == "slice" else query.own_series
    index = index_for(store, table, feature) if level != "study" else None
    if index is not None:
        return _search_index(store, table, feature, pooled[0], k, index, level, query.model_id, condition, own)
    candidates = load_vectors(store, query.model_id, feature, "series" if level == "series" else "slice", condition)
    if level == "study":
        return _rank_studies(query, candidates, k)
    keep = np.array([_identity(candidates, level, i) != own for i in range(len(candidates))]) if own else None
    matrix, rows = (candidates.matrix[keep], candidates.rows.filter(keep)) if keep is not None else \
        (candidates.matrix, candidates.rows)
    if not len(matrix):
        return []
    scores, indices = exact_top_k(pooled, matrix, k)
    table_rows = rows.to_pylist()
    return [_hit(rank, float(score), level, table_rows[i]) for rank, (score, i) in
            enumerate(zip(scores[0], indices[0]), 1)]


def _search_index(store: Store, table: str, column: str, vector: np.ndarray, k: int, index, level: str,
                  model_id: str, condition: str | None, own: str | None) -> list[Hit]:
    """The ANN index's answer (the query's own item asked for and dropped)."""
    where = " AND ".join(f"({part})" for part in (model_condition(store, table, model_id), condition) if part) or None
    rows = ann_search(store, table, column, vector, k + (1 if own else 0), index, where)
    identity = "key" if level == "slice" else "series_uid"
    rows = [row for row in rows if row[identity] != own][:k]
    return [_hit(rank, 1.0 - float(row["_distance"]), level, row) for rank, row in enumerate(rows, 1)]


def _identity(vectors: Vectors, level: str, row: int) -> str:
    column = "key" if level == "slice" else "series_uid"
    return vectors.rows.column(column)[row].as_py()


def _hit(rank: int, similarity: float, level: str, row: dict) -> Hit:
    return Hit(rank, similarity, level, row["key"], row["study_uid"], row.get("series_uid"), row.get("path"),
               row.get("slice_index"), row.get("modality"))


def _rank_studies(query: Query, slices: Vectors, k: int) -> list[Hit]:
    studies = np.array(slices.rows.column("study_uid").to_pylist(), dtype=object)
    keep = studies != query.own_study if query.own_study else np.ones(len(studies), dtype=bool)
    studies, matrix = studies[keep], l2_normalised(slices.matrix[keep])
    if not len(studies):
        return []
    order = np.argsort(studies, kind="stable")
    names, starts = np.unique(studies[order], return_index=True)
    similarity = l2_normalised(query.vectors) @ matrix[order].T  # (query slices, stored slices): a query is small
    best_per_query_slice = np.maximum.reduceat(similarity, starts, axis=1)  # (query slices, studies)
    scores = best_per_query_slice.mean(0)
    top = np.argsort(-scores, kind="stable")[:k]
    modality = slices.rows.column("modality").to_numpy(zero_copy_only=False)[keep][order][starts]
    return [Hit(rank, float(scores[i]), "study", str(names[i]), str(names[i]), None, None, None, modality[i])
            for rank, i in enumerate(top, 1)]


# ------------------------------------------------------------------------------------- queries

def query_by_key(store: Store, key: str, feature: str = "cls") -> Query:
    found = store.rows("slices", f"key = {sql_literal(key)}", ["model_id", "series_uid", "study_uid"])
    if not found.num_rows:
        raise UsageError(f"no slice with key {key!r} in store {store.path}")
    row = found.to_pylist()[0]
    vectors = load_vectors(store, row["model_id"], feature, where=f"key = {sql_literal(key)}")
    return Query(f"slice {key}", row["model_id"], vectors.matrix, key, row["series_uid"], row["study_uid"])


def query_by_series(store: Store, series_uid: str, feature: str = "cls", model_id: str | None = None) -> Query:
    model_id = resolve_model_id(store, model_id)
    try:
        vectors = load_vectors(store, model_id, feature, where=f"series_uid = {sql_literal(series_uid)}")
    except UsageError:
        raise UsageError(f"no series {series_uid!r} of model {model_id} in store {store.path}") from None
    study = vectors.rows.column("study_uid")[0].as_py()
    return Query(f"series {series_uid} ({len(vectors)} slices)", model_id, vectors.matrix, None, series_uid, study)


def query_by_image(store: Store, path: str | Path, feature: str = "cls", model_id: str | None = None) -> Query:
    """The file's slices embedded with the model and preprocessing the store's vectors came from
    (read back from that model's latest run)."""
    from embedstore.pipeline.batching import SliceBatcher
    from embedstore.models import load_model
    from embedstore.models.embedder import Embedder
    from embedstore.preprocess import IntensityConfig, decode_task
    from embedstore.sources import build_catalog, check_sources, discover

    model_id = resolve_model_id(store, model_id)
    runs = store.rows("runs", f"model_id = {sql_literal(model_id)}", ["started_at", "config"])
    if not runs.num_rows:
        raise UsageError(f"store {store.path} has no run record of model {model_id}: cannot rebuild it")
    config = json.loads(runs.sort_by([("started_at", "descending")]).column("config")[0].as_py())
    loaded = load_model(config["model"], config["weights"], config["image_size"], config["seed"])
    intensity = IntensityConfig(window=config["window"], mr_percentiles=tuple(config["mr_percentiles"]))
    if loaded.model_id(intensity.tag()) != model_id:
        raise UsageError(f"the model rebuilt from the run record is {loaded.model_id(intensity.tag())}, "
                         f"not {model_id}: were the weights changed?")
    found, failures = discover(check_sources([path]))
    catalog = build_catalog(found, axis=config.get("axis", "axial"))
    if failures or catalog.failures or not catalog.tasks:
        reason = (failures + catalog.failures)[0] if failures or catalog.failures else None
        raise UsageError(f"{path} cannot be embedded" + (f": {reason.reason}: {reason.message}" if reason else ""))
    batcher = SliceBatcher(max(1, catalog.n_items))
    for task in catalog.tasks:
        batcher.add(decode_task(task, intensity, loaded.image_size))
    embeddings = Embedder(loaded, engine="eager").embed(batcher.take()[1], keep_patches=False)
    parts = {"cls": embeddings.cls, "patch_mean": embeddings.patch_mean}
    vectors = np.concatenate([parts[p] for p in feature.split("+")], axis=1) if feature in FEATURES else None
    if vectors is None:
        raise UsageError(f"feature must be one of {', '.join(FEATURES)}, not {feature!r}")
    return Query(f"image {path} ({len(vectors)} slices)", model_id, vectors)


def hits_as_dicts(hits: list[Hit]) -> list[dict]:
    return [asdict(hit) for hit in hits]


# ------------------------------------------------------------------------- used by the demo

def nearest_slices(store: Store, key: str, k: int = 5, feature: str = "cls") -> list[Hit]:
    """The k slices most similar to the slice `key` (itself excluded), same model only."""
    return search(store, query_by_key(store, key, feature), k, "slice", feature)
