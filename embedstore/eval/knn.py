"""kNN classification on stored vectors, the DINOv2 protocol: cosine similarity on L2-normalised
features, the top max(k) neighbours weighted by exp(similarity / T), the weights summed per class
over the first k, the argmax predicted (k in 10, 20, 100, 200; T = 0.07).

Multi-label tasks use the same weights in a per-label vote: a label's score is the weighted share
of neighbours carrying it (predicted at 0.5). This is the documented alternative to ML-kNN in the
reference protocol (../shared/PROTOCOL.md): simpler, and the same weighting as the single-label vote.

Neighbours are found by exact search, or on the CPU for large problems by an int8 candidate pass
re-ranked exactly (`int8_rerank_top_k`, about twice as fast; `search="exact"` forces exact search).
"""

from __future__ import annotations

import numpy as np

from embedstore.eval.options import DEFAULT_KS, SEARCHES, TEMPERATURE
from embedstore.search.exact import exact_top_k, int8_rerank_top_k, search_device

INT8_MIN_PAIRS = 10**8  # below this many query × database pairs exact search takes a second or two
# Above this k, re-scoring 2k candidates per query costs more than the int8 product saves (10,000 ×
# 100,000 × 768 here: k = 200 took 9.0 s against 7.9 s exact; k = 100, 5.8 s against 7.6 s).
INT8_MAX_K = 100


def choose_search(search: str, n_queries: int, n_database: int, k: int) -> str:
    """The neighbour search `auto` means: int8 candidates on a CPU for large problems and k up to
    INT8_MAX_K, else exact."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}")
    if search != "auto":
        return search
    large = n_queries * n_database >= INT8_MIN_PAIRS
    return "int8" if large and k <= INT8_MAX_K and search_device().type == "cpu" else "exact"


def neighbour_weights(similarities: np.ndarray, temperature: float = TEMPERATURE) -> np.ndarray:
    # exp((s - 1) / T) is exp(s / T) scaled by a constant: the same vote, without overflow
    return np.exp((similarities.astype(np.float64) - 1.0) / temperature)


def vote(neighbour_labels: np.ndarray, weights: np.ndarray, n_classes: int, k: int) -> np.ndarray:
    """(n, C) normalised weighted votes of the first k neighbours. `neighbour_labels`: (n, K) class
    indices, or (n, K, C) 0/1 label sets for multi-label tasks."""
    w = weights[:, :k]
    if neighbour_labels.ndim == 3:
        votes = (neighbour_labels[:, :k] * w[:, :, None]).sum(1)
    else:
        votes = np.zeros((len(w), n_classes))
        np.add.at(votes, (np.repeat(np.arange(len(w)), w.shape[1]), neighbour_labels[:, :k].ravel()), w.ravel())
    return votes / w.sum(1, keepdims=True)


def knn_scores(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, n_classes: int,
               ks=DEFAULT_KS, temperature: float = TEMPERATURE, search: str = "auto") -> dict[int, np.ndarray]:
    """Class scores of every test vector for each k (k larger than the training set is capped)."""
    k_max = min(max(ks), len(train))
    if choose_search(search, len(test), len(train), k_max) == "int8":
        similarities, indices, _ = int8_rerank_top_k(test, train, k_max)
    else:
        similarities, indices = exact_top_k(test, train, k_max, metric="cosine")
    weights = neighbour_weights(similarities, temperature)
    neighbour_labels = train_labels[indices]
    return {k: vote(neighbour_labels, weights, n_classes, min(k, k_max)) for k in ks}
