"""Intensity handling and model input: CT windows, MR percentiles, min-max, resize, the model's normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedstore.errors import UsageError
from embedstore.intensity import CT_WINDOWS, IntensityConfig
from embedstore.models.embedder import normalize
from embedstore.models.spec import IMAGENET_MEAN, IMAGENET_STD
from embedstore.preprocess import prepare_slices, unit_channels
from embedstore.sources.records import NativeSlices

MODALITIES = ["CT", "MR", None]


def prepared(stack: np.ndarray, modality: str | None, config: IntensityConfig, size: int) -> np.ndarray:
    return prepare_slices(NativeSlices(stack, modality), config, size)[0]


def to_unit_range(stack: np.ndarray, modality: str | None, config: IntensityConfig) -> np.ndarray:
    """(n, H, W) native values → (n, H, W) in [0, 1], as one file's slices are mapped."""
    return unit_channels(NativeSlices(stack, modality), config)[0][:, 0]


def ramp(low: float, high: float, shape: tuple[int, int] = (16, 20)) -> np.ndarray:
    """One (1, H, W) slice whose values run evenly from low to high."""
    return np.linspace(low, high, shape[0] * shape[1], dtype=np.float32).reshape(1, *shape)


def mixed_stack(seed: int = 0) -> np.ndarray:
    """(5, 24, 20) slices unlike each other: HU-like noise, a ramp, a constant, an outlier, negatives."""
    rng = np.random.default_rng(seed)
    stack = rng.normal(0.0, 400.0, size=(5, 24, 20)).astype(np.float32)
    stack[1] = ramp(-3000, 3000, (24, 20))[0]
    stack[2] = 37.0
    stack[3, 5, 7] = 1e6
    stack[4] = -stack[4] - 2000.0
    return stack


# ------------------------------------------------------------------------------- to_unit_range


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("value", [0.0, -1024.0, 5000.0])
def test_constant_slice_becomes_zeros(modality, value):
    stack = np.stack([np.full((12, 10), value, np.float32), ramp(0, 1, (12, 10))[0]])
    pixels = prepared(stack, modality, IntensityConfig(), 28)
    assert not np.isnan(pixels).any()
    assert np.all(pixels[0] == 0.0)
    assert pixels[1].max() > 0.9  # the slice next to it is still spread out


@pytest.mark.parametrize("window", sorted(CT_WINDOWS))
def test_ct_window_clamps_then_spreads(window):
    """A ramp far wider than any window: below the window → 0, above → 1, linear inside."""
    low, high = CT_WINDOWS[window]
    native = ramp(-3000, 3000)
    unit = to_unit_range(native, "CT", IntensityConfig(window=window))
    assert unit.dtype == np.float32 and unit.shape == native.shape
    np.testing.assert_allclose(unit, np.clip((native - low) / (high - low), 0, 1), atol=1e-6)
    assert np.all(unit[native <= low] == 0.0) and np.all(unit[native >= high] == 1.0)


def test_ct_default_window_is_the_study_clamp():
    native = ramp(-3000, 3000)
    default = to_unit_range(native, "CT", IntensityConfig())
    np.testing.assert_array_equal(default, to_unit_range(native, "CT", IntensityConfig(window="study")))
    assert np.all(default[native < -1024] == 0.0) and np.all(default[native > 600] == 1.0)
    lung = to_unit_range(native, "CT", IntensityConfig(window="lung"))
    assert not np.allclose(default, lung, atol=1e-3)
    # without a modality nothing is clamped: the full -3000..3000 range is spread over [0, 1]
    none = to_unit_range(native, None, IntensityConfig())
    np.testing.assert_allclose(none, (native + 3000) / 6000, atol=1e-6)


def outlier_slice() -> np.ndarray:
    image = np.random.default_rng(1).uniform(100.0, 200.0, size=(1, 32, 32)).astype(np.float32)
    image[0, 3, 4] = 1e6
    return image


def test_mr_percentiles_ignore_a_single_outlier():
    native = outlier_slice()
    bulk = np.ones(native.shape, bool)
    bulk[0, 3, 4] = False
    mr = to_unit_range(native, "MR", IntensityConfig())
    raw = to_unit_range(native, None, IntensityConfig())
    low, high = np.percentile(native, (5, 95))
    np.testing.assert_allclose(mr, np.clip((native - low) / (high - low), 0, 1), atol=1e-5)
    assert mr[bulk].min() == 0.0 and mr[bulk].max() == 1.0 and mr[bulk].std() > 0.25
    assert raw[0, 3, 4] == 1.0 and raw[bulk].max() < 1e-3  # the outlier squashes everything else
    wider = to_unit_range(native, "MR", IntensityConfig(mr_percentiles=(0.0, 100.0)))
    np.testing.assert_allclose(wider, raw, atol=1e-6)


# ------------------------------------------------------------------------------ prepare_slices


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("size", [28, 24, 56])  # smaller, equal to the slice height, larger
def test_prepare_slices_shape_and_range(modality, size, interpolation):
    stack = mixed_stack()
    pixels = prepare_slices(NativeSlices(stack, modality), IntensityConfig(), size, interpolation)[0]
    assert pixels.shape == (len(stack), 1, size, size) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all()
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert pixels[1].min() < 0.05 and pixels[1].max() > 0.95  # the ramp keeps its full range


def test_prepare_slices_square_input_of_the_right_size_is_only_scaled():
    native = ramp(-500, 500, (28, 28))
    pixels = prepared(native, None, IntensityConfig(), 28)
    np.testing.assert_allclose(pixels[:, 0], (native + 500) / 1000, atol=1e-6)


