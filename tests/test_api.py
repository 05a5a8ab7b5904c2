"""The Python API (`embedstore.open`), `embedstore export`, and the store-format reading example.

A two-model store (random weights, 56 px) keeping the patch tokens of the last two blocks, and a
one-model store without patches. Similarities are asserted on patch_mean: a random-weight model's
CLS vectors are nearly constant.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import zarr

import embedstore
from embedstore.errors import UsageError
from embedstore.search import similar
from embedstore.store import Store
from embedstore.store.vectors import load_vectors
from tests.support import ingest_options, make_mixed_archive, run_cli_here, write_csv

MODELS = ("dinov2_vits14", "dinov2_vitb14")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """(store path, archive, {short name: model_id}) of the mixed archive embedded by two models."""
    from embedstore.pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("api")
    archive = make_mixed_archive(root / "archive")
    summary = ingest([archive.root], root / "store", ingest_options(models=MODELS, batch_size=4, patch_layers=(-2, -1)))
    ids = {name: next(m for m in summary.model_ids if m.startswith(name)) for name in MODELS}
    return root / "store", archive, ids


@pytest.fixture(scope="module")
def no_patches(two_models, tmp_path_factory):
    from embedstore.pipeline.ingest import ingest

    path = tmp_path_factory.mktemp("api-no-patches") / "store"
    ingest([two_models[1].root / "png"], path, ingest_options(keep_patches=False))
    return path


def plain_table(path: Path, name: str) -> pa.Table:
    return lancedb.connect(str(path / "tables")).open_table(name).to_arrow().sort_by("key")


def plain_matrix(table: pa.Table, columns: list[str]) -> np.ndarray:
    return np.concatenate([np.stack(table.column(c).to_numpy(zero_copy_only=False)) for c in columns], axis=1)






# ---------------------------------------------------------------------------------- opening, models

def test_import_embedstore_stays_light():
    code = "import sys, embedstore; print(sorted(m for m in ('lancedb', 'zarr', 'torch', 'embedstore.api') " \
           "if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_open_lists_the_models_and_resolves_prefixes(two_models, tmp_path):
    path, _, ids = two_models
    store = embedstore.open(path)
    assert [m.model_id for m in store.models()] == list(Store.open(path).specs())
    assert store.model("dinov2_vitb").model_id == ids["dinov2_vitb14"] and store.model("dinov2_vitb").embed_dim == 768
    assert store.model(ids["dinov2_vits14"]).patch_layers == (10, 11)
    with pytest.raises(UsageError, match="ambiguous"):
        store.model("dinov2")
    with pytest.raises(UsageError, match="holds 2 models"):
        store.vectors()
    with pytest.raises(UsageError, match="not an embedstore store"):
        embedstore.open(tmp_path)
    info = store.info()
    assert set(info["models"]) == set(ids.values()) and info["slices"] == two_models[1].n_slices
    assert store.failures() == []


# ---------------------------------------------------------------------------------- vectors, items

@pytest.mark.parametrize("name", MODELS)
def test_vectors_equal_what_plain_lancedb_reads(two_models, name):
    path, _, ids = two_models
    store = embedstore.open(path)
    table = plain_table(path, f"slices-{ids[name]}")
    ct = table.filter(pc.equal(table.column("modality"), "CT"))
    got = store.vectors(name, feature="cls+patch_mean", where="modality = 'CT'")
    assert got.matrix.dtype == np.float32 and got.matrix.flags.c_contiguous
    assert got.rows.column("key").to_pylist() == ct.column("key").to_pylist()
    np.testing.assert_array_equal(got.matrix, plain_matrix(ct, ["cls", "patch_mean"]))
    two_blocks = store.vectors(name, feature="cls2")
    np.testing.assert_array_equal(two_blocks.matrix, plain_matrix(table, ["cls_b10", "cls_b11"]))
    series = plain_table(path, f"series-{ids[name]}")
    np.testing.assert_array_equal(store.vectors(name, "patch_mean", "series").matrix,
                                  plain_matrix(series, ["patch_mean"]))


def test_vectors_and_items_refuse_a_where_outside_the_filter_language(two_models):
    store = embedstore.open(two_models[0])
    for bad in ("modality = 'CT'; DROP TABLE items", "cls IS NULL", "nope = 1"):
        with pytest.raises(UsageError, match="--where"):
            store.vectors("dinov2_vits", where=bad)
    with pytest.raises(UsageError, match="--where"):
        store.items("pixel_spacing IS NULL")  # a list column: not filterable
    with pytest.raises(UsageError, match="level"):
        store.vectors("dinov2_vits", level="study")
    with pytest.raises(UsageError, match="feature"):
        store.vectors("dinov2_vits", feature="cls9")


def test_items_equal_the_plain_items_table(two_models):
    path, archive, _ = two_models
    store = embedstore.open(path)
    plain = plain_table(path, "items")
    assert store.items().sort_by("key").equals(plain)
    mr = store.items("modality = 'MR'", columns=["key", "frame", "slice_position"])
    assert mr.column_names == ["key", "frame", "slice_position"]
    assert sorted(mr.column("frame").to_pylist()) == list(range(archive.n_multiframe))
    with pytest.raises(UsageError, match="no column"):
        store.items(columns=["key", "nope"])


# ---------------------------------------------------------------------------------- patches

@pytest.mark.parametrize("name", MODELS)
def test_patches_equal_the_zarr_array_read_directly(two_models, name):
    path, _, ids = two_models
    store = embedstore.open(path)
    spec = store.model(name)
    row = plain_table(path, f"slices-{ids[name]}").slice(3, 1).to_pylist()[0]
    for block in (10, 11):
        array = zarr.open_array(str(path / "patches" / row["patch_shard"] / f"b{block}"), mode="r")
        direct = array[row["patch_offset"]]
        got = store.patches(row["key"], name, block)
        assert got.dtype == np.float16 and got.shape == (spec.num_patches, spec.embed_dim)
        np.testing.assert_array_equal(got, direct)
    np.testing.assert_array_equal(store.patches(row["key"], name), store.patches(row["key"], name, 11))  # last kept
    np.testing.assert_array_equal(store.patches(row["key"], name, -2), store.patches(row["key"], name, 10))
    # the stored patch_mean is the mean of the last block's (float32) tokens: float16 storage is close to it
    patch_mean = store.vectors(name, "patch_mean", where=f"key = '{row['key']}'").matrix[0]
    np.testing.assert_allclose(store.patches(row["key"], name).astype(np.float32).mean(0), patch_mean, atol=2e-2)


def test_an_unkept_block_or_missing_patches_is_a_clear_error(two_models, no_patches):
    store = embedstore.open(two_models[0])
    key = store.items(columns=["key"]).column("key")[0].as_py()
    with pytest.raises(UsageError, match=r"kept the patch tokens of blocks 10, 11 only, not block 5"):
        store.patches(key, "dinov2_vits", block=5)
    with pytest.raises(UsageError, match="no slice with key 'nope'"):
        store.patches("nope", "dinov2_vits")
    bare = embedstore.open(no_patches)
    key = bare.items(columns=["key"]).column("key")[0].as_py()
    with pytest.raises(UsageError, match="kept no patch tokens"):
        bare.patches(key)


# ---------------------------------------------------------------------------------- search

def test_search_equals_embedstore_search_similar(two_models):
    path, archive, ids = two_models
    store, plain = embedstore.open(path), Store.open(path)
    key = store.vectors("dinov2_vitb", "patch_mean", where="modality = 'CT'").rows.column("key")[2].as_py()
    for name in MODELS:
        hits = store.search(key=key, k=5, model=name, feature="patch_mean")
        expected = similar.search(plain, similar.query_by_key(plain, key, "patch_mean", ids[name]), 5, "slice",
                                  "patch_mean")
        assert hits == expected and len(hits) == 5 and key not in [h.key for h in hits]
    series_uid = store.items("modality = 'MR'", columns=["series_uid"]).column("series_uid")[0].as_py()
    by_series = store.search(series_uid=series_uid, k=3, level="series", model="dinov2_vits", feature="patch_mean")
    assert by_series == similar.search(plain, similar.query_by_series(plain, series_uid, "patch_mean", ids[MODELS[0]]),
                                       3, "series", "patch_mean")
    filtered = store.search(key=key, model="dinov2_vits", feature="patch_mean", where="modality = 'MR'")
    assert filtered and {h.modality for h in filtered} == {"MR"}


def test_search_by_a_vector_and_by_an_image(two_models):
    path, archive, _ = two_models
    store = embedstore.open(path)
    stored = store.vectors("dinov2_vits", "patch_mean")
    hits = store.search(vector=stored.matrix[4], k=1, model="dinov2_vits", feature="patch_mean")
    assert hits[0].key == stored.rows.column("key")[4].as_py() and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    png = str(archive.pngs[1])
    by_image = store.search(image=png, k=1, model="dinov2_vits", feature="patch_mean")
    assert by_image[0].path == png and by_image[0].similarity == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(UsageError, match=r"shape \(384,\)"):
        store.search(vector=np.zeros(768, np.float32), model="dinov2_vits", feature="patch_mean")
    with pytest.raises(UsageError, match="exactly one of"):
        store.search(key="a", series_uid="b", model="dinov2_vits")
    with pytest.raises(UsageError, match="exactly one of"):
        store.search(model="dinov2_vits")


# ---------------------------------------------------------------------------------- export

def series_labels(store, tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A labels CSV joined by series_uid naming the CT and MR series (others stay unlabelled)."""
    items = store.items("modality IN ('CT', 'MR')", columns=["series_uid", "modality", "path"]).to_pylist()
    by_series = {}
    for item in items:
        if item["modality"] == "MR" or not item["path"].endswith(".nii.gz"):
            by_series[item["series_uid"]] = (item["modality"].lower(), "train" if item["modality"] == "CT" else "test")
    rows = [{"series_uid": uid, "label": label, "split": split} for uid, (label, split) in by_series.items()]
    rows.append({"series_uid": "1.2.3.not.stored", "label": "ghost", "split": "val"})
    return write_csv(tmp_path / "labels.csv", rows), by_series


