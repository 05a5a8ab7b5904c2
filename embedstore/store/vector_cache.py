"""A flat copy of an indexed vector column, for exact search among the rows a selective filter keeps.
Its vectors are scaled to unit length, so a cosine score is one dot product.

Lance reads a scattered row in about 9 µs at 1M rows, so a filter keeping 10,000 rows costs 90 ms
to compare exactly, seven unfiltered index searches. The copy holds the column as one float32 `.npy`
per Lance fragment, read through a memory map by the row offsets of the kept row ids (a row id is
fragment id << 32 | offset): 10,000 rows in a few milliseconds. Lance never changes a fragment's
vectors in place (a write adds fragments, a delete marks rows, a compaction makes new fragments),
so a copy named after its fragment's data file stays right for as long as that fragment exists (a
table made again has new file names, so an old copy is never read for it); rows of fragments
without a copy (added since `embedstore index`, or with deleted rows at copy time) are read from the
table. Each file's SHA-256 is kept beside it and `embedstore check` verifies them; the copy is
derived data, safe to delete, and rebuilt by `embedstore index`.

    vector-cache/<table>/<column>/<fragment id>-<data file>.npy   (rows, D) float32 unit vectors, by row offset
    vector-cache/<table>/<column>/checksums.json                  {"<file name>": sha256}
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from embedstore.store import VECTOR_COPIES_DIR, Store, among
from embedstore.store.digests import file_sha256
from embedstore.store.location import local_folder
from embedstore.store.vectors import column_matrix

CHECKSUMS = "checksums.json"


def cache_folder(store: Store, table: str, column: str) -> Path:
    return local_folder(store.path, VECTOR_COPIES_DIR) / table / column


def copy_names(fragments) -> dict[int, str]:
    """Each fragment's copy: its id and the name of its first data file (unique to this table)."""
    return {fragment.fragment_id: f"{fragment.fragment_id}-{Path(fragment.data_files()[0].path).stem}.npy"
            for fragment in fragments}


def write_vector_cache(store: Store, table: str, column: str) -> int:
    """Copy `column` of every fragment of `table` that has no copy yet (and no deleted rows); copies
    of fragments gone since are removed. Returns the rows the copy holds."""
    folder = cache_folder(store, table, column)
    folder.mkdir(parents=True, exist_ok=True)
    checksums = read_checksums(folder)
    fragments = store.dataset(table).get_fragments()
    names = copy_names(fragments)
    for name in set(checksums) - set(names.values()):
        (folder / name).unlink(missing_ok=True)
        del checksums[name]
    held = 0
    for fragment in fragments:
        name = names[fragment.fragment_id]
        if name not in checksums and fragment.count_rows() == fragment.physical_rows:
            matrix = unit_rows(column_matrix(fragment.to_table(columns=[column]).column(column)))
            temporary = folder / f".{name}.{os.getpid()}.tmp"
            with open(temporary, "wb") as handle:
                np.save(handle, matrix, allow_pickle=False)
            os.replace(temporary, folder / name)
            checksums[name] = file_sha256(folder / name)
        held += fragment.physical_rows if name in checksums else 0
    write_checksums(folder, checksums)
    return held


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), float32."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def read_unit_vectors(store: Store, table: str, column: str, row_ids: np.ndarray) -> np.ndarray:
    """(len(row_ids), D) float32: the column's vectors of these row ids (ascending, as a scan gives
    them) scaled to unit length, from the copy where their fragment has one, else from the table."""
    folder = cache_folder(store, table, column)
    checksums = read_checksums(folder)
    names = copy_names(store.dataset(table).get_fragments())
    row_ids = np.asarray(row_ids, dtype=np.uint64)
    fragments, offsets = row_ids >> np.uint64(32), (row_ids & np.uint64(0xFFFFFFFF)).astype(np.int64)
    matrix, uncached = None, np.zeros(len(row_ids), dtype=bool)
    ids, starts = np.unique(fragments, return_index=True)
    for fragment, start, end in zip(ids, starts, [*starts[1:], len(row_ids)]):
        copy = open_copy(folder, names.get(int(fragment)), checksums)
        if copy is None or offsets[start:end].max() >= len(copy):
            uncached[start:end] = True
            continue
        if matrix is None:
            matrix = np.empty((len(row_ids), copy.shape[1]), dtype=np.float32)
        matrix[start:end] = copy[offsets[start:end]]
    if uncached.any():
        rows = store.rows(table, among("_rowid", row_ids[uncached].tolist()), [column], with_row_ids=True)
        by_id = dict(zip(rows.column("_rowid").to_pylist(), column_matrix(rows.column(column))))
        if matrix is None:
            matrix = np.empty((len(row_ids), rows.schema.field(column).type.list_size), dtype=np.float32)
        matrix[uncached] = unit_rows(np.stack([by_id[int(i)] for i in row_ids[uncached]]))
    return matrix if matrix is not None else np.empty((0, 0), dtype=np.float32)


def open_copy(folder: Path, name: str | None, checksums: dict[str, str]) -> np.ndarray | None:
    """A fragment's copy as a memory map; None when it has none (or one that does not load)."""
    if name is None or name not in checksums:
        return None
    try:
        return np.load(folder / name, mmap_mode="r")
    except (OSError, ValueError):  # gone or cut short: the table answers, and `check` says why
        return None


def has_vector_cache(store: Store, table: str, column: str) -> bool:
    return bool(read_checksums(cache_folder(store, table, column)))


def damaged_cache_files(store: Store) -> list[Path]:
    """Copies whose bytes no longer match their SHA-256 (or are gone): `check` reports them."""
    damaged = []
    for listing in sorted(local_folder(store.path, VECTOR_COPIES_DIR).glob(f"*/*/{CHECKSUMS}")):
        for name, digest in read_checksums(listing.parent).items():
            path = listing.parent / name
            if not path.exists() or file_sha256(path) != digest:
                damaged.append(path)
    return damaged


def drop_vector_cache(store: Store) -> None:
    """Remove every copy (derived data: `embedstore index` writes it again)."""
    shutil.rmtree(local_folder(store.path, VECTOR_COPIES_DIR), ignore_errors=True)


def read_checksums(folder: Path) -> dict[str, str]:
    try:
        return json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return {}


def write_checksums(folder: Path, checksums: dict[str, str]) -> None:
    temporary = folder / f".{CHECKSUMS}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(checksums, sort_keys=True))
    os.replace(temporary, folder / CHECKSUMS)
