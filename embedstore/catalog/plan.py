"""What is left to embed, planned series by series from the catalog.

Two ways in, one plan per series (`plan_series`):
- while headers are being read, `SeriesAssembler` hands on each series first seen in this run once
  every folder holding its files has been read (the walk lists a folder's files together), so the
  embedders start long before the catalog ends;
- `remaining_series` asks DuckDB for everything else: the listed files of every series that some
  model still lacks, as an anti-join of the `files` table against each model's committed rows,
  streamed in series order so no more than one series is in Python at a time.
A series that turns out to continue in a later folder after it was handed on is `reopened`: the
ingest plans it again whole once the catalog has ended.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyarrow as pa

from embedstore.catalog.rows import header_of, nifti_layout_of, raster_layout_of
from embedstore.sources.catalog import catalog_of_scanned
from embedstore.sources.discover import FoundFile
from embedstore.sources.nifti import slicing_axis
from embedstore.sources.records import Failure, ReadTask
from embedstore.store import Store, among, sql_literal
from embedstore.store.schema import slices_table_name

PLAN_BATCH_ROWS = 8192  # rows per Arrow batch streamed out of DuckDB
PLAN_MEMORY = "512MB"  # DuckDB's share of the driver while it plans (beyond it, it spills to disk)


@dataclass
class PlannedSeries:
    """One series (or one non-DICOM file) to embed: the tasks of its files some model lacks."""

    part: str  # the series UID as read, or the path of a NIfTI or raster file: what a lease is taken on
    tasks: list[ReadTask] = field(default_factory=list)
    wanted: list[set[str]] = field(default_factory=list)  # per model, the item ids it lacks
    failures: list[Failure] = field(default_factory=list)  # files that contradict their series

    @property
    def n_items(self) -> int:
        return sum(len(task.items) for task in self.tasks)


def part_of(row: dict) -> str:
    return row["series_uid"] if row["kind"] == "dicom" else row["path"]


def failures_of(rows: pa.Table) -> list[Failure]:
    """The header failures among catalogue rows, as failures rows."""
    if rows.column("reason").null_count == rows.num_rows:  # the usual chunk: the filter costs 0.1 ms
        return []
    failed = rows.filter(pa.compute.is_valid(rows["reason"])).select(["path", "reason", "message"]).to_pylist()
    return [Failure(row["path"], "read", row["reason"], row["message"]) for row in failed]


def plan_series(part: str, rows: list[dict], n_models: int, axis: str, modality: str | None,
                committed: Callable[[int, list[str]], set[str]] | None = None) -> PlannedSeries:
    """The tasks of a series' files (rows in walk order) that some model lacks. A row's `done_<m>`
    (absent: nothing committed) counts model m's committed items of the file's instance; where a
    file is partly done, `committed(m, item_ids)` says which of its items model m has."""
    catalog = catalog_of_scanned(((FoundFile(row["kind"], row["path"]), scanned_of(row, axis)) for row in rows),
                                 axis, modality)
    by_path = {row["path"]: row for row in rows}
    planned = PlannedSeries(part, wanted=[set() for _ in range(n_models)], failures=catalog.failures)
    for task in catalog.tasks:
        lacking = lacking_models(by_path[task.path], n_models)
        if not lacking:
            continue
        item_ids = [item.item_id for item in task.items]
        for m in lacking:
            partly = committed is not None and by_path[task.path].get(f"done_{m}", 0) > 0
            planned.wanted[m].update(set(item_ids) - committed(m, item_ids) if partly else item_ids)
        wanted = set().union(*(planned.wanted[m] for m in lacking))
        task.items = [item for item in task.items if item.item_id in wanted]
        planned.tasks.append(task)
    return planned


def lacking_models(row: dict, n_models: int) -> list[int]:
    """The models that lack items of the row's instance; all of them for a row just read (it has
    no `n_items`: nothing of a file first seen in this run is committed)."""
    if "n_items" not in row:
        return list(range(n_models))
    return [m for m in range(n_models) if row[f"done_{m}"] < row["n_items"]]


def scanned_of(row: dict, axis: str):
    if row["kind"] == "dicom":
        return header_of(row)
    if row["kind"] == "raster":
        return raster_layout_of(row)
    return nifti_layout_of(row, axis)


class SeriesAssembler:
    """Catalogue rows in walk order in; series whose folders have all been read out.

    A series already in the catalog when the run started is left to `remaining_series` (its other
    files are in the table, not here); one seen again after it was handed on is `reopened`.
    """

    def __init__(self, known_parts: set[str]):
        self.known_parts = set(known_parts)  # grows with the parts left to `remaining_series`
        self.pending: dict[str, list[dict]] = defaultdict(list)
        self.last_folder: dict[str, int] = {}  # part → index of the last folder holding its files
        self.handed: set[str] = set()
        self.reopened: set[str] = set()
        self.folder, self.n_folders = None, 0

    def add(self, rows: pa.Table) -> Iterator[tuple[str, list[dict]]]:
        """(part, rows) of every series complete after these rows."""
        for row in rows.filter(pa.compute.is_null(rows["reason"])).to_pylist():
            folder = os.path.dirname(row["path"])
            if folder != self.folder:
                self.folder, self.n_folders = folder, self.n_folders + 1
            part = part_of(row)
            if part in self.handed:
                self.reopened.add(part)
            elif part not in self.known_parts:
                self.pending[part].append(row)
                self.last_folder[part] = self.n_folders
        yield from self._complete(lambda last: last < self.n_folders)

    def finish(self) -> Iterator[tuple[str, list[dict]]]:
        """Every series still pending: the catalog has been read."""
        yield from self._complete(lambda last: True)

    def _complete(self, done) -> Iterator[tuple[str, list[dict]]]:
        ready = [part for part, last in self.last_folder.items() if done(last)]
        for part in ready:
            del self.last_folder[part]
            yield part, self.pending.pop(part)

    def forget(self, part: str) -> None:
        """A part handed on: a later file of it reopens it."""
        self.handed.add(part)

    def leave(self, part: str) -> None:
        """A part not handed on (the embedders have enough): all of it is left to `remaining_series`."""
        self.known_parts.add(part)


def remaining_series(store: Store, listing: pa.Table, model_ids: list[str], axis: str, modality: str | None,
                     exclude: set[str] = frozenset(), only: set[str] | None = None) -> Iterator[PlannedSeries]:
    """Every listed series some model still lacks items of, planned; `exclude` and `only` name
    parts (series UIDs as read, or file paths)."""

    def committed(m: int, item_ids: list[str]) -> set[str]:
        rows = store.rows(slices_table_name(model_ids[m]), among("key", item_ids), ["key"])
        return set(rows.column("key").to_pylist())

    con, query = _catalog_query(store, listing, model_ids, axis)
    con.register("excluded", pa.table({"part": pa.array(sorted(exclude), pa.string())}))
    sql = (f"WITH {query}, todo AS (SELECT DISTINCT part FROM marked WHERE {_lacking(model_ids)}) "
           "SELECT * FROM marked WHERE part IN (SELECT part FROM todo) AND part NOT IN (SELECT part FROM excluded)")
    if only is not None:
        con.register("wanted_parts", pa.table({"part": pa.array(sorted(only), pa.string())}))
        sql += " AND part IN (SELECT part FROM wanted_parts)"
    reader = con.sql(sql + " ORDER BY part, position").to_arrow_reader(PLAN_BATCH_ROWS)
    part, rows = None, []
    for batch in reader:
        for row in batch.to_pylist():
            if row["part"] != part and rows:
                yield plan_series(part, rows, len(model_ids), axis, modality, committed)
                rows = []
            part = row["part"]
            rows.append(row)
    if rows:
        yield plan_series(part, rows, len(model_ids), axis, modality, committed)


@dataclass
class CatalogPlanner:
    """What one run plans from: the store, the sources' listing, the run's models and slicing."""

    store: Store
    listing: pa.Table
    model_ids: list[str]
    axis: str
    modality: str | None

    def remaining(self, exclude: set[str] = frozenset(), only: set[str] | None = None) -> Iterator[PlannedSeries]:
        return remaining_series(self.store, self.listing, self.model_ids, self.axis, self.modality, exclude, only)

    def plan(self, part: str, rows: list[dict]) -> PlannedSeries:
        """A series just read (nothing of it committed)."""
        return plan_series(part, rows, len(self.model_ids), self.axis, self.modality)

    def counts(self, run_id: str) -> "CatalogCounts":
        return catalog_counts(self.store, self.listing, self.model_ids, self.axis, run_id)


@dataclass
class CatalogCounts:
    n_found: int  # slices of the listed files' instances (a copy of an instance counted once)
    n_skipped: int  # of those, slices every model had from other runs


def catalog_counts(store: Store, listing: pa.Table, model_ids: list[str], axis: str, run_id: str) -> CatalogCounts:
    con, query = _catalog_query(store, listing, model_ids, axis, other_than_run=run_id)
    # Items every model had before this run: per instance, the fewest any model had (their sets nest
    # in practice: a model added later lacks what the first has, never the reverse).
    had = "least(" + ", ".join(["n_items", *(f"done_{m}" for m in range(len(model_ids)))]) + ")"
    found, skipped = con.execute(
        f"WITH {query}, instances AS (SELECT any_value(n_items) AS n_items, any_value({had}) AS had "
        "FROM marked GROUP BY coalesce(sop_uid, path)) "
        "SELECT coalesce(sum(n_items), 0), coalesce(sum(had), 0) FROM instances").fetchall()[0]
    return CatalogCounts(int(found), int(skipped))


def _catalog_query(store: Store, listing: pa.Table, model_ids: list[str], axis: str,
                   other_than_run: str | None = None):
    """A DuckDB connection and the CTEs that end in `marked`: the listed, usable files with their
    `part`, `n_items` and, per model m, `done_m` (its committed items of the file's instance)."""
    con = planning_connection()
    con.register("files", store.dataset("files"))
    con.register("listing", listing.select(["path", "position"]))
    along = slicing_axis(axis)
    ctes = [
        "f AS (SELECT files.*, listing.position, CASE WHEN kind = 'dicom' THEN series_uid ELSE path END AS part, "
        f"CASE WHEN kind = 'nifti' THEN n_frames * CAST(json_extract(layout, '$.shape[{along}]') AS INTEGER) "
        "ELSE n_frames END AS n_items FROM files JOIN listing USING (path) WHERE reason IS NULL)"]
    joins, columns = [], []
    for m, model_id in enumerate(model_ids):
        con.register(f"v{m}", store.dataset(slices_table_name(model_id)))
        other_run = f" AND run_id <> {sql_literal(other_than_run)}" if other_than_run else ""
        # A NIfTI file's items along another axis are other items: only this axis' keys count.
        ctes.append(f"c{m} AS (SELECT coalesce(sop_uid, path) AS id, count(*) AS n FROM v{m} "
                    f"WHERE (NOT starts_with(key, 'nifti:') OR key LIKE {sql_literal(f'nifti:%:{axis}:%')}){other_run} "
                    "GROUP BY 1)")
        joins.append(f"LEFT JOIN c{m} ON c{m}.id = coalesce(f.sop_uid, f.path)")
        columns.append(f"coalesce(c{m}.n, 0) AS done_{m}")
    selected = ", ".join(["f.*", *columns])
    ctes.append(f"marked AS (SELECT {selected} FROM f {' '.join(joins)})")
    return con, ", ".join(ctes)


def planning_connection():
    """An in-memory DuckDB that spills what does not fit in `PLAN_MEMORY` to a temporary folder: the
    anti-joins and the series sort cover every file of the archive, and the driver's memory must not
    grow with it."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{PLAN_MEMORY}'")
    con.execute(f"SET temp_directory = '{tempfile.gettempdir()}/embedstore-duckdb-{os.getpid()}'")
    con.execute("SET preserve_insertion_order = false")  # the plan orders what it needs ordered
    return con


def _lacking(model_ids: list[str]) -> str:
    return " OR ".join(f"done_{m} < n_items" for m in range(len(model_ids))) or "FALSE"
