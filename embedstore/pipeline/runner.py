"""The unit of ingest work, run the same way by every distributor (clip-retrieval's pattern: one
runner built from a reader, a mapper and a writer; a local and a Ray distributor call it).

A work unit is a few hundred slices (a series never straddles two). `UnitRunner.run` takes the
unit's decoded files, embeds every slice with every model that still lacks it (each slice was
decoded once for all of them), writes each model's patch tokens to a Zarr shard of its own (named per
unit and attempt: no two writers ever touch one shard, a retry never reuses one), closes the
shards, and returns the rows. `RowCommitter` commits rows in large transactions that never add a
key already present: items first, then each model's vectors, so a committed vector row always has
its item and its patches.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from embedstore.inference.batching import SliceBatcher, one_batch_ahead
from embedstore.models.build import LoadedModel
from embedstore.models.embedder import Embedder, Embeddings, LaunchedBatch
from embedstore.models.spec import ModelSpec, cls_column
from embedstore.pipeline.progress import IngestProgress
from embedstore.preprocess import DecodedFile, DecodeSettings
from embedstore.sources.records import Failure, ReadTask, SliceItem
from embedstore.store import Store, among
from embedstore.store.location import remove_tree, store_root
from embedstore.store.patches import PatchShardWriter
from embedstore.store.schema import ITEMS_SCHEMA, SEARCH_COLUMNS, model_slices_schema, slices_table_name

COMMIT_SECONDS = 30.0
UNIT_SLICES = 256  # slices per work unit (a longer series is one unit on its own)
UNIT_PATCH_BYTES = 512 * 1024 * 1024  # smaller units where patch tokens are large (448 px, 5 layers, ViT-L)
ITEM_GEOMETRY = ("frame", "rows", "cols", "pixel_spacing", "slice_thickness", "image_position",
                 "image_orientation", "slice_position", "kind", "axis")


@dataclass
class WorkUnit:
    unit_id: int
    tasks: list[ReadTask] = field(default_factory=list)
    # Per model (by position in the ingest's model list), the item ids of this unit it still lacks.
    wanted: list[set[str]] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)  # the series (or files) whose leases the unit holds

    @property
    def n_items(self) -> int:
        return sum(len(task.items) for task in self.tasks)


def unit_slices_for(specs: list[ModelSpec], requested: int) -> int:
    """`requested` slices per unit, fewer when the models' patch tokens would make a unit too big."""
    patch_bytes = sum(len(s.patch_layers) * s.num_patches * s.embed_dim * 2 for s in specs)
    return max(8, min(requested, UNIT_PATCH_BYTES // max(1, patch_bytes)))


# A batch's items and each model's queued forward: (model's rows, positions in the batch, outputs).
Launched = tuple[list[SliceItem], list[tuple["ModelRows", list[int], LaunchedBatch]]]


@dataclass
class UnitOutput:
    unit_id: int
    items: pa.Table | None  # `items` rows of every slice embedded
    vectors: dict[str, pa.Table]  # model_id → its `slices-<model_id>` rows, patches already on disk
    failures: list[Failure]
    n_failed_items: int
    n_items: int  # slices embedded (by at least one model)
    seconds: dict[str, float]
    n_warned_files: int = 0  # files embedded whose readers or codecs printed warnings
    parts: list[str] = field(default_factory=list)  # the unit's parts: their leases end at the commit


class UnitRunner:
    """The models on their device, and the one function that turns a decoded unit into rows."""

    def __init__(self, models: list[LoadedModel], embedders: list[Embedder], patches_root: Path, run_id: str,
                 batch_size: int, settings: DecodeSettings):
        self.models, self.embedders, self.settings = models, embedders, settings
        self.patches_root, self.run_id, self.batch_size = store_root(patches_root), run_id, batch_size

    def run(self, unit: WorkUnit, decoded: list[tuple[ReadTask, DecodedFile | list[Failure]]],
            on_batch: Callable[[int], None] | None = None) -> UnitOutput:
        """The unit's rows; `on_batch(slices)` after each batch every model has embedded (a unit can
        be a whole series of thousands of slices: a bar moved per unit would stand still)."""
        failures: list[Failure] = []
        n_failed_items = n_warned_files = 0
        seconds: Counter = Counter()
        batcher = SliceBatcher(self.batch_size, self.settings, self.embedders[0].device)
        for task, result in decoded:
            if isinstance(result, list):
                failures.extend(result)
                n_failed_items += len(task.items)
            else:
                failures.extend(result.failures)
                batcher.add(result)
                seconds.update(result.seconds)
                n_warned_files += bool(result.codec_output)
        n_items = batcher.pending()
        if not n_items:
            return UnitOutput(unit.unit_id, None, {}, failures, n_failed_items, 0, dict(seconds), parts=unit.parts)
        writers = [ModelRows(loaded, self.patches_root, self.run_id, unit.unit_id, wanted)
                   for loaded, wanted in zip(self.models, unit.wanted)]
        items: list[SliceItem] = []
        for finished in one_batch_ahead(partial(self._prepare, batcher, seconds),
                                        partial(self._launch, writers=writers, seconds=seconds),
                                        partial(self._collect, seconds=seconds)):
            items.extend(self._write(finished, seconds))
            if on_batch:
                on_batch(len(finished[0]))
        started = time.perf_counter()
        vectors = {writer.spec.model_id: writer.close() for writer in writers if writer.n_rows}
        seconds["write_patches"] += time.perf_counter() - started
        return UnitOutput(unit.unit_id, item_rows(items, self.run_id), vectors, failures, n_failed_items,
                          len(items), dict(seconds), n_warned_files=n_warned_files, parts=unit.parts)

    def _prepare(self, batcher: SliceBatcher, seconds: Counter) -> tuple[list[SliceItem], dict] | None:
        started = time.perf_counter()
        prepared = batcher.take()
        if self.settings.on_device:  # the intensity mapping and resize ran here, not in the workers
            seconds["preprocess"] += time.perf_counter() - started
        return prepared

    def _launch(self, prepared: tuple[list[SliceItem], dict], writers: list[ModelRows], seconds: Counter) -> Launched:
        """Every model's forward of the batch, queued (on a CPU: run), for the slices each lacks."""
        batch_items, pixels = prepared
        started = time.perf_counter()
        forwards = []
        for writer, embedder in zip(writers, self.embedders):
            chosen = [i for i, item in enumerate(batch_items) if item.item_id in writer.wanted]
            if chosen:
                images = pixels[writer.spec.interpolation]
                forwards.append((writer, chosen, embedder.launch(
                    images if len(chosen) == len(batch_items) else images[chosen],
                    keep_patches=bool(writer.spec.patch_layers))))
        seconds["embed"] += time.perf_counter() - started
        return batch_items, forwards

    @staticmethod
    def _collect(launched: Launched, seconds: Counter) -> tuple[list[SliceItem], list]:
        started = time.perf_counter()
        batch_items, forwards = launched
        collected = [(writer, chosen, outputs.collect()) for writer, chosen, outputs in forwards]
        seconds["embed"] += time.perf_counter() - started
        return batch_items, collected

    @staticmethod
    def _write(finished: tuple[list[SliceItem], list], seconds: Counter) -> list[SliceItem]:
        started = time.perf_counter()
        batch_items, collected = finished
        for writer, chosen, embeddings in collected:
            writer.add([batch_items[i] for i in chosen], embeddings)
        seconds["write_patches"] += time.perf_counter() - started
        return batch_items


class ModelRows:
    """One model's rows and patch shard for one unit."""

    def __init__(self, loaded: LoadedModel, patches_root: Path, run_id: str, unit_id: int, wanted: set[str]):
        self.spec = loaded.spec
        self.run_id = run_id
        self.wanted = wanted  # the unit's item ids this model lacks
        self.shard_name = f"{run_id}-u{unit_id:06d}-{uuid.uuid4().hex[:6]}"  # per unit and attempt
        self.patches_root = patches_root
        self.shard: PatchShardWriter | None = None
        self.items: list[SliceItem] = []
        self.offsets: list[int | None] = []
        self.parts: list[Embeddings] = []

    @property
    def n_rows(self) -> int:
        return len(self.items)

    def add(self, items: list[SliceItem], embeddings: Embeddings) -> None:
        if self.spec.patch_layers and self.shard is None:  # made on first use: a unit that fails leaves none
            self.shard = PatchShardWriter(self.patches_root, self.spec.model_id, self.shard_name, len(self.wanted),
                                          self.spec.patch_layers, self.spec.num_patches, self.spec.embed_dim)
        self.items.extend(items)
        self.offsets.extend(self.shard.append(embeddings.patches).tolist() if self.shard else [None] * len(items))
        self.parts.append(embeddings)

    def close(self) -> pa.Table:
        """Close the shard (the patches are on disk before any row points at them); the rows."""
        if self.shard:
            self.shard.close()
        return vector_rows(self.spec, self.items, self.parts, self.shard.relative_path if self.shard else None,
                           self.offsets, self.run_id)


def item_rows(items: list[SliceItem], run_id: str) -> pa.Table:
    """`items` rows: what each slice is, whatever model embedded it."""
    return pa.Table.from_pylist([{**{name: getattr(item, name) for name in (*SEARCH_COLUMNS, *ITEM_GEOMETRY)},
                                  "key": item.item_id, "run_id": run_id} for item in items], schema=ITEMS_SCHEMA)


def vector_rows(spec: ModelSpec, items: list[SliceItem], parts: list[Embeddings], shard: str | None,
                offsets: list[int | None], run_id: str) -> pa.Table:
    """One model's `slices-<model_id>` rows in its schema."""
    schema = model_slices_schema(spec)
    columns = {
        "key": [item.item_id for item in items],
        **{name: [getattr(item, name) for item in items] for name in SEARCH_COLUMNS},
        "intensity": [item.intensity for item in items],
        "patch_shard": [shard if offset is not None else None for offset in offsets],
        "patch_offset": offsets, "run_id": [run_id] * len(items),
        "cls": np.concatenate([p.cls for p in parts]),
        "patch_mean": np.concatenate([p.patch_mean for p in parts]),
    }
    cls_layers = np.concatenate([p.cls_layers for p in parts])
    for position, block in enumerate(spec.cls_layers):
        columns[cls_column(block)] = cls_layers[:, position]
    arrays = []
    for schema_field in schema:
        values = columns[schema_field.name]
        if isinstance(values, np.ndarray):
            flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).ravel())
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, spec.embed_dim))
        else:
            arrays.append(pa.array(values, schema_field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass
class EmbedOutcome:
    """What a distributor returns for the run's summary."""

    embedded: Counter  # model_id → slices embedded
    committed: Counter  # model_id → rows committed (fewer when a concurrent ingest committed some first)
    failures: list[Failure]
    engine: str
    engine_notes: list[str]
    n_embedded: int  # slices embedded by at least one model (models may lack different slices)
    n_failed_slices: int  # slices of files that could not be decoded or embedded
    n_warned_files: int  # files embedded whose readers or codecs printed warnings


class RowCommitter:
    """Gathers unit rows and commits them in transactions of about `commit_rows`, so the number of
    table versions follows the rows, not the batches or units. `on_commit(parts)` hears which
    units' parts each commit ended (their leases)."""

    def __init__(self, store: Store, run_id: str, model_ids: list[str], commit_rows: int, stage_seconds: Counter,
                 on_commit: Callable[[list[str]], None] | None = None):
        self.store, self.run_id, self.model_ids = store, run_id, model_ids
        self.on_commit = on_commit
        self.first_commit_at: float | None = None  # time.perf_counter() of the first rows committed
        self._last_flush = time.perf_counter()
        self._pending_parts: list[str] = []
        self.commit_rows = commit_rows
        self.stage_seconds = stage_seconds
        self.items: list[pa.Table] = []
        self.vectors: dict[str, list[pa.Table]] = {m: [] for m in model_ids}
        self.n_pending = 0
        self.embedded: Counter = Counter()  # model_id → slices embedded
        self.committed: Counter = Counter()  # model_id → rows added
        self.n_embedded = 0  # slices embedded by at least one model
        self.n_failed_slices = 0
        self.n_warned_files = 0
        self.failures: list[Failure] = []
        self._pending_failures: list[Failure] = []

    def take(self, output: UnitOutput, progress: IngestProgress) -> None:
        """A unit's rows and failures; the bar's total loses the unit's failed slices (its progress
        is the distributor's to move)."""
        for stage, seconds in output.seconds.items():
            self.stage_seconds[stage] += seconds
        self.failures.extend(output.failures)
        self._pending_failures.extend(output.failures)
        self.n_failed_slices += output.n_failed_items
        self.n_warned_files += output.n_warned_files
        self._pending_parts.extend(output.parts)
        progress.failed(output.n_failed_items, output.failures)
        if output.items is not None:
            self.items.append(output.items)
            for model_id, rows in output.vectors.items():
                self.vectors[model_id].append(rows)
                self.embedded[model_id] += rows.num_rows
            self.n_pending += output.n_items
            self.n_embedded += output.n_items
        if self.n_pending >= self.commit_rows or self._commit_due():
            self.flush()

    def _commit_due(self) -> bool:
        """The first rows go in at once (a large archive shows committed work within seconds), then at
        least every COMMIT_SECONDS (a killed run loses little) however slowly rows come."""
        if not self.n_pending:
            return False
        return self.first_commit_at is None or time.perf_counter() - self._last_flush >= COMMIT_SECONDS

    def record_failures(self, failures: list[Failure], progress: IngestProgress) -> None:
        """Failures found while planning (files that contradict their series), committed with the rows."""
        self.failures.extend(failures)
        self._pending_failures.extend(failures)
        progress.failed(0, failures)

    def outcome(self, engine: str, engine_notes: list[str]) -> EmbedOutcome:
        return EmbedOutcome(self.embedded, self.committed, self.failures, engine, engine_notes, self.n_embedded,
                            self.n_failed_slices, self.n_warned_files)

    def flush(self) -> None:
        started = self._last_flush = time.perf_counter()
        with self.store.commit_lock():  # a concurrent ingest's commit of the same keys waits, then skips them
            if self.items:
                self.store.insert_new("items", pa.concat_tables(self.items))
                for model_id, tables in self.vectors.items():
                    if tables:
                        rows = pa.concat_tables(tables)
                        added = self.store.insert_new(slices_table_name(model_id), rows)
                        self.committed[model_id] += added
                        if added and self.first_commit_at is None:
                            self.first_commit_at = time.perf_counter()
                        if added < rows.num_rows:
                            self.remove_unreferenced_shards(model_id, rows)
                self.items, self.n_pending = [], 0
                self.vectors = {m: [] for m in self.model_ids}
            self.store.add_failures(self._pending_failures, self.run_id)
        self._pending_failures = []
        if self.on_commit is not None and self._pending_parts:
            self.on_commit(self._pending_parts)
        self._pending_parts = []
        self.stage_seconds["commit"] += time.perf_counter() - started

    def remove_unreferenced_shards(self, model_id: str, rows: pa.Table) -> None:
        """This run's shards none of whose rows were committed (a concurrent ingest committed those
        slices first): nothing will ever point at them, so they go now rather than wait for vacuum."""
        shards = sorted({s for s in rows.column("patch_shard").to_pylist() if s is not None})
        if not shards:
            return
        condition = among("patch_shard", shards)
        referenced = set(self.store.rows(slices_table_name(model_id), condition, ["patch_shard"])
                         .column("patch_shard").to_pylist())
        for shard in shards:
            if shard not in referenced:
                remove_tree(self.store.patches_root / shard)
