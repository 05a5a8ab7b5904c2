"""Archive-grade DICOM on a generated PACS-like export: series split and ordered, spacing flags,
photometric handling, windows, metadata, patient privacy, and every bad file as a specific failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from embedstore import samples
from embedstore.errors import UsageError
from embedstore.intensity import CT_WINDOWS, IntensityConfig
from embedstore.pipeline.ingest import ingest
from embedstore.preprocess import DecodedFile, DecodeSettings, decode_task
from embedstore.sources.dicom import read_header
from embedstore.sources.dicom_pixels import read_dicom_pixels
from embedstore.sources.records import ReadTask, SliceItem
from embedstore.store import Store
from tests.support import TEST_IMAGE_SIZE, ingest_options, slice_rows

NAMES = ("Doe", "Jane", "Poe", "Edgar")  # the generated patients' names: must never reach the store
MPEG2 = "1.2.840.10008.1.2.4.100"


def write_localizer(path: Path, like: Path) -> Path:
    """A coronal scout of another size, filed under the same SeriesInstanceUID as `like`."""
    ds = pydicom.dcmread(like)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["localizer"])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [0.0, 50.0, 100.0]
    pixels = np.full((32, 48), 1024, np.uint16)
    ds.Rows, ds.Columns, ds.PixelData = 32, 48, pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_with_new_study(path: Path, like: Path) -> Path:
    """A slice claiming `like`'s series but another study: an inconsistent series member."""
    ds = pydicom.dcmread(like)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["stray"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["another study"])
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mpeg2(path: Path, like: Path) -> Path:
    """A file in a transfer syntax no codec package decodes (MPEG2 video)."""
    ds = pydicom.dcmread(like)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["mpeg"])
    ds.file_meta.TransferSyntaxUID = MPEG2
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_corrupt_j2k(path: Path) -> Path:
    """pydicom's lossless JPEG 2000 MR with the start of its codestream overwritten."""
    data = bytearray(Path(get_testdata_file("MR_small_jp2klossless.dcm")).read_bytes())
    start = data.index(b"\xff\x4f\xff\x51")  # SOC + SIZ: the codestream header
    data[start:start + 48] = bytes(48)
    path.write_bytes(bytes(data))
    return path


def write_truncated(path: Path, like: Path, fraction: float) -> Path:
    ds = pydicom.dcmread(like)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["cut", str(fraction)])
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


class Archive:
    def __init__(self, root: Path):
        exam = root / "exam"  # one PACS folder: a CT series, its localizer, a second series
        self.ct = samples.write_ct_series(exam, n_slices=6, size=40, seed=11, prefix="A", body_part="CHEST")
        self.series_uid = str(pydicom.dcmread(self.ct[0]).SeriesInstanceUID)
        self.localizer = write_localizer(exam / "LOC0001.dcm", self.ct[0])
        self.second = samples.write_ct_series(exam, n_slices=4, size=40, seed=12, prefix="B", patient_id="PAT-CT")
        self.gap = samples.write_ct_series(root / "gap", n_slices=5, size=32, seed=13,
                                           positions_mm=[0.0, 2.5, 5.0, 10.0, 12.5])
        self.uneven = samples.write_ct_series(root / "uneven", n_slices=5, size=32, seed=14,
                                              positions_mm=[0.0, 2.5, 5.6, 7.5, 10.0])
        image = samples.phantom(48, 40)
        self.xray_m2 = samples.write_xray(root / "xray" / "m2.dcm", image, window=(1800.0, 2400.0))
        self.xray_m1 = samples.write_xray(root / "xray" / "m1.dcm", image, monochrome1=True, window=(1800.0, 2400.0))
        bad = root / "bad"
        bad.mkdir()
        spare = samples.write_ct_series(root / "spare", n_slices=1, size=40, seed=15, patient_id="PAT-X")[0]
        self.bad = {
            "truncated": write_truncated(bad / "cut.dcm", spare, 0.7),
            "no_pixel_data": Path(shutil.copy(get_testdata_file("test-SR.dcm"), bad / "report.dcm")),
            "unsupported_transfer_syntax": write_mpeg2(bad / "video.dcm", spare),
            "corrupt_stream": write_corrupt_j2k(bad / "j2k.dcm"),
            "inconsistent_series": write_with_new_study(exam / "STRAY.dcm", self.ct[0]),
            "not_dicom": bad / "notes.dcm",
        }
        self.bad["not_dicom"].write_text("exported by hand, not a DICOM file\n")
        shutil.rmtree(root / "spare")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    return Archive(tmp_path_factory.mktemp("pacs"))


