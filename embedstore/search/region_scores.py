"""The region scores (search/regions.py says what they mean), on torch tensors: shared by the
exhaustive search and the region index, which scores its sketches with the same code."""

from __future__ import annotations

import numpy as np
import torch


def unit_tokens(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.float32)
    return tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)


def token_cosines(query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(h*w, n, T): the cosine of each query token (h, w, D), of unit length, with each of n slices'
    tokens (n, T, D), of any length, query position first (window_sums reads it so). Dividing the
    products by the token lengths reads the tokens once, where scaling them first would write a copy."""
    lengths = torch.linalg.vector_norm(tokens, dim=-1).clamp_min(1e-12)
    products = torch.matmul(query.reshape(-1, query.shape[-1]), tokens.transpose(1, 2))  # (n, h*w, T)
    return (products / lengths[:, None, :]).transpose(0, 1)


def window_sums(products: torch.Tensor, grid: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """(n, Gh-h+1, Gw-w+1): per window of each slice, the sum over the query's h×w positions of the
    product of that position with the token under it, from the products (h*w, n, Gh*Gw). Each
    position's products are added shifted by its flat offset in the grid, as whole contiguous rows
    (a third faster than adding (h, w) windows); sums that wrap past a row's end are cut off after."""
    h, w = shape
    length = grid[0] * grid[1] - (h - 1) * grid[1] - (w - 1)  # flat index of the last window, plus one
    total = products[0, :, :length].clone()
    for position in range(1, h * w):
        offset = (position // w) * grid[1] + position % w
        total += products[position, :, offset:offset + length]
    out_h, out_w = grid[0] - h + 1, grid[1] - w + 1
    return torch.nn.functional.pad(total, (0, w - 1)).reshape(-1, out_h, grid[1])[:, :, :out_w]


def window_scores(query: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(n, Gh-h+1, Gw-w+1): the mean cosine of the query (h, w, D) with each window of each slice's
    tokens (n, Gh*Gw, D)."""
    h, w, _ = query.shape
    return window_sums(token_cosines(query, tokens), grid, (h, w)) / (h * w)


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
    values, places = token_cosines(query, tokens).max(dim=2)
    values, places = values.T, places.T  # (n, h*w)
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
