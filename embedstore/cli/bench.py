"""`embedstore bench` and `embedstore report`: a suite's cells and leaderboard, and one document."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from embedstore.cli.options import StoreArgument, check_output
from embedstore.cli.progress import cells_progress
from embedstore.cli.render import out, warn
from embedstore.errors import UsageError


def bench(
    suite: Path = typer.Argument(..., metavar="SUITE", help="Suite file (TOML): datasets, models, protocols, seeds."),
    out_dir: Path = typer.Option(Path("bench-out"), "--out", help="Output folder: cached cells, results.parquet, "
                                 "leaderboard.md/.csv, plots (created; rerun to resume)."),
    jobs: int = typer.Option(1, help="Cells run at once in local processes."),
    ray_address: Optional[str] = typer.Option(None, help="Run the cells as Ray tasks on this cluster."),
) -> None:
    """Run a benchmark suite from the stored vectors: every cell not cached yet, then the leaderboard."""
    from embedstore.bench.run import run_suite
    from embedstore.bench.suite import read_suite

    check_output(out_dir, "--out", folder=True)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, not {jobs}")
    read = read_suite(suite)
    with cells_progress() as progress:
        result = run_suite(read, out_dir, jobs, ray_address, progress)
    for line in result.failed:
        warn(f"cell left out: {line}")
    out.print(f"{read.name}: {result.cells} cells, {result.cached} cached, {result.computed} computed"
              + (f", {len(result.failed)} failed" if result.failed else "") + f"; leaderboard: {result.leaderboard}")


def report(
    store: StoreArgument,
    suite: Optional[Path] = typer.Option(None, "--suite", help="An `embedstore bench --out` folder: its leaderboard "
                                         "and plots go into the report."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for report.html (self-contained) and report.md."),
) -> None:
    """One document: the store's content, ingest throughput per stage, search index recall and latency,
    and a benchmark suite's leaderboard and plots."""
    from embedstore.bench.report import write_store_report
    from embedstore.store import Store

    check_output(out_dir, "--out", folder=True)
    if suite is not None and not suite.is_dir():
        raise UsageError(f"--suite {suite} is not a folder `embedstore bench` wrote")
    page, markdown = write_store_report(Store.open(store), out_dir, suite)
    out.print(f"report: {page} (and {markdown.name})")
