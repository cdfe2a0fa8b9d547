"""Every model backend of helpers.models, for real, on tiny randomly initialised models that the tests save to
local files: open_clip (architecture JSON + checkpoint file, local-dir:, random weights, pickled checkpoints),
hf_clip (a CLIPModel folder) and eva_clip (EVA-CLIP-18B's own remote code at tiny sizes, named in config.json's
`auto_map` and loaded with trust_remote_code: tests/fixtures/eva_clip.py; its own tests in tests/test_eva_clip.py).
Tags and hub ids are checked offline: they must fail at once, with a message that says what is missing, where it
was looked for and how to give a local copy. Unusable model files (not a checkpoint, cut short, of another
architecture, malformed JSON, a folder, unreadable) fail on one line that names the setting, the file, what is wrong
and what to do; before any work wherever the file itself shows it. hf_clip and
eva_clip load straight onto their devices (a device map always, safetensors only where there are safetensors), and
every encoder records where each part of the model went, what the weights were read from and how long it took.

The tests parametrized over `helpers.models.BACKENDS` need a `<backend>_dir` fixture and an `EMBED_DIM` entry for
each backend, so a backend added without tests fails here.
"""

from __future__ import annotations

import argparse
import builtins
import copy
import errno
import gc
import io
import json
import logging
import random
import re
import shutil
import time
import weakref
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, PreTrainedModel
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from helpers import models
from helpers.config import ConfigError, ModelEntry, config_from_dict
from helpers.models import BACKENDS, ModelHandle, WeightsUnavailableError
from helpers.research.steps import OPENAI_MEAN

from .conftest import TINY_ARCH, save_open_clip_checkpoint

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


