"""Every model backend of helpers.models, for real, on tiny randomly initialised models that the tests save to
local files: open_clip (architecture JSON + checkpoint file, local-dir:, random weights, pickled checkpoints),
hf_clip (a CLIPModel folder) and eva_clip (a folder whose config.json `auto_map` points at remote code, loaded with
trust_remote_code as EVA-CLIP is). Tags and hub ids are checked offline: they must fail at once, with a message
that says what is missing, where it was looked for and how to give a local copy.

The tests parametrized over `helpers.models.BACKENDS` need a `<backend>_dir` fixture and an `EMBED_DIM` entry for
each backend, so a backend added without tests fails here.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, dynamic_module_utils
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from helpers import config as config_module
from helpers import models
from helpers.config import ConfigError, ModelEntry, config_from_dict
from helpers.data import OPENAI_MEAN
from helpers.models import BACKENDS, ModelHandle, WeightsUnavailableError

from .conftest import TINY_ARCH, save_open_clip_checkpoint
from .fixtures.tiny_eva import TinyEvaConfig, TinyEvaModel

PIXELS = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
TEXTS = ["a photo of a glacier.", "a busy street"]
EMBED_DIM = {"open_clip": TINY_ARCH["embed_dim"], "hf_clip": 16, "eva_clip": 16}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def make_handle(backend: str, pretrained, **fields) -> ModelHandle:
    return ModelHandle("m", ModelEntry(backend=backend, pretrained=str(pretrained), **fields), device="cpu")


def load(handle: ModelHandle) -> models.Encoder:
    return handle.encoder


def unit(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    return x / x.norm(dim=-1, keepdim=True)


def assert_unit_features(x: torch.Tensor, shape: tuple[int, int]) -> None:
    assert x.dtype == torch.float32
    assert tuple(x.shape) == shape
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(shape[0]))
    assert not torch.allclose(x[0], x[1]), "different inputs should give different features"


# --- tiny models ------------------------------------------------------------------------------------------------


def tiny_open_clip(arch_file: Path, seed: int) -> torch.nn.Module:
    """The model that conftest's save_open_clip_checkpoint(arch_file, seed, ...) saves, rebuilt in memory."""
    open_clip.add_model_config(arch_file)
    torch.manual_seed(seed)
    return open_clip.create_model(arch_file.stem).eval()


def tiny_clip_config(tokenizer: CLIPTokenizer, image_size: int = 224) -> CLIPConfig:
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**layers, "vocab_size": len(tokenizer), "max_position_embeddings": 77, "bos_token_id":
            tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return CLIPConfig(text_config=text, vision_config={**layers, "image_size": image_size, "patch_size": 32},
                      projection_dim=EMBED_DIM["hf_clip"])


def tiny_hf_clip(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(tokenizer)).eval()


def tiny_eva(seed: int = 0) -> TinyEvaModel:
    torch.manual_seed(seed)
    return TinyEvaModel(TinyEvaConfig(embed_dim=EMBED_DIM["eva_clip"])).eval()


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    """A CLIPTokenizer without merges: every byte-level character, alone and word-final, plus the two specials."""
    folder = tmp_path_factory.mktemp("tokenizer")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="session")
