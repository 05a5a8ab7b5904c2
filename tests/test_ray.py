"""Ingest on Ray (a local cluster): the same rows as the local executor, exactly one row per item
when an embedding actor or the whole driver is killed, and few table versions whatever the batch size."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from embedstore import samples  # noqa: E402
from embedstore.pipeline.ingest import ingest  # noqa: E402
from embedstore.pipeline.on_ray import FAULT_EXIT_AFTER_UNITS, FAULT_MARKER  # noqa: E402
from embedstore.store import MANIFEST, Store  # noqa: E402
from embedstore.store.patches import read_patches  # noqa: E402
from embedstore.store.schema import slices_table_name  # noqa: E402
from tests.support import TEST_IMAGE_SIZE, ingest_options, slice_rows, slices_table  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts Ray

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    yield
    ray.shutdown()


def write_pngs(directory: Path, n: int, size: int = 32) -> Path:
    for index in range(n):
        samples.write_png(directory / f"{index // 100:02d}" / f"img{index:04d}.png", samples.phantom(size, index))
    return directory


LAST_BLOCK = 11  # ViT-S/14 keeps the patch tokens of its last block by default


def sorted_slices(store_path: Path) -> dict[str, list]:
    """The model's slice rows (with their items' columns) by key, as columns."""
    rows = sorted(slice_rows(store_path), key=lambda row: row["key"])
    return {column: [row[column] for row in rows] for column in rows[0]}


def assert_one_valid_row_per_item(store_path: Path, expected: int) -> None:
    """Every model of the store holds exactly one row per item, and every row's patches exist."""
    store = Store.open(store_path)
    items = store.rows("items", columns=["key"]).column("key").to_pylist()
    assert len(items) == len(set(items)) == expected
    for model_id, spec in store.specs().items():
        rows = store.rows(slices_table_name(model_id), columns=["key", "patch_shard", "patch_offset"]).to_pylist()
        assert len(rows) == len({r["key"] for r in rows}) == expected, model_id
        assert set(items) == {r["key"] for r in rows}
        by_shard: dict[str, list[int]] = {}
        for row in rows:
            by_shard.setdefault(row["patch_shard"], []).append(row["patch_offset"])
        for shard, offsets in by_shard.items():  # every committed row's patches exist
            patches = read_patches(store.patches_root, shard, offsets, LAST_BLOCK)
            assert patches.shape == (len(offsets), (TEST_IMAGE_SIZE // 14) ** 2, spec.embed_dim)
            assert np.isfinite(patches.astype(np.float32)).all() and np.abs(patches.astype(np.float32)).sum() > 0


def test_ray_gives_the_rows_of_the_local_executor(mixed_archive, ingested, tmp_path):
    summary = ingest([mixed_archive.root], tmp_path / "ray", ingest_options(executor="ray", unit_slices=5))
    assert summary.n_embedded == mixed_archive.n_slices and summary.n_failed == 0
    assert summary.model_ids == ingested.summary.model_ids
    local, on_ray = sorted_slices(ingested.path), sorted_slices(tmp_path / "ray")
    assert local["key"] == on_ray["key"]
    for column in ("cls", "patch_mean", "cls_b8", "cls_b11"):
        np.testing.assert_allclose(np.stack(on_ray[column]), np.stack(local[column]), atol=1e-5)
    for column in ("series_uid", "slice_index", "slice_position", "intensity", "frame", "rows", "cols"):
        assert on_ray[column] == local[column]
    assert len(set(on_ray["patch_shard"])) > 1  # several units, each its own shard
    for row in (0, len(local["key"]) - 1):
        np.testing.assert_allclose(
            read_patches(Store.open(tmp_path / "ray").patches_root, on_ray["patch_shard"][row],
                         [on_ray["patch_offset"][row]], LAST_BLOCK),
            read_patches(Store.open(ingested.path).patches_root, local["patch_shard"][row],
                         [local["patch_offset"][row]], LAST_BLOCK),
            atol=2e-3)


def test_decode_tasks_feeding_a_gpu_actor_give_the_same_rows(mixed_archive, ingested, tmp_path):
    """The GPU layout (decode tasks on CPUs, one actor per GPU), on a logical GPU of this machine."""
    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        summary = ingest([mixed_archive.root], tmp_path / "gpu", ingest_options(executor="ray", unit_slices=5))
    finally:
        ray.shutdown()
    assert summary.n_embedded == mixed_archive.n_slices
    local, on_ray = sorted_slices(ingested.path), sorted_slices(tmp_path / "gpu")
    assert local["key"] == on_ray["key"]
    np.testing.assert_allclose(np.stack(on_ray["cls"]), np.stack(local["cls"]), atol=1e-5)


def test_a_killed_embedding_actor_still_gives_one_row_per_item(mixed_archive, tmp_path, monkeypatch):
    marker = tmp_path / "actor-was-killed"
    monkeypatch.setenv(FAULT_EXIT_AFTER_UNITS, "1")
    monkeypatch.setenv(FAULT_MARKER, str(marker))
    summary = ingest([mixed_archive.root], tmp_path / "store", ingest_options(executor="ray", unit_slices=4))
    assert marker.exists()  # the actor did die mid-run
    assert summary.n_embedded == mixed_archive.n_slices and summary.n_failed == 0
    assert_one_valid_row_per_item(tmp_path / "store", mixed_archive.n_slices)


def test_table_versions_stay_few_whatever_the_batch_size(tmp_path):
    source = write_pngs(tmp_path / "src", 1000)
    versions = {}
    for batch_size in (8, 64):
        store_path = tmp_path / f"store{batch_size}"
        summary = ingest([source], store_path, ingest_options(executor="ray", batch_size=batch_size,
                                                              keep_patches=False))
        assert summary.n_embedded == 1000
        store = Store.open(store_path)
        versions[batch_size] = [len(store.table(name).list_versions()) for name in ("items", slices_table(store))]
    assert versions[8] == versions[64] and max(versions[8]) <= 3, versions


KILLED_DRIVER = """
import sys
sys.path.insert(0, {repo!r})
from tests.support import ingest_options
from embedstore.pipeline.ingest import ingest
ingest([{source!r}], {store!r}, ingest_options(models={models!r}, executor="ray", unit_slices=8, batch_size=8,
                                               commit_rows=8))
"""
KILLED_MODELS = ("dinov2_vits14", "dinov2_vitb14")


def committed_rows(store_path: Path) -> int:
    """Slices every model of a store (that may not exist yet) has committed so far: a commit adds
    each model's rows in turn, so the models may differ for a moment."""
    if not (store_path / MANIFEST).exists():
        return 0
    store = Store.open(store_path)
    return min((store.table(slices_table_name(m)).count_rows() for m in store.specs()), default=0)


def test_a_driver_killed_with_sigkill_resumes_without_duplicates(tmp_path):
    source = write_pngs(tmp_path / "src", 400)
    store_path = tmp_path / "store"
    script = KILLED_DRIVER.format(repo=str(REPO), source=str(source), store=str(store_path),
                                  models=KILLED_MODELS)
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        committed = 0
        deadline = time.monotonic() + 240
        while committed == 0 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            committed = committed_rows(store_path)
        assert 0 < committed < 400, f"the driver was to be killed mid-run, it had committed {committed} rows"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        driver.wait()
    summary = ingest([source], store_path, ingest_options(models=KILLED_MODELS, executor="ray"))
    assert summary.n_skipped >= committed and summary.n_embedded + summary.n_skipped == 400
    assert len(Store.open(store_path).specs()) == 2
    assert_one_valid_row_per_item(store_path, 400)
    store = Store.open(store_path)
    report = store.vacuum()
    assert store.orphan_shards() == [] and report["orphan_shards_removed"] >= 0
    assert_one_valid_row_per_item(store_path, 400)  # vacuum removed nothing a row needs


def test_vacuum_removes_orphan_shards_and_info_reports_them(ingested, fresh_copy):
    from embedstore.store.info import store_info

    store = Store.open(fresh_copy)
    shard = next(p for p in (store.patches_root).rglob("*") if p.is_dir() and p.parent.parent == store.patches_root)
    orphan = shard.with_name(shard.name + "-orphan")
    import shutil

    shutil.copytree(shard, orphan)
    assert store_info(store)["orphan_shards"] == 1
    with store.ingest_lock():  # an ingest is running: vacuum must not touch its fresh shards
        with pytest.raises(Exception, match="busy"):
            store.vacuum()
    assert store.vacuum()["orphan_shards_removed"] == 1
    assert not orphan.exists() and shard.exists()
    assert store_info(store)["orphan_shards"] == 0
