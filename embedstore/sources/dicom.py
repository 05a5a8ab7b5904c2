"""DICOM files: strict parsing, and the header facts the catalog needs (identity, geometry, metadata).

pydicom is lenient by design: a file cut short yields a partial (even empty) dataset with at most
a warning. `parse_dicom` is strict instead: a value that ends early, or a sequence or encapsulated
pixel data without its closing delimiter, makes the file `truncated`, and an image whose file
ends before its pixel data is `truncated` when its pixels are read. Headers are read without
pixel data so cataloguing a large archive costs little; pixels are read once, in the decode stage.

`read_header` scans the header of a plain file itself (see "the header of a plain file" below)
and hands any other file to `parse_dicom` and pydicom, with the same result either way.
"""

from __future__ import annotations

import math
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import pydicom
from pydicom import config
from pydicom.charset import default_encoding, python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import ENCODED_VR
from pydicom.hooks import hooks, raw_element_value, raw_element_vr
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from embedstore.errors import INVALID_HEADER, NO_PIXEL_DATA, NOT_DICOM, TRUNCATED, UNREADABLE, InputError
from embedstore.sources.limits import DEFAULT_MAX_PIXELS, check_declared_size

# SOP classes that never carry an image, whatever else they hold.
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.1.3.10",  # Media Storage Directory (DICOMDIR)
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection (KOS)
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms (ECG, audio...)
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT structure set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT plan
)
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
UNDEFINED_LENGTH = 0xFFFFFFFF
TAG_HEADER_BYTES = 8  # tag and length (and VR): a file ending inside one is cut, not complete


def parse_dicom(path: str, header_only: bool = False, stage: str = "read") -> Dataset:
    """The dataset of one file, or InputError (not_dicom, truncated) — never a partial dataset.

    `header_only` stops before the pixel data and reads no more of the file than the header.
    """
    forced = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=header_only)
            except InvalidDicomError:
                # Old files without the 128-byte preamble and "DICM" are still DICOM: parse them raw.
                forced = True
                ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
        except PermissionError as error:
            raise InputError(UNREADABLE, f"file cannot be read: {error.strerror}", stage) from None
        except (EOFError, OSError, ValueError, KeyError, TypeError, OverflowError, struct.error, zlib.error,
                BytesLengthException) as error:  # BytesLengthException: cut inside the file meta group length
            reason = NOT_DICOM if forced or not _has_preamble(path) else TRUNCATED
            raise InputError(reason, f"DICOM data cannot be parsed: {error}", stage) from None
    identified = any(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "DirectoryRecordSequence", *PIXEL_KEYWORDS))
    if forced and not identified:
        raise InputError(NOT_DICOM, "not a DICOM file: no preamble and no DICOM identity in the data", stage)
    unterminated = [str(w.message) for w in caught if "before delimiter" in str(w.message)]
    if unterminated:
        raise InputError(TRUNCATED, f"file is truncated: {unterminated[0]}", stage)
    short = _last_element_cut_short(ds.file_meta, path) or _last_element_cut_short(ds, path)
    if short:
        raise InputError(TRUNCATED, f"file is truncated: {short}", stage)
    if not len(ds) and ds.file_meta:
        raise InputError(TRUNCATED, "file is truncated: nothing follows the file meta information", stage)
    if not identified and not ds.file_meta:
        raise InputError(NOT_DICOM, "no DICOM dataset found in the file", stage)
    return ds


