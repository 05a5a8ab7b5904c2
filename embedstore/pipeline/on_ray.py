"""The Ray distributor: CPU decode tasks feed one embedding actor per GPU (CPU embedding actors,
where there is no GPU, decode their own units); the driver commits.

The driver cuts the plan into work units (a series never straddles two), sends each unit to a
decode task and its result to an embedding actor, and keeps a bounded number of units in flight so
memory stays flat however large the archive. Every actor holds all the ingest's models on its
device and runs the same `UnitRunner` as the local distributor: it writes the unit's patch tokens to
shards of its own and returns the rows; the driver commits them with the same `RowCommitter`, in
large transactions that never add a key already present. A retried unit therefore cannot duplicate
rows, and a shard whose rows were never committed (a killed actor or driver) is an orphan that
`embedstore vacuum` removes.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterable

from embedstore.errors import WORKER_CRASHED, UsageError
from embedstore.pipeline.decode import decode_or_fail
from embedstore.pipeline.progress import IngestProgress
from embedstore.pipeline.runner import RowCommitter, UnitOutput, UnitRunner, WorkUnit
from embedstore.sources.records import Failure

UNITS_IN_FLIGHT_PER_ACTOR = 2  # one embedding, one waiting: the actor never idles, memory stays bounded
ACTOR_RESTARTS = 3
# Fault injection for the tests: the first actor to reach this many units exits abruptly, once
# (the marker file says it has happened).
FAULT_EXIT_AFTER_UNITS = "EMBEDSTORE_FAULT_ACTOR_EXIT_AFTER_UNITS"
FAULT_MARKER = "EMBEDSTORE_FAULT_MARKER"


def decode_unit(unit: WorkUnit, settings) -> list:
    """Every task of a unit decoded (or failed), in order."""
    return [(task, decode_or_fail(task, settings)) for task in unit.tasks]


class EmbedActor:
    """Holds every model of the ingest on its device; runs decoded units through the UnitRunner."""

    def __init__(self, job, threads: int):
        import torch

        from embedstore.models.build import rebuild_model
        from embedstore.models.embedder import Embedder

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)  # Ray sets one thread per worker; a CPU actor owns its cores
        options = job.options
        # Rebuilt from the specs the driver planned with: a digest that changed under us is an error.
        models = [rebuild_model(spec) for spec in job.specs]
        embedders = [Embedder(loaded, options.device, options.precision, options.engine, options.batch_size)
                     for loaded in models]
        self.runner = UnitRunner(models, embedders, job.patches_root, job.run_id, options.batch_size, job.settings)
        self.settings = job.settings
        self.units_done = 0

    def embed_unit(self, unit: WorkUnit, decoded: list | None) -> UnitOutput:
        """Embed a unit: already decoded by a decode task, or (on CPU actors) decoded here."""
        self._maybe_fail()
        output = self.runner.run(unit, decoded if decoded is not None else decode_unit(unit, self.settings))
        self.units_done += 1
        return output

    def engine_in_use(self) -> tuple[str, list[str]]:
        engine = self.runner.embedders[0].engine
        return engine.name, engine.notes

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


class RayActors:
    """The embedding actors of one run, started when made so that their imports and model loading
    overlap the catalog and planning; killed on exit."""

    def __init__(self, job):
        import ray

        start_ray(job.options.ray_address)
        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        n_actors = job.options.ray_actors or max(1, self.gpus)
        cpus = 0 if self.gpus else max(1, int(ray.cluster_resources().get("CPU", 1)) // n_actors)
        actor_class = ray.remote(num_gpus=1 if self.gpus else 0, num_cpus=cpus,
                                 max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(EmbedActor)
        fault_env = {k: os.environ[k] for k in (FAULT_EXIT_AFTER_UNITS, FAULT_MARKER) if k in os.environ}
        if fault_env:
            actor_class = actor_class.options(runtime_env={"env_vars": fault_env})
        self.handles = [actor_class.remote(job, max(1, cpus)) for _ in range(n_actors)]

    def __enter__(self) -> "RayActors":
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.handles:
            ray.kill(actor)


def embed_on_ray(job, actors: RayActors, units: Iterable[WorkUnit], progress: IngestProgress,
                 committer: RowCommitter) -> None:
    """Embed units as they come (the catalog may still be producing them) on the run's Ray actors."""
    import ray

    # Beside GPUs, decode tasks on the CPUs feed the actors. Without GPUs the actors' threads hold
    # every core, and a decode process beside them would stall their thread team at each barrier:
    # CPU actors decode their units themselves, as the local executor decodes inline.
    decode = ray.remote(num_cpus=1, max_retries=ACTOR_RESTARTS)(decode_unit) if actors.gpus else None
    settings_ref = ray.put(job.settings)
    pending = iter(units)
    in_flight: dict = {}  # result ref → (unit, actor index)
    load = [0] * len(actors.handles)
    more = True
    while more or in_flight:
        while more and min(load) < UNITS_IN_FLIGHT_PER_ACTOR:
            unit = next(pending, None)
            if unit is None:
                more = False
                break
            actor = load.index(min(load))
            decoded = decode.remote(unit, settings_ref) if decode else None
            in_flight[actors.handles[actor].embed_unit.remote(unit, decoded)] = (unit, actor)
            load[actor] += 1
        if not in_flight:
            continue
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        unit, actor = in_flight.pop(ready[0])
        load[actor] -= 1
        output = _result_or_failure(ray, ready[0], unit)
        committer.take(output, progress)
        progress.advance(output.n_items)  # a unit at a time: its batches ran in an actor
    committer.flush()


def engine_of(actors: RayActors) -> tuple[str, list[str]]:
    import ray

    return ray.get(actors.handles[0].engine_in_use.remote())


def _result_or_failure(ray, ref, unit: WorkUnit) -> UnitOutput:
    """The unit's rows; if its actor died more often than Ray restarts it, every file of the
    unit becomes a failure rather than ending the run."""
    try:
        return ray.get(ref)
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.RayTaskError) as error:
        message = f"embedding actor failed on this unit {ACTOR_RESTARTS + 1} times: {str(error)[:300]}"
        failures = [Failure(t.path, "embed", WORKER_CRASHED, message) for t in unit.tasks]
        return UnitOutput(unit.unit_id, None, {}, failures, unit.n_items, 0, {}, parts=unit.parts)
