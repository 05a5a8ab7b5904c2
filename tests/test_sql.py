"""`embedstore sql`: the README's three questions answered right on a generated archive (two modalities,
two body parts, two years, broken files), the model views without their vectors unless asked, every write
refused before it runs and the store left as it was, one line for bad SQL, JSON and CSV that parse.

One store for the module: the archive ingested whole by one model, and its chest CT folder alone by a
second (the first model's seed 1), so the second model is missing known series.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from embedstore import samples
from tests.support import ingest_options, run_cli_here


@dataclass
class SqlArchive:
    root: Path
    chest: Path  # the folder the second model embeds
    facts: dict[str, tuple]  # DICOM path -> (modality, body part, year, series UID)
    rasters: list[str]
    broken: dict[str, str]  # path -> the reason its header has none


@dataclass
class SqlStore:
    path: Path
    archive: SqlArchive
    whole: str  # model_id of the model that embedded everything
    chest_only: str  # model_id of the model that embedded the chest folder only


def restamp(paths: list[Path], date: str, body_part: str) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyDate, ds.BodyPartExamined = date, body_part
        ds.save_as(path, enforce_file_format=True)


def make_sql_archive(root: Path) -> SqlArchive:
    """CT chest (2023) and head (2024), a multi-frame MR knee (2023), PNGs, and files with no header."""
    series = {"chest": samples.write_ct_series(root / "chest", n_slices=3, size=32, seed=31, patient_id="P1"),
              "head": samples.write_ct_series(root / "head", n_slices=2, size=32, seed=32, patient_id="P2"),
              "knee": [samples.write_multiframe_mr(root / "knee" / "mf.dcm", n_frames=3, size=32, seed=33)]}
    stamps = {"chest": ("20230504", "CHEST"), "head": ("20240131", "HEAD"), "knee": ("20231201", "KNEE")}
    facts = {}
    for name, paths in series.items():
        restamp(paths, *stamps[name])
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            facts[str(path)] = (ds.Modality, ds.BodyPartExamined, ds.StudyDate[:4], ds.SeriesInstanceUID)
    pngs = [samples.write_png(root / "png" / f"p{i}.png", samples.phantom(40, i)) for i in range(2)]
    (root / "broken").mkdir()
    broken = {root / "broken" / "empty1.dcm": "empty_file", root / "broken" / "empty2.dcm": "empty_file",
              root / "broken" / "notes.dcm": "not_dicom"}
    for path, reason in broken.items():
        path.write_bytes(b"" if reason == "empty_file" else b"not a DICOM file, just text\n" * 20)
    return SqlArchive(root, root / "chest", facts, [str(p) for p in pngs], {str(p): r for p, r in broken.items()})


@pytest.fixture(scope="module")
def sql_store(tmp_path_factory) -> SqlStore:
    from embedstore.pipeline.ingest import ingest

    archive = make_sql_archive(tmp_path_factory.mktemp("sql-archive"))
    path = tmp_path_factory.mktemp("sql-store") / "store"
    whole = ingest([archive.root], path, ingest_options(header_workers=0)).model_ids[0]
    chest_only = ingest([archive.chest], path, ingest_options(header_workers=0, seed=1)).model_ids[0]
    return SqlStore(path, archive, whole, chest_only)


def sql(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    return run_cli_here(["sql", *map(str, args)], monkeypatch, capsys)


def rows_of(store: SqlStore, query: str, monkeypatch, capsys) -> list[dict]:
    code, out, err = sql([store.path, query, "--json", "-"], monkeypatch, capsys)
    assert code == 0 and not err, err
    return json.loads(out)


def assert_one_line_error(code: int, err: str, named: str, wanted_code: int = 2) -> None:
    assert code == wanted_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedstore: error:"), err
    assert named in lines[0], lines[0]


def tables_state(path: Path) -> dict[str, tuple]:
    """Every file under the store's tables, with its size and modification time."""
    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted((path / "tables").rglob("*")) if f.is_file()}


