"""The model spec: everything that decides what a stored vector means, in one record.

timm's pattern (a model carries its `pretrained_cfg`) followed one step further: the spec holds the
architecture, where the weights came from and their digest, the input geometry, the input statistics
and interpolation from `pretrained_cfg` (CLIP, augreg and other baselines are not ImageNet-normalised),
the intensity settings, and which layers the store keeps. It is written to the store's `models`
table, and every reader (search by image, fine-tuning, evaluation) rebuilds the model from it, never
from a run's option dump. `model_id` is derived from it here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields

from embedstore.intensity import IntensityConfig
from embedstore.version import __version__

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # what the resize step can do (always antialiased)
# the normalisation of a model whose pretrained_cfg names none (and DINOv2's own)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what the user asked for: dinov2_vits14, or a timm model name
    timm_name: str  # "architecture[.pretrained_tag]" as timm.create_model takes it
    weights_source: str  # "hub", "file" or "random"
    weights_digest: str  # 12 hex digits of SHA-256 over the loaded parameters
    weights_file: str | None  # the checkpoint path for "file"
    seed: int  # the initialisation seed for "random"
    image_size: int
    patch_size: int
    grid_h: int
    grid_w: int
    num_prefix_tokens: int  # CLS + register tokens before the patch tokens (0 for CNNs)
    embed_dim: int
    num_blocks: int  # transformer blocks (0 for models without a block list)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    window: str  # intensity settings, see preprocess.IntensityConfig
    mr_percentiles: tuple[float, float]
    preprocess_version: int
    cls_layers: tuple[int, ...]  # blocks whose final-norm CLS token is stored (columns cls_b<i>)
    patch_layers: tuple[int, ...]  # blocks whose final-norm patch tokens go to Zarr
    embedstore_version: str = __version__

    @property
    def architecture(self) -> str:
        return self.timm_name.split(".", 1)[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.grid_h, self.grid_w

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def weights_tag(self) -> str:
        source = f"random-s{self.seed}" if self.weights_source == "random" else self.weights_source
        return f"{source}-{self.weights_digest}"

    @property
    def intensity(self) -> IntensityConfig:
        return IntensityConfig(window=self.window, mr_percentiles=tuple(self.mr_percentiles))

    @property
    def input_tag(self) -> str:
        """Preprocessing version and a digest of everything that shapes the model's input pixels."""
        window = "auto" if self.window == "study" else self.window  # "study" is what auto does
        settings = json.dumps({
            "version": self.preprocess_version, "window": window, "ct_window": self.intensity.ct_window,
            "mr_percentiles": list(self.mr_percentiles), "mean": [round(v, 6) for v in self.mean],
            "std": [round(v, 6) for v in self.std], "interpolation": self.interpolation,
        }, sort_keys=True)
        return f"pp{self.preprocess_version}.{hashlib.sha256(settings.encode()).hexdigest()[:6]}"

    @property
    def model_id(self) -> str:
        """Architecture, weights digest, image size and input: what makes two vectors comparable.
        The layers kept are not part of it (they change what is stored, not what a vector means).
        Safe as a path component and a LanceDB table name."""
        name = re.sub(r"[^A-Za-z0-9_.]", "_", self.name)
        return f"{name}-{self.weights_tag}-{self.image_size}px-{self.input_tag}"

    def to_row(self) -> dict:
        return {**asdict(self), "model_id": self.model_id}

    @classmethod
    def from_row(cls, row: dict) -> "ModelSpec":
        values = {f.name: row[f.name] for f in fields(cls)}
        for name in ("mean", "std", "mr_percentiles", "cls_layers", "patch_layers"):
            values[name] = tuple(values[name] or ())
        return cls(**values)


def cls_column(block: int) -> str:
    """The column holding block `block`'s final-norm CLS token."""
    return f"cls_b{block}"


def patch_array(block: int) -> str:
    """The Zarr array (inside a shard group) holding block `block`'s patch tokens."""
    return f"b{block}"
