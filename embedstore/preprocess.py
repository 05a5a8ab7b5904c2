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
from dataclasses import dataclass, field, fields
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from embedstore.errors import UsageError
from embedstore.intensity import CT_WINDOWS, IntensityConfig
from embedstore.models.spec import ModelSpec
from embedstore.sources.limits import DEFAULT_MAX_PIXELS
from embedstore.sources.native import read_native
from embedstore.sources.records import IDENTITY_RESCALE, Failure, NativeSlices, ReadTask


QUANTILE_VALUES = 1 << 24  # torch.quantile takes at most this many values at once


def unit_stack(stack: torch.Tensor, parts: Sequence[tuple[NativeSlices, int, int]], config: IntensityConfig,
               device: torch.device | None = None) -> torch.Tensor:
    """(n, H, W) stored values → (n, C, H, W) float32 in [0, 1] on `device` (default: the stack's).
    The slices are the parts' one after another: each part a file's slices start..stop, with the
    facts its reader found (modality LUT, VOI windows, MONOCHROME1, body part). One implementation for
    the decode workers (a file at a time, on the CPU) and the model's device (a batch of files of one
    size); the per-slice decisions are made on the host and copied before the pixels, so the device
    never waits on a decision and the pixels' copy waits on nothing."""
    device = device or stack.device
    bounds = SliceBounds.of(parts, config).on(device)
    stack = to_device(stack, device)
    may_be_non_finite = stack.is_floating_point()
    stack = stack.float()
    if bounds.rescale is not None:  # the modality LUT: HU for CT
        stack = stack * bounds.rescale[:, 0, None, None] + bounds.rescale[:, 1, None, None]
    # NaN/inf voxels (common in float NIfTI) become the slice's minimum. The fill leaves finite
    # values as they are: on a GPU it always runs rather than make the host wait for a check.
    if may_be_non_finite and (device.type != "cpu" or not bool(torch.isfinite(stack).all())):
        stack = fill_non_finite(stack)
    low, high = bounds.low, bounds.high
    if bounds.percentile_rows is not None:
        low[bounds.percentile_rows], high[bounds.percentile_rows] = percentiles(
            stack.index_select(0, bounds.percentile_rows).flatten(1), config.mr_percentiles)
    unit = spread_to_unit(torch.clamp(stack, low[:, None, None], high[:, None, None]))[:, None]
    if config.is_multi:
        unit = unit.repeat(1, 3, 1, 1)
    if bounds.window_rows is not None:
        # Each window maps linearly onto [0, 1] (no per-slice min-max): a channel means the same
        # tissue range on every slice, as in the usual windowed-RGB inputs for CT.
        windows = stack.index_select(0, bounds.window_rows)[:, None]
        unit[bounds.window_rows] = ((windows - bounds.window_low[:, :, None, None])
                                    / bounds.window_width[:, :, None, None]).clamp(0.0, 1.0)
    if bounds.inverted_rows is not None:
        unit[bounds.inverted_rows] = 1.0 - unit[bounds.inverted_rows]
    return unit