# ----------------------------------------------------------------------------- the README's questions
QUESTION_ARCHIVE = ("SELECT modality, body_part, substr(study_date, 1, 4) AS year, count(*) AS files FROM files "
                    "WHERE reason IS NULL GROUP BY ALL ORDER BY ALL")
QUESTION_NOT_EMBEDDED = ("SELECT DISTINCT series_uid FROM files WHERE kind = 'dicom' AND reason IS NULL AND sop_uid "
                         "NOT IN (SELECT sop_uid FROM vectors WHERE model_id LIKE '{model}%' AND sop_uid IS NOT NULL)")
# The same for every kind of file, as the README says: NIfTI and raster files have no SOP instance UID.
QUESTION_NOT_EMBEDDED_ANY_KIND = ("SELECT DISTINCT coalesce(series_uid, path) AS series FROM files WHERE reason IS "
                                  "NULL AND coalesce(sop_uid, path) NOT IN (SELECT coalesce(sop_uid, path) FROM "
                                  "vectors WHERE model_id LIKE '{model}%')")
QUESTION_FAILURES = "SELECT reason, count(*) AS files FROM failures GROUP BY reason ORDER BY files DESC"


def test_what_the_archive_holds_by_modality_body_part_and_year(sql_store, monkeypatch, capsys):
    expected = Counter((modality, body_part, year) for modality, body_part, year, _ in
                       sql_store.archive.facts.values())
    expected[(None, None, None)] += len(sql_store.archive.rasters)
    rows = rows_of(sql_store, QUESTION_ARCHIVE, monkeypatch, capsys)
    assert {(r["modality"], r["body_part"], r["year"]): r["files"] for r in rows} == dict(expected)
    assert len({r["modality"] for r in rows} - {None}) == 2 and len({r["year"] for r in rows} - {None}) == 2


def test_the_series_a_model_has_not_embedded(sql_store, monkeypatch, capsys):
    chest = str(sql_store.archive.chest)
    outside = {series for path, (*_, series) in sql_store.archive.facts.items() if not path.startswith(chest)}
    for model, missing in ((sql_store.chest_only, outside), (sql_store.whole, set())):
        rows = rows_of(sql_store, QUESTION_NOT_EMBEDDED.format(model=model), monkeypatch, capsys)
        assert {row["series_uid"] for row in rows} == missing, model
    assert outside and len(outside) < len({facts[3] for facts in sql_store.archive.facts.values()})
    rows = rows_of(sql_store, QUESTION_NOT_EMBEDDED_ANY_KIND.format(model=sql_store.chest_only), monkeypatch, capsys)
    assert {row["series"] for row in rows} == outside | set(sql_store.archive.rasters)


def test_which_files_failed_and_why(sql_store, monkeypatch, capsys):
    rows = rows_of(sql_store, QUESTION_FAILURES, monkeypatch, capsys)
    assert {row["reason"]: row["files"] for row in rows} == dict(Counter(sql_store.archive.broken.values()))
    assert [row["files"] for row in rows] == sorted((row["files"] for row in rows), reverse=True)
    listed = rows_of(sql_store, "SELECT path, reason FROM failures ORDER BY path", monkeypatch, capsys)
    assert {row["path"]: row["reason"] for row in listed} == sql_store.archive.broken


# ----------------------------------------------------------------------------- views
def columns(store: SqlStore, table: str, monkeypatch, capsys, *options: str) -> list[str]:
    code, out, err = sql([store.path, f'DESCRIBE "{table}"', "--json", "-", *options], monkeypatch, capsys)
    assert code == 0, err
    return [row["column_name"] for row in json.loads(out)]


