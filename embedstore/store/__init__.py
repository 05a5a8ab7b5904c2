"""The store: a directory holding a LanceDB database and Zarr v3 patch shards, with a manifest.

Tables (store/schema.py): `items` and `series` (what each slice and series is, written once),
`models` (one spec per model), a `slices-<model_id>` / `series-<model_id>` pair per model (its
vectors), `failures` and `runs`. Patch tokens: `patches/<model_id>/<shard>/b<block>`.

Whether an item is done for a model is decided from that model's committed rows only. A commit
never adds a key that is already present, so retries, reruns and concurrent ingests cannot create
duplicates: every write holds the store's commit lock (`.commit.lock`), which makes a commit's key
check and its insert one step across processes, and across machines sharing the file system
(Lance's optimistic merge_insert lets two writers both insert a key). This module is persistence
only: what goes into a row is decided upstream, in the pipeline.

Reads go through Lance's own Python package (`lance.dataset`), writes, indexes and ANN search through
LanceDB (`Store.db`); both are imported on first use: importing lancedb takes about 3 s (it builds
pydantic schemas for its REST client), lance 0.75 s (0.5 s of it pandas, which pyarrow.dataset
loads), and `embedstore info` answers from store/info.py's summary without either.
"""

from __future__ import annotations

import fcntl
import json
import numbers
import os
import re
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("LANCE_LOG", "error")  # keep Lance's informational warnings off the terminal

import pyarrow as pa  # noqa: E402

from embedstore.errors import StoreDamagedError, StoreFormatError, UsageError  # noqa: E402
from embedstore.models.spec import ModelSpec  # noqa: E402
from embedstore.store.digests import row_digests  # noqa: E402
from embedstore.store.location import (  # noqa: E402
    ObjectLock,
    check_bucket,
    is_object_store,
    lance_options,
    local_folder,
    remove_tree,
    replace_file,
    store_root,
    tree_bytes,
)
from embedstore.store.privacy import (  # noqa: E402
    AS_READ,
    FINGERPRINT_FILE,
    FINGERPRINT_TEMP,
    HASHED,
    KEY_FILE,
    KEY_TEMP,
    check_key_source,
    key_fingerprint,
    patient_id_key,
    read_fingerprint,
    write_fingerprint,
)
from embedstore.store.schema import (  # noqa: E402
    FAILURES_SCHEMA,
    FILES_SCHEMA,
    ITEMS_SCHEMA,
    MODELS_SCHEMA,
    ROW_DIGEST,
    RUNS_SCHEMA,
    SERIES_SCHEMA,
    SLICES_PREFIX,
    STORE_FORMAT_VERSION,
    model_series_schema,
    model_slices_schema,
    series_table_name,
    slices_table_name,
    with_row_digest,
)
from embedstore.version import __version__  # noqa: E402

MANIFEST = "embedstore.json"
MANIFEST_TEMP = MANIFEST + ".tmp"
KEY_FINGERPRINT = "patient_id_key"  # manifest entry: the fingerprint of the patient-ID key
LOCK_FILE = ".lock"
COMMIT_LOCK = ".commit.lock"
WRITER_LOCK = ".writer.lock"  # object storage only: the one writer's lock object
TABLES_DIR = "tables"
PATCHES_DIR = "patches"
VECTOR_COPIES_DIR = "vector-cache"  # flat copies of indexed columns (store/vector_cache.py)
REGION_INDEX_DIR = "region-index"  # sketches and flat copies of patch tokens (search/region_index.py)
SHARED_TABLES = {"items": ITEMS_SCHEMA, "series": SERIES_SCHEMA, "models": MODELS_SCHEMA,
                 "failures": FAILURES_SCHEMA, "runs": RUNS_SCHEMA, "files": FILES_SCHEMA}
# What a directory holds while another process creates a store in it, or after a creation was cut short.
CREATION_FILES = {COMMIT_LOCK, LOCK_FILE, TABLES_DIR, MANIFEST_TEMP, KEY_FILE, KEY_TEMP, FINGERPRINT_FILE,
                  FINGERPRINT_TEMP}
