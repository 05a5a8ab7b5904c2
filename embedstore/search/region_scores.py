"""The region scores (search/regions.py says what they mean), on torch tensors: shared by the
exhaustive search and the region index, which scores its sketches with the same code."""

from __future__ import annotations

import numpy as np
import torch


def unit_tokens(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.float32)
    return tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)


def token_cosines(query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(n, T, h*w): the cosine of each of n slices' tokens (n, T, D), of any length, with each query
    token (h, w, D) of unit length (dividing the products by the token lengths reads the tokens
    once, where scaling them first would write a copy)."""
    lengths = torch.linalg.vector_norm(tokens, dim=-1, keepdim=True).clamp_min(1e-12)
    return (tokens @ query.reshape(-1, query.shape[-1]).T) / lengths


def window_scores(query: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(n, Gh-h+1, Gw-w+1): the mean cosine of the query (h, w, D) with each window of each slice's
    tokens (n, Gh*Gw, D)."""
    h, w, _ = query.shape
    cosines = token_cosines(query, tokens).reshape(len(tokens), *grid, h * w)
    out_h, out_w = grid[0] - h + 1, grid[1] - w + 1
    total = torch.zeros(len(tokens), out_h, out_w)
    for i in range(h):
        for j in range(w):
            total += cosines[:, i:i + out_h, j:j + out_w, i * w + j]
    return total / (h * w)


def best_windows(scores: torch.Tensor, shape: tuple[int, int], per_slice: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, per_slice) scores and window indices: each slice's best windows, none overlapping a better one."""
    h, w = shape
    scores = scores.clone() if per_slice > 1 else scores
    out_w = scores.shape[2]
    best, where = [], []
    for found in range(per_slice):
        value, index = scores.flatten(1).max(dim=1)
        best.append(value)
        where.append(index)
        if found + 1 == per_slice:
            break
        for n, (top, left) in enumerate(zip((index // out_w).tolist(), (index % out_w).tolist())):
            scores[n, max(0, top - h + 1):top + h, max(0, left - w + 1):left + w] = -torch.inf
    return torch.stack(best, 1), torch.stack(where, 1)


def late_scores(query: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) scores, each query token's best cosine in the slice averaged, and (n,) window indices:
    the h×w window centred on the median place of those best matches."""
    h, w, _ = query.shape
    values, places = token_cosines(query, tokens).max(dim=1)  # (n, h*w)
    rows = (places // grid[1]).float().median(dim=1).values
    cols = (places % grid[1]).float().median(dim=1).values
    top = (rows - (h - 1) / 2).round().clamp(0, grid[0] - h).long()
    left = (cols - (w - 1) / 2).round().clamp(0, grid[1] - w).long()
    return values.mean(dim=1), top * (grid[1] - w + 1) + left


def slice_scores(query: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int], per_slice: int,
                 score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, per_slice) scores and window indices of n slices' tokens (n, Gh*Gw, D) under `score`."""
    if score == "window":
        return best_windows(window_scores(query, tokens, grid), query.shape[:2], per_slice)
    values, where = late_scores(query, tokens, grid)
    return values[:, None], where[:, None]
