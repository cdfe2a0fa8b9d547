"""Accuracy with honest intervals: every number the workbench prints carries a 95% bootstrap interval."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(correct, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a 0/1 vector (seeded, so the same data gives the same interval)."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = rng.choice(correct, size=(n_resamples, correct.size), replace=True).mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def accuracy_summary(labels, predictions, n_resamples: int = 1000, seed: int = 0) -> dict:
    correct = np.asarray(labels) == np.asarray(predictions)
    lo, hi = bootstrap_ci(correct, n_resamples, seed)
    return {"accuracy": float(correct.mean()), "ci95": [lo, hi], "images": int(correct.size)}
