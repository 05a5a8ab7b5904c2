"""Labels and splits: a labels CSV joined to stored vectors, and train / val / test splits that
never put one patient on two sides.

Labels CSV: exactly one join column among `key`, `path`, `sop_uid`, `series_uid`, `study_uid`; a
`label` column, or another named by `--label-column` (a class name; several joined by `|` make a
multi-label task); optional `split` (train / val / test) and `patient_id`. Stored paths are
absolute: a relative `path` is read from the CSV's folder. A label given for a series or a study
applies to all of its slices. Patients come from the CSV's `patient_id`, else the store's (hashed)
PatientID, else each series counts as its own patient. Every class must have train rows, and a
single-label task two classes or more.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedstore.errors import UsageError
from embedstore.sources.discover import check_input_file
from embedstore.store.digests import file_sha256
from embedstore.store.vectors import Vectors

JOIN_COLUMNS = ("key", "path", "sop_uid", "series_uid", "study_uid")
SPLITS = ("train", "val", "test")
SPLIT_RULES = ("csv", "patient")  # the labels' own split column, or a split by patient
DEFAULT_RATIOS = (0.7, 0.1, 0.2)  # train, val, test shares of --split-by patient
MULTI_LABEL_SEPARATOR = "|"
VAL_SHARE_OF_TRAIN = 0.15  # carved by patient when the labels give no val split


@dataclass(frozen=True)
class LabelsSpec:
    """A labels CSV and how its rows are split: what every protocol reads its labels through (the
    eval commands' --labels, --label-column, --split-by, --ratios, --seed; a suite's dataset)."""

    path: Path
    label_column: str = "label"
    split_by: str | None = None  # "patient", or None: the CSV's split column
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    seed: int = 0  # of the split by patient, and of what a protocol draws besides

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if self.split_by not in (None, "patient"):
            raise UsageError(f"--split-by takes patient, not {self.split_by!r}")
        if len(self.ratios) != 3 or min(self.ratios) < 0 or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise UsageError(f"--ratios takes three non-negative train,val,test shares summing to 1, not "
                             f"{','.join(map(str, self.ratios))}")

    @property
    def split_source(self) -> str:
        return (f"--split-by patient (seed {self.seed}, ratios {','.join(map(str, self.ratios))})"
                if self.split_by == "patient" else "csv")

    def read(self) -> "LabelsFile":
        """The CSV read and hashed, once for however many features are joined to it."""
        join_column, rows = read_labels(self.path, self.label_column)
        return LabelsFile(self, file_sha256(self.path), join_column, rows)


def as_labels_spec(labels: "LabelsSpec | str | Path") -> LabelsSpec:
    """A labels spec as given, or the spec of a CSV path with the defaults (its own split column)."""
    return labels if isinstance(labels, LabelsSpec) else LabelsSpec(Path(labels))


@dataclass(frozen=True)
class LabelsFile:
    spec: LabelsSpec
    sha256: str
    join_column: str
    rows: list[dict]

    def record(self) -> "LabelsRecord":
        """A fresh record of what becomes of these labels (filled in by the join and the split)."""
        csv_split = any(row.get("split") for row in self.rows)
        return LabelsRecord(path=str(self.spec.path.resolve()), sha256=self.sha256, join_column=self.join_column,
                            label_column=self.spec.label_column, csv_rows=len(self.rows), rows_joined=0,
                            rows_unmatched=0, rows_dropped={}, split_source=self.spec.split_source,
                            csv_split_overridden=csv_split and self.spec.split_by == "patient")


@dataclass
class LabelledVectors:
    matrix: np.ndarray  # (n, D) float32
    targets: np.ndarray  # (n,) class indices, or (n, C) 0/1 for multi-label
    classes: list[str]
    multilabel: bool
    patients: np.ndarray  # (n,) group of each row
    splits: np.ndarray  # (n,) "train" | "val" | "test"
    keys: list[str]

    def subset(self, mask: np.ndarray) -> "LabelledVectors":
        return LabelledVectors(self.matrix[mask], self.targets[mask], self.classes, self.multilabel,
                               self.patients[mask], self.splits[mask], [k for k, m in zip(self.keys, mask) if m])

    def counts(self) -> dict[str, int]:
        return {split: int((self.splits == split).sum()) for split in SPLITS}


def predictions_of(part: LabelledVectors, scores: np.ndarray) -> dict:
    """What a paired comparison of two models on the same rows needs (EvaluationResult.test_predictions)."""
    return {"keys": list(part.keys), "patients": part.patients, "targets": part.targets, "scores": scores}


def read_labels(path: str | Path, label_column: str = "label") -> tuple[str, list[dict]]:
    """(join column, rows) of a labels CSV, each row's class under "label" and a relative `path`
    (when that is the join) read from the CSV's folder; UsageError when it does not follow the format."""
    path = Path(path)
    check_input_file(path, "labels file")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = [row for row in reader]
    joins = [c for c in JOIN_COLUMNS if c in columns]
    if len(joins) != 1 or label_column not in columns:
        raise UsageError(f"labels file {path} needs a {label_column!r} column and exactly one of "
                         f"{', '.join(JOIN_COLUMNS)}; it has {', '.join(columns) or 'no header'}")
    bad_splits = {row["split"] for row in rows if "split" in columns and row["split"] not in SPLITS}
    if bad_splits:
        raise UsageError(f"labels file {path}: split must be one of {', '.join(SPLITS)}, not {sorted(bad_splits)}")
    for row in rows:
        row["label"] = row[label_column]
        if joins[0] == "path" and row["path"] and not Path(row["path"]).is_absolute():
            row["path"] = str((path.parent / row["path"]).resolve())  # resolved, as ingest stores paths
    return joins[0], rows


