"""One training of a backbone and its classification heads: SGD with momentum 0.9, a cosine schedule
over every step, bf16 autocast on CUDA, a checkpoint after every epoch and a resume from it.

Heads read the stored `cls+patch_mean` feature (models.cls_and_patch_mean), the linear probe's input.
Several heads train together on one frozen backbone (`linear` mode: the learning-rate grid costs one
pass over the images); a backbone that trains gets one head per training. Data-parallel ranks each
take an equal share of every global batch and DDP averages their gradients, which is the single
process's gradient of the mean loss over that batch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from embedstore.errors import UsageError
from embedstore.finetune.data import SliceImages, batches
from embedstore.finetune.modes import prepare_backbone
from embedstore.finetune.options import HEAD_LR_GRID, LORA_TARGETS
from embedstore.models.build import cls_and_patch_mean, rebuild_model
from embedstore.models.spec import ModelSpec

FULL_BACKBONE_LR = 1e-5  # the study's backbone rate for a full fine-tune
MOMENTUM = 0.9
HEAD_INIT_STD = 0.01


@dataclass(frozen=True)
class TrainSettings:
    mode: str
    epochs: int = 10
    batch_size: int = 32
    backbone_lr: float | None = None  # None: FULL_BACKBONE_LR for full, each head's rate for lora / bitfit
    head_lrs: tuple[float, ...] = HEAD_LR_GRID
    seed: int = 0
    decode_workers: int = 0
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def backbone_rate(self, head_lr: float) -> float:
        if self.backbone_lr is not None:
            return self.backbone_lr
        return FULL_BACKBONE_LR if self.mode == "full" else head_lr


@dataclass
class Workers:
    """This process's place in data-parallel training: its rank, the number of ranks, its device,
    and how a model is made ready there (moved, and wrapped in DDP when there are several)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None  # Ray Train's prepare_model

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def ready(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.prepare(model) if self.prepare and self.world > 1 else model.to(self.device)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


class Classifier(torch.nn.Module):
    """A backbone under `n_heads` linear heads on its cls+patch_mean feature; logits (heads, n, C)."""

    def __init__(self, backbone: torch.nn.Module, spec: ModelSpec, n_classes: int, n_heads: int):
        super().__init__()
        self.backbone, self.num_prefix_tokens = backbone, spec.num_prefix_tokens
        self.backbone_trains = any(p.requires_grad for p in backbone.parameters())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(2 * spec.embed_dim, n_classes) for _ in range(n_heads))
        for head in self.heads:
            torch.nn.init.normal_(head.weight, std=HEAD_INIT_STD)
            torch.nn.init.zeros_(head.bias)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if not self.backbone_trains:
            self.backbone.eval()  # a frozen backbone gives the features the probes read
        return self

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trains):
            features = cls_and_patch_mean(self.backbone, batch, self.num_prefix_tokens)
        return torch.stack([head(features.float()) for head in self.heads])


def build_classifier(spec: ModelSpec, weights: str | None, settings: TrainSettings, n_classes: int,
                     n_heads: int) -> Classifier:
    """The stored model rebuilt from its spec (its weights digest checked), made ready for the mode."""
    backbone = rebuild_model(spec, weights).model
    return Classifier(prepare_backbone(backbone, settings.mode, settings.lora_targets), spec, n_classes, n_heads)


