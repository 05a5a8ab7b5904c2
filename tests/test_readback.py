"""Stored rows read back to pixels (pipeline/readback.py: segmentation overlays, fine-tuning inputs) are
exactly the model inputs the stored vectors came from: re-embedded, they give the stored vectors again,
for every kind of file in the mixed archive (DICOM CT series, multi-frame MR, NIfTI, 8- and 16-bit PNG)."""

from __future__ import annotations

import numpy as np

from embedstore.inference.readback import read_back, stored_slice
from embedstore.models.build import rebuild_model
from embedstore.models.embedder import Embedder
from embedstore.store import Store
from embedstore.store.upgrade import item_axis
from tests.support import slice_rows


def test_read_back_pixels_re_embed_to_the_stored_vectors(ingested):
    store = Store.open(ingested.path)
    spec = store.spec(store.resolve_model_id(None))
    rows = slice_rows(ingested.path)
    assert {stored_slice(row).kind for row in rows} == {"dicom", "nifti", "raster"}
    embeddings = Embedder(rebuild_model(spec)).embed(read_back(rows, spec))
    # The same pixels through the same model; only batch composition may move the last bits.
    np.testing.assert_allclose(embeddings.patch_mean, np.stack([row["patch_mean"] for row in rows]), atol=1e-4)
    np.testing.assert_allclose(embeddings.cls, np.stack([row["cls"] for row in rows]), atol=1e-4)


def test_stored_rows_say_their_kind_and_axis(ingested):
    rows = slice_rows(ingested.path)
    assert {(row["kind"], row["axis"]) for row in rows if row["kind"] != "nifti"} == {("dicom", None), ("raster", None)}
    assert {row["axis"] for row in rows if row["kind"] == "nifti"} == {"axial"}


def test_nifti_keys_of_older_stores_name_their_axis_whatever_the_path_holds():
    # what `migrate` reads from the keys of a store written before the kind and axis columns
    assert item_axis("nifti:/data/a:b/vol.nii.gz:coronal:12") == "coronal"
    assert item_axis("nifti:/data/vol.nii.gz:axial:t3:0") == "axial"
    assert item_axis("nifti:/data/t1/vol.nii.gz:sagittal:t0:7") == "sagittal"
