"""DICOM files: strict parsing, and the header facts the catalog needs (identity, geometry, metadata).

pydicom is lenient by design: a file cut short yields a partial (even empty) dataset with at most
a warning. `parse_dicom` is strict instead: a value that ends early, or a sequence or encapsulated
pixel data without its closing delimiter, makes the file `truncated`, and an image whose file
ends before its pixel data is `truncated` when its pixels are read. Headers are read without
pixel data so cataloguing a large archive costs little; pixels are read once, in the decode stage.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

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
        except (EOFError, OSError, ValueError, KeyError, TypeError, OverflowError, struct.error, zlib.error) as error:
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
    ds = parse_dicom(path, header_only=True)
    if sop_class_has_no_image(ds):
        name = getattr(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID"), "name", "object")
        raise InputError(NO_PIXEL_DATA, f"{name} holds no image")
    if "Rows" not in ds or "Columns" not in ds:
        if any(keyword in parse_dicom(path) for keyword in PIXEL_KEYWORDS):  # rare: worth a full read
            raise InputError(INVALID_HEADER, "pixel data without Rows/Columns: the image cannot be laid out")
        raise InputError(NO_PIXEL_DATA, f"{ds.get('Modality') or 'DICOM object'} without an image (no Rows/Columns)")
    if "SOPInstanceUID" not in ds:
        raise InputError(INVALID_HEADER, "image without SOPInstanceUID: it cannot be identified")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError) as error:
        raise InputError(INVALID_HEADER, f"Rows, Columns, NumberOfFrames or SamplesPerPixel is not a number: "
                         f"{error}") from None
    if rows < 1 or cols < 1 or n_frames < 1:
        raise InputError(INVALID_HEADER, f"image of {rows}x{cols} pixels and {n_frames} frames")
    check_declared_size((rows, cols, samples) if samples > 1 else (rows, cols), n_frames, max_pixels)
    sop_uid = str(ds.SOPInstanceUID)
    pixel_spacing, thickness = _pixel_measures(ds)
    return DicomHeader(
        path=path,
        sop_uid=sop_uid,
        series_uid=str(ds.get("SeriesInstanceUID") or f"nouid:{sop_uid}"),
        study_uid=str(ds.get("StudyInstanceUID") or f"nouid:{sop_uid}"),
        patient_id=_text(ds, "PatientID"),
        modality=_text(ds, "Modality"),
        rows=rows,
        cols=cols,
        n_frames=n_frames,
        instance_number=_optional_int(ds, "InstanceNumber"),
        orientations=_frame_values(ds, n_frames, "PlaneOrientationSequence", "ImageOrientationPatient", 6),
        positions=_frame_values(ds, n_frames, "PlanePositionSequence", "ImagePositionPatient", 3),
        body_part=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        study_date=_iso_date(_text(ds, "StudyDate")),
        pixel_spacing=pixel_spacing,
        slice_thickness=thickness,
    )


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value not in (None, "") else ""
    return text or None


def _optional_int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):  # a malformed optional attribute is ignored, not fatal
        return None


def _iso_date(value: str | None) -> str | None:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return None


def _numbers(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _frame_values(ds: Dataset, n_frames: int, sequence: str, keyword: str, count: int) -> list:
    """A geometry attribute per frame: from the per-frame or shared functional groups of an
    enhanced multi-frame object, else from the top level (single-frame files)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_value = None
    if shared and sequence in shared[0] and shared[0][sequence].value:
        shared_value = _numbers(shared[0][sequence][0].get(keyword), count)
    if per_frame and len(per_frame) == n_frames:
        values = []
        for group in per_frame:
            item = group.get(sequence)
            values.append(_numbers(item[0].get(keyword), count) if item else shared_value)
        return values
    if shared_value is not None:
        return [shared_value] * n_frames
    top = _numbers(ds.get(keyword), count) if keyword in ds else None
    # A top-level position belongs to a single-frame image; frames of a cine share the orientation only.
    return [top] * n_frames if count == 6 or n_frames == 1 else [None] * n_frames


def _pixel_measures(ds: Dataset) -> tuple[tuple[float, float] | None, float | None]:
    source = ds
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0] and shared[0].PixelMeasuresSequence:
        source = shared[0].PixelMeasuresSequence[0]
    spacing = _numbers(source.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    thickness = _numbers([source.get("SliceThickness")], 1) if source.get("SliceThickness") not in (None, "") else None
    return spacing, (thickness[0] if thickness else None)
