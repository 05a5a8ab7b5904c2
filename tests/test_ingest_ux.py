"""What a new user trips on (issue 11): codec noise on the terminal, counts that disagree between
the bar, the summary and a rerun, silent phases, and vectors that rank nothing (random weights).

Module-level code defines constants and functions only: decode workers use the "spawn" start
method and may re-import modules.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from embedstore import samples
from tests.support import ingest_options, run_cli_here

FAST = ["--weights", "random", "--image-size", "28", "--workers", "0"]
SUBPROCESS_TIMEOUT_S = 300
# Files of pydicom's test collection whose reading prints: a C codec's lines on a file that is
# embedded, a codec's lines on a file that fails, and a pydicom UserWarning on a file that fails.
NOISY_EMBEDDED = "JPEG-lossy.dcm"  # libjpeg: "Unsupported JPEG data precision 12", then GDCM decodes it
NOISY_FAILING = {"JPEG2000-embedded-sequence-delimiter.dcm": "Invalid number of tiles",
                 "badVR.dcm": "Invalid value for VR IS"}
NOISE = ("UserWarning", "warn_and_log", "Unsupported JPEG", "Invalid number of tiles", "Marker handler",
         "Invalid SOS", "Invalid value for VR")
INDEX_SLICES = 260  # above the 256 rows an index needs


# ----------------------------------------------------------------------------- helpers
def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The installed command in a process of its own: what reaches its descriptors 1 and 2."""
    script = Path(sys.executable).parent / "embedstore"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "embedstore.cli.main"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "250", "NO_COLOR": "1"}
    return subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)




def ct_with_copies(directory: Path, cut_name: str = "Z_cut.dcm") -> None:
    """A 4-slice CT series (files IM*.dcm), a copy of one instance cut in half and an intact copy
    of it (Z_copy.dcm, read after the series)."""
    series = samples.write_ct_series(directory, n_slices=4, size=32)
    data = series[1].read_bytes()
    (directory / cut_name).write_bytes(data[: len(data) // 2])
    shutil.copy(series[1], directory / "Z_copy.dcm")


def counts(summary) -> tuple:
    return summary.n_found, summary.n_failed_slices, summary.n_failed, summary.failures_by_reason, \
        summary.n_duplicates


def failure_rows(store_path: Path) -> list[dict]:
    from embedstore.store import Store

    return Store.open(store_path).rows("failures").to_pylist()


def write_labels(path: Path, store_path: Path) -> Path:
    """Each slice its own patient, labelled volume (DICOM, NIfTI) or plain (PNG); a third of each
    class in test, the rest in train."""
    from embedstore.store import Store

    items = Store.open(store_path).rows("items", columns=["key", "path"]).to_pylist()
    rows, seen = [], {}
    for item in sorted(items, key=lambda row: row["key"]):
        label = "plain" if item["path"].endswith(".png") else "volume"
        seen[label] = seen.get(label, 0) + 1
        rows.append([item["key"], label, "test" if seen[label] % 3 == 0 else "train", item["key"]])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "label", "split", "patient_id"])
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- codec noise
@pytest.mark.slow
def test_codec_output_stays_off_the_terminal_and_is_counted_or_kept_with_the_failure(tmp_path):
    test_files = Path(get_testdata_file("CT_small.dcm")).parent
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("CT_small.dcm", NOISY_EMBEDDED, *NOISY_FAILING):
        shutil.copy(test_files / name, archive / name)

    ran = run_cli(["ingest", str(archive), "--store", str(tmp_path / "store"), "--json",
                   str(tmp_path / "summary.json"), *FAST], cwd=tmp_path)

    assert ran.returncode == 0, ran.stderr[-3000:]
    noise = [line for line in (ran.stdout + ran.stderr).splitlines() if any(word in line for word in NOISE)]
    assert noise == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_embedded"] == 2 and summary["n_warned_files"] == 1
    assert "1 file decoded with codec warnings" in ran.stdout
    messages = {Path(row["path"]).name: row["message"] for row in failure_rows(tmp_path / "store")}
    assert sorted(messages) == sorted(NOISY_FAILING)
    for name, said in NOISY_FAILING.items():
        assert said in messages[name], messages[name]


