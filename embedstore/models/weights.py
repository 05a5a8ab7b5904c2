"""Build a model and fill it with weights: from the hub, from a local file, or seeded random.

Checkpoint files may be the official Meta DINOv2 format (`dinov2_vit*14_pretrain.pth`, trained at
518 px) or timm's own (`.safetensors` / `.pth`). Position embeddings are resampled once, here, to the
chosen image size, so no forward pass ever interpolates them.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from embedstore.errors import UsageError
from embedstore.models.registry import ModelName

CHECKPOINT_WRAPPER_KEYS = ("model", "state_dict", "teacher")  # Meta training checkpoints use "teacher"
CHECKPOINT_KEY_PREFIXES = ("module.", "backbone.")


def create_architecture(spec: ModelName, image_size: int, pretrained: bool = False) -> torch.nn.Module:
    """The timm model without a classifier head, at `image_size` where the architecture takes one."""
    kwargs = {"pretrained": pretrained, "num_classes": 0}
    try:
        return timm.create_model(spec.timm_name, img_size=image_size, **kwargs)
    except TypeError:  # CNNs and other models without a fixed input size
        return timm.create_model(spec.timm_name, **kwargs)


def build_random(spec: ModelName, image_size: int, seed: int) -> torch.nn.Module:
    """timm's own initialisation, made reproducible by the seed."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return create_architecture(spec, image_size)
    finally:
        torch.random.set_rng_state(generator_state)


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None. Checked up front because the hub client retries a
    failing network for most of a minute; with HF_HUB_OFFLINE set, the local cache is used instead."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy, local name resolution says nothing about reachability
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as error:
        return f"{host} cannot be resolved: {error.strerror or error}"
    return None


def build_from_hub(spec: ModelName, image_size: int) -> torch.nn.Module:
    advice = "pass --weights PATH to a local checkpoint (or --weights random)"
    problem = hub_unreachable()
    if problem:
        raise UsageError(f"no network access to the model hub for {spec.name} ({problem}); {advice}")
    try:
        return create_architecture(spec, image_size, pretrained=True)
    except Exception as error:  # network, auth, missing tag: all end the same way for the user
        first_sentence = (str(error).strip() or type(error).__name__).split(". ")[0].splitlines()[0]
        raise UsageError(f"could not get weights for {spec.name} from the hub ({first_sentence[:160]}); {advice}") from None


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors or torch checkpoint file (loaded with weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise UsageError(f"weights file {path} is not a checkpoint ({reason})") from None
    for wrapper in CHECKPOINT_WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"weights file {path} is not a checkpoint (no state dict of tensors inside)")
    for prefix in CHECKPOINT_KEY_PREFIXES:
        # Training checkpoints hold heads beside the backbone ("dino_head.*"): keep the backbone only.
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def build_from_file(spec: ModelName, image_size: int, path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise UsageError(f"weights file {path} does not exist")
    state = read_checkpoint(path)
    model = create_architecture(spec, image_size)
    if isinstance(model, VisionTransformer):
        # Converts Meta's DINOv2 key names (registers, SwiGLU w12/w3) and resamples position
        # embeddings from the checkpoint's grid (518 px for Meta's files) to this model's grid.
        try:
            state = checkpoint_filter_fn(dict(state), model)
        except (RuntimeError, ValueError, KeyError) as error:
            first_line = (str(error).strip() or type(error).__name__).splitlines()[0][:160]
            raise UsageError(f"weights file {path} does not fit {spec.name}: {first_line}") from None
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise UsageError(
            f"weights file {path} does not fit {spec.name}: {len(missing)} missing keys "
            f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UsageError(f"weights file {path} does not fit {spec.name}: {str(error).splitlines()[-1].strip()}") from None
    return model


def _key_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def weights_digest(model: torch.nn.Module) -> str:
    """12 hex digits of SHA-256 over the loaded parameters: the same weights give the same digest
    whichever file format they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]
