"""ANN indexes on the stored vectors (LanceDB), with parameters chosen from the table size and a
recall@10 measured against exact search before the index is trusted.

LanceDB's defaults give poor recall on embeddings (a published test measured 0.16). Here the default
is IVF_FLAT: about √n partitions holding the full vectors, so a probed partition is scored exactly
and recall depends only on the probes. At 1,000,000 × 384 it builds in about 70 s on 2 cores where
IVF_PQ takes over 1,000 s, and is as fast to search: fetching the result rows, not scanning the
partitions, is most of a query's time. Searches start at max(20, partitions / 50) probes, and the
probes are doubled until the measured recall@10 reaches 0.95. `ivf_sq` (int8 vectors, a quarter of
the size, 2× refine), `ivf_pq` (PQ with one sub-vector per 4 dimensions, 10× refine) and
`ivf_hnsw_sq` are there when the index must be smaller. Bitmap indexes on modality and body part
keep a filtered search's prefilter cheap. The parameters go into the store manifest with the
measured recall, and `embedstore search` uses them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from embedstore.errors import UsageError
from embedstore.search.degenerate import stored_feature_warning
from embedstore.search.exact import exact_top_k, unit_top_k
from embedstore.search.plan import choose_plan
from embedstore.store import Store, among
from embedstore.store.info import record_summary
from embedstore.store.schema import series_table_name, slices_table_name
from embedstore.store.vector_cache import has_vector_cache, read_unit_vectors, write_vector_cache
from embedstore.store.vectors import column_matrix, load_vectors

INDEX_TYPES = ("ivf_flat", "ivf_sq", "ivf_pq", "ivf_hnsw_sq")
INDEXABLE = ("cls", "patch_mean")
RECALL_QUERIES = 200
RECALL_K = 10
TARGET_RECALL = 0.95
EXACT_LATENCY_QUERIES = 20
# shares of the rows that `embedstore index` keeps with a filter on whole studies (a B-tree column)
# to report the recall of filtered searches, which their plans must hold too
FILTER_SHARES = (0.1, 0.01)
FILTERED_RECALL_QUERIES = 50
MIN_ROWS = 256  # below this an index gains nothing over exact search
# Low-cardinality columns `--where` filters on most: a bitmap index makes their prefilter a lookup.
FILTER_BITMAPS = ("modality", "body_part")
# a query by key, series or study finds its rows through a B-tree: 13 → 8 ms per query on 100k rows
LOOKUP_BTREES = ("key", "series_uid", "study_uid")


@dataclass
class IndexParameters:
    index_type: str
    num_partitions: int
    num_sub_vectors: int | None
    nprobes: int
    refine_factor: int | None


@dataclass
class IndexReport:
    table: str
    column: str
    rows: int
    parameters: IndexParameters
    build_seconds: float
    recall_at_10: float
    ann_p50_ms: float  # the index query: keys and distances of the top 10
    ann_rows_p50_ms: float  # the same, fetching the columns a search shows
    exact_p50_ms: float
    warnings: list[str] = field(default_factory=list)  # why its answers may mean little
    # recall@10 of filtered searches as their plan runs them: share, rows_kept, plan, recall_at_10
    filtered: list[dict] = field(default_factory=list)


def choose_parameters(n_rows: int, dim: int, index_type: str) -> IndexParameters:
    partitions = max(1, min(4096, int(round(math.sqrt(n_rows)))))
    nprobes = min(partitions, max(20, math.ceil(partitions / 50)))
    if index_type == "ivf_flat":
        return IndexParameters("ivf_flat", partitions, None, nprobes, refine_factor=None)
    if index_type == "ivf_sq":
        return IndexParameters("ivf_sq", partitions, None, nprobes, refine_factor=2)
    if index_type == "ivf_pq":
        sub_vectors = next(s for s in (dim // 4, dim // 8, dim // 16, 1) if s >= 1 and dim % s == 0)
        return IndexParameters("ivf_pq", partitions, sub_vectors, nprobes, refine_factor=10)
    return IndexParameters("ivf_hnsw_sq", max(1, partitions // 4), None, max(4, nprobes // 4), refine_factor=None)


def index_config(parameters: IndexParameters):
    from lancedb.index import IvfFlat, IvfHnswSq, IvfPq, IvfSq  # lancedb: only where an index is built

    partitions = parameters.num_partitions
    return {"ivf_flat": lambda: IvfFlat(distance_type="cosine", num_partitions=partitions),
            "ivf_sq": lambda: IvfSq(distance_type="cosine", num_partitions=partitions),
            "ivf_pq": lambda: IvfPq(distance_type="cosine", num_partitions=partitions,
                                    num_sub_vectors=parameters.num_sub_vectors),
            "ivf_hnsw_sq": lambda: IvfHnswSq(distance_type="cosine", num_partitions=partitions)}[parameters.index_type]()


@dataclass
class NoIndex:
    """What `build_index` says when a table is too small for an index to gain anything."""

    table: str
    rows: int

    @property
    def reason(self) -> str:
        return (f"{self.table} has {self.rows:,} rows: below {MIN_ROWS} exact search is as fast, so no index was "
                "built (searches stay exact)")


def build_index(store: Store, model_id: str | None = None, column: str = "cls", level: str = "slice",
                index_type: str = "ivf_flat") -> IndexReport | NoIndex:
    if index_type not in INDEX_TYPES:
        raise UsageError(f"--type must be one of {', '.join(INDEX_TYPES)}, not {index_type!r}")
    if column not in INDEXABLE:
        raise UsageError(f"--feature must be one of {', '.join(INDEXABLE)} to index, not {column!r}")
    model_id = store.resolve_model_id(model_id)
    table_name = series_table_name(model_id) if level == "series" else slices_table_name(model_id)
    n_rows = store.count(table_name)
    if n_rows < MIN_ROWS:
        return NoIndex(table_name, n_rows)
    from lancedb.index import Bitmap, BTree  # lancedb: only where an index is built

    table = store.table(table_name)
    dim = table.schema.field(column).type.list_size
    parameters = choose_parameters(n_rows, dim, index_type)
    started = time.perf_counter()
    table.create_index(column, config=index_config(parameters), replace=True)
    for name in FILTER_BITMAPS:
        if name in table.schema.names:
            table.create_index(name, config=Bitmap(), replace=True)
    for name in LOOKUP_BTREES:
        if name in table.schema.names:
            table.create_index(name, config=BTree(), replace=True)
    write_vector_cache(store, table_name, column)  # exact search among a selective filter's rows reads it
    build_seconds = time.perf_counter() - started
    report = measure_recall(store, model_id, table_name, column, parameters, n_rows, build_seconds)
    report.warnings = index_warnings(store, model_id, column, level, report.recall_at_10) + [
        f"filtered to {measured['share']:.1%} of the rows, recall@10 is {measured['recall_at_10']:.3f} with plan "
        f"{measured['plan']}: below {TARGET_RECALL}" for measured in report.filtered
        if measured["recall_at_10"] < TARGET_RECALL]
    remember_index(store, report)
    return report


def index_warnings(store: Store, model_id: str, column: str, level: str, recall: float) -> list[str]:
    """Degenerate vectors (an index on them, like exact search, ranks noise), and a recall that
    missed TARGET_RECALL even with every partition probed."""
    warnings = [stored_feature_warning(store, model_id, column, level)]
    if recall < TARGET_RECALL:
        warnings.append(f"recall@10 {recall:.3f} is below {TARGET_RECALL} with every partition probed: searches "
                        "through this index miss neighbours that exact search finds")
    return [warning for warning in warnings if warning]


RESULT_COLUMNS = {"slices": ["key", "path", "study_uid", "series_uid", "slice_index", "modality", "body_part",
                             "series_description", "study_date"],
                  "series": ["key", "study_uid", "series_uid", "modality", "body_part", "series_description",
                             "study_date", "n_slices"]}  # by table kind (its name's prefix)


def result_columns(table_name: str) -> list[str]:
    """The columns a search result shows, for a model's slices or series table."""
    return RESULT_COLUMNS[table_name.split("-", 1)[0]]


