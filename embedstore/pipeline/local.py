"""The local distributor: decode in this machine's worker processes (or inline), run each unit
through the same `UnitRunner` the Ray actors run, commit with the same `RowCommitter`."""

from __future__ import annotations

from collections import deque
from typing import Iterable

from embedstore.pipeline.decode import DecodePool
from embedstore.pipeline.progress import IngestProgress
from embedstore.pipeline.runner import RowCommitter, UnitRunner, WorkUnit


def embed_locally(runner: UnitRunner, pool: DecodePool, units: Iterable[WorkUnit], progress: IngestProgress,
                  committer: RowCommitter) -> None:
    """Embed units as they come (the catalog may still be producing them) in this process."""
    started: deque[WorkUnit] = deque()

    def tasks():
        for unit in units:
            started.append(unit)  # before its first task: a result always finds its unit here
            yield from unit.tasks

    # One ordered stream over every unit's tasks keeps the decode workers busy across unit borders.
    unit, decoded = None, []
    for result in pool.decode(tasks()):
        if unit is None:
            unit = started.popleft()
        decoded.append(result)
        if len(decoded) == len(unit.tasks):
            committer.take(runner.run(unit, decoded, progress.advance), progress)
            unit, decoded = None, []
    committer.flush()
    committer.stage_seconds.update(pool.stage_seconds)
    pool.stage_seconds.clear()
