"""Engines: the fallback chain, the calibration check against eager, and a real torch.compile run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedstore.errors import UsageError
from embedstore.models.build import load_model
from embedstore.models.embedder import Embedder
from embedstore.models.engines import candidate_engines
from embedstore.samples import phantom
from tests.support import TEST_IMAGE_SIZE


@pytest.fixture(scope="module")
def loaded():
    return load_model("dinov2_vits14", "random", TEST_IMAGE_SIZE)


def images(n: int, size: int = TEST_IMAGE_SIZE) -> np.ndarray:
    return np.stack([phantom(size, 100 + i) for i in range(n)])[:, None].astype(np.float32)


def test_engine_chains():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert candidate_engines("auto", cuda) == ["tensorrt", "compile", "eager"]
    assert candidate_engines("auto", cpu) == ["eager"]
    assert candidate_engines("compile", cpu) == ["compile", "eager"]
    with pytest.raises(UsageError, match="warp"):
        candidate_engines("warp", cpu)


def test_position_embeddings_are_sized_at_load_not_in_the_forward(loaded):
    """Interpolating them in every forward is what breaks TensorRT/ONNX export of DINOv2."""
    grid = TEST_IMAGE_SIZE // 14
    assert loaded.model.pos_embed.shape[1] == 1 + grid * grid
    assert not getattr(loaded.model, "dynamic_img_size", False)


def test_an_engine_that_disagrees_with_eager_gives_way(loaded, monkeypatch):
    def wrong_compile(module, **_):
        return lambda batch: tuple(-output for output in module(batch))  # flips every embedding

    monkeypatch.setattr(torch, "compile", wrong_compile)
    embedder = Embedder(loaded, "cpu", engine="compile", batch_size=4)
    assert embedder.engine.name == "eager"
    assert "compile rejected: cosine similarity to eager -1.0" in embedder.engine.notes[0]


def test_an_engine_that_cannot_be_built_gives_way(loaded, monkeypatch):
    def broken_compile(module, **_):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    embedder = Embedder(loaded, "cpu", engine="tensorrt", batch_size=4)
    assert embedder.engine.name == "eager"
    assert embedder.engine.notes == ["tensorrt unavailable (RuntimeError: TensorRT needs a CUDA device)",
                                     "compile unavailable (RuntimeError: no C++ compiler)"]


@pytest.mark.slow
def test_compiled_engine_matches_eager_including_a_short_last_batch(loaded):
    eager = Embedder(loaded, "cpu", engine="eager")
    compiled = Embedder(loaded, "cpu", engine="compile", batch_size=4)
    assert compiled.engine.name == "compile", compiled.engine.notes
    pixels = images(6)  # one full batch of 4, then 2 padded to 4: no recompilation for the remainder
    expected, got = eager.embed(pixels), compiled.embed(pixels)
    assert expected.cls_layers.shape == got.cls_layers.shape == (6, len(loaded.spec.cls_layers), loaded.embed_dim)
    for name in ("cls", "patch_mean", "cls_layers"):
        a, b = (getattr(result, name).reshape(-1, loaded.embed_dim) for result in (expected, got))
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.9999
    np.testing.assert_allclose(got.patches.astype(np.float32), expected.patches.astype(np.float32), atol=1e-2)
