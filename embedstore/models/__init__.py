"""Models: the registry of names, weights from hub / file / seeded random, and the embedder that
turns preprocessed pixels into CLS, patch-mean and patch-token embeddings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from embedstore.errors import UsageError
from embedstore.models.registry import DINOV2_MODELS, ModelSpec, resolve_model
from embedstore.models.weights import build_from_file, build_from_hub, build_random, weights_digest

__all__ = ["DINOV2_MODELS", "LoadedModel", "ModelSpec", "load_model", "resolve_model"]


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module
    image_size: int
    weights_tag: str  # "hub-<digest>", "file-<digest>" or "random-s<seed>-<digest>"
    embed_dim: int
    patch_size: int
    grid: tuple[int, int]
    num_prefix_tokens: int  # CLS + register tokens in front of the patch tokens

    @property
    def weights_source(self) -> str:
        """"hub", "file" or "random"."""
        return self.weights_tag.split("-", 1)[0]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def model_id(self, preprocess_tag: str) -> str:
        """Pins architecture, weights digest, image size and preprocessing; safe as a path component."""
        name = re.sub(r"[^A-Za-z0-9_.]", "_", self.spec.name)
        return f"{name}-{self.weights_tag}-{self.image_size}px-{preprocess_tag}"


def feature_map_nchw(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Feature maps as (N, C, h, w): some timm models (Swin, ...) return channels-last."""
    if features.ndim == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
        return features.permute(0, 3, 1, 2)
    return features


def patch_size_of(spec: ModelSpec) -> int | None:
    match = re.search(r"patch(\d+)", spec.architecture)
    return int(match.group(1)) if match else None


def load_model(name: str, weights: str = "hub", image_size: int = 224, seed: int = 0) -> LoadedModel:
    """Build `name` at `image_size` with weights from "hub", "random" or a checkpoint path.

    Every problem the user can fix (unknown name, bad size, unreadable file, no network) is a
    UsageError raised before anything is written anywhere.
    """
    spec = resolve_model(name)
    declared_patch = patch_size_of(spec)
    if image_size <= 0 or (declared_patch and image_size % declared_patch):
        raise UsageError(
            f"image size {image_size} is not a positive multiple of {spec.name}'s patch size {declared_patch}"
        )
    if weights == "random":
        model, source = build_random(spec, image_size, seed), f"random-s{seed}"
    elif weights == "hub":
        model, source = build_from_hub(spec, image_size), "hub"
    else:
        model, source = build_from_file(spec, image_size, Path(weights)), "file"
    model.eval().requires_grad_(False)
    return _describe(spec, model, image_size, f"{source}-{weights_digest(model)}")


def _describe(spec: ModelSpec, model: torch.nn.Module, image_size: int, weights_tag: str) -> LoadedModel:
    with torch.inference_mode():
        features = feature_map_nchw(model, model.forward_features(torch.zeros(1, 3, image_size, image_size)))
    if features.ndim == 4:  # CNN feature map (N, C, h, w): every position is a "patch"
        grid, embed_dim, prefix = (features.shape[2], features.shape[3]), features.shape[1], 0
        patch = image_size // grid[0]
    else:  # ViT tokens (N, prefix + h*w, D)
        grid = tuple(model.patch_embed.grid_size)
        embed_dim, prefix = features.shape[2], getattr(model, "num_prefix_tokens", 1)
        patch = model.patch_embed.patch_size[0]
        if image_size % patch:
            raise UsageError(f"image size {image_size} is not a multiple of {spec.name}'s patch size {patch}")
    return LoadedModel(spec, model, image_size, weights_tag, int(embed_dim), int(patch), grid, int(prefix))
