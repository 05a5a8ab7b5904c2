"""Classification metrics from predictions and class scores: accuracy, balanced accuracy, macro
AUROC and F1, and a per-class table. Multi-label tasks get per-label AUROC and F1."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score


def multiclass_metrics(y_true: np.ndarray, scores: np.ndarray, classes: list[str]) -> dict:
    """`scores`: (n, C) class scores (normalised vote weights or probabilities)."""
    predicted = scores.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=range(len(classes)), zero_division=0)
    result = {
        "top1_accuracy": float((predicted == y_true).mean()),
        # the mean recall of the classes present, as scikit-learn's balanced_accuracy_score
        "balanced_accuracy": float(recall[support > 0].mean()),
        "macro_f1": float(f1.mean()),
    }
    if len(classes) > 5:
        top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        result["top5_accuracy"] = float((top5 == y_true[:, None]).any(1).mean())
    aurocs = per_class_auroc(np.eye(len(classes), dtype=int)[y_true], scores)
    result["macro_auroc"] = macro(aurocs)
    result["confusion_matrix"] = confusion_matrix(y_true, predicted, labels=range(len(classes))).tolist()
    result["per_class"] = [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s), "auroc": a}
        for name, p, r, f, s, a in zip(classes, precision, recall, f1, support, aurocs)
    ]
    return result


def multilabel_metrics(y_true: np.ndarray, scores: np.ndarray, classes: list[str], threshold: float = 0.5) -> dict:
    """`y_true`: (n, L) 0/1; `scores`: (n, L) per-label scores in [0, 1]."""
    predicted = (scores >= threshold).astype(int)
    aurocs = per_class_auroc(y_true, scores)
    f1 = f1_score(y_true, predicted, average=None, zero_division=0)
    return {
        "macro_auroc": macro(aurocs),
        "macro_f1": float(np.mean(f1)),
        "exact_match_accuracy": float((predicted == y_true).all(1).mean()),
        "per_class": [{"class": name, "auroc": a, "f1": float(f), "support": int(s)}
                      for name, a, f, s in zip(classes, aurocs, f1, y_true.sum(0))],
    }


def per_class_auroc(y_true_onehot: np.ndarray, scores: np.ndarray) -> list[float | None]:
    """One-vs-rest AUROC per class; None where the class is absent or alone in the test set."""
    result = []
    for column in range(y_true_onehot.shape[1]):
        truth = y_true_onehot[:, column]
        result.append(float(roc_auc_score(truth, scores[:, column])) if 0 < truth.sum() < len(truth) else None)
    return result


def macro(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None

