"""NIfTI reader (`embedstore.sources.nifti`): slice geometry, display orientation, counts and errors.

The central check (`test_pixels_agree_with_reported_geometry`) stores each voxel's own index in the
data, reads the slices back, and verifies that the LPS position computed from each item's DICOM-style
geometry is the true world position of the voxel whose value sits at that pixel, for every axis and
for canonical, LPS-stored, permuted, anisotropic and oblique affines. The other tests pin the
anatomical display conventions, header-only layout, 4D handling, spacings, .nii.gz handling, error
reasons and modality inference.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from embedstore.errors import CORRUPT_NIFTI, TRUNCATED, InputError
from embedstore.sources.nifti import AXES, nifti_layout, read_nifti_slices, volume_items

SHAPE = (5, 6, 7)  # distinct sizes, so a transposed view cannot pass for the right one
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _affine(linear, offset) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = offset
    return affine


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


AFFINES = {
    "ras_1.5mm": _affine(np.diag([1.5, 1.5, 1.5]), [-3.0, 4.0, 10.0]),
    "lps_stored": _affine(np.diag([-1.0, -1.0, 1.0]), [90.0, 120.0, -60.0]),
    # voxel axes stored as (z, y, x), with the stored y and z running backwards
    "permuted_zyx": _affine([[0.0, 0.0, 2.0], [0.0, -1.5, 0.0], [-1.0, 0.0, 0.0]], [-20.0, 30.0, 40.0]),
    "anisotropic": _affine(np.diag([0.8, 0.8, 3.0]), [-100.0, -80.0, 25.0]),
    "oblique_permuted": _affine(_rotation_z(12.0) @ [[0.0, 1.2, 0.0], [-0.9, 0.0, 0.0], [0.0, 0.0, 2.5]],
                                [7.0, -11.0, 3.0]),
}


def _save(path, data, affine) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


def _index_volume(shape=SHAPE) -> np.ndarray:
    """Each voxel holds its own flat (C-order) index: exact in float32 for these sizes."""
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def _voxel_of(values: np.ndarray, shape=SHAPE) -> np.ndarray:
    """Stored voxel indices (..., 3) of index-encoded values."""
    return np.stack(np.unravel_index(np.rint(values).astype(np.int64), shape), axis=-1).astype(float)


def _world_ras(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def _pixel_world_ras(item, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """RAS world position of pixels (rows, cols) from the item's DICOM-style LPS geometry."""
    position = np.array(item.image_position)
    row_cosines, col_cosines = np.array(item.image_orientation[:3]), np.array(item.image_orientation[3:])
    row_spacing, col_spacing = item.pixel_spacing
    lps = (position + cols[..., None] * col_spacing * row_cosines
           + rows[..., None] * row_spacing * col_cosines)
    return lps * LPS_TO_RAS


def _normal(item) -> np.ndarray:
    return np.cross(item.image_orientation[:3], item.image_orientation[3:])


def _stack_items(path: str, axis: str):
    stack, modality = read_nifti_slices(path, axis)
    items = volume_items(nifti_layout(path, axis))
    return stack, items, modality


# 1. Pixels and geometry agree -------------------------------------------------------------------

