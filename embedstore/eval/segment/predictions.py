"""`--predictions DIR`: predicted masks in their input's geometry, one file per input named after
it, so anyone can re-score them: a NIfTI label volume with the image's affine and shape for a NIfTI
series, a PNG of class values for each 2D image or DICOM slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from embedstore.inference.readback import stored_slice


class PredictionWriter:
    def __init__(self, directory: Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []
        self._names: set[str] = set()

    def write_volume(self, rows: list[dict], predicted: np.ndarray) -> list[Path]:
        """rows: one volume's slices; predicted: (len(rows), rows, cols) class maps in their order."""
        first = stored_slice(rows[0])
        if first.kind == "nifti":
            paths = [self._write_nifti(first.path, first.axis, [row["frame"] for row in rows], predicted)]
        else:
            paths = [self._write_png(row, mask) for row, mask in zip(rows, predicted)]
        self.written.extend(paths)
        return paths

    def _write_nifti(self, image_path: str, axis: str, frames: list[int], predicted: np.ndarray) -> Path:
        import nibabel

        from embedstore.sources.nifti import nifti_layout, volume_from_slices

        layout = nifti_layout(image_path, axis)
        slices = np.zeros((layout.n_slices * layout.n_volumes, *predicted.shape[1:]), dtype=np.uint8)
        slices[frames] = predicted  # slices without a prediction (not labelled) stay background
        image = nibabel.load(image_path)
        header = image.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        volume = volume_from_slices(slices, image_path, axis)
        name = self._unique(Path(image_path).name.removesuffix(".gz").removesuffix(".nii") + ".nii.gz")
        nibabel.save(nibabel.Nifti1Image(volume, image.affine, header), self.directory / name)
        return self.directory / name

    def _write_png(self, row: dict, mask: np.ndarray) -> Path:
        where = stored_slice(row)
        stem = row["sop_uid"] if where.kind == "dicom" else Path(where.path).stem
        if where.kind == "raster" and where.frame:
            stem += f"-p{where.frame}"
        path = self.directory / self._unique(stem + ".png")
        Image.fromarray(mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)).save(path)
        return path

    def _unique(self, name: str) -> str:
        """The name, or the name with -2, -3... when two inputs share a file name."""
        stem, dot, suffix = name.partition(".")
        candidate, number = name, 1
        while candidate in self._names:
            number += 1
            candidate = f"{stem}-{number}{dot}{suffix}"
        self._names.add(candidate)
        return candidate
