"""Records that flow from sources to the store."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SliceItem:
    """One 2D slice or frame to embed; becomes one `slices` row."""

    item_id: str  # DICOM: dicom:<SOPInstanceUID>:<frame>; NIfTI: nifti:<path>:axial:<n>; raster: file:<path>
    path: str
    study_uid: str
    series_uid: str
    slice_index: int  # position in its series, ordered along the slice normal
    frame: int = 0  # frame of a multi-frame DICOM, or slice number in a NIfTI volume
    sop_uid: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    rows: int | None = None
    cols: int | None = None


@dataclass
class ReadTask:
    """One file to read once, yielding the listed items (a subset when resuming)."""

    kind: str  # "dicom" | "nifti" | "raster"
    path: str
    items: list[SliceItem] = field(default_factory=list)


@dataclass
class Failure:
    """An input that could not be embedded; becomes one `failures` row."""

    path: str
    stage: str  # discover | read | decode | embed | write
    reason: str  # stable code from embedstore.errors.REASONS
    message: str
