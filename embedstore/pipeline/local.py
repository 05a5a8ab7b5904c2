"""The local distributor: decode in this machine's worker processes (or inline), run each unit
through the same `UnitRunner` the Ray actors run, commit with the same `RowCommitter`."""

from __future__ import annotations

from collections import Counter
from itertools import islice

from embedstore.pipeline.decode import DecodePool
from embedstore.pipeline.progress import IngestProgress
from embedstore.pipeline.runner import RowCommitter, UnitRunner, WorkUnit


def embed_locally(job, store, runner: UnitRunner, pool: DecodePool, units: list[WorkUnit],
                  progress: IngestProgress, stage_seconds: Counter):
    """Embed the plan's units in this process; returns the run's EmbedOutcome."""
    committer = RowCommitter(store, job.run_id, [s.model_id for s in job.specs], job.options.commit_rows,
                             stage_seconds)
    # One ordered stream over every unit's tasks keeps the decode workers busy across unit borders.
    decoded = pool.decode(task for unit in units for task in unit.tasks)
    for unit in units:
        committer.take(runner.run(unit, list(islice(decoded, len(unit.tasks))), progress.advance), progress)
    committer.flush()
    stage_seconds.update(pool.stage_seconds)
    engine = runner.embedders[0].engine
    return committer.outcome(engine.name, engine.notes)
