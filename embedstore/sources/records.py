"""Records that flow from sources to the store."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class SliceItem:
    """One 2D slice or frame to embed; becomes one `slices` row."""

    # DICOM: dicom:<SOPInstanceUID>:<frame>; NIfTI: nifti:<path>:<axis>[:t<volume>]:<n>;
    # raster: file:<path>, file:<path>#p<page> for pages after the first
    item_id: str
    path: str
    study_uid: str
    series_uid: str  # DICOM series split by geometry get a "#<rows>x<cols>-<plane>" suffix
    slice_index: int  # position in its series, ordered along the slice normal
    frame: int = 0  # frame of a multi-frame DICOM, slice number in a NIfTI file (all volumes), or raster page
    sop_uid: str | None = None
    patient_id: str | None = None  # as read; the ingest pseudonymises it before anything is stored
    modality: str | None = None
    rows: int | None = None
    cols: int | None = None
    body_part: str | None = None
    series_description: str | None = None
    study_date: str | None = None  # YYYY-MM-DD
    pixel_spacing: tuple[float, float] | None = None  # mm between rows, between columns
    slice_thickness: float | None = None
    image_position: tuple[float, float, float] | None = None  # patient LPS mm of the first pixel
    image_orientation: tuple[float, ...] | None = None  # row and column direction cosines (6)
    slice_position: float | None = None  # mm along the slice normal: the key of the series order
    intensity: str | None = None  # set by the decode stage: what the intensity mapping did
    kind: str = "dicom"  # the reader its file needs: dicom | nifti | raster
    axis: str | None = None  # the slicing axis of a NIfTI slice (axial, coronal, sagittal)


@dataclass
class ReadTask:
    """One file to read once, yielding the listed items (a subset when resuming)."""

    kind: str  # "dicom" | "nifti" | "raster"
    path: str
    items: list[SliceItem] = field(default_factory=list)
    axis: str = "axial"  # NIfTI: the slicing axis
    # DICOM: other files holding the same SOP instance, tried in turn if this one cannot be decoded
    alternates: list[str] = field(default_factory=list)

    def at(self, path: str) -> "ReadTask":
        """The same task read from another file (an alternate copy of the instance)."""
        return replace(self, path=path, items=[replace(item, path=path) for item in self.items], alternates=[])


@dataclass
class NativeSlices:
    """Slices as read, before any intensity mapping: what the preprocessing starts from. DICOM
    values stay as stored (int16, uint16, uint8: a half or a quarter of float32's bytes to hand from
    a decode worker to the model's device) with the linear modality LUT still to apply, per slice."""

    stored: np.ndarray  # (n, rows, cols) stored values, or float32 where a LUT or a colour reduction made them
    modality: str | None
    # Per slice (low, high) of the file's own VOI window, None where the file gives none.
    header_windows: list[tuple[float, float] | None] | None = None
    monochrome1: bool = False  # stored inverted (X-ray): high values are to be shown dark
    body_part: str | None = None
    voi_lut_applied: bool = False  # the file's VOI LUT Sequence has already mapped the values
    rescale: np.ndarray | None = None  # (n, 2) float32 slope, intercept of each slice's modality LUT; None: none

    @property
    def pixels(self) -> np.ndarray:
        """(n, rows, cols) float32 after the modality LUT (Hounsfield units for CT)."""
        return modality_values(self.stored, self.rescale)


IDENTITY_RESCALE = np.array([1.0, 0.0], dtype=np.float32)  # (slope, intercept) of a slice stored in output units


def modality_values(stored: np.ndarray, rescale: np.ndarray | None) -> np.ndarray:
    """Stored values through per-slice slope and intercept, in float32, on the host. The product and
    the sum are rounded one at a time, as the device mapping (preprocess.unit_stack) does them."""
    values = stored.astype(np.float32)
    if rescale is not None:
        values *= rescale[:, 0, None, None]
        values += rescale[:, 1, None, None]
    return values


def in_native_order(values: np.ndarray) -> np.ndarray:
    """C-contiguous, writable, in this machine's byte order (torch takes no other), copied only if needed."""
    return np.require(values, values.dtype.newbyteorder("="), ["C", "W"])


@dataclass
class Failure:
    """An input that could not be embedded; becomes one `failures` row."""

    path: str
    stage: str  # discover | read | decode | embed | write
    reason: str  # stable code from embedstore.errors.REASONS
    message: str
