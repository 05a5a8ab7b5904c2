"""Hostile files (issue 11, items 4-6 and NIfTI modality): nothing found under a source vanishes
without a `failures` row, links and special files never hang or stop a run, declared image sizes
are checked before anything is allocated, and NIfTI modality comes from evidence that holds.

Module-level code defines constants and functions only: decode workers use the "spawn" start
method and may re-import modules, so nothing here may run at import time.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from embedstore import samples
from embedstore.errors import InputError
from embedstore.sources.catalog import build_catalog
from embedstore.sources.discover import FoundFile, discover
from tests.support import ingest_options, slice_rows, write_rle_bomb

AS_ROOT = os.geteuid() == 0
HANG_GUARD_S = 20  # a FIFO opened for reading blocks forever: fail instead of hanging the suite
PNG_BOMB_SIDE = 20000  # 4e8 pixels, above the default --max-pixels (2**28)


# ----------------------------------------------------------------------------- helpers
@contextmanager
def hang_guard(seconds: int = HANG_GUARD_S):
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s: something blocks (a FIFO opened?)")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def deny_directory(monkeypatch, directory: Path) -> None:
    """Listing `directory` raises PermissionError, as for a folder without read permission (the
    tests run as root, whom chmod does not stop)."""
    real_scandir = os.scandir

    def scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path) == directory:  # (shutil lists by descriptor)
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def deny_file(monkeypatch, path: Path) -> None:
    """Opening `path` raises PermissionError, as for a file without read permission."""
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)


def failure_reasons(failures) -> dict[str, tuple[str, str]]:
    return {Path(f.path).name: (f.stage, f.reason) for f in failures}


def write_tiff_pages(path: Path, sizes: list[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pages = [Image.fromarray((samples.phantom(size, seed) * 255).astype(np.uint8)) for seed, size in enumerate(sizes)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


def write_png_bomb(path: Path, side: int = PNG_BOMB_SIDE) -> Path:
    """An all-zero 8-bit grey PNG of side x side pixels, compressed row by row in little memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0 and the row's zeros
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def write_nifti_header_only(path: Path, shape: tuple[int, ...]) -> Path:
    """A .nii whose header declares `shape` followed by a few bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    path.write_bytes(header.binaryblock + b"\x00" * 4 + bytes(64))  # 4 bytes of extension flag, then data
    return path


def save_nifti(path: Path, data: np.ndarray, descrip: bytes | None = None) -> str:
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.diag([1.5, 1.5, 1.5, 1.0]))
    if descrip is not None:
        image.header["descrip"] = descrip
    nib.save(image, str(path))
    return str(path)


def spm_like_t1(shape=(40, 48, 20), seed: int = 3) -> np.ndarray:
    """An SPM-normalised T1: background near 0, brain 8,000-30,393, and interpolation ringing at the
    edge of the brain down to -610."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    radius = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    data = rng.normal(0, 20, shape)
    data[radius < 0.8] = rng.uniform(8000, 30000, int((radius < 0.8).sum()))
    rim = (radius >= 0.8) & (radius < 0.84)
    data[rim] = rng.uniform(-610, 0, int(rim.sum()))
    data.flat[0], data.flat[1] = -610.0, 30393.0
    return data


def ct_like_volume(shape=(40, 40, 16), padding: float | None = None) -> np.ndarray:
    """Air (-1000 HU) around a body of 0-100 HU; `padding` fills the corners outside a round field of view."""
    rng = np.random.default_rng(5)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    data = rng.normal(-1000, 15, shape)
    body = (x / 0.7) ** 2 + (y / 0.6) ** 2 <= 1
    data[body] = rng.uniform(0, 100, (int(body.sum()), shape[2]))
    if padding is not None:
        data[x ** 2 + y ** 2 > 1] = padding
    return data


def catalog_of(path: Path, kind: str, **options):
    return build_catalog([FoundFile(kind, str(path))], **options)


# ----------------------------------------------------------------------------- 4. silent drops
def test_unreadable_directory_is_a_failure(tmp_path, monkeypatch):
    samples.write_png(tmp_path / "ok" / "a.png", samples.phantom(32, 0))
    samples.write_png(tmp_path / "locked" / "b.png", samples.phantom(32, 1))
    deny_directory(monkeypatch, tmp_path / "locked")
    found, failures = discover([tmp_path])
    assert [Path(f.path).name for f in found] == ["a.png"]
    assert [(f.path, f.stage, f.reason) for f in failures] == [(str(tmp_path / "locked"), "discover", "unreadable")]
    assert "Permission denied" in failures[0].message


