"""The `embedstore` command (Typer). Thin: each command parses, calls embedstore, prints.

Library imports happen inside the commands so `embedstore --help` is quick and decode worker
processes (which re-import the entry module) stay light.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperArgument

from embedstore import __version__
from embedstore.errors import StoreDamagedError, UsageError
from embedstore.sources.limits import UPLOAD_MAX_PIXELS

try:  # typer >= 0.2x bundles its own click, whose exceptions are not the click package's
    from typer._click import exceptions as typer_click_exceptions
except ImportError:
    typer_click_exceptions = click.exceptions
NO_ARGS_ERRORS = (click.exceptions.NoArgsIsHelpError, typer_click_exceptions.NoArgsIsHelpError)
CLICK_USAGE_ERRORS = (click.UsageError, typer_click_exceptions.UsageError)
ABORTS = (KeyboardInterrupt, click.exceptions.Abort, typer.Abort)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="DINOv2 embeddings for radiology archives. Short options: -h for help, -k for "
                       "neighbour counts, -o for a file a command writes (its --json PATH).")


def argument_usage(argument: TyperArgument) -> str:
    return argument.display_name_raw if argument.required else f"[{argument.display_name_raw}]"


# Typer writes a required argument as `{name}` beside its Python type (`{sources}...`,
# `sources... <list[str]>`): show the argument's metavar alone, as click does.
TyperArgument._usage_display_name = argument_usage
TyperArgument.display_type_rich = lambda argument, ctx: None

UNWRAPPED_WIDTH = 100_000  # piped output: wide enough that no line (a path, an id) is ever wrapped


def stdout_console() -> Console:
    """Rich's console on a terminal; piped (read by a program or grep), one unwrapped line per row."""
    console = Console()
    return console if console.is_terminal else Console(width=UNWRAPPED_WIDTH)


out = stdout_console()
err = Console(stderr=True)


def print_version(value: bool) -> None:
    if value:
        print(f"embedstore {__version__}")
        raise typer.Exit()


@app.callback()
def shared_options(version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True,
                                                help="Print the version and exit.")) -> None:
    pass  # the options of `embedstore` itself, before any command


def check_output(path: Path | None, option: str, folder: bool = False) -> None:
    """A file (or, with `folder`, a folder) written when the work is done needs a directory to go
    into: said before the work, not after it."""
    if path is None:
        return
    if not path.absolute().parent.is_dir():
        raise UsageError(f"{option} {path}: directory {path.parent} does not exist")
    if not folder and path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")


