"""Region search: box a finding on one slice, find the most similar regions across the store, from
the stored patch tokens.

Where a box falls on the token grid: ingest resizes a slice to the model's square input whatever its
aspect, so token (r, c) of a Gh×Gw grid covers rows [r·H/Gh, (r+1)·H/Gh) and columns
[c·W/Gw, (c+1)·W/Gw) of the H×W native slice. A token belongs to a box when its centre lies inside
the box; a box too small to hold a token centre takes the token under its own centre. The query is
those h×w tokens, and a result's box is the native extent of the h×w tokens it matched.

Scores (tokens L2-normalised, so every product is a cosine):
- `window` (the default): each h×w window of a slice's grid scores the mean cosine between the query
  tokens and the tokens at the same places in the window; a slice's region is its best window.
- `late`: each query token's best match anywhere in the slice, averaged (late interaction, as
  ColBERT); the region is the h×w window centred on the median place of those matches. It ignores
  the layout inside the box, so it finds scattered look-alikes as readily as one region.
On the region phantoms (tests/test_region_search.py, random weights) the window scores the better
precision@10 (1.00 against 0.965, 120 queries), so it is the default.

Without a region index the search is exhaustive: every kept slice is scored, read from Zarr shard by
shard (about 0.7-0.9 ms a slice here). With one (`embedstore index --regions`, search/region_index.py) its
sketches pick the candidates, which are scored exactly from its copy of the tokens, beside every kept
slice it does not hold; `exact` skips it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from embedstore.errors import UsageError
from embedstore.models.spec import ModelSpec
from embedstore.search.plan import SearchPlan
from embedstore.search.region_index import (RegionIndex, ShardRows, candidate_count, candidate_rows,
                                            open_region_index)
from embedstore.search.region_scores import slice_scores, unit_tokens
from embedstore.search.similar import Hits
from embedstore.search.where import validated_where
from embedstore.store import Store, among, equals
from embedstore.store.patches import PatchReader
from embedstore.store.schema import slices_table_name

SCORES = ("window", "late")
LEVELS = ("slice", "series", "study")
GROUP_COLUMNS = {"series": "series_uid", "study": "study_uid"}
ROWS_PER_READ = 1024  # slices scored at once: 1024 × 256 tokens × 384 floats is 400 MB as float32
SLOW_SECONDS = 10.0  # an exhaustive search this long says so
RESULT_COLUMNS = ("key", "path", "study_uid", "series_uid", "slice_index", "modality", "body_part",
                  "series_description", "study_date")


@dataclass(frozen=True)
class Box:
    """Columns x0..x1 and rows y0..y1 of a slice, in its own pixels, the ends exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1


def parse_box(text) -> Box:
    """A box from "X0,Y0,X1,Y1" or four numbers; UsageError for anything else."""
    values = text.split(",") if isinstance(text, str) else list(text)
    try:
        numbers = [float(value) for value in values]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 4 or not all(math.isfinite(number) and number == int(number) for number in numbers):
        raise UsageError(f"a box is four whole pixel numbers X0,Y0,X1,Y1 (columns then rows), not {text!r}")
    return Box(*(int(number) for number in numbers))


def checked_box(box: Box, rows: int, cols: int, what: str) -> Box:
    """`box` when it is a non-empty box inside a rows×cols slice; UsageError saying what is wrong."""
    if box.x1 <= box.x0 or box.y1 <= box.y0:
        raise UsageError(f"box {box.as_tuple()} is empty or inverted: it needs X0 < X1 and Y0 < Y1")
    if box.x0 < 0 or box.y0 < 0 or box.x1 > cols or box.y1 > rows:
        raise UsageError(f"box {box.as_tuple()} lies outside {what} ({cols} columns × {rows} rows: "
                         f"0 <= X0 < X1 <= {cols}, 0 <= Y0 < Y1 <= {rows})")
    return box


def _covered(start: int, end: int, length: int, cells: int) -> tuple[int, int]:
    """The cells along one axis whose centres lie in [start, end), or the cell under its middle."""
    inside = [cell for cell in range(cells) if start <= (cell + 0.5) * length / cells < end]
    if inside:
        return inside[0], inside[-1] + 1
    cell = min(cells - 1, int((start + end) / 2 * cells / length))
    return cell, cell + 1


