"""The evaluation protocols, registered once: what the eval commands, `embedstore finetune`, a suite's
parser (bench/suite.py), its cells (bench/cells.py) and its leaderboard read. Adding a protocol is one
entry here: its options class (defaults and checks), its result class (rebuilt from a cached cell's
JSON), the labels a dataset gives it, and the function that runs it on a store.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from embedstore.errors import UsageError
from embedstore.eval.evaluate import fewshot_evaluation, knn_evaluation, linear_evaluation
from embedstore.eval.labels import LabelsSpec
from embedstore.eval.options import FewShotOptions, KnnOptions, LinearOptions, SegmentOptions
from embedstore.eval.results import (
    EvaluationResult,
    FewShotResult,
    FinetuneResult,
    KnnResult,
    LinearResult,
    SegmentResult,
)
from embedstore.eval.segment.protocol import segment_evaluation
from embedstore.finetune.job import finetune
from embedstore.finetune.options import FinetuneOptions
from embedstore.store import Store

# Options a run sets, not a suite: the dataset gives the level, the suite's seeds the seed.
SET_BY_THE_SUITE = ("level", "seeds")
# Options of where and how a command runs rather than of what it computes: no suite key.
NOT_SUITE_KEYS = ("device", "decode_workers", "workers", "ray_address")


def finetune_without_a_folder(store: Store, labels: LabelsSpec, options: FinetuneOptions,
                              model_id: str | None) -> FinetuneResult:
    """A fine-tune whose checkpoints and backbone are dropped after: a suite's cell keeps the result."""
    with tempfile.TemporaryDirectory() as run_folder:
        return finetune(store, labels, options, model_id, Path(run_folder))


@dataclass(frozen=True)
class Protocol:
    name: str
    options: type  # a frozen dataclass: its fields' defaults are the protocol's, its __post_init__ the checks
    result: type[EvaluationResult]
    run: Callable[[Store, LabelsSpec, Any, str | None], EvaluationResult]  # (store, labels, options, model_id)
    labels: str  # which labels file of a suite's dataset it reads: "labels" (classes) or "masks"
    paired: bool  # its test predictions are kept for paired comparisons with a baseline model
    seeded: bool  # a suite runs it once per seed (kNN draws nothing: once)

    @property
    def suite_keys(self) -> list[str]:
        return [f.name for f in fields(self.options) if f.name not in SET_BY_THE_SUITE + NOT_SUITE_KEYS]

    def options_for(self, values: dict, level: str = "slice", seed: int = 0):
        """The options a suite's [protocols.NAME] table gives, with its dataset's level and the seed;
        UsageError naming an option the protocol does not take."""
        unknown = sorted(set(values) - set(self.suite_keys))
        if unknown:
            raise UsageError(f"[protocols.{self.name}] has no option {unknown[0]!r}; it takes "
                             f"{', '.join(sorted(self.suite_keys))}")
        names = {f.name for f in fields(self.options)}
        return self.options(**values, **({"level": level} if "level" in names else {}),
                            **({"seeds": (seed,)} if "seeds" in names else {}))


PROTOCOLS: dict[str, Protocol] = {protocol.name: protocol for protocol in (
    Protocol("knn", KnnOptions, KnnResult, knn_evaluation, "labels", paired=True, seeded=False),
    Protocol("linear", LinearOptions, LinearResult, linear_evaluation, "labels", paired=True, seeded=True),
    Protocol("fewshot", FewShotOptions, FewShotResult, fewshot_evaluation, "labels", paired=False, seeded=True),
    Protocol("segment", SegmentOptions, SegmentResult, segment_evaluation, "masks", paired=False, seeded=True),
    Protocol("finetune", FinetuneOptions, FinetuneResult, finetune_without_a_folder, "labels", paired=True,
             seeded=True),
)}


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UsageError(f"unknown protocol {name!r}; use {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
