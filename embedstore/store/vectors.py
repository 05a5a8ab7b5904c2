"""Stored vectors as one contiguous matrix: the input of every query and evaluation.

Features (the reference study's variants):
- `cls`: the model's pooled features (final-norm CLS token for DINOv2);
- `patch_mean`: the mean of the last block's final-norm patch tokens ("avgpool");
- `clsN`: the final-norm CLS tokens of the last N blocks, concatenated (N up to the `--layers` kept);
- `cls+patch_mean`, `clsN+patch_mean`: the two concatenated (the study's usual linear-probe input).
Vectors come from one model only: each model's vectors live in tables of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from embedstore.errors import UsageError
from embedstore.models.spec import ModelSpec, cls_column
from embedstore.store import Store
from embedstore.store.schema import series_table_name, slices_table_name

FEATURES = ("cls", "patch_mean", "cls+patch_mean", "clsN", "clsN+patch_mean")
LEVELS = ("slice", "series")
# Columns carried beside the vectors, for joins with labels and for results.
SLICE_COLUMNS = ["key", "path", "patient_id", "study_uid", "series_uid", "sop_uid", "slice_index", "modality"]
SERIES_COLUMNS = ["key", "patient_id", "study_uid", "series_uid", "modality", "n_slices"]


@dataclass
class Vectors:
    model_id: str
    feature: str
    level: str
    rows: pa.Table  # the identity columns, one row per vector
    matrix: np.ndarray  # (n, D) float32, C-contiguous, in the order of `rows`

    def __len__(self) -> int:
        return len(self.matrix)


def feature_columns(spec: ModelSpec, feature: str) -> list[str]:
    """The stored columns a feature concatenates; UsageError for a feature the model's rows lack."""
    columns = []
    for part in feature.split("+"):
        blocks = re.fullmatch(r"cls(\d+)", part)
        if part in ("cls", "patch_mean"):
            columns.append(part)
        elif blocks:
            n = int(blocks.group(1))
            if not 1 <= n <= len(spec.cls_layers):
                kept = f"the last {len(spec.cls_layers)}" if spec.cls_layers else "no"
                raise UsageError(f"feature {part}: model {spec.model_id} keeps the CLS token of {kept} blocks "
                                 "(re-ingest with a larger --layers)")
            columns.extend(cls_column(block) for block in spec.cls_layers[-n:])
        else:
            raise UsageError(f"feature must be one of {', '.join(FEATURES)} (N a number of blocks), not {feature!r}")
    if len(set(columns)) != len(columns) or feature.count("+") > 1:
        raise UsageError(f"feature {feature!r} repeats a part: use one of {', '.join(FEATURES)}")
    return columns


def load_vectors(store: Store, model_id: str | None = None, feature: str = "cls", level: str = "slice",
                 where: str | None = None, extra_columns: tuple[str, ...] = ()) -> Vectors:
    """One model's vectors at slice level, or series level (the mean of each series' slice
    vectors, as the model's series table stores them). `where` is an already validated filter;
    `extra_columns` are metadata columns wanted in `.rows` beside the identity columns."""
    return load_features(store, model_id, (feature,), level, where, extra_columns)[0]


def load_features(store: Store, model_id: str | None, features, level: str = "slice", where: str | None = None,
                  extra_columns: tuple[str, ...] = ()) -> list[Vectors]:
    """Several features of the same rows, read in one pass: one Vectors per feature, in order."""
    if level not in LEVELS:
        raise UsageError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    spec = store.spec(store.resolve_model_id(model_id))
    parts = {feature: feature_columns(spec, feature) for feature in features}
    stored = list(dict.fromkeys(column for columns in parts.values() for column in columns))
    table, identity = (slices_table_name(spec.model_id), SLICE_COLUMNS) if level == "slice" else \
        (series_table_name(spec.model_id), SERIES_COLUMNS)
    identity = identity + [name for name in extra_columns if name not in identity]
    rows = store.rows(table, where, identity + stored)
    if not rows.num_rows:
        raise UsageError(f"no {level} vectors of model {spec.model_id} match" + (f" {where}" if where else ""))
    rows = rows.sort_by("key")  # a stable order, whatever the fragments' order on disk
    matrices = {column: column_matrix(rows.column(column)) for column in stored}
    identity_rows = rows.select(identity)
    return [Vectors(spec.model_id, feature, level, identity_rows,
                    np.ascontiguousarray(np.concatenate([matrices[c] for c in parts[feature]], axis=1), dtype=np.float32))
            for feature in features]


def column_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as an (n, D) array: without a copy where Arrow's buffer allows."""
    array = column.combine_chunks()
    dim = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def l2_normalised(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)
