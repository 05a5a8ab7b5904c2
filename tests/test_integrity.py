"""Data and privacy under faults: the patient key cannot change silently, concurrent ingests give one
row per item, and `embedstore check` finds (and `--repair` mends) damaged shards, chunks and data files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedstore.errors import StoreDamagedError, UsageError
from embedstore.store import COMMIT_LOCK, MANIFEST, Store
from embedstore.store.privacy import KEY_ENV, KEY_FILE, PatientKeyWarning, key_fingerprint, patient_id_key
from embedstore.store.schema import series_table_name, slices_table_name
from tests.support import TEST_IMAGE_SIZE, ingest_options, make_mixed_archive, run_cli_here, write_modality_labels

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 600




def only_model(store: Store) -> str:
    return store.resolve_model_id(None)


# ------------------------------------------------------------------------------------ patient key

@pytest.fixture
def ct_folder(mixed_archive) -> Path:
    return mixed_archive.ct_paths[0].parent  # six CT files of one patient


def ingest_ct(folder: Path, store_path: Path):
    from embedstore.pipeline.ingest import ingest

    return ingest([folder], store_path, ingest_options())


def test_the_key_fingerprint_is_recorded_and_a_deleted_key_file_is_refused(ct_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    store_path = tmp_path / "store"
    ingest_ct(ct_folder, store_path)
    key = (store_path / KEY_FILE).read_text().strip()
    manifest = json.loads((store_path / MANIFEST).read_text())
    assert manifest["patient_id_key"] == key_fingerprint(key.encode())
    assert key not in json.dumps(manifest)
    before = Store.open(store_path).rows("items").num_rows

    (store_path / KEY_FILE).unlink()
    with pytest.raises(UsageError, match=f"put back {KEY_FILE}, or set {KEY_ENV}"):
        ingest_ct(ct_folder, store_path)
    assert not (store_path / KEY_FILE).exists()  # no new key was made
    command = ["ingest", str(ct_folder), "--store", str(store_path), "--weights", "random", "--image-size",
               str(TEST_IMAGE_SIZE), "--workers", "0", "--no-progress"]
    code, _, err = run_cli_here(command, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and KEY_FILE in err and "Traceback" not in err
    assert Store.open(store_path).rows("items").num_rows == before

    (store_path / KEY_FILE).write_text(key + "\n")  # put back: ingests work again, with the same hashes
    summary = ingest_ct(ct_folder, store_path)
    assert summary.n_skipped == before


def test_a_store_made_with_the_key_in_the_environment_refuses_ingests_without_it(ct_folder, tmp_path, monkeypatch):
    store_path = tmp_path / "store"
    monkeypatch.setenv(KEY_ENV, "k" * 40)
    ingest_ct(ct_folder, store_path)
    assert not (store_path / KEY_FILE).exists()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UsageError, match=KEY_ENV):
        ingest_ct(ct_folder, store_path)
    assert not (store_path / KEY_FILE).exists()
    monkeypatch.setenv(KEY_ENV, "x" * 40)
    with pytest.raises(UsageError, match="is not the key store"):
        ingest_ct(ct_folder, store_path)
    monkeypatch.setenv(KEY_ENV, "k" * 40)
    assert ingest_ct(ct_folder, store_path).n_skipped == 6


def test_a_store_without_a_fingerprint_records_it_at_its_first_ingest(ct_folder, tmp_path, monkeypatch):
    """Stores migrated from format 2 have none; one that holds hashed IDs never gets a new key."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    store_path = tmp_path / "store"
    ingest_ct(ct_folder, store_path)
    manifest_path = store_path / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    fingerprint = manifest.pop("patient_id_key")
    manifest_path.write_text(json.dumps(manifest))
    ingest_ct(ct_folder, store_path)
    assert json.loads(manifest_path.read_text())["patient_id_key"] == fingerprint
    manifest_path.write_text(json.dumps(manifest))
    (store_path / KEY_FILE).unlink()
    with pytest.raises(UsageError, match="put back"):
        ingest_ct(ct_folder, store_path)


def test_a_short_key_warns_on_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "short")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert patient_id_key(tmp_path, None, may_make=True) == b"short"
    (warning,) = [w for w in caught if issubclass(w.category, PatientKeyWarning)]
    text = warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno)
    assert text.count("\n") == 1 and "5 bytes" in text and "at least 32" in text
    monkeypatch.setenv(KEY_ENV, "k" * 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatientKeyWarning)
        patient_id_key(tmp_path, None, may_make=True)


