"""The converted copy of pickled weights (helpers/models/converted.py), on the tiny EVA-CLIP of the real remote code
in the hub cache at the winner's revision (fp32 .bin shards): made after the first load, in fp16 safetensors in the
workbench's cache, named with the repo and revision, checked against the shards it came from, read by later loads
with the same features; skipped on request; not used when it is not whole or came from other shards."""

from __future__ import annotations

import json
import logging
import re
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from transformers import PreTrainedModel

from helpers.config import ModelEntry
from helpers.models import ModelHandle, converted

from .fixtures.eva_clip import REPO, REVISION
from .fixtures.hub_cache import repo_folder

PIXELS = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
TEXTS = ["a blurry photo of a glacier", "a street"]
COPY = f"BAAI--EVA-CLIP-18B--{REVISION}--fp16"


@pytest.fixture
def sources(monkeypatch) -> list[str]:
    """What every from_pretrained of a model read from (a folder, or a hub id)."""
    seen = []
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, source, *args, **kwargs):
        seen.append(str(source))
        return original(cls, source, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    return seen


def load(cache, **fields):
    entry = ModelEntry(backend="eva_clip", pretrained=REPO, revision=REVISION, precision="fp16", **fields)
    handle = ModelHandle("eva", entry, device="cpu", weights_cache=cache)
    return handle.encoder


def features(encoder) -> tuple[torch.Tensor, torch.Tensor]:
    return encoder.encode_images(PIXELS), encoder.encode_texts(TEXTS)


def test_the_first_load_writes_the_copy_and_later_loads_read_it(hub_offline, tmp_path, sources, caplog):
    first = load(tmp_path)
    assert first.weights_format == "pytorch" and sources == [REPO]
    copy = tmp_path / COPY
    record = json.loads((copy / "converted_from.json").read_text())
    snapshot = repo_folder(hub_offline, REPO) / "snapshots" / REVISION
    shards = sorted(p.name for p in snapshot.glob("pytorch_model-*.bin"))
    assert len(shards) > 1 and sorted(record["shards"]) == shards and record["dtype"] == "float16"
    assert record["source"] == f"'{REPO}' at revision {REVISION}"
    for name, stamp in record["shards"].items():  # the blob's name is the sha256 the hub gives the file
        assert stamp == {"size": (snapshot / name).stat().st_size, "blob": (snapshot / name).resolve().name}
    converted = sorted(p.name for p in copy.glob("*.safetensors"))
    assert len(converted) == len(shards) and (copy / "model.safetensors.index.json").is_file()
    for name in ("config.json", "modeling_evaclip.py", "configuration_evaclip.py", "vocab.json", "merges.txt"):
        assert (copy / name).read_bytes() == (snapshot / name).read_bytes()
    assert not list(copy.glob("*.bin")) and not list(copy.glob(".*~*.tmp"))
    tensors = {}
    for name in converted:
        tensors.update(safetensors.torch.load_file(copy / name))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in first.model.parameters())

    with caplog.at_level(logging.INFO, logger="helpers"):
        later = load(tmp_path)
    assert sources == [REPO, str(copy)] and later.weights_format == "safetensors"
    assert f"models.eva: read the fp16 copy {copy} of the weights of '{REPO}' at revision {REVISION}" in caplog.messages
    for ours, theirs in zip(features(later), features(first)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_convert_weights_false_reads_the_shards_each_time(hub_offline, tmp_path, sources):
    load(tmp_path, convert_weights=False)
    load(tmp_path, convert_weights=False)
    assert sources == [REPO, REPO] and not (tmp_path / COPY).exists()


def test_a_copy_that_is_not_whole_or_came_from_other_shards_is_made_again(hub_offline, tmp_path, sources):
    load(tmp_path)
    record = tmp_path / COPY / "converted_from.json"
    record.unlink()  # a conversion killed before its end
    load(tmp_path)
    assert sources == [REPO, REPO] and record.is_file()
    stale = json.loads(record.read_text())
    next(iter(stale["shards"].values()))["blob"] = "0" * 64  # converted from another version of a shard
    record.write_text(json.dumps(stale))
    load(tmp_path)
    assert sources == [REPO, REPO, REPO] and json.loads(record.read_text()) != stale
    load(tmp_path)
    assert sources[-1] == str(tmp_path / COPY)


def test_a_converted_shard_that_differs_from_its_source_is_never_put_in_place(hub_offline, tmp_path, monkeypatch,
                                                                             caplog, sources):
    """The check of each converted shard against its source (here a conversion that alters a tensor): nothing of the
    shard is kept, no record is written, and the run goes on with the model it loaded from the shards."""
    save_file = safetensors.torch.save_file

    def damaged(tensors, path, metadata=None):
        key = sorted(tensors)[0]
        save_file({**tensors, key: tensors[key] + 1}, path, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", damaged)
    with caplog.at_level(logging.WARNING, logger="helpers"):
        encoder = load(tmp_path)
    assert encoder.weights_format == "pytorch"
    [warning] = [m for m in caplog.messages if "no converted copy" in m]
    assert re.search(r"differs from that of .*pytorch_model-00001-of-.*the next load reads the shards again", warning)
    copy = tmp_path / COPY
    assert not (copy / "converted_from.json").exists() and not list(copy.glob("*.safetensors"))
    assert not list(copy.glob(".*~*.tmp"))
    load(tmp_path)
    assert sources == [REPO, REPO]


def test_a_disk_that_cannot_hold_the_copy_is_said_before_any_is_written(hub_offline, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(converted.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**6))
    with caplog.at_level(logging.WARNING, logger="helpers"):
        load(tmp_path)
    [warning] = [m for m in caplog.messages if "no converted copy" in m]
    assert re.search(r"the copy needs about 0\.\d\d? GB and the disk has 0\.0 GB free", warning)
    assert not any(p.is_file() for p in (tmp_path / COPY).iterdir() if p.name != ".lock")
