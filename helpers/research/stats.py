"""Accuracy with honest intervals: every number the workbench prints carries a 95% bootstrap interval, and every
A-versus-B comparison a paired test on the same images, so that a "+0.1%" is seen as the noise it is."""

from __future__ import annotations

import numpy as np

N_RESAMPLES, SEED, LEVEL = 1000, 0, 0.95


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_ci(correct, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a per-image vector: 0/1 correctness, or paired differences
    (seeded: the same data gives the same interval)."""
    values = np.asarray(correct, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, values.size, size=(n_resamples, values.size))
    return _percentile_interval(values[idx].mean(axis=1), level)


def accuracy_summary(labels, predictions, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    correct = np.asarray(labels) == np.asarray(predictions)
    lo, hi = bootstrap_ci(correct, n_resamples, seed)
    return {"accuracy": float(correct.mean()) if correct.size else float("nan"), "ci95": [lo, hi],
            "images": int(correct.size)}


def label_agreement(labels_a, labels_b, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """The share of images with the same label on both sides (two runs, or a run and a reference submission), with
    its 95% bootstrap interval."""
    same = np.asarray(labels_a) == np.asarray(labels_b)
    lo, hi = bootstrap_ci(same, n_resamples, seed)
    return {"agreement": float(same.mean()) if same.size else float("nan"), "ci95": [lo, hi],
            "differing": int((~same).sum()), "images": int(same.size)}


def interval_columns(name: str, value: float, ci95) -> dict:
    """An interval as a table's columns: `name`, `name_ci_low`, `name_ci_high` (NaN without one). Records and JSON
    keep the interval as `ci95: [low, high]` beside its value; tables (CSV, pandas) take it through here only."""
    low, high = ci95 if ci95 is not None else (float("nan"), float("nan"))
    return {name: value, f"{name}_ci_low": low, f"{name}_ci_high": high}


def interval_records(records: list[dict]) -> list[dict]:
    """A table's rows as records: each `<name>_ci_low`/`<name>_ci_high` pair of `interval_columns` back to
    `<name>_ci95: [low, high]` beside `<name>` (null where either end is missing), the other keys as they are."""

    def fold(row: dict) -> dict:
        out = {}
        for key, value in row.items():
            if key.endswith("_ci_low") and key[:-len("_ci_low")] + "_ci_high" in row:
                name = key[:-len("_ci_low")]
                high = row[f"{name}_ci_high"]
                missing = any(v is None or v != v for v in (value, high))
                out[f"{name}_ci95"] = None if missing else [value, high]
            elif not (key.endswith("_ci_high") and key[:-len("_ci_high")] + "_ci_low" in row):
                out[key] = value
        return out

    return [fold(row) for row in records]


def interval_text(value: float, ci95, digits: int = 3, signed: bool = False) -> str:
    """`0.083 [0.041, 0.133]`: a value and its 95% interval as every report writes them; "—" without a value."""
    if value is None or value != value:  # NaN
        return "—"
    form = f"{'+' if signed else ''}.{digits}f"
    return f"{value:{form}} [{ci95[0]:{form}}, {ci95[1]:{form}}]"


def per_class_accuracy(labels, predictions, classes: list[str], **kwargs) -> dict[str, dict]:
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return {c: accuracy_summary(labels[labels == i], predictions[labels == i], **kwargs) for i, c in enumerate(classes)}


def confusion_matrix(labels, predictions, n_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def mcnemar_p(correct_a, correct_b) -> float:
    """Exact McNemar test (McNemar 1947; the exact conditional form, e.g. Fagerland, Lydersen & Laake 2013, BMC
    Medical Research Methodology 13:91): only the n images on which A and B disagree in correctness carry
    information, and under the null hypothesis the b that only A gets right are Binomial(n, 1/2). The two-sided p is
    twice the smaller tail, at most 1 (the distribution is symmetric): scipy.stats.binomtest's p for 1/2, from the
    binomial CDF of scipy.special (scipy.stats takes over half a second to import, in every kernel that compares)."""
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    if only_a + only_b == 0:
        return 1.0
    from scipy.special import bdtr  # on first use, as the rest of scipy here

    return float(min(1.0, 2 * bdtr(min(only_a, only_b), only_a + only_b, 0.5)))


def paired_comparison(labels, predictions_a, predictions_b, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                      alpha: float = 1 - LEVEL) -> dict:
    """B against A on the same images: the accuracy difference with a paired bootstrap interval, McNemar's p,
    and whether B differs from A beyond chance."""
    labels = np.asarray(labels)
    correct_a = (np.asarray(predictions_a) == labels).astype(np.float64)
    correct_b = (np.asarray(predictions_b) == labels).astype(np.float64)
    diff = correct_b - correct_a
    lo, hi = bootstrap_ci(diff, n_resamples, seed, 1 - alpha)  # resampling images keeps each image's pair together
    p = mcnemar_p(correct_a, correct_b)
    return {"delta": float(diff.mean()), "delta_ci95": [lo, hi], "mcnemar_p": p, "differs": bool(p < alpha)}


def evaluate(labels, predictions, classes: list[str]) -> dict:
    """Everything metrics.json says of one set of predictions on labeled data."""
    return {**accuracy_summary(labels, predictions), "per_class": per_class_accuracy(labels, predictions, classes),
            "confusion": confusion_matrix(labels, predictions, len(classes)).tolist()}
