"""Model names users know (the DINOv2 hub names) mapped to timm architectures.

Any other timm model name is accepted as well, so the study's comparisons against supervised and
other self-supervised ViTs and CNNs run through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm

from embedstore.errors import UsageError

# familiar name → timm "architecture.pretrained_tag"
DINOV2_MODELS: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
}


@dataclass(frozen=True)
class ModelName:
    """A name the user gave, resolved to what timm builds."""

    name: str  # what the user asked for, recorded in model_id
    timm_name: str  # "architecture[.pretrained_tag]" as timm.create_model takes it

    @property
    def architecture(self) -> str:
        return self.timm_name.split(".", 1)[0]


def resolve_model(name: str) -> ModelName:
    """The spec for a familiar DINOv2 name or any timm model name; UsageError otherwise."""
    if name in DINOV2_MODELS:
        return ModelName(name=name, timm_name=DINOV2_MODELS[name])
    if timm.is_model(name.split(".", 1)[0]):
        return ModelName(name=name, timm_name=name)
    raise UsageError(
        f"unknown model {name!r}: use one of {', '.join(DINOV2_MODELS)} or a timm model name"
    )
