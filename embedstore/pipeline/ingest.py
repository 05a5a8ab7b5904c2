"""Ingest: catalog → plan (per model) → units → decode once → embed with every model → commit →
series rows → summary, on the local or the Ray distributor."""

from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from embedstore.catalog.plan import CatalogPlanner, planning_connection
from embedstore.catalog.reading import HeaderSettings
from embedstore.catalog.rows import RowSettings
from embedstore.catalog.scan import CatalogOptions, CatalogScan
from embedstore.errors import DUPLICATE_INSTANCE, SourceUnavailableError, UsageError
from embedstore.intensity import IntensityConfig
from embedstore.models.build import LoadedModel, load_model
from embedstore.models.embedder import Embedder, check_precision, pick_device
from embedstore.models.engines import candidate_engines
from embedstore.models.spec import ModelSpec
from embedstore.pipeline.catalog_job import check_catalog_options, open_for_writing
from embedstore.pipeline.decode import DecodePool
from embedstore.pipeline.local import embed_locally
from embedstore.pipeline.on_ray import RayActors, embed_on_ray, engine_of
from embedstore.pipeline.progress import IngestProgress, spinner, status
from embedstore.pipeline.runner import UNIT_SLICES, EmbedOutcome, RowCommitter, UnitRunner, unit_slices_for
from embedstore.pipeline.stream import SeriesFeed, UnitStream
from embedstore.preprocess import DecodeSettings, maps_on_device
from embedstore.sources.catalog import declared_modality
from embedstore.sources.discover import check_sources
from embedstore.sources.limits import DEFAULT_MAX_PIXELS
from embedstore.sources.records import Failure
from embedstore.store import Store, check_store_path, check_store_writable, new_run_id
from embedstore.store.info import record_summary
from embedstore.store.leases import LeaseBook, clear_leases
from embedstore.store.location import store_root
from embedstore.store.schema import slices_table_name
from embedstore.store.series import refresh_series
from embedstore.store.upgrade import add_item_columns

DEFAULT_COMMIT_ROWS = 4096
LEASE_POLL_SECONDS = 1.0  # how often a writer looks again at series another writer holds
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
    query: str | None = None  # QIDO filters for DICOMweb sources (KEYWORD=VALUE&...)
    max_pixels: int = DEFAULT_MAX_PIXELS  # the most values a frame may declare; larger files are too_large
    keep_patient_id: bool = False  # store PatientID as read instead of a keyed hash
    batch_size: int = 32
    workers: int | None = None  # decode processes; None: default_workers() for the device
    device: str = "auto"
    preprocess_on: str = "auto"  # auto | workers | device: where intensity mapping and resize run (maps_on_device)
    precision: str = "fp32"
    engine: str = "auto"  # auto | eager | compile | tensorrt (models/engines.py)
    overwrite: bool = False
    commit_rows: int = DEFAULT_COMMIT_ROWS
    executor: str = "local"  # "local": this process and its decode pool; "ray": Ray actors
    ray_address: str | None = None  # join this Ray cluster; None starts a local one
    ray_actors: int | None = None  # embedding actors; None: one per GPU, else one
    unit_slices: int = UNIT_SLICES  # Ray: slices per work unit (a series is never split)
    header_workers: int | None = None  # processes (or Ray tasks at once) reading headers; None: every core
    header_batch: int | None = None  # files per header task; None: 256 locally, 2048 on Ray
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
    catalog: dict  # the catalog's CatalogSummary: files listed, read, unchanged, changed, gone, files/s
    first_row_seconds: float | None  # from the start of the run to its first committed row

    def to_dict(self) -> dict:
        return asdict(self)


def check_options(options: IngestOptions) -> tuple[IntensityConfig, str | None, object, bool]:
    """The intensity mapping, declared modality and device an ingest asks for, and whether that device
    maps and resizes (`--preprocess-on`); UsageError for a wrong request, before anything is loaded or
    written."""
    if options.batch_size < 1 or (options.workers is not None and options.workers < 0):
        raise UsageError("--batch-size must be at least 1 and --workers at least 0")
    check_catalog_options(catalog_options(options))  # axis, --max-pixels, header reads, executor
    modality = declared_modality(options.modality)
    intensity = IntensityConfig(window=options.window, mr_percentiles=tuple(options.mr_percentiles))
    device = pick_device(options.device)
    on_device = maps_on_device(options.preprocess_on, device)  # an unknown placement is a wrong request too
    check_precision(options.precision)
    candidate_engines(options.engine, device)  # an unknown engine is a wrong request: nothing written yet
    return intensity, modality, device, on_device


