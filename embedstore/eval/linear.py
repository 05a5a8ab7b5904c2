"""Linear probe on stored vectors: L2-regularised logistic regression fitted full-batch with
L-BFGS (multinomial for classes, one sigmoid per label for multi-label tasks).

The objective is scikit-learn's: C · Σ loss + ½‖W‖² (the bias unpenalised), so a C means the same
in both. C is chosen on VAL only (the protocol's grid by default: 10^linspace(-6, 5, 45)), by
selection.SELECTION_RULE (a tie of val scores goes to the middle of the tied range); when the labels
give no val split, one is carved from train by patient. The chosen C is refitted on TRAIN + VAL and reported
on TEST, whose labels are not read before that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.special
import torch

from embedstore.errors import UsageError
from embedstore.eval.bootstrap import with_interval
from embedstore.eval.labels import LabelledVectors, carve_val, label_strata, predictions_of
from embedstore.eval.metrics import multiclass_metrics, multilabel_metrics
from embedstore.eval.options import DEFAULT_C_GRID
from embedstore.eval.selection import best_candidate

ROW_BLOCK = 512  # rows per block: a block stays in cache between its two matrix products


class LinearProbe:
    def __init__(self, weights: np.ndarray, bias: np.ndarray, multilabel: bool):
        self.weights, self.bias, self.multilabel = weights, bias, multilabel

    def scores(self, matrix: np.ndarray) -> np.ndarray:
        logits = np.asarray(matrix, dtype=np.float64) @ self.weights + self.bias
        return scipy.special.expit(logits) if self.multilabel else scipy.special.softmax(logits, axis=1)


def fit_logistic(matrix: np.ndarray, targets: np.ndarray, n_classes: int, c: float, multilabel: bool,
                 start: LinearProbe | None = None, max_iter: int = 500, tolerance: float = 5e-5) -> LinearProbe:
    """Minimise C · Σ loss + ½‖W‖² with L-BFGS, until no component of the gradient of that objective
    divided by C·n exceeds `tolerance`: scikit-learn's stopping rule at half its default of 1e-4
    (benchmarks/bench_suite.py: at 1e-4 a few C end slightly above scikit-learn's objective, at 5e-5
    none does, on 14k and 70k rows).

    With a few classes each step is bound by reading the matrix, so each step reads it once: block by
    block, the logits and the block's share of the gradient are computed while the block is in cache.
    The matrix products run in float32 (the stored vectors' precision); sums, weights and the solver
    stay float64."""
    x = np.ascontiguousarray(matrix, dtype=np.float32)
    n, dim = x.shape
    y = np.asarray(targets, dtype=np.float64 if multilabel else np.int64)

    def objective_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = theta[:-n_classes].reshape(dim, n_classes), theta[-n_classes:]
        weights32 = weights.astype(np.float32)
        loss, weights_gradient, bias_gradient = 0.0, np.zeros((dim, n_classes), np.float32), np.zeros(n_classes)
        for first in range(0, n, ROW_BLOCK):
            block, block_targets = x[first:first + ROW_BLOCK], y[first:first + ROW_BLOCK]
            block_loss, residual = loss_and_residual((block @ weights32).astype(np.float64) + bias, block_targets,
                                                     multilabel)
            loss += block_loss
            weights_gradient += block.T @ residual.astype(np.float32)
            bias_gradient += residual.sum(axis=0)
        # divided by C·n: the same minimiser as C·Σloss + ½‖W‖², at a scale where `tolerance` means
        # what scikit-learn's does
        value = loss / n + 0.5 * (weights * weights).sum() / (c * n)
        gradient = np.concatenate([(weights_gradient / n + weights / (c * n)).ravel(), bias_gradient / n])
        return value, gradient

    theta = torch.from_numpy(np.concatenate([start.weights.ravel(), start.bias]) if start else
                             np.zeros(dim * n_classes + n_classes)).requires_grad_()
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=tolerance,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        value, gradient = objective_and_gradient(theta.detach().numpy())
        theta.grad = torch.from_numpy(gradient)
        return torch.tensor(value, dtype=torch.float64)

    # the solver's own steps are small vector operations; torch's idle OpenMP threads would only
    # compete for the cores with the BLAS threads of the matrix products (46 against 32 ms a step on
    # 14k × 1,536 rows, 2 cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    solution = theta.detach().numpy()
    return LinearProbe(solution[:-n_classes].reshape(dim, n_classes), solution[-n_classes:], multilabel)


def loss_and_residual(logits: np.ndarray, targets: np.ndarray, multilabel: bool) -> tuple[float, np.ndarray]:
    """The summed loss of these rows and its gradient with respect to the logits."""
    if multilabel:
        return float((np.logaddexp(0.0, logits) - targets * logits).sum()), scipy.special.expit(logits) - targets
    rows = np.arange(len(logits))
    top = logits.max(axis=1, keepdims=True)
    exp = np.exp(logits - top)
    total = exp.sum(axis=1, keepdims=True)
    residual = exp / total
    residual[rows, targets] -= 1.0
    return float((np.log(total) + top).sum() - logits[rows, targets].sum()), residual


def selection_score(part: LabelledVectors, scores: np.ndarray) -> float:
    """What C is chosen by: macro AUROC where defined (binary, multi-label), else accuracy."""
    if part.multilabel or len(part.classes) == 2:
        metrics = multilabel_metrics(part.targets, scores, part.classes) if part.multilabel else \
            multiclass_metrics(part.targets, scores, part.classes)
        if metrics["macro_auroc"] is not None:
            return metrics["macro_auroc"]
    return float((scores.argmax(1) == part.targets).mean())


def selection_metric(data: LabelledVectors) -> str:
    """The name of what `selection_score` measures on this task, as the results write it."""
    return "macro AUROC on val" if data.multilabel or len(data.classes) == 2 else "accuracy on val"


def with_val_split(data: LabelledVectors, seed: int) -> tuple[LabelledVectors, bool]:
    """The data unchanged when it has val rows; else train split again, by patient, into train and val."""
    if (data.splits == "val").any():
        return data, False
    splits = carve_val(data.patients, data.splits, label_strata(data), seed)
    return LabelledVectors(data.matrix, data.targets, data.classes, data.multilabel, data.patients, splits,
                           data.keys), True


@dataclass
class CSelection:
    """C chosen on val: the data with its val split (carved from train when absent) and the scores."""

    data: LabelledVectors
    carved: bool
    c_grid: list[float]
    val_scores: list[float]  # in the order of c_grid
    chosen_c: float
    val_score: float


def choose_c(data: LabelledVectors, c_grid=DEFAULT_C_GRID, seed: int = 0,
             on_fit: Callable[[], None] | None = None) -> CSelection:
    """Fit on train for every C (small C first, each fit warm-started from the last) and pick the C
    SELECTION_RULE names (best val score, ties to the middle of the tied range); test rows are not
    looked at. `on_fit` is called after each fit (a grid takes minutes on large sets: the CLI shows its
    progress)."""
    data, carved = with_val_split(data, seed)
    train, val = data.subset(data.splits == "train"), data.subset(data.splits == "val")
    if not len(val.matrix) or not len(train.matrix):
        raise UsageError(f"too few patients for a train and a val split: {data.counts()}")
    grid, val_scores, probe = sorted(c_grid), [], None
    for c in grid:
        probe = fit_logistic(train.matrix, train.targets, len(data.classes), c, data.multilabel, probe)
        val_scores.append(selection_score(val, probe.scores(val.matrix)))
        if on_fit:
            on_fit()
    best = best_candidate(val_scores)
    return CSelection(data, carved, grid, val_scores, grid[best], val_scores[best])


def refit_and_test(selection: CSelection) -> tuple[dict, dict]:
    """The chosen C refitted on train + val; the test metrics (test labels are read only here) and the
    test predictions (keys, patients, targets, scores)."""
    data = selection.data
    refit = data.subset(data.splits != "test")
    final = fit_logistic(refit.matrix, refit.targets, len(data.classes), selection.chosen_c, data.multilabel)
    test = data.subset(data.splits == "test")
    scores = final.scores(test.matrix)
    metrics = multilabel_metrics(test.targets, scores, test.classes) if data.multilabel else \
        multiclass_metrics(test.targets, scores, test.classes)
    return with_interval(metrics, test.targets, scores, test.patients, data.multilabel), predictions_of(test, scores)


def linear_probe(data: LabelledVectors, c_grid=DEFAULT_C_GRID, seed: int = 0) -> tuple[CSelection, dict]:
    """Choose C on val, refit on train + val, report on test: the selection and the test metrics."""
    selection = choose_c(data, c_grid, seed)
    return selection, refit_and_test(selection)[0]
