"""Intensity mapping and resize on the model's device (`--preprocess-on device`: the decode workers
only decode) store the same vectors as in the decode workers, for every kind of input: CT (one window
and three), MR percentiles, X-ray VOI windows stored MONOCHROME1 and MONOCHROME2, RGB rasters; files of
several sizes that batches mix and split. On the CPU both run the same code in another order."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from embedstore import samples
from embedstore.errors import UsageError
from embedstore.inference.batching import one_batch_ahead
from embedstore.intensity import IntensityConfig
from embedstore.pipeline import handoff
from embedstore.pipeline.decode import DecodePool
from embedstore.pipeline.ingest import ingest
from embedstore.preprocess import DecodeSettings, decode_task
from embedstore.sources.catalog import build_catalog
from embedstore.sources.discover import check_sources, discover
from embedstore.store import Store
from embedstore.store.schema import slices_table_name
from tests.support import TEST_IMAGE_SIZE, ingest_options

BATCH = 5  # smaller than a series: batches split files and mix native sizes


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    rng = np.random.default_rng(0)
    samples.write_ct_series(root / "ct", n_slices=6, size=96, body_part="CHEST")
    samples.write_ct_series(root / "ct-small", n_slices=3, size=64, seed=3, patient_id="PAT-CT2", prefix="SM")
    samples.write_multiframe_mr(root / "mr" / "mr.dcm", n_frames=4, size=80)
    samples.write_xray(root / "dx" / "inverted.dcm", np.clip(rng.normal(0.5, 0.2, (120, 100)), 0, 1),
                       monochrome1=True, window=(2000, 3000))
    samples.write_xray(root / "dx" / "plain.dcm", np.clip(rng.normal(0.5, 0.2, (120, 100)), 0, 1), seed=5)
    from PIL import Image

    (root / "rgb").mkdir()
    Image.fromarray((rng.random((70, 90, 3)) * 255).astype(np.uint8)).save(root / "rgb" / "colour.png")
    return root


def stored(path) -> dict[str, dict]:
    store = Store.open(path)
    (model_id,) = store.specs()
    rows = store.rows(slices_table_name(model_id), columns=["key", "intensity", "cls", "patch_mean"]).to_pylist()
    return {row["key"]: row for row in rows}


@pytest.mark.parametrize("window", ["auto", "multi"])
def test_the_devices_mapping_stores_the_vectors_the_workers_mapping_stores(archive, tmp_path, window):
    runs, directories = {}, handoff_directories()
    for placement, workers in (("workers", 0), ("device", 1)):  # a worker process: the native slices travel
        options = ingest_options(window=window, preprocess_on=placement, workers=workers, batch_size=BATCH)
        summary = ingest([archive], tmp_path / placement, options)
        assert summary.n_failed == 0 and summary.n_embedded == 16
        runs[placement] = stored(tmp_path / placement)
    assert handoff_directories() == directories
    workers, device = runs["workers"], runs["device"]
    assert sorted(workers) == sorted(device)
    labels = {row["intensity"] for row in workers.values()}
    assert {"voi+inverted", "mr:p5-95"} <= labels and any(label.startswith("ct:" if window == "auto" else "multi:")
                                                          for label in labels)
    for key, row in workers.items():
        assert device[key]["intensity"] == row["intensity"]
        for feature in ("cls", "patch_mean"):
            assert np.abs(np.asarray(device[key][feature]) - np.asarray(row[feature])).max() <= 1e-5, (key, feature)


def test_an_unknown_placement_is_a_wrong_request(archive, tmp_path):
    with pytest.raises(UsageError, match="--preprocess-on"):
        ingest([archive], tmp_path / "store", ingest_options(preprocess_on="gpu"))
    assert not (tmp_path / "store").exists()


def handoff_directories() -> set[str]:
    return {path.name for path in handoff.SHARED_MEMORY.glob("embedstore-decoded-*")}


def test_decode_workers_hand_stored_values_through_shared_memory_and_leave_nothing_behind(archive):
    """Native CT slices come back from a worker process as stored (uint16) with their slope and intercept, in
    a mapping of a chunk file already unlinked, equal to what an inline decode reads; the pool's
    directory goes with the pool."""
    settings = DecodeSettings(IntensityConfig(), TEST_IMAGE_SIZE, on_device=True)
    tasks = build_catalog(discover(check_sources([archive / "ct"]))[0], "axial").tasks
    before = handoff_directories()
    with DecodePool(2, settings) as pool:
        results = [result for _, result in pool.decode(tasks)]
        assert len(handoff_directories() - before) == 1
        (directory,) = handoff_directories() - before
        assert not any((handoff.SHARED_MEMORY / directory).iterdir())  # each file unlinked once mapped
    assert handoff_directories() == before
    for task, result in zip(tasks, results):
        stored = result.native.stored
        assert stored.dtype == np.uint16 and isinstance(stored.base, mmap.mmap)
        inline = decode_task(task, settings).native
        assert np.array_equal(stored, inline.stored) and np.array_equal(result.native.rescale, inline.rescale)
        assert result.native.rescale[0].tolist() == [1.0, -1024.0]
        assert np.array_equal(result.native.pixels, inline.pixels)


def test_values_stay_on_the_pipe_when_shared_memory_cannot_take_them(archive, tmp_path):
    settings = DecodeSettings(IntensityConfig(), TEST_IMAGE_SIZE, on_device=True)
    (task, *_) = build_catalog(discover(check_sources([archive / "ct-small"]))[0], "axial").tasks
    results = [decode_task(task, settings)]
    handoff.share_chunk(results, str(tmp_path / "gone"))  # no such directory: nothing written, nothing lost
    assert isinstance(results[0].native.stored, np.ndarray) and not (tmp_path / "gone").exists()
    handoff.share_chunk(results, str(tmp_path))
    assert isinstance(results[0].native.stored, handoff.SharedValues) and len(list(tmp_path.iterdir())) == 1
    handoff.adopt_chunk(results)
    assert np.array_equal(results[0].native.stored, decode_task(task, settings).native.stored)
    assert not list(tmp_path.iterdir())


def test_batches_run_one_ahead_so_the_next_batch_is_mapped_and_written_around_a_forward():
    """The order the runner relies on for overlap on CUDA: batch k+1 taken before batch k's outputs
    are waited for, and launched before the caller writes batch k; every batch once, in order."""
    events, batches = [], iter(range(3))

    def take():
        batch = next(batches, None)
        events.append(f"take {batch}")
        return batch

    def launch(batch):
        events.append(f"launch {batch}")
        return batch

    def collect(batch):
        events.append(f"collect {batch}")
        return batch

    for batch in one_batch_ahead(take, launch, collect):
        events.append(f"write {batch}")
    assert events == ["take 0", "launch 0",
                      "take 1", "collect 0", "launch 1", "write 0",
                      "take 2", "collect 1", "launch 2", "write 1",
                      "take None", "collect 2", "write 2"]
