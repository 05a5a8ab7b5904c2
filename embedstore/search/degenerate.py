"""Whether a feature's vectors can rank anything at all: the cosine similarities of a sample's
pairs must spread.

A randomly initialised DINOv2 gives every image the same CLS vector: on a random-weights store the
5th-95th percentile range of its pairwise cosine similarity was 1e-8 (patch_mean: 1.3). Search,
kNN and an index on such vectors return noise that looks like results, so `search`, `eval` and
`index` warn when the range is below MIN_SPREAD or the spread's std below MIN_STD. Trained models
spread by tenths even on one series, far above either bound.
"""

from __future__ import annotations

import numpy as np

from embedstore.store import Store, reading
from embedstore.store.schema import series_table_name, slices_table_name
from embedstore.store.vectors import column_matrix, feature_columns, l2_normalised

SAMPLE_ROWS = 200
MIN_ROWS = 5  # fewer pairs tell nothing
MIN_SPREAD = 1e-3  # 5th to 95th percentile of the pairwise cosine similarity
MIN_STD = 1e-4


def degenerate_warning(matrix: np.ndarray, feature: str, seed: int = 0) -> str | None:
    """One line saying the vectors (rows of `matrix`, a random sample of them) are all alike; None
    when they spread, or are too few to tell."""
    if len(matrix) < MIN_ROWS:
        return None
    if len(matrix) > SAMPLE_ROWS:
        matrix = matrix[np.random.default_rng(seed).choice(len(matrix), SAMPLE_ROWS, replace=False)]
    unit = l2_normalised(np.asarray(matrix, dtype=np.float64))
    similarity = (unit @ unit.T)[np.triu_indices(len(unit), 1)]
    low, high = np.percentile(similarity, [5, 95])
    if high - low >= MIN_SPREAD and similarity.std() >= MIN_STD:
        return None
    return (f"{feature} vectors are degenerate: any two of {len(unit)} sampled have cosine similarity "
            f"{np.median(similarity):.6f} (5th-95th percentile range {high - low:.1e}), so rankings on them "
            "mean nothing (random weights? try patch_mean)")


def stored_feature_warning(store: Store, model_id: str, feature: str, level: str = "slice") -> str | None:
    """degenerate_warning for a random sample of the stored vectors (read by offset: a large
    table is not loaded to check it)."""
    spec = store.spec(model_id)
    table = series_table_name(model_id) if level == "series" else slices_table_name(model_id)
    dataset = store.dataset(table)
    n_rows = dataset.count_rows()
    offsets = np.random.default_rng(0).choice(n_rows, min(n_rows, SAMPLE_ROWS), replace=False)
    parts = feature_columns(spec, feature)
    with reading(store.path, table):
        rows = dataset.take(sorted(int(i) for i in offsets), columns=parts)
    return degenerate_warning(np.concatenate([column_matrix(rows.column(p)) for p in parts], axis=1), feature)
