"""Assignment to a target class distribution by exact optimal transport (OTTER, Shin et al., NeurIPS 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Method, normalise_rows, register_method
from .em_prior import check_distribution, check_length, distribution, estimate_prior


def target_counts(proportions: np.ndarray, n: int) -> np.ndarray:
    """n images shared out in `proportions` as whole counts summing to n (largest remainders, ties to the lower
    class index)."""
    exact = proportions * n
    counts = np.floor(exact).astype(np.int64)
    remainders = exact - counts
    order = np.lexsort((np.arange(len(proportions)), -remainders))
    counts[order[:n - counts.sum()]] += 1
    return counts


@register_method("ot_assign")
@dataclass(frozen=True)
class OTAssign(Method):
    """OTTER: "Effortless label distribution adaptation of zero-shot models", Shin, Sala et al., NeurIPS 2024,
    arXiv 2404.08461, section 3.

    The zero-shot prediction takes each image's argmax alone, so its predicted classes follow whatever bias the
    prompts carry. OTTER instead assigns the n images jointly, with the class distribution nu as a constraint: the
    transport plan

        pi* = argmin_{pi in Pi(mu, nu)} <pi, C>,   C_ij = -log p(y = j | x_i),   mu = (1/n) 1_n,

    where Pi(mu, nu) are the n x K non-negative matrices whose rows sum to mu and columns to nu, and image i's label
    is argmax_j pi*_ij. It is solved exactly by POT's network simplex (`ot.emd`), on the same problem scaled by n:
    margins of 1 per image and, with nu times n rounded to whole counts (`target_counts`), whole counts per class.
    Integer margins make the optimal vertex the simplex returns integral (the transportation polytope's vertices
    are), so each image goes to one class whole and the predicted counts are the target's exactly. Returned: n pi*,
    each row the image's assignment (one-hot).

    `target`: nu, `uniform` (balanced classes), a list of one number per class (the known or assumed distribution),
    or `em` (the priors `em_prior` estimates for the set, Saerens et al. 2002, as OTTER pairs its assignment with an
    estimate of the label distribution where it is not known). Helps where the class distribution is known or well
    estimated and the zero-shot predictions are biased toward some classes; hurts where the target is wrong.
    """

    target: str | list[float] = "uniform"
    max_iter: int = 10_000_000  # network simplex iterations (POT's default, 100,000, can stop short of the optimum)

    def check(self, where: str, fail) -> None:
        check_distribution(self.target, f"{where}.target", fail, named=("uniform", "em"))
        if self.max_iter < 1:
            fail(f"{where}.max_iter must be at least 1, got {self.max_iter}")

    def check_classes(self, n_classes: int, where: str, fail) -> None:
        check_length(self.target, n_classes, f"{where}.target", fail)

    def proportions(self, probs: np.ndarray) -> np.ndarray:
        if self.target == "em":
            return estimate_prior(probs, np.full(probs.shape[1], 1 / probs.shape[1]))[1]
        return distribution(self.target, probs.shape[1])

    def __call__(self, probs: np.ndarray, image_embeddings) -> np.ndarray:
        import ot

        n = len(probs)
        counts = target_counts(self.proportions(probs), n)
        cost = -np.log(np.clip(probs, np.finfo(np.float64).tiny, None))
        plan, log = ot.emd(np.ones(n), counts.astype(np.float64), cost, numItermax=self.max_iter, log=True)
        if log["warning"] is not None:
            raise RuntimeError(f"ot_assign: the network simplex did not reach the optimum ({log['warning']}); "
                               "raise transductive.params.max_iter")
        return normalise_rows(plan, fallback=probs)
