"""The eva_clip backend on EVA-CLIP-18B's own remote code (tests/fixtures/eva_clip.py: tiny sizes, random weights),
from a local folder with safetensors and from a hub-cache snapshot at the winner's revision with fp32 `.bin` shards,
the hub offline: the features are the model card's literal calls', `predict` reproduces the winner's EVA-CLIP loop
(fp32, and fp16 weights under autocast exactly), and a prompt longer than the 77-token position table is an error
before anything is encoded.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, CLIPTokenizer

from helpers.config import ConfigError, ModelEntry, PromptSpec
from helpers.models import DTYPES, ModelHandle
from helpers.research import oracle
from helpers.research.prompts import Prompt, PromptSet, load_prompts
from helpers.runs.notebooks import run_pipeline
from helpers.runs.outputs import read_submission
from helpers.runs.pipeline import predict

from .conftest import CLASSES, SCENE_IDS
from .fixtures.eva_clip import REPO, REVISION, TINY_PROJECTION

PIXELS = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
TEXTS = ["a photo of a glacier.", "a blurry photo of a busy street"]
LONG = "a photo of a {c} " + "seen through a very blurry window on a rainy day " * 8


def unit(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(params=["folder", "hub"])
def source(request) -> tuple[str, str | None]:
    """Where the tiny model is: (pretrained, revision) of the safetensors folder, or of the hub cache (offline)."""
    if request.param == "folder":
        return str(request.getfixturevalue("eva_clip_dir")), None
    request.getfixturevalue("hub_offline")
    return REPO, REVISION


def eva_entry(source: tuple[str, str | None], **fields) -> ModelEntry:
    pretrained, revision = source
    return ModelEntry(backend="eva_clip", pretrained=pretrained, revision=revision, **fields)


def model_card(source: tuple[str, str | None], dtype: torch.dtype, texts: list[str] = TEXTS):
    """The model card's calls, literally: AutoModel.from_pretrained(torch_dtype=...), CLIPTokenizer with
    padding=True, encode_image / encode_text (the pixels in the model's dtype: on the CPU there is no autocast)."""
    pretrained, revision = source
    model = AutoModel.from_pretrained(pretrained, revision=revision, torch_dtype=dtype, trust_remote_code=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, revision=revision)
    input_ids = tokenizer(texts, return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        return model, model.encode_image(PIXELS.to(dtype)), model.encode_text(input_ids)


def test_the_real_remote_code_is_what_loads(source):
    model = ModelHandle("eva", eva_entry(source), device="cpu").encoder.model
    assert type(model).__name__ == "EvaCLIPModel" and type(model).__module__.startswith("transformers_modules.")
    assert type(model).__module__.endswith(".modeling_evaclip")
    assert type(model.config).__name__ == "EvaCLIPConfig" and type(model.config).__module__.endswith(
        ".configuration_evaclip")  # the relative import between the two remote files
    assert type(model.vision_model.encoder.layers[0].layer_norm1).__name__ == "RMSNorm"
    assert model.vision_model.embeddings.position_embedding.num_embeddings == 257  # (224 / 14)^2 patches + class
    assert model.text_model.embeddings.position_embedding.num_embeddings == 77


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_features_equal_the_model_cards_calls(source, precision):
    encoder = ModelHandle("eva", eva_entry(source, precision=precision), device="cpu").encoder
    images, texts = encoder.encode_images(PIXELS), encoder.encode_texts(TEXTS)
    assert images.shape == texts.shape == (2, TINY_PROJECTION)
    model, card_images, card_texts = model_card(source, DTYPES[precision])
    assert card_images.dtype == DTYPES[precision]
    torch.testing.assert_close(images, unit(card_images), rtol=0, atol=0)
    torch.testing.assert_close(texts, unit(card_texts), rtol=0, atol=0)
    assert not torch.allclose(images[0], images[1]) and not torch.allclose(texts[0], texts[1])


def test_the_tokenizer_files_give_clips_ids(eva_clip_dir):
    """The BPE files the fixtures write from open_clip's vocabulary give open_clip's ids: the real tokenizer."""
    import open_clip

    prompts = oracle.winner_prompts(CLASSES)
    ours = CLIPTokenizer.from_pretrained(eva_clip_dir)(prompts, padding="max_length", max_length=77,
                                                       return_tensors="pt").input_ids
    theirs = open_clip.tokenizer.tokenize(prompts)
    ends = theirs.argmax(dim=-1)  # open_clip pads with 0, CLIPTokenizer with the end token
    for row, end in enumerate(ends):
        assert torch.equal(ours[row, :end + 1], theirs[row, :end + 1])


def _eva_config(make_config, source, **settings):
    pretrained, revision = source
    entry = {"backend": "eva_clip", "pretrained": pretrained, "revision": revision, "sharpness": 2.0, **settings}
    return make_config(models={"eva": entry}, ensemble={"weights": {"eva": 1.0}, "drop_below": None})


def _loop_probs(source, scene_dir, dtype: torch.dtype) -> np.ndarray:
    """The winner's EVA-CLIP cell (oracle.eva_clip_probs) on the model card's model and tokenizer."""
    pretrained, revision = source
    model = AutoModel.from_pretrained(pretrained, revision=revision, torch_dtype=dtype, trust_remote_code=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, revision=revision)
    return torch.stack(oracle.eva_clip_probs(model, tokenizer, oracle.winner_prompts(CLASSES), str(scene_dir.parent),
                                             scene_dir.name, oracle.make_processor(2.0), num_workers=0)).numpy()


def test_predict_and_run_from_the_hub_snapshot_give_the_winners_eva_loop(make_config, hub_offline, scene_dir,
                                                                         tmp_path):
    """`predict` in this process, and `run` (the notebooks, in a kernel that reads HF_HUB_OFFLINE=1 and the hub
    cache from its environment, with a cache of its own so that it loads the model itself)."""
    source = (REPO, REVISION)
    config = _eva_config(make_config, source, precision="fp32")
    predict(config, tmp_path / "predict", progress=False)
    loop = _loop_probs(source, scene_dir, torch.float32)
    ours = np.load(tmp_path / "predict" / "models" / "eva" / "test" / "prompt_probs.npy")
    np.testing.assert_allclose(ours, loop, rtol=0, atol=1e-6)
    ids, labels = read_submission(tmp_path / "predict" / "submission.csv")
    assert ids == SCENE_IDS and labels == oracle.ensemble_labels(list(torch.from_numpy(loop)),
                                                                 list(torch.from_numpy(loop)), CLASSES)
    record = json.loads((tmp_path / "predict" / "models" / "eva" / "model.json").read_text())
    assert record["weights_format"] == "pytorch" and record["model_loaded"]

    run_config = dataclasses.replace(config, cache_dir=str(tmp_path / "run-cache"))
    run_dir = run_pipeline(run_config, output_dir=tmp_path / "run", analyses=False, progress=False, log=print)
    assert (run_dir / "submission.csv").read_bytes() == (tmp_path / "predict" / "submission.csv").read_bytes()
    assert json.loads((run_dir / "models" / "eva" / "model.json").read_text())["model_loaded"]
    np.testing.assert_array_equal(np.load(run_dir / "models" / "eva" / "test" / "prompt_probs.npy"), ours)


def test_fp16_under_autocast_is_the_winners_arithmetic_exactly(make_config, hub_offline, scene_dir, tmp_path,
                                                               cuda_autocast_on_cpu):
    """The winner's settings for EVA-CLIP-18B (fp16 weights, autocast, batch 32) against its loop under autocast:
    the same probabilities, bit for bit (CPU autocast with CUDA's policy standing in for CUDA's, as in
    tests/test_fp16_arithmetic.py)."""
    source = (REPO, REVISION)
    config = _eva_config(make_config, source, precision="fp16", autocast=True, batch_size=32)
    predict(config, tmp_path / "run", progress=False)
    loop = _loop_probs(source, scene_dir, torch.float16)
    folder = tmp_path / "run" / "models" / "eva"
    np.testing.assert_array_equal(np.load(folder / "test" / "prompt_probs.npy"), loop)
    features = np.load(folder / "test" / "image_embeddings.npy")
    assert np.array_equal(features, features.astype(np.float16).astype(np.float32))  # fp16 features, as the loop's


def test_a_prompt_longer_than_77_tokens_is_an_error_before_anything_is_encoded(eva_clip_dir):
    handle = ModelHandle("eva", eva_entry((str(eva_clip_dir), None)), device="cpu")
    handle.check_prompts(load_prompts(PromptSpec(groups=["name", "basic"]), CLASSES))  # these fit
    long = [LONG.format(c=c) for c in CLASSES]
    tokens = len(CLIPTokenizer.from_pretrained(eva_clip_dir)(long[0]).input_ids)
    assert tokens > 77
    rambling = PromptSet(tuple(CLASSES), tuple(Prompt(i, "rambling", text) for i, text in enumerate(long)))
    with pytest.raises(ConfigError) as error:
        handle.check_prompts(rambling)
    assert str(error.value) == (
        f"prompts: '{long[0]}' (group rambling, class Buildings) is {tokens} tokens, more than the 77 of model eva's "
        "context (and 5 more prompts): shorten it, or set models.eva.truncate: true to cut such prompts to 77 tokens")
    assert not handle.loaded


def test_truncate_true_cuts_to_77_tokens_keeping_the_end_token(eva_clip_dir):
    source = (str(eva_clip_dir), None)
    encoder = ModelHandle("eva", eva_entry(source, truncate=True), device="cpu").encoder
    long = [LONG.format(c="Sea"), "a photo of a Sea"]
    features = encoder.encode_texts(long)
    tokenizer = CLIPTokenizer.from_pretrained(eva_clip_dir)
    ids = tokenizer(long, return_tensors="pt", padding=True, truncation=True, max_length=77).input_ids
    assert ids.shape == (2, 77) and ids[0, -1] == tokenizer.eos_token_id
    with torch.no_grad():
        expected = unit(encoder.model.encode_text(ids))
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