def _has_preamble(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def _last_element_cut_short(ds: Dataset, path: str) -> str | None:
    """pydicom hands back whatever bytes a value had before the end of the file, and takes a file
    ending inside the next tag as a clean end. Only the last element read can be affected, so its
    length and the bytes left after it tell."""
    if not len(ds):
        return None
    element = ds.get_item(next(reversed(ds.keys())), keep_deferred=True)
    if not isinstance(element, RawDataElement) or element.length == UNDEFINED_LENGTH:
        return None
    if element.value is not None and len(element.value) < element.length:
        return f"{element.tag} holds {len(element.value)} of its {element.length} bytes"
    left_over = os.path.getsize(path) - (element.value_tell + element.length)
    if 0 < left_over < TAG_HEADER_BYTES:
        return f"the file ends {left_over} bytes into the element after {element.tag}"
    return None


def sop_class_has_no_image(ds: Dataset) -> bool:
    sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    return sop_class.startswith(NON_IMAGE_SOP_PREFIXES) or "DirectoryRecordSequence" in ds


@dataclass
class DicomHeader:
    path: str
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str | None
    modality: str | None
    rows: int
    cols: int
    n_frames: int
    instance_number: int | None
    orientations: list[tuple[float, ...] | None]  # ImageOrientationPatient per frame
    positions: list[tuple[float, float, float] | None]  # ImagePositionPatient per frame
    body_part: str | None = None
    series_description: str | None = None
    study_date: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None


def read_header(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> DicomHeader:
    """Header fields needed to catalog one file; InputError when it is no usable image, or one
    that declares more than `max_pixels` values per frame (refused before anything decodes it)."""
    values = _scan_plain_header(path)
    if values is None:
        return _read_header_with_pydicom(path, max_pixels)
    return _header(path, values, max_pixels)


def _read_header_with_pydicom(path: str, max_pixels: int) -> DicomHeader:
    ds = parse_dicom(path, header_only=True)
    return header_of_dataset(path, ds, max_pixels,
                             has_pixels=lambda: any(keyword in parse_dicom(path) for keyword in PIXEL_KEYWORDS))


def header_of_dataset(path: str, ds: Dataset, max_pixels: int, has_pixels: Callable[[], bool]) -> DicomHeader:
    """The header facts of a dataset read without its pixel data (from a file, or a DICOMweb
    server's metadata); `has_pixels()` says, when Rows or Columns are missing, whether it has an image."""
    if sop_class_has_no_image(ds):
        name = getattr(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID"), "name", "object")
        raise InputError(NO_PIXEL_DATA, f"{name} holds no image")
    if "Rows" not in ds or "Columns" not in ds:
        if has_pixels():  # rare: worth a full read
            raise InputError(INVALID_HEADER, "pixel data without Rows/Columns: the image cannot be laid out")
        raise InputError(NO_PIXEL_DATA, f"{ds.get('Modality') or 'DICOM object'} without an image (no Rows/Columns)")
    if "SOPInstanceUID" not in ds:
        raise InputError(INVALID_HEADER, "image without SOPInstanceUID: it cannot be identified")
    return _header(path, _DatasetValues(ds), max_pixels)


class _Values(Protocol):
    """A file's header values by keyword, as pydicom's `Dataset.get` gives them."""

    def get(self, keyword: str) -> Any: ...

    def has(self, keyword: str) -> bool: ...


class _DatasetValues:
    def __init__(self, ds: Dataset):
        self.ds = ds

    def get(self, keyword: str) -> Any:
        return self.ds.get(keyword)

    def has(self, keyword: str) -> bool:
        return keyword in self.ds


def _header(path: str, values: _Values, max_pixels: int) -> DicomHeader:
    """The header of an image file whose SOP class, Rows, Columns and SOPInstanceUID are there."""
    try:
        rows, cols = int(values.get("Rows")), int(values.get("Columns"))
        n_frames = int(values.get("NumberOfFrames") or 1)
        samples = int(values.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError) as error:
        raise InputError(INVALID_HEADER, f"Rows, Columns, NumberOfFrames or SamplesPerPixel is not a number: "
                         f"{error}") from None
    if rows < 1 or cols < 1 or n_frames < 1:
        raise InputError(INVALID_HEADER, f"image of {rows}x{cols} pixels and {n_frames} frames")
    check_declared_size((rows, cols, samples) if samples > 1 else (rows, cols), n_frames, max_pixels)
    sop_uid = str(values.get("SOPInstanceUID"))
    pixel_spacing, thickness = _pixel_measures(values)
    return DicomHeader(
        path=path,
        sop_uid=sop_uid,
        series_uid=str(values.get("SeriesInstanceUID") or f"nouid:{sop_uid}"),
        study_uid=str(values.get("StudyInstanceUID") or f"nouid:{sop_uid}"),
        patient_id=_text(values, "PatientID"),
        modality=_text(values, "Modality"),
        rows=rows,
        cols=cols,
        n_frames=n_frames,
        instance_number=_optional_int(values, "InstanceNumber"),
        orientations=_frame_values(values, n_frames, "PlaneOrientationSequence", "ImageOrientationPatient", 6),
        positions=_frame_values(values, n_frames, "PlanePositionSequence", "ImagePositionPatient", 3),
        body_part=_text(values, "BodyPartExamined"),
        series_description=_text(values, "SeriesDescription"),
        study_date=_iso_date(_text(values, "StudyDate")),
        pixel_spacing=pixel_spacing,
        slice_thickness=thickness,
    )


def _text(values: _Values, keyword: str) -> str | None:
    value = values.get(keyword)
    text = str(value).strip() if value not in (None, "") else ""
    return text or None


def _optional_int(values: _Values, keyword: str) -> int | None:
    try:
        value = values.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):  # a malformed optional attribute is ignored, not fatal
        return None


def _iso_date(value: str | None) -> str | None:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return None


def _numbers(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(map(float, value))
    except (TypeError, ValueError):
        return None
    # math.isfinite, not numpy's: ~3 us less a call, the same verdict on floats
    return numbers if len(numbers) == count and all(map(math.isfinite, numbers)) else None


def _frame_values(values: _Values, n_frames: int, sequence: str, keyword: str, count: int) -> list:
    """A geometry attribute per frame: from the per-frame or shared functional groups of an
    enhanced multi-frame object, else from the top level (single-frame files)."""
    per_frame = values.get("PerFrameFunctionalGroupsSequence")
    shared = values.get("SharedFunctionalGroupsSequence")
    shared_value = None
    if shared and sequence in shared[0] and shared[0][sequence].value:
        shared_value = _numbers(shared[0][sequence][0].get(keyword), count)
    if per_frame and len(per_frame) == n_frames:
        result = []
        for group in per_frame:
            item = group.get(sequence)
            result.append(_numbers(item[0].get(keyword), count) if item else shared_value)
        return result
    if shared_value is not None:
        return [shared_value] * n_frames
    top = _numbers(values.get(keyword), count) if values.has(keyword) else None
    # A top-level position belongs to a single-frame image; frames of a cine share the orientation only.
    return [top] * n_frames if count == 6 or n_frames == 1 else [None] * n_frames


def _pixel_measures(values: _Values) -> tuple[tuple[float, float] | None, float | None]:
    source = values
    shared = values.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0] and shared[0].PixelMeasuresSequence:
        source = _DatasetValues(shared[0].PixelMeasuresSequence[0])
    spacing = _numbers(source.get("PixelSpacing") or values.get("ImagerPixelSpacing"), 2)
    thickness_value = source.get("SliceThickness")
    thickness = _numbers([thickness_value], 1) if thickness_value not in (None, "") else None
    return spacing, (thickness[0] if thickness else None)


# ------------------------------------------------------------------ the header of a plain file
#
# Through pydicom, read_header ran at ~0.4x the rate of a bare dcmread(stop_before_pixels=True) on
# 32 x 32 CT files: dcmread builds five Datasets per file, then each of the 20 values goes through hooks,
# validation and a DataElement (~5 us a value). Most files of an archive are plain: a preamble,
# the file meta group, then an explicit or implicit VR little endian dataset with defined lengths
# up to the pixel data, and the values read_header takes in their simplest form. Those are
# scanned here in one pass over the first HEADER_PREFIX_BYTES: ~3x the bare dcmread's rate.
#
# The scan gives up on anything else, and parse_dicom reads the file as before. What it accepts,
# parse_dicom accepts with the same values: pydicom reads the same elements of the same bytes in
# the same way; parsing ends at the pixel data, so no value was cut short; and each value is taken
# only in a form that pydicom converts to the same value without a warning (else the scan gives up
# too). tests/test_header_speed.py holds both to the same answers on mutated files.

HEADER_PREFIX_BYTES = 64 * 1024  # holds the header of nearly every image file (a CT slice's: 2-20 KB)
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # where stop_before_pixels stops
CHARSET_TAG = 0x00080005
TRANSFER_SYNTAX_TAG = 0x00020010
_META_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"  # (0002,0000) UL, 4 bytes: the element pydicom converts first
_ITEM_GROUP = 0xFFFE  # items and delimiters: never at the top level of a plain file
_VRS = frozenset(vr for vr in ENCODED_VR if len(vr) == 2)
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)  # a 4-byte length after 2 reserved bytes
_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_LENGTH = struct.Struct("<L")
_SHORT = struct.Struct("<H")
_NOT_PLAIN = object()

_UID = re.compile(rb"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")  # pydicom's UI check, on bytes
_INTEGER = re.compile(rb"[+-]?[0-9]{1,11}")  # IS: 12 characters at most
_DECIMAL = rb"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_DECIMALS = re.compile(_DECIMAL + rb"(?:\\" + _DECIMAL + rb")*")  # DS values, without blanks
_MAX_LENGTH = {"UI": 64, "LO": 64, "DS": 16}
# (0008,0005) values, as pydicom reads them, and the codec it decodes text with for each
_CHARSET_CODECS = {name.encode(): codec for name, codec in python_encoding.items()}


def _unsigned_short(data: bytes, codec: str) -> Any:
    return _SHORT.unpack(data)[0] if len(data) == 2 else _NOT_PLAIN


def _code_string(data: bytes, codec: str) -> Any:
    """CS and DA: decoded as pydicom does, which checks neither."""
    return data.decode(default_encoding).rstrip(" \0") if b"\\" not in data else _NOT_PLAIN


def _long_string(data: bytes, codec: str) -> Any:
    if b"\\" in data or b"\x1b" in data:  # several values, or a character set switched by escape codes
        return _NOT_PLAIN
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        return _NOT_PLAIN
    return text.rstrip("\0 ") if len(text) <= _MAX_LENGTH["LO"] else _NOT_PLAIN


def _uid(data: bytes, codec: str) -> Any:
    data = data.rstrip(b" \0")
    return data.decode("ascii") if len(data) <= _MAX_LENGTH["UI"] and _UID.fullmatch(data) else _NOT_PLAIN


def _integer_string(data: bytes, codec: str) -> Any:
    data = data.rstrip(b" \0")
    number = int(data) if _INTEGER.fullmatch(data) else None
    return number if number is not None and -2 ** 31 <= number < 2 ** 31 else _NOT_PLAIN


def _decimal_string(data: bytes, codec: str) -> Any:
    data = data.rstrip(b" \0")
    if not _DECIMALS.fullmatch(data):
        return _NOT_PLAIN
    items = data.split(b"\\")
    numbers = list(map(float, items))
    if max(map(len, items)) > _MAX_LENGTH["DS"] or not all(map(math.isfinite, numbers)):
        return _NOT_PLAIN
    return numbers[0] if len(numbers) == 1 else numbers


_FROM_BYTES = {"US": _unsigned_short, "CS": _code_string, "DA": _code_string, "LO": _long_string, "UI": _uid,
               "IS": _integer_string, "DS": _decimal_string}
_PLAIN_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality",
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "InstanceNumber", "ImageOrientationPatient",
    "ImagePositionPatient", "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "BodyPartExamined",
    "SeriesDescription", "StudyDate", "SpecificCharacterSet",
)
_PLAIN_TAGS = {int(Tag(keyword)): (keyword, dictionary_VR(keyword)) for keyword in _PLAIN_KEYWORDS}
_PLAIN_VRS = {tag: vr.encode() for tag, (_, vr) in _PLAIN_TAGS.items()}
# Sequences read_header would look into, and the one that makes a DICOMDIR: pydicom's business
_SEQUENCE_TAGS = frozenset(int(Tag(keyword)) for keyword in (
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "DirectoryRecordSequence"))
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns")


