"""The classification protocols on stored vectors (kNN, linear probe, few-shot): each a function from
a store, a labels spec and its options (eval/options.py) to a typed result (eval/results.py) whose
JSON is what DESIGN.md describes: task, model_id, feature, level, sample counts per split, and the
metrics with their provenance."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import count
from pathlib import Path
from typing import Callable

import numpy as np

from embedstore.eval.bootstrap import with_interval
from embedstore.eval.citation import cite
from embedstore.eval.fewshot import few_shot
from embedstore.eval.knn import choose_search, knn_scores
from embedstore.eval.labels import (
    LabelledVectors,
    LabelsRecord,
    LabelsSpec,
    as_labels_spec,
    check_classes,
    check_splits,
    join_labels,
    predictions_of,
    split_by_patient,
)
from embedstore.eval.metrics import multiclass_metrics, multilabel_metrics
from embedstore.eval.options import DEFAULT_C_GRID, GRID_FEATURES, FewShotOptions, KnnOptions, LinearOptions
from embedstore.eval.results import FewShotResult, KnnResult, LinearResult
from embedstore.search.degenerate import degenerate_warning
from embedstore.store import Store
from embedstore.store.vectors import Vectors, load_features


@dataclass
class Labelled:
    """A feature's stored vectors joined to the labels, split: what a classification protocol reads."""

    vectors: Vectors
    data: LabelledVectors


def labelled_features(store: Store, labels: LabelsSpec | str | Path, features, level: str = "slice",
                      model_id: str | None = None) -> tuple[dict[str, Labelled], LabelsRecord]:
    """Each feature's vectors joined to the labels CSV (its class in the spec's label column), with
    patient-safe splits and every class in train, and the record of what became of the labels. The
    CSV is read, joined and split once, however many features are asked for."""
    labels = as_labels_spec(labels)
    read = labels.read()
    record = read.record()
    loaded = load_features(store, model_id, tuple(features), level)
    data = join_labels(loaded[0], read.join_column, read.rows, record)
    if labels.split_by == "patient":
        data = split_by_patient(data, labels.ratios, labels.seed)
    check_splits(data)
    check_classes(data)
    # every feature holds the same rows in the same order: the joined rows pick theirs too
    rows = np.isin(np.asarray(loaded[0].rows.column("key").to_pylist(), dtype=object), np.asarray(data.keys))
    return ({vectors.feature: Labelled(vectors, replace(data, matrix=vectors.matrix[rows])) for vectors in loaded},
            record.describe(data))


def labelled_vectors(store: Store, labels: LabelsSpec | str | Path, feature: str = "cls", level: str = "slice",
                     model_id: str | None = None) -> tuple[Vectors, LabelledVectors, LabelsRecord]:
    """One feature's `labelled_features`: (its vectors, the labelled rows, the labels record)."""
    by_feature, record = labelled_features(store, labels, (feature,), level, model_id)
    return by_feature[feature].vectors, by_feature[feature].data, record