# check_store_writable's probe folder: another process checking the same new store may hold one in it.
WRITE_PROBE_PREFIX = ".embedstore-probe-"
# Lance's words for a data file it cannot read: missing, cut short, or bytes that do not decode.
DAMAGE_MARKERS = ("LanceError(IO)", "Not found:", "corrupt", "column metadata", "Protobuf", "file size is too small",
                  "does not appear to be a Lance file")
READ_ERRORS = (OSError, RuntimeError, ValueError)  # what Lance raises on a file it cannot read (ArrowInvalid too)


if TYPE_CHECKING:
    import lance

    from embedstore.sources.records import Failure


COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def sql_literal(value: str | int) -> str:
    """A typed value as SQL: an integer as a number, anything else as a quoted string."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy's integers too
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def equals(column: str, value: str | int) -> str:
    """A filter keeping the rows whose `column` is `value`: the one way code (not a user's --where,
    which where.py parses) writes a filter, so no value is ever pasted into SQL unquoted."""
    return f"{checked_column(column)} = {sql_literal(value)}"


def among(column: str, values) -> str:
    """A filter keeping the rows whose `column` is one of `values` (at least one)."""
    return f"{checked_column(column)} IN ({', '.join(sql_literal(value) for value in values)})"


def checked_column(column: str) -> str:
    if not COLUMN_NAME.fullmatch(column):
        raise ValueError(f"not a column name: {column!r}")
    return column


def new_run_id() -> str:
    """A run's id: when it started, and a random tail that two runs started in one second differ by."""
    return now_utc().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def key_column(table: str) -> str | None:
    """The column a table's rows are unique on; None for the logs (`failures`, `runs`)."""
    return {"models": "model_id", "series": "series_uid", "files": "path", "failures": None,
            "runs": None}.get(table, "key")


@contextmanager
def exclusive_lock(path: Path):
    """A blocking exclusive lock on `path`: a flock, which the kernel drops when its process dies;
    on object storage, a lock object (store/location.py)."""
    if is_object_store(path):
        with ObjectLock(path).held():
            yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def error_text(error: Exception) -> str:
    """An error's message on one line, without the Rust source location Lance appends."""
    return re.sub(r", /\S+\.rs:\d+:\d+", "", " ".join(str(error).split()))


def table_folder(name: str) -> str:
    return f"{name}.lance"


@contextmanager
def reading(store_path: Path, table: str):
    """Around a read of `table`: Lance's error on a damaged file becomes the StoreDamagedError that
    names the table and `embedstore check`; other errors pass unchanged."""
    try:
        yield
    except READ_ERRORS as error:
        damage = as_damage(error, store_path, table)
        if damage is None:
            raise
        raise damage from error


def as_damage(error: Exception, store_path: Path | None = None, table: str | None = None) -> StoreDamagedError | None:
    """The StoreDamagedError an error of Lance reading a damaged file amounts to; None for other errors."""
    text = error_text(error)
    if not isinstance(error, READ_ERRORS) or not any(m in text for m in DAMAGE_MARKERS):
        return None
    store = str(store_path) if store_path else "STORE"
    where = f"table {store}/{TABLES_DIR}/{table_folder(table)}" if table else "a table of the store"
    return StoreDamagedError(f"{where} cannot be read ({text}): run `embedstore check {store}`")


