"""The transductive stage of a run: a method applied to the ensemble's probabilities, or to each model's before they
are combined, with what it changed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import Method, labels_moved, run_method


def joint_embeddings(embeddings: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The models' L2-normalised embeddings side by side, each scaled by the square root of its ensemble weight:
    the cosine of two such rows is the weighted mean of the models' cosines (the weights sum to 1), so the kNN graph
    and the mixture see the images as the ensemble weighs the models."""
    names = [n for n in weights if weights[n] > 0]
    return np.concatenate([np.sqrt(weights[n]) * np.asarray(embeddings[n], dtype=np.float32) for n in names], axis=1)


def view_mean(embeddings: np.ndarray) -> np.ndarray:
    """(views, images, dim) test-time views as one (images, dim) embedding: their mean, L2-normalised; (images,
    dim) as it is."""
    if embeddings.ndim == 2:
        return embeddings
    mean = np.asarray(embeddings, dtype=np.float32).mean(axis=0)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), np.finfo(np.float32).tiny)


@dataclass
class StageResult:
    probs: np.ndarray  # (images, classes): what the run's labels are the argmax of
    record: dict  # for metrics.json


def run_stage(method: Method, applies_to: str, model_probs: dict[str, np.ndarray],
              model_embeddings: dict[str, np.ndarray], weights: dict[str, float], ensemble_probs: np.ndarray,
              classes: list[str]) -> StageResult:
    """`applies_to: ensemble`: the method on the ensemble's class probabilities and the models' joint embeddings
    (`joint_embeddings`). `each_model`: on each model's probabilities and its own embeddings, then the weighted sum
    of what it returns (class probabilities: the per-prompt drop threshold has nothing to act on). Models of weight
    0 take no part, as in the ensemble. The record: labels moved, predicted counts before and after, seconds."""
    started = time.perf_counter()
    names = [n for n in weights if weights[n] > 0]
    record: dict = {}
    if applies_to == "ensemble":
        probs = run_method(method, ensemble_probs, joint_embeddings(model_embeddings, weights))
    else:
        after = {n: run_method(method, model_probs[n], model_embeddings[n]) for n in names}
        probs = sum(weights[n] * after[n] for n in names)
        probs = probs / probs.sum(axis=1, keepdims=True)
        record["models"] = {n: {"labels_moved": labels_moved(model_probs[n], after[n]),
                                "predicted_counts_before": counts(model_probs[n], classes),
                                "predicted_counts_after": counts(after[n], classes)} for n in names}
    record = {"labels_moved": labels_moved(ensemble_probs, probs), "predicted_counts_before":
              counts(ensemble_probs, classes), "predicted_counts_after": counts(probs, classes), **record,
              "seconds": round(time.perf_counter() - started, 3)}
    return StageResult(probs, record)


def counts(probs: np.ndarray, classes: list[str]) -> dict[str, int]:
    labels = np.asarray(probs).argmax(axis=1)
    return {c: int((labels == i).sum()) for i, c in enumerate(classes)}
