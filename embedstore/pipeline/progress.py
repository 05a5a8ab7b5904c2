"""What a run shows on stderr: a line per phase before the embedding starts (loading models,
reading the catalog), then one bar with slices done, slices/s, files failed, duplicate files and
time left, moved after every model batch and laid out to fit 80 columns. Failures are counted in
files, as the summary counts them, duplicates apart.

Loading the models is also where a wrong request is found (an unknown model, a bad checkpoint), and
a wrong request must leave one line on stderr: that phase shows a spinner on a terminal, erased
when it ends, and the run says what it loaded once every check has passed."""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from embedstore.errors import DUPLICATE_INSTANCE
from embedstore.sources.records import Failure


def status(text: str, enabled: bool = True) -> None:
    """One line saying what the run is doing now: the phases before the bar would be silent."""
    if enabled:
        print(text, file=sys.stderr, flush=True)


def spinner(text: str, enabled: bool = True):
    """`text` with a spinner on stderr while the block runs, erased after it: for a phase that may
    end in a wrong request's one line. Nothing off a terminal."""
    console = Console(stderr=True)
    return console.status(text) if enabled and console.is_terminal else nullcontext()


def count_files(failures: list[Failure]) -> tuple[int, int]:
    """(files failed, duplicate files): a copy of an instance embedded from another file is no failure."""
    duplicates = sum(failure.reason == DUPLICATE_INSTANCE for failure in failures)
    return len(failures) - duplicates, duplicates


class SlicesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.1f} slices/s", style="cyan")


BAR_WIDTH = 10  # 100,000s of slices, failures and duplicates still fit in 80 columns


def problems_text(failed: int, duplicates: int) -> str:
    return f"{failed:,} failed" + (f", {duplicates:,} dup" if duplicates else "")


class IngestProgress:
    """The embedding bar. `failures`: the files that failed before it starts (discover, catalog,
    and those of earlier runs that this run does not read again)."""

    def __init__(self, total: int = 0, enabled: bool = True, failures: list[Failure] | None = None):
        self.total = total
        self.enabled = enabled
        self.n_failed_files, self.n_duplicate_files = count_files(failures or [])
        self._terminal = private_stderr() if self.enabled else sys.stderr
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=BAR_WIDTH), MofNCompleteColumn(),
            SlicesPerSecond(), TextColumn("{task.fields[problems]}"), TimeRemainingColumn(),
            console=Console(file=self._terminal), transient=False, disable=not self.enabled,
        )
        self._task = self._progress.add_task("embedding", total=total,
                                             problems=problems_text(self.n_failed_files, self.n_duplicate_files))

    def __enter__(self) -> "IngestProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()
        if self._terminal is not sys.stderr:
            self._terminal.close()

    def phase(self, text: str) -> None:
        """What the bar says it is doing (e.g. preparing the model before the first slice)."""
        self._progress.update(self._task, description=text)

    def grow(self, n: int) -> None:
        """More slices planned: the catalog hands series on while it is read."""
        self.total += n
        self._progress.update(self._task, total=self.total)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def failed(self, n_slices: int, failures: list[Failure]) -> None:
        """A unit's failed files; their `n_slices` slices leave the total."""
        failed, duplicates = count_files(failures)
        self.n_failed_files += failed
        self.n_duplicate_files += duplicates
        self.total -= n_slices
        self._progress.update(self._task, total=self.total,
                              problems=problems_text(self.n_failed_files, self.n_duplicate_files))


def private_stderr() -> TextIO:
    """stderr on a descriptor of its own: while a file is decoded in this process, descriptor 2
    points at a temporary file that catches codec output, and the bar must not go with it."""
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (OSError, ValueError):  # a stderr without a descriptor (captured in a notebook or a test)
        return sys.stderr
