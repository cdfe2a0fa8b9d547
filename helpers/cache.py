"""The embedding cache (SPEC 2): encoding images is the only expensive step, so it is done once.

Image embeddings are keyed by (model identity, preprocessing) -> folder, and by the image file's content -> row;
text embeddings by model identity -> folder and prompt string -> row. A folder holds .npz shards, each written to a
temporary file and renamed into place, so a crash leaves only whole shards. An encode flushes a shard every few
hundred images and on any interruption, and a rerun encodes only what is missing, in the same batches as an
uninterrupted run would, so it ends with the same numbers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from .data import DataError, ImageFiles, ImageSet, Preprocess, UnreadableImage, collate_images, file_digest, scan_images
from .files import atomic_write_bytes, remove_stale_temporaries
from .models import ModelHandle

log = logging.getLogger(__name__)


def json_digest(obj) -> str:
    """A short sha256 of an object's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[-48:].strip("_") or "model"


class EmbeddingStore:
    """A folder of .npz shards mapping string keys to float32 vectors.

    Safe with several processes on one folder: a shard is written whole or not at all (`atomic_write_bytes`), a
    shard that cannot be read is set aside (renamed `*.corrupt`) and its rows are computed again, and compaction
    merges, under a lock, exactly the shards it read, so rows another process adds meanwhile are never lost.
    """

    def __init__(self, root: Path, description: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "key.json").exists():
            atomic_write_bytes(self.root / "key.json", json.dumps(description, indent=2, sort_keys=True).encode())
        remove_stale_temporaries(self.root)
        self._rows: dict[str, np.ndarray] = {}
        self._load()

    def _load(self) -> None:
        read: set[str] = set()
        while True:  # a shard merged away by a concurrent compaction is in the merged shard: look again
            shards = [s for s in sorted(self.root.glob("*.npz")) if s.name not in read]
            vanished = False
            for shard in shards:
                read.add(shard.name)
                rows = read_shard(shard)
                if rows is None:
                    vanished = True
                else:
                    self._rows.update(rows)
            if not vanished:
                return

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def get(self, keys: list[str]) -> np.ndarray:
        missing = [k for k in keys if k not in self._rows]
        if missing:
            raise KeyError(f"{len(missing)} keys not in the embedding cache {self.root}, e.g. {missing[0]}")
        return np.stack([self._rows[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        name = f"{time.time_ns()}-{os.getpid()}-{json_digest(keys)}.npz"
        buf = _npz_bytes(keys=np.array(keys), vectors=vectors)
        atomic_write_bytes(self.root / name, buf)
        self._rows.update(zip(keys, vectors))

    def compact(self) -> None:
        """Merge the shards into one. The merged shard is written before the merged ones are removed, so a crash
        loses nothing, and only the shards read here are removed, so another process's new shards stay."""
        with FileLock(self.root / ".compact.lock"):
            shards = sorted(self.root.glob("*.npz"))
            if len(shards) < 2:
                return
            rows: dict[str, np.ndarray] = {}
            merged_shards = []
            for shard in shards:
                shard_rows = read_shard(shard)
                if shard_rows is not None:
                    rows.update(shard_rows)
                    merged_shards.append(shard)
            keys = sorted(rows)
            merged = self.root / f"{time.time_ns()}-{os.getpid()}-merged.npz"
            atomic_write_bytes(merged, _npz_bytes(keys=np.array(keys), vectors=np.stack([rows[k] for k in keys])))
            for shard in merged_shards:
                shard.unlink(missing_ok=True)


def read_shard(shard: Path) -> dict[str, np.ndarray] | None:
    """The rows of one shard; None if it vanished (merged away); a shard that cannot be read is set aside, with a
    warning that names it, and counts as empty, so its rows are computed again."""
    problem = None
    try:
        with np.load(shard, allow_pickle=False) as z:
            keys, vectors = z["keys"], z["vectors"]
        if keys.ndim != 1 or vectors.ndim != 2 or len(keys) != len(vectors) or vectors.dtype != np.float32:
            raise ValueError(f"keys {keys.shape} and vectors {vectors.shape} {vectors.dtype} do not match")
    except OSError as e:
        if isinstance(e, FileNotFoundError) or e.errno == errno.ESTALE:  # merged away, maybe on another host
            return None
        if e.errno is not None:  # no permission, an I/O error: not the shard's fault, and not to be hidden
            raise
        problem = e
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError) as e:  # truncated or damaged
        problem = e
    if problem is not None:
        aside = shard.with_name(shard.name + ".corrupt")
        try:
            shard.replace(aside)
        except FileNotFoundError:  # another process set it aside first
            pass
        log.warning("embedding cache: %s is unreadable (%s: %s); set aside as %s, its rows will be computed again",
                    shard, type(problem).__name__, problem, aside.name)
        return {}
    return dict(zip(keys.tolist(), vectors))


class CheckedImages:
    """Content digests of the image files that decoded, so that each image is checked once per cache: text shards
    of one digest a line, written atomically and never rewritten."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir) / "checked-images"
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.root)
        self._digests = {d for shard in sorted(self.root.glob("*.txt")) for d in shard.read_text().split()}

    def __contains__(self, digest: str) -> bool:
        return digest in self._digests

    def add(self, digests: list[str]) -> None:
        new = sorted(set(digests) - self._digests)
        if new:
            atomic_write_bytes(self.root / f"{time.time_ns()}-{os.getpid()}.txt", "\n".join(new).encode() + b"\n")
            self._digests.update(new)


def check_images(images: ImageSet, cache_dir: str | Path, progress: bool = False) -> dict[int, str]:
    """Read every file of the set once: its content digest (the cache key) into `images.digests`, and whether it
    decodes, for the files not checked before in this cache. Returns the positions of the unusable files -> why."""
    checked = CheckedImages(cache_dir)
    results = scan_images(images.files, checked, progress, desc=f"check {images.root.name}")
    images.digests = [digest for digest, _ in results]
    checked.add([digest for digest, problem in results if digest is not None and problem is None])
    return {i: problem for i, (_, problem) in enumerate(results) if problem is not None}


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def image_store(cache_dir: str | Path, handle: ModelHandle, preprocess: Preprocess) -> EmbeddingStore:
    description = {"model": handle.identity, "preprocess": preprocess.key()}
    name = f"{_slug(str(handle.entry.arch or handle.entry.pretrained))}-{json_digest(description)}"
    return EmbeddingStore(Path(cache_dir) / "images" / name, description)


def text_store(cache_dir: str | Path, handle: ModelHandle) -> EmbeddingStore:
    description = {"model": handle.text_identity}
    name = f"{_slug(str(handle.entry.arch or handle.entry.pretrained))}-{json_digest(description)}"
    return EmbeddingStore(Path(cache_dir) / "texts" / name, description)


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def encode_texts(handle: ModelHandle, texts: list[str], cache_dir: str | Path, chunk: int = 1024) -> np.ndarray:
    """Text embeddings of `texts`, encoding only the prompts not yet cached (all at once, as the winner did)."""
    store = text_store(cache_dir, handle)
    keys = [text_key(t) for t in texts]
    todo = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in store))
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        store.add([text_key(t) for t in part], handle.encoder.encode_texts(part).numpy())
    return store.get(keys)


def default_num_workers(device: torch.device) -> int:
    """Decoding processes: none on the CPU, where they take cores from the model's own threads (measured on 2 cores:
    8% slower with 2 workers than decoding in between batches), up to 8 beside a GPU, which one process decoding
    about 650 images/s could not keep busy."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


FLUSH_EVERY = 512  # images an encode keeps in memory before it writes them to the cache as one shard


def encode_images(handle: ModelHandle, files: list[Path], preprocess: Preprocess, cache_dir: str | Path,
                  digests: list[str] | None = None, num_workers: int | None = None, flush_every: int | None = None,
                  progress: bool = True) -> np.ndarray:
    """Image embeddings of `files` under `preprocess` (L2-normalised float32, one row per file), encoding only
    what the cache lacks.

    Batches are the fixed slices [i*B, (i+1)*B) of `files`; a batch with any image missing is encoded whole, so a
    resumed encode computes exactly what an uninterrupted one would. `num_workers` defaults to
    `default_num_workers(handle.device)`.
    """
    num_workers = default_num_workers(handle.device) if num_workers is None else num_workers
    store = image_store(cache_dir, handle, preprocess)
    digests = digests if digests is not None else [file_digest(p) for p in files]
    bs = handle.entry.batch_size
    batches = [list(range(s, min(s + bs, len(files)))) for s in range(0, len(files), bs)]
    todo = [b for b in batches if any(digests[i] not in store for i in b)]
    if todo:
        loader = torch.utils.data.DataLoader(
            ImageFiles(files, preprocess.transform()), batch_sampler=todo, num_workers=num_workers,
            collate_fn=collate_images, pin_memory=handle.device.type == "cuda", persistent_workers=False,
        )
        pending_keys: list[str] = []
        pending: list[np.ndarray] = []
        desc = f"encode {handle.name} (sharpness {preprocess.sharpness:g})"
        bar = tqdm(total=sum(map(len, todo)), unit="img", desc=desc, disable=not progress)
        try:
            for batch, pixels in zip(todo, loader):
                if isinstance(pixels, UnreadableImage):  # changed or removed since the check
                    raise DataError(pixels.message)
                pending.append(handle.encoder.encode_images(pixels).numpy())
                pending_keys += [digests[i] for i in batch]
                bar.update(len(batch))
                if len(pending_keys) >= (flush_every or FLUSH_EVERY):
                    store.add(pending_keys, np.concatenate(pending))
                    pending_keys, pending = [], []
        finally:
            bar.close()
            if pending_keys:  # keep what was computed, even when interrupted
                store.add(pending_keys, np.concatenate(pending))
        store.compact()
    return store.get(digests)
