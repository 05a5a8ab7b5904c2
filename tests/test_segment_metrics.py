"""Segmentation scores (`embedstore.eval.segment.metrics`): parity with an independent NumPy computation from
the formulas, empty-class rules, the reference library calls (MONAI DiceMetric / MeanIoU, torchmetrics
DiceScore), perfect and missed classes, order and piece independence, bad input.

The test set mixes 3D and 2D volumes of four foreground classes with every empty-class case: class 2 absent
from one volume's truth but predicted there, class 3 absent from one volume's truth and prediction, and
class 4 absent from every truth and every prediction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot
from torchmetrics.segmentation import DiceScore

from embedstore.eval.segment import metrics
from embedstore.eval.segment.metrics import SegmentationScorer

CLASSES = {1: "liver", 2: "spleen", 3: "kidney", 4: "never_seen"}
NUM_CLASSES = 5
TOLERANCE = 1e-6


def _noisy(truth: np.ndarray, rng: np.random.Generator, values: list[int], rate: float = 0.3) -> np.ndarray:
    """A prediction that relabels `rate` of the pixels at random among `values`."""
    prediction = truth.copy()
    flip = rng.random(truth.shape) < rate
    prediction[flip] = rng.choice(values, size=int(flip.sum()))
    return prediction


def _volumes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(12)
    volumes = {}
    truth = rng.choice([0, 1, 2, 3], size=(7, 20, 18), p=[0.5, 0.2, 0.2, 0.1])
    volumes["ct_a"] = truth, _noisy(truth, rng, [0, 1, 2, 3])
    truth = rng.choice([0, 1, 3], size=(4, 16, 25))  # no spleen in the truth ...
    volumes["ct_b"] = truth, _noisy(truth, rng, [0, 1, 2, 3])  # ... but predicted
    truth = rng.choice([0, 1, 2], size=(31, 27)).astype(np.uint8)  # no kidney in truth or prediction
    volumes["xray_c"] = truth, _noisy(truth, rng, [0, 1, 2])
    truth = rng.choice([0, 1, 2, 3], size=(12, 40)).astype(np.int16)
    volumes["xray_d"] = truth, _noisy(truth, rng, [0, 1, 2, 3], rate=0.6)
    return volumes


def _score(volumes: dict[str, tuple[np.ndarray, np.ndarray]], order: list[str] | None = None) -> dict:
    scorer = SegmentationScorer(CLASSES)
    for name in order or list(volumes):
        scorer.add(name, *volumes[name])
    return scorer.result()


def _mean_of_defined(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else np.nan


def _numpy_reference(volumes: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Every score from the formulas, in float64, with the empty-class rules stated by the scorer."""
    classes = range(1, NUM_CLASSES)
    pooled = {c: np.zeros(3, dtype=np.int64) for c in classes}  # TP, FP, FN over all pixels
    dice, dice_present, iou = [], [], []
    for truth, prediction in volumes.values():
        dice.append([]), dice_present.append([]), iou.append([])
        for c in classes:
            t, p = truth == c, prediction == c
            tp, fp, fn = np.sum(t & p), np.sum(~t & p), np.sum(t & ~p)
            pooled[c] += [tp, fp, fn]
            if t.any():
                dice[-1].append(2 * tp / (2 * tp + fp + fn))
            else:  # MONAI ignore_empty=False: 1 if also not predicted, else 0
                dice[-1].append(0.0 if p.any() else 1.0)
            dice_present[-1].append(dice[-1][-1] if t.any() else np.nan)  # nnU-Net: the volume does not count
            iou[-1].append(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
    # pooled scores: a class in no truth and no prediction is undefined (NaN) and left out of the mean
    global_dice = [2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan for tp, fp, fn in pooled.values()]
    pooled_iou = [tp / (tp + fp + fn) if tp + fp + fn else np.nan for tp, fp, fn in pooled.values()]
    dice, dice_present, iou = np.array(dice), np.array(dice_present), np.array(iou)
    present_per_class = [_mean_of_defined(dice_present[:, i]) for i in range(len(classes))]
    return {
        "global_dice": _mean_of_defined(global_dice),
        "per_volume_dice": dice.mean(axis=0).mean(),
        "per_volume_dice_present": _mean_of_defined(present_per_class),
        "mean_iou": _mean_of_defined(pooled_iou),
        "per_volume_iou": iou.mean(axis=0).mean(),
        "class_global_dice": global_dice,
        "class_per_volume_dice": dice.mean(axis=0),
        "class_per_volume_dice_present": present_per_class,
        "class_iou": pooled_iou,
        "class_per_volume_iou": iou.mean(axis=0),
        "volume_dice": dict(zip(volumes, dice)),
    }


def _assert_close(actual: float | None, expected: float, what: str) -> None:
    if np.isnan(expected):
        assert actual is None, f"{what}: {actual}, expected None (undefined)"
    else:
        assert actual is not None and abs(actual - expected) <= TOLERANCE, f"{what}: {actual} != {expected}"


def test_volumes_hold_every_empty_class_case():
    volumes = _volumes()
    truth, prediction = volumes["ct_b"]
    assert not (truth == 2).any() and (prediction == 2).any()
    truth, prediction = volumes["xray_c"]
    assert not (truth == 3).any() and not (prediction == 3).any()
    assert all(not (t == 4).any() and not (p == 4).any() for t, p in volumes.values())


def test_scores_equal_numpy_formulas_including_empty_classes():
    volumes = _volumes()
    result, expected = _score(volumes), _numpy_reference(volumes)
    for key in ("global_dice", "per_volume_dice", "per_volume_dice_present", "mean_iou", "per_volume_iou"):
        _assert_close(result[key], expected[key], key)
    for i, row in enumerate(result["per_class"]):
        assert (row["class"], row["value"]) == (CLASSES[i + 1], i + 1)
        for key in ("global_dice", "per_volume_dice", "per_volume_dice_present", "iou", "per_volume_iou"):
            _assert_close(row[key], expected[f"class_{key}"][i], f"{row['class']} {key}")
        truths = [t for t, _ in volumes.values()]
        assert row["truth_pixels"] == sum(int((t == i + 1).sum()) for t in truths)
        assert row["predicted_pixels"] == sum(int((p == i + 1).sum()) for _, p in volumes.values())
        assert row["volumes_with_class"] == sum(bool((t == i + 1).any()) for t in truths)
    for row in result["per_volume"]:
        volume_dice = expected["volume_dice"][row["name"]]
        _assert_close(row["dice"], volume_dice.mean(), row["name"])
        for i, name in enumerate(CLASSES.values()):
            _assert_close(row["per_class"][name], volume_dice[i], f"{row['name']} {name}")
    assert result["n_volumes"] == 4
    assert result["n_pixels"] == sum(t.size for t, _ in volumes.values())


def test_empty_classes_follow_the_stated_rule():
    result = _score(_volumes())
    never_seen = result["per_class"][3]
    # pooled scores leave the class out; per-volume scores give 1 (absent from truth and prediction) or drop it
    assert never_seen["global_dice"] is None and never_seen["iou"] is None
    assert never_seen["per_volume_dice"] == 1.0 and never_seen["per_volume_iou"] == 1.0
    assert never_seen["per_volume_dice_present"] is None
    assert never_seen["volumes_with_class"] == 0
    by_name = {row["name"]: row["per_class"] for row in result["per_volume"]}
    assert by_name["ct_b"]["spleen"] == 0.0  # absent from the truth, predicted
    assert by_name["xray_c"]["kidney"] == 1.0  # absent from both
    assert "ignore_empty" in result["empty_class_rule"]


def test_scores_equal_the_reference_library_calls():
    """The per-volume scores follow MONAI's DiceMetric and MeanIoU, the pooled Dice torchmetrics' DiceScore."""
    volumes = _volumes()
    result = _score(volumes)
    study_dice = DiceScore(num_classes=NUM_CLASSES, include_background=False, average="macro",
                           aggregation_level="global", input_format="index")
    monai_dice = {empty: DiceMetric(include_background=False, reduction="none", ignore_empty=empty,
                                    num_classes=NUM_CLASSES) for empty in (False, True)}
    monai_iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)
    for truth, prediction in volumes.values():
        t = torch.from_numpy(truth.astype(np.int64))[None, None]
        p = torch.from_numpy(prediction.astype(np.int64))[None, None]
        study_dice.update(p.reshape(1, -1), t.reshape(1, -1))
        for metric in monai_dice.values():
            metric(p, t)
        monai_iou(one_hot(p, NUM_CLASSES), one_hot(t, NUM_CLASSES))
    _assert_close(result["global_dice"], float(study_dice.compute()), "DiceScore")
    _assert_close(result["per_volume_dice"], float(monai_dice[False].aggregate().mean(0).mean()), "DiceMetric")
    present = monai_dice[True].aggregate().double().nanmean(0)
    _assert_close(result["per_volume_dice_present"], float(present.nanmean()), "DiceMetric ignore_empty")
    _assert_close(result["per_volume_iou"], float(monai_iou.aggregate().mean(0).mean()), "MeanIoU")


