"""The Python API: a store opened with `embedstore.open`, read without the command line.

    import embedstore

    store = embedstore.open("archive-store")
    [spec.model_id for spec in store.models()]  # ['dinov2_vits14-hub-3f2a...-224px-pp2.1384af']
    v = store.vectors(feature="cls+patch_mean", where="modality = 'CT'")
    v.matrix                                    # (n, 768) float32
    v.rows                                      # pyarrow Table: key, path, patient_id, ..., row i for vector i
    key = v.rows["key"][0].as_py()
    store.patches(key)                          # (grid_h * grid_w, 384) float16, the last kept block
    store.search(key=key, k=5, feature="patch_mean")  # [Hit(rank=1, similarity=0.98, key=...), ...]
    store.export("ct.parquet", "parquet", feature="cls", labels="labels.csv")

Models are named by any unique prefix of their id; `model=None` means the store's only model.
Every wrong request (unknown model, feature, block, key, a `where` outside the filter language)
raises `embedstore.errors.UsageError` with a message saying what to do. Reading never writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from embedstore.errors import UsageError
from embedstore.export import ExportSummary, export_vectors
from embedstore.models.spec import ModelSpec
from embedstore.search.where import validated_where
from embedstore.store import Store, equals
from embedstore.store.patches import read_patches
from embedstore.store.schema import series_table_name, slices_table_name
from embedstore.store.vectors import LEVELS, Vectors, load_vectors

if TYPE_CHECKING:
    from embedstore.search.similar import Hit, Hits

__all__ = ["EmbedStore", "Hit", "Hits", "Vectors", "open_store"]


def __getattr__(name: str):
    """`embedstore.api.Hit` and `Hits` without importing search (and torch) when a store is only opened."""
    if name in ("Hit", "Hits"):
        from embedstore.search import similar

        return getattr(similar, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EmbedStore:
    """An embedstore store, read through a small API. Make one with `embedstore.open(path)`.

    The underlying `embedstore.store.Store` is `.store` (Lance datasets: `.store.dataset(name)`; the LanceDB
    connection: `.store.db`)."""

    def __init__(self, path: str | Path):
        self.store = Store.open(path)

    def __repr__(self) -> str:
        return f"embedstore.open({str(self.path)!r})  # {len(self.store.specs())} models"

    @property
    def path(self) -> Path:
        return self.store.path

    # ------------------------------------------------------------------ models
    def models(self) -> list[ModelSpec]:
        """Every model's spec, in the order the models were added.

        Example::

            [(m.model_id, m.embed_dim, m.cls_layers, m.patch_layers) for m in store.models()]
            # [('dinov2_vits14-hub-...', 384, (8, 9, 10, 11), (11,))]
        """
        return list(self.store.specs().values())

    def model(self, prefix: str | None = None) -> ModelSpec:
        """The spec of the model whose id starts with `prefix` (the only model when None).

        Example::

            store.model("dinov2_vitb").embed_dim  # 768
        """
        return self.store.spec(self.store.resolve_model_id(prefix))

    # ------------------------------------------------------------------ tables
    def vectors(self, model: str | None = None, feature: str = "cls", level: str = "slice",
                where: str | None = None) -> Vectors:
        """One model's vectors as a matrix: `.matrix` (n, D) float32 and `.rows`, a pyarrow Table of
        identity columns (key, path, patient_id, study_uid, series_uid, sop_uid, slice_index, modality;
        at series level key is the series UID, with n_slices), row i describing vector i, sorted by key.

        feature: cls, patch_mean, cls+patch_mean, clsN (the CLS of the last N kept blocks,
        concatenated) or clsN+patch_mean. level: slice, or series (the mean of each series' slices).
        where: a filter on the table's metadata columns, e.g. "modality = 'CT' AND body_part = 'CHEST'".

        Example::

            v = store.vectors(feature="patch_mean", level="series", where="modality = 'MR'")
            v.matrix.shape, v.rows.column("series_uid").to_pylist()[:2]
        """
        if level not in LEVELS:
            raise UsageError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
        model_id = self.store.resolve_model_id(model)
        table = series_table_name(model_id) if level == "series" else slices_table_name(model_id)
        condition = self._where(table, where)
        return load_vectors(self.store, model_id, feature, level, condition)

    def items(self, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """The `items` table (one row per slice or frame, whatever the number of models): key, DICOM
        identity, geometry (pixel_spacing, image_position, slice_position, ...). `where` filters as in
        `vectors`; `columns` picks columns.

        Example::

            store.items("modality = 'CT'", columns=["key", "slice_position"]).to_pylist()[:2]
        """
        if columns is not None:
            unknown = sorted(set(columns) - set(self.store.schema("items").names))
            if unknown:
                raise UsageError(f"the items table has no column {', '.join(unknown)}")
        return self.store.rows("items", self._where("items", where), columns)

    def patches(self, key: str, model: str | None = None, block: int | None = None) -> np.ndarray:
        """One slice's patch tokens, (grid_h * grid_w, embed_dim) float16, row-major over the patch
        grid, of a block whose tokens the ingest kept (default: the last kept block; a negative block
        counts from the end of the network, as `--patch-layers` does).

        Example::

            spec = store.model()
            grid = store.patches(key).reshape(spec.grid_h, spec.grid_w, spec.embed_dim)
        """
        spec = self.model(model)
        if not spec.patch_layers:
            raise UsageError(f"model {spec.model_id} kept no patch tokens (it was ingested with --no-patches)")
        if block is None:
            block = spec.patch_layers[-1]
        elif block < 0:
            block += spec.num_blocks
        if block not in spec.patch_layers:
            raise UsageError(f"model {spec.model_id} kept the patch tokens of block"
                             f"{'s' if len(spec.patch_layers) > 1 else ''} {', '.join(map(str, spec.patch_layers))} "
                             f"only, not block {block} (ingest with --patch-layers to keep others)")
        rows = self.store.rows(slices_table_name(spec.model_id), equals("key", key),
                               ["patch_shard", "patch_offset"]).to_pylist()
        if not rows:
            raise UsageError(f"no slice with key {key!r} of model {spec.model_id} in store {self.path}")
        if rows[0]["patch_shard"] is None:
            raise UsageError(f"slice {key!r} of model {spec.model_id} has no patch tokens stored")
        return read_patches(self.store.patches_root, rows[0]["patch_shard"], [rows[0]["patch_offset"]], block)[0]

    # ------------------------------------------------------------------ search
    def search(self, key: str | None = None, series_uid: str | None = None, image: str | Path | None = None,
               vector: np.ndarray | None = None, k: int = 10, level: str = "slice", model: str | None = None,
               feature: str = "cls", where: str | None = None, study_uid: str | None = None,
               box: tuple[int, int, int, int] | None = None, block: int | None = None, per_slice: int = 1,
               score: str = "window", exact: bool = False) -> Hits:
        """The k stored slices, series or studies (`level`) most similar (cosine) to one query:
        a stored slice (`key`), series (`series_uid`) or study (`study_uid`), an image file embedded
        on the fly with the store's model and preprocessing (`image`), or your own `vector` (D,) or
        vectors (n, D) in the feature's width. The query's own slice, series or study is left out.
        The result is a list of Hit with `.plan`: how the search ran (`plan.name`: exact,
        exact-filtered, index or index+probes N; `plan.rows_kept`: rows the filter kept). A filter
        that keeps no row gives an empty list, with its plan.

        Example::

            for hit in store.search(key="dicom:1.2.826...:0", k=3, feature="patch_mean", where="modality = 'CT'"):
                print(hit.rank, round(hit.similarity, 3), hit.series_uid, hit.slice_index, hit.path)
            store.search(image="query.dcm", level="study", k=5)

        With `box=(x0, y0, x1, y1)` (columns then rows, in the `key` slice's or `image`'s own pixels)
        it is a region search over the stored patch tokens (`block`, default the last stored): Hits
        of RegionHit, each a slice `key` with the matched `box` in that slice's pixels and a `score`,
        at most `per_slice` a slice (level slice) or the best of each series or study; `score` window
        or late (see embedstore.search.regions). Through the region index when `index_regions` built
        one (plan index-regions), else, or with `exact`, every slice scored (plan exact-regions)::

            for hit in store.search(key="dicom:1.2.826...:0", box=(120, 200, 180, 260), k=5):
                print(hit.rank, round(hit.score, 3), hit.key, hit.box)
        """
        from embedstore.search import regions, similar  # torch: only when a search runs

        sources = {"key": ("key", key), "series_uid": ("series_uid", series_uid), "study_uid": ("study_uid", study_uid),
                   "image": ("image", image), "vector": ("vector", vector)}
        if box is not None:
            query = regions.region_query_for(self.store, sources, box, model, block)
            return regions.search_regions(self.store, query, k, where, level, per_slice, score, exact=exact)
        query = similar.query_for(self.store, sources, feature, model)
        return similar.search(self.store, query, k, level, feature, where)

    def index_regions(self, model: str | None = None, block: int | None = None):
        """Build (or bring up to date) the region index of a model's stored block (default the last),
        which region searches then pick their candidates from; returns what it holds and costs
        (embedstore.search.region_index.RegionIndexReport). The CLI's `index STORE --regions`."""
        from embedstore.search.region_index import build_region_index

        return build_region_index(self.store, model, block)

    # ------------------------------------------------------------------ export and the rest
    def export(self, out: str | Path, format: str = "parquet", model: str | None = None, feature: str = "cls",
               level: str = "slice", where: str | None = None, labels: str | Path | None = None,
               overwrite: bool = False) -> ExportSummary:
        """Write vectors with their metadata: `parquet` (one file, metadata columns and a `vector`
        column) or `npy` (a directory with vectors.npy and rows.parquet); see `embedstore.export`.
        `labels`: a labels CSV whose label (and split) are joined in; unlabelled rows keep null.
        An existing export is replaced only with `overwrite`; `out` is never inside the store.

        Example::

            store.export("vectors.parquet", "parquet", feature="cls+patch_mean").n_rows
        """
        return export_vectors(self.store, out, format, model, feature=feature, level=level, where=where, labels=labels,
                              overwrite=overwrite)

    def failures(self, reason: str | None = None) -> list[dict]:
        """The inputs that could not be embedded (path, stage, reason, message, run_id, time), oldest
        first; `reason` keeps one failure code (e.g. "truncated", "not_dicom")."""
        from embedstore.store.info import list_failures

        return list_failures(self.store, reason)

    def info(self) -> dict:
        """What the store holds, as `embedstore info --json` prints it: tables, models and their
        counts, modalities, patch bytes, failures by reason, the last run."""
        from embedstore.store.info import store_info

        return store_info(self.store)

    def _where(self, table: str, where: str | None) -> str | None:
        if not where:
            return None
        if not self.store.has_table(table):
            raise UsageError(f"store {self.path} has no table {table}")
        return validated_where(where, self.store.schema(table))


def open_store(path: str | Path) -> EmbedStore:
    """`embedstore.open`: the store at `path` (a UsageError when there is none)."""
    return EmbedStore(path)
