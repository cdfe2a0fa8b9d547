"""Model backends behind one interface: L2-normalised float32 image and text features.

A backend is a small class in the BACKENDS registry (`backends/`: the registry and `Backend` in its `__init__`, one
module per backend family, `openclip` and `hf`). It says, without loading anything, what identifies the weights (for
the cache keys and the manifest) and how images are preprocessed, and it loads an `Encoder`. The backend modules
import torch only where they load or compute, so the config check reads their rules without it. `ModelHandle`
(`handle`) loads lazily, so a run whose embeddings are all cached never loads a model. The other modules: `device`
(devices and precision), `checkpoints` (what a weights file is, offline errors), `encoder` (a loaded model), and for
transformers models `shards`, `placement` and `converted`.

The names below are imported from their modules when first used (PEP 562), as transformers' lazy modules do:
importing `helpers.models.backends` for the config check does not import torch through this package.
"""

from __future__ import annotations

import importlib

# each public name -> the module of this package that defines it
_EXPORTS = {
    "BACKENDS": "backends", "Backend": "backends", "register_backend": "backends",
    "ModelHandle": "handle", "weights_cache": "handle",
    "Encoder": "encoder",
    "WeightsUnavailableError": "checkpoints",
    "DTYPES": "device", "resolve_device": "device", "resolve_precision": "device",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
