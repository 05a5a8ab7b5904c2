"""Models: Meta and timm checkpoint files, seeded random weights, model_id, errors, non-DINOv2 models.

Sources of weights are built here with `build_random` (no download ever happens: the network is
switched off for the whole module). DINOv2's random init has LayerScale gammas of 1e-5, which would
make every block nearly invisible in the output, so source models get O(1) gammas before they are
saved: a checkpoint loaded into the wrong blocks then changes the embeddings visibly.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from embedstore.errors import UsageError
from embedstore.intensity import IntensityConfig
from embedstore.models import weights as weights_module
from embedstore.models.build import LoadedModel, describe, load_model
from embedstore.models.embedder import Embedder
from embedstore.models.registry import resolve_model
from embedstore.models.spec import IMAGENET_MEAN, IMAGENET_STD
from embedstore.models.weights import build_random, weights_digest

META_SIZE = 518  # Meta's DINOv2 checkpoints are trained at 518 px: a 37×37 grid of 14 px patches
SMALL = 56  # 4×4 patches


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails at once."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------------- helpers


def random_pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, size, size), dtype=np.float32)


def source_model(name: str, image_size: int, seed: int) -> torch.nn.Module:
    """A seeded random model whose LayerScale gammas are O(1), so every block matters."""
    model = build_random(resolve_model(name), image_size, seed=seed).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 100)
    for param_name, param in model.named_parameters():
        if param_name.endswith(".gamma"):
            param.copy_(torch.rand(param.shape, generator=generator) * 0.5 + 0.5)
    return model


def as_loaded(name: str, model: torch.nn.Module, image_size: int) -> LoadedModel:
    """Wrap a model built here the way load_model would describe it (default layers and statistics)."""
    spec = describe(resolve_model(name), model, image_size, "file", None, 0, IntensityConfig(), None, None, None, None)
    return LoadedModel(spec, model)


def assert_same_embeddings(expected: LoadedModel, actual: LoadedModel, pixels: np.ndarray) -> None:
    assert (actual.spec.mean, actual.spec.std) == (expected.spec.mean, expected.spec.std)
    assert (actual.spec.cls_layers, actual.spec.patch_layers) == (expected.spec.cls_layers, expected.spec.patch_layers)
    want, got = Embedder(expected).embed(pixels), Embedder(actual).embed(pixels)
    np.testing.assert_allclose(got.cls, want.cls, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.patch_mean, want.patch_mean, rtol=0, atol=1e-5)
    assert got.cls_layers.shape == want.cls_layers.shape == (len(pixels), 4, actual.embed_dim)
    np.testing.assert_allclose(got.cls_layers, want.cls_layers, rtol=0, atol=1e-5)
    assert got.patches.dtype == np.float16
    assert got.patches.shape == want.patches.shape == (len(pixels), 1, actual.num_patches, actual.embed_dim)
    # float16 keeps ~3 significant digits: allow one rounding step either side
    np.testing.assert_allclose(got.patches.astype(np.float32), want.patches.astype(np.float32), rtol=2e-3, atol=2e-3)


def assert_same_state(expected: torch.nn.Module, actual: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert set(got) == set(want)
    for key in sorted(set(want) - set(skip)):
        assert torch.equal(got[key], want[key]), key


def dyadic(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random values on a 1/64 grid: sums and differences of them are exact in float32."""
    return torch.round(torch.randn(shape, generator=generator) * 64) / 64 + 0.0  # + 0.0: no -0.0


# ------------------------------------------------------------------------ Meta DINOv2 checkpoints