def test_captured_output_restores_stderr_when_the_read_raises(capfd):
    from embedstore.sources.codec_output import captured_output

    with pytest.raises(ValueError), captured_output() as output:
        os.write(2, b"codec line\n")
        warnings.warn("odd value")
        raise ValueError("bad data")
    os.write(2, b"after\n")
    assert output.lines == ["UserWarning: odd value", "codec line"]
    assert capfd.readouterr().err == "after\n"


# ----------------------------------------------------------------------------- counts, phases
@pytest.mark.parametrize("cut_name", ["A_cut.dcm", "Z_cut.dcm"], ids=["cut-copy-read-first", "cut-copy-read-after"])
def test_a_cut_copy_is_truncated_an_intact_copy_a_duplicate_and_a_rerun_counts_the_same(tmp_path, cut_name):
    from embedstore.pipeline.ingest import ingest

    ct_with_copies(tmp_path / "ct", cut_name)
    store_path = tmp_path / "store"

    first = ingest([tmp_path / "ct"], store_path, ingest_options())
    assert first.n_embedded == 4
    assert {Path(row["path"]).name: row["reason"] for row in failure_rows(store_path)} == \
        {cut_name: "truncated", "Z_copy.dcm": "duplicate_instance"}
    assert (first.n_failed, first.failures_by_reason, first.n_duplicates) == (1, {"truncated": 1}, 1)

    rerun = ingest([tmp_path / "ct"], store_path, ingest_options())
    assert (rerun.n_embedded, rerun.n_skipped) == (0, 4)
    assert counts(rerun) == counts(first)