@dataclass(frozen=True)
class SliceBounds:
    """What the intensity mapping does to each slice of a stack, decided from the readers' facts: the
    modality LUT (slope, intercept), clip bounds (±inf: none), the slices clipped to their own
    percentiles instead (MR), the CT slices mapped through three windows (`--window multi`) and the
    slices stored inverted (MONOCHROME1). Row sets are None where no slice needs the step."""

    rescale: torch.Tensor | None  # (n, 2) float32
    low: torch.Tensor  # (n,) float32
    high: torch.Tensor
    percentile_rows: torch.Tensor | None  # int64 positions
    window_rows: torch.Tensor | None
    window_low: torch.Tensor | None  # (len(window_rows), 3) float32
    window_width: torch.Tensor | None
    inverted_rows: torch.Tensor | None

    @classmethod
    def of(cls, parts: Sequence[tuple[NativeSlices, int, int]], config: IntensityConfig) -> SliceBounds:
        low, high, percentile, multi, windows, inverted = [], [], [], [], [], []
        for native, start, stop in parts:
            first = len(low)
            rows = range(first, first + stop - start)
            uses_header = native.header_windows and config.uses_header_voi(native.modality)
            for index in range(start, stop):
                window = native.header_windows[index] if uses_header else None
                if window is None and native.modality == "CT":
                    window = config.ct_window
                low.append(-np.inf if window is None else window[0])
                high.append(np.inf if window is None else window[1])
                if native.modality == "MR" and not (uses_header and native.header_windows[index] is not None):
                    percentile.append(len(low) - 1)
            if config.is_multi and native.modality == "CT":
                multi.extend(rows)
                windows.extend([[CT_WINDOWS[name] for name in config.multi_windows(native.body_part)]] * len(rows))
            if native.monochrome1:
                inverted.extend(rows)
        windows = np.asarray(windows, dtype=np.float64).reshape(-1, 3, 2)
        values = partial(torch.tensor, dtype=torch.float32)
        return cls(_rescale_rows(parts), values(low), values(high), _rows(percentile), _rows(multi),
                   values(windows[:, :, 0]) if multi else None,
                   values(windows[:, :, 1] - windows[:, :, 0]) if multi else None, _rows(inverted))

    def on(self, device: torch.device) -> SliceBounds:
        """The same decisions on `device` (a few hundred bytes, copied before the pixels they map)."""
        values = {name: getattr(self, name) for name in (f.name for f in fields(self))}
        return SliceBounds(**{name: value if value is None else to_device(value, device)
                              for name, value in values.items()})


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. On CUDA through pinned memory and asynchronously: a copy from
    pageable memory would first wait for everything queued on the stream."""
    if device.type != "cuda":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def _rows(positions: list[int]) -> torch.Tensor | None:
    return torch.tensor(positions, dtype=torch.int64) if positions else None


def _rescale_rows(parts: Sequence[tuple[NativeSlices, int, int]]) -> torch.Tensor | None:
    """Each slice's (slope, intercept); None where no part has a modality LUT left to apply."""
    if all(native.rescale is None for native, _, _ in parts):
        return None
    return torch.from_numpy(np.concatenate([
        native.rescale[start:stop] if native.rescale is not None else np.tile(IDENTITY_RESCALE, (stop - start, 1))
        for native, start, stop in parts]))