def one_line_error(call) -> str:
    with pytest.raises(WeightsUnavailableError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def before_and_at_load(handle: ModelHandle) -> list[str]:
    """The errors of check_weights (what a run does before any work) and of loading the model."""
    return [one_line_error(handle.check_weights), one_line_error(lambda: load(handle))]


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
def hf_clip_bin_dir(tmp_path_factory, clip_tokenizer) -> Path:
    """The hf_clip_dir model saved as torch.save files (pytorch_model.bin), as older hub repos are."""
    folder = tmp_path_factory.mktemp("hf_clip_bin_dir")
    tiny_hf_clip(clip_tokenizer).save_pretrained(folder, safe_serialization=False)
    clip_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """No network, and an empty hub cache (returned)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models.checkpoints, "_reachable", {})
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
        "eva_clip", {"model_type": "clip", "vision_config": {"image_size": 96}}, folder),
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

    handle = ModelHandle("m", ModelEntry(backend="open_clip", **fields), device="cpu")
    handle.check_weights()  # a zip archive like any other: only unpickling it finds the globals
    message = one_line_error(lambda: load(handle))
    assert message.startswith(f"models.m.pretrained: {path} is a pickled checkpoint that torch will not load with "
                              f"weights_only=True (Unsupported global: GLOBAL ")
    assert message.endswith("If you trust the file, set `weights_only: false` in models.m")

    handle = ModelHandle("m", ModelEntry(backend="open_clip", weights_only=False, **fields), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(handle.encoder.encode_images(PIXELS), unit(reference.encode_image(PIXELS)))


# --- unusable model files: one line that names the setting, the file, what is wrong and what to do ---------------



NOT_CHECKPOINTS = {
    "random-bytes": random.Random(0).randbytes(4096),  # seeded: os.urandom may start like a pickle, 1 time in 256
    "empty": b"",
}


@pytest.mark.parametrize("content", list(NOT_CHECKPOINTS))
def test_open_clip_file_that_is_no_checkpoint(content, tiny_arch, tmp_path, no_model_building):
    path = tmp_path / "x.pt"
    path.write_bytes(NOT_CHECKPOINTS[content])
    for message in before_and_at_load(make_handle("open_clip", path, arch=str(tiny_arch))):
        assert message == (f"models.m.pretrained: {path} is not a readable checkpoint (neither a torch checkpoint, a "
                           f"pickle nor safetensors): check that the file is complete and is the model's weights")


def test_open_clip_checkpoint_cut_short(tiny_arch, tiny_checkpoints, tmp_path, no_model_building):
    data = tiny_checkpoints[0].read_bytes()
    path = tmp_path / "a.pt"
    path.write_bytes(data[:len(data) // 2])
    for message in before_and_at_load(make_handle("open_clip", path, arch=str(tiny_arch))):
        assert message.startswith(f"models.m.pretrained: {path} is not a readable checkpoint (")
        assert message.endswith("): it may be truncated; download or copy it again")


def _damaged_zip_record(data: bytes) -> bytes:
    """The checkpoint with the local header of its first tensor's record broken; its directory and pickle intact."""
    start = data.rfind(b"PK\x03\x04", 0, data.index(b"/data/0"))
    return data[:start] + b"XXXX" + data[start + 4:]


def _legacy(data: bytes) -> bytes:
    """The checkpoint in torch.save's pre-zip format: pickles (a short header, then the state dict), then the tensors'
    bytes."""
    buffer = io.BytesIO()
    torch.save(torch.load(io.BytesIO(data)), buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@pytest.mark.parametrize("damage,reason", [
    (_damaged_zip_record, "PytorchStreamReader failed reading file data/0"),
    (lambda data: _legacy(data)[:len(_legacy(data)) // 2], "unexpected EOF"),  # cut in the tensors
    (lambda data: _legacy(data)[:100], "EOFError"),  # cut in its header
], ids=["damaged-zip-record", "legacy-cut-in-tensors", "legacy-cut-in-pickle"])
def test_open_clip_checkpoint_torch_cannot_read(damage, reason, tiny_arch, tiny_checkpoints, tmp_path):
    """Damage found only by reading the tensors: check_weights passes, loading fails on one line."""
    path = tmp_path / "a.pt"
    path.write_bytes(damage(tiny_checkpoints[0].read_bytes()))
    handle = make_handle("open_clip", path, arch=str(tiny_arch))
    handle.check_weights()
    message = one_line_error(lambda: load(handle))
    assert message.startswith(f"models.m.pretrained: {path} is not a readable checkpoint ({reason}")
    assert message.endswith("): it may be truncated; download or copy it again")


ARCH_CHANGES = {  # the tiny checkpoint (embed_dim 32, 2 layers per tower) under another architecture
    "deeper-narrower": ({"embed_dim": 16, "vision_layers": 3},
                        "12 missing keys (e.g. visual.transformer.resblocks.2.ln_1.weight), 0 unexpected, 2 of other "
                        "shapes (e.g. text_projection [64, 32] in the file, [64, 16] in the model)"),
    "shallower": ({"vision_layers": 1},
                  "0 missing keys, 12 unexpected (e.g. visual.transformer.resblocks.1.ln_1.weight), 0 of other shapes"),
}


@pytest.mark.parametrize("layout", ["file", "local-dir"])
@pytest.mark.parametrize("change", list(ARCH_CHANGES))
def test_open_clip_checkpoint_of_another_architecture(change, layout, tiny_checkpoints, tmp_path):
    fields, counts = ARCH_CHANGES[change]
    arch = {**TINY_ARCH, "embed_dim": fields.get("embed_dim", TINY_ARCH["embed_dim"]),
            "vision_cfg": {**TINY_ARCH["vision_cfg"], "layers": fields["vision_layers"]}}
    if layout == "file":
        arch_file, weights = tmp_path / f"tiny-{change}.json", tiny_checkpoints[0]
        arch_file.write_text(json.dumps(arch))
        handle = make_handle("open_clip", weights, arch=str(arch_file))
        what, fix = str(arch_file), "models.m.arch"
    else:
        (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch}))
        weights = tmp_path / "open_clip_pytorch_model.bin"
        weights.write_bytes(tiny_checkpoints[0].read_bytes())
        handle = make_handle("open_clip", f"local-dir:{tmp_path}")
        what, fix = "its model_cfg", f"the model_cfg of {tmp_path / 'open_clip_config.json'}"
    handle.check_weights()  # the mismatch shows only when the weights meet the model
    assert one_line_error(lambda: load(handle)) == (
        f"models.m.pretrained: {weights} does not fit architecture {what}: {counts}; check {fix}")


BAD_ARCH_FILES = {
    "malformed": ('{"embed_dim": 32,\n  "vision_cfg": {', "is not valid JSON (Expecting property name enclosed in "
                                                        "double quotes: line 2 column 18 (char 35))"),
    "no-architecture": ('{"model": "ViT-B-32"}',
                        "is not an open_clip architecture (no embed_dim, vision_cfg, text_cfg)"),
    "not-an-object": ("[32]", "is not an open_clip architecture (not a JSON object)"),
}


@pytest.mark.parametrize("content", list(BAD_ARCH_FILES))
def test_open_clip_arch_file_that_is_no_architecture(content, tiny_arch, tiny_checkpoints, tmp_path,
                                                     no_model_building):
    text, problem = BAD_ARCH_FILES[content]
    arch = tmp_path / f"bad-{content}.json"
    arch.write_text(text)
    handle = make_handle("open_clip", tiny_checkpoints[0], arch=str(arch))
    for step in (lambda: handle.views, handle.check_weights, lambda: load(handle)):
        assert one_line_error(step).startswith(f"models.m.arch: {arch} {problem}")
    open_clip.add_model_config(tiny_arch)  # open_clip rereads every added file: the bad one was never added
    assert make_handle("open_clip", tiny_checkpoints[0], arch=str(tiny_arch)).views[0].size == 224


MODEL_CONFIG_FILE = {"open_clip": "open_clip_config.json", "hf_clip": "config.json", "eva_clip": "config.json"}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_malformed_model_config_json_says_where(backend, tmp_path):
    entry = CONFIG_ONLY[backend](tmp_path)
    path = tmp_path / MODEL_CONFIG_FILE[backend]
    path.write_text('{\n  "model_cfg": {"embed_dim": 32}\n  "preprocess_cfg": {}\n}')
    handle = ModelHandle("m", entry, device="cpu")
    for step in (lambda: handle.views, handle.check_weights):
        assert one_line_error(step) == (f"models.m.pretrained: {path} is not valid JSON (Expecting ',' delimiter: "
                                        f"line 3 column 3 (char 37)): fix or replace the file")


@pytest.mark.parametrize("schema,problem", [
    ({"preprocess_cfg": {}}, "{path} has no model_cfg (the architecture)"),
    ({"model_cfg": {"embed_dim": 32}}, "the model_cfg of {path} is not an open_clip architecture (no vision_cfg, "
                                       "text_cfg)"),
])
def test_open_clip_local_dir_config_without_architecture(schema, problem, tmp_path):
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps(schema))
    handle = make_handle("open_clip", f"local-dir:{tmp_path}")
    assert one_line_error(handle.check_weights).startswith(f"models.m.pretrained: {problem.format(path=path)}")


def test_open_clip_folder_needs_local_dir(open_clip_dir, tiny_arch, no_model_building):
    for message in before_and_at_load(make_handle("open_clip", open_clip_dir, arch=str(tiny_arch))):
        assert message.startswith(f"models.m.pretrained: {open_clip_dir} is a folder, not a checkpoint file")
        assert f"write `pretrained: local-dir:{open_clip_dir}`" in message


def test_open_clip_unreadable_checkpoint(tiny_arch, tiny_checkpoints, monkeypatch, no_model_building):
    """Tests run as root, whom chmod does not stop: the refusal is simulated."""
    path = tiny_checkpoints[0]
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    for message in before_and_at_load(make_handle("open_clip", path, arch=str(tiny_arch))):
        assert message.startswith(f"models.m.pretrained: {path}: permission denied: make it readable")


def _safetensors_of(checkpoint: Path) -> bytes:
    return safetensors.torch.save(torch.load(checkpoint))


SAFETENSORS_CASES = {  # file name, its bytes, what the error says (None: it loads)
    "complete": ("a.safetensors", _safetensors_of, None),
    "cut-short": ("a.safetensors", lambda c: _safetensors_of(c)[:-1000],
                  "is not a readable checkpoint (Error while deserializing header: incomplete metadata, file not fully "
                  "covered): it may be truncated; download or copy it again"),
    "safetensors-named-bin": ("a.bin", _safetensors_of, "is a safetensors file, which open_clip reads only under a "
                                                        ".safetensors name: rename it"),
    "torch-named-safetensors": ("a.safetensors", Path.read_bytes, "is a torch checkpoint, not safetensors: rename "
                                                                  "it (e.g. .pt)"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_open_clip_safetensors_checkpoint(case, tiny_arch, tiny_checkpoints, tmp_path):
    name, content, problem = SAFETENSORS_CASES[case]
    path = tmp_path / name
    path.write_bytes(content(tiny_checkpoints[0]))
    handle = make_handle("open_clip", path, arch=str(tiny_arch))
    if problem is None:
        handle.check_weights()
        with torch.no_grad():
            expected = unit(tiny_open_clip(tiny_arch, seed=1).encode_image(PIXELS))
        torch.testing.assert_close(handle.encoder.encode_images(PIXELS), expected)
    else:
        assert one_line_error(handle.check_weights) == f"models.m.pretrained: {path} {problem}"


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


# --- eva_clip (its real remote code: tests/test_eva_clip.py) -------------------------------------------------------


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


# --- loading straight to the devices, and the placement record --------------------------------------------------

TRANSFORMERS_BACKENDS = ["hf_clip", "eva_clip"]
WEIGHTS_FORMAT = {"open_clip": "pytorch", "hf_clip": "safetensors", "eva_clip": "safetensors"}


class Stop(Exception):
    """Raised by the from_pretrained spy to end a load once its arguments are seen."""


class FromPretrainedSpy:
    """The keyword arguments of every model's from_pretrained (CLIPModel's and the remote code's alike), as passed;
    with `stop`, the load ends there."""

    def __init__(self):
        self.calls: list[dict] = []
        self.stop = False


@pytest.fixture
def from_pretrained(monkeypatch) -> FromPretrainedSpy:
    seen = FromPretrainedSpy()
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.calls.append(copy.deepcopy(kwargs))  # before accelerate rewrites max_memory in place
        if seen.stop:
            raise Stop
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    return seen


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_encoder_records_how_it_was_loaded(backend, request):
    encoder = ModelHandle("m", entry_for(backend, request), device="cpu").encoder
    assert encoder.placement == {"": "cpu"} and encoder.device == torch.device("cpu")
    assert encoder.weights_format == WEIGHTS_FORMAT[backend]
    assert isinstance(encoder.load_seconds, float) and 0 <= encoder.load_seconds < 60
    record = {"placement": encoder.placement, "weights_format": encoder.weights_format,
              "load_seconds": encoder.load_seconds}
    assert json.loads(json.dumps(record)) == record


@pytest.mark.parametrize("backend", TRANSFORMERS_BACKENDS)
def test_safetensors_load_straight_to_the_device_and_never_read_a_bin(backend, request, tmp_path,
                                                                      from_pretrained):
    """A pytorch_model.bin beside the safetensors (here not even a checkpoint) is never read."""
    folder = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(f"{backend}_dir"), folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    handle = make_handle(backend, folder)
    plain = make_handle(backend, request.getfixturevalue(f"{backend}_dir"))
    torch.testing.assert_close(handle.encoder.encode_images(PIXELS), plain.encoder.encode_images(PIXELS),
                               rtol=0, atol=0)
    torch.testing.assert_close(handle.encoder.encode_texts(TEXTS), plain.encoder.encode_texts(TEXTS), rtol=0, atol=0)
    kwargs = from_pretrained.calls[0]
    assert kwargs["device_map"] == {"": "cpu"}  # each tensor made on its device, no CPU copy first
    assert kwargs["low_cpu_mem_usage"] is True and kwargs["use_safetensors"] is True
    assert kwargs["dtype"] == torch.float32 and "max_memory" not in kwargs
    assert handle.encoder.placement == {"": "cpu"} and handle.encoder.weights_format == "safetensors"


def test_pytorch_weights_load_without_use_safetensors(hf_clip_bin_dir, hf_clip_dir, from_pretrained):
    assert not list(hf_clip_bin_dir.glob("*.safetensors"))
    handle = make_handle("hf_clip", hf_clip_bin_dir)
    torch.testing.assert_close(handle.encoder.encode_images(PIXELS),
                               make_handle("hf_clip", hf_clip_dir).encoder.encode_images(PIXELS), rtol=0, atol=0)
    assert "use_safetensors" not in from_pretrained.calls[0]
    assert from_pretrained.calls[0]["device_map"] == {"": "cpu"}
    assert handle.encoder.weights_format == "pytorch" and handle.encoder.placement == {"": "cpu"}


@pytest.mark.parametrize("backend", TRANSFORMERS_BACKENDS)
@pytest.mark.parametrize("device_map", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_device_map_and_max_memory_reach_from_pretrained(backend, device_map, request, from_pretrained, caplog):
    """What a two-GPU machine would be given (stopped before loading: there are no GPUs here): the strategy's map,
    built by the workbench and printed (tests/test_placement.py: at EVA-CLIP-18B's full sizes)."""
    entry = config_from_dict({
        "name": "t", "data": {"test": "/x"},
        "models": {"m": {"backend": backend, "pretrained": str(request.getfixturevalue(f"{backend}_dir")),
                         "device_map": device_map, "max_memory": {0: "70GiB", "1": "70GiB", "cpu": "100GiB"}}},
    }).models["m"]
    assert entry.max_memory == {"0": "70GiB", "1": "70GiB", "cpu": "100GiB"}
    from_pretrained.stop = True
    with pytest.raises(Stop), caplog.at_level(logging.INFO, logger="helpers"):
        load(ModelHandle("m", entry, device="cpu"))
    kwargs = from_pretrained.calls[0]
    planned = ModelHandle("m", entry, device="cpu").backend.placement(kwargs["max_memory"])
    assert kwargs["device_map"] == planned.device_map and set(planned.device_map.values()) <= {0, 1}
    assert f"models.m: {planned.describe()}" in caplog.messages
    assert kwargs["max_memory"] == {0: "70GiB", 1: "70GiB", "cpu": "100GiB"}
    assert kwargs["low_cpu_mem_usage"] is True and kwargs["use_safetensors"] is True
    assert entry.max_memory == {"0": "70GiB", "1": "70GiB", "cpu": "100GiB"}, "the entry itself is left as it was"


def cpu_budget(folder: Path, share: float) -> str:
    """A CPU max_memory that holds `share` of the tiny model's weights."""
    return f"{int((folder / 'model.safetensors').stat().st_size * share / 1000)}KB"


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match any submodules")
def test_auto_device_map_spreads_the_model_over_cpu_and_disk(hf_clip_dir, from_pretrained):
    """On the CPU, a max_memory smaller than the model spreads it over "cpu" and "disk" (read back from the
    safetensors file when needed, no offload folder): the placement record names each module's device, and the
    features are those of the model loaded whole."""
    handle = make_handle("hf_clip", hf_clip_dir, device_map="auto", max_memory={"cpu": cpu_budget(hf_clip_dir, 0.8)})
    images, texts = handle.encoder.encode_images(PIXELS), handle.encoder.encode_texts(TEXTS)
    placement = handle.encoder.placement
    assert set(placement.values()) == {"cpu", "disk"}
    assert "" not in placement and all(isinstance(v, str) for v in placement.values())
    names = list(handle.encoder.model.state_dict())
    assert all(any(n == module or n.startswith(f"{module}.") for n in names) for module in placement)
    assert json.loads(json.dumps(placement)) == placement
    assert handle.encoder.device == torch.device("cpu") and handle.encoder.weights_format == "safetensors"
    assert from_pretrained.calls[0]["max_memory"] == {"cpu": cpu_budget(hf_clip_dir, 0.8)}
    plain = make_handle("hf_clip", hf_clip_dir).encoder
    torch.testing.assert_close(images, plain.encode_images(PIXELS), rtol=0, atol=0)
    torch.testing.assert_close(texts, plain.encode_texts(TEXTS), rtol=0, atol=0)


@pytest.mark.parametrize("backend", TRANSFORMERS_BACKENDS)
def test_device_map_of_one_device_places_the_whole_model(backend, request, from_pretrained):
    handle = make_handle(backend, request.getfixturevalue(f"{backend}_dir"), device_map="cpu")
    assert_unit_features(handle.encoder.encode_images(PIXELS), (2, EMBED_DIM[backend]))
    assert from_pretrained.calls[0]["device_map"] == {"": "cpu"}
    assert handle.encoder.placement == {"": "cpu"}


def test_spread_model_that_needs_disk_from_pytorch_weights_is_one_line(hf_clip_bin_dir):
    handle = make_handle("hf_clip", hf_clip_bin_dir, device_map="auto", max_memory={"cpu": "500KB"})
    message = one_line_error(lambda: load(handle))
    assert message.startswith("models.m.max_memory: the model does not fit the memory of the devices")
    assert "(pytorch here)" in message and "save the weights as safetensors" in message
    assert not handle.loaded


def test_max_memory_that_holds_no_part_of_the_model_is_one_line(hf_clip_dir):
    handle = make_handle("hf_clip", hf_clip_dir, device_map="auto", max_memory={"cpu": cpu_budget(hf_clip_dir, 0.1)})
    assert one_line_error(lambda: load(handle)) == (
        "models.m.max_memory: no part of the model fits the memory of the devices, so all of it would be on disk: "
        "give the devices more memory")


def test_cuda_device_map_without_cuda_is_an_error(hf_clip_dir, monkeypatch, from_pretrained):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^models\.m\.device_map is 'cuda:1' but CUDA is not available here$"):
        load(make_handle("hf_clip", hf_clip_dir, device_map="cuda:1"))
    assert not from_pretrained.calls


def test_placement_record_of_a_model_spread_over_gpus():
    """accelerate names GPUs by index: the record says cuda:N, and inputs go to the first GPU of the map."""
    device_map = {"vision_model.embeddings": 1, "vision_model.encoder": 0, "text_model": torch.device("cuda:1"),
                  "logit_scale": "cpu", "text_projection": "disk"}
    placement = models.device.placement_record(device_map)
    assert placement == {"vision_model.embeddings": "cuda:1", "vision_model.encoder": "cuda:0",
                         "text_model": "cuda:1", "logit_scale": "cpu", "text_projection": "disk"}
    assert models.device.input_device(placement) == torch.device("cuda:1")
    assert models.device.input_device({"logit_scale": "cpu", "vision_model": "disk"}) == torch.device("cpu")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_close_frees_the_model_and_collects_garbage_only_for_a_model_in_a_cycle(backend, request, monkeypatch):
    """A model that nothing else holds is freed as the handle closes, without a garbage collection (a quarter of a
    second in a large process); one that a reference cycle keeps (as a compiled forward or hooks can) is collected."""
    collections = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(args) or collect(*args))
    for cycle in (False, True):
        handle = ModelHandle("m", entry_for(backend, request), device="cpu")
        handle.encoder.encode_images(PIXELS)
        model = handle.encoder.model
        if cycle:
            model.held_by = [model]
        freed, model = weakref.ref(model), None
        handle.close()
        assert freed() is None and not handle.loaded
        assert len(collections) == cycle, (backend, cycle)
