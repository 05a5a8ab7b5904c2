"""A benchmark suite: datasets x models x protocols x seeds, read from TOML with the standard library.

    name = "demo"
    baseline = "vits14"                  # a key of [models]: every other model is compared with it
    seeds = [0, 1]                       # each repeats every protocol (and the patient split)

    [datasets.orientation]
    store = "demo/store"                 # paths are read from the suite file's folder
    labels = "demo/orientation.csv"      # classification labels (knn, linear, fewshot, finetune)
    masks = "demo/masks.csv"             # segmentation labels (segment); either or both
    split_by = "patient"                 # or "csv" (the labels' split column)
    ratios = [0.7, 0.1, 0.2]
    level = "slice"

    [models]
    vits14 = "dinov2_vits14-random"      # a model id or unique prefix in every dataset's store
    resnet = "resnet18-random"

    [protocols.knn]                      # each protocol's options, as the eval commands take them
    k = [10, 20]
    [protocols.linear]
    [protocols.fewshot]
    tries = 10
    [protocols.segment]
    epochs = 5
    [protocols.finetune]
    mode = "linear"
    epochs = 3

Every problem is a UsageError naming the key, before any cell runs. The protocols and the options
each takes come from embedstore/protocols.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tomllib

from embedstore.errors import UsageError
from embedstore.eval.labels import DEFAULT_RATIOS, LabelsSpec
from embedstore.protocols import PROTOCOLS, protocol
from embedstore.sources.discover import check_input_file


@dataclass(frozen=True)
class Dataset:
    name: str
    store: Path
    labels: Path | None  # classification labels CSV
    masks: Path | None  # segmentation labels CSV
    split_by: str | None  # "patient", or None for the CSV's split column
    ratios: tuple[float, float, float]
    level: str

    def labels_for(self, protocol: str) -> Path | None:
        """The labels file the protocol reads (classes or masks), None when the dataset has none."""
        return self.masks if PROTOCOLS[protocol].labels == "masks" else self.labels

    def labels_spec(self, protocol: str, seed: int) -> LabelsSpec:
        return LabelsSpec(self.labels_for(protocol), split_by=self.split_by, ratios=self.ratios, seed=seed)


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    datasets: dict[str, Dataset]
    models: dict[str, str]  # name → model id or prefix
    protocols: dict[str, dict]  # protocol → its options
    seeds: tuple[int, ...]
    baseline: str | None


def read_suite(path: Path) -> Suite:
    """The suite in `path`; UsageError naming what is wrong."""
    if not path.is_file():
        raise UsageError(f"suite file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"suite file {path} is not TOML: {error}") from None
    unknown = set(raw) - {"name", "baseline", "seeds", "datasets", "models", "protocols"}
    if unknown:
        raise UsageError(f"suite {path}: unknown key {sorted(unknown)[0]!r}")
    folder = path.resolve().parent
    datasets = {name: read_dataset(name, table, folder) for name, table in table_of(raw, "datasets", path).items()}
    models = table_of(raw, "models", path)
    if not all(isinstance(prefix, str) and prefix for prefix in models.values()):
        raise UsageError(f"suite {path}: [models] maps a name to a model id or prefix (a string)")
    protocols = table_of(raw, "protocols", path)
    for name, options in protocols.items():
        try:
            protocol(name).options_for(options)  # its options checked as the protocol checks them
        except (UsageError, TypeError, ValueError) as error:
            raise UsageError(f"suite {path}: {error}") from None
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(seed, int) for seed in seeds):
        raise UsageError(f"suite {path}: seeds is a list of integers, not {seeds!r}")
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in models:
        raise UsageError(f"suite {path}: baseline {baseline!r} is not one of [models] ({', '.join(models)})")
    return Suite(str(raw.get("name", path.stem)), path.resolve(), datasets, dict(models), protocols, tuple(seeds),
                 baseline)


def table_of(raw: dict, key: str, path: Path) -> dict:
    table = raw.get(key)
    if not isinstance(table, dict) or not table:
        raise UsageError(f"suite {path}: needs a non-empty [{key}] table")
    return table


def read_dataset(name: str, table: dict, folder: Path) -> Dataset:
    where = f"[datasets.{name}]"
    unknown = set(table) - {"store", "labels", "masks", "split_by", "ratios", "level"}
    if unknown:
        raise UsageError(f"suite: {where} has no key {sorted(unknown)[0]!r}")
    if "store" not in table or not ("labels" in table or "masks" in table):
        raise UsageError(f"suite: {where} needs a store and labels (classification) or masks (segmentation)")
    split_by = table.get("split_by", "csv")
    if split_by not in ("csv", "patient"):
        raise UsageError(f"suite: {where} split_by is csv or patient, not {split_by!r}")
    ratios = tuple(table.get("ratios", DEFAULT_RATIOS))
    level = table.get("level", "slice")
    if level not in ("slice", "series"):
        raise UsageError(f"suite: {where} level is slice or series, not {level!r}")
    resolve = lambda key: (folder / table[key]).resolve() if key in table else None  # noqa: E731
    for key in ("labels", "masks"):
        if key in table:
            check_input_file(resolve(key), f"suite: {where} {key}")
    if not resolve("store").is_dir():
        raise UsageError(f"suite: {where} store {resolve('store')} is not a folder")
    return Dataset(name, resolve("store"), resolve("labels"), resolve("masks"),
                   None if split_by == "csv" else "patient", ratios, level)