def loss_of(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """The heads' losses summed (each head's gradient is its own): cross-entropy, or one sigmoid per label."""
    if multilabel:
        return sum(torch.nn.functional.binary_cross_entropy_with_logits(head, targets.float()) for head in logits)
    return sum(torch.nn.functional.cross_entropy(head, targets) for head in logits)


@dataclass
class TrainStep:
    """One optimiser step, as `train` reports it."""

    epoch: int  # from 1
    epochs: int
    step: int  # from 1, within the epoch
    steps: int  # per epoch
    images: int  # in this step, all ranks
    loss: torch.Tensor  # the step's loss; read it (a device sync on CUDA) only when it is shown


@dataclass
class TrainStats:
    images: int  # images trained on in this process's run (all ranks), resumed epochs excluded
    seconds: float
    resumed_from_epoch: int  # 0 when the training started from scratch

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def train(classifier: Classifier, images: SliceImages, head_lrs: list[float], settings: TrainSettings,
          multilabel: bool, workers: Workers, checkpoint: Path,
          on_step: Callable[[TrainStep], None] | None = None) -> TrainStats:
    """Train for settings.epochs, resuming from `checkpoint` when a killed run left one; the main rank
    writes it after every epoch. `on_step` is called after each step."""
    device = workers.device
    batch_size = min(settings.batch_size, len(images) - len(images) % workers.world)
    steps_per_epoch = len(images) // batch_size
    model = workers.ready(classifier)
    groups = [{"params": list(head.parameters()), "lr": lr} for head, lr in zip(classifier.heads, head_lrs)]
    backbone_parameters = [p for p in classifier.backbone.parameters() if p.requires_grad]
    if backbone_parameters:
        groups.append({"params": backbone_parameters, "lr": settings.backbone_rate(head_lrs[0])})
    optimizer = torch.optim.SGD(groups, momentum=MOMENTUM)
    total_steps = settings.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    start = resume(checkpoint, classifier, optimizer, schedule, device)
    started, trained = time.perf_counter(), 0
    loader = batches(images, batch_size, True, settings.seed, settings.decode_workers, workers.rank, workers.world)
    for epoch in range(start, settings.epochs):
        torch.manual_seed(hash((settings.seed, epoch, workers.rank)) % 2 ** 63)  # LoRA dropout: reproducible on resume
        loader.batch_sampler.set_epoch(epoch)
        model.train()
        for step, (pixels, targets) in enumerate(loader, 1):
            pixels, targets = pixels.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_of(model(pixels), targets, multilabel)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            trained += batch_size
            if on_step:
                on_step(TrainStep(epoch + 1, settings.epochs, step, steps_per_epoch, batch_size, loss.detach()))
        if workers.is_main:
            save_checkpoint(checkpoint, epoch + 1, classifier, optimizer, schedule)
        workers.barrier()
    return TrainStats(trained, time.perf_counter() - started, start)


def trained_state(classifier: Classifier) -> dict[str, torch.Tensor]:
    """What training changed: the heads and every trainable backbone parameter."""
    trainable = {name for name, p in classifier.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in classifier.state_dict().items() if name in trainable}


def save_checkpoint(path: Path, epochs_done: int, classifier: Classifier, optimizer, schedule) -> None:
    """Written beside and renamed over the last one, so a kill mid-write leaves the previous epoch's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"epochs_done": epochs_done, "state": trained_state(classifier), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict()}, partial)
    os.replace(partial, path)


def resume(path: Path, classifier: Classifier, optimizer, schedule, device: torch.device) -> int:
    """The epochs a previous run finished (their weights, optimizer and schedule loaded), or 0."""
    if not path.is_file():
        return 0
    saved = torch.load(path, map_location=device, weights_only=True)
    missing = set(trained_state(classifier)) - set(saved["state"])
    if missing:
        raise UsageError(f"checkpoint {path} does not fit this training (e.g. {sorted(missing)[0]} missing): "
                         "remove it, or give another --out")
    classifier.load_state_dict(saved["state"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    return int(saved["epochs_done"])


@torch.inference_mode()
def predict(classifier: Classifier, images: SliceImages, multilabel: bool, batch_size: int, device: torch.device,
            decode_workers: int) -> np.ndarray:
    """(heads, n, C) class probabilities (softmax, or sigmoid per label), in the rows' order."""
    classifier.eval()
    scores = []
    for pixels, _ in batches(images, batch_size, False, 0, decode_workers):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = classifier(pixels.to(device)).float()
        scores.append(torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1))
    return torch.cat(scores, dim=1).cpu().numpy()
