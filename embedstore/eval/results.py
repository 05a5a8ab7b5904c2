"""Typed results of the evaluations: what the CLI prints, the reports render and `--json` writes.

Results are keyword-only (two floats swapped in a call would otherwise pass silently) and rebuilt
from their JSON with `from_dict` (the benchmark cache). Each knows what it reports on test
(`reported`), the tables of metrics it holds (`metric_tables`), and what a leaderboard shows of it
(`headline_metric`, `settings`, `headline_setting`), so nothing downstream branches on a task name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from embedstore.eval.selection import SELECTION_RULE

NOT_IN_JSON = ("test_predictions", "overlays")  # arrays and images kept beside a result, not in it


@dataclass(kw_only=True)
class EvaluationResult:
    task: str
    model_id: str
    feature: str
    level: str
    classes: list[str]
    multilabel: bool
    counts: dict[str, int]  # labelled rows per split
    # What makes the numbers meaningless, whatever they say (degenerate vectors)
    warnings: list[str] = field(default_factory=list)
    # Where the labels came from and what became of them (eval/labels.LabelsRecord), and the model
    # spec, embedstore version and UTC time (eval/citation.py): what a reader needs to cite the numbers.
    labels: dict | None = None
    provenance: dict = field(default_factory=dict)
    # The reported classifier's test scores, for paired comparisons between models (bench/): keys,
    # patients, targets and scores of the test rows. Not part of the JSON.
    test_predictions: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        result = asdict(replace(self, test_predictions=None))
        for name in NOT_IN_JSON:
            result.pop(name, None)
        return result

    @classmethod
    def from_dict(cls, data: dict):
        """The result a `to_dict` (a cell cached as JSON) describes; what JSON does not keep (test
        predictions, overlays) is left out."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data and f.name not in NOT_IN_JSON})

    @property
    def headline_metric(self) -> str:
        """The metric a leaderboard ranks this result by."""
        return "macro_auroc" if self.multilabel else "balanced_accuracy"

    def settings(self) -> list[tuple[str, dict, dict]]:
        """(setting, metrics, 95% intervals) of everything reported on test: the leaderboard's rows."""
        reported = self.reported()
        return [("test", reported[1], reported[1].get("ci95") or {})] if reported else []

    def headline_setting(self) -> str:
        """Which of `settings` a leaderboard shows."""
        return "test"

    def notes(self) -> list[str]:
        """Lines that say how the reported numbers were chosen."""
        return []

    def metric_tables(self) -> dict[str, dict[str, dict]]:
        """split → row label (k=..., C=...) → metrics."""
        return {}

    def reported(self) -> tuple[str, dict] | None:
        """(what is reported, its test metrics), or None for results that are curves."""
        return None


@dataclass(kw_only=True)
class KnnResult(EvaluationResult):
    temperature: float
    ks: list[int]
    search: str  # the neighbour search that ran: exact or int8 re-ranked
    metrics: dict[str, dict[str, dict]]  # split → k → metrics
    best_k_on_val: int | None  # named on val, never chosen on test
    selection_metric: str  # what best_k_on_val is best by

    def notes(self) -> list[str]:
        return [f"best k on val: {self.best_k_on_val} (by {self.selection_metric})"] \
            if self.best_k_on_val is not None else []

    def metric_tables(self) -> dict[str, dict[str, dict]]:
        return {split: {f"k={k}": metrics for k, metrics in by_k.items()} for split, by_k in self.metrics.items()}

    @property
    def reported_k(self) -> str:
        """The k reported on test: the best on val, else the first."""
        return str(self.best_k_on_val if self.best_k_on_val is not None else self.ks[0])

    def reported(self) -> tuple[str, dict]:
        k = self.reported_k
        return f"k = {k}" + (" (best on val)" if self.best_k_on_val is not None else ""), self.metrics["test"][k]

    def settings(self) -> list[tuple[str, dict, dict]]:
        metrics = self.metrics["test"][self.reported_k]
        return [(self.headline_setting(), metrics, metrics.get("ci95") or {})]

    def headline_setting(self) -> str:
        return f"k={self.reported_k}"


@dataclass(kw_only=True)
class LinearResult(EvaluationResult):
    chosen_c: float
    val_score: float
    selection_metric: str  # what val_score measures
    val_carved_from_train: bool
    c_grid: list[float]
    val_scores: list[float]  # in the order of c_grid
    metrics: dict[str, dict]  # "test" → metrics
    feature_grid: dict[str, dict] | None  # with --feature grid: each candidate's C and val score
    selection_rule: str = SELECTION_RULE  # how C was chosen among tied val scores

    def notes(self) -> list[str]:
        lines = [f"feature {name}: C {chosen['chosen_c']:.3g}, val score {chosen['val_score']:.4f}"
                 + ("  <- chosen on val" if name == self.feature else "")
                 for name, chosen in (self.feature_grid or {}).items()]
        carved = " (carved from train by patient)" if self.val_carved_from_train else ""
        return lines + [f"C chosen on val{carved}: {self.chosen_c:.3g} ({self.selection_metric} "
                        f"{self.val_score:.4f}); refitted on train + val"]

    def metric_tables(self) -> dict[str, dict[str, dict]]:
        return {"test": {f"C={self.chosen_c:.3g}": self.metrics["test"]}}

    def reported(self) -> tuple[str, dict]:
        return f"logistic regression, C = {self.chosen_c:.3g} (chosen on val)", self.metrics["test"]


