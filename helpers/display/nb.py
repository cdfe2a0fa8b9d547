"""The few lines every notebook starts with, and the small tables they show."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from ..config import RunConfig, load_config
from ..infra.errors import install_notebook_handler, show_notes
from ..infra.files import PROJECT_ROOT
from ..infra.progress import saved_run, wrapped
from ..research.data import DataError
from ..research.stats import interval_columns, interval_text
from ..research.steps import describe
from ..runs.pipeline import RunData, load_run_data
from . import plots


@dataclass(frozen=True)
class RunFolder(os.PathLike):
    """The folder a notebook writes to (a path wherever one is taken), with what every figure and table saved there
    must say: which models have random weights, whose numbers mean nothing."""

    path: Path
    random_weights: tuple[str, ...] = ()

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, other) -> Path:
        return self.path / other

    def save_figure(self, fig, name: str) -> Path:
        return plots.save_figure(fig, self.path, name, self.random_weights)

    def save_table(self, table: pd.DataFrame, name: str) -> Path:
        return plots.save_table(table, self.path, name, self.random_weights)


def start(config_path: str, output_dir: str) -> tuple[RunConfig, RunData, RunFolder]:
    """Work from the project root (where config paths are relative to, as on the command line); load the config
    and its data (a dev set the config can build is built on first use). From here on, a user error shows as the
    command line's one `error:` line, and the workbench's notes are plain output, not an error-coloured stream.

    Returns the folder to write to (`RunFolder`): `output_dir`, except when a saved run's notebook is run live
    (opened from its run folder), where it would overwrite the run's own outputs: then the folder `<run folder>-live`
    beside it. Says, once, when the models' weights are random; the folder's figures and tables say it too."""
    install_notebook_handler()
    show_notes("stdout", "note: ", wrapped)  # on the error stream a notebook would show them as failures
    os.chdir(PROJECT_ROOT)
    config = load_config(config_path)
    output = Path(output_dir)
    if not saved_run() and is_run_folder(output):
        live = output.parent / f"{output.name}-live"
        say(f"{output} is a saved run (python -m helpers run), which a live run does not change: this one writes "
            f"to {live}")
        output = live
    random = tuple(config.random_weight_models())
    if random:
        display(Markdown(random_weights_note(random)))
    # the images as the command that started this run found them (run_data.json): listed and stat'ed, not read again
    return config, load_run_data(config, recorded_in=output_dir), RunFolder(output, random)


def random_weights_note(models: list[str]) -> str:
    return (f"**Random weights** ({', '.join(models)}: `pretrained: random`): the labels, accuracies and curves of "
            "this notebook show how the pipeline runs, not how well the models classify; with every model guessing, "
            "accuracies sit near chance (1/6) and curves are flat within their intervals.")


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a run that `python -m helpers run` wrote (its executed notebooks and its config)."""
    return (folder / "notebooks").is_dir() and (folder / "config.yaml").is_file()


DEV_ADVICE = ("To add one, build it (`make dev-demo`: 120 images in data/dev-demo, which configs/demo.yaml names; "
              "`make dev-data`: 1,500 in data/dev), then add it under data in the config (`dev: {path: data/dev}`) "
              "or run with --set data.dev.path=data/dev.")


def has_split(data: RunData, split: str, skipped: str) -> bool:
    """Whether the config has the split ("test" or "dev") that a notebook's section needs. A config may have either
    alone; without it, one sentence says what the notebook skips and why (`skipped`: "the submission is skipped"),
    with how to add a dev set that is missing, and the notebook goes on with what it can do."""
    if split in data.splits:
        return True
    say(f"No {split} set in this config (data.{split}): {skipped}." + (f" {DEV_ADVICE}" if split == "dev" else ""))
    return False


def blur_statistics(data: RunData, limit: int = 2000) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    """Estimated blur of each split (the first `limit` images): a summary row per split, and the per-image sigmas."""
    from ..research.devset import measure_blur

    rows, sigmas = [], {}
    for split, images in data.splits.items():
        stats = measure_blur(images.files[:limit])
        sigmas[split] = stats.pop("sigmas")
        del stats["qualities"]  # one row per split: the most common quality is in it
        rows.append({"split": split, **stats})
    return pd.DataFrame(rows), sigmas


def restoration_quality(config: RunConfig, settings: dict[str, list]) -> pd.DataFrame | None:
    """`restoration_table` of the settings on the dev set's images, against their clean photos; None, with a sentence
    saying why, where the dev set does not record them (a folder that make-dev did not build)."""
    from ..research.restoration import degraded_pairs, restoration_table

    try:
        pairs = degraded_pairs(config.data.dev.path, config.data.dev.limit)
    except DataError as e:
        say(f"The restoration table is skipped: {e}.")
        return None
    return restoration_table(pairs, settings)


