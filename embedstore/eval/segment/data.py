"""Masks joined to stored slices: the labels CSV's `mask` column read, checked against each image's
size and geometry, and resized (nearest neighbour) to the model's input size; patient-safe splits.

A CSV row selects stored slices through its join column (a key, path or SOP UID selects one slice;
a path to a NIfTI file, a series or a study selects all of their slices) and names one mask:
- a PNG/TIFF label image for a single slice;
- a NIfTI label volume for the slices of one NIfTI image, cut as the ingest cut the image;
- a DICOM SEG whose frames are matched to the selected DICOM slices.
A row whose mask cannot be used (unreadable, wrong size or geometry, a class value not named,
no stored slice) is a problem: one line, counted by reason, and the evaluation goes on without it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embedstore.errors import UsageError
from embedstore.eval.labels import carve_val, check_patient_splits, patient_splits, read_labels
from embedstore.eval.segment.masks import (
    MaskError,
    check_class_values,
    mask_kind,
    parse_classes,
    read_dicom_seg,
    read_mask_image,
    read_mask_volume,
)
from embedstore.inference.readback import stored_slice
from embedstore.models.spec import ModelSpec
from embedstore.store import Store
from embedstore.store.schema import slices_table_name
from embedstore.store.upgrade import check_item_columns

STORED_COLUMNS = ["key", "path", "patient_id", "study_uid", "series_uid", "sop_uid", "slice_index", "modality",
                  "body_part", "patch_shard", "patch_offset"]
ITEM_COLUMNS = ["key", "frame", "rows", "cols", "image_position", "kind", "axis"]
NO_STORED_ROW = "no_stored_row"
NOT_ONE_SLICE = "not_one_slice"


@dataclass
class MaskProblem:
    reason: str
    line: str  # one line naming the mask and what is wrong


@dataclass
class SegmentationSet:
    """The labelled slices, sorted by where their tokens are stored (reads follow the chunks)."""

    rows: list[dict]  # stored and item columns, plus `mask` (its path)
    input_masks: np.ndarray  # (n, S, S) uint8 class values at the model's input size
    class_names: dict[int, str]  # foreground class value → name
    splits: np.ndarray  # (n,) train | val | test
    patients: np.ndarray  # (n,)
    problems: list[MaskProblem] = field(default_factory=list)
    val_carved_from_train: bool = False

    @property
    def volumes(self) -> list[str]:
        """The volume (series) of each slice: the unit of per-volume scores and of prediction files."""
        return [row["series_uid"] for row in self.rows]

    def indices(self, *splits: str) -> np.ndarray:
        return np.flatnonzero(np.isin(self.splits, splits))

    def counts(self) -> dict[str, int]:
        return {split: int((self.splits == split).sum()) for split in ("train", "val", "test")}

    def volume_counts(self) -> dict[str, int]:
        volumes = np.array(self.volumes, dtype=object)
        return {split: len(set(volumes[self.splits == split])) for split in ("train", "val", "test")}

    def problem_counts(self) -> dict[str, int]:
        return dict(Counter(problem.reason for problem in self.problems))


def segmentation_set(store: Store, spec: ModelSpec, labels: str | Path, classes: str | None = None,
                     split_by: str | None = None, ratios=(0.7, 0.1, 0.2), seed: int = 0) -> SegmentationSet:
    """The slices the labels CSV gives masks for, with their masks at input size and their splits."""
    join_column, csv_rows = read_labels(labels, "mask")
    names = parse_classes(classes, Path(labels))
    stored = _stored_rows(store, spec)
    by_value: dict[str, list[dict]] = {}
    for row in stored:
        by_value.setdefault(row[join_column], []).append(row)
    labelled, masks, problems, found_names = [], [], [], {}
    for csv_row in csv_rows:
        mask = _resolved(csv_row["mask"], Path(labels))
        selected = by_value.get(csv_row[join_column], [])
        if not selected:
            problems.append(MaskProblem(NO_STORED_ROW, f"{join_column} {csv_row[join_column]}: no stored slice of "
                                                       f"model {spec.model_id} (mask {mask})"))
            continue
        try:
            native, segment_names = native_masks(mask, selected)
            for slice_mask in native:
                check_class_values(slice_mask, names)
        except MaskError as error:
            problems.append(MaskProblem(error.reason, f"{mask}: {error.message}"))
            continue
        found_names.update(segment_names)
        for row, slice_mask in zip(selected, native):
            labelled.append({**row, "mask": mask, "split": csv_row.get("split", ""),
                             "csv_patient": csv_row.get("patient_id", "")})
            masks.append(resize_mask(slice_mask, spec.image_size))
    if not labelled:
        raise UsageError("no labels row gives a usable mask for a stored slice "
                         f"({problem_counts(problems) or 'no rows'}); first problem: "
                         f"{problems[0].line if problems else '-'}")
    order = sorted(range(len(labelled)), key=lambda i: (labelled[i]["patch_shard"], labelled[i]["patch_offset"]))
    labelled = [labelled[i] for i in order]
    input_masks = np.stack([masks[i] for i in order])
    class_names = _class_names(input_masks, names or found_names)
    patients = np.array([row["csv_patient"] or row["patient_id"] or f"series:{row['series_uid']}"
                         for row in labelled], dtype=object)
    if split_by == "patient":
        splits = patient_splits(patients, [0] * len(patients), ratios, seed)
    else:
        splits = np.array([row["split"] for row in labelled], dtype=object)
    data = SegmentationSet(labelled, input_masks, class_names, splits, patients, problems)
    try:
        check_patient_splits(data.patients, data.splits, data.counts())
        return with_val_split(data, seed)
    except UsageError as error:
        if not problems:
            raise
        # a split may be empty because its rows' masks were left out: say which and why
        raise UsageError(f"{error}; {len(problems)} labels rows were left out for their masks "
                         f"({problem_counts(problems)}), first: {problems[0].line}") from None


def problem_counts(problems: list[MaskProblem]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in Counter(p.reason for p in problems).items())


def _stored_rows(store: Store, spec: ModelSpec) -> list[dict]:
    rows = store.rows(slices_table_name(spec.model_id), None, STORED_COLUMNS).to_pylist()
    check_item_columns(store)
    items = {item["key"]: item for item in store.rows("items", None, ITEM_COLUMNS).to_pylist()}
    return [{**row, **items[row["key"]]} for row in rows if row["patch_shard"] is not None]


def _resolved(mask: str, labels: Path) -> str:
    return mask if Path(mask).is_absolute() else str((labels.parent / mask).resolve())


def native_masks(mask: str, selected: list[dict]) -> tuple[list[np.ndarray], dict[int, str]]:
    """Each selected slice's mask at the image's own size, and any class names the mask file gives
    (a DICOM SEG's segment labels); MaskError when the mask does not fit the slices."""
    kind = mask_kind(mask)
    if kind == "image":
        if len(selected) != 1:
            raise MaskError(NOT_ONE_SLICE, f"a 2D mask labels one slice, but its row selects {len(selected)}")
        row = selected[0]
        return [read_mask_image(mask, row["rows"], row["cols"])], {}
    if kind == "nifti":
        images = {(row["path"], stored_slice(row).axis) for row in selected}
        if len(images) != 1 or not selected[0]["key"].startswith("nifti:"):
            raise MaskError(NOT_ONE_SLICE, "a NIfTI label volume labels the slices of one NIfTI image, but its "
                                           f"row selects {len(images)} images")
        (image_path, axis), = images
        volume = read_mask_volume(mask, image_path, axis)
        return [volume[row["frame"]] for row in selected], {}
    seg = read_dicom_seg(mask)
    try:
        return [seg.labels_for(row["sop_uid"], row["image_position"], row["rows"], row["cols"], row["series_uid"])
                for row in selected], seg.segment_names
    except (ValueError, RuntimeError, KeyError, IndexError) as error:  # highdicom on damaged pixel data
        raise MaskError("unreadable_mask", f"DICOM SEG pixel data cannot be read: {error}") from None


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A class map resized with nearest neighbour to size × size (the model input's geometry: the
    whole image squeezed to a square, as preprocess does)."""
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=(size, size), mode="nearest")[0, 0].numpy().astype(np.uint8)


def _class_names(masks: np.ndarray, named: dict[int, str]) -> dict[int, str]:
    """Names for every foreground value from 1 to the largest named or present: the given names
    (--classes, a dataset.json, a SEG's segment labels), else "class <value>"."""
    largest = max([*named, int(masks.max())])
    if not largest:
        raise UsageError("every mask joined holds background (0) only: there is no class to segment")
    return {value: named.get(value, f"class {value}") for value in range(1, largest + 1)}


def with_val_split(data: SegmentationSet, seed: int) -> SegmentationSet:
    """The set unchanged when it has val slices; else val carved from train by patient."""
    if (data.splits == "val").any():
        return data
    splits = carve_val(data.patients, data.splits, [0] * len(data.splits), seed)
    if not (splits == "val").any():
        raise UsageError(f"too few train patients to carve a val split from: {data.counts()}")
    data.splits = splits
    data.val_carved_from_train = True
    return data
