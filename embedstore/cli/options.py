"""The options more than one command takes, declared once (Annotated types), and the parsing of the
text forms a command line gives them (comma-separated numbers). What an option means beyond its
text, and its checks, is the library's: the protocols' options classes and the labels spec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from embedstore.errors import UsageError

StoreArgument = Annotated[str, typer.Argument(metavar="STORE", help="Store directory, or s3://BUCKET/PREFIX.")]
ModelIdOption = Annotated[Optional[str], typer.Option(
    "--model-id", help="The model (any unique prefix of its id), when the store holds several.")]
FEATURE_HELP = ("cls, patch_mean, clsN (final-norm CLS of the last N blocks, concatenated), cls+patch_mean or "
                "clsN+patch_mean.")
FeatureOption = Annotated[str, typer.Option("--feature", help=FEATURE_HELP)]
LevelOption = Annotated[str, typer.Option("--level", help="slice, or series (mean of its slice vectors).")]
WhereOption = Annotated[Optional[str], typer.Option(
    "--where", help="Filter on metadata columns, e.g. \"modality = 'CT' AND body_part = 'CHEST'\".")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

# The labels group: what every protocol's LabelsSpec is made of.
LabelsOption = Annotated[Path, typer.Option(
    "--labels", help="Labels CSV (see README: join column, label, split, patient_id); relative paths in its "
    "path column are read from its folder.")]
LabelColumnOption = Annotated[str, typer.Option("--label-column", metavar="NAME",
                                                help="The labels CSV's class column.")]
SplitByOption = Annotated[Optional[str], typer.Option(
    "--split-by", help="patient: make train/val/test by patient (else the CSV's split).")]
RatiosOption = Annotated[str, typer.Option("--ratios", help="train,val,test shares for --split-by patient.")]

# What an evaluation writes.
ResultJsonOption = Annotated[Optional[Path], typer.Option("--json", "-o", help="Write the result JSON to this file.")]
ReportOption = Annotated[Optional[Path], typer.Option(
    "--report", help="Write the JSON, a Markdown report and its plots into this directory (created; its parent "
    "must exist).")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when there is one), cpu, or cuda.")]


def parse_numbers(text: str, option: str, kind=float) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, not {text!r}") from None


def labels_spec(labels: Path, label_column: str, split_by: str | None, ratios: str, seed: int):
    """The labels group of a command line as the library's LabelsSpec (which checks it)."""
    from embedstore.eval.labels import LabelsSpec

    return LabelsSpec(labels, label_column, split_by, parse_numbers(ratios, "--ratios"), seed)


def check_output(path: Path | None, option: str, folder: bool = False) -> None:
    """A file (or, with `folder`, a folder) written when the work is done needs a directory to go
    into: said before the work, not after it."""
    if path is None:
        return
    if not path.absolute().parent.is_dir():
        raise UsageError(f"{option} {path}: directory {path.parent} does not exist")
    if not folder and path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")


def check_outputs(json_out: Path | None, report: Path | None) -> None:
    check_output(json_out, "--json")
    check_output(report, "--report", folder=True)
