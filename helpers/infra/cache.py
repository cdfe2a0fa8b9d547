"""The embedding cache (SPEC 2): encoding images is the only expensive step, so it is done once.

Image embeddings are keyed by (model identity, preprocessing) -> folder, and by the image file's content -> row;
text embeddings by model identity -> folder and prompt string -> row. A folder holds append-only segment files
(`EmbeddingStore`), each written to a temporary file and renamed into place, so a crash leaves only whole segments.
An encode flushes a segment every few hundred images and on any interruption, and a rerun encodes only what is
missing, in the same batches as an uninterrupted run would, so it ends with the same numbers.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ..config import json_digest
from ..research.data import DataError, ImageSet, file_digest, open_image, scan_images
from ..research.steps import Preprocess
from .distributed import ONE_PROCESS, World
from .errors import one_line
from .files import atomic_write_bytes, remove_stale_temporaries, slug
from .ledger import record_encode
from .store import EmbeddingStore

if TYPE_CHECKING:  # torch is imported where images are encoded: a run's own process needs none of it
    import torch

    from ..models import ModelHandle


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


def image_store(cache_dir: str | Path, handle: ModelHandle, preprocess: Preprocess) -> EmbeddingStore:
    description = {"model": handle.identity, "preprocess": preprocess.key()}
    name = f"{slug(handle.entry.arch or handle.entry.pretrained, 48, default='model')}-{json_digest(description)}"
    return EmbeddingStore(Path(cache_dir) / "images" / name, description)


def text_store(cache_dir: str | Path, handle: ModelHandle, texts: list[str]) -> EmbeddingStore:
    """The store of `handle`'s prompt features; under `exact_batches`, one per prompt list (see encode_texts)."""
    description = {"model": handle.text_identity}
    if handle.exact_batches:
        description["prompt_list"] = json_digest(texts)
    name = f"{slug(handle.entry.arch or handle.entry.pretrained, 48, default='model')}-{json_digest(description)}"
    return EmbeddingStore(Path(cache_dir) / "texts" / name, description)


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def encode_texts(handle: ModelHandle, texts: list[str], cache_dir: str | Path, chunk: int = 1024) -> np.ndarray:
    """Text embeddings of `texts`, encoding only the prompts not yet cached (all at once, as the winner did). Under
    the winner's autocast on a GPU a prompt's features can depend on the others in its batch (and for EVA-CLIP on
    their padded length), so there each prompt list has its own store and is encoded whole."""
    store = text_store(cache_dir, handle, texts)
    keys = [text_key(t) for t in texts]
    todo = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in store))
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        store.add([text_key(t) for t in part], handle.encoder.encode_texts(part).cpu().numpy())
    if todo:
        store.compact()  # each new prompt set adds a small segment: merged, they stay few (each one open costs files)
    return store.get(keys)


class ImageFiles:
    """Decodes and preprocesses image files, for a DataLoader (a map-style dataset: `len` and `[i]`)."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor | UnreadableImage:
        try:
            return self.transform(open_image(self.files[i]))
        except (DataError, OSError) as e:  # passed on as a value: see UnreadableImage
            return UnreadableImage(one_line(e))


@dataclass(frozen=True)
class UnreadableImage:
    """An image that failed to decode in a DataLoader worker. Torch re-raises a worker's exception with the worker's
    traceback pasted into its message; passed on as a value, the error reaches the user as the one line it is."""

    message: str


def collate_images(items: list) -> torch.Tensor | UnreadableImage:
    """A batch of preprocessed images, or the first failure among them."""
    from torch.utils.data import default_collate

    failed = next((item for item in items if isinstance(item, UnreadableImage)), None)
    return failed or default_collate(items)


def image_batches(files: list[Path], preprocess: Preprocess, batches: list[list[int]], num_workers: int,
                  pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The preprocessed pixels of each batch of `files` (a batch: a list of positions), in order, decoded by
    `num_workers` processes ahead of their use (0: in this process, when the batch is asked for); a batch with an
    image that cannot be read is its `UnreadableImage`."""
    from torch.utils.data import DataLoader

    return DataLoader(ImageFiles(files, preprocess.transform()), batch_sampler=batches,
                      num_workers=num_workers, collate_fn=collate_images, pin_memory=pin_memory,
                      persistent_workers=False)


