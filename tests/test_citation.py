"""Citable results: the patient bootstrap's intervals against a NumPy computation written from its
definition, and the labels record (digest, join counts, split source, mixed-label patients) with its
warnings in an evaluation's JSON."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from embedstore.eval.bootstrap import patient_bootstrap
from embedstore.store import Store
from tests.support import run_cli_here, write_csv


def reference_interval(correct: np.ndarray, patients: np.ndarray, resamples: int, seed: int) -> list[float]:
    """Top-1 accuracy's 95% interval: draw as many patients as there are, with replacement, pool every
    image of each drawn patient (repeated as drawn), score, take the 2.5th and 97.5th percentiles."""
    ids = np.unique(patients.astype(str))
    rows_of = {patient: np.flatnonzero(patients.astype(str) == patient) for patient in ids}
    rng = np.random.default_rng(seed)
    accuracies = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(ids), len(ids))
        rows = np.concatenate([rows_of[ids[i]] for i in drawn])
        accuracies.append(correct[rows].mean())
    return [float(np.percentile(accuracies, 2.5)), float(np.percentile(accuracies, 97.5))]


def scores_for(targets: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two-class scores whose argmax is the target where `right`, the other class elsewhere."""
    predicted = np.where(right, targets, 1 - targets)
    scores = np.full((len(targets), 2), 0.2)
    scores[np.arange(len(targets)), predicted] = 0.8
    return scores


def test_bootstrap_matches_its_definition_and_resamples_patients():
    rng = np.random.default_rng(5)
    targets = rng.integers(0, 2, 120)
    right = rng.random(120) < 0.8
    patients = np.array([f"p{i // 3}" for i in range(120)], dtype=object)  # 40 patients of 3 images
    interval = patient_bootstrap(targets, scores_for(targets, right), patients, multilabel=False, resamples=300, seed=7)
    assert np.allclose(interval["top1_accuracy"], reference_interval(right, patients, 300, 7), atol=1e-12)
    low, high = interval["balanced_accuracy"]
    assert low < high and set(interval) == {"top1_accuracy", "balanced_accuracy", "macro_auroc", "macro_f1"}

    # The same 100 images as 2 patients of 50 images each, one all right and one half right, against
    # 100 patients of one image: resampling patients, the first is far less certain.
    targets = np.tile([0, 1], 50)
    right = np.r_[np.ones(50, bool), np.arange(50) % 2 == 0]
    two = patient_bootstrap(targets, scores_for(targets, right), np.repeat(["a", "b"], 50), False, 300, 7)
    hundred = patient_bootstrap(targets, scores_for(targets, right), np.arange(100).astype(str), False, 300, 7)
    width = lambda interval: interval["top1_accuracy"][1] - interval["top1_accuracy"][0]  # noqa: E731
    assert width(two) > 2 * width(hundred)
    assert np.allclose(two["top1_accuracy"], reference_interval(right, np.repeat(["a", "b"], 50), 300, 7))


