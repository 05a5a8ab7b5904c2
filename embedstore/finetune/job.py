"""`embedstore finetune`: every check before anything is written, then the protocol in this process
or on Ray Train workers, then the result read from the run folder (also written there as JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from embedstore.eval.results import FinetuneResult
from embedstore.finetune.data import finetune_data
from embedstore.finetune.modes import prepare_backbone
from embedstore.finetune.run import RunFolder, finetune_protocol, finetune_result, run_description
from embedstore.finetune.train import TrainSettings, Workers, check_settings
from embedstore.models.build import rebuild_model
from embedstore.store import Store


def finetune(store: Store, labels: str | Path, settings: TrainSettings, model_id: str | None = None,
             out: Path | None = None, weights: str | None = None, split_by: str | None = None,
             ratios=(0.7, 0.1, 0.2), seed: int = 0, label_column: str = "label", workers: int = 1,
             ray_address: str | None = None, device: str = "cpu",
             on_step: Callable[[int], None] | None = None,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune the stored model `model_id` on the labelled slices; a rerun with the same `out`
    resumes a killed run. `workers` > 1 or a `ray_address` trains data-parallel on Ray Train."""
    check_settings(settings, workers)
    data = finetune_data(store, labels, model_id, split_by, ratios, seed, label_column)
    # The weights are reachable and are the stored model's, and the mode fits the model: checked
    # before the run folder is made.
    prepare_backbone(rebuild_model(data.spec, weights).model, settings.mode, settings.lora_targets)
    folder = RunFolder(out or Path.cwd() / f"finetune-{settings.mode}-{data.spec.model_id}")
    resumed = folder.start(run_description(data, settings, labels))

    def write_log(line: str) -> None:
        folder.log(line)
        if log:
            log(line)

    write_log(f"{'resumed' if resumed else 'started'}: {settings.mode} fine-tune of {data.spec.model_id}, "
              f"slices {data.labelled.counts()}")
    if workers > 1 or ray_address:
        from embedstore.finetune.on_ray import finetune_on_ray

        finetune_on_ray(data, settings, folder, weights, workers, ray_address)
    else:
        finetune_protocol(data, settings, folder, weights, Workers(device=torch.device(device)), on_step, write_log)
    result = finetune_result(data, settings, folder, workers)
    (folder.path / f"finetune-{settings.mode}.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
