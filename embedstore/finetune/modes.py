"""Which backbone parameters a fine-tuning mode trains, and the fine-tuned backbone as a checkpoint.

- `full`: every parameter (the backbone at its own, small learning rate);
- `lora`: low-rank adapters through HF peft on the listed linear layers of every block (the study's
  r 48, alpha 16, dropout 0.1 on qkv, fc1, fc2), the backbone frozen. peft starts each adapter's B at
  zero, so the model starts as the backbone it adapts;
- `bitfit`: the bias terms only;
- `linear`: nothing (the frozen backbone under a trained head: the online twin of `eval linear`).

The reference study's code ran LoRA and BitFit under `no_grad`, so its "PEFT" numbers were linear
probes: tests/test_finetune_modes.py checks that trainable parameters change and frozen ones do not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from embedstore.errors import UsageError
from embedstore.finetune.options import LORA_TARGETS, MODES

LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 48, 16, 0.1


def prepare_backbone(backbone: torch.nn.Module, mode: str, targets: tuple[str, ...] = LORA_TARGETS) -> torch.nn.Module:
    """The backbone ready to train in `mode` (for `lora`, a peft model wrapping it); UsageError for a
    mode, or a LoRA target list, that does not fit the model."""
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "lora":
        return with_lora(backbone, targets)
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_(mode == "full" or (mode == "bitfit" and name.endswith("bias")))
    return backbone


def with_lora(backbone: torch.nn.Module, targets: tuple[str, ...]) -> torch.nn.Module:
    """peft LoRA adapters on the `targets` linear layers of every block; UsageError when a target
    matches no linear layer in some block (peft would adapt the others and say nothing)."""
    from peft import LoraConfig, get_peft_model

    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise UsageError("--mode lora adapts the blocks of a ViT; this model has no block list")
    for index, block in enumerate(blocks):
        linear = {name.rsplit(".", 1)[-1] for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)}
        missing = [target for target in targets if target not in linear]
        if missing:
            many = len(missing) > 1
            raise UsageError(f"LoRA target{'s' * many} {', '.join(missing)} match{'es' * (not many)} no linear layer "
                             f"of block {index}, whose linear layers are {', '.join(sorted(linear))}")
    pattern = rf"blocks\.\d+\.(?:.*\.)?({'|'.join(targets)})"  # peft fullmatches a regex against module names
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=pattern,
                        bias="none")
    return get_peft_model(backbone, config)


def lora_weight_count(backbone: torch.nn.Module, targets: tuple[str, ...] = LORA_TARGETS, rank: int = LORA_RANK) -> int:
    """r · (in + out) per adapted linear layer: the adapters' size, counted from the architecture."""
    return sum(rank * (module.in_features + module.out_features)
               for block in backbone.blocks for name, module in block.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def plain_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone as timm builds it: LoRA adapters merged into their layers and removed."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def save_backbone(model: torch.nn.Module, path: Path) -> Path:
    """The fine-tuned backbone as a timm-format `.safetensors` state dict (`--weights PATH` reads it)."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in plain_backbone(model).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