class _PlainValues:
    def __init__(self, values: dict[str, Any]):
        self.values = values

    def get(self, keyword: str) -> Any:
        return self.values.get(keyword)

    def has(self, keyword: str) -> bool:
        return keyword in self.values


def _scan_plain_header(path: str) -> _PlainValues | None:
    """The header values of a plain image file, or None when pydicom should read it."""
    if not _pydicom_converts_plainly():
        return None
    try:
        data = _read_head(path)
    except OSError:
        return None  # the same error again, where parse_dicom reports it
    located = _dataset_start(data)
    found = _plain_elements(data, *located) if located else None
    return _plain_values(found) if found is not None else None


def _pydicom_converts_plainly() -> bool:
    """pydicom left as embedstore uses it: no setting or hook that changes what it reads."""
    return not (config.use_DS_numpy or config.use_IS_numpy or config.datetime_conversion
                or config.use_none_as_empty_text_VR_value or config.data_element_callback
                or hooks.raw_element_kwargs or hooks.raw_element_vr is not raw_element_vr
                or hooks.raw_element_value is not raw_element_value)


def _read_head(path: str) -> bytes:
    """The first HEADER_PREFIX_BYTES of the file (all of it when shorter). Unbuffered: a raw read
    into one bytes object, ~2 us less a file than a buffered open()."""
    with open(path, "rb", buffering=0) as handle:
        head = b""
        while len(head) < HEADER_PREFIX_BYTES and (more := handle.read(HEADER_PREFIX_BYTES - len(head))):
            head += more
        return head


