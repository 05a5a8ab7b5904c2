"""Filtered search stays right when the filter is selective: the plan follows the share of rows the
filter keeps (search/plan.py), says which path ran, and a filter that keeps nothing is no error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from embedstore.search.exact import exact_top_k
from embedstore.search.index import build_index, index_for
from embedstore.search.plan import EXACT_ROWS, PATHS, SearchPlan
from embedstore.search.similar import query_by_matrix, search
from embedstore.store import Store, among
from embedstore.store.series import refresh_series
from embedstore.store.vectors import load_vectors
from tests.support import run_cli_here, synthetic_store

pytestmark = pytest.mark.slow  # every test here builds ANN indexes

N_ROWS = 4000  # 63 partitions of about 63 rows, searched with 20 probes


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A store of 4,000 clustered slices (5 per series, 10 per study) with an index on its slices and
    one on its series, without their flat copies (kept rows are read from the table, as in a store
    indexed before the copies: EXACT_ROWS applies)."""
    from embedstore.store.vector_cache import drop_vector_cache

    path = tmp_path_factory.mktemp("filtered") / "store"
    store = synthetic_store(path, N_ROWS)
    refresh_series(store, [store.resolve_model_id(None)])
    build_index(store)
    build_index(store, level="series")
    drop_vector_cache(store)
    return path


def new_points(store: Store, n: int, level: str = "slice") -> np.ndarray:
    """Query points that are not stored vectors: means of two random stored ones."""
    matrix = load_vectors(store, level=level).matrix
    pairs = np.random.default_rng(5).integers(0, len(matrix), size=(n, 2))
    return matrix[pairs].mean(axis=1)


def probes_for(store: Store, share: float) -> int:
    """The probes the plan must take for a filter keeping `share` of the slices: the measured ones / share."""
    table = next(t for t in store.table_names() if t.startswith("slices-"))
    parameters = index_for(store, table, "cls")
    return min(parameters.num_partitions, math.ceil(parameters.nprobes / share))


def exact_keys(store: Store, point: np.ndarray, where: str, k: int, level: str = "slice") -> list[str]:
    kept = load_vectors(store, level=level, where=where)
    _, top = exact_top_k(point[None], kept.matrix, min(k, len(kept)))
    keys = kept.rows.column("key").to_pylist()
    return [keys[i] for i in top[0]]


@pytest.mark.parametrize("where, kept", [
    ("series_uid = 'series7' AND slice_index < 4", 4),  # 0.1% of the rows
    (among("series_uid", ["series7", "series300"]), 10),  # 0.25%
])
def test_a_selective_filter_returns_exactly_the_exact_neighbours_among_the_kept_rows(indexed, where, kept):
    store = Store.open(indexed)
    for point in new_points(store, 5):
        hits = search(store, query_by_matrix(store, point), k=8, where=where)
        assert hits.plan.name == "exact-filtered" and hits.plan.rows_kept == kept and hits.plan.rows_total == N_ROWS
        assert [hit.key for hit in hits] == exact_keys(store, point, where, 8)


def test_a_filter_keeping_most_rows_raises_the_probes_and_keeps_the_recall(indexed):
    store = Store.open(indexed)
    where = "slice_index >= 1"  # 80% of the rows: more than EXACT_ROWS, so through the index
    assert store.count(next(t for t in store.table_names() if t.startswith("slices-")), where) > EXACT_ROWS
    overlaps = []
    for point in new_points(store, 20):
        hits = search(store, query_by_matrix(store, point), k=10, where=where)
        assert hits.plan.name == f"index+probes {probes_for(store, 0.8)}", hits.plan
        assert all(hit.slice_index >= 1 for hit in hits)
        overlaps.append(len({hit.key for hit in hits} & set(exact_keys(store, point, where, 10))) / 10)
    assert np.mean(overlaps) >= 0.95, overlaps
    unfiltered = search(store, query_by_matrix(store, new_points(store, 1)[0]), k=10)
    assert unfiltered.plan.name == "index" and unfiltered.plan.nprobes == probes_for(store, 1.0)
    assert not unfiltered.plan.filtered


def test_series_and_study_search_follow_the_same_rule(indexed):
    store = Store.open(indexed)
    point = new_points(store, 1, level="series")[0]
    where = among("study_uid", ["study3", "study90", "study250"])  # 6 of 800 series
    hits = search(store, query_by_matrix(store, point), k=4, level="series", where=where)
    assert hits.plan.name == "exact-filtered" and hits.plan.rows_kept == 6 and hits.plan.rows_total == 800
    assert [hit.key for hit in hits] == exact_keys(store, point, where, 4, level="series")
    every = search(store, query_by_matrix(store, point), k=4, level="series", where="n_slices >= 1")
    assert every.plan.name == "exact-filtered" and every.plan.rows_kept == 800  # under EXACT_ROWS: compared each
    assert [hit.key for hit in every] == exact_keys(store, point, "n_slices >= 1", 4, level="series")
    unfiltered = search(store, query_by_matrix(store, point), k=4, level="series")
    assert unfiltered.plan.name == "index" and unfiltered.plan.rows_kept == 800
    studies = search(store, query_by_matrix(store, point), k=5, level="study", where=where)
    assert studies.plan.name == "exact-filtered" and studies.plan.rows_kept == 30  # their slices
    assert {hit.key for hit in studies} == {"study3", "study90", "study250"}


