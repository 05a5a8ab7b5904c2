"""`embedstore finetune`: the fine-tuning protocol, options from finetune/options.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from embedstore.cli.evaluate import RATIOS, write_result
from embedstore.cli.options import (
    DeviceOption,
    LabelColumnOption,
    LabelsOption,
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
from embedstore.cli.progress import rows_progress
from embedstore.cli.render import out, print_evaluation
from embedstore.finetune.options import HEAD_LR_GRID, LORA_TARGETS, FinetuneOptions


def finetune(
    store: StoreArgument,
    labels: LabelsOption,
    mode: str = typer.Option(..., help="full (every weight), lora (peft adapters), bitfit (biases) or linear "
                             "(frozen backbone: the online twin of eval linear)."),
    epochs: int = typer.Option(FinetuneOptions.epochs, help="Epochs of every training."),
    batch_size: int = typer.Option(FinetuneOptions.batch_size, help="Images per step, all workers together."),
    backbone_lr: Optional[float] = typer.Option(
        None, help="Learning rate of the backbone's trainable parameters. Default: 1e-5 for full (the study's), "
        "the head's rate for lora and bitfit."),
    head_lrs: str = typer.Option(",".join(map(str, HEAD_LR_GRID)), help="Head learning rates, chosen on val."),
    lora_targets: str = typer.Option(",".join(LORA_TARGETS), help="Linear layers of every block that LoRA adapts."),
    weights: Optional[str] = typer.Option(None, help="The stored model's checkpoint, when its recorded source "
                                          "(the hub, a file) cannot be reached from here."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder: checkpoints, log, result and the "
                                           "fine-tuned backbone (default ./finetune-MODE-MODEL_ID). Rerun with the "
                                           "same folder to resume."),
    split_by: SplitByOption = None,
    ratios: RatiosOption = RATIOS,
    seed: int = typer.Option(0, help="Seed of --split-by patient, the val carved from train, the heads' start "
                             "and the augmentation."),
    workers: int = typer.Option(FinetuneOptions.workers, help="Data-parallel training workers on Ray Train (one "
                                "per GPU); 1 trains in this process."),
    ray_address: Optional[str] = typer.Option(None, help="Train on this Ray cluster (the store, its images and "
                                              "--out on shared storage)."),
    decode_workers: Optional[int] = typer.Option(
        None, help="Processes decoding and augmenting images; 0 decodes inline. Default: up to 8 with CUDA, 0 on a "
        "CPU (the model's threads use every core)."),
    device: DeviceOption = FinetuneOptions.device,
    model_id: ModelIdOption = None,
    json_out: ResultJsonOption = None,
    report: ReportOption = None,
    label_column: LabelColumnOption = "label",
) -> None:
    """End-to-end baseline: fine-tune the stored model on the labelled slices (head rate chosen on
    val, retrained on train + val, tested once) and save the fine-tuned backbone."""
    from embedstore.finetune.job import finetune as run_finetune
    from embedstore.finetune.job import ingest_command
    from embedstore.store import Store

    spec = labels_spec(labels, label_column, split_by, ratios, seed)
    check_outputs(json_out, report)
    check_output(out_dir, "--out", folder=True)
    options = FinetuneOptions(mode=mode, epochs=epochs, batch_size=batch_size, backbone_lr=backbone_lr,
                              head_lrs=parse_numbers(head_lrs, "--head-lrs"), lora_targets=tuple(lora_targets.split(",")),
                              weights=weights, decode_workers=decode_workers, device=device, workers=workers,
                              ray_address=ray_address)
    opened = Store.open(store)
    with rows_progress(f"finetune ({mode})") as progress:
        result = run_finetune(opened, spec, options, model_id, out_dir, lambda images: progress(images, None),
                              log=lambda line: print(line, file=sys.stderr))
    print_evaluation(result)
    write_result(result, json_out, report)
    command = ingest_command(store, opened.spec(result.model_id), result)
    if command:
        out.print(f"add the fine-tuned model to the store: {command}")
