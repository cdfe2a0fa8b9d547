"""Blur-robust zero-shot classification workbench: the thin package the notebooks call.

Public surface: load a run config, then `predict` it, or call its steps (`run_model`, `run_ensemble`); the
pieces (prompt sets, scoring modes, backends, the embedding cache) are importable from their modules.
"""

from . import progress  # noqa: F401  first: in a saved run's kernel, tqdm.auto bars become text (helpers.progress)
from .config import RunConfig, config_from_dict, load_config
from .pipeline import load_run_data, predict, run_ensemble, run_model
from .prompts import list_prompt_sets, load_prompts
from .scoring import SCORERS, ensemble_scores, score

__all__ = ["RunConfig", "config_from_dict", "load_config", "load_run_data", "predict", "run_ensemble", "run_model",
           "list_prompt_sets", "load_prompts", "SCORERS", "ensemble_scores", "score"]
