"""`embedstore migrate`: a format-2 store converted to format 3 in place, without re-embedding.

Format 2 kept every model's rows in one `slices` and one `series` table (key `<model_id>|<item_id>`)
and each patch shard as a Zarr array `patches/<model_id>/<shard>`. Format 3 keeps what a slice is in
`items` and `series`, each model's spec in `models`, its vectors in `slices-<model_id>` and
`series-<model_id>`, and patch shards as Zarr groups `patches/<model_id>/<shard>/b<block>`.

Each model's spec is rebuilt from its format-2 run config and model id, recording what format 2
actually did (antialiased bilinear resize, ImageNet mean and std, preprocessing version 2, no
per-block CLS, the last block's patch tokens). Spec fields that format 2 did not hash into its id
(mean, std, interpolation) are hashed into the format-3 id, so a model's id changes; the manifest's
`migrated_from` maps old ids to new ones. The weights digest is the one in the old id: the vectors were
made with those weights, whatever can be loaded today.

Two phases, so that an interrupted migration can be run again:
1. build: the format-3 tables are written beside the format-2 ones (`items`, `models`, the per-model
   pairs, and `migrate-series`, `migrate-failures`, `migrate-runs` for the names both formats use).
   Nothing of format 2 is changed; a rerun drops what an interrupted build left and builds again.
   The plan (old id → new id, row counts) then goes into the manifest, still at format 2.
2. switch: patch arrays move into their groups, the staged tables replace `series`, `failures` and
   `runs`, `slices` is dropped, and the manifest is written at format 3, last. Every step can be
   repeated: a rerun of an interrupted switch goes on from the plan in the manifest.
ANN indexes are not carried over (their tables are new): `embedstore index` rebuilds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import zarr

from embedstore.errors import StoreFormatError, UsageError
from embedstore.intensity import IntensityConfig
from embedstore.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, patch_array
from embedstore.store import MANIFEST, Store, check_store_path, equals, now_utc
from embedstore.store.info import record_summary
from embedstore.store.patches import read_patches
from embedstore.store.privacy import HASHED
from embedstore.store.location import is_object_store
from embedstore.store.schema import (
    FAILURES_SCHEMA,
    ITEM_READER_COLUMNS,
    ITEMS_SCHEMA,
    MODELS_SCHEMA,
    RUNS_SCHEMA,
    SERIES_PREFIX,
    SERIES_SCHEMA,
    SLICES_PREFIX,
    STORE_FORMAT_VERSION,
    model_series_schema,
    model_slices_schema,
    series_table_name,
    slices_table_name,
)
from embedstore.store.upgrade import add_item_columns, lacks_item_columns, with_reader_columns
from embedstore.version import __version__

FROM_VERSION = 2
STAGING_PREFIX = "migrate-"
SWITCHED_TABLES = {"series": SERIES_SCHEMA, "failures": FAILURES_SCHEMA, "runs": RUNS_SCHEMA}  # names in both formats
BATCH_ROWS = 16384  # old slice rows converted and committed at a time
FORMAT2_INTERPOLATION = "bilinear"  # format 2 resized with antialiased bilinear interpolation
# <name>-<hub|file|random-s<seed>>-<12 hex>-<size>px-pp<version>.<6 hex> (names were made path-safe: no "-")
OLD_MODEL_ID = re.compile(r"(?P<name>[A-Za-z0-9_.]+)-(?P<source>hub|file|random-s(?P<seed>-?\d+))-"
                          r"(?P<digest>[0-9a-f]{12})-(?P<size>\d+)px-(?P<tag>pp(?P<version>\d+)\.[0-9a-f]{6})")


@dataclass
class MigrationReport:
    store: str
    models: dict[str, str]  # old model_id → new model_id
    items: int
    slices: dict[str, int]  # new model_id → vector rows
    series: int
    failures: int
    runs: int
    patch_shards: int  # patch shard groups of the migrated models
    indexes_dropped: list[str]  # "<table>.<column>" of the manifest's ANN indexes
    notes: list[str] = field(default_factory=list)  # what the user should know (weights, stale series)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        models = "; ".join(f"{old} -> {new}" for old, new in self.models.items())
        indexes = (f"; {len(self.indexes_dropped)} ANN indexes not carried over: rebuild them with `embedstore index`"
                   if self.indexes_dropped else "")
        return [f"migrated {self.store} to format 3: {len(self.models)} models" + (f" ({models})" if models else "")
                + f", {self.items:,} items, {sum(self.slices.values()):,} slice rows, {self.series:,} series, "
                f"{self.failures:,} failures, {self.runs:,} runs, {self.patch_shards:,} patch shards{indexes}"]


@dataclass
class ItemsUpgrade:
    """A format-3 store whose items gained their reader columns (kind, axis)."""

    store: str
    items: int
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"upgraded {self.store}: {self.items:,} items now say the kind and axis of their files"]


def migrate_store(path: str | Path) -> MigrationReport | ItemsUpgrade:
    """Bring the store at `path` to this embedstore's format in place: a format-2 store to format 3,
    a format-3 store's items to their reader columns; UsageError when there is nothing to do."""
    if is_object_store(path):  # stores in object storage began after format 2 and after those columns
        raise UsageError(f"store {path} is in object storage, where every store is written in format "
                         f"{STORE_FORMAT_VERSION}: nothing to migrate")
    path = Path(path)
    check_store_path(path, create=False)
    manifest = json.loads((path / MANIFEST).read_text())
    version = manifest.get("format_version")
    if manifest.get("format") != "embedstore":
        raise StoreFormatError(f"{path} is not an embedstore store (its {MANIFEST} names no embedstore format)")
    if version == STORE_FORMAT_VERSION:
        store = Store.open(path)
        if not lacks_item_columns(store):
            raise UsageError(f"store {path} is already at format version {STORE_FORMAT_VERSION}: nothing to migrate")
        with store.ingest_lock(exclusive=True):
            items = add_item_columns(store)
            record_summary(store)
        return ItemsUpgrade(str(path), items)
    if version != FROM_VERSION:
        raise StoreFormatError(f"store {path} has format version {version!r}; migrate converts version "
                               f"{FROM_VERSION} only: re-ingest older stores")
    store = Store(path, manifest)  # not Store.open: that refuses version 2
    with store.ingest_lock(exclusive=True):
        plan = manifest.get("migration")
        if plan is None:
            plan = build(store)
            manifest["migration"] = plan
            write_manifest(path, manifest)  # still version 2: the switch may begin
        switch(store, plan)
        report = MigrationReport(**plan["report"])
        final = {key: value for key, value in manifest.items() if key not in ("migration", "indexes")}
        final.update(format_version=STORE_FORMAT_VERSION, patient_ids=manifest.get("patient_ids", HASHED),
                     migrated_from={"format_version": FROM_VERSION, "models": report.models,
                                    "migrated_at": now_utc().isoformat(), "migrated_by": f"embedstore {__version__}"})
        write_manifest(path, final)  # last: from here on the store is format 3
        record_summary(Store.open(path))
    return report


