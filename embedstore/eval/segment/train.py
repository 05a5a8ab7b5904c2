"""Decoders trained on stored tokens: the study's seven learning rates side by side in one pass over
the tokens (each batch is read once and steps all seven), SGD with momentum 0.9 and no weight decay,
a cosine schedule to 0, MONAI's Dice loss (or Dice + cross-entropy) against the input-size masks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from embedstore.eval.segment.decoders import build_decoder
from embedstore.eval.segment.tokens import InMemoryTokens, StoredTokens, ordered_batches, shuffled_batches

LEARNING_RATES = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1)
MOMENTUM = 0.9

Progress = Callable[[int, int], None]  # (rows trained, rows in all)


@dataclass(frozen=True)
class TrainSettings:
    decoder: str = "linear"
    epochs: int = 10
    batch_size: int = 32  # the study's 128 was for a GPU; a CPU steps seven decoders faster on smaller batches
    loss: str = "dice"
    device: str = "cpu"


@dataclass(frozen=True)
class DecoderShape:
    """What a decoder is built for: token width and grid, classes (background included), input size."""

    dim: int
    grid: tuple[int, int]
    n_classes: int
    image_size: int

    def build(self, kind: str) -> torch.nn.Module:
        return build_decoder(kind, self.dim, self.n_classes, self.grid, self.image_size)


def dice_loss(name: str) -> torch.nn.Module:
    """MONAI's soft Dice over the batch as one volume (a slice without some class then adds no 0/0
    noise), background included as the study's loss; `dicece` adds cross-entropy."""
    from monai.losses import DiceCELoss, DiceLoss

    kind = DiceCELoss if name == "dicece" else DiceLoss
    return kind(to_onehot_y=True, softmax=True, batch=True)


def train_decoders(source: StoredTokens | InMemoryTokens, masks: np.ndarray, indices: np.ndarray,
                   shape: DecoderShape, settings: TrainSettings, learning_rates: tuple[float, ...], seed: int,
                   progress: Progress | None = None) -> list[torch.nn.Module]:
    """One decoder per learning rate, all trained on the rows `indices` in the same batches."""
    torch.manual_seed(seed)
    decoders = torch.nn.ModuleList(shape.build(settings.decoder) for _ in learning_rates).to(settings.device)
    optimizer = torch.optim.SGD([{"params": d.parameters(), "lr": lr} for d, lr in zip(decoders, learning_rates)],
                                momentum=MOMENTUM, weight_decay=0.0)
    steps = settings.epochs * math.ceil(len(indices) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / steps)))
    loss_fn = dice_loss(settings.loss)
    rng = np.random.default_rng(seed)
    decoders.train()
    done, total = 0, settings.epochs * len(indices)
    for _ in range(settings.epochs):
        for rows, tokens in shuffled_batches(source, indices, settings.batch_size, rng):
            tokens = [t.to(settings.device) for t in tokens]
            target = torch.from_numpy(masks[rows].astype(np.int64))[:, None].to(settings.device)
            # the decoders' parameters are disjoint: the summed loss gives each its own gradient
            loss = sum(loss_fn(decoder(tokens), target) for decoder in decoders)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += len(rows)
            if progress:
                progress(done, total)
    decoders.eval()
    return list(decoders)


@torch.no_grad()
def input_size_dice(decoders: list[torch.nn.Module], source: StoredTokens | InMemoryTokens, masks: np.ndarray,
                    indices: np.ndarray, n_classes: int, batch_size: int, device: str = "cpu") -> list[float]:
    """Each decoder's Dice on the rows `indices` at the input size, pooled over all their pixels and
    averaged over the foreground classes (the study's selection score, torchmetrics' global Dice)."""
    from torchmetrics.segmentation import DiceScore

    scores = [DiceScore(num_classes=n_classes, include_background=False, average="macro",
                        aggregation_level="global", input_format="index") for _ in decoders]
    for rows, tokens in ordered_batches(source, indices, batch_size):
        tokens = [t.to(device) for t in tokens]
        target = torch.from_numpy(masks[rows].astype(np.int64))
        for decoder, score in zip(decoders, scores):
            score.update(decoder(tokens).argmax(1).cpu(), target)
    return [float(score.compute()) for score in scores]

