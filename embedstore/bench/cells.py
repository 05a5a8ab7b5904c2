"""One cell of a suite: a model on a dataset under a protocol with a seed, run through the eval code
the commands use, and cached under a key of everything its numbers depend on.

The key hashes the dataset's name, the model spec, the labels file's SHA-256, the dataset's split rule and level, the
protocol and its options, the seed and the embedstore version: change one byte of a labels file and
only that dataset's cells run again; a new embedstore version runs every cell again. A cell's result
is its eval's JSON (`OUT/cells/<key>.json`) and, for classification, its test predictions
(`<key>.npz`: keys, patients, targets, scores) for paired comparisons; both are written whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedstore import __version__
from embedstore.bench.suite import CLASSIFICATION, Dataset, Suite
from embedstore.errors import UsageError
from embedstore.eval.labels import file_sha256


@dataclass(frozen=True)
class Cell:
    dataset: Dataset
    model: str  # the suite's name for it
    model_id: str  # resolved in the dataset's store
    protocol: str
    options: dict
    seed: int

    @property
    def label(self) -> str:
        return f"{self.dataset.name} · {self.model} · {self.protocol} · seed {self.seed}"


def cells_of(suite: Suite) -> list[Cell]:
    """Every cell of the suite: each model on each dataset under each protocol its labels allow,
    once per seed (kNN once: it draws nothing). UsageError for a model missing from a store."""
    from embedstore.store import Store

    cells = []
    for dataset in suite.datasets.values():
        store = Store.open(dataset.store)
        for model, prefix in suite.models.items():
            try:
                model_id = store.resolve_model_id(prefix)
            except UsageError as error:
                raise UsageError(f"suite model {model!r} in dataset {dataset.name!r}: {error}") from None
            for protocol, options in suite.protocols.items():
                if dataset.labels_for(protocol) is None:
                    continue
                for seed in (suite.seeds[:1] if protocol == "knn" else suite.seeds):
                    cells.append(Cell(dataset, model, model_id, protocol, options, seed))
    return cells


def cell_key(cell: Cell, spec_row: dict) -> str:
    """24 hex digits of SHA-256 over what the cell's numbers depend on."""
    labels = cell.dataset.labels_for(cell.protocol)
    identity = {"dataset": cell.dataset.name, "model_spec": spec_row, "labels_sha256": file_sha256(labels),
                "split_by": cell.dataset.split_by,
                "ratios": list(cell.dataset.ratios), "level": cell.dataset.level, "protocol": cell.protocol,
                "options": cell.options, "seed": cell.seed, "embedstore_version": __version__}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def run_cell(cell: Cell) -> tuple[dict, dict | None, float]:
    """(the eval's JSON, its test predictions or None, seconds): the cell run as its eval command runs it."""
    from embedstore.store import Store

    started = time.perf_counter()
    store, dataset, options, seed = Store.open(cell.dataset.store), cell.dataset, cell.options, cell.seed
    labels, split = dataset.labels_for(cell.protocol), dict(split_by=dataset.split_by, ratios=dataset.ratios)
    if cell.protocol == "knn":
        from embedstore.eval.evaluate import knn_evaluation

        result = knn_evaluation(store, labels, options.get("feature", "cls"), dataset.level, cell.model_id,
                                tuple(options.get("k", (10, 20, 100, 200))), options.get("temperature", 0.07),
                                seed=seed, search=options.get("search", "auto"), **split)
    elif cell.protocol == "linear":
        from embedstore.eval.evaluate import linear_evaluation

        grid = tuple(options["c_grid"]) if "c_grid" in options else None
        result = linear_evaluation(store, labels, options.get("feature", "cls+patch_mean"), dataset.level,
                                   cell.model_id, grid, seed=seed, **split)
    elif cell.protocol == "fewshot":
        from embedstore.eval.evaluate import fewshot_evaluation

        result = fewshot_evaluation(store, labels, options.get("feature", "cls"), dataset.level, cell.model_id,
                                    tuple(options.get("shots", (1, 2, 4, 8, 16))), options.get("tries", 10),
                                    tuple(options.get("classifiers", ("knn", "prototype", "linear"))), seed=seed,
                                    **split)
    elif cell.protocol == "segment":
        from embedstore.eval.segment.protocol import segment_evaluation
        from embedstore.eval.segment.train import TrainSettings

        settings = TrainSettings(options.get("decoder", "linear"), options.get("epochs", 10),
                                 options.get("batch_size", 32), options.get("loss", "dice"))
        result = segment_evaluation(store, labels, cell.model_id, options.get("classes"), settings, (seed,),
                                    dataset.split_by, dataset.ratios, seed, options.get("score_at", "native"))
    else:
        from embedstore.finetune.job import finetune
        from embedstore.finetune.train import HEAD_LR_GRID, TrainSettings

        settings = TrainSettings(options.get("mode", "linear"), options.get("epochs", 10), options.get("batch_size", 32),
                                 options.get("backbone_lr"), tuple(options.get("head_lrs", HEAD_LR_GRID)), seed)
        with tempfile.TemporaryDirectory() as run_folder:  # the cell keeps the result, not the checkpoints
            result = finetune(store, labels, settings, cell.model_id, Path(run_folder), options.get("weights"),
                              dataset.split_by, dataset.ratios, seed)
    return (result.to_dict(), result.test_predictions if cell.protocol in CLASSIFICATION else None,
            time.perf_counter() - started)


class CellCache:
    """`OUT/cells`: each finished cell's JSON and predictions under its key."""

    def __init__(self, folder: Path):
        self.folder = folder  # made by the first cell stored: a refused suite leaves no empty folder

    def result(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def predictions(self, key: str) -> dict | None:
        path = self.folder / f"{key}.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as saved:
            return {name: saved[name] for name in saved.files}

    def store(self, key: str, cell: Cell, result: dict, predictions: dict | None, seconds: float) -> None:
        """The predictions first, then the JSON: a cell counts as done only when its JSON is there."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if predictions is not None:
            arrays = {"keys": np.asarray(predictions["keys"], dtype=str),
                      "patients": np.asarray(predictions["patients"], dtype=str),
                      "targets": np.asarray(predictions["targets"]), "scores": np.asarray(predictions["scores"])}
            write_whole(self.folder / f"{key}.npz", lambda handle: np.savez(handle, **arrays))
        record = {"cell": {"dataset": cell.dataset.name, "model": cell.model, "model_id": cell.model_id,
                           "protocol": cell.protocol, "options": cell.options, "seed": cell.seed,
                           "labels": str(cell.dataset.labels_for(cell.protocol)), "seconds": round(seconds, 2)},
                  "result": result}
        text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
        write_whole(self.folder / f"{key}.json", lambda handle: handle.write(text.encode()))


def write_whole(path: Path, write) -> None:
    """`write(handle)` into a file beside `path`, renamed over it when complete."""
    descriptor, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    with os.fdopen(descriptor, "wb") as handle:
        write(handle)
    os.replace(partial, path)