class Store:
    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.tables_root = path / TABLES_DIR
        self.patches_root = path / PATCHES_DIR
        self._db = None
        self._specs: dict[str, ModelSpec] | None = None
        self._holds_commit_lock = False

    @property
    def db(self):
        """The LanceDB connection, for writes, indexes and ANN search; reads do not need it."""
        if self._db is None:
            import lancedb

            self._db = lancedb.connect(str(self.tables_root), storage_options=lance_options(self.path))
        return self._db

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, create: bool = False, patient_ids: str = HASHED) -> "Store":
        """Open a store; with `create`, make a new one where nothing (or an empty directory) is.

        `patient_ids` (HASHED or AS_READ) is fixed when the store is made: one store never mixes the two.
        """
        path = store_root(path)
        check_store_path(path, create)
        if create and not (path / MANIFEST).exists():
            return cls.create(path, patient_ids)
        return cls(path, read_manifest(path))

    @classmethod
    def create(cls, path: Path, patient_ids: str) -> "Store":
        """Make a store under the commit lock, or open the one another process made meanwhile: two
        ingests creating one store at once both succeed."""
        if patient_ids == HASHED:
            check_key_source(path)
        try:
            if not is_object_store(path):  # an S3 prefix needs no making
                path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create the store {path}: {error.strerror or error}") from None
        with exclusive_lock(path / COMMIT_LOCK):
            if (path / MANIFEST).exists():
                return cls(path, read_manifest(path))
            manifest = {"format": "embedstore", "format_version": STORE_FORMAT_VERSION,
                        "created_by": f"embedstore {__version__}", "created_at": now_utc().isoformat(),
                        "patient_ids": patient_ids}
            store = cls(path, manifest)
            for name, schema in SHARED_TABLES.items():
                store.db.create_table(name, schema=schema, exist_ok=True)
            write_manifest(path, manifest)  # last: marks the store complete
        return store

    def write_manifest(self) -> None:
        with self.commit_lock():
            write_manifest(self.path, self.manifest)

    @contextmanager
    def commit_lock(self):
        """Held around every write to the tables and the manifest, so that a commit's key check and
        insert (and a series refresh) are one step for every process sharing the store. Held once
        per Store: nested calls pass through (a second flock of one file would wait on itself)."""
        if self._holds_commit_lock:
            yield
            return
        with exclusive_lock(self.path / COMMIT_LOCK):
            self._holds_commit_lock = True
            try:
                yield
            finally:
                self._holds_commit_lock = False

    @property
    def patient_ids(self) -> str:
        return self.manifest.get("patient_ids", HASHED)

    def check_patient_ids(self, wanted: str) -> None:
        if wanted != self.patient_ids:
            flag = "with" if self.patient_ids == AS_READ else "without"
            raise UsageError(f"store {self.path} keeps patient IDs {self.patient_ids}; run {flag} "
                             "--keep-patient-id, or use another store")

    def patient_key(self) -> bytes:
        """The key that hashes PatientIDs, checked against the recorded fingerprint (the manifest's,
        else the copy in `patient-id.fingerprint`); the first call on a store without one (new, or
        migrated from format 2) records it in both. A store that already holds hashed IDs never gets
        a new key: the old one must be put back."""
        with self.commit_lock():
            self.manifest = read_manifest(self.path)
            fingerprint = self.manifest.get(KEY_FINGERPRINT) or read_fingerprint(self.path)
            may_make = fingerprint is None and not self.count("items", "patient_id IS NOT NULL")
            key = patient_id_key(self.path, fingerprint, may_make)
            fingerprint = fingerprint or key_fingerprint(key)
            if self.manifest.get(KEY_FINGERPRINT) != fingerprint:
                self.manifest[KEY_FINGERPRINT] = fingerprint
                self.write_manifest()
            if read_fingerprint(self.path) != fingerprint:
                write_fingerprint(self.path, fingerprint)
        return key

    @contextmanager
    def ingest_lock(self, exclusive: bool = False):
        """Held while an ingest writes (shared: several ingests may run at once) and by vacuum
        (exclusive: it must not take a running ingest's fresh shards for orphans). The kernel
        drops the lock of a process that dies, even by SIGKILL. A store in object storage takes one
        writer at a time: there the lock is always exclusive (a lock object, see location.py)."""
        if is_object_store(self.path):
            with self._sole_writer():
                yield
            return
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

    @contextmanager
    def _sole_writer(self):
        lock = ObjectLock(self.path / WRITER_LOCK)
        if not lock.acquire(wait=False):
            holder = lock.holder() or {}
            raise UsageError(f"store {self.path} is busy: a writer (host {holder.get('host', '?')}, process "
                             f"{holder.get('pid', '?')}) holds it, and a store in object storage takes one "
                             "writer at a time")
        try:
            yield
        finally:
            lock.release()

    def ingest_running(self) -> bool:
        """Whether an ingest holds the store's ingest lock now (asked without writing anything)."""
        if is_object_store(self.path):
            return ObjectLock(self.path / WRITER_LOCK).holder() is not None
        try:
            descriptor = os.open(self.path / LOCK_FILE, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)  # closing drops the lock if it was taken
        return False

    def table(self, name: str):
        """A LanceDB table, to write to, index or ANN-search."""
        return self.db.open_table(name)

    def table_names(self) -> list[str]:
        if not self.tables_root.is_dir():
            return []
        return sorted(entry.name.removesuffix(".lance") for entry in self.tables_root.iterdir()
                      if entry.name.endswith(".lance") and entry.is_dir())

    def create_table_if_missing(self, name: str, schema: pa.Schema) -> None:
        """A table added to the store's format after this store was made (e.g. `files`)."""
        if not self.has_table(name):
            with self.commit_lock():
                self.db.create_table(name, schema=schema, exist_ok=True)

    def has_table(self, name: str) -> bool:
        return (self.tables_root / table_folder(name)).is_dir()

    def dataset(self, name: str) -> "lance.LanceDataset":
        """A table's latest version, to read."""
        import lance

        with reading(self.path, name):
            return lance.dataset(str(self.tables_root / table_folder(name)), storage_options=lance_options(self.path))

    def schema(self, name: str) -> pa.Schema:
        return self.dataset(name).schema

    def count(self, name: str, where: str | None = None) -> int:
        dataset = self.dataset(name)
        with reading(self.path, name):
            return dataset.count_rows(filter=where)

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
        with self.commit_lock():
            self._specs = None  # another ingest may have added it meanwhile
            self.check_layers(spec)
            table = slices_table_name(spec.model_id)
            if spec.model_id not in self.specs():
                self.db.create_table(table, schema=with_row_digest(model_slices_schema(spec)), exist_ok=True)
                self.db.create_table(series_table_name(spec.model_id), schema=model_series_schema(spec),
                                     exist_ok=True)
                self.insert_new("models", pa.Table.from_pylist([spec.to_row()], schema=MODELS_SCHEMA))
                self._specs = None
            if ROW_DIGEST.name not in self.schema(table).names:  # a table migrated from format 2
                self.table(table).add_columns(ROW_DIGEST)

    def drop_model(self, model_id: str) -> None:
        """Remove one model's vectors, patch tokens and spec; other models' files are not touched."""
        with self.commit_lock():
            for name in (slices_table_name(model_id), series_table_name(model_id)):
                if self.has_table(name):
                    self.db.drop_table(name)
                remove_tree(local_folder(self.path, VECTOR_COPIES_DIR) / name)  # its index's flat copies
            remove_tree(self.patches_root / model_id)
            remove_tree(local_folder(self.path, REGION_INDEX_DIR) / model_id)
            self.table("models").delete(equals("model_id", model_id))
            self._specs = None

    # ---------------------------------------------------------------- reading
    def rows(self, table: str, where: str | None = None, columns: list[str] | None = None,
             with_row_ids: bool = False) -> pa.Table:
        """The rows `where` keeps, in `columns` (every column when None; none but `_rowid` when empty);
        with `_rowid` (Lance's row address: fragment id << 32 | offset) when asked."""
        if not self.has_table(table):
            return pa.table({})
        dataset = self.dataset(table)
        with reading(self.path, table):
            return dataset.to_table(columns=columns, filter=where or None, with_row_id=with_row_ids)

    def committed_keys(self, model_id: str) -> set[str]:
        rows = self.rows(slices_table_name(model_id), columns=["key"])
        return set(rows.column("key").to_pylist()) if rows.num_rows else set()

    # ---------------------------------------------------------------- writing
    def insert_new(self, table: str, rows: pa.Table) -> int:
        """Commit rows in one transaction, skipping keys already present; returns rows added. A
        model's vector rows get their `row_digest` here."""
        with self.commit_lock():
            target = self.table(table)
            if table.startswith(SLICES_PREFIX):
                columns = [name for name in target.schema.names if name != ROW_DIGEST.name]
                rows = rows.select(columns).append_column(ROW_DIGEST, row_digests(rows, columns))
            result = target.merge_insert(key_column(table)).when_not_matched_insert_all().execute(rows)
        return int(result.num_inserted_rows)

    def upsert(self, table: str, rows: pa.Table, key: str = "key") -> None:
        with self.commit_lock():
            self.table(table).merge_insert(key).when_matched_update_all().when_not_matched_insert_all().execute(rows)

    def append_at_version(self, table: str, rows: pa.Table, version: int) -> int | None:
        """Append `rows` if `table` is still at `version`, i.e. nobody has written it since; the
        version the append made, or None (nothing written) when the table has moved on."""
        with self.commit_lock():
            handle = self.table(table)
            if handle.version != version:
                return None
            handle.add(rows)
            return handle.version

    def add_failures(self, failures: list[Failure], run_id: str) -> None:
        if not failures:
            return
        now = now_utc()
        with self.commit_lock():
            self.table("failures").add(pa.Table.from_pylist(
                [{"path": f.path, "stage": f.stage, "reason": f.reason, "message": f.message[:2000],
                  "run_id": run_id, "time": now} for f in failures],
                schema=FAILURES_SCHEMA,
            ))

    def forget_failures(self, paths: list[str], keep_run_id: str) -> None:
        """Drop failure rows of runs started before this one for paths it tried again: the table
        shows each input's latest state, and a concurrent ingest that started later keeps its rows."""
        with self.commit_lock():
            runs = self.rows("runs", columns=["run_id", "started_at"]).to_pylist()
            started = {run["run_id"]: run["started_at"] for run in runs}
            older = [run_id for run_id, at in started.items() if at < started[keep_run_id]]
            if not older:
                return
            table = self.table("failures")
            for start in range(0, len(paths), 500):
                table.delete(f"{among('path', paths[start:start + 500])} AND {among('run_id', older)}")

    def forget_run_series(self, run_id: str, series_uids: list[str], tables: list[str]) -> None:
        """Drop this run's rows of the given series (any geometry split of them, `<uid>#...`) from
        `tables`: a series the run embedded in part before the rest of it turned up."""
        for start in range(0, len(series_uids), 200):
            series = " OR ".join(f"{equals('series_uid', uid)} OR series_uid LIKE {sql_literal(uid + '#%')}"
                                 for uid in series_uids[start:start + 200])
            with self.commit_lock():
                for table in tables:
                    self.table(table).delete(f"{equals('run_id', run_id)} AND ({series})")

    def start_run(self, run_id: str, model_ids: list[str], config: dict) -> None:
        with self.commit_lock():
            self.table("runs").add(pa.Table.from_pylist(
                [{"run_id": run_id, "model_ids": model_ids, "started_at": now_utc(), "config": json.dumps(config)}],
                schema=RUNS_SCHEMA,
            ))

    def finish_run(self, run_id: str, n_embedded: int, n_skipped: int, n_failed: int,
                   slices_per_s: float, stage_seconds: dict[str, float]) -> None:
        with self.commit_lock():
            self.table("runs").update(
                where=equals("run_id", run_id),
                values={"ended_at": now_utc(), "n_embedded": n_embedded, "n_skipped": n_skipped,
                        "n_failed": n_failed, "slices_per_s": float(slices_per_s),
                        "stage_seconds": json.dumps({k: round(v, 3) for k, v in stage_seconds.items()})},
            )

    # ---------------------------------------------------------------- orphans
    def patch_shards(self) -> list[str]:
        """Every patch shard on disk, as rows name it: <model_id>/<shard>."""
        if not self.patches_root.exists():
            return []
        return [f"{model.name}/{shard.name}" for model in sorted(p for p in self.patches_root.iterdir() if p.is_dir())
                for shard in sorted(model.iterdir())]

    def referenced_shards(self) -> set[str]:
        """The patch shards committed rows point at, every model's."""
        referenced = set()
        for model_id in self.specs():
            table = slices_table_name(model_id)
            if self.has_table(table):
                referenced.update(self.rows(table, "patch_shard IS NOT NULL", ["patch_shard"])
                                  .column("patch_shard").to_pylist())
        return referenced

    def orphan_shards(self) -> list[Path]:
        """Patch shards no committed row points at: left by a killed actor or driver (or a
        retried unit), or by a run that is writing right now."""
        referenced = self.referenced_shards()
        return [self.patches_root / shard for shard in self.patch_shards() if shard not in referenced]

    def vacuum(self) -> dict:
        """Remove duplicate keys (stores written by concurrent ingests before the commit lock),
        orphan patch shards and table files no version needs (including those of a transaction a
        crash interrupted), and compact the tables. Refuses while an ingest runs."""
        from embedstore.store.check import remove_duplicates
        from embedstore.store.info import record_summary

        with self.ingest_lock(exclusive=True):
            duplicates = remove_duplicates(self)  # first: a dropped copy may leave its shard an orphan
            orphans = self.orphan_shards()
            freed = sum(tree_bytes(shard) for shard in orphans)
            for shard in orphans:
                remove_tree(shard)
            versions_before = {name: len(self.table(name).list_versions()) for name in self.table_names()}
            with warnings.catch_warnings():  # "removes every version but the latest": the exclusive lock makes it safe
                warnings.simplefilter("ignore", UserWarning)
                for name in versions_before:
                    self.table(name).optimize(cleanup_older_than=timedelta(0), delete_unverified=True)
            record_summary(self)
        return {"duplicate_rows_removed": duplicates, "orphan_shards_removed": len(orphans),
                "patch_bytes_freed": freed, "table_versions_before": versions_before}


