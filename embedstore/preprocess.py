"""Intensity handling and model input: native pixel values → (n, C, S, S) float32 in [0, 1].

The steps follow the reference study: CT in Hounsfield units clamped to a window (default
[-1024, 600]); MR clipped to per-slice percentiles (default 5th-95th); X-ray through the file's own
VOI window or LUT; anything else as stored. Then per-slice min-max to [0, 1] (a constant slice
becomes all zeros, never 0/0 = NaN), MONOCHROME1 inverted, an antialiased resize to S×S with the model's interpolation (bicubic for DINOv2),
and, on the model's device, grey → 3 channels and the model's own normalisation (its
`pretrained_cfg` mean and std, ImageNet's for DINOv2). With `--window multi`
a CT slice becomes three channels, each window mapped linearly onto [0, 1]. Every step works on a whole stack at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from embedstore.errors import UsageError
from embedstore.intensity import CT_WINDOWS, IntensityConfig
from embedstore.models.spec import ModelSpec
from embedstore.sources.limits import DEFAULT_MAX_PIXELS
from embedstore.sources.native import read_native
from embedstore.sources.records import Failure, NativeSlices, ReadTask


def to_unit_range(stack: np.ndarray, modality: str | None, config: IntensityConfig,
                  header_windows: list[tuple[float, float] | None] | None = None) -> np.ndarray:
    """(n, H, W) native values (HU for CT) → (n, H, W) float32 in [0, 1], per-slice min-max after
    clipping to the modality's window (CT), percentiles (MR) or the file's own VOI window."""
    stack = np.asarray(stack, dtype=np.float32)
    if not np.isfinite(stack).all():  # NaN/inf voxels (common in float NIfTI) become the slice's minimum
        stack = fill_non_finite(stack)
    n = len(stack)
    low, high = np.full(n, -np.inf, dtype=np.float32), np.full(n, np.inf, dtype=np.float32)
    if modality == "CT":
        low[:], high[:] = config.ct_window
    elif modality == "MR":
        low[:], high[:] = np.percentile(stack.reshape(n, -1), config.mr_percentiles, axis=1)
    if header_windows and config.uses_header_voi(modality):
        for index, window in enumerate(header_windows):
            if window is not None:
                low[index], high[index] = window
    if np.isfinite(low).any() or np.isfinite(high).any():
        stack = np.clip(stack, low[:, None, None], high[:, None, None])
    return spread_to_unit(stack)


def spread_to_unit(stack: np.ndarray) -> np.ndarray:
    minimum = stack.min(axis=(1, 2), keepdims=True)
    span = stack.max(axis=(1, 2), keepdims=True) - minimum
    # A constant slice has span 0: divide by 1 instead, which maps it to all zeros.
    return ((stack - minimum) / np.where(span > 0, span, 1.0)).astype(np.float32, copy=False)


def window_to_unit(stack: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((stack - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32, copy=False)


def fill_non_finite(stack: np.ndarray) -> np.ndarray:
    finite = np.isfinite(stack)
    lowest = np.where(finite, stack, np.inf).min(axis=(1, 2), keepdims=True)
    lowest = np.where(np.isfinite(lowest), lowest, 0.0)  # a slice with no finite value at all
    return np.where(finite, stack, lowest).astype(np.float32)


def unit_channels(native: NativeSlices, config: IntensityConfig) -> tuple[np.ndarray, str]:
    """(n, C, H, W) in [0, 1] and a label of what was done (the `intensity` column)."""
    if config.is_multi and native.modality == "CT":
        names = config.multi_windows(native.body_part)
        stack = native.pixels if np.isfinite(native.pixels).all() else fill_non_finite(native.pixels)
        # Each window maps linearly onto [0, 1] (no per-slice min-max): a channel means the same
        # tissue range on every slice, as in the usual windowed-RGB inputs for CT.
        unit = np.stack([window_to_unit(stack, *CT_WINDOWS[name]) for name in names], axis=1)
        label = "multi:" + ",".join(names)
    else:
        unit = to_unit_range(native.pixels, native.modality, config, native.header_windows)[:, None]
        label = _grey_label(native, config)
        if config.is_multi:
            unit = np.repeat(unit, 3, axis=1)
    if native.monochrome1:
        unit = 1.0 - unit
        label += "+inverted"
    return unit, label


def _grey_label(native: NativeSlices, config: IntensityConfig) -> str:
    if native.voi_lut_applied:
        return "voi-lut"
    if native.header_windows and config.uses_header_voi(native.modality) and any(native.header_windows):
        return "voi"
    if native.modality == "CT":
        return "ct:" + (config.window if config.window in CT_WINDOWS else "study")
    if native.modality == "MR":
        low, high = config.mr_percentiles
        return f"mr:p{low:g}-{high:g}"
    return "minmax"


def resize_stack(unit: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """(n, H, W) or (n, C, H, W) in [0, 1] → (n, C, size, size) with the model's interpolation
    (antialiased where torch supports it: a 512 px slice shrunk to 224 must not alias)."""
    tensor = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.shape[-2:] != (size, size):
        if interpolation == "nearest":
            tensor = F.interpolate(tensor, size=(size, size), mode="nearest")
        else:
            tensor = F.interpolate(tensor, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
    return tensor.clamp(0.0, 1.0).numpy()  # not in place: without a resize the tensor shares the caller's array


@dataclass(frozen=True)
class DecodeSettings:
    """What the decode stage makes of every slice, for every model of an ingest at once: one
    intensity mapping, one size, and a resized stack per interpolation the models ask for."""

    intensity: IntensityConfig
    image_size: int
    interpolations: tuple[str, ...] = ("bicubic",)
    max_pixels: int = DEFAULT_MAX_PIXELS  # the most values a frame may declare (--max-pixels)

    @classmethod
    def for_specs(cls, specs: Sequence[ModelSpec], max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodeSettings:
        """The one preprocessing chain of these models, from their stored specs alone: ingest (every
        model at once), read-back, thumbnails, uploads and fine-tuning all decode through it."""
        first = specs[0]
        if any(s.intensity != first.intensity or s.image_size != first.image_size for s in specs[1:]):
            raise UsageError("models decoded together need one intensity mapping and one image size")
        return cls(first.intensity, first.image_size, tuple(sorted({s.interpolation for s in specs})), max_pixels)


def prepare_slices(native: NativeSlices, config: IntensityConfig, size: int,
                   interpolation: str = "bicubic") -> tuple[np.ndarray, str]:
    """Native slices → model-ready (n, C, size, size) float32 in [0, 1], and the intensity label."""
    unit, label = unit_channels(native, config)
    return resize_stack(unit, size, interpolation), label


@dataclass
class DecodedFile:
    """A read task's slices, preprocessed and ready for the model."""

    task: ReadTask
    pixels: dict[str, np.ndarray]  # interpolation → (n, C, S, S) float32 in [0, 1], in the order of task.items
    modality: str | None
    rows: int
    cols: int
    intensity: str  # what the intensity mapping did, e.g. "ct:study", "voi+inverted", "multi:lung,..."
    failures: list[Failure] = field(default_factory=list)  # other copies of the instance, not used
    seconds: dict[str, float] = field(default_factory=dict)  # read_decode, preprocess
    codec_output: list[str] = field(default_factory=list)  # warnings and codec lines printed while reading it


def decode_task(task: ReadTask, settings: DecodeSettings) -> DecodedFile:
    """Read one file once and preprocess the slices the task asks for, for every model of the
    ingest; InputError on bad data."""
    started = time.perf_counter()
    config = settings.intensity
    native = read_native(task, config.uses_header_voi(task.items[0].modality), settings.max_pixels)
    read = time.perf_counter()
    unit, intensity = unit_channels(native, config)
    pixels = {mode: resize_stack(unit, settings.image_size, mode) for mode in settings.interpolations}
    seconds = {"read_decode": read - started, "preprocess": time.perf_counter() - read}
    return DecodedFile(task, pixels, native.modality, native.pixels.shape[1], native.pixels.shape[2], intensity,
                       seconds=seconds)
