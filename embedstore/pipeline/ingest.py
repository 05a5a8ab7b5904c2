"""Single-machine ingest: catalog → plan → decode (worker processes) → embed → write → summary."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from embedstore.errors import UsageError
from embedstore.pipeline.batching import SliceBatcher
from embedstore.pipeline.decode import DecodePool
from embedstore.pipeline.on_ray import UNIT_SLICES, embed_on_ray
from embedstore.pipeline.plan import plan_remaining
from embedstore.pipeline.progress import IngestProgress
from embedstore.pipeline.writer import DEFAULT_COMMIT_ROWS, EmbeddedBatch, SliceWriter
from embedstore.models import LoadedModel, load_model
from embedstore.models.embedder import Embedder, pick_device
from embedstore.models.engines import candidate_engines
from embedstore.preprocess import IntensityConfig
from embedstore.sources import Failure, ReadTask, SliceItem, build_catalog, check_sources, discover
from embedstore.sources.nifti import AXES
from embedstore.store import Store, check_store_path
from embedstore.store.privacy import AS_READ, HASHED, patient_id_key, pseudonymise


EXECUTORS = ("local", "ray")


def default_workers(device_type: str) -> int:
    """Decode processes to run beside the model.

    On CUDA the GPU embeds and the CPU cores decode: up to 8 workers, one core left for the driver.
    On the CPU the model's threads already use every core, and a decode process would preempt one
    of them and stall the whole team at each barrier; decoding inline costs only its own time, so
    small machines decode inline and large ones give decoding an eighth of their cores.
    """
    cores = os.cpu_count() or 2
    return max(1, min(8, cores - 1)) if device_type == "cuda" else cores // 8


@dataclass
class IngestOptions:
    model: str = "dinov2_vits14"
    weights: str = "hub"  # "hub" | "random" | checkpoint path
    image_size: int = 224
    seed: int = 0  # for --weights random
    keep_patches: bool = True
    window: str = "auto"  # auto | header | a CT window preset | multi | multi:W1,W2,W3
    mr_percentiles: tuple[float, float] = (5.0, 95.0)
    axis: str = "axial"  # NIfTI slicing axis
    keep_patient_id: bool = False  # store PatientID as read instead of a keyed hash
    batch_size: int = 32
    workers: int | None = None  # decode processes; None: default_workers() for the device
    device: str = "auto"
    precision: str = "fp32"
    engine: str = "auto"  # auto | eager | compile | tensorrt (models/engines.py)
    overwrite: bool = False
    commit_rows: int = DEFAULT_COMMIT_ROWS
    executor: str = "local"  # "local": this process and its decode pool; "ray": Ray actors
    ray_address: str | None = None  # join this Ray cluster; None starts a local one
    ray_actors: int | None = None  # embedding actors; None: one per GPU, else one
    unit_slices: int = UNIT_SLICES  # Ray: slices per work unit (a series is never split)
    show_progress: bool = True


@dataclass
class IngestSummary:
    run_id: str
    model_id: str
    store: str
    workers: int
    engine: str  # the engine that ran the model
    engine_notes: list[str]  # why a requested engine gave way to another
    n_found: int
    n_embedded: int
    n_skipped: int
    n_failed: int
    failures_by_reason: dict[str, int]
    seconds: float
    slices_per_s: float
    stage_seconds: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def ingest(sources: list[str | Path], store_path: str | Path, options: IngestOptions,
           loaded: LoadedModel | None = None) -> IngestSummary:
    """Embed every slice under `sources` that the store does not hold yet for this model.

    All argument checks (sources, store path, model, image size, weights) happen before the
    store is created or touched, so a wrong request writes nothing.
    """
    source_paths = check_sources(sources)
    store_path = Path(store_path)
    check_store_path(store_path, create=True)
    if options.batch_size < 1 or (options.workers is not None and options.workers < 0):
        raise UsageError("--batch-size must be at least 1 and --workers at least 0")
    if options.axis not in AXES:
        raise UsageError(f"unknown axis {options.axis!r}: use one of {', '.join(AXES)}")
    config = IntensityConfig(window=options.window, mr_percentiles=tuple(options.mr_percentiles))
    if options.executor not in EXECUTORS:
        raise UsageError(f"unknown executor {options.executor!r}: use one of {', '.join(EXECUTORS)}")
    device = pick_device(options.device)
    candidate_engines(options.engine, device)  # an unknown engine is a wrong request: nothing written yet
    loaded = loaded or load_model(options.model, options.weights, options.image_size, options.seed)
    model_id = loaded.model_id(config.tag())
    workers = default_workers(device.type) if options.workers is None else options.workers

    patient_ids = AS_READ if options.keep_patient_id else HASHED
    store = Store.open(store_path, create=True, patient_ids=patient_ids)
    store.check_patient_ids(patient_ids)
    store.ensure_vector_tables(loaded.embed_dim)
    if options.overwrite:
        store.delete_model(model_id)
    run_id = new_run_id()
    store.start_run(run_id, model_id, {**asdict(options), "workers": workers, "device": str(device),
                                       "sources": [str(p) for p in source_paths]})
    started = time.perf_counter()
    stage_seconds: Counter = Counter()

    with store.ingest_lock(), DecodePool(workers, config, loaded.image_size) as pool:
        found, discover_failures = discover(source_paths)
        catalog = build_catalog(found, pool.map, axis=options.axis)
        if patient_ids == HASHED:
            pseudonymise_patients(catalog.tasks, patient_id_key(store.path))
        plan = plan_remaining(catalog.tasks, model_id, store.committed_keys(model_id))
        stage_seconds["catalog"] = time.perf_counter() - started
        failures: list[Failure] = discover_failures + catalog.failures
        store.add_failures(failures, run_id)
        job = EmbedJob(store, model_id, run_id, config, options, loaded)
        with IngestProgress(plan.n_todo, enabled=options.show_progress) as progress:
            if options.executor == "ray":
                outcome = embed_on_ray(job, plan.tasks, progress, stage_seconds)
            else:
                embedder = Embedder(loaded, options.device, options.precision, options.engine, options.batch_size)
                outcome = embed_locally(job, embedder, pool, plan.tasks, progress, stage_seconds)
        failures.extend(outcome.failures)
        embedded = outcome.n_committed

    tried_paths = sorted({task.path for task in plan.tasks} | {f.path for f in failures})
    store.forget_failures(tried_paths, run_id)
    series_started = time.perf_counter()
    store.refresh_series(model_id, store.stale_series(model_id))
    stage_seconds["series"] = time.perf_counter() - series_started
    seconds = time.perf_counter() - started
    summary = IngestSummary(
        run_id=run_id, model_id=model_id, store=str(store_path), workers=workers, n_found=catalog.n_items,
        engine=outcome.engine, engine_notes=outcome.engine_notes,
        n_embedded=embedded, n_skipped=plan.n_skipped, n_failed=len(failures),
        failures_by_reason=dict(Counter(f.reason for f in failures)), seconds=seconds,
        slices_per_s=embedded / seconds if seconds > 0 else 0.0,
        stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()},
    )
    store.finish_run(run_id, embedded, plan.n_skipped, len(failures), summary.slices_per_s, stage_seconds)
    return summary


@dataclass
class EmbedOutcome:
    n_committed: int
    failures: list[Failure]
    engine: str
    engine_notes: list[str]


@dataclass
class EmbedJob:
    """What every executor needs to embed a plan's tasks into the store."""

    store: Store
    model_id: str
    run_id: str
    config: IntensityConfig
    options: IngestOptions
    loaded: LoadedModel