def open_clip_dir(tmp_path_factory, tiny_arch) -> Path:
    """A local-dir: folder of the tiny architecture (seed 3), with its own normalisation."""
    folder = tmp_path_factory.mktemp("open_clip_dir")
    schema = {"model_cfg": TINY_ARCH, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(schema))
    save_open_clip_checkpoint(tiny_arch, 3, folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory, clip_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("hf_clip_dir")
    tiny_hf_clip(clip_tokenizer).save_pretrained(folder)
    clip_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def eva_clip_dir(tmp_path_factory, clip_tokenizer) -> Path:
    """tiny_eva.py is copied into the folder and named in config.json's auto_map; transformers imports it from its
    modules cache, redirected here to a temporary folder."""
    folder = tmp_path_factory.mktemp("eva_clip_dir")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        TinyEvaConfig.register_for_auto_class()
        TinyEvaModel.register_for_auto_class("AutoModel")
        tiny_eva().save_pretrained(folder)
        clip_tokenizer.save_pretrained(folder)
        yield folder


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """No network, and an empty hub cache (returned)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_reachable", {})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_model_building(monkeypatch):
    """Fail if open_clip builds a model (a 2.5B one would take minutes before failing on the weights)."""

    def refuse(*args, **kwargs):
        raise AssertionError("open_clip.create_model was called")

    monkeypatch.setattr(open_clip, "create_model", refuse)


def entry_for(backend: str, request) -> ModelEntry:
    """The tiny saved model of `backend`, as a run config would name it."""
    folder = request.getfixturevalue(f"{backend}_dir")
    return ModelEntry(backend=backend, pretrained=f"local-dir:{folder}" if backend == "open_clip" else str(folder))


# --- every backend ----------------------------------------------------------------------------------------------


def test_config_and_models_know_the_same_backends():
    assert set(config_module.BACKENDS) == set(BACKENDS)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_features_are_unit_float32(backend, request):
    handle = ModelHandle("m", entry_for(backend, request), device="cpu")
    images, texts = handle.encoder.encode_images(PIXELS), handle.encoder.encode_texts(TEXTS)
    assert handle.loaded
    assert_unit_features(images, (2, EMBED_DIM[backend]))
    assert_unit_features(texts, (2, EMBED_DIM[backend]))
    torch.testing.assert_close(handle.encoder.encode_images(PIXELS), images, rtol=0, atol=0)
    handle.close()
    assert not handle.loaded


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_identity_and_preprocess_do_not_load_the_model(backend, request):
    entry = entry_for(backend, request)
    handle = ModelHandle("m", entry, device="cpu")
    identity, preprocess = handle.identity, handle.views[0]
    assert not handle.loaded
    assert identity["backend"] == backend and identity["precision"] == "fp32"
    weights = [name for name in identity["files"] if name.endswith((".bin", ".safetensors"))]
    assert weights, "the cache identity must stamp the weights file itself, not only its folder"
    assert preprocess.size == 224
    assert handle.identity == identity and handle.views == [preprocess]


def _open_clip_config_only(folder: Path) -> ModelEntry:
    arch = {**TINY_ARCH, "vision_cfg": {**TINY_ARCH["vision_cfg"], "image_size": 96}}
    schema = {"model_cfg": arch, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(schema))
    return ModelEntry(backend="open_clip", pretrained=f"local-dir:{folder}")


def _transformers_config_only(backend: str, config: dict, folder: Path) -> ModelEntry:
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return ModelEntry(backend=backend, pretrained=str(folder), precision="fp16")


CONFIG_ONLY = {  # a model folder whose config says image_size 96, with no weights and no code
    "open_clip": _open_clip_config_only,
    "hf_clip": lambda folder: _transformers_config_only(
        "hf_clip", {"model_type": "clip", "vision_config": {"image_size": 96, "patch_size": 32}}, folder),
    "eva_clip": lambda folder: _transformers_config_only(
        "eva_clip", {"model_type": "tiny_eva", "vision_config": {"image_size": 96}}, folder),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_preprocess_comes_from_the_model_config(backend, tmp_path):
    handle = ModelHandle("m", CONFIG_ONLY[backend](tmp_path), device="cpu")
    preprocess = handle.views[0]
    assert (preprocess.size, preprocess.mean, preprocess.std) == (96, MEAN, STD)
    assert handle.identity["precision"] == handle.entry.precision
    assert not handle.loaded


# --- open_clip --------------------------------------------------------------------------------------------------


def test_open_clip_checkpoint_file_gives_the_saved_models_features(tiny_arch, tiny_checkpoints):
    handle = make_handle("open_clip", tiny_checkpoints[0], arch=str(tiny_arch))
    reference = tiny_open_clip(tiny_arch, seed=1)  # conftest saved checkpoint a with seed 1
    with torch.no_grad():
        expected_images = unit(reference.encode_image(PIXELS))
        expected_texts = unit(reference.encode_text(open_clip.get_tokenizer(tiny_arch.stem)(TEXTS)))
    torch.testing.assert_close(handle.encoder.encode_images(PIXELS), expected_images)
    torch.testing.assert_close(handle.encoder.encode_texts(TEXTS), expected_texts)
    assert not handle.random_weights
    assert handle.identity["files"] == {tiny_checkpoints[0].name: [tiny_checkpoints[0].stat().st_size,
                                                                    tiny_checkpoints[0].stat().st_mtime_ns]}


def test_open_clip_local_dir_loads_its_weights_and_preprocessing(open_clip_dir, tiny_arch):
    handle = make_handle("open_clip", f"local-dir:{open_clip_dir}")
    assert (handle.views[0].mean, handle.views[0].std) == (MEAN, STD)
    with torch.no_grad():
        expected = unit(tiny_open_clip(tiny_arch, seed=3).encode_image(PIXELS))
    torch.testing.assert_close(handle.encoder.encode_images(PIXELS), expected)


def test_open_clip_local_dir_without_weights_is_an_error(tmp_path):
    handle = ModelHandle("m", _open_clip_config_only(tmp_path), device="cpu")
    with pytest.raises(WeightsUnavailableError, match=f"{re.escape(str(tmp_path))} has no weights"):
        load(handle)
    assert not handle.loaded


def test_open_clip_random_weights_follow_the_seed(tiny_arch):
    def features(seed):
        handle = make_handle("open_clip", "random", arch=str(tiny_arch), seed=seed)
        assert handle.random_weights and handle.identity["seed"] == seed
        return handle.encoder.encode_images(PIXELS)

    first = features(7)
    torch.randn(3)  # the global random state in between must not matter
    torch.testing.assert_close(features(7), first, rtol=0, atol=0)
    assert not torch.allclose(features(8), first)


@pytest.mark.parametrize("arch,tag,repo", [
    ("ViT-B-32-quickgelu", "metaclip_fullcc", "timm/vit_base_patch32_clip_224.metaclip_2pt5b"),
    ("ViT-bigG-14-quickgelu", "metaclip_2_5b", "timm/vit_gigantic_patch14_clip_224.metaclip_2pt5b"),
])
def test_open_clip_tag_fails_fast_offline(arch, tag, repo, offline, no_model_building):
    handle = make_handle("open_clip", tag, arch=arch)
    assert handle.identity["pretrained"] == "metaclip_fullcc"  # the alias names the same weights
    assert (handle.views[0].size, handle.views[0].mean) == (224, OPENAI_MEAN)  # no weights needed for these
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as error:
        load(handle)
    assert time.perf_counter() - start < 2
    message = str(error.value)
    for part in (f"{arch} '{tag}'", "metaclip_fullcc", repo, str(offline), "pretrained: /path/to/", "local-dir:"):
        assert part in message


def test_open_clip_unknown_tag_lists_the_known_ones(no_model_building):
    with pytest.raises(ValueError, match="'metaclip_3b' is neither a file nor an open_clip tag") as error:
        load(make_handle("open_clip", "metaclip_3b", arch="ViT-B-32-quickgelu"))
    assert "openai" in str(error.value) and "metaclip_fullcc" in str(error.value)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load(make_handle("open_clip", "/nowhere/G14_fullcc2.5b.pt", arch="ViT-B-32-quickgelu"))


class TrainingState:
    """Stands in for the objects a training script pickles next to the weights."""

    epoch = 32


PICKLED_EXTRAS = {
    "argparse-namespace": lambda: {"args": argparse.Namespace(model="ViT-bigG-14-quickgelu", epochs=32)},
    "custom-class": lambda: {"state": TrainingState()},
}


@pytest.mark.parametrize("extra", list(PICKLED_EXTRAS))
@pytest.mark.parametrize("layout", ["file", "local-dir"])
def test_open_clip_pickled_checkpoint_needs_weights_only_false(extra, layout, tiny_arch, tmp_path):
    reference = tiny_open_clip(tiny_arch, seed=5)
    if layout == "file":
        path, fields = tmp_path / "G14_fullcc2.5b.pt", {"pretrained": str(tmp_path / "G14_fullcc2.5b.pt"),
                                                         "arch": str(tiny_arch)}
    else:
        path, fields = tmp_path / "open_clip_pytorch_model.bin", {"pretrained": f"local-dir:{tmp_path}"}
        (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_ARCH}))
    torch.save({"state_dict": reference.state_dict(), **PICKLED_EXTRAS[extra]()}, path)

    with pytest.raises(WeightsUnavailableError, match="set `weights_only: false`") as error:
        load(ModelHandle("m", ModelEntry(backend="open_clip", **fields), device="cpu"))
    assert str(tmp_path) in str(error.value)

    handle = ModelHandle("m", ModelEntry(backend="open_clip", weights_only=False, **fields), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(handle.encoder.encode_images(PIXELS), unit(reference.encode_image(PIXELS)))


# --- hf_clip ----------------------------------------------------------------------------------------------------


def test_hf_clip_gives_clipmodels_features(hf_clip_dir, clip_tokenizer):
    handle = make_handle("hf_clip", hf_clip_dir)
    reference = tiny_hf_clip(clip_tokenizer)
    with torch.no_grad():
        expected_images = unit(reference.get_image_features(pixel_values=PIXELS))
        expected_texts = unit(reference.get_text_features(**clip_tokenizer(TEXTS, padding=True, return_tensors="pt")))
    torch.testing.assert_close(handle.encoder.encode_images(PIXELS), expected_images)
    torch.testing.assert_close(handle.encoder.encode_texts(TEXTS), expected_texts)


def test_hf_clip_refuses_random_weights():
    with pytest.raises(ValueError, match="no architecture to initialise randomly"):
        load(make_handle("hf_clip", "random"))


# --- eva_clip ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_eva_clip_runs_the_remote_code(eva_clip_dir, clip_tokenizer, precision):
    handle = make_handle("eva_clip", eva_clip_dir, precision=precision)
    images, texts = handle.encoder.encode_images(PIXELS), handle.encoder.encode_texts(TEXTS)
    model = handle.encoder.model
    assert type(model).__module__.startswith("transformers_modules.") and type(model) is not TinyEvaModel
    assert model.patch_embed.weight.dtype == models.DTYPES[precision]
    assert_unit_features(images, (2, EMBED_DIM["eva_clip"]))
    assert_unit_features(texts, (2, EMBED_DIM["eva_clip"]))

    reference = tiny_eva()
    ids = clip_tokenizer(TEXTS, padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected_images, expected_texts = unit(reference.encode_image(PIXELS)), unit(reference.encode_text(ids))
        by_hand = unit(model.encode_image(PIXELS.to(model.dtype)))
    tolerance = {"rtol": 0, "atol": 1e-6} if precision == "fp32" else {"rtol": 0, "atol": 5e-3}
    torch.testing.assert_close(images, by_hand, **tolerance)
    torch.testing.assert_close(images, expected_images, **tolerance)
    torch.testing.assert_close(texts, expected_texts, **tolerance)


def test_eva_clip_hub_id_needs_a_revision(tmp_path):
    raw = {"name": "t", "data": {"test": str(tmp_path)},
           "models": {"eva": {"backend": "eva_clip", "pretrained": "BAAI/EVA-CLIP-8B", "precision": "fp16"}}}
    with pytest.raises(ConfigError, match=r"models\.eva\.revision is required"):
        config_from_dict(raw)
    raw["models"]["eva"]["revision"] = "0123456789abcdef0123456789abcdef01234567"
    assert config_from_dict(raw).models["eva"].revision == raw["models"]["eva"]["revision"]


@pytest.mark.parametrize("backend,repo,revision", [
    ("eva_clip", "BAAI/EVA-CLIP-8B", "0123456789abcdef0123456789abcdef01234567"),
    ("hf_clip", "openai/clip-vit-base-patch32", None),
])
def test_hub_id_fails_fast_offline(backend, repo, revision, offline):
    handle = make_handle(backend, repo, revision=revision)
    start = time.perf_counter()
    for step in ("views", "encoder"):
        with pytest.raises(WeightsUnavailableError) as error:
            getattr(handle, step)
        message = str(error.value)
        for part in (f"'{repo}' at revision {revision or 'main'}", str(offline), "pretrained: /path/to/model-folder"):
            assert part in message
    assert time.perf_counter() - start < 2
    assert not handle.loaded
