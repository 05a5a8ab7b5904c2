"""The fine-tuning protocol and its run folder.

Each head learning rate of the grid is trained on train and scored on val (in `linear` mode all of
them in one pass over a frozen backbone); the rate with the best val score (ties: the middle of the
tied rates, eval/selection.py) is retrained on train + val and scored on test once, with the evals'
metrics. The run folder (`--out`) holds what a rerun needs to go on where a killed run stopped: the
settings (`run.json`), a checkpoint per training after every epoch, each finished training's scores,
then the fine-tuned backbone as a timm `.safetensors` file that `embedstore ingest --weights` reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from embedstore.errors import UsageError
from embedstore.eval.bootstrap import with_interval
from embedstore.eval.citation import cite
from embedstore.eval.labels import predictions_of
from embedstore.eval.linear import selection_metric, selection_score
from embedstore.eval.metrics import multiclass_metrics, multilabel_metrics
from embedstore.eval.results import FinetuneResult
from embedstore.eval.selection import best_candidate
from embedstore.finetune.data import FinetuneData
from embedstore.finetune.modes import save_backbone, trainable_count
from embedstore.finetune.train import TrainSettings, TrainStep, Workers, build_classifier, predict, train

FINAL = "final"  # the training on train + val at the chosen rate
REPORT_EVERY_S = 5.0  # a progress line at least this often (and at each epoch's end)


@dataclass(frozen=True)
class Training:
    name: str  # its checkpoint and scores in the run folder
    head_lrs: tuple[float, ...]
    splits: tuple[str, ...]  # trained on
    scored_on: str


def trainings(settings: TrainSettings) -> list[Training]:
    """The val trainings of the grid: one for all rates over a frozen backbone, else one per rate."""
    if settings.mode == "linear":
        return [Training("val", settings.head_lrs, ("train",), "val")]
    return [Training(f"val-lr{lr:g}", (lr,), ("train",), "val") for lr in settings.head_lrs]


class RunFolder:
    """`--out DIR`: settings, checkpoints, finished trainings' scores, the fine-tuned backbone."""

    def __init__(self, path: Path):
        self.path = path.resolve()  # the result names the checkpoint by an absolute path

    def start(self, description: dict) -> bool:
        """Record the run's description; True when a previous run with the same one is resumed.
        UsageError when the folder holds a different run."""
        record = self.path / "run.json"
        if record.is_file():
            previous = json.loads(record.read_text())
            if previous != description:
                raise UsageError(f"--out {self.path} holds a fine-tuning run with other settings "
                                 f"({', '.join(differences(description, previous))}): give another --out, or remove "
                                 "it to start again")
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(description, indent=2) + "\n")
        return False

    def checkpoint(self, training: Training) -> Path:
        return self.path / "checkpoints" / f"{training.name}.pt"

    def scores_file(self, training: Training) -> Path:
        return self.path / "scores" / f"{training.name}.json"

    def finished(self, training: Training) -> dict | None:
        path = self.scores_file(training)
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, training: Training, scores: dict) -> None:
        path = self.scores_file(training)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(scores, indent=2) + "\n")
        self.checkpoint(training).unlink(missing_ok=True)  # finished: its scores are what a rerun needs

    def backbone_file(self, spec_name: str, mode: str) -> Path:
        return self.path / f"{spec_name}-{mode}.safetensors"

    def test_scores_file(self) -> Path:
        return self.path / "scores" / "test_scores.npy"

    def log(self, line: str) -> None:
        """A line of the run's log, `train.log` (Ray workers' only channel to the user)."""
        with open(self.path / "train.log", "a") as handle:
            handle.write(line + "\n")


