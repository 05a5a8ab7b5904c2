"""Region search at archive scale: the region index (`embedstore index --regions`) against the
exhaustive exact search, on a store of synthetic patch tokens written as ingest writes them (Zarr
shards of 1,000 slices and their rows in one model's `slices-<model_id>` table; ViT-S/14 at 224 px:
16×16 tokens of 384 dims, block 11).

The tokens: each slice is three to five tissues (Voronoi cells of the grid, each tissue one of 24
vectors) and two findings placed at random (each a 4×4 pattern of tokens, one of 1,000 patterns),
plus noise whose strength varies by slice and by finding, in a space whose variance falls off with
the axis (as a ViT's does): a finding recurs in about 40 slices per 20,000, each copy a little
different. A query is a box of 2×2 to 4×4 tokens inside a finding (what a reader boxes), on a
stored slice. recall@10 is the share of the exhaustive search's ten best regions (key and box)
the indexed search returns; both run through `search.regions.search_regions`, the CLI's, the API's
and the service's path, in one process that keeps the index open (as the service does): every
indexed query twice (the first pass reads the index's pages from disk, the second from memory),
then every exhaustive one, whose reads of the whole store would otherwise evict the index's pages
between queries. Prints a table and one JSON line.
Usage: python benchmarks/region_search.py [--slices 20000] [--queries 100] [--exact-queries N] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

GRID, DIM, BLOCK = 16, 384, 11
SHARD_ROWS = 1_000
TISSUES, FINDINGS, FINDING_SIDE = 24, 1_000, 4


# Each axis of the token space carries less variance than the one before, as a ViT's principal axes do
# (a rotation of the space would change no score, so none is applied).
AXIS_SCALE = (np.arange(1, DIM + 1) ** -0.5).astype(np.float32)


def slice_tokens(rng, tissues, findings, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, GRID*GRID, DIM) float16 tokens, and each slice's findings as (n, 2, 3): pattern, top, left."""
    cells = np.stack(np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij"), -1).reshape(-1, 2)
    strength = rng.uniform(0.3, 0.6, (n, 1, 1)).astype(np.float32)
    noise = strength * rng.standard_normal((n, GRID * GRID, DIM), dtype=np.float32)
    tokens = (noise * AXIS_SCALE).reshape(n, GRID, GRID, DIM)
    placed = np.stack([rng.integers(0, FINDINGS, (n, 2)), *rng.integers(0, GRID - FINDING_SIDE + 1, (2, n, 2))], -1)
    strength = rng.uniform(0.2, 0.8, (n, 2, 1, 1, 1)).astype(np.float32)
    finding_noise = strength * rng.standard_normal((n, 2, FINDING_SIDE, FINDING_SIDE, DIM), dtype=np.float32)
    finding_noise *= AXIS_SCALE
    for i in range(n):
        seeds = rng.integers(0, GRID, (rng.integers(3, 6), 2))
        nearest = ((cells[:, None] - seeds[None]) ** 2).sum(-1).argmin(1)
        tokens[i] += tissues[rng.integers(0, TISSUES, len(seeds))][nearest].reshape(GRID, GRID, DIM)
        for slot, (pattern, top, left) in enumerate(placed[i]):
            window = (slice(top, top + FINDING_SIDE), slice(left, left + FINDING_SIDE))
            tokens[i][window] = findings[pattern] + finding_noise[i, slot]
    return tokens.reshape(n, GRID * GRID, DIM).astype(np.float16), placed


def write_region_store(path: Path, n_slices: int, seed: int = 0) -> tuple[str, np.ndarray]:
    """The model id, and every slice's findings (n, 2, 3)."""
    from embedstore.models.build import load_model
    from embedstore.models.embedder import Embeddings
    from embedstore.pipeline.runner import item_rows, vector_rows
    from embedstore.sources.records import SliceItem
    from embedstore.store import Store
    from embedstore.store.patches import PatchShardWriter
    from embedstore.store.schema import slices_table_name

    rng = np.random.default_rng(seed)
    tissues = 3 * rng.standard_normal((TISSUES, DIM), dtype=np.float32) * AXIS_SCALE
    findings = 3 * rng.standard_normal((FINDINGS, FINDING_SIDE, FINDING_SIDE, DIM), dtype=np.float32) * AXIS_SCALE
    store = Store.open(path, create=True)
    spec = load_model("dinov2_vits14", "random", GRID * 14, layers=1, patch_layers=(BLOCK,)).spec
    store.add_model(spec)
    placed_all = []
    for start in range(0, n_slices, SHARD_ROWS):
        n = min(SHARD_ROWS, n_slices - start)
        items = [SliceItem(f"synthetic:{i}", f"/archive/{i}.dcm", f"study{i // 50}", f"series{i // 50}", i % 50,
                           modality="CT", rows=512, cols=512, intensity="ct:study") for i in range(start, start + n)]
        tokens, placed = slice_tokens(rng, tissues, findings, n)
        placed_all.append(placed)
        shard = f"shard-{start // SHARD_ROWS:05d}"
        writer = PatchShardWriter(store.patches_root, spec.model_id, shard, n, (BLOCK,), GRID * GRID, DIM)
        offsets = writer.append(tokens[:, None])
        writer.close()
        pooled = tokens.astype(np.float32).mean(1)
        store.insert_new("items", item_rows(items, "run"))
        store.insert_new(slices_table_name(spec.model_id), vector_rows(
            spec, items, [Embeddings(pooled, pooled, pooled[:, None], None)], f"{spec.model_id}/{shard}",
            list(offsets), "run"))
    return spec.model_id, np.concatenate(placed_all)


def query_boxes(placed: np.ndarray, n_queries: int, seed: int) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(slice, box in its 512-px pixels) of each query: h×w tokens (2 to 4 each) inside one of the
    slice's findings."""
    rng = np.random.default_rng(seed)
    pixels = 512 // GRID
    queries = []
    for _ in range(n_queries):
        row = int(rng.integers(len(placed)))
        _, top, left = placed[row, rng.integers(2)]
        h, w = rng.integers(2, FINDING_SIDE + 1, 2)
        r0, c0 = top + rng.integers(0, FINDING_SIDE - h + 1), left + rng.integers(0, FINDING_SIDE - w + 1)
        queries.append((row, (int(c0 * pixels), int(r0 * pixels), int((c0 + w) * pixels), int((r0 + h) * pixels))))
    return queries


def timed(search) -> tuple[set, float]:
    started = time.perf_counter()
    hits = search()
    return {(hit.key, hit.box) for hit in hits}, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--exact-queries", type=int, help="Search only the first N queries exhaustively (each "
                        "takes about 0.8 ms a slice here), recall@10 over those; default: every query")
    parser.add_argument("--store", type=Path, help="Where to write the store (kept, and reused when it holds "
                        "--slices slices); default: a temporary folder")
    args = parser.parse_args()
    from embedstore.search import regions
    from embedstore.search.region_index import build_region_index, index_folder
    from embedstore.store import Store

    work = None if args.store else tempfile.TemporaryDirectory(prefix="region-search-")
    path = args.store or Path(work.name) / "store"
    findings = path / "benchmark-findings.npy"
    started = time.perf_counter()
    if findings.exists() and len(np.load(findings)) == args.slices:
        placed, write_s = np.load(findings), None
    else:
        _, placed = write_region_store(path, args.slices)
        np.save(findings, placed)
        write_s = time.perf_counter() - started
    store = Store.open(path)
    shutil.rmtree(index_folder(store, store.resolve_model_id(None), BLOCK), ignore_errors=True)  # built afresh: timed
    report = build_region_index(store)
    queries = [(row, regions.region_query_by_key(store, f"synthetic:{row}", regions.Box(*box)))
               for row, box in query_boxes(placed, args.queries, seed=1)]
    found: dict[str, list[set]] = {"indexed, first pass": [], "indexed": [], "exact": []}
    latency: dict[str, list[float]] = {name: [] for name in found}
    # Indexed twice (the first pass reads the index's pages from disk, the second finds them in memory, as
    # a running service does), then exhaustively: its reads of the whole store would evict them between queries.
    for name, exact in (("indexed, first pass", False), ("indexed", False), ("exact", True)):
        for _, query in queries[:args.exact_queries] if exact else queries:
            keys, seconds = timed(lambda: regions.search_regions(store, query, 10, exact=exact))
            found[name].append(keys)
            latency[name].append(seconds)
    recalls = [len(exact & indexed) / len(exact) for exact, indexed in zip(found["exact"], found["indexed"])]
    figures = {name: {"p50_ms": float(np.median(values) * 1e3), "p99_ms": float(np.percentile(values, 99) * 1e3)}
               for name, values in latency.items()}
    result = {"benchmark": "region_search", "slices": args.slices, "tokens": GRID * GRID, "dim": DIM,
              "queries": args.queries, "exact_queries": len(found["exact"]), "store_write_s": write_s, "index_build_s": round(report.seconds, 1),
              "index_bytes": report.size_bytes, "index_bytes_per_slice": report.bytes_per_slice,
              "sketch_dim": report.sketch_dim, "recall_at_10": float(np.mean(recalls)),
              "recall_at_10_min": float(np.min(recalls)),
              **{f"{name.replace(', first pass', '_cold')}_{key}": round(value, 1)
                 for name, values in figures.items() for key, value in values.items()}}
    print(f"{args.slices:,} slices × {GRID * GRID} tokens × {DIM}; {args.queries} queries of 2×2 to 4×4 tokens "
          "inside a finding")
    print(f"index: built in {report.seconds:.1f} s, {report.size_bytes / 1e9:.2f} GB "
          f"({report.bytes_per_slice:,} bytes a slice, {report.sketch_dim}-d sketches)")
    print(f"{'search':<21}{'p50 ms':>10}{'p99 ms':>10}")
    for name, values in figures.items():
        print(f"{name:<21}{values['p50_ms']:>10.1f}{values['p99_ms']:>10.1f}")
    print(f"recall@10 of indexed against exact over {len(recalls)} queries: {np.mean(recalls):.3f} "
          f"(lowest {np.min(recalls):.1f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
