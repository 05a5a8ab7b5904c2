"""`embedstore eval segment` end to end: generated phantoms (ellipses of two classes on noise) as PNG
and as NIfTI volumes with a non-trivial affine, ingested with random weights, probed from the stored
patch tokens; predictions re-scored here from the files written; bad masks counted; tokens streamed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from embedstore import samples
from embedstore.errors import StoreDamagedError
from embedstore.store import Store
from tests.support import dicom_seg_sources, ingest_options, run_cli_here, write_csv, write_dicom_seg

IMAGE_SIZE = 112  # 8×8 tokens of 14 px: ellipses of 64 px images stay several tokens wide
UNET_LAYERS = (-5, -4, -3, -2, -1)
PROBE = ["--split-by", "patient", "--epochs", "20", "--batch-size", "8"]


@pytest.fixture(scope="module")
def png_task(tmp_path_factory):
    """48 PNG phantoms with PNG masks, stored with the last 5 blocks' tokens: (store, labels CSV)."""
    from embedstore.pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("png-task")
    labels = samples.write_segmentation_phantoms(root / "task", n_images=48, size=64)
    ingest([root / "task" / "images"], root / "store",
           ingest_options(image_size=IMAGE_SIZE, patch_layers=UNET_LAYERS, batch_size=16))
    return root / "store", labels


@pytest.fixture(scope="module")
def nifti_task(tmp_path_factory):
    """8 NIfTI phantom volumes (10 axial slices each, PHANTOM_AFFINE) with label volumes, stored with
    the last block's tokens only: (store, labels CSV)."""
    from embedstore.pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("nifti-task")
    labels = samples.write_segmentation_phantoms(root / "task", n_volumes=8, size=48, n_slices=10)
    ingest([root / "task" / "imagesTr"], root / "store",
           ingest_options(image_size=IMAGE_SIZE, modality="CT", batch_size=16))
    return root / "store", labels


def numpy_dice(truth: np.ndarray, prediction: np.ndarray, value: int) -> float:
    """2|T∩P| / (|T| + |P|) for one class: the formula, independent of the scorer."""
    t, p = truth == value, prediction == value
    return 2.0 * np.logical_and(t, p).sum() / (t.sum() + p.sum())