def meta_state_dict(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The official Meta DINOv2 layout of a timm DINOv2 model's weights.

    Meta keeps a mask_token and, for register models, `register_tokens` and a position embedding
    that has a row for the CLS token (timm's reg4 models use no_embed_class: that row is folded
    into cls_token). The CLS row is nonzero here, so the fold must really be undone on loading.
    """
    state = {key: value.clone() for key, value in model.state_dict().items()}
    dim = state["cls_token"].shape[-1]
    state["mask_token"] = torch.randn(1, dim, generator=generator)
    if "reg_token" in state:
        cls_position = dyadic((1, 1, dim), generator)
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_position
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
    return state


@dataclass
class MetaCheckpoint:
    name: str
    path: Path
    source: torch.nn.Module
    state: dict[str, torch.Tensor]


@pytest.fixture(scope="module", params=["dinov2_vits14", "dinov2_vits14_reg"])
def meta_checkpoint(request, tmp_path_factory) -> MetaCheckpoint:
    name = request.param
    source = source_model(name, META_SIZE, seed=3)
    generator = torch.Generator().manual_seed(7)
    if source.reg_token is not None:  # make cls_token - cls_position exact, see dyadic()
        source.cls_token.copy_(dyadic(tuple(source.cls_token.shape), generator))
    state = meta_state_dict(source, generator)
    file_name = name.replace("_reg", "_reg4") + "_pretrain.pth"  # Meta's own file names
    path = tmp_path_factory.mktemp("meta") / file_name
    torch.save(state, path)
    return MetaCheckpoint(name, path, source, state)


def test_meta_checkpoint_layout_is_meta(meta_checkpoint):
    """Guards the fixture: the file really is in Meta's format, not timm's."""
    state = torch.load(meta_checkpoint.path, weights_only=True)
    dim = meta_checkpoint.source.embed_dim
    assert state["mask_token"].shape == (1, dim)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, dim)
    assert "reg_token" not in state
    if meta_checkpoint.name.endswith("_reg"):
        assert state["register_tokens"].shape == (1, 4, dim)
        assert meta_checkpoint.source.pos_embed.shape == (1, 37 * 37, dim)
        assert not torch.equal(state["cls_token"], meta_checkpoint.source.cls_token)


@pytest.mark.slow
def test_meta_checkpoint_gives_the_source_embeddings(meta_checkpoint):
    loaded = load_model(meta_checkpoint.name, weights=str(meta_checkpoint.path), image_size=META_SIZE)
    assert loaded.grid == (37, 37) and loaded.embed_dim == meta_checkpoint.source.embed_dim
    assert loaded.num_prefix_tokens == meta_checkpoint.source.num_prefix_tokens
    assert_same_state(meta_checkpoint.source, loaded.model)
    # the digest pins the weights, not the file layout they came in
    assert loaded.spec.weights_tag == f"file-{weights_digest(meta_checkpoint.source)}"
    assert loaded.spec.weights_source == "file" and loaded.spec.weights_file == str(meta_checkpoint.path.resolve())
    expected = as_loaded(meta_checkpoint.name, meta_checkpoint.source, META_SIZE)
    assert_same_embeddings(expected, loaded, random_pixels(2, META_SIZE, seed=1))


def test_meta_checkpoint_pos_embed_resampled_to_image_size(meta_checkpoint):
    loaded = load_model(meta_checkpoint.name, weights=str(meta_checkpoint.path), image_size=224)
    state, model, source = meta_checkpoint.state, loaded.model, meta_checkpoint.source
    assert loaded.grid == (16, 16)
    if meta_checkpoint.name.endswith("_reg"):  # no_embed_class: no prefix rows in timm's pos_embed
        grid_rows, prefix = state["pos_embed"][:, 1:], 0
        assert torch.equal(model.cls_token, source.cls_token)
        assert torch.equal(model.reg_token, source.reg_token)
    else:
        grid_rows, prefix = state["pos_embed"], 1
    expected = resample_abs_pos_embed(
        grid_rows, new_size=(16, 16), num_prefix_tokens=prefix, interpolation="bicubic", antialias=True
    )
    assert model.pos_embed.shape == (1, prefix + 16 * 16, source.embed_dim)
    torch.testing.assert_close(model.pos_embed, expected, rtol=0, atol=1e-6)
    assert_same_state(source, model, skip=("pos_embed",))


# ------------------------------------------------------------------------ timm checkpoint files


def save_timm_checkpoint(model: torch.nn.Module, path: Path, layout: str) -> None:
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    if layout == "safetensors":
        save_file(state, str(path))
    elif layout == "pth":
        torch.save(state, path)
    elif layout == "teacher":  # Meta's DINOv2 training checkpoint: backbone beside the heads
        head = {"dino_head.mlp.0.weight": torch.ones(8, 4), "dino_head.last_layer.weight_g": torch.ones(8, 1)}
        torch.save({"teacher": {**{f"backbone.{key}": value for key, value in state.items()}, **head}}, path)
    else:  # a training checkpoint: wrapped in "state_dict", keys prefixed by DistributedDataParallel
        torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}}, path)


TIMM_LAYOUTS = {"safetensors": "w.safetensors", "pth": "w.pth", "wrapped": "train.pth",
                "teacher": "teacher_checkpoint.pth"}


@pytest.fixture(scope="module")
def timm_checkpoints(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, Path]]:
    source = source_model("dinov2_vits14", SMALL, seed=5)
    folder = tmp_path_factory.mktemp("timm")
    paths = {layout: folder / file_name for layout, file_name in TIMM_LAYOUTS.items()}
    for layout, path in paths.items():
        save_timm_checkpoint(source, path, layout)
    return source, paths


@pytest.mark.parametrize("layout", sorted(TIMM_LAYOUTS))
def test_timm_checkpoint_gives_the_source_embeddings(timm_checkpoints, layout):
    source, paths = timm_checkpoints
    loaded = load_model("dinov2_vits14", weights=str(paths[layout]), image_size=SMALL)
    assert_same_state(source, loaded.model)
    # the same model_id whichever layout the weights came in: the digest is over the weights
    tag = default_input_tag()
    assert loaded.model_id == f"dinov2_vits14-file-{weights_digest(source)}-{SMALL}px-{tag}"
    assert_same_embeddings(as_loaded("dinov2_vits14", source, SMALL), loaded, random_pixels(3, SMALL, seed=2))


# ------------------------------------------------------------------------ seeded random weights


def default_input_tag() -> str:
    """The input tag of DINOv2 ViT-S/14 with the default intensity settings (whatever its weights)."""
    return load_model("dinov2_vits14", weights="random", image_size=SMALL, seed=0).spec.input_tag


def test_random_weights_are_seeded_and_recorded():
    tag = default_input_tag()
    first, again, other = (load_model("dinov2_vits14", weights="random", image_size=SMALL, seed=seed)
                           for seed in (0, 0, 1))
    assert_same_state(first.model, again.model)
    assert first.model_id == again.model_id and first.spec == again.spec
    assert not torch.equal(first.model.patch_embed.proj.weight, other.model.patch_embed.proj.weight)
    assert first.model_id != other.model_id
    model_id = first.model_id
    assert model_id.startswith("dinov2_vits14-random-s0-")
    assert "-56px-" in model_id and model_id.endswith(tag)
    assert "random-s1-" in other.model_id
    assert (first.spec.weights_source, first.spec.seed, other.spec.seed) == ("random", 0, 1)
    bigger = load_model("dinov2_vits14", weights="random", image_size=SMALL + 14, seed=0)
    assert "-70px-" in bigger.model_id and bigger.model_id != model_id
    lung = load_model("dinov2_vits14", weights="random", image_size=SMALL, seed=0, intensity=IntensityConfig(window="lung"))
    assert lung.model_id != model_id and lung.spec.window == "lung"
    # the layers kept change what is stored, not what a vector means: the same model_id
    fewer = load_model("dinov2_vits14", weights="random", image_size=SMALL, seed=0, layers=1, patch_layers=(-2, -1))
    assert fewer.model_id == model_id
    assert (fewer.spec.cls_layers, fewer.spec.patch_layers) == ((11,), (10, 11))


def test_random_weights_leave_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_model("dinov2_vits14", weights="random", image_size=SMALL, seed=9)
    assert torch.equal(torch.rand(4), expected)


# ------------------------------------------------------------------------------------- errors


def write_text_pth(tmp_path, monkeypatch):
    path = tmp_path / "x.pth"
    path.write_text("these are not weights\n")
    return dict(name="dinov2_vits14", weights=str(path), image_size=SMALL)


def write_random_safetensors(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return dict(name="dinov2_vits14", weights=str(path), image_size=SMALL)


def write_tensorless_pth(tmp_path, monkeypatch):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "arch": "vit_small"}, path)
    return dict(name="dinov2_vits14", weights=str(path), image_size=SMALL)


def write_other_architecture(source_name):
    """A complete state dict of `source_name`'s shapes, cheap to make: the architecture is built on
    the meta device and every tensor is one value broadcast (torch.save keeps the 1-element storage)."""

    def write(tmp_path, monkeypatch):
        with torch.device("meta"):
            shapes = {key: value.shape for key, value in
                      weights_module.create_architecture(resolve_model(source_name), SMALL).state_dict().items()}
        path = tmp_path / f"{source_name}.pth"
        torch.save({key: torch.full((), 0.02).expand(shape) for key, shape in shapes.items()}, path)
        return dict(name="dinov2_vits14", weights=str(path), image_size=SMALL)

    return write


def hub_with_empty_cache(tmp_path, monkeypatch):
    """The hub, with nothing cached; the network itself is refused by the `no_network` fixture."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return dict(name="dinov2_vits14", weights="hub", image_size=SMALL)


def hub_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when it is imported, long before this test: set it there too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_with_empty_cache(tmp_path, monkeypatch)


def plain(**arguments):
    """A case that needs no file: load_model's arguments as given."""
    return lambda tmp_path, monkeypatch: arguments


def missing_file(tmp_path, monkeypatch):
    return dict(name="dinov2_vits14", weights=str(tmp_path / "nope.pth"), image_size=SMALL)


ERROR_CASES = [
    pytest.param(plain(name="dinov3_vitq99", weights="random"), "unknown model", id="unknown model"),
    pytest.param(plain(name="dinov2_vits14", weights="random", image_size=225), "225", id="size 225"),
    pytest.param(plain(name="dinov2_vits14", weights="random", image_size=0), "positive multiple", id="size 0"),
    pytest.param(plain(name="vit_tiny_patch16_224", weights="random", image_size=40), "patch size 16",
                 id="size 40 for patch 16"),
    pytest.param(missing_file, "does not exist", id="missing file"),
    pytest.param(write_text_pth, "is not a checkpoint", id="text file as pth"),
    pytest.param(write_random_safetensors, "is not a checkpoint", id="random bytes as safetensors"),
    pytest.param(write_tensorless_pth, "is not a checkpoint", id="pth without tensors"),
    pytest.param(write_other_architecture("dinov2_vitb14"), "does not fit dinov2_vits14", id="vitb14 into vits14"),
    pytest.param(write_other_architecture("dinov2_vits14_reg"), "does not fit dinov2_vits14",
                 id="vits14_reg into vits14"),
    pytest.param(hub_offline, "--weights PATH", id="hub with HF_HUB_OFFLINE"),
    pytest.param(hub_with_empty_cache, "--weights PATH", id="hub without network"),
]


@pytest.mark.parametrize("make_arguments, fragment", ERROR_CASES)
def test_usage_errors_are_single_lines(make_arguments, fragment, tmp_path, monkeypatch):
    arguments = make_arguments(tmp_path, monkeypatch)
    with pytest.raises(UsageError) as caught:
        load_model(**arguments)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message and "\r" not in message


@pytest.mark.parametrize("image_size", [225, 13, -14])
def test_bad_image_size_fails_before_building(image_size, monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("a model was built for an impossible image size")

    monkeypatch.setattr(weights_module, "create_architecture", must_not_build)
    started = time.perf_counter()
    with pytest.raises(UsageError, match="patch size 14"):
        load_model("dinov2_vits14", weights="random", image_size=image_size)
    assert time.perf_counter() - started < 1.0


# ------------------------------------------------------------------------- other timm models


def reference_cls(model: torch.nn.Module, pixels: np.ndarray, mean, std) -> np.ndarray:
    """CLS (ViT) or global-average-pooled features (CNN), computed here without the Embedder."""
    grey = torch.from_numpy(pixels)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        features = model.forward_features((grey.repeat(1, 3, 1, 1) - mean) / std)
    return (features.mean(dim=(2, 3)) if features.ndim == 4 else features[:, 0]).numpy()


@pytest.mark.parametrize(
    "name, image_size, dim, prefix, cls_layers, statistics",
    [("resnet18", 64, 512, 0, (), (IMAGENET_MEAN, IMAGENET_STD)),
     ("vit_tiny_patch16_224", 32, 192, 1, (8, 9, 10, 11), ((0.5,) * 3, (0.5,) * 3))],  # augreg: not ImageNet's
)
def test_other_timm_models(name, image_size, dim, prefix, cls_layers, statistics):
    loaded = load_model(name, weights="random", image_size=image_size, seed=0)
    assert (loaded.embed_dim, loaded.grid, loaded.num_patches, loaded.num_prefix_tokens) == (dim, (2, 2), 4, prefix)
    assert loaded.model_id.startswith(f"{name}-random-s0-")
    # the input statistics come from the model's pretrained_cfg
    assert loaded.spec.mean + loaded.spec.std == pytest.approx(statistics[0] + statistics[1])
    assert loaded.spec.mean == tuple(loaded.model.pretrained_cfg["mean"])
    assert loaded.spec.cls_layers == cls_layers
    pixels = random_pixels(3, image_size, seed=4)
    embeddings = Embedder(loaded).embed(pixels)
    assert embeddings.cls.shape == (3, dim) and embeddings.cls.dtype == np.float32
    assert embeddings.patch_mean.shape == (3, dim)
    assert embeddings.cls_layers.shape == (3, len(cls_layers), dim)
    assert embeddings.patches.shape == (3, 1, 4, dim) and embeddings.patches.dtype == np.float16
    np.testing.assert_allclose(embeddings.cls, reference_cls(loaded.model, pixels, *statistics), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        embeddings.patch_mean, embeddings.patches[:, 0].astype(np.float32).mean(axis=1), rtol=1e-2, atol=1e-2
    )
    assert not np.allclose(embeddings.cls[0], embeddings.cls[1])
    assert Embedder(loaded).embed(pixels, keep_patches=False).patches is None


def test_channels_last_feature_maps_are_read_as_channels():
    """Swin returns (N, h, w, C); patches must come out as (n, h*w, C), not (n, h*C, w)."""
    loaded = load_model("swin_tiny_patch4_window7_224", weights="random", image_size=224, seed=0)
    assert (loaded.embed_dim, loaded.grid, loaded.num_prefix_tokens) == (768, (7, 7), 0)
    embeddings = Embedder(loaded).embed(random_pixels(1, 224, seed=1))
    assert embeddings.patches.shape == (1, 1, 49, 768)
    assert embeddings.cls.shape == (1, 768)