def default_num_workers(device: torch.device) -> int:
    """Decoding processes: none on the CPU, where they take cores from the model's own threads (measured on 2 cores:
    8% slower with 2 workers than decoding in between batches), up to 8 beside a GPU, which one process decoding
    about 650 images/s could not keep busy."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


FLUSH_EVERY = 512  # images an encode keeps in memory before it writes them to the cache as one shard


def ensure_encoded(handle: ModelHandle, files: list[Path], preprocess: Preprocess, cache_dir: str | Path,
                   digests: list[str] | None = None, num_workers: int | None = None, flush_every: int | None = None,
                   progress: bool = True, world: World = ONE_PROCESS) -> EmbeddingStore:
    """Encode what the cache lacks of `files` under `preprocess`; returns the store, which then holds them all.

    Batches are the fixed slices [i*B, (i+1)*B) of `files`; a batch with any image missing is encoded whole, so a
    resumed encode computes exactly what an uninterrupted one would. Under torchrun each rank encodes its share of
    those batches (`World.share`), and the ranks meet before this returns. `num_workers` defaults to
    `default_num_workers(handle.device)`.
    """
    import torch

    num_workers = default_num_workers(handle.device) if num_workers is None else num_workers
    store = image_store(cache_dir, handle, preprocess)
    digests = digests if digests is not None else [file_digest(p) for p in files]
    bs = handle.entry.batch_size
    batches = [list(range(s, min(s + bs, len(files)))) for s in range(0, len(files), bs)]
    present = store.contains(digests)
    todo = world.agree([b for b in batches if not present[b].all()])
    mine = world.share(todo)
    # an image that appears twice (the same bytes) is stored from the batch of its first place only, so its row
    # never depends on which rank or run wrote first
    first = {d: i for i, d in reversed(list(enumerate(digests)))}
    if mine:
        loader = image_batches(files, preprocess, mine, num_workers, pin_memory=handle.device.type == "cuda")
        pending_keys: list[str] = []
        pending: list[torch.Tensor] = []  # on the model's device until the flush: no wait for the host per batch
        desc = f"encode {handle.name} ({preprocess.describe()})"
        bar = tqdm(total=sum(map(len, mine)), unit="img", desc=desc, disable=not (progress and world.is_main))
        computed = 0
        try:
            for batch, pixels in zip(mine, loader):
                if isinstance(pixels, UnreadableImage):  # changed or removed since the check
                    raise DataError(pixels.message)
                rows = handle.encoder.encode_images(pixels)
                own = [k for k, i in enumerate(batch) if first[digests[i]] == i]
                pending.append(rows if len(own) == len(batch) else rows[own])
                pending_keys += [digests[batch[k]] for k in own]
                bar.update(len(batch))
                computed += len(batch)
                if len(pending_keys) >= (flush_every or FLUSH_EVERY):
                    store.add(pending_keys, torch.cat(pending).cpu().numpy())
                    pending_keys, pending = [], []
        finally:
            bar.close()
            if pending_keys:  # keep what was computed, even when interrupted
                store.add(pending_keys, torch.cat(pending).cpu().numpy())
            record_encode(handle.name, store.root.name, computed)  # a sweep counts a point's encodes
    world.barrier()
    if world.size > 1:
        store.refresh()  # the other ranks' rows
        lost = int((~store.contains(digests)).sum()) if world.is_main else 0
        if lost:
            raise DataError(f"{lost} image embeddings that the other processes wrote are not in {store.root}: "
                            "under torchrun, cache_dir must be a folder that every process (and machine) sees")
    if todo and world.is_main:
        store.compact()
    return store


def encode_images(handle: ModelHandle, files: list[Path], preprocess: Preprocess, cache_dir: str | Path,
                  digests: list[str] | None = None, num_workers: int | None = None, flush_every: int | None = None,
                  progress: bool = True) -> np.ndarray:
    """Image embeddings of `files` under `preprocess` (L2-normalised float32, one row per file), encoding only
    what the cache lacks (`ensure_encoded`)."""
    digests = digests if digests is not None else [file_digest(p) for p in files]
    store = ensure_encoded(handle, files, preprocess, cache_dir, digests, num_workers, flush_every, progress)
    return store.get(digests)
