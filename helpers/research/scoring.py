"""Zero-shot scoring of cached embeddings, and the probability ensemble (SPEC 1, steps 4 and 5).

Everything here takes L2-normalised float32 embeddings and is a few small matrix products. The arithmetic follows
the winner's notebook operation by operation (scale, then matmul, then softmax over all prompts) so that labels
match it exactly, in float32 or, for features computed under the winner's CUDA autocast, in its fp16
(`LogitArithmetic`); pooling is over each class's own prompts, never a reshape that assumes equal counts.

torch is imported where it computes, not with the module: the config check reads the registry (the modes' names,
and which give per-prompt probabilities) without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..registry import Registry

if TYPE_CHECKING:
    import torch

# scoring modes by config name (`scoring:`): a new mode is a function here (or in a module of its own) and one
# `@register_scorer` line
SCORERS = Registry("scoring mode", __name__)


@dataclass
class Scores:
    class_scores: torch.Tensor  # (images, classes); argmax is the prediction
    prompt_probs: torch.Tensor | None = None  # (images, prompts) when the mode has per-prompt probabilities

    @property
    def labels(self) -> np.ndarray:
        return self.class_scores.max(dim=-1)[1].numpy()


def _t(x) -> torch.Tensor:
    import torch

    return torch.as_tensor(np.asarray(x, dtype=np.float32) if not torch.is_tensor(x) else x, dtype=torch.float32)


def pool_by_class(prompt_scores: torch.Tensor, class_index, n_classes: int) -> torch.Tensor:
    """Mean of each class's own prompt columns: (images, prompts) -> (images, classes)."""
    import torch

    class_index = torch.as_tensor(np.asarray(class_index))
    return torch.stack([prompt_scores[:, class_index == c].mean(dim=-1) for c in range(n_classes)], dim=-1)


# Logits are computed this many images at a time, as the winner's loop did (its batches of 32): a matrix product's
# rounding can depend on how many rows it has, so fixed blocks make an image's numbers the same however many images
# are scored together (a run scores a large set in chunks of whole blocks).
SCORE_BLOCK_ROWS = 32


@dataclass(frozen=True)
class LogitArithmetic:
    """The dtype and device `scale * image @ text.T` is computed in; scores come back in float32, on the CPU.

    `FLOAT32` (the default) is the winner's loop where its autocast did nothing (the CPU). `fp16_on(device)` is that
    loop under CUDA autocast: the features are fp16 (exact in the float32 the cache keeps), `100.0 * features` is
    rounded to fp16, the matmul is an fp16 matmul whose result is rounded to fp16, and the softmax is autocast's
    (`softmax(logits, dtype=float32)`, the call autocast makes). How an fp16 matmul rounds depends on the kernel
    that computes it, which depends on the GPU and on the shapes, so it runs on the model's device in the winner's
    blocks of 32 images.
    """

    dtype: str = "float32"  # torch's name of the dtype
    device: str = "cpu"

    @classmethod
    def fp16_on(cls, device) -> LogitArithmetic:
        return cls("float16", str(device))

    def record(self) -> dict:
        """For model.json."""
        return {"dtype": self.dtype, "device": self.device}

    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


FLOAT32 = LogitArithmetic()


@dataclass(frozen=True)
class Scorer:
    """A registered scoring mode: `score(image_emb, text_emb, class_index, n_classes, logit_scale, arithmetic)`
    returns `Scores`, with per-prompt probabilities exactly when `per_prompt_probabilities` (then the ensemble can
    combine them and drop the small ones, as the winner did)."""

    name: str
    score: Callable[..., Scores]
    per_prompt_probabilities: bool


def register_scorer(name: str, per_prompt_probabilities: bool = False):
    def add(fn):
        SCORERS.register(name)(Scorer(name, fn, per_prompt_probabilities))
        return fn

    return add


def scaled_logits(image_emb, text_emb, logit_scale: float = 100.0,
                  arithmetic: LogitArithmetic = FLOAT32) -> torch.Tensor:
    """scale * cos(image, prompt), in blocks of SCORE_BLOCK_ROWS images, in the arithmetic's dtype and on its
    device."""
    import torch

    image, dtype = _t(image_emb), arithmetic.torch_dtype()
    text = _t(text_emb).to(arithmetic.device, dtype)
    # scaled, then rounded: for fp16 features `100.0 * x` is exact in float32, so this is the fp16 product the winner
    # rounded; for features its autocast left in float32 (a model ending in a float32 op) it is what its matmul cast
    blocks = [(logit_scale * image[s:s + SCORE_BLOCK_ROWS]).to(arithmetic.device, dtype) @ text.T
              for s in range(0, len(image), SCORE_BLOCK_ROWS)]
    return torch.cat(blocks) if blocks else text.new_zeros(0, len(text))


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """The float32 softmax over the last dimension, on the CPU; of fp16 logits, exactly as CUDA autocast takes it."""
    import torch

    return logits.softmax(dim=-1, dtype=torch.float32).cpu()


