"""The write stage: patch shards to Zarr, rows to LanceDB in large commits.

Runs on its own thread so the model never waits for the disk. A commit closes the current patch
shard first (the patches then exist), then adds the rows in one transaction.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from embedstore.pipeline.plan import slice_key
from embedstore.models.embedder import Embeddings
from embedstore.sources import Failure, SliceItem
from embedstore.store import Store
from embedstore.store.patches import PatchShardWriter
from embedstore.store.schema import slices_schema

DEFAULT_COMMIT_ROWS = 4096
VECTOR_COLUMNS = ("cls", "patch_mean")
ITEM_METADATA = ("body_part", "series_description", "study_date", "pixel_spacing", "slice_thickness",
                 "image_position", "image_orientation", "slice_position", "intensity")


@dataclass
class EmbeddedBatch:
    items: list[SliceItem]  # rows/cols/modality/intensity filled in from decoding
    embeddings: Embeddings


class SliceWriter:
    def __init__(self, store: Store, model_id: str, run_id: str, dim: int, tokens: int,
                 keep_patches: bool, commit_rows: int = DEFAULT_COMMIT_ROWS):
        self.store = store
        self.model_id = model_id
        self.run_id = run_id
        self.dim = dim
        self.tokens = tokens
        self.keep_patches = keep_patches
        self.commit_rows = commit_rows
        self.n_committed = 0
        self.n_commits = 0
        self.seconds = {"write_patches": 0.0, "commit": 0.0}
        self._rows: list[dict] = []
        self._cls: list[np.ndarray] = []
        self._patch_mean: list[np.ndarray] = []
        self._failures: list[Failure] = []
        self._shard: PatchShardWriter | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="embedstore-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producer side
    def submit(self, batch: EmbeddedBatch) -> None:
        self._raise_if_failed()
        self._queue.put(("batch", batch))

    def submit_failures(self, failures: list[Failure]) -> None:
        if failures:
            self._raise_if_failed()
            self._queue.put(("failures", list(failures)))  # a copy: the caller keeps appending to its list

    def close(self) -> None:
        """Commit everything still pending and stop the thread; re-raises a write error."""
        self._queue.put(("close", None))
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing to the store failed: {self._error}") from self._error

    # ------------------------------------------------------------ writer thread
    def _drain(self) -> None:
        while True:
            kind, payload = self._queue.get()
            try:
                if self._error is not None:
                    if kind == "close":
                        return
                    continue  # keep consuming so the producer never blocks on a dead writer
                if kind == "batch":
                    self._add(payload)
                elif kind == "failures":
                    self._failures.extend(payload)
                else:
                    self._commit()
                    return
            except BaseException as error:  # surfaced to the producer on its next call
                self._error = error
                if kind == "close":
                    return

    def _add(self, batch: EmbeddedBatch) -> None:
        started = time.perf_counter()
        offsets = [None] * len(batch.items)
        shard_path = None
        if self.keep_patches:
            if self._shard is None:
                self._shard = PatchShardWriter(
                    self.store.patches_root, self.model_id, f"{self.run_id}-{self.n_commits:05d}",
                    self.commit_rows, self.tokens, self.dim,
                )
            offsets = self._shard.append(batch.embeddings.patches).tolist()
            shard_path = self._shard.relative_path
        self._rows.extend(row_metadata(self.model_id, self.run_id, batch.items, shard_path, offsets))
        self._cls.append(batch.embeddings.cls)
        self._patch_mean.append(batch.embeddings.patch_mean)
        self.seconds["write_patches"] += time.perf_counter() - started
        if len(self._rows) >= self.commit_rows:
            self._commit()

    def _commit(self) -> None:
        started = time.perf_counter()
        if self._shard is not None:
            self._shard.close()  # patches are on disk before any row points at them
            self._shard = None
        if self._rows:
            self.n_committed += self.store.add_slices(
                slice_table(self._rows, np.concatenate(self._cls), np.concatenate(self._patch_mean), self.dim))
            self.n_commits += 1
        self.store.add_failures(self._failures, self.run_id)
        self._rows, self._cls, self._patch_mean, self._failures = [], [], [], []
        self.seconds["commit"] += time.perf_counter() - started


def row_metadata(model_id: str, run_id: str, items: list[SliceItem], shard_path: str | None,
                 offsets: list[int | None]) -> list[dict]:
    """The `slices` columns of embedded items, all but the vectors."""
    return [{
        "key": slice_key(model_id, item.item_id), "model_id": model_id, "item_id": item.item_id,
        "path": item.path, "patient_id": item.patient_id, "study_uid": item.study_uid,
        "series_uid": item.series_uid, "sop_uid": item.sop_uid, "frame": item.frame,
        "slice_index": item.slice_index, "modality": item.modality, "rows": item.rows,
        "cols": item.cols, **{name: getattr(item, name) for name in ITEM_METADATA},
        "patch_shard": shard_path, "patch_offset": offset, "run_id": run_id,
    } for item, offset in zip(items, offsets)]


def slice_table(rows: list[dict], cls: np.ndarray, patch_mean: np.ndarray, dim: int) -> pa.Table:
    """`slices` rows as one Arrow table in the store's schema."""
    schema = slices_schema(dim)
    metadata = pa.schema([f for f in schema if f.name not in VECTOR_COLUMNS])
    table = pa.Table.from_pylist(rows, schema=metadata)
    for name, vectors in (("cls", cls), ("patch_mean", patch_mean)):
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
        table = table.append_column(schema.field(name), pa.FixedSizeListArray.from_arrays(flat, dim))
    return table.select(schema.names)