def differences(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    """The names of the entries that differ, nested ones as settings.epochs."""
    names = []
    for key in sorted(ours.keys() | theirs.keys()):
        mine, other = ours.get(key), theirs.get(key)
        if isinstance(mine, dict) and isinstance(other, dict):
            names += differences(mine, other, f"{prefix}{key}.")
        elif mine != other:
            names.append(f"{prefix}{key}")
    return names


def run_description(data: FinetuneData, settings: TrainSettings, labels: Path) -> dict:
    """What the results depend on: a rerun with another description must not resume this one. As
    JSON reads it back (tuples as lists), so that it compares equal to the recorded one."""
    return json.loads(json.dumps({
        "model_id": data.spec.model_id, "labels": str(Path(labels).resolve()), "classes": data.labelled.classes,
        "counts": data.labelled.counts(), "settings": {**asdict(settings), "decode_workers": None}}))


class StepReporter:
    """A training's progress: images trained for a bar (`on_images`), and a log line (epoch, step,
    loss, images/s) every REPORT_EVERY_S seconds and at the end of each epoch, so a long run is never
    silent."""

    def __init__(self, name: str, log: Callable[[str], None], on_images: Callable[[int], None] | None = None):
        self.name, self.log, self.on_images = name, log, on_images
        self.started = self.last = time.perf_counter()
        self.images = 0

    def __call__(self, step: TrainStep) -> None:
        self.images += step.images
        if self.on_images:
            self.on_images(step.images)
        now = time.perf_counter()
        if now - self.last >= REPORT_EVERY_S or step.step == step.steps:
            self.last = now
            self.log(f"{self.name}: epoch {step.epoch}/{step.epochs}, step {step.step}/{step.steps}, "
                     f"loss {float(step.loss):.4f}, {self.images / max(now - self.started, 1e-9):,.1f} images/s")


def finetune_protocol(data: FinetuneData, settings: TrainSettings, folder: RunFolder, weights: str | None,
                      workers: Workers, on_step: Callable[[int], None] | None = None,
                      log: Callable[[str], None] = lambda line: None) -> None:
    """Train the grid on train, choose on val, retrain on train + val, score test: every rank trains,
    the main rank scores and writes. What a killed run finished is read back, not trained again.
    `on_step(images)` after each step; `log(line)` for the progress lines."""
    for training in trainings(settings):
        if folder.finished(training) is None:
            run_training(data, settings, folder, weights, workers, training, on_step, log)
        workers.barrier()  # the main rank's scores are written before any rank reads them
    final = Training(FINAL, (chosen_rate(data, settings, folder)[0],), ("train", "val"), "test")
    if folder.finished(final) is None:
        run_training(data, settings, folder, weights, workers, final, on_step, log)
    workers.barrier()


def run_training(data: FinetuneData, settings: TrainSettings, folder: RunFolder, weights: str | None,
                 workers: Workers, training: Training, on_step, log) -> None:
    labelled = data.labelled
    torch.manual_seed(settings.seed)  # heads and adapters start the same in every rank and every rerun
    classifier = build_classifier(data.spec, weights, settings, len(labelled.classes), len(training.head_lrs))
    rows = data.rows(*training.splits)
    reporter = StepReporter(training.name, log if workers.is_main else lambda line: None, on_step)
    stats = train(classifier, data.images(rows, augment=True, seed=settings.seed), list(training.head_lrs), settings,
                  labelled.multilabel, workers, folder.checkpoint(training), reporter)
    if not workers.is_main:
        return
    resumed = f", resumed after epoch {stats.resumed_from_epoch}" if stats.resumed_from_epoch else ""
    log(f"{training.name}: trained {settings.epochs} epochs on {len(rows):,} slices, "
        f"{stats.images_per_second:,.1f} images/s{resumed}")
    part = data.part(training.scored_on)
    probabilities = predict(classifier, data.images(data.rows(training.scored_on), augment=False),
                            labelled.multilabel, settings.batch_size, workers.device, settings.decode_workers)
    scores = {"head_lrs": list(training.head_lrs), "images": stats.images, "seconds": stats.seconds,
              "resumed_from_epoch": stats.resumed_from_epoch, "trainable_parameters": trainable_count(classifier)}
    if training.name == FINAL:
        metrics = (multilabel_metrics if labelled.multilabel else multiclass_metrics)(
            part.targets, probabilities[0], part.classes)
        scores["test"] = with_interval(metrics, part.targets, probabilities[0], part.patients, labelled.multilabel)
        folder.test_scores_file().parent.mkdir(parents=True, exist_ok=True)
        np.save(folder.test_scores_file(), probabilities[0])
        scores["backbone_trainable_parameters"] = trainable_count(classifier.backbone)
        if settings.mode != "linear":  # a frozen backbone is the stored model's own
            save_backbone(classifier.backbone, folder.backbone_file(data.spec.name, settings.mode))
    else:
        scores["val_scores"] = [selection_score(part, head) for head in probabilities]
    folder.finish(training, scores)


def chosen_rate(data: FinetuneData, settings: TrainSettings, folder: RunFolder) -> tuple[float, float, list[float]]:
    """(the head rate SELECTION_RULE picks, its val score, every rate's val score in grid order): a
    tie of val scores goes to the middle of the tied rates, in increasing order."""
    by_rate = {}
    for training in trainings(settings):
        finished = folder.finished(training)
        by_rate.update(zip(finished["head_lrs"], finished["val_scores"]))
    rates = sorted(settings.head_lrs)
    best = rates[best_candidate([by_rate[lr] for lr in rates])]
    return best, by_rate[best], [by_rate[lr] for lr in settings.head_lrs]


def finetune_result(data: FinetuneData, settings: TrainSettings, folder: RunFolder, workers: int) -> FinetuneResult:
    """The finished run's result, read from its folder, with its provenance."""
    best, val_score, val_scores = chosen_rate(data, settings, folder)
    final = folder.finished(Training(FINAL, (best,), ("train", "val"), "test"))
    finished = [folder.finished(t) for t in trainings(settings)] + [final]
    images, seconds = sum(f["images"] for f in finished), sum(f["seconds"] for f in finished)
    result = FinetuneResult(
        task=f"finetune:{settings.mode}", model_id=data.spec.model_id, feature="cls+patch_mean", level="slice",
        classes=data.labelled.classes, multilabel=data.labelled.multilabel, counts=data.labelled.counts(),
        mode=settings.mode, epochs=settings.epochs, batch_size=settings.batch_size,
        backbone_lr=settings.backbone_rate(best) if settings.mode != "linear" else None,
        head_lr_grid=list(settings.head_lrs), val_scores=val_scores, chosen_head_lr=best, val_score=val_score,
        selection_metric=selection_metric(data.labelled), val_carved_from_train=data.val_carved,
        backbone_trainable_parameters=final["backbone_trainable_parameters"],
        trainable_parameters=final["trainable_parameters"], workers=workers,
        train_images_per_second=images / seconds if seconds else 0.0,
        checkpoint=None if settings.mode == "linear" else str(folder.backbone_file(data.spec.name, settings.mode)),
        metrics={"test": final["test"]}, rows_left_out=data.left_out, warnings=list(data.warnings),
        test_predictions=predictions_of(data.part("test"), np.load(folder.test_scores_file())))
    return cite(result, data.spec, data.record)
