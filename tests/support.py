"""What the tests share besides fixtures: the generated archives, ingest options for tests, the
command run in this process, labels CSVs, DICOM SEG, hostile files and synthetic stores. Importable as `tests.support`
(tests is a package), in the test processes and in the scripts they start."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from embedstore import samples
from embedstore.store import Store
from embedstore.store.schema import slices_table_name

BOMB_SIDE = 60000  # an RLE file of 8 KB declaring 60000 x 60000
TEST_IMAGE_SIZE = 56  # 4×4 patches of 14 px: the real architecture, cheap on a CPU


@dataclass
class MixedArchive:
    root: Path
    ct_paths: list[Path]  # anatomical order
    multiframe: Path
    n_multiframe: int
    nifti: Path
    n_nifti: int
    pngs: list[Path]

    @property
    def n_slices(self) -> int:
        return len(self.ct_paths) + self.n_multiframe + self.n_nifti + len(self.pngs)


def make_mixed_archive(root: Path) -> MixedArchive:
    """PNG (8- and 16-bit), a CT series with slope/intercept in shuffled file order, a multi-frame
    MR, and a NIfTI CT volume."""
    ct = samples.write_ct_series(root / "ct", n_slices=6, size=40, seed=7, slope=2.0, intercept=-1024.0)
    multiframe = samples.write_multiframe_mr(root / "mr" / "multi.dcm", n_frames=4, size=32)
    nifti = samples.write_nifti(root / "vol" / "head.nii.gz", shape=(32, 32, 5))
    pngs = [samples.write_png(root / "png" / f"x{i}.png", samples.phantom(48, i), bits=8 if i % 2 else 16)
            for i in range(3)]
    return MixedArchive(root, ct, multiframe, 4, nifti, 5, pngs)


def ingest_options(**overrides):
    from embedstore.pipeline.ingest import IngestOptions

    settings = dict(weights="random", image_size=TEST_IMAGE_SIZE, workers=0, show_progress=False)
    settings.update(overrides)
    return IngestOptions(**settings)


@dataclass
class IngestedStore:
    path: Path
    summary: object
    archive: MixedArchive


def slice_rows(store_path, where: str | None = None, model_id: str | None = None) -> list[dict]:
    """One model's rows of `slices-<model_id>` (the only model's when None), each merged with its
    `items` row (frame, rows, cols, geometry): everything the store holds about a slice for that
    model. A vector row without its item fails the lookup."""
    from embedstore.store import Store
    from embedstore.store.schema import SEARCH_COLUMNS, slices_table_name

    store = Store.open(store_path)
    vectors = store.rows(slices_table_name(store.resolve_model_id(model_id)), where).to_pylist()
    items = {row["key"]: row for row in store.rows("items").to_pylist()}
    for row in vectors:  # the metadata copied beside the vectors is the item's
        assert {c: row[c] for c in SEARCH_COLUMNS} == {c: items[row["key"]][c] for c in SEARCH_COLUMNS}, row["key"]
    return [{**items[row["key"]], **row} for row in vectors]


def slices_table(store) -> str:
    """The `slices-<model_id>` table of a one-model store."""
    from embedstore.store.schema import slices_table_name

    return slices_table_name(store.resolve_model_id(None))


def run_cli_here(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """The `embedstore` command run in this process: (exit code, stdout, stderr)."""
    import sys

    from embedstore.cli.main import main

    monkeypatch.setattr(sys, "argv", ["embedstore", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def write_csv(path: Path, rows: list[dict]) -> Path:
    """A labels CSV with the rows' keys as its header."""
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_modality_labels(path: Path, store_path: Path) -> Path:
    """Labels keyed by path: the modality family as the class, a fixed split per file (each file its
    own patient)."""
    from embedstore.store import Store

    items = Store.open(store_path).rows("items", columns=["path", "modality"]).to_pylist()
    paths = sorted({row["path"]: row["modality"] or "XR" for row in items}.items())
    return write_csv(path, [{"path": file_path, "label": "volume" if modality in ("CT", "MR") else "plain",
                             "split": "test" if index % 3 == 0 else "train", "patient_id": file_path}
                            for index, (file_path, modality) in enumerate(paths)])


def dicom_seg_sources(directory, n_slices: int, size: int, **options) -> list:
    """A generated CT series in anatomical order, with the patient and study attributes highdicom copies
    into a SEG (the generator writes only what the ingest needs)."""
    import pydicom

    sources = [pydicom.dcmread(path) for path in samples.write_ct_series(directory, n_slices=n_slices, size=size, **options)]
    for source in sources:
        source.PatientBirthDate = source.PatientSex = source.StudyTime = ""
        source.ReferringPhysicianName = source.AccessionNumber = source.StudyID = source.Manufacturer = ""
        source.FrameOfReferenceUID = pydicom.uid.generate_uid(entropy_srcs=[source.SeriesInstanceUID])
        source.SeriesNumber = 1
    return sources


