"""One progress display for a run: slices done, failures so far, slices/s and time left."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class SlicesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.1f} slices/s", style="cyan")


class IngestProgress:
    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.enabled = enabled and total > 0
        self.n_failed_slices = 0
        self.started = time.perf_counter()
        self._progress = Progress(
            TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), SlicesPerSecond(),
            TextColumn("{task.fields[failed]} failed"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False, disable=not self.enabled,
        )
        self._task = self._progress.add_task("embed", total=total, failed=0)

    def __enter__(self) -> "IngestProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def failed(self, n_slices: int) -> None:
        """Slices of a file that failed: they leave the total, and count as failed."""
        self.n_failed_slices += n_slices
        self.total -= n_slices
        self._progress.update(self._task, total=self.total, failed=self.n_failed_slices)
