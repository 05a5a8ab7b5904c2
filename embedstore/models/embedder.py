"""Run a loaded model over batches of preprocessed slices."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from embedstore.errors import UsageError
from embedstore.models import LoadedModel, feature_map_nchw
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
    def __init__(self, loaded: LoadedModel, device: str = "auto", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.loaded = loaded
        self.device = pick_device(device)
        self.dtype = PRECISIONS[precision]
        self.model = loaded.model.to(self.device)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor, keep_patches: bool = True) -> Embeddings:
        """`pixels`: (n, 1 or 3, S, S) in [0, 1] from `preprocess.prepare_slices`."""
        batch = torch.as_tensor(pixels).to(self.device, non_blocking=True)
        batch = imagenet_normalize(batch)
        with self._autocast():
            features = self.model.forward_features(batch)
            cls = self.model.forward_head(features, pre_logits=True)
        features = feature_map_nchw(self.model, features)
        if features.ndim == 4:
            tokens = features.flatten(2).transpose(1, 2)
        else:
            tokens = features[:, self.loaded.num_prefix_tokens:]
        patch_mean = tokens.float().mean(dim=1)
        return Embeddings(
            cls=cls.float().cpu().numpy(),
            patch_mean=patch_mean.cpu().numpy(),
            patches=tokens.to(torch.float16).cpu().numpy() if keep_patches else None,
        )
