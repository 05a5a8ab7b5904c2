"""Few-shot evaluation on stored vectors: for each shot count, `tries` random draws of that many
training patients per class (all of a drawn patient's images, as the reference study drew NIH
patients), three classifiers, and the mean with a 95% interval over the draws.

Patients are drawn from the train split only and the test split is fixed, so no patient is ever
on both sides of a draw. Draw t of shot count n uses seed (seed, n, t): reruns repeat exactly.
Classifiers: `knn` (the weighted vote, k = min(20, training images)), `prototype` (nearest class
mean by cosine similarity) and `linear` (logistic regression at C = 1: a draw has no val split to
choose C on), so nothing is chosen here. The score is balanced accuracy, or macro AUROC for binary
tasks; the 95% interval of the mean over the draws is a percentile bootstrap (it stays inside the
score's range, where a t-interval of ten draws can reach past 1). Single-label tasks.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from embedstore.errors import UsageError
from embedstore.eval.knn import knn_scores
from embedstore.eval.labels import LabelledVectors
from embedstore.eval.linear import fit_logistic
from embedstore.eval.metrics import multiclass_metrics
from embedstore.eval.options import CLASSIFIERS, DEFAULT_SHOTS, DEFAULT_TRIES, FewShotOptions
from embedstore.store.vectors import l2_normalised

FEWSHOT_KNN_K = 20
FEWSHOT_LINEAR_C = 1.0
PROTOTYPE_TEMPERATURE = 0.07  # class scores for AUROC: a softmax of the similarities, as the kNN weights
INTERVAL_RESAMPLES = 1000
INTERVAL_METHOD = (f"95% percentile bootstrap of the mean over the draws ({INTERVAL_RESAMPLES:,} resamples of the "
                   "draws, seed 0)")


def patients_by_class(data: LabelledVectors) -> dict[int, list[str]]:
    """Train patients grouped by the class of their images (the most common one)."""
    labels_of: dict[str, list[int]] = defaultdict(list)
    for patient, target, split in zip(data.patients, data.targets, data.splits):
        if split == "train":
            labels_of[patient].append(int(target))
    grouped: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(labels_of):
        grouped[int(np.bincount(labels_of[patient]).argmax())].append(patient)
    return grouped


def draw(grouped: dict[int, list[str]], shots: int, rng: np.random.Generator) -> set[str]:
    chosen = set()
    for patients in grouped.values():
        chosen.update(rng.choice(patients, size=min(shots, len(patients)), replace=False).tolist())
    return chosen


def classify(name: str, train: LabelledVectors, test: np.ndarray, n_classes: int) -> np.ndarray:
    if name == "knn":
        return knn_scores(train.matrix, train.targets, test, n_classes, ks=(min(FEWSHOT_KNN_K, len(train.matrix)),)) \
            .popitem()[1]
    if name == "prototype":
        prototypes = np.zeros((n_classes, train.matrix.shape[1]), dtype=np.float32)
        for label in np.unique(train.targets):
            prototypes[label] = l2_normalised(train.matrix[train.targets == label]).mean(0)
        similarity = l2_normalised(test) @ l2_normalised(prototypes).T
        similarity[:, ~np.isin(np.arange(n_classes), train.targets)] = -np.inf  # classes without a prototype
        logits = similarity / PROTOTYPE_TEMPERATURE
        weights = np.exp(logits - logits.max(1, keepdims=True))
        return weights / weights.sum(1, keepdims=True)
    return fit_logistic(train.matrix, train.targets, n_classes, FEWSHOT_LINEAR_C, False).scores(test)


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95% percentile-bootstrap interval of the mean (INTERVAL_METHOD)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, mean, mean
    draws = np.random.default_rng(0).choice(np.asarray(values, dtype=np.float64),
                                            size=(INTERVAL_RESAMPLES, len(values)))
    low, high = np.percentile(draws.mean(axis=1), [2.5, 97.5])
    return mean, float(low), float(high)


def few_shot(data: LabelledVectors, shots=DEFAULT_SHOTS, tries: int = DEFAULT_TRIES, classifiers=CLASSIFIERS,
             seed: int = 0) -> dict:
    FewShotOptions(shots=shots, tries=tries, classifiers=classifiers)  # its checks
    if data.multilabel:
        raise UsageError("few-shot evaluation takes single-label tasks")
    grouped = patients_by_class(data)
    test = data.subset(data.splits == "test")
    n_classes = len(data.classes)
    score_name = "macro_auroc" if n_classes == 2 else "balanced_accuracy"
    curves: dict[str, list[dict]] = {name: [] for name in classifiers}
    for n in shots:
        per_try: dict[str, list[float]] = defaultdict(list)
        for attempt in range(tries):
            chosen = draw(grouped, n, np.random.default_rng([seed, n, attempt]))
            train = data.subset((data.splits == "train") & np.isin(data.patients, list(chosen)))
            for name in classifiers:
                metrics = multiclass_metrics(test.targets, classify(name, train, test.matrix, n_classes), data.classes)
                per_try[name].append(metrics[score_name] if metrics[score_name] is not None else metrics["top1_accuracy"])
        for name in classifiers:
            mean, low, high = interval(per_try[name])
            curves[name].append({"shots": n, "mean": mean, "ci95": [low, high], "tries": per_try[name]})
    return {"score": score_name, "interval": INTERVAL_METHOD, "shots": list(shots), "tries": tries, "seed": seed,
            "curves": curves,
            "counts": data.counts(), "train_patients_per_class": {data.classes[c]: len(p) for c, p in grouped.items()}}