def test_perfect_prediction_scores_one():
    scorer = SegmentationScorer(CLASSES)
    for name, (truth, _) in _volumes().items():
        truth = np.where(truth == 0, 4, truth) if name == "ct_a" else truth  # every class seen somewhere
        scorer.add(name, truth, truth.copy())
    result = scorer.result()
    scores = ["global_dice", "per_volume_dice", "per_volume_dice_present", "mean_iou", "per_volume_iou"]
    assert all(result[key] == pytest.approx(1.0, abs=TOLERANCE) for key in scores)
    for row in result["per_class"]:
        for key in ("global_dice", "per_volume_dice", "per_volume_dice_present", "iou", "per_volume_iou"):
            assert row[key] == pytest.approx(1.0, abs=TOLERANCE), (row["class"], key)
    assert all(row["dice"] == pytest.approx(1.0, abs=TOLERANCE) for row in result["per_volume"])


def test_a_class_never_predicted_scores_zero():
    scorer = SegmentationScorer(CLASSES)
    for name, (truth, _) in _volumes().items():
        truth = truth.copy()
        truth.flat[0] = 1  # liver in every volume's truth ...
        scorer.add(name, truth, np.where(truth == 1, 0, truth))  # ... and never predicted
    liver = scorer.result()["per_class"][0]
    for key in ("global_dice", "per_volume_dice", "per_volume_dice_present", "iou", "per_volume_iou"):
        assert liver[key] == 0.0, key
    assert liver["predicted_pixels"] == 0 and liver["volumes_with_class"] == 4


