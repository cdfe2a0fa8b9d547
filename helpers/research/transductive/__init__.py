"""Transductive and prior-correcting inference: a post-scoring stage over a whole set of images at once.

Zero-shot scoring labels each image alone. The methods here take every image's class probabilities and embedding
together and return new probabilities of the same shape (rows summing to 1): they re-estimate the class priors of
the set (`em_prior`), assign images to classes under a target class distribution (`ot_assign`), diffuse the scores
over the set's own neighbourhood graph (`label_propagation`), or fit a Gaussian mixture to the embeddings guided by
the graph and the zero-shot prediction (`transclip`). Each is a frozen dataclass whose fields are its parameters,
registered under its config name (`@register_method`), with the paper's defaults; `apply_transductive` is the one
entry point. Everything is deterministic: no random numbers, and the same input gives the same output.

What they change depends on each other image of the set: a label is no longer a function of its image alone (the
caveat of README, "Transductive inference").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...registry import Registry

METHODS = Registry("transductive method", __name__)

# kNN graphs are built a tile of KNN_BLOCK x KNN_BLOCK similarities at a time (16 MB of float32), whatever the
# number of images, so a million rows need no n x n matrix
KNN_BLOCK = 2048


def register_method(name: str):
    """A class decorator: `name` is the method's name in configs (`transductive.method`)."""
    return METHODS.register_class(name)


@dataclass(frozen=True)
class Method:
    """A transductive method: its fields are its parameters; calling it maps (images, classes) probabilities and
    (images, dim) L2-normalised embeddings to new (images, classes) probabilities."""

    name: ClassVar[str]

    def check(self, where: str, fail) -> None:
        """Call `fail(message)` for a parameter value the method does not take; `where` names it in the config."""

    def check_classes(self, n_classes: int, where: str, fail) -> None:
        """Call `fail(message)` where a parameter does not fit a set of `n_classes` classes."""

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def __call__(self, probs: np.ndarray, image_embeddings: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def build_method(name: str, **params) -> Method:
    """The registered method `name` with `params` (the others at their defaults), checked; ValueError otherwise."""
    if name not in METHODS:
        raise ValueError(METHODS.unknown(name))
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"{name} has no parameter {', '.join(map(repr, unknown))} "
                         f"(its parameters: {', '.join(sorted(fields)) or 'none'})")
    method = cls(**params)

    def fail(message: str):
        raise ValueError(message)

    method.check(name, fail)
    return method


def check_classes(method: Method, n_classes: int) -> None:
    def fail(message: str):
        raise ValueError(message)

    method.check_classes(n_classes, method.name, fail)


def apply_transductive(name: str, probs, image_embeddings, **params) -> np.ndarray:
    """Method `name` (a registered config name: em_prior, ot_assign, label_propagation, transclip) with `params`,
    applied to a whole set: `probs` (images, classes), each row a distribution (the zero-shot prediction),
    `image_embeddings` (images, dim), L2-normalised (an array or a memory map: the methods read it in blocks).
    Returns float64 probabilities of the same shape as `probs`, each row summing to 1."""
    return run_method(build_method(name, **params), probs, image_embeddings)


def run_method(method: Method, probs, image_embeddings) -> np.ndarray:
    probs = check_probabilities(probs)
    check_classes(method, probs.shape[1])
    if len(image_embeddings) != len(probs):
        raise ValueError(f"{method.name}: {len(probs)} rows of probabilities but {len(image_embeddings)} embeddings")
    out = method(probs, image_embeddings)
    if out.shape != probs.shape or not np.isfinite(out).all():
        raise RuntimeError(f"{method.name} returned {out.shape} (finite: {np.isfinite(out).all()}) for {probs.shape}")
    return out


