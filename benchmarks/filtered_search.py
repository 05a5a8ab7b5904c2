"""Filtered search at every selectivity: `embedstore search --where` through its plan (search/plan.py)
on a format-3 model table with the default index `embedstore index` builds, against the same search
unfiltered.

Rows are written as ingest writes them (commits of 100,000 into one model's `slices-<model_id>` table,
the search columns beside the vectors). Each row's modality is drawn so that one filter keeps each
share: CT 50%, MR 10%, PT 1%, NM 0.1%, US 0.01%. Queries are new points, not stored vectors, and run
through `search.similar.search` (the CLI's, the API's and the service's path) taking turns with the
unfiltered search query by query, so a noisy machine slows them alike. recall@10 is measured against
exact search over the rows each filter keeps. Prints a table and one JSON line.
Usage: python benchmarks/filtered_search.py [--rows 1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

DIM = 384
K = 10
SHARES = {"CT": 0.5, "MR": 0.1, "PT": 0.01, "NM": 0.001, "US": 0.0001}  # the rest is OT


def clustered(n: int, n_classes: int, seed: int, centres=None):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, DIM)).astype(np.float32) if centres is None else centres
    labels = rng.integers(0, n_classes, n)
    return centres[labels] + 1.5 * rng.normal(size=(n, DIM)).astype(np.float32), centres


def modalities(n: int, seed: int) -> np.ndarray:
    """Each row's modality, drawn with the shares of SHARES."""
    draw = np.random.default_rng(seed).random(n)
    names = np.full(n, "OT", dtype=object)
    edge = 0.0
    for name, share in SHARES.items():
        names[(draw >= edge) & (draw < edge + share)] = name
        edge += share
    return names


def model_rows(spec, start: int, vectors: np.ndarray, modality: np.ndarray) -> pa.Table:
    from embedstore.store.schema import model_slices_schema

    schema = model_slices_schema(spec)
    n = len(vectors)
    ids = np.arange(start, start + n)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM)
    columns = {
        "key": [f"synthetic:{i}" for i in ids], "path": [f"/archive/{i}.dcm" for i in ids],
        "patient_id": [f"pid:{i // 400}" for i in ids], "study_uid": [f"study{i // 200}" for i in ids],
        "series_uid": [f"series{i // 100}" for i in ids], "sop_uid": [f"sop{i}" for i in ids],
        "slice_index": (ids % 100).astype(np.int32), "modality": modality.tolist(),
        "body_part": ["CHEST"] * n, "series_description": [None] * n, "study_date": ["2024-01-01"] * n,
        "intensity": ["ct:study"] * n, "patch_shard": [None] * n, "patch_offset": [None] * n, "run_id": ["run"] * n,
    }
    arrays = [flat if field.type == pa.list_(pa.float32(), DIM) else pa.array(columns[field.name], field.type)
              for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def side_by_side(runs: list, queries: np.ndarray) -> list[tuple[list[float], list]]:
    """(milliseconds, answers) of each search, the searches taking turns query by query."""
    for run in runs:
        run(queries[0])  # warm
    times, answers = [[] for _ in runs], [[] for _ in runs]
    for query in queries:
        for run, took, got in zip(runs, times, answers):
            started = time.perf_counter()
            got.append(run(query))
            took.append((time.perf_counter() - started) * 1000)
    return list(zip(times, answers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    from embedstore.models.build import load_model
    from embedstore.search.exact import exact_top_k
    from embedstore.search.index import build_index, index_for
    from embedstore.search.similar import query_by_matrix, search
    from embedstore.store import Store, equals
    from embedstore.store.schema import slices_table_name

    spec = load_model("dinov2_vits14", "random", 28, layers=1, patch_layers=()).spec
    table = slices_table_name(spec.model_id)
    with tempfile.TemporaryDirectory() as scratch:
        store = Store.open(Path(scratch) / "store", create=True)
        store.add_model(spec)
        centres, database, modality = None, [], []
        started = time.perf_counter()
        for start in range(0, args.rows, 100_000):
            count = min(100_000, args.rows - start)
            vectors, centres = clustered(count, 1000, seed=start + 1, centres=centres)
            names = modalities(count, seed=start)
            store.insert_new(table, model_rows(spec, start, vectors, names))
            database.append(vectors)
            modality.append(names)
        write_s = time.perf_counter() - started
        report = build_index(store)
        parameters = index_for(store, table, "cls")
        database, modality = np.concatenate(database), np.concatenate(modality)
        queries, _ = clustered(args.queries, 1000, seed=10**6, centres=centres)
        filters = {"none": None, **{f"modality = '{name}'": equals("modality", name) for name in SHARES}}

        def run(where):
            return lambda query: search(store, query_by_matrix(store, query), K, "slice", "cls", where)

        measured = side_by_side([run(where) for where in filters.values()], queries)
        rows = []
        for (label, where), (took, answers) in zip(filters.items(), measured):
            kept = np.flatnonzero(modality == label.split("'")[1]) if where else np.arange(len(database))
            _, truth = exact_top_k(queries, database[kept], min(K, len(kept)))
            expected = [{f"synthetic:{kept[j]}" for j in row} for row in truth]
            recall = np.mean([len({hit.key for hit in hits} & want) / len(want)
                              for hits, want in zip(answers, expected)])
            rows.append({"filter": label, "rows_kept": int(len(kept)), "share": len(kept) / len(database),
                         "plans": sorted({hits.plan.name for hits in answers}),
                         "p50_ms": round(float(np.median(took)), 2), "p99_ms": round(float(np.percentile(took, 99)), 2),
                         "recall_at_10": round(float(recall), 4)})
    unfiltered_p50 = rows[0]["p50_ms"]
    for row in rows:
        row["p50_over_unfiltered"] = round(row["p50_ms"] / unfiltered_p50, 2)
    print(f"{args.rows:,} x {DIM} rows, {parameters.index_type} {parameters.num_partitions} partitions, nprobes "
          f"{parameters.nprobes}; {args.queries} new query points, k={K}; built in {report.build_seconds:.0f} s")
    print(f"{'filter':<22}{'kept':>9}{'share':>9}  {'plan':<20}{'p50 ms':>8}{'p99 ms':>8}{'/ none':>8}{'recall@10':>11}")
    for row in rows:
        print(f"{row['filter']:<22}{row['rows_kept']:>9,}{row['share']:>9.2%}  {', '.join(row['plans']):<20}"
              f"{row['p50_ms']:>8.2f}{row['p99_ms']:>8.2f}{row['p50_over_unfiltered']:>8.2f}{row['recall_at_10']:>11.4f}")
    print(json.dumps({"benchmark": "filtered_search", "rows": args.rows, "dim": DIM, "queries": args.queries,
                      "write_s": round(write_s, 1), "build_s": round(report.build_seconds, 1),
                      "index": parameters.__dict__, "index_filtered_recall": report.filtered, "searches": rows}))


if __name__ == "__main__":
    main()
