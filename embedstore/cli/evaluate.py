"""`embedstore eval knn|linear|fewshot|segment`: the protocols of embedstore/protocols.py on stored
vectors, their options from eval/options.py (defaults included), their labels as a LabelsSpec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from embedstore.cli.options import (
    DeviceOption,
    FeatureOption,
    LabelColumnOption,
    LabelsOption,
    LevelOption,
    ModelIdOption,
    RatiosOption,
    ReportOption,
    ResultJsonOption,
    SplitByOption,
    StoreArgument,
    check_output,
    check_outputs,
    labels_spec,
    parse_numbers,
)
from embedstore.cli.progress import fit_progress, rows_progress
from embedstore.cli.render import out, print_evaluation, print_fewshot, print_segmentation
from embedstore.eval.labels import DEFAULT_RATIOS
from embedstore.eval.options import (
    CLASSIFIERS,
    DEFAULT_KS,
    DEFAULT_SHOTS,
    FewShotOptions,
    KnnOptions,
    LinearOptions,
    SegmentOptions,
)

RATIOS = ",".join(map(str, DEFAULT_RATIOS))

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate stored vectors against labels, without the backbone. "
                       "--feature defaults to the input each protocol uses in the reference study: cls for kNN and "
                       "few-shot, cls+patch_mean for the linear probe.")


def run(name: str, store: Path, labels, options, model_id: str | None, **extra):
    """The registered protocol `name` on the store at `store`."""
    from embedstore.protocols import PROTOCOLS
    from embedstore.store import Store

    return PROTOCOLS[name].run(Store.open(store), labels, options, model_id, **extra)


def write_result(result, path: Path | None, report: Path | None) -> None:
    if path:
        path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if report:
        from embedstore.eval.report import write_report

        out.print(f"report: {write_report(result, report)}")


@eval_app.command("knn")
def knn(
    store: StoreArgument,
    labels: LabelsOption,
    feature: FeatureOption = KnnOptions.feature,
    level: LevelOption = KnnOptions.level,
    k: str = typer.Option(",".join(map(str, DEFAULT_KS)), "--k", "-k",
                          help="Neighbour counts, comma-separated, each at least 1."),
    temperature: float = typer.Option(KnnOptions.temperature, help="Vote weights exp(similarity / T); T above 0."),
    search: str = typer.Option(KnnOptions.search, help="Neighbour search: exact, int8 (candidates re-ranked exactly; "
                                                       "about 2x faster on a CPU at k = 20), or auto (int8 for large "
                                                       "sets and k up to 100 on a CPU)."),
    split_by: SplitByOption = None,
    ratios: RatiosOption = RATIOS,
    seed: int = typer.Option(0, help="Seed of --split-by patient."),
    model_id: ModelIdOption = None,
    json_out: ResultJsonOption = None,
    report: ReportOption = None,
    label_column: LabelColumnOption = "label",
) -> None:
    """kNN classification, the DINOv2 weighted-vote protocol, on stored vectors."""
    spec = labels_spec(labels, label_column, split_by, ratios, seed)
    check_outputs(json_out, report)
    options = KnnOptions(feature=feature, level=level, k=parse_numbers(k, "--k", int), temperature=temperature,
                         search=search)
    result = run("knn", store, spec, options, model_id)
    print_evaluation(result)
    write_result(result, json_out, report)


@eval_app.command("linear")
def linear(
    store: StoreArgument,
    labels: LabelsOption,
    feature: str = typer.Option(LinearOptions.feature, help="cls, patch_mean, clsN (final-norm CLS of the last N "
                                "blocks, concatenated), cls+patch_mean or clsN+patch_mean. grid: choose among cls1, "
                                "cls4, cls1+patch_mean and cls4+patch_mean on val. Default cls+patch_mean, the "
                                "reference study's linear-probe input."),
    level: LevelOption = LinearOptions.level,
    c_grid: Optional[str] = typer.Option(None, help="Comma-separated C values (default: 10^linspace(-6, 5, 45))."),
    split_by: SplitByOption = None,
    ratios: RatiosOption = RATIOS,
    seed: int = typer.Option(0, help="Seed of --split-by patient, and of the val carved from train when the "
                             "splits have none."),
    model_id: ModelIdOption = None,
    json_out: ResultJsonOption = None,
    report: ReportOption = None,
    label_column: LabelColumnOption = "label",
) -> None:
    """Linear probe (logistic regression): C chosen on val only, refitted on train + val, tested once."""
    spec = labels_spec(labels, label_column, split_by, ratios, seed)
    check_outputs(json_out, report)
    options = LinearOptions(feature=feature, level=level,
                            c_grid=parse_numbers(c_grid, "--c-grid") if c_grid else None)
    with fit_progress() as progress:
        result = run("linear", store, spec, options, model_id, progress=progress)
    print_evaluation(result)
    write_result(result, json_out, report)


@eval_app.command("fewshot")
def fewshot(
    store: StoreArgument,
    labels: LabelsOption,
    feature: FeatureOption = FewShotOptions.feature,
    level: LevelOption = FewShotOptions.level,
    shots: str = typer.Option(",".join(map(str, DEFAULT_SHOTS)), help="Training patients per class."),
    tries: int = typer.Option(FewShotOptions.tries, help="Random draws per shot count."),
    classifiers: str = typer.Option(",".join(CLASSIFIERS), help="Any of knn, prototype, linear."),
    split_by: SplitByOption = None,
    ratios: RatiosOption = RATIOS,
    seed: int = typer.Option(0, help="Seed of --split-by patient and of the few-shot draws."),
    model_id: ModelIdOption = None,
    json_out: ResultJsonOption = None,
    plot: Optional[Path] = typer.Option(None, "--plot", help="Save the few-shot curve as a PNG here."),
    report: ReportOption = None,
    label_column: LabelColumnOption = "label",
) -> None:
    """Few-shot curves: mean and 95% interval over random draws of training patients per class."""
    spec = labels_spec(labels, label_column, split_by, ratios, seed)
    check_outputs(json_out, report)
    check_output(plot, "--plot")
    options = FewShotOptions(feature=feature, level=level, shots=parse_numbers(shots, "--shots", int), tries=tries,
                             classifiers=tuple(classifiers.split(",")))
    result = run("fewshot", store, spec, options, model_id)
    print_fewshot(result)
    write_result(result, json_out, report)
    if plot:
        from embedstore.eval.report import plot_curves

        plot_curves(result, plot)


@eval_app.command("segment")
def segment(
    store: StoreArgument,
    labels: Path = typer.Option(..., "--labels", help="Labels CSV with a join column and a mask column (a PNG/TIFF "
                                "label image, NIfTI label volume or DICOM SEG per row); relative paths are read "
                                "from its folder."),
    decoder: str = typer.Option(SegmentOptions.decoder, help="linear (1x1 conv on the last block) or unet (last 5 "
                                "blocks)."),
    classes: Optional[str] = typer.Option(None, help="Class names, 1:liver,2:spleen, or an MSD dataset.json "
                                          "(default: a dataset.json beside the labels CSV, else the mask values)."),
    epochs: int = typer.Option(SegmentOptions.epochs, help="Epochs over the train tokens."),
    batch_size: int = typer.Option(SegmentOptions.batch_size, help="Slices per step."),
    loss: str = typer.Option(SegmentOptions.loss, help="dice (MONAI DiceLoss) or dicece (Dice + cross-entropy)."),
    seeds: str = typer.Option("0", help="Training seeds, comma-separated: each repeats the protocol; the "
                              "report gives mean and std."),
    split_by: SplitByOption = None,
    ratios: RatiosOption = RATIOS,
    seed: int = typer.Option(0, help="Seed of --split-by patient, and of the val carved from train when the "
                             "splits have none."),
    score_at: str = typer.Option(SegmentOptions.score_at, help="native (each mask's own resolution) or input (the "
                                 "model's input size, the reference study's setting)."),
    model_id: ModelIdOption = None,
    json_out: ResultJsonOption = None,
    report: ReportOption = None,
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write the test predictions here, one "
                                               "file per input in its geometry (created; its parent must exist)."),
    device: DeviceOption = SegmentOptions.device,
) -> None:
    """Segmentation probe on stored patch tokens: 7 learning rates trained together, chosen on val
    Dice, refitted on train + val, tested once."""
    spec = labels_spec(labels, "label", split_by, ratios, seed)
    check_outputs(json_out, report)
    check_output(predictions, "--predictions", folder=True)
    options = SegmentOptions(decoder=decoder, epochs=epochs, batch_size=batch_size, loss=loss,
                             seeds=parse_numbers(seeds, "--seeds", int), score_at=score_at, classes=classes,
                             device=device)
    with rows_progress(f"segment ({decoder} decoder)") as progress:
        result = run("segment", store, spec, options, model_id, predictions=predictions, progress=progress)
    print_segmentation(result)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if report:
        from embedstore.eval.segment.report import write_segment_report

        out.print(f"report: {write_segment_report(result, report)}")
    if predictions:
        out.print(f"predictions: {predictions}")