@pytest.mark.slow
def test_cli_names_each_phase_its_bar_and_summary_agree_and_a_quiet_rerun_counts_the_same(tmp_path):
    ct_with_copies(tmp_path / "archive")
    (tmp_path / "archive" / "notes.dcm").write_text("not an image\n" * 20)
    store = str(tmp_path / "store")

    first = run_cli(["ingest", str(tmp_path / "archive"), "--store", store, "--json", "first.json", *FAST],
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # What is left to embed is no phase of its own: series reach the bar while the catalog is read.
    phases = ["loaded dinov2_vits14 (random weights) in", "note: --weights random",
              "catalog: 7 files, 7 headers to read, 0 unchanged, 0 gone", "embedding"]
    positions = [first.stderr.find(phase) for phase in phases]
    assert -1 not in positions and positions == sorted(positions), first.stderr
    summary = json.loads((tmp_path / "first.json").read_text())
    assert (summary["n_failed"], summary["n_duplicates"]) == (2, 1)  # the cut copy and notes.dcm; the intact copy
    assert summary["failures_by_reason"] == {"not_dicom": 1, "truncated": 1}
    bar = re.findall(r"embedding .* 4/4 [\d.]+ slices/s (\d+) failed, (\d+) dup ", first.stderr)
    assert bar and bar[-1] == ("2", "1"), first.stderr
    bar_lines = [line for line in first.stderr.splitlines() if line.startswith("embedding")]
    assert bar_lines and max(map(len, bar_lines)) <= 80, first.stderr  # the bar fits one 80-column line
    table = " ".join(first.stdout.replace("│", " ").split())
    for said in ("slices found 4", "slices embedded 4", "slices failed 0", "files failed 2", "duplicate files 1",
                 "in all, model loading included"):
        assert said in table, first.stdout
    assert summary["wall_seconds"] > summary["seconds"] > 0  # wall time includes loading the model

    rerun = run_cli(["ingest", str(tmp_path / "archive"), "--store", store, "--json", "rerun.json", "--no-progress",
                     *FAST], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not any(phase in rerun.stderr for phase in phases), rerun.stderr
    assert "patch_mean" in rerun.stdout  # the random-weights note still reaches the user, in the summary
    again = json.loads((tmp_path / "rerun.json").read_text())
    keys = ("n_found", "n_failed_slices", "n_failed", "failures_by_reason", "n_duplicates")
    assert {k: again[k] for k in keys} == {k: summary[k] for k in keys}
    assert again["n_skipped"] == 4 and again["n_embedded"] == 0


def test_linear_probe_reports_each_fit_of_the_c_grid(ingested, tmp_path):
    from embedstore.eval.evaluate import linear_evaluation
    from embedstore.eval.options import LinearOptions
    from embedstore.store import Store

    labels = write_labels(tmp_path / "labels.csv", ingested.path)
    calls = []
    linear_evaluation(Store.open(ingested.path), labels, LinearOptions(feature="patch_mean", c_grid=(0.01, 1.0, 100.0)),
                      progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


# ----------------------------------------------------------------------------- degenerate vectors
def test_degenerate_warning_tells_constant_vectors_from_spread_ones():
    from embedstore.search.degenerate import degenerate_warning

    rng = np.random.default_rng(0)
    constant = np.ones((300, 32)) + rng.normal(scale=1e-7, size=(300, 32))
    assert "degenerate" in degenerate_warning(constant, "cls")
    assert degenerate_warning(np.zeros((50, 32)), "cls")  # all-zero vectors rank nothing either
    assert degenerate_warning(rng.normal(size=(300, 32)), "patch_mean") is None
    assert degenerate_warning(constant[:4], "cls") is None  # too few to tell


def test_random_weights_cls_is_degenerate_and_patch_mean_is_not(ingested):
    from embedstore.search.degenerate import stored_feature_warning
    from embedstore.store import Store

    store = Store.open(ingested.path)
    model_id = store.resolve_model_id(None)
    for level in ("slice", "series"):
        assert "cls vectors are degenerate" in stored_feature_warning(store, model_id, "cls", level)
        assert stored_feature_warning(store, model_id, "patch_mean", level) is None
        assert stored_feature_warning(store, model_id, "cls4+patch_mean", level) is None


def test_search_warns_on_degenerate_vectors_only(ingested, monkeypatch, capsys):
    from embedstore.store import Store

    key = Store.open(ingested.path).rows("items", columns=["key"]).column("key")[0].as_py()
    code, out, err = run_cli_here(["search", str(ingested.path), "--key", key, "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["hits"]
    assert err.count("\n") == 1 and err.startswith("embedstore: warning: cls vectors are degenerate")
    code, out, err = run_cli_here(["search", str(ingested.path), "--key", key, "--feature", "patch_mean", "--json"],
                                  monkeypatch, capsys)
    assert code == 0 and err == ""


def test_eval_warns_on_degenerate_vectors_in_json_and_on_stderr(ingested, tmp_path, monkeypatch, capsys):
    from embedstore.eval.evaluate import knn_evaluation
    from embedstore.eval.options import KnnOptions
    from embedstore.store import Store

    labels = write_labels(tmp_path / "labels.csv", ingested.path)
    code, out, err = run_cli_here(["eval", "knn", str(ingested.path), "--labels", str(labels), "--k", "1,3",
                                   "--json", str(tmp_path / "knn.json")], monkeypatch, capsys)
    assert code == 0, err
    (warning,) = json.loads((tmp_path / "knn.json").read_text())["warnings"]
    assert "cls vectors are degenerate" in warning
    assert err.startswith("embedstore: warning: cls vectors are degenerate")
    result = knn_evaluation(Store.open(ingested.path), labels, KnnOptions(feature="patch_mean", k=(1, 3)))
    assert result.to_dict()["warnings"] == []


@pytest.fixture(scope="module")
def index_store(tmp_path_factory) -> Path:
    """A random-weights store with enough slices for an index (one NIfTI volume)."""
    from embedstore.pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("index")
    samples.write_nifti(root / "volume.nii.gz", shape=(24, 24, INDEX_SLICES))
    ingest([root / "volume.nii.gz"], root / "store", ingest_options(image_size=28, keep_patches=False))
    return root / "store"


@pytest.mark.slow
def test_index_warns_on_degenerate_vectors_and_on_missed_recall(index_store, monkeypatch, capsys):
    from embedstore.search.index import TARGET_RECALL, index_warnings
    from embedstore.store import Store

    code, out, err = run_cli_here(["index", str(index_store), "--column", "cls"], monkeypatch, capsys)
    assert code == 0, err
    assert "embedstore: warning: cls vectors are degenerate" in err
    code, out, err = run_cli_here(["index", str(index_store), "--feature", "patch_mean"], monkeypatch, capsys)
    assert code == 0 and err == "", err  # spread vectors, every partition probed: recall 1.0

    store = Store.open(index_store)
    model_id = store.resolve_model_id(None)
    (missed,) = index_warnings(store, model_id, "patch_mean", "slice", recall=0.5)
    assert f"recall@10 0.500 is below {TARGET_RECALL}" in missed
    assert index_warnings(store, model_id, "patch_mean", "slice", recall=TARGET_RECALL) == []
