"""Every DICOM file pydicom ships for its own tests, ingested as one archive: nothing crashes, every
file is embedded or a failure with a specific reason, and every compressed file that the codec
packages can decode is embedded.

The files come from pydicom's bundled test_files folder, listed directly:
`pydicom.data.get_testdata_files()` also tries to download pydicom's external test data, which
hangs without a network.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from embedstore.errors import DECODE_ERROR, WORKER_CRASHED
from embedstore.pipeline.ingest import ingest
from embedstore.sources.dicom import read_header
from embedstore.sources.dicom_pixels import read_dicom_pixels
from embedstore.sources.discover import file_kind
from embedstore.store import Store
from embedstore.store.schema import slices_table_name
from tests.support import ingest_options

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
COMPRESSED_FAMILIES = ("JPEG", "RLE")  # JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE


def dicom_test_files() -> list[Path]:
    return sorted(p for p in TEST_FILES.rglob("*") if p.is_file() and file_kind(p) == "dicom")


def compressed_syntax(path: Path) -> str | None:
    try:
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    except Exception:
        return None
    return syntax.name if syntax.is_compressed and syntax.name.startswith(COMPRESSED_FAMILIES) else None


def codecs_can_decode(path: Path) -> bool:
    """Independently of embedstore: does pydicom with any plugin, or GDCM's own reader, decode it?"""
    return pydicom_decodes(path) or gdcm_decodes(path)


def pydicom_decodes(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path).pixel_array.size > 0
        except Exception:
            return False


def gdcm_decodes(path: Path) -> bool:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    return bool(reader.Read()) and reader.GetImage().GetBuffer() is not None


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    files = dicom_test_files()
    assert len(files) > 80  # the whole bundled collection, not a lucky subset
    store_path = tmp_path_factory.mktemp("pydicom") / "store"
    summary = ingest([TEST_FILES], store_path, ingest_options(workers=1))  # decode in a worker: a codec crash stays contained
    store = Store.open(store_path)
    embedded = set(store.rows(slices_table_name(summary.model_ids[0]), columns=["path"]).column("path").to_pylist())
    assert set(store.rows("items", columns=["path"]).column("path").to_pylist()) == embedded
    failures = {row["path"]: row for row in store.rows("failures").to_pylist()}
    return files, summary, embedded, failures


@pytest.mark.slow  # ingests every file of pydicom's test set
def test_every_file_is_embedded_or_a_specific_failure(ingested):
    files, summary, embedded, failures = ingested
    unaccounted = [p.name for p in files if str(p) not in embedded and str(p) not in failures]
    assert unaccounted == []
    assert not embedded & set(failures)  # never both
    reasons = Counter(row["reason"] for row in failures.values())
    assert DECODE_ERROR not in reasons and WORKER_CRASHED not in reasons, reasons
    # every distinct image instance in pydicom's collection, bar the deliberately broken ones
    assert len(embedded) >= 64 and reasons["duplicate_instance"] <= 26
    assert summary.n_failed + summary.n_duplicates == len(failures)  # duplicates are counted apart


@pytest.mark.parametrize("name, reason", [
    ("MR_truncated.dcm", "truncated"),  # a cut copy of MR_small.dcm (whose intact copy is embedded): no duplicate
    ("rtplan_truncated.dcm", "truncated"),
    ("test-SR.dcm", "no_pixel_data"),
    ("waveform_ecg.dcm", "no_pixel_data"),
    ("rtplan.dcm", "no_pixel_data"),
    ("badVR.dcm", "invalid_header"),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "corrupt_stream"),
])
def test_known_bad_files_get_their_reason(ingested, name, reason):
    failures = ingested[3]
    assert failures[str(TEST_FILES / name)]["reason"] == reason


def test_every_decodable_compressed_file_is_embedded(ingested):
    """Embedded itself, or (a copy of an instance already embedded from another file) decoded by
    embedstore's reader all the same."""
    files, _, embedded, failures = ingested
    compressed = [p for p in files if compressed_syntax(p)]
    assert len(compressed) >= 30
    decodable = [p for p in compressed if codecs_can_decode(p)]
    missed = {}
    for path in decodable:
        if str(path) in embedded:
            continue
        failure = failures.get(str(path), {})
        if failure.get("reason") == "duplicate_instance":
            header = read_header(str(path))
            if read_dicom_pixels(str(path), list(range(header.n_frames))).pixels.size:
                continue
        missed[path.name] = failure.get("message")
    assert missed == {}
    # 12-bit JPEG Extended: pydicom's plugins refuse it, GDCM's own reader decodes it, so must we
    assert str(TEST_FILES / "JPEG-lossy.dcm") in embedded