@dataclass(kw_only=True)
class FewShotResult(EvaluationResult):
    score: str  # the metric of the curves
    interval: str  # how each point's 95% interval was made
    shots: list[int]
    tries: int
    seed: int
    curves: dict[str, list[dict]]  # classifier → per shot count {shots, mean, ci95, tries}
    train_patients_per_class: dict[str, int]

    @property
    def headline_metric(self) -> str:
        return self.score

    def settings(self) -> list[tuple[str, dict, dict]]:
        return [(f"{classifier}@{point['shots']}", {self.score: point["mean"]}, {self.score: point["ci95"]})
                for classifier, points in self.curves.items() for point in points]

    def headline_setting(self) -> str:
        """The curve's largest shot count, of the linear classifier when it ran."""
        classifier = "linear" if "linear" in self.curves else next(iter(self.curves))
        return f"{classifier}@{self.shots[-1]}"


HEADLINE_SEGMENT_METRICS = ("global_dice", "per_volume_dice", "per_volume_dice_present", "mean_iou")


@dataclass(kw_only=True)
class SegmentResult(EvaluationResult):
    decoder: str
    blocks: list[int]  # the stored blocks whose patch tokens the decoder read, oldest first
    class_values: dict[int, str]  # mask value → class name (background 0 excluded)
    loss: str
    epochs: int
    batch_size: int
    learning_rates: list[float]
    seeds: list[int]
    score_at: str  # native (each mask's own resolution) or input (the model's input size, as the study)
    split: dict  # where the splits came from, slices and volumes per split
    mask_problems: dict[str, int]  # reason → labels rows left out
    mask_problem_lines: list[str]
    runs: list[dict]  # per seed: val Dice per learning rate, the rate chosen, seconds, test metrics
    metrics: dict[str, dict]  # headline metric → {mean, std, values} over seeds
    empty_class_rule: str
    # Overlay panels for --report (image, truth, prediction at input size); not part of the JSON.
    overlays: list = field(default_factory=list, repr=False)

    @property
    def headline_metric(self) -> str:
        return "global_dice"

    def settings(self) -> list[tuple[str, dict, dict]]:
        return [("test", {name: summary["mean"] for name, summary in self.metrics.items()
                          if summary["mean"] is not None}, {})]

    def notes(self) -> list[str]:
        lines = [f"seed {run['seed']}: learning rate {run['chosen_learning_rate']:g} chosen on val (val Dice "
                 f"{run['val_dice'][lr_key(run['chosen_learning_rate'])]:.4f}); refitted on train + val"
                 for run in self.runs]
        lines += [f"{n} labels rows left out: {reason}" for reason, n in self.mask_problems.items()]
        return lines

    def metric_tables(self) -> dict[str, dict[str, dict]]:
        return {"test": {run_label(run): {name: run["test"][name] for name in HEADLINE_SEGMENT_METRICS}
                         for run in self.runs}}

    def reported(self) -> tuple[str, dict]:
        seeds = f", mean over seeds {', '.join(map(str, self.seeds))}" if len(self.seeds) > 1 else ""
        return (f"{self.decoder} decoder, learning rate chosen on val{seeds}",
                {name: summary["mean"] for name, summary in self.metrics.items()})


def run_label(run: dict) -> str:
    return f"seed {run['seed']}, lr {run['chosen_learning_rate']:g}"


def lr_key(learning_rate: float) -> str:
    """A learning rate as the JSON's keys write it: 0.0001, 0.005, 0.1."""
    return f"{learning_rate:g}"


@dataclass(kw_only=True)
class FinetuneResult(EvaluationResult):
    """`embedstore finetune`: task `finetune:<mode>`, the head reading `cls+patch_mean` as the linear probe does."""

    mode: str  # full | lora | bitfit | linear
    epochs: int
    batch_size: int
    backbone_lr: float | None  # the rate the backbone's trainable parameters had (None: frozen)
    head_lr_grid: list[float]
    val_scores: list[float]  # in the order of head_lr_grid
    chosen_head_lr: float
    val_score: float
    selection_metric: str  # what the val scores measure
    val_carved_from_train: bool
    backbone_trainable_parameters: int  # the LoRA adapters, the biases, every weight, or none
    trainable_parameters: int  # the backbone's and the head's
    workers: int  # data-parallel training processes
    train_images_per_second: float
    checkpoint: str | None  # the fine-tuned backbone, timm format (LoRA merged), for `embedstore ingest --weights`
    # (None in linear mode: the backbone is the stored model's)
    metrics: dict[str, dict]  # "test" → metrics
    selection_rule: str = SELECTION_RULE  # how the head rate was chosen among ties
    rows_left_out: dict[str, int] = field(default_factory=dict)  # reason → labelled rows not trained on

    def notes(self) -> list[str]:
        carved = " (carved from train by patient)" if self.val_carved_from_train else ""
        rates = ", ".join(f"{lr:g}: {score:.4f}" for lr, score in zip(self.head_lr_grid, self.val_scores))
        backbone = "frozen" if self.backbone_lr is None else f"learning rate {self.backbone_lr:g}"
        return [f"{self.selection_metric} per head learning rate{carved}: {rates}",
                f"head learning rate chosen on val: {self.chosen_head_lr:g}; retrained on train + val",
                f"backbone {backbone}, {self.backbone_trainable_parameters:,} of its parameters trained "
                f"({self.trainable_parameters:,} with the head); {self.train_images_per_second:,.1f} training "
                f"images/s on {self.workers} worker{'s' * (self.workers > 1)}"] + \
            ([f"fine-tuned backbone: {self.checkpoint}"] if self.checkpoint else [])

    def metric_tables(self) -> dict[str, dict[str, dict]]:
        return {"test": {f"head lr {self.chosen_head_lr:g}": self.metrics["test"]}}

    def reported(self) -> tuple[str, dict]:
        return (f"{self.mode} fine-tune, head learning rate {self.chosen_head_lr:g} (chosen on val)",
                self.metrics["test"])
