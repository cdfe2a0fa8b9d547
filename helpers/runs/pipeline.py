"""A run: one preparation, then two steps that the notebooks call one by one and `predict` calls in a row.

0. `prepare_run`: what every command that runs a config does first, once: the checks (paths, processes, weights),
   the images listed, read, checked and hashed (`load_run_data`), the run folder claimed for the config, and what
   the images were recorded in it (`run_data.json`), so that the notebooks' kernels read the digests instead of
   reading the images again.
1. `run_model`: one model encodes the prompts and every split (through the cache) and writes its outputs under
   `<output>/models/<name>/`; `model_outputs_done` is the one rule for whether they are there, of this run's images.
2. `run_ensemble`: combines the models' outputs, writes `submission.csv`, `metrics.json` and the manifest.

The call chains, from the command to `submission.csv`:

- `python -m helpers predict CONFIG` -> `__main__.cmd_predict` -> `load_config` -> `predict` -> `prepare_run`
  -> `run_model` for each model not done (-> `infra.cache.encode_texts`, `split_stores` -> `infra.cache.ensure_encoded`
  -> the backend's `Encoder`; `score_split` -> `research.scoring`) -> `run_ensemble` (-> `ensemble_split`
  -> `research.scoring.ensemble_scores`; `runs.outputs.write_submission`) -> `write_run_files`.
- `python -m helpers run CONFIG` -> `__main__.cmd_run` -> `load_config` -> `runs.notebooks.run_pipeline` ->
  `prepare_run` -> papermill runs 04_inference once per model not done and 05_ensemble (then 01-03), each kernel
  `display.nb.start` -> `load_config` of the run folder's config.yaml and `load_run_data(..., recorded_in=run folder)`
  -> `run_model` / `run_ensemble` as above.
- `python -m helpers encode CONFIG` -> `encode_cache` -> `prepare_run` (no run folder) -> `encode_model_images`.
- `python -m helpers sweep` -> one `python -m helpers run` per point (`runs.sweep.launch`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import yaml

from ..config import ConfigError, RunConfig, fill_in_blur, json_digest, steps_wanting_blur, transductive_method
from ..infra.cache import EmbeddingStore, check_images, encode_texts, ensure_encoded
from ..infra.distributed import ONE_PROCESS, World
from ..infra.errors import UserError
from ..infra.files import (
    atomic_write_csv,
    atomic_write_text,
    npy_rows,
    read_json_or_none,
    read_yaml_or_none,
    remove_stale_temporaries,
)
from ..models import BACKENDS, WeightsUnavailableError
from ..models.backends import file_stamps
from ..research.data import (
    DataError,
    ImageSet,
    bad_images_message,
    fingerprint,
    load_dev_set,
    load_test_set,
)
from ..research.prompts import PromptSet, load_prompts
from ..research.scoring import (
    FLOAT32,
    SCORE_BLOCK_ROWS,
    SCORERS,
    LogitArithmetic,
    Scores,
    average_scores,
    ensemble_scores,
    joint_softmax_probs,
    score,
)
from ..research.stats import evaluate, paired_comparison
from ..research.steps import Preprocess
from ..research.transductive import Method, class_probabilities
from ..research.transductive.stage import StageResult, run_stage, view_mean
from .outputs import build_manifest, reference_agreement, reference_path, write_json, write_npy, write_submission

if TYPE_CHECKING:
    from ..config import ModelEntry
    from ..models import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """The classes, prompts and image sets ("test", "dev") of a run config, their files read and checked."""

    classes: list[str]
    prompts: PromptSet
    splits: dict[str, ImageSet] = field(default_factory=dict)
    # per split, what the check found of every file listed (`prepare_run` writes it into the run folder)
    checks: dict[str, dict] = field(default_factory=dict)
    # the estimated blur that the config's `sigma: auto` became (`resolve_auto_blur`), recorded in the run
    auto_blur: dict | None = None
    # what the prompt check passed for (`prompt_check_key`): a kernel with the same need not load the tokenizers
    prompts_checked: str | None = None

    def record(self) -> dict:
        """What `prepare_run` writes into the run folder (`RUN_DATA`) for the notebooks' kernels."""
        return {**self.checks, **({"auto_blur": self.auto_blur} if self.auto_blur else {}),
                **({"prompts_checked": self.prompts_checked} if self.prompts_checked else {})}

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


class RunError(UserError, RuntimeError):
    """A run that stopped; the message names the notebook and the cell, or the run folder."""