@pytest.fixture(scope="module")
def store(archive, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "store"
    ingest([archive.ct[0].parent.parent], path, ingest_options())
    return path


def rows(store_path: Path, table: str) -> list[dict]:
    """A table's rows; "slices": the model's slice rows, each with its item's columns."""
    if table == "slices":
        return slice_rows(store_path)
    return Store.open(store_path).rows(table).to_pylist()


def by_series(store_path: Path) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows(store_path, "slices"):
        grouped.setdefault(row["series_uid"], []).append(row)
    return {uid: sorted(members, key=lambda r: r["slice_index"]) for uid, members in grouped.items()}


# ------------------------------------------------------------------------------------ series


def test_localizer_is_split_from_its_series_and_slices_follow_position(archive, store):
    series = by_series(store)
    axial = series[f"{archive.series_uid}#40x40-axial"]
    assert [row["path"] for row in axial] == [str(p) for p in archive.ct]  # position order, not file names
    assert [row["image_position"][2] for row in axial] == [2.5 * i for i in range(6)]
    localizer = series[f"{archive.series_uid}#32x48-coronal"]
    assert [row["path"] for row in localizer] == [str(archive.localizer)]
    assert archive.series_uid not in series  # no unsplit mixture left behind


def test_second_series_in_the_same_folder_stays_apart(archive, store):
    second_uid = str(pydicom.dcmread(archive.second[0]).SeriesInstanceUID)
    second = by_series(store)[second_uid]
    assert [row["path"] for row in second] == [str(p) for p in archive.second]


def series_row(store_path: Path, first_file: Path) -> dict:
    uid = str(pydicom.dcmread(first_file).SeriesInstanceUID)
    return next(r for r in rows(store_path, "series") if r["series_uid"] == uid)


def test_missing_slice_is_flagged(archive, store):
    row = series_row(store, archive.gap[0])
    assert row["n_missing_slices"] == 1
    assert row["slice_spacing"] == pytest.approx(2.5)
    assert not row["uneven_spacing"]


def test_uneven_spacing_is_flagged_with_its_deviation(archive, store):
    row = series_row(store, archive.uneven[0])
    assert row["uneven_spacing"]
    assert row["n_missing_slices"] == 0
    assert row["spacing_deviation"] == pytest.approx(0.6, abs=1e-6)
    assert row["spacing_deviation_rel"] == pytest.approx(0.6 / row["slice_spacing"])


def test_even_series_is_not_flagged(archive, store):
    row = series_row(store, archive.second[0])
    assert (row["n_missing_slices"], row["uneven_spacing"], row["spacing_deviation"]) == (0, False, 0.0)


def test_info_counts_flagged_series(store):
    from embedstore.store.info import store_info

    summary = store_info(Store.open(store))
    assert (summary["series_with_missing_slices"], summary["series_with_uneven_spacing"]) == (1, 1)
    assert summary["failures_by_reason"]["truncated"] == 1


def test_metadata_columns(archive, store):
    row = by_series(store)[f"{archive.series_uid}#40x40-axial"][0]
    assert row["body_part"] == "CHEST"
    assert row["series_description"] == "generated axial CT"
    assert row["study_date"] == "2024-01-31"
    assert row["pixel_spacing"] == [0.7, 0.7]
    assert row["slice_thickness"] == 2.5
    assert row["image_orientation"] == [1, 0, 0, 0, 1, 0]
    assert row["intensity"] == "ct:study"


# ------------------------------------------------------------------------------- bad input


def test_every_bad_file_is_one_failure_with_its_own_reason(archive, store):
    failures = {row["path"]: row for row in rows(store, "failures")}
    assert {failures[str(path)]["reason"]: str(path) for path in archive.bad.values()} == \
        {reason: str(path) for reason, path in archive.bad.items()}
    assert "MPEG2" in failures[str(archive.bad["unsupported_transfer_syntax"])]["message"]
    embedded_paths = {row["path"] for row in rows(store, "slices")}
    assert not embedded_paths & {str(path) for path in archive.bad.values()}


def test_failures_command_filters_by_reason(archive, store, capsys):
    from embedstore.cli.main import app

    app(["failures", str(store), "--reason", "inconsistent_series", "--json"], standalone_mode=False)
    listed = json.loads(capsys.readouterr().out)
    assert [row["path"] for row in listed] == [str(archive.bad["inconsistent_series"])]


def test_a_broken_copy_of_an_instance_falls_back_to_an_intact_one(archive, tmp_path):
    folder = tmp_path / "copies"
    folder.mkdir()
    intact = folder / "B_copy.dcm"
    shutil.copy(archive.ct[2], intact)
    broken = folder / "A_copy.dcm"  # read first: same SOP instance, cut short
    broken.write_bytes(archive.ct[2].read_bytes()[:-500])
    summary = ingest([folder], tmp_path / "store", ingest_options())
    assert summary.n_embedded == 1
    assert [row["path"] for row in rows(tmp_path / "store", "slices")] == [str(intact)]
    assert [(row["path"], row["reason"]) for row in rows(tmp_path / "store", "failures")] == [(str(broken), "truncated")]


def test_a_second_copy_of_an_instance_is_a_duplicate(archive, tmp_path):
    folder = tmp_path / "copies"
    folder.mkdir()
    for name in ("A.dcm", "B.dcm"):
        shutil.copy(archive.ct[2], folder / name)
    ingest([folder], tmp_path / "store", ingest_options())
    assert [row["path"] for row in rows(tmp_path / "store", "slices")] == [str(folder / "A.dcm")]
    failures = rows(tmp_path / "store", "failures")
    assert [(row["path"], row["reason"]) for row in failures] == [(str(folder / "B.dcm"), "duplicate_instance")]
    assert str(folder / "A.dcm") in failures[0]["message"]


def test_truncated_dicom_is_an_error_at_every_cut(archive, tmp_path):
    """pydicom alone returns a partial dataset for most of these cuts; embedstore never does."""
    original = archive.ct[3].read_bytes()
    cut = tmp_path / "cut.dcm"
    for fraction in np.linspace(0.3, 0.995, 25):
        cut.write_bytes(original[: int(len(original) * fraction)])
        with pytest.raises(Exception) as caught:
            header = read_header(str(cut))
            read_dicom_pixels(str(cut), list(range(header.n_frames)))
        assert getattr(caught.value, "reason", None) == "truncated", (fraction, caught.value)


# -------------------------------------------------------------------- photometric, windows


def dicom_task(path: Path, modality: str, body_part: str | None = None) -> ReadTask:
    item = SliceItem(f"dicom:{path}:0", str(path), "study", "series", 0, frame=0, modality=modality,
                     body_part=body_part)
    return ReadTask("dicom", str(path), [item])


def decode(task: ReadTask, config: IntensityConfig, size: int) -> tuple[DecodedFile, np.ndarray]:
    """The decoded task and its pixels resized as DINOv2 asks (bicubic)."""
    decoded = decode_task(task, DecodeSettings(config, size, ("bicubic",)))
    assert list(decoded.pixels) == ["bicubic"]
    return decoded, decoded.pixels["bicubic"]


def test_monochrome1_is_inverted(archive):
    config = IntensityConfig()
    plain, plain_pixels = decode(dicom_task(archive.xray_m2, "DX"), config, TEST_IMAGE_SIZE)
    inverted, inverted_pixels = decode(dicom_task(archive.xray_m1, "DX"), config, TEST_IMAGE_SIZE)
    assert plain.intensity == "voi" and inverted.intensity == "voi+inverted"
    np.testing.assert_allclose(inverted_pixels, plain_pixels, atol=1e-5)
    assert np.abs(plain_pixels - (1.0 - plain_pixels)).max() > 0.5  # so the test could tell the two apart


def test_xray_voi_window_is_honoured(archive):
    native = read_dicom_pixels(str(archive.xray_m2), [0])
    assert native.windows == [(600.0, 3000.0)]
    unit = decode(dicom_task(archive.xray_m2, "DX"), IntensityConfig(), native.pixels.shape[-1])[1][0, 0]
    expected = np.clip(native.pixels[0], 600.0, 3000.0)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(unit, expected, atol=1e-5)


def test_xray_voi_lut_sequence_is_applied(archive, tmp_path):
    ds = pydicom.dcmread(archive.xray_m2)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    lut = np.clip(np.arange(4096) // 8 - 100, 0, 255).astype(np.uint16)  # a clipping ramp: 800..2840 → 0..255
    item.add_new("LUTData", "US", lut.tolist())
    ds.VOILUTSequence = [item]
    del ds.WindowCenter, ds.WindowWidth
    path = tmp_path / "lut.dcm"
    ds.save_as(path, enforce_file_format=True)
    stored = read_dicom_pixels(str(path), [0]).pixels[0]  # no LUT unless asked
    decoded, pixels = decode(dicom_task(path, "DX"), IntensityConfig(), stored.shape[-1])
    assert decoded.intensity == "voi-lut"
    mapped = lut[stored.astype(int)].astype(np.float32)
    np.testing.assert_allclose(pixels[0, 0], (mapped - mapped.min()) / np.ptp(mapped), atol=1e-5)


def test_header_window_applies_to_ct_only_when_asked(archive, tmp_path):
    ds = pydicom.dcmread(archive.ct[2])
    ds.WindowCenter, ds.WindowWidth = 40, 80
    path = tmp_path / "windowed.dcm"
    ds.save_as(path, enforce_file_format=True)
    task = dicom_task(path, "CT")
    hu = read_dicom_pixels(str(path), [0]).pixels[0]
    header, pixels = decode(task, IntensityConfig(window="header"), 40)
    assert header.intensity == "voi"
    clipped = np.clip(hu, 0.0, 80.0)
    np.testing.assert_allclose(pixels[0, 0], (clipped - clipped.min()) / np.ptp(clipped), atol=1e-5)
    assert decode(task, IntensityConfig(), 40)[0].intensity == "ct:study"


def write_hu_ramp(path: Path, like: Path) -> Path:
    """A CT slice whose values run from -1100 to 1400 HU: every window sees a gradient."""
    ds = pydicom.dcmread(like)
    ramp = np.linspace(-1100, 1400, 40 * 40).reshape(40, 40) - float(ds.RescaleIntercept)
    ds.PixelData = np.round(ramp).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("body_part, windows", [("CHEST", "lung,mediastinum,bone"), ("HEAD", "brain,subdural,bone"),
                                                (None, "lung,mediastinum,bone")])
def test_multi_window_gives_three_different_channels(archive, body_part, windows, tmp_path):
    ramp = write_hu_ramp(tmp_path / "ramp.dcm", archive.ct[3])
    decoded, pixels = decode(dicom_task(ramp, "CT", body_part), IntensityConfig(window="multi"), 40)
    assert pixels.shape == (1, 3, 40, 40)
    assert decoded.intensity == f"multi:{windows}"
    channels = pixels[0]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(channels[a] - channels[b]).max() > 0.2
    low, high = CT_WINDOWS[windows.split(",")[0]]  # each channel is its window mapped onto [0, 1]
    hu = read_dicom_pixels(str(ramp), [0]).pixels[0]
    np.testing.assert_allclose(channels[0], np.clip((hu - low) / (high - low), 0, 1), atol=1e-5)


def test_explicit_multi_windows_and_grey_modalities_in_multi_mode(archive):
    config = IntensityConfig(window="multi:stroke,liver,bone")
    assert decode(dicom_task(archive.ct[3], "CT"), config, 40)[0].intensity == "multi:stroke,liver,bone"
    xray = decode(dicom_task(archive.xray_m2, "DX"), config, 40)[1][0]
    np.testing.assert_array_equal(xray[0], xray[1])  # one grey image repeated: the model still sees 3 channels
    np.testing.assert_array_equal(xray[0], xray[2])
    with pytest.raises(UsageError):
        IntensityConfig(window="multi:lung,bone")


def test_multi_window_ingest_embeds_three_channels(archive, tmp_path):
    store_path = tmp_path / "multi"
    summary = ingest([archive.ct[0].parent], store_path, ingest_options(window="multi"))
    assert summary.n_embedded == 6 + 1 + 4  # the stray file of another study is a failure
    assert {row["intensity"] for row in rows(store_path, "slices")} >= {"multi:lung,mediastinum,bone"}


# ----------------------------------------------------------------------------------- privacy


def every_text_in(store_path: Path) -> str:
    """The manifest and every table's rows (vector columns left out) as text."""
    store = Store.open(store_path)
    texts = [json.dumps(store.manifest)]
    names = store.db.list_tables().tables
    assert {"items", "series", "models", "runs", "failures", "files"} <= set(names)
    assert any(name.startswith("slices-") for name in names) and any(name.startswith("series-") for name in names)
    for name in names:
        table = store.rows(name)
        vectors = [f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)]
        assert name in ("items", "series", "models", "runs", "failures", "files") or {"cls", "patch_mean"} <= set(vectors)
        texts.append(json.dumps(table.drop_columns(vectors).to_pylist(), default=str))
    return "\n".join(texts)


def test_patient_names_never_reach_the_store_and_ids_are_hashed(archive, store):
    text = every_text_in(store)
    for name in NAMES:
        assert name not in text
    ids = {row["patient_id"] for row in rows(store, "slices") if row["sop_uid"]}
    assert ids and all(pid.startswith("pid:") for pid in ids)
    assert {row["patient_id"] for row in rows(store, "series") if row["patient_id"]} == ids  # the same hashes
    assert "PAT-CT" not in text and "PAT-DX" not in text
    ct_ids = {row["patient_id"] for row in rows(store, "slices") if row["series_uid"].startswith(archive.series_uid)}
    second_uid = str(pydicom.dcmread(archive.second[0]).SeriesInstanceUID)
    assert ct_ids == {row["patient_id"] for row in rows(store, "slices") if row["series_uid"] == second_uid}


def test_keep_patient_id_stores_it_as_read_and_a_store_never_mixes_modes(archive, tmp_path):
    store_path = tmp_path / "plain"
    ingest([archive.xray_m2], store_path, ingest_options(keep_patient_id=True))
    assert {row["patient_id"] for row in rows(store_path, "slices")} == {"PAT-DX"}
    assert "Poe" not in every_text_in(store_path)
    with pytest.raises(UsageError, match="keep-patient-id"):
        ingest([archive.xray_m1], store_path, ingest_options())


def test_enhanced_multiframe_uses_per_frame_rescale_and_positions(tmp_path):
    """Enhanced CT keeps rescale and position per frame in functional groups, not at the top level."""
    path = samples.write_multiframe_mr(tmp_path / "enhanced.dcm", n_frames=3, size=24)
    ds = pydicom.dcmread(path)
    ds.Modality = "CT"
    for frame, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        transform = pydicom.Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = frame + 1, -1000
        group.PixelValueTransformationSequence = [transform]
    ds.save_as(path, enforce_file_format=True)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float32)
    hu = read_dicom_pixels(str(path), [2, 0]).pixels  # a subset, out of order, as a resumed run asks
    np.testing.assert_allclose(hu[0], stored[2] * 3 - 1000)
    np.testing.assert_allclose(hu[1], stored[0] * 1 - 1000)
    header = read_header(str(path))
    assert [p[2] for p in header.positions] == [6.0, 3.0, 0.0]