def test_export_parquet_round_trips_with_labels(two_models, tmp_path):
    path, archive, ids = two_models
    store = embedstore.open(path)
    labels, by_series = series_labels(store, tmp_path)
    out = tmp_path / "vectors.parquet"
    summary = store.export(out, "parquet", model="dinov2_vitb", feature="cls+patch_mean", labels=labels)
    expected = load_vectors(Store.open(path), ids["dinov2_vitb14"], "cls+patch_mean")
    table = pq.read_table(out)
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 1536)
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    np.testing.assert_array_equal(vectors, expected.matrix)
    for column in expected.rows.column_names:  # the identity columns, row for row
        assert table.column(column).to_pylist() == expected.rows.column(column).to_pylist()
    assert {"body_part", "study_date", "patch_shard", "patch_offset"} <= set(table.column_names)
    labelled = [by_series.get(uid, (None, None)) for uid in table.column("series_uid").to_pylist()]
    assert table.column("label").to_pylist() == [label for label, _ in labelled]
    assert table.column("split").to_pylist() == [split for _, split in labelled]
    assert summary.n_rows == archive.n_slices and summary.n_labelled == sum(label is not None for label, _ in labelled)
    assert 0 < summary.n_labelled < summary.n_rows
    description = json.loads(table.schema.metadata[b"embedstore"])
    assert description["model_id"] == ids["dinov2_vitb14"] and description["columns"] == ["cls", "patch_mean"]
    assert description["model"]["embed_dim"] == 768


