"""Reliability: unusable images found all at once before any encode (or skipped, with a row each), and nothing
computed ever lost: runs killed at several points, a full disk, corrupt shards, two configs on one cache at once."""

from __future__ import annotations

import json
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import helpers.infra.store
import helpers.research.data
from helpers.__main__ import main
from helpers.infra.cache import encode_images
from helpers.infra.store import EmbeddingStore, open_segment
from helpers.models import ModelHandle
from helpers.research.data import bad_images_message, image_problem, load_test_set
from helpers.runs.outputs import read_submission
from helpers.runs.pipeline import RunStaleError, load_run_data, predict, run_ensemble

from . import fault_injection, forked
from .conftest import CLASSES, INTEL_CLASS_MAP, PROJECT_ROOT, SCENE_IDS, fault_config, missing_batches
from .test_predict import write_config


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (and holds none): enough for Pillow's decompression-bomb check."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(
        b"IEND", b"")


def write_bad_images(folder: Path, good: Path) -> dict[str, str]:
    """Four unusable files, each of a different kind, named by test id; returns file name -> expected reason."""
    blob = good.read_bytes()
    (folder / "100.jpg").write_bytes(blob[: len(blob) // 2])
    (folder / "101.jpg").write_bytes(b"")
    (folder / "102.jpg").write_text("not an image\n")
    (folder / "103.png").write_bytes(png_header(20000, 20000))
    return {"100.jpg": "truncated", "101.jpg": "empty file", "102.jpg": "not an image",
            "103.png": "too many pixels"}


@pytest.fixture
def scene_with_bad_images(tmp_path, scene_dir) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "Scene"
    shutil.copytree(scene_dir, root)
    return root, write_bad_images(root / "0", root / "0" / "5.jpg")


def test_every_kind_of_unusable_image_is_named_with_its_reason(scene_with_bad_images):
    root, expected = scene_with_bad_images
    for name, reason in expected.items():
        assert reason in image_problem((root / "0" / name).read_bytes())
    assert image_problem((root / "0" / "5.jpg").read_bytes()) is None


def test_unusable_images_stop_the_run_before_anything_is_encoded_all_listed_on_one_line(
        make_config, scene_with_bad_images, tmp_path, capsys, count_image_batches):
    root, expected = scene_with_bad_images
    config = make_config(data={"test": str(root)})
    assert main(["predict", write_config(tmp_path, config), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 4 of 42 images cannot be used, so nothing was encoded")
    for name, reason in expected.items():
        assert f"{root / '0' / name} (" in err and reason in err
    assert "on_bad_image: skip" in err
    assert count_image_batches["n"] == 0 and not (tmp_path / "cache" / "images").exists()
    assert not (tmp_path / "out").exists()


def test_the_message_lists_the_first_20_bad_files_and_counts_the_rest():
    bad = [(Path(f"/d/{i}.jpg"), "empty file (0 bytes)") for i in range(25)]
    message = bad_images_message(bad, 100, "so nothing was done", "")
    assert message.startswith("25 of 100 images cannot be used, so nothing was done: /d/0.jpg (empty file (0 bytes))")
    assert "/d/19.jpg" in message and "/d/20.jpg" not in message and "; and 5 more." in message


def test_skipped_images_get_a_row_with_the_fallback_label_and_are_listed(make_config, scene_with_bad_images, scene_dir,
                                                                          tmp_path, caplog):
    root, expected = scene_with_bad_images
    clean = predict(make_config(), tmp_path / "clean", progress=False)
    metrics = predict(make_config(data={"test": str(root)}, on_bad_image="skip"), tmp_path / "skip", progress=False)
    assert "test set: skipping 4 unusable image(s)" in caplog.text

    ids, labels = read_submission(tmp_path / "skip" / "submission.csv")
    assert ids == sorted(SCENE_IDS + [100, 101, 102, 103])  # every test id has its row, in the set's order
    clean_ids, clean_labels = read_submission(tmp_path / "clean" / "submission.csv")
    by_id = dict(zip(ids, labels))
    assert [by_id[i] for i in clean_ids] == clean_labels  # the readable images are classified as without the bad
    majority = int(np.bincount(clean_labels, minlength=6).argmax())
    assert [by_id[i] for i in (100, 101, 102, 103)] == [majority] * 4
    assert metrics["test"]["fallback_label"] == {"label": majority, "class": CLASSES[majority],
                                                 "source": "the run's most predicted class"}
    assert metrics["test"]["images"] == 38 and clean["test"]["images"] == 38
    listed = metrics["skipped_images"]["test"]
    assert [s["file"] for s in listed] == [f"0/{n}" for n in expected]
    assert all(reason in s["reason"] for s, reason in zip(listed, expected.values()))
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert manifest["data"]["test"]["skipped"] == listed
    predictions = (tmp_path / "skip" / "test_predictions.csv").read_text().splitlines()
    assert predictions[0] == "id_idx,file,label,class,skipped" and len(predictions) == 43

    for name in "ab":  # each readable image has the scores it has without the bad ones: rows are not shifted
        scores = [np.load(tmp_path / run / "models" / name / "test" / "class_scores.npy") for run in ("clean", "skip")]
        assert np.array_equal(*scores)

    assert majority != 2
    stated = predict(make_config(data={"test": str(root)}, on_bad_image="skip", fallback_label="Glacier"),
                     tmp_path / "stated", progress=False)
    by_id = dict(zip(*read_submission(tmp_path / "stated" / "submission.csv")))
    assert [by_id[i] for i in (100, 101, 102, 103)] == [2] * 4
    assert stated["test"]["fallback_label"] == {"label": 2, "class": "Glacier",
                                                "source": "fallback_label in the config"}
    rows = pd.read_csv(tmp_path / "stated" / "test_predictions.csv")
    assert rows["id_idx"].tolist() == ids and rows["file"].tolist()[36:40] == [f"0/{n}" for n in expected]
    assert rows["skipped"].tolist() == [i in (100, 101, 102, 103) for i in ids]
    assert (rows.loc[rows["skipped"], "class"] == "Glacier").all()


def test_outputs_of_other_images_are_not_combined(make_config, scene_with_bad_images, tmp_path):
    root, _ = scene_with_bad_images
    config = make_config(data={"test": str(root)}, on_bad_image="skip")
    predict(config, tmp_path / "out", progress=False)
    shutil.copy(root / "0" / "5.jpg", root / "0" / "101.jpg")  # one bad image fixed, another broken
    (root / "0" / "9.jpg").write_bytes(b"")
    with pytest.raises(RunStaleError,
                       match=r"models/a holds model a's outputs for other images or prompts than this run's"):
        run_ensemble(config, tmp_path / "out")
    predict(config, tmp_path / "out", progress=False)  # runs the models again
    ids, labels = read_submission(tmp_path / "out" / "submission.csv")
    assert len(ids) == 42 and json.loads((tmp_path / "out" / "metrics.json").read_text())["test"]["images"] == 38


def test_an_image_that_breaks_after_the_check_is_one_line_from_a_worker_too(make_config, scene_dir, tmp_path):
    config = make_config()
    handle = ModelHandle("a", config.models["a"], "cpu")
    files = load_test_set(scene_dir).files[:4]
    broken = tmp_path / "gone.jpg"
    broken.write_bytes(b"")
    with pytest.raises(helpers.research.data.DataError) as e:
        encode_images(handle, [*files, broken], handle.views[0], tmp_path / "cache", num_workers=1, progress=False)
    assert str(e.value) == f"{broken}: cannot read this image (empty file (0 bytes)); replace or remove it"


def test_a_dangling_link_is_an_unusable_image_not_a_missing_row(make_config, scene_dir, tmp_path, capsys):
    root = tmp_path / "Scene"
    shutil.copytree(scene_dir, root)
    (root / "0" / "77.jpg").symlink_to(tmp_path / "not-fetched.jpg")  # e.g. a git-annex file whose content is absent
    config = make_config(data={"test": str(root)})
    assert main(["predict", write_config(tmp_path, config), "--output-dir", str(tmp_path / "o"), "--quiet"]) == 2
    assert f"1 of 39 images cannot be used, so nothing was encoded: {root}/0/77.jpg (cannot read the file: no such " \
           "file or folder" in capsys.readouterr().err


def test_skipped_dev_images_leave_the_dev_accuracy(make_config, scene_dir, dev_dir, tmp_path):
    dev = tmp_path / "dev"
    shutil.copytree(dev_dir, dev)
    (dev / "sea" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    config = make_config(data={"test": str(scene_dir), "dev": {"path": str(dev), "class_map": INTEL_CLASS_MAP}},
                         on_bad_image="skip")
    metrics = predict(config, tmp_path / "out", progress=False)
    assert metrics["dev"]["images"] == 24 and metrics["dev"]["ensemble"]["images"] == 24
    assert metrics["skipped_images"]["dev"][0]["file"] == "sea/broken.jpg"
    assert metrics["skipped_images"]["dev"][0]["label"] == CLASSES.index("Sea")
    assert "skipped_images" not in metrics["test"]


def test_an_unreadable_file_is_a_bad_image_too(make_config, scene_dir, deny_reading):
    deny_reading(scene_dir / "0" / "7.jpg")
    with pytest.raises(helpers.research.data.DataError,
                       match=r"1 of 38 images .*7\.jpg \(cannot read the file: permission"):
        load_run_data(make_config())


def test_images_are_checked_once_per_cache(make_config, scene_with_bad_images, monkeypatch):
    root, _ = scene_with_bad_images
    decoded = []
    check = helpers.research.data.image_problem
    monkeypatch.setattr(helpers.research.data, "image_problem", lambda blob: decoded.append(1) or check(blob))
    config = make_config(data={"test": str(root)}, on_bad_image="skip")
    first = load_run_data(config)
    assert len(decoded) == 42
    again = load_run_data(config)
    assert len(decoded) == 46  # only the four bad files, which are never recorded as good, are decoded again
    assert again.digests == first.digests and len(again.splits["test"].skipped) == 4


def test_a_corrupt_shard_is_reported_set_aside_and_recomputed(make_config, tmp_path, caplog, count_image_batches):
    config = make_config()
    predict(config, tmp_path / "one", progress=False)
    batches = count_image_batches["n"]
    shard = next((tmp_path / "cache" / "images").glob("*/*.seg"))
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated: shorter than its header says
    predict(config, tmp_path / "two", progress=False)
    assert f"{shard} is unreadable (CorruptSegment: 1000 bytes where" in caplog.text and "set aside" in caplog.text
    assert shard.with_name(shard.name + ".corrupt").is_file() and not shard.exists()
    assert count_image_batches["n"] == batches + 2  # that model's two batches, again
    assert (tmp_path / "one" / "submission.csv").read_bytes() == (tmp_path / "two" / "submission.csv").read_bytes()


def test_compaction_keeps_rows_another_process_added_meanwhile(tmp_path, monkeypatch):
    mine = EmbeddingStore(tmp_path / "s", {})
    mine.add(["a"], np.ones((1, 2), np.float32))
    other = EmbeddingStore(tmp_path / "s", {})  # another process, opened before the next row
    mine.add(["b"], np.full((1, 2), 2, np.float32))
    other.add(["c"], np.full((1, 2), 3, np.float32))
    write = helpers.infra.store.atomic_write_chunks

    def meanwhile(path, chunks):  # while the merged segment is written, after the segments to merge were listed
        if path.name.endswith("-merged.seg"):
            other.add(["d"], np.full((1, 2), 4, np.float32))
        write(path, chunks)

    monkeypatch.setattr(helpers.infra.store, "atomic_write_chunks", meanwhile)
    mine.compact(min_segments=2)  # merges a, b, c; d comes while it writes: removing all it lists then would lose d
    rows = EmbeddingStore(tmp_path / "s", {}).get(["a", "b", "c", "d"])
    assert np.array_equal(rows, [[1, 1], [2, 2], [3, 3], [4, 4]])


def test_a_store_reads_a_shard_merged_away_while_it_opened(tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path / "s", {})
    store.add(["a"], np.ones((1, 2), np.float32))
    store.add(["b"], np.zeros((1, 2), np.float32))
    read = helpers.infra.store.open_segment
    compacted = []

    def compact_first(segment):  # another process compacts between this one's listing and its reading
        if not compacted:
            compacted.append(segment)
            store.compact(min_segments=2)
        return read(segment)

    monkeypatch.setattr(helpers.infra.store, "open_segment", compact_first)
    assert len(EmbeddingStore(tmp_path / "s", {})) == 2
    assert compacted and not compacted[0].exists()  # the shard it listed first was gone when it came to read it


# --- fault injection: kill a run (SIGKILL) at several points, fill its disk, run two configs on one cache at once

_rng = random.Random(20261126)
# 38 images in batches of 8: 5 batches per model, each flushed as a segment. The .seg writes, in order: model a's
# prompts, its 5 image segments, its merged segment (5 small ones: compacted); then the same for model b (14 in all).
FAULTS = ([f"batch:{k}" for k in sorted(_rng.sample(range(1, 11), 3))]
          + [f"write:*.seg:{_rng.randint(1, 14)}", f"rename:*.seg:{_rng.randint(1, 14)}", "unlink:*.seg:1"])


def run_with_fault(fault: str, config, tmp_path: Path, out: Path) -> forked.Forked:
    path = tmp_path / f"{config.name}-{abs(hash(fault))}.yaml"
    path.write_text(json.dumps(config.to_dict()))
    return forked.start(fault_injection.main, [fault, str(path), "--output-dir", str(out), "--quiet"], PROJECT_ROOT)


def assert_only_whole_entries(cache: Path) -> None:
    for segment in cache.rglob("*.seg"):
        open_segment(segment).close()  # a half-written segment: CorruptSegment
    assert not list(cache.rglob("*.corrupt")) and not list(cache.rglob("*.npz"))


@pytest.mark.parametrize("fault", FAULTS + ["enospc:*.seg:4"])
def test_a_run_killed_or_out_of_space_resumes_to_the_same_submission(
        fault, scene_dir, tiny_arch, tiny_checkpoints, clean_submission, tmp_path, count_image_batches):
    config = fault_config(scene_dir, tiny_arch, tiny_checkpoints, tmp_path / "cache")
    out = tmp_path / "out"
    proc = run_with_fault(fault, config, tmp_path, out)
    _, err = proc.communicate(timeout=300)
    if fault.startswith("enospc"):
        assert proc.returncode == 2 and err.count("\n") == 1, err
        assert err.startswith("error: ") and ".seg: no space left on the device" in err
    else:
        assert proc.returncode == -9, err  # killed
    assert not (out / "submission.csv").exists()  # never half-written, and not written before the encode ends
    assert_only_whole_entries(tmp_path / "cache")

    expected = missing_batches(config)
    assert 0 < expected <= 10
    predict(config, out, progress=False)
    assert count_image_batches["n"] == expected  # the rerun encodes only what is missing
    assert (out / "submission.csv").read_bytes() == clean_submission
    assert not list(tmp_path.rglob(".*.tmp"))  # what the killed writer left was removed
    assert_only_whole_entries(tmp_path / "cache")


@pytest.mark.parametrize("fault", ["write:submission.csv:1", "enospc:config.yaml:1", "enospc:test_predictions.csv:1"])
def test_a_fault_while_writing_the_outputs_leaves_no_half_written_file(fault, scene_dir, tiny_arch, tiny_checkpoints,
                                                                     clean_submission, tmp_path, count_image_batches):
    config = fault_config(scene_dir, tiny_arch, tiny_checkpoints, tmp_path / "cache")
    out = tmp_path / "out"
    predict(config, out, progress=False)
    target = out / fault.split(":")[1]
    target.unlink()
    proc = run_with_fault(fault, config, tmp_path, out)
    _, err = proc.communicate(timeout=300)
    if fault.startswith("enospc"):
        # the last line (before it, notes such as "every embedding came from the cache")
        assert proc.returncode == 2 and err.splitlines()[-1] == (f"error: {target}: no space left on the device: free "
                                                                 "some space and run again; everything finished so "
                                                                 "far is kept")
        assert "Traceback" not in err
        assert not list(out.glob("*.tmp"))
    else:
        assert proc.returncode == -9 and list(out.glob(f".{target.name}~*.tmp"))  # half-written, never renamed
    assert not target.exists()
    predict(config, out, progress=False)
    assert (out / "submission.csv").read_bytes() == clean_submission and not list(out.glob("*.tmp"))
    assert yaml.safe_load((out / "config.yaml").read_text())["name"] == "faults"


def test_two_configs_on_one_cache_at_once_lose_nothing(scene_dir, tiny_arch, tiny_checkpoints, clean_submission,
                                                       tmp_path, count_image_batches):
    cache = tmp_path / "cache"
    first = fault_config(scene_dir, tiny_arch, tiny_checkpoints, cache)
    # shares model a's image store with the first (same weights and sharpening), not model b's
    second = fault_config(scene_dir, tiny_arch, tiny_checkpoints, cache, sharpness_b=3.0, name="other",
                          scoring="mean_logit", ensemble={"weights": {"a": 0.7, "b": 0.3}})
    meet = tmp_path / "meet"
    meet.mkdir()
    procs = [run_with_fault(f"meet:{meet}:2", c, tmp_path, tmp_path / c.name) for c in (first, second)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert_only_whole_entries(cache)
    assert missing_batches(first) == missing_batches(second) == 0

    alone = fault_config(scene_dir, tiny_arch, tiny_checkpoints, tmp_path / "alone", sharpness_b=3.0, name="other",
                         scoring="mean_logit", ensemble={"weights": {"a": 0.7, "b": 0.3}})
    predict(alone, tmp_path / "alone-out", progress=False)
    assert (tmp_path / "faults" / "submission.csv").read_bytes() == clean_submission
    assert (tmp_path / "other" / "submission.csv").read_bytes() == (
        tmp_path / "alone-out" / "submission.csv").read_bytes()
    count_image_batches["n"] = 0
    predict(first, tmp_path / "rerun", progress=False)
    assert count_image_batches["n"] == 0


def test_any_image_pillow_opens_is_read_and_any_other_file_is_named(scene_dir, make_config, tmp_path, caplog):
    """Images by content, not only by extension: a GIF, and a TIFF without one, are test images like the JPEGs; a
    file that is no image is named in a warning, never left out in silence."""
    root = tmp_path / "Scene"
    shutil.copytree(scene_dir, root)
    with Image.open(root / "0" / "0.jpg") as img:
        img.save(root / "0" / "9000.gif")
        img.save(root / "0" / "9001", format="TIFF")
    (root / "0" / "notes.txt").write_text("not an image")
    images = load_test_set(root)
    assert [p.name for p in images.files[-2:]] == ["9000.gif", "9001"] and images.ids[-2:] == [9000, 9001]
    assert f"data.test: 1 file(s) are not images and are not read: {root / '0' / 'notes.txt'}" in caplog.text
    predict(make_config(data={"test": str(root)}), tmp_path / "out", progress=False)
    assert read_submission(tmp_path / "out" / "submission.csv")[0] == [*SCENE_IDS, 9000, 9001]
