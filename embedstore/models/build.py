"""The one build path: a model from its name, weights (hub, file or seeded random) and image size, with
the spec that says what its vectors mean; and the model a stored spec describes, rebuilt."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from embedstore.errors import UsageError
from embedstore.intensity import PREPROCESS_VERSION, IntensityConfig
from embedstore.models.registry import ModelName, resolve_model
from embedstore.models.spec import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, ModelSpec
from embedstore.models.weights import build_from_file, build_from_hub, build_random, weights_digest

DEFAULT_LAYERS = 4  # the reference study's "last 4 blocks" linear-probe input


@dataclass
class LoadedModel:
    """A built model and the spec that says what its vectors mean."""

    spec: ModelSpec
    model: torch.nn.Module

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    # Shorthands for the geometry every stage asks for.
    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def grid(self) -> tuple[int, int]:
        return self.spec.grid

    @property
    def num_patches(self) -> int:
        return self.spec.num_patches

    @property
    def num_prefix_tokens(self) -> int:
        return self.spec.num_prefix_tokens

    @property
    def weights_source(self) -> str:
        return self.spec.weights_source


def feature_map_nchw(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Feature maps as (N, C, h, w): some timm models (Swin, ...) return channels-last."""
    if features.ndim == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
        return features.permute(0, 3, 1, 2)
    return features


