"""A store of synthetic vectors for the benchmarks that need many rows but no backbone run: `n_rows`
items (4 slices per series and study, CT, 512 px) and one ViT-B/14 spec (random weights, seed i) per
noise level, whose cls and patch_mean vectors are one of CLUSTERS centres plus that much noise."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

DIM, CLUSTERS = 768, 1000


def write_synthetic_store(path: Path, n_rows: int, noises: tuple[float, ...],
                          key: Callable[[int], str] = lambda i: f"synthetic:{i}") -> tuple[list[str], np.ndarray]:
    """The model ids, and each row's cluster."""
    from embedstore.models.build import load_model
    from embedstore.models.embedder import Embeddings
    from embedstore.pipeline.runner import item_rows, vector_rows
    from embedstore.sources.records import SliceItem
    from embedstore.store import Store
    from embedstore.store.schema import slices_table_name

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(CLUSTERS, DIM)).astype(np.float32)
    clusters = rng.integers(0, CLUSTERS, n_rows)
    store = Store.open(path, create=True)
    items = [SliceItem(key(i), f"/archive/{i}.dcm", f"study{i // 4}", f"series{i // 4}", i % 4,
                       modality="CT", rows=512, cols=512, intensity="ct:study") for i in range(n_rows)]
    store.insert_new("items", item_rows(items, "run"))
    model_ids = []
    for seed, noise in enumerate(noises):
        spec = load_model("dinov2_vitb14", "random", 28, seed=seed, layers=1, patch_layers=()).spec
        store.add_model(spec)
        for start in range(0, n_rows, 50_000):
            part = slice(start, min(n_rows, start + 50_000))
            cls = centres[clusters[part]] + noise * rng.normal(size=(len(clusters[part]), DIM)).astype(np.float32)
            mean = centres[clusters[part]] + noise * rng.normal(size=cls.shape).astype(np.float32)
            store.insert_new(slices_table_name(spec.model_id), vector_rows(
                spec, items[part], [Embeddings(cls, mean, cls[:, None], None)], None, [None] * len(cls), "run"))
        model_ids.append(spec.model_id)
    return model_ids, clusters
