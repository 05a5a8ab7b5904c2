"""Sources in a bucket: an S3-protocol server on a loopback port (moto's server mode, tests/s3server.py)
holding an archive, ingested through obstore and compared with the same files ingested from a folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from embedstore import samples
from embedstore.store import Store
from embedstore.store.schema import slices_table_name
from tests.s3server import S3Server, needs_s3_server
from tests.support import ingest_options, run_cli_here

pytestmark = needs_s3_server

BUCKET = "hospital-archive"


def write_archive(root: Path) -> None:
    """DICOM with and without a suffix, a generated CT series, a PNG and a NIfTI volume."""
    root.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "ct_small.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), root / "MR_NO_SUFFIX")
    samples.write_ct_series(root / "study" / "series", n_slices=5, size=64, seed=7)
    samples.write_png(root / "chest.png", samples.phantom(64, 3))
    samples.write_nifti(root / "volume.nii.gz", shape=(40, 40, 4))


def ingest_here(source, store_path: Path):
    from embedstore.pipeline.ingest import ingest

    return ingest([source], store_path, ingest_options(keep_patches=False, header_workers=0))


def vectors_by_key(store_path: Path, prefix: str) -> dict[str, np.ndarray]:
    """patch_mean by key, the source's prefix taken out of path-based keys (NIfTI, raster)."""
    store = Store.open(store_path)
    rows = store.rows(slices_table_name(store.resolve_model_id(None)), columns=["key", "patch_mean"]).to_pylist()
    return {row["key"].replace(prefix, "SRC"): np.asarray(row["patch_mean"]) for row in rows}


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3")
    archive = folder / "archive"
    write_archive(archive)
    with S3Server(folder / "server") as server:
        server.make_bucket(BUCKET)
        for path in sorted(archive.rglob("*")):
            if path.is_file():
                server.put(BUCKET, f"archive/{path.relative_to(archive)}", path.read_bytes())
        yield server, archive


@pytest.fixture
def s3_environment(bucket, monkeypatch):
    server, _ = bucket
    for name, value in server.environment.items():
        monkeypatch.setenv(name, value)
    return server


def test_a_bucket_ingest_equals_the_folder_ingest_and_a_rerun_downloads_nothing(bucket, s3_environment, tmp_path):
    server, archive = bucket
    source = f"s3://{BUCKET}/archive"
    from_folder = ingest_here(archive, tmp_path / "folder")
    before = server.gets()
    from_bucket = ingest_here(source, tmp_path / "bucket")
    # per object: a header range read (or a whole read for NIfTI/PNG) and a download to decode; the
    # suffixless one also a 4-byte magic read
    assert server.gets() - before == 2 * 9 + 1
    assert from_bucket.n_failed == from_folder.n_failed == 0
    assert from_bucket.n_embedded == from_folder.n_embedded == 1 + 1 + 5 + 1 + 4

    folder_vectors = vectors_by_key(tmp_path / "folder", str(archive))
    bucket_vectors = vectors_by_key(tmp_path / "bucket", source)
    assert folder_vectors.keys() == bucket_vectors.keys()
    assert max(np.abs(folder_vectors[k] - bucket_vectors[k]).max() for k in folder_vectors) == 0.0
    paths = Store.open(tmp_path / "bucket").rows("items", columns=["path"]).column("path").to_pylist()
    assert all(path.startswith(source + "/") for path in paths)

    before = server.gets()
    again = ingest_here(source, tmp_path / "bucket")
    assert again.n_embedded == 0 and again.catalog["files_read"] == 0
    assert server.gets() == before + 1  # the suffixless object's 4-byte magic read; nothing else


def test_a_changed_object_is_read_again_and_embedded(bucket, s3_environment, tmp_path):
    server, _ = bucket
    server.make_bucket("changing")
    paths = samples.write_ct_series(tmp_path / "series", n_slices=3, size=64, seed=9)
    for path in paths:
        server.put("changing", f"a/{path.name}", path.read_bytes())
    assert ingest_here("s3://changing/a", tmp_path / "store").n_embedded == 3
    extra = samples.write_ct_series(tmp_path / "more", n_slices=2, size=64, seed=10)
    for path in extra:
        server.put("changing", f"a/more/{path.name}", path.read_bytes())
    again = ingest_here("s3://changing/a", tmp_path / "store")
    assert again.n_embedded == 2 and again.catalog["files_read"] == 2 and again.catalog["files_unchanged"] == 3


@pytest.mark.parametrize("source, unset, endpoint, expected", [
    ("s3://no-such-bucket/archive", None, None, "the bucket does not exist"),
    (f"s3://{BUCKET}/archive", "AWS_ACCESS_KEY_ID", None, "no AWS credentials"),
    (f"s3://{BUCKET}/archive", None, "closed", "cannot list"),
    ("s3://", None, None, "s3://BUCKET"),
])
def test_bad_bucket_requests_are_one_line_and_write_nothing(s3_environment, tmp_path, monkeypatch, capsys,
                                                            source, unset, endpoint, expected):
    from tests.orthanc import free_port

    if unset:
        monkeypatch.delenv(unset)
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials either
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    store_path = tmp_path / "store"
    code, _, err = run_cli_here(["ingest", source, "--store", str(store_path), "--weights", "random"],
                                monkeypatch, capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not store_path.exists()


def test_an_instance_in_a_folder_and_a_bucket_is_one_item(s3_environment, tmp_path):
    server = s3_environment
    server.make_bucket("copies")
    paths = samples.write_ct_series(tmp_path / "folder", n_slices=3, size=64, seed=12)
    for path in paths:
        server.put("copies", f"series/{path.name}", path.read_bytes())
    from embedstore.pipeline.ingest import ingest

    summary = ingest([tmp_path / "folder", "s3://copies/series"], tmp_path / "store",
                     ingest_options(keep_patches=False, header_workers=0))
    assert summary.n_embedded == 3
    duplicates = Store.open(tmp_path / "store").rows("failures", "reason = 'duplicate_instance'",
                                                       ["path"]).column("path").to_pylist()
    assert sorted(duplicates) == sorted(f"s3://copies/series/{path.name}" for path in paths)
