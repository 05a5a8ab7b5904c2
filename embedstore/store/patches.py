"""Patch tokens in Zarr v3: a shard is a group holding, per kept block, one float16 array
`b<block>` of shape (n, grid_h*grid_w, dim); row i of every array is the same slice.

A shard belongs to one writer and one commit: it is written and closed before the rows that point
into it are committed, so a committed row's patches always exist. Writes are whole chunks only.
Closing a shard records the SHA-256 of its files (store/digests.py) for `embedstore check`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from embedstore.errors import StoreDamagedError
from embedstore.models.spec import patch_array
from embedstore.store.digests import SHARD_CHECKSUMS, file_sha256, read_shard_checksums, write_shard_checksums
from embedstore.store.location import zarr_location

CHUNK_BYTES = 8 * 1024 * 1024


class PatchShardWriter:
    def __init__(self, patches_root: Path, model_id: str, shard_name: str, capacity: int,
                 blocks: tuple[int, ...], tokens: int, dim: int):
        self.relative_path = f"{model_id}/{shard_name}"
        self.path = patches_root / model_id / shard_name
        row_bytes = tokens * dim * 2
        self.chunk_rows = max(1, min(capacity, CHUNK_BYTES // row_bytes))
        group = zarr.open_group(**zarr_location(self.path), mode="w")
        self.arrays = [group.create_array(
            name=patch_array(block), shape=(capacity, tokens, dim), chunks=(self.chunk_rows, tokens, dim),
            dtype="float16", compressors=ZstdCodec(level=1), fill_value=0,
        ) for block in blocks]
        self.n_rows = 0  # rows handed to append()
        self._written = 0  # rows already in the arrays
        self._pending: list[np.ndarray] = []

    def append(self, patches: np.ndarray) -> np.ndarray:
        """Queue rows (n, blocks, tokens, dim); returns their offsets in this shard."""
        offsets = np.arange(self.n_rows, self.n_rows + len(patches), dtype=np.int64)
        self._pending.append(patches.astype(np.float16, copy=False))
        self.n_rows += len(patches)
        if self.n_rows - self._written >= self.chunk_rows:
            self._flush(whole_chunks_only=True)
        return offsets

    def _flush(self, whole_chunks_only: bool) -> None:
        pending = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        count = len(pending) - len(pending) % self.chunk_rows if whole_chunks_only else len(pending)
        if count:
            for index, array in enumerate(self.arrays):
                array[self._written:self._written + count] = pending[:count, index]
            self._written += count
        self._pending = [pending[count:]] if count < len(pending) else []

    def close(self) -> None:
        """Write what is left, trim the arrays to the rows they hold, record the files' checksums."""
        if self._pending:
            self._flush(whole_chunks_only=False)
        for array in self.arrays:
            array.resize((self.n_rows, *array.shape[1:]))
        write_shard_checksums(self.path)


def read_patches(patches_root: Path, patch_shard: str, offsets, block: int) -> np.ndarray:
    """Patch tokens (len(offsets), tokens, dim) of block `block` for rows of one shard, as float16.
    StoreDamagedError when the shard or a chunk the rows need is gone (Zarr would read zeros)."""
    return PatchReader(patches_root).read(patch_shard, offsets, block)


class PatchReader:
    """Reads the patch tokens of many rows, keeping each shard's arrays open: opening one reads its
    metadata, which costs as much as reading a few rows.

    Every chunk file is checked against the SHA-256 its shard recorded when it was closed, before it
    is decoded (once per reader): Zarr would decode flipped bytes as other numbers (or NaN) without
    a word. Shards written before checksums are read as they are."""

    def __init__(self, patches_root: Path):
        self.patches_root = patches_root
        self._arrays: dict[tuple[str, int], zarr.Array] = {}
        self._checksums: dict[str, dict[str, str] | None] = {}  # shard → relative file → SHA-256
        self._verified: set[Path] = set()

    def array(self, patch_shard: str, block: int) -> zarr.Array:
        if (patch_shard, block) not in self._arrays:
            path = self.patches_root / patch_shard / patch_array(block)
            if not (path / "zarr.json").exists():
                raise StoreDamagedError(damaged_shard(self.patches_root, path, "is missing"))
            self._arrays[patch_shard, block] = zarr.open_array(**zarr_location(path), mode="r")
        return self._arrays[patch_shard, block]

    def chunk_rows(self, patch_shard: str, block: int) -> int:
        """Rows per stored chunk: reading part of a chunk decompresses all of it."""
        return self.array(patch_shard, block).chunks[0]

    def read(self, patch_shard: str, offsets, block: int) -> np.ndarray:
        array = self.array(patch_shard, block)
        path = self.patches_root / patch_shard / patch_array(block)
        offsets = np.asarray(offsets, dtype=np.int64)
        if len(offsets) and offsets.max() >= array.shape[0]:
            raise StoreDamagedError(damaged_shard(self.patches_root, path, f"has no row {offsets.max()}"))
        rows = array.chunks[0]
        chunk_of = offsets // rows
        out = np.empty((len(offsets), *array.shape[1:]), dtype=array.dtype)
        for chunk in np.unique(chunk_of):
            chunk_key = array.metadata.encode_chunk_key((int(chunk), 0, 0))
            if not (path / chunk_key).exists():
                raise StoreDamagedError(damaged_shard(self.patches_root, path,
                                                      f"lacks its chunk of rows {chunk * rows}+"))
            self.verify(patch_shard, f"{patch_array(block)}/{chunk_key}")
            # each chunk read whole by a slice, its rows picked in memory: oindex on the same rows took twice
            # as long (zarr 3.1, 42-row chunks of 256x384 float16, 70% of their rows wanted)
            here = np.flatnonzero(chunk_of == chunk)
            start = int(chunk) * rows
            out[here] = array[start:start + rows][offsets[here] - start]
        return out


    def verify(self, patch_shard: str, relative: str) -> None:
        """StoreDamagedError unless the shard's file `relative` has the SHA-256 recorded for it."""
        file = self.patches_root / patch_shard / relative
        if file in self._verified:
            return
        if patch_shard not in self._checksums:
            try:
                self._checksums[patch_shard] = read_shard_checksums(self.patches_root / patch_shard)
            except (ValueError, KeyError):
                raise StoreDamagedError(damaged_shard(self.patches_root, self.patches_root / patch_shard,
                                                      f"has a damaged {SHARD_CHECKSUMS}")) from None
        checksums = self._checksums[patch_shard]
        if checksums is not None and checksums.get(relative) != file_sha256(file):
            raise StoreDamagedError(damaged_shard(self.patches_root, file.parent,
                                                  f"has a chunk file ({file.name}) that fails its checksum"))
        self._verified.add(file)


def damaged_shard(patches_root: Path, path: Path, what: str) -> str:
    store = patches_root.parent
    return (f"patch array {path} {what}: run `embedstore check {store}` (`--repair` drops the rows that "
            "point at it; a rerun of the ingest re-embeds them)")