@pytest.mark.skipif(AS_ROOT, reason="root reads any folder and file whatever its mode")
def test_unreadable_directory_and_file_for_real(tmp_path):
    locked = tmp_path / "locked"
    samples.write_png(locked / "b.png", samples.phantom(32, 1))
    hidden = tmp_path / "nosuffix"
    hidden.write_bytes(b"\x00" * 128 + b"DICM" + bytes(100))
    locked.chmod(0)
    hidden.chmod(0)
    try:
        found, failures = discover([tmp_path])
    finally:
        locked.chmod(0o755)
        hidden.chmod(0o644)
    assert found == []
    assert failure_reasons(failures) == {"locked": ("discover", "unreadable"), "nosuffix": ("discover", "unreadable")}


def test_unreadable_file_without_suffix_is_a_failure(tmp_path, monkeypatch):
    """The DICM probe cannot read it: that is a failure, not 'no image here'."""
    path = tmp_path / "IM0001"
    path.write_bytes(b"\x00" * 128 + b"DICM" + bytes(100))
    deny_file(monkeypatch, path)
    found, failures = discover([tmp_path])
    assert found == []
    assert failure_reasons(failures) == {"IM0001": ("discover", "unreadable")}


@pytest.mark.parametrize("kind", ["dicom", "nifti", "raster"])
def test_permission_error_reading_a_file_is_unreadable(tmp_path, monkeypatch, kind):
    from embedstore.intensity import IntensityConfig
    from embedstore.preprocess import DecodeSettings, decode_task

    path = {
        "dicom": lambda: samples.write_ct_series(tmp_path, n_slices=1, size=16)[0],
        "nifti": lambda: samples.write_nifti(tmp_path / "v.nii.gz", shape=(16, 16, 3)),
        "raster": lambda: samples.write_png(tmp_path / "x.png", samples.phantom(16, 0)),
    }[kind]()
    catalog = catalog_of(path, kind)
    assert not catalog.failures
    deny_file(monkeypatch, path)
    assert [(f.stage, f.reason) for f in catalog_of(path, kind).failures] == [("read", "unreadable")]
    with pytest.raises(InputError) as caught:
        decode_task(catalog.tasks[0], DecodeSettings(IntensityConfig(), 28))
    assert (caught.value.stage, caught.value.reason) == ("decode", "unreadable")


@pytest.mark.parametrize("shape", [(0, 8, 4), (8, 8, 0), (8, 8, 4, 0)])
def test_nifti_with_a_zero_length_dimension_is_a_failure(tmp_path, shape):
    path = write_nifti_header_only(tmp_path / "empty.nii", shape)
    catalog = catalog_of(path, "nifti")
    assert catalog.tasks == []
    assert [(f.stage, f.reason) for f in catalog.failures] == [("read", "corrupt_nifti")]
    assert "zero" in catalog.failures[0].message


def test_multipage_tiff_gives_one_slice_per_page(tmp_path):
    from embedstore.intensity import IntensityConfig
    from embedstore.preprocess import DecodeSettings, decode_task

    path = write_tiff_pages(tmp_path / "stack.tif", [40, 40, 40])
    catalog = catalog_of(path, "raster")
    assert not catalog.failures
    (task,) = catalog.tasks
    file_id = f"file:{path}"
    assert [item.item_id for item in task.items] == [file_id, f"{file_id}#p1", f"{file_id}#p2"]
    assert {item.series_uid for item in task.items} == {file_id}
    assert [(item.slice_index, item.frame) for item in task.items] == [(0, 0), (1, 1), (2, 2)]
    decoded = decode_task(task, DecodeSettings(IntensityConfig(), 28))
    pixels = decoded.pixels["bicubic"]
    assert pixels.shape == (3, 1, 28, 28)
    assert not np.allclose(pixels[0], pixels[1]) and not np.allclose(pixels[1], pixels[2])  # three pages, not one


def test_single_page_image_keeps_its_id(tmp_path):
    path = samples.write_png(tmp_path / "x.png", samples.phantom(32, 0))
    (task,) = catalog_of(path, "raster").tasks
    assert [item.item_id for item in task.items] == [f"file:{path}"]


