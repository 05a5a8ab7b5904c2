"""Run a loaded model over batches of preprocessed slices."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from embedstore.errors import UsageError
from embedstore.models.build import LoadedModel
from embedstore.models.engines import EmbeddingForward, autocast, build_engine, forward_padded

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(n, 1 or 3, S, S) in [0, 1] → (n, 3, S, S) normalised by the model's mean and std, on the batch's device."""
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    mean = torch.tensor(mean, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std


@dataclass
class Embeddings:
    cls: np.ndarray  # (n, D) float32: the model's pooled pre-logits features (final-norm CLS for DINOv2)
    patch_mean: np.ndarray  # (n, D) float32: mean of final-norm patch tokens of the last block
    cls_layers: np.ndarray  # (n, L, D) float32: final-norm CLS of each of spec.cls_layers
    patches: np.ndarray | None  # (n, P, grid_h*grid_w, D) float16: tokens of spec.patch_layers, when kept


def pick_device(requested: str = "auto") -> torch.device:
    """The device `requested` names (auto: CUDA when there is one); UsageError for a name that is no
    device, or CUDA where none is visible."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", requested):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {requested!r}")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {requested} requested but CUDA is not available")
    return torch.device(requested)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


class Embedder:
    """A loaded model on its device, behind the engine that runs it (see models/engines.py)."""

    def __init__(self, loaded: LoadedModel, device: str = "auto", precision: str = "fp32",
                 engine: str = "eager", batch_size: int = 32):
        check_precision(precision)
        self.loaded = loaded
        self.device = pick_device(device)
        self.dtype = PRECISIONS[precision]
        self.model = loaded.model.to(self.device).eval()
        spec = loaded.spec
        module = EmbeddingForward(self.model, spec)
        layers = f"c{'.'.join(map(str, spec.cls_layers))}-p{'.'.join(map(str, spec.patch_layers))}"
        self.engine = build_engine(module, engine, self.device, self.dtype, batch_size, spec.image_size,
                                   cache_key=f"{spec.model_id}-{layers}")

    def embed(self, pixels: np.ndarray | torch.Tensor, keep_patches: bool = True) -> Embeddings:
        """`pixels`: (n, 1 or 3, S, S) in [0, 1] from `preprocess.prepare_slices`."""
        return self.launch(pixels, keep_patches).collect()

    @torch.inference_mode()
    def launch(self, pixels: np.ndarray | torch.Tensor, keep_patches: bool = True) -> LaunchedBatch:
        """The forward of `pixels` queued on the device (on a CPU: run): the caller can prepare the
        next batch before it waits for this one's vectors with `collect()`."""
        spec = self.loaded.spec
        batch = normalize(torch.as_tensor(pixels).to(self.device, non_blocking=True), spec.mean, spec.std)
        outputs = []
        step = self.engine.batch_size or len(batch)
        with autocast(self.device, self.dtype):
            for start in range(0, len(batch), step):
                outputs.append(forward_padded(self.engine.forward, batch[start:start + step], self.engine.batch_size))
        cls, patch_mean, cls_layers, patches = (torch.cat([o[part] for o in outputs]) for part in range(4))
        return LaunchedBatch(cls, patch_mean, cls_layers, patches if keep_patches else None)


@dataclass
class LaunchedBatch:
    """A batch's outputs on the model's device, maybe still being computed."""

    cls: torch.Tensor
    patch_mean: torch.Tensor
    cls_layers: torch.Tensor
    patches: torch.Tensor | None

    def collect(self) -> Embeddings:
        """The vectors on the host (waits for the forward)."""
        return Embeddings(
            cls=self.cls.float().cpu().numpy(),
            patch_mean=self.patch_mean.float().cpu().numpy(),
            cls_layers=self.cls_layers.float().cpu().numpy(),
            patches=self.patches.to(torch.float16).cpu().numpy() if self.patches is not None else None,
        )