def check_probabilities(probs) -> np.ndarray:
    """`probs` as float64 (images, classes) rows that sum to 1 (within rounding); ValueError otherwise."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probabilities must be (images, classes >= 2), got shape {probs.shape}")
    if (probs < 0).any() or not np.isfinite(probs).all() or not np.allclose(probs.sum(axis=1), 1, atol=1e-4):
        raise ValueError("probabilities must be finite, >= 0, and each row must sum to 1")
    return normalise_rows(probs)


def normalise_rows(values: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """Each row divided by its sum; a row that sums to 0 becomes `fallback`'s row (uniform without one)."""
    values = np.asarray(values, dtype=np.float64)
    sums = values.sum(axis=1, keepdims=True)
    empty = sums[:, 0] <= 0
    out = values / np.where(sums > 0, sums, 1)
    if empty.any():
        out[empty] = fallback[empty] if fallback is not None else 1 / values.shape[1]
    return out


def class_probabilities(class_scores) -> np.ndarray:
    """A scoring mode's class scores as probabilities: each row divided by its sum, which keeps its argmax, so the
    labels before the stage are the run's own. Every scoring mode's class scores are probability mass: the class
    means of the joint softmax over prompts (joint_softmax_mean; the rows sum to less than 1), or a softmax over
    classes (prototype, mean_logit), and the ensemble's are their weighted sums."""
    scores = np.asarray(class_scores, dtype=np.float64)
    if (scores < 0).any():
        raise ValueError("the transductive stage needs class scores that are probabilities (>= 0); this scoring "
                         "mode's are not")
    return normalise_rows(scores)


def knn_graph(embeddings, k: int, block: int = KNN_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `k` most similar other rows by cosine similarity (the rows are L2-normalised): indices (n, k)
    and similarities (n, k), most similar first (then by index). Exact, O(n^2 dim) arithmetic, a (block x block)
    tile of similarities at a time, each tile's best k merged into its rows' running best k (and, the similarity
    being symmetric, its transpose into its columns', so each pair is computed once): memory is a tile and the
    (n, k) result, whatever n. Every tile's product has the same shape (the last tiles are padded), so a
    similarity is the same number whatever the set's size. No random numbers: the same input gives the same
    graph."""
    n, dim = embeddings.shape
    k = max(min(k, n - 1), 0)
    best_sims = np.full((n, k), -np.inf, dtype=np.float32)
    best = np.full((n, k), n, dtype=np.int64)
    if k == 0:
        return best, best_sims
    tile_rows = np.zeros((block, dim), dtype=np.float32)
    tile_cols = np.zeros((dim, block), dtype=np.float32)

    def merge(rows: slice, sims: np.ndarray, first_col: int) -> None:
        take = min(k, sims.shape[1])
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        merged_sims = np.concatenate([best_sims[rows], np.take_along_axis(sims, top, axis=1)], axis=1)
        merged = np.concatenate([best[rows], top + first_col], axis=1)
        order = np.lexsort((merged, -merged_sims), axis=1)[:, :k]  # by similarity, then index
        best_sims[rows] = np.take_along_axis(merged_sims, order, axis=1)
        best[rows] = np.take_along_axis(merged, order, axis=1)

    for col in range(0, n, block):
        cols = slice(col, min(col + block, n))
        tile_cols[:, :cols.stop - col] = np.asarray(embeddings[cols], dtype=np.float32).T
        for row in range(0, col + 1, block):
            rows = slice(row, min(row + block, n))
            tile_rows[:rows.stop - row] = embeddings[rows]
            sims = (tile_rows @ tile_cols)[:rows.stop - row, :cols.stop - col]
            if row == col:
                np.fill_diagonal(sims, -np.inf)  # not its own neighbour
            merge(rows, sims, col)
            if row != col:
                merge(cols, np.ascontiguousarray(sims.T), row)
    return best, best_sims


def labels_moved(before: np.ndarray, after: np.ndarray) -> int:
    return int((np.asarray(before).argmax(axis=1) != np.asarray(after).argmax(axis=1)).sum())
