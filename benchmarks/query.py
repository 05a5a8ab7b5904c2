"""Query-layer figures, side by side with their baselines in one run.

1. kNN classification: `--queries` query vectors against `--database` stored 768-d vectors (50
   clustered classes), embedstore's weighted kNN (k = 20, T = 0.07; its default search, int8
   candidates re-ranked on a CPU, and exact search) against scikit-learn's
   KNeighborsClassifier(algorithm="brute", metric="cosine") given the same weights, on the same
   arrays: the times, their ratios, and the shares of identical predictions.
2. Search: a store of `--search-rows` 384-d vectors, `embedstore index` with its default parameters,
   then recall@10 against exact search and the p50 latency per query of both.

    python benchmarks/query.py [--queries 10000] [--database 100000] [--search-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

TEMPERATURE = 0.07
K = 20


def clustered(n: int, dim: int, n_classes: int, seed: int, centres=None):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)).astype(np.float32) if centres is None else centres
    labels = rng.integers(0, n_classes, n)
    return (centres[labels] + 1.5 * rng.normal(size=(n, dim)).astype(np.float32)), labels, centres


def knn_benchmark(n_queries: int, n_database: int) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    from embedstore.eval.knn import choose_search, knn_scores
    from embedstore.search.exact import int8_rerank_top_k

    database, database_labels, centres = clustered(n_database, 768, 50, seed=0)
    queries, query_labels, _ = clustered(n_queries, 768, 50, seed=1, centres=centres)
    timings, predictions = {}, {}
    for search in ("auto", "exact"):
        started = time.perf_counter()
        scores = knn_scores(database, database_labels, queries, 50, ks=(K,), temperature=TEMPERATURE, search=search)
        timings[search], predictions[search] = time.perf_counter() - started, scores[K].argmax(1)
    # the same vote: weight exp(similarity / T), similarity = 1 - cosine distance
    baseline = KNeighborsClassifier(n_neighbors=K, algorithm="brute", metric="cosine",
                                    weights=lambda distance: np.exp(-distance / TEMPERATURE))
    started = time.perf_counter()
    theirs = baseline.fit(database, database_labels).predict(queries)
    theirs_s = time.perf_counter() - started
    _, _, searched_exactly = int8_rerank_top_k(queries, database, K)  # untimed: how often int8 gave way
    return {"queries": n_queries, "database": n_database, "dim": 768, "k": K,
            "search": choose_search("auto", n_queries, n_database, K),
            "embedstore_s": round(timings["auto"], 2), "embedstore_exact_s": round(timings["exact"], 2),
            "sklearn_s": round(theirs_s, 2), "speedup": round(theirs_s / timings["auto"], 2),
            "speedup_exact": round(theirs_s / timings["exact"], 2),
            "identical_predictions": float((predictions["auto"] == theirs).mean()),
            "identical_predictions_exact": float((predictions["exact"] == theirs).mean()),
            "int8_queries_searched_exactly": searched_exactly,
            "accuracy": float((predictions["auto"] == query_labels).mean())}


def search_benchmark(n_rows: int) -> dict:
    from embedstore.models.build import load_model
    from embedstore.models.embedder import Embeddings
    from embedstore.pipeline.runner import item_rows, vector_rows
    from embedstore.search.index import build_index
    from embedstore.sources.records import SliceItem
    from embedstore.store import Store
    from embedstore.store.schema import slices_table_name

    # A real 384-d model's spec (ViT-S/14, the CLS of its last block only, no patch tokens): the
    # vectors themselves are synthetic.
    spec = load_model("dinov2_vits14", "random", 28, layers=1, patch_layers=()).spec
    with tempfile.TemporaryDirectory() as scratch:
        store = Store.open(Path(scratch) / "store", create=True)
        store.add_model(spec)
        started = time.perf_counter()
        centres = None
        for start in range(0, n_rows, 100_000):  # written in commits of 100,000 rows, as ingest would
            count = min(100_000, n_rows - start)
            vectors, _, centres = clustered(count, 384, 1000, seed=start + 1, centres=centres)
            items = [SliceItem(f"synthetic:{i}", f"/archive/{i}.dcm", f"study{i // 200}", f"series{i // 100}", i % 100,
                               modality="CT", rows=512, cols=512, intensity="ct:study")
                     for i in range(start, start + count)]
            embeddings = Embeddings(vectors, vectors, vectors[:, None], None)
            store.insert_new("items", item_rows(items, "run"))
            store.insert_new(slices_table_name(spec.model_id),
                             vector_rows(spec, items, [embeddings], None, [None] * count, "run"))
        write_s = time.perf_counter() - started
        report = build_index(store)
    return {"rows": n_rows, "dim": 384, "write_s": round(write_s, 1), "index": report.parameters.__dict__,
            "build_s": round(report.build_seconds, 1), "recall_at_10": round(report.recall_at_10, 4),
            "ann_p50_ms": round(report.ann_p50_ms, 2), "ann_rows_p50_ms": round(report.ann_rows_p50_ms, 2),
            "exact_p50_ms": round(report.exact_p50_ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--database", type=int, default=100_000)
    parser.add_argument("--search-rows", type=int, default=1_000_000)
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()

    knn = knn_benchmark(args.queries, args.database)
    print(f"kNN: {knn['queries']:,} queries × {knn['database']:,} vectors (768-d), k={K}: embedstore "
          f"({knn['search']} search) {knn['embedstore_s']} s, scikit-learn brute cosine {knn['sklearn_s']} s → "
          f"{knn['speedup']}× (target ≥ 5×); identical predictions {knn['identical_predictions']:.4f}; "
          f"{knn['int8_queries_searched_exactly']} queries searched exactly after the int8 pass. Exact search only: "
          f"{knn['embedstore_exact_s']} s → {knn['speedup_exact']}×, identical predictions "
          f"{knn['identical_predictions_exact']:.4f}", flush=True)
    result = {"benchmark": "query", "knn": knn}
    if not args.skip_search:
        search = search_benchmark(args.search_rows)
        print(f"search: {search['rows']:,} × 384 vectors, {search['index']['index_type']} "
              f"({search['index']['num_partitions']} partitions, nprobes {search['index']['nprobes']}, refine "
              f"{search['index']['refine_factor']}), built in {search['build_s']} s: recall@10 {search['recall_at_10']} "
              f"(target ≥ 0.95), p50 {search['ann_p50_ms']} ms per query for keys and distances (target ≤ 10), "
              f"{search['ann_rows_p50_ms']} ms fetching the 6 result columns, vs exact {search['exact_p50_ms']} ms",
              flush=True)
        result["search"] = search
    print(json.dumps(result))


if __name__ == "__main__":
    main()
