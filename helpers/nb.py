"""The few lines every notebook starts with, and the small tables they show."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from .config import ConfigError, RunConfig, load_config
from .errors import install_notebook_handler
from .outputs import PROJECT_ROOT
from .pipeline import RunData, load_run_data
from .progress import saved_run


def start(config_path: str, output_dir: str) -> tuple[RunConfig, RunData, Path]:
    """Work from the project root (where config paths are relative to, as on the command line); load the config
    and its data (a dev set the config can build is built on first use). From here on, a user error shows as the
    command line's one `error:` line, and the workbench's notes are plain output, not an error-coloured stream.

    Returns the folder to write to: `output_dir`, except when a saved run's notebook is run live (opened from its
    run folder), where it would overwrite the run's own outputs: then the folder `<run folder>-live` beside it.
    Says, once, when the models' weights are random."""
    install_notebook_handler()
    _notes_as_output()
    os.chdir(PROJECT_ROOT)
    config = load_config(config_path)
    output = Path(output_dir)
    if not saved_run() and is_run_folder(output):
        live = output.parent / f"{output.name}-live"
        print(f"{output} is a saved run (python -m helpers run), which a live run does not change: this one writes "
              f"to {live}")
        output = live
    random = [name for name, entry in config.models.items() if entry.pretrained == "random"]
    if random:
        display(Markdown(random_weights_note(random)))
    return config, load_run_data(config), output


def random_weights_note(models: list[str]) -> str:
    return (f"**Random weights** ({', '.join(models)}: `pretrained: random`): the labels, accuracies and curves of "
            "this notebook show how the pipeline runs, not how well the models classify; with every model guessing, "
            "accuracies sit near chance (1/6) and curves are flat within their intervals.")


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a run that `python -m helpers run` wrote (its executed notebooks and its config)."""
    return (folder / "notebooks").is_dir() and (folder / "config.yaml").is_file()


def _notes_as_output() -> None:
    """The workbench's log records (a dev set built on first use, skipped images, ...) to the cell's standard
    output, as plain lines: on the error stream a notebook shows them as if something had failed."""
    logger = logging.getLogger("helpers")
    if not any(getattr(h, "notes_as_output", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        handler.notes_as_output = True
        logger.addHandler(handler)
        logger.propagate = False


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