def test_pages_of_different_sizes_are_read_apart(tmp_path):
    from embedstore.intensity import IntensityConfig
    from embedstore.preprocess import DecodeSettings, decode_task

    path = write_tiff_pages(tmp_path / "pyramid.tif", [48, 48, 24])
    tasks = catalog_of(path, "raster").tasks
    assert [[item.frame for item in task.items] for task in tasks] == [[0, 1], [2]]
    sizes = [(d.rows, d.cols) for d in (decode_task(task, DecodeSettings(IntensityConfig(), 28)) for task in tasks)]
    assert sizes == [(48, 48), (24, 24)]


# ----------------------------------------------------------------------------- 6. links and special files
def test_broken_link_loop_and_fifo_are_failures_not_hangs(tmp_path):
    samples.write_png(tmp_path / "a.png", samples.phantom(32, 0))
    (tmp_path / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "cycle1").symlink_to(tmp_path / "cycle2")
    (tmp_path / "cycle2").symlink_to(tmp_path / "cycle1")
    os.mkfifo(tmp_path / "pipe")
    with hang_guard():
        found, failures = discover([tmp_path])
    assert [Path(f.path).name for f in found] == ["a.png"]
    assert failure_reasons(failures) == {
        "gone.dcm": ("discover", "broken_link"), "loop": ("discover", "broken_link"),
        "cycle1": ("discover", "broken_link"), "cycle2": ("discover", "broken_link"),
        "pipe": ("discover", "not_a_file"),
    }


def test_links_to_files_and_directories_are_followed_once(tmp_path):
    """A folder reached through a link and for real keeps its real path (the link sorts first
    here); a link back to an ancestor is no endless cycle, and is said (a loop: a failures row);
    a linked folder elsewhere is walked."""
    source = tmp_path / "src"
    samples.write_png(source / "real" / "a.png", samples.phantom(32, 0))
    samples.write_png(tmp_path / "elsewhere" / "c.png", samples.phantom(32, 2))
    (source / "real" / "up").symlink_to(source)
    (source / "also").symlink_to(source / "real")
    (source / "b.png").symlink_to(source / "real" / "a.png")
    (source / "ext").symlink_to(tmp_path / "elsewhere")
    with hang_guard():
        found, failures = discover([source])
    assert failure_reasons(failures) == {"up": ("discover", "broken_link")}
    assert sorted(f.path for f in found) == sorted(str(source / name) for name in ("real/a.png", "b.png", "ext/c.png"))


def test_a_fifo_given_as_source_is_not_a_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.dcm")
    with hang_guard():
        found, failures = discover([tmp_path / "pipe.dcm"])
    assert found == [] and failure_reasons(failures) == {"pipe.dcm": ("discover", "not_a_file")}


# ----------------------------------------------------------------------------- 5. decode limits
def test_rle_bomb_is_too_large_from_its_header(tmp_path):
    path = write_rle_bomb(tmp_path / "bomb.dcm")
    assert path.stat().st_size < 10_000
    catalog = catalog_of(path, "dicom")
    assert catalog.tasks == []
    assert [(f.stage, f.reason) for f in catalog.failures] == [("read", "too_large")]
    assert "60000" in catalog.failures[0].message


def test_png_bomb_is_too_large_from_its_header(tmp_path):
    from embedstore.sources.raster import read_raster

    path = write_png_bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 1_000_000
    catalog = catalog_of(path, "raster")
    assert catalog.tasks == []
    assert [(f.stage, f.reason) for f in catalog.failures] == [("read", "too_large")]
    with pytest.raises(InputError) as caught:
        read_raster(str(path), [0])
    assert (caught.value.stage, caught.value.reason) == ("decode", "too_large")


def test_pillow_bomb_limit_follows_max_pixels(tmp_path, monkeypatch):
    """Pillow's own decompression-bomb check is not a second, different limit: below --max-pixels
    an image is read, above it the file is too_large (never decode_error)."""
    from embedstore.sources.raster import read_raster

    path = samples.write_png(tmp_path / "x.png", samples.phantom(48, 0))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow would refuse 48 x 48 on its own
    assert read_raster(str(path), [0]).shape == (1, 48, 48)
    assert Image.MAX_IMAGE_PIXELS == 100  # left as it was
    with pytest.raises(InputError) as caught:
        read_raster(str(path), [0], max_pixels=1000)
    assert caught.value.reason == "too_large"