def ann_search(store: Store, table_name: str, column: str, query: np.ndarray, k: int, parameters: IndexParameters,
               where: str | None, columns: list[str] | None = None, nprobes: int | None = None) -> list[dict]:
    """Rows (`columns`, by default those a result shows, and `_distance`, the cosine distance) of
    the index's top k, probing `nprobes` partitions (by default the measured ones; a filtered
    search's plan raises them, search/plan.py). Each column fetched costs time (about 0.7 ms at
    1M rows here), so only these are read: fetching the stored vectors too doubles the latency.
    A filter runs as a prefilter on the same table (bitmap-indexed for modality and body part)."""
    search = store.table(table_name).search(query.astype(np.float32), vector_column_name=column) \
        .distance_type("cosine").nprobes(nprobes or parameters.nprobes) \
        .select((columns or result_columns(table_name)) + ["_distance"])
    if parameters.refine_factor:
        search = search.refine_factor(parameters.refine_factor)
    if where:
        search = search.where(where, prefilter=True)
    return search.limit(k).to_list()


def exact_search(store: Store, table_name: str, parts: list[str], query: np.ndarray, k: int, where: str | None,
                 copied: bool = False, columns: list[str] | None = None) -> list[dict]:
    """Rows, as `ann_search` gives them, of the exact top k among the rows `where` keeps (the stored
    columns `parts` concatenated). Only the kept rows' vectors and row ids are read: from the
    indexed column's flat copy when `copied` (a memory map), else from the table, where each
    column costs a read per scattered row; the shown columns are read for the top k alone."""
    if copied and len(parts) == 1:
        kept_ids = store.rows(table_name, where, [], with_row_ids=True).column("_rowid").to_numpy()
        if not len(kept_ids):
            return []
        scores, best = unit_top_k(query, read_unit_vectors(store, table_name, parts[0], kept_ids), k)
    else:
        kept = store.rows(table_name, where, list(parts), with_row_ids=True)
        kept_ids = kept.column("_rowid").to_numpy()
        if not len(kept_ids):
            return []
        found, indices = exact_top_k(query[None], np.concatenate([column_matrix(kept.column(part)) for part in parts],
                                                                   axis=1), k)
        scores, best = found[0], indices[0]
    row_ids = kept_ids[best].tolist()
    described = store.rows(table_name, among("_rowid", row_ids), [*(columns or result_columns(table_name)), "_rowid"])
    by_id = {row.pop("_rowid"): row for row in described.to_pylist()}
    return [{**by_id[row_id], "_distance": 1.0 - float(score)} for score, row_id in zip(scores, row_ids)]


