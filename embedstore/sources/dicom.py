"""DICOM: read headers for the catalog, order series along the slice normal, decode pixels.

Headers are read without pixel data so a catalog of a large archive costs little; pixels are
read once per file in the decode stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

from embedstore.errors import (
    DECODE_ERROR, NO_PIXEL_DATA, NOT_DICOM, TRUNCATED, UNSUPPORTED_TRANSFER_SYNTAX, InputError,
)
from embedstore.sources.records import SliceItem


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
    normal: np.ndarray | None  # unit slice normal from ImageOrientationPatient
    positions: list[np.ndarray | None]  # ImagePositionPatient per frame


def read_header(path: str) -> DicomHeader:
    """Header fields needed to catalog one file; InputError when it is no usable image."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as error:
        raise InputError(NOT_DICOM, f"not a DICOM file: {error}") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(TRUNCATED, f"DICOM header cannot be read: {error}") from None
    if "SOPInstanceUID" not in ds:
        raise InputError(NOT_DICOM, "DICOM dataset without SOPInstanceUID")
    if "Rows" not in ds or "Columns" not in ds:
        raise InputError(NO_PIXEL_DATA, f"{ds.get('Modality', 'object')} without an image (no Rows/Columns)")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    shared_orientation = _shared_orientation(ds)
    positions = _frame_positions(ds, n_frames)
    return DicomHeader(
        path=path,
        sop_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.get("SeriesInstanceUID") or f"nouid:{ds.SOPInstanceUID}"),
        study_uid=str(ds.get("StudyInstanceUID") or f"nouid:{ds.SOPInstanceUID}"),
        patient_id=str(ds.PatientID) if ds.get("PatientID") else None,
        modality=str(ds.Modality) if ds.get("Modality") else None,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        n_frames=n_frames,
        instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
        normal=_normal(shared_orientation),
        positions=positions,
    )


def _shared_orientation(ds) -> list[float] | None:
    if "ImageOrientationPatient" in ds:
        return [float(v) for v in ds.ImageOrientationPatient]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "PlaneOrientationSequence" in shared[0]:
        return [float(v) for v in shared[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    return None


def _frame_positions(ds, n_frames: int) -> list[np.ndarray | None]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) == n_frames:
        positions = []
        for group in per_frame:
            plane = group.get("PlanePositionSequence")
            positions.append(np.array(plane[0].ImagePositionPatient, dtype=float) if plane else None)
        return positions
    if "ImagePositionPatient" in ds and n_frames == 1:
        return [np.array(ds.ImagePositionPatient, dtype=float)]
    return [None] * n_frames


def _normal(orientation: list[float] | None) -> np.ndarray | None:
    if not orientation or len(orientation) != 6:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    length = np.linalg.norm(normal)
    return normal / length if length > 0 else None


def series_items(headers: list[DicomHeader]) -> list[SliceItem]:
    """Items of one series (same SeriesInstanceUID), ordered by position along the slice normal,
    falling back to InstanceNumber and then frame order when positions are missing."""
    frames = [(header, frame) for header in headers for frame in range(header.n_frames)]
    normal = next((h.normal for h in headers if h.normal is not None), None)

    def order(entry):
        header, frame = entry
        position = header.positions[frame]
        along_normal = float(position @ normal) if position is not None and normal is not None else None
        return (
            along_normal is None,
            along_normal or 0.0,
            header.instance_number if header.instance_number is not None else 0,
            header.sop_uid,
            frame,
        )

    items = []
    for index, (header, frame) in enumerate(sorted(frames, key=order)):
        items.append(SliceItem(
            item_id=f"dicom:{header.sop_uid}:{frame}",
            path=header.path,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            slice_index=index,
            frame=frame,
            sop_uid=header.sop_uid,
            patient_id=header.patient_id,
            modality=header.modality,
            rows=header.rows,
            cols=header.cols,
        ))
    return items


def read_frames(path: str, frames: list[int]) -> np.ndarray:
    """The requested frames as (n, rows, cols) float32 after the modality LUT (HU for CT),
    MONOCHROME1 inverted so that higher always means brighter, colour reduced to luminance."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as error:
        raise InputError(NOT_DICOM, f"not a DICOM file: {error}", stage="decode") from None
    except (EOFError, OSError, ValueError) as error:
        raise InputError(TRUNCATED, f"DICOM file cannot be read: {error}", stage="decode") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(NO_PIXEL_DATA, "DICOM object has no pixel data", stage="decode")
    try:
        pixels = ds.pixel_array
    except NotImplementedError as error:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise InputError(
            UNSUPPORTED_TRANSFER_SYNTAX, f"no decoder for transfer syntax {name}: {error}", stage="decode"
        ) from None
    except (ValueError, EOFError) as error:
        reason = TRUNCATED if "length" in str(error).lower() or "shorter" in str(error).lower() else DECODE_ERROR
        raise InputError(reason, f"pixel data cannot be decoded: {error}", stage="decode") from None
    except Exception as error:  # codec plugins raise their own types on corrupt streams
        raise InputError(DECODE_ERROR, f"pixel data cannot be decoded: {type(error).__name__}: {error}",
                         stage="decode") from None
    n_frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if n_frames == 1:
        pixels = pixels[None]
    pixels = pixels[frames]
    if samples > 1:  # radiology is grey: colour images are embedded by luminance
        pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        pixels = apply_rescale(pixels, ds).astype(np.float32, copy=False)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            low = pixels.min(axis=(1, 2), keepdims=True)
            high = pixels.max(axis=(1, 2), keepdims=True)
            pixels = (low + high) - pixels
    return np.ascontiguousarray(pixels, dtype=np.float32)
