"""Segmentation scores, background excluded: the study's pooled Dice, per-volume Dice under both empty-class
conventions (MONAI's and nnU-Net's), pooled and per-volume IoU, and a per-class table.

Every score comes from torchmetrics, fed one volume at a time in pieces: per-class Dice (F1 over pixels) and
IoU for the volume, and the same two pooled over all volumes (the study's number). They count from a confusion
matrix (one bincount per piece), so scoring costs the same for 2 classes or 14. MONAI's DiceMetric, whose
per-volume convention these follow, loops over classes with a full-volume boolean selection each: on one CPU
thread, a 512x512x100 volume with 5 classes took 2.5 s for MONAI's Dice alone and 0.7 s for everything here.
tests/test_segment_metrics.py checks both against MONAI's DiceMetric and MeanIoU and against
torchmetrics' DiceScore(aggregation_level="global"), the reference study's call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

EMPTY_CLASS_RULE = (
    "Background (0) is never scored. per_volume_dice and per_volume_iou (MONAI ignore_empty=False): a class absent "
    "from a volume's truth scores 1 if it is also absent from its prediction, else 0. per_volume_dice_present "
    "(MONAI ignore_empty=True, nnU-Net): a volume whose truth lacks the class does not count for that class; a class "
    "absent from every truth is null and left out of the mean over classes. global_dice and mean_iou (pixel counts "
    "pooled over all volumes): a class predicted but never in the truth scores 0; a class absent from every truth "
    "and every prediction is null and left out of the macro mean, as torchmetrics' DiceScore does."
)

# 2**20 pixels per piece: each int64 copy torchmetrics makes stays at 8 MiB, and larger pieces measured slower
_PIECE_PIXELS = 2**20


@dataclass(frozen=True)
class _VolumeScores:
    """One volume's scores for the foreground classes 1..C-1, in order."""

    name: str
    dice: np.ndarray  # a class absent from truth and prediction scores 1 (MONAI ignore_empty=False)
    iou: np.ndarray  # same rule
    truth_pixels: np.ndarray
    predicted_pixels: np.ndarray
    pixels: int

    @property
    def dice_present(self) -> np.ndarray:
        """MONAI's ignore_empty=True: the same Dice, undefined (NaN) where the truth lacks the class."""
        return np.where(self.truth_pixels > 0, self.dice, np.nan)


