"""`embedstore sql`: one read-only SQL query (DuckDB) over a store's tables, shown as a table or written
as JSON or CSV."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer

from embedstore.cli.options import StoreArgument, check_output
from embedstore.cli.render import out, print_rows
from embedstore.errors import UsageError

STDOUT = "-"


def sql(
    store: StoreArgument,
    query: str = typer.Argument(..., metavar="QUERY", help="One SELECT statement, e.g. \"SELECT modality, "
                                "count(*) AS slices FROM items GROUP BY ALL\"."),
    json_out: Optional[Path] = typer.Option(None, "--json", "-o", metavar="OUT", help="Write every row to OUT as a "
                                            "JSON list of objects (- for stdout) instead of showing a table."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", metavar="OUT", help="Write every row to OUT as CSV (- for "
                                           "stdout) instead of showing a table."),
    vectors: bool = typer.Option(False, "--vectors", help="Keep the vector columns (cls, patch_mean, cls_b<i>) "
                                 "in the model tables and `vectors`."),
) -> None:
    """Query the store's tables with SQL (DuckDB, read-only): items, series, files, failures, runs, models,
    slices-<model_id> and vectors (every model's slices, with a model_id column)."""
    from embedstore.store import Store
    from embedstore.store.sql import run_sql

    if json_out is not None and csv_out is not None:
        raise UsageError("--json and --csv: give one of them")
    for option, path in (("--json", json_out), ("--csv", csv_out)):
        if path is not None and str(path) != STDOUT:
            check_output(path, option)
    rows = run_sql(Store.open(store), query, with_vectors=vectors)
    if json_out is not None:
        write_rows(rows, json_out, write_json)
    elif csv_out is not None:
        write_rows(rows, csv_out, write_csv)
    else:
        print_rows(rows)


def write_rows(rows, path: Path, writer) -> None:
    if str(path) == STDOUT:
        writer(rows, sys.stdout)
        return
    with open(path, "w", newline="") as handle:
        writer(rows, handle)
    out.print(f"{rows.num_rows:,} row{'' if rows.num_rows == 1 else 's'} written to {path}")


def columns_of(rows) -> list[list]:
    """Each column's values, in order, of an Arrow table or batch (a query may name two columns alike)."""
    return [rows.column(index).to_pylist() for index in range(rows.num_columns)]


def write_json(rows, handle) -> None:
    """A JSON list with one object per line, written a batch at a time (never every row as Python objects)."""
    handle.write("[")
    separator = "\n"
    for batch in rows.to_batches():
        for values in zip(*columns_of(batch)):
            handle.write(separator + json.dumps(jsonable(dict(zip(rows.column_names, values))), default=str))
            separator = ",\n"
    handle.write("\n]\n")


def write_csv(rows, handle) -> None:
    writer = csv.writer(handle, lineterminator="\n")  # as other command-line tools write lines
    writer.writerow(rows.column_names)
    for batch in rows.to_batches():
        writer.writerows(zip(*(map(csv_cell, values) for values in columns_of(batch))))


def jsonable(value):
    """Plain JSON: NaN and infinities as null (JSON has neither), dates and times as ISO 8601 text."""
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value.isoformat() if hasattr(value, "isoformat") else value


def csv_cell(value):
    """A CSV field: null as empty, a list or struct (a vector) as its JSON text."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(jsonable(value), default=str)
    return value.isoformat() if hasattr(value, "isoformat") else value
