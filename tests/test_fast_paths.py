"""The encoder's speed paths give the features of the plain forward: the class-token-only last block of open_clip
ViTs, and `compile: true` (torch.compile with padding of the last batch); `precision: auto` and autocast."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import models
from helpers.config import ConfigError, ModelEntry
from helpers.models import ModelHandle, resolve_precision
from helpers.research.scoring import FLOAT32, LogitArithmetic
from helpers.runs.pipeline import predict

from .conftest import TINY_ARCH

PIXELS = torch.randn(5, 3, 224, 224, generator=torch.Generator().manual_seed(0))

# vision_cfg changes -> whether the last block may run for the class token only
VISION_VARIANTS = {
    "plain": ({}, True),
    "layer scale": ({"ls_init_value": 0.5}, True),
    "final LN after pool": ({"final_ln_after_pool": True}, True),
    "patch dropout (inactive in eval)": ({"patch_dropout": 0.5}, True),
    "no ln_pre": ({"no_ln_pre": True}, True),
    "average pool": ({"pool_type": "avg"}, False),
    "attentional pool": ({"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}, False),
    "custom blocks (qk norm)": ({"qk_norm": True}, False),
}


def arch_file(tmp_path, vision_changes: dict):
    arch = {**TINY_ARCH, "vision_cfg": {**TINY_ARCH["vision_cfg"], "layers": 3, **vision_changes}}
    path = tmp_path / f"tiny-{abs(hash(json.dumps(vision_changes, sort_keys=True)))}.json"
    path.write_text(json.dumps(arch))
    return path


def handle_for(arch, **fields) -> ModelHandle:
    return ModelHandle("m", ModelEntry(backend="open_clip", pretrained="random", arch=str(arch), seed=3, **fields),
                       device="cpu")


def full_forward(handle: ModelHandle, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        x = handle.encoder.model.encode_image(pixels.to(handle.encoder.dtype)).float()
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("variant", list(VISION_VARIANTS))
def test_class_token_last_block_gives_the_full_forwards_features(variant, tmp_path):
    changes, eligible = VISION_VARIANTS[variant]
    handle = handle_for(arch_file(tmp_path, changes))
    assert handle.encoder.class_token_only is eligible
    torch.testing.assert_close(handle.encoder.encode_images(PIXELS), full_forward(handle, PIXELS),
                               rtol=0, atol=1e-6)


def test_class_token_shortcut_holds_in_bf16(tmp_path):
    handle = handle_for(arch_file(tmp_path, {}), precision="bf16")
    assert handle.encoder.class_token_only
    torch.testing.assert_close(handle.encoder.encode_images(PIXELS), full_forward(handle, PIXELS),
                               rtol=0, atol=2e-2)


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_compiled_encoder_matches_eager_and_pads_the_last_batch(precision, atol, tmp_path):
    arch = arch_file(tmp_path, {})
    eager, compiled = handle_for(arch, precision=precision), handle_for(arch, precision=precision, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    full, last = compiled.encoder.encode_images(PIXELS[:3]), compiled.encoder.encode_images(PIXELS[3:])
    assert counters["stats"]["unique_graphs"] - graphs == 1, "the smaller last batch must not compile again"
    assert last.shape == (2, TINY_ARCH["embed_dim"])
    torch.testing.assert_close(torch.cat([full, last]), eager.encoder.encode_images(PIXELS), rtol=0, atol=atol)


def test_two_compiled_models_keep_their_own_weights(tmp_path):
    """Frozen weights are constants of the compiled graph: a second model of the same shape must not reuse the
    first one's."""
    arch = arch_file(tmp_path, {})
    for seed in (1, 2):
        entry = {"backend": "open_clip", "pretrained": "random", "arch": str(arch), "seed": seed}
        compiled = ModelHandle("m", ModelEntry(**entry, compile=True), device="cpu")
        eager = ModelHandle("m", ModelEntry(**entry), device="cpu")
        torch.testing.assert_close(compiled.encoder.encode_images(PIXELS), eager.encoder.encode_images(PIXELS),
                                   rtol=0, atol=1e-5)


def test_compile_has_its_own_image_cache_but_shares_the_prompts(tmp_path):
    arch = arch_file(tmp_path, {})
    eager, compiled = handle_for(arch), handle_for(arch, compile=True)
    assert "compile" not in eager.identity and compiled.identity["compile"] is True
    assert compiled.text_identity == eager.text_identity == eager.identity
    assert not compiled.loaded


def test_autocast_is_the_winners_cuda_autocast_a_no_op_on_the_cpu(tmp_path):
    arch = arch_file(tmp_path, {})
    plain, autocast = handle_for(arch), handle_for(arch, autocast=True)
    # on the CPU the winner's torch.cuda.amp.autocast() did nothing: the same features, the same cache entries
    assert autocast.identity == plain.identity and autocast.text_identity == plain.text_identity
    assert not autocast.encoder.autocast and not autocast.exact_batches
    torch.testing.assert_close(autocast.encoder.encode_images(PIXELS), plain.encoder.encode_images(PIXELS),
                               rtol=0, atol=0)


