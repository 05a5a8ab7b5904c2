"""Store format 3: several models in one store and one ingest, model specs from timm's
`pretrained_cfg`, multi-layer features equal to timm's `forward_intermediates(norm=True)`, and the
wrong requests of a several-model ingest.

Module level defines constants and functions only (decode workers may re-import modules).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import ingest_options, make_mixed_archive, write_modality_labels

TWO_MODELS = ("dinov2_vits14", "dinov2_vitb14")


def model_files(store: Path, model_id: str) -> dict[str, str]:
    """SHA-256 of every file of one model: its two tables and its patch shards."""
    roots = [store / "tables" / f"slices-{model_id}.lance", store / "tables" / f"series-{model_id}.lance",
             store / "patches" / model_id]
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}




@pytest.fixture(scope="module")
def two_model_store(tmp_path_factory, monkeypatch_module):
    """The mixed archive ingested once with two DINOv2 sizes in one command, counting decodes."""
    from embedstore.pipeline import decode
    from embedstore.pipeline.ingest import ingest

    archive = make_mixed_archive(tmp_path_factory.mktemp("archive"))
    calls = []
    real_decode = decode.decode_task

    def counting_decode(task, settings):
        calls.extend(item.item_id for item in task.items)
        return real_decode(task, settings)

    monkeypatch_module.setattr(decode, "decode_task", counting_decode)
    path = tmp_path_factory.mktemp("stores") / "two"
    summary = ingest([archive.root], path, ingest_options(models=TWO_MODELS, batch_size=4, patch_layers=(-2, -1)))
    monkeypatch_module.undo()
    return path, summary, archive, calls


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_each_slice_is_decoded_once_for_both_models(two_model_store):
    from embedstore.store import Store
    from embedstore.store.schema import slices_table_name

    path, summary, archive, decoded = two_model_store
    assert sorted(decoded) == sorted(set(decoded)), "a slice was decoded more than once"
    assert len(decoded) == archive.n_slices
    store = Store.open(path)
    assert [s.embed_dim for s in store.specs().values()] == [384, 768]
    assert summary.embedded_by_model == {m: archive.n_slices for m in summary.model_ids}
    items = store.rows("items", columns=["key"]).column("key").to_pylist()
    assert len(items) == len(set(items)) == archive.n_slices  # metadata once, not once per model
    for model_id in summary.model_ids:
        keys = store.rows(slices_table_name(model_id), columns=["key"]).column("key").to_pylist()
        assert sorted(keys) == sorted(items)


@pytest.mark.slow  # ingests each model into a store of its own
def test_eval_knn_of_either_model_equals_a_store_holding_it_alone(two_model_store, tmp_path):
    from embedstore.eval.evaluate import knn_evaluation
    from embedstore.eval.options import KnnOptions
    from embedstore.pipeline.ingest import ingest
    from embedstore.store import Store

    path, summary, archive, _ = two_model_store
    labels = write_modality_labels(tmp_path / "labels.csv", path)
    for name, model_id in zip(TWO_MODELS, summary.model_ids):
        alone = tmp_path / name
        single = ingest([archive.root], alone, ingest_options(models=(name,), batch_size=4, patch_layers=(-2, -1)))
        assert single.model_ids == [model_id]
        options = KnnOptions(feature="patch_mean", k=(1, 3))
        shared = knn_evaluation(Store.open(path), labels, options, model_id[:20])
        own = knn_evaluation(Store.open(alone), labels, options)
        assert shared.metrics == own.metrics and shared.counts == own.counts


def test_a_model_added_later_leaves_the_others_files_untouched_and_one_can_be_dropped(two_model_store, tmp_path):
    from embedstore.pipeline.ingest import ingest
    from embedstore.store import Store
    from embedstore.store.schema import series_table_name, slices_table_name

    source, summary, archive, _ = two_model_store
    path = tmp_path / "store"
    shutil.copytree(source, path)
    first, second = summary.model_ids
    before = {m: model_files(path, m) for m in (first, second)}
    assert all(before.values())
    third = ingest([archive.root], path, ingest_options(models=("dinov2_vits14",), seed=1, batch_size=4))
    (third_id,) = third.model_ids
    assert third_id not in (first, second) and third.n_embedded == archive.n_slices
    assert {m: model_files(path, m) for m in (first, second)} == before

    store = Store.open(path)
    store.drop_model(second)
    store = Store.open(path)
    assert list(store.specs()) == [first, third_id]
    assert not store.has_table(slices_table_name(second)) and not store.has_table(series_table_name(second))
    assert not (path / "patches" / second).exists()
    assert model_files(path, first) == before[first]
    assert store.table(slices_table_name(first)).count_rows() == archive.n_slices
    assert store.table("items").count_rows() == archive.n_slices


def test_stored_layers_equal_timms_forward_intermediates(two_model_store):
    from embedstore.models.build import rebuild_model
    from embedstore.models.embedder import normalize
    from embedstore.models.spec import cls_column
    from embedstore.preprocess import DecodeSettings, decode_task
    from embedstore.sources.catalog import build_catalog
    from embedstore.sources.discover import discover
    from embedstore.store import Store
    from embedstore.store.patches import read_patches
    from embedstore.store.schema import slices_table_name

    path, summary, archive, _ = two_model_store
    store = Store.open(path)
    found, _ = discover([archive.pngs[0]])
    (task,) = build_catalog(found).tasks
    for model_id in summary.model_ids:
        spec = store.spec(model_id)
        assert spec.cls_layers == (8, 9, 10, 11) and spec.patch_layers == (10, 11)
        decoded = decode_task(task, DecodeSettings(spec.intensity, spec.image_size, (spec.interpolation,)))
        model = rebuild_model(spec).model
        batch = normalize(torch.from_numpy(decoded.pixels[spec.interpolation]), spec.mean, spec.std)
        with torch.inference_mode():
            _, layers = model.forward_intermediates(batch, indices=[8, 9, 10, 11], norm=True, output_fmt="NLC",
                                                    return_prefix_tokens=True)
        (row,) = store.rows(slices_table_name(model_id), f"key = 'file:{archive.pngs[0]}'").to_pylist()
        for block, (tokens, prefix) in zip((8, 9, 10, 11), layers):
            np.testing.assert_allclose(row[cls_column(block)], prefix[0, 0].numpy(), atol=1e-5, rtol=0)
            if block in spec.patch_layers:
                stored = read_patches(store.patches_root, row["patch_shard"], [row["patch_offset"]], block)[0]
                # Zarr keeps float16: equal to the fp32 tokens rounded to float16.
                np.testing.assert_array_equal(stored, tokens[0].numpy().astype(np.float16))
        np.testing.assert_allclose(row["cls"], layers[-1][1][0, 0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(row["patch_mean"], layers[-1][0][0].mean(0).numpy(), atol=1e-5, rtol=0)


def test_input_statistics_come_from_the_models_pretrained_cfg():
    from embedstore.models.build import load_model

    augreg = load_model("vit_tiny_patch16_224.augreg_in21k", "random", 32)
    assert augreg.spec.mean == augreg.spec.std == (0.5, 0.5, 0.5)
    dinov2 = load_model("dinov2_vits14", "random", 28, layers=1)
    assert dinov2.spec.mean == pytest.approx((0.485, 0.456, 0.406)) and dinov2.spec.interpolation == "bicubic"
    imagenet = load_model("vit_tiny_patch16_224.augreg_in21k", "random", 32, mean=dinov2.spec.mean,
                          std=dinov2.spec.std)
    assert imagenet.spec.weights_digest == augreg.spec.weights_digest
    assert imagenet.model_id != augreg.model_id


def test_the_embedder_feeds_the_model_its_own_statistics():
    from embedstore.models.build import load_model
    from embedstore.models.embedder import Embedder

    pixels = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    augreg = load_model("vit_tiny_patch16_224.augreg_in21k", "random", 32, layers=1)
    got = Embedder(augreg, engine="eager").embed(pixels, keep_patches=False)
    with torch.inference_mode():
        expected = augreg.model.forward_head(
            augreg.model.forward_features((torch.from_numpy(pixels).expand(-1, 3, -1, -1) - 0.5) / 0.5),
            pre_logits=True)
    np.testing.assert_allclose(got.cls, expected.numpy(), atol=1e-5, rtol=0)


def test_features_of_the_study_are_read_from_the_stored_blocks(two_model_store):
    from embedstore.errors import UsageError
    from embedstore.store import Store
    from embedstore.store.vectors import load_vectors

    path, summary, _, _ = two_model_store
    store = Store.open(path)
    small = summary.model_ids[0]
    cls4 = load_vectors(store, small, "cls4")
    both = load_vectors(store, small, "cls1+patch_mean")
    plain = load_vectors(store, small, "cls+patch_mean")
    assert cls4.matrix.shape[1] == 4 * 384 and both.matrix.shape[1] == 768
    np.testing.assert_allclose(cls4.matrix[:, -384:], load_vectors(store, small, "cls").matrix, atol=1e-6)
    np.testing.assert_allclose(both.matrix, plain.matrix, atol=1e-6)
    series = load_vectors(store, small, "cls4", level="series")
    assert series.matrix.shape[1] == 4 * 384
    with pytest.raises(UsageError, match="--layers"):
        load_vectors(store, small, "cls5")
    with pytest.raises(UsageError, match="ambiguous"):
        store.resolve_model_id("dinov2_vit")


def test_model_specs_rebuild_the_model(two_model_store):
    from embedstore.models.build import rebuild_model
    from embedstore.store import Store

    path, summary, _, _ = two_model_store
    for model_id, spec in Store.open(path).specs().items():
        assert spec.model_id == model_id
        assert rebuild_model(spec).model_id == model_id


# ------------------------------------------------------------------------- wrong requests
WRONG_MULTI_MODEL_REQUESTS = {
    "unknown-model-among-several": (["--model", "dinov2_vits14", "--model", "dinov2_vitq14"], "dinov2_vitq14"),
    "same-model-twice": (["--model", "dinov2_vits14", "--model", "dinov2_vits14"], "twice"),
    "no-layers": (["--layers", "0"], "--layers"),
    "more-layers-than-blocks": (["--layers", "13"], "12 blocks"),
    "patch-layer-out-of-range": (["--patch-layers", "12"], "--patch-layers"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(WRONG_MULTI_MODEL_REQUESTS))
def test_wrong_model_requests_are_one_line_exit_2_before_anything_is_written(case, tmp_path):
    from embedstore import samples
    from tests.test_bad_input import FAST, run_cli

    samples.write_png(tmp_path / "src" / "one.png", samples.phantom(32, 0))
    arguments, named = WRONG_MULTI_MODEL_REQUESTS[case]
    result = run_cli(["ingest", "src", "--store", "store", *FAST, *arguments], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedstore: error:") and named in lines[0], result.stderr
    assert not (tmp_path / "store").exists()



def test_linear_feature_grid_chooses_on_val_and_equals_the_chosen_feature_run_alone(two_model_store, tmp_path):
    from embedstore.eval.evaluate import linear_evaluation
    from embedstore.eval.options import GRID_FEATURES, LinearOptions
    from embedstore.store import Store

    path, summary, _, _ = two_model_store
    labels = write_modality_labels(tmp_path / "labels.csv", path)
    store = Store.open(path)
    grid = linear_evaluation(store, labels, LinearOptions(feature="grid", c_grid=(0.01, 1.0, 100.0)), summary.model_ids[0])
    assert set(grid.feature_grid) == set(GRID_FEATURES)
    best = max(score["val_score"] for score in grid.feature_grid.values())
    assert grid.feature_grid[grid.feature]["val_score"] == best
    alone = linear_evaluation(store, labels, LinearOptions(feature=grid.feature, c_grid=(0.01, 1.0, 100.0)),
                              summary.model_ids[0])
    assert alone.metrics == grid.metrics and alone.chosen_c == grid.chosen_c and alone.feature_grid is None
