"""A loaded model behind one interface: L2-normalised float32 image and text features, as the winner computed them.

torch is imported where the encoder computes: the backend modules subclass `Encoder`, and the config check imports
them for their rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Encoder:
    """A loaded model. Subclasses implement `_image_features` and `_text_features`.

    With `autocast`, both forwards run under CUDA autocast to fp16, as the winner's `torch.cuda.amp.autocast()`
    (on the CPU that context did nothing, and neither does this), and the features are normalised as the winner's
    `f /= f.norm(dim=-1, keepdim=True)` did there: the norm in float32 (autocast's), the quotient rounded back to
    the features' fp16. They are returned as float32, which holds fp16 values exactly; scoring rounds its logits as
    the winner's fp16 matmul did (`ModelHandle.logit_arithmetic`). Without autocast, features are normalised in
    float32 whatever the precision of the weights. Both encodes return their features on the model's device: a
    caller copies them to the host when it needs them (an encode once per flush, so that the GPU never waits for
    the host between batches).

    With `compile`, the image forward goes through torch.compile (`true`: on the CPU with inductor's weight freezing,
    which prepacks the GEMM weights and fuses the elementwise work between them; a mode name: that mode). Its shapes
    are static: a batch smaller than the largest so far (the last one) is padded to it, so that it runs the compiled
    graph instead of compiling another.

    How the model was loaded, for the run's records (all JSON-able):
    - `placement`: where each part of the model is, module name -> device ("cuda:N", "cpu" or "disk"; the name ""
      is the whole model). A transformers model's `hf_device_map`; `{"": "<device>"}` for a model on one device.
    - `weights_format`: what the weights were read from: "safetensors", "pytorch" (torch.save files, pickles,
      TorchScript), "numpy" (big_vision .npz), or None (random weights, or files that were not found afterwards).
    - `load_seconds`: the wall time of the load, set by `ModelHandle` (None for an Encoder made otherwise).
    `device` is where the inputs go: the model's device, or the first device of a model spread over several.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, tokenizer,
                 compile: bool | str = False, autocast: bool = False, placement: dict[str, str] | None = None,
                 weights_format: str | None = None):
        from .device import autocasts_on, with_index

        self.model, self.device, self.dtype, self.tokenizer = model.eval(), device, dtype, tokenizer
        self.placement = placement if placement is not None else {"": str(with_index(device))}
        self.weights_format, self.load_seconds = weights_format, None
        self.compiled, self.autocast = bool(compile), autocast and autocasts_on(device)
        self._image_forward = self._compile(self._image_features, compile) if compile else self._image_features
        self._compiled_batch: int | None = None

    def _compile(self, forward, mode: bool | str):
        import torch

        if isinstance(mode, str):
            return torch.compile(forward, dynamic=False, mode=mode)
        options = {"freezing": True} if self.device.type == "cpu" else {}
        return torch.compile(forward, dynamic=False, options=options)

    def release(self) -> None:
        """Let go of the model, and of the forward that refers back to this encoder (a reference cycle, which would
        keep the model until the next garbage collection)."""
        self.model = self._image_forward = None

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            n = len(pixels)
            pixels = pixels.to(self.device, self.dtype, non_blocking=True)
            if self.compiled:  # always a fresh buffer: an input made outside inference mode would recompile
                self._compiled_batch = max(self._compiled_batch or n, n)
                padded = pixels.new_zeros(self._compiled_batch, *pixels.shape[1:])
                padded[:n] = pixels
                pixels = padded
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
                x = self._image_forward(pixels)[:n]
            return self._normalised(x)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
                x = self._text_features(texts)
            return self._normalised(x)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """x / |x| as float32. Under autocast, as the winner's in-place `x /= x.norm(...)`: autocast computes that
        norm by `linalg_vector_norm(x, dtype=float32)`, and the float32 quotient is written back into x's dtype."""
        import torch

        if not self.autocast:
            x = x.float()
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        return (x / norm).to(x.dtype).float()

