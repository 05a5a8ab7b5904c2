"""Model batches from decoded files of any size: the batching both executors share.

Files decoded with `DecodeSettings.on_device` arrive as read (native values and the facts of their
intensity mapping): a batch's slices are grouped by native size, each group copied to the model's
device in one transfer (from pinned memory, asynchronously, on CUDA) and mapped and resized there
as one tensor by the same code the decode workers run (preprocess.unit_stack, resize_stack).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from embedstore.preprocess import DecodedFile, DecodeSettings, resize_stack, unit_stack
from embedstore.sources.records import NativeSlices, SliceItem


class SliceBatcher:
    """Gathers decoded slices from files of any size into model batches of exactly `size`; with
    `settings` (on_device) and the model's `device`, maps and resizes the files' native slices there."""

    def __init__(self, size: int, settings: DecodeSettings | None = None, device: torch.device | None = None):
        self.size = size
        self.settings, self.device = settings, device or torch.device("cpu")
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

    def take(self) -> tuple[list[SliceItem], dict[str, np.ndarray | torch.Tensor]]:
        """The next batch: its items and, per interpolation, its pixels (a tensor on the model's
        device when it maps them)."""
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
            return items, self._on_device([(decoded.native, first, last) for decoded, first, last in pieces])
        return items, {mode: np.concatenate([decoded.pixels[mode][first:last] for decoded, first, last in pieces])
                       for mode in pieces[0][0].pixels}

    def _on_device(self, parts: list[tuple[NativeSlices, int, int]]) -> dict[str, torch.Tensor]:
        """The parts' slices mapped and resized on the device, a group of one native size at a time."""
        settings = self.settings
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # native size → positions of its parts
        for position, (native, _, _) in enumerate(parts):
            groups[native.pixels.shape[1:]].append(position)
        if len(groups) == 1:  # one size: the group is the batch, in order
            return self._mapped(parts)
        starts = np.cumsum([0] + [last - first for _, first, last in parts])
        size, channels = settings.image_size, settings.intensity.channels
        out = {mode: torch.empty((starts[-1], channels, size, size), device=self.device)
               for mode in settings.interpolations}
        for members in groups.values():
            rows = torch.from_numpy(np.concatenate([np.arange(starts[p], starts[p + 1]) for p in members]))
            for mode, resized in self._mapped([parts[position] for position in members]).items():
                out[mode][rows.to(self.device)] = resized
        return out

    def _mapped(self, group: list[tuple[NativeSlices, int, int]]) -> dict[str, torch.Tensor]:
        """One native size's slices, copied to the device in one transfer, mapped and resized there."""
        stack = torch.from_numpy(np.concatenate([native.pixels[first:last] for native, first, last in group]))
        if self.device.type == "cuda":  # a pinned buffer copies while the device keeps working
            stack = stack.pin_memory()
        unit = unit_stack(stack.to(self.device, non_blocking=True), group, self.settings.intensity)
        return {mode: resize_stack(unit, self.settings.image_size, mode) for mode in self.settings.interpolations}
