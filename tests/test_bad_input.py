"""Bad input: wrong requests end cleanly (exit 2, one line, nothing written); bad files inside an
archive become `failures` rows while everything else is embedded.

Module-level code defines constants and functions only: decode workers use the "spawn" start
method and may re-import modules, so nothing here may run at import time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

FAST = ["--weights", "random", "--image-size", "28", "--workers", "0"]
SUBPROCESS_TIMEOUT_S = 180

# Bad files of the archive: name -> (stage, reason) the code records for it.
BAD_FILES = {
    "empty.dcm": ("discover", "empty_file"),
    "notes.dcm": ("read", "not_dicom"),
    "truncated.png": ("decode", "truncated"),
    "broken.nii.gz": ("decode", "truncated"),  # valid header, gzip stream cut in the middle
    "garbage.nii.gz": ("read", "corrupt_nifti"),  # gzip magic followed by garbage
}
N_PNG, N_CT, NIFTI_SHAPE = 3, 4, (24, 24, 4)
N_GOOD = N_PNG + N_CT + NIFTI_SHAPE[2]


# ----------------------------------------------------------------------------- helpers
def embedstore_command() -> list[str]:
    script = Path(sys.executable).parent / "embedstore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "embedstore.cli.main"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", COLUMNS="250", NO_COLOR="1", PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(embedstore_command() + args, cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def build_bad_archive(root: Path) -> tuple[Path, dict[str, str]]:
    """Good PNGs, a CT series and a NIfTI volume, plus the files of BAD_FILES.

    Returns the archive directory and {bad file name: resolved path string}.
    """
    from embedstore import samples

    archive = root / "archive"
    for index in range(N_PNG):
        samples.write_png(archive / "xray" / f"phantom_{index}.png", samples.phantom(32, index))
    samples.write_ct_series(archive / "ct", n_slices=N_CT, size=32)
    samples.write_nifti(archive / "nifti" / "volume.nii.gz", shape=NIFTI_SHAPE)

    bad = archive / "bad"
    bad.mkdir()
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "notes.dcm").write_text("Referring physician notes, not an image.\n" * 20)
    png = samples.write_png(bad / "truncated.png", samples.phantom(64, 99))
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])
    nii = samples.write_nifti(bad / "broken.nii.gz", shape=NIFTI_SHAPE, seed=7)
    data = nii.read_bytes()
    nii.write_bytes(data[: len(data) // 2])
    (bad / "garbage.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    assert set(p.name for p in bad.iterdir()) == set(BAD_FILES)
    return archive, {name: str((bad / name).resolve()) for name in BAD_FILES}


def good_slice_ids(archive: Path) -> set[tuple[str, int]]:
    """(path, frame) of every slice the good files hold."""
    archive = archive.resolve()
    ids = {(str(p), 0) for p in (archive / "xray").glob("*.png")}
    ids |= {(str(p), 0) for p in (archive / "ct").glob("*.dcm")}
    ids |= {(str(archive / "nifti" / "volume.nii.gz"), z) for z in range(NIFTI_SHAPE[2])}
    assert len(ids) == N_GOOD
    return ids


def expected_reason_counts() -> dict[str, int]:
    return dict(Counter(reason for _, reason in BAD_FILES.values()))


def options(workers: int):
    from embedstore.pipeline.ingest import IngestOptions

    return IngestOptions(weights="random", image_size=28, workers=workers, show_progress=False)


def check_failures_table(store_path: Path, bad_paths: dict[str, str], run_id: str | None = None) -> list[dict]:
    from embedstore.store import Store

    rows = Store.open(store_path).rows("failures").to_pylist()
    by_path = Counter(row["path"] for row in rows)
    duplicated = {path: n for path, n in by_path.items() if n > 1}
    assert not duplicated, f"failures table holds more than one row for: {duplicated}"
    assert sorted(by_path) == sorted(bad_paths.values())
    for name, path in bad_paths.items():
        (row,) = [r for r in rows if r["path"] == path]
        assert (row["stage"], row["reason"]) == BAD_FILES[name], (name, row)
        assert row["message"].strip(), (name, row)
        if run_id is not None:
            assert row["run_id"] == run_id, f"{name}: row of run {row['run_id']} kept, expected {run_id}"
    return rows


def check_summary(summary, n_embedded: int, n_skipped: int) -> None:
    assert summary.n_found == N_GOOD + 1 + NIFTI_SHAPE[2]  # + truncated.png and broken.nii.gz's slices
    assert summary.n_embedded == n_embedded
    assert summary.n_skipped == n_skipped
    assert summary.failures_by_reason == expected_reason_counts()
    assert "decode_error" not in summary.failures_by_reason
    assert summary.n_failed == len(BAD_FILES)


def check_slices_table(store_path: Path, archive: Path) -> None:
    """One item and one vector row of the model per good slice, and nothing of a bad file."""
    from embedstore.store import Store
    from embedstore.store.schema import slices_table_name

    store = Store.open(store_path)
    items = store.rows("items", columns=["key", "path", "frame"]).to_pylist()
    vectors = store.rows(slices_table_name(store.resolve_model_id(None)), columns=["key", "path"]).to_pylist()
    assert len({row["key"] for row in items}) == len(items), "duplicate item keys"
    assert len({row["key"] for row in vectors}) == len(vectors), "duplicate slice keys"
    assert {(row["key"], row["path"]) for row in vectors} == {(row["key"], row["path"]) for row in items}
    assert sorted((row["path"], row["frame"]) for row in items) == sorted(good_slice_ids(archive))


# ----------------------------------------------------------------------------- A: wrong requests
# id -> (arguments, text the message must name); each runs in its own directory with `src/`
# (one valid PNG), `store.txt` (a file), `some.pth` (text) and `notstore/` (a plain directory).
WRONG_REQUESTS = {
    "missing-source": (["ingest", "missing-src", "--store", "store", *FAST], "missing-src"),
    "store-is-a-file": (["ingest", "src", "--store", "store.txt", *FAST], "store.txt"),
    "unknown-model": (["ingest", "src", "--store", "store", "--model", "dinov2_vitx99", *FAST], "dinov2_vitx99"),
    "image-size-not-multiple-of-14": (
        ["ingest", "src", "--store", "store", "--weights", "random", "--image-size", "30", "--workers", "0"], "30"),
    "weights-not-a-checkpoint": (
        ["ingest", "src", "--store", "store", "--weights", "some.pth", "--image-size", "28", "--workers", "0"],
        "some.pth"),
    "unknown-option": (["ingest", "src", "--store", "store", *FAST, "--frobnicate"], "--frobnicate"),
    "unknown-window": (["ingest", "src", "--store", "store", *FAST, "--window", "brian"], "brian"),
    "multi-of-two-windows": (["ingest", "src", "--store", "store", *FAST, "--window", "multi:lung,bone"],
                             "multi:lung,bone"),
    "unknown-axis": (["ingest", "src", "--store", "store", *FAST, "--axis", "transverse"], "transverse"),
    "percentiles-not-numbers": (["ingest", "src", "--store", "store", *FAST, "--mr-percentiles", "low,high"],
                                "low,high"),
    "unknown-engine": (["ingest", "src", "--store", "store", *FAST, "--engine", "warp"], "warp"),
    "unknown-executor": (["ingest", "src", "--store", "store", *FAST, "--executor", "spark"], "spark"),
    "percentiles-reversed": (["ingest", "src", "--store", "store", *FAST, "--mr-percentiles", "95,5"], "95"),
    "too-many-layers": (["ingest", "src", "--store", "store", *FAST, "--layers", "13"], "13"),
    "patch-layer-out-of-range": (["ingest", "src", "--store", "store", *FAST, "--patch-layers", "-1,-13"], "-13"),
    "mean-not-numbers": (["ingest", "src", "--store", "store", *FAST, "--mean", "a,b,c"], "a,b,c"),
    "same-model-twice": (["ingest", "src", "--store", "store", *FAST, "--model", "dinov2_vits14", "--model",
                          "dinov2_vits14"], "named twice"),
    "info-not-a-store": (["info", "notstore"], "notstore"),
    "unknown-neighbour-search": (["eval", "knn", "notstore", "--labels", "labels.csv", "--search", "faiss"], "faiss"),
    "knn-k-zero": (["eval", "knn", "notstore", "--labels", "labels.csv", "--k", "0"], "--k"),
    "knn-k-negative": (["eval", "knn", "notstore", "--labels", "labels.csv", "-k", "10,-1"], "-1"),
    "knn-temperature-zero": (["eval", "knn", "notstore", "--labels", "labels.csv", "--temperature", "0"],
                             "--temperature"),
    "eval-json-into-missing-directory": (["eval", "knn", "notstore", "--labels", "labels.csv", "--json",
                                          "nodir/knn.json"], "nodir"),
    "eval-report-under-missing-directory": (["eval", "linear", "notstore", "--labels", "labels.csv", "--report",
                                             "nodir/report"], "nodir"),
    "ingest-json-into-missing-directory": (["ingest", "src", "--store", "store", *FAST, "-o", "nodir/run.json"],
                                           "nodir"),
    "unknown-precision": (["ingest", "src", "--store", "store", *FAST, "--precision", "fp8"], "fp8"),
    "store-under-a-file": (["ingest", "src", "--store", "store.txt/store", *FAST], "store.txt"),
}


def prepare_case_dir(directory: Path) -> None:
    from embedstore import samples

    samples.write_png(directory / "src" / "one.png", samples.phantom(32, 0))
    (directory / "store.txt").write_text("I am a file, not a store.\n")
    (directory / "some.pth").write_text("this is not a torch checkpoint\n")
    (directory / "notstore").mkdir()
    (directory / "notstore" / "README.txt").write_text("just a directory\n")


# In a process of their own too: the real command's exit code and stderr, imports and all.
IN_A_PROCESS = ("missing-source", "unknown-option", "weights-not-a-checkpoint")


def wrong_request_outcome(case: str, directory: Path, monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of a wrong request run in `directory`: in this process (the command's own
    main(), as the console script calls it: quick, the libraries already loaded), and for the cases of
    IN_A_PROCESS also as a real process, which must say the same."""
    from tests.support import run_cli_here

    args = WRONG_REQUESTS[case][0]
    monkeypatch.chdir(directory)
    code, _, stderr = run_cli_here(args, monkeypatch, capsys)
    if case in IN_A_PROCESS:
        process = subprocess.run(embedstore_command() + args, cwd=directory, env=cli_env(), capture_output=True,
                                 text=True, timeout=SUBPROCESS_TIMEOUT_S)
        assert (process.returncode, process.stderr) == (code, stderr)
    return code, stderr


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in IN_A_PROCESS else case
                                  for case in WRONG_REQUESTS])