def write_manifest(path: Path, manifest: dict) -> None:
    """Replace the manifest atomically: a crash leaves the old one or the new one, never half of one."""
    temporary = path / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, path / MANIFEST)


# ------------------------------------------------------------------------------------ phase 1: build

def build(store: Store) -> dict:
    """Write the format-3 tables beside the format-2 ones; the plan the switch follows."""
    drop_leftovers(store)
    runs = store.rows("runs").to_pylist()
    runs.sort(key=lambda run: run["started_at"])
    old_ids = model_order(store, runs)
    configs = {}
    for run in runs:
        configs.setdefault(run["model_id"], json.loads(run["config"] or "{}"))
    specs, notes = {}, []
    for old_id in old_ids:
        spec, spec_notes = rebuild_spec(old_id, configs.get(old_id), kept_patches(store, old_id, configs.get(old_id)))
        specs[old_id] = spec
        notes.extend(spec_notes)
    mapping = {old: spec.model_id for old, spec in specs.items()}
    if len(set(mapping.values())) != len(mapping) or set(mapping) & set(mapping.values()):
        raise UsageError(f"store {store.path}: the format-2 model ids {', '.join(mapping)} do not map to distinct "
                         "new ids; this store cannot be migrated in place")

    store.db.create_table("models", schema=MODELS_SCHEMA)
    store.table("models").add(pa.Table.from_pylist([spec.to_row() for spec in specs.values()], schema=MODELS_SCHEMA))
    store.db.create_table("items", schema=ITEMS_SCHEMA)
    seen_items: set[str] | None = set() if len(specs) > 1 else None  # one model's item ids are distinct
    n_items, slice_counts, series_seen = 0, {}, {}
    for old_id, spec in specs.items():
        copied, fresh, series_seen[old_id] = copy_slices(store, old_id, spec, seen_items)
        slice_counts[spec.model_id] = copied
        n_items += fresh
    n_series = copy_series(store, specs, series_seen, notes)
    n_failures = stage(store, "failures", store.rows("failures"))
    old_runs = store.rows("runs")
    if old_runs.num_rows:
        old_runs = old_runs.append_column("model_ids", pa.array([[mapping[m]] for m in
                                                                 old_runs.column("model_id").to_pylist()]))
    n_runs = stage(store, "runs", old_runs)
    indexes = sorted(store.manifest.get("indexes", {}))
    report = MigrationReport(store=str(store.path), models=mapping, items=n_items, slices=slice_counts,
                             series=n_series, failures=n_failures, runs=n_runs, patch_shards=0,
                             indexes_dropped=indexes, notes=notes)
    blocks = {old: patch_block(spec) for old, spec in specs.items()}
    return {"report": report.to_dict(), "blocks": blocks}