def _dataset_start(data: bytes) -> tuple[int, bool] | None:
    """Where the dataset starts after the preamble and a plain file meta group, and whether its
    transfer syntax is implicit VR little endian (else explicit VR little endian)."""
    if data[128:132] != b"DICM" or data[132:140] != _META_GROUP_LENGTH:
        return None
    position, syntax = 132, None
    while position + 8 <= len(data) and data[position:position + 2] == b"\x02\x00":
        element = _element_header(data, position, implicit=False)
        if element is None:
            return None
        tag, _, header, length = element
        end = position + header + length
        if length == UNDEFINED_LENGTH or end > len(data):
            return None
        if tag == TRANSFER_SYNTAX_TAG:
            syntax = data[position + header:end].rstrip(b" \0")
        position = end
    # pydicom reads up to 12 bytes of the next element to see that the dataset starts there
    if position + 12 > len(data) or data[position:position + 2] == b"\x00\x00":  # group 0: a command set
        return None
    if syntax is None or not _UID.fullmatch(syntax):
        return None
    uid = syntax.decode("ascii")
    if uid in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian) or uid in pydicom.uid.PrivateTransferSyntaxes:
        return None
    implicit = uid == ImplicitVRLittleEndian  # any other syntax: explicit VR little endian, as pydicom reads it
    # pydicom reads an implicit dataset whose first element looks explicit as explicit (with a warning)
    if implicit and 0x40 < data[position + 4] < 0x5B and 0x40 < data[position + 5] < 0x5B:
        return None
    return position, implicit


