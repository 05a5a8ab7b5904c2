"""`embedstore demo`: the main job end to end on a generated sample archive, on any machine, and what
the README's commands need to run on it: a labels CSV (a two-class task by patient) and a masks CSV
(the phantoms' outlines) beside the store, and the patch tokens of the last five blocks (the UNet
decoder's input)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from embedstore.errors import UsageError
from embedstore.models.build import LoadedModel, load_model
from embedstore.pipeline.ingest import IngestOptions, IngestSummary, ingest
from embedstore.samples import build_sample_archive
from embedstore.search.similar import Hit, nearest_slices
from embedstore.store import Store, check_store_writable
from embedstore.store.info import store_info

DEMO_MODEL = "dinov2_vits14"
DEMO_PATCH_LAYERS = (-5, -4, -3, -2, -1)  # what `eval segment --decoder unet` reads
# Random weights see nothing at 224 px that they miss at 56 (4 x 4 patches), and every command of the
# README runs on the demo store in seconds instead of minutes; pretrained weights get DINOv2's 224.
RANDOM_IMAGE_SIZE = 56
# The sample archive's files by class, with the patient each belongs to: slices of one series, file
# or volume are one patient, so a split by patient keeps them together.
CROSS_SECTIONAL = {"pydicom/CT_small.dcm": "pydicom-ct", "pydicom/MR_small.dcm": "pydicom-mr",
                   "mr_multiframe/cine.dcm": "cine-mr", "nifti/volume.nii.gz": "nifti-ct"}
PHANTOM_SPLITS = ("train", "train", "train", "train", "val", "test")  # the six PNG phantoms' masks


def demo_model(say: Callable[[str], None]) -> LoadedModel:
    """Pretrained DINOv2 when the hub can be reached, else seeded random weights, said plainly."""
    try:
        return load_model(DEMO_MODEL, "hub", patch_layers=DEMO_PATCH_LAYERS)
    except UsageError as error:
        say(f"No pretrained weights ({error}).")
        say(f"The demo goes on with RANDOM weights at {RANDOM_IMAGE_SIZE} px: the pipeline is real, the "
            "similarities are not meaningful.")
        return load_model(DEMO_MODEL, "random", image_size=RANDOM_IMAGE_SIZE, patch_layers=DEMO_PATCH_LAYERS)


def run_demo(directory: Path, say: Callable[[str], None] = print,
             show_progress: bool = True) -> tuple[IngestSummary, dict, list[Hit], str, str]:
    """Everything goes under `directory`: the sample archive to directory/archive, the store to
    directory/store (a rerun reuses both)."""
    archive, store_path = directory / "archive", directory / "store"
    check_store_writable(store_path)
    if not archive.exists():
        say(f"Writing a sample archive to {archive} (pydicom's CT/MR files, a CT series, a multi-frame MR, "
            f"PNG phantoms, a NIfTI volume)")
        build_sample_archive(archive)
    loaded = demo_model(say)
    options = IngestOptions(models=(DEMO_MODEL,), weights=loaded.weights_source, image_size=loaded.image_size,
                            show_progress=show_progress, patch_layers=DEMO_PATCH_LAYERS)  # as loaded: recorded
    summary = ingest([archive], store_path, options, loaded=[loaded])
    write_demo_labels(directory)
    store = Store.open(store_path)
    query = store.rows("items", "modality = 'CT' AND path LIKE '%ct_series%' AND slice_index = 5", ["key"])
    query_key = query.column("key")[0].as_py()
    # A randomly initialised DINOv2 scales every block by LayerScale 1e-5, so its CLS token barely
    # depends on the image; the patch-token mean still does, and makes a more telling lookup.
    feature = "patch_mean" if loaded.weights_source == "random" else "cls"
    return summary, store_info(store), nearest_slices(store, query_key, k=5, feature=feature), query_key, feature


def write_demo_labels(directory: Path) -> None:
    """directory/labels.csv: cross-sectional (CT, MR) or projection (radiographs, photos) per file,
    with its patient; directory/masks.csv: each PNG phantom's outline as a mask (masks/), with a
    fixed split and a dataset.json naming the class. Paths are relative to `directory`."""
    archive = directory / "archive"
    rows = [{"path": f"archive/{name}", "label": "cross-sectional", "patient_id": patient}
            for name, patient in CROSS_SECTIONAL.items()]
    rows += [{"path": f"archive/ct_series/{file.name}", "label": "cross-sectional", "patient_id": "series-ct"}
             for file in sorted((archive / "ct_series").glob("*.dcm"))]
    phantoms = sorted((archive / "xray").glob("*.png"))
    rows += [{"path": f"archive/xray/{file.name}", "label": "projection", "patient_id": file.stem} for file in phantoms]
    rows.append({"path": "archive/xray_dicom/dx_monochrome1.dcm", "label": "projection", "patient_id": "dx"})
    write_rows(directory / "labels.csv", rows)
    (directory / "masks").mkdir(exist_ok=True)
    masks = []
    for file, split in zip(phantoms, PHANTOM_SPLITS):
        outline = np.asarray(Image.open(file), dtype=np.float64) > 0  # the phantom's outer ellipse
        Image.fromarray(outline.astype(np.uint8) * 255).save(directory / "masks" / file.name)
        masks.append({"path": f"archive/xray/{file.name}", "mask": f"masks/{file.name}", "split": split,
                      "patient_id": file.stem})
    write_rows(directory / "masks.csv", masks)
    (directory / "dataset.json").write_text('{"labels": {"0": "background", "1": "phantom"}}\n')


def write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