def drop_leftovers(store: Store) -> None:
    """Tables an interrupted build wrote (format 2 has none of these names)."""
    for name in store.db.list_tables().tables:
        if name in ("items", "models") or name.startswith((SLICES_PREFIX, SERIES_PREFIX, STAGING_PREFIX)):
            store.db.drop_table(name)


def model_order(store: Store, runs: list[dict]) -> list[str]:
    """Every format-2 model id: in the order of their first run, then those without a run."""
    ordered = list(dict.fromkeys(run["model_id"] for run in runs))
    for name in ("slices", "series"):
        if not store.has_table(name):
            continue
        table = store.table(name)
        if table.count_rows() == sum(table.count_rows(equals("model_id", m)) for m in ordered):
            continue  # every row belongs to a model with a run: no need to read the column
        found = set()
        for batch in table.search().select(["model_id"]).limit(None).to_batches(BATCH_ROWS * 16):
            found.update(batch.column(0).unique().to_pylist())
        ordered.extend(m for m in sorted(found) if m not in ordered)
    return ordered


def kept_patches(store: Store, old_id: str, config: dict | None) -> bool:
    """Whether the model kept patch tokens: its rows say so; without rows, its run config does."""
    where = equals("model_id", old_id)
    if store.has_table("slices") and store.table("slices").count_rows(where):
        return store.table("slices").count_rows(f"{where} AND patch_shard IS NOT NULL") > 0
    return bool((config or {}).get("keep_patches", True))


def patch_block(spec: ModelSpec) -> int:
    """The block format 2's patch tokens came from: the last one (0 for a CNN's feature map)."""
    return spec.patch_layers[0] if spec.patch_layers else max(spec.num_blocks - 1, 0)


# ------------------------------------------------------------------------------------ model specs

def rebuild_spec(old_id: str, config: dict | None, keep_patches: bool) -> tuple[ModelSpec, list[str]]:
    """The format-3 spec of what produced a format-2 model's vectors, from its run config and id."""
    from embedstore.models.build import load_model

    parsed = OLD_MODEL_ID.fullmatch(old_id)
    if not parsed:
        raise StoreFormatError(f"format-2 model id {old_id!r} does not read as <name>-<weights>-<size>px-<pp>: "
                               "this store cannot be migrated")
    config = config or {}
    source = "random" if parsed["source"].startswith("random") else parsed["source"]
    seed = int(parsed["seed"]) if source == "random" else 0
    name = config.get("model") or parsed["name"]
    image_size = int(parsed["size"])
    intensity = recorded_intensity(old_id, config, parsed["tag"])
    notes = []
    # Seeded random weights are rebuilt and a checkpoint file read when it is still here; hub weights
    # are never downloaded by a migration: the architecture's geometry is all the spec needs of them.
    checkpoint = config.get("weights") if source == "file" else None
    loads_weights = source == "random" or bool(checkpoint and Path(checkpoint).is_file())
    if source == "file" and not loads_weights:
        notes.append(f"{old_id}: weights file {checkpoint!r} is not here; searching by image needs --weights PATH")
    loaded = load_model(name, checkpoint if loads_weights and source == "file" else "random", image_size, seed,
                        intensity, layers=1, patch_layers=(-1,) if keep_patches else (), mean=IMAGENET_MEAN,
                        std=IMAGENET_STD)
    if loads_weights and loaded.spec.weights_digest != parsed["digest"]:
        notes.append(f"{old_id}: the weights loaded today have digest {loaded.spec.weights_digest}, not "
                     f"{parsed['digest']}; searching by image needs --weights PATH to the original checkpoint")
    weights_file = str(Path(checkpoint).resolve()) if checkpoint else None
    spec = replace(
        loaded.spec, weights_source=source, weights_digest=parsed["digest"], weights_file=weights_file, seed=seed,
        mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD), interpolation=FORMAT2_INTERPOLATION,
        preprocess_version=int(parsed["version"]), cls_layers=(),
    )
    return spec, notes


