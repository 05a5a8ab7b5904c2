"""DICOM decode speed per transfer syntax: embedstore's reader against plain pydicom, per core.

Generates one synthetic CT volume (N 512×512 phantom slices in HU with 15 HU of noise, stored as
uint16 with RescaleIntercept -1024, values clipped to 12 bits) and writes every slice in each
transfer syntax it can encode here:
  uncompressed - Implicit VR LE, Explicit VR LE, Explicit VR BE, Deflated Explicit VR LE (pydicom)
  compressed   - RLE, JPEG-LS (lossless, near-lossless), JPEG 2000 (lossless, lossy) through
                 pydicom's Dataset.compress; JPEG Lossless SV1, JPEG Extended 12-bit, HTJ2K
                 through gdcm; JPEG Baseline through Pillow, on an 8-bit windowed copy of the
                 slice (W 2000 / L 500), since baseline JPEG holds 8 bits only
Every file is decoded once with pydicom and checked against its source (exact for lossless, within
the codec's bound for lossy) before anything is timed; a syntax that cannot be encoded here, or
whose files fail the check, is listed as skipped with the reason, never timed.

Then, in one process on one thread (so slices/s is per core), after one warm-up read each, it
alternates the readers over the same N files, `--repeats` times:
  pydicom    - pydicom.dcmread(path).pixel_array, the baseline
  pydicom_hu - the same plus apply_rescale to float32: what embedstore's reader returns
  embedstore - embedstore.sources.dicom_pixels.read_dicom_pixels(path, [0]).pixels
               (strict parsing, pixel-length checks, modality LUT to float32, VOI windows)
and prints the median slices/s of each, the ratios (target >= 1.0 apart from noise), the largest
difference between embedstore's pixels and pydicom's after the modality LUT, and one JSON line.

    python benchmarks/decode.py [--n 64] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

SIZE = 512
NOISE_HU = 15.0  # a flat phantom compresses far better than a real CT; the noise keeps codecs honest
WINDOW = (500.0, 2000.0)  # centre, width in HU of the 8-bit copy used for JPEG Baseline
JLS_NEAR_ERROR = 2  # JPEG-LS near-lossless: allowed absolute error per pixel
J2K_RATIO = 10.0  # JPEG 2000 lossy: compression ratio
JPEG_QUALITY = 90  # JPEG Baseline / Extended quality
MIN_LOSSY_PSNR = 35.0  # dB over the slice's value range; far below it the encoder is broken


class CannotGenerate(Exception):
    """This machine has no working encoder for the syntax; the reason is the message."""


@dataclass(frozen=True)
class Syntax:
    name: str
    uid: str
    via: str  # the encoder, for the table
    write: Callable  # (source array, path, scratch dir) -> None
    bits_stored: int = 16
    windowed: bool = False  # encode the 8-bit windowed slice instead of the 16-bit one
    max_error: int | None = 0  # largest allowed absolute error; None: lossy, judged by PSNR
    others: str = ""  # why no other installed encoder was tried, added to a skip reason


# --- the synthetic volume -------------------------------------------------------------------------

def ct_volume(n: int, seed: int = 0):
    """(n, 512, 512) uint16 stored values: HU + 1024, clipped to 0..4095 so 12-bit codecs take it too."""
    import numpy as np

    from embedstore import samples

    rng = np.random.default_rng(seed)
    slices = []
    for index in range(n):
        tissue = samples.phantom(SIZE, seed * 1000 + index)
        hu = np.where(tissue > 0, -100 + 1200 * tissue, -1000) + rng.normal(0, NOISE_HU, tissue.shape)
        slices.append(np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16))
    return np.stack(slices)


def windowed_8bit(stored):
    import numpy as np

    centre, width = WINDOW
    hu = stored.astype(np.float32) - 1024
    return np.clip(np.rint((hu - (centre - width / 2)) / width * 255), 0, 255).astype(np.uint8)


def ct_dataset(pixels, bits_stored: int):
    """A minimal CT image dataset holding `pixels` uncompressed (Explicit VR Little Endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    # The 8-bit windowed copy is display values, not HU: identity rescale.
    ds.RescaleIntercept = -1024 if ds.BitsAllocated == 16 else 0
    ds.RescaleSlope = 1
    ds.PixelData = pixels.tobytes()
    return ds


# --- encoders -------------------------------------------------------------------------------------

def write_uncompressed(uid: str, bits_stored: int, pixels, path: Path, scratch: Path) -> None:
    from pydicom.uid import UID

    ds = ct_dataset(pixels, bits_stored)
    ds.file_meta.TransferSyntaxUID = uid
    if not UID(uid).is_little_endian:
        # pydicom writes OW values as they are, without swapping them to the file's byte order.
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    ds.save_as(path, enforce_file_format=True)  # Deflated: pydicom deflates the dataset on write


def write_pydicom_compressed(uid: str, plugin: str, bits_stored: int, pixels, path: Path, scratch: Path,
                             **options) -> None:
    ds = ct_dataset(pixels, bits_stored)
    try:
        ds.compress(uid, pixels, encoding_plugin=plugin, **options)
    except RuntimeError as error:  # pydicom's answer when the plugin or its package is missing
        raise CannotGenerate(f"pydicom cannot encode with {plugin!r}: {error}") from None
    ds.save_as(path, enforce_file_format=True)


def write_gdcm(syntax_name: str, lossy: bool, bits_stored: int, pixels, path: Path, scratch: Path) -> None:
    """gdcm converts an uncompressed file: its Python API works on files, not on arrays."""
    try:
        import gdcm
    except ImportError:
        raise CannotGenerate("python-gdcm is not installed") from None
    from pydicom.uid import ExplicitVRLittleEndian

    source = scratch / "gdcm-source.dcm"
    write_uncompressed(ExplicitVRLittleEndian, bits_stored, pixels, source, scratch)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    if not reader.Read():
        raise CannotGenerate("gdcm cannot read the uncompressed source file")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax_name)))
    change.SetInput(reader.GetImage())
    codec = gdcm.JPEGCodec()  # kept referenced until Change() has run
    if lossy:
        codec.SetLossless(False)
        codec.SetQuality(JPEG_QUALITY)
        change.SetUserCodec(codec)
    if not change.Change():
        raise CannotGenerate(f"gdcm {gdcm.Version.GetVersion()} has no encoder for {syntax_name}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise CannotGenerate("gdcm failed to write the converted file")


def write_pillow_baseline(pixels, path: Path, scratch: Path) -> None:
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    ds = ct_dataset(pixels, 8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.save_as(path, enforce_file_format=True)


def syntaxes() -> list[Syntax]:
    from pydicom import uid

    native, compressed = write_uncompressed, write_pydicom_compressed
    return [
        Syntax("Implicit VR Little Endian", uid.ImplicitVRLittleEndian, "pydicom",
               partial(native, uid.ImplicitVRLittleEndian, 16)),
        Syntax("Explicit VR Little Endian", uid.ExplicitVRLittleEndian, "pydicom",
               partial(native, uid.ExplicitVRLittleEndian, 16)),
        Syntax("Explicit VR Big Endian", uid.ExplicitVRBigEndian, "pydicom",
               partial(native, uid.ExplicitVRBigEndian, 16)),
        Syntax("Deflated Explicit VR LE", uid.DeflatedExplicitVRLittleEndian, "pydicom",
               partial(native, uid.DeflatedExplicitVRLittleEndian, 16)),
        Syntax("RLE Lossless", uid.RLELossless, "pylibjpeg-rle",
               partial(compressed, uid.RLELossless, "pylibjpeg", 16)),
        Syntax("JPEG-LS Lossless", uid.JPEGLSLossless, "pyjpegls",
               partial(compressed, uid.JPEGLSLossless, "pyjpegls", 16)),
        Syntax(f"JPEG-LS Near-Lossless (±{JLS_NEAR_ERROR})", uid.JPEGLSNearLossless, "pyjpegls",
               partial(compressed, uid.JPEGLSNearLossless, "pyjpegls", 16, jls_error=JLS_NEAR_ERROR),
               max_error=JLS_NEAR_ERROR),
        Syntax("JPEG 2000 Lossless", uid.JPEG2000Lossless, "openjpeg",
               partial(compressed, uid.JPEG2000Lossless, "pylibjpeg", 16)),
        Syntax(f"JPEG 2000 ({J2K_RATIO:g}:1)", uid.JPEG2000, "openjpeg",
               partial(compressed, uid.JPEG2000, "pylibjpeg", 16, j2k_cr=[J2K_RATIO]), max_error=None),
        Syntax("HTJ2K Lossless", uid.HTJ2KLossless, "gdcm",
               partial(write_gdcm, "HTJ2KLossless", False, 16),
               others="pylibjpeg-openjpeg encodes JPEG 2000 Part 1 only"),
        Syntax("JPEG Lossless SV1", uid.JPEGLosslessSV1, "gdcm",
               partial(write_gdcm, "JPEGLosslessProcess14_1", False, 16)),
        Syntax(f"JPEG Baseline (q{JPEG_QUALITY})", uid.JPEGBaseline8Bit, "Pillow",
               write_pillow_baseline, bits_stored=8, windowed=True, max_error=None),
        Syntax(f"JPEG Extended 12-bit (q{JPEG_QUALITY})", uid.JPEGExtended12Bit, "gdcm",
               partial(write_gdcm, "JPEGExtendedProcess2_4", True, 12), bits_stored=12, max_error=None,
               others="Pillow's JPEG is 8-bit only, pylibjpeg-libjpeg only decodes"),
    ]


# --- generation and verification ------------------------------------------------------------------

def short(error: Exception, limit: int = 240) -> str:
    """One line: pydicom puts each decoder plugin's complaint on its own line; whole lines are kept."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "exceptions were raised by all available plugins:"
        lines = lines[1:]
    text = ""
    for line in lines:
        if text and len(text) + len(line) > limit:
            return text + " ..."
        text = f"{text} {line}" if text else line
    return text or type(error).__name__


def verification_problem(path: Path, expected, syntax: Syntax) -> str | None:
    import numpy as np
    import pydicom

    try:
        decoded = pydicom.dcmread(path).pixel_array
    except Exception as error:  # codec plugins raise their own types
        return f"{syntax.via} wrote a file pydicom cannot decode: {short(error)}"
    if decoded.shape != expected.shape:
        return f"decoded shape {decoded.shape} != {expected.shape}"
    error = np.abs(decoded.astype(np.int64) - expected.astype(np.int64))
    if syntax.max_error is not None:
        if error.max() > syntax.max_error:
            return f"max error {error.max()} > allowed {syntax.max_error}"
        return None
    rms = float(np.sqrt(np.mean(error.astype(np.float64) ** 2)))
    span = float(expected.max()) - float(expected.min())
    psnr = float("inf") if rms == 0 else 20 * np.log10(span / rms)
    return None if psnr >= MIN_LOSSY_PSNR else f"PSNR {psnr:.1f} dB < {MIN_LOSSY_PSNR} dB"


def generate(syntax: Syntax, volume, directory: Path, scratch: Path) -> tuple[list[str], str | None]:
    """Writes and checks one file per slice; (paths, None), or ([], why it was skipped).
    The first slice is written and checked before the others, so a missing encoder costs one slice."""
    directory.mkdir(parents=True)
    paths = []
    for index, stored in enumerate(volume):
        source = windowed_8bit(stored) if syntax.windowed else stored
        path = directory / f"{index:05d}.dcm"
        try:
            syntax.write(source, path, scratch)
        except CannotGenerate as error:
            return [], str(error)
        except Exception as error:  # encoders raise their own types; the syntax is skipped, not the run
            return [], f"{syntax.via} failed to encode: {short(error)}"
        problem = verification_problem(path, source, syntax)
        if problem:
            return [], problem
        paths.append(str(path))
    return paths, None


# --- timing ---------------------------------------------------------------------------------------

def readers() -> dict[str, Callable]:
    """The readers timed, by name; imported once here, not on every call. `pydicom_hu` is what a
    pydicom user writes to get what embedstore returns (float32 after the modality LUT)."""
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_rescale

    from embedstore.sources.dicom_pixels import read_dicom_pixels

    def pydicom_hu(path):
        ds = pydicom.dcmread(path)
        return apply_rescale(ds.pixel_array, ds).astype(np.float32)

    return {"pydicom": lambda path: pydicom.dcmread(path).pixel_array,
            "pydicom_hu": pydicom_hu,
            "embedstore": lambda path: read_dicom_pixels(path, [0]).pixels}


def decode_pass(read: Callable, paths: list[str]) -> tuple[float, float]:
    """(slices/s, CPU seconds per wall second): the second stays near 1 while the reader keeps to
    one thread, which is what makes slices/s a per-core figure."""
    wall, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        read(path)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(paths) / wall, cpu / wall


def difference_after_lut(read: Callable, path: str) -> float:
    """Largest |embedstore - pydicom after the modality LUT| on one file: a faster reader that
    returns other pixels would not be a like-for-like comparison. This is also the warm-up read."""
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_rescale

    ds = pydicom.dcmread(path)
    reference = apply_rescale(ds.pixel_array, ds).astype(np.float32)[None]
    ours = read(path)
    if ours.shape != reference.shape:
        raise ValueError(f"embedstore returned shape {ours.shape}, pydicom {reference.shape}")
    return float(np.abs(ours.astype(np.float32) - reference).max())


def measure(paths: list[str], repeats: int) -> dict:
    timed = readers()
    difference = difference_after_lut(timed["embedstore"], paths[0])
    runs = {name: [] for name in timed}
    cores = {name: [] for name in timed}
    for _ in range(repeats):  # A/B/A/B: drift and noise land on both readers alike
        for name, read in timed.items():
            rate, cpu_per_wall = decode_pass(read, paths)
            runs[name].append(rate)
            cores[name].append(cpu_per_wall)
    base, ours = statistics.median(runs["pydicom"]), statistics.median(runs["embedstore"])
    base_hu = statistics.median(runs["pydicom_hu"])
    return {"pydicom_slices_per_s": round(base, 1), "pydicom_hu_slices_per_s": round(base_hu, 1),
            "embedstore_slices_per_s": round(ours, 1),
            "ratio": round(ours / base, 3), "ratio_hu": round(ours / base_hu, 3),
            "max_abs_diff_vs_pydicom": difference,
            "pydicom_cpu_per_wall": round(statistics.median(cores["pydicom"]), 2),
            "embedstore_cpu_per_wall": round(statistics.median(cores["embedstore"]), 2),
            "pydicom_hu_cpu_per_wall": round(statistics.median(cores["pydicom_hu"]), 2),
            **{f"{name}_runs": [round(r, 1) for r in rates] for name, rates in runs.items()}}


# --- report ---------------------------------------------------------------------------------------

def bits_label(syntax: Syntax) -> str:
    return f"{syntax.bits_stored}w" if syntax.windowed else str(syntax.bits_stored)


def print_table(rows: list[dict], skipped: list[dict]) -> None:
    print(f"{'syntax':34s} {'bits':>4s} {'via':13s} {'KB/file':>8s} {'pydicom/s':>10s} {'+HU/s':>8s}"
          f" {'embedstore/s':>12s} {'ratio':>6s} {'vs +HU':>6s} {'max|Δ|':>7s}")
    for row in rows:
        if "embedstore_error" in row:
            figures = f"{row['pydicom_slices_per_s']:10.1f} {'':>8s} {'error':>12s} {'':>6s} {'':>6s} {'':>7s}"
        else:
            figures = (f"{row['pydicom_slices_per_s']:10.1f} {row['pydicom_hu_slices_per_s']:8.1f}"
                       f" {row['embedstore_slices_per_s']:12.1f} {row['ratio']:6.3f} {row['ratio_hu']:6.3f}"
                       f" {row['max_abs_diff_vs_pydicom']:7.3g}")
        print(f"{row['syntax']:34s} {row['bits']:>4s} {row['via']:13s} {row['file_kb']:8.1f} {figures}")
    print(f"bits: BitsStored, BitsAllocated 16 (8w: 8-bit copy windowed at W{WINDOW[1]:g}/L{WINDOW[0]:g},"
          " BitsAllocated 8, identity rescale); +HU: pydicom's pixel_array then apply_rescale to float32,"
          " which is what embedstore returns; ratio: embedstore / plain pixel_array; vs +HU: embedstore /"
          " +HU; max|Δ|: embedstore vs pydicom after the modality LUT, first file")
    for row in rows:
        if "embedstore_error" in row:
            print(f"embedstore failed on {row['syntax']}: {row['embedstore_error']}")
            continue
        if row["lossless"] and row["max_abs_diff_vs_pydicom"] > 0:
            print(f"WARNING: embedstore's pixels differ from pydicom's on lossless {row['syntax']}")
        for reader in ("pydicom", "pydicom_hu", "embedstore"):
            if row[f"{reader}_cpu_per_wall"] > 1.25:  # one-off spikes to ~1.15 are seen on an idle VM
                print(f"WARNING: {reader} used {row[f'{reader}_cpu_per_wall']} cores on {row['syntax']}:"
                      " its slices/s is not per core")
    for skip in skipped:
        print(f"skipped {skip['syntax']}: {skip['skipped']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="slices (files) per transfer syntax")
    parser.add_argument("--repeats", type=int, default=3, help="alternating pydicom / embedstore passes")
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    args = parser.parse_args()

    # One thread, so the figures are per core; set before numpy and the codecs are loaded.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[variable] = "1"
    import pydicom

    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        volume = ct_volume(args.n)
        for number, syntax in enumerate(syntaxes()):
            paths, reason = generate(syntax, volume, scratch / f"syntax{number:02d}", scratch)
            if reason:
                reason = f"{reason} ({syntax.others})" if syntax.others else reason
                skipped.append({"syntax": syntax.name, "uid": syntax.uid, "skipped": reason})
                continue
            row = {"syntax": syntax.name, "uid": syntax.uid, "bits": bits_label(syntax), "via": syntax.via,
                   "lossless": syntax.max_error == 0,
                   "file_kb": round(sum(os.path.getsize(p) for p in paths) / len(paths) / 1024, 1)}
            try:
                row.update(measure(paths, args.repeats))
            except ImportError:  # no embedstore reader at all: nothing to compare
                raise
            except Exception as error:  # one syntax embedstore cannot read must not hide the others
                row["embedstore_error"] = short(error)
                row["pydicom_slices_per_s"] = round(statistics.median(
                    decode_pass(readers()["pydicom"], paths)[0] for _ in range(args.repeats)), 1)
            rows.append(row)

    print(f"{args.n} CT slices {SIZE}x{SIZE} per syntax, median of {args.repeats} alternating passes, "
          f"one process, one thread (slices/s per core), pydicom {pydicom.__version__}")
    print_table(rows, skipped)
    result = {"benchmark": "decode", "n": args.n, "repeats": args.repeats, "size": SIZE,
              "rows": rows, "skipped": skipped}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
