"""`embedstore demo` runs to the end on a machine without network access, says it uses random weights,
and writes nothing outside the directory it is given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedstore.store import Store
from embedstore.store.schema import slices_table_name

pytestmark = pytest.mark.slow  # runs the whole demo: ingest, index, evaluations, a report


def test_demo_offline_runs_to_the_end(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-cache"), COLUMNS="200")
    command = [str(Path(sys.executable).parent / "embedstore"), "demo", "--store", "demo-store"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RANDOM weights" in result.stdout
    assert "nearest slices by patch_mean" in result.stdout
    assert {p.name for p in tmp_path.iterdir()} - {"hf-cache"} == {"demo-store"}  # nothing beside DIR
    assert sorted(p.name for p in (tmp_path / "demo-store").iterdir()) == \
        ["archive", "dataset.json", "labels.csv", "masks", "masks.csv", "store"]
    store = Store.open(tmp_path / "demo-store" / "store")
    (model_id,) = store.specs()
    assert model_id.startswith("dinov2_vits14-random-")
    slices = store.rows(slices_table_name(model_id), columns=["modality", "path"])
    assert slices.num_rows == 37  # 2 pydicom files + 12 CT + 6 MR frames + 6 PNGs + 1 DX + 10 NIfTI slices
    assert store.table("items").count_rows() == 37
    assert store.rows("failures").num_rows == 0
    neighbour_lines = [line for line in result.stdout.splitlines() if "demo-store/archive/" in line]
    assert len(neighbour_lines) >= 5  # the five nearest slices are listed with their paths
