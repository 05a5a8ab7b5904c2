"""`embedstore migrate`: a format-2 store converted to format 3 in place, without re-embedding.

The format-2 store is written here, with lancedb, pyarrow and zarr only, from the format-2 contract
(`git show d397bcc:docs/store-format.md`, `...:embedstore/store/schema.py`): its vectors are those of a
real ingest of the mixed archive by two models configured as format 2 ran them (antialiased bilinear
resize, ImageNet statistics): `dinov2_vits14` with random weights of seed 0 keeping the last block's
patch tokens, and the same architecture with seed 1 keeping none. That ingest's format-3 store (same
vectors, same spec) is the reference every migrated result is compared with.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest
import zarr
from zarr.codecs import ZstdCodec

from tests.support import TEST_IMAGE_SIZE, ingest_options

# ----------------------------------------------------------------------------- the format-2 contract

F2_METADATA = [
    pa.field("body_part", pa.string()),
    pa.field("series_description", pa.string()),
    pa.field("study_date", pa.string()),
    pa.field("pixel_spacing", pa.list_(pa.float64(), 2)),
]


def f2_vector(dim):
    return pa.list_(pa.float32(), dim)


def f2_slices_schema(dim):
    return pa.schema([
        pa.field("key", pa.string(), nullable=False), pa.field("model_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False), pa.field("path", pa.string(), nullable=False),
        pa.field("patient_id", pa.string()), pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False), pa.field("sop_uid", pa.string()),
        pa.field("frame", pa.int32(), nullable=False), pa.field("slice_index", pa.int32(), nullable=False),
        pa.field("modality", pa.string()), pa.field("rows", pa.int32(), nullable=False),
        pa.field("cols", pa.int32(), nullable=False), *F2_METADATA,
        pa.field("slice_thickness", pa.float64()), pa.field("image_position", pa.list_(pa.float64(), 3)),
        pa.field("image_orientation", pa.list_(pa.float64(), 6)), pa.field("slice_position", pa.float64()),
        pa.field("intensity", pa.string(), nullable=False), pa.field("cls", f2_vector(dim), nullable=False),
        pa.field("patch_mean", f2_vector(dim), nullable=False), pa.field("patch_shard", pa.string()),
        pa.field("patch_offset", pa.int64()), pa.field("run_id", pa.string(), nullable=False),
    ])


def f2_series_schema(dim):
    return pa.schema([
        pa.field("key", pa.string(), nullable=False), pa.field("model_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string()), pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False), pa.field("modality", pa.string()),
        pa.field("n_slices", pa.int32(), nullable=False), *F2_METADATA,
        pa.field("slice_spacing", pa.float64()), pa.field("spacing_deviation", pa.float64()),
        pa.field("spacing_deviation_rel", pa.float64()), pa.field("n_missing_slices", pa.int32(), nullable=False),
        pa.field("uneven_spacing", pa.bool_(), nullable=False), pa.field("cls", f2_vector(dim), nullable=False),
        pa.field("patch_mean", f2_vector(dim), nullable=False),
    ])


F2_FAILURES_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False), pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False), pa.field("message", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False), pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
])
F2_RUNS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False), pa.field("model_id", pa.string(), nullable=False),
    pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("ended_at", pa.timestamp("us", tz="UTC")), pa.field("config", pa.string(), nullable=False),
    pa.field("n_embedded", pa.int64()), pa.field("n_skipped", pa.int64()), pa.field("n_failed", pa.int64()),
    pa.field("slices_per_s", pa.float64()), pa.field("stage_seconds", pa.string()),
])
F2_ITEM_COLUMNS = ("path", "patient_id", "study_uid", "series_uid", "sop_uid", "frame", "slice_index", "modality",
                   "rows", "cols", "body_part", "series_description", "study_date", "pixel_spacing",
                   "slice_thickness", "image_position", "image_orientation", "slice_position")
F2_SERIES_IDENTITY = ("patient_id", "study_uid", "series_uid", "modality", "body_part", "series_description",
                      "study_date", "pixel_spacing", "slice_spacing", "spacing_deviation", "spacing_deviation_rel",
                      "n_missing_slices", "uneven_spacing")


def f2_model_id(spec) -> str:
    """`<name>-<weights>-<size>px-<pp tag>` as format 2 made it."""
    from embedstore.intensity import IntensityConfig
    from embedstore.store.migrate import format2_tag

    tag = format2_tag(IntensityConfig(spec.window, spec.mr_percentiles))
    return f"{spec.name}-{spec.weights_tag}-{spec.image_size}px-{tag}"


def f2_config(spec, sources, keep_patches) -> str:
    """The run config format 2 recorded: its IngestOptions, one model each."""
    return json.dumps({
        "model": spec.name, "weights": spec.weights_source, "image_size": spec.image_size, "seed": spec.seed,
        "keep_patches": keep_patches, "window": spec.window, "mr_percentiles": list(spec.mr_percentiles),
        "axis": "axial", "keep_patient_id": False, "batch_size": 4, "workers": 0, "device": "cpu",
        "precision": "fp32", "engine": "auto", "overwrite": False, "commit_rows": 4096, "executor": "local",
        "ray_address": None, "ray_actors": None, "unit_slices": 256, "show_progress": False,
        "sources": [str(s) for s in sources],
    })


def write_format2(source: Path, target: Path, sources: list[Path]) -> dict:
    """The format-3 store `source` rewritten as the format-2 store `target`: same vectors, old
    keys, old columns, patch arrays at patches/<old id>/<shard>. Returns old id → source model id."""
    from embedstore.store import Store
    from embedstore.store.schema import series_table_name, slices_table_name

    store = Store.open(source)
    target.mkdir(parents=True)
    shutil.copy(source / "patient-id.key", target / "patient-id.key")
    db = lancedb.connect(str(target / "tables"))
    items = {row["key"]: row for row in store.rows("items").to_pylist()}
    series_info = {row["series_uid"]: row for row in store.rows("series").to_pylist()}
    source_run = store.rows("runs").to_pylist()[0]
    slices, series, runs, mapping = [], [], [], {}
    for position, (model_id, spec) in enumerate(store.specs().items()):
        old_id = f2_model_id(spec)
        mapping[old_id] = model_id
        run_id = f"{source_run['run_id']}-m{position}"
        for row in store.rows(slices_table_name(model_id)).to_pylist():
            item = items[row["key"]]
            shard = None
            if row["patch_shard"]:
                shard = f"{old_id}/{row['patch_shard'].split('/', 1)[1]}"
            slices.append({"key": f"{old_id}|{row['key']}", "model_id": old_id, "item_id": row["key"],
                           **{name: item[name] for name in F2_ITEM_COLUMNS}, "intensity": row["intensity"],
                           "cls": row["cls"], "patch_mean": row["patch_mean"], "patch_shard": shard,
                           "patch_offset": row["patch_offset"], "run_id": run_id})
        for row in store.rows(series_table_name(model_id)).to_pylist():
            info = series_info[row["series_uid"]]
            series.append({"key": f"{old_id}|{row['series_uid']}", "model_id": old_id,
                           **{name: info[name] for name in F2_SERIES_IDENTITY}, "n_slices": row["n_slices"],
                           "cls": row["cls"], "patch_mean": row["patch_mean"]})
        runs.append({**{k: source_run[k] for k in ("started_at", "ended_at", "n_skipped", "n_failed",
                                                   "slices_per_s", "stage_seconds")},
                     "run_id": run_id, "model_id": old_id, "n_embedded": len(items),
                     "config": f2_config(spec, sources, bool(spec.patch_layers))})
        for group in sorted((source / "patches" / model_id).glob("*")) if spec.patch_layers else []:
            tokens = zarr.open_array(str(group / f"b{spec.patch_layers[0]}"), mode="r")[:]
            array = zarr.create_array(store=str(target / "patches" / old_id / group.name), shape=tokens.shape,
                                      chunks=(max(1, len(tokens)), *tokens.shape[1:]), dtype="float16",
                                      compressors=ZstdCodec(level=1), fill_value=0)
            array[:] = tokens
    dim = next(iter(store.specs().values())).embed_dim
    db.create_table("slices", data=pa.Table.from_pylist(slices, schema=f2_slices_schema(dim)))
    db.create_table("series", data=pa.Table.from_pylist(series, schema=f2_series_schema(dim)))
    failures = store.rows("failures").to_pylist() + [
        {"path": str(sources[0] / "broken.dcm"), "stage": "read", "reason": "truncated", "message": "ends early",
         "run_id": f"{source_run['run_id']}-m0", "time": source_run["started_at"]}]
    db.create_table("failures", data=pa.Table.from_pylist(failures, schema=F2_FAILURES_SCHEMA))
    db.create_table("runs", data=pa.Table.from_pylist(runs, schema=F2_RUNS_SCHEMA))
    manifest = {"format": "embedstore", "format_version": 2, "created_by": "embedstore 0.1.0",
                "created_at": "2026-11-01T00:00:00+00:00", "patient_ids": "hmac-sha256",
                "indexes": {"slices.cls": {"index_type": "ivf_flat", "num_partitions": 1, "nprobes": 1,
                                           "recall_at_10": 1.0}}}
    (target / "embedstore.json").write_text(json.dumps(manifest, indent=2) + "\n")  # last, as format 2 did
    return mapping


# ----------------------------------------------------------------------------- fixtures and helpers

def format2_loaded(seed: int, keep_patches: bool):
    """dinov2_vits14, random weights of `seed`, preprocessed as format 2 did: bilinear, ImageNet."""
    from embedstore.intensity import IntensityConfig
    from embedstore.models.build import load_model
    from embedstore.models.spec import IMAGENET_MEAN, IMAGENET_STD

    loaded = load_model("dinov2_vits14", "random", TEST_IMAGE_SIZE, seed, IntensityConfig(), layers=1,
                        patch_layers=(-1,) if keep_patches else (), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    loaded.spec = replace(loaded.spec, interpolation="bilinear")
    return loaded


@pytest.fixture(scope="module")
def reference(mixed_archive, tmp_path_factory):
    """The format-3 store of the two format-2-configured models (the vectors of the format-2 store)."""
    from embedstore.pipeline.ingest import ingest

    path = tmp_path_factory.mktemp("migrate-reference") / "store"
    ingest([mixed_archive.root], path, ingest_options(models=("dinov2_vits14",), patch_layers=(-1,), layers=1,
                                                      batch_size=4),
           loaded=[format2_loaded(0, True), format2_loaded(1, False)])
    return path


@pytest.fixture(scope="module")
def format2(reference, mixed_archive, tmp_path_factory):
    """(the format-2 store, old id → reference model id); tests migrate copies of it."""
    path = tmp_path_factory.mktemp("migrate-format2") / "store"
    mapping = write_format2(reference, path, [mixed_archive.root])
    return path, mapping


@pytest.fixture
def format2_copy(format2, tmp_path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(format2[0], target)
    return target


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from embedstore.cli.main import main

    monkeypatch.setattr(sys, "argv", ["embedstore", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def f2_rows(path: Path, table: str) -> list[dict]:
    return lancedb.connect(str(path / "tables")).open_table(table).to_arrow().to_pylist()


def f2_patches(path: Path) -> dict[str, np.ndarray]:
    """Format-2 key → its patch tokens, read with zarr alone."""
    return {row["key"]: zarr.open_array(str(path / "patches" / row["patch_shard"]), mode="r")[row["patch_offset"]]
            for row in f2_rows(path, "slices") if row["patch_shard"]}


def patch_mean_top_k(rows: list[dict], key: str, k: int) -> list[str]:
    """The item ids nearest (cosine) to `key` among format-2 rows of its model, itself left out."""
    query = next(r for r in rows if r["key"] == key)
    others = [r for r in rows if r["model_id"] == query["model_id"] and r["key"] != key]
    matrix = np.array([r["patch_mean"] for r in others], dtype=np.float64)
    vector = np.array(query["patch_mean"], dtype=np.float64)
    scores = matrix @ vector / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector))
    return [others[i]["item_id"] for i in np.argsort(-scores, kind="stable")[:k]]


def write_labels(path: Path, archive) -> Path:
    """Labels by `path`, one patient per file, with a split."""
    rows = [(p, "ct", split) for p, split in zip(archive.ct_paths, ("train",) * 4 + ("val", "test"))]
    rows += [(archive.nifti, "ct", "test"), (archive.multiframe, "other", "train")]
    rows += [(p, "other", split) for p, split in zip(archive.pngs, ("train", "val", "test"))]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "patient_id"])
        writer.writerows([str(p), label, split, f"patient-{i}"] for i, (p, label, split) in enumerate(rows))
    return path


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("command", [
    ["info"], ["models"], ["failures"], ["vacuum"], ["index"], ["search", "--key", "file:/x.png"],
    ["eval", "knn", "--labels", "labels.csv"],
])
def test_every_other_command_refuses_a_format2_store_naming_migrate(format2, command, monkeypatch, capsys):
    path = format2[0]
    before = (path / "embedstore.json").read_text()
    args = [*command[:2], path, *command[2:]] if command[0] == "eval" else [command[0], path, *command[1:]]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "format version 2" in err and f"embedstore migrate {path}" in err
    assert (path / "embedstore.json").read_text() == before


def test_ingest_into_a_format2_store_is_refused_before_writing(format2, mixed_archive, monkeypatch, capsys):
    path = format2[0]
    tables = sorted(lancedb.connect(str(path / "tables")).list_tables().tables)
    code, _, err = run_cli(monkeypatch, capsys, "ingest", mixed_archive.pngs[0], "--store", path, "--weights",
                           "random", "--image-size", TEST_IMAGE_SIZE, "--workers", 0, "--no-progress")
    assert code == 2 and "embedstore migrate" in err
    assert sorted(lancedb.connect(str(path / "tables")).list_tables().tables) == tables


def test_migrate_converts_rows_specs_and_manifest_without_reembedding(format2, format2_copy, reference, monkeypatch,
                                                                      capsys):
    from embedstore.store import Store
    from embedstore.store.schema import series_table_name, slices_table_name

    mapping = format2[1]
    old_slices, old_series = f2_rows(format2_copy, "slices"), f2_rows(format2_copy, "series")
    code, out, err = run_cli(monkeypatch, capsys, "migrate", format2_copy)
    assert code == 0 and err == ""
    assert len(out.strip().splitlines()) == 1 and "2 models" in out and "rebuild them with `embedstore index`" in out

    manifest = json.loads((format2_copy / "embedstore.json").read_text())
    assert manifest["format_version"] == 3 and manifest["patient_ids"] == "hmac-sha256"
    assert "indexes" not in manifest and "migration" not in manifest
    assert manifest["migrated_from"]["models"] == mapping and manifest["created_at"] == "2026-11-01T00:00:00+00:00"
    assert (format2_copy / "patient-id.key").exists() and not (format2_copy / "embedstore.json.tmp").exists()

    store, ref = Store.open(format2_copy), Store.open(reference)
    # The spec records what format 2 did; it differs from the old id only where format 2 hashed less.
    assert list(store.specs()) == list(mapping.values()) == list(ref.specs())
    for old_id, model_id in mapping.items():
        spec, ref_spec = store.spec(model_id), ref.spec(model_id)
        assert spec.model_id != old_id and spec.weights_digest in old_id and spec.weights_source == "random"
        assert (spec.interpolation, spec.mean, spec.preprocess_version, spec.cls_layers) == \
            ("bilinear", (0.485, 0.456, 0.406), 2, ())
        assert spec.patch_layers == ref_spec.patch_layers and spec.seed == ref_spec.seed
        assert asdict(spec) == {**asdict(ref_spec), "cls_layers": ()}
    assert sorted(store.db.list_tables().tables) == sorted(
        ["items", "series", "models", "failures", "runs",
         *(f(m) for m in mapping.values() for f in (slices_table_name, series_table_name))])

    # Items once, whatever the number of models; vectors and series rows exactly as format 2 held them.
    items = store.rows("items").sort_by("key").to_pylist()
    first_run = {r["item_id"]: r["run_id"] for r in old_slices if r["model_id"] == next(iter(mapping))}
    assert [{**item, "run_id": first_run[item["key"]]} for item in ref.rows("items").sort_by("key").to_pylist()] \
        == items
    for old_id, model_id in mapping.items():
        rows = {r["key"]: r for r in store.rows(slices_table_name(model_id)).to_pylist()}
        olds = [r for r in old_slices if r["model_id"] == old_id]
        assert len(rows) == len(olds) == len(items)
        for old in olds:
            row = rows[old["item_id"]]
            assert row["cls"] == old["cls"] and row["patch_mean"] == old["patch_mean"]
            assert (row["path"], row["series_uid"], row["intensity"], row["run_id"], row["patch_offset"]) == \
                (old["path"], old["series_uid"], old["intensity"], old["run_id"], old["patch_offset"])
            assert row["patch_shard"] == (None if old["patch_shard"] is None else
                                          model_id + "/" + old["patch_shard"].split("/", 1)[1])
        series = {r["key"]: r for r in store.rows(series_table_name(model_id)).to_pylist()}
        for old in (r for r in old_series if r["model_id"] == old_id):
            assert series[old["series_uid"]]["patch_mean"] == old["patch_mean"]
            assert series[old["series_uid"]]["n_slices"] == old["n_slices"]
    assert store.rows("series").sort_by("series_uid").to_pylist() == \
        ref.rows("series").sort_by("series_uid").to_pylist()
    assert store.table("failures").count_rows() == ref.table("failures").count_rows() + 1
    runs = store.rows("runs").to_pylist()
    assert sorted(tuple(r["model_ids"]) for r in runs) == sorted((m,) for m in mapping.values())
    assert not (format2_copy / "patches" / next(iter(mapping))).exists()

    code, out, _ = run_cli(monkeypatch, capsys, "info", "--json", format2_copy)
    assert code == 0 and json.loads(out)["orphan_shards"] == 0


def test_migrated_store_gives_the_same_knn_metrics_and_search_hits(format2, format2_copy, reference, mixed_archive,
                                                                   tmp_path):
    from embedstore.eval.evaluate import knn_evaluation
    from embedstore.eval.options import KnnOptions
    from embedstore.search.similar import nearest_slices
    from embedstore.store import Store
    from embedstore.store.migrate import migrate_store

    mapping = format2[1]
    labels = write_labels(tmp_path / "labels.csv", mixed_archive)
    old_slices = f2_rows(format2_copy, "slices")
    query = f"file:{mixed_archive.pngs[1]}"
    before = {old_id: patch_mean_top_k(old_slices, f"{old_id}|{query}", 5) for old_id in mapping}
    migrate_store(format2_copy)
    store, ref = Store.open(format2_copy), Store.open(reference)
    for old_id, model_id in mapping.items():
        for feature in ("patch_mean", "cls"):
            options = KnnOptions(feature=feature, k=(1, 3), search="exact")
            got = knn_evaluation(store, labels, options, model_id)
            want = knn_evaluation(ref, labels, options, model_id)
            assert without_provenance(got.to_dict()) == without_provenance(want.to_dict())
            assert got.counts == {"train": 9, "val": 2, "test": 7}
        hits = nearest_slices(store, query, k=5, feature="patch_mean", model_id=model_id)
        assert [h.key for h in hits] == before[old_id]
        ref_hits = nearest_slices(ref, query, k=5, feature="patch_mean", model_id=model_id)
        assert [(h.key, h.similarity) for h in hits] == [(h.key, h.similarity) for h in ref_hits]


def test_patch_tokens_read_back_equal(format2, format2_copy):
    from embedstore.store import Store
    from embedstore.store.migrate import migrate_store
    from embedstore.store.patches import read_patches
    from embedstore.store.schema import slices_table_name

    before = f2_patches(format2_copy)
    assert before
    migrate_store(format2_copy)
    store = Store.open(format2_copy)
    (old_id, model_id), (_, no_patches) = format2[1].items()
    spec = store.spec(model_id)
    rows = store.rows(slices_table_name(model_id)).to_pylist()
    for row in rows:
        tokens = read_patches(store.patches_root, row["patch_shard"], [row["patch_offset"]], spec.patch_layers[0])[0]
        assert tokens.shape == (spec.num_patches, spec.embed_dim)
        np.testing.assert_array_equal(tokens, before[f"{old_id}|{row['key']}"])
    assert len(rows) == len(before)
    for shard in {row["patch_shard"] for row in rows}:  # a format-3 shard: a group holding b<block>
        group = zarr.open_group(str(store.patches_root / shard), mode="r")
        assert sorted(group.array_keys()) == [f"b{spec.patch_layers[0]}"]
    assert store.spec(no_patches).patch_layers == ()
    assert store.rows(slices_table_name(no_patches), "patch_shard IS NOT NULL").num_rows == 0


def test_migrating_twice_is_refused_cleanly(format2_copy, monkeypatch, capsys):
    code, _, _ = run_cli(monkeypatch, capsys, "migrate", format2_copy)
    assert code == 0
    manifest = (format2_copy / "embedstore.json").read_text()
    code, out, err = run_cli(monkeypatch, capsys, "migrate", format2_copy)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "already at format version 3" in err
    assert (format2_copy / "embedstore.json").read_text() == manifest


def test_migrate_refuses_what_is_not_a_store(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "migrate", tmp_path)
    assert code == 2 and "not an embedstore store" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "embedstore.json").write_text(json.dumps({"format": "embedstore", "format_version": 1}))
    code, _, err = run_cli(monkeypatch, capsys, "migrate", tmp_path)
    assert code == 2 and "re-ingest" in err


def test_search_by_image_on_the_migrated_store_rebuilds_the_format2_model(format2, format2_copy, mixed_archive,
                                                                          monkeypatch, capsys):
    code, _, _ = run_cli(monkeypatch, capsys, "migrate", format2_copy)
    assert code == 0
    png = mixed_archive.pngs[2]
    for model_id in format2[1].values():
        code, out, err = run_cli(monkeypatch, capsys, "search", format2_copy, "--image", png, "--feature",
                                 "patch_mean", "--model-id", model_id, "--k", 4, "--json")
        assert code == 0, err
        by_image = json.loads(out)["hits"]
        code, out, _ = run_cli(monkeypatch, capsys, "search", format2_copy, "--key", f"file:{png}", "--feature",
                               "patch_mean", "--model-id", model_id, "--k", 3, "--json")
        by_key = json.loads(out)["hits"]
        # The image is embedded as the stored slice was (same weights, bilinear, ImageNet): it finds
        # itself first, then what its stored key finds.
        assert by_image[0]["key"] == f"file:{png}" and by_image[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
        assert [h["key"] for h in by_image[1:]] == [h["key"] for h in by_key]


@pytest.mark.parametrize("crash_at", ["build", "patches", "switch", "manifest"])
def test_an_interrupted_migration_is_finished_by_a_rerun(format2, format2_copy, mixed_archive, crash_at, monkeypatch,
                                                         capsys):
    from embedstore.store import Store
    from embedstore.store import migrate as migration
    from embedstore.store.schema import slices_table_name

    class Crash(Exception):
        """The process dying at that point."""

    def crashing(original):
        def wrapper(*args, **kwargs):
            original(*args, **kwargs)
            raise Crash(crash_at)
        return wrapper

    n = mixed_archive.n_slices
    before = f2_patches(format2_copy)
    if crash_at == "switch":  # between dropping the format-2 `failures` and creating its successor
        original = migration.switch_table

        def half_switch(store, name, schema):
            if name == "failures":
                store.db.drop_table(name)
                raise Crash(crash_at)
            original(store, name, schema)

        monkeypatch.setattr(migration, "switch_table", half_switch)
    else:
        target = {"build": "copy_series", "patches": "move_patches", "manifest": "check_patches"}[crash_at]
        monkeypatch.setattr(migration, target, crashing(getattr(migration, target)))
    with pytest.raises(Crash):
        migration.migrate_store(format2_copy)
    monkeypatch.undo()

    manifest = json.loads((format2_copy / "embedstore.json").read_text())
    assert manifest["format_version"] == 2  # still refused by every other command
    code, _, err = run_cli(monkeypatch, capsys, "info", format2_copy)
    assert code == 2 and "embedstore migrate" in err
    if crash_at == "build":
        assert "migration" not in manifest and len(f2_rows(format2_copy, "slices")) == 2 * n

    code, out, err = run_cli(monkeypatch, capsys, "migrate", format2_copy)
    assert code == 0, err
    store = Store.open(format2_copy)
    assert store.manifest["migrated_from"]["models"] == format2[1]
    assert store.table("items").count_rows() == n and store.table("series").count_rows() > 0
    assert sorted(store.db.list_tables().tables) == sorted(
        ["items", "series", "models", "failures", "runs",
         *(f"{prefix}{m}" for m in format2[1].values() for prefix in ("slices-", "series-"))])
    (old_id, model_id), _ = format2[1].items()
    rows = store.rows(slices_table_name(model_id)).to_pylist()
    assert len(rows) == n and all(r["patch_shard"].startswith(model_id + "/") for r in rows)
    from embedstore.store.patches import read_patches

    for row in rows:
        np.testing.assert_array_equal(
            read_patches(store.patches_root, row["patch_shard"], [row["patch_offset"]], 11)[0],
            before[f"{old_id}|{row['key']}"])


def test_specs_of_hub_and_file_models_are_rebuilt_without_their_weights(monkeypatch):
    import embedstore.models.build as models
    from embedstore.intensity import IntensityConfig
    from embedstore.store.migrate import format2_tag, rebuild_spec

    def no_download(*args, **kwargs):
        raise AssertionError("a migration must not download hub weights")

    monkeypatch.setattr(models, "build_from_hub", no_download)
    # No run row: the window is the one whose format-2 tag the id carries.
    old_id = f"dinov2_vits14-hub-0123456789ab-{TEST_IMAGE_SIZE}px-{format2_tag(IntensityConfig(window='lung'))}"
    spec, notes = rebuild_spec(old_id, None, keep_patches=True)
    assert (spec.weights_source, spec.weights_digest, spec.window, spec.seed) == ("hub", "0123456789ab", "lung", 0)
    assert (spec.interpolation, spec.cls_layers, spec.patch_layers) == ("bilinear", (), (spec.num_blocks - 1,))
    assert spec.model_id.startswith(f"dinov2_vits14-hub-0123456789ab-{TEST_IMAGE_SIZE}px-pp2.")
    assert spec.model_id != old_id and notes == []

    old_id = f"dinov2_vits14-file-0123456789ab-{TEST_IMAGE_SIZE}px-{format2_tag(IntensityConfig())}"
    config = {"model": "dinov2_vits14", "weights": "/nowhere/teacher.pth", "window": "auto", "mr_percentiles": [5, 95]}
    spec, notes = rebuild_spec(old_id, config, keep_patches=False)
    assert (spec.weights_source, spec.weights_file, spec.patch_layers) == ("file", "/nowhere/teacher.pth", ())
    assert len(notes) == 1 and "--weights PATH" in notes[0]


def test_an_empty_format2_store_migrates(tmp_path, monkeypatch, capsys):
    from embedstore.store import Store

    db = lancedb.connect(str(tmp_path / "tables"))  # what format 2 made before its first slice
    db.create_table("failures", schema=F2_FAILURES_SCHEMA)
    db.create_table("runs", schema=F2_RUNS_SCHEMA)
    (tmp_path / "embedstore.json").write_text(json.dumps({"format": "embedstore", "format_version": 2,
                                                          "patient_ids": "as-read"}))
    code, out, _ = run_cli(monkeypatch, capsys, "migrate", tmp_path)
    assert code == 0 and "0 models, 0 items" in out
    store = Store.open(tmp_path)
    assert store.patient_ids == "as-read" and store.specs() == {}
    assert sorted(store.db.list_tables().tables) == ["failures", "items", "models", "runs", "series"]


def without_provenance(result: dict) -> dict:
    """A result's JSON without when and from which spec record it was computed (a migrated spec records
    the layers format 2 kept): the model id, labels and every number must agree."""
    return {name: value for name, value in result.items() if name != "provenance"}
