"""Command-line conventions and the wrong requests that need a real store: `-h`, `--version`, usage
lines without Python internals, unwrapped piped tables, `--where` literals checked against the
schema, eval refusing tasks no classifier can learn, the labels CSV's column and relative paths,
and stores that cannot be written.

Module-level code defines constants and functions only: decode workers use the "spawn" start
method and may re-import modules, so nothing here may run at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedstore.errors import UsageError
from tests.support import write_csv

SUBPROCESS_TIMEOUT_S = 180


def embedstore_command() -> list[str]:
    script = Path(sys.executable).parent / "embedstore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "embedstore.cli.main"]


def run_piped(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The command with stdout a pipe, as a script or grep reads it, and no COLUMNS to go by."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(HF_HUB_OFFLINE="1", NO_COLOR="1")
    return subprocess.run(embedstore_command() + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`embedstore ARGS` in this process, through main() and its error contract: (exit code, stdout, stderr)."""
    from embedstore.cli.main import main

    monkeypatch.setattr(sys, "argv", ["embedstore", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, named: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedstore: error:"), err[-3000:]
    assert named in lines[0], lines[0]




def slice_rows(store_path: Path) -> list[dict]:
    from embedstore.store import Store
    from embedstore.store.schema import slices_table_name

    store = Store.open(store_path)
    columns = ["key", "path", "series_uid", "modality"]
    return store.rows(slices_table_name(store.resolve_model_id(None)), columns=columns).to_pylist()


def ct_or_other(row: dict) -> str:
    return "ct" if row["modality"] == "CT" else "other"


# ----------------------------------------------------------------------------- help and version
def test_short_help_and_version_work():
    from embedstore import __version__

    for args in (["-h"], ["eval", "-h"], ["eval", "knn", "-h"], ["ingest", "-h"]):
        shown = run_piped(args, Path.cwd())
        assert shown.returncode == 0 and shown.stdout.startswith("Usage: embedstore"), (args, shown.stderr)
    version = run_piped(["--version"], Path.cwd())
    assert version.returncode == 0 and version.stdout == f"embedstore {__version__}\n", version.stderr


def help_text(args: list[str]) -> str:
    from typer.testing import CliRunner

    from embedstore.cli.main import app

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"}, prog_name="embedstore")
    assert result.exit_code == 0, result.output
    return result.output


COMMANDS = (["ingest"], ["info"], ["models"], ["failures"], ["search"], ["index"], ["export"], ["vacuum"],
            ["migrate"], ["demo"], ["serve"], ["eval", "knn"], ["eval", "linear"], ["eval", "fewshot"])


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_usage_shows_argument_names_not_python_internals(command):
    text = help_text(command)
    for internal in ("<list[", "{store}", "{sources}", "{OUT}", "{STORE}"):
        assert internal not in text, f"{internal!r} in the help of {' '.join(command)}:\n{text}"


def test_usage_lines_options_and_defaults_say_what_they_are():
    ingest = help_text(["ingest"])
    assert "Usage: embedstore ingest [OPTIONS] SRC...\n" in ingest
    progress = next(line for line in ingest.splitlines() if "--progress / --no-progress" in line)
    assert progress.split("--no-progress", 1)[1].strip(), "--progress/--no-progress has no help"
    assert "Usage: embedstore export [OPTIONS] STORE OUT\n" in help_text(["export"])
    knn, linear, fewshot = (help_text(["eval", name]) for name in ("knn", "linear", "fewshot"))
    assert "-k, --k" in knn and "-o, --json" in knn and "--label-column" in knn
    for text in (knn, linear):  # neither draws few-shot samples
        seed = " ".join(text.split("--seed", 1)[1].split("--model-id", 1)[0].split())
        assert "few-shot" not in seed, seed
    assert "few-shot draws" in fewshot
    # the default feature rule is stated: each protocol's input in the reference study
    assert "Default cls+patch_mean" in " ".join(linear.split()) and "[default: cls]" in " ".join(knn.split())
    assert "cls for kNN and few-shot, cls+patch_mean for the linear probe" in " ".join(help_text(["eval"]).split())


# ----------------------------------------------------------------------------- piped output
def test_piped_tables_keep_each_id_on_one_line(ingested, tmp_path):
    model_id = ingested.summary.model_ids[0]
    for command in (["models", str(ingested.path)], ["info", str(ingested.path)]):
        shown = run_piped(command, tmp_path)
        assert shown.returncode == 0, shown.stderr
        # the model's row, wider than 80 columns: its id whole, beside its width
        assert any(model_id in line and " 384 " in line for line in shown.stdout.splitlines()), shown.stdout


# ----------------------------------------------------------------------------- --where
WRONG_WHERE = {
    "modality = 1": "modality is string",
    "rows = 'abc'": "rows is int32",
    "rows = 1.5": "whole number",
    "rows = 2147483648": "2147483647",
    "slice_index > -2147483649": "-2147483648",
    "slice_position > 1e400": "slice_position is double",
    "modality IN ('CT', 2)": "modality is string",
    "rows LIKE '4%'": "LIKE matches text",
    "(" * 60 + "rows = 40" + ")" * 60: "nested deeper",
    "NOT " * 3000 + "rows = 40": "nested deeper",
}


@pytest.mark.parametrize("where", list(WRONG_WHERE), ids=lambda w: w[:24])
def test_where_literals_of_the_wrong_type_range_or_depth_are_refused(ingested, where):
    import embedstore

    store = embedstore.open(ingested.path)
    with pytest.raises(UsageError, match="--where") as refused:
        store.items(where=where)
    assert WRONG_WHERE[where] in str(refused.value) and len(str(refused.value)) < 400


def test_where_takes_negative_numbers_and_nesting_up_to_the_cap(ingested):
    import embedstore
    from embedstore.search.where import MAX_DEPTH

    store = embedstore.open(ingested.path)
    items = store.items(columns=["key", "slice_position", "slice_index"]).to_pylist()

    def keys(where: str) -> list[str]:
        return sorted(store.items(where=where, columns=["key"]).column("key").to_pylist())

    wanted = sorted(r["key"] for r in items if r["slice_position"] is not None and -2.5 < r["slice_position"] <= 1.5)
    assert wanted and keys("slice_position > -2.5 AND slice_position <= 1.5") == wanted
    assert keys("slice_position>-1e3") == sorted(r["key"] for r in items if r["slice_position"] is not None)
    assert keys("slice_index IN (-1, 0)") == sorted(r["key"] for r in items if r["slice_index"] == 0)
    nested = "NOT (" * (MAX_DEPTH // 2) + "slice_index = 0" + ")" * (MAX_DEPTH // 2)  # an even number of NOTs
    assert keys(nested) == keys("slice_index = 0")


def test_a_wrong_where_on_the_command_line_is_one_line_and_writes_nothing(ingested, tmp_path, monkeypatch, capsys):
    out = tmp_path / "vectors.parquet"
    for where in ("modality = 1", "NOT " * 3000 + "slice_index = 0"):
        code, _, err = run_main(["export", ingested.path, out, "--format", "parquet", "--where", where],
                                monkeypatch, capsys)
        assert_one_line_error(code, err, "--where")
        assert not out.exists()


def test_search_with_an_unknown_model_id_is_an_error(ingested, monkeypatch, capsys):
    key = slice_rows(ingested.path)[0]["key"]
    code, _, err = run_main(["search", ingested.path, "--key", key, "--model-id", "resnet"], monkeypatch, capsys)
    assert_one_line_error(code, err, "resnet")


# ----------------------------------------------------------------------------- eval
def test_knn_refuses_k_below_one_and_a_temperature_of_zero(ingested, tmp_path):
    from embedstore.eval.evaluate import knn_evaluation
    from embedstore.eval.labels import LabelsSpec
    from embedstore.eval.options import KnnOptions
    from embedstore.store import Store

    rows = slice_rows(ingested.path)
    labels = write_csv(tmp_path / "labels.csv", [
        {"key": r["key"], "label": ct_or_other(r), "patient_id": r["series_uid"]} for r in rows])
    store = Store.open(ingested.path)
    for ks, temperature, named in (((0,), 0.07, "--k"), ((10, -1), 0.07, "-1"), ((10,), 0.0, "--temperature")):
        with pytest.raises(UsageError, match=named):
            knn_evaluation(store, LabelsSpec(labels, split_by="patient"), KnnOptions(k=ks, temperature=temperature))


def test_eval_refuses_one_class_and_classes_missing_from_train(ingested, tmp_path, monkeypatch, capsys):
    rows = slice_rows(ingested.path)
    one_class = write_csv(tmp_path / "one.csv", [
        {"key": r["key"], "label": "finding", "patient_id": r["series_uid"]} for r in rows])
    only_in_test = write_csv(tmp_path / "absent.csv", [  # class "mr" sits in test alone
        {"key": r["key"], "label": "mr" if r["modality"] == "MR" else ct_or_other(r),
         "split": "test" if r["modality"] == "MR" else "train"} for r in rows])
    for command in ("knn", "linear", "fewshot"):
        code, out, err = run_main(["eval", command, ingested.path, "--labels", one_class, "--split-by", "patient"],
                                  monkeypatch, capsys)
        assert_one_line_error(code, err, "one class")
        assert out == ""  # no metrics
        code, _, err = run_main(["eval", command, ingested.path, "--labels", only_in_test], monkeypatch, capsys)
        assert_one_line_error(code, err, "'mr'")
        assert "no train rows" in err


def test_label_column_and_paths_relative_to_the_labels_file(ingested, tmp_path, monkeypatch, capsys):
    from embedstore.eval.evaluate import knn_evaluation
    from embedstore.eval.labels import LabelsSpec
    from embedstore.eval.options import KnnOptions
    from embedstore.store import Store

    rows = slice_rows(ingested.path)
    folder = tmp_path / "labels"
    folder.mkdir()
    by_path = {}
    for r in rows:  # one label per file (a multi-frame file or a volume holds several slices)
        by_path[os.path.relpath(r["path"], folder)] = (ct_or_other(r), r["series_uid"])
    assert all(not Path(p).is_absolute() for p in by_path)
    labels = write_csv(folder / "diagnoses.csv", [
        {"path": path, "diagnosis": label, "patient_id": patient} for path, (label, patient) in by_path.items()])
    store = Store.open(ingested.path)
    result = knn_evaluation(store, LabelsSpec(labels, "diagnosis", "patient", (0.5, 0.0, 0.5)),
                            KnnOptions(feature="patch_mean", k=(1,)))
    assert result.classes == ["ct", "other"] and sum(result.counts.values()) == len(rows)
    code, _, err = run_main(["eval", "knn", ingested.path, "--labels", labels, "--feature", "patch_mean", "-k", "1",
                             "--split-by", "patient", "--ratios", "0.5,0,0.5", "--label-column", "diagnosis",
                             "-o", tmp_path / "knn.json"], monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "knn.json").exists()

    code, _, err = run_main(["eval", "knn", ingested.path, "--labels", labels, "--split-by", "patient"],
                            monkeypatch, capsys)
    assert_one_line_error(code, err, "'label' column")
    elsewhere = write_csv(tmp_path / "elsewhere.csv", [{"path": "x.dcm", "label": "a", "split": "train"}])
    with pytest.raises(UsageError, match="stored paths are absolute"):
        knn_evaluation(store, elsewhere)


# ----------------------------------------------------------------------------- stores that cannot be written
def test_a_store_under_a_file_or_without_write_permission_is_refused_before_anything_is_written(
        tmp_path, monkeypatch):
    import embedstore.store
    from embedstore import samples
    from embedstore.pipeline.ingest import IngestOptions, ingest

    source = samples.write_png(tmp_path / "src" / "one.png", samples.phantom(32, 0))
    options = IngestOptions(weights="random", image_size=28, workers=0, show_progress=False)
    (tmp_path / "notes.txt").write_text("a file\n")
    with pytest.raises(UsageError, match="notes.txt"):
        ingest([source], tmp_path / "notes.txt" / "store", options)

    # Root writes through permission bits, so the permission answer is what this test sets.
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(embedstore.store.os, "access",
                        lambda path, mode: False if Path(path) == read_only else real_access(path, mode))
    for store_path in (read_only / "store", read_only):  # a new store in it, or the folder itself as a store
        with pytest.raises(UsageError, match="permission denied"):
            ingest([source], store_path, options)
    assert list(read_only.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_parent_is_refused_for_a_user(tmp_path, monkeypatch, capsys):
    from embedstore import samples

    samples.write_png(tmp_path / "src" / "one.png", samples.phantom(32, 0))
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, err = run_main(["ingest", tmp_path / "src", "--store", parent / "store", "--weights", "random",
                                 "--image-size", "28", "--workers", "0"], monkeypatch, capsys)
        assert_one_line_error(code, err, "permission denied")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)
