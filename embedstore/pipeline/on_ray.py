"""Ingest on Ray: CPU decode tasks feed one embedding actor per GPU (CPU embedding actors, where
there is no GPU, decode their own units); the driver commits.

The driver cuts the plan into work units (a series never straddles two), sends each unit to a
decode task and its result to an embedding actor, and keeps a bounded number of units in flight so
memory stays flat however large the archive. An actor writes the unit's patch tokens to a Zarr
shard of its own (named per attempt: no two writers ever touch one shard), closes it, and returns
the unit's rows; the driver commits rows in large transactions that never add a key already present.
A retried unit therefore cannot duplicate rows, and a shard whose rows were never committed (a
killed actor or driver) is an orphan that `embedstore vacuum` removes.

Decode, batching, embedding and row building are the same functions the local executor uses.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from embedstore.errors import UsageError, WORKER_CRASHED
from embedstore.pipeline.batching import SliceBatcher
from embedstore.pipeline.decode import decode_or_fail
from embedstore.pipeline.progress import IngestProgress
from embedstore.pipeline.writer import row_metadata, slice_table
from embedstore.sources import Failure, ReadTask

UNIT_SLICES = 256  # slices per work unit (a longer series is one unit on its own)
UNITS_IN_FLIGHT_PER_ACTOR = 2  # one embedding, one waiting: the actor never idles, memory stays bounded
ACTOR_RESTARTS = 3
# Fault injection for the tests: the first actor to reach this many units exits abruptly, once
# (the marker file says it has happened).
FAULT_EXIT_AFTER_UNITS = "EMBEDSTORE_FAULT_ACTOR_EXIT_AFTER_UNITS"
FAULT_MARKER = "EMBEDSTORE_FAULT_MARKER"


@dataclass
class WorkUnit:
    unit_id: int
    tasks: list[ReadTask] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return sum(len(task.items) for task in self.tasks)


def plan_units(tasks: list[ReadTask], unit_slices: int = UNIT_SLICES) -> list[WorkUnit]:
    """Consecutive tasks grouped into units of about `unit_slices`; a series is never split (the
    catalog lists a series' files together)."""
    units: list[WorkUnit] = []
    current, series_of_last = WorkUnit(0), None
    for task in tasks:
        series = task.items[0].series_uid
        if current.n_items >= unit_slices and series != series_of_last:
            units.append(current)
            current = WorkUnit(len(units))
        current.tasks.append(task)
        series_of_last = series
    if current.tasks:
        units.append(current)
    return units


@dataclass
class UnitResult:
    unit_id: int
    rows: pa.Table | None  # `slices` rows, patches already on disk
    failures: list[Failure]
    n_failed_items: int
    seconds: dict[str, float]


def decode_unit(unit: WorkUnit, config, image_size: int) -> list:
    """Every task of a unit decoded (or failed), in order."""
    return [(task, decode_or_fail(task, config, image_size)) for task in unit.tasks]


class EmbedActor:
    """Holds the model on its device; embeds decoded units and writes their patch shards."""

    def __init__(self, options, model_id: str, patches_root: str, run_id: str, threads: int):
        import torch

        from embedstore.models import load_model
        from embedstore.models.embedder import Embedder
        from embedstore.preprocess import IntensityConfig

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)  # Ray sets one thread per worker; a CPU actor owns its cores
        loaded = load_model(options.model, options.weights, options.image_size, options.seed)
        config = IntensityConfig(window=options.window, mr_percentiles=tuple(options.mr_percentiles))
        if loaded.model_id(config.tag()) != model_id:  # e.g. hub weights that changed under us
            raise RuntimeError(f"actor built {loaded.model_id(config.tag())}, the driver planned {model_id}")
        self.options, self.model_id, self.run_id = options, model_id, run_id
        self.loaded, self.config = loaded, config
        self.embedder = Embedder(loaded, options.device, options.precision, options.engine, options.batch_size)
        self.patches_root = patches_root
        self.units_done = 0

    def embed_unit(self, unit_id: int, work: list | WorkUnit) -> UnitResult:
        """Embed a unit: already decoded by a decode task, or (on CPU actors) decoded here."""
        from pathlib import Path

        from embedstore.store.patches import PatchShardWriter

        self._maybe_fail()
        results = decode_unit(work, self.config, self.loaded.image_size) if isinstance(work, WorkUnit) else work
        failures: list[Failure] = []
        n_failed_items = 0
        batcher = SliceBatcher(self.options.batch_size)
        seconds: Counter = Counter()
        for task, result in results:
            failures.extend(result if isinstance(result, list) else result.failures)
            if isinstance(result, list):
                n_failed_items += len(task.items)
            else:
                batcher.add(result)
                seconds.update(result.seconds)
        if not batcher.pending():
            return UnitResult(unit_id, None, failures, n_failed_items, dict(seconds))
        shard = None
        if self.options.keep_patches:  # one shard per unit and attempt: a retry never reuses one
            shard = PatchShardWriter(Path(self.patches_root), self.model_id,
                                     f"{self.run_id}-u{unit_id:06d}-{uuid.uuid4().hex[:6]}",
                                     batcher.pending(), self.loaded.num_patches, self.loaded.embed_dim)
        rows, cls, patch_mean = [], [], []
        while batcher.pending():
            items, pixels = batcher.take()
            started = time.perf_counter()
            embeddings = self.embedder.embed(pixels, keep_patches=self.options.keep_patches)
            seconds["embed"] += time.perf_counter() - started
            started = time.perf_counter()
            offsets = shard.append(embeddings.patches).tolist() if shard else [None] * len(items)
            rows.extend(row_metadata(self.model_id, self.run_id, items, shard.relative_path if shard else None,
                                     offsets))
            cls.append(embeddings.cls)
            patch_mean.append(embeddings.patch_mean)
            seconds["write_patches"] += time.perf_counter() - started
        started = time.perf_counter()
        if shard:
            shard.close()  # the patches are on disk before the driver can commit a row pointing at them
        table = slice_table(rows, np.concatenate(cls), np.concatenate(patch_mean), self.loaded.embed_dim)
        seconds["write_patches"] += time.perf_counter() - started
        self.units_done += 1
        return UnitResult(unit_id, table, failures, n_failed_items, dict(seconds))

    def engine_in_use(self) -> tuple[str, list[str]]:
        return self.embedder.engine.name, self.embedder.engine.notes

    def _maybe_fail(self) -> None:
        after, marker = os.environ.get(FAULT_EXIT_AFTER_UNITS), os.environ.get(FAULT_MARKER)
        if after and marker and self.units_done >= int(after) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # as abrupt as a segfault or the OOM killer