class SegmentationScorer:
    """Accumulates segmentation scores volume by volume (a 2D image counts as a one-slice volume), so a test
    set is never held in memory at once. Background (class 0) is excluded from every score."""

    def __init__(self, class_names: dict[int, str]):
        """`class_names`: foreground class value → name, values 1..C-1 without gaps (C = max + 1)."""
        values = sorted(class_names)
        if values != list(range(1, len(values) + 1)):
            raise ValueError(f"foreground class values must be 1..C-1 without gaps, got {values}")
        self._names = [class_names[v] for v in values]
        self._num_classes = len(values) + 1
        self._pooled_dice, self._pooled_iou = self._dice_and_iou()
        self._volumes: dict[str, _VolumeScores] = {}

    def add(self, name: str, truth: np.ndarray, prediction: np.ndarray) -> None:
        """One volume: integer class maps of the same shape (2D or 3D)."""
        if name in self._volumes:
            raise ValueError(f"{name}: volume already scored")
        truth, prediction = np.asarray(truth), np.asarray(prediction)
        if truth.shape != prediction.shape:
            raise ValueError(f"{name}: truth shape {truth.shape} != prediction shape {prediction.shape}")
        if truth.ndim not in (2, 3) or truth.size == 0:
            raise ValueError(f"{name}: expected a non-empty 2D or 3D class map, got shape {truth.shape}")
        dice, iou = self._dice_and_iou()
        for truth_piece, predicted_piece in self._pieces(name, truth, prediction):
            for metric in (dice, iou, self._pooled_dice, self._pooled_iou):
                metric.update(predicted_piece, truth_piece)
        confusion = iou.confmat.numpy()  # rows: truth class, columns: predicted class
        self._volumes[name] = _VolumeScores(
            name=name,
            dice=dice.compute().double().numpy()[1:],
            iou=iou.compute().double().numpy()[1:],
            truth_pixels=confusion.sum(axis=1)[1:],
            predicted_pixels=confusion.sum(axis=0)[1:],
            pixels=truth.size,
        )

    def result(self) -> dict:
        if not self._volumes:
            raise ValueError("no volumes scored")
        # sorted by name, so the result does not depend on the order (or executor) that added the volumes
        volumes = [self._volumes[name] for name in sorted(self._volumes)]
        per_class = self._per_class(volumes)
        return {
            # torchmetrics' DiceScore(average="macro") is the nanmean over classes of the per-class scores
            "global_dice": _mean_of_known(c["global_dice"] for c in per_class),
            "per_volume_dice": _mean_of_known(c["per_volume_dice"] for c in per_class),
            "per_volume_dice_present": _mean_of_known(c["per_volume_dice_present"] for c in per_class),
            "mean_iou": _mean_of_known(c["iou"] for c in per_class),
            "per_volume_iou": _mean_of_known(c["per_volume_iou"] for c in per_class),
            "empty_class_rule": EMPTY_CLASS_RULE,
            "per_class": per_class,
            "per_volume": [
                {"name": v.name, "dice": float(v.dice.mean()),
                 "per_class": {class_name: float(d) for class_name, d in zip(self._names, v.dice)}}
                for v in volumes
            ],
            "n_volumes": len(volumes),
            "n_pixels": sum(v.pixels for v in volumes),
        }

    def _dice_and_iou(self) -> tuple[MulticlassF1Score, MulticlassJaccardIndex]:
        """Per-class Dice (F1 over pixels: 2TP / (2TP + FP + FN)) and IoU from confusion-matrix counts.

        zero_division=1 is MONAI's ignore_empty=False (TP + FP + FN = 0 only when the class is absent from both
        truth and prediction); the pooled scores replace it with None (see _per_class). Background is dropped
        from the output rather than passed as ignore_index, which would drop the background-truth pixels and so
        the false positives on them. validate_args=False: _pieces has checked the values, once. The counts are
        exact int64; torchmetrics divides them in float32, which keeps a score within 2e-7 of the float64 value
        even for counts past 2**24 (measured 2.5e-8 on a 512x512x100 volume).
        """
        options = dict(num_classes=self._num_classes, average="none", zero_division=1, validate_args=False)
        return MulticlassF1Score(**options), MulticlassJaccardIndex(**options)

    def _pieces(self, name: str, truth: np.ndarray, prediction: np.ndarray):
        """The two class maps as aligned flat int64 pieces; any pixel order gives the same counts."""
        flat_truth = self._label_tensor(name, "truth", truth).reshape(-1)
        flat_prediction = self._label_tensor(name, "prediction", prediction).reshape(-1)
        for start in range(0, flat_truth.numel(), _PIECE_PIXELS):
            stop = start + _PIECE_PIXELS
            yield flat_truth[start:stop].long(), flat_prediction[start:stop].long()

    def _label_tensor(self, name: str, role: str, labels: np.ndarray) -> torch.Tensor:
        """A class map as a compact integer tensor, its values checked to lie in 0..C-1."""
        if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: {role} must hold integer class values, got dtype {labels.dtype}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self._num_classes:
            raise ValueError(f"{name}: {role} holds class value {low if low < 0 else high}, "
                             f"outside 0..{self._num_classes - 1}")
        # the whole volume is held as uint8 (not int64) while its pieces are widened one at a time
        compact = np.uint8 if self._num_classes <= 256 else np.int32
        return torch.from_numpy(np.ascontiguousarray(labels, dtype=compact))

    def _per_class(self, volumes: list[_VolumeScores]) -> list[dict]:
        """The per-class table; a score undefined under its empty-class rule is None."""
        dice = np.stack([v.dice for v in volumes])
        dice_present = np.stack([v.dice_present for v in volumes])
        iou = np.stack([v.iou for v in volumes])
        truth_pixels = np.stack([v.truth_pixels for v in volumes])
        predicted_pixels = np.stack([v.predicted_pixels for v in volumes])
        # a class in no truth and no prediction has no pooled score (torchmetrics' DiceScore gives NaN)
        seen = (truth_pixels.sum(axis=0) + predicted_pixels.sum(axis=0)) > 0
        global_dice = np.where(seen, self._pooled_dice.compute().double().numpy()[1:], np.nan)
        pooled_iou = np.where(seen, self._pooled_iou.compute().double().numpy()[1:], np.nan)
        return [
            {"class": class_name, "value": i + 1,
             "global_dice": _known(global_dice[i]),
             "per_volume_dice": float(dice[:, i].mean()),
             "per_volume_dice_present": _mean_of_known(dice_present[:, i]),
             "iou": _known(pooled_iou[i]),
             "per_volume_iou": float(iou[:, i].mean()),
             "truth_pixels": int(truth_pixels[:, i].sum()),
             "predicted_pixels": int(predicted_pixels[:, i].sum()),
             "volumes_with_class": int((truth_pixels[:, i] > 0).sum())}
            for i, class_name in enumerate(self._names)
        ]


def _known(value: float) -> float | None:
    """A JSON-ready score: NaN (undefined under the empty-class rule) becomes None."""
    return None if np.isnan(value) else float(value)


def _mean_of_known(values) -> float | None:
    """The mean of the defined scores (None and NaN left out); None when none is defined."""
    known = [float(v) for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(known)) if known else None