def open_for_models(store_path: Path, options: IngestOptions, specs: list[ModelSpec]) -> tuple[Store, bytes | None]:
    """The store, created if need be, holding every model's spec; and the patient key that hashes
    PatientIDs (None with --keep-patient-id). A key or layers the store was not made with are refused."""
    store, key = open_for_writing(store_path, options.keep_patient_id)
    add_item_columns(store)  # a store written before the items said the kind and axis of their files
    if not options.overwrite:
        for spec in specs:  # every model checked before any is added
            store.check_layers(spec)
    for spec in specs:
        if options.overwrite:
            store.drop_model(spec.model_id)
        store.add_model(spec)
    return store, key


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
    source_paths = check_sources(sources, options.query)
    store_path = store_root(store_path)
    check_store_path(store_path, create=True)
    check_store_writable(store_path)
    intensity, modality, device, on_device = check_options(options)
    with spinner(f"loading {', '.join(options.models)} ({options.weights} weights)", options.show_progress):
        models = loaded or load_models(options, intensity)
    loading_seconds = time.perf_counter() - wall_started
    notes = [RANDOM_WEIGHTS_NOTE] if options.weights == "random" else []
    specs = [m.spec for m in models]
    workers = default_workers(device.type) if options.workers is None else options.workers

    store, key = open_for_models(store_path, options, specs)
    run_id = new_run_id()
    config = {**asdict(options), "workers": workers, "device": str(device), "sources": [str(p) for p in source_paths]}
    store.start_run(run_id, [s.model_id for s in specs], config)
    settings = DecodeSettings.for_specs(specs, options.max_pixels, on_device)
    job = EmbedJob(options, specs, run_id, str(store.patches_root), settings)
    # The catalog thread writes through a Store of its own: a Store's commit lock is held per object.
    scan = CatalogScan(Store.open(store_path), source_paths, catalog_options(options),
                       HeaderSettings(options.axis, options.max_pixels, RowSettings(run_id, key)))
    status_lines = [f"loaded {', '.join(options.models)} ({options.weights} weights) in {loading_seconds:.1f} s",
                    *(f"note: {note}" for note in notes)]
    started = time.perf_counter()
    with store.ingest_lock():
        run = embed_archive(job, store, scan, models, workers, modality, status_lines)
    clear_leases(store)
    summary = summarise(run, store, scan, workers, notes, started, wall_started)
    store.finish_run(run_id, sum(summary.committed_by_model.values()), summary.n_skipped, summary.n_failed,
                     summary.slices_per_s, run.stage_seconds)
    record_summary(store)
    return summary


@dataclass
class EmbeddedArchive:
    """What the embedding phase leaves for the summary."""

    planner: CatalogPlanner
    committer: RowCommitter
    outcome: EmbedOutcome
    stage_seconds: Counter
    discovered: list[Failure]  # what the walk found unusable


def embed_archive(job: "EmbedJob", store: Store, scan: CatalogScan, models: list[LoadedModel], workers: int,
                  modality: str | None, status_lines: list[str]) -> EmbeddedArchive:
    """Catalog and embed at once: series go to the embedders while headers are still read, then
    everything else the catalog says some model lacks, then what needs a second look."""
    options, run_id, model_ids = job.options, job.run_id, [s.model_id for s in job.specs]
    stage_seconds: Counter = Counter()
    leases = LeaseBook(store, run_id, model_ids)
    committer = RowCommitter(store, run_id, model_ids, options.commit_rows, stage_seconds, on_commit=leases.finish)
    with DecodePool(workers, job.settings) as pool, \
            (RayActors(job) if options.executor == "ray" else nullcontext()) as actors:
        listing = scan.list()
        # Every check has passed: from here on, lines on stderr cannot mix with a wrong request's one line.
        comparison = scan.comparison
        for line in [*status_lines, f"catalog: {listing.files.num_rows:,} files, {comparison.to_read.num_rows:,} "
                     f"headers to read, {comparison.n_unchanged:,} unchanged, {comparison.gone.num_rows:,} gone"]:
            status(line, options.show_progress)
        earlier_failed = set(store.rows("failures", columns=["path"]).column("path").to_pylist())
        store.add_failures(listing.failures, run_id)
        planner = CatalogPlanner(store, listing.files, model_ids, options.axis, modality)
        with IngestProgress(0, options.show_progress, listing.failures) as progress:
            embed = Distributor(job, store, models, pool, actors, progress, committer)
            feed = SeriesFeed(scan, planner, progress, earlier_failed).start()
            stream = UnitStream(leases, len(model_ids), unit_slices_for(job.specs, options.unit_slices), progress,
                                earlier_failed)
            try:
                embed(stream.units(feed.series()))
            except SourceUnavailableError as error:  # what is embedded is kept; a rerun does the rest
                committer.flush()
                raise SourceUnavailableError(f"{error}; this run committed {sum(committer.committed.values()):,} "
                                             "rows: run the same command again to finish") from None
            stage_seconds["catalog"] = scan.read_seconds
            embed_again(planner, feed, stream, embed, run_id)
            committer.record_failures(stream.failures, progress)
            committer.flush()
        outcome = committer.outcome(*embed.engine())
    tried = feed.retried | stream.retried | ({f.path for f in listing.failures + stream.failures} & earlier_failed)
    close_run(store, run_id, model_ids, sorted(tried), stage_seconds)
    return EmbeddedArchive(planner, committer, outcome, stage_seconds, listing.failures)