def measure_recall(store: Store, model_id: str, table_name: str, column: str, parameters: IndexParameters,
                   n_rows: int, build_seconds: float) -> IndexReport:
    """recall@10 of the index against exact search, with the probes doubled until it reaches
    TARGET_RECALL (or every partition is probed). The queries are new points, not stored vectors
    (a stored vector finds itself in its own partition, which flatters the recall): each is the
    mean of two random stored vectors, a point inside the data's distribution."""
    vectors = load_vectors(store, model_id, column, "series" if table_name.startswith("series") else "slice")
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(vectors), size=(min(RECALL_QUERIES, len(vectors)), 2))
    queries = vectors.matrix[pairs].mean(axis=1)
    keys = vectors.rows.column("key").to_pylist()
    _, truth = exact_top_k(queries, vectors.matrix, RECALL_K)
    expected = [{keys[j] for j in row} for row in truth]
    exact_ms = []
    for query in queries[:EXACT_LATENCY_QUERIES]:  # one query at a time, as a user's search runs
        started = time.perf_counter()
        exact_top_k(query[None], vectors.matrix, RECALL_K)
        exact_ms.append((time.perf_counter() - started) * 1000)

    def search_sample(columns: list[str] | None) -> tuple[list[set], float]:
        ann_search(store, table_name, column, queries[0], RECALL_K, parameters, None, columns)  # warm
        found, ann_ms = [], []
        for query in queries:
            started = time.perf_counter()
            hits = ann_search(store, table_name, column, query, RECALL_K, parameters, None, columns)
            ann_ms.append((time.perf_counter() - started) * 1000)
            found.append({hit["key"] for hit in hits})
        return found, float(np.median(ann_ms))

    while True:
        found, ann_p50_ms = search_sample(["key"])
        recall = float(np.mean([len(got & want) / RECALL_K for got, want in zip(found, expected)]))
        if recall >= TARGET_RECALL or parameters.nprobes >= parameters.num_partitions:
            break
        parameters = replace(parameters, nprobes=min(parameters.num_partitions, 2 * parameters.nprobes))
    _, ann_rows_p50_ms = search_sample(None)
    return IndexReport(table=table_name, column=column, rows=n_rows, parameters=parameters, build_seconds=build_seconds,
                       recall_at_10=recall, ann_p50_ms=ann_p50_ms, ann_rows_p50_ms=ann_rows_p50_ms,
                       exact_p50_ms=float(np.median(exact_ms)),
                       filtered=filtered_recall(store, table_name, column, parameters, vectors,
                                                queries[:FILTERED_RECALL_QUERIES]))