def labels_rows(labels: Path) -> list[dict]:
    with open(labels, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_linear_probe_learns_png_phantoms_and_writes_what_it_scored(png_task, tmp_path, monkeypatch, capsys):
    store, labels = png_task
    out = tmp_path / "result.json"
    code, stdout, _ = run_cli_here(["eval", "segment", str(store), "--labels", str(labels), *PROBE, "-o", str(out),
                                    "--report", str(tmp_path / "report"), "--predictions", str(tmp_path / "pred")],
                                   monkeypatch, capsys)
    assert code == 0, stdout
    result = json.loads(out.read_text())
    assert result["metrics"]["global_dice"]["mean"] >= 0.8  # random ViT tokens still carry local intensity
    assert result["metrics"]["per_volume_dice"]["mean"] >= 0.8
    spec = Store.open(store).spec(result["model_id"])
    assert result["blocks"] == [spec.num_blocks - 1] and result["decoder"] == "linear"
    assert result["classes"] == ["class 1", "class 2"] and result["loss"] == "dice" and result["seeds"] == [0]
    run = result["runs"][0]
    assert run["chosen_learning_rate"] in result["learning_rates"] and len(run["val_dice"]) == 7
    assert run["val_dice"][f"{run['chosen_learning_rate']:g}"] == max(run["val_dice"].values())  # chosen on val
    assert sum(result["counts"].values()) == 48 and result["counts"]["test"] > 0
    assert result["split"]["volumes"]["test"] == result["counts"]["test"]  # each PNG its own volume
    # Every test image has a prediction file at its native size; re-scored here, the same Dice.
    by_image = {Path(row["path"]).stem: row for row in labels_rows(labels)}
    predictions = sorted((tmp_path / "pred").glob("*.png"))
    assert len(predictions) == result["counts"]["test"]
    truths = [np.array(Image.open(labels.parent / by_image[p.stem]["mask"])) for p in predictions]
    predicted = [np.array(Image.open(p)) for p in predictions]
    assert all(t.shape == p.shape == (64, 64) for t, p in zip(truths, predicted))
    pooled = np.mean([numpy_dice(np.concatenate(truths), np.concatenate(predicted), c) for c in (1, 2)])
    assert pooled == pytest.approx(run["test"]["global_dice"], abs=1e-6)
    for name in ("class_dice.png", "volume_dice.png", "overlay_0.png", "report.md", "segment.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    assert "global dice" in stdout and "chosen on val" in stdout


@pytest.mark.slow
def test_nifti_predictions_overlay_their_volumes(nifti_task, tmp_path):
    from embedstore.eval.labels import LabelsSpec
    from embedstore.eval.options import SegmentOptions
    from embedstore.eval.segment.protocol import segment_evaluation

    store, labels = nifti_task
    result = segment_evaluation(Store.open(store), LabelsSpec(labels, split_by="patient"),
                                SegmentOptions(epochs=20, batch_size=8), predictions=tmp_path / "pred")
    assert result.metrics["global_dice"]["mean"] >= 0.8
    test = result.runs[0]["test"]
    written = sorted((tmp_path / "pred").iterdir())
    assert [p.name for p in written] == sorted(v["name"] for v in test["per_volume"])
    truths, predictions = [], []
    for path in written:
        image = nib.load(labels.parent / "imagesTr" / path.name)
        predicted = nib.load(path)
        assert predicted.shape == image.shape and np.allclose(predicted.affine, image.affine)
        truth = np.asarray(nib.load(labels.parent / "labelsTr" / path.name).dataobj)
        prediction = np.asarray(predicted.dataobj)
        volume = next(v for v in test["per_volume"] if v["name"] == path.name)
        for value, name in result.class_values.items():  # the file, in its own voxel order, scores the same
            assert numpy_dice(truth, prediction, value) == pytest.approx(volume["per_class"][name], abs=1e-6)
        truths.append(truth.ravel())
        predictions.append(prediction.ravel())
    pooled = np.mean([numpy_dice(np.concatenate(truths), np.concatenate(predictions), v) for v in (1, 2)])
    assert pooled == pytest.approx(test["global_dice"], abs=1e-6)


@pytest.mark.slow
def test_unet_trains_on_five_stored_layers(png_task):
    from embedstore.eval.labels import LabelsSpec
    from embedstore.eval.options import SegmentOptions
    from embedstore.eval.segment.protocol import segment_evaluation

    store, labels = png_task
    result = segment_evaluation(Store.open(store), LabelsSpec(labels, split_by="patient"),
                                SegmentOptions(decoder="unet", epochs=2, batch_size=8, score_at="input"))
    spec = Store.open(store).spec(result.model_id)
    assert result.blocks == list(range(spec.num_blocks - 5, spec.num_blocks)) and result.score_at == "input"
    assert result.metrics["global_dice"]["mean"] > 0.5  # two epochs learn far more than no foreground at all


def test_a_store_without_the_decoders_layers_names_the_reingest(nifti_task, monkeypatch, capsys):
    store, labels = nifti_task
    code, _, stderr = run_cli_here(["eval", "segment", str(store), "--labels", str(labels), "--decoder", "unet"],
                                   monkeypatch, capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "--patch-layers -5,-4,-3,-2,-1" in stderr


def test_bad_masks_are_counted_listed_and_left_out(png_task, tmp_path, monkeypatch, capsys):
    store, labels = png_task
    folder = labels.parent
    rows = [{**row, "path": str(folder / row["path"]), "mask": str(folder / row["mask"])} for row in labels_rows(labels)]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    seven = np.array(Image.open(rows[1]["mask"]))
    seven[seven == 2] = 7
    Image.fromarray(seven).save(tmp_path / "seven.png")
    bad = [{**rows[0], "mask": str(tmp_path / "missing.png")}, {**rows[1], "mask": str(tmp_path / "seven.png")},
           {**rows[2], "mask": str(tmp_path / "small.png")}, {**rows[3], "path": str(tmp_path / "not-stored.png")}]
    csv_path = write_csv(tmp_path / "with-bad.csv", bad + rows[4:])
    out = tmp_path / "result.json"
    code, _, stderr = run_cli_here(["eval", "segment", str(store), "--labels", str(csv_path), "--classes",
                                    "1:left,2:right", "--split-by", "patient", "--epochs", "1", "--seeds", "0,1",
                                    "--loss", "dicece", "-o", str(out)],
                                   monkeypatch, capsys)
    assert code == 0
    result = json.loads(out.read_text())
    assert result["mask_problems"] == {"unreadable_mask": 1, "unknown_class": 1, "size_mismatch": 1,
                                       "no_stored_row": 1}
    assert len(result["mask_problem_lines"]) == 4 and sum(result["counts"].values()) == 44
    assert result["classes"] == ["left", "right"] and result["loss"] == "dicece"
    values = [run["test"]["global_dice"] for run in result["runs"]]  # one run per seed, then mean ± std
    assert [run["seed"] for run in result["runs"]] == [0, 1] and result["metrics"]["global_dice"]["values"] == values
    assert result["metrics"]["global_dice"]["mean"] == pytest.approx(np.mean(values))
    assert result["metrics"]["global_dice"]["std"] == pytest.approx(np.std(values))
    for fragment in ("missing.png", "seven.png", "small.png", "not-stored.png"):
        assert fragment in stderr


def test_dicom_seg_masks_join_stored_series_slice_by_slice(tmp_path):
    from embedstore.eval.segment.data import resize_mask, segmentation_set
    from embedstore.pipeline.ingest import ingest

    truths, csv_rows = {}, []
    for number, split in enumerate(("train", "val", "test")):  # three patients' CT series, a SEG for each
        sources = dicom_seg_sources(tmp_path / "ct" / split, 6, 32, seed=number, patient_id=f"PAT-{number}")
        truth = np.zeros((6, 32, 32), np.uint8)
        for index in range(6):
            truth[index, 4 + index:14 + index, 3 + number:12 + index] = 1
            truth[index, 20:28, 18 + index:30] = 2 if index != 2 else 0
        seg = write_dicom_seg(tmp_path / f"seg-{split}.dcm", sources, np.stack([truth == 1, truth == 2], axis=-1))
        truths.update({source.SOPInstanceUID: truth[index] for index, source in enumerate(sources)})
        csv_rows.append({"series_uid": sources[0].SeriesInstanceUID, "mask": seg, "split": split})
    ingest([tmp_path / "ct"], tmp_path / "store", ingest_options())
    store = Store.open(tmp_path / "store")
    spec = store.spec(store.resolve_model_id(None))
    data = segmentation_set(store, spec, write_csv(tmp_path / "labels.csv", csv_rows))
    assert data.class_names == {1: "liver", 2: "spleen"} and len(data.rows) == 18 and not data.problems
    for row, mask in zip(data.rows, data.input_masks):
        np.testing.assert_array_equal(mask, resize_mask(truths[row["sop_uid"]], spec.image_size))


def test_an_epoch_streams_the_tokens_a_few_chunks_at_a_time(tmp_path, monkeypatch):
    import torch

    from embedstore.eval.segment.data import segmentation_set
    from embedstore.eval.segment.tokens import SHUFFLE_CHUNKS, InMemoryTokens, StoredTokens, shuffled_batches
    from embedstore.eval.segment.train import DecoderShape, TrainSettings, train_decoders
    from embedstore.pipeline.ingest import ingest
    from embedstore.store import patches

    labels = samples.write_segmentation_phantoms(tmp_path / "task", n_images=40, size=32)
    monkeypatch.setattr(patches, "CHUNK_BYTES", 3 * 16 * 384 * 2)  # 3 rows of 4×4 tokens per Zarr chunk
    ingest([tmp_path / "task" / "images"], tmp_path / "store", ingest_options(batch_size=8))
    store = Store.open(tmp_path / "store")
    spec = store.spec(store.resolve_model_id(None))
    data = segmentation_set(store, spec, labels, split_by="patient")
    stored = StoredTokens(store.patches_root, data.rows, (spec.num_blocks - 1,))
    chunk_of = {index: (row["patch_shard"], row["patch_offset"] // 3) for index, row in enumerate(data.rows)}
    reads = []
    original = stored.read
    stored.read = lambda indices: reads.append({chunk_of[i] for i in indices}) or original(indices)
    train = data.indices("train")
    seen = [row for rows, _ in shuffled_batches(stored, train, 8, np.random.default_rng(0)) for row in rows]
    assert sorted(seen) == sorted(train.tolist())  # every train row once per epoch
    assert len(reads) > 2 and max(len(chunks) for chunks in reads) <= SHUFFLE_CHUNKS  # a window at a time
    # The in-memory baseline of benchmarks/segment.py trains exactly as the stream does.
    stored.read = original
    shape = DecoderShape(spec.embed_dim, spec.grid, 3, spec.image_size)
    settings = TrainSettings(epochs=1, batch_size=8)
    streamed = train_decoders(stored, data.input_masks, train, shape, settings, (0.1,), seed=3)[0]
    in_memory = train_decoders(InMemoryTokens(stored, len(data.rows)), data.input_masks, train, shape, settings,
                               (0.1,), seed=3)[0]
    for a, b in zip(streamed.parameters(), in_memory.parameters()):
        assert torch.equal(a, b)
    # A lost chunk is an error naming `embedstore check`, never tokens of zeros (Zarr's fill value).
    array = store.patches_root / data.rows[0]["patch_shard"] / f"b{spec.num_blocks - 1}"
    next(f for f in (array / "c").rglob("*") if f.is_file()).unlink()
    with pytest.raises(StoreDamagedError, match="embedstore check"):
        StoredTokens(store.patches_root, data.rows, (spec.num_blocks - 1,)).read(np.arange(len(data.rows)))


def test_segment_arguments_are_checked_before_any_work(png_task, monkeypatch, capsys):
    store, labels = png_task
    for arguments, fragment in ((["--loss", "focal"], "--loss"), (["--epochs", "0"], "--epochs"),
                                (["--score-at", "mask"], "--score-at"), (["--decoder", "fpn"], "--decoder"),
                                (["--seeds", "a"], "--seeds"), (["--device", "tpu"], "--device")):
        code, _, stderr = run_cli_here(["eval", "segment", str(store), "--labels", str(labels), *arguments],
                                       monkeypatch, capsys)
        assert code == 2 and fragment in stderr and len(stderr.strip().splitlines()) == 1, (arguments, stderr)


def test_a_split_the_mask_problems_empty_says_what_left_it_empty(png_task, tmp_path, monkeypatch, capsys):
    store, labels = png_task
    folder = labels.parent
    rows = [{**row, "path": str(folder / row["path"]), "mask": str(folder / row["mask"])} for row in labels_rows(labels)]
    rows = [{**row, "split": "test" if index < 4 else "train"} for index, row in enumerate(rows)]
    for row in rows[:4]:  # every test row's mask is gone
        row["mask"] = str(tmp_path / f"gone-{Path(row['mask']).name}")
    csv_path = write_csv(tmp_path / "no-test.csv", rows)
    code, _, stderr = run_cli_here(["eval", "segment", str(store), "--labels", str(csv_path), "--epochs", "1"],
                                   monkeypatch, capsys)
    assert code == 2 and "the splits need train and test rows" in stderr.splitlines()[-1]
    assert "4 labels rows were left out for their masks (4 unreadable_mask)" in stderr and "gone-" in stderr