def test_prepare_slices_resizes_with_the_interpolation_asked_for_bicubic_by_default():
    native, config = NativeSlices(mixed_stack(seed=3), "CT"), IntensityConfig()
    default = prepare_slices(native, config, 28)[0]
    np.testing.assert_array_equal(default, prepare_slices(native, config, 28, "bicubic")[0])
    assert not np.allclose(default, prepare_slices(native, config, 28, "bilinear")[0], atol=1e-3)


@pytest.mark.parametrize("modality", MODALITIES)
def test_prepare_slices_is_per_slice(modality):
    stack, config = mixed_stack(seed=2), IntensityConfig(window="abdomen")
    together = prepared(stack, modality, config, 28)
    alone = np.concatenate([prepared(stack[i : i + 1], modality, config, 28) for i in range(len(stack))])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    # and the slices really differ, so the comparison above means something
    assert not np.allclose(together[0], together[1], atol=1e-2)


# --------------------------------------------------------------------------------- normalize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # a model whose pretrained_cfg is not ImageNet's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_imagenet_constants():
    assert IMAGENET_MEAN == pytest.approx((0.485, 0.456, 0.406))
    assert IMAGENET_STD == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize("stats", [(IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD)], ids=["imagenet", "clip"])
@pytest.mark.parametrize("channels", [1, 3])
def test_normalize(channels, stats):
    mean_values, std_values = stats
    batch = torch.rand(2, channels, 6, 6, generator=torch.Generator().manual_seed(0))
    normalized = normalize(batch, mean_values, std_values)
    assert normalized.shape == (2, 3, 6, 6)
    mean = torch.tensor(mean_values).view(1, 3, 1, 1)
    std = torch.tensor(std_values).view(1, 3, 1, 1)
    torch.testing.assert_close(normalized * std + mean, batch.expand(-1, 3, -1, -1))
    grey = normalize(torch.full((1, 1, 2, 2), 0.5), mean_values, std_values)
    expected = [(0.5 - m) / s for m, s in zip(mean_values, std_values)]
    torch.testing.assert_close(grey[0, :, 0, 0], torch.tensor(expected))


def test_normalize_uses_the_statistics_it_is_given():
    batch = torch.full((1, 1, 2, 2), 0.5)
    assert not torch.allclose(normalize(batch, IMAGENET_MEAN, IMAGENET_STD), normalize(batch, CLIP_MEAN, CLIP_STD))


# ---------------------------------------------------------------------------- IntensityConfig


@pytest.mark.parametrize(
    "settings, fragment",
    [
        (dict(window="soft_tissue"), "unknown window"),
        (dict(window=""), "unknown window"),
        (dict(mr_percentiles=(95.0, 5.0)), "MR percentiles"),
        (dict(mr_percentiles=(50.0, 50.0)), "MR percentiles"),
        (dict(mr_percentiles=(-1.0, 99.0)), "MR percentiles"),
        (dict(mr_percentiles=(1.0, 101.0)), "MR percentiles"),
    ],
)
def test_intensity_config_rejects(settings, fragment):
    with pytest.raises(UsageError, match=fragment) as caught:
        IntensityConfig(**settings)
    assert "\n" not in str(caught.value)


def model_spec(**changes):
    """A DINOv2 ViT-S/14 spec at 56 px, built without a model, with `changes` applied."""
    from dataclasses import replace

    from embedstore.intensity import PREPROCESS_VERSION
    from embedstore.models.spec import ModelSpec

    spec = ModelSpec(name="dinov2_vits14", timm_name="vit_small_patch14_dinov2.lvd142m", weights_source="random",
                     weights_digest="0123456789ab", weights_file=None, seed=0, image_size=56, patch_size=14,
                     grid_h=4, grid_w=4, num_prefix_tokens=1, embed_dim=384, num_blocks=12, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, interpolation="bicubic", window="auto", mr_percentiles=(5.0, 95.0),
                     preprocess_version=PREPROCESS_VERSION, cls_layers=(8, 9, 10, 11), patch_layers=(11,))
    return replace(spec, **changes)


def test_model_input_tag():
    """The spec's input tag (part of every model_id) tells apart whatever changes the model's input pixels."""
    default = model_spec().input_tag
    assert default == model_spec(window="auto", mr_percentiles=(5.0, 95.0)).input_tag
    assert default.startswith("pp") and "/" not in default and " " not in default
    assert len({model_spec(window=window).input_tag for window in CT_WINDOWS}) == len(CT_WINDOWS)
    assert model_spec(mr_percentiles=(1.0, 99.0)).input_tag != default
    assert model_spec(window="study").input_tag == default  # auto does what study does: the same pixels
    assert model_spec(interpolation="bilinear").input_tag != default
    assert model_spec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).input_tag != default
    # the layers kept change what is stored, not what a vector means
    assert model_spec(cls_layers=(11,), patch_layers=()).model_id == model_spec().model_id
    assert model_spec(window="lung").model_id != model_spec().model_id


@pytest.mark.parametrize("modality", MODALITIES)
def test_non_finite_voxels_become_the_slice_minimum(modality):
    stack = ramp(-500, 500)
    stack = np.concatenate([stack, stack, np.full_like(stack, np.nan)])
    stack[1, 0, :3] = [np.nan, np.inf, -np.inf]
    unit = to_unit_range(stack, modality, IntensityConfig())
    assert np.isfinite(unit).all()
    assert (unit[2] == 0).all()  # nothing finite at all: a blank slice
    np.testing.assert_array_equal(unit[1, 0, :3], unit[1].min())