def read_manifest(path: Path) -> dict:
    """The store's manifest, its format checked; StoreDamagedError when it does not parse."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as error:  # cut short, or not text
        raise damaged_manifest(path, str(error)) from None
    if not isinstance(manifest, dict):
        raise damaged_manifest(path, "not a JSON object")
    check_format(path, manifest)
    return manifest


def damaged_manifest(path: Path, why: str) -> StoreDamagedError:
    return StoreDamagedError(f"store manifest {path / MANIFEST} is damaged ({why}): run `embedstore check {path}`")


def write_manifest(path: Path, manifest: dict) -> None:
    """Replace the manifest whole: a crash leaves the old one or the new one, never half of one."""
    replace_file(path / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


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
    if is_object_store(path):
        check_bucket(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"store path {path} is a file, not a directory")
    if (path / MANIFEST).exists():
        return
    if not create:
        raise UsageError(f"{path} is not an embedstore store (no {MANIFEST})")
    if path.exists() and any(entry.name not in CREATION_FILES and not entry.name.startswith(WRITE_PROBE_PREFIX)
                             for entry in path.iterdir()):
        raise UsageError(f"store path {path} is a non-empty directory that is not an embedstore store")


def check_store_writable(path: Path) -> None:
    """UsageError unless this process may write the store at `path`: the store directory, or the
    nearest folder above it that exists, must be a directory it can make folders in (tried with a
    folder made and removed at once: permissions alone do not tell, e.g. under /proc, for root, or
    on a read-only mount). A store in object storage has nothing to probe here: check_store_path,
    which every caller runs first, has listed its bucket."""
    if is_object_store(path):
        return
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"store path {path} lies under {existing}, a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the store {path}: permission denied on {existing}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=WRITE_PROBE_PREFIX, dir=existing))
    except OSError as error:
        raise UsageError(f"cannot write the store {path}: {existing} does not take new folders "
                         f"({error.strerror or error})") from None
