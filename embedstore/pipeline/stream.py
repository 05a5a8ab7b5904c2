"""From the catalog to work units while the catalog is still being read.

`SeriesFeed` runs the catalog's header reads on a thread of their own and hands each series on as
soon as every folder holding it has been read; the embedders take them from a short queue. A series
that finds the queue full is left in the catalog, and everything left (series of earlier runs,
files that changed, series the queue had no room for) comes after the reading ends, planned from
the store by `remaining_series`. `UnitStream` groups series into units of about `unit_slices`
slices and takes each series' lease first, so concurrent writers embed different series.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import pyarrow as pa

from embedstore.catalog.plan import CatalogPlanner, PlannedSeries, SeriesAssembler, failures_of
from embedstore.catalog.scan import CatalogScan
from embedstore.pipeline.progress import IngestProgress
from embedstore.pipeline.runner import WorkUnit
from embedstore.sources.records import Failure
from embedstore.store.leases import Claim, LeaseBook

SERIES_AHEAD = 64  # series waiting for the embedders; more are left to the catalog, not held in memory


class SeriesFeed:
    """The catalog's reads on a thread; complete series handed on while they go."""

    def __init__(self, scan: CatalogScan, planner: CatalogPlanner, progress: IngestProgress,
                 earlier_failed: set[str]):
        self.scan, self.planner, self.store, self.progress = scan, planner, planner.store, progress
        self.assembler = SeriesAssembler(scan.known_parts)
        self.earlier_failed = earlier_failed  # paths with failures rows of earlier runs
        self.retried: set[str] = set()  # of those, the ones this run read again
        self.failures: list[Failure] = []  # headers that could not be used
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(SERIES_AHEAD)
        self._thread = threading.Thread(target=self._read, name="catalog", daemon=True)

    def start(self) -> "SeriesFeed":
        self._thread.start()
        return self

    def series(self) -> Iterator[PlannedSeries]:
        """Series as the catalog completes them, then every listed series some model still lacks."""
        while self._thread.is_alive() or not self._queue.empty():
            try:
                part, rows = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            yield self.planner.plan(part, rows)
        self._thread.join()
        if self.error is not None:
            raise self.error
        yield from self.planner.remaining(exclude=self.assembler.handed)

    @property
    def reopened(self) -> set[str]:
        return self.assembler.reopened

    def _read(self) -> None:
        try:
            self.scan.read(self._take)
            self._offer(self.assembler.finish())
        except BaseException as error:  # raised again in the embedding thread, which ends the run
            self.error = error

    def _take(self, rows: pa.Table) -> None:
        failures = failures_of(rows)
        if failures:
            self.store.add_failures(failures, self.scan.settings.rows.run_id)
            self.failures.extend(failures)
            self.progress.failed(0, failures)
        if self.earlier_failed:
            self.retried.update(set(rows.column("path").to_pylist()) & self.earlier_failed)
        self._offer(self.assembler.add(rows))

    def _offer(self, complete: Iterable[tuple[str, list[dict]]]) -> None:
        for part, rows in complete:
            try:
                self._queue.put_nowait((part, rows))
                self.assembler.forget(part)
            except queue.Full:
                self.assembler.leave(part)


class UnitStream:
    """Planned series in, work units out: each series' lease taken first, series held by another
    live writer set aside (`deferred`) to look at again once this run's own work is done."""

    def __init__(self, leases: LeaseBook, n_models: int, unit_slices: int, progress: IngestProgress,
                 earlier_failed: set[str]):
        self.leases, self.n_models, self.unit_slices, self.progress = leases, n_models, unit_slices, progress
        self.earlier_failed = earlier_failed  # paths with failures rows of earlier runs
        self.retried: set[str] = set()  # of those, the ones this run decodes again
        self.deferred: set[str] = set()
        self.failures: list[Failure] = []  # files that contradict their series
        self.n_units = 0

    def units(self, planned: Iterable[PlannedSeries]) -> Iterator[WorkUnit]:
        unit = self._new_unit()
        for series in planned:
            self.failures.extend(series.failures)
            if not series.tasks:
                continue
            claim = self.leases.claim(series.part)
            if claim is Claim.HELD:
                self.deferred.add(series.part)
                continue
            self.deferred.discard(series.part)
            if claim is Claim.DONE:
                continue
            unit.tasks.extend(series.tasks)
            unit.parts.append(series.part)
            if self.earlier_failed:
                self.retried.update({path for task in series.tasks for path in (task.path, *task.alternates)}
                                    & self.earlier_failed)
            for wanted, more in zip(unit.wanted, series.wanted):
                wanted.update(more)
            self.progress.grow(series.n_items)
            if unit.n_items >= self.unit_slices:  # out at once: the next series may be a folder away
                yield unit
                unit = self._new_unit()
        if unit.tasks:
            yield unit

    def _new_unit(self) -> WorkUnit:
        self.n_units += 1
        return WorkUnit(self.n_units - 1, wanted=[set() for _ in range(self.n_models)])