@app.command()
def ingest(
    sources: list[str] = typer.Argument(..., metavar="SRC...", help="Files or directories (searched recursively)."),
    store: Path = typer.Option(..., "--store", help="Store directory (created if missing)."),
    model: list[str] = typer.Option(
        ["dinov2_vits14"], "--model", metavar="NAME", help="dinov2_vit{s,b,l,g}14[_reg] or any timm model name; "
        "repeat it to embed every slice with several models (each slice is decoded once)."),
    weights: str = typer.Option("hub", help="hub, random, or a checkpoint path (Meta .pth or timm file)."),
    image_size: int = typer.Option(224, help="Model input size; a multiple of the patch size (14)."),
    layers: Optional[int] = typer.Option(
        None, help="Keep the final-norm CLS token of the last N blocks (default 4 on ViTs) beside cls and patch_mean."),
    patch_layers: Optional[str] = typer.Option(
        None, help="Blocks whose patch tokens go to Zarr, comma-separated, negative from the end (default -1, "
        "the last; -5,-4,-3,-2,-1 for a UNet decoder)."),
    patches: bool = typer.Option(True, "--patches/--no-patches", help="Keep patch tokens in Zarr."),
    mean: Optional[str] = typer.Option(None, help="Input mean R,G,B instead of the model's pretrained_cfg."),
    std: Optional[str] = typer.Option(None, help="Input std R,G,B instead of the model's pretrained_cfg."),
    window: str = typer.Option(
        "auto", help="auto (CT [-1024, 600], MR percentiles, X-ray VOI), header (the file's own VOI window), "
        "a CT preset (study, brain, subdural, stroke, lung, mediastinum, abdomen, liver, bone), multi (three CT "
        "windows as channels, by body part) or multi:W1,W2,W3."),
    mr_percentiles: str = typer.Option("5,95", help="MR: per-slice clip percentiles LOW,HIGH."),
    axis: str = typer.Option("axial", help="NIfTI slicing axis: axial, coronal or sagittal."),
    modality: Optional[str] = typer.Option(
        None, help="Modality of NIfTI and raster sources: CT, MR, CR, DX, MG, US, PT, NM, XA or OT (stored per "
        "slice; sets the intensity rule). Default: NIfTI inferred (CT or MR), rasters none. DICOM keeps its own."),
    max_pixels: int = typer.Option(
        2 ** 28, help="Most values a frame, page or slice may declare (x samples for colour); larger files are "
        "too_large, refused from their header before any decoding."),
    keep_patient_id: bool = typer.Option(
        False, "--keep-patient-id", help="Store PatientID as read. Default: a keyed hash (see README)."),
    batch_size: int = typer.Option(32, help="Slices per model batch."),
    workers: Optional[int] = typer.Option(
        None, help="Decode worker processes; 0 decodes inline. Default: up to 8 with CUDA, cores/8 on CPU."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    engine: str = typer.Option("auto", help="auto (tensorrt → compile → eager on CUDA; eager on CPU), eager, compile "
                               "or tensorrt; a compiled engine must match eager (cosine ≥ 0.999) or gives way."),
    seed: int = typer.Option(0, help="Seed for --weights random."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Drop this model's rows and rebuild."),
    executor: str = typer.Option("local", help="local (this process and its decode workers) or ray."),
    ray_address: Optional[str] = typer.Option(
        None, help="Join this Ray cluster (implies --executor ray); without it Ray starts a local one."),
    ray_actors: Optional[int] = typer.Option(None, help="Embedding actors on Ray. Default: one per GPU, else one."),
    json_out: Optional[Path] = typer.Option(None, "--json", "-o", help="Also write the run summary as JSON here."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="Show the phase and a progress bar on stderr while it runs."),
) -> None:
    """Embed every slice under SRC into STORE; reruns embed only what is missing."""
    from embedstore.pipeline.ingest import IngestOptions, ingest as run_ingest

    options = IngestOptions(
        models=tuple(model), weights=weights, image_size=image_size, seed=seed, layers=layers,
        patch_layers=parse_numbers(patch_layers, "--patch-layers", int) if patch_layers else None,
        mean=parse_numbers(mean, "--mean") if mean else None, std=parse_numbers(std, "--std") if std else None,
        keep_patches=patches, window=window,
        mr_percentiles=parse_percentiles(mr_percentiles), axis=axis, modality=modality, max_pixels=max_pixels,
        keep_patient_id=keep_patient_id,
        executor="ray" if ray_address else executor, ray_address=ray_address, ray_actors=ray_actors,
        batch_size=batch_size, workers=workers, device=device, engine=engine,
        precision=precision, overwrite=overwrite, show_progress=progress,
    )
    check_output(json_out, "--json")
    summary = run_ingest(sources, store, options)
    print_summary(summary)
    if json_out:
        json_out.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")


def parse_percentiles(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--mr-percentiles takes LOW,HIGH (e.g. 5,95), not {text!r}") from None
    return low, high


def print_summary(summary) -> None:
    table = Table(title=f"ingest {summary.run_id}", show_header=False)
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")
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
    table.add_row("decode workers", str(summary.workers) if summary.workers else "0 (inline)")
    table.add_row("engine", summary.engine + "".join(f"\n{note}" for note in summary.engine_notes))
    table.add_row("time", f"{summary.seconds:.1f} s; {summary.wall_seconds:.1f} s in all, model loading included")
    table.add_row("slices/s", f"{summary.slices_per_s:,.1f}")
    table.add_row("stage seconds", ", ".join(f"{k} {v:.2f}" for k, v in summary.stage_seconds.items()))
    out.print(table)


@app.command()
def info(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """What a store holds: tables, models, modalities, series, patch storage, failures."""
    from embedstore.store import Store
    from embedstore.store.info import store_info

    summary = store_info(Store.open(store))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print_info(summary)


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


@app.command()
def models(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
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


@app.command()
def failures(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    reason: Optional[str] = typer.Option(None, help="Only this reason code (e.g. truncated, not_dicom)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Inputs that could not be embedded, with their stage, reason and message."""
    from embedstore.store import Store
    from embedstore.store.info import list_failures

    rows = list_failures(Store.open(store), reason)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} failures")
    for column in ("reason", "stage", "path", "message"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["reason"], row["stage"], row["path"], row["message"])
    out.print(table)


LEVEL_PLURALS = {"slice": "slices", "series": "series", "study": "studies"}


@app.command()
def search(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    image: Optional[Path] = typer.Option(None, "--image", help="Query by an image file (embedded with the store's model)."),
    key: Optional[str] = typer.Option(None, "--key", help="Query by a stored slice's key."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="Query by a stored series."),
    study_uid: Optional[str] = typer.Option(None, "--study-uid", help="Query by a stored study."),
    k: int = typer.Option(10, "--k", "-k", help="Results to return."),
    level: str = typer.Option("slice", help="slice, series or study (best match per query slice, averaged)."),
    where: Optional[str] = typer.Option(None, help="Filter on metadata columns, e.g. \"modality = 'CT' AND body_part = 'CHEST'\"."),
    feature: str = typer.Option("cls", help="cls, patch_mean, clsN (CLS of the last N blocks), or cls/clsN+patch_mean."),
    model_id: Optional[str] = typer.Option(None, help="The model (any unique prefix of its id), when the store holds several."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The stored slices, series or studies most similar to a query."""
    from embedstore.search import similar as searching
    from embedstore.search.degenerate import stored_feature_warning
    from embedstore.store import Store

    given = [name for name, value in (("--image", image), ("--key", key), ("--series-uid", series_uid),
                                      ("--study-uid", study_uid)) if value]
    if len(given) != 1:
        raise UsageError("give exactly one of --image, --key, --series-uid, --study-uid")
    opened = Store.open(store)
    if key:
        query = searching.query_by_key(opened, key, feature, model_id)
    elif series_uid:
        query = searching.query_by_series(opened, series_uid, feature, model_id)
    elif study_uid:
        query = searching.query_by_study(opened, study_uid, feature, model_id)
    else:
        from embedstore.pipeline.embed_file import embed_file

        resolved = opened.resolve_model_id(model_id)
        columns = embed_file(opened, image, resolved)
        query = searching.query_by_vectors(opened, searching.image_description(image, columns), resolved,
                                           columns, feature)
    hits = searching.search(opened, query, k, level, feature, where)
    warn(stored_feature_warning(opened, query.model_id, feature, "series" if level == "series" else "slice"))
    if as_json:
        print(json.dumps({"query": query.description, "model_id": query.model_id, "level": level,
                          "feature": feature, "where": where, "hits": searching.hits_as_dicts(hits)}, indent=2))
        return
    if not hits:
        out.print(f"no stored {LEVEL_PLURALS[level]} to rank" + (f": none matches {where}" if where else ""))
        return
    table = Table(title=f"{LEVEL_PLURALS[level]} most similar to {query.description}")
    identity = {"slice": "key (for --key)", "series": "series UID (for --series-uid)", "study": "study UID (for --study-uid)"}
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


@app.command()
def index(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    index_type: str = typer.Option("ivf_flat", "--type", help="ivf_flat, or for a smaller index ivf_sq, ivf_pq or "
                                                             "ivf_hnsw_sq."),
    feature: str = typer.Option("cls", "--feature", "--column", help="The feature to index: cls or patch_mean "
                                "(--column is its former name)."),
    level: str = typer.Option("slice", help="slice or series."),
    model_id: Optional[str] = typer.Option(None, help="The model whose vectors measure the recall."),
) -> None:
    """Build an ANN index with parameters chosen from the table size, and measure its recall@10."""
    from embedstore.search.index import NoIndex, build_index
    from embedstore.store import Store

    report = build_index(Store.open(store), model_id, feature, level, index_type)
    if isinstance(report, NoIndex):
        out.print(report.reason)
        return
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
    for warning in report.warnings:
        warn(warning)


@app.command()
def export(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    destination: Path = typer.Argument(..., metavar="OUT", help="parquet: the file to write; npy: a new or empty "
                                       "directory."),
    export_format: str = typer.Option(..., "--format", help="parquet (metadata columns and a `vector` column) or npy "
                                      "(OUT/vectors.npy, (n, D) float32, and OUT/rows.parquet, row i for vector i)."),
    model_id: Optional[str] = typer.Option(None, help="The model (any unique prefix of its id), when the store "
                                           "holds several."),
    feature: str = typer.Option("cls", help="cls, patch_mean, clsN (CLS of the last N blocks), or "
                                "cls/clsN+patch_mean."),
    level: str = typer.Option("slice", help="slice, or series (mean of its slice vectors)."),
    where: Optional[str] = typer.Option(None, help="Filter on metadata columns, e.g. \"modality = 'CT'\"."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels CSV (as for eval): adds label and split "
                                          "columns; rows it does not name keep null."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (never one inside the store "
                                   "or an input file)."),
) -> None:
    """Write one model's vectors with their metadata as Parquet or NumPy, for other tools."""
    from embedstore.export import export_vectors
    from embedstore.store import Store

    summary = export_vectors(Store.open(store), destination, export_format, model_id, feature, level, where, labels,
                             overwrite)
    print(f"{summary.n_rows:,} {summary.level} vectors ({summary.feature}, {summary.dim}-d) of "
          f"{summary.model_id} written to {summary.out}"
          + (f"; {summary.n_labelled:,} labelled" if summary.n_labelled is not None else ""))


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate stored vectors against labels, without the backbone. "
                       "--feature defaults to the input each protocol uses in the reference study: cls for kNN and "
                       "few-shot, cls+patch_mean for the linear probe.")
app.add_typer(eval_app, name="eval")


FEATURE_HELP = ("cls, patch_mean, clsN (final-norm CLS of the last N blocks, concatenated), cls+patch_mean or "
                "clsN+patch_mean.")

# Options every `embedstore eval` command takes.
LABELS_OPTION = typer.Option(..., "--labels", help="Labels CSV (see README: join column, label, split, patient_id); "
                             "relative paths in its path column are read from its folder.")
LABEL_COLUMN_OPTION = typer.Option("label", "--label-column", metavar="NAME", help="The labels CSV's class column.")
EVAL_LEVEL_OPTION = typer.Option("slice", help="slice, or series (mean of its slice vectors).")
SPLIT_BY_OPTION = typer.Option(None, help="patient: make train/val/test by patient (else the CSV's split).")
RATIOS_OPTION = typer.Option("0.7,0.1,0.2", help="train,val,test shares for --split-by patient.")
SPLIT_SEED_OPTION = typer.Option(0, help="Seed of --split-by patient.")
EVAL_MODEL_OPTION = typer.Option(None, help="The model to evaluate, when the store holds several.")
RESULT_JSON_OPTION = typer.Option(None, "--json", "-o", help="Write the result JSON to this file.")
REPORT_OPTION = typer.Option(None, "--report", help="Write the JSON, a Markdown report and its plots into this "
                             "directory (created; its parent must exist).")


def check_split_by(split_by: str | None) -> None:
    if split_by not in (None, "patient"):
        raise UsageError(f"--split-by takes patient, not {split_by!r}")


def check_outputs(json_out: Path | None, report: Path | None) -> None:
    check_output(json_out, "--json")
    check_output(report, "--report", folder=True)


def write_result(result, path: Path | None, report: Path | None) -> None:
    if path:
        path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if report:
        from embedstore.eval.report import write_report

        out.print(f"report: {write_report(result, report)}")


def parse_numbers(text: str, option: str, kind=float) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, not {text!r}") from None


@eval_app.command("knn")
def eval_knn(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    labels: Path = LABELS_OPTION,
    feature: str = typer.Option("cls", help=FEATURE_HELP + " Default cls, the DINOv2 kNN protocol's input."),
    level: str = EVAL_LEVEL_OPTION,
    k: str = typer.Option("10,20,100,200", "--k", "-k", help="Neighbour counts, comma-separated, each at least 1."),
    temperature: float = typer.Option(0.07, help="Vote weights exp(similarity / T); T above 0."),
    search: str = typer.Option("auto", help="Neighbour search: exact, int8 (candidates re-ranked exactly; "
                                            "about 2x faster on a CPU at k = 20), or auto (int8 for large sets "
                                            "and k up to 100 on a CPU)."),
    split_by: Optional[str] = SPLIT_BY_OPTION,
    ratios: str = RATIOS_OPTION,
    seed: int = SPLIT_SEED_OPTION,
    model_id: Optional[str] = EVAL_MODEL_OPTION,
    json_out: Optional[Path] = RESULT_JSON_OPTION,
    report: Optional[Path] = REPORT_OPTION,
    label_column: str = LABEL_COLUMN_OPTION,
) -> None:
    """kNN classification, the DINOv2 weighted-vote protocol, on stored vectors."""
    from embedstore.eval.evaluate import check_knn_arguments, knn_evaluation
    from embedstore.eval.knn import SEARCHES
    from embedstore.store import Store

    check_split_by(split_by)
    check_outputs(json_out, report)
    if search not in SEARCHES:
        raise UsageError(f"--search must be one of {', '.join(SEARCHES)}, not {search!r}")
    ks = parse_numbers(k, "--k", int)
    check_knn_arguments(ks, temperature)
    result = knn_evaluation(Store.open(store), labels, feature, level, model_id, ks, temperature, split_by,
                            parse_numbers(ratios, "--ratios"), seed, search, label_column)
    print_evaluation(result)
    write_result(result, json_out, report)


def print_evaluation(result) -> None:
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


@eval_app.command("linear")
def eval_linear(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    labels: Path = LABELS_OPTION,
    feature: str = typer.Option("cls+patch_mean", help=FEATURE_HELP + " grid: choose among cls1, cls4, "
                                "cls1+patch_mean and cls4+patch_mean on val. Default cls+patch_mean, the "
                                "reference study's linear-probe input."),
    level: str = EVAL_LEVEL_OPTION,
    c_grid: Optional[str] = typer.Option(None, help="Comma-separated C values (default: 10^linspace(-6, 5, 45))."),
    split_by: Optional[str] = SPLIT_BY_OPTION,
    ratios: str = RATIOS_OPTION,
    seed: int = typer.Option(0, help="Seed of --split-by patient, and of the val carved from train when the "
                             "splits have none."),
    model_id: Optional[str] = EVAL_MODEL_OPTION,
    json_out: Optional[Path] = RESULT_JSON_OPTION,
    report: Optional[Path] = REPORT_OPTION,
    label_column: str = LABEL_COLUMN_OPTION,
) -> None:
    """Linear probe (logistic regression): C chosen on val only, refitted on train + val, tested once."""
    from embedstore.eval.evaluate import linear_evaluation
    from embedstore.store import Store

    check_split_by(split_by)
    check_outputs(json_out, report)
    grid = parse_numbers(c_grid, "--c-grid") if c_grid else None
    with fit_progress() as progress:
        result = linear_evaluation(Store.open(store), labels, feature, level, model_id, grid, split_by,
                                   parse_numbers(ratios, "--ratios"), seed, label_column, progress=progress)
    print_evaluation(result)
    write_result(result, json_out, report)


@contextmanager
def fit_progress() -> Iterator[Callable[[int, int], None]]:
    """A bar on stderr over the fits of the C grid (minutes on large sets); none off a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("linear probe: C grid fits"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("fits", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@eval_app.command("fewshot")
def eval_fewshot(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    labels: Path = LABELS_OPTION,
    feature: str = typer.Option("cls", help=FEATURE_HELP + " Default cls, as for kNN."),
    level: str = EVAL_LEVEL_OPTION,
    shots: str = typer.Option("1,2,4,8,16", help="Training patients per class."),
    tries: int = typer.Option(10, help="Random draws per shot count."),
    classifiers: str = typer.Option("knn,prototype,linear", help="Any of knn, prototype, linear."),
    split_by: Optional[str] = SPLIT_BY_OPTION,
    ratios: str = RATIOS_OPTION,
    seed: int = typer.Option(0, help="Seed of --split-by patient and of the few-shot draws."),
    model_id: Optional[str] = EVAL_MODEL_OPTION,
    json_out: Optional[Path] = RESULT_JSON_OPTION,
    plot: Optional[Path] = typer.Option(None, "--plot", help="Save the few-shot curve as a PNG here."),
    report: Optional[Path] = REPORT_OPTION,
    label_column: str = LABEL_COLUMN_OPTION,
) -> None:
    """Few-shot curves: mean and 95% interval over random draws of training patients per class."""
    from embedstore.eval.evaluate import fewshot_evaluation
    from embedstore.eval.fewshot import plot_curves
    from embedstore.store import Store

    check_split_by(split_by)
    check_outputs(json_out, report)
    check_output(plot, "--plot")
    result = fewshot_evaluation(Store.open(store), labels, feature, level, model_id, parse_numbers(shots, "--shots", int),
                                tries, tuple(classifiers.split(",")), split_by, parse_numbers(ratios, "--ratios"), seed,
                                label_column)
    table = Table(title=f"few-shot {result.score.replace('_', ' ')}, mean [95% interval] over {tries} draws")
    table.add_column("patients per class")
    for name in result.curves:
        table.add_column(name)
    for row, n in enumerate(result.shots):
        table.add_row(str(n), *(f"{c[row]['mean']:.3f} [{c[row]['ci95'][0]:.3f}, {c[row]['ci95'][1]:.3f}]"
                                for c in result.curves.values()))
    out.print(table)
    for warning in result.warnings:
        warn(warning)
    write_result(result, json_out, report)
    if plot:
        plot_curves(result, plot)


@eval_app.command("segment")
def eval_segment(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    labels: Path = typer.Option(..., "--labels", help="Labels CSV with a join column and a mask column (a PNG/TIFF "
                                "label image, NIfTI label volume or DICOM SEG per row); relative paths are read "
                                "from its folder."),
    decoder: str = typer.Option("linear", help="linear (1x1 conv on the last block) or unet (last 5 blocks)."),
    classes: Optional[str] = typer.Option(None, help="Class names, 1:liver,2:spleen, or an MSD dataset.json "
                                          "(default: a dataset.json beside the labels CSV, else the mask values)."),
    epochs: int = typer.Option(10, help="Epochs over the train tokens."),
    batch_size: int = typer.Option(32, help="Slices per step."),
    loss: str = typer.Option("dice", help="dice (MONAI DiceLoss) or dicece (Dice + cross-entropy)."),
    seeds: str = typer.Option("0", help="Training seeds, comma-separated: each repeats the protocol; the "
                              "report gives mean and std."),
    split_by: Optional[str] = SPLIT_BY_OPTION,
    ratios: str = RATIOS_OPTION,
    seed: int = typer.Option(0, help="Seed of --split-by patient, and of the val carved from train when the "
                             "splits have none."),
    score_at: str = typer.Option("native", help="native (each mask's own resolution) or input (the model's input "
                                 "size, the reference study's setting)."),
    model_id: Optional[str] = EVAL_MODEL_OPTION,
    json_out: Optional[Path] = RESULT_JSON_OPTION,
    report: Optional[Path] = REPORT_OPTION,
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write the test predictions here, one "
                                               "file per input in its geometry (created; its parent must exist)."),
    device: str = typer.Option("auto", help="auto (CUDA when there is one), cpu, or cuda."),
) -> None:
    """Segmentation probe on stored patch tokens: 7 learning rates trained together, chosen on val
    Dice, refitted on train + val, tested once."""
    from embedstore.eval.segment.protocol import check_settings, segment_evaluation
    from embedstore.eval.segment.report import write_segment_report
    from embedstore.eval.segment.train import TrainSettings
    from embedstore.store import Store

    check_split_by(split_by)
    check_outputs(json_out, report)
    check_output(predictions, "--predictions", folder=True)
    settings = TrainSettings(decoder, epochs, batch_size, loss, torch_device(device))
    seed_list = parse_numbers(seeds, "--seeds", int)
    check_settings(settings, seed_list, score_at)
    with rows_progress(f"segment ({decoder} decoder)") as progress:
        result = segment_evaluation(Store.open(store), labels, model_id, classes, settings, seed_list, split_by,
                                    parse_numbers(ratios, "--ratios"), seed, score_at, predictions, progress)
    print_segmentation(result)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if report:
        out.print(f"report: {write_segment_report(result, report)}")
    if predictions:
        out.print(f"predictions: {predictions}")


def torch_device(name: str) -> str:
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {name!r}")
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


@contextmanager
def rows_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A bar on stderr over the slices trained, with their rate; none off a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[rate]}"), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task("rows", total=None, rate="")
        yield lambda done, total: bar.update(task, completed=done, total=total,
                                             rate=f"{bar.tasks[0].speed or 0:,.0f} slices/s")


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


@app.command()
def finetune(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    labels: Path = LABELS_OPTION,
    mode: str = typer.Option(..., help="full (every weight), lora (peft adapters), bitfit (biases) or linear "
                             "(frozen backbone: the online twin of eval linear)."),
    epochs: int = typer.Option(10, help="Epochs of every training."),
    batch_size: int = typer.Option(32, help="Images per step, all workers together."),
    backbone_lr: Optional[float] = typer.Option(
        None, help="Learning rate of the backbone's trainable parameters. Default: 1e-5 for full (the study's), "
        "the head's rate for lora and bitfit."),
    head_lrs: str = typer.Option("0.001,0.005,0.01,0.05", help="Head learning rates, chosen on val."),
    lora_targets: str = typer.Option("qkv,fc1,fc2", help="Linear layers of every block that LoRA adapts."),
    weights: Optional[str] = typer.Option(None, help="The stored model's checkpoint, when its recorded source "
                                          "(the hub, a file) cannot be reached from here."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder: checkpoints, log, result and the fine-tuned backbone "
                                       "(default ./finetune-MODE-MODEL_ID). Rerun with the same folder to resume."),
    split_by: Optional[str] = SPLIT_BY_OPTION,
    ratios: str = RATIOS_OPTION,
    seed: int = typer.Option(0, help="Seed of --split-by patient, the val carved from train, the heads' start "
                             "and the augmentation."),
    workers: int = typer.Option(1, help="Data-parallel training workers on Ray Train (one per GPU); 1 trains in "
                                "this process."),
    ray_address: Optional[str] = typer.Option(None, help="Train on this Ray cluster (the store, its images and "
                                              "--out on shared storage)."),
    decode_workers: Optional[int] = typer.Option(
        None, help="Processes decoding and augmenting images; 0 decodes inline. Default: up to 8 with CUDA, 0 on a "
        "CPU (the model's threads use every core)."),
    device: str = typer.Option("auto", help="auto (CUDA when there is one), cpu, or cuda."),
    model_id: Optional[str] = EVAL_MODEL_OPTION,
    json_out: Optional[Path] = RESULT_JSON_OPTION,
    report: Optional[Path] = REPORT_OPTION,
    label_column: str = LABEL_COLUMN_OPTION,
) -> None:
    """End-to-end baseline: fine-tune the stored model on the labelled slices (head rate chosen on
    val, retrained on train + val, tested once) and save the fine-tuned backbone."""
    from embedstore.finetune.job import finetune as run_finetune
    from embedstore.finetune.train import TrainSettings, check_settings
    from embedstore.store import Store

    check_split_by(split_by)
    check_outputs(json_out, report)
    check_output(out_dir, "--out", folder=True)
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    device = torch_device(device)
    if decode_workers is None:
        decode_workers = min(8, (os.cpu_count() or 2) - 1) if device == "cuda" else 0
    settings = TrainSettings(mode, epochs, batch_size, backbone_lr, parse_numbers(head_lrs, "--head-lrs"), seed,
                             decode_workers, tuple(lora_targets.split(",")))
    check_settings(settings, workers)
    opened = Store.open(store)
    with rows_progress(f"finetune ({mode})") as progress:
        trained = [0]

        def on_step(images: int) -> None:
            trained[0] += images
            progress(trained[0], None)

        result = run_finetune(opened, labels, settings, model_id, out_dir, weights, split_by,
                              parse_numbers(ratios, "--ratios"), seed, label_column, workers, ray_address,
                              device, on_step, log=lambda line: print(line, file=sys.stderr))
    print_evaluation(result)
    write_result(result, json_out, report)
    if result.checkpoint:
        spec = opened.spec(result.model_id)
        out.print(f"add the fine-tuned model to the store: embedstore ingest SRC... --store {store} --model {spec.name} "
                  f"--image-size {spec.image_size} --window {spec.window} --weights {result.checkpoint}")


@app.command()
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("bench: cells"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[cell]}"), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("cells", total=None, cell="")
        result = run_suite(read, out_dir, jobs, ray_address,
                           lambda done, total, label: bar.update(task, completed=done, total=total, cell=label))
    for line in result.failed:
        warn(f"cell left out: {line}")
    out.print(f"{read.name}: {result.cells} cells, {result.cached} cached, {result.computed} computed"
              + (f", {len(result.failed)} failed" if result.failed else "") + f"; leaderboard: {result.leaderboard}")


@app.command()
def report(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
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


@app.command()
def vacuum(store: Path = typer.Argument(..., metavar="STORE", help="Store directory.")) -> None:
    """Remove duplicate keys, and the patch shards and table files that interrupted runs left behind;
    compact the tables."""
    from embedstore.store import Store

    report = Store.open(store).vacuum()
    duplicates = report["duplicate_rows_removed"]
    out.print(f"removed {sum(duplicates.values()):,} duplicate rows"
              + (f" ({', '.join(f'{name} {n:,}' for name, n in duplicates.items())})" if duplicates else "")
              + f", {report['orphan_shards_removed']:,} orphan patch shards "
              f"({report['patch_bytes_freed'] / 1e6:,.1f} MB); tables compacted")


@app.command()
def check(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
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


@app.command()
def migrate(store: Path = typer.Argument(..., metavar="STORE", help="A format-2 store directory.")) -> None:
    """Convert a format-2 store to format 3 in place, without re-embedding (rerun it if it is interrupted)."""
    from embedstore.store.migrate import migrate_store

    report = migrate_store(store)
    models = "; ".join(f"{old} -> {new}" for old, new in report.models.items())
    indexes = (f"; {len(report.indexes_dropped)} ANN indexes not carried over: rebuild them with `embedstore index`"
               if report.indexes_dropped else "")
    print(f"migrated {report.store} to format 3: {len(report.models)} models" + (f" ({models})" if models else "")
          + f", {report.items:,} items, "
          f"{sum(report.slices.values()):,} slice rows, {report.series:,} series, {report.failures:,} failures, "
          f"{report.runs:,} runs, {report.patch_shards:,} patch shards{indexes}")
    for note in report.notes:
        print(f"embedstore: note: {note}", file=sys.stderr)


@app.command()
def serve(
    store: Path = typer.Argument(..., metavar="STORE", help="Store directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; any but loopback needs --token."),
    port: int = typer.Option(8000, help="Port to listen on."),
    token: Optional[str] = typer.Option(None, envvar="EMBEDSTORE_TOKEN",
                                        help="Bearer token every API and thumbnail request must carry "
                                             "(or EMBEDSTORE_TOKEN, or --token-file: a token on the command line "
                                             "shows in `ps`); open the page as http://HOST:PORT/#token=..."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Read the token from this file (its first "
                                              "line)."),
    show_paths: bool = typer.Option(False, "--show-paths", help="Serve file paths and path-made ids as stored "
                                                                "(folder names can carry patient names)."),
    max_upload_mb: float = typer.Option(50.0, help="Largest query image accepted, in MB."),
    max_pixels: int = typer.Option(UPLOAD_MAX_PIXELS, help="Most values an uploaded frame may declare (refused from "
                                   "its header before decoding; ingest's --max-pixels, lower: a 16000² PNG would take "
                                   "4 GB to embed)."),
) -> None:
    """A search service and web page over the store: upload an image or paste a key, see similar slices,
    series or studies as thumbnails."""
    from embedstore.serve.app import ServeSettings, check_exposure, read_token_file, run_server
    from embedstore.store import Store

    if token_file is not None:
        if token is not None:
            raise UsageError("give the token once: --token (or EMBEDSTORE_TOKEN) or --token-file")
        token = read_token_file(token_file)
    check_exposure(host, token)
    if max_upload_mb <= 0 or max_pixels < 1:
        raise UsageError("--max-upload-mb and --max-pixels must be positive")
    Store.open(store)  # a wrong path is a usage error before the server starts
    out.print(f"serving {store} on http://{'[' + host + ']' if ':' in host else host}:{port}/"
              + (" (token required)" if token else ""))
    run_server(ServeSettings(store, token, show_paths, max_upload_mb, max_pixels), host, port)


@app.command()
def demo(
    directory: Path = typer.Option(Path("embedstore-demo"), "--store", metavar="DIR", help="The demo's directory: it "
                               "writes the sample archive to DIR/archive, the store to DIR/store and the labels and "
                               "masks of the evaluations beside them, nothing else."),
) -> None:
    """Build a sample archive, ingest it, show `info` and a nearest-neighbour lookup."""
    from embedstore.demo import run_demo

    summary, store_summary, neighbours, query_key, feature = run_demo(directory, say=lambda line: out.print(line))
    print_summary(summary)
    print_info(store_summary)
    table = Table(title=f"nearest slices by {feature} cosine similarity to\n{query_key}")
    for column in ("rank", "similarity", "modality", "slice", "path"):
        table.add_column(column, overflow="fold")
    shown_from = directory.resolve().parent
    for rank, neighbour in enumerate(neighbours, 1):
        table.add_row(str(rank), f"{neighbour.similarity:.4f}", str(neighbour.modality),
                      str(neighbour.slice_index), Path(neighbour.path).relative_to(shown_from).as_posix())
    out.print(table)
    out.print(f"labels to evaluate with: {directory / 'labels.csv'} (eval knn, linear, fewshot; finetune), "
              f"{directory / 'masks.csv'} (eval segment)")


def warn(message: str | None) -> None:
    """One line on stderr about a result that may mislead; the command goes on."""
    if message:
        print(f"embedstore: warning: {' '.join(str(message).split())}", file=sys.stderr)


def fail(message: str) -> None:
    """One line on stderr, exit code 2: the contract for every wrong request."""
    print(f"embedstore: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except NO_ARGS_ERRORS as error:
        print(error.ctx.get_help(), file=sys.stderr)
        sys.exit(2)
    except CLICK_USAGE_ERRORS as error:
        fail(error.format_message())
    except UsageError as error:
        fail(str(error))
    except (StoreDamagedError, RuntimeError, ValueError) as error:  # Lance's errors on a damaged file
        from embedstore.store import as_damage  # a store file that cannot be read: one line, exit code 1

        damage = error if isinstance(error, StoreDamagedError) else as_damage(error)
        if damage is None:
            raise
        print(f"embedstore: error: {' '.join(str(damage).split())}", file=sys.stderr)
        sys.exit(1)
    except ABORTS:
        print("embedstore: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
