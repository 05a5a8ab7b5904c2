"""`embedstore bench`: a suite of two models x two datasets x three protocols over a real store (two
random-weight ViTs, 56 px): a rerun computes nothing and writes the same numbers, a changed labels file or
embedstore version invalidates exactly the cells it affects, a killed suite completes only what is
missing, and the leaderboard holds every model with intervals and a paired comparison."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedstore import samples
from embedstore.pipeline.ingest import ingest
from tests.support import ingest_options, run_cli_here

pytestmark = pytest.mark.slow  # every test here runs a suite

REPO = Path(__file__).resolve().parents[1]

SUITE = """
name = "test-suite"
baseline = "first"
seeds = [0]

[datasets.bright]
store = "store"
labels = "bright.csv"
split_by = "patient"

[datasets.copy]
store = "store"
labels = "copy.csv"
split_by = "patient"

[models]
first = "dinov2_vits14-random"
second = "dinov2_vits14_reg-random"

[protocols.knn]
feature = "patch_mean"
k = [3, 5]

[protocols.linear]
c_grid = [0.01, 1.0]

[protocols.fewshot]
feature = "patch_mean"
shots = [1, 2]
tries = 2
"""


@pytest.fixture(scope="module")
def suite_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    labels = samples.write_stripes_task(root / "task", 40, label_by="brightness")
    for model, seed in (("dinov2_vits14", 0), ("dinov2_vits14_reg", 1)):
        ingest([root / "task" / "images"], root / "store", ingest_options(models=(model,), seed=seed))
    text = labels.read_text().replace("images/", str(root / "task" / "images") + "/")
    (root / "bright.csv").write_text(text)
    (root / "copy.csv").write_text(text)
    (root / "suite.toml").write_text(SUITE)
    return root


def bench(folder: Path, out: Path, monkeypatch, capsys, *options: str) -> str:
    code, stdout, stderr = run_cli_here(["bench", str(folder / "suite.toml"), "--out", str(out), *options],
                                        monkeypatch, capsys)
    assert code == 0, stderr
    return stdout


def test_rerun_computes_nothing_and_writes_the_same_numbers(suite_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert "12 cells, 0 cached, 12 computed" in bench(suite_folder, out, monkeypatch, capsys, "--jobs", "2")
    first = {name: (out / name).read_bytes() for name in ("leaderboard.md", "leaderboard.csv", "paired.csv")}
    assert "12 cells, 12 cached, 0 computed" in bench(suite_folder, out, monkeypatch, capsys)
    assert first == {name: (out / name).read_bytes() for name in first}

    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert {(row["dataset"], row["protocol"], row["model"]) for row in rows} == {
        (d, p, m) for d in ("bright", "copy") for p in ("knn", "linear", "fewshot") for m in ("first", "second")}
    linear = [row for row in rows if row["protocol"] == "linear"]
    assert all(row["ci_low"] and float(row["ci_low"]) <= float(row["mean"]) <= float(row["ci_high"]) for row in linear)
    assert any(row["best"] == "True" for row in linear)
    paired = list(csv.DictReader(open(out / "paired.csv")))
    assert {(row["dataset"], row["protocol"], row["model"]) for row in paired} == {
        (d, p, "second") for d in ("bright", "copy") for p in ("knn", "linear")}

    import pyarrow.parquet as pq

    results = pq.read_table(out / "results.parquet").to_pylist()
    assert {row["model_id"].split("-")[0] for row in results} == {"dinov2_vits14", "dinov2_vits14_reg"}
    for name in ("heatmap", "fewshot-bright", "fewshot-copy"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.svg").is_file()

    # One report: the store, its ingest runs, and the suite's leaderboard and plots.
    code, stdout, stderr = run_cli_here(["report", str(suite_folder / "store"), "--suite", str(out), "--out",
                                         str(tmp_path / "report")], monkeypatch, capsys)
    assert code == 0, stderr
    page = (tmp_path / "report" / "report.html").read_text()
    for text in ("Ingest throughput", "slices/s", "No ANN index built", "Benchmark suite", "vits14_reg-random-s1",
                 "Against the baseline (first)", "<td class=best>"):
        assert text in page, text
    assert page.count("data:image/png;base64,") == 4  # stages, heatmap, two few-shot plots: inline
    markdown = (tmp_path / "report" / "report.md").read_text()
    for name in ("ingest-stages.png", "heatmap.png", "fewshot-bright.png", "fewshot-copy.png"):
        assert f"]({name})" in markdown and (tmp_path / "report" / name).is_file()


def test_a_changed_labels_file_or_version_invalidates_exactly_its_cells(suite_folder, tmp_path, monkeypatch):
    import embedstore.bench.cells as cells_module
    from embedstore.bench.cells import cell_key, cells_of
    from embedstore.bench.suite import read_suite
    from embedstore.store import Store

    def keys() -> dict:
        cells = cells_of(read_suite(suite_folder / "suite.toml"))
        store = Store.open(suite_folder / "store")
        return {(c.dataset.name, c.model, c.protocol, c.seed): cell_key(c, store.spec(c.model_id).to_row()) for c in cells}

    before = keys()
    copy = suite_folder / "copy.csv"
    original = copy.read_bytes()
    try:
        copy.write_bytes(original.replace(b"dark", b"Dark", 1))  # one byte
        changed = keys()
    finally:
        copy.write_bytes(original)
    assert {cell for cell in before if before[cell] != changed[cell]} == {cell for cell in before if cell[0] == "copy"}
    monkeypatch.setattr(cells_module, "__version__", "99.0")
    assert all(before[cell] != key for cell, key in keys().items())


def test_a_killed_suite_completes_only_the_missing_cells(suite_folder, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "embedstore.cli.main", "bench", str(suite_folder / "suite.toml"), "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list((out / "cells").glob("*.json"))) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list((out / "cells").glob("*.json")))
    assert 4 <= done < 12
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"12 cells, {done} cached, {12 - done} computed" in rerun.stdout
    cached = [json.loads(path.read_text()) for path in (out / "cells").glob("*.json")]
    assert len(cached) == 12 and all(record["result"]["provenance"]["embedstore_version"] for record in cached)


def test_bad_suites_exit_2(suite_folder, tmp_path, monkeypatch, capsys):
    for broken, reason in ((SUITE.replace("[protocols.knn]", "[protocols.knm]"), "unknown protocol"),
                           (SUITE.replace('baseline = "first"', 'baseline = "third"'), "baseline"),
                           (SUITE.replace('k = [3, 5]', 'kk = [3, 5]'), "no option 'kk'"),
                           (SUITE.replace('"dinov2_vits14_reg-random"', '"nothing-like-it"'), "second"),
                           ("name = ", "not TOML")):
        (suite_folder / "broken.toml").write_text(broken)
        code, _, stderr = run_cli_here(["bench", str(suite_folder / "broken.toml"), "--out", str(tmp_path / "o")],
                                       monkeypatch, capsys)
        assert code == 2 and reason in stderr and stderr.count("\n") == 1, (reason, stderr)