def test_model_views_and_vectors_leave_the_vectors_out_unless_asked(sql_store, monkeypatch, capsys):
    from embedstore.store import Store
    from embedstore.store.schema import series_table_name, slices_table_name, vector_fields

    store = Store.open(sql_store.path)
    vector_columns = {field.name for field in vector_fields(store.spec(sql_store.whole))}
    assert {"cls", "patch_mean"} < vector_columns
    for table in (slices_table_name(sql_store.whole), series_table_name(sql_store.whole), "vectors"):
        plain, full = (columns(sql_store, table, monkeypatch, capsys, *options) for options in ([], ["--vectors"]))
        assert not vector_columns & set(plain) and vector_columns <= set(full), table
        assert set(full) - set(plain) == vector_columns, table
    assert columns(sql_store, "vectors", monkeypatch, capsys)[0] == "model_id"
    counts = rows_of(sql_store, "SELECT model_id, count(*) AS n FROM vectors GROUP BY ALL", monkeypatch, capsys)
    assert {row["model_id"]: row["n"] for row in counts} == {
        model: store.count(slices_table_name(model)) for model in (sql_store.whole, sql_store.chest_only)}


def test_the_shared_tables_are_all_there(sql_store, monkeypatch, capsys):
    rows = rows_of(sql_store, "SELECT (SELECT count(*) FROM items) AS items, (SELECT count(*) FROM series) AS "
                   "series, (SELECT count(*) FROM models) AS models, (SELECT count(*) FROM runs) AS runs",
                   monkeypatch, capsys)
    assert rows[0]["models"] == 2 and rows[0]["runs"] == 2 and rows[0]["items"] > rows[0]["series"] > 0


def test_vectors_come_back_as_numbers_with_vectors(sql_store, monkeypatch, capsys):
    from embedstore.store import Store
    from embedstore.store.sql import run_sql

    store = Store.open(sql_store.path)
    width = store.spec(sql_store.whole).embed_dim
    table = run_sql(store, f"SELECT cls FROM vectors WHERE model_id = '{sql_store.whole}' LIMIT 2",
                    with_vectors=True)
    assert table.num_rows == 2 and all(len(v) == width for v in table.column("cls").to_pylist())
    code, _, err = sql([sql_store.path, "SELECT cls FROM vectors"], monkeypatch, capsys)
    assert_one_line_error(code, err, "--vectors")


# ----------------------------------------------------------------------------- read-only
WRITES = {
    "DROP TABLE items": "DROP",
    "DELETE FROM items": "DELETE",
    "COPY items TO '{out}'": "COPY",
    "INSERT INTO items (key) VALUES ('x')": "INSERT",
    "ATTACH '{out}' AS other": "ATTACH",
    "SELECT 1; DROP TABLE items": "2 statements",
    "CREATE TABLE t AS SELECT * FROM items": "CREATE",
    "SET enable_external_access = true": "SET",
    "PRAGMA database_list": "PRAGMA",
    "EXPLAIN ANALYZE DELETE FROM items": "EXPLAIN DELETE",
}


@pytest.mark.parametrize("query", list(WRITES), ids=lambda q: q.split()[0] + "-" + q.split()[-1])
def test_writes_are_refused_before_they_run(sql_store, query, tmp_path, monkeypatch, capsys):
    before, out = tables_state(sql_store.path), tmp_path / "x.csv"
    items = rows_of(sql_store, "SELECT count(*) AS n FROM items", monkeypatch, capsys)
    code, stdout, err = sql([sql_store.path, query.format(out=out)], monkeypatch, capsys)
    assert_one_line_error(code, err, WRITES[query])
    assert "SELECT" in err and not stdout and not out.exists()
    assert tables_state(sql_store.path) == before
    assert rows_of(sql_store, "SELECT count(*) AS n FROM items", monkeypatch, capsys) == items


@pytest.mark.parametrize("query", ["SELECT * FROM read_csv('{out}')", "SELECT * FROM '{out}'",
                                   "SELECT * FROM read_text('/etc/hostname')"])
