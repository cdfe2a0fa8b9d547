"""A run, in two steps that the notebooks call one by one and `predict` calls in a row:

1. `run_model`: one model encodes the prompts and every split (through the cache) and writes its outputs under
   `<output>/models/<name>/`.
2. `run_ensemble`: combines the models' outputs, writes `submission.csv`, `metrics.json` and the manifest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from .cache import check_images, encode_images, encode_texts
from .config import ConfigError, RunConfig
from .data import DataError, ImageSet, Preprocess, bad_images_message, fingerprint, load_dev_set, load_test_set
from .errors import UserError
from .files import atomic_write_csv, atomic_write_text, remove_stale_temporaries
from .models import ModelHandle, WeightsUnavailableError, resolve_device
from .outputs import build_manifest, write_json, write_npy, write_submission
from .prompts import PromptSet, load_prompts
from .scoring import Scores, average_scores, ensemble_scores, joint_softmax_probs, score
from .stats import evaluate, paired_comparison

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """The classes, prompts and image sets ("test", "dev") of a run config, their files read and checked."""

    classes: list[str]
    prompts: PromptSet
    splits: dict[str, ImageSet] = field(default_factory=dict)

    @property
    def digests(self) -> dict[str, list[str]]:
        return {name: s.digests for name, s in self.splits.items()}

    def fingerprints(self) -> dict:
        prints = {name: fingerprint(s, s.digests) for name, s in self.splits.items()}
        for name, s in self.splits.items():
            if s.skipped:
                prints[name]["skipped"] = [skip.record(s.root) for skip in s.skipped]
        return prints

    def skipped(self) -> dict[str, list[dict]]:
        return {name: [skip.record(s.root) for skip in s.skipped] for name, s in self.splits.items() if s.skipped}


class RunStaleError(UserError, RuntimeError):
    """Outputs in a run folder that were made from other inputs than the run's."""


def load_run_data(config: RunConfig, progress: bool = False) -> RunData:
    """The run's image sets, every file read once and checked (`check_images`). An unusable image stops the run
    here, before anything is encoded, with every bad file listed; with `on_bad_image: skip` it is left out."""
    splits = {}
    if config.data.test:
        splits["test"] = load_test_set(config.data.test, config.data.limit)
    classes = config.data.classes or splits["test"].classes  # the config check asks for one of the two
    if config.fallback_label is not None and config.fallback_label not in classes:
        raise ConfigError(f"fallback_label is '{config.fallback_label}', not one of the classes {', '.join(classes)}")
    if config.data.dev:
        dev = config.data.dev
        splits["dev"] = load_dev_set(dev.path, classes, dev.class_map, dev.limit)
    prompts = load_prompts(config.prompts, classes)
    problems = {name: check_images(images, config.cache_dir, progress) for name, images in splits.items()}
    bad = [(splits[name].files[i], reason) for name, found in problems.items() for i, reason in found.items()]
    if bad and config.on_bad_image == "error":
        raise DataError(bad_images_message(
            bad, sum(map(len, splits.values())), "so nothing was encoded",
            ", or set `on_bad_image: skip` in the config (or --set on_bad_image=skip) to leave them out: skipped test "
            "images get the `fallback_label` class (default: the run's most predicted class)"))
    for name, found in problems.items():
        if not found:
            continue
        if len(found) == len(splits[name]):
            raise DataError(f"every image of the {name} set ({splits[name].root}) is unusable, e.g. "
                            f"{splits[name].files[0]} ({found[0]})")
        splits[name] = splits[name].without(found)
        log.warning("%s set: skipping %d unusable image(s) (on_bad_image: skip), e.g. %s (%s)", name, len(found),
                    splits[name].skipped[0].path, splits[name].skipped[0].reason)
    return RunData(classes, prompts, splits)