@pytest.mark.parametrize("kind", ["dicom", "nifti", "raster"])
def test_max_pixels_is_checked_per_frame(tmp_path, kind):
    path = {
        "dicom": lambda: samples.write_ct_series(tmp_path, n_slices=1, size=32)[0],
        "nifti": lambda: samples.write_nifti(tmp_path / "v.nii.gz", shape=(32, 32, 3)),
        "raster": lambda: write_tiff_pages(tmp_path / "x.tif", [32, 32]),
    }[kind]()
    assert not catalog_of(path, kind, max_pixels=32 * 32).failures
    failures = catalog_of(path, kind, max_pixels=32 * 32 - 1).failures
    assert [(f.stage, f.reason) for f in failures] == [("read", "too_large")]


def test_nifti_declaring_a_huge_volume_is_too_large(tmp_path):
    path = write_nifti_header_only(tmp_path / "huge.nii", (4000, 4000, 4000))
    assert [f.reason for f in catalog_of(path, "nifti").failures] == ["too_large"]


MEMORY_SCRIPT = """
import json, resource, sys
from embedstore.pipeline.ingest import IngestOptions, ingest
summary = ingest([sys.argv[1]], sys.argv[2], IngestOptions(weights="random", image_size=28, workers=0,
                                                           show_progress=False))
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "embedded": summary.n_embedded, "failures": summary.failures_by_reason}))
"""


def ingest_peak(source: Path, store: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(source), str(store)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bombs_stay_under_the_memory_of_a_normal_ingest(tmp_path):
    ct = tmp_path / "ct"
    samples.write_ct_series(ct, n_slices=8, size=128)
    (tmp_path / "dicom_bomb").mkdir()
    (tmp_path / "png_bomb").mkdir()
    write_rle_bomb(tmp_path / "dicom_bomb" / "bomb.dcm")
    write_rle_bomb(tmp_path / "dicom_bomb" / "bomb16.dcm", bits=16)
    write_png_bomb(tmp_path / "png_bomb" / "bomb.png")
    normal = ingest_peak(ct, tmp_path / "s1")
    assert normal["embedded"] == 8 and normal["failures"] == {}
    peaks = {"ct": normal["peak_kb"]}
    for name, expected in (("dicom_bomb", {"too_large": 2}), ("png_bomb", {"too_large": 1})):
        result = ingest_peak(tmp_path / name, tmp_path / f"s-{name}")
        assert result["failures"] == expected
        peaks[name] = result["peak_kb"]
    print("peak memory (MiB):", {name: round(kb / 1024) for name, kb in peaks.items()})
    assert peaks["dicom_bomb"] < 1.5 * peaks["ct"], peaks
    assert peaks["png_bomb"] < 1.5 * peaks["ct"], peaks


# ----------------------------------------------------------------------------- NIfTI modality
def test_spm_normalised_t1_is_mr(tmp_path):
    from embedstore.sources.nifti import read_nifti_slices

    data = spm_like_t1()
    assert (data.min(), data.max()) == (-610.0, 30393.0)
    assert read_nifti_slices(save_nifti(tmp_path / "wT1.nii.gz", data))[1] == "MR"


@pytest.mark.parametrize("padding", [None, -1024.0, -2048.0, -3024.0])
def test_ct_volume_is_ct(tmp_path, padding):
    from embedstore.sources.nifti import read_nifti_slices

    assert read_nifti_slices(save_nifti(tmp_path / "ct.nii.gz", ct_like_volume(padding=padding)))[1] == "CT"


def test_metal_above_the_hu_range_is_still_ct(tmp_path):
    """A few voxels of metal do not make a CT something else."""
    from embedstore.sources.nifti import read_nifti_slices

    data = ct_like_volume()
    data[20, 20, :2] = 30000.0
    assert read_nifti_slices(save_nifti(tmp_path / "ct.nii.gz", data))[1] == "CT"


def test_header_description_names_ct(tmp_path):
    """A cropped head CT holds no air; its description says what it is."""
    from embedstore.sources.nifti import read_nifti_slices

    brain = np.random.default_rng(0).uniform(0, 80, (24, 24, 6))
    assert read_nifti_slices(save_nifti(tmp_path / "plain.nii", brain))[1] == "MR"
    assert read_nifti_slices(save_nifti(tmp_path / "ct.nii", brain, descrip=b"CT head, cropped"))[1] == "CT"
    assert read_nifti_slices(save_nifti(tmp_path / "pet.nii", brain, descrip=b"PET SUV"))[1] == "PT"
    assert read_nifti_slices(save_nifti(tmp_path / "both.nii", brain, descrip=b"PET/CT fusion"))[1] == "MR"  # no air


def test_declared_modality_wins_for_nifti_and_raster(tmp_path):
    from embedstore.intensity import IntensityConfig
    from embedstore.preprocess import DecodeSettings, decode_task

    nifti = samples.write_nifti(tmp_path / "ct.nii.gz", shape=(16, 16, 3))
    png = samples.write_png(tmp_path / "x.png", samples.phantom(32, 0))
    settings = DecodeSettings(IntensityConfig(), 28)
    decoded = {}
    for path, kind, modality in ((nifti, "nifti", "MR"), (png, "raster", "CT"), (png, "raster", "DX"),
                                 (png, "raster", None), (nifti, "nifti", None)):
        (task,) = catalog_of(path, kind, modality=modality).tasks
        assert {item.modality for item in task.items} == {modality}
        result = decode_task(task, settings)
        decoded[(kind, modality)] = (result.modality, result.intensity)
    assert decoded == {
        ("nifti", "MR"): ("MR", "mr:p5-95"), ("raster", "CT"): ("CT", "ct:study"), ("raster", "DX"): ("DX", "minmax"),
        ("raster", None): (None, "minmax"), ("nifti", None): ("CT", "ct:study"),
    }


def test_unknown_modality_is_a_usage_error(tmp_path):
    from embedstore.errors import UsageError
    from embedstore.pipeline.ingest import ingest

    samples.write_png(tmp_path / "src" / "x.png", samples.phantom(32, 0))
    with pytest.raises(UsageError, match="XR"):
        ingest([tmp_path / "src"], tmp_path / "store", ingest_options(modality="XR"))
    assert not (tmp_path / "store").exists()


def test_cli_takes_modality_and_max_pixels(tmp_path):
    from typer.testing import CliRunner

    from embedstore.cli.main import app

    samples.write_png(tmp_path / "src" / "x.png", samples.phantom(32, 0))
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "src"), "--store", str(store), "--weights", "random",
                                      "--image-size", "28", "--workers", "0", "--no-progress", "--modality", "dx",
                                      "--max-pixels", "1000000"])
    assert result.exit_code == 0, result.output
    assert [row["modality"] for row in slice_rows(store)] == ["DX"]


