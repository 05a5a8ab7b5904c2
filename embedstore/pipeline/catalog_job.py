"""`embedstore catalog`: the catalog alone. Every header under the sources read into the store's
`files` table (only new and changed files on a rerun), nothing embedded: an archive becomes
queryable (`embedstore sql`) before a model has seen it, and the ingest that follows starts
embedding at once."""

from __future__ import annotations

from pathlib import Path

from embedstore.catalog.plan import failures_of
from embedstore.catalog.reading import HeaderSettings
from embedstore.catalog.rows import RowSettings
from embedstore.catalog.scan import CatalogOptions, CatalogScan, CatalogSummary
from embedstore.errors import UsageError
from embedstore.pipeline.progress import status
from embedstore.sources.discover import check_sources
from embedstore.sources.nifti import AXES
from embedstore.store import Store, check_store_path, check_store_writable, new_run_id
from embedstore.store.location import store_root
from embedstore.store.privacy import AS_READ, HASHED


def check_catalog_options(options: CatalogOptions) -> None:
    if options.axis not in AXES:
        raise UsageError(f"unknown axis {options.axis!r}: use one of {', '.join(AXES)}")
    if options.max_pixels < 1:
        raise UsageError("--max-pixels must be at least 1")
    if (options.header_workers is not None and options.header_workers < 0) or \
            (options.chunk_files is not None and options.chunk_files < 1):
        raise UsageError("--header-workers must be at least 0 and --header-batch at least 1")
    if options.executor not in ("local", "ray"):
        raise UsageError(f"unknown executor {options.executor!r}: use one of local, ray")


def open_for_writing(store_path: Path, keep_patient_id: bool) -> tuple[Store, bytes | None]:
    """The store, created if need be, and the key that hashes PatientIDs (None with --keep-patient-id)."""
    patient_ids = AS_READ if keep_patient_id else HASHED
    store = Store.open(store_path, create=True, patient_ids=patient_ids)
    store.check_patient_ids(patient_ids)
    return store, store.patient_key() if patient_ids == HASHED else None


def catalog_archive(sources: list[str | Path], store_path: str | Path, options: CatalogOptions,
                    keep_patient_id: bool = False, ray_address: str | None = None,
                    show_progress: bool = True, query: str | None = None) -> CatalogSummary:
    source_paths = check_sources(sources, query)
    store_path = store_root(store_path)
    check_store_path(store_path, create=True)
    check_store_writable(store_path)
    check_catalog_options(options)
    if options.executor == "ray":
        from embedstore.pipeline.on_ray import start_ray  # here: it loads the model code (torch), 3 s

        start_ray(ray_address)
    store, key = open_for_writing(store_path, keep_patient_id)
    run_id = new_run_id()
    store.start_run(run_id, [], {"catalog_only": True, "sources": [str(p) for p in source_paths],
                                 "axis": options.axis, "max_pixels": options.max_pixels})
    scan = CatalogScan(store, source_paths, options, HeaderSettings(options.axis, options.max_pixels,
                                                                    RowSettings(run_id, key)))
    with store.ingest_lock():
        listing = scan.list()
        comparison = scan.comparison
        status(f"catalog: {listing.files.num_rows:,} files, {comparison.to_read.num_rows:,} headers to read, "
               f"{comparison.n_unchanged:,} unchanged, {comparison.gone.num_rows:,} gone", show_progress)
        store.add_failures(listing.failures, run_id)
        scan.read(lambda rows: store.add_failures(failures_of(rows), run_id))
    summary = scan.summary()
    store.finish_run(run_id, 0, summary.files_unchanged, summary.files_failed + len(listing.failures), 0.0,
                     {"catalog": summary.read_seconds})
    return summary