def _element_header(data: bytes, position: int, implicit: bool) -> tuple[int, bytes | None, int, int] | None:
    """(tag, VR or None when implicit, header size, value length) of the element at `position`,
    whose first 8 bytes are in `data`; None for an explicit VR pydicom does not know."""
    if implicit:
        group, element, length = _IMPLICIT.unpack_from(data, position)
        return group << 16 | element, None, 8, length
    group, element, vr, length = _EXPLICIT.unpack_from(data, position)
    if vr not in _VRS:
        return None
    if vr not in _LONG_VRS:
        return group << 16 | element, vr, 8, length
    if position + 12 > len(data):
        return None
    return group << 16 | element, vr, 12, _LENGTH.unpack_from(data, position + 8)[0]


def _plain_elements(data: bytes, position: int, implicit: bool) -> dict[int, bytes] | None:
    """The values of the _PLAIN_TAGS elements of a dataset of defined lengths that ends at its
    pixel data within `data` (so that nothing in it was cut short); None for any other dataset."""
    found: dict[int, bytes] = {}
    while position + 8 <= len(data):
        element = _element_header(data, position, implicit)
        if element is None:
            return None
        tag, vr, header, length = element
        if tag in PIXEL_TAGS:
            return found  # pydicom stops here, before the value
        end = position + header + length
        if length == UNDEFINED_LENGTH or end > len(data) or tag >> 16 == _ITEM_GROUP or tag in _SEQUENCE_TAGS:
            return None
        if tag in _PLAIN_TAGS:
            if vr is not None and vr != _PLAIN_VRS[tag]:
                return None  # a VR other than the dictionary's: pydicom's to read
            found[tag] = data[position + header:end]
        position = end
    return None  # the header goes on past what was read, or there is no pixel data


def _plain_values(found: dict[int, bytes]) -> _PlainValues | None:
    """The values read_header takes, when each is in a plain form and the file an image."""
    charset = found.get(CHARSET_TAG)
    codec = default_encoding if charset is None else _CHARSET_CODECS.get(charset.rstrip(b" \0"))
    if codec is None:
        return None  # several character sets, or one pydicom does not know
    values: dict[str, Any] = {}
    for tag, data in found.items():
        keyword, vr = _PLAIN_TAGS[tag]
        if not data:  # empty, as pydicom gives it
            value = None if vr in ("US", "IS", "DS") else ""
        else:
            value = _FROM_BYTES[vr](data, codec)
            if value is _NOT_PLAIN:
                return None
        values[keyword] = value
    if not all(values.get(keyword) not in (None, "") for keyword in _REQUIRED):
        return None
    if values["SOPClassUID"].startswith(NON_IMAGE_SOP_PREFIXES):
        return None  # not an image: pydicom says which kind of object it is
    return _PlainValues(values)
