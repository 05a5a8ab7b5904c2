"""How a protocol picks among candidates on val (C for the linear probe, the input feature of
`--feature grid`, the head learning rate of fine-tuning): one rule, written into every result."""

from __future__ import annotations

import numpy as np


def log_loss(y_true: np.ndarray, scores: np.ndarray, multilabel: bool) -> float:
    """Mean cross-entropy of the scores: of the true class for single-label tasks, per label for
    multi-label ones. What breaks ties between candidates that score alike on val."""
    clipped = np.clip(np.asarray(scores, dtype=np.float64), 1e-15, 1 - 1e-15)
    if multilabel:
        return float(-(y_true * np.log(clipped) + (1 - y_true) * np.log(1 - clipped)).mean())
    return float(-np.log(clipped[np.arange(len(y_true)), y_true]).mean())


SCORE_TIE = 1e-9  # val scores closer than this are tied (AUROC and accuracy are ratios of small counts)
LOSS_TIE = 1e-6  # relative: val log-losses closer than this are tied
SELECTION_RULE = ("the best val score; among candidates tied on it, the lowest val log-loss; among those tied "
                  "too (within 1e-6 relative), the first of the grid")


def best_candidate(scores: list[float], losses: list[float]) -> int:
    """The position of the candidate SELECTION_RULE picks. With a few val images every C (or head
    rate) can reach the same AUROC or accuracy; the first of those (the strongest penalty) may then
    separate the classes by decision values so small that which side of the threshold a test image
    falls on is float noise, different from one BLAS kernel to the next. The val log-loss tells the
    tied candidates apart by how confidently they are right."""
    best = max(scores)
    tied = [i for i, score in enumerate(scores) if best - score <= SCORE_TIE]
    lowest = min(losses[i] for i in tied)
    return next(i for i in tied if losses[i] - lowest <= LOSS_TIE * max(1.0, abs(lowest)))
