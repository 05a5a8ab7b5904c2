"""Series logic: group DICOM frames by SeriesInstanceUID, split stacks of different geometry, order
slices along the slice normal, and measure the spacing of a stack.

A SeriesInstanceUID often holds more than one stack: a localizer in a CT folder, a second
orientation. Frames are grouped strictly by SeriesInstanceUID and split on rows × columns and
orientation; a split part gets a `#<rows>x<cols>-<plane>` suffix on its series_uid. Slices are
ordered by ImagePositionPatient projected on the normal, falling back to InstanceNumber.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from embedstore.errors import INCONSISTENT_SERIES
from embedstore.sources.dicom import DicomHeader
from embedstore.sources.records import Failure, SliceItem

ORIENTATION_DECIMALS = 3  # cosines equal to this precision are one orientation
# A gap this many times the median spacing or more means slices are missing.
MISSING_GAP_FACTOR = 1.5
# dcm2niix calls spacing uneven beyond 0.2 mm; ITK's reader warns beyond a relative 1e-4.
UNEVEN_SPACING_MM = 0.2
POSITION_DECIMALS = 3  # positions equal to a micrometre are one position (echoes, phases, repeats)


def slice_normal(orientation: tuple[float, ...] | None) -> np.ndarray | None:
    if orientation is None:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 1e-6 else None


def plane_name(orientation: tuple[float, ...] | None) -> str:
    normal = slice_normal(orientation)
    if normal is None:
        return "noorientation"
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def series_items(headers: list[DicomHeader]) -> tuple[list[SliceItem], list[Failure]]:
    """Items of the files sharing one SeriesInstanceUID, split into stacks and ordered, and the
    files that contradict the series (another study or patient) as failures."""
    majority = Counter((h.study_uid, h.patient_id) for h in headers).most_common(1)[0][0]
    failures = [
        Failure(h.path, "read", INCONSISTENT_SERIES,
                f"series {h.series_uid} belongs to study {majority[0]} but this file says study {h.study_uid}"
                + ("" if h.patient_id == majority[1] else " and another patient"))
        for h in headers if (h.study_uid, h.patient_id) != majority
    ]
    consistent = [h for h in headers if (h.study_uid, h.patient_id) == majority]
    stacks: dict[tuple, list[tuple[DicomHeader, int]]] = defaultdict(list)
    for header in consistent:
        for frame in range(header.n_frames):
            orientation = header.orientations[frame]
            rounded = tuple(np.round(orientation, ORIENTATION_DECIMALS)) if orientation else None
            stacks[(header.rows, header.cols, rounded)].append((header, frame))
    names = _stack_names(list(stacks))
    items = []
    for geometry, frames in stacks.items():
        series_uid = consistent[0].series_uid + names[geometry]
        items.extend(_ordered_items(series_uid, frames))
    return items, failures


def _stack_names(geometries: list[tuple]) -> dict[tuple, str]:
    """'' for a series of one stack; else a suffix naming each stack's size and plane."""
    if len(geometries) == 1:
        return {geometries[0]: ""}
    names = {g: f"#{g[0]}x{g[1]}-{plane_name(g[2])}" for g in geometries}
    repeated = Counter(names.values())
    for geometry, name in names.items():
        if repeated[name] > 1:  # two oblique stacks of one size: tell them apart by their orientation
            names[geometry] = f"{name}-{hashlib.sha1(repr(geometry[2]).encode()).hexdigest()[:6]}"
    return names


def _ordered_items(series_uid: str, frames: list[tuple[DicomHeader, int]]) -> list[SliceItem]:
    normal = next((n for n in (slice_normal(h.orientations[f]) for h, f in frames) if n is not None), None)

    def along_normal(entry) -> float | None:
        header, frame = entry
        position = header.positions[frame]
        return float(np.dot(position, normal)) if position is not None and normal is not None else None

    def order(entry):
        header, frame = entry
        position = along_normal(entry)
        number = header.instance_number if header.instance_number is not None else 0
        return (position is None, position or 0.0, number, header.sop_uid, frame)

    items = []
    for index, entry in enumerate(sorted(frames, key=order)):
        header, frame = entry
        items.append(SliceItem(
            item_id=f"dicom:{header.sop_uid}:{frame}",
            kind="dicom",
            path=header.path,
            study_uid=header.study_uid,
            series_uid=series_uid,
            slice_index=index,
            frame=frame,
            sop_uid=header.sop_uid,
            patient_id=header.patient_id,
            modality=header.modality,
            rows=header.rows,
            cols=header.cols,
            body_part=header.body_part,
            series_description=header.series_description,
            study_date=header.study_date,
            pixel_spacing=header.pixel_spacing,
            slice_thickness=header.slice_thickness,
            image_position=header.positions[frame],
            image_orientation=header.orientations[frame],
            slice_position=along_normal(entry),
        ))
    return items


@dataclass
class SpacingStats:
    slice_spacing: float | None  # median distance between neighbouring slice positions, mm
    spacing_deviation: float | None  # largest departure of a gap from whole multiples of it, mm
    spacing_deviation_rel: float | None  # the same, relative to the spacing
    n_missing_slices: int  # gaps of two or more spacings, counted in slices
    uneven_spacing: bool  # deviation beyond dcm2niix's 0.2 mm


def spacing_stats(positions: list[float | None]) -> SpacingStats:
    """How evenly a stack's slices are spaced, from their positions along the normal."""
    known = np.unique(np.round([p for p in positions if p is not None], POSITION_DECIMALS))
    if len(known) < 2:
        return SpacingStats(None, None, None, 0, False)
    gaps = np.diff(known)
    spacing = float(np.median(gaps))
    multiples = np.maximum(np.round(gaps / spacing), 1.0)
    missing = int(np.sum(np.where(gaps >= MISSING_GAP_FACTOR * spacing, multiples - 1, 0)))
    deviation = float(np.max(np.abs(gaps - multiples * spacing)))
    return SpacingStats(spacing, deviation, deviation / spacing, missing, deviation > UNEVEN_SPACING_MM)