class Distributor:
    """`Distributor(...)(units)` runs units through the run's distributor; `.engine()` names what ran."""

    def __init__(self, job: "EmbedJob", store: Store, models: list[LoadedModel], pool: DecodePool, actors,
                 progress: IngestProgress, committer: RowCommitter):
        self.pool, self.actors, self.progress, self.committer, self.job = pool, actors, progress, committer, job
        self.runner = None
        if actors is None:
            options = job.options
            progress.phase("preparing")
            self.runner = UnitRunner(models, [Embedder(m, options.device, options.precision, options.engine,
                                                       options.batch_size) for m in models],
                                     store.patches_root, job.run_id, options.batch_size, job.settings)

    def __call__(self, units) -> None:
        self.progress.phase("embedding")
        if self.actors is not None:
            embed_on_ray(self.job, self.actors, units, self.progress, self.committer)
        else:
            embed_locally(self.runner, self.pool, units, self.progress, self.committer)

    def engine(self) -> tuple[str, list[str]]:
        if self.actors is not None:
            return engine_of(self.actors)
        return self.runner.embedders[0].engine.name, self.runner.embedders[0].engine.notes


def summarise(run: EmbeddedArchive, store: Store, scan: CatalogScan, workers: int, notes: list[str],
              started: float, wall_started: float) -> IngestSummary:
    """The run's summary; `started` (the catalog's start) and `wall_started` are perf_counter times."""
    model_ids, outcome = run.planner.model_ids, run.outcome
    seconds, first_commit = time.perf_counter() - started, run.committer.first_commit_at
    counts = run.planner.counts(run.committer.run_id)
    standing = standing_failures(store, run.planner.listing, run.discovered)
    n_duplicates = standing.pop(DUPLICATE_INSTANCE, 0)
    return IngestSummary(
        run_id=run.committer.run_id, model_ids=model_ids, store=str(store.path), workers=workers,
        n_found=counts.n_found, engine=outcome.engine, engine_notes=outcome.engine_notes,
        n_embedded=outcome.n_embedded, embedded_by_model={m: outcome.embedded.get(m, 0) for m in model_ids},
        committed_by_model={m: outcome.committed.get(m, 0) for m in model_ids},
        n_skipped=counts.n_skipped, n_failed_slices=outcome.n_failed_slices, n_failed=sum(standing.values()),
        failures_by_reason=dict(standing), n_duplicates=n_duplicates, n_warned_files=outcome.n_warned_files,
        seconds=seconds, wall_seconds=time.perf_counter() - wall_started,
        slices_per_s=outcome.n_embedded / seconds if seconds > 0 else 0.0,
        stage_seconds={k: round(v, 3) for k, v in run.stage_seconds.items()}, notes=notes,
        catalog=scan.summary().to_dict(),
        first_row_seconds=round(first_commit - wall_started, 3) if first_commit is not None else None,
    )


def catalog_options(options: IngestOptions) -> CatalogOptions:
    return CatalogOptions(options.axis, options.max_pixels, options.header_workers, options.executor,
                          options.header_batch)


def embed_again(planner: CatalogPlanner, feed: SeriesFeed, stream: UnitStream, embed, run_id: str) -> None:
    """What the first pass could not finish: series that went on in a later folder after they were
    embedded (their rows of this run dropped, the whole series planned again), and series another
    writer held (looked at again until it has finished them, or died and left them)."""
    if feed.reopened:
        planner.store.forget_run_series(run_id, sorted(feed.reopened),
                                        ["items", *(slices_table_name(m) for m in planner.model_ids)])
        embed(stream.units(planner.remaining(only=feed.reopened)))
    while stream.deferred:
        waiting = set(stream.deferred)
        stream.deferred.clear()  # what is still held comes back; what the other writer finished does not
        embed(stream.units(planner.remaining(only=waiting)))
        if stream.deferred:
            time.sleep(LEASE_POLL_SECONDS)


def standing_failures(store: Store, listing, discovered: list[Failure]) -> Counter:
    """Files failed, by reason: the failures rows of the listed files (this run's, and earlier
    runs' for files it did not try again) and what the walk found unusable."""
    con = planning_connection()
    con.register("failures", store.dataset("failures"))
    con.register("listing", listing.select(["path"]))
    rows = con.sql("SELECT reason, count(DISTINCT path) FROM failures SEMI JOIN listing USING (path) "
                   "GROUP BY reason").fetchall()
    counts = Counter({reason: int(n) for reason, n in rows})
    counts.update(failure.reason for failure in discovered)
    return counts


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
