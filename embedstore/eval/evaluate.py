"""Evaluations run on stored vectors, each returning a typed result (eval/results.py) whose JSON is
what DESIGN.md describes: task, model_id, feature, level, sample counts per split, and the metrics."""

from __future__ import annotations

from itertools import count
from pathlib import Path
from typing import Callable

import numpy as np

from embedstore.errors import UsageError
from embedstore.eval.bootstrap import with_interval
from embedstore.eval.citation import cite
from embedstore.eval.knn import DEFAULT_KS, TEMPERATURE, choose_search, knn_scores
from embedstore.eval.labels import (
    LabelledVectors,
    LabelsRecord,
    check_classes,
    check_splits,
    file_sha256,
    join_labels,
    predictions_of,
    read_labels,
    split_by_patient,
)
from embedstore.eval.metrics import multiclass_metrics, multilabel_metrics
from embedstore.eval.results import FewShotResult, KnnResult, LinearResult
from embedstore.search.degenerate import degenerate_warning
from embedstore.store import Store
from embedstore.store.vectors import Vectors, load_vectors


def labelled_vectors(store: Store, labels: str | Path, feature: str = "cls", level: str = "slice",
                     model_id: str | None = None, split_by: str | None = None,
                     ratios: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0,
                     label_column: str = "label") -> tuple[Vectors, LabelledVectors, LabelsRecord]:
    """Stored vectors joined to the labels CSV (its class in `label_column`), with patient-safe
    splits and every class in train, and the record of what became of the labels."""
    vectors = load_vectors(store, model_id, feature, level)
    join_column, rows = read_labels(labels, label_column)
    csv_split = any(row.get("split") for row in rows)
    split_source = f"--split-by patient (seed {seed}, ratios {','.join(map(str, ratios))})" \
        if split_by == "patient" else "csv"
    record = LabelsRecord(str(Path(labels).resolve()), file_sha256(Path(labels)), join_column, label_column, len(rows),
                          0, 0, {}, split_source, csv_split_overridden=csv_split and split_by == "patient")
    data = join_labels(vectors, join_column, rows, record)
    if split_by == "patient":
        data = split_by_patient(data, ratios, seed)
    check_splits(data)
    check_classes(data)
    return vectors, data, record.describe(data)


def check_knn_arguments(ks, temperature: float) -> None:
    """UsageError for neighbour counts or a temperature the vote has no meaning for (k = 0 votes
    with no one; T = 0 divides by zero)."""
    if not ks or min(ks) < 1:
        raise UsageError(f"--k takes neighbour counts of at least 1, not {','.join(map(str, ks)) or 'none'}")
    if not temperature > 0:
        raise UsageError(f"--temperature must be above 0, not {temperature}")


def knn_evaluation(store: Store, labels: str | Path, feature: str = "cls", level: str = "slice",
                   model_id: str | None = None, ks=DEFAULT_KS, temperature: float = TEMPERATURE,
                   split_by: str | None = None, ratios=(0.7, 0.1, 0.2), seed: int = 0, search: str = "auto",
                   label_column: str = "label") -> KnnResult:
    """The DINOv2 weighted kNN: train rows are the neighbours; val and test are classified.
    Every k is reported on test; the k with the best val score is named (never chosen on test) and
    gets the patient-bootstrap intervals (the first k without val). The neighbour search used (exact
    or int8 re-ranked, see knn.py) is recorded."""
    check_knn_arguments(ks, temperature)
    vectors, data, record = labelled_vectors(store, labels, feature, level, model_id, split_by, ratios, seed,
                                             label_column)
    train = data.subset(data.splits == "train")
    evaluated = [data.subset(data.splits == split) for split in ("val", "test")]
    search = choose_search(search, sum(len(part.matrix) for part in evaluated), len(train.matrix), max(ks))
    metrics, scores = {}, {}
    for split, part in zip(("val", "test"), evaluated):
        if not len(part.matrix):
            continue
        scores[split] = knn_scores(train.matrix, train.targets, part.matrix, len(data.classes), ks, temperature, search)
        metrics[split] = {str(k): _metrics(part, s) for k, s in scores[split].items()}
    best_k = None
    key = "macro_auroc" if data.multilabel else "balanced_accuracy"
    if "val" in metrics:
        best_k = int(max(metrics["val"], key=lambda k: _score(metrics["val"][k], key)))
    reported_k, test = best_k if best_k is not None else ks[0], evaluated[1]
    metrics["test"][str(reported_k)] = with_interval(metrics["test"][str(reported_k)], test.targets,
                                                     scores["test"][reported_k], test.patients, test.multilabel)
    result = KnnResult("knn", vectors.model_id, feature, level, data.classes, data.multilabel, data.counts(),
                       temperature, list(ks), search, metrics, best_k, f"{key.replace('_', ' ')} on val",
                       warnings=vector_warnings(vectors) + k_warnings(ks, len(train.matrix)),
                       test_predictions=predictions_of(test, scores["test"][reported_k]))
    return cite(result, store.spec(vectors.model_id), record)


