"""`embedstore finetune` end to end on generated PNG tasks (ViT-S/14, random weights, 56 px): a full
fine-tune learns what frozen features cannot, `--mode linear` agrees with `eval linear`, a killed run
resumes to the result of an uninterrupted one, two Ray Train workers match one process, and bad
requests exit 2 having written nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedstore import samples
from embedstore.finetune.data import GlobalBatches
from embedstore.pipeline.ingest import ingest
from embedstore.store import Store
from tests.support import TEST_IMAGE_SIZE, ingest_options, run_cli_here, write_csv

pytestmark = pytest.mark.slow  # every test here trains a model

REPO = Path(__file__).resolve().parents[1]


def task_store(root: Path, n_images: int, label_by: str) -> tuple[Path, Path]:
    labels = samples.write_stripes_task(root / "task", n_images, TEST_IMAGE_SIZE, label_by)
    ingest([root / "task" / "images"], root / "store", ingest_options())
    return root / "store", labels


@pytest.fixture(scope="module")
def orientation(tmp_path_factory) -> tuple[Path, Path]:
    return task_store(tmp_path_factory.mktemp("orientation"), 160, "orientation")


@pytest.fixture(scope="module")
def brightness(tmp_path_factory) -> tuple[Path, Path]:
    return task_store(tmp_path_factory.mktemp("brightness"), 96, "brightness")


def finetune(store: Path, labels: Path, out: Path, *options: str, monkeypatch, capsys) -> dict:
    code, stdout, stderr = run_cli_here(["finetune", str(store), "--labels", str(labels), "--split-by", "patient",
                                         "--out", str(out), *options], monkeypatch, capsys)
    assert code == 0, stderr
    return json.loads(next(out.glob("finetune-*.json")).read_text())


def test_full_finetune_learns_what_frozen_features_cannot(orientation, tmp_path, monkeypatch, capsys):
    store, labels = orientation
    # A random-init ViT needs a larger backbone rate than the study's 1e-5 for pretrained weights.
    full = finetune(store, labels, tmp_path / "full", "--mode", "full", "--backbone-lr", "3e-3", "--head-lrs", "0.05",
                    "--epochs", "10", "--batch-size", "16", monkeypatch=monkeypatch, capsys=capsys)
    linear = finetune(store, labels, tmp_path / "linear", "--mode", "linear", "--epochs", "10", "--batch-size", "16",
                      monkeypatch=monkeypatch, capsys=capsys)
    assert full["task"] == "finetune:full" and linear["task"] == "finetune:linear"
    assert full["counts"] == linear["counts"] == {"train": 112, "val": 16, "test": 32}
    assert full["metrics"]["test"]["top1_accuracy"] >= 0.9
    assert full["metrics"]["test"]["top1_accuracy"] >= linear["metrics"]["test"]["top1_accuracy"] + 0.2
    assert full["backbone_trainable_parameters"] == 21_536_640 and linear["backbone_trainable_parameters"] == 0

    # The fine-tuned backbone is a new model of the store, and its frozen features now solve the task.
    ingest([labels.parent / "images"], store, ingest_options(weights=full["checkpoint"]))
    models = Store.open(store).specs()
    assert len(models) == 2 and full["model_id"] in models
    tuned = next(model_id for model_id in models if model_id != full["model_id"])
    code, stdout, stderr = run_cli_here(["eval", "linear", str(store), "--labels", str(labels), "--split-by", "patient",
                                         "--model-id", tuned, "-o", str(tmp_path / "probe.json")], monkeypatch, capsys)
    assert code == 0, stderr
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["metrics"]["test"]["top1_accuracy"] >= 0.9


def test_linear_mode_agrees_with_eval_linear(brightness, tmp_path, monkeypatch, capsys):
    store, labels = brightness
    online = finetune(store, labels, tmp_path / "run", "--mode", "linear", "--epochs", "5", "--batch-size", "16",
                      monkeypatch=monkeypatch, capsys=capsys)
    code, stdout, stderr = run_cli_here(["eval", "linear", str(store), "--labels", str(labels), "--split-by", "patient",
                                         "-o", str(tmp_path / "probe.json")], monkeypatch, capsys)
    assert code == 0, stderr
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert online["counts"] == probe["counts"] and online["feature"] == probe["feature"] == "cls+patch_mean"
    for metric in ("top1_accuracy", "balanced_accuracy"):
        assert abs(online["metrics"]["test"][metric] - probe["metrics"]["test"][metric]) <= 0.02
    assert online["metrics"]["test"]["top1_accuracy"] >= 0.9  # a task the frozen features solve


SMALL_RUN = ["--mode", "bitfit", "--epochs", "4", "--batch-size", "8", "--head-lrs", "0.01"]


def test_killed_run_resumes_to_the_uninterrupted_result(brightness, tmp_path, monkeypatch, capsys):
    store, labels = brightness
    uninterrupted = finetune(store, labels, tmp_path / "whole", *SMALL_RUN, monkeypatch=monkeypatch, capsys=capsys)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "embedstore.cli.main", "finetune", str(store), "--labels", str(labels), "--split-by",
               "patient", "--out", str(out), *SMALL_RUN]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "checkpoints" / "val-lr0.01.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # after the first epoch's checkpoint, before the training ends
    process.wait()
    assert checkpoint.exists() and not (out / "scores" / "val-lr0.01.json").exists()

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed:" in resumed.stderr and "resumed after epoch" in resumed.stderr
    result = json.loads((out / "finetune-bitfit.json").read_text())
    assert result["metrics"]["test"] == uninterrupted["metrics"]["test"]
    assert result["val_scores"] == uninterrupted["val_scores"]
    assert not list((out / "checkpoints").glob("*.pt"))  # finished trainings keep their scores, not checkpoints


def test_two_ray_train_workers_match_one_process(brightness, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray.train.torch")
    store, labels = brightness
    run = ["--mode", "full", "--backbone-lr", "1e-3", "--epochs", "2", "--batch-size", "8", "--head-lrs", "0.01"]
    one = finetune(store, labels, tmp_path / "one", *run, monkeypatch=monkeypatch, capsys=capsys)
    two = finetune(store, labels, tmp_path / "two", *run, "--workers", "2", monkeypatch=monkeypatch, capsys=capsys)
    assert two["workers"] == 2 and one["workers"] == 1
    for metric in ("top1_accuracy", "balanced_accuracy", "macro_auroc"):
        assert abs(two["metrics"]["test"][metric] - one["metrics"]["test"][metric]) <= 0.01
    assert np.allclose(two["val_scores"], one["val_scores"], atol=0.01)
    # The same global batches, augmentations and starting weights: the same fine-tuned backbone,
    # up to the order of floating-point sums.
    from safetensors.torch import load_file

    weights_one, weights_two = load_file(one["checkpoint"]), load_file(two["checkpoint"])
    moved = max(float((weights_one[name] - weights_two[name]).abs().max()) for name in weights_one)
    assert moved < 1e-4, moved


def test_global_batches_are_the_same_whatever_the_number_of_ranks():
    for train in (True, False):
        single = GlobalBatches(21, 6, train, seed=3)
        ranks = [GlobalBatches(21, 6, train, seed=3, rank=rank, world=3) for rank in range(3)]
        for epoch in (0, 1):
            for sampler in (single, *ranks):
                sampler.set_epoch(epoch)
            shares = [list(rank) for rank in ranks]
            joined = [sum((share[step] for share in shares), []) for step in range(len(shares[0]))]
            assert joined == list(single)
            assert all(len(batch) == 6 for batch in joined) if train else sum(map(len, joined)) == 21
    epochs = [list(GlobalBatches(21, 6, True, seed=3)), None]
    sampler = GlobalBatches(21, 6, True, seed=3)
    sampler.set_epoch(1)
    epochs[1] = list(sampler)
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_bad_requests_exit_2_and_write_nothing(brightness, tmp_path, monkeypatch, capsys):
    store, labels = brightness
    one_class = write_csv(tmp_path / "one.csv", [{"path": row["path"], "label": "bright", "patient_id": row["path"]}
                                                 for row in Store.open(store).rows("items").to_pylist()])
    out = tmp_path / "out"
    requests = {
        "--epochs": ["--labels", str(labels), "--mode", "full", "--epochs", "0"],
        "one class": ["--labels", str(one_class), "--mode", "full"],
        "no rows": ["--labels", str(labels), "--mode", "full", "--ratios", "1,0,0"],
        "--mode": ["--labels", str(labels), "--mode", "prefix"],
        "lora targets": ["--labels", str(labels), "--mode", "lora", "--lora-targets", "qkv,w12"],
        "batch share": ["--labels", str(labels), "--mode", "full", "--workers", "2", "--batch-size", "7"],
        "--head-lrs": ["--labels", str(labels), "--mode", "full", "--head-lrs", "0.01,0"],
    }
    for reason, arguments in requests.items():
        code, stdout, stderr = run_cli_here(["finetune", str(store), "--split-by", "patient", "--out", str(out),
                                             *arguments], monkeypatch, capsys)
        assert code == 2, reason
        assert stderr.startswith("embedstore: error:") and stderr.count("\n") == 1, (reason, stderr)
        assert not out.exists(), reason
    assert "w12" in run_cli_here(["finetune", str(store), "--labels", str(labels), "--split-by", "patient", "--out",
                                  str(out), "--mode", "lora", "--lora-targets", "qkv,w12"], monkeypatch, capsys)[2]


def test_a_run_folder_of_other_settings_is_not_resumed(brightness, tmp_path, monkeypatch, capsys):
    store, labels = brightness
    finetune(store, labels, tmp_path / "run", "--mode", "linear", "--epochs", "1", "--batch-size", "16",
             monkeypatch=monkeypatch, capsys=capsys)
    code, stdout, stderr = run_cli_here(["finetune", str(store), "--labels", str(labels), "--split-by", "patient",
                                         "--out", str(tmp_path / "run"), "--mode", "linear", "--epochs", "2",
                                         "--batch-size", "16"], monkeypatch, capsys)
    assert code == 2 and "other settings (settings.epochs)" in stderr


def test_the_trainer_steps_what_the_mode_trains_with_the_backbone_in_train_mode(brightness, tmp_path):
    import torch

    from embedstore.eval.labels import LabelsSpec
    from embedstore.finetune.data import finetune_data
    from embedstore.finetune.train import TrainSettings, Workers, build_classifier, train

    store, labels = brightness
    data = finetune_data(Store.open(store), LabelsSpec(labels, split_by="patient"))
    images = data.images(data.rows("train")[:8], augment=True)
    for mode in ("bitfit", "lora"):
        settings = TrainSettings(mode, epochs=2 if mode == "lora" else 1, batch_size=8)  # LoRA's B starts at 0
        torch.manual_seed(0)
        classifier = build_classifier(data.spec, None, settings, 2, 1)
        with torch.no_grad():  # LayerScale at a pretrained model's scale, not random init's 1e-5, which starves
            for name, parameter in classifier.named_parameters():  # the blocks' adapters of gradient
                if name.endswith(".gamma"):
                    parameter.fill_(0.5)
        before = {name: p.detach().clone() for name, p in classifier.named_parameters()}
        modes_seen = []
        first_block = next(module for name, module in classifier.backbone.named_modules() if name.endswith("blocks.0"))
        first_block.register_forward_pre_hook(lambda module, args: modes_seen.append(module.training))
        train(classifier, images, [0.05], settings, False, Workers(), tmp_path / f"{mode}.pt")
        assert modes_seen and all(modes_seen), mode
        for name, parameter in classifier.named_parameters():
            if parameter.requires_grad:
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, (mode, name)
                assert not torch.equal(parameter, before[name]), (mode, name)
            else:
                assert torch.equal(parameter, before[name]), (mode, name)
        assert (tmp_path / f"{mode}.pt").is_file()  # a checkpoint after every epoch


def test_lora_run_counts_adapters_and_saves_a_merged_backbone(brightness, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    store, labels = brightness
    result = finetune(store, labels, tmp_path / "lora", "--mode", "lora", "--epochs", "1", "--batch-size", "16",
                      "--head-lrs", "0.01", monkeypatch=monkeypatch, capsys=capsys)
    head = 2 * 384 * 2 + 2  # cls+patch_mean → 2 classes
    assert result["backbone_trainable_parameters"] == 3_096_576
    assert result["trainable_parameters"] == 3_096_576 + head
    keys = load_file(result["checkpoint"])
    assert not any("lora" in key for key in keys) and "blocks.0.attn.qkv.weight" in keys


def test_multilabel_tasks_train_one_sigmoid_per_label(brightness, tmp_path, monkeypatch, capsys):
    store, labels = brightness
    rows = (labels.parent / "labels.csv").read_text().splitlines()[1:]
    multi = write_csv(tmp_path / "multi.csv", [
        {"path": str(labels.parent / path), "label": label + ("|striped" if number % 3 else ""), "patient_id": patient}
        for number, (path, label, patient) in enumerate(row.split(",") for row in rows)])
    result = finetune(store, multi, tmp_path / "run", "--mode", "linear", "--epochs", "2", "--batch-size", "16",
                      monkeypatch=monkeypatch, capsys=capsys)
    assert result["multilabel"] and result["classes"] == ["bright", "dark", "striped"]
    per_class = {row["class"]: row for row in result["metrics"]["test"]["per_class"]}
    assert list(per_class) == ["bright", "dark", "striped"]
    assert per_class["bright"]["auroc"] > 0.9 and per_class["dark"]["auroc"] > 0.9  # "striped" is noise


def test_a_labelled_image_gone_since_the_ingest_is_left_out_and_counted(tmp_path, monkeypatch, capsys):
    store, labels = task_store(tmp_path, 24, "brightness")
    images = sorted((labels.parent / "images").glob("*.png"))
    os.remove(images[3])
    result = finetune(store, labels, tmp_path / "run", "--mode", "linear", "--epochs", "2", "--batch-size", "8",
                      monkeypatch=monkeypatch, capsys=capsys)
    assert result["rows_left_out"] == {"file_gone": 1} and sum(result["counts"].values()) == 23
    assert any("1 labelled slice left out: its file is gone since the ingest" in w for w in result["warnings"])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "val: epoch 1/2, step 2/2, loss " in log and "final: epoch 2/2, step 2/2, loss " in log  # each epoch said

    code, _, err = run_cli_here(["finetune", str(store), "--labels", str(labels), "--split-by", "patient", "--mode",
                                 "linear", "--out", str(tmp_path / "other")], monkeypatch, capsys)
    assert code == 0
    for image in images:
        image.unlink(missing_ok=True)
    code, _, err = run_cli_here(["finetune", str(store), "--labels", str(labels), "--split-by", "patient", "--mode",
                                 "linear", "--out", str(tmp_path / "none")], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "gone since the ingest" in err, err
    assert not (tmp_path / "none").exists()
