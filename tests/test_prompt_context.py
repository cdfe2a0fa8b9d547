"""A prompt longer than a model's context (77 tokens for CLIP's text towers) is one error before anything is encoded:
it names the prompt, its group, its token count and the limit. open_clip's tokenizer would cut it silently, and
EVA-CLIP's remote code would fail deep inside on a 77-row position table; `truncate: true` accepts the cut knowingly.
(eva_clip's side, on its real remote code: tests/test_eva_clip.py.)"""

from __future__ import annotations

import json
import logging
import re

import open_clip
import pytest
import torch
import yaml

from helpers.__main__ import main
from helpers.config import ConfigError, ModelEntry
from helpers.models import Encoder, ModelHandle
from helpers.research.prompts import load_prompts
from helpers.runs.pipeline import predict

from .conftest import CLASSES

LONG = "a photo of a {c} " + "seen through a very blurry window on a rainy day " * 8


@pytest.fixture
def long_prompts(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump({"name": "long", "groups": {"short": ["a photo of a {c}"], "rambling": [LONG]}}))
    return path


@pytest.fixture
def no_encoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was encoded")

    monkeypatch.setattr(Encoder, "encode_texts", refuse)
    monkeypatch.setattr(Encoder, "encode_images", refuse)


def test_open_clip_prompt_longer_than_the_context_is_one_error_before_any_encode(make_config, long_prompts, tmp_path,
                                                                                 no_encoding):
    config = make_config(prompts={"set": str(long_prompts)})
    tokens = len(open_clip.get_tokenizer("ViT-B-32").encode(LONG.format(c="Buildings"))) + 2
    assert tokens > 77
    with pytest.raises(ConfigError) as error:
        predict(config, tmp_path / "out", progress=False)
    assert str(error.value) == (
        f"prompts: '{LONG.format(c='Buildings')}' (group rambling, class Buildings) is {tokens} tokens, more than the "
        "77 of model a's context (and 5 more prompts): shorten it, or set models.a.truncate: true to cut such "
        "prompts to 77 tokens")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npy"))


def test_the_command_line_says_it_on_one_error_line(make_config, long_prompts, tmp_path, capsys, no_encoding):
    config = make_config(prompts={"set": str(long_prompts)})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["predict", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prompts: 'a photo of a Buildings seen through")
    assert re.search(r"\(group rambling, class Buildings\) is \d+ tokens, more than the 77 of model a's context",
                     lines[0])


def test_truncate_true_accepts_open_clips_cut(make_config, long_prompts, tmp_path):
    config = make_config(prompts={"set": str(long_prompts)})
    for entry in config.models.values():
        entry.truncate = True
    handle = ModelHandle("a", config.models["a"], "cpu")
    prompts = load_prompts(config.prompts, ["Buildings", "Forests"])
    handle.check_prompts(prompts)  # no error
    features = handle.encoder.encode_texts([LONG.format(c="Sea")])
    tokenizer = handle.encoder.tokenizer
    ids = tokenizer([LONG.format(c="Sea")])
    assert ids.shape == (1, 77) and ids[0, -1] == tokenizer.eot_token_id  # cut to 77, the end token kept
    with torch.no_grad():
        expected = handle.encoder.model.encode_text(ids)
    torch.testing.assert_close(features, expected / expected.norm(dim=-1, keepdim=True), rtol=0, atol=0)



def test_the_check_leaves_the_root_logger_without_a_handler(make_config, monkeypatch):
    """open_clip's tokenizer logs through `logging.info`, which gives a handler-less root logger a stderr handler: in
    a notebook's kernel every INFO record of the workbench would then be printed again, in red."""
    monkeypatch.setattr(logging.root, "handlers", [])
    config = make_config()
    ModelHandle("a", config.models["a"], "cpu").check_prompts(load_prompts("winner", CLASSES))
    assert logging.root.handlers == []


def test_an_architecture_file_is_read_each_time_and_two_of_one_name_stay_apart(tiny_arch, tmp_path):
    """open_clip registers an architecture file by its stem, and the workbench keeps its tokenizer: a file rewritten
    since, or another file of the same name in another folder, is what the next handle reads."""
    def context(arch) -> int:
        entry = ModelEntry(backend="open_clip", arch=str(arch), pretrained="random")
        return ModelHandle("a", entry, "cpu").backend.context_length()

    other = tmp_path / "other" / tiny_arch.name
    other.parent.mkdir()
    shorter = json.loads(tiny_arch.read_text())
    shorter["text_cfg"]["context_length"] = 16
    other.write_text(json.dumps(shorter))
    assert (context(tiny_arch), context(other), context(tiny_arch)) == (77, 16, 77)
    shorter["text_cfg"]["context_length"] = 24
    other.write_text(json.dumps(shorter))
    assert context(other) == 24
