"""Stored vectors written out with their metadata, for tools that do not read LanceDB.

Two formats, both one model, one feature and one level (slice or series):
- `parquet`: one file; the table's metadata columns (every column but the vectors) and a `vector`
  column, fixed_size_list<float32>[D], holding the feature (for `cls+patch_mean` or `clsN`, the stored
  columns concatenated in the order of `store.vectors.feature_columns`, exactly as `load_vectors` builds it);
- `npy`: a directory holding `vectors.npy`, (n, D) float32, and `rows.parquet`, the same metadata
  columns with row i describing vector i.
Rows are sorted by `key`, as `load_vectors` sorts them. With a labels CSV (eval/labels.py's format),
`label` (and `split`, when the CSV has one) columns are added; rows the CSV does not name keep null.
Both files carry the model spec, feature, level and concatenated columns as JSON under the Parquet
schema metadata key `embedstore`. Everything is checked before anything is written: an existing
parquet file, or a non-empty npy directory, is refused unless `overwrite` (then replaced atomically,
file by file); an OUT inside the store, or one that would replace the labels CSV, is always refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedstore.errors import UsageError
from embedstore.eval.labels import JOIN_COLUMNS, read_labels
from embedstore.search.where import validated_where
from embedstore.store import Store
from embedstore.store.schema import series_table_name, slices_table_name
from embedstore.store.vectors import LEVELS, column_matrix, feature_columns
from embedstore.version import __version__

FORMATS = ("parquet", "npy")
VECTOR_COLUMN = "vector"
LABEL_COLUMNS = ("label", "split")
NPY_VECTORS = "vectors.npy"
NPY_ROWS = "rows.parquet"
METADATA_KEY = b"embedstore"


@dataclass
class ExportSummary:
    out: str
    format: str
    model_id: str
    feature: str
    level: str
    columns: list[str]  # the stored vector columns concatenated into each vector
    n_rows: int
    dim: int
    n_labelled: int | None  # rows the labels CSV named; None without labels


def metadata_columns(schema: pa.Schema) -> list[str]:
    """A model table's columns that are not vectors (list-typed columns), in table order."""
    return [field.name for field in schema if not pa.types.is_list(field.type)
            and not pa.types.is_fixed_size_list(field.type)]


def written_files(out: Path, format: str) -> list[Path]:
    return [out] if format == "parquet" else [out / NPY_VECTORS, out / NPY_ROWS]


def check_out(out: Path, format: str, store: Path, inputs: list[Path], overwrite: bool = False) -> None:
    """UsageError unless `out` may be written: never inside the store or onto an input file; an
    existing file, or a non-empty directory, only with `overwrite`."""
    if format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: its directory {out.parent} does not exist")
    resolved = out.resolve()
    if isinstance(store, Path) and (resolved == store.resolve() or resolved.is_relative_to(store.resolve())):
        raise UsageError(f"{out} is inside the store {store}: export writes outside it")
    for file in written_files(resolved, format):
        if any(file == source.resolve() for source in inputs):
            raise UsageError(f"export would replace {file}, an input of this export; write elsewhere")
    if format == "parquet" and out.is_dir():
        raise UsageError(f"{out} is a directory; parquet export writes one file (give a file name)")
    if format == "parquet" and out.exists() and not overwrite:
        raise UsageError(f"{out} exists; give --overwrite to replace it")
    if format == "npy" and out.exists():
        if not out.is_dir():
            raise UsageError(f"{out} is a file; npy export writes a directory ({NPY_VECTORS}, {NPY_ROWS})")
        if any(out.iterdir()) and not overwrite:
            raise UsageError(f"{out} is a non-empty directory; npy export needs a new or empty one "
                             f"(--overwrite replaces its {NPY_VECTORS} and {NPY_ROWS})")


