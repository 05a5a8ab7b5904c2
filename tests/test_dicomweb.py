"""Ingest straight from a PACS: a real Orthanc with its DICOMweb plugin on a loopback port
(tests/orthanc.py), against the same files ingested from a folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from embedstore import samples
from embedstore.store import Store
from embedstore.store.schema import slices_table_name
from tests.orthanc import Orthanc, RefusingProxy, needs_orthanc
from tests.support import TEST_IMAGE_SIZE, ingest_options, run_cli_here

pytestmark = needs_orthanc

REPO = Path(__file__).resolve().parents[1]
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm")
COLUMNS = ["key", "series_uid", "slice_index", "sop_uid", "frame", "modality", "study_uid"]


def write_archive(root: Path) -> list[Path]:
    """pydicom's CT and MR test files and a generated CT study of two series."""
    root.mkdir(parents=True)
    paths = [Path(shutil.copy(get_testdata_file(name), root / name)) for name in PYDICOM_FILES]
    for series in range(2):
        paths += samples.write_ct_series(root / f"study/series{series}", n_slices=6, size=64, seed=10 + series,
                                         patient_id="P-PACS")
    return paths


def ingest_here(source, store_path: Path, **overrides):
    from embedstore.pipeline.ingest import ingest

    return ingest([source], store_path, ingest_options(**{"keep_patches": False, "header_workers": 0, **overrides}))


def items_of(store_path: Path) -> list[dict]:
    return sorted(Store.open(store_path).rows("items", columns=COLUMNS).to_pylist(), key=lambda row: row["key"])


def vectors_of(store_path: Path) -> dict[str, np.ndarray]:
    store = Store.open(store_path)
    rows = store.rows(slices_table_name(store.resolve_model_id(None)), columns=["key", "patch_mean"]).to_pylist()
    return {row["key"]: np.asarray(row["patch_mean"]) for row in rows}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pacs")
    paths = write_archive(folder / "archive")
    with Orthanc(folder / "orthanc") as server:
        server.upload(paths)
        yield server, folder / "archive"


def test_a_pacs_ingest_equals_the_folder_ingest_and_a_rerun_downloads_nothing(pacs, tmp_path):
    server, archive = pacs
    from_folder = ingest_here(archive, tmp_path / "folder")
    before = server.retrievals()
    from_pacs = ingest_here(server.dicomweb, tmp_path / "pacs")
    assert from_pacs.n_failed == 0 and from_pacs.n_embedded == from_folder.n_embedded == 2 + 12
    assert server.retrievals() - before == 14  # each instance retrieved once

    assert items_of(tmp_path / "pacs") == items_of(tmp_path / "folder")
    folder_vectors, pacs_vectors = vectors_of(tmp_path / "folder"), vectors_of(tmp_path / "pacs")
    assert folder_vectors.keys() == pacs_vectors.keys()
    assert max(np.abs(folder_vectors[k] - pacs_vectors[k]).max() for k in folder_vectors) == 0.0

    paths = Store.open(tmp_path / "pacs").rows("items", columns=["path"]).column("path").to_pylist()
    assert all(path.startswith(server.dicomweb + "/studies/") for path in paths)
    run = Store.open(tmp_path / "pacs").rows("runs").to_pylist()[0]
    assert server.dicomweb in json.loads(run["config"])["sources"]

    before = server.retrievals()
    again = ingest_here(server.dicomweb, tmp_path / "pacs")
    assert again.n_embedded == 0 and again.catalog["files_read"] == 0
    assert server.retrievals() == before

    # read-back: the service's thumbnails come from the PACS, the same pixels as from the files
    key = next(row["key"] for row in items_of(tmp_path / "pacs") if row["modality"] == "CT")
    url = f"/thumbnails/{quote(key, safe='')}.png"
    from_files = thumbnail_client(tmp_path / "folder", tmp_path / "cache-folder").get(url)
    from_server = thumbnail_client(tmp_path / "pacs", tmp_path / "cache-pacs").get(url)
    assert from_server.status_code == from_files.status_code == 200
    assert from_server.content == from_files.content
    assert server.retrievals() == before + 1


def thumbnail_client(store_path: Path, cache: Path):
    from fastapi.testclient import TestClient

    from embedstore.serve.app import ServeSettings, create_app

    return TestClient(create_app(ServeSettings(store_path, cache_folder=cache)))


def test_a_query_narrows_the_ingest_to_its_series(pacs, tmp_path):
    server, _ = pacs
    summary = ingest_here(server.dicomweb, tmp_path / "store", query="Modality=MR")
    assert summary.n_embedded == 1
    assert {row["modality"] for row in items_of(tmp_path / "store")} == {"MR"}
    ct_studies = ingest_here(server.dicomweb, tmp_path / "ct", query="ModalitiesInStudy=CT&PatientID=P-PACS")
    assert ct_studies.n_embedded == 12
    assert ct_studies.catalog["files_gone"] == 0


