"""Ablations on a labeled split, computed from cached embeddings: prompt groups, scoring modes, sharpening
factors and restorations (one encode per setting, cached), ensemble weights, the drop threshold and the transductive
methods.

Each returns a table with one row per variant: accuracy with its 95% bootstrap interval, the paired difference to
the reference row with its interval, McNemar's p (Holm-adjusted over the table, since a grid tests many variants
at once), and whether the variant differs from the reference beyond chance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import RunConfig, restoration_views
from ..infra.cache import encode_texts
from ..models import ModelHandle, weights_cache
from ..runs.pipeline import (
    RunData,
    ensemble_split,
    ensemble_weights,
    load_run_data,
    model_image_embeddings,
    model_probabilities,
    resolve_auto_blur,
    score_views,
    split_embeddings,
)
from .prompts import PromptSet
from .restoration import steps_label
from .scoring import FLOAT32, SCORERS, LogitArithmetic, Scores, average_scores, ensemble_scores, score
from .stats import LEVEL, accuracy_summary, interval_columns, paired_comparison
from .steps import Preprocess
from .transductive import METHODS, build_method, run_method
from .transductive.stage import joint_embeddings


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: controls the chance of any false "differs" in a table."""
    order = np.argsort(p_values)
    adjusted, running = np.empty(len(p_values)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def compare_predictions(labels, predictions: dict[str, np.ndarray], reference: str,
                        extra: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per variant against the reference variant, on the same images."""
    if reference not in predictions:
        raise KeyError(f"reference variant '{reference}' is not among {list(predictions)}")
    rows = []
    for name, pred in predictions.items():
        acc = accuracy_summary(labels, pred)
        paired = paired_comparison(labels, predictions[reference], pred)
        rows.append({"variant": name, **(extra or {}).get(name, {}),
                     **interval_columns("accuracy", acc["accuracy"], acc["ci95"]),
                     **interval_columns("delta", paired["delta"], paired["delta_ci95"]),
                     "p_value": paired["mcnemar_p"], "reference": name == reference})
    return with_holm(pd.DataFrame(rows))


def with_holm(table: pd.DataFrame) -> pd.DataFrame:
    """`p_holm` (McNemar's p, Holm-adjusted over every non-reference row of the table: the reference rows of several
    comparisons stacked in one table are all left out) and `differs`."""
    others = ~table["reference"]
    table["p_holm"] = 1.0
    if others.any():
        table.loc[others, "p_holm"] = holm_adjust(table.loc[others, "p_value"].tolist())
    table["differs"] = table["p_holm"] < 1 - LEVEL
    return table


@dataclass
class ModelEmbeddings:
    """What ablations need of one model on one labeled split."""

    name: str
    image: list[np.ndarray]  # one (images, dim) array per view
    text: np.ndarray  # (prompts, dim)
    prompts: PromptSet
    labels: np.ndarray
    arithmetic: LogitArithmetic = FLOAT32  # the model's `logit_arithmetic`: the run's own numbers

    def covers_every_class(self, idx: np.ndarray) -> bool:
        """Whether the prompts `idx` leave no class without a prompt (else they cannot classify)."""
        return len(set(self.prompts.class_index[idx].tolist())) == len(self.prompts.classes)

    def predict(self, idx: np.ndarray, mode: str, logit_scale: float) -> np.ndarray:
        """Labels from the prompts `idx` under a scoring mode, the views' scores averaged."""
        p = self.prompts
        views = [score(mode, e, self.text[idx], p.class_index[idx], len(p.classes), logit_scale, self.arithmetic)
                 for e in self.image]
        return average_scores(views).labels


def load_model_embeddings(config: RunConfig, name: str, split: str = "dev", data: RunData | None = None,
                          progress: bool = True) -> ModelEmbeddings:
    """A model's embeddings of a labeled split, from the cache (the model is loaded only for what is missing)."""
    data = data or load_run_data(config)
    labels = split_labels(data, split)
    handle = ModelHandle(name, config.models[name], config.device, weights_cache(config.cache_dir))
    try:
        text = encode_texts(handle, data.prompts.texts, config.cache_dir)
        image = split_embeddings(handle, config, data, split, progress=progress)
    finally:
        handle.close()
    return ModelEmbeddings(name, image, text, data.prompts, labels, handle.logit_arithmetic)


def split_labels(data: RunData, split: str) -> np.ndarray:
    """The labels of a labeled split: one error where the config has no such split, or it has no labels."""
    if split not in data.splits or data.splits[split].labels is None:
        raise ValueError(f"no labeled split '{split}' in the config (data.dev gives one)")
    return data.splits[split].labels


def view_predictions(handle: ModelHandle, config: RunConfig, data: RunData, split: str,
                     settings: dict[str, list[Preprocess]], progress: bool = True) -> dict[str, np.ndarray]:
    """Each setting's labels on `split` (a setting is a list of views, their probabilities averaged), every view
    encoded once, through the cache; the model is closed after."""
    predictions = {}
    try:
        text = encode_texts(handle, data.prompts.texts, config.cache_dir)
        for setting, views in settings.items():
            embs = split_embeddings(handle, config, data, split, views, progress)
            predictions[setting] = score_views(config, embs, text, data.prompts, handle.logit_arithmetic).labels
    finally:
        handle.close()
    return predictions


def prompt_group_ablation(emb: ModelEmbeddings, scoring: str = "joint_softmax_mean",
                          logit_scale: float = 100.0) -> pd.DataFrame:
    """All groups (the reference), each group alone, and each group left out."""
    groups = emb.prompts.groups
    variants = {"all groups": groups}
    if len(groups) > 1:
        variants.update({f"only {g}": [g] for g in groups})
        variants.update({f"without {g}": [h for h in groups if h != g] for g in groups})
    predictions, extra = {}, {}
    for name, chosen in variants.items():
        idx = emb.prompts.group_indices(chosen)
        if not emb.covers_every_class(idx):
            continue  # a group that leaves some class without prompts cannot classify alone
        predictions[name] = emb.predict(idx, scoring, logit_scale)
        extra[name] = {"prompts": len(idx)}
    return compare_predictions(emb.labels, predictions, "all groups", extra)


def scoring_mode_ablation(emb: ModelEmbeddings, logit_scale: float = 100.0,
                          reference: str = "joint_softmax_mean") -> pd.DataFrame:
    idx = np.arange(len(emb.prompts.prompts))
    modes = [reference, *(m for m in SCORERS.names() if m != reference)]  # the reference's row first
    return compare_predictions(emb.labels, {m: emb.predict(idx, m, logit_scale) for m in modes}, reference)


def _factor_name(factor) -> str:
    return "+".join(f"{f:g}" for f in factor) if isinstance(factor, list) else f"{factor:g}"


def _sharpened_views(handle: ModelHandle, factor) -> list[Preprocess]:
    """A sharpening factor's views: one, or one per factor of a test-time-view list."""
    return [handle.sharpened_view(f) for f in (factor if isinstance(factor, list) else [factor])]


def sharpness_ablation(config: RunConfig, name: str, factors: list, split: str = "dev", data: RunData | None = None,
                       progress: bool = True) -> pd.DataFrame:
    """Accuracy per sharpening factor; an entry that is a list of factors is one test-time-view variant (their
    probabilities averaged). Every factor is encoded once and cached. The reference is the configured factor."""
    data = data or load_run_data(config)
    labels = split_labels(data, split)
    configured = config.models[name].sharpness
    reference = _factor_name(configured) if configured in factors else _factor_name(factors[0])
    handle = ModelHandle(name, config.models[name], config.device, weights_cache(config.cache_dir))
    settings = {_factor_name(factor): _sharpened_views(handle, factor) for factor in factors}
    table = compare_predictions(labels, view_predictions(handle, config, data, split, settings, progress), reference)
    table.insert(0, "model", name)
    return table


def analysis_restorations(config: RunConfig, data: RunData) -> dict[str, list]:
    """`analysis.restoration_grid` as steps by name (`steps_label`), `sigma: auto` filled in with the run's
    estimated blur (`resolve_auto_blur`, once: the config keeps the number)."""
    resolve_auto_blur(config, data.splits, analysis=True)
    return {steps_label(steps): steps for steps in restoration_views(config.analysis)}


def preprocessing_ablation(config: RunConfig, name: str, split: str = "dev", data: RunData | None = None,
                           progress: bool = True) -> pd.DataFrame:
    """Accuracy of model `name` under each sharpening factor of `analysis.sharpness_grid` and each restoration of
    `analysis.restoration_grid` (`kind`), against the model's configured preprocessing (the reference, every other
    row paired with it; a setting that is the configured one is that row). Every setting is encoded once and cached.
    """
    data = data or load_run_data(config)
    labels = split_labels(data, split)
    handle = ModelHandle(name, config.models[name], config.device, weights_cache(config.cache_dir))
    settings = {"configured": ("configured", handle.views)}
    for factor in config.analysis.sharpness_grid:
        settings.setdefault(f"sharpness {_factor_name(factor)}", ("sharpening", _sharpened_views(handle, factor)))
    for label, steps in analysis_restorations(config, data).items():
        settings.setdefault(label, ("restoration", [handle.view(steps)]))
    configured = {"configured": settings.pop("configured")}
    same = [n for n, (_, views) in settings.items() if views == configured["configured"][1]]
    reference = same[0] if same else "configured"
    settings = {**({} if same else configured), **settings}
    predictions = view_predictions(handle, config, data, split, {n: views for n, (_, views) in settings.items()},
                                   progress)
    kinds = {n: {"kind": "configured" if n == reference else kind} for n, (kind, _) in settings.items()}
    table = compare_predictions(labels, predictions, reference, kinds)
    table.insert(0, "model", name)
    return table


def two_model_weights(first: str, second: str, steps=(0.3, 0.4, 0.45, 0.5, 0.54, 0.55, 0.6, 0.7)) -> list[dict]:
    """A weight grid for two models (by default the winner's 0.5, 0.54 and 0.55 and their surroundings)."""
    return [{first: w, second: round(1 - w, 10)} for w in steps]


def ensemble_weight_ablation(scores: dict[str, Scores], labels, prompts: PromptSet, weight_sets: list[dict],
                             reference: dict, drop_below: float | None = None) -> pd.DataFrame:
    """A row per weight set (the reference once, wherever it falls), sorted by the first model's weight; the models
    in the order of `scores` (the config's), whatever the order of each set's keys."""
    names = list(scores)

    def key(w):
        return ", ".join(f"{n}={w[n]:g}" for n in names)  # the same weights, one row

    sets = dict(sorted({key(w): w for w in [reference, *weight_sets]}.items(),
                       key=lambda item: [item[1][n] for n in names]))
    predictions = {k: ensemble_scores(scores, w, prompts.class_index, len(prompts.classes), drop_below).labels
                   for k, w in sets.items()}
    return compare_predictions(labels, predictions, key(reference))


def drop_threshold_ablation(scores: dict[str, Scores], labels, prompts: PromptSet, weights: dict,
                            thresholds=(None, 0.0005, 0.001, 0.002, 0.005, 0.01)) -> pd.DataFrame:
    """The winner's "drop per-prompt probabilities <= t" against no drop (the reference)."""
    n_classes = len(prompts.classes)
    predictions = {("none" if t is None else f"{t:g}"): ensemble_scores(scores, weights, prompts.class_index,
                                                                         n_classes, t).labels
                   for t in dict.fromkeys([None, *thresholds])}
    return compare_predictions(labels, predictions, "none")


def transductive_ablation(config: RunConfig, output_dir, data: RunData, split: str = "dev",
                          methods: list[str] | None = None) -> pd.DataFrame:
    """Every transductive method (`methods`, default all registered) against plain zero-shot on a labeled split of
    a run whose models' outputs are in `output_dir`: for each model alone (its probabilities and embeddings) and for
    the ensemble (its probabilities, the models' joint embeddings), as `transductive.applies_to: ensemble` runs it.
    Each method at its paper's defaults, or at the config's parameters for the method the config names. A row per
    scope and variant (the scope's zero-shot row its reference), McNemar's p Holm-adjusted over the whole table.
    Each method uses the whole split at once: its labels depend on every image of it."""
    images = data.splits[split]
    if images.labels is None:
        raise ValueError(f"split '{split}' has no labels")
    configured = config.transductive
    chosen = {name: build_method(name, **(configured.params if configured and configured.method == name else {}))
              for name in (methods or METHODS.names())}
    weights = ensemble_weights(config)
    probs = {name: model_probabilities(output_dir, name, split) for name in config.models}
    embeddings = {name: model_image_embeddings(output_dir, name, split) for name in config.models}
    probs["ensemble"] = ensemble_split(config, output_dir, split, len(images), data.prompts, with_probs=True)[2]
    embeddings["ensemble"] = joint_embeddings(embeddings, weights)
    tables = []
    for scope in probs:
        predictions = {"zero-shot": probs[scope].argmax(axis=1)}
        predictions.update({name: run_method(method, probs[scope], embeddings[scope]).argmax(axis=1)
                            for name, method in chosen.items()})
        table = compare_predictions(images.labels, predictions, "zero-shot")
        table.insert(0, "scope", scope if scope == "ensemble" else f"model {scope}")
        tables.append(table)
    return with_holm(pd.concat(tables, ignore_index=True))