def test_wrong_request_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    directory = tmp_path / case
    directory.mkdir()
    prepare_case_dir(directory)
    before = snapshot(directory)
    returncode, stderr = wrong_request_outcome(case, directory, monkeypatch, capsys)
    named = WRONG_REQUESTS[case][1]
    assert returncode == 2, f"exit code {returncode}, expected 2; stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    assert lines[0].startswith("embedstore: error:"), lines[0]
    assert named in lines[0], f"message does not name {named!r}: {lines[0]}"
    # Nothing written: no store was created, and every file in the directory is as it was.
    assert not (directory / "store").exists()
    assert snapshot(directory) == before


# ----------------------------------------------------------------------------- B: bad data, library
@pytest.mark.parametrize("workers", [0, 1], ids=["inline", "worker-process"])
def test_bad_files_become_failure_rows_and_the_rest_is_embedded(tmp_path, workers):
    """With workers=1 the decode-stage failures cross the process boundary and must arrive intact."""
    from embedstore.pipeline.ingest import ingest

    archive, bad_paths = build_bad_archive(tmp_path)
    store_path = tmp_path / "store"
    summary = ingest([archive], store_path, options(workers=workers))

    check_summary(summary, n_embedded=N_GOOD, n_skipped=0)
    check_slices_table(store_path, archive)
    rows = check_failures_table(store_path, bad_paths, run_id=summary.run_id)
    decoded = [r for r in rows if r["stage"] == "decode"]
    assert {Path(r["path"]).name for r in decoded} == {"truncated.png", "broken.nii.gz"}


