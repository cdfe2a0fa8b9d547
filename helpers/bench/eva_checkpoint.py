"""Checkpoints of EVA-CLIP-18B's own remote code at other sizes, with random weights, laid out as its hub repository
is: the two remote files, a `config.json` that is the repository's (`architectures`, `auto_map`, `model_type: clip`,
norms, biases) with the sizes given, CLIP's BPE tokenizer files, and the weights as safetensors or as pickled `.bin`
shards with their index. The load benchmark (`python -m helpers.bench load`) and the tests build theirs here; the
code itself comes from a folder of the repository's files (`../shared/reference/eva-clip-18b`, README there).
"""

from __future__ import annotations

import copy
import gzip
import json
import shutil
from pathlib import Path

import torch

from ..infra.files import PROJECT_ROOT

DEFAULT_REFERENCE = PROJECT_ROOT.parent / "shared" / "reference" / "eva-clip-18b"
REMOTE_CODE = ("modeling_evaclip.py", "configuration_evaclip.py")


def full_config(reference: Path) -> dict:
    """The repository's config.json at the full 18B sizes (`config-18b.json`)."""
    return json.loads((Path(reference) / "config-18b.json").read_text())


def sized_config(reference: Path, vision: dict | None = None, text: dict | None = None,
                 projection_dim: int | None = None) -> dict:
    """config-18b.json with other sizes (the keys given), everything else the repository's."""
    config = copy.deepcopy(full_config(reference))
    config["vision_config"].update(vision or {})
    config["text_config"].update(text or {})
    if projection_dim is not None:
        for part in (config, config["vision_config"], config["text_config"]):
            part["projection_dim"] = projection_dim
    return config


def write_clip_tokenizer(folder: Path) -> None:
    """CLIP's BPE tokenizer files, as the hub's CLIPTokenizer repositories hold them, written offline from the
    vocabulary open_clip ships (`bpe_simple_vocab_16e6.txt.gz`): the 256 byte characters, each also word-final, the
    first 48,894 merges, then the two special tokens, in OpenAI's order, so that the ids are CLIP's."""
    from open_clip.tokenizer import default_bpe
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "errors": "replace"}))


def write_code_and_config(folder: Path, reference: Path, config: dict) -> Path:
    """A model folder without weights: the remote code, `config`, and the tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_CODE:
        shutil.copyfile(Path(reference) / name, folder / name)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_clip_tokenizer(folder)
    return folder


def remote_model(folder: Path, seed: int) -> torch.nn.Module:
    """The folder's model, randomly initialised by the remote code itself (its `_init_weights`), in fp32."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model_class = get_class_from_dynamic_module("modeling_evaclip.EvaCLIPModel", str(folder))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


def save_weights(model: torch.nn.Module, folder: Path, **save) -> list[Path]:
    """The weights files that the model's save_pretrained writes (`save`: its options), moved into `folder`,
    whose config.json stays the repository's (save_pretrained would write the remote config's own)."""
    scratch = folder.parent / f".{folder.name}-weights"
    model.save_pretrained(scratch, **save)
    written = sorted(p for p in scratch.iterdir()
                     if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    for p in written:
        shutil.move(p, folder / p.name)
    shutil.rmtree(scratch)
    return [folder / p.name for p in written]


def build_checkpoint(folder: Path, reference: Path, config: dict, seed: int, **save) -> Path:
    """A model folder of the remote code at `config`'s sizes, random weights saved as save_pretrained's `save` says
    (default safetensors; `safe_serialization=False, max_shard_size=...`: pickled .bin shards and their index)."""
    write_code_and_config(folder, reference, config)
    save_weights(remote_model(folder, seed), folder, **save)
    return folder
