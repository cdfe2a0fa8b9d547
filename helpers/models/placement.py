"""A model spread over several devices, layer by layer: the device map is built here, with every layer kept whole.

transformers builds a device map from the classes a model declares unsplittable (`_no_split_modules`, gathered over
its submodules). A model's remote code may declare none: EVA-CLIP-18B's `EvaCLIPModel` does not, and with the full
18B sizes and 2 x 30 GiB accelerate's map puts vision layer 41's attention on GPU 0 and its MLP on GPU 1, so the
residual sum inside the layer adds tensors on two devices. Here the unsplittable classes are those the model
declares, else the class of its repeated layers (the items of its ModuleLists, e.g. `EvaCLIPEncoderLayer`); the map
is accelerate's `infer_auto_device_map` over the memory that `get_balanced_memory` shares out (`sequential`: the
devices' whole memory, in order), as from_pretrained computes it, and the placement is printed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def unsplittable_classes(model: torch.nn.Module) -> list[str]:
    """The classes of `model` that no device map may split: those it declares (transformers' `_no_split_modules`
    of it and its submodels), else those of its repeated layers."""
    try:
        declared = model._get_no_split_modules("auto") if hasattr(model, "_get_no_split_modules") else []
    except ValueError:  # a submodel that declares nothing (None): transformers refuses any map
        declared = []
    if declared:
        return sorted(declared)
    return sorted({type(items[0]).__name__ for items in model.modules()
                   if isinstance(items, torch.nn.ModuleList) and len(items) > 1
                   and len({type(item) for item in items}) == 1 and list(items[0].children())})


def _device_name(where) -> str:
    return f"cuda:{where}" if isinstance(where, int) else str(where)


def _ranges(names: list[str]) -> list[str]:
    """Module names with runs of consecutive layers written as one: layers.0, layers.1, layers.2 -> layers.0-2."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None
    for name in names + [""]:
        found = re.fullmatch(r"(.*\.)(\d+)", name)
        if found and run and run[0] == found[1] and int(found[2]) == run[2] + 1:
            run = (run[0], run[1], int(found[2]))
            continue
        if run:
            out.append(f"{run[0]}{run[1]}" + (f"-{run[2]}" if run[2] != run[1] else ""))
            run = None
        if found:
            run = (found[1], int(found[2]), int(found[2]))
        elif name:
            out.append(name)
    return out


@dataclass
class Placement:
    """A device map (module name -> GPU index, "cpu" or "disk") and what it places: the parameters, their bytes in
    the dtype they are loaded in, and those of each device."""

    device_map: dict[str, int | str]
    unsplittable: list[str]
    parameters: int
    bytes: int
    device_bytes: dict[str, int]
    dtype: torch.dtype

    def describe(self) -> str:
        """One line: the size, what is kept whole, and each device's modules (runs of layers as ranges) and bytes."""
        by_device: dict[str, list[str]] = {}
        for name, where in self.device_map.items():
            by_device.setdefault(_device_name(where), []).append(name or "(the whole model)")
        parts = [f"{device}: {', '.join(_ranges(names))} ({self.device_bytes.get(device, 0) / 1e9:.2f} GB)"
                 for device, names in by_device.items()]
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"{self.parameters / 1e9:.2f} B parameters, {self.bytes / 1e9:.2f} GB in {dtype}, placed with "
                f"{', '.join(self.unsplittable) or 'nothing'} kept whole; " + "; ".join(parts))


def plan_placement(model: torch.nn.Module, strategy: str, max_memory: dict | None, dtype: torch.dtype) -> Placement:
    """The device map of `model` (on the meta device: only the sizes are read) for a from_pretrained strategy
    ("auto", "balanced", "balanced_low_0", "sequential"), its layers unsplittable."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    unsplittable = unsplittable_classes(model)
    given = dict(max_memory) if max_memory else None  # accelerate rewrites the sizes in place
    if strategy == "sequential":
        memory = get_max_memory(given)
    else:
        memory = get_balanced_memory(model, max_memory=given, no_split_module_classes=unsplittable, dtype=dtype,
                                     low_zero=strategy == "balanced_low_0")
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=unsplittable, dtype=dtype)
    return _placement(model, device_map, unsplittable, dtype)


def _placement(model, device_map: dict, unsplittable: list[str], dtype: torch.dtype) -> Placement:
    size = torch.finfo(dtype).bits // 8
    owners = sorted(device_map, key=len, reverse=True)  # the most specific module first
    device_bytes: dict[str, int] = {}
    parameters = 0
    for name, parameter in model.named_parameters():
        owner = next(m for m in owners if m == "" or name == m or name.startswith(f"{m}."))
        device = _device_name(device_map[owner])
        device_bytes[device] = device_bytes.get(device, 0) + parameter.numel() * size
        parameters += parameter.numel()
    return Placement(device_map, unsplittable, parameters, parameters * size, device_bytes, dtype)

