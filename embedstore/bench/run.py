"""`embedstore bench`: the cells a suite is missing, run in parallel (local processes, or Ray tasks on a
cluster), each cached as it finishes; then the leaderboard from every cell. A rerun computes nothing it
has; an interrupted suite resumes where it stopped."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from embedstore.bench.cells import Cell, CellCache, cell_key, cells_of, run_cell
from embedstore.bench.suite import Suite


@dataclass
class SuiteRun:
    cells: int
    cached: int  # found done
    computed: int  # run now
    failed: list[str]  # "cell: error" for cells whose eval refused the data
    leaderboard: Path


def run_suite(suite: Suite, out: Path, jobs: int = 1, ray_address: str | None = None,
              on_cell: Callable[[int, int, str], None] | None = None) -> SuiteRun:
    """Every cell of `suite` into `out`; `on_cell(done, total, label)` after each one."""
    from embedstore.bench.leaderboard import write_leaderboard
    from embedstore.store import Store

    cache = CellCache(out / "cells")
    cells = cells_of(suite)
    specs = {}
    for cell in cells:
        if (cell.dataset.store, cell.model_id) not in specs:
            specs[cell.dataset.store, cell.model_id] = Store.open(cell.dataset.store).spec(cell.model_id).to_row()
    keyed = [(cell_key(cell, specs[cell.dataset.store, cell.model_id]), cell) for cell in cells]
    missing = [(key, cell) for key, cell in keyed if cache.result(key) is None]
    done, failed = len(keyed) - len(missing), []
    if on_cell:
        on_cell(done, len(keyed), f"{done} cells cached")
    for key, cell, outcome in run_cells(missing, jobs, ray_address):
        done += 1
        if isinstance(outcome, Exception):
            failed.append(f"{cell.label}: {outcome}")
        else:
            cache.store(key, cell, *outcome)
        if on_cell:
            on_cell(done, len(keyed), cell.label)
    leaderboard = write_leaderboard(suite, [(key, cell) for key, cell in keyed], cache, out)
    return SuiteRun(len(keyed), len(keyed) - len(missing), len(missing) - len(failed), failed, leaderboard)


def run_cells(cells: list[tuple[str, Cell]], jobs: int, ray_address: str | None):
    """(key, cell, (result, predictions) or the error) for each cell, in the order they finish."""
    if ray_address:
        yield from run_on_ray(cells, ray_address)
    elif jobs <= 1:
        for key, cell in cells:
            yield key, cell, guarded(cell)
    else:
        # spawn: a forked child would share the parent's LanceDB runtime and torch threads
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=share_cores, initargs=(jobs,)) as pool:
            futures = {pool.submit(guarded, cell): (key, cell) for key, cell in cells}
            for future in as_completed(futures):
                yield (*futures[future], future.result())


def guarded(cell: Cell):
    """The cell's outcome, or the UsageError its eval raised (the suite goes on without it)."""
    from embedstore.errors import UsageError

    try:
        return run_cell(cell)
    except UsageError as error:
        return error


def share_cores(jobs: int) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def run_on_ray(cells: list[tuple[str, Cell]], address: str):
    from embedstore.pipeline.on_ray import start_ray

    start_ray(address)
    import ray

    remote = ray.remote(guarded)
    pending = {remote.remote(cell): (key, cell) for key, cell in cells}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        key, cell = pending.pop(ready[0])
        yield key, cell, ray.get(ready[0])
