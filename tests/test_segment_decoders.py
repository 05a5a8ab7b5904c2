"""Segmentation decoders and report plots: the UNet's shapes at the study's 448 px (a 32x32 grid decoded to
512 px, then resized), the linear head's init and inputs, every UNet block and parameter in use, both heads
able to fit a small problem, and PNGs with the expected panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedstore.eval.options import DECODER_LAYERS
from embedstore.eval.segment.decoders import LinearDecoder, UNetDecoder, build_decoder
from embedstore.eval.segment.plots import plot_class_dice, plot_volume_dice, write_overlay

VIT_S = 384
STUDY_SIZE = 448  # 32x32 patches of 14 px
SMALL = 56  # 4x4 patches


def random_tokens(blocks: int, batch: int, grid: tuple[int, int], dim: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, grid[0] * grid[1], dim, generator=generator) for _ in range(blocks)]


def test_unet_at_the_study_size_decodes_to_512_then_resizes_to_the_image():
    torch.manual_seed(0)
    decoder = build_decoder("unet", VIT_S, 3, (32, 32), STUDY_SIZE)
    resolutions = []
    for block in decoder.up_blocks:
        block.register_forward_hook(lambda module, inputs, output: resolutions.append(tuple(output.shape[1:])))
    with torch.no_grad():
        logits = decoder(random_tokens(DECODER_LAYERS["unet"], 2, (32, 32), VIT_S))
    assert logits.shape == (2, 3, STUDY_SIZE, STUDY_SIZE)
    assert resolutions == [(192, 64, 64), (96, 128, 128), (48, 256, 256), (3, 512, 512)]


@pytest.mark.parametrize("grid, image_size", [((4, 4), SMALL), ((3, 5), (42, 70))])
def test_unet_small_and_non_square_grids(grid, image_size):
    decoder = build_decoder("unet", 64, 4, grid, image_size)
    logits = decoder(random_tokens(5, 1, grid, 64))
    expected = (image_size, image_size) if isinstance(image_size, int) else image_size
    assert logits.shape == (1, 4, *expected)


def test_unet_refuses_a_width_not_divisible_by_8_and_the_wrong_block_count():
    with pytest.raises(ValueError, match="divisible by 8"):
        build_decoder("unet", 100, 3, (4, 4), SMALL)
    decoder = build_decoder("unet", 64, 3, (4, 4), SMALL)
    with pytest.raises(ValueError, match="reads 5 blocks"):
        decoder(random_tokens(4, 1, (4, 4), 64))
    with pytest.raises(ValueError, match="4x4 grid"):
        decoder(random_tokens(5, 1, (5, 5), 64))
    with pytest.raises(ValueError, match="decoder must be one of"):
        build_decoder("mlp", 64, 3, (4, 4), SMALL)


def test_linear_decoder_shape_init_and_only_the_last_block():
    torch.manual_seed(0)
    decoder = build_decoder("linear", VIT_S, 3, (4, 4), SMALL)
    assert isinstance(decoder, LinearDecoder)
    assert abs(decoder.conv.weight.std().item() - 0.01) < 0.001
    assert abs(decoder.conv.weight.mean().item()) < 0.002
    assert torch.all(decoder.conv.bias == 0)
    tokens = random_tokens(5, 2, (4, 4), VIT_S)
    logits = decoder(tokens)
    assert logits.shape == (2, 3, SMALL, SMALL)
    earlier_changed = random_tokens(4, 2, (4, 4), VIT_S, seed=1) + tokens[-1:]
    assert torch.equal(decoder(earlier_changed), logits)
    last_changed = tokens[:-1] + random_tokens(1, 2, (4, 4), VIT_S, seed=1)
    assert not torch.allclose(decoder(last_changed), logits)


def test_linear_decoder_keeps_the_row_major_token_order():
    """Token t = row * w + column lands in its own 14 px patch of a 2x3 grid."""
    decoder = LinearDecoder(1, 1, (2, 3), (28, 42))
    with torch.no_grad():
        decoder.conv.weight.fill_(1.0)
    for index in range(6):
        tokens = torch.zeros(1, 6, 1)
        tokens[0, index, 0] = 1.0
        logits = decoder([tokens])[0, 0]
        peak_row, peak_column = divmod(int(logits.argmax()), 42)
        assert (peak_row // 14, peak_column // 14) == divmod(index, 3)


def test_unet_reads_every_block_and_trains_every_parameter():
    torch.manual_seed(0)
    decoder = UNetDecoder(64, 3, (4, 4), SMALL)
    tokens = random_tokens(5, 2, (4, 4), 64)
    logits = decoder(tokens)
    for index in range(5):
        perturbed = list(tokens)
        perturbed[index] = tokens[index] + 0.5
        assert not torch.allclose(decoder(perturbed), logits, atol=1e-6), f"block {index} is not read"
    logits.square().mean().backward()
    for name, parameter in decoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_unet_joins_the_deepest_skip_to_the_first_up_block():
    decoder = UNetDecoder(64, 3, (4, 4), SMALL)
    tokens = random_tokens(5, 1, (4, 4), 64)
    skips = []
    for block in decoder.up_blocks:
        block.skip.register_forward_hook(lambda module, inputs, output: skips.append(inputs[0]))
    decoder(tokens)
    expected = [tokens[index].reshape(1, 4, 4, 64).permute(0, 3, 1, 2) for index in (3, 2, 1, 0)]
    assert all(torch.equal(skip, block) for skip, block in zip(skips, expected))


def overfit_accuracy(kind: str, lr: float, steps: int = 200) -> float:
    """Pixel accuracy after training on 8 token sets whose target is the sign of a fixed projection of the
    last block's tokens, upsampled bilinearly to 56 px. Upsampled nearest instead, the linear head tops out
    near 0.88 (measured, also after 1,500 steps): its bilinear logits cross zero off the patch border
    wherever two neighbours' logits differ in size."""
    torch.manual_seed(0)
    dim, grid, batch = 32, (4, 4), 8
    tokens = random_tokens(DECODER_LAYERS[kind], batch, grid, dim)
    projection = (tokens[-1] @ torch.randn(dim)).reshape(batch, 1, *grid)
    upsampled = torch.nn.functional.interpolate(projection, size=(SMALL, SMALL), mode="bilinear")
    target = (upsampled[:, 0] > 0).long()
    decoder = build_decoder(kind, dim, 2, grid, SMALL)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(decoder(tokens), target).backward()
        optimiser.step()
    with torch.no_grad():
        return (decoder(tokens).argmax(1) == target).float().mean().item()


