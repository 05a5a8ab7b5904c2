"""Ingest: catalog → plan (per model) → units → decode once → embed with every model → commit →
series rows → summary, on the local or the Ray distributor."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from embedstore.errors import DUPLICATE_INSTANCE, UsageError
from embedstore.intensity import IntensityConfig
from embedstore.models.build import LoadedModel, load_model
from embedstore.models.embedder import Embedder, check_precision, pick_device
from embedstore.models.engines import candidate_engines
from embedstore.models.spec import ModelSpec
from embedstore.pipeline.decode import DecodePool
from embedstore.pipeline.local import embed_locally
from embedstore.pipeline.on_ray import RayActors, embed_on_ray
from embedstore.pipeline.plan import Plan, plan_remaining
from embedstore.pipeline.progress import IngestProgress, count_files, spinner, status
from embedstore.pipeline.runner import UNIT_SLICES, UnitRunner, plan_units, unit_slices_for
from embedstore.preprocess import DecodeSettings
from embedstore.sources.catalog import build_catalog, declared_modality
from embedstore.sources.discover import check_sources, discover
from embedstore.sources.limits import DEFAULT_MAX_PIXELS
from embedstore.sources.nifti import AXES
from embedstore.sources.records import Failure, ReadTask
from embedstore.store import Store, check_store_path, check_store_writable
from embedstore.store.info import record_summary
from embedstore.store.privacy import AS_READ, HASHED, pseudonymise
from embedstore.store.series import refresh_series
from embedstore.store.upgrade import add_item_columns

DEFAULT_COMMIT_ROWS = 4096
EXECUTORS = ("local", "ray")
RANDOM_WEIGHTS_NOTE = ("--weights random: the CLS vector of a random ViT is almost the same for every image; "
                       "search, index and evaluate patch_mean instead")


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
    models: tuple[str, ...] = ("dinov2_vits14",)  # every model embeds each decoded slice
    weights: str = "hub"  # "hub" | "random" | checkpoint path (one model only)
    image_size: int = 224
    seed: int = 0  # for --weights random
    layers: int | None = None  # last blocks whose CLS is kept; None: 4 on ViTs
    patch_layers: tuple[int, ...] | None = None  # blocks whose patch tokens are kept; None: the last
    keep_patches: bool = True
    mean: tuple[float, float, float] | None = None  # override the models' pretrained_cfg statistics
    std: tuple[float, float, float] | None = None
    window: str = "auto"  # auto | header | a CT window preset | multi | multi:W1,W2,W3
    mr_percentiles: tuple[float, float] = (5.0, 95.0)
    axis: str = "axial"  # NIfTI slicing axis
    modality: str | None = None  # declared for NIfTI and raster sources (DICOM files state their own)
    max_pixels: int = DEFAULT_MAX_PIXELS  # the most values a frame may declare; larger files are too_large
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
    model_ids: list[str]
    store: str
    workers: int
    engine: str  # the engine that ran the model
    engine_notes: list[str]  # why a requested engine gave way to another
    n_found: int
    n_embedded: int  # slices embedded by at least one model
    embedded_by_model: dict[str, int]  # slices each model embedded in this run
    # Rows this run committed per model: fewer than embedded when a concurrent ingest of the same
    # slices committed them first (their rows are never stored twice).
    committed_by_model: dict[str, int]
    n_skipped: int  # slices every model already had
    n_failed_slices: int  # slices of files that failed: found = embedded + skipped + failed slices
    # Files that failed, duplicates apart: this run's, and those of earlier runs for files this run
    # did not read again (their instance is stored), so a rerun reports the same counts.
    n_failed: int
    failures_by_reason: dict[str, int]  # files failed, by reason
    n_duplicates: int  # files holding another copy of an instance embedded from one file
    n_warned_files: int  # files embedded whose readers or codecs printed warnings (kept off the terminal)
    seconds: float  # from the catalog to the end
    wall_seconds: float  # the whole ingest, model loading included
    slices_per_s: float
    stage_seconds: dict[str, float]
    notes: list[str]  # what to know about the run's vectors (e.g. random weights)

    def to_dict(self) -> dict:
        return asdict(self)


def check_options(options: IngestOptions) -> tuple[IntensityConfig, str | None, object]:
    """The intensity mapping, declared modality and device an ingest asks for; UsageError for a wrong
    request, before anything is loaded or written."""
    if options.batch_size < 1 or (options.workers is not None and options.workers < 0):
        raise UsageError("--batch-size must be at least 1 and --workers at least 0")
    if options.axis not in AXES:
        raise UsageError(f"unknown axis {options.axis!r}: use one of {', '.join(AXES)}")
    modality = declared_modality(options.modality)
    if options.max_pixels < 1:
        raise UsageError("--max-pixels must be at least 1")
    intensity = IntensityConfig(window=options.window, mr_percentiles=tuple(options.mr_percentiles))
    if options.executor not in EXECUTORS:
        raise UsageError(f"unknown executor {options.executor!r}: use one of {', '.join(EXECUTORS)}")
    device = pick_device(options.device)
    check_precision(options.precision)
    candidate_engines(options.engine, device)  # an unknown engine is a wrong request: nothing written yet
    return intensity, modality, device


def open_for_models(store_path: Path, options: IngestOptions, specs: list[ModelSpec]) -> tuple[Store, bytes | None]:
    """The store, created if need be, holding every model's spec; and the patient key that hashes
    PatientIDs (None with --keep-patient-id). A key or layers the store was not made with are refused."""
    patient_ids = AS_READ if options.keep_patient_id else HASHED
    store = Store.open(store_path, create=True, patient_ids=patient_ids)
    store.check_patient_ids(patient_ids)
    key = store.patient_key() if patient_ids == HASHED else None
    add_item_columns(store)  # a store written before the items said the kind and axis of their files
    if not options.overwrite:
        for spec in specs:  # every model checked before any is added
            store.check_layers(spec)
    for spec in specs:
        if options.overwrite:
            store.drop_model(spec.model_id)
        store.add_model(spec)
    return store, key


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def load_models(options: IngestOptions, intensity: IntensityConfig) -> list[LoadedModel]:
    """Every requested model, built and described; UsageError before anything is written."""
    if not options.models:
        raise UsageError("name at least one --model")
    if len(options.models) > 1 and options.weights not in ("hub", "random"):
        raise UsageError("--weights PATH is one checkpoint: ingest one --model with it at a time")
    patch_layers = () if not options.keep_patches else options.patch_layers
    loaded = [load_model(name, options.weights, options.image_size, options.seed, intensity=intensity,
                         layers=options.layers, patch_layers=patch_layers, mean=options.mean, std=options.std)
              for name in options.models]
    ids = [m.model_id for m in loaded]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise UsageError(f"the same model is named twice (model id {repeated[0]}): name each model once")
    return loaded


def ingest(sources: list[str | Path], store_path: str | Path, options: IngestOptions,
           loaded: list[LoadedModel] | None = None) -> IngestSummary:
    """Embed every slice under `sources` that the store does not hold yet, with every requested
    model; each slice is decoded once for all of them.

    All argument checks (sources, store path, models, image size, layers, weights) happen before
    the store is created or touched, so a wrong request writes nothing.
    """
    wall_started = time.perf_counter()
    source_paths = check_sources(sources)
    store_path = Path(store_path)
    check_store_path(store_path, create=True)
    check_store_writable(store_path)
    intensity, modality, device = check_options(options)
    with spinner(f"loading {', '.join(options.models)} ({options.weights} weights)", options.show_progress):
        models = loaded or load_models(options, intensity)
    loading_seconds = time.perf_counter() - wall_started
    notes = [RANDOM_WEIGHTS_NOTE] if options.weights == "random" else []
    specs = [m.spec for m in models]
    workers = default_workers(device.type) if options.workers is None else options.workers
    settings = DecodeSettings.for_specs(specs, options.max_pixels)

    store, key = open_for_models(store_path, options, specs)
    run_id = new_run_id()
    model_ids = [s.model_id for s in specs]
    store.start_run(run_id, model_ids, {**asdict(options), "workers": workers, "device": str(device),
                                        "sources": [str(p) for p in source_paths]})
    started = time.perf_counter()
    stage_seconds: Counter = Counter()

    job = EmbedJob(options, specs, run_id, str(store.patches_root), settings)
    with store.ingest_lock(), DecodePool(workers, settings) as pool, \
            (RayActors(job) if options.executor == "ray" else nullcontext()) as actors:
        found, discover_failures = discover(source_paths)
        # Every check has passed: from here on, lines on stderr cannot mix with a wrong request's one line.
        status(f"loaded {', '.join(options.models)} ({options.weights} weights) in {loading_seconds:.1f} s",
               options.show_progress)
        for line in [*(f"note: {note}" for note in notes), f"reading catalog: {len(found):,} files"]:
            status(line, options.show_progress)
        catalog = build_catalog(found, pool.map, options.axis, options.max_pixels, modality)
        if key is not None:
            pseudonymise_patients(catalog.tasks, key)
        plan = plan_remaining(catalog.tasks, [store.committed_keys(m) for m in model_ids])
        units = plan_units(plan.tasks, plan.missing, unit_slices_for(specs, options.unit_slices))
        stage_seconds["catalog"] = time.perf_counter() - started
        failures: list[Failure] = discover_failures + catalog.failures
        store.add_failures(failures, run_id)
        earlier = earlier_failures(store, catalog.tasks, plan)
        status(f"{plan.n_todo:,} slices to embed, {plan.n_skipped:,} already in store", options.show_progress)
        with IngestProgress(plan.n_todo, options.show_progress, failures + earlier) as progress:
            if actors is not None:
                outcome = embed_on_ray(job, store, actors, units, progress, stage_seconds)
            else:
                progress.phase("preparing")
                runner = UnitRunner(models, [Embedder(m, options.device, options.precision, options.engine,
                                                      options.batch_size) for m in models],
                                    store.patches_root, run_id, options.batch_size)
                progress.phase("embedding")
                outcome = embed_locally(job, store, runner, pool, units, progress, stage_seconds)
        failures.extend(outcome.failures)

    close_run(store, run_id, model_ids, sorted({task.path for task in plan.tasks} | {f.path for f in failures}),
              stage_seconds)
    seconds, standing = time.perf_counter() - started, failures + earlier
    n_failed, n_duplicates = count_files(standing)
    summary = IngestSummary(
        run_id=run_id, model_ids=model_ids, store=str(store_path), workers=workers, n_found=catalog.n_items,
        engine=outcome.engine, engine_notes=outcome.engine_notes,
        n_embedded=outcome.n_embedded, embedded_by_model={m: outcome.embedded.get(m, 0) for m in model_ids},
        committed_by_model={m: outcome.committed.get(m, 0) for m in model_ids},
        n_skipped=plan.n_skipped, n_failed_slices=outcome.n_failed_slices, n_failed=n_failed,
        failures_by_reason=dict(Counter(f.reason for f in standing if f.reason != DUPLICATE_INSTANCE)),
        n_duplicates=n_duplicates, n_warned_files=outcome.n_warned_files, seconds=seconds,
        wall_seconds=time.perf_counter() - wall_started, slices_per_s=outcome.n_embedded / seconds if seconds > 0 else 0.0,
        stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()}, notes=notes,
    )
    store.finish_run(run_id, sum(outcome.committed.values()), plan.n_skipped, n_failed, summary.slices_per_s,
                     stage_seconds)
    record_summary(store)
    return summary


def close_run(store: Store, run_id: str, model_ids: list[str], tried_paths: list[str], stage_seconds: Counter) -> None:
    """What the run's rows change around them: the failures of files it read again forgotten (it
    recorded their outcome anew), and the series rows of its models refreshed."""
    store.forget_failures(tried_paths, run_id)
    series_started = time.perf_counter()
    with store.commit_lock():  # a concurrent ingest's refresh would upsert the same series rows
        refresh_series(store, model_ids)
    stage_seconds["series"] = time.perf_counter() - series_started


@dataclass
class EmbedJob:
    """What every distributor and actor needs to embed units (picklable: no open store)."""

    options: IngestOptions
    specs: list[ModelSpec]
    run_id: str
    patches_root: str
    settings: DecodeSettings


def earlier_failures(store: Store, tasks: list[ReadTask], plan: Plan) -> list[Failure]:
    """The stored failures of files this run does not read again: every slice of their instance is
    stored (from them, or from another copy). They still count in the run's summary, so that a rerun
    reports what the first run did."""
    remaining = {task.path for task in plan.tasks}
    unread = {path for task in tasks if task.path not in remaining for path in (task.path, *task.alternates)}
    if not unread:
        return []
    rows = store.rows("failures", columns=["path", "stage", "reason", "message"]).to_pylist()
    return [Failure(**row) for row in rows if row["path"] in unread]


def pseudonymise_patients(tasks: list[ReadTask], key: bytes) -> None:
    """Replace each PatientID read from the files by its keyed hash, before anything is written."""
    hashed: dict[str, str | None] = {}
    for task in tasks:
        for item in task.items:
            if item.patient_id is not None:
                if item.patient_id not in hashed:
                    hashed[item.patient_id] = pseudonymise(item.patient_id, key)
                item.patient_id = hashed[item.patient_id]
