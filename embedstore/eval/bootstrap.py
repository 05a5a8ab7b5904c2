"""95% intervals of test metrics by a percentile bootstrap over test patients (PROTOCOL.md, Reporting):
each of 1,000 resamples draws as many patients as the test split has, with replacement, and takes every
image of a drawn patient as often as it was drawn. Images of one patient are not independent, so
resampling images would make the intervals too narrow.

A resample's metrics are computed with each row weighted by how often its patient was drawn: the
same numbers as on the rows repeated, without building them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def patient_bootstrap(targets: np.ndarray, scores: np.ndarray, patients: np.ndarray, multilabel: bool,
                      resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, list[float]]:
    """metric → [2.5th, 97.5th percentile] over the resamples, for the headline metrics (top-1 and
    balanced accuracy, macro AUROC and F1; macro AUROC and F1 for multi-label tasks). A metric a
    resample cannot define (AUROC without both outcomes) is left out of that resample."""
    patient_ids, patient_of_row = np.unique(patients.astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    values = defaultdict(list)
    for _ in range(resamples):
        drawn = rng.integers(0, len(patient_ids), len(patient_ids))
        weights = np.bincount(drawn, minlength=len(patient_ids))[patient_of_row]
        rows = weights > 0
        metrics = weighted_headline(targets[rows], scores[rows], weights[rows], multilabel)
        for name, value in metrics.items():
            if value is not None:
                values[name].append(value)
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in values.items()}


def weighted_headline(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray, multilabel: bool) -> dict:
    """The headline metrics of eval/metrics.py with integer row weights (row repeats)."""
    n_classes = scores.shape[1]
    if multilabel:
        truth = targets
        f1 = f1_score(truth, (scores >= 0.5).astype(int), average="macro", sample_weight=weights, zero_division=0)
        return {"macro_auroc": weighted_macro_auroc(truth, scores, weights), "macro_f1": float(f1)}
    predicted = scores.argmax(1)
    correct = (predicted == targets) * weights
    per_class = np.bincount(targets, weights=weights, minlength=n_classes)
    hits = np.bincount(targets, weights=correct, minlength=n_classes)
    present = per_class > 0
    f1 = f1_score(targets, predicted, labels=range(n_classes), average="macro", sample_weight=weights, zero_division=0)
    return {"top1_accuracy": float(correct.sum() / weights.sum()),
            "balanced_accuracy": float((hits[present] / per_class[present]).mean()),
            "macro_auroc": weighted_macro_auroc(np.eye(n_classes, dtype=int)[targets], scores, weights),
            "macro_f1": float(f1)}


def weighted_macro_auroc(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float | None:
    aurocs = [roc_auc_score(truth[:, c], scores[:, c], sample_weight=weights)
              for c in range(truth.shape[1]) if 0 < truth[:, c].sum() < len(truth)]
    return float(np.mean(aurocs)) if aurocs else None


def with_interval(metrics: dict, targets: np.ndarray, scores: np.ndarray, patients: np.ndarray,
                  multilabel: bool) -> dict:
    """The metrics with `ci95`: metric → [low, high] by the patient bootstrap."""
    return {**metrics, "ci95": patient_bootstrap(targets, scores, patients, multilabel)}
