"""DICOM pixels: decode any transfer syntax pydicom or an installed codec plugin reads, check the
pixel data against the header, and bring every photometric interpretation to one grey scale.

Codecs come from pydicom's plugins: pylibjpeg (libjpeg, openjpeg, rle), pyjpegls and python-gdcm,
all dependencies of embedstore, and GDCM's own reader for streams pydicom's GDCM plugin refuses. A syntax no installed plugin handles is `unsupported_transfer_syntax`;
data every plugin rejects is `corrupt_stream`; pixel data shorter than rows × columns × frames ×
samples × bits is `truncated`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder

from embedstore.errors import (
    CORRUPT_STREAM,
    INVALID_HEADER,
    NO_PIXEL_DATA,
    TRUNCATED,
    UNSUPPORTED_TRANSFER_SYNTAX,
    InputError,
)
from embedstore.sources.dicom import PIXEL_KEYWORDS, parse_dicom
from embedstore.sources.records import IDENTITY_RESCALE, in_native_order, modality_values

try:  # GDCM prints its own diagnostics to stderr; a failure row says what matters
    import gdcm

    gdcm.Trace.SetError(False)
    gdcm.Trace.SetWarning(False)
except ImportError:
    gdcm = None

# pydicom tries plugins in a fixed order (GDCM first); these measured faster on 512×512 CT
# (benchmarks/decode.py): pyjpegls 1.5× GDCM on JPEG-LS, Pillow 2× GDCM on baseline JPEG,
# pylibjpeg-rle 8× pydicom's own RLE decoder (colour RLE; grey RLE takes _decode_rle_grey).
FASTEST_PLUGIN = {
    uid.JPEGLSLossless: "pyjpegls",
    uid.JPEGLSNearLossless: "pyjpegls",
    uid.JPEGBaseline8Bit: "pillow",
    uid.RLELossless: "pylibjpeg",
}
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as for YBR_FULL


@dataclass
class DicomPixels:
    stored: np.ndarray  # (n, rows, cols) as stored; float32 after a LUT or a colour reduction to luminance
    windows: list[tuple[float, float] | None]  # the file's own VOI window per frame, as (low, high)
    monochrome1: bool  # higher values are to be shown darker
    voi_lut_applied: bool = False  # the file's VOI LUT Sequence has already mapped the values
    rescale: np.ndarray | None = None  # (n, 2) float32 slope, intercept per frame: the modality LUT still to apply

    @property
    def pixels(self) -> np.ndarray:
        """(n, rows, cols) float32 after the modality LUT (Hounsfield units for CT)."""
        return modality_values(self.stored, self.rescale)


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
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise InputError(INVALID_HEADER, "no Transfer Syntax UID in the file meta information", "decode")
    layout = _image_layout(ds, syntax.is_little_endian)
    n_frames, samples, photometric = layout.frames, layout.samples, layout.photometric
    if max(frames) >= n_frames:
        raise InputError(INVALID_HEADER, f"frame {max(frames)} requested from a {n_frames}-frame image", "decode")
    stored = _decode(path, ds, syntax, layout)
    if stored.ndim == (2 if samples == 1 else 3):
        stored = stored[None]
    if frames != list(range(n_frames)):  # a resumed subset; a full read needs no copy
        stored = stored[frames]
    rescale = None
    if photometric == "PALETTE COLOR":
        stored = apply_color_lut(stored, ds).astype(np.float32) @ LUMINANCE
    elif samples > 1:  # pydicom has already turned YBR into RGB; radiology is grey
        stored = stored[..., :3].astype(np.float32) @ LUMINANCE
    else:
        stored, rescale = _modality_lut(stored, ds, frames)
    windows, lut_applied = [None] * len(frames), False
    if samples == 1 and photometric != "PALETTE COLOR":
        if apply_voi_lut and ds.get("VOILUTSequence"):
            stored, rescale = _apply_voi_lut(modality_values(stored, rescale), ds, syntax.is_little_endian), None
            lut_applied = True
        else:
            windows = _voi_windows(ds, frames)
    return DicomPixels(in_native_order(stored), windows, photometric == "MONOCHROME1", lut_applied, rescale)


@dataclass(frozen=True)
class ImageLayout:
    rows: int
    cols: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str


def _image_layout(ds: Dataset, little_endian: bool) -> ImageLayout:
    """The Image Pixel attributes, read once from their raw bytes: pydicom's conversion costs ~20 µs
    per attribute, as much in total as decoding an uncompressed slice."""
    try:
        bits_allocated = _ushort(ds, "BitsAllocated", little_endian)
        rows, cols = _ushort(ds, "Rows", little_endian), _ushort(ds, "Columns", little_endian)
        if bits_allocated is None or rows is None or cols is None:
            raise ValueError("BitsAllocated, Rows or Columns is missing")
        frames = _text_numbers(ds, "NumberOfFrames")
        return ImageLayout(
            rows=rows, cols=cols, frames=int(frames[0]) if frames else 1,
            samples=_ushort(ds, "SamplesPerPixel", little_endian) or 1, bits_allocated=bits_allocated,
            bits_stored=_ushort(ds, "BitsStored", little_endian) or bits_allocated,
            signed=_ushort(ds, "PixelRepresentation", little_endian) == 1,
            photometric=_text(ds, "PhotometricInterpretation") or "MONOCHROME2",
        )
    except (AttributeError, TypeError, ValueError) as error:
        raise InputError(INVALID_HEADER, f"image attributes are missing or malformed: {error}", "decode") from None


def _raw_value(ds: Dataset, keyword: str):
    element = ds.get_item(keyword)
    return None if element is None else element.value


def _ushort(ds: Dataset, keyword: str, little_endian: bool) -> int | None:
    value = _raw_value(ds, keyword)
    if value is None or value == b"" or value == "":
        return None
    if isinstance(value, bytes):
        if len(value) < 2:
            raise ValueError(f"{keyword} holds {len(value)} bytes, not 2")
        return int.from_bytes(value[:2], "little" if little_endian else "big")
    return int(value)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _raw_value(ds, keyword)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value).strip(" \x00") if value is not None else ""
    return text or None


def _text_numbers(ds: Dataset, keyword: str) -> list[float]:
    """An IS or DS attribute's numbers (several, backslash-separated, for alternative windows)."""
    value = _raw_value(ds, keyword)
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, bytes):
        return [float(part) for part in value.decode("ascii", "replace").strip(" \x00").split("\\") if part.strip()]
    if isinstance(value, (str, int, float)):
        return [float(value)]
    return [float(v) for v in value]


