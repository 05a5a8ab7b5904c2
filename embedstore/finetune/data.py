"""What fine-tuning trains on: the labelled stored slices, split as the evals split them, and their
pixels read back from the files with the model's stored spec (pipeline/readback.py): exactly the
input the stored vectors came from.

Splits, classes and patients come from the same code as `eval linear` (labelled_vectors, then a val
carved from train by patient when the labels give none), so a fine-tuned model and a probe are scored
on the same test rows. Train images get the study's augmentation, RandomResizedCrop (scale 0.75-1)
and a horizontal flip, drawn from a seed per (run seed, epoch, row): a row is augmented the same way
whichever process decodes it, so a resumed run and a data-parallel run see the images a single
uninterrupted process sees.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from embedstore.errors import UsageError
from embedstore.inference.readback import read_back
from embedstore.models.embedder import normalize
from embedstore.models.spec import ModelSpec

if TYPE_CHECKING:  # the store's libraries stay out of the trainer's imports (GPU workers may lack them)
    from embedstore.eval.labels import LabelledVectors, LabelsRecord, LabelsSpec
    from embedstore.store import Store

READ_BACK_COLUMNS = ["key", "path", "frame", "study_uid", "series_uid", "slice_index", "modality", "body_part",
                     "kind", "axis"]
CROP_SCALE = (0.75, 1.0)


@dataclass
class FinetuneData:
    spec: ModelSpec
    labelled: LabelledVectors  # targets, classes, patients and train / val / test splits (val never empty)
    items: list[dict]  # per labelled row, where its pixels are (READ_BACK_COLUMNS)
    val_carved: bool  # val was carved from train by patient
    record: LabelsRecord  # where the labels came from and what became of them
    left_out: dict[str, int] = field(default_factory=dict)  # reason → labelled rows that cannot be trained on
    warnings: list[str] = field(default_factory=list)  # what the result must say about them

    def rows(self, *splits: str) -> np.ndarray:
        """Indices of the labelled rows in `splits`."""
        return np.flatnonzero(np.isin(self.labelled.splits, splits))

    def part(self, *splits: str) -> LabelledVectors:
        return self.labelled.subset(np.isin(self.labelled.splits, splits))

    def images(self, rows: np.ndarray, augment: bool, seed: int = 0) -> "SliceImages":
        """The pixels and targets of the labelled rows `rows`."""
        return SliceImages([self.items[i] for i in rows], self.labelled.targets[rows], self.spec, augment, seed)


def finetune_data(store: Store, labels: LabelsSpec | str | Path, model_id: str | None = None) -> FinetuneData:
    """The labelled slices of one stored model with train / val / test rows; UsageError for labels a
    classifier cannot learn from (one class, a class without train rows, an empty split)."""
    from embedstore.eval.evaluate import labelled_vectors
    from embedstore.eval.labels import as_labels_spec
    from embedstore.eval.linear import with_val_split
    from embedstore.store.upgrade import check_item_columns

    labels = as_labels_spec(labels)
    vectors, labelled, record = labelled_vectors(store, labels, "cls", "slice", model_id)
    labelled, carved = with_val_split(labelled, labels.seed)
    labelled.matrix = labelled.matrix[:, :0]  # the stored vectors are not trained on: not sent to Ray workers
    keys = set(labelled.keys)
    check_item_columns(store)
    by_key = {row["key"]: row for row in store.rows("items", None, READ_BACK_COLUMNS).to_pylist() if row["key"] in keys}
    items = [by_key[key] for key in labelled.keys]
    # Pixels are read back from the files: a file gone since the ingest would stop the training midway.
    present = np.array([os.path.isfile(item["path"]) for item in items], dtype=bool)
    left_out, warnings = {}, []
    if not present.all():
        gone = [item["path"] for item, here in zip(items, present) if not here]
        left_out["file_gone"] = len(gone)
        warnings.append(f"{len(gone):,} labelled slice{'s' * (len(gone) > 1)} left out: "
                        f"{'their files are' if len(gone) > 1 else 'its file is'} gone since the ingest "
                        f"(first: {gone[0]})")
        labelled, items = labelled.subset(present), [item for item, here in zip(items, present) if here]
    empty = [split for split, n in labelled.counts().items() if n == 0]
    if empty:
        raise UsageError(f"the {' and '.join(empty)} split{'s' * (len(empty) > 1)} would have no rows "
                         f"({labelled.counts()}): fine-tuning chooses on val and reports on test"
                         + (f"; {warnings[0]}" if warnings else ""))
    return FinetuneData(store.spec(vectors.model_id), labelled, items, carved, record, left_out, warnings)


class SliceImages(Dataset):
    """Rows' pixels, normalised for the model, with their targets; augmented when `augment`."""

    def __init__(self, items: list[dict], targets: np.ndarray, spec: ModelSpec, augment: bool, seed: int = 0):
        self.items, self.targets, self.spec = items, torch.as_tensor(targets), spec
        self.augment, self.seed = augment, seed
        if augment:
            from torchvision.transforms import InterpolationMode, v2

            self.augmentation = v2.Compose([
                v2.RandomResizedCrop(spec.image_size, scale=CROP_SCALE, antialias=True,
                                     interpolation=InterpolationMode(spec.interpolation)),
                v2.RandomHorizontalFlip(),
            ])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, epoch_and_row: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = epoch_and_row
        pixels = torch.from_numpy(read_back([self.items[index]], self.spec))
        if self.augment:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, epoch, index)) % 2 ** 63)
                pixels = self.augmentation(pixels)
        return normalize(pixels, self.spec.mean, self.spec.std)[0], self.targets[index]


class GlobalBatches(Sampler):
    """One data-parallel rank's share of each global batch, as (epoch, row) pairs: the rows shuffled
    by (seed, epoch), cut into batches of `batch_size` (when training, full ones only), each split
    across `world` ranks, so the global batches are the same whatever the number of ranks. The epoch
    travels with each row to the decode workers, which live across epochs."""

    def __init__(self, n_rows: int, batch_size: int, train: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.n_rows, self.batch_size, self.train = n_rows, batch_size, train
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.train:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_rows)
            order = order[:len(self) * self.batch_size]
        else:
            order = np.arange(self.n_rows)
        for start in range(0, len(order), self.batch_size):
            share = np.array_split(order[start:start + self.batch_size], self.world)[self.rank]
            yield [(self.epoch, int(row)) for row in share]

    def __len__(self) -> int:
        return self.n_rows // self.batch_size if self.train else -(-self.n_rows // self.batch_size)


def batches(dataset: SliceImages, batch_size: int, train: bool, seed: int, decode_workers: int,
            rank: int = 0, world: int = 1) -> DataLoader:
    """Batches of `dataset` decoded in `decode_workers` processes (0: in this one) that stay up for
    every epoch; call `.batch_sampler.set_epoch(epoch)` before each one."""
    with warnings.catch_warnings():  # the workers decode files and never touch the store
        warnings.filterwarnings("ignore", message="lancedb fork support")
        return DataLoader(dataset, batch_sampler=GlobalBatches(len(dataset), batch_size, train, seed, rank, world),
                          num_workers=decode_workers, persistent_workers=decode_workers > 0,
                          pin_memory=torch.cuda.is_available())
