"""Checksums of what the store holds, so that damage is found rather than read back as data.

- Vector rows: `row_digest`, 32 hex digits of SHA-256 over every other column of the row, set when
  the row is committed. Lance keeps no checksum of its own: flipped bytes in a data file read back
  as other numbers.
- Patch shards: `checksums.json` in the shard's folder, SHA-256 of each file of the Zarr group
  (metadata and chunks), written when the shard is closed, before any row points into it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

ROW_DIGEST_HEX_CHARS = 32
SHARD_CHECKSUMS = "checksums.json"
READ_BYTES = 1 << 20


def row_digests(rows: pa.Table, columns: list[str]) -> pa.Array:
    """Per row, SHA-256 of its values in `columns`: the scalars as one JSON list, a zero byte, then
    the vectors as little-endian float32, each group in `columns` order."""
    vectors = [name for name in columns if pa.types.is_fixed_size_list(rows.schema.field(name).type)]
    scalars = zip(*(rows.column(name).to_pylist() for name in columns if name not in vectors))
    matrix = np.concatenate([vector_matrix(rows.column(name)) for name in vectors], axis=1)
    digests = [hashlib.sha256(json.dumps(values).encode() + b"\0" + row.tobytes()).hexdigest()
               for values, row in zip(scalars, matrix)]
    return pa.array([digest[:ROW_DIGEST_HEX_CHARS] for digest in digests], pa.string())


def vector_matrix(column: pa.ChunkedArray) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype="<f4").reshape(len(column), column.type.list_size)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def shard_files(shard: Path) -> list[str]:
    """The shard's files, relative to its folder, checksums left out."""
    return sorted(p.relative_to(shard).as_posix() for p in shard.rglob("*")
                  if p.is_file() and p.name != SHARD_CHECKSUMS)


def write_shard_checksums(shard: Path) -> None:
    checksums = {name: file_sha256(shard / name) for name in shard_files(shard)}
    (shard / SHARD_CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": checksums}, indent=1) + "\n")


def read_shard_checksums(shard: Path) -> dict[str, str] | None:
    """relative file → SHA-256, or None for a shard written before checksums were kept."""
    path = shard / SHARD_CHECKSUMS
    return json.loads(path.read_text())["files"] if path.exists() else None
