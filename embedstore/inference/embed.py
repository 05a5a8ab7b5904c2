"""Embed files outside an ingest (a query image): the same catalog, decode and model as the
stored vectors, rebuilt from the store's model spec, so a query is comparable with what is stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedstore.errors import InputError, UsageError
from embedstore.inference.batching import SliceBatcher
from embedstore.models.build import LoadedModel, rebuild_model
from embedstore.models.embedder import Embedder, Embeddings
from embedstore.models.spec import ModelSpec, cls_column
from embedstore.preprocess import DecodeSettings, decode_task
from embedstore.sources.catalog import build_catalog
from embedstore.sources.discover import check_sources, discover
from embedstore.sources.records import SliceItem
from embedstore.sources.limits import DEFAULT_MAX_PIXELS
from embedstore.store import Store

READABLE = "DICOM (a .dcm, .dicom or .ima name, or the DICM preamble), NIfTI (.nii, .nii.gz), PNG, JPEG or TIFF"


def embed_file(store: Store, path: str | Path, model_id: str, axis: str = "axial",
               weights: str | None = None) -> dict[str, np.ndarray]:
    """Every slice of `path` embedded by the store's model `model_id`: stored-column name
    (cls, patch_mean, cls_b<i>) → (n slices, D)."""
    spec = store.spec(model_id)
    return embed_with(rebuild_model(spec, weights), spec, path, axis)


def embed_with(loaded: LoadedModel, spec: ModelSpec, path: str | Path, axis: str = "axial",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """`embed_file` with a model already rebuilt from `spec` (a service keeps it between queries).
    UsageError saying why when the file cannot be embedded; `max_pixels` as the ingest's
    `--max-pixels`."""
    embeddings, _ = embeddings_of_file(loaded, spec, path, axis, max_pixels, keep_patches=False)
    columns = {"cls": embeddings.cls, "patch_mean": embeddings.patch_mean}
    for position, block in enumerate(spec.cls_layers):
        columns[cls_column(block)] = embeddings.cls_layers[:, position]
    return columns


def embeddings_of_file(loaded: LoadedModel, spec: ModelSpec, path: str | Path, axis: str = "axial",
                       max_pixels: int = DEFAULT_MAX_PIXELS,
                       keep_patches: bool = False) -> tuple[Embeddings, list[SliceItem]]:
    """Every slice of `path` through the model, and the slices (their native rows and columns)."""
    found, failures = discover(check_sources([path]))
    if not found and not failures:
        raise UsageError(f"{path} cannot be embedded: it is not a file embedstore reads ({READABLE})")
    catalog = build_catalog(found, axis, max_pixels)
    if failures or catalog.failures:
        reason = (failures + catalog.failures)[0]
        raise UsageError(f"{path} cannot be embedded: {reason.reason}: {reason.message}")
    if not catalog.tasks:
        raise UsageError(f"{path} cannot be embedded: it holds no image slices")
    settings = DecodeSettings.for_specs([spec], max_pixels)
    batcher = SliceBatcher(max(1, catalog.n_items))
    for task in catalog.tasks:
        try:
            batcher.add(decode_task(task, settings))
        except InputError as error:  # what an ingest would record as a failures row
            raise UsageError(f"{path} cannot be embedded: {error.reason}: {error.message}") from None
    items, pixels = batcher.take()
    return Embedder(loaded, engine="eager").embed(pixels[spec.interpolation], keep_patches=keep_patches), items