@dataclass
class LabelsRecord:
    """Where a task's labels came from and what became of them: what a reader needs to cite its numbers.
    Written into every evaluation's JSON (`labels`)."""

    path: str
    sha256: str
    join_column: str
    label_column: str
    csv_rows: int
    rows_joined: int  # CSV rows that label at least one stored row
    rows_unmatched: int  # CSV rows whose join value matches no stored row
    rows_dropped: dict[str, int]  # reason → CSV rows left out before the join
    split_source: str  # "csv", or how --split-by made the splits
    patients_per_split: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split → class → rows
    mixed_label_patients: int = 0
    mixed_label_examples: list[str] = field(default_factory=list)
    mixed_label_rule: str = ("each image keeps its own label; --split-by patient stratifies a patient by its most "
                             "common class")
    unmatched_examples: list[str] = field(default_factory=list)
    csv_split_overridden: bool = False

    def describe(self, data: "LabelledVectors") -> "LabelsRecord":
        """The record completed with the labelled rows' patients, classes and mixed-label patients."""
        self.patients_per_split = {split: len(set(data.patients[data.splits == split])) for split in SPLITS}
        classes_of_row = [tuple(data.classes[i] for i in np.flatnonzero(t)) if data.multilabel else (data.classes[t],)
                          for t in data.targets]
        self.class_counts = {split: {name: sum(name in row for row, s in zip(classes_of_row, data.splits) if s == split)
                                     for name in data.classes} for split in SPLITS}
        labels_of_patient: dict[str, set] = defaultdict(set)
        for patient, row in zip(data.patients, classes_of_row):
            labels_of_patient[patient].add(row)
        # A multi-label patient's findings change from image to image as a matter of course.
        mixed = [] if data.multilabel else sorted(p for p, labels in labels_of_patient.items() if len(labels) > 1)
        self.mixed_label_patients, self.mixed_label_examples = len(mixed), mixed[:5]
        return self

    def warnings(self) -> list[str]:
        """One line per thing that changes what the numbers mean without stopping the evaluation."""
        lines = []
        if self.rows_unmatched:
            lines.append(f"{self.rows_unmatched} of {self.csv_rows} labels rows match no stored row by "
                         f"{self.join_column} (e.g. {self.unmatched_examples[0]}): they are not evaluated")
        for reason, n in self.rows_dropped.items():
            lines.append(f"{n} labels rows left out: {reason}")
        if self.mixed_label_patients:
            lines.append(f"{self.mixed_label_patients} patients have images of more than one class (e.g. "
                         f"{self.mixed_label_examples[0]}): {self.mixed_label_rule}")
        if self.csv_split_overridden:
            lines.append("the labels file's split column is ignored: --split-by patient made the splits")
        return lines


def join_labels(vectors: Vectors, join_column: str, rows: list[dict], record: LabelsRecord | None = None) -> LabelledVectors:
    """The labelled vectors (unlabelled ones dropped) with classes, patients and any given split. A row
    with an empty label, or repeating a join value already given, is left out; `record` (when given)
    counts them, and the rows that matched and did not match stored rows."""
    if join_column not in vectors.rows.column_names:
        raise UsageError(f"labels joined by {join_column} cannot label {vectors.level}-level vectors; "
                         f"use one of {', '.join(c for c in JOIN_COLUMNS if c in vectors.rows.column_names)}")
    by_id, dropped = {}, Counter()
    for row in rows:
        if not row["label"].strip(MULTI_LABEL_SEPARATOR + " "):
            dropped["empty label"] += 1
        elif row[join_column] in by_id:
            dropped[f"{join_column} given again (the first row is used)"] += 1
        else:
            by_id[row[join_column]] = row
    ids = vectors.rows.column(join_column).to_pylist()
    store_patients = vectors.rows.column("patient_id").to_pylist()
    series = vectors.rows.column("series_uid").to_pylist()
    keep = np.array([i in by_id for i in ids])
    if not keep.any():
        hint = f" (stored paths are absolute, e.g. {ids[0]})" if join_column == "path" and ids else ""
        raise UsageError(f"no stored {vectors.level} matches the labels' {join_column} values{hint}")
    if record is not None:
        matched = set(ids)
        unmatched = [value for value in by_id if value not in matched]
        record.rows_joined, record.rows_unmatched = len(by_id) - len(unmatched), len(unmatched)
        record.rows_dropped, record.unmatched_examples = dict(dropped), unmatched[:5]
    labelled = [by_id[i] for i in ids if i in by_id]
    label_sets = [[part for part in row["label"].split(MULTI_LABEL_SEPARATOR) if part] for row in labelled]
    multilabel = any(len(labels) != 1 for labels in label_sets)
    classes = sorted({label for labels in label_sets for label in labels})
    index = {name: i for i, name in enumerate(classes)}
    if multilabel:
        targets = np.zeros((len(label_sets), len(classes)), dtype=np.int64)
        for row, labels in enumerate(label_sets):
            targets[row, [index[label] for label in labels]] = 1
    else:
        targets = np.array([index[labels[0]] for labels in label_sets], dtype=np.int64)
    patients = np.array([row.get("patient_id") or store_patients[i] or f"series:{series[i]}"
                         for i, row in zip(np.flatnonzero(keep), labelled)], dtype=object)
    splits = np.array([row.get("split", "") for row in labelled], dtype=object)
    keys = [k for k, m in zip(vectors.rows.column("key").to_pylist(), keep) if m]
    return LabelledVectors(vectors.matrix[keep], targets, classes, multilabel, patients, splits, keys)


