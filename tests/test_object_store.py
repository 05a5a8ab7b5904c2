"""A store in S3-compatible object storage (`--store s3://bucket/prefix`), on an S3-protocol server on a
loopback port (moto's server mode, tests/s3server.py): every command answers as it does for a local
store of the same sources, one writer at a time, and a wrong address is one line and exit 2."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow.parquet as pq
import pytest

import embedstore
from embedstore import samples
from embedstore.store import WRITER_LOCK, Store
from embedstore.store import location
from embedstore.store.location import ObjectLock, store_root
from tests.s3server import S3Server, needs_s3_server
from tests.support import ingest_options, run_cli_here, slice_rows, synthetic_store, write_csv

pytestmark = needs_s3_server

BUCKET = "stores"
PATIENT_KEY = "0123456789abcdef" * 4  # an S3 store's patient-ID key comes from the environment


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3store")
    with S3Server(folder / "server") as server, pytest.MonkeyPatch.context() as patch:
        for name, value in {**server.environment, "EMBEDSTORE_PATIENT_ID_KEY": PATIENT_KEY,
                            "EMBEDSTORE_CACHE": str(folder / "cache")}.items():
            patch.setenv(name, value)
        server.make_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory):
    """One archive ingested into a local store and into an S3 store, with the same options."""
    from embedstore.pipeline.ingest import ingest

    folder = tmp_path_factory.mktemp("stores")
    for index in range(2):
        samples.write_ct_series(folder / "archive" / f"series{index}", n_slices=5, size=64, seed=index)
    samples.write_png(folder / "archive" / "chest.png", samples.phantom(64, 2))
    local, remote = folder / "local", f"s3://{BUCKET}/store"
    summaries = [ingest([folder / "archive"], where, ingest_options(header_workers=0)) for where in (local, remote)]
    return local, remote, summaries, folder


def test_an_s3_store_holds_what_a_local_store_holds(stores):
    local, remote, (from_local, from_remote), _ = stores
    assert from_remote.n_embedded == from_local.n_embedded == 11 and from_remote.n_failed == 0
    local_rows = {row["key"]: row for row in slice_rows(local)}
    remote_rows = {row["key"]: row for row in slice_rows(remote)}
    assert set(remote_rows) == set(local_rows)
    for key, row in local_rows.items():
        np.testing.assert_array_equal(remote_rows[key]["patch_mean"], row["patch_mean"])
        assert remote_rows[key]["patient_id"] == row["patient_id"]  # hashed with the same key
    key = sorted(local_rows)[0]
    np.testing.assert_array_equal(embedstore.open(remote).patches(key), embedstore.open(local).patches(key))
    listed = [path.name for path in store_root(remote).iterdir()]
    assert "embedstore.json" in listed and "tables" in listed and "patches" in listed
    assert not any(name.startswith("patient-id.key") for name in listed)  # the key never enters the bucket
    assert sorted(listed) == sorted(path.name for path in local.iterdir()
                                    if path.name not in ("patient-id.key", ".lock", ".commit.lock", "vector-cache"))

    from embedstore.pipeline.ingest import ingest

    again = ingest([stores[3] / "archive"], remote, ingest_options(header_workers=0))
    assert again.n_embedded == 0 and again.catalog["files_read"] == 0
    report = Store.open(remote).vacuum()  # compacts the tables and drops old versions, in the bucket
    assert not report["duplicate_rows_removed"] and report["orphan_shards_removed"] == 0
    assert set(slice_rows(remote)[0]) == set(remote_rows[key]) and len(slice_rows(remote)) == len(local_rows)


def test_every_reading_command_answers_for_an_s3_store_as_for_a_local_one(stores, monkeypatch, capsys, tmp_path):
    local, remote, _, _ = stores
    key = sorted(row["key"] for row in slice_rows(local))[0]
    answers = {}
    for name, store in (("local", str(local)), ("remote", remote)):
        code, info, _ = run_cli_here(["info", store, "--json"], monkeypatch, capsys)
        assert code == 0
        code, checked, _ = run_cli_here(["check", store], monkeypatch, capsys)
        assert code == 0 and "no damage found" in checked
        code, found, _ = run_cli_here(["search", store, "--key", key, "--feature", "patch_mean", "-k", "5", "--json"],
                                      monkeypatch, capsys)
        assert code == 0
        labels = write_csv(tmp_path / "labels.csv", [
            {"path": path, "label": Path(path).parent.name, "split": "test" if index % 3 == 0 else "train",
             "patient_id": path} for index, path in enumerate(sorted(row["path"] for row in slice_rows(local)))
            if path.endswith(".dcm")])
        code, _, err = run_cli_here(["eval", "knn", store, "--labels", str(labels), "--feature", "patch_mean",
                                     "--json", str(tmp_path / f"knn-{name}.json")], monkeypatch, capsys)
        assert code == 0, err
        code, _, _ = run_cli_here(["export", store, str(tmp_path / f"{name}.parquet"), "--format", "parquet",
                                   "--feature", "patch_mean"], monkeypatch, capsys)
        assert code == 0
        info = json.loads(info)
        answers[name] = {
            "info": {**{field: info[field] for field in ("models", "modalities", "series", "orphan_shards")},
                     "tables": {table: rows for table, rows in info["tables"].items() if table != "runs"}},
            "search": [(hit["key"], round(hit["similarity"], 6)) for hit in json.loads(found)["hits"]],
            "knn": json.loads((tmp_path / f"knn-{name}.json").read_text())["metrics"],
            "export": pq.read_table(tmp_path / f"{name}.parquet").sort_by("key")  # less what names its run
            .drop_columns(["run_id", "row_digest", "patch_shard"]).to_pylist(),
            "thumbnail": thumbnail(store, key, tmp_path / f"cache-{name}"),
        }
    assert len(answers["local"]["search"]) == 5
    for part in answers["local"]:
        assert answers["remote"][part] == answers["local"][part], part


def thumbnail(store: str, key: str, cache: Path) -> bytes:
    from fastapi.testclient import TestClient

    from embedstore.serve.app import ServeSettings, create_app

    model_id = Store.open(store).resolve_model_id(None)
    client = TestClient(create_app(ServeSettings(store, cache_folder=cache)))
    answer = client.get(f"/thumbnails/{quote(key, safe='')}.png?model={quote(model_id, safe='')}")
    assert answer.status_code == 200
    return answer.content


def test_indexed_search_on_an_s3_store_finds_what_it_finds_locally(s3, tmp_path, monkeypatch):
    from embedstore.search import index
    from embedstore.search.index import IndexReport, build_index
    from embedstore.search.similar import query_by_key, search

    # the recall the index reports is measured with fewer queries: every one is a request to the server
    monkeypatch.setattr(index, "RECALL_QUERIES", 20)
    monkeypatch.setattr(index, "FILTERED_RECALL_QUERIES", 5)
    results = {}
    for name, where in (("local", tmp_path / "synthetic"), ("remote", f"s3://{BUCKET}/synthetic")):
        store = synthetic_store(where, 400, dim=32)
        assert isinstance(build_index(store, "synthetic", "cls"), IndexReport)
        store = Store.open(where)
        hits = search(store, query_by_key(store, "synthetic:7"), k=10)
        assert hits.plan.uses_index
        results[name] = [(hit.key, round(hit.similarity, 5)) for hit in hits]
    assert results["remote"] == results["local"] and len(results["local"]) == 10


def test_an_s3_store_takes_one_writer_at_a_time(stores, monkeypatch, capsys):
    _, remote, _, folder = stores
    running = ObjectLock(store_root(remote) / WRITER_LOCK)
    assert running.acquire(wait=False)
    try:
        assert Store.open(remote).ingest_running()
        code, out, err = run_cli_here(["ingest", str(folder / "archive"), "--store", remote, "--weights", "random",
                                       "--image-size", "56"], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert "is busy" in err and "one writer at a time" in err and f"process {running.token['pid']}" in err
        code, _, err = run_cli_here(["vacuum", remote], monkeypatch, capsys)
        assert code == 2 and "is busy" in err
    finally:
        running.release()
    assert not Store.open(remote).ingest_running()


def test_a_dead_writers_lock_is_taken_over_once(s3, monkeypatch):
    # S3 gives Last-Modified to the second, so a lock looks up to 1 s older than it is: a margin of 3 s
    # keeps "still fresh" true on a loaded machine.
    monkeypatch.setattr(location, "STALE_AFTER_S", 3.0)
    path = store_root(f"s3://{BUCKET}/locks") / ".commit.lock"
    dead = ObjectLock(path)
    assert dead.acquire(wait=False)
    dead._stop.set()  # its process died: no more heartbeats
    dead._beat.join()
    assert not ObjectLock(path).acquire(wait=False)  # still fresh
    time.sleep(4.5)
    first, second = ObjectLock(path), ObjectLock(path)
    assert first.acquire(wait=False)
    assert not second.acquire(wait=False)  # the takeover is conditional on the stale copy: one waiter wins
    assert first.holder()["id"] == first.token["id"]
    first.release()
    assert second.acquire(wait=False)
    second.release()


@pytest.mark.parametrize("problem", ["no bucket", "no credentials", "no patient key"])
def test_a_wrong_s3_store_is_one_line_and_writes_nothing(problem, stores, monkeypatch, capsys):
    folder = stores[3]
    store = f"s3://{'no-such-bucket' if problem == 'no bucket' else BUCKET}/refused"
    if problem == "no credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    if problem == "no patient key":
        monkeypatch.delenv("EMBEDSTORE_PATIENT_ID_KEY")
    code, _, err = run_cli_here(["ingest", str(folder / "archive"), "--store", store, "--weights", "random",
                                 "--image-size", "56"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert {"no bucket": "the bucket does not exist", "no credentials": "no AWS credentials",
            "no patient key": "EMBEDSTORE_PATIENT_ID_KEY"}[problem] in err
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "embedstore-test")
    if problem != "no bucket":
        assert not store_root(store).exists()