def test_rerun_embeds_nothing_and_keeps_one_failure_row_per_bad_file(tmp_path):
    from embedstore.pipeline.ingest import ingest

    archive, bad_paths = build_bad_archive(tmp_path)
    store_path = tmp_path / "store"
    first = ingest([archive], store_path, options(workers=0))
    assert first.n_embedded == N_GOOD

    rerun = ingest([archive], store_path, options(workers=0))
    assert rerun.run_id != first.run_id
    check_summary(rerun, n_embedded=0, n_skipped=N_GOOD)
    check_slices_table(store_path, archive)
    # Every bad file was tried again: its row is now the rerun's, the first run's row is gone.
    check_failures_table(store_path, bad_paths, run_id=rerun.run_id)


# ----------------------------------------------------------------------------- C: bad data, CLI
@pytest.mark.slow
def test_cli_ingest_of_bad_archive_reports_failures_and_info_lists_them(tmp_path):
    archive, _ = build_bad_archive(tmp_path)
    store_path = tmp_path / "store"

    ingested = run_cli(["ingest", str(archive), "--store", str(store_path), *FAST], cwd=tmp_path)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    assert "Traceback" not in ingested.stderr
    for reason, n in expected_reason_counts().items():
        assert f"{reason} {n}" in ingested.stdout, f"summary does not report '{reason} {n}':\n{ingested.stdout}"

    info = run_cli(["info", str(store_path), "--json"], cwd=tmp_path)
    assert info.returncode == 0, info.stderr[-3000:]
    summary = json.loads(info.stdout)
    assert summary["failures_by_reason"] == expected_reason_counts()
    assert summary["tables"]["failures"] == len(BAD_FILES)
    assert sum(model["slices"] for model in summary["models"].values()) == N_GOOD

    listed = run_cli(["failures", str(store_path), "--reason", "truncated", "--json"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    truncated = json.loads(listed.stdout)
    assert sorted(Path(row["path"]).name for row in truncated) == sorted(
        name for name, (_, reason) in BAD_FILES.items() if reason == "truncated")
    assert all(row["reason"] == "truncated" and row["message"] for row in truncated)

    unknown = run_cli(["failures", str(store_path), "--reason", "gremlins"], cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.strip().count("\n") == 0
    assert "unknown failure reason 'gremlins'" in unknown.stderr