def knn_evaluation(store: Store, labels: LabelsSpec | str | Path, options: KnnOptions = KnnOptions(),
                   model_id: str | None = None) -> KnnResult:
    """The DINOv2 weighted kNN: train rows are the neighbours; val and test are classified.
    Every k is reported on test; the k with the best val score is named (never chosen on test) and
    gets the patient-bootstrap intervals (the first k without val). The neighbour search used (exact
    or int8 re-ranked, see knn.py) is recorded."""
    vectors, data, record = labelled_vectors(store, labels, options.feature, options.level, model_id)
    ks = list(options.k)
    train = data.subset(data.splits == "train")
    evaluated = [data.subset(data.splits == split) for split in ("val", "test")]
    search = choose_search(options.search, sum(len(part.matrix) for part in evaluated), len(train.matrix), max(ks))
    metrics, scores = {}, {}
    for split, part in zip(("val", "test"), evaluated):
        if not len(part.matrix):
            continue
        scores[split] = knn_scores(train.matrix, train.targets, part.matrix, len(data.classes), ks,
                                   options.temperature, search)
        metrics[split] = {str(k): _metrics(part, s) for k, s in scores[split].items()}
    best_k = None
    key = "macro_auroc" if data.multilabel else "balanced_accuracy"
    if "val" in metrics:
        best_k = int(max(metrics["val"], key=lambda k: _score(metrics["val"][k], key)))
    reported_k, test = best_k if best_k is not None else ks[0], evaluated[1]
    metrics["test"][str(reported_k)] = with_interval(metrics["test"][str(reported_k)], test.targets,
                                                     scores["test"][reported_k], test.patients, test.multilabel)
    result = KnnResult(task="knn", model_id=vectors.model_id, feature=options.feature, level=options.level,
                       classes=data.classes, multilabel=data.multilabel, counts=data.counts(),
                       temperature=options.temperature, ks=ks, search=search, metrics=metrics, best_k_on_val=best_k,
                       selection_metric=f"{key.replace('_', ' ')} on val",
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


def linear_evaluation(store: Store, labels: LabelsSpec | str | Path, options: LinearOptions = LinearOptions(),
                      model_id: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> LinearResult:
    """The linear probe: C chosen on val (carved from train by patient when absent), refitted on
    train + val, reported on test. `feature="grid"` also chooses the input as the study does, among
    the CLS of the last 1 or 4 blocks with or without the patch mean, by val score alone.
    `progress(fits done, fits in all)` is called after each fit of the C grid."""
    from embedstore.eval.linear import choose_c, refit_and_test, selection_metric

    labels = as_labels_spec(labels)
    candidates = GRID_FEATURES if options.feature == "grid" else (options.feature,)
    c_grid = options.c_grid or DEFAULT_C_GRID
    fits, n_fits = count(1), len(candidates) * len(c_grid)
    on_fit = (lambda: progress(next(fits), n_fits)) if progress else None
    by_feature, record = labelled_features(store, labels, candidates, options.level, model_id)
    selections = {name: choose_c(by_feature[name].data, c_grid, labels.seed, on_fit) for name in candidates}
    chosen = max(candidates, key=lambda name: selections[name].val_score)  # first listed wins a tie
    selection, vectors = selections[chosen], by_feature[chosen].vectors
    grid = {name: {"chosen_c": s.chosen_c, "val_score": s.val_score} for name, s in selections.items()} \
        if options.feature == "grid" else None
    test_metrics, predictions = refit_and_test(selection)
    data = selection.data
    result = LinearResult(task="linear", model_id=vectors.model_id, feature=chosen, level=options.level,
                          classes=data.classes, multilabel=data.multilabel, counts=data.counts(),
                          chosen_c=selection.chosen_c, val_score=selection.val_score,
                          selection_metric=selection_metric(data), val_carved_from_train=selection.carved,
                          c_grid=selection.c_grid, val_scores=selection.val_scores, metrics={"test": test_metrics},
                          feature_grid=grid, warnings=vector_warnings(vectors), test_predictions=predictions)
    return cite(result, store.spec(vectors.model_id), record)


def fewshot_evaluation(store: Store, labels: LabelsSpec | str | Path, options: FewShotOptions = FewShotOptions(),
                       model_id: str | None = None) -> FewShotResult:
    """Few-shot curves: `tries` draws of n training patients per class for each n, on a fixed test
    split; the draws' seed is the labels spec's."""
    labels = as_labels_spec(labels)
    vectors, data, record = labelled_vectors(store, labels, options.feature, options.level, model_id)
    curves = few_shot(data, options.shots, options.tries, options.classifiers, labels.seed)
    result = FewShotResult(task="fewshot", model_id=vectors.model_id, feature=options.feature, level=options.level,
                           classes=data.classes, multilabel=data.multilabel, **curves,
                           warnings=vector_warnings(vectors))
    return cite(result, store.spec(vectors.model_id), record)
