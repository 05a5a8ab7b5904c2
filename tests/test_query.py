"""The query layer on generated vectors with known structure and on an ingested store: exact
search against scikit-learn, the kNN vote against a plain reference, patient-safe splits,
series pooling, and `embedstore eval knn` end to end."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from embedstore.errors import UsageError
from embedstore.eval.knn import choose_search, knn_scores
from embedstore.eval.labels import LabelledVectors, check_splits, split_by_patient
from embedstore.search.exact import (
    DEFAULT_BUDGET_BYTES,
    block_top_k,
    exact_top_k,
    int8_rerank_top_k,
    search_device,
)
from embedstore.store import Store
from embedstore.store.schema import slices_table_name
from embedstore.store.vectors import load_vectors
from tests.support import (
    add_synthetic_slices,
    clustered,
    run_cli_here,
    synthetic_spec,
    synthetic_store,
)

# ------------------------------------------------------------------------------ exact search


@pytest.mark.parametrize("metric, sklearn_metric", [("cosine", "cosine"), ("l2", "euclidean")])
def test_exact_top_k_equals_sklearn_brute_force(metric, sklearn_metric):
    database, _ = clustered(150, 4, 24, seed=1)
    queries, _ = clustered(20, 4, 24, seed=2)
    _, ours = exact_top_k(queries, database, 7, metric=metric, budget_bytes=4 * 1024 * 37)  # tiny blocks
    reference = NearestNeighbors(n_neighbors=7, algorithm="brute", metric=sklearn_metric).fit(database)
    _, theirs = reference.kneighbors(queries)
    np.testing.assert_array_equal(ours, theirs)


def test_chunking_never_changes_the_result():
    database, _ = clustered(300, 3, 16, seed=3)
    queries, _ = clustered(40, 3, 16, seed=4)
    whole = exact_top_k(queries, database, 10)
    for budget in (4 * 1024, 4 * 1024 * 3, 4 * 1024 * 1024):
        chunked = exact_top_k(queries, database, 10, budget_bytes=budget)
        np.testing.assert_array_equal(chunked[1], whole[1])
        np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)


@pytest.mark.parametrize("width", [4096, 4096 + 17])  # whole groups, and a tail shorter than a group
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_block_top_k_through_group_maxima_equals_a_plain_top_k(width, dtype):
    generator = torch.Generator().manual_seed(width)
    block = (torch.randn(64, width, generator=generator) * 1e6).to(dtype)
    block[3, -1] = block.max() + 1  # the best score of a row in the tail
    values, columns = block_top_k(block, 10)
    assert len(values[0]) == 10 and columns[3].tolist().count(width - 1) == 1
    np.testing.assert_array_equal(torch.sort(values, 1).values, torch.sort(torch.topk(block, 10).values, 1).values)
    np.testing.assert_array_equal(block.gather(1, columns), values)


def test_int8_candidates_reranked_give_the_exact_top_k():
    database, _ = clustered(400, 10, 96, seed=5, spread=1.5)  # 4,000 rows, overlapping classes
    queries, _ = clustered(20, 10, 96, seed=6, spread=1.5)
    exact_scores, exact_indices = exact_top_k(queries, database, 20)
    for budget in (4 * 1024 * 300, DEFAULT_BUDGET_BYTES):  # many blocks and rerank steps, and one
        scores, indices, _ = int8_rerank_top_k(queries, database, 20, budget_bytes=budget)
        np.testing.assert_array_equal(indices, exact_indices)
        np.testing.assert_allclose(scores, exact_scores, atol=1e-6)  # re-scored in float32, not int8


def test_queries_the_int8_shortlist_cannot_vouch_for_are_searched_exactly():
    # a shortlist as long as k leaves no margin: the int8 order alone would decide the set
    database, _ = clustered(400, 10, 96, seed=5, spread=1.5)
    queries, _ = clustered(20, 10, 96, seed=6, spread=1.5)
    _, exact_indices = exact_top_k(queries, database, 5)
    _, indices, searched_exactly = int8_rerank_top_k(queries, database, 5, candidates=5)
    assert searched_exactly > 0
    np.testing.assert_array_equal(indices, exact_indices)


def test_int8_search_of_near_duplicates_is_exact():
    # similarities all within 1e-4 of each other, as with near-identical slices or an untrained model
    rng = np.random.default_rng(7)
    database = (rng.normal(size=64) + 1e-3 * rng.normal(size=(3000, 64))).astype(np.float32)
    queries = (database[0] + 1e-3 * rng.normal(size=(30, 64))).astype(np.float32)
    _, exact_indices = exact_top_k(queries, database, 10)
    _, indices, _ = int8_rerank_top_k(queries, database, 10)
    np.testing.assert_array_equal(indices, exact_indices)


def test_auto_search_takes_int8_only_for_large_problems_and_small_k_on_a_cpu():
    assert choose_search("auto", 100, 1000, 20) == "exact"
    assert choose_search("auto", 10_000, 100_000, 20) == ("int8" if search_device().type == "cpu" else "exact")
    assert choose_search("auto", 10_000, 100_000, 200) == "exact"
    assert choose_search("exact", 10_000, 100_000, 20) == "exact"
    with pytest.raises(ValueError):
        choose_search("faiss", 1, 1, 1)


# --------------------------------------------------------------------------------------- kNN


def reference_weighted_vote(train, train_labels, test, n_classes, k, temperature=0.07):
    """DINOv2's kNN written out plainly, one query at a time."""
    predictions = []
    train_unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    for query in test:
        similarity = train_unit @ (query / np.linalg.norm(query))
        nearest = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(n_classes)
        for index in nearest:
            votes[train_labels[index]] += np.exp(similarity[index] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


def test_knn_predictions_equal_a_plain_reference():
    vectors, labels = clustered(110, 5, 32, seed=6, spread=1.6)  # overlapping classes: votes matter
    train, train_labels, test, test_labels = vectors[:400], labels[:400], vectors[400:], labels[400:]
    scores = knn_scores(train, train_labels, test, 5, ks=(10, 20, 100))
    for k, votes in scores.items():
        np.testing.assert_array_equal(votes.argmax(1), reference_weighted_vote(train, train_labels, test, 5, k))
        np.testing.assert_allclose(votes.sum(1), 1.0)
    assert (scores[20].argmax(1) == test_labels).mean() > 0.5  # the structure is found


def test_multilabel_vote_is_the_weighted_share_of_neighbours_with_each_label():
    train, classes = clustered(40, 3, 8, seed=8)
    label_sets = np.eye(3, dtype=np.int64)[classes]
    label_sets[::4, 2] = 1  # every fourth vector also carries label 2
    test, _ = clustered(5, 3, 8, seed=9)
    scores = knn_scores(train, label_sets, test, 3, ks=(10,))[10]
    similarities, indices = exact_top_k(test, train, 10)
    weights = np.exp(similarities / 0.07)
    np.testing.assert_allclose(scores, (label_sets[indices] * weights[:, :, None]).sum(1) / weights.sum(1, keepdims=True),
                               rtol=1e-5)


# ------------------------------------------------------------------------------------ splits


def labelled(n_patients: int, rows_per_patient: int, n_classes: int, seed: int) -> LabelledVectors:
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"p{i:03d}" for i in range(n_patients)], rows_per_patient).astype(object)
    targets = np.repeat(rng.integers(0, n_classes, n_patients), rows_per_patient)
    return LabelledVectors(rng.normal(size=(len(targets), 4)).astype(np.float32), targets,
                           [f"c{i}" for i in range(n_classes)], False, patients,
                           np.array([""] * len(targets), dtype=object), [f"k{i}" for i in range(len(targets))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_patient_never_puts_a_patient_on_two_sides(seed):
    data = split_by_patient(labelled(60, 5, 3, seed), (0.7, 0.1, 0.2), seed)
    check_splits(data)
    sides = {}
    for patient, split in zip(data.patients, data.splits):
        sides.setdefault(patient, set()).add(split)
    assert all(len(s) == 1 for s in sides.values())
    shares = {split: np.mean(data.splits == split) for split in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.7, abs=0.08) and shares["test"] == pytest.approx(0.2, abs=0.08)
    for label in range(3):  # stratified: every class on the training and the test side
        assert {"train", "test"} <= set(data.splits[data.targets == label])


def test_a_patient_in_two_splits_is_refused():
    data = labelled(4, 2, 2, seed=3)
    data.splits[:] = ["train", "test", "train", "train", "test", "test", "test", "test"]
    with pytest.raises(UsageError, match="more than one split"):
        check_splits(data)


# ------------------------------------------------------------------------- on a real store


@pytest.mark.parametrize("feature, width", [("cls+patch_mean", 2), ("cls4+patch_mean", 5), ("cls2", 2)])
def test_series_vectors_are_the_mean_of_their_slices(ingested, feature, width):
    store = Store.open(ingested.path)
    slices = load_vectors(store, feature=feature)
    series = load_vectors(store, feature=feature, level="series")
    assert len(series) == 6
    uids = np.array(slices.rows.column("series_uid").to_pylist())
    for row, uid in enumerate(series.rows.column("series_uid").to_pylist()):
        np.testing.assert_allclose(series.matrix[row], slices.matrix[uids == uid].mean(0), rtol=1e-5, atol=1e-6)
    assert slices.matrix.shape[1] == width * 384 and slices.matrix.flags["C_CONTIGUOUS"]


def test_cls_n_features_are_the_last_blocks_cls_tokens_in_block_order(ingested):
    store = Store.open(ingested.path)
    rows = store.rows(slices_table_name(ingested.summary.model_ids[0])).sort_by("key")
    stacked = load_vectors(store, feature="cls3+patch_mean").matrix
    expected = np.concatenate([np.stack(rows[column].to_numpy(zero_copy_only=False))
                               for column in ("cls_b9", "cls_b10", "cls_b11", "patch_mean")], axis=1)
    np.testing.assert_array_equal(stacked, expected)
    for feature, fragment in (("cls5", "keeps the CLS token of the last 4 blocks"), ("cls0", "cls0"),
                              ("cls+cls", "repeats"), ("pixels", "feature must be one of")):
        with pytest.raises(UsageError, match=fragment):
            load_vectors(store, feature=feature)


def test_vectors_of_two_models_are_never_mixed(ingested, fresh_copy):
    from embedstore.pipeline.ingest import ingest
    from tests.support import ingest_options

    second = ingest([ingested.archive.pngs[0]], fresh_copy, ingest_options(seed=1))  # another model id
    store = Store.open(fresh_copy)
    with pytest.raises(UsageError, match="holds 2 models"):
        load_vectors(store)
    model_ids = list(store.specs())
    assert model_ids == ingested.summary.model_ids + second.model_ids
    assert len(load_vectors(store, model_ids[1])) == 1
    assert len(load_vectors(store, model_ids[0])) == 18
    # a model is named by any unique prefix of its id
    assert "random-s0-" in model_ids[0] and "random-s1-" in model_ids[1]
    assert load_vectors(store, model_ids[1].split("-s1-")[0] + "-s1").model_id == model_ids[1]
    with pytest.raises(UsageError, match="ambiguous"):
        load_vectors(store, "dinov2_vits14-random-s")
    with pytest.raises(UsageError, match="starts with"):
        load_vectors(store, "resnet")


def write_labels(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_eval_knn_from_the_command_line_writes_its_json(ingested, tmp_path):
    from embedstore.cli.main import app

    store = Store.open(ingested.path)
    rows = store.rows(slices_table_name(store.resolve_model_id(None)), columns=["key", "series_uid", "modality"]).to_pylist()
    labels = write_labels(tmp_path / "labels.csv", [  # every class in train: the one MR series would sit in test alone
        {"key": r["key"], "label": "ct" if r["modality"] == "CT" else "other", "patient_id": r["series_uid"]}
        for r in rows])
    out, report = tmp_path / "knn.json", tmp_path / "report"
    app(["eval", "knn", str(ingested.path), "--labels", str(labels), "--split-by", "patient", "--ratios", "0.5,0,0.5",
         "--k", "1,3", "--json", str(out), "--report", str(report)], standalone_mode=False)
    result = json.loads(out.read_text())
    assert result["task"] == "knn" and result["model_id"] == ingested.summary.model_ids[0]
    assert sum(result["counts"].values()) == len(rows) and result["counts"]["test"] > 0
    assert set(result["metrics"]["test"]) == {"1", "3"}
    assert 0.0 <= result["metrics"]["test"]["1"]["top1_accuracy"] <= 1.0
    matrix = np.array(result["metrics"]["test"]["1"]["confusion_matrix"])
    assert matrix.shape == (len(result["classes"]),) * 2 and matrix.sum() == result["counts"]["test"]
    markdown = (report / "report.md").read_text()
    assert "k = 1" in markdown and "![confusion matrix on test](confusion.png)" in markdown
    assert (report / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((report / "knn.json").read_text()) == result
    assert result["search"] == "exact"  # auto, on a store this small
    # patch_mean: a random-weight model's CLS vectors tie to the last bit, which no two searches order alike
    by_search = {}
    for search in ("exact", "int8"):
        app(["eval", "knn", str(ingested.path), "--labels", str(labels), "--split-by", "patient", "--ratios",
             "0.5,0,0.5", "--k", "1,3", "--feature", "patch_mean", "--search", search, "--json", str(out)],
            standalone_mode=False)
        by_search[search] = json.loads(out.read_text())
        assert by_search[search]["search"] == search
    assert by_search["int8"]["metrics"] == by_search["exact"]["metrics"]


def test_labels_that_join_nothing_or_lack_columns_are_clear_errors(ingested, tmp_path):
    from embedstore.eval.evaluate import knn_evaluation

    store = Store.open(ingested.path)
    nothing = write_labels(tmp_path / "nothing.csv", [{"key": "no-such-key", "label": "a", "split": "train"}])
    with pytest.raises(UsageError, match="no stored slice matches"):
        knn_evaluation(store, nothing)
    no_label = write_labels(tmp_path / "nolabel.csv", [{"key": "k", "class": "a"}])
    with pytest.raises(UsageError, match="'label' column"):
        knn_evaluation(store, no_label)
    shutil.rmtree(tmp_path / "missing", ignore_errors=True)
    with pytest.raises(UsageError, match="does not exist"):
        knn_evaluation(store, tmp_path / "missing" / "labels.csv")


# ------------------------------------------------------------------------------------ search


def test_search_by_key_is_exact_and_leaves_the_query_out(ingested):
    from embedstore.search.similar import query_by_key, search

    store = Store.open(ingested.path)
    slices = load_vectors(store, feature="patch_mean")  # random weights: CLS hardly varies, patch means do
    key = slices.rows.column("key")[3].as_py()
    hits = search(store, query_by_key(store, key, "patch_mean"), k=5, feature="patch_mean")
    assert key not in [h.key for h in hits] and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    others = np.array([k != key for k in slices.rows.column("key").to_pylist()])
    reference = NearestNeighbors(n_neighbors=5, algorithm="brute", metric="cosine").fit(slices.matrix[others])
    distances, expected = reference.kneighbors(slices.matrix[3:4])
    np.testing.assert_allclose([h.similarity for h in hits], 1 - distances[0], atol=1e-5)
    assert hits[0].key == slices.rows.column("key").to_pylist()[np.flatnonzero(others)[expected[0][0]]]


def test_search_where_filters_and_a_malicious_where_is_rejected(ingested):
    from embedstore.search.similar import query_by_key, search

    store = Store.open(ingested.path)
    key = load_vectors(store).rows.column("key")[0].as_py()
    hits = search(store, query_by_key(store, key), k=50, where="modality = 'MR' AND slice_index >= 1")
    assert hits and all(h.modality == "MR" and h.slice_index >= 1 for h in hits)
    for malicious in ("1=1; DROP TABLE slices", "modality = 'CT' OR 1=1 --", "modality = 'CT') OR (TRUE",
                      "cls IS NOT NULL", "modality = lower('CT')"):
        with pytest.raises(UsageError, match="--where"):
            search(store, query_by_key(store, key), where=malicious)
    store = Store.open(ingested.path)
    assert store.table(slices_table_name(ingested.summary.model_ids[0])).count_rows() == ingested.summary.n_embedded
    assert store.table("items").count_rows() == ingested.summary.n_embedded


def test_where_is_rebuilt_with_and_or_not_and_parentheses_kept():
    from embedstore.search.where import validated_where

    columns = ["modality", "slice_index", "body_part"]
    assert validated_where("modality = 'CT' or not (slice_index < 2 and body_part = 'HEAD')", columns) == \
        "modality = 'CT' OR NOT (slice_index < 2 AND body_part = 'HEAD')"
    with pytest.raises(UsageError, match="--where"):
        validated_where("modality = 'CT' AND", columns)


def test_study_level_ranks_by_the_best_match_of_each_query_slice(ingested):
    from embedstore.search.similar import query_by_series, search
    from embedstore.store.vectors import l2_normalised

    store = Store.open(ingested.path)
    ct_series = store.rows("series", "modality = 'CT' AND n_slices > 1", ["series_uid"]).column("series_uid")[0].as_py()
    query = query_by_series(store, ct_series, "patch_mean")
    hits = search(store, query, k=10, level="study", feature="patch_mean")
    slices = load_vectors(store, feature="patch_mean")
    studies = np.array(slices.rows.column("study_uid").to_pylist(), dtype=object)
    expected = {}
    for study in set(studies) - {query.own_study}:
        similarity = l2_normalised(query.vectors) @ l2_normalised(slices.matrix[studies == study]).T
        expected[study] = similarity.max(1).mean()
    ranked = sorted(expected, key=lambda s: -expected[s])
    assert len(hits) == min(10, len(ranked)) and query.own_study not in [h.key for h in hits]
    np.testing.assert_allclose([h.similarity for h in hits], [expected[s] for s in ranked[:10]], rtol=1e-5)
    np.testing.assert_allclose([h.similarity for h in hits], [expected[h.key] for h in hits], rtol=1e-5)


@pytest.mark.parametrize("feature", ["patch_mean", "cls4+patch_mean"])
def test_search_by_image_embeds_it_with_the_stores_model(ingested, feature):
    from embedstore.inference.embed import embed_file
    from embedstore.search.similar import query_by_vectors, search

    store = Store.open(ingested.path)
    model_id = store.resolve_model_id(None)
    png = ingested.archive.pngs[1]
    columns = embed_file(store, png, model_id)
    query = query_by_vectors(store, f"image {png}", model_id, columns, feature)
    stored = load_vectors(store, feature=feature, where=f"path = '{png}'")
    np.testing.assert_allclose(query.vectors, stored.matrix, rtol=1e-4, atol=1e-5)  # the very vector ingest stored
    hits = search(store, query, k=3, feature=feature)
    assert hits[0].path == str(png) and hits[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_search_command_prints_json(ingested, capsys):
    from embedstore.cli.main import app

    key = load_vectors(Store.open(ingested.path)).rows.column("key")[0].as_py()
    app(["search", str(ingested.path), "--key", key, "--k", "4", "--level", "series", "--json"], standalone_mode=False)
    result = json.loads(capsys.readouterr().out)
    assert result["level"] == "series" and len(result["hits"]) == 4
    assert all(h["series_uid"] for h in result["hits"])


# ------------------------------------------------------------------------------ linear probe


def labelled_clusters(n_patients: int, rows_per_patient: int, n_classes: int, dim: int, seed: int,
                      spread: float = 2.5) -> LabelledVectors:
    """Patients with a class each, their rows scattered around the class centre (overlapping)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    patient_class = rng.integers(0, n_classes, n_patients)
    targets = np.repeat(patient_class, rows_per_patient)
    matrix = (centres[targets] + spread * rng.normal(size=(len(targets), dim))).astype(np.float32)
    patients = np.repeat([f"p{i:04d}" for i in range(n_patients)], rows_per_patient).astype(object)
    return LabelledVectors(matrix, targets, [f"c{i}" for i in range(n_classes)], False, patients,
                           np.array([""] * len(targets), dtype=object), [str(i) for i in range(len(targets))])


def test_linear_probe_matches_sklearn_with_the_same_c():
    from sklearn.linear_model import LogisticRegression

    from embedstore.eval.linear import linear_probe

    data = split_by_patient(labelled_clusters(150, 4, 4, 32, seed=11), (0.6, 0.2, 0.2), seed=0)
    selection, test_metrics = linear_probe(data, c_grid=tuple(np.logspace(-4, 2, 7)))
    assert not selection.carved and selection.chosen_c in np.logspace(-4, 2, 7)
    fit = data.subset(data.splits != "test")
    test = data.subset(data.splits == "test")
    reference = LogisticRegression(C=selection.chosen_c, max_iter=5000, tol=1e-8).fit(fit.matrix, fit.targets)
    theirs = (reference.predict(test.matrix) == test.targets).mean()
    ours = test_metrics["top1_accuracy"]
    assert abs(ours - theirs) <= 0.01, (ours, theirs)
    assert ours > 0.5  # above chance (0.25): the probe learns the structure


def logistic_objective(weights, bias, x, y, c, multilabel):
    """C · Σ loss + ½‖W‖², scikit-learn's objective, in float64."""
    logits = x.astype(np.float64) @ weights + bias
    if multilabel:
        loss = (np.logaddexp(0, logits) - y * logits).sum()
    else:
        top = logits.max(1, keepdims=True)
        loss = (np.log(np.exp(logits - top).sum(1)) + top[:, 0] - logits[np.arange(len(y)), y]).sum()
    return c * loss + 0.5 * (weights ** 2).sum()


@pytest.mark.parametrize("multilabel", [False, True])
def test_fit_logistic_reaches_scikit_learns_objective(multilabel):
    from sklearn.linear_model import LogisticRegression

    from embedstore.eval.linear import ROW_BLOCK, fit_logistic

    data = labelled_clusters(300, 4, 3, 24, seed=5)  # 1,200 rows: several row blocks
    assert len(data.matrix) > 2 * ROW_BLOCK
    x = data.matrix
    y = np.eye(3)[data.targets] if multilabel else data.targets
    for c in (0.01, 1.0, 100.0):
        probe = fit_logistic(x, y, 3, c, multilabel)
        if multilabel:  # one independent sigmoid per label: scikit-learn's binary fit, label by label
            fits = [LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y[:, j]) for j in range(3)]
            weights, bias = np.stack([f.coef_[0] for f in fits], 1), np.array([f.intercept_[0] for f in fits])
        else:
            fit = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
            weights, bias = fit.coef_.T, fit.intercept_
        ours = logistic_objective(probe.weights, probe.bias, x, y, c, multilabel)
        theirs = logistic_objective(weights, bias, x, y, c, multilabel)
        assert ours <= theirs * (1 + 1e-5), (c, ours, theirs)


def test_linear_probe_carves_val_from_train_by_patient_and_never_peeks_at_test():
    from embedstore.eval.linear import linear_probe, with_val_split

    data = split_by_patient(labelled_clusters(80, 3, 3, 16, seed=12), (0.8, 0.0, 0.2), seed=1)
    assert not (data.splits == "val").any()
    carved, was_carved = with_val_split(data, seed=0)
    assert was_carved and (carved.splits == "val").any()
    np.testing.assert_array_equal(carved.splits == "test", data.splits == "test")  # test untouched
    check_splits(carved)  # no patient on two sides
    shuffled = data.subset(np.ones(len(data.splits), dtype=bool))
    shuffled.targets = shuffled.targets.copy()
    shuffled.targets[shuffled.splits == "test"] = (shuffled.targets[shuffled.splits == "test"] + 1) % 3
    assert linear_probe(shuffled, (0.01, 1.0))[0].chosen_c == linear_probe(data, (0.01, 1.0))[0].chosen_c


def test_eval_linear_from_the_command_line(ingested, tmp_path):
    from embedstore.cli.main import app

    store = Store.open(ingested.path)
    rows = store.rows(slices_table_name(store.resolve_model_id(None)), columns=["key", "series_uid", "modality"]).to_pylist()
    labels = write_labels(tmp_path / "labels.csv", [
        {"key": r["key"], "label": "ct" if r["modality"] == "CT" else "other", "patient_id": r["series_uid"]}
        for r in rows])
    out = tmp_path / "linear.json"
    app(["eval", "linear", str(ingested.path), "--labels", str(labels), "--split-by", "patient",
         "--ratios", "0.5,0.2,0.3", "--c-grid", "0.1,1,10", "--json", str(out), "--report", str(tmp_path / "report")],
        standalone_mode=False)
    result = json.loads(out.read_text())
    assert result["task"] == "linear" and result["chosen_c"] in (0.1, 1.0, 10.0)
    assert "(chosen on val)" in (tmp_path / "report" / "report.md").read_text()
    assert result["metrics"]["test"]["top1_accuracy"] is not None


def test_metrics_agree_with_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    from embedstore.eval.metrics import multiclass_metrics

    rng = np.random.default_rng(13)
    y = rng.integers(0, 4, 200)
    scores = rng.random((200, 4)) + np.eye(4)[y] * 0.6
    scores /= scores.sum(1, keepdims=True)
    ours = multiclass_metrics(y, scores, ["a", "b", "c", "d"])
    assert ours["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, scores.argmax(1)))
    assert ours["macro_f1"] == pytest.approx(f1_score(y, scores.argmax(1), average="macro"))
    assert ours["macro_auroc"] == pytest.approx(roc_auc_score(y, scores, multi_class="ovr", average="macro"))


# --------------------------------------------------------------------------------- few-shot


def test_fewshot_draws_train_patients_only_and_repeats_exactly():
    from embedstore.eval.fewshot import draw, few_shot, patients_by_class

    data = split_by_patient(labelled_clusters(90, 3, 3, 16, seed=14), (0.6, 0.1, 0.3), seed=2)
    grouped = patients_by_class(data)
    test_patients = set(data.patients[data.splits == "test"])
    for attempt in range(20):
        chosen = draw(grouped, 4, np.random.default_rng([0, 4, attempt]))
        assert len(chosen) == 12 and not chosen & test_patients
        assert chosen <= set(data.patients[data.splits == "train"])
    first = few_shot(data, shots=(1, 4), tries=5, seed=3)
    again = few_shot(data, shots=(1, 4), tries=5, seed=3)
    assert first["curves"] == again["curves"]
    for name, points in first["curves"].items():
        assert [p["shots"] for p in points] == [1, 4]
        for point in points:
            low, high = point["ci95"]
            assert low <= point["mean"] <= high and len(point["tries"]) == 5
    assert first["curves"]["prototype"][1]["mean"] > first["curves"]["prototype"][0]["mean"] - 0.05


def test_prototype_classifier_is_the_nearest_class_mean():
    from embedstore.eval.fewshot import classify

    data = labelled_clusters(30, 2, 3, 8, seed=15)
    test, _ = clustered(10, 3, 8, seed=16)
    scores = classify("prototype", data, test, 3)
    unit = data.matrix / np.linalg.norm(data.matrix, axis=1, keepdims=True)
    means = np.stack([unit[data.targets == c].mean(0) for c in range(3)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    expected = ((test / np.linalg.norm(test, axis=1, keepdims=True)) @ means.T).argmax(1)
    np.testing.assert_array_equal(scores.argmax(1), expected)


def test_eval_fewshot_from_the_command_line_writes_json_and_a_plot(ingested, tmp_path):
    from embedstore.cli.main import app

    store = Store.open(ingested.path)
    rows = store.rows(slices_table_name(store.resolve_model_id(None)), columns=["key", "series_uid", "modality"]).to_pylist()
    labels = write_labels(tmp_path / "labels.csv", [
        {"key": r["key"], "label": "ct" if r["modality"] == "CT" else "other", "patient_id": r["key"]} for r in rows])
    out, plot, report = tmp_path / "fewshot.json", tmp_path / "fewshot.png", tmp_path / "report"
    app(["eval", "fewshot", str(ingested.path), "--labels", str(labels), "--split-by", "patient", "--ratios",
         "0.6,0,0.4", "--shots", "1,2", "--tries", "3", "--json", str(out), "--plot", str(plot),
         "--report", str(report)], standalone_mode=False)
    result = json.loads(out.read_text())
    assert result["task"] == "fewshot" and set(result["curves"]) == {"knn", "prototype", "linear"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![few-shot curve](fewshot.png)" in (report / "report.md").read_text()
    assert (report / "fewshot.png").exists()


# ------------------------------------------------------------------------------------- index


@pytest.mark.slow
def test_index_is_built_from_the_table_size_and_reaches_its_recall(tmp_path):
    from embedstore.search.index import build_index, index_for
    from embedstore.search.similar import query_by_key, search

    store = synthetic_store(tmp_path / "store", 4000)
    report = build_index(store)
    table = slices_table_name(store.resolve_model_id(None))
    assert report.table == table and report.column == "cls"
    assert report.parameters.index_type == "ivf_flat" and report.parameters.num_partitions == 63
    assert report.recall_at_10 >= 0.95, report
    assert index_for(Store.open(tmp_path / "store"), table, "cls") == report.parameters
    vectors = load_vectors(store, where="modality = 'CT'")
    keys = vectors.rows.column("key").to_pylist()
    overlaps = []
    for key in keys[:20]:  # filtered searches agree with exact search as often as the recall says
        query = query_by_key(store, key)
        indexed = search(Store.open(tmp_path / "store"), query, k=10, where="modality = 'CT'")
        assert all(h.modality == "CT" for h in indexed) and key not in [h.key for h in indexed]
        _, exact = exact_top_k(query.vectors, vectors.matrix, 11)
        expected = [keys[i] for i in exact[0] if keys[i] != key][:10]
        overlaps.append(len(set(expected) & {h.key for h in indexed}) / 10)
    assert np.mean(overlaps) >= 0.9, overlaps
    # another model's rows, copies of the query itself: the search must keep to the query's model
    from embedstore.sources.records import SliceItem

    copies = np.repeat(query.vectors, 3, axis=0)
    items = [SliceItem(f"copy:{i}", f"/archive/copy{i}.png", "study-c", "series-c", i, modality="CT", rows=1, cols=1,
                       intensity="minmax") for i in range(3)]
    other = synthetic_spec(384, name="other")
    add_synthetic_slices(store, other, items, copies)
    # and a model of another width beside them (a store holds any number of widths, each in its tables)
    wide = synthetic_spec(768, name="wide")
    add_synthetic_slices(store, wide, items, np.concatenate([copies, copies], axis=1))
    reopened = Store.open(tmp_path / "store")
    assert [s.embed_dim for s in reopened.specs().values()] == [384, 384, 768]
    assert len(load_vectors(reopened, other.model_id)) == 3
    assert load_vectors(reopened, wide.model_id).matrix.shape == (3, 768)
    assert reopened.table("items").count_rows() == 4000 + 3  # the copies' items once, not once per model
    again = search(reopened, query, k=10, where="modality = 'CT'")
    assert [h.key for h in again] == [h.key for h in indexed]
    assert index_for(reopened, slices_table_name(other.model_id), "cls") is None  # its own, unindexed table


@pytest.mark.slow
def test_index_probes_are_raised_until_the_recall_reaches_its_target(tmp_path):
    from embedstore.search.index import TARGET_RECALL, build_index, choose_parameters

    store = synthetic_store(tmp_path / "store", 4000, spread=6.0)  # barely clustered: few probes miss neighbours
    report = build_index(store)
    assert report.recall_at_10 >= TARGET_RECALL, report
    assert report.parameters.nprobes > choose_parameters(4000, 384, "ivf_flat").nprobes
    table = slices_table_name(store.resolve_model_id(None))
    assert Store.open(tmp_path / "store").manifest["indexes"][f"{table}.cls"]["nprobes"] == report.parameters.nprobes


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["ivf_sq", "ivf_pq", "ivf_hnsw_sq"])
def test_smaller_index_types_reach_the_recall_target_too(tmp_path, index_type):
    from embedstore.search.index import TARGET_RECALL, build_index, index_for

    store = synthetic_store(tmp_path / "store", 2000)
    report = build_index(store, index_type=index_type)
    assert report.parameters.index_type == index_type and report.recall_at_10 >= TARGET_RECALL, report
    assert index_for(Store.open(tmp_path / "store"), slices_table_name(store.resolve_model_id(None)), "cls") == \
        report.parameters


def test_a_tiny_table_gets_no_index_and_says_why(ingested, fresh_copy, monkeypatch, capsys):
    from embedstore.search.index import NoIndex, build_index, index_for

    store = Store.open(fresh_copy)
    report = build_index(store)
    assert isinstance(report, NoIndex) and "no index was built" in report.reason
    assert index_for(store, report.table, "cls") is None
    code, out, err = run_cli_here(["index", str(fresh_copy)], monkeypatch, capsys)
    assert code == 0 and "exact search is as fast" in out and err == ""