def test_export_npy_round_trips_at_series_level(two_models, tmp_path):
    path, _, ids = two_models
    store = embedstore.open(path)
    labels, by_series = series_labels(store, tmp_path)
    out = tmp_path / "npy"
    out.mkdir()  # an empty directory is fine
    store.export(out, "npy", model="dinov2_vits", feature="patch_mean", level="series", where="modality = 'MR'",
                 labels=labels)
    expected = load_vectors(Store.open(path), ids["dinov2_vits14"], "patch_mean", "series", "modality = 'MR'")
    matrix = np.load(out / "vectors.npy")
    rows = pq.read_table(out / "rows.parquet")
    assert matrix.dtype == np.float32 and matrix.shape == (1, 384)
    np.testing.assert_array_equal(matrix, expected.matrix)
    assert rows.column("key").to_pylist() == expected.rows.column("key").to_pylist()
    assert rows.column("label").to_pylist() == ["mr"] and rows.column("n_slices").to_pylist() == [4]
    with pytest.raises(UsageError, match="non-empty directory"):
        store.export(out, "npy", model="dinov2_vits")


def test_export_refuses_wrong_requests_before_writing(two_models, tmp_path):
    store = embedstore.open(two_models[0])
    labels = write_csv(tmp_path / "by_path.csv", [{"path": "x.dcm", "label": "a"}])
    cases = [
        (dict(out=tmp_path / "a.parquet", format="csv", model="dinov2_vits"), "--format must be one of"),
        (dict(out=tmp_path / "a.parquet", format="parquet", model="dinov2"), "ambiguous"),
        (dict(out=tmp_path / "a.parquet", format="parquet", model="clip"), "no model id"),
        (dict(out=tmp_path / "missing" / "a.parquet", format="parquet", model="dinov2_vits"), "does not exist"),
        (dict(out=tmp_path, format="parquet", model="dinov2_vits"), "is a directory"),
        (dict(out=tmp_path / "a", format="npy", model="dinov2_vits", level="series", labels=labels),
         "cannot label series-level"),
        (dict(out=tmp_path / "a", format="npy", model="dinov2_vits", labels=labels), "no stored slice matches"),
        (dict(out=tmp_path / "a", format="npy", model="dinov2_vits", where="modality = 'XR'"), "no slice vectors"),
    ]
    for arguments, message in cases:
        with pytest.raises(UsageError, match=message):
            store.export(**arguments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by_path.csv"]


def test_export_from_the_command_line(two_models, tmp_path, monkeypatch, capsys):
    path, archive, ids = two_models
    out = tmp_path / "cli.parquet"
    code, stdout, stderr = run_cli_here(["export", str(path), str(out), "--format", "parquet", "--model-id", "dinov2_vits",
                                    "--feature", "patch_mean"], monkeypatch, capsys)
    assert code == 0 and stderr == ""
    assert f"{archive.n_slices} slice vectors (patch_mean, 384-d) of {ids['dinov2_vits14']}" in stdout
    expected = load_vectors(Store.open(path), ids["dinov2_vits14"], "patch_mean")
    table = pq.read_table(out)
    np.testing.assert_array_equal(np.stack(table.column("vector").to_numpy(zero_copy_only=False)), expected.matrix)

    code, stdout, stderr = run_cli_here(["export", str(path), str(tmp_path / "x"), "--format", "npy", "--model-id",
                                    "dinov2"], monkeypatch, capsys)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("embedstore: error: --model-id 'dinov2' is ambiguous")
    assert not (tmp_path / "x").exists()
    code, _, stderr = run_cli_here(["export", str(path), str(tmp_path / "y"), "--format", "hdf5", "--model-id",
                               "dinov2_vits"], monkeypatch, capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--format must be one of parquet, npy" in stderr


# ---------------------------------------------------------------------------------- docs/store-format.md

STORE_FORMAT_EXAMPLE = """
import lancedb, numpy as np, zarr
db = lancedb.connect("STORE/tables")
models = db.open_table("models").to_arrow().to_pylist()
model_id = models[0]["model_id"]
slices = db.open_table(f"slices-{model_id}").search().where("modality = 'CT'").limit(None).to_arrow()
cls = np.stack(slices.column("cls").to_numpy(zero_copy_only=False))
row = slices.slice(0, 1).to_pylist()[0]
block = models[0]["patch_layers"][-1]
patches = zarr.open_array(f"STORE/patches/{row['patch_shard']}/b{block}", mode="r")[row["patch_offset"]]
"""


def test_store_format_example_reads_without_embedstore(two_models, tmp_path):
    """The reading example of docs/store-format.md, run as written in a process that never imports embedstore."""
    path, _, _ = two_models
    script = tmp_path / "read_store.py"
    script.write_text(STORE_FORMAT_EXAMPLE.replace("STORE", str(path)) + textwrap.dedent(f"""
        import sys
        assert not [m for m in sys.modules if m.startswith("embedstore")]
        keys = np.array(slices.column("key").to_pylist())
        np.savez({str(tmp_path / "read.npz")!r}, cls=cls, patches=patches, keys=keys)
        print(model_id, row["key"], block)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model_id, key, block = result.stdout.split()
    read = np.load(tmp_path / "read.npz")

    store = embedstore.open(path)
    assert model_id == store.models()[0].model_id and int(block) == store.models()[0].patch_layers[-1]
    expected = store.vectors(model_id, "cls", where="modality = 'CT'")
    order = np.argsort(read["keys"])
    assert read["keys"][order].tolist() == expected.rows.column("key").to_pylist()
    np.testing.assert_array_equal(read["cls"][order], expected.matrix)
    assert read["patches"].dtype == np.float16
    np.testing.assert_array_equal(read["patches"], store.patches(key, model_id))