@pytest.mark.parametrize("affine_name", sorted(AFFINES))
@pytest.mark.parametrize("axis", AXES)
def test_pixels_agree_with_reported_geometry(tmp_path, axis, affine_name):
    path = _save(tmp_path / "v.nii", _index_volume(), AFFINES[affine_name])
    affine = nib.load(path).affine  # as stored (float32 in the header)
    stack, items, _ = _stack_items(path, axis)
    assert stack.shape[0] == len(items)
    rows, cols = np.meshgrid(np.arange(stack.shape[1]), np.arange(stack.shape[2]), indexing="ij")
    for k in sorted({0, 1, len(items) // 2, len(items) - 1}):
        item = items[k]
        assert item.slice_index == k
        expected = _world_ras(affine, _voxel_of(stack[k]))
        np.testing.assert_allclose(_pixel_world_ras(item, rows, cols), expected, atol=1e-6,
                                   err_msg=f"{axis} slice {k}")
        position = np.array(item.image_position)
        assert item.slice_position == pytest.approx(float(position @ _normal(item)), abs=1e-9)


@pytest.mark.parametrize("axis", AXES)
def test_orientation_is_orthonormal_and_normal_follows_slices(tmp_path, axis):
    path = _save(tmp_path / "v.nii", _index_volume(), AFFINES["oblique_permuted"])
    items = volume_items(nifti_layout(path, axis))
    row_cosines, col_cosines = np.array(items[0].image_orientation[:3]), np.array(items[0].image_orientation[3:])
    assert np.linalg.norm(row_cosines) == pytest.approx(1.0)
    assert np.linalg.norm(col_cosines) == pytest.approx(1.0)
    assert row_cosines @ col_cosines == pytest.approx(0.0, abs=1e-6)  # the header stores float32
    step = np.array(items[1].image_position) - np.array(items[0].image_position)
    assert step @ _normal(items[0]) == pytest.approx(items[0].slice_thickness)


# 2. Anatomical display directions ----------------------------------------------------------------

# Per axis: the RAS world axis (0: x toward R, 1: y toward A, 2: z toward S) that rows, columns and
# slices each move along, and the sign of that move. Axial rows anterior → posterior, columns
# right → left, slices inferior → superior; coronal rows superior → inferior, columns right → left,
# slices anterior → posterior; sagittal rows superior → inferior, columns anterior → posterior,
# slices left → right (the direction of the DICOM normal cross((0,1,0), (0,0,-1)) = LPS -x).
DIRECTIONS = {
    "axial": {"row": (1, -1), "col": (0, -1), "slice": (2, +1)},
    "coronal": {"row": (2, -1), "col": (0, -1), "slice": (1, -1)},
    "sagittal": {"row": (2, -1), "col": (1, -1), "slice": (0, +1)},
}
STACK_AXIS = {"slice": 0, "row": 1, "col": 2}
NORMALS_LPS = {"axial": (0.0, 0.0, 1.0), "coronal": (0.0, 1.0, 0.0), "sagittal": (-1.0, 0.0, 0.0)}


@pytest.mark.parametrize("affine_name", ["ras_1.5mm", "lps_stored", "permuted_zyx"])
@pytest.mark.parametrize("axis", AXES)
def test_display_directions(tmp_path, axis, affine_name):
    """Write each RAS world coordinate into its own volume and watch it change along the stack."""
    affine = nib.load(_save(tmp_path / "probe.nii", np.zeros(SHAPE, np.float32), AFFINES[affine_name])).affine
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), axis=-1).astype(float)
    world = _world_ras(affine, ijk)
    for world_axis in range(3):
        path = _save(tmp_path / f"w{world_axis}.nii", world[..., world_axis].astype(np.float32), affine)
        stack, _ = read_nifti_slices(path, axis)
        for direction, (moving_axis, sign) in DIRECTIONS[axis].items():
            change = np.diff(stack, axis=STACK_AXIS[direction])
            if world_axis == moving_axis:
                assert np.all(sign * change > 0), f"{axis} {direction}s along world axis {world_axis}"
            else:
                np.testing.assert_allclose(change, 0.0, atol=1e-4)


@pytest.mark.parametrize("affine_name", sorted(AFFINES))
@pytest.mark.parametrize("axis", AXES)
def test_slice_position_increases_with_index(tmp_path, axis, affine_name):
    path = _save(tmp_path / "v.nii", _index_volume(), AFFINES[affine_name])
    positions = [item.slice_position for item in volume_items(nifti_layout(path, axis))]
    assert np.all(np.diff(positions) > 0)


@pytest.mark.parametrize("axis", AXES)
def test_normal_points_along_display_slices(tmp_path, axis):
    path = _save(tmp_path / "v.nii", _index_volume(), AFFINES["lps_stored"])
    items = volume_items(nifti_layout(path, axis))
    np.testing.assert_allclose(_normal(items[0]), NORMALS_LPS[axis], atol=1e-12)
    if axis == "axial":
        assert _normal(items[0])[2] > 0  # superior
        assert items[-1].image_position[2] > items[0].image_position[2]


# 3. Header-only layout ---------------------------------------------------------------------------

DISPLAY_SIZE = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}  # canonical (slices, rows, cols)


