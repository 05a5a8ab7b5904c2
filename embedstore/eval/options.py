"""Each evaluation protocol's options, with their defaults and checks, in one place: what the eval
commands, a suite's [protocols.NAME] tables and Python callers construct. Plain settings (no torch,
no scikit-learn): the command line reads its defaults from here without loading the protocols."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedstore.errors import UsageError

LEVELS = ("slice", "series")
# kNN, the DINOv2 protocol: k in 10, 20, 100, 200, weights exp(similarity / 0.07)
DEFAULT_KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
SEARCHES = ("auto", "exact", "int8")
# The linear probe's C grid, 10^linspace(-6, 5, 45), and the study's input features for --feature grid
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))
GRID_FEATURES = ("cls1", "cls1+patch_mean", "cls4", "cls4+patch_mean")
# Few-shot: training patients per class, draws per count, classifiers
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_TRIES = 10
CLASSIFIERS = ("knn", "prototype", "linear")
# Segmentation probes: how many of the last stored blocks each decoder reads, the losses, where scored
DECODER_LAYERS = {"linear": 1, "unet": 5}
LOSSES = ("dice", "dicece")
SCORE_AT = ("native", "input")


def check_level(level: str) -> None:
    if level not in LEVELS:
        raise UsageError(f"--level must be one of {', '.join(LEVELS)}, not {level!r}")


@dataclass(frozen=True)
class KnnOptions:
    """The DINOv2 weighted-vote kNN: its neighbour counts, vote temperature and neighbour search."""

    feature: str = "cls"  # the DINOv2 kNN protocol's input
    level: str = "slice"
    k: tuple[int, ...] = DEFAULT_KS
    temperature: float = TEMPERATURE
    search: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "k", tuple(int(k) for k in self.k))
        check_level(self.level)
        # k = 0 votes with no one; T = 0 divides by zero
        if not self.k or min(self.k) < 1:
            raise UsageError(f"--k takes neighbour counts of at least 1, not {','.join(map(str, self.k)) or 'none'}")
        if not self.temperature > 0:
            raise UsageError(f"--temperature must be above 0, not {self.temperature}")
        if self.search not in SEARCHES:
            raise UsageError(f"--search must be one of {', '.join(SEARCHES)}, not {self.search!r}")


@dataclass(frozen=True)
class LinearOptions:
    """The linear probe: its input feature ("grid" chooses among GRID_FEATURES on val) and C grid."""

    feature: str = "cls+patch_mean"  # the reference study's linear-probe input
    level: str = "slice"
    c_grid: tuple[float, ...] | None = None  # None: DEFAULT_C_GRID

    def __post_init__(self):
        check_level(self.level)
        if self.c_grid is not None:
            object.__setattr__(self, "c_grid", tuple(float(c) for c in self.c_grid))
            if not self.c_grid or not min(self.c_grid) > 0:
                raise UsageError(f"--c-grid takes C values above 0, not {','.join(map(str, self.c_grid))}")


@dataclass(frozen=True)
class FewShotOptions:
    """Few-shot curves: patients per class, draws per shot count, classifiers."""

    feature: str = "cls"  # as for kNN
    level: str = "slice"
    shots: tuple[int, ...] = DEFAULT_SHOTS
    tries: int = DEFAULT_TRIES
    classifiers: tuple[str, ...] = CLASSIFIERS

    def __post_init__(self):
        object.__setattr__(self, "shots", tuple(int(n) for n in self.shots))
        object.__setattr__(self, "classifiers", tuple(self.classifiers))
        check_level(self.level)
        if not self.shots or min(self.shots) < 1:
            raise UsageError(f"--shots takes training patients per class, each at least 1, not "
                             f"{','.join(map(str, self.shots)) or 'none'}")
        if self.tries < 1:
            raise UsageError(f"--tries must be at least 1, not {self.tries}")
        unknown = [c for c in self.classifiers if c not in CLASSIFIERS]
        if unknown:
            raise UsageError(f"unknown classifier {unknown[0]!r}: use {', '.join(CLASSIFIERS)}")


@dataclass(frozen=True)
class SegmentOptions:
    """The segmentation probe: decoder, training, seeds (each repeats the protocol), where it is
    scored, the class names and the device."""

    decoder: str = "linear"
    epochs: int = 10
    batch_size: int = 32  # the study's 128 was for a GPU; a CPU steps seven decoders faster on smaller batches
    loss: str = "dice"
    seeds: tuple[int, ...] = (0,)
    score_at: str = "native"
    classes: str | None = None  # 1:liver,2:spleen or a dataset.json; None: one beside the labels, else the values
    device: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(int(seed) for seed in self.seeds))
        if self.decoder not in DECODER_LAYERS:
            raise UsageError(f"--decoder must be one of {', '.join(DECODER_LAYERS)}, not {self.decoder!r}")
        if self.loss not in LOSSES:
            raise UsageError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError(f"--epochs and --batch-size must be at least 1, not {self.epochs} and {self.batch_size}")
        if not self.seeds:
            raise UsageError("--seeds needs at least one seed")
        if self.score_at not in SCORE_AT:
            raise UsageError(f"--score-at must be one of {', '.join(SCORE_AT)}, not {self.score_at!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, not {self.device!r}")
