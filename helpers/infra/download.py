"""The challenge test set: `data.zip` of the Hugging Face dataset `sw24/sw24`, unpacked to `data/Scene` (`make data`).

The zip goes through the local Hugging Face cache (so a second checkout, or a machine without network that has the
cache, needs no download), is checked against the sha256 the hub records for it, and is unpacked into a temporary
folder that is renamed to `Scene` only once its contents are the 8,100 challenge images: an interrupted or failed
run never leaves a half-filled `Scene` that a later run would take for the real one.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm

from ..models.checkpoints import hf_cache_dir, host_reachable, hub_host
from ..research.data import CHALLENGE_CLASSES, DataError, ImageSet, load_test_set
from .errors import UserError

DATA_REPO = "sw24/sw24"  # a dataset repo (repo_type="dataset")
DATA_FILE = "data.zip"
# The branch, for now: replace it by the repo's commit hash once it is known, so that the download cannot change.
DATA_REVISION = "main"
N_IMAGES = 8100
CHECKSUM_FILE = "data.zip.sha256"  # beside Scene: what the zip was verified as, for later offline runs


class DataUnavailableError(UserError, RuntimeError):
    """The challenge data is neither on disk nor downloadable here; the message says what to do."""


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _what(revision: str) -> str:
    return f"{DATA_FILE} of the Hugging Face dataset {DATA_REPO} (revision {revision})"


def _without_network(dest: Path) -> str:
    return (f"Download it where there is network (it lands in that cache), or copy the challenge's Scene folder "
            f"(classes.json and 0/<id>.jpg) to {dest / 'Scene'}, or point a run at such a folder with `data.test: "
            f"PATH` in the run config or `--set data.test=PATH`")


def validate_scene(root: Path, expected_images: int | None = None) -> ImageSet:
    """The challenge test folder, or a DataError saying how `root` differs from it."""
    expected_images = N_IMAGES if expected_images is None else expected_images
    images = load_test_set(root)
    if images.classes != CHALLENGE_CLASSES:
        raise DataError(f"{root}/classes.json: expected {CHALLENGE_CLASSES}, found {images.classes}")
    if sorted(images.ids) != list(range(expected_images)):
        missing = sorted(set(range(expected_images)) - set(images.ids))
        extra = sorted(set(images.ids) - set(range(expected_images)))
        raise DataError(f"{root}: expected {expected_images} images with ids 0..{expected_images - 1}, found "
                        f"{len(images)}" + (f"; missing e.g. {missing[:3]}" if missing else "")
                        + (f"; unexpected e.g. {extra[:3]}" if extra else ""))
    return images


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Streamed in chunks: the zip does not need to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hub_sha256(revision: str = DATA_REVISION) -> str:
    """The sha256 the hub records for the zip (its LFS object id), asked without downloading the file."""
    infos = HfApi().get_paths_info(DATA_REPO, DATA_FILE, repo_type="dataset", revision=revision)
    if not infos:
        raise DataError(f"{_what(revision)}: the hub has no such file")
    if getattr(infos[0], "lfs", None) is None:
        raise DataError(f"{_what(revision)} is not an LFS file on the hub: there is no sha256 to verify it against")
    return infos[0].lfs.sha256


@contextmanager
def _hub_progress(enabled: bool):
    """huggingface_hub's own download bar, switched off for progress=False and restored afterwards."""
    switch = not enabled and not are_progress_bars_disabled("huggingface_hub")
    if switch:
        disable_progress_bars("huggingface_hub")
    try:
        yield
    finally:
        if switch:
            enable_progress_bars("huggingface_hub")


def _read_recorded(dest: Path) -> str | None:
    path = dest / CHECKSUM_FILE
    words = path.read_text().split() if path.is_file() else []
    return words[0] if words else None


