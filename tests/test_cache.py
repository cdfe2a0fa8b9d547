"""The embedding cache: a second run re-encodes nothing it has, writes are atomic, an interrupted encode resumes; the
store of segment files: damaged ones set aside, the .npz format migrated, concurrent appends and compactions,
lookups that read only what they ask."""

import fcntl
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers.infra.store
from helpers.infra.cache import default_num_workers, encode_images, image_store
from helpers.infra.store import EmbeddingStore, open_segment
from helpers.models import ModelHandle
from helpers.research.data import load_test_set
from helpers.runs.pipeline import predict

from .conftest import PROJECT_ROOT, Interrupt


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


def rows_of(*values, dim=2):
    return np.array([[v] * dim for v in values], np.float32)


def test_store_writes_are_atomic_and_unreadable_segments_are_set_aside(tmp_path, caplog):
    store = EmbeddingStore(tmp_path / "s", {"model": "m"})
    store.add(["k1", "k2"], np.eye(2, dtype=np.float32))
    store.add(["k3"], np.ones((1, 2), dtype=np.float32))
    assert json.loads((tmp_path / "s" / "key.json").read_text()) == {"model": "m"}
    assert not list((tmp_path / "s").glob("*.tmp")) and len(list((tmp_path / "s").glob("*.seg"))) == 2
    killed = tmp_path / "s" / ".1-2-x.seg~abc.tmp"  # what a killed writer leaves: nobody holds its lock
    writing = tmp_path / "s" / ".1-3-y.seg~def.tmp"  # a live writer's file, locked while it is written
    for tmp in (killed, writing):
        tmp.write_bytes(b"partial")
    (tmp_path / "s" / "999-broken.seg").write_bytes(b"not a segment")
    whole = sorted((tmp_path / "s").glob("*.seg"))[0]
    cut = whole.with_name("998-cut.seg")
    cut.write_bytes(whole.read_bytes()[:-4])  # a copy cut short
    size = cut.stat().st_size
    with open(writing, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        reopened = EmbeddingStore(tmp_path / "s", {"model": "m"})
    assert "999-broken.seg is unreadable (CorruptSegment: 13 bytes, less than a header)" in caplog.text
    assert "set aside as 999-broken.seg.corrupt" in caplog.text
    assert f"998-cut.seg is unreadable (CorruptSegment: {size} bytes where its header says {size + 4}: cut short" \
        in caplog.text
    assert sorted(p.name for p in (tmp_path / "s").glob("*.corrupt")) == ["998-cut.seg.corrupt",
                                                                         "999-broken.seg.corrupt"]
    assert not killed.exists() and writing.exists()
    assert np.array_equal(reopened.get(["k3", "k1"]), [[1, 1], [1, 0]])
    reopened.compact(min_segments=2)
    assert len(list((tmp_path / "s").glob("*.seg"))) == 1
    assert np.array_equal(EmbeddingStore(tmp_path / "s", {}).get(["k2"]), [[0, 1]])
    with pytest.raises(KeyError, match="1 keys not in the embedding cache .*, e.g. nope"):
        reopened.get(["k1", "nope"])


@pytest.mark.parametrize("damage", ["magic", "version", "checksum", "padded"])
def test_every_kind_of_damaged_segment_is_set_aside(damage, tmp_path, caplog):
    EmbeddingStore(tmp_path / "s", {}).add(["a", "b"], rows_of(1, 2))
    segment = next((tmp_path / "s").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    if damage == "magic":
        data[:8] = b"PK\x03\x04xxxx"
    elif damage == "version":
        data[8] = 9
    elif damage == "checksum":
        data[28] ^= 1  # the row count
    else:
        data += b"\0" * 8
    segment.write_bytes(bytes(data))
    store = EmbeddingStore(tmp_path / "s", {})
    assert len(store) == 0 and segment.with_name(segment.name + ".corrupt").exists()
    expected = {"magic": "not a segment file", "version": "format version 9; this code reads version 1",
                "checksum": "its header fails its checksum",
                "padded": "152 bytes where its header says 144: cut short or padded"}[damage]
    assert f"{segment} is unreadable (CorruptSegment: {expected}" in caplog.text


def test_an_error_that_is_not_the_segments_fault_propagates_and_sets_nothing_aside(tmp_path, monkeypatch):
    EmbeddingStore(tmp_path / "s", {}).add(["a"], rows_of(1))
    segment = next((tmp_path / "s").glob("*.seg"))
    real_open = os.open

    def denied(path, *args, **kwargs):  # the tests run as root, whom chmod does not stop
        if str(path) == str(segment):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError):
        EmbeddingStore(tmp_path / "s", {})
    assert segment.exists() and not list((tmp_path / "s").glob("*.corrupt"))


def npz_bytes(**arrays) -> bytes:
    """A shard of the store's format before segments."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_a_store_of_the_npz_format_is_read_and_migrated_on_first_open(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "s"
    root.mkdir()
    (root / "key.json").write_text('{"model": "m"}')
    (root / "100-1-aaa.npz").write_bytes(npz_bytes(keys=np.array(["k1", "k2"]), vectors=rows_of(1, 2)))
    (root / "200-1-merged.npz").write_bytes(npz_bytes(keys=np.array(["k2", "k3"]), vectors=rows_of(2, 3)))
    (root / "300-1-bbb.npz").write_bytes(b"PK\x03\x04 cut short")
    store = EmbeddingStore(root, {"model": "other"})
    assert "3 .npz shards of" in caplog.text and "300-1-bbb.npz is unreadable (BadZipFile" in caplog.text
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "100-1-aaa.seg", "200-1-merged.seg", "300-1-bbb.npz.corrupt", "key.json"]
    assert json.loads((root / "key.json").read_text()) == {"model": "m"}
    assert len(store) == 3 and np.array_equal(store.get(["k3", "k1", "k2"]), rows_of(3, 1, 2))
    assert np.array_equal(EmbeddingStore(root, {}).get(["k1", "k2", "k3"]), rows_of(1, 2, 3))

    # a migration that stopped after writing a segment (its shard still there) finishes without writing it again
    (root / "100-1-aaa.npz").write_bytes(npz_bytes(keys=np.array(["k1", "k2"]), vectors=rows_of(1, 2)))
    before = (root / "100-1-aaa.seg").stat().st_ino
    assert np.array_equal(EmbeddingStore(root, {}).get(["k1", "k2"]), rows_of(1, 2))
    assert not (root / "100-1-aaa.npz").exists() and (root / "100-1-aaa.seg").stat().st_ino == before


APPENDER = """
import sys
import numpy as np
from helpers.infra.store import EmbeddingStore
root, who, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
import time
while time.time() < start:
    time.sleep(0.001)
store = EmbeddingStore(root, {})
for i in range(40):
    keys = [f"{who}-{i}-{j}" for j in range(5)] + [f"shared-{i}"]
    store.add(keys, np.array([[i, j] for j in range(5)] + [[-i, -i]], np.float32))
    if i % 10 == 9:
        store.compact(min_segments=2)
print(len(store))
"""


def test_two_processes_appending_and_compacting_at_once_lose_nothing(tmp_path):
    start = str(time.time() + 4)  # both start appending at this instant (once they have imported)
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path / "s"), who, start], cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in ("x", "y")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    store = EmbeddingStore(tmp_path / "s", {})
    keys = [f"{who}-{i}-{j}" for who in "xy" for i in range(40) for j in range(5)]
    assert len(store) == 400 + 40
    assert np.array_equal(store.get(keys), [[i, j] for _ in "xy" for i in range(40) for j in range(5)])
    assert np.array_equal(store.get([f"shared-{i}" for i in range(40)]), [[-i, -i] for i in range(40)])
    store.compact(min_segments=2)
    assert len(store) == 440 and len(store.segments) == 1
    assert not list((tmp_path / "s").glob("*.tmp")) and not list((tmp_path / "s").glob("*.corrupt"))


def test_a_compaction_interrupted_after_writing_the_merged_segment_leaves_the_same_store(tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path / "s", {})
    for i in range(5):
        store.add([f"k{i}", f"k{i + 1}"], rows_of(i, i + 1))  # each key but k0 and k5 in two segments
    keys = [f"k{i}" for i in range(6)]
    expected = store.get(keys)
    with monkeypatch.context() as m:
        m.setattr(helpers.infra.store, "_remove_segment", lambda path, rename_if_held=True: None)  # killed right here
        store.compact()
    assert len(list((tmp_path / "s").glob("*.seg"))) == 6  # the merged one beside the five it merged
    again = EmbeddingStore(tmp_path / "s", {})
    assert len(again) == 6 and np.array_equal(again.get(keys), expected)
    del store
    again.compact()
    assert len(again.segments) == 1 and len(list((tmp_path / "s").glob("*.seg*"))) == 1
    assert np.array_equal(EmbeddingStore(tmp_path / "s", {}).get(keys), expected)


def test_compaction_merges_only_small_segments_and_like_with_like(tmp_path, monkeypatch):
    monkeypatch.setattr(helpers.infra.store, "SMALL_SEGMENT_ROWS", 2048)
    store = EmbeddingStore(tmp_path / "s", {})
    store.add([f"big{i}" for i in range(2048)], np.zeros((2048, 2), np.float32))
    big = store.segments[0]
    inode = (tmp_path / "s" / big).stat().st_ino
    store.add([f"mid{i}" for i in range(1024)], np.zeros((1024, 2), np.float32))
    for i in range(3):
        store.add([f"small{i}"], rows_of(i))
    store.compact()  # 3 segments under 1,024 rows and one of 1,024-4,095: no class has 4
    assert len(store.segments) == 5
    store.add(["small3"], rows_of(3))
    store.compact()  # now 4 small ones: merged, with nothing of a larger class
    assert len(store.segments) == 3 and big in store.segments
    assert sorted(s.rows for s in store._segments) == [4, 1024, 2048]
    for i in range(2):
        store.add([f"mid{i}-{j}" for j in range(1024)], np.ones((1024, 2), np.float32))
    store.compact(min_segments=3)  # three of 1,024-4,095 rows: merged with the small one; the big one untouched
    assert sorted(s.rows for s in store._segments) == [2048, 3 * 1024 + 4]
    assert big in store.segments and (tmp_path / "s" / big).stat().st_ino == inode
    assert len(store) == 2048 + 3 * 1024 + 4


def test_lookups_with_duplicates_and_keys_of_other_widths(tmp_path):
    store = EmbeddingStore(tmp_path / "s", {})
    assert len(store) == 0 and not store.contains(["a"]).any() and store.get([]).shape == (0, 0)
    store.add(["bb", "a", "bb", "ccc"], rows_of(1, 2, 3, 4))  # a key twice in one add: its first row
    store.add(["a", "dddd"], rows_of(2, 5))  # "a" again, in a later segment
    assert len(store) == 4 and len(store.segments) == 2
    assert np.array_equal(store.get(["bb", "a", "a", "ccc", "dddd", "bb"]), rows_of(1, 2, 2, 4, 5, 1))
    assert store.contains(["b", "bbb", "a", "dddd", "ddd", "ddddd", ""]).tolist() == [
        False, False, True, True, False, False, False]  # no key matches a longer or shorter one
    assert "ccc" in store and "cc" not in store
    rows = store.get(np.array([b"dddd", b"a"]))
    assert rows.flags.owndata and rows.flags.writeable and rows.dtype == np.float32
    with pytest.raises(KeyError, match="2 keys not in the embedding cache"):
        store.get(["a", "x", "x"])
    with pytest.raises(ValueError, match="ASCII"):
        store.add(["é"], rows_of(1))
    with pytest.raises(ValueError, match="of 2 columns"):
        store.add(["e"], np.ones((1, 3), np.float32))


def test_refresh_picks_up_what_another_process_appended(tmp_path):
    mine = EmbeddingStore(tmp_path / "s", {})
    other = EmbeddingStore(tmp_path / "s", {})
    other.add(["a"], rows_of(1))
    assert "a" not in mine
    mine.refresh()
    assert np.array_equal(mine.get(["a"]), rows_of(1))


def test_a_segment_another_store_holds_open_is_set_aside_not_deleted_until_it_lets_go(tmp_path):
    store = EmbeddingStore(tmp_path / "s", {})
    for i in range(4):
        store.add([f"k{i}"], rows_of(i))
    reader = EmbeddingStore(tmp_path / "s", {})  # another process, with the four open
    store.compact()
    assert len(list((tmp_path / "s").glob("*.seg.merged"))) == 4 and len(store.segments) == 1
    assert np.array_equal(reader.get(["k3", "k0"]), rows_of(3, 0))  # still reads its own
    reader.refresh()
    assert reader.segments == store.segments
    store.compact()  # the next compaction deletes what nobody holds any more
    assert not list((tmp_path / "s").glob("*.seg.merged"))
    assert np.array_equal(EmbeddingStore(tmp_path / "s", {}).get(["k0", "k3"]), rows_of(0, 3))


def _resident_file_bytes() -> int:
    return int(re.search(r"RssFile:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def test_opening_a_store_reads_its_headers_only_and_a_lookup_only_its_rows(tmp_path, monkeypatch):
    dim, per_segment, segments = 256, 4096, 8  # 32 MB of rows
    store = EmbeddingStore(tmp_path / "s", {})
    for s in range(segments):
        keys = [f"{s}-{i:05d}" for i in range(per_segment)]
        store.add(keys, np.full((per_segment, dim), s, np.float32) + np.arange(per_segment)[:, None])
    del store
    read = {"pread": 0, "preadv": 0}
    pread, preadv = os.pread, os.preadv

    def counted_pread(fd, n, offset):
        data = pread(fd, n, offset)
        read["pread"] += len(data)
        return data

    def counted_preadv(fd, buffers, offset):
        n = preadv(fd, buffers, offset)
        read["preadv"] += n
        return n

    monkeypatch.setattr(os, "pread", counted_pread)
    monkeypatch.setattr(os, "preadv", counted_preadv)
    resident = _resident_file_bytes()
    start = time.perf_counter()
    store = EmbeddingStore(tmp_path / "s", {})
    opened = time.perf_counter() - start
    assert read == {"pread": 64 * segments, "preadv": 0}  # each header, nothing else
    assert _resident_file_bytes() - resident < 2**20 and opened < 1.0
    rows = store.get(["3-00007", "0-04095", "7-00000"])
    assert read["preadv"] == 3 * dim * 4  # the three rows, and no other
    assert np.array_equal(rows[:, 0], [3 + 7, 0 + 4095, 7])
    assert len(store.segments) == segments and store.dim == dim


def test_decoding_workers_default_to_none_on_the_cpu_and_some_beside_a_gpu(monkeypatch):
    assert default_num_workers(torch.device("cpu")) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_num_workers(torch.device("cuda")) == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert default_num_workers(torch.device("cuda")) == 4


def test_an_image_listed_twice_is_stored_from_its_first_place_only(make_config, scene_dir, tmp_path):
    entry = vars(make_config().models["a"])
    config = make_config(models={"a": {**entry, "batch_size": 4}}, ensemble={})
    handle = ModelHandle("a", config.models["a"], "cpu")
    files = load_test_set(scene_dir).files[:8]
    twice = [*files, files[0]]  # the same bytes in batches 1 and 3 (e.g. duplicates in the challenge set)
    rows = encode_images(handle, twice, handle.views[0], tmp_path / "cache", num_workers=0, flush_every=1,
                         progress=False)
    store = image_store(tmp_path / "cache", handle, handle.views[0])
    stored = [key for name in store.segments for key in open_segment(store.root / name).keys]
    assert len(stored) == len(set(stored)) == 8  # written once, from batch 1, whichever batch finished first
    assert np.array_equal(rows[0], rows[8])
