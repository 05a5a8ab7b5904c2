"""What the commands print: the consoles, one line for a warning or a wrong request, and every table."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

UNWRAPPED_WIDTH = 100_000  # piped output: wide enough that no line (a path, an id) is ever wrapped
LEVEL_PLURALS = {"slice": "slices", "series": "series", "study": "studies"}
SHOWN_ROWS = 50  # of a query's rows; --csv and --json write them all
SHOWN_VALUES = 4  # of a vector's values


def stdout_console() -> Console:
    """Rich's console on a terminal; piped (read by a program or grep), one unwrapped line per row."""
    console = Console()
    return console if console.is_terminal else Console(width=UNWRAPPED_WIDTH)


out = stdout_console()
err = Console(stderr=True)


def warn(message: str | None) -> None:
    """One line on stderr about a result that may mislead; the command goes on."""
    if message:
        print(f"embedstore: warning: {' '.join(str(message).split())}", file=sys.stderr)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and the exit code: 2 for every wrong request, 1 for a damaged store."""
    print(f"embedstore: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def two_columns(title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")
    return table


def print_summary(summary) -> None:
    """An ingest's summary: every line names its unit (slices or files)."""
    table = two_columns(f"ingest {summary.run_id}")
    for model_id in summary.model_ids:
        embedded, committed = summary.embedded_by_model[model_id], summary.committed_by_model[model_id]
        first = f"; {embedded - committed:,} were committed first by another ingest" if committed < embedded else ""
        table.add_row("model", f"{model_id}: {embedded:,} slices embedded, {committed:,} rows committed{first}")
    table.add_row("store", summary.store)
    # Slices and files are counted apart, each named: a file may hold many slices, or none found.
    table.add_row("slices found", f"{summary.n_found:,}")
    table.add_row("slices embedded", f"{summary.n_embedded:,}")
    table.add_row("slices skipped (already in store)", f"{summary.n_skipped:,}")
    table.add_row("slices failed", f"{summary.n_failed_slices:,}")
    failed = ", ".join(f"{reason} {n}" for reason, n in summary.failures_by_reason.items())
    table.add_row("files failed", f"{summary.n_failed:,}" + (f" ({failed})" if failed else ""))
    table.add_row("duplicate files", f"{summary.n_duplicates:,} (copies of an instance embedded from another file)")
    if summary.n_warned_files:
        plural = "s" if summary.n_warned_files > 1 else ""
        table.add_row("codec warnings", f"{summary.n_warned_files:,} file{plural} decoded with codec warnings")
    for note in summary.notes:
        table.add_row("note", note)
    table.add_row("files catalogued", catalog_line(summary.catalog))
    if summary.first_row_seconds is not None:
        table.add_row("first row", f"committed {summary.first_row_seconds:.1f} s after the start")
    table.add_row("decode workers", str(summary.workers) if summary.workers else "0 (inline)")
    table.add_row("engine", summary.engine + "".join(f"\n{note}" for note in summary.engine_notes))
    table.add_row("time", f"{summary.seconds:.1f} s; {summary.wall_seconds:.1f} s in all, model loading included")
    table.add_row("slices/s", f"{summary.slices_per_s:,.1f}")
    table.add_row("stage seconds", ", ".join(f"{k} {v:.2f}" for k, v in summary.stage_seconds.items()))
    out.print(table)


def catalog_line(catalog: dict) -> str:
    """What a catalog read: every file listed is read, unchanged, or failed; gone files are kept."""
    workers = catalog["header_workers"] or "0 (inline)"
    return (f"{catalog['files_listed']:,} listed: {catalog['files_read']:,} read ({catalog['files_failed']:,} "
            f"failed, {catalog['files_changed']:,} changed since the last run), {catalog['files_unchanged']:,} "
            f"unchanged; {catalog['files_gone']:,} gone (kept in the store); {catalog['files_per_s']:,.0f} files/s "
            f"on {workers} {catalog['executor']} header workers, {catalog['header_tasks']:,} tasks")


def print_catalog(catalog: dict) -> None:
    table = two_columns("catalog")
    table.add_row("files", catalog_line(catalog))
    table.add_row("time", f"{catalog['seconds']:.1f} s; headers {catalog['read_seconds']:.1f} s")
    out.print(table)


