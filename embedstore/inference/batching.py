"""Model batches from decoded files of any size: the batching both executors share."""

from __future__ import annotations

import numpy as np

from embedstore.preprocess import DecodedFile
from embedstore.sources.records import SliceItem


class SliceBatcher:
    """Gathers decoded slices from files of any size into model batches of exactly `size`."""

    def __init__(self, size: int):
        self.size = size
        self._items: list[SliceItem] = []
        self._pixels: list[dict[str, np.ndarray]] = []  # interpolation → (n, C, S, S), per decoded file
        self._count = 0

    def add(self, decoded: DecodedFile) -> None:
        for item in decoded.task.items:
            item.modality = item.modality or decoded.modality
            item.rows, item.cols = decoded.rows, decoded.cols
            item.intensity = decoded.intensity
        self._items.extend(decoded.task.items)
        self._pixels.append(decoded.pixels)
        self._count += len(decoded.task.items)

    def pending(self) -> int:
        return self._count

    def full(self) -> bool:
        return self._count >= self.size

    def take(self) -> tuple[list[SliceItem], dict[str, np.ndarray]]:
        """The next batch: its items and, per interpolation, its pixels."""
        pixels = {mode: np.concatenate([p[mode] for p in self._pixels]) if len(self._pixels) > 1
                  else self._pixels[0][mode] for mode in self._pixels[0]}
        n = min(self.size, self._count)
        items, self._items = self._items[:n], self._items[n:]
        self._pixels = [{mode: stack[n:] for mode, stack in pixels.items()}] if n < self._count else []
        self._count -= n
        return items, {mode: stack[:n] for mode, stack in pixels.items()}
