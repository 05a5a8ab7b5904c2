"""Masks for `eval segment` (`embedstore.eval.segment.masks`): class names, label images, NIfTI label
volumes cut like their image, and DICOM SEGs written here with highdicom for a generated CT series.

The central checks build each mask from known per-slice truth and compare slice by slice: a NIfTI label
volume derived voxel by voxel from its image (stored with a permuted, flipped affine, and again in
another on-disk orientation) must equal the thresholded image slices the ingest's reader cuts, and a
SEG's labels for every source slice must equal the label map it was built from.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from embedstore.errors import UsageError
from embedstore.eval.segment.masks import (
    MaskError,
    check_class_values,
    mask_kind,
    parse_classes,
    read_dicom_seg,
    read_mask_image,
    read_mask_volume,
)
from embedstore.samples import write_ct_series
from embedstore.sources.nifti import AXES, read_nifti_slices
from tests.support import dicom_seg_sources, write_dicom_seg

# ------------------------------------------------------------------------------------------ classes


def test_classes_from_spec(tmp_path):
    assert parse_classes("2:spleen, 1:liver", tmp_path / "labels.csv") == {1: "liver", 2: "spleen"}


@pytest.mark.parametrize("labels", [
    {"0": "background", "1": "liver", "2": "spleen"},  # MSD dataset.json
    {"background": 0, "liver": 1, "spleen": 2},  # nnU-Net v2 dataset.json
])
def test_classes_from_dataset_json(tmp_path, labels):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "Task", "labels": labels}))
    assert parse_classes(str(path), tmp_path / "labels.csv") == {1: "liver", 2: "spleen"}


def test_classes_from_dataset_json_beside_the_labels(tmp_path):
    assert parse_classes(None, tmp_path / "labels.csv") is None
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "3": "pancreas"}}))
    assert parse_classes(None, tmp_path / "labels.csv") == {3: "pancreas"}


@pytest.mark.parametrize("spec", ["liver", "1=liver", "one:liver", "1:liver,1:spleen", "0:background,1:liver",
                                  "-1:liver", "1:", "1:liver,2:liver", "", "40000:big"])
def test_malformed_class_spec_is_a_usage_error(tmp_path, spec):
    with pytest.raises(UsageError):
        parse_classes(spec, tmp_path / "labels.csv")


@pytest.mark.parametrize("content", [
    json.dumps({"name": "no labels"}),
    json.dumps({"labels": {"0": "background"}}),
    json.dumps({"labels": {"background": 0, "tumour": [1, 2]}}),  # nnU-Net region labels
    json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 1}}),
    json.dumps({"labels": {"0": "background", "1": ""}}),
    json.dumps(["not", "an", "object"]),
    "{not json",
])
def test_malformed_dataset_json_is_a_usage_error(tmp_path, content):
    path = tmp_path / "dataset.json"
    path.write_text(content)
    with pytest.raises(UsageError):
        parse_classes(str(path), tmp_path / "labels.csv")
    with pytest.raises(UsageError):
        parse_classes(None, tmp_path / "labels.csv")


def test_missing_classes_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        parse_classes(str(tmp_path / "nowhere.json"), tmp_path / "labels.csv")


def test_unknown_class_values_are_listed():
    mask = np.array([[0, 1, 2], [5, 7, 7]], np.int16)
    check_class_values(mask, None)
    check_class_values(mask[:, :2][:1], {1: "liver"})
    with pytest.raises(MaskError) as error:
        check_class_values(mask, {1: "liver", 2: "spleen"})
    assert error.value.reason == "unknown_class"
    assert "5, 7" in error.value.message


@pytest.mark.parametrize("path, kind", [("a/m.PNG", "image"), ("m.tif", "image"), ("m.Tiff", "image"),
                                        ("m.nii", "nifti"), ("m.NII.GZ", "nifti"), ("m.dcm", "dicom_seg"),
                                        ("SEG0001", "dicom_seg")])
def test_mask_kind(path, kind):
    assert mask_kind(path) == kind


# ------------------------------------------------------------------------------------- 2D images


def _label_map(rows: int = 20, cols: int = 30) -> np.ndarray:
    labels = np.zeros((rows, cols), np.uint8)
    labels[2:8, 3:12] = 1
    labels[10:18, 15:28] = 2
    labels[12:14, 5:7] = 3
    return labels


def test_binary_mask_stored_as_0_255_reads_as_0_1(tmp_path):
    truth = _label_map() > 0
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "m.png")
    Image.fromarray(truth.astype(np.uint16) * 65535).save(tmp_path / "m16.tif")
    Image.fromarray(truth).save(tmp_path / "bilevel.png")  # mode "1"
    for name in ("m.png", "m16.tif", "bilevel.png"):
        mask = read_mask_image(str(tmp_path / name), 20, 30)
        assert mask.dtype == np.int16
        np.testing.assert_array_equal(mask, truth.astype(np.int16))


def test_multiclass_masks_keep_their_values(tmp_path):
    labels = _label_map()
    Image.fromarray(labels).save(tmp_path / "m.png")
    Image.fromarray(labels.astype(np.uint16) * 1000).save(tmp_path / "m16.tif")
    Image.fromarray(np.stack([labels] * 3, axis=-1)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_mask_image(str(tmp_path / "m.png"), 20, 30), labels)
    np.testing.assert_array_equal(read_mask_image(str(tmp_path / "m16.tif"), 20, 30), labels.astype(np.int16) * 1000)
    np.testing.assert_array_equal(read_mask_image(str(tmp_path / "rgb.png"), 20, 30), labels)


def test_float_tiff_with_fractions_is_not_integer(tmp_path):
    Image.fromarray(_label_map().astype(np.float32)).save(tmp_path / "whole.tif")
    np.testing.assert_array_equal(read_mask_image(str(tmp_path / "whole.tif"), 20, 30), _label_map())
    Image.fromarray(_label_map().astype(np.float32) * 0.4).save(tmp_path / "fractions.tif")
    with pytest.raises(MaskError) as error:
        read_mask_image(str(tmp_path / "fractions.tif"), 20, 30)
    assert error.value.reason == "not_integer"


def test_mask_of_another_size_is_size_mismatch(tmp_path):
    Image.fromarray(_label_map()).save(tmp_path / "m.png")
    with pytest.raises(MaskError) as error:
        read_mask_image(str(tmp_path / "m.png"), 30, 20)
    assert error.value.reason == "size_mismatch"
    assert "20x30" in error.value.message and "30x20" in error.value.message


def test_unreadable_masks(tmp_path):
    colour = np.stack([_label_map(), _label_map(), np.zeros((20, 30), np.uint8)], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    (tmp_path / "text.png").write_text("not an image")
    for name in ("colour.png", "text.png", "missing.png"):
        with pytest.raises(MaskError) as error:
            read_mask_image(str(tmp_path / name), 20, 30)
        assert error.value.reason == "unreadable_mask", name


# ---------------------------------------------------------------------------------- NIfTI volumes

# Voxel axes stored as (z, x, y), the stored x and z running backwards (LPS-like): nothing canonical.
PERMUTED_FLIPPED = np.array([[0.0, -1.5, 0.0, 40.0],
                             [0.0, 0.0, -2.0, 60.0],
                             [2.5, 0.0, 0.0, -30.0],
                             [0.0, 0.0, 0.0, 1.0]])
VOLUME_SHAPE = (7, 10, 12)  # distinct sizes: a transposed cut cannot pass for the right one


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1000, 1000, VOLUME_SHAPE).astype(np.float32)


def _labels_of(image: np.ndarray) -> np.ndarray:
    """Label 1 above 0, 2 above 500: derived voxel by voxel, so alignment shows on every voxel."""
    return (image > 0).astype(np.uint8) + (image > 500)


def _save(path, data, affine=PERMUTED_FLIPPED) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


@pytest.mark.parametrize("axis", AXES)
def test_label_volume_is_cut_like_its_image(tmp_path, axis):
    image = _save(tmp_path / "image.nii.gz", _volume())
    labels = nib.Nifti1Image(_labels_of(_volume()), PERMUTED_FLIPPED)
    same_layout = _save(tmp_path / "labels.nii.gz", labels.dataobj)
    # The same voxel grid stored in another orientation on disk (RAS, axes reordered): still aligned.
    reoriented = str(tmp_path / "labels_ras.nii.gz")
    nib.save(nib.as_closest_canonical(labels), reoriented)
    assert not np.allclose(nib.load(reoriented).affine, PERMUTED_FLIPPED)

    expected = _labels_of(read_nifti_slices(image, axis)[0])
    assert expected.min() == 0 and expected.max() == 2
    for mask_path in (same_layout, reoriented):
        mask = read_mask_volume(mask_path, image, axis)
        assert mask.dtype == np.int16
        np.testing.assert_array_equal(mask, expected)


def test_labels_of_a_4d_image_label_every_volume(tmp_path):
    volumes = np.stack([_volume(seed) for seed in range(3)], axis=-1)
    image = _save(tmp_path / "image.nii.gz", volumes)
    mask_path = _save(tmp_path / "labels.nii.gz", _labels_of(volumes[..., 0]))
    mask = read_mask_volume(mask_path, image, "axial")
    one_volume = _labels_of(read_nifti_slices(image, "axial")[0][: mask.shape[0] // 3])
    np.testing.assert_array_equal(mask, np.concatenate([one_volume] * 3))


def test_label_volume_of_another_shape_is_geometry_mismatch(tmp_path):
    image = _save(tmp_path / "image.nii.gz", _volume())
    cropped = _save(tmp_path / "cropped.nii.gz", _labels_of(_volume())[:, :, :-1])
    with pytest.raises(MaskError) as error:
        read_mask_volume(cropped, image, "axial")
    assert error.value.reason == "geometry_mismatch"
    assert "(10, 12, 7)" in error.value.message and "(10, 11, 7)" in error.value.message  # canonical shapes


def test_label_volume_with_a_shifted_affine_is_geometry_mismatch(tmp_path):
    image = _save(tmp_path / "image.nii.gz", _volume())
    shifted_affine = PERMUTED_FLIPPED.copy()
    shifted_affine[1, 3] += 2.0
    shifted = _save(tmp_path / "shifted.nii.gz", _labels_of(_volume()), shifted_affine)
    with pytest.raises(MaskError) as error:
        read_mask_volume(shifted, image, "coronal")
    assert error.value.reason == "geometry_mismatch"
    assert "up to 2 " in error.value.message


def test_label_volume_with_fractions_is_not_integer(tmp_path):
    image = _save(tmp_path / "image.nii.gz", _volume())
    fractional = _save(tmp_path / "probabilities.nii.gz", (_volume() > 0).astype(np.float32) * 0.7)
    with pytest.raises(MaskError) as error:
        read_mask_volume(fractional, image, "axial")
    assert error.value.reason == "not_integer"


def test_unreadable_label_volume(tmp_path):
    image = _save(tmp_path / "image.nii.gz", _volume())
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")
    for mask_path in (tmp_path / "broken.nii.gz", tmp_path / "missing.nii.gz"):
        with pytest.raises(MaskError) as error:
            read_mask_volume(str(mask_path), image, "axial")
        assert error.value.reason == "unreadable_mask"


# -------------------------------------------------------------------------------------- DICOM SEG

N_SLICES, SIZE = 6, 32
EMPTY_SLICE = 3  # no segment here: the SEG stores no frame for it


def _truth() -> np.ndarray:
    """(slices, rows, cols) label maps: 1 liver, 2 spleen, moving from slice to slice, none on EMPTY_SLICE."""
    labels = np.zeros((N_SLICES, SIZE, SIZE), np.int16)
    for index in range(N_SLICES):
        if index != EMPTY_SLICE:
            labels[index, 2 + index:12 + index, 4:10 + 2 * index] = 1
            labels[index, 20:24 + index, 15 + index:30] = 2 if index % 2 else 0  # spleen on odd slices only
    return labels


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.stack([labels == 1, labels == 2], axis=-1)


def _labels_per_slice(seg, sources) -> list[np.ndarray]:
    return [seg.labels_for(source.SOPInstanceUID, tuple(map(float, source.ImagePositionPatient)), SIZE, SIZE)
            for source in sources]


def _assert_slices_equal(labels: list[np.ndarray], truth: np.ndarray) -> None:
    for index, (got, expected) in enumerate(zip(labels, truth)):
        assert got.dtype == np.int16 and got.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(got, expected, err_msg=f"slice {index}")


def test_dicom_seg_aligns_with_every_source_slice(tmp_path):
    sources = dicom_seg_sources(tmp_path / "ct", N_SLICES, SIZE)
    truth = _truth()
    path = write_dicom_seg(tmp_path / "seg.dcm", sources, _one_hot(truth))
    stored = pydicom.dcmread(path)
    framed = {frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
              for frame in stored.PerFrameFunctionalGroupsSequence}
    assert sources[EMPTY_SLICE].SOPInstanceUID not in framed and stored.NumberOfFrames < N_SLICES * 2

    seg = read_dicom_seg(path)
    assert seg.segment_names == {1: "liver", 2: "spleen"}
    assert seg.referenced_series_uids == {sources[0].SeriesInstanceUID}
    _assert_slices_equal(_labels_per_slice(seg, sources), truth)


@pytest.mark.parametrize("segmentation_type", ["FRACTIONAL", "LABELMAP"])
def test_fractional_and_labelmap_segs_align(tmp_path, segmentation_type):
    sources = dicom_seg_sources(tmp_path / "ct", N_SLICES, SIZE)
    truth = _truth()
    if segmentation_type == "FRACTIONAL":  # probabilities 0.7 on even rows, 0.3 on odd: in from 0.5 on
        even_rows = (np.arange(SIZE) % 2 == 0)[:, None]
        pixels = _one_hot(truth) * np.where(even_rows, 0.7, 0.3)[..., None].astype(np.float32)
        truth = np.where(even_rows, truth, 0)
    else:
        pixels = truth.astype(np.uint8)
    seg = read_dicom_seg(write_dicom_seg(tmp_path / "seg.dcm", sources, pixels, segmentation_type))
    _assert_slices_equal(_labels_per_slice(seg, sources), truth)


def test_overlapping_segments_take_the_higher_segment_number(tmp_path):
    sources = dicom_seg_sources(tmp_path / "ct", N_SLICES, SIZE)
    segments = np.zeros((N_SLICES, SIZE, SIZE, 2), bool)
    segments[1, 5:15, 5:15, 0] = True
    segments[1, 10:20, 10:20, 1] = True
    seg = read_dicom_seg(write_dicom_seg(tmp_path / "seg.dcm", sources, segments))
    labels = seg.labels_for(sources[1].SOPInstanceUID, None, SIZE, SIZE)
    assert labels[12, 12] == 2 and labels[6, 6] == 1 and labels[18, 18] == 2 and labels[0, 0] == 0


def test_seg_without_source_references_is_matched_by_position(tmp_path):
    sources = dicom_seg_sources(tmp_path / "ct", N_SLICES, SIZE)
    truth = _truth()
    stored = pydicom.dcmread(write_dicom_seg(tmp_path / "seg.dcm", sources, _one_hot(truth)))
    for frame in stored.PerFrameFunctionalGroupsSequence:  # as SEG writers that name no source per frame
        del frame.DerivationImageSequence
    stored.save_as(tmp_path / "unreferenced.dcm")
    seg = read_dicom_seg(str(tmp_path / "unreferenced.dcm"))
    _assert_slices_equal(_labels_per_slice(seg, sources), truth)

    # A slice the SEG does not list: matched by position alone, else by its series, else not in the SEG.
    on_frame = tuple(map(float, sources[1].ImagePositionPatient))
    np.testing.assert_array_equal(seg.labels_for("1.2.3.4", on_frame, SIZE, SIZE), truth[1])
    off_stack = (0.0, 0.0, 500.0)
    series_uid = f"{sources[0].SeriesInstanceUID}#{SIZE}x{SIZE}-axial"
    assert not seg.labels_for("1.2.3.4", off_stack, SIZE, SIZE, series_uid=series_uid).any()
    shifted_in_plane = (7.0, 0.0, on_frame[2])  # the frame's plane, another first pixel: another grid
    between_slices = (0.0, 0.0, on_frame[2] + 1.0)  # 1 mm off a frame, slices 2.5 mm apart
    for position in (off_stack, shifted_in_plane, between_slices):
        with pytest.raises(MaskError) as error:
            seg.labels_for("1.2.3.4", position, SIZE, SIZE)
        assert error.value.reason == "not_in_seg"


def test_slice_of_another_series_is_not_in_seg(tmp_path):
    sources = dicom_seg_sources(tmp_path / "ct", N_SLICES, SIZE)
    other = dicom_seg_sources(tmp_path / "other", N_SLICES, SIZE, seed=1, patient_id="PAT-OTHER")  # same positions, other UIDs
    seg = read_dicom_seg(write_dicom_seg(tmp_path / "seg.dcm", sources, _one_hot(_truth())))
    for source in other:
        with pytest.raises(MaskError) as error:
            seg.labels_for(source.SOPInstanceUID, tuple(map(float, source.ImagePositionPatient)), SIZE, SIZE)
        assert error.value.reason == "not_in_seg"


def test_seg_of_another_size_is_size_mismatch(tmp_path):
    sources = dicom_seg_sources(tmp_path / "ct", N_SLICES, SIZE)
    seg = read_dicom_seg(write_dicom_seg(tmp_path / "seg.dcm", sources, _one_hot(_truth())))
    for source in (sources[1], sources[EMPTY_SLICE]):
        with pytest.raises(MaskError) as error:
            seg.labels_for(source.SOPInstanceUID, None, SIZE * 2, SIZE)
        assert error.value.reason == "size_mismatch"


def test_unreadable_seg(tmp_path):
    sources = write_ct_series(tmp_path / "ct", n_slices=2, size=SIZE)
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 200)
    for path in (sources[0], tmp_path / "garbage.dcm", tmp_path / "missing.dcm"):
        with pytest.raises(MaskError) as error:
            read_dicom_seg(str(path))
        assert error.value.reason == "unreadable_mask", path
