"""Inference engines for the embedding forward: eager PyTorch, torch.compile, TensorRT.

Every compiled engine is checked against eager on a calibration batch before it is used: each
embedding (CLS and mean patch token) must keep a cosine similarity of at least 0.999. An engine
that cannot be built or fails the check gives way to the next one (tensorrt → compile → eager),
and the reason is reported. Engines run at one image size (position embeddings are resampled once,
at load, never in the forward) and one batch size: a short last batch is padded, so nothing is
recompiled mid-run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embedstore.errors import UsageError
from embedstore.models.build import feature_map_nchw

ENGINES = ("auto", "eager", "compile", "tensorrt")
MIN_COSINE = 0.999
CALIBRATION_IMAGES = 8
ENGINE_CACHE_ENV = "EMBEDSTORE_ENGINE_CACHE"  # where TensorRT engines are kept between runs


class EmbeddingForward(torch.nn.Module):
    """Normalised batch → every stored feature, in one module so an engine compiles all of it:
    (pooled `cls` (n, D), `patch_mean` (n, D), final-norm CLS of the kept blocks (n, L, D), final-norm
    patch tokens of the kept blocks (n, P, T, D)). ViTs run timm's `forward_intermediates(norm=True)`,
    what DINOv2's `get_intermediate_layers(n, norm=True)` returns; CNNs give their pooled features
    and final feature map."""

    def __init__(self, model: torch.nn.Module, spec):
        super().__init__()
        self.model = model
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.cls_layers = list(spec.cls_layers)
        self.patch_layers = list(spec.patch_layers)
        self.token_blocks = spec.num_blocks > 0
        # forward_intermediates returns the blocks asked for, in block order
        self.taken = sorted(set(self.cls_layers) | set(self.patch_layers)) if self.token_blocks else []

    def forward(self, batch: torch.Tensor):
        if not self.token_blocks:  # CNNs: the feature map's positions are the "patches"
            features = self.model.forward_features(batch)
            pooled = self.model.forward_head(features, pre_logits=True)
            tokens = feature_map_nchw(self.model, features).flatten(2).transpose(1, 2)
            patches = tokens[:, None] if self.patch_layers else tokens[:, :0, None]
            return pooled, tokens.mean(dim=1), tokens.new_zeros((len(batch), 0, tokens.shape[-1])), patches
        final, intermediates = self.model.forward_intermediates(
            batch, indices=self.taken or [len(self.model.blocks) - 1], norm=True, output_fmt="NLC",
            return_prefix_tokens=True)
        by_block = dict(zip(self.taken, intermediates))
        pooled = self.model.forward_head(final, pre_logits=True)
        patch_mean = final[:, self.num_prefix_tokens:].mean(dim=1)
        width = final.shape[-1]
        cls_layers = torch.stack([by_block[b][1][:, 0] for b in self.cls_layers], dim=1) if self.cls_layers \
            else final.new_zeros((len(batch), 0, width))
        patches = torch.stack([by_block[b][0] for b in self.patch_layers], dim=1) if self.patch_layers \
            else final.new_zeros((len(batch), 0, final.shape[1] - self.num_prefix_tokens, width))
        return pooled, patch_mean, cls_layers, patches


@dataclass
class Engine:
    name: str  # the engine in use
    forward: object  # callable: normalised batch → EmbeddingForward's outputs
    batch_size: int | None  # fixed batch of a compiled engine (short batches are padded); None: any
    notes: list[str] = field(default_factory=list)  # why a requested engine was not used


def candidate_engines(requested: str, device: torch.device) -> list[str]:
    if requested not in ENGINES:
        raise UsageError(f"unknown engine {requested!r}: use one of {', '.join(ENGINES)}")
    if requested == "auto":
        # On the CPU torch.compile costs a minute per model and gains little for a ViT: eager.
        return ["tensorrt", "compile", "eager"] if device.type == "cuda" else ["eager"]
    return {"tensorrt": ["tensorrt", "compile", "eager"], "compile": ["compile", "eager"],
            "eager": ["eager"]}[requested]


def build_engine(module: EmbeddingForward, requested: str, device: torch.device, dtype: torch.dtype,
                 batch_size: int, image_size: int, cache_key: str) -> Engine:
    """The first engine of the requested chain that builds and matches eager on calibration."""
    notes: list[str] = []
    calibration = calibration_batch(image_size, device)
    reference = None
    for name in candidate_engines(requested, device):
        if name == "eager":
            return Engine("eager", module, None, notes)
        try:
            forward = (compile_with_tensorrt(module, device, dtype, batch_size, image_size, cache_key)
                       if name == "tensorrt" else torch.compile(module, dynamic=False))
            if reference is None:
                reference = run_padded(module, calibration, batch_size, dtype, device)
            cosine = worst_cosine(reference, run_padded(forward, calibration, batch_size, dtype, device))
        except Exception as error:  # a missing package, an unsupported op, a compiler error
            notes.append(f"{name} unavailable ({type(error).__name__}: {' '.join(str(error).split())[:200]})")
            continue
        if cosine < MIN_COSINE:
            notes.append(f"{name} rejected: cosine similarity to eager {cosine:.5f} < {MIN_COSINE}")
            continue
        return Engine(name, forward, batch_size, notes)
    raise AssertionError("eager is always the last candidate")


def calibration_batch(image_size: int, device: torch.device) -> torch.Tensor:
    """Fixed smooth random images, so every run checks an engine on the same input."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(CALIBRATION_IMAGES, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear")
    return ((images - 0.45) / 0.225).to(device)


