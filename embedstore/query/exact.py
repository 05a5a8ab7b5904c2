"""Exact top-k search: batched matrix products in bounded memory, on CUDA when present.

The ground truth for every other search: cosine similarity (vectors L2-normalised first) or
squared L2 distance, queries and database in chunks so that no block of scores exceeds the memory
budget, and a running top-k per query.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("cosine", "l2")
DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024  # one block of float32 scores at most


def search_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def exact_top_k(queries: np.ndarray, database: np.ndarray, k: int, metric: str = "cosine",
                budget_bytes: int = DEFAULT_BUDGET_BYTES, device: torch.device | None = None,
                exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (n_queries, k), best first. Cosine: higher is better; l2: squared
    distance, lower is better. `exclude_self` drops database row i from query i's results (queries
    and database the same set: leave-one-out)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    device = device or search_device()
    k = min(k, len(database) - (1 if exclude_self else 0))
    base = torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32)).to(device)
    if metric == "cosine":
        base = torch.nn.functional.normalize(base, dim=1)
    else:
        base_norms = (base * base).sum(1)
    # Scores are computed for (query chunk × database chunk) blocks within the budget.
    db_chunk = max(1, min(len(base), budget_bytes // 4 // 1024))
    query_chunk = max(1, min(len(queries), budget_bytes // 4 // db_chunk))
    all_scores, all_indices = [], []
    for q_start in range(0, len(queries), query_chunk):
        query = torch.from_numpy(np.ascontiguousarray(queries[q_start:q_start + query_chunk], dtype=np.float32)).to(device)
        if metric == "cosine":
            query = torch.nn.functional.normalize(query, dim=1)
        best_scores = torch.full((len(query), 0), 0.0, device=device)
        best_indices = torch.zeros((len(query), 0), dtype=torch.long, device=device)
        for d_start in range(0, len(base), db_chunk):
            block = query @ base[d_start:d_start + db_chunk].T
            if metric == "l2":  # ‖q − x‖² = ‖q‖² − 2 q·x + ‖x‖², negated so that larger is better
                block = 2 * block - base_norms[d_start:d_start + db_chunk] - (query * query).sum(1, keepdim=True)
            if exclude_self:
                rows = torch.arange(len(query), device=device) + q_start
                inside = (rows >= d_start) & (rows < d_start + block.shape[1])
                block[inside.nonzero().squeeze(1), rows[inside] - d_start] = -torch.inf
            # the block's own top k first, then a merge of two small candidate sets: concatenating
            # the whole block to the running best would copy every score once more
            block_top = torch.topk(block, min(k, block.shape[1]), dim=1, sorted=False)
            candidates = torch.cat([best_scores, block_top.values], dim=1)
            candidate_indices = torch.cat([best_indices, block_top.indices + d_start], dim=1)
            top = torch.topk(candidates, min(k, candidates.shape[1]), dim=1, sorted=True)
            best_scores, best_indices = top.values, candidate_indices.gather(1, top.indices)
        all_scores.append(best_scores if metric == "cosine" else -best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores).cpu().numpy(), torch.cat(all_indices).cpu().numpy()