def test_the_winners_autocast_on_a_gpu_has_its_own_cache_entries_per_batch_size_and_prompt_list(tmp_path):
    """Identities only (nothing loads): under CUDA autocast a feature's last bits can depend on its batch."""
    from helpers.infra.cache import image_store, text_store

    arch = arch_file(tmp_path, {})
    entry = ModelEntry(backend="open_clip", pretrained="random", arch=str(arch), seed=3, autocast=True,
                       precision="fp32")
    cuda = torch.device("cuda", 0)  # with its index: `cuda` alone would ask the driver which GPU is current
    gpu, gpu_64 = (ModelHandle("m", dataclasses.replace(entry, batch_size=b), cuda) for b in (32, 64))
    plain = ModelHandle("m", dataclasses.replace(entry, autocast=False), cuda)
    assert gpu.exact_batches and gpu.identity == {**plain.identity, "autocast": "fp16-normalised", "batch_size": 32}
    assert gpu_64.identity["batch_size"] == 64 and gpu_64.text_identity == gpu.text_identity
    assert "batch_size" not in gpu.text_identity
    assert gpu.logit_arithmetic == LogitArithmetic.fp16_on("cuda:0") and plain.logit_arithmetic == FLOAT32
    view = gpu.views[0]
    assert image_store(tmp_path, gpu, view).root != image_store(tmp_path, gpu_64, view).root
    winner, bare = ["a photo of a Sea", "Sea"], ["Sea"]
    assert text_store(tmp_path, gpu, winner).root != text_store(tmp_path, gpu, bare).root
    assert text_store(tmp_path, plain, winner).root == text_store(tmp_path, plain, bare).root


# --- precision auto (issue 11, item 4) and torch.compile's modes

NATIVE_BF16 = models.device.cpu_computes_bf16_natively  # the real one: conftest makes every test's CPU one without

@pytest.mark.parametrize("native, on_the_cpu", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_is_fp16_on_a_gpu_and_bf16_only_on_a_cpu_that_computes_it(monkeypatch, native, on_the_cpu):
    monkeypatch.setattr(models.device, "cpu_computes_bf16_natively", lambda: native)
    assert resolve_precision("auto", torch.device("cpu")) == on_the_cpu
    assert resolve_precision("auto", torch.device("cuda", 1)) == "fp16"
    # where the weights go decides: a device_map of the CPU under a GPU run
    entry = ModelEntry(backend="hf_clip", pretrained="/nowhere", device_map="cpu")
    assert ModelHandle("m", entry, torch.device("cuda")).entry.precision == on_the_cpu
    spread = dataclasses.replace(entry, device_map="auto")
    assert ModelHandle("m", spread, torch.device("cuda")).entry.precision == "fp16"
    for explicit in ("fp32", "fp16", "bf16"):
        assert resolve_precision(explicit, torch.device("cpu")) == resolve_precision(explicit, torch.device("cuda")) \
            == explicit


def test_native_bf16_is_what_the_cpu_flags_say():
    """torch's report agrees with the kernel's: AVX512-BF16 or AMX (the 2-core Xeon of the issue has AVX-512 but
    neither, and there bf16 encoded at 0.29x fp32)."""
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    assert NATIVE_BF16() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def test_precision_auto_is_the_default_and_a_run_records_its_choice(make_config, tiny_arch, tiny_checkpoints,
                                                                    tmp_path, monkeypatch, count_image_batches):
    monkeypatch.setattr(models.device, "cpu_computes_bf16_natively", lambda: False)
    a, b = tiny_checkpoints
    entries = {"a": {"backend": "open_clip", "arch": str(tiny_arch), "pretrained": str(a), "sharpness": 2.3},
               "b": {"backend": "open_clip", "arch": str(tiny_arch), "pretrained": str(b), "sharpness": 2.0}}
    auto = make_config(models=entries)
    assert auto.models["a"].precision == "auto"
    predict(auto, tmp_path / "auto", progress=False)
    record = json.loads((tmp_path / "auto" / "models" / "a" / "model.json").read_text())
    assert (record["precision"], record["precision_setting"], record["identity"]["precision"]) == (
        "fp32", "auto", "fp32")
    encoded = count_image_batches["n"]
    predict(make_config(), tmp_path / "fp32", progress=False)  # fp32 explicitly: the same features, from the cache
    assert count_image_batches["n"] == encoded > 0
    assert (tmp_path / "auto" / "submission.csv").read_bytes() == (tmp_path / "fp32" / "submission.csv").read_bytes()


def test_compile_takes_torch_compiles_modes(make_config, monkeypatch):
    compiled = {}

    def fake_compile(forward, **kwargs):
        compiled.update(kwargs)
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = make_config()
    entry = config.models["a"]
    for mode, expected in (("reduce-overhead", {"mode": "reduce-overhead"}), (True, {"options": {"freezing": True}})):
        compiled.clear()
        handle = ModelHandle("a", dataclasses.replace(entry, compile=mode), "cpu")
        assert handle.identity["compile"] == mode and handle.encoder.compiled
        assert compiled == {"dynamic": False, **expected}
    with pytest.raises(ConfigError, match="models.a.compile is 'fastest', expected one of default, reduce-overhead"):
        make_config(models={"a": {"backend": "open_clip", "arch": "ViT-B-32", "pretrained": "random",
                                  "compile": "fastest"}}, ensemble={"weights": {"a": 1.0}})
