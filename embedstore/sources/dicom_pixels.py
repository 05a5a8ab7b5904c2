"""DICOM pixels: decode any transfer syntax pydicom or an installed codec plugin reads, check the
pixel data against the header, and bring every photometric interpretation to one grey scale.

Codecs come from pydicom's plugins: pylibjpeg (libjpeg, openjpeg, rle) and python-gdcm, both
dependencies of embedstore. A syntax no installed plugin handles is `unsupported_transfer_syntax`;
data every plugin rejects is `corrupt_stream`; pixel data shorter than rows × columns × frames ×
samples × bits is `truncated`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.pixels.processing import apply_voi

from embedstore.errors import (
    CORRUPT_STREAM, INVALID_HEADER, NO_PIXEL_DATA, TRUNCATED, UNSUPPORTED_TRANSFER_SYNTAX, InputError,
)
from embedstore.sources.dicom import PIXEL_KEYWORDS, parse_dicom

try:  # GDCM prints its own diagnostics to stderr; a failure row says what matters
    import gdcm

    gdcm.Trace.SetError(False)
    gdcm.Trace.SetWarning(False)
except ImportError:
    gdcm = None

LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as for YBR_FULL


@dataclass
class DicomPixels:
    pixels: np.ndarray  # (n, rows, cols) float32 after the modality LUT; colour reduced to luminance
    windows: list[tuple[float, float] | None]  # the file's own VOI window per frame, as (low, high)
    monochrome1: bool  # higher values are to be shown darker


def read_dicom_pixels(path: str, frames: list[int], apply_voi_lut: bool = False) -> DicomPixels:
    """The requested frames of one file; InputError with a specific reason when that is impossible.

    With `apply_voi_lut`, a VOI LUT Sequence in the file (common in X-ray) is applied here, since
    it is not a window the preprocessing could apply later.
    """
    ds = parse_dicom(path, stage="decode")
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        if "Rows" in ds:
            raise InputError(TRUNCATED, "image header without pixel data: the file ends before its pixels",
                             "decode")
        raise InputError(NO_PIXEL_DATA, "DICOM object has no pixel data", "decode")
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip()
    except (TypeError, ValueError) as error:
        raise InputError(INVALID_HEADER, f"image attributes are malformed: {error}", "decode") from None
    if max(frames) >= n_frames:
        raise InputError(INVALID_HEADER, f"frame {max(frames)} requested from a {n_frames}-frame image", "decode")
    stored = _decode(path, ds, n_frames)
    if stored.ndim == (2 if samples == 1 else 3):
        stored = stored[None]
    stored = stored[frames]
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(stored, ds).astype(np.float32) @ LUMINANCE
    elif samples > 1:  # pydicom has already turned YBR into RGB; radiology is grey
        pixels = stored[..., :3].astype(np.float32) @ LUMINANCE
    else:
        pixels = _modality_lut(stored, ds, frames)
    windows = [None] * len(frames)
    if samples == 1 and photometric != "PALETTE COLOR":
        if apply_voi_lut and ds.get("VOILUTSequence"):
            pixels = np.stack([apply_voi(frame, ds) for frame in pixels]).astype(np.float32)
        else:
            windows = _voi_windows(ds, frames)
    return DicomPixels(np.ascontiguousarray(pixels, dtype=np.float32), windows, photometric == "MONOCHROME1")


def _decode(path: str, ds: Dataset, n_frames: int) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise InputError(INVALID_HEADER, "no Transfer Syntax UID in the file meta information", "decode")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise InputError(UNSUPPORTED_TRANSFER_SYNTAX, f"no decoder exists for transfer syntax {syntax.name} "
                         f"({syntax})", "decode") from None
    if not decoder.is_available:
        missing = "; ".join(f"{name}: {', '.join(deps)}" for name, deps in decoder.missing_dependencies)
        raise InputError(UNSUPPORTED_TRANSFER_SYNTAX, f"no installed codec decodes {syntax.name} ({syntax})"
                         + (f" — missing {missing}" if missing else ""), "decode")
    if not syntax.is_compressed and "PixelData" in ds:
        _check_native_length(ds, n_frames)
    try:
        return ds.pixel_array
    except (AttributeError, KeyError, TypeError, NotImplementedError) as error:
        raise InputError(INVALID_HEADER, f"pixel data cannot be interpreted: {error}", "decode") from None
    except ValueError as error:
        text = str(error)
        if "less than expected" in text or "Unexpected number of bytes" in text:
            raise InputError(TRUNCATED, f"pixel data is shorter than the header says: {text}", "decode") from None
        reason = CORRUPT_STREAM if syntax.is_compressed else INVALID_HEADER
        raise InputError(reason, f"pixel data cannot be decoded: {text}", "decode") from None
    except Exception as error:  # codec plugins raise their own types (RuntimeError when all fail)
        # pydicom's GDCM plugin refuses some streams GDCM itself decodes (12-bit JPEG Extended).
        decoded = _decode_with_gdcm(path, ds)
        if decoded is not None:
            return decoded
        message = " ".join(str(error).split())
        raise InputError(CORRUPT_STREAM, f"{syntax.name} data rejected by every codec: {message}",
                         "decode") from None


GDCM_DTYPES = {"UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16,
               "UINT32": np.uint32, "INT32": np.int32, "FLOAT32": np.float32, "FLOAT64": np.float64}


def _decode_with_gdcm(path: str, ds: Dataset) -> np.ndarray | None:
    """Stored values decoded by GDCM's own reader, or None when it cannot either."""
    if gdcm is None:
        return None
    reader = gdcm.ImageReader()
    reader.SetFileName(path)
    if not reader.Read():
        return None
    image = reader.GetImage()
    buffer = image.GetBuffer()
    dtype = GDCM_DTYPES.get(image.GetPixelFormat().GetScalarTypeAsString())
    if buffer is None or dtype is None:
        return None
    samples = image.GetPixelFormat().GetSamplesPerPixel()
    shape = (int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns)) + ((samples,) if samples > 1 else ())
    pixels = np.frombuffer(buffer.encode("utf-8", "surrogateescape"), dtype=dtype)
    if pixels.size != int(np.prod(shape)):
        return None
    return pixels.reshape(shape)


