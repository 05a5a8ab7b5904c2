"""`embedstore check`: find what every other command would read back as data although it is
damaged, and with `--repair` drop it, so that the next ingest re-embeds what was lost.

Checked: the patient-ID key of a store that hashes IDs is here and is the one it was made with;
every table reads; keys are unique in every keyed table; per model, every vector row's
`row_digest` matches its columns, the row has its `items` row, and its patch tokens are there for
every kept block: its shard's files match the checksums recorded when the shard was closed (a shard
from before checksums: every chunk the rows need exists and decodes). Repair drops the rows that
fail (of duplicates it keeps one sound row per key), rewrites an unreadable table from the rows
that still read, and recomputes the series rows. Orphan items are kept: they cost nothing and the
next ingest needs them.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import zarr

from embedstore.errors import StoreDamagedError
from embedstore.models.spec import ModelSpec, patch_array
from embedstore.store import (
    KEY_FINGERPRINT,
    MANIFEST,
    PATCHES_DIR,
    READ_ERRORS,
    VECTOR_COPIES_DIR,
    Store,
    among,
    check_store_path,
    error_text,
    key_column,
    now_utc,
    read_manifest,
    write_manifest,
)
from embedstore.store.digests import file_sha256, read_shard_checksums, row_digests
from embedstore.store.location import local_folder, store_root, zarr_location
from embedstore.store.vector_cache import damaged_cache_files, drop_vector_cache
from embedstore.store.info import record_summary
from embedstore.store.privacy import (
    AS_READ,
    HASH_PREFIX,
    HASHED,
    KEY_ENV,
    KEY_FILE,
    key_fingerprint,
    present_key,
    read_fingerprint,
)
from embedstore.store.schema import (
    ROW_DIGEST,
    SLICES_PREFIX,
    STORE_FORMAT_VERSION,
    series_table_name,
    slices_table_name,
)

BATCH_ROWS = 8192  # rows read at a time: a model's vectors need not fit in memory
DELETE_GROUP = 2000  # row ids per delete

# What check finds (Finding.kind).
DAMAGED_MANIFEST = "damaged_manifest"  # embedstore.json does not parse
UNREADABLE_TABLE = "unreadable_table"  # Lance cannot read a table's files
DUPLICATE_KEY = "duplicate_key"  # a key stored more than once in a table
BAD_DIGEST = "bad_digest"  # a vector row whose columns no longer match its row_digest
NO_ITEM = "no_item"  # a vector row without its `items` row
MISSING_SHARD = "missing_shard"  # a patch shard folder, or an array of a kept block, is gone
MISSING_CHUNK = "missing_chunk"  # a chunk file of a patch array is gone
BAD_CHUNK = "bad_chunk"  # a patch file that fails its checksum or does not decode
BAD_OFFSET = "bad_offset"  # a vector row pointing past the end of its shard
MISSING_PATIENT_KEY = "missing_patient_key"  # hashed patient IDs, and neither key file nor key variable
WRONG_PATIENT_KEY = "wrong_patient_key"  # the key present is not the one the store's IDs were hashed with
BAD_VECTOR_COPY = "bad_vector_copy"  # a file of an indexed column's flat copy that fails its SHA-256


@dataclass
class Finding:
    kind: str
    where: str  # a table, a shard (relative to patches/) or the manifest
    detail: str
    rows: int  # rows affected


@dataclass
class CheckReport:
    store: str
    findings: list[Finding]  # what was found before any repair
    repaired: bool  # --repair ran and a second look found nothing left
    removed: dict[str, int]  # table → rows dropped by --repair
    remaining: list[Finding] = field(default_factory=list)  # what --repair could not mend
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {**asdict(self), "clean": self.clean}


@dataclass
class TableRows:
    """What check keeps of a table: its keys and row ids, and for vector rows their patch pointers
    and whether their digest matches (None: written before digests)."""

    keys: list = field(default_factory=list)
    rowids: list[int] = field(default_factory=list)
    shards: list[str | None] = field(default_factory=list)
    offsets: list[int | None] = field(default_factory=list)
    digest_ok: list[bool | None] = field(default_factory=list)


@dataclass
class Audit:
    findings: list[Finding] = field(default_factory=list)
    drops: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # table → row ids to drop
    unreadable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def found(self, kind: str, where: str, detail: str, table: str, rowids: list[int]) -> None:
        self.findings.append(Finding(kind, where, detail, len(rowids)))
        self.drops[table].update(rowids)


def check_store(path: str | Path, repair: bool = False) -> CheckReport:
    """Check the store at `path`, holding its exclusive lock (no ingest commits meanwhile); with
    `repair`, drop what is broken, then look again."""
    path = store_root(path)
    check_store_path(path, create=False)
    findings, notes = [], []
    try:
        manifest = read_manifest(path)
    except StoreDamagedError:
        findings.append(Finding(DAMAGED_MANIFEST, str(path / MANIFEST), "does not parse", 0))
        if repair:
            notes.append(rebuild_manifest(path))
        manifest = read_manifest(path) if repair else {}
    store = Store(path, manifest)
    with store.ingest_lock(exclusive=True):
        audit = audit_store(store)
        findings.extend(audit.findings)
        notes.extend(audit.notes)
        if not (repair and findings):
            return CheckReport(str(path), findings, False, {}, notes=notes)
        for name in audit.unreadable:
            notes.append(salvage(store, name))
        if audit.unreadable:
            audit = audit_store(store)  # the rewritten tables, row by row
        removed = delete_rows(store, audit.drops)
        if any(finding.kind == BAD_VECTOR_COPY for finding in audit.findings):
            drop_vector_cache(store)  # derived data: searches read the table until the next index
        refresh_series(store)
        remaining = audit_store(store).findings
        if not remaining:
            record_summary(store)
    return CheckReport(str(path), findings, not remaining, removed, remaining, notes)


def audit_store(store: Store) -> Audit:
    audit = Audit()
    audit.findings.extend(audit_patient_key(store))
    tables: dict[str, TableRows] = {}
    for name in store.table_names():
        try:
            tables[name] = scan_table(store, name)
        except READ_ERRORS as error:
            audit.unreadable.append(name)
            audit.findings.append(Finding(UNREADABLE_TABLE, name, error_text(error)[:300], rows_declared(store, name)))
    specs = store.specs() if "models" in tables else {}
    items = set(tables["items"].keys) if "items" in tables else None
    for model_id, spec in specs.items():
        name = slices_table_name(model_id)
        if name in tables:
            judge_vectors(store, spec, name, tables[name], items, audit)
    for name, rows in tables.items():
        if key_column(name) is not None:
            find_duplicates(name, rows, audit)
    copies = local_folder(store.path, VECTOR_COPIES_DIR).parent  # the store, or its local cache when in S3
    for path in damaged_cache_files(store):
        audit.findings.append(Finding(BAD_VECTOR_COPY, str(path.relative_to(copies)), "fails its SHA-256 (a copy "
                                      "of stored vectors: --repair removes the copies, `embedstore index` writes "
                                      "them again)", 0))
    return audit


def audit_patient_key(store: Store) -> list[Finding]:
    """What an ingest into this store would refuse about its patient-ID key: the key is gone, or is
    not the one recorded. Repair cannot mend either: the key must be put back."""
    if store.patient_ids != HASHED:
        return []
    fingerprint = store.manifest.get(KEY_FINGERPRINT) or read_fingerprint(store.path)
    found = present_key(store.path)
    if found is None:
        hashed = store.count("items", "patient_id IS NOT NULL") if store.has_table("items") else 0
        if fingerprint is None and not hashed:
            return []  # no key yet: the first ingest makes one
        return [Finding(MISSING_PATIENT_KEY, str(store.path / KEY_FILE),
                        f"the key that hashed this store's {hashed:,} patient IDs is gone and {KEY_ENV} is not "
                        f"set: put back {KEY_FILE} (ingests are refused until then)", hashed)]
    key, source = found
    if fingerprint is not None and key_fingerprint(key) != fingerprint:
        return [Finding(WRONG_PATIENT_KEY, source, f"fingerprint {key_fingerprint(key)}, the store's {fingerprint}: "
                        f"put back the store's {KEY_FILE}, or set {KEY_ENV} to its key", 0)]
    return []


def scan_table(store: Store, name: str) -> TableRows:
    """Read every row of a table (so that an unreadable page shows); keep keys and row ids, and for
    vector rows their patch pointers and digest verdicts."""
    dataset = store.dataset(name)
    key = key_column(name)
    vectors = name.startswith(SLICES_PREFIX)
    digested = [n for n in dataset.schema.names if n != ROW_DIGEST.name]
    rows = TableRows()
    for batch in dataset.to_batches(batch_size=BATCH_ROWS, with_row_id=True):
        batch = pa.Table.from_batches([batch])
        rows.rowids.extend(batch.column("_rowid").to_pylist())
        if key is not None:
            rows.keys.extend(batch.column(key).to_pylist())
        if vectors:
            rows.shards.extend(batch.column("patch_shard").to_pylist())
            rows.offsets.extend(batch.column("patch_offset").to_pylist())
            rows.digest_ok.extend(digest_verdicts(batch, digested))
    return rows


def digest_verdicts(batch: pa.Table, columns: list[str]) -> list[bool | None]:
    if ROW_DIGEST.name not in batch.column_names:
        return [None] * batch.num_rows
    stored = batch.column(ROW_DIGEST.name).to_pylist()
    computed = row_digests(batch, columns).to_pylist()
    return [None if want is None else want == got for want, got in zip(stored, computed)]


def judge_vectors(store: Store, spec: ModelSpec, name: str, rows: TableRows, items: set | None,
                  audit: Audit) -> None:
    """Digests, items and patch tokens of one model's vector rows."""
    bad = [r for r, ok in zip(rows.rowids, rows.digest_ok) if ok is False]
    if bad:
        audit.found(BAD_DIGEST, name, f"{len(bad)} rows whose columns no longer match their row_digest", name, bad)
    undigested = sum(ok is None for ok in rows.digest_ok)
    if undigested:
        audit.notes.append(f"{name}: {undigested} rows written before row digests (not verified)")
    if items is not None:
        orphans = [r for r, key in zip(rows.rowids, rows.keys) if key not in items]
        if orphans:
            audit.found(NO_ITEM, name, f"{len(orphans)} rows without their items row", name, orphans)
    if spec.patch_layers:
        judge_patches(store, spec, name, rows, audit)