def embed_locally(job: EmbedJob, embedder: Embedder, pool: DecodePool, tasks: list[ReadTask],
                  progress: IngestProgress, stage_seconds: Counter) -> EmbedOutcome:
    """Decode in `pool`, embed in this process, write on a background thread."""
    options = job.options
    writer = SliceWriter(job.store, job.model_id, job.run_id, job.loaded.embed_dim, job.loaded.num_patches,
                         options.keep_patches, options.commit_rows)
    failures: list[Failure] = []
    batcher = SliceBatcher(options.batch_size)
    for task, result in pool.decode(tasks):
        file_failures = result if isinstance(result, list) else result.failures
        failures.extend(file_failures)
        writer.submit_failures(file_failures)
        if isinstance(result, list):
            progress.failed(len(task.items))
            continue
        batcher.add(result)
        while batcher.full():
            _embed_and_submit(embedder, batcher.take(), writer, options.keep_patches, stage_seconds)
            progress.advance(options.batch_size)
    if batcher.pending():
        n = batcher.pending()
        _embed_and_submit(embedder, batcher.take(), writer, options.keep_patches, stage_seconds)
        progress.advance(n)
    writer.close()
    stage_seconds.update(pool.stage_seconds)
    stage_seconds.update(writer.seconds)
    return EmbedOutcome(writer.n_committed, failures, embedder.engine.name, embedder.engine.notes)


def pseudonymise_patients(tasks: list[ReadTask], key: bytes) -> None:
    """Replace each PatientID read from the files by its keyed hash, before anything is written."""
    hashed: dict[str, str | None] = {}
    for task in tasks:
        for item in task.items:
            if item.patient_id is not None:
                if item.patient_id not in hashed:
                    hashed[item.patient_id] = pseudonymise(item.patient_id, key)
                item.patient_id = hashed[item.patient_id]


def _embed_and_submit(embedder: Embedder, batch: tuple[list[SliceItem], np.ndarray], writer: SliceWriter,
                      keep_patches: bool, stage_seconds: Counter) -> None:
    items, pixels = batch
    started = time.perf_counter()
    embeddings = embedder.embed(pixels, keep_patches=keep_patches)
    stage_seconds["embed"] += time.perf_counter() - started
    writer.submit(EmbeddedBatch(items, embeddings))
