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
for the study level); a filter's selectivity decides how (search/plan.py), and the hits carry the
plan that ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from embedstore.errors import UsageError
from embedstore.search.index import ann_search, exact_search, index_for
from embedstore.search.plan import SearchPlan, choose_plan
from embedstore.search.where import validated_where
from embedstore.store import Store, equals
from embedstore.store.schema import series_table_name, slices_table_name
from embedstore.store.vector_cache import has_vector_cache
from embedstore.store.vectors import Vectors, feature_columns, l2_normalised, load_vectors

LEVELS = ("slice", "series", "study")


@dataclass
class Hit:
    rank: int
    similarity: float
    level: str
    key: str  # slice key, series key, or the study UID: what --key, --series-uid or --study-uid accepts
    study_uid: str
    series_uid: str | None
    path: str | None
    slice_index: int | None
    modality: str | None  # a study's modalities joined by "/"
    body_part: str | None = None
    series_description: str | None = None  # a study's distinct descriptions joined by "; "
    study_date: str | None = None
    n_slices: int | None = None  # series and study: slices stored (of those the filter kept)
    n_series: int | None = None  # study


# the metadata a result shows, beside its identity
DESCRIPTION_COLUMNS = ("body_part", "series_description", "study_date")


class Hits(list):
    """The hits of one search, best first (a list of Hit, or of search.regions.RegionHit), and `plan`:
    how the search ran."""

    def __init__(self, hits, plan: SearchPlan):
        super().__init__(hits)
        self.plan = plan


@dataclass
class Query:
    description: str
    model_id: str
    vectors: np.ndarray  # (n, D): the query's slices (one row for a single slice or a series vector)
    own_key: str | None = None  # left out of slice results
    own_series: str | None = None
    own_study: str | None = None


def image_description(image, columns: dict) -> str:
    """How a query by an image file is named in results: the file and its slice count."""
    n = len(columns["cls"])
    return f"image {image} ({n} slice{'s' * (n != 1)})"


def search(store: Store, query: Query, k: int = 10, level: str = "slice", feature: str = "cls",
           where: str | None = None) -> Hits:
    """The k best hits at `level` among the rows `where` keeps, and the plan that found them."""
    if level not in LEVELS:
        raise UsageError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    if k < 1:
        raise UsageError("--k must be at least 1")
    table, own = _table_and_own(query, level)
    condition = validated_where(where, store.schema(table)) if where else None
    index = index_for(store, table, feature) if level != "study" else None
    copied = index is not None and condition is not None and has_vector_cache(store, table, feature)
    plan = choose_plan(store, table, condition, index, copied)
    if not plan.rows_kept:
        return Hits([], plan)  # a filter that keeps no row: no result, not an error
    if level == "study":
        return Hits(_rank_studies(query, load_vectors(store, query.model_id, feature, "slice", condition,
                                                      DESCRIPTION_COLUMNS), k), plan)
    pooled, wanted = query.vectors.mean(0), k + (1 if own else 0)  # the query's own row asked for and dropped
    if plan.uses_index:
        rows = ann_search(store, table, feature, pooled, wanted, index, condition, nprobes=plan.nprobes)
    else:
        rows = exact_search(store, table, feature_columns(store.spec(query.model_id), feature), pooled, wanted,
                            condition, copied=plan.copied)
    identity = "key" if level == "slice" else "series_uid"
    rows = [row for row in rows if row[identity] != own][:k]
    return Hits([_hit(rank, 1.0 - float(row["_distance"]), level, row) for rank, row in enumerate(rows, 1)], plan)


def _table_and_own(query: Query, level: str) -> tuple[str, str | None]:
    """The table a search ranks (a study search ranks slices), and the query's own row there."""
    if level == "series":
        return series_table_name(query.model_id), query.own_series
    return slices_table_name(query.model_id), query.own_key


def _hit(rank: int, similarity: float, level: str, row: dict) -> Hit:
    return Hit(rank=rank, similarity=similarity, level=level, key=row["key"], study_uid=row["study_uid"],
               series_uid=row.get("series_uid"), path=row.get("path"), slice_index=row.get("slice_index"),
               modality=row.get("modality"), body_part=row.get("body_part"),
               series_description=row.get("series_description"), study_date=row.get("study_date"),
               n_slices=row.get("n_slices"))


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
    kept, ends = slices.rows.filter(pa.array(keep)), np.append(starts[1:], len(order))
    return [_study_hit(rank, float(scores[i]), str(names[i]), kept.take(pa.array(order[starts[i]:ends[i]])).to_pylist())
            for rank, i in enumerate(top, 1)]


def _study_hit(rank: int, similarity: float, study_uid: str, rows: list[dict]) -> Hit:
    """A study's hit, described from its slices' rows."""
    def distinct(column: str, separator: str) -> str | None:
        values = sorted({row[column] for row in rows if row.get(column)})
        return separator.join(values) if values else None

    return Hit(rank=rank, similarity=similarity, level="study", key=study_uid, study_uid=study_uid, series_uid=None,
               path=None, slice_index=None, modality=distinct("modality", "/"), body_part=distinct("body_part", "/"),
               series_description=distinct("series_description", "; "), study_date=distinct("study_date", ", "),
               n_slices=len(rows), n_series=len({row["series_uid"] for row in rows}))


