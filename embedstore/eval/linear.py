"""Linear probe on stored vectors: L2-regularised logistic regression fitted full-batch with
L-BFGS in torch (multinomial for classes, one sigmoid per label for multi-label tasks).

The objective is scikit-learn's: C · Σ loss + ½‖W‖² (the bias unpenalised), so a C means the same
in both. C is chosen on VAL only (the protocol's grid by default: 10^linspace(-6, 5, 45)); when the
labels give no val split, one is carved from train by patient. The chosen C is refitted on
TRAIN + VAL and reported on TEST, whose labels are not read before that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from embedstore.errors import UsageError
from embedstore.eval.bootstrap import with_interval
from embedstore.eval.labels import LabelledVectors, carve_val, label_strata, predictions_of
from embedstore.eval.metrics import multiclass_metrics, multilabel_metrics

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))


class LinearProbe:
    def __init__(self, weights: torch.Tensor, bias: torch.Tensor, multilabel: bool):
        self.weights, self.bias, self.multilabel = weights, bias, multilabel

    def scores(self, matrix: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(np.asarray(matrix, dtype=np.float64)) @ self.weights + self.bias
        return (torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)).numpy()


def fit_logistic(matrix: np.ndarray, targets: np.ndarray, n_classes: int, c: float, multilabel: bool,
                 start: LinearProbe | None = None, max_iter: int = 500) -> LinearProbe:
    """Minimise C · Σ loss + ½‖W‖² with L-BFGS (float64: the tolerance sklearn's solver reaches)."""
    x = torch.from_numpy(np.asarray(matrix, dtype=np.float64))
    y = torch.from_numpy(np.asarray(targets, dtype=np.float64 if multilabel else np.int64))
    weights = (start.weights.clone() if start else torch.zeros(x.shape[1], n_classes, dtype=torch.float64)).requires_grad_()
    bias = (start.bias.clone() if start else torch.zeros(n_classes, dtype=torch.float64)).requires_grad_()
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits if multilabel else torch.nn.functional.cross_entropy
    optimizer = torch.optim.LBFGS([weights, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        # divided by C·n: the same minimiser as C·Σloss + ½‖W‖², at a scale L-BFGS handles well
        loss = loss_fn(x @ weights + bias, y, reduction="sum") / len(x) + 0.5 * (weights * weights).sum() / (c * len(x))
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe(weights.detach(), bias.detach(), multilabel)


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
    """Fit on train for every C (small C first, each fit warm-started from the last) and pick the
    C with the best val score; test rows are not looked at. `on_fit` is called after each fit (a
    grid takes minutes on large sets: the CLI shows its progress)."""
    data, carved = with_val_split(data, seed)
    train, val = data.subset(data.splits == "train"), data.subset(data.splits == "val")
    if not len(val.matrix) or not len(train.matrix):
        raise UsageError(f"too few patients for a train and a val split: {data.counts()}")
    val_scores, probe = [], None
    for c in sorted(c_grid):
        probe = fit_logistic(train.matrix, train.targets, len(data.classes), c, data.multilabel, probe)
        val_scores.append((selection_score(val, probe.scores(val.matrix)), c))
        if on_fit:
            on_fit()
    best_score, best_c = max(val_scores, key=lambda pair: (pair[0], -pair[1]))  # ties: the stronger penalty
    return CSelection(data, carved, sorted(c_grid), [s for s, _ in val_scores], best_c, best_score)


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
