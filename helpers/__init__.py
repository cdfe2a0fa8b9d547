"""Blur-robust zero-shot classification workbench: the thin package the notebooks call.

Public surface: load a run config, then `predict` it, or call its steps (`run_model`, `run_ensemble`); the
pieces (prompt sets, scoring modes, backends, the embedding cache) are importable from their modules. The surface is
imported on first use, so that a command that needs no model (`python -m helpers --help`, `runs`) starts without
torch.
"""

import importlib

from .infra import progress  # noqa: F401  first: in a saved run's kernel, tqdm.auto bars become text (helpers.infra.progress)

_SURFACE = {"RunConfig": "config", "config_from_dict": "config", "load_config": "config",
            "load_run_data": "runs.pipeline", "predict": "runs.pipeline", "run_ensemble": "runs.pipeline",
            "run_model": "runs.pipeline",
            "list_prompt_sets": "research.prompts", "load_prompts": "research.prompts",
            "SCORERS": "research.scoring", "ensemble_scores": "research.scoring", "score": "research.scoring"}
__all__ = list(_SURFACE)


def __getattr__(name: str):
    if name in _SURFACE:
        return getattr(importlib.import_module(f".{_SURFACE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
