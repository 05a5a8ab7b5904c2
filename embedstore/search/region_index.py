"""The region index (`embedstore index STORE --regions`): region search at archive scale.

An exhaustive region search decompresses every stored slice's patch tokens (Zarr chunks of about
40 slices, 8 MB of zstd each) and scores every window of every slice: about 0.7-0.9 ms a slice here, 13-16 s
at 20,000 slices. The index keeps, per patch shard, two arrays of one stored block:

- a sketch of the tokens: each token scaled to unit length and projected on the SKETCH_DIM axes
  that carry most of a sample of the store's tokens (bfloat16: half float32's bytes to read,
  and multiplied 2-3x faster than float32 on this machine's AVX-512 cores). The candidate stage scores every
  window of every indexed slice on the sketches (the same score as the exact search, in fewer
  dimensions) and keeps the best CANDIDATES slices (10 per result asked, if more);
- a flat copy of the tokens, float16 as Zarr holds them, uncompressed and read through a memory
  map: the re-rank scores the candidates exactly from it without decompressing the chunks around
  them. The values are Zarr's, so a re-ranked score is the exhaustive search's score of that slice.

    region-index/<model_id>/b<block>/index.json           block, sketch size, the shards and rows held
    region-index/<model_id>/b<block>/projection.npy       (D, SKETCH_DIM) float32
    region-index/<model_id>/b<block>/<shard>.sketch.npy   (rows × tokens, SKETCH_DIM) bfloat16 bits as int16
    region-index/<model_id>/b<block>/<shard>.tokens.npy   (rows, tokens, D) float16

Bytes a slice: tokens × (2 × SKETCH_DIM + 2 × D); 256 tokens of ViT-S/14 at 224 px: 212,992
(16 KB of sketch, 196 KB of copy). A shard is written once and never changed (store/patches.py),
so an index built earlier stays right for the shards it holds; slices of shards it does not hold
(ingested since) are scored exactly from Zarr beside the candidates, and `embedstore index
--regions` again adds their shards. Derived data: safe to delete, rebuilt by that command.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from embedstore.errors import UsageError
from embedstore.search.region_scores import unit_tokens, window_sums
from embedstore.store import REGION_INDEX_DIR, Store, now_utc
from embedstore.store.location import local_folder
from embedstore.store.patches import PatchReader
from embedstore.store.schema import slices_table_name

SKETCH_DIM = 32
SAMPLE_SLICES = 500  # slices whose tokens choose the sketch's axes
SLICES_PER_PASS = 250  # slices whose sketch products are summed at once (a few MB: they stay in cache)
CANDIDATES = 100  # slices the candidate stage hands to the exact re-rank, at least (10 per result asked)
MANIFEST = "index.json"
INDEX_VERSION = 2  # what index.json says of its files' layout: another one is built again


def index_folder(store: Store, model_id: str, block: int) -> Path:
    return local_folder(store.path, REGION_INDEX_DIR) / model_id / f"b{block}"


def shard_file(patch_shard: str, kind: str) -> str:
    """The index's file name for a shard (`<model_id>/<shard>` in the table) and kind (sketch, tokens)."""
    return f"{patch_shard.rsplit('/', 1)[-1]}.{kind}.npy"


@dataclass(frozen=True)
class ShardRows:
    """Rows sorted by patch shard and offset, as shard codes (a dictionary encoding: the rows of
    20,000 slices name a few dozen shards) and offsets."""
    names: list[str]  # the shards, by code
    codes: np.ndarray  # (n,) each row's shard code
    offsets: np.ndarray  # (n,) each row's offset in its shard

    @classmethod
    def of(cls, rows: pa.Table) -> ShardRows:
        encoded = rows.column("patch_shard").combine_chunks().dictionary_encode()
        return cls(encoded.dictionary.to_pylist(), encoded.indices.to_numpy(), rows.column("patch_offset").to_numpy())

    def __len__(self) -> int:
        return len(self.offsets)

    def take(self, positions: np.ndarray) -> ShardRows:
        return ShardRows(self.names, self.codes[positions], self.offsets[positions])

    def shard(self, position: int) -> str:
        return self.names[self.codes[position]]

    def runs(self, start: int = 0, end: int | None = None):
        """(first, last) of each run of one shard among rows start..end."""
        end = len(self) if end is None else end
        if end <= start:
            return
        cuts = [start, *(start + 1 + np.flatnonzero(np.diff(self.codes[start:end]))).tolist(), end]
        yield from zip(cuts[:-1], cuts[1:])


