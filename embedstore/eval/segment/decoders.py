"""Segmentation decoders trained on stored patch tokens, the reference study's two heads (PROTOCOL.md,
"Segmentation probes").

Both take a list of (B, T, D) token tensors, oldest block first, T = h * w in row-major grid order, every
block already through the backbone's final LayerNorm, and return logits (B, C, S, S) at the image size.

- `linear`: a 1x1 conv on the last block's tokens (weights N(0, 0.01), bias 0), logits upsampled bilinearly.
- `unet`: the last 5 blocks. The last is the bottleneck; the other four are skips, the deepest joining the
  first up-block. Four up-blocks D -> D/2 -> D/4 -> D/8 -> C each double the resolution (a 32x32 grid ends
  at 512 px), then the logits are resized bilinearly to the image size.

Fixed relative to the study's published code (dinov2/eval/segmentation/utils.py): it fed the second-to-last
block as both bottleneck and first skip, so the last block was never read; its last up-block ended in
BatchNorm + ReLU on the logits, clipping every negative logit to 0; and BatchNorm made a batch of 1 or 2 (a
CPU test, the last batch of an epoch) normalise differently from a batch of 128.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from embedstore.eval.options import DECODER_LAYERS

LINEAR_INIT_STD = 0.01  # the study's init of the linear head
NORM_MAX_GROUPS = 8


def image_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image size given as one side (square) or as a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def token_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, T, D) row-major tokens as a (B, D, h, w) feature map."""
    if tokens.ndim != 3 or tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} are not (B, {grid[0] * grid[1]}, D) for a "
                         f"{grid[0]}x{grid[1]} grid")
    # A view, not a copy: convolutions accept the channels-last strides this leaves.
    return tokens.unflatten(1, grid).permute(0, 3, 1, 2)


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits resized bilinearly to `size` (unchanged when already that size)."""
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class LinearDecoder(nn.Module):
    """The study's linear head: a 1x1 conv on the last block's tokens (weights N(0, 0.01), bias 0), logits
    upsampled bilinearly to the image size."""

    def __init__(self, dim: int, n_classes: int, grid: tuple[int, int], image_size: int | tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)
        self.image_size = image_shape(image_size)
        self.conv = nn.Conv2d(dim, n_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=LINEAR_INIT_STD)
        nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return resize_logits(self.conv(token_map(tokens[-1], self.grid)), self.image_size)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups: its statistics are per sample, so a batch of 1 trains and a model
    evaluates exactly as a batch of 128 does (no running statistics, no train/eval difference)."""
    return nn.GroupNorm(math.gcd(channels, NORM_MAX_GROUPS), channels)


class UpBlock(nn.Module):
    """Double the resolution with a 2x2 transposed conv, join a skip, then a 3x3 conv.

    The skip arrives at the token grid: a 1x1 conv brings it to this block's channels first and only then is it
    upsampled bilinearly to this block's resolution. Both steps are linear and bilinear weights sum to 1, so
    this equals upsampling first, at a fraction of the cost (the projection runs on h x w, not 16h x 16w).
    A hidden block ends in GroupNorm + ReLU; the last block's 3x3 conv is the logit layer, so it has neither.
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int, last: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.skip = nn.Conv2d(skip_channels, out_channels, kernel_size=1)
        merge = nn.Conv2d(2 * out_channels, out_channels, kernel_size=3, padding=1, bias=last)
        self.merge = merge if last else nn.Sequential(merge, group_norm(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = F.interpolate(self.skip(skip), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.merge(torch.cat([x, skip], dim=1))


class UNetDecoder(nn.Module):
    """The study's UNet-style head on the last 5 blocks: the last is the bottleneck, the earlier four are skips
    (the deepest joins the first up-block); four up-blocks D -> D/2 -> D/4 -> D/8 -> C, each doubling the
    resolution (h -> 16h: 512 px for a 448 px input's 32x32 grid), then the logits resized to the image size.

    The final resize is bilinear where the study's code used bicubic: a bilinear value is a convex
    combination of neighbouring logits, so it cannot overshoot at an edge and flip a pixel to a class that
    neither neighbour predicts, as bicubic's negative lobes can; it is also how the linear head upsamples,
    so both heads are resized alike.
    """

    def __init__(self, dim: int, n_classes: int, grid: tuple[int, int], image_size: int | tuple[int, int]):
        super().__init__()
        if dim % 8:
            raise ValueError(f"the unet decoder needs a token width divisible by 8, not {dim}")
        self.grid = tuple(grid)
        self.image_size = image_shape(image_size)
        channels = [dim, dim // 2, dim // 4, dim // 8, n_classes]
        self.up_blocks = nn.ModuleList(
            UpBlock(channels[i], channels[i + 1], dim, last=i == 3) for i in range(4))

    def forward(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        if len(tokens) != DECODER_LAYERS["unet"]:
            raise ValueError(f"the unet decoder reads {DECODER_LAYERS['unet']} blocks, got {len(tokens)}")
        maps = [token_map(block, self.grid) for block in tokens]
        x = maps[-1]
        for block, skip in zip(self.up_blocks, reversed(maps[:-1])):
            x = block(x, skip)
        return resize_logits(x, self.image_size)


DECODERS = {"linear": LinearDecoder, "unet": UNetDecoder}


def build_decoder(kind: str, dim: int, n_classes: int, grid: tuple[int, int],
                  image_size: int | tuple[int, int]) -> nn.Module:
    """A freshly initialised decoder of `kind` ("linear" or "unet")."""
    if kind not in DECODERS:
        raise ValueError(f"decoder must be one of {tuple(DECODERS)}, not {kind!r}")
    return DECODERS[kind](dim, n_classes, grid, image_size)
