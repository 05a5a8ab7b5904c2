"""How a protocol picks among the candidates of a grid on val (C for the linear probe, the head
learning rate of fine-tuning): one rule, written into every result.

With a few val images many candidates reach the same AUROC or accuracy. Neither end of such a tied
range is safe: at the small-C end the weights are so small that which side of the threshold a test
image falls on is float noise (a different BLAS kernel, another answer); at the large-C end separable
features drive the weights up until the solver stops short, and the threshold is off again (test
AUROC 1.0, accuracy 0.6). The middle of the tied range is neither.
"""

from __future__ import annotations

SCORE_TIE = 1e-9  # val scores closer than this are tied (AUROC and accuracy are ratios of small counts)
SELECTION_RULE = ("the best val score; among candidates tied on it, the middle one of the grid's tied candidates "
                  "(the lower middle of an even number)")


def best_candidate(scores: list[float]) -> int:
    """The position (in grid order) of the candidate SELECTION_RULE picks."""
    best = max(scores)
    tied = [i for i, score in enumerate(scores) if best - score <= SCORE_TIE]
    return tied[(len(tied) - 1) // 2]
