"""Intensity handling and model input: native pixel values → (n, C, S, S) float32 in [0, 1].

The steps follow the reference study: CT in Hounsfield units clamped to a window (default
[-1024, 600]); MR clipped to per-slice percentiles (default 5th-95th); other images as stored.
Then per-slice min-max to [0, 1] (a constant slice becomes all zeros, never 0/0 = NaN), an
antialiased bilinear resize to S×S, and, on the model's device, grey → 3 channels and ImageNet
normalisation. Every step works on a whole stack of slices at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from embedstore.errors import UsageError

# Bump when any step below changes its output: it is part of every model_id.
PREPROCESS_VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# CT windows as (low, high) in HU. "study" is the reference study's default clamp.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "study": (-1024.0, 600.0),
    "brain": (0.0, 80.0),  # L40 W80
    "subdural": (-32.5, 182.5),  # L75 W215
    "stroke": (20.0, 60.0),  # L40 W40
    "lung": (-1350.0, 150.0),  # L-600 W1500
    "mediastinum": (-125.0, 225.0),  # L50 W350
    "abdomen": (-150.0, 250.0),  # L50 W400
    "liver": (-45.0, 105.0),  # L30 W150
    "bone": (-500.0, 1300.0),  # L400 W1800
}


@dataclass(frozen=True)
class IntensityConfig:
    window: str = "auto"  # "auto" (= "study" for CT) or a CT_WINDOWS name
    mr_percentiles: tuple[float, float] = (5.0, 95.0)

    def __post_init__(self):
        if self.window != "auto" and self.window not in CT_WINDOWS:
            raise UsageError(f"unknown window {self.window!r}: use auto or one of {', '.join(CT_WINDOWS)}")
        low, high = self.mr_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise UsageError(f"MR percentiles must satisfy 0 <= low < high <= 100, not {low}, {high}")

    @property
    def ct_window(self) -> tuple[float, float]:
        return CT_WINDOWS["study" if self.window == "auto" else self.window]

    def tag(self) -> str:
        """Short, stable identifier of this preprocessing, part of the model_id."""
        # The resolved window, so "auto" and "study" (the same pixels) give the same model_id.
        settings = json.dumps({"version": PREPROCESS_VERSION, "ct_window": self.ct_window,
                               "mr_percentiles": self.mr_percentiles}, sort_keys=True)
        return f"pp{PREPROCESS_VERSION}.{hashlib.sha256(settings.encode()).hexdigest()[:6]}"


def to_unit_range(stack: np.ndarray, modality: str | None, config: IntensityConfig) -> np.ndarray:
    """(n, H, W) native values (HU for CT) → (n, H, W) float32 in [0, 1], per-slice min-max."""
    stack = np.asarray(stack, dtype=np.float32)
    if not np.isfinite(stack).all():  # NaN/inf voxels (common in float NIfTI) become the slice's minimum
        stack = fill_non_finite(stack)
    if modality == "CT":
        low, high = config.ct_window
        stack = np.clip(stack, low, high)
    elif modality == "MR":
        flat = stack.reshape(len(stack), -1)
        low, high = np.percentile(flat, config.mr_percentiles, axis=1)
        stack = np.clip(stack, low[:, None, None], high[:, None, None])
    minimum = stack.min(axis=(1, 2), keepdims=True)
    span = stack.max(axis=(1, 2), keepdims=True) - minimum
    # A constant slice has span 0: divide by 1 instead, which maps it to all zeros.
    return (stack - minimum) / np.where(span > 0, span, 1.0)


def fill_non_finite(stack: np.ndarray) -> np.ndarray:
    finite = np.isfinite(stack)
    lowest = np.where(finite, stack, np.inf).min(axis=(1, 2), keepdims=True)
    lowest = np.where(np.isfinite(lowest), lowest, 0.0)  # a slice with no finite value at all
    return np.where(finite, stack, lowest).astype(np.float32)


def resize_stack(unit: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W) or (n, C, H, W) in [0, 1] → (n, C, size, size), antialiased bilinear."""
    tensor = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return tensor.clamp(0.0, 1.0).numpy()  # not in place: without a resize the tensor shares the caller's array


def prepare_slices(stack: np.ndarray, modality: str | None, config: IntensityConfig, size: int) -> np.ndarray:
    """Native (n, H, W) slices → model-ready (n, 1, size, size) float32 in [0, 1]."""
    return resize_stack(to_unit_range(stack, modality, config), size)


def imagenet_normalize(batch: torch.Tensor) -> torch.Tensor:
    """(n, 1 or 3, S, S) in [0, 1] → (n, 3, S, S) ImageNet-normalised, on the batch's device."""
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std