@pytest.mark.parametrize("affine_name", sorted(AFFINES))
@pytest.mark.parametrize("axis", AXES)
def test_layout_matches_stack_and_canonical_image(tmp_path, axis, affine_name):
    affine = AFFINES[affine_name]
    path = _save(tmp_path / "v.nii", _index_volume(), affine)
    layout = nifti_layout(path, axis)
    canonical = nib.as_closest_canonical(nib.load(path))
    np.testing.assert_allclose(layout.affine, canonical.affine, atol=1e-9)
    assert layout.shape == canonical.shape
    assert layout.n_volumes == 1
    stack, _ = read_nifti_slices(path, axis)
    assert stack.shape == tuple(layout.shape[i] for i in DISPLAY_SIZE[axis])
    assert stack.dtype == np.float32
    assert layout.n_slices == stack.shape[0] == len(volume_items(layout))


def test_layout_reads_header_only(tmp_path):
    """A .nii whose voxel data has been cut away still gives its layout."""
    path = _save(tmp_path / "v.nii", _index_volume(), AFFINES["permuted_zyx"])
    with open(path, "r+b") as handle:
        handle.truncate(400)  # header (348 bytes + extension flag) kept, data gone
    layout = nifti_layout(path, "coronal")
    assert layout.shape == (7, 6, 5)
    assert layout.n_slices == 6


# 4. 4D volumes -----------------------------------------------------------------------------------

def test_4d_volumes_are_separate_series(tmp_path):
    n_volumes, z = 3, SHAPE[2]
    data = np.stack([_index_volume() + 1000.0 * t for t in range(n_volumes)], axis=-1)
    path = _save(tmp_path / "v4.nii", data, AFFINES["lps_stored"])
    layout = nifti_layout(path)
    assert (layout.n_volumes, layout.n_slices) == (n_volumes, z)
    items = volume_items(layout)
    assert len(items) == n_volumes * z
    assert len({item.item_id for item in items}) == len(items)
    assert [item.frame for item in items] == list(range(n_volumes * z))
    assert sorted({item.series_uid for item in items}) == [f"file:{path}#t{t}" for t in range(n_volumes)]
    for item in items:
        volume, index = divmod(item.frame, z)
        assert item.item_id == f"nifti:{path}:axial:t{volume}:{index}"
        assert item.series_uid == f"file:{path}#t{volume}"
        assert item.slice_index == index
        assert item.study_uid == f"file:{path}"
    stack, _ = read_nifti_slices(path)
    assert stack.shape[0] == n_volumes * z
    single, _ = read_nifti_slices(_save(tmp_path / "v3.nii", _index_volume(), AFFINES["lps_stored"]))
    for t in range(n_volumes):
        np.testing.assert_array_equal(stack[t * z:(t + 1) * z], single + 1000.0 * t)


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_4d_series_uid_carries_axis_then_volume(tmp_path, axis):
    data = np.zeros(SHAPE + (2,), dtype=np.float32)
    path = _save(tmp_path / "v4.nii", data, AFFINES["ras_1.5mm"])
    items = volume_items(nifti_layout(path, axis))
    assert {item.series_uid for item in items} == {f"file:{path}#{axis}#t0", f"file:{path}#{axis}#t1"}
    assert items[0].item_id == f"nifti:{path}:{axis}:t0:0"


@pytest.mark.parametrize("axis", AXES)
def test_3d_ids_have_no_volume_tag(tmp_path, axis):
    path = _save(tmp_path / "v.nii", _index_volume(), AFFINES["ras_1.5mm"])
    items = volume_items(nifti_layout(path, axis))
    suffix = "" if axis == "axial" else f"#{axis}"
    assert {item.series_uid for item in items} == {f"file:{path}{suffix}"}
    assert [item.item_id for item in items] == [f"nifti:{path}:{axis}:{i}" for i in range(len(items))]
    assert [item.frame for item in items] == list(range(len(items)))


# 5. Spacing and thickness ------------------------------------------------------------------------

# Zooms (x, y, z) = (0.8, 0.9, 3.0). Axial: rows step along y, columns along x, slices along z.
# Coronal: rows along z, columns along x, slices along y. Sagittal: rows along z, columns along y,
# slices along x. pixel_spacing is (between rows, between columns).
SPACINGS = {"axial": ((0.9, 0.8), 3.0), "coronal": ((3.0, 0.8), 0.9), "sagittal": ((3.0, 0.9), 0.8)}