# ------------------------------------------------------------------------------------- queries

def query_by_key(store: Store, key: str, feature: str = "cls", model_id: str | None = None) -> Query:
    """A stored slice (its item key, e.g. `dicom:<SOPInstanceUID>:0`) as the query."""
    model_id, vectors = _stored(store, model_id, feature, "key", key, "slice with key")
    row = vectors.rows.to_pylist()[0]
    return Query(f"slice {key}", model_id, vectors.matrix, key, row["series_uid"], row["study_uid"])


def query_by_series(store: Store, series_uid: str, feature: str = "cls", model_id: str | None = None) -> Query:
    """A stored series' slices as the query (pooled to their mean at slice and series level)."""
    model_id, vectors = _stored(store, model_id, feature, "series_uid", series_uid, "series")
    study = vectors.rows.column("study_uid")[0].as_py()
    return Query(f"series {series_uid} ({len(vectors)} slice{'s' * (len(vectors) != 1)})", model_id, vectors.matrix,
                 None, series_uid, study)


def query_by_study(store: Store, study_uid: str, feature: str = "cls", model_id: str | None = None) -> Query:
    """A stored study's slices as the query (pooled to their mean at slice and series level)."""
    model_id, vectors = _stored(store, model_id, feature, "study_uid", study_uid, "study")
    return Query(f"study {study_uid} ({len(vectors)} slice{'s' * (len(vectors) != 1)})", model_id, vectors.matrix,
                 None, None, study_uid)


def _stored(store: Store, model_id: str | None, feature: str, column: str, value: str, what: str):
    """(model id, the model's slice vectors whose `column` is `value`); UsageError naming them when none is."""
    model_id = store.resolve_model_id(model_id)
    feature_columns(store.spec(model_id), feature)  # a wrong feature says so, not "no such slice"
    try:
        return model_id, load_vectors(store, model_id, feature, where=equals(column, value))
    except UsageError:
        raise UsageError(f"no {what} {value!r} of model {model_id} in store {store.path}") from None


def query_by_vectors(store: Store, description: str, model_id: str, columns: dict[str, np.ndarray],
                     feature: str = "cls") -> Query:
    """A query from freshly embedded slices (`inference.embed`): stored-column name → (n, D)."""
    parts = feature_columns(store.spec(model_id), feature)
    return Query(description, model_id, np.concatenate([columns[part] for part in parts], axis=1))


def query_by_image(store: Store, image, feature: str = "cls", model_id: str | None = None) -> Query:
    """An image file as the query, embedded with the store's model and preprocessing."""
    from embedstore.inference.embed import embed_file  # torch and timm: only when an image is asked about

    model_id = store.resolve_model_id(model_id)
    columns = embed_file(store, image, model_id)
    return query_by_vectors(store, image_description(image, columns), model_id, columns, feature)


def query_by_matrix(store: Store, vector, feature: str = "cls", model_id: str | None = None) -> Query:
    """Vectors of one's own as the query: (D,) or (n, D) in the feature's width."""
    model_id = store.resolve_model_id(model_id)
    spec = store.spec(model_id)
    width = len(feature_columns(spec, feature)) * spec.embed_dim
    matrix = np.asarray(vector, dtype=np.float32)
    matrix = matrix.reshape(1, -1) if matrix.ndim == 1 else matrix
    if matrix.ndim != 2 or matrix.shape[1] != width or not len(matrix):
        raise UsageError(f"vector must have shape ({width},) or (n, {width}) for feature {feature} of model "
                         f"{model_id}, not {np.shape(vector)}")
    return Query("a given vector", model_id, matrix)


QUERIES = {"key": query_by_key, "series_uid": query_by_series, "study_uid": query_by_study,
           "image": query_by_image, "vector": query_by_matrix}


def query_for(store: Store, sources: dict[str, tuple[str, object]], feature: str = "cls",
              model_id: str | None = None) -> Query:
    """The query of the one source given. `sources` maps each way of asking a caller offers, named
    as the caller names it (--key, key, ...), to (kind, value), kind one of QUERIES; UsageError
    unless exactly one value is given."""
    given = [(kind, value) for kind, value in sources.values() if value is not None]
    if len(given) != 1:
        raise UsageError(f"give exactly one of {', '.join(sources)}")
    kind, value = given[0]
    return QUERIES[kind](store, value, feature, model_id)


def hits_as_dicts(hits: list[Hit]) -> list[dict]:
    return [asdict(hit) for hit in hits]


# ------------------------------------------------------------------------- used by the demo

def nearest_slices(store: Store, key: str, k: int = 5, feature: str = "cls", model_id: str | None = None) -> list[Hit]:
    """The k slices most similar to the slice `key` (itself excluded), same model only."""
    return search(store, query_by_key(store, key, feature, model_id), k, "slice", feature)