def write_dicom_seg(path, sources, pixel_array, segmentation_type="BINARY") -> str:
    """A highdicom SEG of the sources: segment 1 liver, 2 spleen; `pixel_array` one-hot per segment."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = [
        hd.seg.SegmentDescription(segment_number=number, segment_label=label,
                                  segmented_property_category=codes.SCT.Organ, segmented_property_type=kind,
                                  algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number, (label, kind) in enumerate([("liver", codes.SCT.Liver), ("spleen", codes.SCT.Spleen)], start=1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel_array, segmentation_type=segmentation_type,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="embedstore tests",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    seg.save_as(path)
    return str(path)


PATIENT_NAME, PATIENT_ID = "Smith^John", "MRN778812"


@dataclass
class PatientArchive:
    root: Path  # its folder name carries the patient's name and ID, as real exports' often do
    ct: list[Path]  # 256 px: thumbnails need no resize
    xray_monochrome1: Path
    xray_monochrome2: Path  # the same image stored the other way round
    pngs: list[Path]


def make_patient_archive(root: Path) -> PatientArchive:
    folder = root / "Smith John MRN778812"
    ct = samples.write_ct_series(folder / "chest ct", n_slices=4, size=256, seed=21, patient_id=PATIENT_ID,
                                 patient_name=PATIENT_NAME, body_part="CHEST")
    samples.write_ct_series(folder / "head ct", n_slices=3, size=64, seed=22, patient_id=PATIENT_ID,
                            patient_name=PATIENT_NAME, body_part="HEAD")
    radiograph = samples.phantom(256, 5)
    inverted = samples.write_xray(folder / "dx" / "m1.dcm", radiograph, monochrome1=True, patient_id=PATIENT_ID)
    plain = samples.write_xray(folder / "dx" / "m2.dcm", radiograph, monochrome1=False, patient_id=PATIENT_ID)
    pngs = [samples.write_png(folder / "photos" / f"p{i}.png", samples.phantom(64, 30 + i)) for i in range(4)]
    return PatientArchive(folder, ct, inverted, plain, pngs)


def write_rle_bomb(path: Path, side: int = BOMB_SIDE, bits: int = 8) -> Path:
    """An RLE Lossless DICOM of about 8 KB whose header declares side x side pixels."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import CTImageStorage, RLELossless

    ds = samples._file_dataset(CTImageStorage, "1.2.826.0.1.3680043.8.498.1")
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PatientID, ds.Modality = "BOMB", "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    segments = bits // 8
    header = struct.pack("<16I", segments, *[64 + i * 4000 for i in range(segments)], *[0] * (15 - segments))
    runs = bytes([0x81, 0]) * 2000  # "repeat the next byte 128 times", over and over: far too few for the image
    ds.PixelData = encapsulate([header + runs * segments])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------ synthetic stores

def clustered(n_per_class: int, n_classes: int, dim: int, seed: int, spread: float = 0.6):
    """Unit-ish vectors around one random centre per class: kNN has a known right answer."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    vectors = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    order = rng.permutation(len(labels))
    return vectors[order].astype(np.float32), labels[order]


def synthetic_spec(dim: int, name: str = "synthetic"):
    """The spec of a model of width `dim` that keeps no per-block CLS and no patch tokens."""
    from embedstore.intensity import PREPROCESS_VERSION
    from embedstore.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

    return ModelSpec(name=name, timm_name=name, weights_source="random", weights_digest="0" * 12,
                     weights_file=None, seed=0, image_size=224, patch_size=14, grid_h=16, grid_w=16,
                     num_prefix_tokens=1, embed_dim=dim, num_blocks=0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     interpolation="bicubic", window="auto", mr_percentiles=(5.0, 95.0),
                     preprocess_version=PREPROCESS_VERSION, cls_layers=(), patch_layers=())


def add_synthetic_slices(store: Store, spec, items, vectors: np.ndarray) -> None:
    """Commit items and one model's vector rows (cls = patch_mean = vectors) as ingest commits them."""
    from embedstore.models.embedder import Embeddings
    from embedstore.pipeline.runner import item_rows, vector_rows

    store.add_model(spec)
    embeddings = Embeddings(vectors, vectors, np.zeros((len(vectors), 0, spec.embed_dim), np.float32), None)
    store.insert_new("items", item_rows(items, "run"))
    store.insert_new(slices_table_name(spec.model_id),
                     vector_rows(spec, items, [embeddings], None, [None] * len(items), "run"))


def synthetic_store(path, n: int, dim: int = 384, seed: int = 17, spread: float = 0.8) -> Store:
    """A real store holding n slices of clustered vectors (written as ingest writes them)."""
    from embedstore.sources.records import SliceItem

    vectors, labels = clustered(n // 20, 20, dim, seed=seed, spread=spread)
    store = Store.open(path, create=True)
    items = [SliceItem(f"synthetic:{i}", f"/archive/{i}.png", f"study{i // 10}", f"series{i // 5}", i % 5,
                       modality="CT" if labels[i] % 2 else "MR", rows=1, cols=1, intensity="minmax")
             for i in range(len(vectors))]
    add_synthetic_slices(store, synthetic_spec(dim), items, vectors)
    return store