def cls_and_patch_mean(model: torch.nn.Module, batch: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The stored `cls+patch_mean` feature, (n, 2D), computed with autograd: the pooled pre-logits
    features beside the mean of the final-norm patch tokens (of the final feature map for CNNs).
    What a fine-tuning head reads, so its input is the linear probe's."""
    features = model.forward_features(batch)
    pooled = model.forward_head(features, pre_logits=True)
    if num_prefix_tokens or features.ndim == 3:
        patch_mean = features[:, num_prefix_tokens:].mean(dim=1)
    else:
        patch_mean = feature_map_nchw(model, features).mean(dim=(2, 3))
    return torch.cat([pooled, patch_mean], dim=1)


def patch_size_of(name: ModelName) -> int | None:
    match = re.search(r"patch(\d+)", name.architecture)
    return int(match.group(1)) if match else None


def has_token_blocks(model: torch.nn.Module) -> bool:
    """A ViT-like model whose blocks' tokens (CLS first) `forward_intermediates` returns."""
    return (getattr(model, "num_prefix_tokens", 0) > 0 and hasattr(model, "blocks")
            and hasattr(model, "forward_intermediates"))


def load_model(name: str, weights: str = "hub", image_size: int = 224, seed: int = 0,
               intensity: IntensityConfig | None = None, layers: int | None = None,
               patch_layers: tuple[int, ...] | None = None, mean: tuple[float, ...] | None = None,
               std: tuple[float, ...] | None = None) -> LoadedModel:
    """Build `name` at `image_size` with weights from "hub", "random" or a checkpoint path, and its spec.

    `layers`: how many last blocks' CLS tokens to keep (default 4 on ViTs; CNNs have none).
    `patch_layers`: blocks whose patch tokens are kept (negative counts from the end; default the
    last; () keeps none). `mean`/`std` override the model's `pretrained_cfg`. Every problem the user
    can fix (unknown name, bad size or layers, unreadable file, no network) is a UsageError raised
    before anything is written anywhere.
    """
    resolved = resolve_model(name)
    declared_patch = patch_size_of(resolved)
    if image_size <= 0 or (declared_patch and image_size % declared_patch):
        raise UsageError(
            f"image size {image_size} is not a positive multiple of {resolved.name}'s patch size {declared_patch}"
        )
    if weights == "random":
        model, source, weights_file = build_random(resolved, image_size, seed), "random", None
    elif weights == "hub":
        model, source, weights_file = build_from_hub(resolved, image_size), "hub", None
    else:
        path = Path(weights)
        model, source, weights_file = build_from_file(resolved, image_size, path), "file", str(path.resolve())
    model.eval().requires_grad_(False)
    spec = describe(resolved, model, image_size, source, weights_file, seed=seed if source == "random" else 0,
                    intensity=intensity or IntensityConfig(), layers=layers, patch_layers=patch_layers, mean=mean,
                    std=std)
    return LoadedModel(spec, model)


def rebuild_model(spec: ModelSpec, weights: str | None = None) -> LoadedModel:
    """The model a stored spec describes, checked against its weights digest. `weights` points at
    a checkpoint when the recorded source cannot be reached from here."""
    source = weights or {"random": "random", "hub": "hub"}.get(spec.weights_source, spec.weights_file)
    loaded = load_model(spec.name, source, spec.image_size, spec.seed, spec.intensity, mean=spec.mean, std=spec.std)
    if loaded.spec.weights_digest != spec.weights_digest:
        raise UsageError(f"the weights loaded for {spec.model_id} have digest {loaded.spec.weights_digest}, "
                         f"not {spec.weights_digest}: pass --weights PATH to the checkpoint the store was made with")
    # The stored record stays the truth: the layers it kept, its interpolation, the version that wrote it.
    return LoadedModel(spec, loaded.model)


def describe(name: ModelName, model: torch.nn.Module, image_size: int, source: str, weights_file: str | None,
             seed: int, intensity: IntensityConfig, layers: int | None, patch_layers: tuple[int, ...] | None,
             mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> ModelSpec:
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
            raise UsageError(f"image size {image_size} is not a multiple of {name.name}'s patch size {patch}")
    num_blocks = len(model.blocks) if has_token_blocks(model) else 0
    config = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in (mean or config.get("mean") or IMAGENET_MEAN))
    std = tuple(float(v) for v in (std or config.get("std") or IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UsageError(f"mean and std take three values each (std positive), not {mean} and {std}")
    interpolation = config.get("interpolation", "bicubic")
    return ModelSpec(
        name=name.name, timm_name=name.timm_name, weights_source=source, weights_digest=weights_digest(model),
        weights_file=weights_file, seed=seed, image_size=image_size, patch_size=int(patch),
        grid_h=int(grid[0]), grid_w=int(grid[1]), num_prefix_tokens=int(prefix), embed_dim=int(embed_dim),
        num_blocks=num_blocks, mean=mean, std=std,
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        window=intensity.window, mr_percentiles=tuple(intensity.mr_percentiles),
        preprocess_version=PREPROCESS_VERSION, cls_layers=kept_cls_layers(name.name, num_blocks, layers),
        patch_layers=kept_patch_layers(name.name, num_blocks, patch_layers),
    )


def kept_cls_layers(name: str, num_blocks: int, layers: int | None) -> tuple[int, ...]:
    if num_blocks == 0:
        if layers not in (None, 1):
            raise UsageError(f"--layers {layers}: {name} has no class token per block; it keeps its pooled "
                             "features as cls only (omit --layers)")
        return ()
    n = DEFAULT_LAYERS if layers is None else layers
    if not 1 <= n <= num_blocks:
        raise UsageError(f"--layers must be between 1 and {name}'s {num_blocks} blocks, not {n}")
    return tuple(range(num_blocks - min(n, num_blocks), num_blocks))


def kept_patch_layers(name: str, num_blocks: int, requested: tuple[int, ...] | None) -> tuple[int, ...]:
    """Block indices (from 0) whose patch tokens are kept; CNNs keep their final feature map as
    "block -1" only, recorded as (0,)."""
    if requested is not None and not requested:
        return ()
    if num_blocks == 0:
        if requested not in (None, (-1,)):
            raise UsageError(f"--patch-layers: {name} has no transformer blocks; only its final feature map "
                             "is kept (omit --patch-layers)")
        return (0,)
    blocks = []
    for index in (-1,) if requested is None else requested:
        block = index + num_blocks if index < 0 else index
        if not 0 <= block < num_blocks:
            raise UsageError(f"--patch-layers: {name} has blocks 0 to {num_blocks - 1} (or -1 to -{num_blocks}), "
                             f"not {index}")
        blocks.append(block)
    return tuple(sorted(set(blocks)))
