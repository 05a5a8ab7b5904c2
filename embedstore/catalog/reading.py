"""Header reads on every core, or on every node of a Ray cluster.

Files go out in chunks; each chunk comes back as `files` rows (catalog/rows.py), in submission order,
with a bounded number of chunks in flight, so memory stays flat however large the archive. Header
reads are parsing and I/O with no model beside them: locally they use a process per core; on Ray
each chunk is a task that also commits its rows to the store's `files` table itself, so the driver
only hands out paths and collects the facts it groups into series.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from embedstore.catalog.rows import RowSettings, file_row, reader_name, rows_table
from embedstore.sources.catalog import scan_file
from embedstore.sources.discover import FoundFile
from embedstore.store import Store

LOCAL_CHUNK_FILES = 256  # files per chunk sent to a local worker: messaging stays small beside reading
RAY_CHUNK_FILES = 2048  # files per Ray task: each task is a commit to the `files` table
CHUNKS_IN_FLIGHT_PER_WORKER = 4


@dataclass(frozen=True)
class HeaderSettings:
    axis: str
    max_pixels: int
    rows: RowSettings


@dataclass(frozen=True)
class FileChunk:
    """Files to read, as the listing's columns: a list of FoundFile cost the driver about 4 µs a file
    to build and pickle, a fifth of all it did while two workers read."""

    paths: list[str]
    sizes: list[int]
    mtimes_ns: list[int]
    kinds: list[str]

    @classmethod
    def of(cls, listing: pa.Table) -> "FileChunk":
        return cls(*(listing.column(name).to_pylist() for name in ("path", "size", "mtime_ns", "kind")))

    def files(self) -> list[FoundFile]:
        return [FoundFile(kind, path, size, mtime_ns)
                for path, size, mtime_ns, kind in zip(self.paths, self.sizes, self.mtimes_ns, self.kinds)]


def read_chunk(chunk: FileChunk, settings: HeaderSettings) -> pa.Table:
    """The `files` rows of a chunk: each file's header facts, or why it has none."""
    reader = reader_name()
    return rows_table([file_row(found, scan_file(found, settings.axis, settings.max_pixels), settings.rows, reader)
                       for found in chunk.files()])


def read_and_commit_chunk(chunk: FileChunk, settings: HeaderSettings, store_path: str) -> pa.Table:
    """A Ray task: the chunk's rows, committed to the store's `files` table before they are returned."""
    rows = read_chunk(chunk, settings)
    commit_rows(Store.open(store_path), rows)
    return rows


def commit_rows(store: Store, rows: pa.Table) -> None:
    """Rows in the `files` table, one per path: a file read again replaces its row, and two
    writers cataloguing one archive at once leave one row per file."""
    if rows.num_rows:
        store.upsert("files", rows, key="path")


class FilesCommitter:
    """`commit_rows` for one scan's driver, appending while that is safe: when every file to read was
    new at listing and the table is still at the version this scan last saw, no other writer can have
    added one of its paths, so the rows go in without a merge on path (a merge reads every key of the
    table: at 10^6 files it cost a fifth of the catalog's time). Once another writer has committed,
    rows are merged for the rest of the scan."""

    def __init__(self, store: Store, appendable_from_version: int | None):
        self.store = store
        self.version = appendable_from_version  # None: merge

    def commit(self, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        if self.version is not None:
            self.version = self.store.append_at_version("files", rows, self.version)
            if self.version is not None:
                return
        commit_rows(self.store, rows)


class LocalHeaderReaders:
    """Header reads in `workers` processes (spawned: they import pydicom, never torch), or inline
    with `workers=0`."""

    def __init__(self, workers: int):
        self.workers = workers
        self.chunk_files = LOCAL_CHUNK_FILES
        self.in_flight = max(1, workers) * CHUNKS_IN_FLIGHT_PER_WORKER  # a queue per worker: none idles
        self.commits_rows = False  # the driver commits what comes back
        self.n_tasks = 0
        self._executor = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                          if workers else None)

    def submit(self, chunk: FileChunk, settings: HeaderSettings) -> Future:
        self.n_tasks += 1
        if self._executor is None:
            future: Future = Future()
            future.set_result(read_chunk(chunk, settings))
            return future
        return self._executor.submit(read_chunk, chunk, settings)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


class RayHeaderReaders:
    """Header reads as Ray tasks spread over the cluster, each committing its chunk's rows."""

    def __init__(self, store_path: str, tasks_at_once: int | None):
        import ray

        # Every CPU of the cluster, not of the driver's machine, unless told.
        self.workers = tasks_at_once or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.in_flight = self.workers
        self.chunk_files = RAY_CHUNK_FILES
        self.commits_rows = True
        self.n_tasks = 0
        # No CPU reserved: the embedding actors may hold every CPU of the cluster, and header reads
        # must not wait for them to finish (they wait for the catalog). The number in flight is
        # bounded here instead, and SPREAD puts the tasks on every node.
        self._task = ray.remote(num_cpus=0, max_retries=3, scheduling_strategy="SPREAD")(read_and_commit_chunk)
        self._store_path = store_path

    def submit(self, chunk: FileChunk, settings: HeaderSettings) -> "RayResult":
        self.n_tasks += 1
        return RayResult(self._task.remote(chunk, settings, self._store_path))

    def close(self) -> None:
        """Nothing to release: Ray owns the task workers (the local readers' close ends a pool)."""


class RayResult:
    def __init__(self, ref):
        self.ref = ref

    def result(self) -> pa.Table:
        import ray

        return ray.get(self.ref)


def read_in_order(readers: LocalHeaderReaders | RayHeaderReaders, listing: pa.Table, settings: HeaderSettings,
                  chunk_files: int | None = None) -> Iterator[pa.Table]:
    """The rows of every file of the listing, chunk by chunk in its order, with a bounded number in flight."""
    size = chunk_files or readers.chunk_files
    in_flight: deque = deque()
    for start in range(0, listing.num_rows, size):
        in_flight.append(readers.submit(FileChunk.of(listing.slice(start, size)), settings))
        if len(in_flight) >= readers.in_flight:
            yield in_flight.popleft().result()
    while in_flight:
        yield in_flight.popleft().result()
