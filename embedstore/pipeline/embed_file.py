"""Embed files outside an ingest (a query image): the same catalog, decode and model as the
stored vectors, rebuilt from the store's model spec, so a query is comparable with what is stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedstore.errors import UsageError
from embedstore.models import LoadedModel, rebuild_model
from embedstore.models.embedder import Embedder
from embedstore.models.spec import ModelSpec, cls_column
from embedstore.pipeline.batching import SliceBatcher
from embedstore.preprocess import DecodeSettings, decode_task
from embedstore.sources import build_catalog, check_sources, discover
from embedstore.store import Store


def embed_file(store: Store, path: str | Path, model_id: str, axis: str = "axial",
               weights: str | None = None) -> dict[str, np.ndarray]:
    """Every slice of `path` embedded by the store's model `model_id`: stored-column name
    (cls, patch_mean, cls_b<i>) → (n slices, D)."""
    spec = store.spec(model_id)
    return embed_with(rebuild_model(spec, weights), spec, path, axis)


def embed_with(loaded: LoadedModel, spec: ModelSpec, path: str | Path, axis: str = "axial") -> dict[str, np.ndarray]:
    """`embed_file` with a model already rebuilt from `spec` (a service keeps it between queries)."""
    found, failures = discover(check_sources([path]))
    catalog = build_catalog(found, axis=axis)
    if failures or catalog.failures or not catalog.tasks:
        reason = (failures + catalog.failures)[0] if failures or catalog.failures else None
        raise UsageError(f"{path} cannot be embedded" + (f": {reason.reason}: {reason.message}" if reason else ""))
    settings = DecodeSettings(spec.intensity, spec.image_size, (spec.interpolation,))
    batcher = SliceBatcher(max(1, catalog.n_items))
    for task in catalog.tasks:
        batcher.add(decode_task(task, settings))
    embeddings = Embedder(loaded, engine="eager").embed(batcher.take()[1][spec.interpolation], keep_patches=False)
    columns = {"cls": embeddings.cls, "patch_mean": embeddings.patch_mean}
    for position, block in enumerate(spec.cls_layers):
        columns[cls_column(block)] = embeddings.cls_layers[:, position]
    return columns
