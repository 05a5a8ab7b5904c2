"""Intensity mapping and resize on the model's device (`--preprocess-on device`: the decode workers
only decode) store the same vectors as in the decode workers, for every kind of input: CT (one window
and three), MR percentiles, X-ray VOI windows stored MONOCHROME1 and MONOCHROME2, RGB rasters; files of
several sizes that batches mix and split. On the CPU both run the same code in another order."""

from __future__ import annotations

import numpy as np
import pytest

from embedstore import samples
from embedstore.errors import UsageError
from embedstore.pipeline.ingest import ingest
from embedstore.store import Store
from embedstore.store.schema import slices_table_name
from tests.support import ingest_options

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
    runs = {}
    for placement, workers in (("workers", 0), ("device", 1)):  # a worker process: the native slices travel
        options = ingest_options(window=window, preprocess_on=placement, workers=workers, batch_size=BATCH)
        summary = ingest([archive], tmp_path / placement, options)
        assert summary.n_failed == 0 and summary.n_embedded == 16
        runs[placement] = stored(tmp_path / placement)
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
