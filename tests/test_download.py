"""`make data` offline: a small challenge-shaped data.zip served by a fake hub that writes the real HF cache layout
(so `try_to_load_from_cache` finds it for real), and the real code path failing fast without network."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.hf_api import RepoFile

from helpers import models
from helpers.infra import download
from helpers.infra.download import DataUnavailableError, download_challenge_data
from helpers.research.data import CHALLENGE_CLASSES, DataError

N = 12  # images in the fake zip, standing in for the 8,100
COMMIT = "c0ffee" * 6 + "c0ff"  # a fake 40-hex commit hash for the cache layout


def make_zip(path: Path, prefix: str = "data/Scene/", n: int = N, classes: list[str] | None = None) -> Path:
    """A challenge-shaped zip: PREFIX/classes.json, PREFIX/0/<id>.jpg (the bytes need not decode), some noise."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}classes.json", json.dumps(classes or CHALLENGE_CLASSES))
        for i in range(n):
            z.writestr(f"{prefix}0/{i}.jpg", f"jpeg {i}".encode())
        z.writestr(f"__MACOSX/{prefix}0/._0.jpg", b"resource fork")  # as macOS zips have them
        if prefix:
            z.writestr("README.txt", "the challenge data")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def go_offline(monkeypatch) -> None:
    """The real offline check: HF_HUB_OFFLINE makes `host_reachable` answer False without touching the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models.checkpoints, "_reachable", {})
    monkeypatch.setattr(download, "host_reachable", models.checkpoints.host_reachable)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub for sw24/sw24: `hf_hub_download` copies the zip into the HF cache layout, the paths-info API
    reports its LFS sha256, and the host is reachable. Attributes change what it serves."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(download, "N_IMAGES", N)
    state = SimpleNamespace(zip=make_zip(tmp_path / "served.zip"), sha=None, online=True, downloads=[],
                            cache=cache, dest=tmp_path / "data")
    state.sha = sha256(state.zip)

    def fake_download(repo_id, filename, *, repo_type=None, revision=None, **kwargs):
        state.downloads.append((repo_id, filename, repo_type, revision))
        repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(COMMIT)
        target = repo / "snapshots" / COMMIT / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(state.zip, target)
        return str(target)

    def fake_paths_info(self, repo_id, paths, *, expand=False, revision=None, repo_type=None, token=None):
        assert (repo_id, paths, repo_type, revision) == ("sw24/sw24", "data.zip", "dataset", download.DATA_REVISION)
        lfs = {"size": state.zip.stat().st_size, "oid": state.sha, "pointerSize": 134}
        return [RepoFile(path=paths, size=state.zip.stat().st_size, oid="0" * 40, lfs=lfs)]

    monkeypatch.setattr(download, "hf_hub_download", fake_download)
    monkeypatch.setattr(HfApi, "get_paths_info", fake_paths_info)
    monkeypatch.setattr(download, "host_reachable", lambda host: state.online)
    return state


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


@pytest.mark.parametrize("prefix", ["data/Scene/", "Scene/", "sw24/test/", ""])
def test_downloads_verifies_and_places_scene(hub, prefix):
    make_zip(hub.zip, prefix)
    hub.sha = sha256(hub.zip)
    scene = download_challenge_data(hub.dest, progress=False)
    assert scene == hub.dest / "Scene"
    assert json.loads((scene / "classes.json").read_text()) == CHALLENGE_CLASSES
    assert sorted(int(p.stem) for p in (scene / "0").iterdir()) == list(range(N))
    assert (scene / "0" / "7.jpg").read_bytes() == b"jpeg 7"
    assert leftovers(scene) == ["0", "classes.json"]  # nor macOS's __MACOSX folder when the zip's root is Scene
    assert (hub.dest / "data.zip.sha256").read_text() == f"{hub.sha}  data.zip\n"
    assert hub.downloads == [("sw24/sw24", "data.zip", "dataset", download.DATA_REVISION)]
    assert leftovers(hub.dest) == ["Scene", "data.zip.sha256"]  # no temporary folder, nothing else of the zip


def test_second_call_is_a_no_op(hub, capsys):
    scene = download_challenge_data(hub.dest, progress=False)
    stamp = (scene / "0" / "0.jpg").stat().st_mtime_ns
    hub.online = False  # the second call must need neither the hub nor the cache
    shutil.rmtree(hub.cache)
    assert download_challenge_data(hub.dest, progress=False) == scene
    assert len(hub.downloads) == 1
    assert (scene / "0" / "0.jpg").stat().st_mtime_ns == stamp
    assert "already there" in capsys.readouterr().err


def test_checksum_mismatch_leaves_nothing(hub):
    actual, hub.sha = hub.sha, "0" * 64
    with pytest.raises(DataError) as e:
        download_challenge_data(hub.dest, progress=False)
    for part in ("data.zip", actual, "0" * 64, "the hub"):
        assert part in str(e.value)
    assert leftovers(hub.dest) == []  # no Scene, no temporary folder, no recorded checksum


def test_zip_without_the_test_set_leaves_nothing(hub):
    make_zip(hub.zip, n=N - 1)  # one image short
    hub.sha = sha256(hub.zip)
    with pytest.raises(DataError, match=f"expected {N} images with ids 0..{N - 1}, found {N - 1}; missing e.g. "):
        download_challenge_data(hub.dest, progress=False)
    assert leftovers(hub.dest) == ["data.zip.sha256"]  # the zip itself was fine; nothing half-unpacked


def test_wrong_classes_are_rejected(hub):
    make_zip(hub.zip, classes=["Sea", "Street"])
    hub.sha = sha256(hub.zip)
    with pytest.raises(DataError, match="classes.json: expected"):
        download_challenge_data(hub.dest, progress=False)
    assert not (hub.dest / "Scene").exists()


def test_find_scene_wherever_it_is(tmp_path):
    for folder in ("x/Scene/0", "x/train/buildings", "y/other/0"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder).parent.joinpath("classes.json").write_text("[]")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "classes.json").write_text("[]")  # no image sub-folder: not a candidate
    assert download.find_scene(tmp_path) == tmp_path / "x" / "Scene"  # several candidates: the one called Scene
    shutil.rmtree(tmp_path / "x" / "Scene")
    with pytest.raises(DataError, match="found: x/train, y/other"):
        download.find_scene(tmp_path)
    shutil.rmtree(tmp_path / "x")
    assert download.find_scene(tmp_path) == tmp_path / "y" / "other"  # a single candidate, whatever its name
    shutil.rmtree(tmp_path / "y")
    with pytest.raises(DataError, match="found: none"):
        download.find_scene(tmp_path)


def test_invalid_existing_scene_is_an_error(hub):
    scene = hub.dest / "Scene"
    (scene / "0").mkdir(parents=True)
    (scene / "classes.json").write_text(json.dumps(CHALLENGE_CLASSES))
    (scene / "0" / "0.jpg").write_bytes(b"jpeg")
    with pytest.raises(DataError, match="exists but is not the challenge test set .*remove it"):
        download_challenge_data(hub.dest, progress=False)
    assert hub.downloads == []
    assert leftovers(scene) == ["0", "classes.json"]  # untouched


def test_offline_without_cache_fails_at_once(hub, monkeypatch):
    go_offline(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(DataUnavailableError) as e:
        download_challenge_data(hub.dest, progress=False)
    assert time.perf_counter() - start < 0.5
    message = str(e.value)
    for part in ("sw24/sw24", "data.zip", str(hub.cache), "no network", str(hub.dest / "Scene"), "data.test: PATH",
                 "--set data.test=PATH"):
        assert part in message
    assert hub.downloads == [] and leftovers(hub.dest) == []


def test_cached_zip_offline_is_checked_against_the_recorded_checksum(hub, monkeypatch):
    download_challenge_data(hub.dest, progress=False)
    shutil.rmtree(hub.dest / "Scene")
    go_offline(monkeypatch)
    scene = download_challenge_data(hub.dest, progress=False)
    assert len(hub.downloads) == 1 and sorted(p.name for p in (scene / "0").iterdir())[0] == "0.jpg"

    shutil.rmtree(scene)
    (hub.dest / "data.zip.sha256").write_text(f"{'f' * 64}  data.zip\n")  # recorded for another zip
    with pytest.raises(DataError) as e:
        download_challenge_data(hub.dest, progress=False)
    assert hub.sha in str(e.value) and "f" * 64 in str(e.value) and "recorded earlier" in str(e.value)
    assert leftovers(hub.dest) == ["data.zip.sha256"]


def test_cached_zip_offline_without_a_record_is_recorded_unverified(hub, monkeypatch, capsys):
    download_challenge_data(hub.dest, progress=False)
    shutil.rmtree(hub.dest)
    go_offline(monkeypatch)
    assert download_challenge_data(hub.dest) == hub.dest / "Scene"  # with progress bars, for once
    assert (hub.dest / "data.zip.sha256").read_text() == f"{hub.sha}  data.zip\n"
    assert "could not be verified" in capsys.readouterr().err


def test_real_hub_code_fails_fast_offline(tmp_path, monkeypatch):
    """No fakes: the real huggingface_hub calls with HF_HUB_OFFLINE=1 and an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models.checkpoints, "_reachable", {})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(DataUnavailableError, match="data.zip of the Hugging Face dataset sw24/sw24") as e:
        download_challenge_data(tmp_path / "data")
    assert time.perf_counter() - start < 1.0
    assert str(tmp_path / "empty-cache") in str(e.value)
    assert not (tmp_path / "data").exists()
