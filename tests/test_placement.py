"""EVA-CLIP-18B over several GPUs without a layer split across two of them, planned on the CPU: the real remote code
at the full 18B sizes (config-18b.json) on the meta device, through the eva_clip backend's own planning.

The remote code's `EvaCLIPModel` declares no `_no_split_modules`, so transformers' own map may cut a layer between
its attention and its MLP; the workbench keeps the class of the repeated layers (`EvaCLIPEncoderLayer`) whole."""

from __future__ import annotations

import pytest
import torch

from helpers.config import ModelEntry
from helpers.models import ModelHandle
from helpers.models.placement import plan_placement

from .fixtures.eva_clip import full_config, write_code_and_config

PARAMETERS = 18_325_482_240  # the reference README's count; 36.65 GB in fp16
FP16_BYTES = 2 * PARAMETERS


@pytest.fixture(scope="module")
def eva_18b_folder(tmp_path_factory, remote_code_modules):
    """The repository's code and config.json at the full sizes, and no weights."""
    return write_code_and_config(tmp_path_factory.mktemp("eva18b") / "EVA-CLIP-18B", full_config())


def eva_18b(folder, max_memory: dict, strategy: str = "auto"):
    entry = ModelEntry(backend="eva_clip", pretrained=str(folder), precision="fp16", device_map=strategy,
                       max_memory={str(k): v for k, v in max_memory.items()})
    return ModelHandle("eva", entry, device="cpu").backend


def devices_of_each_layer(model: torch.nn.Module, device_map: dict) -> dict[str, set]:
    """For every EvaCLIPEncoderLayer, the devices its parameters are mapped to."""
    owners = sorted(device_map, key=len, reverse=True)

    def device(name: str):
        return device_map[next(m for m in owners if m == "" or name == m or name.startswith(f"{m}."))]

    return {name: {device(f"{name}.{p}") for p, _ in module.named_parameters()}
            for name, module in model.named_modules() if type(module).__name__ == "EvaCLIPEncoderLayer"}


@pytest.fixture(scope="module")
def meta_model(eva_18b_folder):
    """The 18B model on the meta device, as the backend plans on it (for the test's own checks of the maps)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    backend = eva_18b(eva_18b_folder, {0: "24GiB", 1: "24GiB"})
    config = AutoConfig.from_pretrained(eva_18b_folder, trust_remote_code=True)
    with init_empty_weights():
        return backend._model_class(config)._from_config(config)


@pytest.mark.parametrize("max_memory", [{0: "24GiB", 1: "24GiB"}, {0: "30GiB", 1: "30GiB"},
                                        {i: "16GiB" for i in range(4)}], ids=["2x24", "2x30", "4x16"])
def test_no_layer_is_split_across_two_gpus(eva_18b_folder, meta_model, max_memory):
    placement = eva_18b(eva_18b_folder, max_memory).placement({int(k): v for k, v in max_memory.items()})
    assert placement.unsplittable == ["EvaCLIPEncoderLayer"]
    layers = devices_of_each_layer(meta_model, placement.device_map)
    assert len(layers) == 48 + 32 and all(len(devices) == 1 for devices in layers.values())
    assert set(placement.device_map.values()) == set(max_memory), "every GPU used, nothing on the CPU or disk"
    assert placement.parameters == PARAMETERS and placement.bytes == FP16_BYTES
    assert sum(placement.device_bytes.values()) == FP16_BYTES
    for gpu, size in max_memory.items():
        assert placement.device_bytes[f"cuda:{gpu}"] <= int(size.removesuffix("GiB")) * 2**30
    line = placement.describe()
    assert line.startswith("18.33 B parameters, 36.65 GB in float16, placed with EvaCLIPEncoderLayer kept whole; "
                           "cuda:0: text_model, vision_model.embeddings, vision_model.encoder.layers.0-")
    assert "\n" not in line and line.count("cuda:") == len(max_memory)


def test_without_the_layer_class_accelerate_would_split_a_layer(meta_model):
    """What from_pretrained's own map does for this model: it declares nothing to keep whole."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    assert meta_model._get_no_split_modules("auto") == []
    memory = get_balanced_memory(meta_model, max_memory={0: "30GiB", 1: "30GiB"}, dtype=torch.float16)
    device_map = infer_auto_device_map(meta_model, max_memory=memory, dtype=torch.float16)
    split = [name for name, devices in devices_of_each_layer(meta_model, device_map).items() if len(devices) > 1]
    assert len(split) == 1 and split[0].startswith("vision_model.encoder.layers.")
    planned = plan_placement(meta_model, "auto", {0: "30GiB", 1: "30GiB"}, torch.float16)
    assert all(len(d) == 1 for d in devices_of_each_layer(meta_model, planned.device_map).values())


def test_sequential_fills_the_first_gpu_first(eva_18b_folder, meta_model):
    placement = eva_18b(eva_18b_folder, {0: "24GiB", 1: "24GiB"}, "sequential").placement({0: "24GiB", 1: "24GiB"})
    assert placement.device_bytes["cuda:0"] > placement.device_bytes["cuda:1"]
    assert all(len(d) == 1 for d in devices_of_each_layer(meta_model, placement.device_map).values())