def test_labels_record_and_its_three_warnings(ingested, tmp_path, monkeypatch, capsys):
    items = Store.open(ingested.path).rows("items", columns=["path"]).to_pylist()
    paths = sorted({row["path"] for row in items})
    rows = [{"path": path, "label": "a" if index % 2 else "b", "split": "test" if index % 3 == 0 else "train",
             "patient_id": f"p{index}"} for index, path in enumerate(paths)]
    rows[1]["patient_id"] = rows[2]["patient_id"] = "mixed"  # labels a and b: one patient, two classes
    rows += [{"path": f"/nowhere/{n}.png", "label": "a", "split": "train", "patient_id": f"gone{n}"} for n in range(2)]
    labels = write_csv(tmp_path / "labels.csv", rows)
    code, stdout, stderr = run_cli_here(["eval", "knn", str(ingested.path), "--labels", str(labels), "--feature",
                                         "patch_mean", "--split-by", "patient", "-k", "1", "-o",
                                         str(tmp_path / "knn.json")], monkeypatch, capsys)
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("embedstore: warning:")]
    assert any("2 of" in line and "match no stored row" in line for line in warnings), stderr
    assert any("1 patients have images of more than one class (e.g. mixed)" in line for line in warnings), stderr
    assert any("split column is ignored" in line for line in warnings), stderr
    result = json.loads((tmp_path / "knn.json").read_text())
    record = result["labels"]
    assert record["sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert (record["csv_rows"], record["rows_joined"], record["rows_unmatched"]) == (len(rows), len(paths), 2)
    assert record["mixed_label_patients"] == 1 and record["csv_split_overridden"]
    assert record["split_source"].startswith("--split-by patient (seed 0")
    assert sum(record["patients_per_split"].values()) == len(paths) - 1  # "mixed" holds two files
    assert sum(sum(counts.values()) for counts in record["class_counts"].values()) == sum(result["counts"].values())
    assert result["provenance"]["model_spec"]["model_id"] == result["model_id"]
    assert "ci95" in result["metrics"]["test"][str(result["best_k_on_val"] or 1)]
    assert result["warnings"][:3] == [line.removeprefix("embedstore: warning: ") for line in warnings[:3]]


def test_report_plots_say_what_they_show(ingested, tmp_path, monkeypatch, capsys):
    from tests.support import write_modality_labels

    labels = write_modality_labels(tmp_path / "modality.csv", ingested.path)
    code, _, stderr = run_cli_here(["eval", "linear", str(ingested.path), "--labels", str(labels), "--feature",
                                    "patch_mean", "--report", str(tmp_path / "linear")], monkeypatch, capsys)
    assert code == 0, stderr
    model_id = json.loads((tmp_path / "linear" / "linear.json").read_text())["model_id"]
    confusion = (tmp_path / "linear" / "confusion.svg").read_text()
    assert (tmp_path / "linear" / "confusion.png").stat().st_size > 0
    for text in (model_id, f"{tmp_path.name}/modality.csv", "feature patch_mean", "predicted", "share of the true class"):
        assert text in confusion, text
    assert "%" in confusion  # row-normalised rates beside the counts

    code, _, stderr = run_cli_here(["eval", "fewshot", str(ingested.path), "--labels", str(labels), "--feature",
                                    "patch_mean", "--shots", "1,2", "--tries", "3", "--report", str(tmp_path / "fewshot")],
                                   monkeypatch, capsys)
    assert code == 0, stderr
    curve = (tmp_path / "fewshot" / "fewshot.svg").read_text()
    for text in (model_id, "chance", ">1<", ">2<", "training patients per class"):
        assert text in curve, text
    assert "2^" not in curve and "$2" not in curve  # plain shot ticks, not powers of two


def test_weighted_metrics_equal_the_eval_metrics_on_repeated_rows():
    from embedstore.eval.bootstrap import weighted_headline
    from embedstore.eval.metrics import multiclass_metrics, multilabel_metrics

    rng = np.random.default_rng(2)
    weights = rng.integers(1, 4, 60)
    targets = rng.integers(0, 3, 60)
    scores = rng.dirichlet(np.ones(3), 60).round(1)  # rounded: ties, which AUROC counts one half
    repeated = np.repeat(np.arange(60), weights)
    weighted = weighted_headline(targets, scores, weights, multilabel=False)
    plain = multiclass_metrics(targets[repeated], scores[repeated], ["a", "b", "c"])
    for name, value in weighted.items():
        assert abs(value - plain[name]) < 1e-12, name
    labels = rng.integers(0, 2, (60, 3))
    weighted = weighted_headline(labels, scores, weights, multilabel=True)
    plain = multilabel_metrics(labels[repeated], scores[repeated], ["a", "b", "c"])
    for name, value in weighted.items():
        assert abs(value - plain[name]) < 1e-12, name
