"""The few lines every notebook starts with, and the small tables they show."""

from __future__ import annotations

import os

import pandas as pd

from .config import ConfigError, RunConfig, load_config
from .errors import install_notebook_handler
from .outputs import PROJECT_ROOT
from .pipeline import RunData, load_run_data


def start(config_path: str) -> tuple[RunConfig, RunData]:
    """Work from the project root (where config paths are relative to, as on the command line); load the config
    and its data. From here on, a user error shows as the command line's one `error:` line."""
    install_notebook_handler()
    os.chdir(PROJECT_ROOT)
    config = load_config(config_path)
    return config, load_run_data(config)


def require_dev(data: RunData) -> None:
    """A one-line error (nb.start installed the handler) whose advice works as written: build a dev set, then name
    it in the config."""
    if "dev" not in data.splits:
        raise ConfigError("this notebook needs a labeled dev set, and the config has no data.dev: build one (`make "
                          "dev-demo`: 120 images in data/dev-demo, which configs/demo.yaml names; `make dev-data`: "
                          "1,500 in data/dev), then add it under data in the config (`dev: {path: data/dev}`) or run "
                          "with --set data.dev.path=data/dev")


def blur_statistics(data: RunData, limit: int = 2000) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    """Estimated blur of each split (the first `limit` images): a summary row per split, and the per-image sigmas."""
    from .devset import measure_blur

    rows, sigmas = [], {}
    for split, images in data.splits.items():
        stats = measure_blur(images.files[:limit])
        sigmas[split] = stats.pop("sigmas")
        del stats["qualities"]  # one row per split: the most common quality is in it
        rows.append({"split": split, **stats})
    return pd.DataFrame(rows), sigmas


def accuracy_table(metrics: dict, split: str = "dev") -> pd.DataFrame:
    """Each model and the ensemble on a labeled split, from metrics.json, with intervals and the paired test of the
    ensemble against each model."""
    summary = metrics[split]
    rows = [{"variant": n, "accuracy": m["accuracy"], "ci_low": m["ci95"][0], "ci_high": m["ci95"][1],
             "ensemble_minus_model": summary["ensemble_vs_model"][n]["delta"],
             "mcnemar_p": summary["ensemble_vs_model"][n]["mcnemar_p"]} for n, m in summary["models"].items()]
    e = summary["ensemble"]
    rows.append({"variant": "ensemble", "accuracy": e["accuracy"], "ci_low": e["ci95"][0], "ci_high": e["ci95"][1]})
    return pd.DataFrame(rows)