def test_a_select_reads_no_file(sql_store, query, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.csv"
    out.write_text("a\n1\n")
    code, _, err = sql([sql_store.path, query.format(out=out)], monkeypatch, capsys)
    assert_one_line_error(code, err, "disabled by configuration")


@pytest.mark.parametrize("query, named", [("SELEC 1", "syntax error"), ("SELECT nope FROM items", "nope"),
                                          ("SELECT * FROM nowhere", "nowhere"), ("", "empty"),
                                          ("SELECT 1/0 AS x, 'a'::INTEGER AS y", "Conversion Error")])
def test_bad_sql_is_one_line(sql_store, query, named, monkeypatch, capsys):
    code, _, err = sql([sql_store.path, query], monkeypatch, capsys)
    assert_one_line_error(code, err, named)


def test_a_damaged_table_names_itself_and_check(sql_store, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    shutil.copytree(sql_store.path, store)
    shutil.rmtree(store / "tables" / "runs.lance" / "_versions")
    code, _, err = sql([store, "SELECT count(*) AS n FROM runs"], monkeypatch, capsys)
    assert_one_line_error(code, err, "embedstore check", wanted_code=1)
    assert "runs.lance" in err
    code, out, err = sql([store, "SELECT count(*) AS n FROM items", "--json", "-"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)[0]["n"] > 0, err


# ----------------------------------------------------------------------------- output
def test_json_and_csv_parse_to_the_same_rows(sql_store, tmp_path, monkeypatch, capsys):
    query = "SELECT key, path, rows, pixel_spacing, modality FROM items ORDER BY key"
    expected = rows_of(sql_store, query, monkeypatch, capsys)
    assert expected and all(row["pixel_spacing"] is None or len(row["pixel_spacing"]) == 2 for row in expected)
    code, out, err = sql([sql_store.path, query, "--json", tmp_path / "rows.json"], monkeypatch, capsys)
    assert code == 0 and f"{len(expected)} rows written" in out, err
    assert json.loads((tmp_path / "rows.json").read_text()) == expected
    code, out, err = sql([sql_store.path, query, "--csv", "-"], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = sql([sql_store.path, query, "--csv", tmp_path / "rows.csv"], monkeypatch, capsys)
    assert code == 0 and (tmp_path / "rows.csv").read_text() == out, err
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert [row["key"] for row in parsed] == [row["key"] for row in expected]
    assert [int(row["rows"]) for row in parsed] == [row["rows"] for row in expected]
    assert [json.loads(row["pixel_spacing"]) if row["pixel_spacing"] else None for row in parsed] == \
        [row["pixel_spacing"] for row in expected]


def test_vectors_in_csv_are_json_lists(sql_store, monkeypatch, capsys):
    code, out, err = sql([sql_store.path, "SELECT key, patch_mean FROM vectors LIMIT 3", "--csv", "-", "--vectors"],
                         monkeypatch, capsys)
    assert code == 0, err
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert len(parsed) == 3 and all(len(json.loads(row["patch_mean"])) >= 384 for row in parsed)


def test_a_long_result_shows_its_first_rows_and_says_how_many_more(sql_store, monkeypatch, capsys):
    code, out, err = sql([sql_store.path, "SELECT range AS n, '[bold]x' AS markup FROM range(120)"], monkeypatch,
                         capsys)
    assert code == 0, err
    assert "120 rows; 70 more not shown" in out and "[bold]x" in out
    shown = [line for line in out.splitlines() if "[bold]x" in line]
    assert len(shown) == 50


def test_json_and_csv_together_and_a_missing_folder_are_wrong_requests(sql_store, tmp_path, monkeypatch, capsys):
    code, _, err = sql([sql_store.path, "SELECT 1", "--json", "-", "--csv", "-"], monkeypatch, capsys)
    assert_one_line_error(code, err, "--json and --csv")
    code, _, err = sql([sql_store.path, "SELECT 1", "--csv", tmp_path / "no" / "rows.csv"], monkeypatch, capsys)
    assert_one_line_error(code, err, "does not exist")


def test_the_help_names_the_arguments_and_the_views():
    from typer.testing import CliRunner

    from embedstore.cli.main import app

    shown = CliRunner().invoke(app, ["sql", "--help"], env={"COLUMNS": "200"}, prog_name="embedstore")
    assert shown.exit_code == 0, shown.output
    assert "Usage: embedstore sql [OPTIONS] STORE QUERY\n" in shown.output
    text = " ".join(shown.output.split())
    for words in ("read-only", "vectors (every model's slices, with a model_id column)", "-o, --json OUT",
                  "--csv OUT", "--vectors"):
        assert words in text, words
