"""Protocols typed once: each protocol's options class holds its defaults and checks, the registry
gives a suite its options, results are keyword-only and rebuilt from their JSON, and the labels are
read once however many features a linear probe tries."""

from __future__ import annotations

import pytest

from embedstore.errors import UsageError
from embedstore.eval.labels import LabelsSpec
from embedstore.eval.options import FewShotOptions, KnnOptions, LinearOptions, SegmentOptions
from embedstore.finetune.options import FinetuneOptions
from embedstore.protocols import PROTOCOLS
from embedstore.store import Store
from tests.support import write_modality_labels


def test_options_check_themselves_where_they_are_made():
    cases = [(lambda: KnnOptions(k=(0,)), "--k"), (lambda: KnnOptions(temperature=0), "--temperature"),
             (lambda: KnnOptions(search="faiss"), "--search"), (lambda: KnnOptions(level="study"), "--level"),
             (lambda: LinearOptions(c_grid=(0.0,)), "--c-grid"), (lambda: FewShotOptions(shots=(0,)), "--shots"),
             (lambda: FewShotOptions(classifiers=("svm",)), "svm"), (lambda: SegmentOptions(decoder="fpn"), "fpn"),
             (lambda: SegmentOptions(seeds=()), "--seeds"), (lambda: FinetuneOptions(mode="prefix"), "--mode"),
             (lambda: FinetuneOptions(batch_size=3, workers=2), "multiple"),
             (lambda: LabelsSpec("x.csv", split_by="study"), "--split-by"),
             (lambda: LabelsSpec("x.csv", ratios=(0.5, 0.5, 0.5)), "--ratios")]
    for make, named in cases:
        with pytest.raises(UsageError, match=named):
            make()


def test_the_registry_gives_a_suite_each_protocols_options():
    knn = PROTOCOLS["knn"].options_for({"k": [5, 10], "feature": "patch_mean"}, level="series", seed=3)
    assert knn == KnnOptions(feature="patch_mean", level="series", k=(5, 10))
    segment = PROTOCOLS["segment"].options_for({"epochs": 2}, seed=7)
    assert segment.seeds == (7,) and segment.epochs == 2 and segment.decoder == SegmentOptions.decoder
    assert "level" not in PROTOCOLS["linear"].suite_keys and "device" not in PROTOCOLS["segment"].suite_keys
    with pytest.raises(UsageError, match=r"\[protocols.knn\] has no option 'kk'"):
        PROTOCOLS["knn"].options_for({"kk": 5})
    assert {name: p.labels for name, p in PROTOCOLS.items()}["segment"] == "masks"


def test_results_are_keyword_only_and_rebuilt_from_their_json(ingested, tmp_path):
    labels = write_modality_labels(tmp_path / "labels.csv", ingested.path)
    store = Store.open(ingested.path)
    for name, options in (("knn", KnnOptions(feature="patch_mean", k=(1, 3))),
                          ("linear", LinearOptions(feature="patch_mean", c_grid=(0.1, 1.0))),
                          ("fewshot", FewShotOptions(feature="patch_mean", shots=(1,), tries=2))):
        protocol = PROTOCOLS[name]
        result = protocol.run(store, labels, options, None)
        rebuilt = protocol.result.from_dict(result.to_dict())
        assert type(rebuilt) is protocol.result and rebuilt.to_dict() == result.to_dict()
        assert rebuilt.headline_setting() == result.headline_setting() and rebuilt.settings() == result.settings()
        with pytest.raises(TypeError):
            protocol.result(*result.to_dict().values())


def test_a_feature_grid_reads_joins_and_splits_the_labels_once(ingested, tmp_path, monkeypatch):
    import embedstore.eval.evaluate as evaluate
    import embedstore.eval.labels as labels_module

    calls = {"read": 0, "join": 0, "split": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(labels_module, "read_labels", counted("read", labels_module.read_labels))
    monkeypatch.setattr(evaluate, "join_labels", counted("join", evaluate.join_labels))
    monkeypatch.setattr(evaluate, "split_by_patient", counted("split", evaluate.split_by_patient))
    labels = write_modality_labels(tmp_path / "labels.csv", ingested.path)
    spec = LabelsSpec(labels, split_by="patient")
    result = evaluate.linear_evaluation(Store.open(ingested.path), spec, LinearOptions(feature="grid",
                                                                                       c_grid=(0.1, 1.0)))
    assert len(result.feature_grid) == 4 and calls == {"read": 1, "join": 1, "split": 1}