@dataclass
class RegionIndex:
    folder: Path
    block: int
    projection: torch.Tensor  # (D, d)
    shards: dict[str, int]  # patch shard → rows the index holds
    _arrays: dict = field(default_factory=dict)

    def holds(self, rows: ShardRows) -> np.ndarray:
        """Per row, whether the index holds it."""
        held = np.array([self.shards.get(name, 0) for name in rows.names], dtype=np.int64)
        return rows.offsets < held[rows.codes]

    def array(self, patch_shard: str, kind: str) -> np.ndarray:
        """A shard's sketch or flat copy, as a memory map kept open: its pages stay mapped from one
        search to the next (mapping them again costs more than scoring them). Copy-on-write, so that
        torch takes it without a copy; nothing is ever written to it."""
        if (patch_shard, kind) not in self._arrays:
            self._arrays[patch_shard, kind] = np.load(self.folder / shard_file(patch_shard, kind), mmap_mode="c")
        return self._arrays[patch_shard, kind]


_OPENED: dict[Path, tuple[int, RegionIndex]] = {}  # folder → (its index.json's mtime, the index)


def open_region_index(store: Store, model_id: str, block: int) -> RegionIndex | None:
    """The region index of a model's block, or None when none was built (or it does not load); kept
    open for the process until it is built again."""
    folder = index_folder(store, model_id, block)
    try:
        modified = (folder / MANIFEST).stat().st_mtime_ns
        if folder in _OPENED and _OPENED[folder][0] == modified:
            return _OPENED[folder][1]
        manifest = json.loads((folder / MANIFEST).read_text())
        index = RegionIndex(folder, block, torch.from_numpy(np.load(folder / "projection.npy")), manifest["shards"])
    except (OSError, ValueError, KeyError):
        return None
    _OPENED[folder] = modified, index
    return index


@dataclass
class RegionIndexReport:
    model_id: str
    block: int
    n_slices: int
    n_shards: int
    n_shards_added: int
    sketch_dim: int
    bytes_per_slice: int
    size_bytes: int
    seconds: float
    folder: str


def build_region_index(store: Store, model_id: str | None = None, block: int | None = None) -> RegionIndexReport:
    """Index the patch tokens of one stored block of a model (default: the last stored), adding the
    shards an earlier build does not hold and dropping those the store no longer has."""
    from embedstore.search.regions import stored_block

    started = time.perf_counter()
    model_id = store.resolve_model_id(model_id)
    spec = store.spec(model_id)
    block = stored_block(spec, block)
    rows = store.rows(slices_table_name(model_id), "patch_shard IS NOT NULL", ["patch_shard"])
    wanted = sorted(set(rows.column("patch_shard").to_pylist()))
    if not wanted:
        raise UsageError(f"model {model_id} has no slices with patch tokens to index")
    folder = index_folder(store, model_id, block)
    reader = PatchReader(store.patches_root)
    held = _current_shards(folder, spec.embed_dim)
    if not held:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        np.save(folder / "projection.npy", _sketch_axes(reader, wanted, block))
    projection = torch.from_numpy(np.load(folder / "projection.npy"))
    shards = {shard: held[shard] for shard in wanted if shard in held}
    for shard in wanted:
        if shard not in shards:
            shards[shard] = _index_shard(folder, reader, shard, block, projection)
    for shard in set(held) - set(shards):
        for kind in ("sketch", "tokens"):
            (folder / shard_file(shard, kind)).unlink(missing_ok=True)
    _write_json(folder / MANIFEST, {"version": INDEX_VERSION, "block": block, "dim": spec.embed_dim,
                                    "sketch_dim": SKETCH_DIM, "built_at": now_utc().isoformat(), "shards": shards})
    tokens = spec.grid[0] * spec.grid[1]
    return RegionIndexReport(
        model_id=model_id, block=block, n_slices=sum(shards.values()), n_shards=len(shards),
        n_shards_added=len(set(shards) - set(held)), sketch_dim=SKETCH_DIM,
        bytes_per_slice=tokens * (2 * SKETCH_DIM + 2 * spec.embed_dim),
        size_bytes=sum(path.stat().st_size for path in folder.iterdir()), seconds=time.perf_counter() - started,
        folder=str(folder))


