"""Run a loaded model over batches of preprocessed slices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from embedstore.errors import UsageError
from embedstore.models import LoadedModel
from embedstore.models.engines import EmbeddingForward, autocast, build_engine, forward_padded
from embedstore.preprocess import imagenet_normalize

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Embeddings:
    cls: np.ndarray  # (n, D) float32: final-norm CLS token (pooled features for CNNs)
    patch_mean: np.ndarray  # (n, D) float32: mean of final-norm patch tokens
    patches: np.ndarray | None  # (n, grid_h*grid_w, D) float16, when kept


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {requested} requested but CUDA is not available")
    return torch.device(requested)


class Embedder:
    """A loaded model on its device, behind the engine that runs it (see models/engines.py)."""

    def __init__(self, loaded: LoadedModel, device: str = "auto", precision: str = "fp32",
                 engine: str = "eager", batch_size: int = 32):
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.loaded = loaded
        self.device = pick_device(device)
        self.dtype = PRECISIONS[precision]
        self.model = loaded.model.to(self.device).eval()
        module = EmbeddingForward(self.model, loaded.num_prefix_tokens)
        self.engine = build_engine(module, engine, self.device, self.dtype, batch_size, loaded.image_size,
                                   cache_key=f"{loaded.spec.name}-{loaded.weights_tag}-{loaded.image_size}px")

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor, keep_patches: bool = True) -> Embeddings:
        """`pixels`: (n, 1 or 3, S, S) in [0, 1] from `preprocess.prepare_slices`."""
        batch = imagenet_normalize(torch.as_tensor(pixels).to(self.device, non_blocking=True))
        cls, tokens = [], []
        step = self.engine.batch_size or len(batch)
        with autocast(self.device, self.dtype):
            for start in range(0, len(batch), step):
                part_cls, part_tokens = forward_padded(self.engine.forward, batch[start:start + step],
                                                       self.engine.batch_size)
                cls.append(part_cls)
                tokens.append(part_tokens)
        cls, tokens = torch.cat(cls), torch.cat(tokens)
        return Embeddings(
            cls=cls.float().cpu().numpy(),
            patch_mean=tokens.float().mean(dim=1).cpu().numpy(),
            patches=tokens.to(torch.float16).cpu().numpy() if keep_patches else None,
        )
