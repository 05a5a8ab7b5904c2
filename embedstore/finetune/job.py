"""`embedstore finetune`: every check before anything is written (the options check themselves:
finetune/options.py), then the protocol in this process or on Ray Train workers, then the result read from the run folder (also
written there as JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from embedstore.eval.labels import LabelsSpec, as_labels_spec
from embedstore.eval.results import FinetuneResult
from embedstore.finetune.data import finetune_data
from embedstore.finetune.modes import prepare_backbone
from embedstore.finetune.options import FinetuneOptions, default_decode_workers
from embedstore.finetune.run import RunFolder, finetune_protocol, finetune_result, run_description
from embedstore.finetune.train import TrainSettings, Workers
from embedstore.models.build import rebuild_model
from embedstore.models.embedder import pick_device
from embedstore.models.spec import ModelSpec
from embedstore.store import Store


def train_settings(options: FinetuneOptions, seed: int) -> TrainSettings:
    """What one training needs; `seed` is the labels spec's (split, carved val, heads, augmentation)."""
    decode_workers = options.decode_workers if options.decode_workers is not None else \
        default_decode_workers(pick_device(options.device).type)
    return TrainSettings(options.mode, options.epochs, options.batch_size, options.backbone_lr, options.head_lrs, seed,
                         decode_workers, options.lora_targets)


def ingest_command(store: Path, spec: ModelSpec, result: FinetuneResult) -> str | None:
    """The command that adds the fine-tuned backbone to the store as a new model (None in linear
    mode: the backbone is the stored one)."""
    if not result.checkpoint:
        return None
    return (f"embedstore ingest SRC... --store {store} --model {spec.name} --image-size {spec.image_size} "
            f"--window {spec.window} --weights {result.checkpoint}")


def finetune(store: Store, labels: LabelsSpec | str | Path, options: FinetuneOptions = FinetuneOptions(),
             model_id: str | None = None, out: Path | None = None,
             on_progress: Callable[[int], None] | None = None,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune the stored model `model_id` on the labelled slices; a rerun with the same `out`
    resumes a killed run. `options.workers` > 1 or a `ray_address` trains data-parallel on Ray Train.
    `on_progress(images trained so far)` after every step, `log(line)` for the run's progress lines."""
    labels = as_labels_spec(labels)
    settings, weights, workers = train_settings(options, labels.seed), options.weights, options.workers
    device = pick_device(options.device).type
    data = finetune_data(store, labels, model_id)
    # The weights are reachable and are the stored model's, and the mode fits the model: checked
    # before the run folder is made.
    prepare_backbone(rebuild_model(data.spec, weights).model, settings.mode, settings.lora_targets)
    folder = RunFolder(out or Path.cwd() / f"finetune-{settings.mode}-{data.spec.model_id}")
    resumed = folder.start(run_description(data, settings, labels.path))

    def write_log(line: str) -> None:
        folder.log(line)
        if log:
            log(line)

    trained = 0

    def on_step(images: int) -> None:
        nonlocal trained
        trained += images
        if on_progress:
            on_progress(trained)

    write_log(f"{'resumed' if resumed else 'started'}: {settings.mode} fine-tune of {data.spec.model_id}, "
              f"slices {data.labelled.counts()}")
    if workers > 1 or options.ray_address:
        from embedstore.finetune.on_ray import finetune_on_ray

        finetune_on_ray(data, settings, folder, weights, workers, options.ray_address)
    else:
        finetune_protocol(data, settings, folder, weights, Workers(device=torch.device(device)), on_step, write_log)
    result = finetune_result(data, settings, folder, workers)
    (folder.path / f"finetune-{settings.mode}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