def test_a_filter_that_keeps_nothing_is_no_result_with_a_note_or_an_empty_list_with_the_plan(indexed, monkeypatch,
                                                                                           capsys):
    import embedstore

    store = embedstore.open(indexed)
    key = store.items(columns=["key"])["key"][0].as_py()
    hits = store.search(key=key, where="series_uid = 'no-such-series'")
    assert hits == [] and hits.plan.rows_kept == 0 and hits.plan.rows_total == N_ROWS
    code, stdout, _ = run_cli_here(["search", str(indexed), "--key", key, "--where", "series_uid = 'nothing'",
                                    "--explain"], monkeypatch, capsys)
    assert code == 0
    assert "plan exact-filtered: the filter keeps 0 of 4,000 rows" in stdout
    assert "no stored slices to rank: none matches" in stdout
    code, stdout, _ = run_cli_here(["search", str(indexed), "--key", key, "--where", "slice_index <= 3", "--json"],
                                   monkeypatch, capsys)
    answer = json.loads(stdout)
    probes = probes_for(Store.open(indexed), 0.8)
    assert code == 0 and answer["plan"] == {"path": f"index+probes {probes}", "rows_kept": 3200,
                                            "rows_total": N_ROWS, "nprobes": probes}
    assert len(answer["hits"]) == 10


@pytest.mark.parametrize("path", PATHS)
def test_every_plan_explains_itself_with_only_its_own_fields_set(path):
    # A plan carries the fields of its own path only (candidates on index-regions, probes on the IVF paths).
    fields = {"index": {"nprobes": 20, "index_nprobes": 20}, "index+probes": {"nprobes": 41, "index_nprobes": 20},
              "index-regions": {"candidates": 100, "unindexed": 3}}.get(path, {})
    text = SearchPlan(path, 10, 1_000, True, **fields).explain()
    assert text.startswith(f"plan {path.split('+')[0]}") and "10 of 1,000 rows" in text
    assert ("added since" in text) == (path == "index-regions")


def test_index_reports_the_recall_of_filtered_searches(tmp_path):
    store = synthetic_store(tmp_path / "store", N_ROWS)
    report = build_index(store)
    assert [round(measured["share"], 2) for measured in report.filtered] == [0.1, 0.01]
    assert [measured["plan"] for measured in report.filtered] == ["exact-filtered", "exact-filtered"]
    assert all(measured["recall_at_10"] >= 0.95 for measured in report.filtered), report.filtered
    table = next(t for t in store.table_names() if t.startswith("slices-"))
    assert Store.open(tmp_path / "store").manifest["indexes"][f"{table}.cls"]["filtered"] == report.filtered


def test_the_flat_copy_answers_as_the_table_and_a_damaged_copy_is_found_and_removed(tmp_path):
    from embedstore.models.embedder import Embeddings
    from embedstore.pipeline.runner import item_rows, vector_rows
    from embedstore.sources.records import SliceItem
    from embedstore.store.check import BAD_VECTOR_COPY, check_store
    from embedstore.store.vector_cache import cache_folder, has_vector_cache

    store = synthetic_store(tmp_path / "store", N_ROWS)
    build_index(store)
    table = next(t for t in store.table_names() if t.startswith("slices-"))
    assert has_vector_cache(store, table, "cls")
    # rows added after the index live in a fragment without a copy: read from the table, still found
    point = new_points(store, 1)[0]
    late = [SliceItem(f"late:{i}", f"/archive/late{i}.png", "study-late", "series-late", i, modality="CT", rows=1,
                      cols=1, intensity="minmax") for i in range(3)]
    copies = np.repeat(point[None], 3, axis=0)
    spec = store.spec(store.resolve_model_id(None))
    embeddings = Embeddings(copies, copies, np.zeros((3, 0, spec.embed_dim), np.float32), None)
    store.insert_new("items", item_rows(late, "run"))
    store.insert_new(table, vector_rows(spec, late, [embeddings], None, [None] * 3, "run"))
    where = among("series_uid", ["series7", "series-late"])
    copied = search(Store.open(tmp_path / "store"), query_by_matrix(store, point), k=6, where=where)
    keys, expected = [hit.key for hit in copied], exact_keys(store, point, where, 6)
    assert copied.plan.copied and set(keys[:3]) == set(expected[:3]) == {"late:0", "late:1", "late:2"}  # 3 ties
    assert keys[3:] == expected[3:]
    # a flipped byte in a copy: check names it, repair removes the copies, searches read the table
    damaged = sorted(cache_folder(store, table, "cls").glob("*.npy"))[0]
    data = bytearray(damaged.read_bytes())
    data[-7] ^= 0xFF
    damaged.write_bytes(bytes(data))
    report = check_store(tmp_path / "store")
    assert [finding.kind for finding in report.findings] == [BAD_VECTOR_COPY]
    assert check_store(tmp_path / "store", repair=True).repaired
    again = search(Store.open(tmp_path / "store"), query_by_matrix(store, point), k=6, where=where)
    assert not again.plan.copied and [hit.key for hit in again][3:] == keys[3:]
