"""Label propagation of the zero-shot scores over the kNN graph of the image embeddings (ZLaP, Stojnic, Kalantidis
and Tolias, CVPR 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Method, knn_graph, normalise_rows, register_method


def propagation_operator(indices: np.ndarray, similarities: np.ndarray, gamma: float):
    """S = D^-1/2 W D^-1/2 of the symmetrised kNN graph W = A + A^T, A_ij = max(s_ij, 0)^gamma for j among i's
    neighbours (a sparse matrix)."""
    from scipy import sparse

    n, k = indices.shape
    weights = np.clip(similarities.astype(np.float64), 0, None) ** gamma
    affinity = sparse.csr_matrix((weights.ravel(), indices.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
    affinity = (affinity + affinity.T).tocsr()
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    scale = 1 / np.sqrt(np.where(degree > 0, degree, 1))  # an isolated image keeps its own scores
    return sparse.diags(scale) @ affinity @ sparse.diags(scale)


@register_method("label_propagation")
@dataclass(frozen=True)
class LabelPropagation(Method):
    """Label propagation (Zhou et al., "Learning with local and global consistency", NeurIPS 2004) on the kNN graph
    of the set's image embeddings, as ZLaP applies it to zero-shot classification ("Label propagation for zero-shot
    classification with vision-language models", Stojnic, Kalantidis and Tolias, CVPR 2024, arXiv 2404.04072).

    The graph: each image linked to its k most similar images, with weight max(cos, 0)^gamma (the power sharpens
    the graph, Iscen et al. CVPR 2017/2019, on whose label propagation ZLaP builds), symmetrised (W = A + A^T) and
    normalised, S = D^-1/2 W D^-1/2. The scores F minimise

        sum_ij W_ij || F_i / sqrt(D_ii) - F_j / sqrt(D_jj) ||^2 + mu sum_i || F_i - Y_i ||^2,   alpha = 1 / (1 + mu),

    whose minimiser is the solution of (I - alpha S) F = Y: the seeds diffused over the graph, images that the
    graph joins ending with similar scores. The system is symmetric positive definite and solved for each class by
    conjugate gradient (as Iscen et al. 2019 and ZLaP do), from the seeds. F is clipped at 0 (a truncated
    solution may dip below) and each row normalised.

    The seeds: ZLaP adds the class text embeddings to the graph as its only labeled nodes; this stage is given the
    probabilities (one model's, or the ensemble's, whose images live in no single text space), so every image is a
    node seeded with its zero-shot probabilities, Y = p, the form of Zhou et al. with soft labels on every node.
    With every node seeded, the diffusion must be weaker than Zhou et al.'s alpha = 0.99 (chosen for a few labeled
    nodes): there the graph's leading eigenvector swamps every seed, and on the synthetic sets of the tests every
    image ends in the largest class. The default alpha = 0.8 keeps each image's own scores in the sum.

    Helps where images of a class form neighbourhoods in the embedding space that the zero-shot scores get partly
    wrong; does nothing for a prior shift the graph does not see.
    """

    k: int = 10  # neighbours per image
    gamma: float = 3.0  # similarity power
    alpha: float = 0.8  # diffusion strength (0: the seeds unchanged; toward 1: the graph's structure alone)
    cg_iter: int = 20  # conjugate-gradient iterations (Iscen et al. 2019)
    tol: float = 1e-6  # relative residual at which CG stops earlier

    def check(self, where: str, fail) -> None:
        if not 1 <= self.k <= 1000:
            fail(f"{where}.k must be between 1 and 1000, got {self.k}")
        if not 0 < self.gamma <= 100:
            fail(f"{where}.gamma must be in (0, 100], got {self.gamma}")
        if not 0 < self.alpha < 1:
            fail(f"{where}.alpha must be in (0, 1), got {self.alpha}")
        if not 1 <= self.cg_iter <= 10_000:
            fail(f"{where}.cg_iter must be between 1 and 10000, got {self.cg_iter}")
        if not 0 < self.tol < 1:
            fail(f"{where}.tol must be in (0, 1), got {self.tol}")

    def __call__(self, probs: np.ndarray, image_embeddings) -> np.ndarray:
        from scipy import sparse
        from scipy.sparse.linalg import cg

        if len(probs) < 2:
            return probs
        operator = propagation_operator(*knn_graph(image_embeddings, self.k), self.gamma)
        system = (sparse.identity(len(probs)) - self.alpha * operator).tocsr()
        scores = np.empty_like(probs)
        for c in range(probs.shape[1]):
            scores[:, c], _ = cg(system, probs[:, c], x0=probs[:, c], rtol=self.tol, maxiter=self.cg_iter)
        return normalise_rows(np.clip(scores, 0, None), fallback=probs)