def joint_softmax_probs(image_emb, text_emb, logit_scale: float = 100.0,
                        arithmetic: LogitArithmetic = FLOAT32) -> torch.Tensor:
    """softmax(scale * cos) taken jointly over every prompt of every class, as the winner did (on the CPU)."""
    return _softmax(scaled_logits(image_emb, text_emb, logit_scale, arithmetic))


@register_scorer("joint_softmax_mean", per_prompt_probabilities=True)
def joint_softmax_scores(image_emb, text_emb, class_index, n_classes, logit_scale=100.0,
                         arithmetic: LogitArithmetic = FLOAT32) -> Scores:
    probs = joint_softmax_probs(image_emb, text_emb, logit_scale, arithmetic)
    return Scores(pool_by_class(probs, class_index, n_classes), probs)


@register_scorer("prototype")
def prototype_scores(image_emb, text_emb, class_index, n_classes, logit_scale=100.0,
                     arithmetic: LogitArithmetic = FLOAT32) -> Scores:
    """CLIP's usual practice: one prototype per class, the renormalised mean of its prompt embeddings."""
    prototypes = pool_by_class(_t(text_emb).T, class_index, n_classes).T
    prototypes = prototypes / prototypes.norm(dim=-1, keepdim=True)
    return Scores(_softmax(scaled_logits(image_emb, prototypes, logit_scale, arithmetic)))


@register_scorer("mean_logit")
def mean_logit_scores(image_emb, text_emb, class_index, n_classes, logit_scale=100.0,
                      arithmetic: LogitArithmetic = FLOAT32) -> Scores:
    """Mean of each class's logits, then softmax over classes."""
    logits = scaled_logits(image_emb, text_emb, logit_scale, arithmetic).float().cpu()
    return Scores(pool_by_class(logits, class_index, n_classes).softmax(dim=-1))


def score(mode: str, image_emb, text_emb, class_index, n_classes: int, logit_scale: float = 100.0,
          arithmetic: LogitArithmetic = FLOAT32) -> Scores:
    if mode not in SCORERS:
        raise ValueError(SCORERS.unknown(mode))
    return SCORERS[mode].score(image_emb, text_emb, class_index, n_classes, logit_scale, arithmetic)


def average_scores(views: list[Scores]) -> Scores:
    """Test-time views of the same images (several sharpening factors): the mean of their probabilities."""
    import torch

    if len(views) == 1:
        return views[0]
    probs = None
    if all(v.prompt_probs is not None for v in views):
        probs = torch.stack([v.prompt_probs for v in views]).mean(dim=0)
    return Scores(torch.stack([v.class_scores for v in views]).mean(dim=0), probs)


def ensemble_scores(scores: dict[str, Scores], weights: dict[str, float], class_index, n_classes: int,
                    drop_below: float | None = None) -> Scores:
    """Weighted sum of the models' per-prompt probabilities (or class scores, for modes without them), the
    optional drop of small probabilities, then the class mean."""
    import torch

    names = [n for n in weights if weights[n] > 0]
    if not names:
        raise ValueError("ensemble: every weight is 0")
    per_prompt = all(scores[n].prompt_probs is not None for n in names)
    if drop_below is not None and not per_prompt:
        raise ValueError("ensemble: drop_below needs per-prompt probabilities, which this scoring mode does not give")
    if per_prompt:
        combined = scores[names[0]].prompt_probs * weights[names[0]]
        for n in names[1:]:
            combined = combined + scores[n].prompt_probs * weights[n]
        if drop_below is not None:
            combined = torch.where(combined > drop_below, combined, 0)
        return Scores(pool_by_class(combined, class_index, n_classes), combined)
    combined = scores[names[0]].class_scores * weights[names[0]]
    for n in names[1:]:
        combined = combined + scores[n].class_scores * weights[n]
    return Scores(combined)