def _current_shards(folder: Path, dim: int) -> dict[str, int]:
    """The shards an earlier build left complete, when it was built as this one would be."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    if (manifest.get("version"), manifest.get("dim"), manifest.get("sketch_dim")) != (INDEX_VERSION, dim, SKETCH_DIM):
        return {}
    return {shard: rows for shard, rows in manifest["shards"].items()
            if all((folder / shard_file(shard, kind)).exists() for kind in ("sketch", "tokens"))}


def _sketch_axes(reader: PatchReader, shards: list[str], block: int) -> np.ndarray:
    """(D, SKETCH_DIM): the axes that keep most of the sampled unit tokens' dot products (the top
    eigenvectors of their second moment, not centred: the sketch approximates cosines)."""
    rng = np.random.default_rng(0)
    per_shard = max(1, SAMPLE_SLICES // len(shards))
    sample = []
    for shard in shards[:SAMPLE_SLICES]:
        n = reader.array(shard, block).shape[0]
        offsets = np.sort(rng.choice(n, min(n, per_shard), replace=False))
        sample.append(unit_tokens(reader.read(shard, offsets, block)).reshape(-1, reader.array(shard, block).shape[2]))
    tokens = np.concatenate(sample)
    _, vectors = np.linalg.eigh(tokens.T.astype(np.float64) @ tokens)
    return np.ascontiguousarray(vectors[:, ::-1][:, :SKETCH_DIM], dtype=np.float32)


def _index_shard(folder: Path, reader: PatchReader, shard: str, block: int, projection: torch.Tensor) -> int:
    """Write a shard's flat copy and sketch (each file whole before its name appears); its rows."""
    tokens = reader.read(shard, np.arange(reader.array(shard, block).shape[0]), block)
    sketch = torch.nn.functional.normalize(torch.from_numpy(tokens).float(), dim=-1) @ projection
    _save(folder / shard_file(shard, "tokens"), tokens)
    bits = sketch.reshape(-1, sketch.shape[-1]).to(torch.bfloat16).view(torch.int16)  # NumPy has no bfloat16
    _save(folder / shard_file(shard, "sketch"), bits.numpy())
    return len(tokens)


def _save(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        np.save(file, array)
    os.replace(temporary, path)


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(temporary, path)


def candidate_count(k: int, per_slice: int) -> int:
    """Slices re-ranked exactly for k results of at most `per_slice` regions a slice."""
    return max(CANDIDATES, 10 * k * per_slice)


def candidate_rows(index: RegionIndex, query: torch.Tensor, rows: ShardRows, grid: tuple[int, int], score: str,
                   n_candidates: int, groups: list | None) -> np.ndarray:
    """Positions (into the given rows, all held by the index) of the `n_candidates` rows that score
    highest on the sketches; with `groups` (each row's series or study), the best row of each of the
    best groups."""
    query_sketch = (torch.nn.functional.normalize(query, dim=-1) @ index.projection).to(torch.bfloat16)
    approximate = np.empty(len(rows), dtype=np.float32)
    for start, end in rows.runs():
        sketch = index.array(rows.shard(start), "sketch")
        part = rows.offsets[start:end]
        tokens = grid[0] * grid[1]
        if 4 * len(part) * tokens >= len(sketch):  # most of the shard: score it all, keep the rows asked
            approximate[start:end] = sketch_scores(sketch, query_sketch, grid, score)[part]
        else:
            places = (part[:, None] * tokens + np.arange(tokens)).ravel()
            approximate[start:end] = sketch_scores(sketch[places], query_sketch, grid, score)
    order = np.argsort(-approximate, kind="stable")
    if groups is None:
        return np.sort(order[:n_candidates])
    best_of_group: dict = {}
    for position in order:
        best_of_group.setdefault(groups[position], position)
        if len(best_of_group) == n_candidates:
            break
    return np.sort(np.fromiter(best_of_group.values(), dtype=np.int64))


def sketch_scores(sketch: np.ndarray, query_sketch: torch.Tensor, grid: tuple[int, int], score: str) -> np.ndarray:
    """(n,): each slice's `score` (its best window's, or late interaction) on the sketches, from the
    slices' sketches (n*Gh*Gw, d) and the query's (h, w, d), both bfloat16: the products of a few
    hundred slices at a time stay in the processor's cache while their windows are summed."""
    h, w, _ = query_sketch.shape
    per_position = query_sketch.reshape(h * w, -1)
    sketch = torch.from_numpy(sketch).view(torch.bfloat16)
    tokens = grid[0] * grid[1]
    n = len(sketch) // tokens
    out = torch.empty(n)
    for start in range(0, n, SLICES_PER_PASS):
        end = min(n, start + SLICES_PER_PASS)
        products = (per_position @ sketch[start * tokens:end * tokens].T).float().reshape(h * w, end - start, tokens)
        if score == "late":
            out[start:end] = products.amax(dim=2).mean(dim=0)
        else:
            out[start:end] = window_sums(products, grid, (h, w)).flatten(1).amax(dim=1) / (h * w)
    return out.numpy()