@pytest.mark.parametrize("kind, lr", [("linear", 0.1), ("unet", 0.003)])
def test_each_decoder_fits_a_small_problem(kind, lr):
    assert overfit_accuracy(kind, lr) > 0.9


def png_size(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_class_dice_plot_with_missing_values_and_one_class(tmp_path):
    rows = [{"class": "liver", "global_dice": 0.91, "per_volume_dice": 0.88},
            {"class": "spleen", "global_dice": None, "per_volume_dice": None},
            {"class": "kidney", "global_dice": 0.7, "per_volume_dice": None}]
    plot_class_dice(rows, tmp_path / "classes.png", "BTCV, linear")
    plot_class_dice(rows[:1], tmp_path / "one.png", "one class")
    many_width, _ = png_size(tmp_path / "classes.png")
    one_width, _ = png_size(tmp_path / "one.png")
    assert many_width >= one_width


@pytest.mark.parametrize("volumes", [1, 500])
def test_volume_dice_plot_from_one_to_500_volumes(tmp_path, volumes):
    rng = np.random.default_rng(0)
    rows = [{"name": f"case_{i:03d}", "dice": float(rng.uniform(0.5, 1)),
             "per_class": {"liver": float(rng.uniform(0.6, 1)), "spleen": None if i % 3 == 0 else 0.8}}
            for i in range(volumes)]
    plot_volume_dice(rows, ["liver", "spleen"], tmp_path / "volumes.png", "per volume")
    width, height = png_size(tmp_path / "volumes.png")
    assert width > height  # three columns side by side


def test_volume_dice_plot_with_one_class_and_no_values(tmp_path):
    rows = [{"name": "a", "dice": None, "per_class": {"lung": None}}]
    plot_volume_dice(rows, ["lung"], tmp_path / "empty.png", "nothing scored")
    assert png_size(tmp_path / "empty.png")[0] > 0


def phantom_maps(size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, columns = np.mgrid[:size, :size]
    image = np.clip(np.random.default_rng(0).normal(0.3, 0.1, (size, size)), 0, 1)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[(rows - 20) ** 2 + (columns - 20) ** 2 < 100] = 1
    truth[(rows - 44) ** 2 + (columns - 40) ** 2 < 80] = 2
    prediction = np.roll(truth, 3, axis=1)
    return image, truth, prediction


def test_overlay_has_three_square_panels_side_by_side(tmp_path):
    image, truth, prediction = phantom_maps()
    write_overlay(image, truth, prediction, {0: "background", 1: "liver", 2: "spleen"},
                  tmp_path / "overlay.png", "case_001 slice 12")
    width, height = png_size(tmp_path / "overlay.png")
    assert 2.3 < width / height < 3.2
    with Image.open(tmp_path / "overlay.png") as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    colourful = (pixels.max(-1) - pixels.min(-1)) > 60  # class colours; the grey image has none
    thirds = np.array_split(colourful, 3, axis=1)
    assert thirds[0].mean() < 0.01 and thirds[1].mean() > 0.01 and thirds[2].mean() > 0.01


def test_overlay_with_one_class_an_unnamed_prediction_and_a_size_mismatch(tmp_path):
    image, truth, prediction = phantom_maps()
    truth = (truth == 1).astype(np.int64)
    prediction = np.where(prediction == 2, 7, prediction)  # a value the class names do not know
    write_overlay(image, truth, prediction, {1: "lung"}, tmp_path / "one.png", "one class")
    assert png_size(tmp_path / "one.png")[0] > 0
    with pytest.raises(ValueError, match="one size"):
        write_overlay(image, truth[:32], prediction, {1: "lung"}, tmp_path / "bad.png", "mismatch")
