"""EM re-estimation of the class priors of an unlabeled set (Saerens, Latinne and Decaestecker 2002)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Method, register_method


def estimate_prior(probs: np.ndarray, source_prior: np.ndarray, tol: float = 1e-6,
                   max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray, int]:
    """The EM of Saerens et al. (2002), "Adjusting the outputs of a classifier to new a priori probabilities: a
    simple procedure", Neural Computation 14(1): 21-41, eqs. 2.9-2.10.

    A classifier's posteriors p_t(w_i | x_k) are Bayes-optimal for the priors p_t(w_i) it was built under. Under
    other priors p(w_i) (the likelihoods p(x | w_i) unchanged) the posteriors are re-weighted by the prior ratio,
    and the new priors are the mean of the new posteriors; starting from p^(0)(w_i) = p_t(w_i), EM alternates

        E:  p^(s)(w_i | x_k) = [p^(s)(w_i) / p_t(w_i)] p_t(w_i | x_k) / sum_j [p^(s)(w_j) / p_t(w_j)] p_t(w_j | x_k)
        M:  p^(s+1)(w_i) = (1/N) sum_k p^(s)(w_i | x_k)

    which increases the likelihood of the unlabeled set at each step, until the priors change by less than `tol`
    (largest absolute change) or `max_iter` steps. Returns (adjusted posteriors, estimated priors, steps taken).
    """
    source = np.asarray(source_prior, dtype=np.float64)

    def posteriors(prior: np.ndarray) -> np.ndarray:
        weighted = probs * (prior / source)
        return weighted / weighted.sum(axis=1, keepdims=True)

    prior, steps, change = source.copy(), 0, np.inf
    while steps < max_iter and change >= tol:
        new_prior = posteriors(prior).mean(axis=0)
        change, prior, steps = np.abs(new_prior - prior).max(), new_prior, steps + 1
    return posteriors(prior), prior, steps


@register_method("em_prior")
@dataclass(frozen=True)
class EMPrior(Method):
    """Prior re-estimation by EM (Saerens, Latinne and Decaestecker 2002, Neural Computation 14(1); see
    `estimate_prior` for the equations): the posteriors re-weighted to the class priors EM estimates for this set.

    Helps where the set's class frequencies differ from those the scores assume (prior shift); leaves a set whose
    classes are as frequent as assumed nearly unchanged. The scores need to be roughly calibrated posteriors.

    `source_prior`: the priors the zero-shot scores assume, `uniform` (a prompt per class carries no class
    frequency) or one number per class; `tol`, `max_iter`: when EM stops (the paper iterates to convergence).
    """

    source_prior: str | list[float] = "uniform"
    tol: float = 1e-6
    max_iter: int = 1000

    def check(self, where: str, fail) -> None:
        check_distribution(self.source_prior, f"{where}.source_prior", fail)
        if isinstance(self.source_prior, list) and min(self.source_prior) <= 0:
            fail(f"{where}.source_prior must give every class a prior > 0 (EM divides by it), got {self.source_prior}")
        if not 0 < self.tol < 1:
            fail(f"{where}.tol must be in (0, 1), got {self.tol}")
        if not 1 <= self.max_iter <= 100_000:
            fail(f"{where}.max_iter must be between 1 and 100000, got {self.max_iter}")

    def check_classes(self, n_classes: int, where: str, fail) -> None:
        check_length(self.source_prior, n_classes, f"{where}.source_prior", fail)

    def __call__(self, probs: np.ndarray, image_embeddings) -> np.ndarray:
        source = distribution(self.source_prior, probs.shape[1])
        return estimate_prior(probs, source, self.tol, self.max_iter)[0]


def check_distribution(value: str | list[float], where: str, fail, named: tuple[str, ...] = ("uniform",)) -> None:
    """A class distribution as a config gives it: a name, or one positive number per class."""
    if isinstance(value, str):
        if value not in named:
            fail(f"{where} is '{value}', expected {' or '.join(named)}, or a list of one number per class")
    elif not value or any(v < 0 for v in value) or sum(value) <= 0:
        fail(f"{where} must be a list of numbers >= 0 with a positive sum (one per class), got {value}")


def check_length(value: str | list[float], n_classes: int, where: str, fail) -> None:
    if isinstance(value, list) and len(value) != n_classes:
        fail(f"{where} lists {len(value)} numbers for {n_classes} classes; give one per class")


def distribution(value: str | list[float], n_classes: int) -> np.ndarray:
    """`uniform`, or the list given (one number per class, normalised to sum 1), as probabilities."""
    if value == "uniform":
        return np.full(n_classes, 1 / n_classes)
    given = np.asarray(value, dtype=np.float64)
    return given / given.sum()
