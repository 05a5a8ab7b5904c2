"""Generated sample archives: phantom images written as PNG, CT DICOM series, multi-frame DICOM and
NIfTI. Used by `embedstore demo`, the benchmarks and the tests, so every machine can run the whole
pipeline without downloading data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

# Bundled with pydicom itself (no download): a CT slice and an MR slice.
PYDICOM_BUNDLED = ("CT_small.dcm", "MR_small.dcm")


def phantom(size: int, seed: int) -> np.ndarray:
    """A head-like phantom in [0, 1]: an outer ellipse with random inner ellipses."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    image = np.zeros((size, size), dtype=np.float32)
    image[(x / 0.85) ** 2 + (y / 0.95) ** 2 <= 1] = 0.6
    image[(x / 0.78) ** 2 + (y / 0.88) ** 2 <= 1] = 0.3
    for _ in range(4):
        cx, cy = rng.uniform(-0.4, 0.4, 2)
        ax, ay = rng.uniform(0.05, 0.3, 2)
        image[((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1] += rng.uniform(0.1, 0.4)
    return np.clip(image, 0, 1)


def write_png(path: Path, image01: np.ndarray, bits: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        Image.fromarray((image01 * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray((image01 * 255).astype(np.uint8)).save(path)
    return path


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _file_dataset(sop_class: str, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray) -> None:
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.uint16).tobytes()


def ct_series_hu(n_slices: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size) HU volume: air outside, soft tissue inside, varying along the slice axis."""
    slices = []
    for index in range(n_slices):
        tissue = phantom(size, seed * 1000 + index)
        hu = np.where(tissue > 0, -100 + tissue * 1200 + 20 * index, -1000)
        slices.append(hu.astype(np.float32))
    return np.stack(slices)


def scanner_ct_header(size: int, syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """The header a CT scanner writes for a uint16 slice of size x size, without identity, dates,
    position or pixels (the benchmarks and header tests fill those in)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyTime, ds.Modality, ds.Manufacturer = "101500", "CT", "embedstore"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    return ds


def write_ct_series(directory: Path, n_slices: int = 8, size: int = 64, seed: int = 0,
                    patient_id: str = "PAT-CT", patient_name: str = "Doe^Jane",
                    slope: float = 1.0, intercept: float = -1024.0, spacing: float = 2.5,
                    shuffle_names: bool = True, positions_mm: list[float] | None = None,
                    prefix: str = "IM", body_part: str | None = None) -> list[Path]:
    """An axial CT series, one file per slice, stored values = (HU - intercept) / slope.

    With `shuffle_names` the file names do not follow slice order, so only ImagePositionPatient can.
    `positions_mm` overrides the even `spacing` (to leave gaps or make it uneven). Returns the
    paths in anatomical order (inferior → superior).
    """
    directory.mkdir(parents=True, exist_ok=True)
    hu = ct_series_hu(n_slices, size, seed)
    study_uid, series_uid = _uid("study", seed, patient_id), _uid("series", seed, patient_id)
    name_order = np.random.default_rng(seed).permutation(n_slices) if shuffle_names else np.arange(n_slices)
    positions = positions_mm if positions_mm is not None else [index * spacing for index in range(n_slices)]
    paths = []
    for index in range(n_slices):
        sop_uid = _uid("ct", seed, patient_id, index)
        ds = _file_dataset(CTImageStorage, sop_uid)
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "CT"
        ds.InstanceNumber = int(name_order[index]) + 1  # deliberately not the anatomical order
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(positions[index])]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = spacing
        ds.StudyDate = "20240131"
        ds.SeriesDescription = "generated axial CT"
        if body_part:
            ds.BodyPartExamined = body_part
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        _set_pixels(ds, np.round((hu[index] - intercept) / slope))
        path = directory / f"{prefix}{int(name_order[index]):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_xray(path: Path, image01: np.ndarray, monochrome1: bool = False, window: tuple[float, float] | None = None,
               seed: int = 4, patient_id: str = "PAT-DX") -> Path:
    """A digital radiograph (DX) with 12-bit values; MONOCHROME1 stores the same image inverted
    (as many CR/DX devices do), and `window` (centre, width) becomes its VOI window."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation

    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _file_dataset(DigitalXRayImageStorageForPresentation, _uid("dx", seed, patient_id, monochrome1))
    ds.PatientID, ds.PatientName = patient_id, "Poe^Edgar"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid("dxstudy", seed), _uid("dxseries", seed, monochrome1)
    ds.Modality = "DX"
    stored = np.round(image01 * 4095)
    _set_pixels(ds, 4095 - stored if monochrome1 else stored)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    if window is not None:
        center, width = window
        ds.WindowCenter, ds.WindowWidth = (4095 - center if monochrome1 else center), width
    ds.save_as(path, enforce_file_format=True)
    return path


def write_multiframe_mr(path: Path, n_frames: int = 5, size: int = 48, seed: int = 1,
                        patient_id: str = "PAT-MR") -> Path:
    """An enhanced-MR-like multi-frame object with per-frame positions, frames stored superior → inferior."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _file_dataset(MRImageStorage, _uid("mf", seed, patient_id))
    ds.PatientID, ds.PatientName = patient_id, "Roe^Richard"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid("mfstudy", seed), _uid("mfseries", seed)
    ds.Modality = "MR"
    ds.NumberOfFrames = n_frames
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for frame in range(n_frames):
        group, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float((n_frames - 1 - frame) * 3.0)]
        group.PlanePositionSequence = [position]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    frames = np.stack([phantom(size, seed * 100 + f) * 800 for f in range(n_frames)])
    _set_pixels(ds, frames)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, shape: tuple[int, int, int] = (40, 40, 12), seed: int = 2, ct: bool = True) -> Path:
    """A phantom volume with a 1.5 mm RAS affine, CT-like (HU) or MR-like values."""
    import nibabel as nib
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = np.stack([phantom(shape[0], seed * 10 + z)[:, : shape[1]] for z in range(shape[2])], axis=-1)
    data = np.where(volume > 0, volume * 1000 - 100, -1000) if ct else volume * 600
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([1.5, 1.5, 1.5, 1.0])), str(path))
    return path


