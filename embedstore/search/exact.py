"""Top-k search in bounded memory: exact float32 products, the ground truth for every other search,
and an int8 candidate pass with exact re-ranking, the CPU fast path for kNN over large stores.

Both score (query chunk × database chunk) blocks that never exceed the memory budget and keep a
running top-k per query. Exact search: cosine similarity (vectors L2-normalised first) or squared L2
distance, on CUDA when present.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

METRICS = ("cosine", "l2")
DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024  # one block of 4-byte scores at most
INT8_MAX = 127
TINY = torch.finfo(torch.float32).tiny
UNSURE_ERROR_MULTIPLE = 4  # see int8_rerank_top_k
GROUP = 32  # columns per group in block_top_k
# Temporaries under glibc's largest mmap threshold (32 MiB) reuse heap memory instead of being
# paged in afresh each time.
SMALL_BLOCK_BYTES = 16 * 1024 * 1024


def search_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unit_top_k(query: np.ndarray, unit_database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) of the k best cosine matches of one query among rows already scaled to
    unit length, best first: one matrix-vector product, nothing normalised again."""
    query = np.asarray(query, dtype=np.float32).ravel()
    scores = unit_database @ (query / max(float(np.linalg.norm(query)), 1e-12))
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return scores[best], best


def exact_top_k(queries: np.ndarray, database: np.ndarray, k: int, metric: str = "cosine",
                budget_bytes: int = DEFAULT_BUDGET_BYTES, device: torch.device | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (n_queries, k), best first. Cosine: higher is better; l2: squared
    distance, lower is better."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    device = device or search_device()
    k = min(k, len(database))
    base = torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32)).to(device)
    if metric == "cosine":
        base = torch.nn.functional.normalize(base, dim=1)
    else:
        base_norms = (base * base).sum(1)
    db_chunk, query_chunk = _chunks(len(queries), len(base), budget_bytes)
    scores_buffer = torch.empty(query_chunk * db_chunk, device=device)
    all_scores, all_indices = [], []
    for q_start in range(0, len(queries), query_chunk):
        query = _as_tensor(queries[q_start:q_start + query_chunk], device)
        if metric == "cosine":
            query = torch.nn.functional.normalize(query, dim=1)
            score_block = lambda start, end, out: torch.mm(query, base[start:end].T, out=out)  # noqa: E731
        else:  # ‖q − x‖² = ‖q‖² − 2 q·x + ‖x‖², negated so that larger is better
            query_norms = (query * query).sum(1, keepdim=True)
            score_block = lambda start, end, out: torch.mm(query, base[start:end].T, out=out).mul_(2) \
                .sub_(base_norms[start:end]).sub_(query_norms)  # noqa: E731
        best_scores, best_indices = blockwise_top_k(score_block, len(query), len(base), db_chunk, k, scores_buffer)
        all_scores.append(best_scores if metric == "cosine" else -best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores).cpu().numpy(), torch.cat(all_indices).cpu().numpy()