def _decode(path: str, ds: Dataset, syntax: uid.UID, layout: ImageLayout) -> np.ndarray:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:  # pydicom's answer for a syntax it has no decoder for at all (MPEG2, say)
        raise InputError(UNSUPPORTED_TRANSFER_SYNTAX, f"no decoder exists for transfer syntax {syntax.name} "
                         f"({syntax})", "decode") from None
    if not decoder.is_available:
        missing = "; ".join(f"{name}: {', '.join(deps)}" for name, deps in decoder.missing_dependencies)
        raise InputError(UNSUPPORTED_TRANSFER_SYNTAX, f"no installed codec decodes {syntax.name} ({syntax})"
                         + (f" — missing {missing}" if missing else ""), "decode")
    if not syntax.is_compressed and "PixelData" in ds:
        pixel_bytes = ds.get_item("PixelData").value  # the raw bytes, without pydicom's value conversion
        _check_native_length(layout, len(pixel_bytes))
        if _is_plain_grey(layout):
            return _grey_values(pixel_bytes, layout, syntax.is_little_endian)
    if syntax == uid.RLELossless and _is_plain_grey(layout):
        decoded = _decode_rle_grey(ds, layout)
        if decoded is not None:
            return decoded
    preferred = FASTEST_PLUGIN.get(syntax)
    if preferred in decoder.available_plugins:
        try:
            ds.pixel_array_options(decoding_plugin=preferred)
            return ds.pixel_array
        except Exception:  # let every plugin try, and report what they say
            ds.pixel_array_options(decoding_plugin="")
    try:
        return ds.pixel_array
    # pydicom raises these when the header's pixel description is missing or one it cannot follow
    # (an absent or odd Bits Allocated, an unknown photometric interpretation): the file, not a bug
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
        decoded = _decode_with_gdcm(path, layout)
        if decoded is not None:
            return decoded
        message = " ".join(str(error).split())
        raise InputError(CORRUPT_STREAM, f"{syntax.name} data rejected by every codec: {message}",
                         "decode") from None


GDCM_DTYPES = {"UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16,
               "UINT32": np.uint32, "INT32": np.int32, "FLOAT32": np.float32, "FLOAT64": np.float64}


def _decode_with_gdcm(path: str, layout: ImageLayout) -> np.ndarray | None:
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
    shape = (layout.frames, layout.rows, layout.cols) + ((samples,) if samples > 1 else ())
    pixels = np.frombuffer(buffer.encode("utf-8", "surrogateescape"), dtype=dtype)
    if pixels.size != int(np.prod(shape)):
        return None
    return pixels.reshape(shape)


def _is_plain_grey(layout: ImageLayout) -> bool:
    """Grey values in whole bytes: what the fast paths below handle (colour and 1-bit images take
    pydicom's general path)."""
    return layout.samples == 1 and layout.bits_allocated in (8, 16, 32) and 0 < layout.bits_stored <= layout.bits_allocated


