"""The store: a directory holding a LanceDB database and Zarr v3 patch shards, with a manifest.

Tables (store/schema.py): `items` and `series` (what each slice and series is, written once),
`models` (one spec per model), a `slices-<model_id>` / `series-<model_id>` pair per model (its
vectors), `failures` and `runs`. Patch tokens: `patches/<model_id>/<shard>/b<block>`.

Whether an item is done for a model is decided from that model's committed rows only. A commit
never adds a key that is already present, so retries and reruns cannot create duplicates. This
module is persistence only: what goes into a row is decided upstream, in the pipeline.
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
import pyarrow as pa  # noqa: E402

from embedstore import __version__  # noqa: E402
from embedstore.errors import StoreFormatError, UsageError  # noqa: E402
from embedstore.models.spec import ModelSpec  # noqa: E402
from embedstore.sources.records import Failure  # noqa: E402
from embedstore.store.patches import directory_bytes, remove_model_patches  # noqa: E402
from embedstore.store.privacy import AS_READ, HASHED  # noqa: E402
from embedstore.store.schema import (  # noqa: E402
    FAILURES_SCHEMA, ITEMS_SCHEMA, MODELS_SCHEMA, RUNS_SCHEMA, SERIES_SCHEMA, STORE_FORMAT_VERSION,
    model_series_schema, model_slices_schema, series_table_name, slices_table_name,
)

MANIFEST = "embedstore.json"
LOCK_FILE = ".lock"
TABLES_DIR = "tables"
PATCHES_DIR = "patches"
SHARED_TABLES = {"items": ITEMS_SCHEMA, "series": SERIES_SCHEMA, "models": MODELS_SCHEMA,
                 "failures": FAILURES_SCHEMA, "runs": RUNS_SCHEMA}


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
        self._specs: dict[str, ModelSpec] | None = None

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
            check_format(path, manifest)
            return cls(path, manifest)
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": "embedstore", "format_version": STORE_FORMAT_VERSION,
                    "created_by": f"embedstore {__version__}", "created_at": now_utc().isoformat(),
                    "patient_ids": patient_ids}
        store = cls(path, manifest)
        for name, schema in SHARED_TABLES.items():
            store.db.create_table(name, schema=schema, exist_ok=True)
        store.write_manifest()  # last: marks the store complete
        return store

    def write_manifest(self) -> None:
        (self.path / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")

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
        """Held while an ingest writes (shared: several ingests may run at once) and by vacuum
        (exclusive: it must not take a running ingest's fresh shards for orphans). The kernel
        drops the lock of a process that dies, even by SIGKILL."""
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

    # ---------------------------------------------------------------- models
    def specs(self) -> dict[str, ModelSpec]:
        """Every model's spec, by model_id, in the order they were added."""
        if self._specs is None:
            rows = self.rows("models").to_pylist()
            self._specs = {row["model_id"]: ModelSpec.from_row(row) for row in rows}
        return self._specs

    def spec(self, model_id: str) -> ModelSpec:
        return self.specs()[self.resolve_model_id(model_id)]

    def resolve_model_id(self, prefix: str | None) -> str:
        """The one model whose id starts with `prefix` (the only model when None); UsageError
        naming the candidates otherwise."""
        models = list(self.specs())
        if not models:
            raise UsageError(f"store {self.path} holds no embeddings yet")
        if prefix is None:
            if len(models) > 1:
                raise UsageError(f"store {self.path} holds {len(models)} models; name one with --model-id "
                                 f"(any unique prefix): {', '.join(models)}")
            return models[0]
        if prefix in models:
            return prefix
        matches = [m for m in models if m.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise UsageError(f"no model id in store {self.path} starts with {prefix!r}; it holds: {', '.join(models)}")
        raise UsageError(f"--model-id {prefix!r} is ambiguous in store {self.path}: it matches {', '.join(matches)}")

    def check_layers(self, spec: ModelSpec) -> None:
        """UsageError when the store holds this model with other layers kept."""
        known = self.specs().get(spec.model_id)
        if known is not None and (known.cls_layers, known.patch_layers) != (spec.cls_layers, spec.patch_layers):
            raise UsageError(
                f"model {spec.model_id} is stored with CLS of blocks {list(known.cls_layers)} and patch tokens "
                f"of blocks {list(known.patch_layers)}; ingest it with the same --layers/--patch-layers, or "
                "with --overwrite to rebuild it")

    def add_model(self, spec: ModelSpec) -> None:
        """Record a model and create its tables; a model already here must keep the layers it has."""
        self.check_layers(spec)
        if spec.model_id in self.specs():
            return
        self.db.create_table(slices_table_name(spec.model_id), schema=model_slices_schema(spec), exist_ok=True)
        self.db.create_table(series_table_name(spec.model_id), schema=model_series_schema(spec), exist_ok=True)
        self.table("models").add(pa.Table.from_pylist([spec.to_row()], schema=MODELS_SCHEMA))
        self._specs = None

    def drop_model(self, model_id: str) -> None:
        """Remove one model's vectors, patch tokens and spec; other models' files are not touched."""
        for name in (slices_table_name(model_id), series_table_name(model_id)):
            if self.has_table(name):
                self.db.drop_table(name)
        remove_model_patches(self.patches_root, model_id)
        self.table("models").delete(f"model_id = {sql_literal(model_id)}")
        self._specs = None

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
        rows = self.rows(slices_table_name(model_id), columns=["key"])
        return set(rows.column("key").to_pylist()) if rows.num_rows else set()

    # ---------------------------------------------------------------- writing
    def insert_new(self, table: str, rows: pa.Table) -> int:
        """Commit rows in one transaction, skipping keys already present; returns rows added."""
        key = "model_id" if table == "models" else "series_uid" if table == "series" else "key"
        result = self.table(table).merge_insert(key).when_not_matched_insert_all().execute(rows)
        return int(result.num_inserted_rows)

    def upsert(self, table: str, rows: pa.Table, key: str = "key") -> None:
        self.table(table).merge_insert(key).when_matched_update_all().when_not_matched_insert_all().execute(rows)

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

    def start_run(self, run_id: str, model_ids: list[str], config: dict) -> None:
        self.table("runs").add(pa.Table.from_pylist(
            [{"run_id": run_id, "model_ids": model_ids, "started_at": now_utc(), "config": json.dumps(config)}],
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

    # ---------------------------------------------------------------- orphans
    def orphan_shards(self) -> list[Path]:
        """Patch shards no committed row points at: left by a killed actor or driver (or a
        retried unit), or by a run that is writing right now."""
        if not self.patches_root.exists():
            return []
        orphans = []
        for model in sorted(p for p in self.patches_root.iterdir() if p.is_dir()):
            table = slices_table_name(model.name)
            referenced = set(self.rows(table, "patch_shard IS NOT NULL", ["patch_shard"])
                             .column("patch_shard").to_pylist()) if self.has_table(table) else set()
            orphans.extend(shard for shard in sorted(model.iterdir())
                           if f"{model.name}/{shard.name}" not in referenced)
        return orphans

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


def check_format(path: Path, manifest: dict) -> None:
    version = manifest.get("format_version")
    if manifest.get("format") == "embedstore" and version == STORE_FORMAT_VERSION:
        return
    if manifest.get("format") == "embedstore" and version == 2:
        raise StoreFormatError(f"store {path} has format version 2; convert it with `embedstore migrate {path}` "
                               "(no re-embedding)")
    raise StoreFormatError(f"store {path} has format version {version!r}; this embedstore reads version "
                           f"{STORE_FORMAT_VERSION} only")


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
