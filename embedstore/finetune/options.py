"""The fine-tuning protocol's options, with their defaults and checks: what `embedstore finetune`, a
suite's [protocols.finetune] table and Python callers construct. Plain settings (torch is imported
only to resolve the device)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from embedstore.errors import UsageError

MODES = ("full", "lora", "bitfit", "linear")
HEAD_LR_GRID = (1e-3, 5e-3, 1e-2, 5e-2)  # the study's head learning rates, chosen on val
LORA_TARGETS = ("qkv", "fc1", "fc2")  # timm's ViT-g packs its SwiGLU into fc1 / fc2 as well


def default_decode_workers(device_type: str) -> int:
    """Processes decoding and augmenting images: up to 8 beside a GPU (a core left for the trainer);
    none on a CPU, whose cores the model's threads already use."""
    return min(8, (os.cpu_count() or 2) - 1) if device_type == "cuda" else 0


@dataclass(frozen=True)
class FinetuneOptions:
    """An end-to-end baseline: the mode, its training, the head rates chosen on val, where the
    stored model's weights are when their recorded source cannot be reached, and where it trains."""

    mode: str = "linear"
    epochs: int = 10
    batch_size: int = 32  # images per step, all workers together
    backbone_lr: float | None = None  # None: 1e-5 for full (the study's), the head's rate for lora and bitfit
    head_lrs: tuple[float, ...] = HEAD_LR_GRID
    lora_targets: tuple[str, ...] = LORA_TARGETS
    weights: str | None = None
    decode_workers: int | None = None  # None: default_decode_workers for the device
    device: str = "auto"  # auto (CUDA when there is one), cpu or cuda
    workers: int = 1  # data-parallel Ray Train workers; 1 trains in this process
    ray_address: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "head_lrs", tuple(float(lr) for lr in self.head_lrs))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, not {self.epochs}")
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1, not {self.workers}")
        if self.batch_size < self.workers or self.batch_size % self.workers:
            raise UsageError(f"--batch-size {self.batch_size} must be a multiple of the {self.workers} training "
                             "workers (each takes an equal share of every batch)")
        if not self.head_lrs or not min(self.head_lrs) > 0:
            raise UsageError(f"--head-lrs takes learning rates above 0, not {','.join(map(str, self.head_lrs))}")
        if self.backbone_lr is not None and not self.backbone_lr > 0:
            raise UsageError(f"--backbone-lr must be above 0, not {self.backbone_lr}")
        if self.decode_workers is not None and self.decode_workers < 0:
            raise UsageError(f"--decode-workers must be 0 or more, not {self.decode_workers}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, not {self.device!r}")
