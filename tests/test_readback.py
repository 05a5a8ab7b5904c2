"""Stored rows read back to pixels (pipeline/readback.py: segmentation overlays, fine-tuning inputs) are
exactly the model inputs the stored vectors came from: re-embedded, they give the stored vectors again,
for every kind of file in the mixed archive (DICOM CT series, multi-frame MR, NIfTI, 8- and 16-bit PNG)."""

from __future__ import annotations

import numpy as np
from conftest import slice_rows

from embedstore.models.build import rebuild_model
from embedstore.models.embedder import Embedder
from embedstore.pipeline.readback import nifti_axis, read_back, stored_slice
from embedstore.store import Store


def test_read_back_pixels_re_embed_to_the_stored_vectors(ingested):
    store = Store.open(ingested.path)
    spec = store.spec(store.resolve_model_id(None))
    rows = slice_rows(ingested.path)
    assert {stored_slice(row).kind for row in rows} == {"dicom", "nifti", "raster"}
    embeddings = Embedder(rebuild_model(spec)).embed(read_back(rows, spec))
    # The same pixels through the same model; only batch composition may move the last bits.
    np.testing.assert_allclose(embeddings.patch_mean, np.stack([row["patch_mean"] for row in rows]), atol=1e-4)
    np.testing.assert_allclose(embeddings.cls, np.stack([row["cls"] for row in rows]), atol=1e-4)


def test_nifti_keys_name_their_axis_whatever_the_path_holds():
    assert nifti_axis("nifti:/data/a:b/vol.nii.gz:coronal:12") == "coronal"
    assert nifti_axis("nifti:/data/vol.nii.gz:axial:t3:0") == "axial"
    assert nifti_axis("nifti:/data/t1/vol.nii.gz:sagittal:t0:7") == "sagittal"
