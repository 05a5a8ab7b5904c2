"""Ground-truth masks for `eval segment`: the labels CSV's `mask` column read as integer class maps
aligned with the stored slices, and the class names.

Three kinds of mask, told apart by the file name:
- a PNG/TIFF label image per raster or DICOM slice (8- or 16-bit; 0/255 binary masks read as 0/1);
- a NIfTI label volume per NIfTI image volume, cut by the ingest's own reader, so the labels of a
  stored row are at `frame` exactly as its pixels were;
- a DICOM SEG referencing a stored DICOM series, read with highdicom and matched slice by slice.

A mask that cannot be used is a MaskError with a stable reason: the eval counts and lists the row
and goes on. Nothing is resampled or realigned to make a mask fit: a size, shape or affine that
differs from the image's is an error, never a silent misalignment.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedstore.errors import InputError, UsageError
from embedstore.sources.discover import check_input_file
from embedstore.sources.nifti import NiftiLayout, nifti_layout, read_nifti_slices

if TYPE_CHECKING:
    from highdicom.seg import Segmentation

MASK_REASONS = ("unreadable_mask", "size_mismatch", "geometry_mismatch", "not_integer", "unknown_class", "not_in_seg")

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_CLASS_VALUE = np.iinfo(np.int16).max  # masks are int16 class maps
# A binary mask saved for viewing holds 0 and the format's full scale (255, or 65535 at 16 bits):
# that is class 1, not class 255 (the "0/255 binary masks read as 0/1").
FULL_SCALE = (255, 65535)
# Canonical affines of an image and its label volume written by different tools differ by float32
# rounding of the header (about 1e-5 mm at 200 mm from the origin); a real misregistration is far larger.
AFFINE_TOLERANCE_MM = 1e-3
# DICOM positions are decimal strings of at most 16 characters and writers round them; a hundredth of
# a millimetre absorbs that rounding and is far below any voxel size.
POSITION_TOLERANCE_MM = 1e-2
FRACTION_THRESHOLD = 0.5  # a FRACTIONAL SEG pixel belongs to a segment from probability / occupancy 0.5
CLASS_SPEC = re.compile(r"^\s*(-?\d+)\s*:\s*(.*?)\s*$")


class MaskError(Exception):
    """One labels row whose mask cannot be used: the eval counts and lists it, and goes on."""

    def __init__(self, reason: str, message: str):
        assert reason in MASK_REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------------------------------- classes

def parse_classes(spec: str | None, labels_csv: Path) -> dict[int, str] | None:
    """Foreground class values → names (background 0 is never in it), sorted by value.

    `spec` is "1:liver,2:spleen" or the path of a JSON file with a `labels` map: the MSD
    dataset.json form {"0": "background", "1": "liver"} or the nnU-Net v2 form
    {"background": 0, "liver": 1}. Without a spec, a dataset.json beside the labels CSV is read when
    there is one, else None (the caller names classes by value). UsageError for anything malformed.
    """
    if spec is None:
        beside = Path(labels_csv).parent / "dataset.json"
        return _classes_from_json(beside) if beside.is_file() else None
    if spec.strip().lower().endswith(".json") or Path(spec).is_file():
        return _classes_from_json(Path(spec))
    return _checked_classes(_pairs_from_spec(spec), f"--classes {spec!r}", allow_background=False)


def _pairs_from_spec(spec: str) -> list[tuple[int, str]]:
    pairs = []
    for part in spec.split(","):
        match = CLASS_SPEC.match(part)
        if not match:
            raise UsageError(f"--classes takes value:name pairs such as 1:liver,2:spleen; {part.strip()!r} is not one")
        pairs.append((int(match.group(1)), match.group(2)))
    return pairs


def _classes_from_json(path: Path) -> dict[int, str]:
    """The `labels` map of an MSD or nnU-Net v2 dataset.json, background dropped."""
    check_input_file(path, "classes file")
    try:
        labels = json.loads(path.read_text()).get("labels")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        raise UsageError(f"classes file {path} is not a JSON object: {error}") from None
    if not isinstance(labels, dict) or not labels:
        raise UsageError(f"classes file {path} has no 'labels' map (expected {{\"1\": \"liver\", ...}})")
    return _checked_classes(_pairs_from_labels_map(labels, path), f"classes file {path}", allow_background=True)


def _pairs_from_labels_map(labels: dict, path: Path) -> list[tuple[int, str]]:
    """(value, name) pairs of either form: MSD maps value strings to names, nnU-Net v2 names to values."""
    if all(re.fullmatch(r"-?\d+", key.strip()) for key in labels):
        return [(int(key), str(name).strip()) for key, name in labels.items()]
    if all(isinstance(value, int) and not isinstance(value, bool) for value in labels.values()):
        return [(value, name.strip()) for name, value in labels.items()]
    # nnU-Net v2 region labels ({"tumour": [1, 2]}) overlap: not a class map one pixel value can answer.
    raise UsageError(f"classes file {path}: 'labels' must map values to names or names to single integer "
                     f"values; it holds {json.dumps(labels)[:120]}")


def _checked_classes(pairs: list[tuple[int, str]], source: str, allow_background: bool) -> dict[int, str]:
    """The pairs as a map without background; UsageError for a bad value, an empty or repeated name, or a
    repeated value. Background 0 may only be named in a dataset.json, where MSD lists it."""
    if allow_background:
        pairs = [(value, name) for value, name in pairs if value != 0]
    classes: dict[int, str] = {}
    for value, name in pairs:
        if not 0 < value <= MAX_CLASS_VALUE:
            raise UsageError(f"{source}: class values lie within 1..{MAX_CLASS_VALUE} (0 is background), not {value}")
        if not name:
            raise UsageError(f"{source}: class {value} has an empty name")
        if value in classes:
            raise UsageError(f"{source}: class value {value} is given twice")
        if name in classes.values():  # the per-class table is keyed by name
            raise UsageError(f"{source}: class name {name!r} is given to two values")
        classes[value] = name
    if not classes:
        raise UsageError(f"{source} names no foreground class")
    return dict(sorted(classes.items()))


def check_class_values(mask: np.ndarray, classes: dict[int, str] | None) -> None:
    """MaskError unknown_class naming the values in `mask` that are neither 0 nor a key of `classes`
    (nothing to check when classes is None)."""
    if classes is None:
        return
    unknown = [int(value) for value in np.unique(mask) if value != 0 and int(value) not in classes]
    if unknown:
        raise MaskError("unknown_class", f"mask holds class values {', '.join(map(str, unknown))}, not among the "
                                         f"classes {', '.join(f'{v}:{n}' for v, n in classes.items())}")


def mask_kind(path: str) -> str:
    """'image' (.png .tif .tiff), 'nifti' (.nii .nii.gz), else 'dicom_seg'; case-insensitive."""
    name = path.lower()
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    return "dicom_seg"


def _class_map(values: np.ndarray, path: str) -> np.ndarray:
    """Whole-number label values as int16; not_integer for fractions or NaN, unknown_class for values
    an int16 class map cannot hold (negative, or over 32767)."""
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):  # NaN fails too
        raise MaskError("not_integer", f"mask {path} holds values that are not whole numbers "
                                       f"(a probability map or a resampled mask, not class labels)")
    low, high = (values.min(), values.max()) if values.size else (0, 0)
    if low < 0 or high > MAX_CLASS_VALUE:
        raise MaskError("unknown_class", f"mask {path} holds values from {low:g} to {high:g}; class values "
                                         f"lie within 0..{MAX_CLASS_VALUE}")
    return values.astype(np.int16)


# ------------------------------------------------------------------------------------ 2D images

def read_mask_image(path: str, rows: int, cols: int) -> np.ndarray:
    """A 2D label image (PNG/TIFF, 8- or 16-bit, bilevel, palette indices, or an RGB/RGBA whose colour
    channels are equal) as (rows, cols) int16 class values; 0/255 (0/65535) binary masks read as 0/1.

    MaskError unreadable_mask (missing, not an image, several pages, a colour image whose channels
    differ), size_mismatch (its size is not rows x cols), not_integer (float values that are not whole)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            _check_image_size(image, path, rows, cols)  # from the header, before any pixel is decoded
            values = _grey_values(image, path)
    except FileNotFoundError:
        raise MaskError("unreadable_mask", f"mask {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise MaskError("unreadable_mask", f"mask {path} cannot be read as an image: {error}") from None
    if values.dtype.kind in "ui" and _is_full_scale_binary(values):
        values = (values > 0).astype(np.uint8)
    return _class_map(values, path)


def _check_image_size(image, path: str, rows: int, cols: int) -> None:
    if getattr(image, "n_frames", 1) > 1:
        raise MaskError("unreadable_mask", f"mask {path} has {image.n_frames} pages; a mask is one 2D label image")
    if (image.height, image.width) != (rows, cols):
        raise MaskError("size_mismatch", f"mask {path} is {image.height}x{image.width} (rows x cols), "
                                         f"its image is {rows}x{cols}")


def _grey_values(image, path: str) -> np.ndarray:
    """The one channel of label values: grey and palette images as stored (a palette image's values
    are its indices, as in VOC-style masks), a colour image only when its colour channels agree."""
    image.load()
    values = np.asarray(image)
    if image.mode in ("RGB", "RGBA", "LA"):
        colours = values[..., :1] if image.mode == "LA" else values[..., :3]  # alpha is opacity, not a class
        if not (colours == colours[..., :1]).all():
            raise MaskError("unreadable_mask", f"mask {path} is a colour image whose channels differ; "
                                               f"a mask holds one class value per pixel")
        values = colours[..., 0]
    elif values.ndim != 2:
        raise MaskError("unreadable_mask", f"mask {path} has image mode {image.mode}, not a single-channel label image")
    return values


def _is_full_scale_binary(values: np.ndarray) -> bool:
    present = set(np.unique(values).tolist())
    return any(present <= {0, full} and full in present for full in FULL_SCALE)


# ----------------------------------------------------------------------------------- NIfTI volumes

def read_mask_volume(mask_path: str, image_path: str, axis: str) -> np.ndarray:
    """A NIfTI label volume cut exactly as the ingest cut `image_path` along `axis`: (n_volumes *
    n_slices, rows, cols) int16, indexed by the stored row's `frame`. A 3D label volume of a 4D image
    (MSD brain tumours: four modalities, one label volume) labels every one of its volumes.

    Both files go through the ingest's NIfTI reader (same reorientation, same cut). MaskError
    geometry_mismatch when the canonical shapes or affines differ, unreadable_mask when either file
    cannot be read, not_integer when the labels are not whole numbers."""
    mask_layout, image_layout = _layout(mask_path, axis, "label volume"), _layout(image_path, axis, "image volume")
    _check_same_geometry(mask_layout, image_layout)
    try:
        slices, _ = read_nifti_slices(mask_path, axis, modality="SEG")
    except InputError as error:
        raise MaskError("unreadable_mask", f"label volume {mask_path}: {error.message}") from None
    labels = _class_map(slices, mask_path)
    return np.concatenate([labels] * image_layout.n_volumes) if mask_layout.n_volumes == 1 else labels


def _layout(path: str, axis: str, what: str) -> NiftiLayout:
    try:
        return nifti_layout(path, axis)
    except InputError as error:
        raise MaskError("unreadable_mask", f"{what} {path}: {error.message}") from None


def _check_same_geometry(mask: NiftiLayout, image: NiftiLayout) -> None:
    """geometry_mismatch unless the label volume lies on the image's canonical voxel grid."""
    if mask.shape != image.shape or mask.n_volumes not in (1, image.n_volumes):
        raise MaskError("geometry_mismatch", f"label volume {mask.path} has canonical shape {_shape(mask)}, "
                                             f"its image {image.path} has {_shape(image)}")
    if not np.allclose(mask.affine, image.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        difference = float(np.abs(mask.affine - image.affine).max())
        raise MaskError("geometry_mismatch", f"label volume {mask.path} has another affine than its image "
                                             f"{image.path}: canonical affines differ by up to {difference:.4g} "
                                             f"(mm, or mm per voxel), over {AFFINE_TOLERANCE_MM} allowed")


def _shape(layout: NiftiLayout) -> tuple[int, ...]:
    return layout.shape + ((layout.n_volumes,) if layout.n_volumes > 1 else ())


# -------------------------------------------------------------------------------------- DICOM SEG

class DicomSeg:
    """A DICOM SEG object read with highdicom, answering one source slice at a time.

    Slices are matched by SOPInstanceUID when every SEG frame names the source instance it was drawn
    on, with that instance's pixel grid (SpatialLocationsPreserved YES: the condition under which
    highdicom indexes by source instance); otherwise by ImagePositionPatient on the stack the SEG's
    frames form. SEGs store only the frames where a segment is present, so a slice of a referenced
    series without a frame is all background.

    Segments combine into one label map holding segment numbers. Where segments overlap, the pixel
    takes the higher segment number (highdicom's own rule when it skips overlap checks); FRACTIONAL
    segments count where their value is 0.5 or more.
    """

    def __init__(self, seg: Segmentation, path: str):
        self._seg = seg
        self.path = path
        self.rows, self.cols = int(seg.Rows), int(seg.Columns)
        self._segment_numbers = sorted(seg.segment_numbers)  # ascending: later (higher) numbers win overlaps
        self.segment_names: dict[int, str] = {
            number: seg.get_segment_description(number).segment_label for number in self._segment_numbers}
        references = seg.get("ReferencedSeriesSequence", [])
        self.referenced_series_uids: set[str] = {str(series.SeriesInstanceUID) for series in references}
        self._referenced_instances = {str(instance.ReferencedSOPInstanceUID) for series in references
                                      for instance in series.get("ReferencedInstanceSequence", [])}
        self._by_instance = _frames_name_their_source(seg)

    def labels_for(self, sop_uid: str | None, image_position: tuple[float, float, float] | None,
                   rows: int, cols: int, series_uid: str | None = None) -> np.ndarray:
        """(rows, cols) int16 label map of one source slice. `series_uid` (optional; a stored suffix
        "#<rows>x<cols>-<plane>" is ignored) makes a slice of a referenced series count as referenced
        even when the SEG lists only some of its instances.

        MaskError not_in_seg when the slice is not one the SEG references and no SEG frame lies at its
        position; size_mismatch when the SEG's rows x cols differ from the image's."""
        referenced = sop_uid in self._referenced_instances or (
            series_uid is not None and series_uid.split("#")[0] in self.referenced_series_uids)
        if self._by_instance:
            labels = self._labels_of_instance(sop_uid) if referenced else None
        else:
            labels = self._labels_at(image_position, sop_uid)
            if labels is None and referenced:
                labels = np.zeros((self.rows, self.cols), np.int16)
        if labels is None:
            raise MaskError("not_in_seg", f"slice {sop_uid} at {image_position} is not in SEG {self.path}: it "
                                          f"references series {', '.join(sorted(self.referenced_series_uids))}"
                                          + ("" if self._by_instance else " and has no frame at that position"))
        if labels.shape != (rows, cols):
            raise MaskError("size_mismatch", f"SEG {self.path} frames are {self.rows}x{self.cols} (rows x cols), "
                                             f"slice {sop_uid} is {rows}x{cols}")
        return labels

    def _labels_of_instance(self, sop_uid: str) -> np.ndarray:
        """The frames drawn on `sop_uid`; background when there are none."""
        segments = self._seg.get_pixels_by_source_instance(
            [sop_uid], segment_numbers=self._segment_numbers, assert_missing_frames_are_empty=True)
        return self._combined(segments[0])

    def _labels_at(self, position: tuple[float, float, float] | None, sop_uid: str | None) -> np.ndarray | None:
        """The SEG's slice at `position` (background where the stack has no frame), None when the
        position is not on the SEG's stack of frames."""
        if position is None:
            raise MaskError("not_in_seg", f"slice {sop_uid} has no ImagePositionPatient, and SEG {self.path} "
                                          f"frames do not name their source instances")
        index = self._stack_index(np.asarray(position, dtype=float))
        if index is None:
            return None
        volume = self._seg.get_volume(
            slice_start=index, slice_end=index + 1, as_indices=True, segment_numbers=self._segment_numbers,
            allow_missing_positions=True, atol=POSITION_TOLERANCE_MM)
        return self._combined(volume.array[0])

    def _stack_index(self, position: np.ndarray) -> int | None:
        """The stack slice whose first pixel lies at `position` (within POSITION_TOLERANCE_MM), if any."""
        if self._stack is None:
            raise MaskError("unreadable_mask", f"SEG {self.path} frames neither name their source instances nor "
                                               f"lie on one regularly spaced stack: no slice can be placed")
        affine, n_slices = self._stack
        voxel = np.round(np.linalg.solve(affine, np.append(position, 1.0))[:3])
        on_stack = voxel[1] == 0 and voxel[2] == 0 and 0 <= voxel[0] < n_slices
        distance = np.linalg.norm((affine @ np.append(voxel, 1.0))[:3] - position)
        return int(voxel[0]) if on_stack and distance <= POSITION_TOLERANCE_MM else None

    @cached_property
    def _stack(self) -> tuple[np.ndarray, int] | None:
        """Voxel (slice, row, col) → LPS affine and slice count of the SEG's frames, None when they do not
        form one regular stack (gaps where a slice has no segment are allowed)."""
        geometry = self._seg.get_volume_geometry(allow_missing_positions=True, atol=POSITION_TOLERANCE_MM)
        return None if geometry is None else (np.asarray(geometry.affine, dtype=float), geometry.spatial_shape[0])

    def _combined(self, segments: np.ndarray) -> np.ndarray:
        """(rows, cols, segments) → (rows, cols) int16 segment numbers; a higher number overwrites a lower."""
        labels = np.zeros(segments.shape[:2], np.int16)
        for number, segment in zip(self._segment_numbers, np.moveaxis(segments, -1, 0)):
            labels[segment >= FRACTION_THRESHOLD] = number
        return labels


def _frames_name_their_source(seg: Segmentation) -> bool:
    """Whether every frame names the single-frame source instance it was drawn on, on that instance's
    pixel grid (DerivationImageSequence → SourceImageSequence, SpatialLocationsPreserved YES). A frame of
    a multi-frame source (ReferencedFrameNumber) is placed by position: its instance UID names no slice."""
    frames = seg.get("PerFrameFunctionalGroupsSequence")
    if not frames:
        return False
    for frame in frames:
        sources = [source for derivation in frame.get("DerivationImageSequence", [])
                   for source in derivation.get("SourceImageSequence", [])]
        if not sources or any(source.get("SpatialLocationsPreserved") != "YES" or "ReferencedFrameNumber" in source
                              for source in sources):
            return False
    return True


def read_dicom_seg(path: str) -> DicomSeg:
    """The SEG at `path`; MaskError unreadable_mask when it is missing or not a readable DICOM SEG."""
    import highdicom as hd

    try:
        return DicomSeg(hd.seg.segread(path), path)
    except FileNotFoundError:
        raise MaskError("unreadable_mask", f"mask {path} does not exist") from None
    except Exception as error:  # pydicom and highdicom raise many types for a file that is not a SEG
        raise MaskError("unreadable_mask", f"mask {path} is not a readable DICOM SEG: "
                                           f"{type(error).__name__}: {error}") from None