def filtered_recall(store: Store, table_name: str, column: str, parameters: IndexParameters, vectors,
                    queries: np.ndarray) -> list[dict]:
    """recall@10 against exact search among the kept rows, of searches filtered to whole studies
    holding about each of FILTER_SHARES of the rows, run as their plan runs them (search/plan.py)."""
    studies = np.array(vectors.rows.column("study_uid").to_pylist(), dtype=object)
    names, counts = np.unique(studies, return_counts=True)
    order = np.random.default_rng(1).permutation(len(names))
    keys = np.array(vectors.rows.column("key").to_pylist(), dtype=object)
    measured = []
    for target in FILTER_SHARES:
        taken = order[:np.searchsorted(np.cumsum(counts[order]), target * len(studies)) + 1]
        kept = np.flatnonzero(np.isin(studies, names[taken]))
        if len(kept) >= len(studies) / 2:
            continue  # too few studies for a selective filter on them
        condition = among("study_uid", names[taken].tolist())
        plan = choose_plan(store, table_name, condition, parameters, has_vector_cache(store, table_name, column))
        _, truth = exact_top_k(queries, vectors.matrix[kept], RECALL_K)
        if plan.uses_index:
            found = [{row["key"] for row in ann_search(store, table_name, column, query, RECALL_K, parameters,
                                                         condition, columns=["key"], nprobes=plan.nprobes)}
                     for query in queries]
        else:
            found = [{row["key"] for row in exact_search(store, table_name, [column], query, RECALL_K, condition,
                                                           copied=plan.copied, columns=["key"])} for query in queries]
        recall = np.mean([len(got & set(keys[kept][row])) / min(RECALL_K, len(kept))
                          for got, row in zip(found, truth)])
        measured.append({"share": round(len(kept) / len(studies), 4), "rows_kept": int(len(kept)),
                         "plan": plan.name, "recall_at_10": round(float(recall), 4)})
    return measured


def remember_index(store: Store, report: IndexReport) -> None:
    indexes = store.manifest.setdefault("indexes", {})
    indexes[f"{report.table}.{report.column}"] = {**asdict(report.parameters), "recall_at_10": report.recall_at_10,
                                                  "ann_p50_ms": report.ann_p50_ms, "exact_p50_ms": report.exact_p50_ms,
                                                  "rows": report.rows, "filtered": report.filtered}
    store.write_manifest()
    record_summary(store)


def index_for(store: Store, table_name: str, column: str) -> IndexParameters | None:
    """The parameters of an index on this column, if one was built (and still exists)."""
    known = store.manifest.get("indexes", {}).get(f"{table_name}.{column}")
    if not known:
        return None
    names = {c for index in store.dataset(table_name).describe_indices() for c in index.field_names}
    if column not in names:
        return None
    return IndexParameters(**{k: known[k] for k in IndexParameters.__dataclass_fields__})
