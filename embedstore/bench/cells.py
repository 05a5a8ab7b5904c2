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

from embedstore.bench.suite import Dataset, Suite
from embedstore.errors import UsageError
from embedstore.protocols import PROTOCOLS
from embedstore.store.digests import file_sha256
from embedstore.version import __version__


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
                for seed in (suite.seeds if PROTOCOLS[protocol].seeded else suite.seeds[:1]):
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
    registered = PROTOCOLS[cell.protocol]
    options = registered.options_for(cell.options, cell.dataset.level, cell.seed)
    result = registered.run(Store.open(cell.dataset.store), cell.dataset.labels_spec(cell.protocol, cell.seed), options,
                            cell.model_id)
    return (result.to_dict(), result.test_predictions if registered.paired else None,
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