@pytest.mark.parametrize("stored", ["ras", "lps_permuted"])
@pytest.mark.parametrize("axis", AXES)
def test_pixel_spacing_and_thickness(tmp_path, axis, stored):
    if stored == "ras":
        affine, shape = _affine(np.diag([0.8, 0.9, 3.0]), [0.0, 0.0, 0.0]), SHAPE
    else:  # the same anatomy stored as (z, y, x) in LPS order
        affine, shape = _affine([[0.0, 0.0, -0.8], [0.0, -0.9, 0.0], [3.0, 0.0, 0.0]], [50, 60, 0]), SHAPE[::-1]
    path = _save(tmp_path / "v.nii", _index_volume(shape), affine)
    spacing, thickness = SPACINGS[axis]
    for item in volume_items(nifti_layout(path, axis)):
        assert item.pixel_spacing == pytest.approx(spacing)
        assert item.slice_thickness == pytest.approx(thickness)


# 6. Compressed files and errors ------------------------------------------------------------------

@pytest.mark.parametrize("axis", AXES)
def test_gz_reads_like_plain(tmp_path, axis):
    data = _index_volume()
    plain = _save(tmp_path / "v.nii", data, AFFINES["permuted_zyx"])
    packed = _save(tmp_path / "v.nii.gz", data, AFFINES["permuted_zyx"])
    with open(packed, "rb") as handle:
        assert handle.read(2) == b"\x1f\x8b"
    stack_plain, modality_plain = read_nifti_slices(plain, axis)
    stack_packed, modality_packed = read_nifti_slices(packed, axis)
    np.testing.assert_array_equal(stack_packed, stack_plain)
    assert modality_packed == modality_plain
    assert nifti_layout(packed, axis).n_slices == nifti_layout(plain, axis).n_slices


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b" + bytes(range(256)) * 4, "random"])
def test_corrupt_gz_is_corrupt_nifti(tmp_path, content):
    if content == "random":
        content = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        nifti_layout(str(path))
    assert caught.value.reason == CORRUPT_NIFTI
    with pytest.raises(InputError) as caught:
        read_nifti_slices(str(path))
    assert caught.value.reason == CORRUPT_NIFTI


def test_truncated_gz_fails_on_read_not_on_layout(tmp_path):
    noise = np.random.default_rng(5).normal(size=(24, 24, 24)).astype(np.float32)  # compresses poorly
    path = _save(tmp_path / "v.nii.gz", noise, AFFINES["ras_1.5mm"])
    raw = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(raw[: int(len(raw) * 0.6)])
    assert nifti_layout(path).n_slices == 24  # the header is still readable
    with pytest.raises(InputError) as caught:
        read_nifti_slices(path)
    assert caught.value.reason in {TRUNCATED, CORRUPT_NIFTI}
    assert caught.value.stage == "decode"


@pytest.mark.parametrize("shape", [(8, 8), (4, 4, 4, 2, 2)])
def test_wrong_dimensionality_is_corrupt_nifti(tmp_path, shape):
    path = _save(tmp_path / "v.nii", np.zeros(shape, dtype=np.float32), np.eye(4))
    with pytest.raises(InputError) as caught:
        nifti_layout(path)
    assert caught.value.reason == CORRUPT_NIFTI


# 7. Modality -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("air", "n_air", "modality"), [
    (-1000.0, 42, "CT"),  # 20% of the voxels at air
    (-1000.0, 11, "CT"),  # 5.2%
    (-1000.0, 10, "MR"),  # 4.8%: a few dark voxels are no field of view around a body
    (-1024.0, 1, "MR"),  # one voxel below -500 (the old rule's CT)
    (-600.0, 42, "MR"),  # negative, but not air
])
def test_modality_from_share_of_air(tmp_path, air, n_air, modality):
    data = np.full(SHAPE, 40.0, dtype=np.float32)
    data.flat[:n_air] = air
    path = _save(tmp_path / "v.nii.gz", data, AFFINES["ras_1.5mm"])
    assert read_nifti_slices(path)[1] == modality


def test_ct_from_scaled_integers(tmp_path):
    """Hounsfield units stored as uint16 with slope and intercept: the minimum is taken after scaling."""
    data = np.full(SHAPE, 3000.0, dtype=np.float32)
    data[0] = -1000.0
    image = nib.Nifti1Image(data, AFFINES["ras_1.5mm"])
    image.set_data_dtype(np.uint16)  # nibabel picks a slope and intercept to fit the range
    path = str(tmp_path / "ct.nii.gz")
    nib.save(image, path)
    assert nib.load(path).header.get_data_dtype() == np.uint16
    stack, modality = read_nifti_slices(path)
    assert modality == "CT"
    assert float(stack.min()) == pytest.approx(-1000.0, abs=0.5)
