"""Where a model runs and in which precision: devices, `precision: auto`, and where a spread model's parts went."""

from __future__ import annotations

import torch

from ..config import DEVICE_MAP_STRATEGIES, ConfigError, ModelEntry

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Where `autocast: true` autocasts: the winner's `torch.cuda.amp.autocast()` did nothing elsewhere. (The tests add
# "cpu", with CUDA's float32 policy for the loop's norm and softmax, to check the fp16 arithmetic on the CPU.)
AUTOCAST_DEVICE_TYPES = ("cuda",)


def autocasts_on(device: torch.device) -> bool:
    """Whether `autocast: true` autocasts on `device`."""
    return device.type in AUTOCAST_DEVICE_TYPES


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device is '{device}' but CUDA is not available here (use device: auto or cpu)")
    return torch.device(device)


def cpu_computes_bf16_natively() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), as torch reports them. Elsewhere torch emulates
    bf16, slower than fp32: 7.0 images/s against 27.2 on a 2-core Xeon with AVX-512 but neither (BENCHMARKS.md)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_tile"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """A model entry's precision on `device`: `auto` is fp16 on a GPU, and on the CPU bf16 where the CPU computes
    bf16 natively, else fp32; the others are themselves."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_computes_bf16_natively() else "fp32"


def weights_device(entry: ModelEntry, device: torch.device) -> torch.device:
    """Where a model entry's weights go: its `device_map` when that names one device, else the run's device (a
    spreading device_map puts them on the GPUs first)."""
    if entry.device_map is not None and entry.device_map not in DEVICE_MAP_STRATEGIES:
        return torch.device(entry.device_map)
    return device


def with_index(device: torch.device) -> torch.device:
    """`cuda` as the GPU it means (`cuda:N`): transformers and safetensors place weights by index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def placement_record(device_map: dict) -> dict[str, str]:
    """accelerate's device map as JSON: module name ("" for the whole model) -> "cuda:N", "cpu" or "disk"."""
    return {name: f"cuda:{where}" if isinstance(where, int) else str(where) for name, where in device_map.items()}


def input_device(placement: dict[str, str]) -> torch.device:
    """Where a spread model takes its inputs: its first GPU, else the CPU (accelerate's hooks move them on), as
    accelerate's dispatch_model chooses its main device."""
    gpus = [where for where in placement.values() if where not in ("cpu", "disk")]
    return torch.device(gpus[0] if gpus else "cpu")