class RunStaleError(UserError, RuntimeError):
    """Outputs in a run folder that were made from other inputs than the run's."""


RUN_DATA = "run_data.json"  # in a run folder: what `prepare_run` found of the images


def _stamps(files: list[Path]) -> list[list[int] | None]:
    """Size and modification time of each file (a file rewritten since it was read changes its stamp); None for one
    that cannot be stat'ed (a dangling link), which the check then names."""
    stamps = []
    for f in files:
        try:
            s = f.stat()
            stamps.append([s.st_size, s.st_mtime_ns])
        except OSError:
            stamps.append(None)
    return stamps


def check_split(images: ImageSet, cache_dir: str, progress: bool, recorded: dict | None) -> tuple[dict[int, str], dict]:
    """The unusable files of one set (position -> why) and what the check found (to record), with `images.digests`
    set: from `recorded` (a run folder's `run_data.json`) when it lists exactly these files with the same stamps,
    else by reading every file (`check_images`)."""
    files = [str(p.relative_to(images.root)) for p in images.files]
    stamps = _stamps(images.files)  # before the reads: a file that changes while it is read gets another stamp
    if recorded is not None and recorded.get("files") == files and recorded.get("stamps") == stamps:
        images.digests = recorded["digests"]
        problems = {int(i): reason for i, reason in recorded["problems"].items()}
    else:
        problems = check_images(images, cache_dir, progress)
    return problems, {"files": files, "stamps": stamps, "digests": images.digests,
                      "problems": {str(i): reason for i, reason in problems.items()}}


def load_run_data(config: RunConfig, progress: bool = False, recorded_in: str | Path | None = None) -> RunData:
    """The run's image sets, every file read once and checked (`check_images`). An unusable image stops the run
    here, before anything is encoded, with every bad file listed; with `on_bad_image: skip` it is left out.

    With `recorded_in` (a run folder that `prepare_run` prepared), the files are listed and stat'ed, and not read
    again where the folder's `run_data.json` recorded them unchanged."""
    splits = {}
    if config.data.test:
        splits["test"] = load_test_set(config.data.test, config.data.limit)
    classes = config.data.classes or splits["test"].classes  # the config check asks for one of the two
    if config.fallback_label is not None and config.fallback_label not in classes:
        raise ConfigError(f"fallback_label is '{config.fallback_label}', not one of the classes {', '.join(classes)}")
    if config.data.dev:
        from ..research.devset import (
            build_missing_dev_set,  # its blur estimation needs scipy: only when there is a dev set
        )

        dev = config.data.dev
        build_missing_dev_set(dev, classes, progress)
        splits["dev"] = load_dev_set(dev.path, classes, dev.class_map, dev.limit)
    prompts = load_prompts(config.prompts, classes)
    recorded = (read_json_or_none(Path(recorded_in) / RUN_DATA, dict) or {}) if recorded_in is not None else {}
    prompts_checked = prompt_check_key(config, prompts)
    if recorded.get("prompts_checked") != prompts_checked:  # a kernel of the prepared run: checked already
        check_prompts_once(config, prompts, prompts_checked)  # before the images are read
    problems, checks = {}, {}
    for name, images in splits.items():
        problems[name], checks[name] = check_split(images, config.cache_dir, progress, recorded.get(name))
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
    return RunData(classes, prompts, splits, checks, resolve_auto_blur(config, splits, recorded.get("auto_blur")),
                   prompts_checked)


BLUR_SAMPLE = 256  # images the run's blur is estimated on, evenly spaced (the median settles long before)
BLUR_ESTIMATOR = "radial-power-spectrum-1"  # in the estimate's cache key: a change of helpers.research.blur renames it


def estimated_blur(config: RunConfig, splits: dict[str, ImageSet]) -> dict:
    """The run's estimated blur, what `sigma: auto` becomes: the median `estimate_sigma` of up to BLUR_SAMPLE evenly
    spaced images of the test set (of the dev set when the config has no test set), rounded to 0.01 px; computed once
    per set of images and kept in the cache (`<cache_dir>/blur/`)."""
    split = "test" if "test" in splits else "dev"
    images = splits[split]
    sample = np.unique(np.linspace(0, len(images) - 1, min(BLUR_SAMPLE, len(images))).round().astype(int))
    key = json_digest([BLUR_ESTIMATOR, [images.digests[i] for i in sample]])
    cache = Path(config.cache_dir) / "blur" / f"{key}.json"
    estimate = read_json_or_none(cache, dict)
    if estimate is None:
        from ..research.devset import measure_blur  # scipy: only for a config that asks for the blur

        measured = measure_blur([images.files[i] for i in sample])
        if not np.isfinite(measured["median"]):
            raise DataError(f"sigma: auto needs the blur of the {split} set ({images.root}), which could not be "
                            "estimated (its images are too flat to measure): give sigma in px")
        estimate = {"sigma_px": round(measured["median"], 2), "split": split, "images": len(sample),
                    **{k: round(measured[k], 3) for k in ("p10", "p90") if k in measured}}
        write_json(cache, estimate)
    return estimate