def export_vectors(store: Store, out: str | Path, format: str, model_id: str | None = None, feature: str = "cls",
                   level: str = "slice", where: str | None = None, labels: str | Path | None = None,
                   overwrite: bool = False) -> ExportSummary:
    """Write one model's `feature` vectors at `level` (slice or series) with their metadata to `out`,
    as `format` (parquet or npy; see the module docstring). `model_id` is any unique prefix; `where`
    filters on metadata columns (the `--where` language); `labels` is a labels CSV to join;
    `overwrite` replaces an existing export."""
    out = Path(out)
    check_out(out, format, store.path, [Path(labels)] if labels is not None else [], overwrite)
    if level not in LEVELS:
        raise UsageError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    spec = store.spec(store.resolve_model_id(model_id))
    parts = feature_columns(spec, feature)
    table_name = slices_table_name(spec.model_id) if level == "slice" else series_table_name(spec.model_id)
    schema = store.schema(table_name)
    metadata = metadata_columns(schema)
    condition = validated_where(where, schema) if where else None
    join = read_labels(labels) if labels is not None else None
    if join is not None and join[0] not in metadata:
        raise UsageError(f"labels joined by {join[0]} cannot label {level}-level vectors; use one of "
                         f"{', '.join(c for c in JOIN_COLUMNS if c in metadata)}")

    rows = store.rows(table_name, condition, metadata + parts)
    if not rows.num_rows:
        raise UsageError(f"no {level} vectors of model {spec.model_id} match" + (f" {condition}" if condition else ""))
    rows = rows.sort_by("key")  # the order load_vectors gives
    matrix = np.ascontiguousarray(np.concatenate([column_matrix(rows.column(p)) for p in parts], axis=1),
                                  dtype=np.float32)
    rows = rows.select(metadata)
    n_labelled = None
    if join is not None:
        rows, n_labelled = with_labels(rows, *join, level)
    description = json.dumps({"model_id": spec.model_id, "feature": feature, "level": level, "columns": parts,
                              "dim": int(matrix.shape[1]), "where": condition, "embedstore_version": __version__,
                              "model": spec.to_row()})
    rows = rows.replace_schema_metadata({METADATA_KEY: description.encode()})
    if format == "parquet":
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])
        table = rows.append_column(pa.field(VECTOR_COLUMN, vectors.type, nullable=False), vectors)
        write_atomically(out, lambda path: pq.write_table(table, path))
    else:
        out.mkdir(exist_ok=True)
        write_atomically(out / NPY_VECTORS, lambda path: np.save(path, matrix, allow_pickle=False))
        write_atomically(out / NPY_ROWS, lambda path: pq.write_table(rows, path))
    return ExportSummary(out=str(out), format=format, model_id=spec.model_id, feature=feature, level=level,
                         columns=parts, n_rows=rows.num_rows, dim=int(matrix.shape[1]), n_labelled=n_labelled)


def with_labels(rows: pa.Table, join_column: str, labels: list[dict], level: str) -> tuple[pa.Table, int]:
    """`rows` with `label` (and `split` when the CSV has it) columns: null for rows the CSV does not name."""
    by_id = {row[join_column]: row for row in labels}
    matched = [by_id.get(value) for value in rows.column(join_column).to_pylist()]
    n_labelled = sum(row is not None for row in matched)
    if not n_labelled:
        raise UsageError(f"no stored {level} matches the labels' {join_column} values")
    rows = rows.append_column("label", pa.array([row["label"] if row else None for row in matched], pa.string()))
    if labels and "split" in labels[0]:
        rows = rows.append_column("split", pa.array([(row["split"] or None) if row else None for row in matched],
                                                    pa.string()))
    return rows, n_labelled


def write_atomically(path: Path, write) -> None:
    """`write(temporary path)`, then rename onto `path`: a reader never sees half a file."""
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # same suffix: np.save adds .npy otherwise
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_export(out: str | Path) -> tuple[np.ndarray, pa.Table, dict]:
    """(vectors (n, D) float32, metadata rows, the `embedstore` description) of either export format."""
    out = Path(out)
    if out.is_dir():
        matrix = np.load(out / NPY_VECTORS, allow_pickle=False)
        rows = pq.read_table(out / NPY_ROWS)
    else:
        table = pq.read_table(out)
        column = table.column(VECTOR_COLUMN).combine_chunks()
        matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
        rows = table.drop_columns([VECTOR_COLUMN])
    description = json.loads((rows.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    return matrix, rows, description
