"""The backend registry: what a model entry means for one backend (`Backend`), by its config name (`BACKENDS`).

A new backend is a module in `helpers/models/` with one `@register_backend("name")` class: its config rules
(`check_entry`), what identifies its weights, its preprocessing defaults, and how it loads an `Encoder`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...config import ConfigError, ModelEntry, model_views
from ...registry import Registry
from ...research.steps import Preprocess, Step, view

if TYPE_CHECKING:
    import torch

    from ..encoder import Encoder

# every module of helpers.models is imported on the first lookup, so a backend registers itself where it is defined
BACKENDS = Registry("backend", __name__)


def register_backend(name: str):
    return BACKENDS.register(name)


def file_stamps(path: Path) -> dict:
    """Size and modification time of a file (weights, an architecture), or of every file in a model folder (cheaper
    than hashing gigabytes; a file rewritten in place changes its stamp)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


class Backend:
    """What a model entry means for one backend. `name` is the entry's key in the run config."""

    # the entry keys only some backends take: each backend that takes one says so
    places_weights = False  # device_map and max_memory: from_pretrained places the weights on the devices
    weights_cache: Path | None = None  # where a backend may keep converted copies of the weights (ModelHandle's)

    def __init__(self, name: str, entry: ModelEntry):
        self.name, self.entry = name, entry

    @classmethod
    def check_entry(cls, entry: ModelEntry, where: str) -> None:
        """This backend's own rules for a model entry, checked with the config (loads nothing, imports nothing
        more): a ConfigError naming `where` (e.g. models.a) and the key."""
        if not cls.places_weights:
            for key in ("device_map", "max_memory"):
                if getattr(entry, key) is not None:
                    takers = [name for name, b in BACKENDS.items() if b.places_weights]
                    raise ConfigError(f"{where}.{key} is for backends {' and '.join(takers)} only; {entry.backend} "
                                      "loads the whole model onto the run's device")

    @property
    def random_weights(self) -> bool:
        return self.entry.random_weights

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
            ident["files"] = file_stamps(Path(e.pretrained.removeprefix("local-dir:")))
        return ident

    def views(self) -> list[Preprocess]:
        """The entry's preprocessing, one per test-time view (`preprocess`, or the `sharpness` shorthand)."""
        return [self.view(steps) for steps in model_views(self.entry, f"models.{self.name}")]

    def view(self, steps: list[Step]) -> Preprocess:
        """`steps` as this model's preprocessing: after its resize, crop and RGB (unless they set the size), then
        normalised by its mean and std (the entry's, else the model's own)."""
        size, mean, std = self._defaults()
        mean, std = (tuple(self.entry.mean), tuple(self.entry.std)) if self.entry.mean else (mean, std)
        return view(steps, size, mean, std)

    def _defaults(self) -> tuple[int, tuple, tuple]:
        raise NotImplementedError

    def tokenizer(self):
        """The model's tokenizer, without the model (its files only)."""
        raise NotImplementedError

    def context_length(self) -> int:
        """The most tokens the text tower takes, its start and end tokens included (its position table)."""
        raise NotImplementedError

    def token_counts(self, texts: list[str]) -> list[int]:
        """How many tokens each text is, its start and end tokens included, before any cut to the context."""
        raise NotImplementedError

    def check_weights(self) -> None:
        """Fail now, with the clear message, if the weights are neither on disk nor downloadable (loads nothing)."""
        raise NotImplementedError

    def load(self, device: torch.device) -> Encoder:
        raise NotImplementedError