def k_warnings(ks, n_train: int) -> list[str]:
    """Neighbour counts larger than the training set: each votes with every training row."""
    over = [k for k in ks if k > n_train]
    if not over:
        return []
    return [f"k = {', '.join(map(str, over))} exceed{'s' * (len(over) == 1)} the {n_train:,} training rows: "
            f"{'each votes' if len(over) > 1 else 'it votes'} with all of them, as k = {n_train:,} would"]


def vector_warnings(vectors: Vectors) -> list[str]:
    """Why the vectors evaluated cannot rank or separate anything (degenerate), if they cannot."""
    warning = degenerate_warning(vectors.matrix, vectors.feature)
    return [warning] if warning else []


def _metrics(part: LabelledVectors, scores: np.ndarray) -> dict:
    if part.multilabel:
        return multilabel_metrics(part.targets, scores, part.classes)
    return multiclass_metrics(part.targets, scores, part.classes)


def _score(metrics: dict, key: str) -> float:
    value = metrics.get(key)
    return -1.0 if value is None else value


GRID_FEATURES = ("cls1", "cls1+patch_mean", "cls4", "cls4+patch_mean")  # the study's linear-probe inputs


def linear_evaluation(store: Store, labels: str | Path, feature: str = "cls+patch_mean", level: str = "slice",
                      model_id: str | None = None, c_grid=None, split_by: str | None = None,
                      ratios=(0.7, 0.1, 0.2), seed: int = 0, label_column: str = "label",
                      progress: Callable[[int, int], None] | None = None) -> LinearResult:
    """The linear probe: C chosen on val (carved from train by patient when absent), refitted on
    train + val, reported on test. `feature="grid"` also chooses the input as the study does, among
    the CLS of the last 1 or 4 blocks with or without the patch mean, by val score alone.
    `progress(fits done, fits in all)` is called after each fit of the C grid."""
    from embedstore.eval.linear import DEFAULT_C_GRID, choose_c, refit_and_test, selection_metric

    candidates = GRID_FEATURES if feature == "grid" else (feature,)
    c_grid = c_grid or DEFAULT_C_GRID
    fits, n_fits = count(1), len(candidates) * len(c_grid)
    on_fit = (lambda: progress(next(fits), n_fits)) if progress else None
    selections, warnings = {}, {}
    for candidate in candidates:
        vectors, data, record = labelled_vectors(store, labels, candidate, level, model_id, split_by, ratios, seed,
                                                 label_column)
        selections[candidate] = choose_c(data, c_grid, seed, on_fit)
        warnings[candidate] = vector_warnings(vectors)
    chosen = max(candidates, key=lambda name: selections[name].val_score)  # first listed wins a tie
    selection = selections[chosen]
    grid = {name: {"chosen_c": s.chosen_c, "val_score": s.val_score} for name, s in selections.items()} \
        if feature == "grid" else None
    test_metrics, predictions = refit_and_test(selection)
    result = LinearResult("linear", vectors.model_id, chosen, level, data.classes, data.multilabel,
                          selection.data.counts(), selection.chosen_c, selection.val_score,
                          selection_metric(selection.data), selection.carved, selection.c_grid, selection.val_scores,
                          {"test": test_metrics}, grid, warnings=warnings[chosen], test_predictions=predictions)
    return cite(result, store.spec(vectors.model_id), record)


def fewshot_evaluation(store: Store, labels: str | Path, feature: str = "cls", level: str = "slice",
                       model_id: str | None = None, shots=None, tries: int = 10, classifiers=None,
                       split_by: str | None = None, ratios=(0.7, 0.1, 0.2), seed: int = 0,
                       label_column: str = "label") -> FewShotResult:
    """Few-shot curves: `tries` draws of n training patients per class for each n, on a fixed test split."""
    from embedstore.eval.fewshot import CLASSIFIERS, DEFAULT_SHOTS, check_fewshot_arguments, few_shot

    check_fewshot_arguments(shots or DEFAULT_SHOTS, tries, classifiers or CLASSIFIERS)
    vectors, data, record = labelled_vectors(store, labels, feature, level, model_id, split_by, ratios, seed,
                                             label_column)
    curves = few_shot(data, shots or DEFAULT_SHOTS, tries, classifiers or CLASSIFIERS, seed)
    result = FewShotResult("fewshot", vectors.model_id, feature, level, data.classes, data.multilabel, **curves,
                           warnings=vector_warnings(vectors))
    return cite(result, store.spec(vectors.model_id), record)