# Segmentation phantoms: two classes of ellipse on noise, told apart by their intensity.
PHANTOM_LEVELS = (0.05, 0.5, 0.95)  # background, class 1, class 2
PHANTOM_NOISE = 0.06
# A non-trivial NIfTI affine: voxel axes permuted and flipped against RAS, anisotropic, shifted.
PHANTOM_AFFINE = np.array([[0.0, 0.0, -2.0, 40.0], [-1.2, 0.0, 0.0, 30.0], [0.0, 1.1, 0.0, -20.0], [0, 0, 0, 1]])


def ellipse_labels(shape: tuple[int, ...], rng: np.random.Generator, stretch: tuple[float, ...] | None = None) -> np.ndarray:
    """A class map (2D or 3D): an ellipse (ellipsoid) of class 1 in one half along the first axis and
    one of class 2 in the other, each large against a 14 px patch, touching neither the other nor the edge.
    `stretch` scales the radii per axis (a long slice axis keeps the end slices' sections large)."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    labels = np.zeros(shape, dtype=np.uint8)
    for value, side in ((1, -0.5), (2, 0.5)):
        centre = np.concatenate([[side + rng.uniform(-0.05, 0.05)], rng.uniform(-0.2, 0.2, len(shape) - 1)])
        radii = np.concatenate([rng.uniform(0.3, 0.42, 1), rng.uniform(0.4, 0.7, len(shape) - 1)])
        radii *= np.asarray(stretch or (1.0,) * len(shape))
        labels[sum(((axis - c) / r) ** 2 for axis, c, r in zip(grid, centre, radii)) <= 1] = value
    return labels


def phantom_intensities(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Values in [0, 1]: each class at its level, plus noise."""
    image = np.asarray(PHANTOM_LEVELS, dtype=np.float32)[labels] + rng.normal(0, PHANTOM_NOISE, labels.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def write_segmentation_phantoms(root: Path, n_images: int = 0, n_volumes: int = 0, size: int = 64,
                                n_slices: int = 10) -> Path:
    """A segmentation task under `root` and its labels CSV (returned): `n_images` PNG images with PNG
    masks (images/, masks/), and `n_volumes` NIfTI volumes with label volumes (imagesTr/, labelsTr/,
    PHANTOM_AFFINE) whose values are HU-like (declare --modality CT). One patient per image or volume."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    lines = ["path,mask,patient_id"]
    for number in range(n_images):
        labels = ellipse_labels((size, size), rng)
        write_png(root / "images" / f"img{number:03d}.png", phantom_intensities(labels, rng))
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(root / "masks" / f"img{number:03d}.png")
        lines.append(f"images/img{number:03d}.png,masks/img{number:03d}.png,p{number:03d}")
    for number in range(n_volumes):
        # file axis 1 is S under PHANTOM_AFFINE (axial slices); every slice cuts the ellipsoids well inside
        labels = ellipse_labels((size, n_slices, size), rng, stretch=(1.0, 2.5, 1.0))
        hu = phantom_intensities(labels, rng) * 400.0 - 100.0
        for folder, data in (("imagesTr", hu.astype(np.int16)), ("labelsTr", labels)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, PHANTOM_AFFINE), str(root / folder / f"vol{number:03d}.nii.gz"))
        lines.append(f"imagesTr/vol{number:03d}.nii.gz,labelsTr/vol{number:03d}.nii.gz,v{number:03d}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


REGION_PERIOD = 4  # px: a 64 px image at the tests' 112 px input puts two periods in every 8 px token


def region_textures(size: int) -> list[np.ndarray]:
    """The three region classes' textures in [-1, 1]: horizontal stripes, vertical stripes, a
    checkerboard. Classes differ in pattern, not in level: a random-weight ViT's final LayerNorm
    makes its tokens nearly blind to a patch's brightness, not to its pattern."""
    rows, cols = np.mgrid[0:size, 0:size]
    wave_rows = np.where((rows // (REGION_PERIOD // 2)) % 2 == 0, 1.0, -1.0)
    wave_cols = np.where((cols // (REGION_PERIOD // 2)) % 2 == 0, 1.0, -1.0)
    return [wave_rows, wave_cols, wave_rows * wave_cols]


def write_region_phantoms(root: Path, n_images: int, size: int = 64, seed: int = 0) -> list[dict]:
    """`n_images` PNG images under `root`/images with PNG class maps under `root`/masks: two discs of
    two different classes (1 to 3, each its own texture: `region_textures`) at random places on noise, apart from each
    other and the edge; a disc's radius is a sixth to a fifth of the image. Returns per image its
    path, mask path and discs (class, centre row, centre column, radius): what region search must find
    wherever it lies."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    written = []
    for number in range(n_images):
        labels = np.zeros((size, size), dtype=np.uint8)
        discs: list[tuple[int, float, float, float]] = []
        for value in rng.choice([1, 2, 3], size=2, replace=False):
            radius = rng.uniform(size / 6, size / 5)
            while True:  # a place inside the image, clear of the first disc
                centre = rng.uniform(radius + 1, size - radius - 1, 2)
                if all(np.hypot(*(centre - (r, c))) > radius + other + 2 for _, r, c, other in discs):
                    break
            discs.append((int(value), float(centre[0]), float(centre[1]), float(radius)))
            labels[np.hypot(rows - centre[0], cols - centre[1]) <= radius] = value
        textures = np.stack([np.full((size, size), 0.0), *region_textures(size)])  # background: flat
        image = np.where(labels > 0, 0.55, 0.15) + 0.3 * textures[labels, rows, cols]
        image = image + rng.normal(0, PHANTOM_NOISE, labels.shape)
        image_path, mask_path = root / "images" / f"img{number:03d}.png", root / "masks" / f"img{number:03d}.png"
        write_png(image_path, np.clip(image, 0, 1))
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(mask_path)
        written.append({"path": image_path, "mask": mask_path, "discs": discs})
    return written


def write_stripes_task(root: Path, n_images: int, size: int = 56, label_by: str = "orientation",
                       period: float = 6.0, seed: int = 0) -> Path:
    """A two-class task under `root` and its labels CSV (returned): PNG images of stripes (random
    phase) in noise, one patient per image, the classes alternating.

    - `label_by="orientation"`: horizontal or vertical stripes at the same mean intensity. At a 6 px
      period a mean of frozen random-weight patch features hardly tells them apart; a trained backbone does.
    - `label_by="brightness"`: mean intensity 0.4 or 0.6, the orientation random: any features do.
    """
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size]
    lines = ["path,label,patient_id"]
    for number in range(n_images):
        vertical, bright = (number % 2, rng.integers(2)) if label_by == "orientation" else (rng.integers(2), number % 2)
        label = ("horizontal", "vertical")[vertical] if label_by == "orientation" else ("dark", "bright")[bright]
        mean = 0.5 if label_by == "orientation" else (0.4, 0.6)[bright]
        stripes = np.sin(2 * np.pi * (columns if vertical else rows) / period + rng.uniform(0, 2 * np.pi))
        image = mean + 0.2 * stripes + rng.normal(0, 0.1, (size, size))
        write_png(root / "images" / f"img{number:03d}.png", np.clip(image, 0, 1))
        lines.append(f"images/img{number:03d}.png,{label},p{number:03d}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def write_suite_data(root: Path, n_images: int = 96, size: int = 56) -> list[Path]:
    """The data of benchmarks/suites/demo.toml under `root`: the orientation and brightness stripes tasks
    (orientation/, brightness/, each with labels.csv) and segmentation phantoms with masks (phantoms/,
    labels.csv). Returns the image folders to ingest."""
    write_stripes_task(root / "orientation", n_images, size, "orientation")
    write_stripes_task(root / "brightness", n_images, size, "brightness", seed=1)
    write_segmentation_phantoms(root / "phantoms", n_images=n_images // 2, size=size)
    return [root / "orientation" / "images", root / "brightness" / "images", root / "phantoms" / "images"]


def copy_pydicom_bundled(directory: Path) -> list[Path]:
    """pydicom's own small CT and MR test files (shipped inside the pydicom package)."""
    from pydicom.data import get_testdata_file

    directory.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(get_testdata_file(name), directory / name)) for name in PYDICOM_BUNDLED]


def build_sample_archive(root: Path) -> Path:
    """A small mixed archive: bundled pydicom CT/MR, a generated CT series and multi-frame MR,
    phantom PNGs (8- and 16-bit), a MONOCHROME1 radiograph with its VOI window and a NIfTI CT volume."""
    copy_pydicom_bundled(root / "pydicom")
    write_ct_series(root / "ct_series", n_slices=12, size=96, seed=3)
    write_multiframe_mr(root / "mr_multiframe" / "cine.dcm", n_frames=6, size=64)
    for index in range(6):
        write_png(root / "xray" / f"phantom_{index:02d}.png", phantom(128, 50 + index), bits=16 if index % 2 else 8)
    write_xray(root / "xray_dicom" / "dx_monochrome1.dcm", phantom(128, 60), monochrome1=True, window=(2000.0, 3000.0))
    write_nifti(root / "nifti" / "volume.nii.gz", shape=(64, 64, 10))
    return root