def fetch_zip(dest: Path, revision: str = DATA_REVISION, progress: bool = True) -> tuple[Path, str]:
    """The zip in the local HF cache and its verified sha256 (also written to dest/data.zip.sha256).

    Online, the hub's sha256 is the reference. Offline, a cached zip is checked against the hash recorded by an
    earlier run; without one, it is recorded now and said to be unverified. Offline without a cached zip, this
    fails at once instead of letting huggingface_hub retry.
    """
    if host_reachable(hub_host()):  # hf_hub_download then uses the cache itself, after asking for the commit
        try:
            expected = hub_sha256(revision)
            with _hub_progress(progress):
                path = Path(hf_hub_download(DATA_REPO, DATA_FILE, repo_type="dataset", revision=revision))
        except OSError as e:  # requests' and huggingface_hub's HTTP errors are OSErrors
            raise DataUnavailableError(f"cannot download {_what(revision)} into {hf_cache_dir()}: {e}. "
                                       f"{_without_network(dest)}.") from e
        source = "the hub"
    else:
        cached = try_to_load_from_cache(DATA_REPO, DATA_FILE, revision=revision, repo_type="dataset")
        if not isinstance(cached, str):
            raise DataUnavailableError(f"{_what(revision)} is not in the local cache ({hf_cache_dir()}) and cannot "
                                       f"be downloaded from here (no network). {_without_network(dest)}.")
        path, expected, source = Path(cached), _read_recorded(dest), f"{dest / CHECKSUM_FILE} (recorded earlier)"
    actual = file_sha256(path)
    if expected is not None and actual != expected:
        # the cache's snapshot entry is a link to a blob, and the blob is what must go
        raise DataError(f"{path}: sha256 {actual} does not match {expected} from {source}; the file is damaged "
                        f"or another version: delete {path.resolve()} and run `make data` again")
    if expected is None:
        _note(f"note: no network to ask the hub, so {path} could not be verified against it; its sha256 {actual} "
              f"is recorded in {dest / CHECKSUM_FILE} and later runs are checked against that")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / CHECKSUM_FILE).write_text(f"{actual}  {DATA_FILE}\n")  # the format of sha256sum
    return path, actual


def _unzip(zip_path: Path, into: Path, progress: bool) -> None:
    with zipfile.ZipFile(zip_path) as z:
        # macOS's resource forks (__MACOSX/.../._0.jpg) would look like images with bad names
        members = [m for m in z.infolist() if not m.filename.startswith("__MACOSX/")]
        for member in tqdm(members, desc=f"unpacking {DATA_FILE}", unit="file", disable=not progress):
            z.extract(member, into)  # extract() drops absolute paths and '..', so nothing lands outside `into`


def find_scene(root: Path) -> Path:
    """The folder of the extracted tree that holds classes.json and the image sub-folder (the zip's layout is
    not documented; a folder called Scene wins if there are several)."""
    found = sorted(p.parent for p in root.rglob("classes.json") if any(d.is_dir() for d in p.parent.iterdir()))
    named = [p for p in found if p.name == "Scene"]
    if len(found) == 1 or len(named) == 1:
        return found[0] if len(found) == 1 else named[0]
    where = ", ".join(str(p.relative_to(root)) for p in found) or "none"
    raise DataError(f"{DATA_FILE}: expected one folder with classes.json and an image sub-folder, found: {where}")


def download_challenge_data(dest: Path = Path("data"), progress: bool = True) -> Path:
    """`dest/Scene` holding the 8,100 challenge test images, downloaded, verified and unpacked if not there."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DataError(f"--dest {dest} is a file, not a folder: give the folder that is to receive Scene/")
    scene = dest / "Scene"
    if scene.exists():
        try:
            validate_scene(scene)
        except DataError as e:
            raise DataError(f"{scene} exists but is not the challenge test set ({e}); remove it and run "
                            f"`make data` again") from e
        _note(f"{scene} is already there and complete; nothing to do")
        return scene
    zip_path, _ = fetch_zip(dest, DATA_REVISION, progress)
    # Under dest, so that the final rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=".Scene-unpacking-", dir=dest))
    try:
        _unzip(zip_path, tmp, progress)
        try:
            images = validate_scene(find_scene(tmp))
        except DataError as e:
            raise DataError(f"{zip_path} does not hold the challenge test set: {e}") from e
        images.root.rename(scene)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the rest of the zip, or everything after a failure
    _note(f"wrote {scene} ({len(images)} images; the sha256 of {DATA_FILE} is in {dest / CHECKSUM_FILE})")
    return scene
