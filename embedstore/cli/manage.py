"""A store's own commands: `info`, `models`, `failures`, `check`, `vacuum`, `migrate`."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from embedstore.cli.options import JsonFlag, StoreArgument
from embedstore.cli.render import out, print_failures, print_info, print_models


def info(store: StoreArgument, as_json: JsonFlag = False) -> None:
    """What a store holds: tables, models, modalities, series, patch storage, failures."""
    from embedstore.store import Store
    from embedstore.store.info import store_info

    summary = store_info(Store.open(store))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print_info(summary)


def models(
    store: StoreArgument,
    as_json: bool = typer.Option(False, "--json", help="Print every model's full spec and counts as JSON."),
) -> None:
    """The models a store holds, with their specs and row counts."""
    from embedstore.store import Store
    from embedstore.store.info import model_counts

    opened = Store.open(store)
    counts = model_counts(opened)
    if as_json:
        print(json.dumps([{**spec.to_row(), **counts[model_id]} for model_id, spec in opened.specs().items()],
                         indent=2))
    else:
        print_models(counts)


def failures(
    store: StoreArgument,
    reason: Optional[str] = typer.Option(None, help="Only this reason code (e.g. truncated, not_dicom)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Inputs that could not be embedded, with their stage, reason and message."""
    from embedstore.store import Store
    from embedstore.store.info import list_failures

    rows = list_failures(Store.open(store), reason)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_failures(rows)


def vacuum(store: StoreArgument) -> None:
    """Remove duplicate keys, and the patch shards and table files that interrupted runs left behind;
    compact the tables."""
    from embedstore.store import Store

    report = Store.open(store).vacuum()
    duplicates = report["duplicate_rows_removed"]
    out.print(f"removed {sum(duplicates.values()):,} duplicate rows"
              + (f" ({', '.join(f'{name} {n:,}' for name, n in duplicates.items())})" if duplicates else "")
              + f", {report['orphan_shards_removed']:,} orphan patch shards "
              f"({report['patch_bytes_freed'] / 1e6:,.1f} MB); tables compacted")


def check(
    store: StoreArgument,
    repair: bool = typer.Option(False, "--repair", help="Drop broken rows and duplicates (the next ingest "
                                "re-embeds them), rewrite unreadable tables from the rows that read."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Verify every row's patch tokens and digest, unique keys, readable tables and the patient-ID key;
    exit 1 on damage that is not repaired."""
    from embedstore.store.check import check_store, report_lines

    report = check_store(store, repair)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report_lines(report):
            print(line)
    raise typer.Exit(0 if report.clean or report.repaired else 1)


def migrate(store: str = typer.Argument(..., metavar="STORE", help="A format-2 store directory, or a format-3 "
                                          "one written before its items said the kind and axis of their files.")
            ) -> None:
    """Convert a format-2 store to format 3 in place, without re-embedding (rerun it if it is interrupted);
    give an older format-3 store's items their kind and axis columns."""
    from embedstore.store.migrate import migrate_store

    report = migrate_store(store)
    for line in report.lines():
        print(line)
    for note in report.notes:
        print(f"embedstore: note: {note}", file=sys.stderr)