def model_dir(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / "models" / name


def split_embeddings(handle: ModelHandle, config: RunConfig, data: RunData, split: str,
                     views: list[Preprocess] | None = None, progress: bool = True) -> list[np.ndarray]:
    """Image embeddings of one split, one (images, dim) array per view, through the cache."""
    images = data.splits[split]
    return [encode_images(handle, images.files, view, config.cache_dir, data.digests[split],
                          num_workers=config.num_workers, progress=progress) for view in (views or handle.views)]


def score_views(config: RunConfig, image_embs: list[np.ndarray], text_emb: np.ndarray, prompts: PromptSet) -> Scores:
    """Scores of every view, averaged (one view: its scores)."""
    return average_scores([score(config.scoring, e, text_emb, prompts.class_index, len(prompts.classes),
                                 config.logit_scale) for e in image_embs])


def run_model(config: RunConfig, name: str, output_dir: str | Path, data: RunData | None = None,
              progress: bool = True) -> dict:
    """Encode the prompts and every split with model `name`; write its embeddings, probabilities and predictions.

    `image_embeddings.npy` is (images, dim), or (views, images, dim) when `sharpness` lists several factors.
    """
    if name not in config.models:
        raise KeyError(f"no model '{name}' in the config (models: {', '.join(config.models)})")
    data = data or load_run_data(config)
    handle = ModelHandle(name, config.models[name], config.device)
    out = model_dir(output_dir, name)
    started = time.perf_counter()
    try:
        text_emb = encode_texts(handle, data.prompts.texts, config.cache_dir)
        write_npy(out / "text_embeddings.npy", text_emb)
        atomic_write_csv(out / "prompts.csv", data.prompts.to_frame(), index_label="prompt")
        seconds = {}
        for split, images in data.splits.items():
            t0 = time.perf_counter()
            image_embs = split_embeddings(handle, config, data, split, progress=progress)
            seconds[split] = round(time.perf_counter() - t0, 3)
            scores = score_views(config, image_embs, text_emb, data.prompts)
            probs = scores.prompt_probs
            if probs is None:  # other scoring modes still record the winner's per-prompt probabilities
                probs = torch.stack([joint_softmax_probs(e, text_emb, config.logit_scale) for e in image_embs]).mean(0)
            split_dir = out / split
            stacked = image_embs[0] if len(image_embs) == 1 else np.stack(image_embs)
            write_npy(split_dir / "image_embeddings.npy", stacked)
            write_npy(split_dir / "prompt_probs.npy", probs.numpy())
            write_npy(split_dir / "class_scores.npy", scores.class_scores.numpy())
            atomic_write_csv(split_dir / "predictions.csv", _predictions_frame(images, scores.labels, data.classes),
                             index=False)
        info = {
            "name": name,
            "identity": handle.identity,
            "random_weights": handle.random_weights,
            "views": [view.key() for view in handle.views],
            "precision": handle.entry.precision,
            "device": str(handle.device),
            "model_loaded": handle.loaded,  # False: everything came from the embedding cache
            "encode_seconds": seconds,
            "seconds": round(time.perf_counter() - started, 3),
            "data": data.fingerprints(),  # which images these outputs are of (the ensemble checks it)
        }
    finally:
        handle.close()
    write_json(out / "model.json", info)
    return info


def _predictions_frame(images: ImageSet, labels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"file": [str(p.relative_to(images.root)) for p in images.files], "label": labels,
                          "class": [classes[i] for i in labels]})
    if images.ids is not None:
        frame.insert(0, "id_idx", images.ids)
    if images.labels is not None:
        frame["true_label"] = images.labels
    return frame


def model_outputs_match(output_dir: str | Path, name: str, data: RunData) -> bool:
    """Whether model `name`'s outputs in the run folder are of exactly this run's images (a rerun after images were
    fixed or broke, with `on_bad_image: skip`, has others)."""
    path = model_dir(output_dir, name) / "model.json"
    return path.is_file() and json.loads(path.read_text()).get("data") == data.fingerprints()


def load_model_scores(output_dir: str | Path, name: str, split: str, scoring: str) -> Scores:
    split_dir = model_dir(output_dir, name) / split
    if not (split_dir / "class_scores.npy").is_file():
        raise FileNotFoundError(f"{split_dir}: no outputs of model '{name}' (run its inference first)")
    probs = torch.from_numpy(np.load(split_dir / "prompt_probs.npy"))
    class_scores = torch.from_numpy(np.load(split_dir / "class_scores.npy"))
    return Scores(class_scores, probs if scoring == "joint_softmax_mean" else None)


def ensemble_weights(config: RunConfig) -> dict[str, float]:
    return config.ensemble.weights or {n: 1 / len(config.models) for n in config.models}