def _grey_values(pixel_bytes: bytes, layout: ImageLayout, little_endian: bool) -> np.ndarray:
    """Grey pixels straight from their bytes. On a 512×512 slice pydicom's general path costs as
    much as parsing the file. Values narrower than their container (12 bits in 16) are masked or
    sign-extended from BitsStored, as pydicom does: the bits above may hold old overlay planes."""
    bits, unused = layout.bits_allocated, layout.bits_allocated - layout.bits_stored
    dtype = np.dtype(("<" if little_endian else ">") + ("i" if layout.signed else "u") + str(bits // 8))
    count = layout.rows * layout.cols * layout.frames
    pixels = np.frombuffer(pixel_bytes, dtype, count).reshape(layout.frames, layout.rows, layout.cols)
    if unused and layout.signed:
        pixels = (pixels << unused) >> unused  # arithmetic shift: copies the sign bit down
    elif unused:
        pixels = pixels & np.array((1 << layout.bits_stored) - 1, dtype=dtype)
    return pixels


def _decode_rle_grey(ds: Dataset, layout: ImageLayout) -> np.ndarray | None:
    """RLE frames decoded by pylibjpeg-rle straight into bytes: 1.3× pydicom's RLE path, which
    builds each frame through its general decoder. None (pydicom's path then decides) on trouble."""
    try:
        from rle.utils import decode_pixel_data
    except ImportError:
        return None
    try:
        frames = [decode_pixel_data(frame, version=2, rows=layout.rows, columns=layout.cols,
                                    bits_allocated=layout.bits_allocated, byteorder="<")
                  for frame in generate_frames(ds.PixelData, number_of_frames=layout.frames)]
        return _grey_values(frames[0] if len(frames) == 1 else b"".join(frames), layout, little_endian=True)
    except Exception:
        return None


def _check_native_length(layout: ImageLayout, actual: int) -> None:
    values = layout.rows * layout.cols * layout.samples * layout.frames
    expected = (values * layout.bits_allocated + 7) // 8
    if layout.photometric == "YBR_FULL_422":
        expected = expected * 2 // 3  # two chroma samples shared by each pair of pixels
    if actual < expected:
        raise InputError(TRUNCATED, f"pixel data holds {actual} bytes; rows × columns × samples × frames × "
                         f"bits need {expected}", "decode")


def _apply_voi_lut(pixels: np.ndarray, ds: Dataset, little_endian: bool) -> np.ndarray:
    """The first VOI LUT of the file applied to modality-LUT output. (pydicom's apply_voi indexes
    with the LUT's own output type, which wraps around for an 8-bit LUT of more than 256 entries.)"""
    item = ds.VOILUTSequence[0]
    try:
        entries, first, _ = (int(v) for v in item.LUTDescriptor)
        data = item["LUTData"]
        if isinstance(data.value, bytes):
            values = np.frombuffer(data.value, "<u2" if little_endian else ">u2")
        else:
            values = np.asarray(data.value if isinstance(data.value, list) else [data.value])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(INVALID_HEADER, f"VOI LUT Sequence is malformed: {error}", "decode") from None
    entries = entries or 65536
    if first >= 1 << 15 and _ushort(ds, "PixelRepresentation", little_endian) == 1:
        first -= 1 << 16  # the descriptor's first value is signed for signed pixels
    lut = values[:entries].astype(np.float32)
    index = np.clip(np.rint(pixels) - first, 0, len(lut) - 1).astype(np.int64)
    return lut[index]


def _frame_item(ds: Dataset, sequence: str, frame: int) -> Dataset | None:
    """An item of a functional-group sequence for one frame: per-frame first, then shared."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        value = ds.get(groups)
        if value and len(value) > index and value[index].get(sequence):
            return value[index].get(sequence)[0]
    return None


def _modality_lut(stored: np.ndarray, ds: Dataset, frames: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored values and the per-frame slope and intercept that make output units of them
    (Hounsfield units for CT), left to the intensity mapping; a Modality LUT Sequence is applied here."""
    if ds.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32), None
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return stored, np.tile(_rescale(ds), (len(frames), 1))
    items = [_frame_item(ds, "PixelValueTransformationSequence", frame) for frame in frames]  # enhanced objects
    if all(item is None for item in items):
        return stored, None
    return stored, np.stack([_rescale(item) if item is not None else IDENTITY_RESCALE for item in items])


def _rescale(source: Dataset) -> np.ndarray:
    """(slope, intercept) as float32; 1 and 0 where the source gives neither."""
    try:
        slope = (_text_numbers(source, "RescaleSlope") or [1.0])[0]
        intercept = (_text_numbers(source, "RescaleIntercept") or [0.0])[0]
    except ValueError as error:
        raise InputError(INVALID_HEADER, f"rescale slope or intercept is not a number: {error}", "decode") from None
    return np.array([slope, intercept], dtype=np.float32)


def _voi_windows(ds: Dataset, frames: list[int]) -> list[tuple[float, float] | None]:
    """The first VOI window of each frame as (low, high), from the top level or the functional groups."""
    windows = []
    for frame in frames:
        source = ds if "WindowCenter" in ds else _frame_item(ds, "FrameVOILUTSequence", frame)
        try:  # a malformed optional window is ignored, not fatal
            centers, widths = (_text_numbers(source, "WindowCenter"), _text_numbers(source, "WindowWidth")) \
                if source is not None else ([], [])
        except ValueError:
            centers, widths = [], []
        center, width = (centers[0], widths[0]) if centers and widths else (None, None)
        windows.append((center - width / 2, center + width / 2) if width is not None and width > 0 else None)
    return windows