def print_info(summary: dict) -> None:
    out.print(f"[bold]{summary['store']}[/bold]  format v{summary['format_version']}, "
              f"{len(summary['models'])} models, {summary['slices']:,} slices, {summary['series']:,} series, "
              f"{summary['studies']:,} studies, patches {summary['patch_bytes'] / 1e6:,.1f} MB")
    if summary["orphan_shards"] and summary["ingest_running"]:
        out.print(f"patch shards no row points at yet: {summary['orphan_shards']:,} (an ingest is running: most are "
                  "its shards, not committed yet)")
    elif summary["orphan_shards"]:
        out.print(f"orphan patch shards (of interrupted ingests): {summary['orphan_shards']:,}; "
                  "`embedstore vacuum` removes them")
    if summary["series_with_missing_slices"] or summary["series_with_uneven_spacing"]:
        out.print(f"series rows with missing slices: {summary['series_with_missing_slices']:,}, "
                  f"with uneven spacing: {summary['series_with_uneven_spacing']:,}")
    tables = Table("table", "rows")
    for name, rows in summary["tables"].items():
        tables.add_row(name, f"{rows:,}")
    out.print(tables)
    print_models(summary["models"])
    for title, counts in (("modality", summary["modalities"]), ("failure reason", summary["failures_by_reason"])):
        if counts:
            table = Table(title, "count")
            for name, n in counts.items():
                table.add_row(str(name), f"{n:,}")
            out.print(table)


def print_models(models: dict) -> None:
    table = Table("model_id", "width", "CLS blocks", "patch blocks", "slices", "series", "studies", "patients")
    for model_id, counts in models.items():
        table.add_row(model_id, str(counts["embed_dim"]), ",".join(map(str, counts["cls_layers"])) or "-",
                      ",".join(map(str, counts["patch_layers"])) or "-",
                      *(f"{counts[c]:,}" for c in ("slices", "series", "studies", "patients")))
    out.print(table)


def print_failures(rows: list[dict]) -> None:
    table = Table(title=f"{len(rows)} failures")
    for column in ("reason", "stage", "path", "message"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["reason"], row["stage"], row["path"], row["message"])
    out.print(table)


def print_hits(hits: list, level: str, description: str, where: str | None) -> None:
    """Search results: each key (series or study UID) whole, as --key (--series-uid, --study-uid) takes it."""
    if not hits:
        out.print(f"no stored {LEVEL_PLURALS[level]} to rank" + (f": none matches {where}" if where else ""))
        return
    table = Table(title=f"{LEVEL_PLURALS[level]} most similar to {description}")
    identity = {"slice": "key (for --key)", "series": "series UID (for --series-uid)",
                "study": "study UID (for --study-uid)"}
    extra = {"slice": ["slice", "path"], "series": ["slices"], "study": ["series", "slices"]}[level]
    table.add_column("rank")
    table.add_column("similarity")
    # whole on one line, however narrow the terminal: the key is there to be copied into --key
    table.add_column(identity[level], no_wrap=True, min_width=max((len(hit.key) for hit in hits), default=0))
    for column in ["modality", "date", "series description", *extra]:
        table.add_column(column, overflow="fold")
    for hit in hits:
        if level == "slice":
            tail = [str(hit.slice_index), hit.path or ""]
        else:
            tail = [str(hit.n_slices)] if level == "series" else [str(hit.n_series), str(hit.n_slices)]
        table.add_row(str(hit.rank), f"{hit.similarity:.4f}", hit.key, hit.modality or "", hit.study_date or "",
                      hit.series_description or "", *tail)
    out.print(table)


def print_index_report(report) -> None:
    parameters = report.parameters
    out.print(f"{parameters.index_type} on {report.table}.{report.column} ({report.rows:,} rows): "
              f"{parameters.num_partitions} partitions"
              + (f", {parameters.num_sub_vectors} sub-vectors" if parameters.num_sub_vectors else "")
              + f"; searched with nprobes {parameters.nprobes}"
              + (f", refine factor {parameters.refine_factor}" if parameters.refine_factor else "")
              + f"; built in {report.build_seconds:.1f} s")
    out.print(f"recall@10 against exact search: {report.recall_at_10:.3f}; "
              f"p50 latency {report.ann_p50_ms:.1f} ms, {report.ann_rows_p50_ms:.1f} ms fetching the result columns "
              f"(exact: {report.exact_p50_ms:.1f} ms)")
    for measured in report.filtered:
        out.print(f"filtered to {measured['share']:.1%} of the rows ({measured['rows_kept']:,}): recall@10 "
                  f"{measured['recall_at_10']:.3f} with plan {measured['plan']}")
    for warning in report.warnings:
        warn(warning)