def judge_patches(store: Store, spec: ModelSpec, name: str, rows: TableRows, audit: Audit) -> None:
    by_shard: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for rowid, shard, offset in zip(rows.rowids, rows.shards, rows.offsets):
        if shard is not None:
            by_shard[shard].append((rowid, offset))
    for shard, pointers in sorted(by_shard.items()):
        verdict = verify_shard(store.path / PATCHES_DIR / shard, spec.patch_layers)
        broken: dict[str, list[int]] = defaultdict(list)
        for rowid, offset in pointers:
            kind = verdict.problem(offset)
            if kind:
                broken[kind].append(rowid)
        for kind, rowids in broken.items():
            audit.found(kind, shard, f"{len(rowids)} of the {len(pointers)} rows pointing at it: {verdict.why[kind]}",
                        name, rowids)
    audit.notes.append(f"{name}: {len(rows.rowids):,} rows, {len(by_shard):,} patch shards checked")


@dataclass
class ShardVerdict:
    """What is wrong with one patch shard: as a whole (`whole`), or per chunk of rows."""

    whole: str | None = None
    n_rows: int | None = None  # rows of its shortest kept array
    chunk_rows: int = 1
    chunks: dict[int, str] = field(default_factory=dict)  # chunk index → kind
    why: dict[str, str] = field(default_factory=dict)  # kind → what was seen

    def problem(self, offset: int) -> str | None:
        if self.whole:
            return self.whole
        if self.n_rows is not None and offset >= self.n_rows:
            self.why.setdefault(BAD_OFFSET, f"the shard holds {self.n_rows} rows")
            return BAD_OFFSET
        return self.chunks.get(offset // self.chunk_rows)

    def mark(self, kind: str, why: str, chunk: int | None = None) -> None:
        self.why.setdefault(kind, why)
        if chunk is None:
            self.whole = self.whole or kind
        else:
            self.chunks.setdefault(chunk, kind)


def verify_shard(path: Path, blocks: tuple[int, ...]) -> ShardVerdict:
    """Every kept block's array of one shard, against the checksums recorded when it was closed."""
    verdict = ShardVerdict()
    if not path.is_dir():
        verdict.mark(MISSING_SHARD, "the shard folder is gone")
        return verdict
    try:
        checksums = read_shard_checksums(path)
    except (ValueError, KeyError):
        checksums = None  # a damaged checksum file: the arrays are still decoded below
    failed = {} if checksums is None else failed_files(path, checksums)
    if "zarr.json" in failed:
        verdict.mark(failed["zarr.json"], "the shard's zarr.json fails its checksum or is gone")
    for block in blocks:
        verify_array(path, patch_array(block), checksums, failed, verdict)
    return verdict


def failed_files(path: Path, checksums: dict[str, str]) -> dict[str, str]:
    """Recorded files that are gone (MISSING_CHUNK) or differ (BAD_CHUNK)."""
    failed = {}
    for name, digest in checksums.items():
        file = path / name
        if not file.is_file():
            failed[name] = MISSING_CHUNK
        elif file_sha256(file) != digest:
            failed[name] = BAD_CHUNK
    return failed


def verify_array(path: Path, name: str, checksums: dict | None, failed: dict[str, str], verdict: ShardVerdict) -> None:
    if not (path / name / "zarr.json").is_file():
        verdict.mark(MISSING_SHARD, f"array {name} is gone")
        return
    if f"{name}/zarr.json" in failed:
        verdict.mark(BAD_CHUNK, f"array {name}'s zarr.json fails its checksum")
        return
    try:
        array = zarr.open_array(**zarr_location(path / name), mode="r")
    except Exception as error:  # noqa: BLE001 - whatever zarr raises, the array cannot be read
        verdict.mark(BAD_CHUNK, f"array {name} does not open ({type(error).__name__})")
        return
    rows = array.chunks[0]
    verdict.chunk_rows = rows
    verdict.n_rows = min(array.shape[0], verdict.n_rows if verdict.n_rows is not None else array.shape[0])
    for chunk in range(math.ceil(array.shape[0] / rows)):
        chunk_file = f"{name}/{array.metadata.encode_chunk_key((chunk, 0, 0))}"
        if checksums is not None:
            kind = failed.get(chunk_file)
        else:
            kind = MISSING_CHUNK if not (path / chunk_file).is_file() else decode_failure(array, chunk, rows)
        if kind:
            verdict.mark(kind, f"chunk file {chunk_file} " + ("is gone" if kind == MISSING_CHUNK else
                                                               "fails its checksum or does not decode"), chunk)


def decode_failure(array, chunk: int, rows: int) -> str | None:
    try:
        array[chunk * rows:(chunk + 1) * rows]
    except Exception:  # noqa: BLE001 - a codec's complaint about damaged bytes
        return BAD_CHUNK
    return None


def find_duplicates(name: str, rows: TableRows, audit: Audit) -> None:
    """Keys stored more than once: all copies but one are dropped, a sound copy kept where there is one."""
    dropped = audit.drops.get(name, set())
    extra = duplicate_rowids(rows.keys, rows.rowids, dropped)
    if extra:
        repeated = sum(1 for n in Counter(rows.keys).values() if n > 1)
        audit.findings.append(Finding(DUPLICATE_KEY, name, f"{repeated} keys stored more than once "
                                      f"({len(extra)} extra rows)", len(extra)))
        audit.drops[name].update(extra)


def duplicate_rowids(keys: list, rowids: list[int], unsound: set[int] = frozenset()) -> list[int]:
    """Row ids of every copy of a key but one: the first sound one (by row id, the oldest)."""
    kept: dict = {}
    for key, rowid in sorted(zip(keys, rowids), key=lambda pair: (pair[1] in unsound, pair[1])):
        kept.setdefault(key, rowid)
    keep = set(kept.values())
    return [rowid for rowid in rowids if rowid not in keep]


def remove_duplicates(store: Store) -> dict[str, int]:
    """Every keyed table down to one row per key (the oldest), series rows recomputed if any went:
    for stores written by concurrent ingests before the commit lock. `vacuum` calls it."""
    drops = {}
    for name in store.table_names():
        key = key_column(name)
        if key is not None:
            rows = store.dataset(name).to_table(columns=[key], with_row_id=True)
            drops[name] = set(duplicate_rowids(rows.column(key).to_pylist(), rows.column("_rowid").to_pylist()))
    removed = delete_rows(store, drops)
    if removed:
        refresh_series(store)
    return removed


def delete_rows(store: Store, drops: dict[str, set[int]]) -> dict[str, int]:
    removed = {}
    with store.commit_lock():
        for name, rowids in sorted(drops.items()):
            ordered = sorted(rowids)
            for start in range(0, len(ordered), DELETE_GROUP):
                store.table(name).delete(among("_rowid", ordered[start:start + DELETE_GROUP]))
            if ordered:
                removed[name] = len(ordered)
    return removed


def refresh_series(store: Store) -> None:
    """Series rows after rows were dropped: a series with no slice left loses its model row, the
    others are recomputed (their slice counts changed)."""
    from embedstore.store.series import refresh_series as refresh

    with store.commit_lock():
        model_ids = list(store.specs())
        for model_id in model_ids:
            slices = store.rows(slices_table_name(model_id), columns=["series_uid"])
            stored = store.rows(series_table_name(model_id), columns=["key"])
            empty = sorted(set(stored.column("key").to_pylist()) - set(slices.column("series_uid").to_pylist()))
            for start in range(0, len(empty), DELETE_GROUP):
                store.table(series_table_name(model_id)).delete(among("key", empty[start:start + DELETE_GROUP]))
        refresh(store, model_ids)


def rows_declared(store: Store, name: str) -> int:
    """The rows a table's manifest says it has (0 when even that does not read)."""
    try:
        return store.dataset(name).count_rows()
    except (StoreDamagedError, *READ_ERRORS):
        return 0


def salvage(store: Store, name: str) -> str:
    """Rewrite an unreadable table from the rows that still read: each data file (fragment) on its
    own, and a fragment that fails read in halves down to single rows, so a damaged page costs only
    its own rows and a damaged file only its fragment's."""
    dataset = store.dataset(name)
    n_rows, schema = dataset.count_rows(), dataset.schema
    kept = []
    for fragment in dataset.get_fragments():
        n = fragment.count_rows()
        if n and not any(readable_parts(fragment, offset, 1) for offset in {0, n // 2, n - 1}):
            continue  # its file's own metadata (the footer) is gone: no row of it reads, however asked
        kept.extend(readable_parts(fragment, 0, n))
    rows = pa.concat_tables(kept).cast(schema) if kept else schema.empty_table()
    with store.commit_lock():
        store.db.create_table(name, data=rows, schema=schema, mode="overwrite")
    return (f"{name}: rewritten from the {rows.num_rows} of its {n_rows} rows that still read"
            + ("; rebuild its ANN indexes with `embedstore index`" if name.startswith(SLICES_PREFIX) else ""))


def readable_parts(fragment, offset: int, n_rows: int) -> list[pa.Table]:
    """Rows offset .. offset + n_rows of a fragment that read, as tables; halves of what fails, down to
    single rows."""
    if n_rows == 0:
        return []
    try:
        return [fragment.to_table(offset=offset, limit=n_rows)]
    except READ_ERRORS:
        if n_rows == 1:
            return []
    half = n_rows // 2
    return readable_parts(fragment, offset, half) + readable_parts(fragment, offset + half, n_rows - half)


def rebuild_manifest(path: Path) -> str:
    """A manifest for a store whose manifest is damaged, from what its tables and files say."""
    store = Store(path, {})
    ids = store.rows("items", "patient_id IS NOT NULL", ["patient_id"]).column("patient_id").to_pylist() \
        if store.has_table("items") else []
    hashed = all(pid.startswith(HASH_PREFIX) for pid in ids)
    manifest = {"format": "embedstore", "format_version": STORE_FORMAT_VERSION,
                "created_by": "embedstore check --repair", "created_at": now_utc().isoformat(),
                "patient_ids": HASHED if hashed else AS_READ}
    key_file = path / KEY_FILE
    fingerprint = read_fingerprint(path)  # kept apart from the manifest for this moment
    if hashed and fingerprint is None and key_file.exists():
        fingerprint = key_fingerprint(key_file.read_text().strip().encode())
    if hashed and fingerprint is not None:
        manifest[KEY_FINGERPRINT] = fingerprint
    write_manifest(path, manifest)
    return (f"{MANIFEST}: rebuilt (patient IDs {manifest['patient_ids']}; ANN index settings are lost: rebuild "
            "them with `embedstore index`)")


def report_lines(report: CheckReport) -> list[str]:
    lines = [f"{f.kind}: {f.where}: {f.detail}" for f in report.findings]
    lines.extend(f"note: {note}" for note in report.notes)
    lines.extend(f"not repaired: {f.kind}: {f.where}: {f.detail}" for f in report.remaining)
    dropped = ", ".join(f"{name} {n:,}" for name, n in report.removed.items())
    if report.clean:
        lines.append(f"store {report.store}: no damage found")
    elif report.repaired:
        lines.append(f"store {report.store}: repaired" + (f"; rows dropped: {dropped}; rerun the ingest to re-embed "
                                                          "them" if dropped else ""))
    elif report.remaining:
        lines.append(f"store {report.store}: {len(report.remaining)} problems left after the repair")
    else:
        lines.append(f"store {report.store}: problems found: {len(report.findings)}; `embedstore check --repair "
                     f"{report.store}` drops what is broken, and a rerun of the ingest re-embeds it")
    return lines