def format2_tag(intensity: IntensityConfig) -> str:
    """The preprocessing part of a format-2 model_id: a digest of the intensity settings alone."""
    window = "auto" if intensity.window == "study" else intensity.window  # "study" is what auto does
    settings = json.dumps({"version": 2, "window": window, "ct_window": intensity.ct_window,
                           "mr_percentiles": intensity.mr_percentiles}, sort_keys=True)
    return f"pp2.{hashlib.sha256(settings.encode()).hexdigest()[:6]}"


def recorded_intensity(old_id: str, config: dict, tag: str) -> IntensityConfig:
    """The intensity settings the old id's preprocessing tag pins: the run config's, or (without a
    run row) the one window setting with default MR percentiles whose tag matches."""
    if "window" in config:
        intensity = IntensityConfig(window=config["window"],
                                    mr_percentiles=tuple(config.get("mr_percentiles", (5.0, 95.0))))
        if format2_tag(intensity) == tag:
            return intensity
    from embedstore.intensity import CT_WINDOWS, WINDOW_MODES

    for window in (*WINDOW_MODES, *CT_WINDOWS):
        intensity = IntensityConfig(window=window)
        if format2_tag(intensity) == tag:
            return intensity
    raise StoreFormatError(f"format-2 model {old_id}: no run config describes its preprocessing {tag}; "
                           "this store cannot be migrated")


# ------------------------------------------------------------------------------------ rows

def copy_slices(store: Store, old_id: str, spec: ModelSpec, seen_items: set[str] | None) -> tuple[int, int, Counter]:
    """One model's `slices` rows into `slices-<new id>`, and its items into `items` (those not in
    `seen_items` when several models share them), BATCH_ROWS at a time. Returns the rows copied, the
    items added, and the model's slices per series."""
    table_name = slices_table_name(spec.model_id)
    schema = model_slices_schema(spec)
    store.db.create_table(table_name, schema=schema)
    target, items = store.table(table_name), store.table("items")
    per_series: Counter = Counter()
    copied = added = 0
    if not store.has_table("slices"):
        return 0, 0, per_series
    old_prefix, new_prefix = old_id + "/", spec.model_id + "/"
    query = store.table("slices").search().where(equals("model_id", old_id)).limit(None)
    for batch in query.to_batches(BATCH_ROWS):
        rows = pa.Table.from_batches([batch])
        chosen = rows
        if seen_items is not None:
            item_ids = rows.column("item_id").to_pylist()
            fresh = [i for i, item in enumerate(item_ids) if item not in seen_items and not seen_items.add(item)]
            chosen = rows.take(pa.array(fresh, pa.int64()))
        if chosen.num_rows:
            items.add(with_reader_columns(pa.table({name: chosen.column("item_id" if name == "key" else name)
                                                    for name in ITEMS_SCHEMA.names if name not in ITEM_READER_COLUMNS})))
            added += chosen.num_rows
        shards = []
        for shard in rows.column("patch_shard").to_pylist():
            if shard is not None and not shard.startswith(old_prefix):
                raise StoreFormatError(f"store {store.path}: a row of {old_id} points at patch shard {shard!r}, "
                                       f"outside patches/{old_id}/")
            shards.append(None if shard is None else new_prefix + shard[len(old_prefix):])
        columns = {name: rows.column(name) for name in schema.names if name in rows.column_names}
        columns.update(key=rows.column("item_id"), patch_shard=pa.array(shards, pa.string()))
        target.add(pa.table({name: columns[name] for name in schema.names}).cast(schema))
        per_series.update(rows.column("series_uid").to_pylist())
        copied += rows.num_rows
    return copied, added, per_series