def test_result_does_not_depend_on_the_order_of_volumes():
    volumes = _volumes()
    assert _score(volumes) == _score(volumes, order=["xray_d", "ct_b", "xray_c", "ct_a"])


def test_result_does_not_depend_on_how_volumes_are_cut_into_pieces(monkeypatch):
    volumes = _volumes()
    whole = _score(volumes)
    monkeypatch.setattr(metrics, "_PIECE_PIXELS", 97)  # a prime: pieces end mid-row and mid-slice
    assert _score(volumes) == whole


def test_truth_and_prediction_of_different_sizes_raise():
    scorer = SegmentationScorer(CLASSES)
    with pytest.raises(ValueError, match="shape"):
        scorer.add("ct", np.zeros((3, 8, 8), dtype=np.uint8), np.zeros((3, 8, 9), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        scorer.add("xray", np.zeros((8, 8), dtype=np.uint8), np.zeros((1, 8, 8), dtype=np.uint8))


@pytest.mark.parametrize("prediction, message", [
    (np.full((4, 4), 5), "class value 5"),
    (np.full((4, 4), -1), "class value -1"),
    (np.zeros((4, 4), dtype=np.float32), "integer"),
])
def test_values_outside_the_classes_raise(prediction, message):
    with pytest.raises(ValueError, match=message):
        SegmentationScorer(CLASSES).add("xray", np.zeros((4, 4), dtype=np.uint8), prediction)


def test_a_volume_scored_twice_or_none_at_all_raises():
    scorer = SegmentationScorer(CLASSES)
    with pytest.raises(ValueError, match="no volumes"):
        scorer.result()
    scorer.add("ct", np.zeros((2, 4, 4), dtype=np.uint8), np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="already scored"):
        scorer.add("ct", np.zeros((2, 4, 4), dtype=np.uint8), np.zeros((2, 4, 4), dtype=np.uint8))


def test_class_values_with_a_gap_raise():
    with pytest.raises(ValueError, match="without gaps"):
        SegmentationScorer({1: "liver", 3: "kidney"})
