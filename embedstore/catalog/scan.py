"""One run's catalog: list the sources, compare with the `files` table, read the headers of new and
changed files on every core (or Ray node), commit their rows in batches.

Rows are committed as they are read, so a killed catalog resumes where it stopped: the rerun reads
only the files the table does not hold yet. Files gone from the sources are counted, never deleted
from the store.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from embedstore.catalog.listing import Comparison, Listing, compare_with_catalog, list_sources
from embedstore.catalog.reading import FilesCommitter, HeaderSettings, LocalHeaderReaders, RayHeaderReaders, read_in_order
from embedstore.sources.limits import DEFAULT_MAX_PIXELS
from embedstore.store import Store
from embedstore.store.schema import FILES_SCHEMA

COMMIT_FILES = 8192  # rows per `files` commit from the driver: versions follow the archive, not the chunks
SMALL_CATALOG_FILES = 2048  # fewer new headers than this are read inline


def default_header_workers() -> int:
    """Every core: header reads are parsing and small reads, and the catalog outruns decoding
    only if it gets the whole machine while the model waits for its first series."""
    return os.cpu_count() or 1


@dataclass
class CatalogOptions:
    axis: str = "axial"
    max_pixels: int = DEFAULT_MAX_PIXELS
    header_workers: int | None = None  # None: every core
    executor: str = "local"  # local | ray
    chunk_files: int | None = None  # files per header task; None: the reader's default


@dataclass
class CatalogSummary:
    files_listed: int
    files_read: int  # headers read this run (new or changed files)
    files_unchanged: int
    files_changed: int
    files_gone: int  # catalogued under these sources, no longer there (kept in the store)
    files_failed: int  # headers read this run that could not be used
    seconds: float  # listing, comparing, reading and committing
    read_seconds: float  # reading and committing headers
    files_per_s: float  # files_read / read_seconds
    header_workers: int
    header_tasks: int
    executor: str

    def to_dict(self) -> dict:
        return asdict(self)


class CatalogScan:
    """`list()` then `read(on_rows)`; `summary()` once read."""

    def __init__(self, store: Store, sources: list[Path], options: CatalogOptions, settings: HeaderSettings):
        self.store, self.sources, self.options, self.settings = store, sources, options, settings
        self.workers = default_header_workers() if options.header_workers is None else options.header_workers
        self.listing: Listing | None = None
        self.comparison: Comparison | None = None
        self.known_parts: set[str] = set()
        self.files_version = 0  # of the `files` table when this scan compared with it
        self.n_read = self.n_failed = self.n_tasks = 0
        self.read_seconds = self.seconds = 0.0
        self._started = time.perf_counter()

    def list(self) -> Listing:
        """The sources' files now, and what differs from the table (the table made if need be)."""
        self._started = time.perf_counter()
        self.store.create_table_if_missing("files", FILES_SCHEMA)
        self.listing = list_sources(self.sources)
        self.files_version = self.store.table("files").version  # before the comparison reads it
        self.comparison = compare_with_catalog(self.store, self.listing.files, self.sources)
        if self.comparison.n_unchanged or self.comparison.n_changed:
            series = self.store.rows("files", "series_uid IS NOT NULL", ["series_uid"]).column("series_uid")
            self.known_parts = set(pa.compute.unique(series).to_pylist())
        return self.listing

    def read(self, on_rows: Callable[[pa.Table], None] | None = None) -> None:
        """Read every new or changed header; `on_rows(rows)` for each chunk read, in walk order."""
        started = time.perf_counter()
        if self.options.executor == "ray":
            readers = RayHeaderReaders(str(self.store.path), self.options.header_workers)
        else:
            # A few chunks are read sooner in this process than worker processes start (spawn: ~1 s).
            few = self.comparison.to_read.num_rows < SMALL_CATALOG_FILES
            readers = LocalHeaderReaders(0 if few else self.workers)
        self.workers = readers.workers
        all_new = self.comparison.n_new == self.comparison.to_read.num_rows
        committer = FilesCommitter(self.store, self.files_version if all_new else None)
        pending: list[pa.Table] = []
        try:
            for rows in read_in_order(readers, self.comparison.to_read, self.settings, self.options.chunk_files):
                self.n_read += rows.num_rows
                self.n_failed += rows.num_rows - rows.column("reason").null_count
                # Handed on before they are committed: the embedders need not wait for a batch, and a
                # run killed in between reads those headers again, its committed items untouched.
                if on_rows is not None:
                    on_rows(rows)
                if readers.commits_rows:  # a Ray task committed its rows itself
                    continue
                pending.append(rows)
                if sum(t.num_rows for t in pending) >= COMMIT_FILES:
                    committer.commit(pa.concat_tables(pending))
                    pending = []
            if pending:
                committer.commit(pa.concat_tables(pending))
        finally:
            readers.close()
            self.n_tasks = readers.n_tasks
            self.read_seconds = time.perf_counter() - started
            self.seconds = time.perf_counter() - self._started

    def summary(self) -> CatalogSummary:
        comparison = self.comparison
        return CatalogSummary(
            files_listed=self.listing.files.num_rows, files_read=self.n_read, files_unchanged=comparison.n_unchanged,
            files_changed=comparison.n_changed, files_gone=comparison.gone.num_rows, files_failed=self.n_failed,
            seconds=round(self.seconds, 3), read_seconds=round(self.read_seconds, 3),
            files_per_s=round(self.n_read / self.read_seconds, 1) if self.read_seconds > 0 else 0.0,
            header_workers=self.workers, header_tasks=self.n_tasks, executor=self.options.executor)
