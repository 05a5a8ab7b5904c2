"""Ingest of a generated mixed archive: row counts, series, slice order, patches, resume, overwrite."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from embedstore import samples
from embedstore.intensity import IntensityConfig
from embedstore.models.build import load_model
from embedstore.models.embedder import Embedder
from embedstore.models.spec import cls_column
from embedstore.pipeline.ingest import ingest
from embedstore.preprocess import DecodeSettings, decode_task
from embedstore.sources.dicom_pixels import read_dicom_pixels
from embedstore.sources.records import ReadTask, SliceItem
from embedstore.store import Store, sql_literal
from embedstore.store.patches import read_patches
from embedstore.store.schema import STORE_FORMAT_VERSION, series_table_name, slices_table_name
from tests.support import TEST_IMAGE_SIZE, ingest_options, slice_rows


def slices_of(store_path, where=None, model_id=None):
    return slice_rows(store_path, where, model_id)


def only_model(summary) -> str:
    (model_id,) = summary.model_ids
    return model_id


def test_every_slice_embedded_once(ingested):
    summary, archive = ingested.summary, ingested.archive
    model_id = only_model(summary)
    assert summary.n_found == archive.n_slices == 18
    assert summary.n_embedded == archive.n_slices
    assert summary.embedded_by_model == {model_id: archive.n_slices}
    assert summary.n_failed == 0
    store = Store.open(ingested.path)
    assert list(store.specs()) == [model_id]
    rows = slices_of(ingested.path)
    assert len(rows) == archive.n_slices
    assert len({row["key"] for row in rows}) == len(rows)
    # one vector row per item, keyed by the item id itself (no model prefix: the table is the model's)
    items = store.rows("items", columns=["key"]).column("key").to_pylist()
    assert len(items) == len(set(items)) == archive.n_slices
    assert {row["key"] for row in rows} == set(items)
    assert all(row["key"].split(":", 1)[0] in ("dicom", "file", "nifti") and "|" not in row["key"] for row in rows)
    assert "model_id" not in store.table(slices_table_name(model_id)).schema.names


def test_series_grouping(ingested):
    rows = slices_of(ingested.path)
    by_series = {}
    for row in rows:
        by_series.setdefault(row["series_uid"], []).append(row)
    archive = ingested.archive
    # one CT series, one multi-frame MR series, one NIfTI series, each PNG its own series
    assert sorted(len(v) for v in by_series.values()) == sorted([6, 4, 5, 1, 1, 1])
    ct_series = pydicom.dcmread(archive.ct_paths[0], stop_before_pixels=True).SeriesInstanceUID
    assert {row["path"] for row in by_series[ct_series]} == {str(p) for p in archive.ct_paths}
    nifti_rows = by_series[f"file:{archive.nifti}"]
    assert {row["study_uid"] for row in nifti_rows} == {f"file:{archive.nifti}"}
    for png in archive.pngs:
        assert by_series[f"file:{png}"][0]["slice_index"] == 0


def test_ct_slices_ordered_by_position_not_file_name(ingested):
    """The CT files are named in shuffled order; slice_index must follow ImagePositionPatient."""
    archive = ingested.archive
    rows = [r for r in slices_of(ingested.path) if r["modality"] == "CT" and r["path"].endswith(".dcm")]
    by_index = sorted(rows, key=lambda r: r["slice_index"])
    assert [r["path"] for r in by_index] == [str(p) for p in archive.ct_paths]
    assert [r["slice_index"] for r in by_index] == list(range(6))
    instance_numbers = [pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber for p in archive.ct_paths]
    assert instance_numbers != sorted(instance_numbers)  # the file order alone would be wrong


def test_multiframe_one_row_per_frame_in_position_order(ingested):
    archive = ingested.archive
    rows = [r for r in slices_of(ingested.path) if r["path"] == str(archive.multiframe)]
    assert sorted(r["frame"] for r in rows) == [0, 1, 2, 3]
    # frames are stored superior → inferior, so position order reverses them
    assert {r["frame"]: r["slice_index"] for r in rows} == {0: 3, 1: 2, 2: 1, 3: 0}
    assert {r["modality"] for r in rows} == {"MR"}
    assert len({r["sop_uid"] for r in rows}) == 1


def test_nifti_slices_and_inferred_modality(ingested):
    archive = ingested.archive
    rows = [r for r in slices_of(ingested.path) if r["path"] == str(archive.nifti)]
    assert sorted(r["slice_index"] for r in rows) == list(range(5))
    assert {r["modality"] for r in rows} == {"CT"}
    assert {(r["rows"], r["cols"]) for r in rows} == {(32, 32)}


def test_ct_rescale_gives_hounsfield_units(mixed_archive):
    expected = samples.ct_series_hu(6, 40, seed=7)
    for index, path in enumerate(mixed_archive.ct_paths):
        hu = read_dicom_pixels(str(path), [0]).pixels[0]
        np.testing.assert_allclose(hu, expected[index], atol=1.0)  # slope 2 rounds to 2 HU steps


def test_patch_arrays_shape_and_offsets(ingested):
    """Every row points at its own patch tokens: recompute a few slices and compare."""
    store = Store.open(ingested.path)
    rows = slices_of(ingested.path)
    tokens = (TEST_IMAGE_SIZE // 14) ** 2
    import zarr

    spec = store.spec(only_model(ingested.summary))
    assert spec.patch_layers == (11,) and spec.cls_layers == (8, 9, 10, 11)  # the defaults: last block, last 4
    assert len({r["patch_shard"] for r in rows}) == 1  # 18 slices: one work unit, one shard
    shard = store.patches_root / rows[0]["patch_shard"]
    assert sorted(zarr.open_group(str(shard), mode="r").array_keys()) == ["b11"]  # one array per kept block
    array = zarr.open_array(str(shard / "b11"), mode="r")
    assert array.shape == (len(rows), tokens, 384)
    assert array.dtype == np.float16
    assert sorted(r["patch_offset"] for r in rows) == list(range(len(rows)))

    loaded = load_model("dinov2_vits14", "random", TEST_IMAGE_SIZE)
    assert loaded.spec == spec  # what ingest recorded is what load_model builds
    embedder = Embedder(loaded)
    settings = DecodeSettings(IntensityConfig(), TEST_IMAGE_SIZE, (spec.interpolation,))
    for row in rows[::5]:
        kind = "dicom" if row["sop_uid"] else ("nifti" if row["path"].endswith(".nii.gz") else "raster")
        item = SliceItem(row["key"], row["path"], row["study_uid"], row["series_uid"], row["slice_index"],
                         frame=row["frame"], modality=row["modality"])
        task = ReadTask(kind, row["path"], [item])
        expected = embedder.embed(decode_task(task, settings).pixels[spec.interpolation])
        stored = read_patches(store.patches_root, row["patch_shard"], [row["patch_offset"]], 11)
        np.testing.assert_allclose(stored[0].astype(np.float32), expected.patches[0, 0].astype(np.float32), atol=2e-2)
        np.testing.assert_allclose(np.asarray(row["cls"]), expected.cls[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(row["patch_mean"]), expected.patch_mean[0], rtol=1e-4, atol=1e-4)
        for position, block in enumerate(spec.cls_layers):
            np.testing.assert_allclose(np.asarray(row[cls_column(block)]), expected.cls_layers[0, position],
                                       rtol=1e-4, atol=1e-4)
        # DINOv2's pooled feature is the last block's final-norm CLS token
        np.testing.assert_allclose(np.asarray(row["cls_b11"]), np.asarray(row["cls"]), rtol=1e-4, atol=1e-4)


def test_series_rows_hold_mean_of_slice_vectors(ingested):
    store = Store.open(ingested.path)
    model_id = only_model(ingested.summary)
    described = {row["series_uid"]: row for row in store.rows("series").to_pylist()}
    series = store.rows(series_table_name(model_id)).to_pylist()
    assert len(series) == len(described) == 6
    columns = ["cls", "patch_mean", *(cls_column(block) for block in store.spec(model_id).cls_layers)]
    for row in series:
        assert row["key"] == row["series_uid"]
        slices = store.rows(slices_table_name(model_id), f"series_uid = {sql_literal(row['series_uid'])}").to_pylist()
        items = store.rows("items", f"series_uid = {sql_literal(row['series_uid'])}").to_pylist()
        assert row["n_slices"] == described[row["series_uid"]]["n_slices"] == len(slices) == len(items)
        assert row["study_uid"] == described[row["series_uid"]]["study_uid"]
        for column in columns:
            np.testing.assert_allclose(row[column], np.mean([s[column] for s in slices], axis=0),
                                       rtol=1e-5, atol=1e-6)


def test_rows_committed_in_large_batches(ingested):
    """Batch size 4 over 18 slices is 5 model batches, but one commit: versions do not grow per batch."""
    store = Store.open(ingested.path)
    for table in ("items", slices_table_name(only_model(ingested.summary))):
        assert len(store.table(table).list_versions()) <= 2, table  # create + one commit
        assert store.table(table).stats()["fragment_stats"]["num_fragments"] == 1, table


def test_resume_adds_nothing(fresh_copy, mixed_archive):
    summary = ingest([mixed_archive.root], fresh_copy, ingest_options())
    assert summary.n_embedded == 0
    assert summary.n_skipped == mixed_archive.n_slices
    store = Store.open(fresh_copy)
    assert store.table(slices_table_name(only_model(summary))).count_rows() == mixed_archive.n_slices
    assert store.table("items").count_rows() == mixed_archive.n_slices


def test_resume_embeds_only_missing(fresh_copy, ingested):
    store = Store.open(fresh_copy)
    model_id = only_model(ingested.summary)
    nifti = str(ingested.archive.nifti)
    store.table(slices_table_name(model_id)).delete(f"path = {sql_literal(nifti)} AND slice_index >= 3")
    summary = ingest([ingested.archive.root], fresh_copy, ingest_options())
    assert (summary.n_embedded, summary.n_skipped) == (2, 16)
    assert summary.embedded_by_model == {model_id: 2}
    rows = slices_of(fresh_copy)
    assert len(rows) == 18 and len({r["key"] for r in rows}) == 18
    assert Store.open(fresh_copy).table("items").count_rows() == 18  # items already there are not added again
    where = f"series_uid = {sql_literal('file:' + nifti)}"
    for table in ("series", series_table_name(model_id)):
        series = Store.open(fresh_copy).rows(table, where).to_pylist()
        assert len(series) == 1 and series[0]["n_slices"] == 5, table


def test_overwrite_rebuilds(fresh_copy, ingested):
    summary = ingest([ingested.archive.root], fresh_copy, ingest_options(overwrite=True))
    model_id = only_model(summary)
    assert model_id == only_model(ingested.summary)
    assert summary.n_embedded == 18 and summary.n_skipped == 0
    store = Store.open(fresh_copy)
    rows = store.rows(slices_table_name(model_id)).to_pylist()
    assert len(rows) == 18
    assert {r["run_id"] for r in rows} == {summary.run_id}
    assert store.table("items").count_rows() == 18 and store.table(series_table_name(model_id)).count_rows() == 6
    assert list(store.specs()) == [model_id]  # the spec row was replaced, not doubled
    shards = {r["patch_shard"] for r in rows}
    assert all(s.startswith(f"{model_id}/{summary.run_id}") for s in shards)
    old_shards = list((store.patches_root / model_id).iterdir())
    assert {f"{model_id}/{p.name}" for p in old_shards} == shards  # old shards are gone


def test_slices_that_different_models_lack_are_each_counted_once(mixed_archive, tmp_path):
    """One model lacks two slices, the other a third: three slices embedded, the rest skipped."""
    sources = [mixed_archive.nifti, *mixed_archive.pngs]  # 5 + 3 slices
    options = ingest_options(models=("dinov2_vits14", "dinov2_vits14_reg"), keep_patches=False)
    first = ingest(sources, tmp_path / "s", options)
    a, b = first.model_ids
    assert first.n_embedded == 8 and first.embedded_by_model == {a: 8, b: 8}
    store = Store.open(tmp_path / "s")
    store.table(slices_table_name(a)).delete(f"path = {sql_literal(str(mixed_archive.nifti))} AND slice_index >= 3")
    store.table(slices_table_name(b)).delete(f"path = {sql_literal(str(mixed_archive.pngs[0]))}")
    again = ingest(sources, tmp_path / "s", options)
    assert again.embedded_by_model == {a: 2, b: 1}
    assert (again.n_found, again.n_embedded, again.n_skipped, again.n_failed) == (8, 3, 5, 0)
    assert all(len(store.committed_keys(model_id)) == 8 for model_id in (a, b))
    assert store.table("items").count_rows() == 8


def test_no_patches_leaves_offsets_null(mixed_archive, tmp_path):
    summary = ingest([mixed_archive.pngs[0]], tmp_path / "s", ingest_options(keep_patches=False))
    rows = slices_of(tmp_path / "s")
    assert summary.n_embedded == 1 and len(rows) == 1
    assert Store.open(tmp_path / "s").spec(only_model(summary)).patch_layers == ()
    assert rows[0]["patch_shard"] is None and rows[0]["patch_offset"] is None
    assert not (tmp_path / "s" / "patches").exists()


def test_second_model_in_same_store_is_kept_apart(fresh_copy, ingested):
    summary = ingest([ingested.archive.pngs[0]], fresh_copy, ingest_options(seed=1))
    assert summary.n_embedded == 1  # other weights → other model_id → not skipped
    model_id, first = only_model(summary), only_model(ingested.summary)
    assert model_id != first
    store = Store.open(fresh_copy)
    png_key = f"file:{ingested.archive.pngs[0]}"
    assert store.committed_keys(model_id) == {png_key}
    assert len(store.committed_keys(first)) == 18 and png_key in store.committed_keys(first)  # untouched
    assert store.table("items").count_rows() == 18  # the slice is one item, whatever the number of models
    assert list(store.specs()) == [first, model_id]
    assert store.rows(series_table_name(model_id)).column("key").to_pylist() == [png_key]


@pytest.mark.slow
def test_worker_processes_give_identical_rows(mixed_archive, ingested, tmp_path):
    summary = ingest([mixed_archive.root], tmp_path / "s", ingest_options(workers=2, batch_size=5))
    assert summary.n_embedded == 18
    inline = {r["key"]: r for r in slices_of(ingested.path)}
    pooled = {r["key"]: r for r in slices_of(tmp_path / "s")}
    assert inline.keys() == pooled.keys()
    for key, row in pooled.items():
        assert row["slice_index"] == inline[key]["slice_index"]
        np.testing.assert_allclose(row["cls"], inline[key]["cls"], rtol=1e-4, atol=1e-5)


def test_runs_table_records_the_run(ingested):
    runs = Store.open(ingested.path).rows("runs").to_pylist()
    run = next(r for r in runs if r["run_id"] == ingested.summary.run_id)
    assert run["model_ids"] == ingested.summary.model_ids
    assert run["n_embedded"] == 18 and run["ended_at"] is not None and run["slices_per_s"] > 0
    assert '"weights": "random"' in run["config"]


def test_unknown_store_version_is_refused(fresh_copy):
    from embedstore.errors import StoreFormatError

    manifest = fresh_copy / "embedstore.json"
    manifest.write_text(manifest.read_text().replace(f'"format_version": {STORE_FORMAT_VERSION}',
                                                     '"format_version": 99'))
    with pytest.raises(StoreFormatError, match="version 99"):
        Store.open(fresh_copy)


def test_info_counts(ingested):
    from embedstore.store.info import store_info

    info = store_info(Store.open(ingested.path))
    model_id = only_model(ingested.summary)
    assert info["format_version"] == STORE_FORMAT_VERSION
    assert info["tables"]["items"] == 18 and info["tables"]["series"] == 6
    assert info["tables"][slices_table_name(model_id)] == 18 and info["tables"][series_table_name(model_id)] == 6
    assert info["tables"]["models"] == 1
    assert (info["slices"], info["series"], info["studies"]) == (18, 6, 6)
    counts = info["models"][model_id]
    assert {k: counts[k] for k in ("slices", "series", "studies", "patients")} == \
        {"slices": 18, "series": 6, "studies": 6, "patients": 2}
    assert (counts["embed_dim"], counts["cls_layers"], counts["patch_layers"]) == (384, [8, 9, 10, 11], [11])
    assert info["modalities"] == {"CT": 11, "MR": 4, "(none)": 3}
    assert info["patch_bytes"] > 0


@pytest.mark.parametrize("axis, n_slices", [("coronal", 32), ("sagittal", 32)])
def test_nifti_axis_option(mixed_archive, tmp_path, axis, n_slices):
    summary = ingest([mixed_archive.nifti], tmp_path / "store", ingest_options(axis=axis, keep_patches=False))
    assert summary.n_embedded == n_slices
    rows = slices_of(tmp_path / "store")
    assert {r["series_uid"] for r in rows} == {f"file:{mixed_archive.nifti}#{axis}"}
    assert all(f":{axis}:" in r["key"] for r in rows)
    positions = [r["slice_position"] for r in sorted(rows, key=lambda r: r["slice_index"])]
    assert positions == sorted(positions) and len(set(positions)) == n_slices


def test_4d_nifti_gives_one_series_per_volume(tmp_path):
    import nibabel as nib

    volume = np.stack([np.full((16, 16, 3), 100.0 * t) + np.arange(16)[:, None, None] for t in range(4)], axis=-1)
    path = tmp_path / "perfusion.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([2.0, 2.0, 4.0, 1.0])), str(path))
    summary = ingest([path], tmp_path / "store", ingest_options(keep_patches=False))
    assert summary.n_embedded == 4 * 3
    series = Store.open(tmp_path / "store").rows("series").to_pylist()
    assert sorted(r["series_uid"] for r in series) == [f"file:{path}#t{t}" for t in range(4)]
    assert all(r["n_slices"] == 3 and r["slice_spacing"] == pytest.approx(4.0) for r in series)