def split_by_patient(data: LabelledVectors, ratios: tuple[float, float, float], seed: int) -> LabelledVectors:
    """Assign train / val / test by patient, stratified by each patient's most common label."""
    splits = patient_splits(data.patients, label_strata(data), ratios, seed)
    return LabelledVectors(data.matrix, data.targets, data.classes, data.multilabel, data.patients, splits, data.keys)


def label_strata(data: LabelledVectors) -> list[int]:
    """Each row's class (a multi-label row's first label): what splits are stratified by."""
    return [int(np.argmax(target)) if data.multilabel else int(target) for target in data.targets]


def carve_val(patients: np.ndarray, splits: np.ndarray, strata, seed: int) -> np.ndarray:
    """The splits with VAL_SHARE_OF_TRAIN of the train patients (per stratum) moved to val: what the
    probes choose on when the labels give no val split."""
    train = splits == "train"
    carved = patient_splits(patients[train], [s for s, is_train in zip(strata, train) if is_train],
                            (1.0 - VAL_SHARE_OF_TRAIN, VAL_SHARE_OF_TRAIN, 0.0), seed)
    splits = splits.copy()
    splits[train] = carved
    return splits


def patient_splits(patients: np.ndarray, strata, ratios: tuple[float, float, float], seed: int) -> np.ndarray:
    """The split of each row: patients shuffled within the stratum of their most common row stratum
    (a class), then cut by `ratios`, so a patient never sits on two sides."""
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6:
        raise UsageError(f"--ratios takes three non-negative train,val,test shares summing to 1, not {ratios}")
    first_label: dict[str, Counter] = defaultdict(Counter)
    for patient, stratum in zip(patients, strata):
        first_label[patient][stratum] += 1
    by_stratum: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(first_label):
        by_stratum[first_label[patient].most_common(1)[0][0]].append(patient)
    rng = np.random.default_rng(seed)
    assignment = {}
    for stratum in sorted(by_stratum):
        members = list(by_stratum[stratum])
        rng.shuffle(members)
        bounds = np.round(np.cumsum(ratios) * len(members)).astype(int)
        for position, patient in enumerate(members):
            assignment[patient] = SPLITS[int(np.searchsorted(bounds, position, side="right"))]
    return np.array([assignment[p] for p in patients], dtype=object)


def check_splits(data: LabelledVectors) -> None:
    """UsageError when a row has no split, or a patient sits in two splits."""
    check_patient_splits(data.patients, data.splits, data.counts())


def check_patient_splits(patients: np.ndarray, splits: np.ndarray, counts: dict[str, int]) -> None:
    """UsageError when a row has no split, a patient sits in two splits, or train or test is empty."""
    if (splits == "").any():
        raise UsageError("some labelled rows have no split: give a 'split' column or use --split-by patient")
    sides: dict[str, set] = defaultdict(set)
    for patient, split in zip(patients, splits):
        sides[patient].add(split)
    leaking = sorted(p for p, s in sides.items() if len(s) > 1)
    if leaking:
        raise UsageError(f"{len(leaking)} patients appear in more than one split (e.g. {leaking[0]}): "
                         "their images would leak between training and testing")
    if not (splits == "train").any() or not (splits == "test").any():
        raise UsageError(f"the splits need train and test rows; counts: {counts}")


def check_classes(data: LabelledVectors) -> None:
    """UsageError when a classifier could not learn the task: a single-label task of one class
    (every answer would be right), or a class with no train rows (no answer could be)."""
    if not data.multilabel and len(data.classes) < 2:
        raise UsageError(f"the labels name one class only ({', '.join(data.classes)}): a single-label task "
                         "needs two or more")
    train = data.targets[data.splits == "train"]
    in_train = train.any(0) if data.multilabel else np.isin(np.arange(len(data.classes)), train)
    missing = [name for name, present in zip(data.classes, in_train) if not present]
    if missing:
        raise UsageError(f"{len(missing)} of {len(data.classes)} classes have no train rows, only val or test "
                         f"ones (e.g. {missing[0]!r}): label more of their patients, or leave them out of the "
                         "labels file")