def accuracy_table(metrics: dict, split: str = "dev") -> pd.DataFrame:
    """Each model and the ensemble on a labeled split, from metrics.json, with intervals and the paired test of the
    ensemble against each model (the ensemble's own row has none: it is what the others are compared with)."""
    summary = metrics[split]
    rows = [{"variant": n, **interval_columns("accuracy", m["accuracy"], m["ci95"]),
             "ensemble − model": summary["ensemble_vs_model"][n]["delta"],
             "McNemar p": summary["ensemble_vs_model"][n]["mcnemar_p"]} for n, m in summary["models"].items()]
    e = summary["ensemble"]
    rows.append({"variant": "ensemble", **interval_columns("accuracy", e["accuracy"], e["ci95"])})
    return pd.DataFrame(rows)


INTERVAL_TITLES = {"accuracy": "accuracy", "delta": "Δ vs reference"}  # as the compact tables head them


def compact_table(table: pd.DataFrame) -> pd.DataFrame:
    """A table of variants as a notebook shows it, narrow enough for a 1,280-pixel window: an interval in one
    column beside its value ("0.083 [0.041, 0.133]"), the paired test's p and its Holm adjustment together, numbers
    to three decimals, "—" where a row has no such number (the saved CSV keeps every column in full)."""
    shown = pd.DataFrame(index=table.index)
    taken = set()
    for column in table.columns:
        if column in taken:
            continue
        bounds = [f"{column}_ci_low", f"{column}_ci_high"]
        if set(bounds) <= set(table.columns):  # the columns of stats.interval_columns
            shown[f"{INTERVAL_TITLES.get(column, column)} [95% CI]"] = [
                interval_text(v, (lo, hi), signed=column == "delta") for v, lo, hi in table[[column, *bounds]].values]
            taken |= set(bounds)
        elif column == "p_value" and "p_holm" in table.columns:
            shown["p (Holm)"] = [f"{p:.3g} ({h:.3g})" for p, h in table[["p_value", "p_holm"]].values]
            taken.add("p_holm")
        elif column in ("reference", "differs"):
            shown[column] = table[column].map({True: "yes", False: ""})
        elif pd.api.types.is_float_dtype(table[column]):
            shown[column] = table[column].map(lambda v: "—" if pd.isna(v) else f"{v:.3f}")
        else:
            shown[column] = table[column]
    return shown


def show_table(table: pd.DataFrame) -> None:
    """Display `compact_table(table)`, its first column as the rows' names (no numbered index), no cell cut short."""
    shown = compact_table(table)
    with pd.option_context("display.max_colwidth", None):
        display(shown.set_index(shown.columns[0]))


def say(text: str) -> None:
    """Print a note, its lines wrapped at word boundaries to fit the output area (a browser breaks a long line
    anywhere, mid-word)."""
    print(wrapped(text))


def flat_curve_notes(table: pd.DataFrame, random_weights=()) -> list[str]:
    """Why a model's curve is flat: the same labels at every factor, whatever the factor."""
    notes = []
    for model, rows in table.groupby("model", sort=False):
        if rows["accuracy"].nunique() == 1 and rows["delta"].eq(0).all():
            notes.append(f"{model}: the same accuracy at every factor, and no dev image changes its label (every Δ "
                         "is 0): sharpening moves pixel values by a few levels of 255 (01_inspect), too little to "
                         "change this model's scores" + (" (with random weights it guesses the same whatever the "
                                                         "input)" if model in random_weights else ""))
    return notes


def model_info(info: dict) -> pd.DataFrame:
    """What a model's inference recorded (model.json), a line per field, each value short enough to read."""
    ident = info["identity"]
    views = ", ".join(f"{describe(v)} at {v['size']} px" for v in info["views"])
    data = ", ".join(f"{split} {d['images']} images" for split, d in info["data"].items())
    arch, pretrained = (Path(str(v)).name if v and "/" in str(v) else v for v in (ident.get("arch"),
                                                                                  ident.get("pretrained")))
    rows = {
        "weights": " ".join(str(v) for v in (ident.get("backend"), arch) if v) + ", "
                   + (f"RANDOM (seed {ident['seed']})" if info["random_weights"] else str(pretrained)),
        "precision": f"{info['precision']} (setting: {info['precision_setting']})",
        "views": views,
        "logits": f"{info['logit_arithmetic']['dtype']} on {info['logit_arithmetic']['device']}",
        "device": info["device"],
        "model loaded": "no: every embedding came from the cache" if not info["model_loaded"] else
                        f"yes, in {info['load_seconds']} s, from {info['weights_format'] or 'random weights'}",
        "encode seconds": ", ".join(f"{k} {v:g}" for k, v in info["encode_seconds"].items()),
        "data": data,
        "seconds": f"{info['seconds']:g}",
    }
    return pd.DataFrame({"field": list(rows), "value": list(rows.values())})