# ----------------------------------------------------------------------------- acceptance
def test_hostile_archive_ingests_to_the_end(tmp_path, monkeypatch):
    from embedstore.pipeline.ingest import ingest
    from embedstore.store import Store

    archive = tmp_path / "archive"
    samples.write_ct_series(archive / "ct", n_slices=3, size=32)
    tiff = write_tiff_pages(archive / "scans" / "stack.tif", [32, 32, 32])
    samples.write_png(archive / "locked" / "hidden.png", samples.phantom(32, 1))
    (archive / "links").mkdir()
    (archive / "links" / "gone.dcm").symlink_to(archive / "nowhere.dcm")
    (archive / "links" / "loop").symlink_to(archive / "links" / "loop")
    os.mkfifo(archive / "links" / "pipe")
    deny_directory(monkeypatch, archive / "locked")
    with hang_guard(300):
        summary = ingest([archive], tmp_path / "store", ingest_options(modality="DX"))
    failures = Store.open(tmp_path / "store").rows("failures").to_pylist()
    assert sorted((Path(r["path"]).name, r["stage"], r["reason"]) for r in failures) == [
        ("gone.dcm", "discover", "broken_link"), ("locked", "discover", "unreadable"),
        ("loop", "discover", "broken_link"), ("pipe", "discover", "not_a_file"),
    ]
    assert summary.failures_by_reason == {"broken_link": 2, "unreadable": 1, "not_a_file": 1}
    rows = slice_rows(tmp_path / "store")
    pages = sorted((r["slice_index"], r["key"]) for r in rows if r["path"] == str(tiff))
    assert [index for index, _ in pages] == [0, 1, 2]
    assert summary.n_embedded == 6
    modalities = Counter((r["path"] == str(tiff), r["modality"]) for r in rows)
    assert modalities == {(True, "DX"): 3, (False, "CT"): 3}  # a DICOM keeps the modality it states
    series = Store.open(tmp_path / "store").rows("series").to_pylist()
    assert {r["series_uid"]: r["n_slices"] for r in series}[f"file:{tiff}"] == 3