def resolve_auto_blur(config: RunConfig, splits: dict[str, ImageSet], recorded: dict | None = None,
                      analysis: bool = False) -> dict | None:
    """Fill in `sigma: auto` (a restoration step's PSF, `helpers.research.steps.restore`) with the run's estimated
    blur (`estimated_blur`), in the config itself, once, when the run loads its images: every command and notebook
    loads them here, and the run folder's config (which the notebooks read) then has the number, which is part of
    each step's cache key. The analyses' steps (`analysis.restoration_grid`) are filled in where an analysis asks
    (`analysis`), so that a run without analyses estimates nothing for them.

    Returns what was estimated, to be recorded in the run (`run_data.json`, the manifest): `recorded` when the
    config had nothing left to fill in (a run folder's config, filled in before)."""
    if not steps_wanting_blur(config, analysis):
        return recorded
    estimate = estimated_blur(config, splits)
    filled = fill_in_blur(config, estimate["sigma_px"], analysis)
    log.info("sigma: auto is %.2f px, the %s set's estimated blur (median of %d images), in %s", estimate["sigma_px"],
             estimate["split"], estimate["images"], ", ".join(filled))
    return {**estimate, "filled_in": filled}


def model_dir(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / "models" / name


def split_embeddings(handle: ModelHandle, config: RunConfig, data: RunData, split: str,
                     views: list[Preprocess] | None = None, progress: bool = True) -> list[np.ndarray]:
    """Image embeddings of one split, one (images, dim) array per view, through the cache (for analyses: a run's
    scoring reads them from `split_stores` in chunks)."""
    return [store.get(data.digests[split]) for store in split_stores(handle, config, data, split, views, progress)]


def split_stores(handle: ModelHandle, config: RunConfig, data: RunData, split: str,
                 views: list[Preprocess] | None = None, progress: bool = True,
                 world: World = ONE_PROCESS) -> list[EmbeddingStore]:
    """The embedding store of each view of one split, holding every image of it once this returns (on every rank:
    each encodes its share of what is missing, then they meet)."""
    images = data.splits[split]
    return [ensure_encoded(handle, images.files, view, config.cache_dir, data.digests[split],
                           num_workers=config.num_workers, progress=progress, world=world)
            for view in (views or handle.views)]


def score_views(config: RunConfig, image_embs: list[np.ndarray], text_emb: np.ndarray, prompts: PromptSet,
                arithmetic: LogitArithmetic = FLOAT32) -> Scores:
    """Scores of every view, averaged (one view: its scores); `arithmetic` is the model's `logit_arithmetic`."""
    return average_scores([score(config.scoring, e, text_emb, prompts.class_index, len(prompts.classes),
                                 config.logit_scale, arithmetic) for e in image_embs])


SCORE_CHUNK_ROWS = 16384  # images scored at once: the arrays of a set of millions never need to fit in memory


def row_chunks(n: int, chunk_rows: int | None = None) -> list[slice]:
    """Slices of `chunk_rows` rows (rounded up to whole scoring blocks, so that chunks change no number)."""
    step = -(-(chunk_rows or SCORE_CHUNK_ROWS) // SCORE_BLOCK_ROWS) * SCORE_BLOCK_ROWS
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def score_split(config: RunConfig, stores: list[EmbeddingStore], digests: list[str], text_emb: np.ndarray,
                prompts: PromptSet, split_dir: Path, chunk_rows: int | None = None,
                arithmetic: LogitArithmetic = FLOAT32) -> np.ndarray:
    """Score one split in chunks of rows, read from the stores and written into memory-mapped `.npy` files
    (`image_embeddings`, `prompt_probs`, `class_scores`); returns the labels. Scoring is row by row, so the chunks
    give what one pass over all rows gives."""
    import torch  # here: the run's own process (`python -m helpers run`) scores nothing, and imports no torch

    n, dim, views = len(digests), text_emb.shape[1], len(stores)
    emb_shape = (n, dim) if views == 1 else (views, n, dim)
    labels = np.empty(n, dtype=np.int64)
    with (npy_rows(split_dir / "image_embeddings.npy", emb_shape) as embeddings,
          npy_rows(split_dir / "prompt_probs.npy", (n, len(prompts.texts))) as probs,
          npy_rows(split_dir / "class_scores.npy", (n, len(prompts.classes))) as class_scores):
        for rows in row_chunks(n, chunk_rows):
            image_embs = [store.get(digests[rows]) for store in stores]
            scores = score_views(config, image_embs, text_emb, prompts, arithmetic)
            chunk_probs = scores.prompt_probs
            if chunk_probs is None:  # other scoring modes still record the winner's per-prompt probabilities
                chunk_probs = torch.stack([joint_softmax_probs(e, text_emb, config.logit_scale, arithmetic)
                                           for e in image_embs]).mean(0)
            for v, e in enumerate(image_embs):
                embeddings[(rows,) if views == 1 else (v, rows)] = e
            probs[rows] = chunk_probs.numpy()
            class_scores[rows] = scores.class_scores.numpy()
            labels[rows] = scores.labels
    return labels


def model_handle(config: RunConfig, name: str, world: World = ONE_PROCESS) -> ModelHandle:
    """Model `name` of the run, on this rank's device, its converted weights kept in the run's cache."""
    from ..models import ModelHandle, resolve_device, weights_cache  # here: they import torch

    return ModelHandle(name, config.models[name], world.device(resolve_device(config.device)),
                       weights_cache(config.cache_dir))


def encode_model_images(config: RunConfig, name: str, data: RunData, world: World, progress: bool = False,
                        prompts: bool = False) -> None:
    """A rank's share of model `name`'s image encodes, every split and view, in the order `run_model` takes them
    (and with `prompts`, the prompts too, with the same loaded model)."""
    handle = model_handle(config, name, world)
    try:
        for split in data.splits:
            split_stores(handle, config, data, split, progress=progress, world=world)
        if prompts:
            encode_texts(handle, data.prompts.texts, config.cache_dir)
    finally:
        handle.close()


def run_model(config: RunConfig, name: str, output_dir: str | Path, data: RunData | None = None,
              progress: bool = True, world: World = ONE_PROCESS, chunk_rows: int | None = None) -> dict:
    """Encode the prompts and every split with model `name`; write its embeddings, probabilities and predictions.

    `image_embeddings.npy` is (images, dim), or (views, images, dim) when `sharpness` lists several factors. Under
    torchrun this is rank 0's part, while the other ranks run `encode_model_images`.
    """
    if name not in config.models:
        raise KeyError(f"no model '{name}' in the config (models: {', '.join(config.models)})")
    data = data or load_run_data(config)
    handle = model_handle(config, name, world)
    out = model_dir(output_dir, name)
    started = time.perf_counter()
    try:
        text_emb = encode_texts(handle, data.prompts.texts, config.cache_dir)
        write_npy(out / "text_embeddings.npy", text_emb)
        atomic_write_csv(out / "prompts.csv", data.prompts.to_frame(), index_label="prompt")
        seconds = {}
        for split, images in data.splits.items():
            t0 = time.perf_counter()
            stores = split_stores(handle, config, data, split, progress=progress, world=world)
            seconds[split] = round(time.perf_counter() - t0, 3)
            labels = score_split(config, stores, data.digests[split], text_emb, data.prompts, out / split, chunk_rows,
                                 handle.logit_arithmetic)
            atomic_write_csv(out / split / "predictions.csv", _predictions_frame(images, labels, data.classes),
                             index=False)
        info = {
            "name": name,
            "identity": handle.identity,
            "random_weights": handle.random_weights,
            "views": [view.key() for view in handle.views],
            "precision": handle.entry.precision,
            "precision_setting": handle.precision_setting,  # `auto` chose `precision` on this machine
            "logit_arithmetic": handle.logit_arithmetic.record(),  # fp16 on the GPU: the winner's under autocast
            "device": str(handle.device),
            "model_loaded": handle.loaded,  # False: everything came from the embedding cache
            # where each part of the model was placed (device_map), how long loading took, from which weights
            "placement": handle.encoder.placement if handle.loaded else None,
            "load_seconds": handle.encoder.load_seconds if handle.loaded else None,
            "weights_format": handle.encoder.weights_format if handle.loaded else None,
            "world_size": world.size,  # processes that shared the encode (torchrun)
            "encode_seconds": seconds,
            "seconds": round(time.perf_counter() - started, 3),
            "data": data.fingerprints(),  # which images these outputs are of (the ensemble checks it)
            "prompts": json_digest(data.prompts.texts),  # and of which prompts (a prompt-set file can change)
        }
    finally:
        handle.close()
    write_json(out / "model.json", info)
    if not info["model_loaded"]:
        log.info("model %s: every embedding came from the cache %s (nothing encoded, no model loaded)", name,
                 config.cache_dir)
    return info


def _predictions_frame(images: ImageSet, labels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"file": [str(p.relative_to(images.root)) for p in images.files], "label": labels,
                          "class": [classes[i] for i in labels]})
    if images.ids is not None:
        frame.insert(0, "id_idx", images.ids)
    if images.labels is not None:
        frame["true_label"] = images.labels
    return frame


def run_missing_models(config: RunConfig, output_dir: str | Path, data: RunData, progress: bool = True) -> list[str]:
    """Run the inference of every model whose outputs in `output_dir` are not done (`model_outputs_done`), through
    the embedding cache, as `run` does: what is cached is not encoded again; returns their names."""
    missing = [name for name in config.models if not model_outputs_done(output_dir, name, data)]
    for name in missing:
        run_model(config, name, output_dir, data, progress)
    return missing


def model_outputs_done(output_dir: str | Path, name: str, data: RunData) -> bool:
    """The one rule for whether model `name`'s outputs in a run folder can be used: `model.json` (written last, after
    every output) is there and says they are of exactly this run's images (a rerun after images were fixed or broke,
    with `on_bad_image: skip`, has others) and prompts. The folder holds one config (`claim_output_dir`), so the
    model's settings are the run's."""
    info = read_json_or_none(model_dir(output_dir, name) / "model.json", dict)
    return (info is not None and info.get("data") == data.fingerprints()
            and info.get("prompts") == json_digest(data.prompts.texts))


def model_outputs(output_dir: str | Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Model `name`'s per-prompt probabilities and class scores of one split, memory-mapped."""
    split_dir = model_dir(output_dir, name) / split
    if not (split_dir / "class_scores.npy").is_file():
        raise FileNotFoundError(f"{split_dir}: no outputs of model '{name}' (run its inference first)")
    return (np.load(split_dir / "prompt_probs.npy", mmap_mode="r"),
            np.load(split_dir / "class_scores.npy", mmap_mode="r"))


def load_model_scores(output_dir: str | Path, name: str, split: str, scoring: str,
                      rows: slice = slice(None)) -> Scores:
    """Model `name`'s scores of one split (of `rows` of it), in memory."""
    import torch

    probs, class_scores = model_outputs(output_dir, name, split)
    return Scores(torch.from_numpy(np.array(class_scores[rows])),
                  torch.from_numpy(np.array(probs[rows])) if SCORERS[scoring].per_prompt_probabilities else None)


def ensemble_split(config: RunConfig, output_dir: str | Path, split: str, n: int, prompts: PromptSet,
                   chunk_rows: int | None = None,
                   with_probs: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """The ensemble's labels of one split and each model's, over chunks of rows of the models' outputs (a set of
    millions never needs to fit in memory; each row is combined alone, so the chunks change nothing); with
    `with_probs`, the ensemble's class probabilities too (`class_probabilities`: the same argmax), else None."""
    labels, per_model = np.empty(n, dtype=np.int64), {name: np.empty(n, dtype=np.int64) for name in config.models}
    probs = np.empty((n, len(prompts.classes))) if with_probs else None
    for rows in row_chunks(n, chunk_rows):
        scores = {name: load_model_scores(output_dir, name, split, config.scoring, rows) for name in config.models}
        combined = ensemble_scores(scores, ensemble_weights(config), prompts.class_index, len(prompts.classes),
                                   config.ensemble.drop_below)
        labels[rows] = combined.labels
        if with_probs:
            probs[rows] = class_probabilities(combined.class_scores.numpy())
        for name, s in scores.items():
            per_model[name][rows] = s.labels
    return labels, per_model, probs


def model_probabilities(output_dir: str | Path, name: str, split: str) -> np.ndarray:
    """Model `name`'s class probabilities of one split (`class_probabilities` of its class scores)."""
    return class_probabilities(model_outputs(output_dir, name, split)[1])


def model_image_embeddings(output_dir: str | Path, name: str, split: str) -> np.ndarray:
    """Model `name`'s image embeddings of one split, (images, dim), memory-mapped; test-time views as their mean."""
    return view_mean(np.load(model_dir(output_dir, name) / split / "image_embeddings.npy", mmap_mode="r"))


def transductive_stage(config: RunConfig, output_dir: str | Path, split: str, ensemble_probs: np.ndarray,
                       classes: list[str], method: Method | None = None) -> StageResult:
    """The config's transductive stage (or `method` in its place, applied as the config says) on one split, from the
    models' outputs in the run folder."""
    method = method or transductive_method(config.transductive, classes)
    weights = ensemble_weights(config)
    used = [name for name in config.models if weights[name] > 0]
    return run_stage(method, config.transductive.applies_to if config.transductive else "ensemble",
                     {n: model_probabilities(output_dir, n, split) for n in used},
                     {n: model_image_embeddings(output_dir, n, split) for n in used}, weights, ensemble_probs,
                     classes)


def ensemble_weights(config: RunConfig) -> dict[str, float]:
    return config.ensemble.weights or {n: 1 / len(config.models) for n in config.models}


def run_ensemble(config: RunConfig, output_dir: str | Path, data: RunData | None = None,
                 chunk_rows: int | None = None) -> dict:
    """Combine the models' outputs, then the transductive stage where the config has one (its labels are the run's;
    `metrics.json` keeps the zero-shot ones' counts and accuracy under `transductive`); write submission.csv (when
    there is a test split) and metrics.json."""
    data = data or load_run_data(config)
    output_dir = Path(output_dir)
    weights = ensemble_weights(config)
    n_classes = len(data.classes)
    metrics: dict = {"weights": weights, "drop_below": config.ensemble.drop_below, "scoring": config.scoring}
    for name in config.models:
        if (model_dir(output_dir, name) / "model.json").is_file() and not model_outputs_done(output_dir, name, data):
            raise RunStaleError(f"{model_dir(output_dir, name)} holds model {name}'s outputs for other images or "
                                "prompts than this run's (which images are usable, or a prompt-set file, changed "
                                "since): run its inference again")
    stage = config.transductive
    if stage is not None:  # the method, its parameters with the defaults filled in, and per split what it changed
        method = transductive_method(stage, data.classes)
        metrics["transductive"] = {"method": stage.method, "applies_to": stage.applies_to, "params": method.params()}
    for split, images in data.splits.items():
        labels, per_model, probs = ensemble_split(config, output_dir, split, len(images), data.prompts, chunk_rows,
                                                  with_probs=stage is not None)
        if stage is not None:
            zero_shot = labels
            result = transductive_stage(config, output_dir, split, probs, data.classes, method)
            labels = result.probs.argmax(axis=1)
            metrics["transductive"][split] = result.record
            if images.labels is not None:  # the stage against the ensemble's zero-shot labels, on the same images
                metrics["transductive"][split]["zero_shot"] = evaluate(images.labels, zero_shot, data.classes)
                metrics["transductive"][split]["vs_zero_shot"] = paired_comparison(images.labels, zero_shot, labels)
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
            if config.reference is not None:
                summary["reference"] = reference_agreement(config.reference, frame["id_idx"].tolist(),
                                                           frame["label"].to_numpy())
        if images.labels is not None:
            summary["models"] = {n: evaluate(images.labels, y, data.classes) for n, y in per_model.items()}
            summary["ensemble"] = evaluate(images.labels, labels, data.classes)
            # the ensemble against each model alone, on the same images: is the gain beyond chance?
            summary["ensemble_vs_model"] = {n: paired_comparison(images.labels, y, labels)
                                            for n, y in per_model.items()}
        metrics[split] = summary
    if data.skipped():
        metrics["skipped_images"] = data.skipped()
    random = config.random_weight_models()
    if random:  # the labels and accuracies of these models mean nothing
        metrics["random_weights"] = random
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


def write_run_files(config: RunConfig, output_dir: str | Path, data: RunData, world: World = ONE_PROCESS) -> None:
    """The config used (resolved) and the manifest, with what each model's inference recorded."""
    from ..models import resolve_device  # here: it imports torch

    output_dir = Path(output_dir)
    atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    models = {n: json.loads((model_dir(output_dir, n) / "model.json").read_text()) for n in config.models}
    manifest = build_manifest(config.to_dict(), resolve_device(config.device), data.fingerprints(), models)
    manifest["world_size"] = world.size  # processes that shared the encodes (torchrun); the results do not depend on it
    if data.auto_blur:
        manifest["auto_blur"] = data.auto_blur  # what `sigma: auto` became (config.yaml has the number)
    write_json(output_dir / "manifest.json", manifest)


def claim_output_dir(output_dir: Path, config: RunConfig) -> Path:
    """Write the resolved config into a run folder, or check that the folder holds a run of this config: a folder
    belongs to one config, so that its outputs never mix two. Returns the config file's path."""
    path = Path(output_dir) / "config.yaml"
    resolved = config.to_dict()
    if _recorded_config(path) not in (None, resolved):
        raise RunError(f"{output_dir} holds a run of another config; give another --output-dir")
    atomic_write_text(path, yaml.safe_dump(resolved, sort_keys=False))
    return path


def _recorded_config(path: Path) -> dict | None:
    """The config a run folder records; None when there is none (files are written whole, but one written by hand or
    by an older version may be damaged: then the folder is taken as unclaimed)."""
    return read_yaml_or_none(path)


def check_device(config: RunConfig) -> None:
    """Before any work: the config's device is here (only CUDA can be missing; torch is imported for it alone)."""
    if config.device.startswith("cuda"):
        from ..models import resolve_device

        resolve_device(config.device)


def check_models(config: RunConfig) -> None:
    """Before any work: every model's weights are on disk or downloadable, else one error that says, for each model
    that lacks them, what to do."""
    problems = []
    for name, entry in config.models.items():
        try:
            BACKENDS[entry.backend](name, entry).check_weights()
        except (WeightsUnavailableError, FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    if problems:
        raise WeightsUnavailableError(" | ".join(problems))


def model_stamps(config: RunConfig) -> dict[str, dict]:
    """Each model's identity (with the size and modification time of its weights files where they are on disk, or
    its seed) and its architecture file's: what the checks kept in the cache depend on, read from the entries alone
    (loads no tokenizer, imports no model library)."""
    return {name: {**BACKENDS[entry.backend](name, entry).identity(), "arch_file": arch_file_stamps(entry)}
            for name, entry in config.models.items()}


def arch_file_stamps(entry: ModelEntry) -> dict | None:
    """The size and modification time of an entry's architecture file (`arch`), None without one."""
    return file_stamps(Path(entry.arch)) if entry.arch and Path(entry.arch).is_file() else None


def weights_check_key(config: RunConfig) -> str | None:
    """What the weights check depends on where every model's weights are on disk (or random): the entries and
    `model_stamps`. None where a model's weights are a tag or a hub repository: their check asks the hub's cache or
    the network, which may have changed since."""
    stamps = model_stamps(config)
    if any("files" not in stamps[name] and not entry.random_weights for name, entry in config.models.items()):
        return None
    return json_digest([config.to_dict()["models"], stamps])


def check_models_once(config: RunConfig) -> None:
    """`check_models`, once per `weights_check_key` and cache where the weights are on disk: reading a torch
    checkpoint's contents imports torch, and a later run of the same models (a sweep's points, each a process of
    its own) then needs none of it."""
    key = weights_check_key(config)
    if key is None:
        check_models(config)
    else:
        check_once(config.cache_dir, "weights_checks", key, lambda: check_models(config),
                   {"models": sorted(config.models)})


def check_once(cache_dir: str | Path, kind: str, key: str, check, record: dict) -> None:
    """`check()`, unless a check of this `kind` with this `key` passed before with this cache: one that passed is
    kept as `<cache_dir>/<kind>/<key>.json` (holding `record`); one that fails raises, and is not kept."""
    passed = Path(cache_dir) / kind / f"{key}.json"
    if read_json_or_none(passed, dict) is not None:
        return
    check()
    write_json(passed, record)


def prompt_check_key(config: RunConfig, prompts: PromptSet) -> str:
    """What the prompt check depends on: the prompts, and each model's `model_stamps` (its tokenizer comes with its
    weights) and `truncate`."""
    models = {name: {**stamps, "truncate": config.models[name].truncate}
              for name, stamps in model_stamps(config).items()}
    return json_digest([prompts.texts, models])


def check_prompts(config: RunConfig, prompts: PromptSet) -> None:
    """Before anything is encoded: every prompt fits the context of every model (or its entry says `truncate`)."""
    from ..models import ModelHandle

    for name, entry in config.models.items():
        ModelHandle(name, entry, config.device).check_prompts(prompts)


def check_prompts_once(config: RunConfig, prompts: PromptSet, key: str) -> None:
    """`check_prompts`, once per `prompt_check_key` and cache: a check that passed is kept in the cache
    (`<cache_dir>/prompt_checks/`), beside the prompts' embeddings of the same models, and a later run of the same
    prompts and models (a sweep's points) loads no tokenizer and imports no model library for it."""
    check_once(config.cache_dir, "prompt_checks", key, lambda: check_prompts(config, prompts),
               {"models": sorted(config.models), "prompts": len(prompts.texts)})


def check_paths(config: RunConfig, output_dir: str | Path) -> None:
    """Before any work: the run folder and the cache are folders (or can be made), and the run folder is outside
    the input folders, where its files (figures are PNG images) would be read as input next time."""
    if config.reference is not None:
        reference_path(config.reference)
    for what, path in (("the run folder (--output-dir)", Path(output_dir)), ("cache_dir", Path(config.cache_dir))):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{what} {path} is a file, not a folder: give a folder")
    out = Path(output_dir).resolve()
    inputs = {"data.test": config.data.test, "data.dev.path": config.data.dev.path if config.data.dev else None}
    for key, folder in inputs.items():
        if folder is not None and out.is_relative_to(Path(folder).resolve()):
            raise ConfigError(f"the run folder {output_dir} is inside the input folder {folder} ({key}): its files "
                              "would be read as input images next time; give an --output-dir outside it")


def check_world(config: RunConfig, world: World) -> None:
    """A model spread over GPUs (`device_map`) takes every GPU it sees: one rank per GPU cannot hold it."""
    spread = [n for n, m in config.models.items() if m.device_map is not None]
    if world.size > 1 and spread:
        raise ConfigError(f"models.{spread[0]}.device_map spreads the model over the GPUs, which the {world.size} "
                          "torchrun processes each want one of: run it in one process (without torchrun), or drop "
                          "device_map to give each process a copy on its own GPU")


def prepare_run(config: RunConfig, output_dir: str | Path | None, world: World = ONE_PROCESS,
                progress: bool = True) -> RunData:
    """What every command that runs a config does first, once (`predict`, `run`, `encode`, and so each point of a
    sweep): bad paths, a model that cannot run here or lacks its weights, and unusable images fail now, before any
    work, with the clear message; the images are read and hashed once. With a run folder, rank 0 claims it for the
    config, removes what a killed run was writing, and records what it found of the images (`RUN_DATA`), which the
    notebooks' kernels read instead of the images."""
    if output_dir is not None:
        check_paths(config, output_dir)
    check_world(config, world)
    check_device(config)
    check_models_once(config)
    data = load_run_data(config, progress and world.is_main)
    if output_dir is not None and world.is_main:
        claim_output_dir(Path(output_dir), config)
        remove_stale_temporaries(Path(output_dir))  # what a killed run was writing: never whole, never read
        write_json(Path(output_dir) / RUN_DATA, data.record())
    return data


def predict(config: RunConfig, output_dir: str | Path, progress: bool = True,
            world: World = ONE_PROCESS) -> dict | None:
    """Every model whose outputs are not done, then the ensemble: the whole run. Under torchrun every rank calls
    this: they share the encodes, and rank 0 alone writes the outputs and returns the metrics (the others return
    None)."""
    output_dir = Path(output_dir)
    data = prepare_run(config, output_dir, world, progress)
    if not world.is_main:
        for name in config.models:
            encode_model_images(config, name, data, world)
        return None
    for name in config.models:
        if model_outputs_done(output_dir, name, data):
            log.info("model %s: its outputs in %s are done (of these images and prompts): not run again", name,
                     output_dir)
            continue
        run_model(config, name, output_dir, data, progress, world)
    metrics = run_ensemble(config, output_dir, data)
    write_run_files(config, output_dir, data, world)
    return metrics


def encode_cache(config: RunConfig, progress: bool = True, world: World = ONE_PROCESS) -> None:
    """Every model's image embeddings of every split and view, and (on rank 0) its prompt embeddings, into the
    cache, without writing a run: `python -m helpers run --nproc N` does this under torchrun before its notebooks,
    which then find everything cached."""
    data = prepare_run(config, None, world, progress)
    for name in config.models:
        encode_model_images(config, name, data, world, progress, prompts=world.is_main)