def run_padded(forward, batch: torch.Tensor, batch_size: int, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls, patch mean) of `batch`, run in chunks of exactly `batch_size` (the last one padded)."""
    outputs = []
    with torch.inference_mode(), autocast(device, dtype):
        for start in range(0, len(batch), batch_size):
            outputs.append(forward_padded(forward, batch[start:start + batch_size], batch_size))
    return tuple(torch.cat([o[part] for o in outputs]).float() for part in (0, 1))


def forward_padded(forward, batch: torch.Tensor, batch_size: int | None):
    n = len(batch)
    if batch_size is None or n == batch_size:
        return forward(batch)
    padded = torch.cat([batch, batch.new_zeros((batch_size - n, *batch.shape[1:]))])
    return tuple(output[:n] for output in forward(padded))


def autocast(device: torch.device, dtype: torch.dtype):
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def worst_cosine(reference, candidate) -> float:
    worst = 1.0
    for expected, got in zip(reference, candidate):
        similarity = torch.nn.functional.cosine_similarity(expected.float(), got.float(), dim=1)
        worst = min(worst, float(similarity.min()))
    return worst


def compile_with_tensorrt(module: EmbeddingForward, device: torch.device, dtype: torch.dtype, batch_size: int,
                          image_size: int, cache_key: str):
    """A TensorRT engine for this model, image size and batch; cached on disk by model id, GPU
    and TensorRT version, since building one takes minutes."""
    if device.type != "cuda":
        raise RuntimeError("TensorRT needs a CUDA device")
    import torch_tensorrt  # the optional extra: pip install "embedstore[tensorrt]"

    gpu = torch.cuda.get_device_name(device).replace(" ", "_")
    key = hashlib.sha256(f"{cache_key}|{gpu}|{torch_tensorrt.__version__}|{dtype}|{batch_size}".encode())
    cache = Path(os.environ.get(ENGINE_CACHE_ENV, Path.home() / ".cache" / "embedstore" / "engines"))
    path = cache / f"{key.hexdigest()[:24]}.ep"
    example = torch.zeros(batch_size, 3, image_size, image_size, device=device)
    if path.exists():
        return torch_tensorrt.load(str(path)).module()
    precisions = {torch.float32: {torch.float32}, torch.float16: {torch.float16, torch.float32},
                  torch.bfloat16: {torch.bfloat16, torch.float32}}[dtype]
    compiled = torch_tensorrt.compile(module.eval(), ir="dynamo", inputs=[example], enabled_precisions=precisions)
    cache.mkdir(parents=True, exist_ok=True)
    torch_tensorrt.save(compiled, str(path), inputs=[example])
    return compiled
