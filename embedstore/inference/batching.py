"""Model batches from decoded files of any size: the batching both executors share.

Files decoded with `DecodeSettings.on_device` arrive as read (stored values and the facts of their
intensity mapping): a batch's slices are grouped by native size, each group gathered into one host
buffer (pinned on CUDA), copied to the model's device in one transfer and mapped and resized there
as one tensor by the same code the decode workers run (preprocess.unit_stack, resize_stack). On
CUDA that work runs on a stream of its own, so the next batch's copy and mapping overlap the
current batch's forward (the runner takes batch k+1 before it waits for batch k's vectors).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from embedstore.preprocess import DecodedFile, DecodeSettings, resize_stack, to_device, unit_stack
from embedstore.sources.records import NativeSlices, SliceItem

Prepared, Launched, Finished = TypeVar("Prepared"), TypeVar("Launched"), TypeVar("Finished")


def one_batch_ahead(take: Callable[[], Prepared | None], launch: Callable[[Prepared], Launched],
                    collect: Callable[[Launched], Finished]) -> Iterator[Finished]:
    """Batches from `take` (None when there are no more) through `launch` (the forward queued on the
    device) and `collect` (its outputs on the host), one batch ahead: batch k+1 is taken before
    batch k is collected, and launched before the caller handles batch k's outputs, so the next
    batch's copy and mapping and the caller's writes overlap a forward on the device."""
    launched = None
    while True:
        prepared = take()
        finished = collect(launched) if launched is not None else None
        launched = launch(prepared) if prepared is not None else None
        if finished is not None:
            yield finished
        if launched is None:
            return


class SliceBatcher:
    """Gathers decoded slices from files of any size into model batches of exactly `size`; with
    `settings` (on_device) and the model's `device`, maps and resizes the files' native slices there."""

    def __init__(self, size: int, settings: DecodeSettings | None = None, device: torch.device | None = None):
        self.size = size
        self.settings, self.device = settings, device or torch.device("cpu")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._items: list[SliceItem] = []
        self._pieces: list[tuple[DecodedFile, int, int]] = []  # (file, first, last) of its slices still to batch
        self._count = 0

    def add(self, decoded: DecodedFile) -> None:
        for item in decoded.task.items:
            item.modality = item.modality or decoded.modality
            item.rows, item.cols = decoded.rows, decoded.cols
            item.intensity = decoded.intensity
        self._items.extend(decoded.task.items)
        self._pieces.append((decoded, 0, len(decoded.task.items)))
        self._count += len(decoded.task.items)

    def pending(self) -> int:
        return self._count

    def full(self) -> bool:
        return self._count >= self.size

    def take(self) -> tuple[list[SliceItem], dict[str, np.ndarray | torch.Tensor]] | None:
        """The next batch: its items and, per interpolation, its pixels (a tensor on the model's
        device when it maps them; on CUDA, ready for the current stream's next kernels); None when
        no slice is pending."""
        if not self._count:
            return None
        n = min(self.size, self._count)
        items, self._items = self._items[:n], self._items[n:]
        pieces, wanted = [], n
        while wanted:
            decoded, first, last = self._pieces[0]
            taken = min(wanted, last - first)
            pieces.append((decoded, first, first + taken))
            wanted -= taken
            if first + taken == last:
                self._pieces.pop(0)
            else:
                self._pieces[0] = (decoded, first + taken, last)
        self._count -= n
        if pieces[0][0].native is not None:
            with self._side_stream():
                mapped = self._on_device([(decoded.native, first, last) for decoded, first, last in pieces])
            self._hand_over(mapped)
            return items, mapped
        return items, {mode: np.concatenate([decoded.pixels[mode][first:last] for decoded, first, last in pieces])
                       for mode in pieces[0][0].pixels}

    def _on_device(self, parts: list[tuple[NativeSlices, int, int]]) -> dict[str, torch.Tensor]:
        """The parts' slices mapped and resized on the device, a group of one native size at a time."""
        settings = self.settings
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # native size → positions of its parts
        for position, (native, _, _) in enumerate(parts):
            groups[native.stored.shape[1:]].append(position)
        if len(groups) == 1:  # one size: the group is the batch, in order
            return self._mapped(parts)
        starts = np.cumsum([0] + [last - first for _, first, last in parts])
        size, channels = settings.image_size, settings.intensity.channels
        out = {mode: torch.empty((starts[-1], channels, size, size), device=self.device)
               for mode in settings.interpolations}
        for members in groups.values():
            rows = to_device(torch.from_numpy(np.concatenate([np.arange(starts[p], starts[p + 1]) for p in members])),
                             self.device)
            for mode, resized in self._mapped([parts[position] for position in members]).items():
                out[mode][rows] = resized
        return out

    def _mapped(self, group: list[tuple[NativeSlices, int, int]]) -> dict[str, torch.Tensor]:
        """One native size's slices, copied to the device in one transfer, mapped and resized there."""
        unit = unit_stack(self._gathered(group), group, self.settings.intensity, self.device)
        return {mode: resize_stack(unit, self.settings.image_size, mode) for mode in self.settings.interpolations}

    def _gathered(self, group: list[tuple[NativeSlices, int, int]]) -> torch.Tensor:
        """The group's stored values in one host tensor, in their own dtype (int16 CT stays int16:
        half float32's bytes to copy); pinned on CUDA, written there directly."""
        arrays = [native.stored[first:last] for native, first, last in group]
        if self._stream is None:
            return torch.from_numpy(np.concatenate(arrays))
        dtype = np.result_type(*arrays)
        shape = (sum(len(array) for array in arrays), *arrays[0].shape[1:])
        buffer = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
        np.concatenate(arrays, out=buffer.numpy())
        return buffer

    def _side_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _hand_over(self, mapped: dict[str, torch.Tensor]) -> None:
        """Make the model's stream wait for the mapping (queued, not waited for here), and keep the
        mapped tensors' memory from being reused until that stream is done with them."""
        if self._stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)
        for tensor in mapped.values():
            tensor.record_stream(current)
