"""The segmentation probe protocol, on stored patch tokens without the backbone: per seed, seven
decoders (one per learning rate) trained together on train, the rate with the best val Dice chosen,
one decoder refitted on train + val with it, and test scored once, volume by volume, at each
mask's native resolution (or at the model's input size, the study's setting)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embedstore.errors import UsageError
from embedstore.eval.citation import cite
from embedstore.eval.labels import LabelsSpec, as_labels_spec
from embedstore.eval.options import DECODER_LAYERS, SegmentOptions
from embedstore.eval.results import SegmentResult, lr_key
from embedstore.eval.segment.data import SegmentationSet, native_masks, segmentation_set
from embedstore.eval.segment.metrics import SegmentationScorer
from embedstore.eval.segment.predictions import PredictionWriter
from embedstore.eval.segment.tokens import StoredTokens, as_tensors, ordered_batches
from embedstore.eval.segment.train import (
    LEARNING_RATES,
    DecoderShape,
    Progress,
    TrainSettings,
    input_size_dice,
    train_decoders,
)
from embedstore.inference.readback import read_back, stored_slice
from embedstore.models.embedder import pick_device
from embedstore.models.spec import ModelSpec
from embedstore.store import Store

N_OVERLAYS = 6  # test slices drawn in --report: the most labelled slice of each of the first volumes


@dataclass
class Overlay:
    name: str
    image: np.ndarray  # (S, S) in [0, 1], the model's input
    truth: np.ndarray  # (S, S) class values
    prediction: np.ndarray


def required_blocks(spec: ModelSpec, decoder: str) -> tuple[int, ...]:
    """The stored blocks a decoder reads (the network's last 1 or 5); UsageError naming the
    --patch-layers to re-ingest with when the store lacks any of them."""
    if decoder not in DECODER_LAYERS:
        raise UsageError(f"--decoder must be one of {', '.join(DECODER_LAYERS)}, not {decoder!r}")
    n = DECODER_LAYERS[decoder]
    blocks = tuple(range(spec.num_blocks - n, spec.num_blocks))
    missing = [block for block in blocks if block not in spec.patch_layers]
    if missing:
        kept = ", ".join(map(str, spec.patch_layers)) or "none"
        raise UsageError(f"the {decoder} decoder reads the patch tokens of the last {n} block{'s' * (n > 1)}, but "
                         f"model {spec.model_id} kept blocks {kept}: re-ingest with --patch-layers "
                         + ",".join(str(i) for i in range(-n, 0)))
    return blocks


def train_settings(options: SegmentOptions) -> TrainSettings:
    return TrainSettings(options.decoder, options.epochs, options.batch_size, options.loss,
                         pick_device(options.device).type)


def segment_evaluation(store: Store, labels: LabelsSpec | str | Path, options: SegmentOptions = SegmentOptions(),
                       model_id: str | None = None, predictions: Path | None = None,
                       progress: Progress | None = None) -> SegmentResult:
    """Train, choose, refit and test a segmentation probe on the store's patch tokens, once per seed
    of the options; the labels spec's seed makes the split. Predictions of the first seed go to
    `predictions` when given."""
    labels = as_labels_spec(labels)
    settings, seeds, score_at = train_settings(options), options.seeds, options.score_at
    spec = store.spec(store.resolve_model_id(model_id))
    blocks = required_blocks(spec, settings.decoder)
    data = segmentation_set(store, spec, labels.path, options.classes, labels.split_by, labels.ratios, labels.seed)
    shape = DecoderShape(spec.embed_dim, spec.grid, max(data.class_names) + 1, spec.image_size)
    source = StoredTokens(store.patches_root, data.rows, blocks)
    runs, overlays = [], []
    for number, seed in enumerate(seeds):
        started = time.perf_counter()
        decoders = train_decoders(source, data.input_masks, data.indices("train"), shape, settings, LEARNING_RATES,
                                  seed, progress)
        val_dice = input_size_dice(decoders, source, data.input_masks, data.indices("val"), shape.n_classes,
                                   settings.batch_size, settings.device)
        chosen = LEARNING_RATES[int(np.argmax(val_dice))]  # a tie goes to the smaller rate
        final, = train_decoders(source, data.input_masks, data.indices("train", "val"), shape, settings, (chosen,),
                                seed, progress)
        trained = time.perf_counter() - started
        writer = PredictionWriter(predictions) if predictions and number == 0 else None
        # the first seed's predictions are written and drawn
        test, run_overlays = score_test(final, source, data, spec, score_at, settings, writer,
                                        N_OVERLAYS if number == 0 else 0)
        overlays += run_overlays
        runs.append({"seed": seed, "val_dice": {lr_key(lr): score for lr, score in zip(LEARNING_RATES, val_dice)},
                     "chosen_learning_rate": chosen, "train_seconds": round(trained, 2), "test": test})
    split = {"source": f"--split-by patient (seed {labels.seed}, ratios {list(labels.ratios)})" if labels.split_by
             else "labels CSV", "val_carved_from_train": data.val_carved_from_train, "volumes": data.volume_counts()}
    result = SegmentResult(
        task="segment", model_id=spec.model_id, feature="patch tokens of blocks " + ",".join(map(str, blocks)),
        level="slice", classes=list(data.class_names.values()), multilabel=False, counts=data.counts(),
        decoder=settings.decoder, blocks=list(blocks), class_values=data.class_names, loss=settings.loss,
        epochs=settings.epochs, batch_size=settings.batch_size, learning_rates=list(LEARNING_RATES),
        seeds=list(seeds), score_at=score_at, split=split, mask_problems=data.problem_counts(),
        mask_problem_lines=[problem.line for problem in data.problems], runs=runs, metrics=summarise(runs),
        empty_class_rule=runs[0]["test"]["empty_class_rule"], overlays=overlays)
    return cite(result, spec)  # the masks' own accounting is in split and mask_problems


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Mean, standard deviation (over seeds; 0 for one) and values of each headline metric."""
    from embedstore.eval.results import HEADLINE_SEGMENT_METRICS

    summary = {}
    for name in HEADLINE_SEGMENT_METRICS:
        values = [run["test"][name] for run in runs if run["test"][name] is not None]
        summary[name] = {"mean": float(np.mean(values)) if values else None,
                         "std": float(np.std(values)) if values else None, "values": values}
    return summary


@torch.no_grad()
def score_test(decoder: torch.nn.Module, source: StoredTokens, data: SegmentationSet, spec: ModelSpec,
               score_at: str, settings: TrainSettings, writer: PredictionWriter | None,
               n_overlays: int) -> tuple[dict, list]:
    """Test scores, volume by volume (each volume's slices predicted, then scored and written
    together); the overlays of the most labelled slice of the first `n_overlays` volumes."""
    scorer = SegmentationScorer(data.class_names)
    volumes = data.volumes
    test = np.array(sorted(data.indices("test"), key=lambda i: (volumes[i], data.rows[i]["slice_index"])),
                    dtype=np.int64)
    overlay_rows: list[int] = []

    def finish(volume_rows: list[int], native: list[np.ndarray], at_input: list[np.ndarray]) -> None:
        rows = [data.rows[i] for i in volume_rows]
        if score_at == "native":
            scorer.add(volume_name(rows), native_volume(rows), np.stack(native))
        else:
            scorer.add(volume_name(rows), data.input_masks[volume_rows], np.stack(at_input))
        if writer:
            writer.write_volume(rows, np.stack(native))
        if len(overlay_rows) < n_overlays:
            overlay_rows.append(max(volume_rows, key=lambda i: int(np.count_nonzero(data.input_masks[i]))))

    volume_rows, native, at_input = [], [], []
    for batch, tokens in ordered_batches(source, test, settings.batch_size):
        logits = decoder([t.to(settings.device) for t in tokens]).cpu()
        for index, slice_logits in zip(batch, logits):
            if volume_rows and volumes[index] != volumes[volume_rows[0]]:
                finish(volume_rows, native, at_input)
                volume_rows, native, at_input = [], [], []
            volume_rows.append(int(index))
            if score_at == "native" or writer:  # predictions are written in the input's own geometry
                native.append(at_native(slice_logits, data.rows[index]))
            if score_at == "input":
                at_input.append(slice_logits.argmax(0).numpy())
    if volume_rows:
        finish(volume_rows, native, at_input)
    return scorer.result(), overlay_panels(decoder, source, data, spec, overlay_rows, settings.device)


def at_native(logits: torch.Tensor, row: dict) -> np.ndarray:
    """Class map at the image's own size: the logits resized bilinearly, then the argmax."""
    resized = F.interpolate(logits[None], size=(row["rows"], row["cols"]), mode="bilinear", align_corners=False)
    return resized[0].argmax(0).numpy().astype(np.uint8)


def native_volume(rows: list[dict]) -> np.ndarray:
    """The truth of one volume's slices at native size, each mask file read once."""
    by_mask: dict[str, list[int]] = {}
    for position, row in enumerate(rows):
        by_mask.setdefault(row["mask"], []).append(position)
    truth = [None] * len(rows)
    for mask, positions in by_mask.items():
        masks, _ = native_masks(mask, [rows[p] for p in positions])
        for position, mask_slice in zip(positions, masks):
            truth[position] = mask_slice
    return np.stack(truth)


def volume_name(rows: list[dict]) -> str:
    """What a volume is called in the per-volume table: its file for NIfTI and 2D images, its
    series for DICOM."""
    first = stored_slice(rows[0])
    if first.kind == "dicom":
        return rows[0]["series_uid"]
    name = Path(first.path).name
    return name if first.kind == "raster" or first.axis == "axial" else f"{name} ({first.axis})"


def overlay_panels(decoder, source: StoredTokens, data: SegmentationSet, spec: ModelSpec, indices: list[int],
                   device: str) -> list[Overlay]:
    """Image, truth and prediction at the input size for the slices `indices`."""
    if not indices:
        return []
    images = read_back([data.rows[i] for i in indices], spec)
    tokens = [t.to(device) for t in as_tensors(source.read(np.array(indices)))]
    predictions = decoder(tokens).argmax(1).cpu().numpy()
    return [Overlay(volume_name([data.rows[i]]) + f" slice {data.rows[i]['slice_index']}", image.mean(0),
                    data.input_masks[i], prediction) for i, image, prediction in zip(indices, images, predictions)]
