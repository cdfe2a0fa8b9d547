"""The embedding cache: a second run re-encodes nothing it has, writes are atomic, an interrupted encode resumes."""

import fcntl
import json
import os

import numpy as np
import pytest
import torch

from helpers.cache import EmbeddingStore, default_num_workers, encode_images, image_store
from helpers.data import load_test_set
from helpers.models import ModelHandle
from helpers.pipeline import predict

from .conftest import Interrupt


def model_info(run, name):
    return json.loads((run / "models" / name / "model.json").read_text())


def test_a_second_predict_that_changes_prompts_scoring_or_ensemble_encodes_no_image(
        make_config, tmp_path, count_image_batches):
    predict(make_config(), tmp_path / "first", progress=False)
    first = count_image_batches["n"]
    assert first == 4  # 38 images in batches of 32, two models

    new_prompts = tmp_path / "new.yaml"
    new_prompts.write_text("groups:\n  name: ['{c}']\n  haze: ['a hazy photo of a {c}']\n")
    predict(make_config(prompts=str(new_prompts), scoring="mean_logit", ensemble={"weights": {"a": 0.7, "b": 0.3}}),
            tmp_path / "second", progress=False)
    assert count_image_batches["n"] == first
    assert model_info(tmp_path / "second", "a")["model_loaded"] is True  # loaded for the new prompts only

    predict(make_config(scoring="prototype", ensemble={"weights": {"a": 0.2, "b": 0.8}}), tmp_path / "third",
            progress=False)
    assert count_image_batches["n"] == first
    assert model_info(tmp_path / "third", "a")["model_loaded"] is False  # all prompts were cached too

    emb = [np.load(tmp_path / r / "models" / "a" / "test" / "image_embeddings.npy") for r in ("first", "third")]
    assert np.array_equal(*emb)


def test_a_changed_preprocessing_or_precision_is_a_different_cache_entry(make_config, tmp_path, count_image_batches):
    config = make_config()
    handle = ModelHandle("a", config.models["a"], "cpu")
    sharper = make_config(models={**{k: vars(v) for k, v in config.models.items()},
                                  "a": {**vars(config.models["a"]), "sharpness": 3.0}})
    bf16 = make_config(models={**{k: vars(v) for k, v in config.models.items()},
                               "a": {**vars(config.models["a"]), "precision": "bf16"}})
    roots = {image_store(config.cache_dir, h, h.views[0]).root
             for h in (ModelHandle("a", c.models["a"], "cpu") for c in (config, sharper, bf16))}
    assert len(roots) == 3
    view = handle.views[0]
    assert image_store(config.cache_dir, handle, view).root == image_store(config.cache_dir, handle, view).root


def test_an_interrupted_encode_resumes_and_ends_with_the_same_result(make_config, scene_dir, tmp_path,
                                                                     count_image_batches):
    entry = vars(make_config().models["a"])
    config = make_config(models={"a": {**entry, "batch_size": 8}}, ensemble={})
    files = load_test_set(scene_dir).files  # 38 images: 5 batches of 8

    handle = ModelHandle("a", config.models["a"], "cpu")
    view = handle.views[0]
    expected = encode_images(handle, files, view, tmp_path / "uninterrupted", num_workers=0, progress=False)
    assert count_image_batches["n"] == 5

    count_image_batches.update(n=0, fail_after=3)
    resumed_root = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        encode_images(handle, files, view, resumed_root, num_workers=0, flush_every=8, progress=False)
    assert len(image_store(resumed_root, handle, view)) == 24  # the three finished batches were kept

    count_image_batches.update(n=0, fail_after=None)
    result = encode_images(handle, files, view, resumed_root, num_workers=0, progress=False)
    assert count_image_batches["n"] == 2  # only the two missing batches
    assert np.array_equal(result, expected)
    assert result.dtype == np.float32 and np.allclose(np.linalg.norm(result, axis=1), 1, atol=1e-5)


def test_store_writes_are_atomic_and_unreadable_shards_are_set_aside(tmp_path, caplog):
    store = EmbeddingStore(tmp_path / "s", {"model": "m"})
    store.add(["k1", "k2"], np.eye(2, dtype=np.float32))
    store.add(["k3"], np.ones((1, 2), dtype=np.float32))
    assert not list((tmp_path / "s").glob("*.tmp"))
    killed = tmp_path / "s" / ".1-2-x.npz~abc.tmp"  # what a killed writer leaves: nobody holds its lock
    writing = tmp_path / "s" / ".1-3-y.npz~def.tmp"  # a live writer's file, locked while it is written
    for tmp in (killed, writing):
        tmp.write_bytes(b"partial")
    (tmp_path / "s" / "999-broken.npz").write_bytes(b"not an npz")
    with open(writing, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        reopened = EmbeddingStore(tmp_path / "s", {"model": "m"})
    assert "999-broken.npz is unreadable" in caplog.text and "set aside as 999-broken.npz.corrupt" in caplog.text
    assert (tmp_path / "s" / "999-broken.npz.corrupt").is_file()
    assert not killed.exists() and writing.exists()
    assert np.array_equal(reopened.get(["k3", "k1"]), [[1, 1], [1, 0]])
    reopened.compact()
    assert len(list((tmp_path / "s").glob("*.npz"))) == 1
    assert np.array_equal(EmbeddingStore(tmp_path / "s", {}).get(["k2"]), [[0, 1]])
    with pytest.raises(KeyError, match="1 keys not in the embedding cache"):
        reopened.get(["k1", "nope"])


def test_decoding_workers_default_to_none_on_the_cpu_and_some_beside_a_gpu(monkeypatch):
    assert default_num_workers(torch.device("cpu")) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_num_workers(torch.device("cuda")) == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert default_num_workers(torch.device("cuda")) == 4