# ------------------------------------------------------------------------------------ concurrency

INGEST_SCRIPT = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.support import ingest_options
from embedstore.pipeline import runner
from embedstore.pipeline.ingest import ingest

source, store, me, other, go = sys.argv[1:6]
flush, flushes = runner.RowCommitter.flush, []


def flush_together(committer):
    flushes.append(None)  # the two processes meet before each commit, so that their commits coincide
    Path(f"{{me}}.{{len(flushes)}}").touch()
    deadline = time.time() + 20
    while not Path(f"{{other}}.{{len(flushes)}}").exists() and time.time() < deadline:
        time.sleep(0.001)
    flush(committer)


runner.RowCommitter.flush = flush_together
Path(me).touch()
while not Path(go).exists():  # both processes start the ingest together
    time.sleep(0.01)
summary = ingest([source], store, ingest_options(batch_size=2, unit_slices=8, commit_rows=1))
print(json.dumps({{"embedded": summary.embedded_by_model, "committed": summary.committed_by_model,
                  "n_embedded": summary.n_embedded}}))
"""


def ingest_twice_at_once(source: Path, store_path: Path, scratch: Path) -> list[subprocess.CompletedProcess]:
    """Two processes ingesting `source` into `store_path`, started together and meeting before each
    commit (one per unit), so that their commits of the same keys coincide."""
    script = INGEST_SCRIPT.format(repo=str(REPO))
    go, marks = scratch / "go", [scratch / "first", scratch / "second"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen([sys.executable, "-c", script, str(source), str(store_path), str(me), str(other),
                                   str(go)], env=env, cwd=REPO, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for me, other in (marks, marks[::-1])]
    while not all(mark.exists() for mark in marks):
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        time.sleep(0.05)
    go.touch()
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def assert_one_row_per_item(store_path: Path, n_items: int) -> None:
    store = Store.open(store_path)
    model_id = only_model(store)
    for table in ("items", slices_table_name(model_id)):
        keys = store.rows(table, columns=["key"]).column("key").to_pylist()
        assert len(keys) == len(set(keys)) == n_items, table
    items = store.rows("items", columns=["series_uid"]).column("series_uid").to_pylist()
    per_series = {uid: items.count(uid) for uid in set(items)}
    for table, key in (("series", "series_uid"), (series_table_name(model_id), "key")):
        rows = store.rows(table, columns=[key, "n_slices"]).to_pylist()
        assert len(rows) == len(per_series), table
        assert {row[key]: row["n_slices"] for row in rows} == per_series, table


@pytest.mark.slow
@pytest.mark.parametrize("existing", [True, False], ids=["existing-store", "new-store"])
def test_two_ingests_of_one_archive_at_once_give_one_row_per_item(mixed_archive, tmp_path, existing):
    from embedstore.pipeline.ingest import ingest

    archive = tmp_path / "archive"
    shutil.copytree(mixed_archive.root, archive)
    (archive / "empty.dcm").touch()  # a failure both runs record: one row of it must stay
    store_path = tmp_path / "store"
    if existing:
        ingest([archive / "png"], store_path, ingest_options())
    results = ingest_twice_at_once(archive, store_path, tmp_path)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert_one_row_per_item(store_path, mixed_archive.n_slices)
    failures = Store.open(store_path).rows("failures").to_pylist()
    assert [row["reason"] for row in failures] == ["empty_file"]
    # Each summary says what its process embedded and what it committed: the commits add up to the
    # rows, and nothing is left for vacuum (the shards of rows the other process committed first go).
    summaries = [json.loads(result.stdout.strip().splitlines()[-1]) for result in results]
    model_id = only_model(Store.open(store_path))
    for summary in summaries:
        assert summary["embedded"][model_id] == summary["n_embedded"] >= summary["committed"][model_id]
    existing_rows = 3 if existing else 0  # the PNGs ingested first
    assert sum(s["committed"][model_id] for s in summaries) == mixed_archive.n_slices - existing_rows
    assert Store.open(store_path).orphan_shards() == []


def test_a_directory_being_made_into_a_store_is_waited_for_not_refused(tmp_path):
    from embedstore.store import check_store_path

    path = tmp_path / "store"
    path.mkdir()
    (path / COMMIT_LOCK).touch()  # another process's creation, under way or cut short
    (path / "tables").mkdir()
    (path / ".embedstore-probe-x1y2").mkdir()  # a third process checking it can write here
    assert Store.open(path, create=True).manifest["format_version"] == 3
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="non-empty directory"):
        check_store_path(other, create=True)


def duplicate_rows(store: Store, table: str, n: int) -> None:
    """What two unlocked ingests left: copies of rows already there."""
    store.table(table).add(store.rows(table).slice(0, n))


@pytest.mark.parametrize("mend", ["vacuum", "check --repair"])
def test_duplicate_rows_of_older_stores_are_removed(fresh_copy, ingested, mend, monkeypatch, capsys):
    from embedstore.store.series import refresh_series

    store = Store.open(fresh_copy)
    model_id = only_model(store)
    for table in ("items", slices_table_name(model_id), "series", series_table_name(model_id)):
        duplicate_rows(store, table, 3)
    refresh_series(store, [model_id])  # doubled n_slices, as the issue saw
    code, out, _ = run_cli_here(["check", str(fresh_copy)], monkeypatch, capsys)
    assert code == 1 and out.count("duplicate_key") == 4
    code, out, _ = run_cli_here(mend.split() + [str(fresh_copy)], monkeypatch, capsys)
    assert code == 0
    assert ("removed 12 duplicate rows" if mend == "vacuum" else "repaired") in out, out
    assert_one_row_per_item(fresh_copy, ingested.archive.n_slices)
    assert run_cli_here(["check", str(fresh_copy)], monkeypatch, capsys)[0] == 0


# ------------------------------------------------------------------------------------ damage



def knn_metrics(store_path: Path, labels: Path) -> dict:
    from embedstore.eval.evaluate import knn_evaluation
    from embedstore.eval.options import KnnOptions

    return knn_evaluation(Store.open(store_path), labels, KnnOptions(feature="patch_mean", k=(1, 3), search="exact")).metrics


def flip_vector_bytes(store: Store, model_id: str, row: dict, count: int = 4000) -> Path:
    """Flip `count` bytes of the data file of the model's slices table that holds this row's `cls`
    vector, from where it is stored: the numbers change, the file still reads."""
    vector = np.asarray(row["cls"], dtype="<f4").tobytes()
    files = (store.path / "tables" / f"{slices_table_name(model_id)}.lance" / "data").glob("*.lance")
    (data_file,) = [f for f in files if vector in f.read_bytes()]
    data = bytearray(data_file.read_bytes())
    start = data.find(vector)
    assert start >= 0
    for index in range(start, min(start + count, len(data))):
        data[index] ^= 0xFF
    data_file.write_bytes(bytes(data))
    return data_file


def test_check_finds_a_lost_shard_a_lost_chunk_and_flipped_bytes_and_repair_then_rerun_restores_the_store(
        tmp_path, monkeypatch, capsys):
    from embedstore.pipeline.ingest import ingest
    from embedstore.store import patches

    archive = make_mixed_archive(tmp_path / "archive")
    monkeypatch.setattr(patches, "CHUNK_BYTES", 2 * 16 * 384 * 2)  # two rows per chunk: a chunk is part of a shard
    options = ingest_options(batch_size=4, unit_slices=8)
    store_path = tmp_path / "store"
    ingest([archive.root], store_path, options)
    labels = write_modality_labels(tmp_path / "labels.csv", store_path)
    before = knn_metrics(store_path, labels)
    assert run_cli_here(["check", str(store_path)], monkeypatch, capsys)[0] == 0

    store = Store.open(store_path)
    model_id = only_model(store)
    rows = sorted(store.rows(slices_table_name(model_id)).to_pylist(),
                  key=lambda row: (row["patch_shard"], row["patch_offset"]))
    shards = sorted({row["patch_shard"] for row in rows})
    assert len(shards) >= 2
    lost, chunked = shards[0], shards[1]
    shutil.rmtree(store.patches_root / lost)  # (a) a deleted shard
    (store.patches_root / chunked / "b11" / "c" / "0" / "0" / "0").unlink()  # (b) a deleted chunk: rows 0-1
    flipped = next(row for row in rows if row["patch_shard"] == chunked and row["patch_offset"] >= 4)
    flip_vector_bytes(store, model_id, flipped)  # (c) flipped bytes in a data file

    for shard, offset in ((lost, 0), (chunked, 1)):  # readers name `embedstore check` instead of reading zeros
        with pytest.raises(StoreDamagedError, match="embedstore check"):
            patches.read_patches(store.patches_root, shard, [offset], 11)

    code, out, _ = run_cli_here(["check", str(store_path), "--json"], monkeypatch, capsys)
    report = json.loads(out)
    assert code == 1 and not report["clean"]
    found = {(f["kind"], f["where"]) for f in report["findings"]}
    assert found == {("missing_shard", lost), ("missing_chunk", chunked), ("bad_digest", slices_table_name(model_id))}

    code, out, _ = run_cli_here(["check", str(store_path), "--repair"], monkeypatch, capsys)
    assert code == 0 and "repaired" in out, out
    dropped = len(rows) - Store.open(store_path).rows(slices_table_name(model_id)).num_rows
    assert dropped >= sum(row["patch_shard"] == lost for row in rows) + 2 + 1
    summary = ingest([archive.root], store_path, options)
    assert summary.n_embedded == dropped
    assert run_cli_here(["check", str(store_path)], monkeypatch, capsys)[0] == 0
    assert knn_metrics(store_path, labels) == before


def test_a_truncated_manifest_or_data_file_is_one_line_naming_check(fresh_copy, monkeypatch, capsys):
    manifest = fresh_copy / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text[:len(text) // 2])
    code, out, err = run_cli_here(["info", str(fresh_copy)], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and MANIFEST in err and "embedstore check" in err
    code, out, _ = run_cli_here(["check", str(fresh_copy)], monkeypatch, capsys)
    assert code == 1 and "damaged_manifest" in out
    assert run_cli_here(["check", str(fresh_copy), "--repair"], monkeypatch, capsys)[0] == 0
    assert Store.open(fresh_copy).manifest["patient_id_key"] == key_fingerprint(
        (fresh_copy / KEY_FILE).read_text().strip().encode())

    data_file = next((fresh_copy / "tables" / "items.lance" / "data").glob("*.lance"))
    data_file.write_bytes(data_file.read_bytes()[:200])
    code, out, err = run_cli_here(["info", str(fresh_copy)], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and "items.lance" in err and "embedstore check" in err
    assert "Traceback" not in err
    code, out, _ = run_cli_here(["check", str(fresh_copy)], monkeypatch, capsys)
    assert code == 1 and "unreadable_table: items" in out
    assert run_cli_here(["check", str(fresh_copy), "--repair"], monkeypatch, capsys)[0] == 0
    assert Store.open(fresh_copy).rows("items").num_rows == 0  # every vector row went with it: a rerun re-embeds


def test_rows_are_committed_with_their_digest(ingested):
    from embedstore.store.digests import row_digests

    store = Store.open(ingested.path)
    table = store.rows(slices_table_name(only_model(store)))
    columns = [name for name in table.column_names if name != "row_digest"]
    assert table.column("row_digest").to_pylist() == row_digests(table, columns).to_pylist()
    assert pa.types.is_string(table.schema.field("row_digest").type)


def test_a_slices_table_from_before_row_digests_gains_the_column_at_the_next_ingest(fresh_copy, ingested, tmp_path):
    from embedstore import samples
    from embedstore.pipeline.ingest import ingest
    from embedstore.store.check import check_store

    store = Store.open(fresh_copy)
    table = slices_table_name(only_model(store))
    store.table(table).drop_columns(["row_digest"])  # as `embedstore migrate` leaves a format-2 model's table
    png = samples.write_png(tmp_path / "new" / "x.png", samples.phantom(48, 9), bits=8)
    assert ingest([png.parent], fresh_copy, ingest_options(batch_size=4)).n_embedded == 1
    digests = Store.open(fresh_copy).rows(table).column("row_digest").to_pylist()
    assert digests.count(None) == ingested.archive.n_slices and len(digests) == ingested.archive.n_slices + 1
    report = check_store(fresh_copy)
    assert report.clean and any("written before row digests" in note for note in report.notes)