def print_evaluation(result) -> None:
    """A classification result: what ran, how its numbers were chosen, a table per split, the intervals."""
    counts = ", ".join(f"{split} {n:,}" for split, n in result.counts.items())
    search = getattr(result, "search", None)
    out.print(f"[bold]{result.task}[/bold] {result.model_id} · {result.feature} · {result.level} level · "
              f"{len(result.classes)} classes{' (multi-label)' if result.multilabel else ''} · {counts}"
              + (f" · {search} neighbour search" if search else ""))
    for line in result.notes():
        out.print(line)
    for warning in result.warnings:
        warn(warning)
    columns = ["macro_auroc", "macro_f1"] if result.multilabel else \
        ["top1_accuracy", "balanced_accuracy", "macro_auroc", "macro_f1"]
    for split, rows in result.metric_tables().items():
        table = Table(title=split)
        for column in ["", *columns]:
            table.add_column(column)
        for label, metrics in rows.items():
            table.add_row(label, *("-" if metrics.get(c) is None else f"{metrics[c]:.4f}" for c in columns))
        out.print(table)
    reported = result.reported()
    if reported and reported[1].get("ci95"):
        intervals = ", ".join(f"{name} [{low:.4f}, {high:.4f}]" for name, (low, high) in reported[1]["ci95"].items())
        out.print(f"95% intervals ({reported[0]}; bootstrap over test patients): {intervals}")


def print_fewshot(result) -> None:
    table = Table(title=f"few-shot {result.score.replace('_', ' ')}, mean [95% interval] over {result.tries} draws")
    table.add_column("patients per class")
    for name in result.curves:
        table.add_column(name)
    for row, n in enumerate(result.shots):
        table.add_row(str(n), *(f"{c[row]['mean']:.3f} [{c[row]['ci95'][0]:.3f}, {c[row]['ci95'][1]:.3f}]"
                                for c in result.curves.values()))
    out.print(table)
    for warning in result.warnings:
        warn(warning)


def print_segmentation(result) -> None:
    counts = ", ".join(f"{split} {n:,}" for split, n in result.counts.items())
    out.print(f"[bold]segment[/bold] {result.model_id} · {result.decoder} decoder on blocks "
              f"{','.join(map(str, result.blocks))} · {len(result.classes)} classes · slices {counts} · "
              f"scored at {result.score_at} resolution")
    for line in result.notes():
        out.print(line)
    for line in result.mask_problem_lines:
        warn(line)
    for warning in result.warnings:
        warn(warning)
    table = Table(title="test (mean ± std over seeds)" if len(result.seeds) > 1 else "test")
    for column in ("metric", "value"):
        table.add_column(column)
    for name, summary in result.metrics.items():
        value = "-" if summary["mean"] is None else f"{summary['mean']:.4f}" + (
            f" ± {summary['std']:.4f}" if len(result.seeds) > 1 else "")
        table.add_row(name.replace("_", " "), value)
    out.print(table)
    per_class = Table(title="per class (first seed)")
    for column in ("class", "global Dice", "per-volume Dice", "IoU"):
        per_class.add_column(column)
    for row in result.runs[0]["test"]["per_class"]:
        per_class.add_row(row["class"], *("-" if row[c] is None else f"{row[c]:.4f}"
                                          for c in ("global_dice", "per_volume_dice", "iou")))
    out.print(per_class)


def print_neighbours(neighbours: list, query_key: str, feature: str, shown_from) -> None:
    """The demo's lookup: the nearest slices of a CT slice, their paths relative to `shown_from`."""
    from pathlib import Path

    table = Table(title=f"nearest slices by {feature} cosine similarity to\n{query_key}")
    for column in ("rank", "similarity", "modality", "slice", "path"):
        table.add_column(column, overflow="fold")
    for rank, neighbour in enumerate(neighbours, 1):
        table.add_row(str(rank), f"{neighbour.similarity:.4f}", str(neighbour.modality),
                      str(neighbour.slice_index), Path(neighbour.path).relative_to(shown_from).as_posix())
    out.print(table)


def print_rows(rows, limit: int = SHOWN_ROWS) -> None:
    """A query's rows (an Arrow table), the first `limit` of them, each value as text (never as markup)."""
    table = Table()
    for name in rows.column_names:
        table.add_column(Text(name), overflow="fold")
    shown = rows.slice(0, limit)
    for values in zip(*(shown.column(index).to_pylist() for index in range(shown.num_columns))):
        table.add_row(*(Text(cell_text(value)) for value in values))
    out.print(table)
    left_out = rows.num_rows - shown.num_rows
    out.print(f"{rows.num_rows:,} row{'' if rows.num_rows == 1 else 's'}"
              + (f"; {left_out:,} more not shown (--csv OUT or --json OUT writes them all)" if left_out else ""))


def cell_text(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        head = ", ".join(cell_text(item) for item in value[:SHOWN_VALUES])
        return f"[{head}, … {len(value)} values]" if len(value) > SHOWN_VALUES else f"[{head}]"
    return str(value)
