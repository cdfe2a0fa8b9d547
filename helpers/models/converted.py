"""A safetensors copy of pickled weight shards in the precision a model is run in, kept in the workbench's cache.

EVA-CLIP-18B's hub repository holds its weights as eight fp32 `.bin` pickles (about 72 GB). `from_pretrained(dtype=
float16)` unpickles each into host memory and casts it, every time: the winner's load took 9.5 minutes. After the
first load, the shards are converted once, shard by shard, into fp16 safetensors (36.7 GB) in a model folder of the
cache (`<cache_dir>/weights/<repo>--<revision>--<precision>`, with the config, remote code and tokenizer files), and
every later load reads that folder: memory-mapped, each tensor straight onto its device, nothing cast.

The copy is written atomically: each file is written whole or not at all (`infra.files.atomic_file`), and the record
`converted_from.json`, written last, names the shards it came from (name, size, and in the hub cache the sha256 that
names its blob). Each converted shard is read back and checked against its source shard (every tensor equal to the
source's, cast) before the record is written, and a later load uses the copy only if the record matches the shards
the source holds now. Two processes converting at once (torchrun's ranks) take turns on a lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..infra.files import atomic_file, atomic_write_text, read_json_or_none
from .checkpoints import WeightsUnavailableError
from .shards import indexed_shards

log = logging.getLogger(__name__)

RECORD = "converted_from.json"
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def copy_folder_name(source: str, revision: str | None, precision: str) -> str:
    """The copy's folder name: the repo and revision (a hub id), or the folder's name and a hash of its path."""
    if revision is not None or not Path(source).is_dir():
        return f"{source.replace('/', '--')}--{revision or 'main'}--{precision}"
    digest = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:12]
    return f"{Path(source).name}--{digest}--{precision}"


def _shard_stamp(path: Path) -> dict:
    """What identifies a shard: its size, and in the hub cache the sha256 its blob is named by (a link's target)."""
    stamp = {"size": path.stat().st_size}
    if path.is_symlink():
        stamp["blob"] = Path(os.readlink(path)).name
    return stamp


def source_shards(folder: Path) -> list[str]:
    """The pickled weight files of a model folder: the shards its index names, else its single pytorch_model.bin."""
    from transformers.utils import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        return indexed_shards(index, str(folder))
    return [WEIGHTS_NAME] if (folder / WEIGHTS_NAME).is_file() else []


class ConvertedCopy:
    """The safetensors copy, in `dtype`, of the pickled shards in `source` (a model folder or a hub snapshot)."""

    def __init__(self, folder: Path, source: Path, dtype: torch.dtype, what: str):
        self.folder, self.source, self.dtype, self.what = Path(folder), Path(source), dtype, what

    def expected_record(self, shards: list[str]) -> dict:
        """The record of a copy converted from `shards` as the source holds them now."""
        return {"source": self.what, "dtype": str(self.dtype).removeprefix("torch."),
                "shards": {name: _shard_stamp(self.source / name) for name in shards}}

    @property
    def ready(self) -> bool:
        """Whether the copy is whole and was converted from the shards the source holds now."""
        record = read_json_or_none(self.folder / RECORD, dict)
        return record is not None and record == self.expected_record(source_shards(self.source))

    def write(self) -> None:
        """Convert the source's shards, one at a time, check each, then write the record (see the module)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same shards
            shards = source_shards(self.source)
            if read_json_or_none(self.folder / RECORD, dict) == self.expected_record(shards):
                return
            (self.folder / RECORD).unlink(missing_ok=True)
            self._check_space(shards)
            self._copy_small_files()
            weight_map, total = {}, 0
            for number, shard in enumerate(shards, 1):
                name = (f"model-{number:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                        else "model.safetensors")
                converted = self._convert(self.source / shard, self.folder / name)
                weight_map.update(dict.fromkeys(converted, name))
                total += sum(t.numel() * t.element_size() for t in converted.values())
                del converted
            if len(shards) > 1:
                atomic_write_text(self.folder / INDEX, json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
            atomic_write_text(self.folder / RECORD, json.dumps(self.expected_record(shards), indent=2))
        log.info("converted the %s weights of %s into %s (%.2f GB of safetensors)", self.dtype, self.what,
                 self.folder, total / 1e9)

    def _check_space(self, shards: list[str]) -> None:
        """An OSError before any work when the disk cannot hold the copy (about the shards' size in their dtype's
        share: half of fp32 shards for fp16)."""
        share = torch.finfo(self.dtype).bits / 32 if self.dtype.is_floating_point else 1
        needed = int(sum((self.source / name).stat().st_size for name in shards) * share)
        free = shutil.disk_usage(self.folder).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"the copy needs about {needed / 1e9:.1f} GB and the disk has "
                          f"{free / 1e9:.1f} GB free", str(self.folder))

    def _copy_small_files(self) -> None:
        """The config, remote code and tokenizer files: the copy is a model folder of its own."""
        for path in sorted(self.source.iterdir()):
            weights = path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json")
            if path.is_file() and not weights and not path.name.startswith("."):
                with atomic_file(self.folder / path.name) as (fd, _):
                    with open(path, "rb") as src, os.fdopen(fd, "wb", closefd=False) as dst:
                        shutil.copyfileobj(src, dst)

    def _convert(self, shard: Path, target: Path) -> dict[str, torch.Tensor]:
        """One shard in `dtype` as safetensors (floating tensors cast as from_pretrained casts them), read back and
        checked tensor by tensor against the shard; returns the converted tensors."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        try:  # torch.save's zip files are memory-mapped (read as they are cast), legacy pickles read whole
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(shard, map_location="cpu", weights_only=True)
        converted = {key: (t.to(self.dtype) if t.is_floating_point() else t).contiguous().clone()
                     for key, t in state.items()}
        with atomic_file(target) as (_, tmp):
            save_file(converted, tmp, metadata={"format": "pt"})
            with safe_open(tmp, framework="pt") as written:
                differs = sorted(set(written.keys()) ^ set(converted)) or [
                    key for key, tensor in converted.items() if not torch.equal(written.get_tensor(key), tensor)]
                if differs:
                    raise WeightsUnavailableError(
                        f"{target}: the converted copy's tensor {differs[0]} differs from that of {shard} (a fault "
                        "of the disk or of the conversion): it was not kept; load again, or set convert_weights: "
                        "false")
        return converted