def percentiles(rows: torch.Tensor, bounds: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (m, N) values, its `bounds` percentiles (linear interpolation, as NumPy's default)."""
    q = torch.tensor([bound / 100.0 for bound in bounds], dtype=rows.dtype, device=rows.device)
    step = max(1, QUANTILE_VALUES // rows.shape[1])
    found = torch.cat([torch.quantile(rows[start:start + step], q, dim=1) for start in range(0, len(rows), step)], 1)
    return found[0], found[1]


def spread_to_unit(stack: torch.Tensor) -> torch.Tensor:
    minimum = stack.amin(dim=(1, 2), keepdim=True)
    span = stack.amax(dim=(1, 2), keepdim=True) - minimum
    # A constant slice has span 0: divide by 1 instead, which maps it to all zeros.
    return (stack - minimum) / torch.where(span > 0, span, torch.ones_like(span))


def fill_non_finite(stack: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(stack)
    lowest = torch.where(finite, stack, torch.inf).amin(dim=(1, 2), keepdim=True)
    lowest = torch.where(torch.isfinite(lowest), lowest, 0.0)  # a slice with no finite value at all
    return torch.where(finite, stack, lowest)


def unit_channels(native: NativeSlices, config: IntensityConfig) -> tuple[np.ndarray, str]:
    """A file's slices (n, C, H, W) in [0, 1] and a label of what was done (the `intensity` column)."""
    unit = unit_stack(torch.from_numpy(native.stored), [(native, 0, len(native.stored))], config)
    return unit.numpy(), intensity_label(native, config)


def intensity_label(native: NativeSlices, config: IntensityConfig) -> str:
    if config.is_multi and native.modality == "CT":
        label = "multi:" + ",".join(config.multi_windows(native.body_part))
    else:
        label = _grey_label(native, config)
    return label + "+inverted" if native.monochrome1 else label


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


def resize_stack(unit: np.ndarray | torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """(n, C, H, W) in [0, 1], on any device → (n, C, size, size) with the model's interpolation
    (antialiased where torch supports it: a 512 px slice shrunk to 224 must not alias)."""
    tensor = torch.as_tensor(unit)
    if tensor.shape[-2:] != (size, size):
        if interpolation == "nearest":
            tensor = F.interpolate(tensor, size=(size, size), mode="nearest")
        else:
            tensor = F.interpolate(tensor, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
    return tensor.clamp(0.0, 1.0)  # not in place: without a resize the tensor shares the caller's array


@dataclass(frozen=True)
class DecodeSettings:
    """What the decode stage makes of every slice, for every model of an ingest at once: one
    intensity mapping, one size, and a resized stack per interpolation the models ask for."""

    intensity: IntensityConfig
    image_size: int
    interpolations: tuple[str, ...] = ("bicubic",)
    max_pixels: int = DEFAULT_MAX_PIXELS  # the most values a frame may declare (--max-pixels)
    # The workers only decode; the intensity mapping and the resize run batched on the model's
    # device (inference/batching.py). Chosen by `maps_on_device`.
    on_device: bool = False

    @classmethod
    def for_specs(cls, specs: Sequence[ModelSpec], max_pixels: int = DEFAULT_MAX_PIXELS,
                  on_device: bool = False) -> DecodeSettings:
        """The one preprocessing chain of these models, from their stored specs alone: ingest (every
        model at once), read-back, thumbnails, uploads and fine-tuning all decode through it."""
        first = specs[0]
        if any(s.intensity != first.intensity or s.image_size != first.image_size for s in specs[1:]):
            raise UsageError("models decoded together need one intensity mapping and one image size")
        return cls(first.intensity, first.image_size, tuple(sorted({s.interpolation for s in specs})), max_pixels,
                   on_device)


PLACEMENTS = ("auto", "workers", "device")


def maps_on_device(placement: str, device: torch.device) -> bool:
    """Whether the model's device maps and resizes (the decode workers only decode). auto: on CUDA,
    where the host's cores are what limits ingest; on a CPU the workers, where both placements
    measured the same (benchmarks/ingest.py --preprocess-on device) and decode processes, where
    there are any, would otherwise idle while the model's cores are busy."""
    if placement not in PLACEMENTS:
        raise UsageError(f"--preprocess-on must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    return device.type == "cuda" if placement == "auto" else placement == "device"


def prepare_slices(native: NativeSlices, config: IntensityConfig, size: int,
                   interpolation: str = "bicubic") -> tuple[np.ndarray, str]:
    """Native slices → model-ready (n, C, size, size) float32 in [0, 1], and the intensity label."""
    unit, label = unit_channels(native, config)
    return resize_stack(unit, size, interpolation).numpy(), label


@dataclass
class DecodedFile:
    """A read task's slices, preprocessed and ready for the model, or (settings.on_device) as read."""

    task: ReadTask
    pixels: dict[str, np.ndarray]  # interpolation → (n, C, S, S) float32 in [0, 1], in the order of task.items
    modality: str | None
    rows: int
    cols: int
    intensity: str  # what the intensity mapping did, e.g. "ct:study", "voi+inverted", "multi:lung,..."
    failures: list[Failure] = field(default_factory=list)  # other copies of the instance, not used
    seconds: dict[str, float] = field(default_factory=dict)  # read_decode, preprocess
    codec_output: list[str] = field(default_factory=list)  # warnings and codec lines printed while reading it
    native: NativeSlices | None = None  # the slices as read, for the model's device to map (no pixels then)


def decode_task(task: ReadTask, settings: DecodeSettings) -> DecodedFile:
    """Read one file once and preprocess the slices the task asks for, for every model of the
    ingest; InputError on bad data."""
    started = time.perf_counter()
    config = settings.intensity
    native = read_native(task, config.uses_header_voi(task.items[0].modality), settings.max_pixels)
    read = time.perf_counter()
    rows, cols = native.stored.shape[1:]
    if settings.on_device:
        return DecodedFile(task, {}, native.modality, rows, cols, intensity_label(native, config),
                           seconds={"read_decode": read - started}, native=native)
    unit, label = unit_channels(native, config)
    pixels = {mode: resize_stack(unit, settings.image_size, mode).numpy() for mode in settings.interpolations}
    seconds = {"read_decode": read - started, "preprocess": time.perf_counter() - read}
    return DecodedFile(task, pixels, native.modality, rows, cols, label, seconds=seconds)