@pytest.mark.parametrize("source, query, expected", [
    ("dicomweb+http://127.0.0.1:{closed}/dicom-web", None, "cannot reach DICOMweb server"),
    ("{root}/no-such-service", None, "no DICOMweb service answers"),
    ("{dicomweb}", "Modality", "is not KEYWORD=VALUE"),
    ("{dicomweb}", "NoSuchKeyword=1", "is not a DICOM attribute keyword"),
    ("dicomweb+http://user:secret@127.0.0.1:{port}/dicom-web", None, "credentials do not go in"),
])
def test_bad_dicomweb_requests_are_one_line_and_write_nothing(pacs, tmp_path, monkeypatch, capsys,
                                                               source, query, expected):
    from tests.orthanc import free_port

    server, _ = pacs
    source = source.format(closed=free_port(), root=server.dicomweb.removesuffix("/dicom-web"),
                           dicomweb=server.dicomweb, port=server.port)
    store_path = tmp_path / "store"
    code, out, err = run_cli_here(["ingest", source, "--store", str(store_path), "--weights", "random",
                                   *(["--query", query] if query else [])], monkeypatch, capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not store_path.exists()


def test_credentials_are_asked_for_and_never_stored(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "archive"
    paths = samples.write_ct_series(archive, n_slices=3, size=64, seed=3)
    password = "pacs-secret-7781"
    with Orthanc(tmp_path / "orthanc", users={"pacs-user-5521": password}) as server:
        server.upload(paths)
        store_path = tmp_path / "store"
        code, _, err = run_cli_here(["ingest", server.dicomweb, "--store", str(store_path), "--weights", "random"],
                                    monkeypatch, capsys)
        assert code == 2 and "refused access (HTTP 401)" in err and not store_path.exists(), err

        monkeypatch.setenv("EMBEDSTORE_DICOMWEB_USER", "pacs-user-5521")
        monkeypatch.setenv("EMBEDSTORE_DICOMWEB_PASSWORD", password)
        summary = ingest_here(server.dicomweb, store_path)
    assert summary.n_embedded == 3 and summary.n_failed == 0
    stored = b"".join(path.read_bytes() for path in store_path.rglob("*") if path.is_file())
    assert password.encode() not in stored and b"pacs-user-5521" not in stored


def test_an_instance_the_server_will_not_give_is_a_failure_and_the_run_goes_on(tmp_path):
    paths = samples.write_ct_series(tmp_path / "archive", n_slices=3, size=64, seed=21)
    lost = str(pydicom.dcmread(paths[1], stop_before_pixels=True).SOPInstanceUID)
    with Orthanc(tmp_path / "orthanc") as server, RefusingProxy(server, lost) as proxy:
        server.upload(paths)
        summary = ingest_here(proxy.dicomweb, tmp_path / "store")
    assert summary.n_embedded == 2 and summary.n_failed == 1
    failure = Store.open(tmp_path / "store").rows("failures", "reason = 'retrieve_failed'").to_pylist()
    assert len(failure) == 1 and "HTTP 404" in failure[0]["message"] and failure[0]["path"].endswith(lost)


KILL_SCRIPT = """
import sys
from pathlib import Path
from embedstore.cli.main import main
sys.argv = ["embedstore", "ingest", sys.argv[1], "--store", sys.argv[2], "--weights", "random", "--image-size",
            "{size}", "--no-patches", "--no-progress", "--workers", "0", "--header-workers", "0"]
main()
"""


@pytest.mark.slow
def test_a_server_that_dies_mid_ingest_stops_the_run_and_a_rerun_finishes(tmp_path, monkeypatch, capsys):
    archive = tmp_path / "archive"
    # Six series of 52: a first work unit of five (260 >= UNIT_SLICES 256), committed before the server goes.
    paths = [p for s in range(6) for p in samples.write_ct_series(archive / f"s{s}", n_slices=52, size=64, seed=s)]
    store_path = tmp_path / "store"
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        server.upload(paths)
        ingest = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(size=TEST_IMAGE_SIZE), server.dicomweb,
                                   str(store_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while server.retrievals() < 270 and time.monotonic() < deadline and ingest.poll() is None:
            time.sleep(0.05)
        server.stop()
        _, err = ingest.communicate(timeout=120)
        assert ingest.returncode == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and server.url in lines[0] and "committed" in lines[0], err
        server.start()
        summary = ingest_here(server.dicomweb, store_path)
    finally:
        server.stop()
    keys = Store.open(store_path).rows("items", columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 312
    assert 0 < summary.n_embedded < 312
    code, out, _ = run_cli_here(["check", str(store_path), "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["clean"]