def _check_native_length(ds: Dataset, n_frames: int) -> None:
    try:
        bits = int(ds.BitsAllocated)
        values = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * n_frames
    except (AttributeError, TypeError, ValueError) as error:
        raise InputError(INVALID_HEADER, f"image attributes are missing or malformed: {error}", "decode") from None
    expected = (values * bits + 7) // 8
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        expected = expected * 2 // 3  # two chroma samples shared by each pair of pixels
    actual = len(ds.PixelData)
    if actual < expected:
        raise InputError(TRUNCATED, f"pixel data holds {actual} bytes; rows × columns × samples × frames × "
                         f"bits need {expected}", "decode")


def _frame_item(ds: Dataset, sequence: str, frame: int) -> Dataset | None:
    """An item of a functional-group sequence for one frame: per-frame first, then shared."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        value = ds.get(groups)
        if value and len(value) > index and value[index].get(sequence):
            return value[index].get(sequence)[0]
    return None


def _modality_lut(stored: np.ndarray, ds: Dataset, frames: list[int]) -> np.ndarray:
    """Stored values → output units (Hounsfield units for CT), per frame for enhanced objects."""
    if ds.get("ModalityLUTSequence") or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        if "ModalityLUTSequence" not in ds:
            ds.setdefault("RescaleSlope", 1.0)
            ds.setdefault("RescaleIntercept", 0.0)
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    pixels = stored.astype(np.float32)
    for position, frame in enumerate(frames):
        item = _frame_item(ds, "PixelValueTransformationSequence", frame)
        if item is not None:
            slope = float(item.get("RescaleSlope") or 1.0)
            pixels[position] = pixels[position] * slope + float(item.get("RescaleIntercept") or 0.0)
    return pixels


def _first(value) -> float | None:
    """The first number of a DS value that may hold several (alternative windows)."""
    if value is None or value == "":
        return None
    if not isinstance(value, (str, bytes, int, float)):
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _voi_windows(ds: Dataset, frames: list[int]) -> list[tuple[float, float] | None]:
    """The first VOI window of each frame as (low, high), from the top level or the functional groups."""
    windows = []
    for frame in frames:
        source = ds if "WindowCenter" in ds else _frame_item(ds, "FrameVOILUTSequence", frame)
        center = _first(source.get("WindowCenter")) if source is not None else None
        width = _first(source.get("WindowWidth")) if source is not None else None
        windows.append((center - width / 2, center + width / 2) if center is not None and width and width > 0
                       else None)
    return windows
