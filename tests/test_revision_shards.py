"""A hub revision that lacks a weight shard its index names fails before a byte of the weights is downloaded: one
error naming the shards, the revision and the revisions to use (exit status 2). BAAI/EVA-CLIP-18B's `ac8597a` is
such a revision: its index names 8 shards, it holds 6. The files a revision holds are its cached snapshot offline
and the hub's listing online (a stand-in for the hub's API here: there is no network)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import HfApi, constants
from transformers import PreTrainedModel

from helpers import models
from helpers.__main__ import main
from helpers.config import ModelEntry
from helpers.models import ModelHandle, WeightsUnavailableError
from helpers.models.shards import KNOWN_COMPLETE_REVISIONS

from .fixtures.hub_cache import write_snapshot

REPO = "BAAI/EVA-CLIP-18B"
PINNED, COMPLETE, README_ONLY = "ac8597aed12b1ecf2eda2130d0458bb1a0b50011", *KNOWN_COMPLETE_REVISIONS[REPO]
SHARDS = [f"pytorch_model-{i:05d}-of-00008.bin" for i in range(1, 9)]
INDEX = {"metadata": {"total_size": 8}, "weight_map": {f"layer{i}.weight": shard for i, shard in enumerate(SHARDS)}}
CONFIG = {"model_type": "clip", "vision_config": {"image_size": 224}, "text_config": {"max_position_embeddings": 77}}


def repository_files(shards: list[str]) -> dict[str, bytes]:
    """The repository's small files, and `shards` (a byte each: the check never reads a shard)."""
    return {"config.json": json.dumps(CONFIG).encode(), "pytorch_model.bin.index.json": json.dumps(INDEX).encode(),
            **{shard: b"\0" for shard in shards}}


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty hub cache (returned), the hub offline, and no model ever loaded."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models.checkpoints, "_reachable", {})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    return cache


def eva_handle(revision: str = PINNED) -> ModelHandle:
    return ModelHandle("eva", ModelEntry(backend="eva_clip", pretrained=REPO, revision=revision, precision="fp16"),
                       device="cpu")


def message(call) -> str:
    with pytest.raises(WeightsUnavailableError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def expected(revisions: str) -> str:
    return (f"models.eva.revision: '{REPO}' at revision {PINNED} lacks 2 of the 8 weight shards that its "
            "pytorch_model.bin.index.json names (pytorch_model-00007-of-00008.bin, pytorch_model-00008-of-00008.bin), "
            f"so from_pretrained would read the others and then fail: pin a revision that holds them all: {revisions}")


def test_a_cached_snapshot_that_lacks_shards_fails_before_loading(hub_cache):
    write_snapshot(hub_cache, REPO, PINNED, repository_files(SHARDS[:6]))
    handle = eva_handle()
    assert message(handle.check_weights) == expected(f"{COMPLETE} or {README_ONLY}")
    assert message(lambda: handle.encoder) == expected(f"{COMPLETE} or {README_ONLY}")


def test_the_revisions_to_use_are_those_cached_whole(hub_cache):
    write_snapshot(hub_cache, REPO, PINNED, repository_files(SHARDS[:6]))
    write_snapshot(hub_cache, REPO, "0" * 40, repository_files(SHARDS))
    assert message(eva_handle().check_weights) == expected("0" * 40)


def test_a_snapshot_with_every_shard_passes(hub_cache):
    write_snapshot(hub_cache, REPO, COMPLETE, repository_files(SHARDS))
    eva_handle(COMPLETE).check_weights()


def test_the_command_line_says_it_on_one_line_with_exit_status_2(hub_cache, tmp_path, scene_dir, capsys):
    write_snapshot(hub_cache, REPO, PINNED, repository_files(SHARDS[:6]))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "data": {"test": str(scene_dir)}, "models": {"eva": {
        "backend": "eva_clip", "pretrained": REPO, "revision": PINNED, "precision": "fp16"}}}))
    assert main(["predict", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {expected(f'{COMPLETE} or {README_ONLY}')}"]


class FakeHub:
    """The hub's API for a repository whose history adds the shards two at a time (oldest commit first)."""

    def __init__(self):
        self.history = [(f"{i:040d}", SHARDS[:2 * i]) for i in range(5)]
        self.history[3] = (PINNED, SHARDS[:6])
        self.downloads: list[str] = []

    def list_repo_commits(self, repo_id, **kwargs):
        return [SimpleNamespace(commit_id=commit) for commit, _ in reversed(self.history)]

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        return list(repository_files(dict(self.history)[revision]))


def test_online_the_hubs_listing_is_compared_and_only_the_small_files_are_downloaded(hub_cache, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(models.checkpoints, "_reachable", {"huggingface.co": True})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(HfApi, "list_repo_commits", hub.list_repo_commits)
    monkeypatch.setattr(HfApi, "list_repo_files", hub.list_repo_files)

    def download(repo, filename, revision=None, **kwargs):  # the hub's small files, into the cache
        hub.downloads.append(filename)
        return str(write_snapshot(hub_cache, repo, revision, {filename: repository_files([])[filename]}) / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    assert message(eva_handle().check_weights) == expected(f"{4:040d}")
    assert set(hub.downloads) <= {"config.json", "pytorch_model.bin.index.json"}


def test_a_model_folder_that_lacks_a_shard(tmp_path, hub_cache):
    for name, content in repository_files(SHARDS[1:]).items():
        (tmp_path / name).write_bytes(content)
    handle = ModelHandle("eva", ModelEntry(backend="eva_clip", pretrained=str(tmp_path)), device="cpu")
    assert message(handle.check_weights) == (
        f"models.eva.pretrained: {tmp_path} lacks 1 of the 8 weight shards that its pytorch_model.bin.index.json "
        "names (pytorch_model-00001-of-00008.bin), so from_pretrained would read the others and then fail: copy "
        "them into the folder (or download the model again)")
