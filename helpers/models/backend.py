"""The backend registry: what a model entry means for one backend (`Backend`), by its config name (`BACKENDS`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelEntry
from ..research.data import Preprocess
from .encoder import Encoder

BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str):
    def add(cls):
        BACKENDS[name] = cls
        return cls

    return add


def _file_stamps(path: Path) -> dict:
    """Size and modification time of a weights file, or of every file in a model folder (cheaper than hashing
    gigabytes; a file rewritten in place changes its stamp)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


class Backend:
    """What a model entry means for one backend. `name` is the entry's key in the run config."""

    def __init__(self, name: str, entry: ModelEntry):
        self.name, self.entry = name, entry

    @property
    def random_weights(self) -> bool:
        return self.entry.pretrained == "random"

    def identity(self) -> dict:
        """What determines the features, for cache keys: backend, weights, precision."""
        e = self.entry
        ident = {"backend": e.backend, "arch": e.arch, "pretrained": e.pretrained, "revision": e.revision,
                 "precision": e.precision}
        if e.compile:  # compiled kernels round differently (fused elementwise ops): their own cache entries
            ident["compile"] = e.compile
        if self.random_weights:
            ident["seed"] = e.seed
        elif Path(e.pretrained.removeprefix("local-dir:")).exists():
            ident["files"] = _file_stamps(Path(e.pretrained.removeprefix("local-dir:")))
        return ident

    def preprocess(self, sharpness: float) -> Preprocess:
        size, mean, std = self._defaults()
        mean, std = (tuple(self.entry.mean), tuple(self.entry.std)) if self.entry.mean else (mean, std)
        return Preprocess(size=size, sharpness=sharpness, mean=mean, std=std)

    def _defaults(self) -> tuple[int, tuple, tuple]:
        raise NotImplementedError

    def check_weights(self) -> None:
        """Fail now, with the clear message, if the weights are neither on disk nor downloadable (loads nothing)."""
        raise NotImplementedError

    def load(self, device: torch.device) -> Encoder:
        raise NotImplementedError
