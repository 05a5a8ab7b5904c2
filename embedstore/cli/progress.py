"""Bars on stderr for the commands that run for minutes (an ingest draws its own, pipeline/progress.py):
none off a terminal, erased when the work ends."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from embedstore.cli.render import err


@contextmanager
def fit_progress() -> Iterator[Callable[[int, int], None]]:
    """Over the fits of the linear probe's C grid (minutes on large sets): (fits done, fits in all)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("linear probe: C grid fits"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("fits", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def rows_progress(label: str) -> Iterator[Callable[[int, int | None], None]]:
    """Over the slices trained, with their rate: (slices done, slices in all or None)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[rate]}"), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task("rows", total=None, rate="")
        yield lambda done, total: bar.update(task, completed=done, total=total,
                                             rate=f"{bar.tasks[0].speed or 0:,.0f} slices/s")


@contextmanager
def cells_progress() -> Iterator[Callable[[int, int, str], None]]:
    """Over a suite's cells: (cells done, cells in all, the cell just done)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("bench: cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[cell]}"), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("cells", total=None, cell="")
        yield lambda done, total, label: bar.update(task, completed=done, total=total, cell=label)
