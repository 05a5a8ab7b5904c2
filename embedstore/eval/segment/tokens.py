"""Patch tokens streamed from the store's Zarr shards in batches: never the whole set in memory.

Reading part of a Zarr chunk decompresses all of it, so an epoch visits the rows chunk by chunk:
the chunks in a random order, the rows of a few chunks shuffled together into batches. A thread
reads the next chunks while the decoders train on the current ones. `InMemoryTokens` holds the
same rows in memory (float16): the baseline benchmarks/segment.py compares the stream against.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from embedstore.store.patches import PatchReader

SHUFFLE_CHUNKS = 4  # chunks whose rows are shuffled together: a batch mixes rows of several chunks


class StoredTokens:
    """The patch tokens of `rows` (dicts with patch_shard, patch_offset) for `blocks`."""

    def __init__(self, patches_root, rows: list[dict], blocks: tuple[int, ...]):
        self.reader = PatchReader(patches_root)
        self.shards = [row["patch_shard"] for row in rows]
        self.offsets = np.array([row["patch_offset"] for row in rows], dtype=np.int64)
        self.blocks = blocks
        self._lock = threading.Lock()  # the reader's array cache is shared with the prefetch thread

    def read(self, indices: np.ndarray) -> list[np.ndarray]:
        """Tokens (len(indices), T, D) float16 per block, in the order of `indices`."""
        indices = np.asarray(indices)
        out = None
        by_shard: dict[str, list[int]] = defaultdict(list)
        for position, index in enumerate(indices):
            by_shard[self.shards[index]].append(position)
        for shard, positions in by_shard.items():
            offsets = self.offsets[indices[positions]]
            with self._lock:  # the first read of a shard opens its arrays into the reader's cache
                for block in self.blocks:
                    self.reader.array(shard, block)
            # PatchReader.read raises StoreDamagedError for a missing chunk, which Zarr would read as zeros
            tokens = [self.reader.read(shard, offsets, block) for block in self.blocks]
            if out is None:
                out = [np.empty((len(indices), *t.shape[1:]), dtype=np.float16) for t in tokens]
            for target, values in zip(out, tokens):
                target[positions] = values
        return out

    def chunks(self, indices: np.ndarray) -> list[np.ndarray]:
        """`indices` grouped by the stored chunk their tokens sit in, in storage order."""
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for index in indices:
            shard = self.shards[index]
            with self._lock:
                rows_per_chunk = self.reader.chunk_rows(shard, self.blocks[-1])
            groups[shard, int(self.offsets[index]) // rows_per_chunk].append(int(index))
        return [np.array(groups[key]) for key in sorted(groups)]


class InMemoryTokens:
    """The same rows' tokens read once into memory: the baseline of the streamed reads."""

    def __init__(self, stored: StoredTokens, n_rows: int):
        self.tokens = stored.read(np.arange(n_rows))
        self._stored = stored

    def read(self, indices: np.ndarray) -> list[np.ndarray]:
        return [tokens[indices] for tokens in self.tokens]

    def chunks(self, indices: np.ndarray) -> list[np.ndarray]:
        return self._stored.chunks(indices)


def shuffled_batches(source: StoredTokens | InMemoryTokens, indices: np.ndarray, batch_size: int,
                     rng: np.random.Generator) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
    """One epoch: (row indices, tokens per block as float32 tensors) batches, chunks in random order,
    the rows of SHUFFLE_CHUNKS chunks shuffled together; the next window is read while this one trains."""
    chunks = source.chunks(indices)
    order = rng.permutation(len(chunks))
    windows = [np.concatenate([chunks[i] for i in order[start:start + SHUFFLE_CHUNKS]])
               for start in range(0, len(order), SHUFFLE_CHUNKS)]
    carry_rows, carry_tokens = np.empty(0, dtype=np.int64), None
    for number, (window, tokens) in enumerate(read_ahead(source, windows)):
        permutation = rng.permutation(len(window))
        rows, tokens = window[permutation], [t[permutation] for t in tokens]
        if carry_tokens is not None:  # the last window's remainder leads this window's first batch
            rows = np.concatenate([carry_rows, rows])
            tokens = [np.concatenate([c, t]) for c, t in zip(carry_tokens, tokens)]
        whole = len(rows) - len(rows) % batch_size if number + 1 < len(windows) else len(rows)
        for start in range(0, whole, batch_size):
            yield rows[start:start + batch_size], as_tensors([t[start:start + batch_size] for t in tokens])
        carry_rows, carry_tokens = rows[whole:], [t[whole:] for t in tokens]


def ordered_batches(source: StoredTokens | InMemoryTokens, indices: np.ndarray,
                    batch_size: int) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
    """Batches in the order of `indices` (prediction, scoring), the next batch read ahead."""
    batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    for batch, tokens in read_ahead(source, batches):
        yield batch, as_tensors(tokens)


def read_ahead(source: StoredTokens | InMemoryTokens,
               groups: list[np.ndarray]) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """(group, its tokens) in turn, a thread reading the next group while the caller works on this one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(source.read, groups[0]) if groups else None
        for number, group in enumerate(groups):
            tokens = pending.result()
            if number + 1 < len(groups):
                pending = pool.submit(source.read, groups[number + 1])
            yield group, tokens


def as_tensors(tokens: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(t.astype(np.float32)) for t in tokens]