def run_ensemble(config: RunConfig, output_dir: str | Path, data: RunData | None = None) -> dict:
    """Combine the models' outputs; write submission.csv (when there is a test split) and metrics.json."""
    data = data or load_run_data(config)
    output_dir = Path(output_dir)
    weights = ensemble_weights(config)
    n_classes = len(data.classes)
    metrics: dict = {"weights": weights, "drop_below": config.ensemble.drop_below, "scoring": config.scoring}
    for name in config.models:
        if (model_dir(output_dir, name) / "model.json").is_file() and not model_outputs_match(output_dir, name, data):
            raise RunStaleError(f"{model_dir(output_dir, name)} holds model {name}'s outputs for other images than "
                                "this run's (which images are usable changed since): run its inference again")
    for split, images in data.splits.items():
        per_model = {n: load_model_scores(output_dir, n, split, config.scoring) for n in config.models}
        combined = ensemble_scores(per_model, weights, data.prompts.class_index, n_classes,
                                   config.ensemble.drop_below)
        labels = combined.labels
        frame = _predictions_frame(images, labels, data.classes)
        summary: dict = {"images": len(images),
                         "predicted_counts": {c: int((labels == i).sum()) for i, c in enumerate(data.classes)}}
        if split == "test" and images.skipped:
            fallback = fallback_label(config, data.classes, labels)
            frame = _with_skipped(frame, images, fallback, data.classes)
            summary["fallback_label"] = fallback
        atomic_write_csv(output_dir / f"{split}_predictions.csv", frame, index=False)
        if split == "test":
            write_submission(output_dir / "submission.csv", frame["id_idx"].tolist(), frame["label"].to_numpy(),
                             n_classes)
        if images.labels is not None:
            summary["models"] = {n: evaluate(images.labels, s.labels, data.classes) for n, s in per_model.items()}
            summary["ensemble"] = evaluate(images.labels, labels, data.classes)
            # the ensemble against each model alone, on the same images: is the gain beyond chance?
            summary["ensemble_vs_model"] = {n: paired_comparison(images.labels, s.labels, labels)
                                            for n, s in per_model.items()}
        metrics[split] = summary
    if data.skipped():
        metrics["skipped_images"] = data.skipped()
    write_json(output_dir / "metrics.json", metrics)
    return metrics


def fallback_label(config: RunConfig, classes: list[str], labels: np.ndarray) -> dict:
    """The class that skipped test images get: the config's `fallback_label`, else the most predicted class."""
    if config.fallback_label is not None:
        index, source = classes.index(config.fallback_label), "fallback_label in the config"
    else:
        index, source = int(np.bincount(labels, minlength=len(classes)).argmax()), "the run's most predicted class"
    return {"label": index, "class": classes[index], "source": source}


def _with_skipped(frame: pd.DataFrame, images: ImageSet, fallback: dict, classes: list[str]) -> pd.DataFrame:
    """The predictions with a row for every skipped image too (its fallback label), in the set's order."""
    skipped = pd.DataFrame({"file": [str(s.path.relative_to(images.root)) for s in images.skipped],
                            "label": fallback["label"], "class": fallback["class"]})
    skipped.insert(0, "id_idx", [s.id for s in images.skipped])
    frame = frame.assign(skipped=False, position=images.kept_positions())
    skipped = skipped.assign(skipped=True, position=[s.index for s in images.skipped])
    log.warning("test set: %d skipped image(s) get label %d (%s: %s)", len(skipped), fallback["label"],
                fallback["source"], fallback["class"])
    return pd.concat([frame, skipped]).sort_values("position").drop(columns="position").reset_index(drop=True)


def write_run_files(config: RunConfig, output_dir: str | Path, data: RunData) -> None:
    """The config used (resolved) and the manifest, with what each model's inference recorded."""
    output_dir = Path(output_dir)
    atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    models = {n: json.loads((model_dir(output_dir, n) / "model.json").read_text()) for n in config.models}
    manifest = build_manifest(config.to_dict(), resolve_device(config.device), data.fingerprints(), models)
    write_json(output_dir / "manifest.json", manifest)


def check_models(config: RunConfig) -> None:
    """Before any work: every model's weights are on disk or downloadable, else one error that says, for each
    model that lacks them, what to do."""
    problems = []
    for name, entry in config.models.items():
        try:
            ModelHandle(name, entry, config.device).check_weights()
        except (WeightsUnavailableError, FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    if problems:
        raise WeightsUnavailableError(" | ".join(problems))


def check_paths(config: RunConfig, output_dir: str | Path) -> None:
    """Before any work: the run folder and the cache are folders (or can be made), and the run folder is outside
    the input folders, where its files (figures are PNG images) would be read as input next time."""
    for what, path in (("the run folder (--output-dir)", Path(output_dir)), ("cache_dir", Path(config.cache_dir))):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{what} {path} is a file, not a folder: give a folder")
    out = Path(output_dir).resolve()
    inputs = {"data.test": config.data.test, "data.dev.path": config.data.dev.path if config.data.dev else None}
    for key, folder in inputs.items():
        if folder is not None and out.is_relative_to(Path(folder).resolve()):
            raise ConfigError(f"the run folder {output_dir} is inside the input folder {folder} ({key}): its files "
                              "would be read as input images next time; give an --output-dir outside it")


def predict(config: RunConfig, output_dir: str | Path, progress: bool = True) -> dict:
    """Every model, then the ensemble: the whole run in this process."""
    check_paths(config, output_dir)
    check_models(config)
    output_dir = Path(output_dir)
    data = load_run_data(config, progress)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)  # what a killed run was writing: never whole, never read
    for name in config.models:
        run_model(config, name, output_dir, data, progress)
    metrics = run_ensemble(config, output_dir, data)
    write_run_files(config, output_dir, data)
    return metrics
