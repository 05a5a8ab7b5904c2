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

RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def patient_bootstrap(targets: np.ndarray, scores: np.ndarray, patients: np.ndarray, multilabel: bool,
                      resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, list[float]]:
    """metric → [2.5th, 97.5th percentile] over the resamples, for the headline metrics (top-1 and
    balanced accuracy, macro AUROC and F1; macro AUROC and F1 for multi-label tasks). A metric a
    resample cannot define (AUROC without both outcomes) is left out of that resample."""
    values = defaultdict(list)
    for rows, weights in patient_resamples(patients, resamples, seed):
        metrics = weighted_headline(targets[rows], scores[rows], weights[rows], multilabel)
        for name, value in metrics.items():
            if value is not None:
                values[name].append(value)
    return {name: percentile_interval(v) for name, v in values.items()}


def paired_difference(targets: np.ndarray, scores: np.ndarray, baseline_scores: np.ndarray, patients: np.ndarray,
                      multilabel: bool, metric: str, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, list[float]] | None:
    """(metric of `scores` minus metric of `baseline_scores` on the same rows, its 95% interval): both
    scored on the same patient resamples, so what the two test sets share cancels. None when the
    metric is undefined on these rows."""
    ones = np.ones(len(targets), dtype=int)
    ours, theirs = (weighted_headline(targets, s, ones, multilabel).get(metric) for s in (scores, baseline_scores))
    if ours is None or theirs is None:
        return None
    differences = []
    for rows, weights in patient_resamples(patients, resamples, seed):
        ours_now = weighted_headline(targets[rows], scores[rows], weights[rows], multilabel).get(metric)
        theirs_now = weighted_headline(targets[rows], baseline_scores[rows], weights[rows], multilabel).get(metric)
        if ours_now is not None and theirs_now is not None:
            differences.append(ours_now - theirs_now)
    return ours - theirs, percentile_interval(differences)


def patient_resamples(patients: np.ndarray, resamples: int, seed: int):
    """(rows drawn, each row's weight: how often its patient was drawn) per resample."""
    patient_ids, patient_of_row = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        drawn = rng.integers(0, len(patient_ids), len(patient_ids))
        weights = np.bincount(drawn, minlength=len(patient_ids))[patient_of_row]
        yield weights > 0, weights


def percentile_interval(values: list[float]) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def weighted_headline(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray, multilabel: bool) -> dict:
    """The headline metrics of eval/metrics.py with integer row weights (row repeats), in NumPy: a
    thousand resamples take well under a second where scikit-learn's checks alone take seconds."""
    n_classes = scores.shape[1]
    if multilabel:
        predicted = (scores >= 0.5).astype(int)
        f1 = [binary_f1(targets[:, c] == 1, predicted[:, c] == 1, weights) for c in range(n_classes)]
        return {"macro_auroc": weighted_macro_auroc(targets, scores, weights), "macro_f1": float(np.mean(f1))}
    predicted = scores.argmax(1)
    per_class = np.bincount(targets, weights=weights, minlength=n_classes)
    hits = np.bincount(targets, weights=(predicted == targets) * weights, minlength=n_classes)
    present = per_class > 0
    f1 = [binary_f1(targets == c, predicted == c, weights) for c in range(n_classes)]
    return {"top1_accuracy": float(hits.sum() / weights.sum()),
            "balanced_accuracy": float((hits[present] / per_class[present]).mean()),
            "macro_auroc": weighted_macro_auroc(np.eye(n_classes, dtype=int)[targets], scores, weights),
            "macro_f1": float(np.mean(f1))}


def binary_f1(truth: np.ndarray, predicted: np.ndarray, weights: np.ndarray) -> float:
    """F1 of one class, 0 where it is never true nor predicted (scikit-learn's zero_division=0)."""
    true_positive = weights[truth & predicted].sum()
    wrong = weights[truth != predicted].sum()
    return float(2 * true_positive / (2 * true_positive + wrong)) if true_positive + wrong else 0.0


def weighted_auroc(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting one half, with row weights: the area under
    the ROC curve as scikit-learn computes it."""
    values, group = np.unique(scores, return_inverse=True)
    positive = np.bincount(group, weights=weights * truth, minlength=len(values))
    negative = np.bincount(group, weights=weights * (1 - truth), minlength=len(values))
    negatives_below = np.cumsum(negative) - negative
    return float((positive * (negatives_below + 0.5 * negative)).sum() / (positive.sum() * negative.sum()))


def weighted_macro_auroc(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float | None:
    aurocs = [weighted_auroc(truth[:, c], scores[:, c], weights)
              for c in range(truth.shape[1]) if 0 < truth[:, c].sum() < len(truth)]
    return float(np.mean(aurocs)) if aurocs else None


def with_interval(metrics: dict, targets: np.ndarray, scores: np.ndarray, patients: np.ndarray,
                  multilabel: bool) -> dict:
    """The metrics with `ci95`: metric → [low, high] by the patient bootstrap."""
    return {**metrics, "ci95": patient_bootstrap(targets, scores, patients, multilabel)}
