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
    of the set's image embeddings, after ZLaP ("Label propagation for zero-shot classification with vision-language
    models", Stojnic, Kalantidis and Tolias, CVPR 2024, arXiv 2404.04072), without ZLaP's text nodes.

    The scores F minimise

        sum_ij W_ij || F_i / sqrt(D_ii) - F_j / sqrt(D_jj) ||^2 + mu sum_i || F_i - Y_i ||^2,   alpha = 1 / (1 + mu),

    whose minimiser solves (I - alpha S) F = Y, S = D^-1/2 W D^-1/2: the seeds diffused over the graph, images that
    the graph joins ending with similar scores. The system is symmetric positive definite and solved for each class
    by conjugate gradient from the seeds (relative residual `tol`, at most `cg_iter` iterations). F is clipped at 0
    (a truncated solution may dip below) and each row normalised.

    ZLaP, as its abstract and its authors' released code (github.com/vladan-stojnic/ZLaP, MIT) have it: one graph
    over the images and the C class text embeddings, each image linked to its k nearest images and, searched
    separately, to its k nearest class texts (k capped at C); negative similarities set to 0; the image-to-text
    similarities raised to the power gamma (the image-to-image ones are not); symmetrised, W = A + A^T, normalised as
    above; for each class c, (I - alpha S) F = e_c with e_c one at class c's text node and 0 elsewhere, solved by
    conjugate gradient (tolerance 1e-6, at most 50 iterations); image i's score for c is F_i. Defaults k = 5,
    gamma = 5, alpha = 0.3 (the code's, and its README's command for CLIP on ImageNet). The paper's own text past its
    first page could not be read where this was written, so its equation and section numbers are not cited here.

    Where this departs from ZLaP, and why:
    - No text nodes. The stage is given probabilities (one model's, or an ensemble's, whose images live in no single
      text space), not the class text embeddings, so the zero-shot prediction enters as seeds instead: every image
      is a node seeded with its zero-shot probabilities, Y = p, Zhou et al.'s form with soft labels on every node.
    - gamma therefore has no image-to-text edges to sharpen; it sharpens the image-to-image edges, A_ij =
      max(cos, 0)^gamma for j among i's k nearest images, as in Iscen et al. (CVPR 2017, 2019), on whose diffusion
      ZLaP builds, with their gamma = 3.
    - alpha = 0.8, not 0.3: ZLaP's 0.3 spreads C one-hot seeds at the text nodes; here every image is a seed, and
      alpha weighs its neighbours' scores against its own. On the synthetic sets of tests/test_transductive.py
      (zero-shot 85.6-85.9% right), ZLaP's k 5, gamma 5 (here on the image edges) and alpha 0.3 gain 0.5-1.0 point;
      k 5, gamma 3 and alpha 0.8 gain 2.5-3.3. Zhou et al.'s 0.99 (for a few labeled seeds) lets the graph's leading
      eigenvector swamp every seed, and every image ends in the largest class.
    - k = 5 as ZLaP, counted without the image itself (ZLaP's search returns the image among its own k, and its
      normalisation then drops that self-link: 4 other images); CG at ZLaP's tolerance and iteration cap.

    Helps where images of a class form neighbourhoods in the embedding space that the zero-shot scores get partly
    wrong; does nothing for a prior shift the graph does not see.
    """

    k: int = 5  # neighbours per image (ZLaP's k)
    gamma: float = 3.0  # power of the image-to-image similarities (Iscen et al.'s; ZLaP's 5 is on image-to-text)
    alpha: float = 0.8  # diffusion strength (0: the seeds unchanged; toward 1: the graph's structure alone)
    cg_iter: int = 50  # at most this many conjugate-gradient iterations (ZLaP's cap)
    tol: float = 1e-6  # relative residual at which CG stops earlier (ZLaP's)

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