def start_ray(address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'ray>=2.9'") from None
    if ray.is_initialized():
        return
    try:
        # Local: a private cluster for this run. Address: join it (the store must be on shared storage).
        with warnings.catch_warnings():  # Ray forks and execs its processes: lancedb's fork warning is moot
            warnings.filterwarnings("ignore", message="lancedb fork support")
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as error:
        raise UsageError(f"cannot join the Ray cluster at {address}: {error}") from None


def embed_on_ray(job, tasks: list[ReadTask], progress: IngestProgress, stage_seconds: Counter):
    """Embed `tasks` on Ray; returns the run's EmbedOutcome."""
    import ray

    from embedstore.pipeline.ingest import EmbedOutcome

    options = job.options
    start_ray(options.ray_address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n_actors = options.ray_actors or max(1, gpus)
    actor_cpus = 0 if gpus else max(1, int(ray.cluster_resources().get("CPU", 1)) // n_actors)
    actor_class = ray.remote(num_gpus=1 if gpus else 0, num_cpus=actor_cpus,
                             max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(EmbedActor)
    fault_env = {k: os.environ[k] for k in (FAULT_EXIT_AFTER_UNITS, FAULT_MARKER) if k in os.environ}
    if fault_env:
        actor_class = actor_class.options(runtime_env={"env_vars": fault_env})
    actors = [actor_class.remote(options, job.model_id, str(job.store.patches_root), job.run_id, max(1, actor_cpus))
              for _ in range(n_actors)]
    # Beside GPUs, decode tasks on the CPUs feed the actors. Without GPUs the actors' threads hold
    # every core, and a decode process beside them would stall their thread team at each barrier:
    # CPU actors decode their units themselves, as the local executor decodes inline.
    decode = ray.remote(num_cpus=1, max_retries=ACTOR_RESTARTS)(decode_unit) if gpus else None
    config_ref = ray.put(job.config)

    committer = RowCommitter(job, options.commit_rows, stage_seconds)
    units = deque(plan_units(tasks, options.unit_slices))
    in_flight: dict = {}  # result ref → (unit, actor index)
    load = [0] * n_actors
    try:
        while units or in_flight:
            while units and min(load) < UNITS_IN_FLIGHT_PER_ACTOR:
                unit, actor = units.popleft(), load.index(min(load))
                work = decode.remote(unit, config_ref, job.loaded.image_size) if decode else unit
                in_flight[actors[actor].embed_unit.remote(unit.unit_id, work)] = (unit, actor)
                load[actor] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            unit, actor = in_flight.pop(ready[0])
            load[actor] -= 1
            committer.take(_result_or_failure(ray, ready[0], unit), progress)
        committer.flush()
        engine, notes = ray.get(actors[0].engine_in_use.remote())
    finally:
        for actor in actors:
            ray.kill(actor)
    return EmbedOutcome(committer.n_committed, committer.failures, engine, notes)


def _result_or_failure(ray, ref, unit: WorkUnit) -> UnitResult:
    """The unit's result; if its actor died more often than Ray restarts it, every file of the
    unit becomes a failure rather than ending the run."""
    try:
        return ray.get(ref)
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.RayTaskError) as error:
        message = f"embedding actor failed on this unit {ACTOR_RESTARTS + 1} times: {str(error)[:300]}"
        return UnitResult(unit.unit_id, None, [Failure(t.path, "embed", WORKER_CRASHED, message) for t in unit.tasks],
                          unit.n_items, {})


class RowCommitter:
    """Gathers unit rows on the driver and commits them in transactions of about `commit_rows`,
    so the number of table versions follows the rows, not the batches or units."""

    def __init__(self, job, commit_rows: int, stage_seconds: Counter):
        self.store, self.run_id = job.store, job.run_id
        self.commit_rows = commit_rows
        self.stage_seconds = stage_seconds
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.n_committed = 0
        self.failures: list[Failure] = []
        self._pending_failures: list[Failure] = []

    def take(self, result: UnitResult, progress: IngestProgress) -> None:
        for stage, seconds in result.seconds.items():
            self.stage_seconds[stage] += seconds
        self.failures.extend(result.failures)
        self._pending_failures.extend(result.failures)
        if result.n_failed_items:
            progress.failed(result.n_failed_items)
        if result.rows is not None:
            self.pending.append(result.rows)
            self.n_pending += result.rows.num_rows
            progress.advance(result.rows.num_rows)
        if self.n_pending >= self.commit_rows:
            self.flush()

    def flush(self) -> None:
        started = time.perf_counter()
        if self.pending:
            self.n_committed += self.store.add_slices(pa.concat_tables(self.pending))
            self.pending, self.n_pending = [], 0
        self.store.add_failures(self._pending_failures, self.run_id)
        self._pending_failures = []
        self.stage_seconds["commit"] += time.perf_counter() - started
