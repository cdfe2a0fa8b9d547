"""`ModelHandle`: one model entry of a run, its backend's identity and preprocessing at once, the model itself only
when first needed (a run whose embeddings are all cached never loads one)."""

from __future__ import annotations

import dataclasses
import gc
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError, ModelEntry
from ..research.prompts import PromptSet
from ..research.scoring import FLOAT32, LogitArithmetic
from ..research.steps import Preprocess, sharpened
from .backends import BACKENDS
from .device import autocasts_on, resolve_device, resolve_precision, weights_device, with_index
from .encoder import Encoder

if TYPE_CHECKING:  # torch is imported where a model is: a handle of a run whose embeddings are cached needs none
    import torch


def weights_cache(cache_dir: str | Path) -> Path:
    """Where a run's converted copies of model weights are kept: beside its embeddings, in the run's cache."""
    return Path(cache_dir) / "weights"


class ModelHandle:
    """One model entry of a run: identity and preprocessing at once, the model itself only when first needed."""

    def __init__(self, name: str, entry: ModelEntry, device: str | torch.device = "auto",
                 weights_cache: str | Path | None = None):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.precision_setting = entry.precision  # `entry.precision` is what it means here (`auto` resolved)
        self.name, self.entry = name, dataclasses.replace(entry, precision=resolve_precision(
            entry.precision, weights_device(entry, self.device)))
        self.backend = BACKENDS[entry.backend](name, self.entry)
        # where converted copies of the weights are kept (`converted`): the run's cache, else none is made
        self.backend.weights_cache = Path(weights_cache) if weights_cache is not None else None
        self._encoder: Encoder | None = None

    @property
    def identity(self) -> dict:
        """What determines the image features (cache keys). Under the winner's autocast on a GPU (`exact_batches`)
        also the batch size: an fp16 GEMM's rounding there can depend on its number of rows."""
        ident = self.backend.identity()
        if self.exact_batches:  # elsewhere autocast does nothing: the features are those without it
            ident.update(autocast="fp16-normalised", batch_size=self.entry.batch_size)
        return ident

    @property
    def text_identity(self) -> dict:
        """What determines the text features: `identity` less `compile` (only the image forward is compiled) and the
        batch size (the prompts are encoded together: see `exact_batches`)."""
        return {k: v for k, v in self.identity.items() if k not in ("compile", "batch_size")}

    @property
    def exact_batches(self) -> bool:
        """Whether this model computes the winner's arithmetic under CUDA autocast, where a feature's last bits can
        depend on what else is in its batch: then images are cached per batch size, and prompts per prompt list
        (encoded in one batch, as the winner did)."""
        return self.entry.autocast and autocasts_on(self.device)

    @property
    def logit_arithmetic(self) -> LogitArithmetic:
        """How this model's logits are computed: as the winner's loop did under autocast (fp16, on this GPU) where
        its features are that loop's, else in float32 on the CPU."""
        return LogitArithmetic.fp16_on(with_index(self.device)) if self.exact_batches else FLOAT32

    @property
    def views(self) -> list[Preprocess]:
        """The entry's preprocessing, one per test-time view (several: their scores are averaged)."""
        return self.backend.views()

    def view(self, steps: list) -> Preprocess:
        """This model's preprocessing with other steps (for ablations): after its resize, crop and RGB."""
        return self.backend.view(steps)

    def sharpened_view(self, factor: float) -> Preprocess:
        """This model's preprocessing at another sharpening factor (the `sharpness` shorthand's steps)."""
        return self.backend.view(sharpened(factor))

    @property
    def random_weights(self) -> bool:
        return self.entry.random_weights

    def check_weights(self) -> None:
        self.backend.check_weights()

    def check_prompts(self, prompts: PromptSet) -> None:
        """Every prompt fits the model's context, unless the entry says `truncate: true`; else one error that names
        the first prompt that does not, its group, its length and the limit (the tokenizer only: loads no model)."""
        if self.entry.truncate:
            return
        limit = self.backend.context_length()
        too_long = [(p, n) for p, n in zip(prompts.prompts, self.backend.token_counts(prompts.texts)) if n > limit]
        if too_long:
            (prompt, tokens), others = too_long[0], len(too_long) - 1
            more = f" (and {others} more prompt{'s' * (others > 1)})" if others else ""
            raise ConfigError(
                f"prompts: '{prompt.text}' (group {prompt.group}, class {prompts.classes[prompt.class_index]}) is "
                f"{tokens} tokens, more than the {limit} of model {self.name}'s context{more}: shorten it, or set "
                f"models.{self.name}.truncate: true to cut such prompts to {limit} tokens")

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            start = time.perf_counter()
            encoder = self.backend.load(self.device)
            encoder.load_seconds = round(time.perf_counter() - start, 3)
            self._encoder = encoder
        return self._encoder

    def close(self) -> None:
        """Free the model (and its GPU memory) before the next one is loaded. The encoder lets go of it first, so
        that a model without reference cycles of its own is freed at once; a garbage collection, which takes a
        quarter of a second in a large process, is made only when the model outlived that (a compiled forward or a
        transformers model's hooks can hold it in a cycle)."""
        if self._encoder is None:  # nothing to free
            return
        model = weakref.ref(self._encoder.model)
        self._encoder.release()
        self._encoder = None
        if model() is not None:
            gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
