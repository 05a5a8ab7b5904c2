"""Fine-tuning modes on the real ViT-S/14 architecture (random weights, 56 px): the parameters each mode
trains really receive gradients and change, frozen ones stay bit-identical, LoRA adds exactly the analytic
number of weights, and the merged LoRA checkpoint reads back as a timm model with the same outputs."""

from __future__ import annotations

import pytest
import torch

from embedstore.errors import UsageError
from embedstore.finetune.modes import (
    lora_weight_count,
    plain_backbone,
    prepare_backbone,
    save_backbone,
    trainable_count,
)
from embedstore.models.build import load_model

IMAGE_SIZE = 56
VIT_S_LORA_WEIGHTS = 3_096_576  # PROTOCOL.md: r 48 on qkv, fc1, fc2 of the 12 ViT-S blocks


def backbone():
    return load_model("dinov2_vits14", "random", IMAGE_SIZE, seed=0).model


def steps(model: torch.nn.Module, head: torch.nn.Linear, n: int) -> None:
    """`n` SGD steps of a two-class task on random images, the backbone in train mode."""
    model.train()
    parameters = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.5)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    for _ in range(n):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(model(images)), torch.tensor([0, 1, 0, 1]))
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("mode", ["full", "lora", "bitfit", "linear"])
def test_trainable_parameters_change_and_frozen_ones_do_not(mode):
    torch.manual_seed(0)
    model = prepare_backbone(backbone(), mode)
    head = torch.nn.Linear(384, 2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # LoRA's B starts at zero (the adapted model starts as the backbone), so A's gradient is exactly
    # zero on the first step: two steps, then every adapter weight has moved.
    steps(model, head, 2 if mode == "lora" else 1)
    assert model.training
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
            assert not torch.equal(parameter, before[name]), name
        else:
            assert parameter.grad is None and torch.equal(parameter, before[name]), name
    expected = {"full": sum(p.numel() for p in before.values()), "linear": 0,
                "lora": VIT_S_LORA_WEIGHTS,
                "bitfit": sum(p.numel() for name, p in before.items() if name.endswith("bias"))}[mode]
    assert trainable_count(model) == expected
    if mode == "lora":
        assert trainable and all("lora_" in name for name in trainable)
        assert lora_weight_count(backbone()) == VIT_S_LORA_WEIGHTS


def test_merged_lora_checkpoint_reads_back_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = prepare_backbone(backbone(), "lora")
    steps(model, torch.nn.Linear(384, 2), 3)
    model.eval()
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        adapted = model(images)
    path = save_backbone(model, tmp_path / "finetuned.safetensors")
    reloaded = load_model("dinov2_vits14", str(path), IMAGE_SIZE)
    assert not any("lora" in name for name, _ in reloaded.model.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(images), adapted, atol=1e-4, rtol=0)
    assert reloaded.spec.model_id != load_model("dinov2_vits14", "random", IMAGE_SIZE).spec.model_id
    assert not torch.equal(plain_backbone(model).blocks[0].attn.qkv.weight, backbone().blocks[0].attn.qkv.weight)


def test_a_lora_target_that_matches_nothing_is_refused():
    with pytest.raises(UsageError, match="target w12 matches no linear layer of block 0"):
        prepare_backbone(backbone(), "lora", ("qkv", "w12"))
    with pytest.raises(UsageError, match="targets w12, w3 match no linear layer of block 0"):
        prepare_backbone(backbone(), "lora", ("w12", "w3"))
    with pytest.raises(UsageError, match="--mode"):
        prepare_backbone(backbone(), "prefix")