def copy_series(store: Store, specs: dict[str, ModelSpec], series_seen: dict[str, Counter], notes: list[str]) -> int:
    """Each model's `series` rows into `series-<new id>`; one `series` row per series_uid (from
    the model holding most of its slices) staged as `migrate-series`. Returns the series staged."""
    old = store.rows("series")
    chosen: dict[str, dict] = {}
    for old_id, spec in specs.items():
        schema = model_series_schema(spec)
        store.db.create_table(series_table_name(spec.model_id), schema=schema)
        rows = old.filter(pc.equal(old.column("model_id"), old_id)) if old.num_rows else old
        if rows.num_rows:
            columns = {name: rows.column(name) for name in schema.names if name in rows.column_names}
            columns["key"] = rows.column("series_uid")
            store.table(series_table_name(spec.model_id)).add(
                pa.table({name: columns[name] for name in schema.names}).cast(schema))
            for row in rows.select([*SERIES_SCHEMA.names]).to_pylist():
                if row["n_slices"] > chosen.get(row["series_uid"], {}).get("n_slices", -1):
                    chosen[row["series_uid"]] = row
        recorded = dict(zip(rows.column("series_uid").to_pylist(), rows.column("n_slices").to_pylist())) \
            if rows.num_rows else {}
        stale = sum(recorded.get(uid) != n for uid, n in series_seen[old_id].items())
        if stale:
            notes.append(f"{spec.model_id}: {stale} series rows were missing or stale in the format-2 store; "
                         "the next ingest of this model recomputes them")
    series = pa.Table.from_pylist([chosen[uid] for uid in sorted(chosen)], schema=SERIES_SCHEMA)
    return stage(store, "series", series)


def stage(store: Store, name: str, rows: pa.Table) -> int:
    """Rows of a table both formats name alike, written as `migrate-<name>` until the switch."""
    schema = SWITCHED_TABLES[name]
    rows = pa.table({n: rows.column(n) for n in schema.names}).cast(schema) if rows.num_rows else \
        schema.empty_table()
    store.db.create_table(STAGING_PREFIX + name, data=rows, schema=schema)
    return rows.num_rows


# ------------------------------------------------------------------------------------ phase 2: switch

def switch(store: Store, plan: dict) -> None:
    """Patch arrays into groups, staged tables into place, `slices` dropped; each step repeatable."""
    report = plan["report"]
    for old_id, new_id in report["models"].items():
        move_patches(store.patches_root, old_id, new_id, int(plan["blocks"][old_id]))
    for name, schema in SWITCHED_TABLES.items():
        if store.has_table(STAGING_PREFIX + name):
            switch_table(store, name, schema)
    if store.has_table("slices"):
        store.db.drop_table("slices")
    for old_id, new_id in report["models"].items():
        check_patches(store, new_id, int(plan["blocks"][old_id]))
    report["patch_shards"] = sum(1 for new_id in report["models"].values() if (store.patches_root / new_id).is_dir()
                                 for group in (store.patches_root / new_id).iterdir() if group.is_dir())


def switch_table(store: Store, name: str, schema: pa.Schema) -> None:
    """The staged `migrate-<name>` in place of the format-2 `<name>`; the staged copy is dropped
    last, so a rerun after a crash anywhere here does it again from the start."""
    staged = STAGING_PREFIX + name
    rows = store.rows(staged)
    if store.has_table(name):
        store.db.drop_table(name)
    store.db.create_table(name, data=rows if rows.num_rows else schema.empty_table(), schema=schema)
    store.db.drop_table(staged)


def move_patches(patches_root: Path, old_id: str, new_id: str, block: int) -> None:
    """Every array `patches/<old>/<shard>` into the group `patches/<new>/<shard>` as `b<block>`
    (one rename each, so a rerun finds each shard in one place or the other)."""
    source = patches_root / old_id
    if not source.is_dir():
        return
    for shard in sorted(p for p in source.iterdir() if p.is_dir()):
        group = patches_root / new_id / shard.name
        target = group / patch_array(block)
        if target.exists():  # moved by an interrupted run; this one is a stray copy
            raise UsageError(f"patch shard {shard.name} is both in {source} and {group}: remove one and rerun")
        zarr.open_group(store=str(group), mode="a")  # the group node first, then the array into it
        os.rename(shard, target)
    if not any(source.iterdir()):
        source.rmdir()


def check_patches(store: Store, model_id: str, block: int) -> None:
    """The first stored row's patch tokens read back through the format-3 reader."""
    rows = store.table(slices_table_name(model_id)).search().where("patch_shard IS NOT NULL") \
        .select(["patch_shard", "patch_offset"]).limit(1).to_list()
    if rows:
        read_patches(store.patches_root, rows[0]["patch_shard"], [rows[0]["patch_offset"]], block)