def int8_rerank_top_k(queries: np.ndarray, database: np.ndarray, k: int, candidates: int | None = None,
                      budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[np.ndarray, np.ndarray, int]:
    """Cosine top-k as `exact_top_k`, found in two steps on the CPU: each query's `candidates`
    (default max(2k, k + 32)) best rows by an int8 product, then those re-scored exactly in float32.
    Also returns how many queries were searched exactly instead.

    The database is centred on its mean (which shifts a query's similarities by a constant, so
    their order holds) and quantised with one scale; each query gets its own. Within a query the
    int32 products then rank rows as the quantised similarities do, with an error that scales
    with the database's spread: near-duplicate archives get finer steps. A true neighbour is
    missed only if its error exceeds the gap between the k-th similarity and the last candidate's.
    The candidates' exact scores show each query's error; where that gap is under four times the
    largest error among them (a miss would need an outlier of about 8 standard deviations) the
    query is searched exactly. The scores returned are exact.
    """
    k = min(k, len(database))
    n_candidates = min(len(database), candidates or max(2 * k, k + 32))
    base = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32)), dim=1)
    centre = base.mean(0)
    base_int8, base_scale = _quantised_rows(base, centre, budget_bytes)
    db_chunk, query_chunk = _chunks(len(queries), len(base), budget_bytes)
    products_buffer = torch.empty(query_chunk * db_chunk, dtype=torch.int32)
    # the re-ranking gathers each query's candidate rows: (queries, candidates, dim) float32 per step
    rerank_chunk = max(1, min(budget_bytes, SMALL_BLOCK_BYTES) // (4 * n_candidates * base.shape[1]))
    all_scores, all_indices, unsure = [], [], []
    for q_start in range(0, len(queries), query_chunk):
        query = torch.nn.functional.normalize(_as_tensor(queries[q_start:q_start + query_chunk], "cpu"), dim=1)
        query_scale = INT8_MAX / query.abs().amax(1, keepdim=True).clamp_min(TINY)
        query_int8 = (query * query_scale).round().to(torch.int8)
        products, found = blockwise_top_k(
            lambda start, end, out: torch._int_mm(query_int8, base_int8[start:end].T, out=out),
            len(query), len(base), db_chunk, n_candidates, products_buffer)
        approximate = products / (query_scale * base_scale) + (query @ centre)[:, None]  # similarities
        for r_start in range(0, len(query), rerank_chunk):
            part = slice(r_start, r_start + rerank_chunk)
            exact = torch.bmm(base[found[part]], query[part, :, None]).squeeze(2)
            top = torch.topk(exact, k, dim=1, sorted=True)
            all_scores.append(top.values)
            all_indices.append(found[part].gather(1, top.indices))
            if n_candidates < len(base):  # else every row was re-scored: nothing can be missed
                error = (exact - approximate[part]).abs().amax(1)
                gap = top.values[:, -1] - approximate[part, -1]
                unsure.append(torch.nonzero(gap <= UNSURE_ERROR_MULTIPLE * error).squeeze(1) + q_start + r_start)
    scores, indices = torch.cat(all_scores).numpy(), torch.cat(all_indices).numpy()
    redo = torch.cat(unsure).numpy() if unsure else np.zeros(0, dtype=np.int64)
    if len(redo):
        scores[redo], indices[redo] = exact_top_k(queries[redo], database, k, device=torch.device("cpu"),
                                                  budget_bytes=budget_bytes)
    return scores, indices, len(redo)


def _quantised_rows(base: torch.Tensor, centre: torch.Tensor, budget_bytes: int) -> tuple[torch.Tensor, float]:
    """(n × dim int8 matrix of round((x − centre) · scale), scale), built a chunk at a time so no
    float copy of the whole database is made."""
    step = max(1, min(budget_bytes, SMALL_BLOCK_BYTES) // (4 * base.shape[1]))
    spread = max(float((base[i:i + step] - centre).abs().max()) for i in range(0, len(base), step))
    scale = INT8_MAX / max(spread, TINY)
    rows = torch.empty(base.shape, dtype=torch.int8)
    for i in range(0, len(base), step):
        rows[i:i + step] = ((base[i:i + step] - centre) * scale).round()
    return rows, scale


def blockwise_top_k(score_block: Callable[[int, int, torch.Tensor], torch.Tensor], n_queries: int, n_database: int,
                    db_chunk: int, k: int, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of `score_block(start, end, out)` (n_queries × (end − start) scores of database
    rows start..end, written into `out`) over the whole database, best first. Each block's scores
    go into the same `buffer`: a fresh block of this size would be paged in anew every time, which
    costs as much as an int8 product. Each block's own top k first, then a merge of two small
    candidate sets: concatenating the whole block to the running best would copy every score once
    more."""
    best_scores = best_indices = None
    for start in range(0, n_database, db_chunk):
        end = min(start + db_chunk, n_database)
        block = score_block(start, end, buffer[:n_queries * (end - start)].view(n_queries, end - start))
        block_values, block_indices = block_top_k(block, k)
        if best_scores is None:
            candidates, candidate_indices = block_values, block_indices + start
        else:
            candidates = torch.cat([best_scores, block_values], dim=1)
            candidate_indices = torch.cat([best_indices, block_indices + start], dim=1)
        top = torch.topk(candidates, min(k, candidates.shape[1]), dim=1, sorted=True)
        best_scores, best_indices = top.values, candidate_indices.gather(1, top.indices)
    if best_scores is None:
        return (torch.zeros((n_queries, 0), dtype=buffer.dtype, device=buffer.device),
                torch.zeros((n_queries, 0), dtype=torch.long, device=buffer.device))
    return best_scores, best_indices


def block_top_k(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, column indices) of each row's k largest scores, unsorted. A wide block is read once
    for the maxima of groups of GROUP columns; the k best scores lie in the k best groups, so only
    those are searched: about twice as fast as a top-k over the whole block."""
    k = min(k, block.shape[1])
    whole = block.shape[1] - block.shape[1] % GROUP
    if k * GROUP * 8 > whole:
        top = torch.topk(block, k, dim=1, sorted=False)
        return top.values, top.indices
    groups = torch.topk(block[:, :whole].reshape(len(block), -1, GROUP).amax(2), k, dim=1, sorted=False).indices
    columns = (groups[:, :, None] * GROUP + torch.arange(GROUP, device=block.device)).reshape(len(block), -1)
    if whole < block.shape[1]:  # the last columns, fewer than a group, are all candidates
        tail = torch.arange(whole, block.shape[1], device=block.device).expand(len(block), -1)
        columns = torch.cat([columns, tail], dim=1)
    top = torch.topk(block.gather(1, columns), k, dim=1, sorted=False)
    return top.values, columns.gather(1, top.indices)


def _chunks(n_queries: int, n_database: int, budget_bytes: int) -> tuple[int, int]:
    """(database rows, query rows) per block of 4-byte scores within the budget."""
    db_chunk = max(1, min(n_database, budget_bytes // 4 // 1024))
    return db_chunk, max(1, min(n_queries, budget_bytes // 4 // db_chunk))


def _as_tensor(rows: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(device)
