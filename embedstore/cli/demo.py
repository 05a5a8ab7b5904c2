"""`embedstore demo`: the main job end to end on a sample archive, on any machine."""

from __future__ import annotations

from pathlib import Path

import typer

from embedstore.cli.render import out, print_info, print_neighbours, print_summary


def demo(
    directory: Path = typer.Option(Path("embedstore-demo"), "--store", metavar="DIR", help="The demo's directory: it "
                                   "writes the sample archive to DIR/archive, the store to DIR/store and the labels "
                                   "and masks of the evaluations beside them, nothing else."),
) -> None:
    """Build a sample archive, ingest it, show `info` and a nearest-neighbour lookup."""
    from embedstore.demo import run_demo

    summary, store_summary, neighbours, query_key, feature = run_demo(directory, say=lambda line: out.print(line))
    print_summary(summary)
    print_info(store_summary)
    print_neighbours(neighbours, query_key, feature, directory.resolve().parent)
    out.print(f"labels to evaluate with: {directory / 'labels.csv'} (eval knn, linear, fewshot; finetune), "
              f"{directory / 'masks.csv'} (eval segment)")