def box_cells(box: Box, rows: int, cols: int, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """(r0, c0, r1, c1): the token cells a box covers, the ends exclusive."""
    r0, r1 = _covered(box.y0, box.y1, rows, grid[0])
    c0, c1 = _covered(box.x0, box.x1, cols, grid[1])
    return r0, c0, r1, c1


def cells_box(r0: int, c0: int, r1: int, c1: int, rows: int, cols: int, grid: tuple[int, int]) -> Box:
    """The native pixels token cells r0..r1 × c0..c1 cover (whole pixels, inside the slice)."""
    return Box(math.floor(c0 * cols / grid[1]), math.floor(r0 * rows / grid[0]),
               min(cols, math.ceil(c1 * cols / grid[1])), min(rows, math.ceil(r1 * rows / grid[0])))


@dataclass
class RegionQuery:
    description: str
    model_id: str
    block: int
    tokens: np.ndarray  # (h, w, D) float32, each of unit length
    box: Box  # as asked, in the query slice's pixels
    own_key: str | None = None  # left out of the results


@dataclass
class RegionHit:
    rank: int
    score: float
    level: str  # what the results were grouped by: slice, series or study
    key: str  # the slice the region is on
    box: tuple[int, int, int, int]  # the matched region, X0, Y0, X1, Y1 in that slice's pixels
    rows: int
    cols: int
    study_uid: str
    series_uid: str | None
    path: str | None
    slice_index: int | None
    modality: str | None
    body_part: str | None = None
    series_description: str | None = None
    study_date: str | None = None


def stored_block(spec: ModelSpec, block: int | None) -> int:
    """The stored block a region search reads: `block` (negative counts from the end), default the last."""
    if not spec.patch_layers:
        raise UsageError(f"model {spec.model_id} has no stored patch tokens, which region search needs: "
                         "re-ingest with --patch-layers (e.g. --patch-layers -1)")
    if block is None:
        return max(spec.patch_layers)
    resolved = block + spec.num_blocks if block < 0 else block
    if resolved not in spec.patch_layers:
        raise UsageError(f"--block {block}: model {spec.model_id} stored the patch tokens of blocks "
                         f"{', '.join(map(str, spec.patch_layers))}; re-ingest with --patch-layers to add others")
    return resolved


def region_query_by_key(store: Store, key: str, box: Box, model_id: str | None = None,
                        block: int | None = None) -> RegionQuery:
    """The tokens under `box` on the stored slice `key`."""
    model_id = store.resolve_model_id(model_id)
    spec = store.spec(model_id)
    block = stored_block(spec, block)
    stored = store.rows(slices_table_name(model_id), equals("key", key), ["patch_shard", "patch_offset"]).to_pylist()
    if not stored:
        raise UsageError(f"no slice with key {key!r} of model {model_id} in store {store.path}")
    if stored[0]["patch_shard"] is None:
        raise UsageError(f"slice {key} was stored without patch tokens: re-ingest with --patch-layers")
    (item,) = store.rows("items", equals("key", key), ["rows", "cols"]).to_pylist()
    box = checked_box(box, item["rows"], item["cols"], f"slice {key}")
    tokens = PatchReader(store.patches_root).read(stored[0]["patch_shard"], [stored[0]["patch_offset"]], block)[0]
    return RegionQuery(f"box {box.as_tuple()} on slice {key}", model_id, block,
                       _under_box(tokens, box, item["rows"], item["cols"], spec), box, own_key=key)


def region_query_by_image(store: Store, image: str | Path, box: Box, model_id: str | None = None,
                          block: int | None = None) -> RegionQuery:
    """The tokens under `box` on a one-slice image file, embedded with the store's model and preprocessing."""
    from embedstore.inference.embed import embeddings_of_file
    from embedstore.models.build import rebuild_model

    model_id = store.resolve_model_id(model_id)
    spec = store.spec(model_id)
    block = stored_block(spec, block)
    embeddings, items = embeddings_of_file(rebuild_model(spec), spec, image, keep_patches=True)
    if len(items) != 1:
        raise UsageError(f"a box needs a one-slice image; {image} holds {len(items)} slices")
    box = checked_box(box, items[0].rows, items[0].cols, f"image {image}")
    tokens = embeddings.patches[0, spec.patch_layers.index(block)]
    return RegionQuery(f"box {box.as_tuple()} on image {image}", model_id, block,
                       _under_box(tokens, box, items[0].rows, items[0].cols, spec), box)


def region_query_for(store: Store, sources: dict[str, tuple[str, object]], box, model_id: str | None = None,
                     block: int | None = None) -> RegionQuery:
    """The region query of the one source given, as `similar.query_for` takes them (caller's name →
    (kind, value)); a box is drawn on one slice, so the kind must be key or image."""
    given = [(name, kind, value) for name, (kind, value) in sources.items() if value is not None]
    slice_sources = [name for name, (kind, _) in sources.items() if kind in ("key", "image")]
    if len(given) != 1 or given[0][1] not in ("key", "image"):
        raise UsageError(f"a box is drawn on one slice: give exactly one of {' or '.join(slice_sources)} with it")
    _, kind, value = given[0]
    parsed = parse_box(box)
    if kind == "key":
        return region_query_by_key(store, value, parsed, model_id, block)
    return region_query_by_image(store, value, parsed, model_id, block)


def _under_box(tokens: np.ndarray, box: Box, rows: int, cols: int, spec: ModelSpec) -> np.ndarray:
    r0, c0, r1, c1 = box_cells(box, rows, cols, spec.grid)
    return unit_tokens(np.asarray(tokens).reshape(*spec.grid, -1)[r0:r1, c0:c1])


def search_regions(store: Store, query: RegionQuery, k: int = 10, where: str | None = None, level: str = "slice",
                   per_slice: int = 1, score: str = "window", on_slow=None, exact: bool = False) -> Hits:
    """The k best regions (at most `per_slice` a slice; at `level` series or study, the best region of
    each), among the slices `where` keeps, the query's own slice left out, with the plan: through the
    region index when the block has one (index-regions), else, or with `exact`, every kept slice
    scored (exact-regions). `on_slow(message)` is called once when the search takes long."""
    if level not in LEVELS:
        raise UsageError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    if score not in SCORES:
        raise UsageError(f"--score must be one of {', '.join(SCORES)}, not {score!r}")
    if k < 1 or per_slice < 1:
        raise UsageError("--k and --per-slice must be at least 1")
    if score == "late" and per_slice > 1:
        raise UsageError("--per-slice above 1 needs --score window: late interaction gives one region a slice")
    spec = store.spec(query.model_id)
    table = slices_table_name(query.model_id)
    condition = "patch_shard IS NOT NULL"
    if where:
        condition += f" AND ({validated_where(where, store.schema(table))})"
    if query.own_key is not None:
        condition += f" AND NOT ({equals('key', query.own_key)})"
    group = [GROUP_COLUMNS[level]] if level in GROUP_COLUMNS else []
    rows = store.rows(table, condition, ["key", "patch_shard", "patch_offset", *group])
    rows = rows.sort_by([("patch_shard", "ascending"), ("patch_offset", "ascending")]) if rows.num_rows else rows
    index = None if exact else open_region_index(store, query.model_id, query.block)
    plan = SearchPlan("exact-regions", rows.num_rows, store.count(table), filtered=bool(where))
    if index is not None:
        rows, unindexed = _candidates(index, query, rows, spec, score, candidate_count(k, per_slice), group)
        plan = replace(plan, path="index-regions", candidates=rows.num_rows - unindexed, unindexed=unindexed)
    if not rows.num_rows:
        return Hits([], plan)
    scores, windows = _score_all(store, query, rows, spec, per_slice, score, on_slow, index)
    groups = rows.column(group[0]).to_pylist() if group else None
    return Hits(_ranked(store, query, rows, scores, windows, k, spec, groups=groups, level=level), plan)


def _candidates(index: RegionIndex, query: RegionQuery, rows: pa.Table, spec: ModelSpec, score: str,
                n_candidates: int, group: list[str]) -> tuple[pa.Table, int]:
    """The rows to score exactly: the index's candidates among the rows it holds, then every row it
    does not hold (ingested since it was built); and how many of the latter."""
    shard_rows = ShardRows.of(rows)
    held = index.holds(shard_rows)
    kept = np.flatnonzero(held)
    if len(kept) > n_candidates:
        groups = rows.column(group[0]).take(kept).to_pylist() if group else None
        chosen = candidate_rows(index, torch.from_numpy(query.tokens), shard_rows.take(kept), spec.grid, score,
                                n_candidates, groups)
        kept = kept[chosen]
    unindexed = np.flatnonzero(~held)
    return rows.take(np.concatenate([kept, unindexed])), len(unindexed)


def _score_all(store: Store, query: RegionQuery, rows: pa.Table, spec: ModelSpec, per_slice: int, score: str,
               on_slow, index: RegionIndex | None) -> tuple[np.ndarray, np.ndarray]:
    """(n, per_slice) scores and window indices of every row, read (from the index's flat copy where
    it holds the row, else from Zarr) up to ROWS_PER_READ rows at a time, in storage order."""
    reader = PatchReader(store.patches_root)
    shard_rows = ShardRows.of(rows)
    held = index.holds(shard_rows) if index is not None else np.zeros(len(shard_rows), dtype=bool)
    target = torch.from_numpy(query.tokens)
    scores = np.full((rows.num_rows, per_slice), -np.inf, dtype=np.float32)
    windows = np.zeros((rows.num_rows, per_slice), dtype=np.int64)
    started, warned = time.perf_counter(), False
    start = 0
    while start < rows.num_rows:
        end = start + 1
        while end < rows.num_rows and end - start < ROWS_PER_READ and held[end] == held[start]:
            end += 1
        stored = [index.array(shard_rows.shard(first), "tokens")[shard_rows.offsets[first:last]] if held[first]
                  else reader.read(shard_rows.shard(first), shard_rows.offsets[first:last], query.block)
                  for first, last in shard_rows.runs(start, end)]
        tokens = torch.from_numpy(np.concatenate(stored) if len(stored) > 1 else stored[0]).float()
        best, where = slice_scores(target, tokens, spec.grid, per_slice, score)
        scores[start:end], windows[start:end] = best.numpy(), where.numpy()
        start = end
        if on_slow is not None and not warned and time.perf_counter() - started > SLOW_SECONDS:
            warned = True
            on_slow(f"region search is exhaustive over {rows.num_rows:,} slices' patch tokens and takes a while "
                    "(`embedstore index STORE --regions` makes it fast)")
    return scores, windows


def _ranked(store: Store, query: RegionQuery, rows: pa.Table, scores: np.ndarray, windows: np.ndarray, k: int,
            spec: ModelSpec, *, groups: list[str] | None, level: str) -> list[RegionHit]:
    """The best k regions (or, with each row's series or study in `groups`, the groups' best regions)
    as hits, with their boxes in native pixels."""
    flat = scores.ravel()
    order = np.argsort(-flat, kind="stable")
    order = order[np.isfinite(flat[order])]
    keys = rows.column("key").to_pylist()
    chosen: list[tuple[int, int, float]] = []  # (row, window, score), best first
    seen: set[str] = set()
    for index in order:
        row = int(index) // scores.shape[1]
        if groups is not None:  # a group's first region in score order is its best
            if groups[row] in seen:
                continue
            seen.add(groups[row])
        chosen.append((row, int(windows.flat[index]), float(flat[index])))
        if len(chosen) == k:
            break
    details = _details(store, query.model_id, [keys[row] for row, _, _ in chosen])
    h, w = query.tokens.shape[:2]
    out_w = spec.grid[1] - w + 1
    hits = []
    for rank, (row, window, score) in enumerate(chosen, 1):
        detail = details[keys[row]]
        top, left = divmod(window, out_w)
        box = cells_box(top, left, top + h, left + w, detail["rows"], detail["cols"], spec.grid)
        hits.append(RegionHit(rank=rank, score=score, level=level, box=box.as_tuple(), **detail))
    return hits


def _details(store: Store, model_id: str, keys: list[str]) -> dict[str, dict]:
    """Per key, what a hit shows: the slice's metadata and its native size."""
    if not keys:
        return {}
    described = store.rows(slices_table_name(model_id), among("key", keys), list(RESULT_COLUMNS)).to_pylist()
    sizes = {row["key"]: row for row in store.rows("items", among("key", keys), ["key", "rows", "cols"]).to_pylist()}
    return {row["key"]: {**row, "rows": sizes[row["key"]]["rows"], "cols": sizes[row["key"]]["cols"]}
            for row in described}


def region_hits_as_dicts(hits: list[RegionHit]) -> list[dict]:
    return [asdict(hit) for hit in hits]
