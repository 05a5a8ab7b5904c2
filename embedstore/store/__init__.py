"""The store: a directory holding a LanceDB database (`slices`, `series`, `failures`, `runs`),
Zarr v3 patch shards under `patches/<model_id>/`, and a manifest with the format version.

Whether an item is done is decided from committed `slices` rows only. A commit never adds a key
that is already present, so retries and reruns cannot create duplicates.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")  # keep Lance's informational warnings off the terminal

import lancedb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from embedstore import __version__  # noqa: E402
from embedstore.errors import StoreFormatError, UsageError  # noqa: E402
from embedstore.sources.records import Failure  # noqa: E402
from embedstore.sources.series import spacing_stats  # noqa: E402
from embedstore.store.privacy import AS_READ, HASHED  # noqa: E402
from embedstore.store.patches import directory_bytes, remove_model_patches  # noqa: E402
from embedstore.store.schema import (  # noqa: E402
    FAILURES_SCHEMA, RUNS_SCHEMA, STORE_FORMAT_VERSION, series_schema, slices_schema,
)

MANIFEST = "embedstore.json"
LOCK_FILE = ".lock"
TABLES_DIR = "tables"
PATCHES_DIR = "patches"
SERIES_REFRESH_GROUP = 512  # series whose slice vectors are read back per query
# Columns a series row copies from its first slice.
SERIES_IDENTITY = ("patient_id", "study_uid", "series_uid", "modality", "body_part", "series_description",
                   "study_date", "pixel_spacing")
SPACING_COLUMNS = ("slice_spacing", "spacing_deviation", "spacing_deviation_rel", "n_missing_slices",
                   "uneven_spacing")


def sql_literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


class Store:
    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.db = lancedb.connect(str(path / TABLES_DIR))
        self.patches_root = path / PATCHES_DIR

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, create: bool = False, patient_ids: str = HASHED) -> "Store":
        """Open a store; with `create`, make a new one where nothing (or an empty directory) is.

        `patient_ids` (HASHED or AS_READ) is fixed when the store is made: one store never mixes the two.
        """
        path = Path(path)
        check_store_path(path, create)
        manifest_path = path / MANIFEST
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            version = manifest.get("format_version")
            if manifest.get("format") != "embedstore" or version != STORE_FORMAT_VERSION:
                raise StoreFormatError(
                    f"store {path} has format version {version!r}; this embedstore reads version "
                    f"{STORE_FORMAT_VERSION} only"
                )
            return cls(path, manifest)
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": "embedstore", "format_version": STORE_FORMAT_VERSION,
                    "created_by": f"embedstore {__version__}", "created_at": now_utc().isoformat(),
                    "patient_ids": patient_ids}
        store = cls(path, manifest)
        store.db.create_table("failures", schema=FAILURES_SCHEMA, exist_ok=True)
        store.db.create_table("runs", schema=RUNS_SCHEMA, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks the store complete
        return store

    @property
    def patient_ids(self) -> str:
        return self.manifest.get("patient_ids", HASHED)

    def check_patient_ids(self, wanted: str) -> None:
        if wanted != self.patient_ids:
            flag = "with" if self.patient_ids == AS_READ else "without"
            raise UsageError(f"store {self.path} keeps patient IDs {self.patient_ids}; run {flag} "
                             "--keep-patient-id, or use another store")

    @contextmanager
    def ingest_lock(self, exclusive: bool = False):
        """Held while an ingest writes (shared: ingests of several models may run at once) and by
        vacuum (exclusive: it must not take a running ingest's fresh shards for orphans). The
        kernel drops the lock of a process that dies, even by SIGKILL."""
        with open(self.path / LOCK_FILE, "a") as handle:
            try:
                fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"store {self.path} is busy: "
                                 + ("an ingest is writing to it" if exclusive else "vacuum is running")) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def table(self, name: str):
        return self.db.open_table(name)

    def has_table(self, name: str) -> bool:
        return name in self.db.list_tables().tables

    @property
    def vector_dim(self) -> int | None:
        if not self.has_table("slices"):
            return None
        return self.table("slices").schema.field("cls").type.list_size

    def ensure_vector_tables(self, dim: int) -> None:
        """Create `slices` and `series` for `dim`-wide vectors, or check the width they have."""
        existing = self.vector_dim
        if existing is None:
            self.db.create_table("slices", schema=slices_schema(dim), exist_ok=True)
            self.db.create_table("series", schema=series_schema(dim), exist_ok=True)
        elif existing != dim:
            raise UsageError(
                f"store {self.path} holds {existing}-d vectors; a {dim}-d model needs a store of its own"
            )

    # ---------------------------------------------------------------- reading
    def rows(self, table: str, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
        if not self.has_table(table):
            return pa.table({})
        query = self.table(table).search()
        if where:
            query = query.where(where)
        if columns:
            query = query.select(columns)
        return query.limit(None).to_arrow()

    def committed_keys(self, model_id: str) -> set[str]:
        rows = self.rows("slices", f"model_id = {sql_literal(model_id)}", ["key"])
        return set(rows.column("key").to_pylist()) if rows.num_rows else set()

    # ---------------------------------------------------------------- writing
    def add_slices(self, rows: pa.Table) -> int:
        """Commit slice rows in one transaction, skipping keys already present; returns rows added."""
        result = (
            self.table("slices").merge_insert("key").when_not_matched_insert_all().execute(rows)
        )
        return int(result.num_inserted_rows)

    def add_failures(self, failures: list[Failure], run_id: str) -> None:
        if not failures:
            return
        now = now_utc()
        self.table("failures").add(pa.Table.from_pylist(
            [{"path": f.path, "stage": f.stage, "reason": f.reason, "message": f.message[:2000],
              "run_id": run_id, "time": now} for f in failures],
            schema=FAILURES_SCHEMA,
        ))

    def forget_failures(self, paths: list[str], keep_run_id: str) -> None:
        """Drop older failure rows of paths this run tried again: the table shows each input's latest state."""
        table = self.table("failures")
        for start in range(0, len(paths), 500):
            group = ", ".join(sql_literal(p) for p in paths[start:start + 500])
            table.delete(f"path IN ({group}) AND run_id != {sql_literal(keep_run_id)}")

    def start_run(self, run_id: str, model_id: str, config: dict) -> None:
        self.table("runs").add(pa.Table.from_pylist(
            [{"run_id": run_id, "model_id": model_id, "started_at": now_utc(), "config": json.dumps(config)}],
            schema=RUNS_SCHEMA,
        ))

    def finish_run(self, run_id: str, n_embedded: int, n_skipped: int, n_failed: int,
                   slices_per_s: float, stage_seconds: dict[str, float]) -> None:
        self.table("runs").update(
            where=f"run_id = {sql_literal(run_id)}",
            values={"ended_at": now_utc(), "n_embedded": n_embedded, "n_skipped": n_skipped,
                    "n_failed": n_failed, "slices_per_s": float(slices_per_s),
                    "stage_seconds": json.dumps({k: round(v, 3) for k, v in stage_seconds.items()})},
        )

    def delete_model(self, model_id: str) -> None:
        """Remove every row and patch shard of one model (for --overwrite)."""
        for name in ("slices", "series"):
            if self.has_table(name):
                self.table(name).delete(f"model_id = {sql_literal(model_id)}")
        remove_model_patches(self.patches_root, model_id)

    # ---------------------------------------------------------------- orphans
    def orphan_shards(self) -> list[Path]:
        """Patch shards no committed row points at: left by a killed actor or driver (or a
        retried unit), or by a run that is writing right now."""
        if not self.patches_root.exists():
            return []
        referenced = set(self.rows("slices", "patch_shard IS NOT NULL", ["patch_shard"])
                         .column("patch_shard").to_pylist()) if self.has_table("slices") else set()
        return sorted(shard for model in self.patches_root.iterdir() if model.is_dir()
                      for shard in model.iterdir() if f"{model.name}/{shard.name}" not in referenced)

    def vacuum(self) -> dict:
        """Remove orphan patch shards and table files no version needs (including those of a
        transaction a crash interrupted), and compact the tables. Refuses while an ingest runs."""
        with self.ingest_lock(exclusive=True):
            orphans = self.orphan_shards()
            freed = sum(directory_bytes(shard) for shard in orphans)
            for shard in orphans:
                shutil.rmtree(shard)
            versions_before = {name: len(self.table(name).list_versions()) for name in self.db.list_tables().tables}
            with warnings.catch_warnings():  # "removes every version but the latest": the exclusive lock is why it's safe
                warnings.simplefilter("ignore", UserWarning)
                for name in versions_before:
                    self.table(name).optimize(cleanup_older_than=timedelta(0), delete_unverified=True)
        return {"orphan_shards_removed": len(orphans), "patch_bytes_freed": freed,
                "table_versions_before": versions_before}

    # ---------------------------------------------------------------- series
    def stale_series(self, model_id: str) -> list[str]:
        """Series whose `series` row is missing or counts a different number of slices."""
        where = f"model_id = {sql_literal(model_id)}"
        slices = self.rows("slices", where, ["series_uid"])
        if not slices.num_rows:
            return []
        counts = slices.group_by("series_uid").aggregate([("series_uid", "count")])
        have = dict(zip(counts["series_uid"].to_pylist(), counts["series_uid_count"].to_pylist()))
        series = self.rows("series", where, ["series_uid", "n_slices"])
        recorded = dict(zip(series["series_uid"].to_pylist(), series["n_slices"].to_pylist())) if series.num_rows else {}
        return sorted(uid for uid, n in have.items() if recorded.get(uid) != n)

    def refresh_series(self, model_id: str, series_uids: list[str]) -> None:
        """Recompute `series` rows (mean of their slices' vectors) for the given series."""
        for start in range(0, len(series_uids), SERIES_REFRESH_GROUP):
            group = series_uids[start:start + SERIES_REFRESH_GROUP]
            where = (f"model_id = {sql_literal(model_id)} AND series_uid IN "
                     f"({', '.join(sql_literal(u) for u in group)})")
            slices = self.rows("slices", where, [*SERIES_IDENTITY, "slice_position", "cls", "patch_mean"])
            rows = series_rows(model_id, slices, self.vector_dim)
            self.table("series").merge_insert("key").when_matched_update_all() \
                .when_not_matched_insert_all().execute(rows)


def series_rows(model_id: str, slices: pa.Table, dim: int) -> pa.Table:
    """One row per series_uid in `slices`: identity and metadata of its first slice, spacing
    measured from the slice positions, and mean vectors."""
    uids = slices.column("series_uid").to_numpy(zero_copy_only=False)
    order = np.argsort(uids, kind="stable")
    unique, starts, counts = np.unique(uids[order], return_index=True, return_counts=True)
    means = {}
    for column in ("cls", "patch_mean"):
        flat = slices.column(column).combine_chunks().flatten().to_numpy()
        vectors = flat.reshape(-1, dim)[order]
        means[column] = np.add.reduceat(vectors, starts, axis=0) / counts[:, None]
    positions = slices.column("slice_position").to_numpy(zero_copy_only=False)[order]
    spacing = [spacing_stats(list(positions[start:start + n])) for start, n in zip(starts, counts)]
    taken = slices.take(pa.array(order[starts]))
    columns = {
        "key": [f"{model_id}|{uid}" for uid in unique],
        "model_id": [model_id] * len(unique),
        **{name: taken.column(name) for name in SERIES_IDENTITY},
        "n_slices": pa.array(counts, pa.int32()),
        **{name: [getattr(stats, name) for stats in spacing] for name in SPACING_COLUMNS},
        "cls": pa.FixedSizeListArray.from_arrays(pa.array(means["cls"].astype(np.float32).ravel()), dim),
        "patch_mean": pa.FixedSizeListArray.from_arrays(
            pa.array(means["patch_mean"].astype(np.float32).ravel()), dim),
    }
    schema = series_schema(dim)
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


def check_store_path(path: Path, create: bool) -> None:
    """UsageError unless `path` is a store (or, with `create`, a place where one can be made)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"store path {path} is a file, not a directory")
    if (path / MANIFEST).exists():
        return
    if not create:
        raise UsageError(f"{path} is not an embedstore store (no {MANIFEST})")
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"store path {path} is a non-empty directory that is not an embedstore store")
