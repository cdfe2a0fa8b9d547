"""The encoder's speed paths give the features of the plain forward: the class-token-only last block of open_clip
ViTs, and `compile: true` (torch.compile with padding of the last batch). Also the benchmark, end to end on a tiny
architecture: it must run from its command line and end with one JSON line holding every figure.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import bench
from helpers.config import ModelEntry
from helpers.models import ModelHandle

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


def test_benchmark_runs_end_to_end_and_ends_with_its_json(scene_dir, tiny_arch, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--images", "12", "--arch", str(tiny_arch), "--batch-size", "8", "--scene", str(scene_dir),
                "--variants", "fp32,bf16,bf16+compile", "--out", str(out)])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last_line)
    assert report == json.loads(out.read_text())
    assert report["images"] == 12 and report["variants"] == ["fp32_eager", "bf16_eager", "bf16_compiled"]
    for key in ("original_images_per_s", "fp32_eager_images_per_s", "bf16_eager_images_per_s",
                "bf16_compiled_images_per_s", "encode_ratio_fp32", "encode_ratio_bf16", "compile_s_bf16_compiled",
                "ablation_ratio", "text_cache_ratio", "peak_rss_mb", "ceiling_images_per_s_bf16"):
        assert report[key] > 0, key
    best = report["encode_best_bf16"]  # the headline figures of a precision are its faster variant's
    assert best in ("bf16_eager", "bf16_compiled")
    assert report["bf16_images_per_s"] == report[f"{best}_images_per_s"] == max(
        report["bf16_eager_images_per_s"], report["bf16_compiled_images_per_s"])
    assert report["encode_ratio_bf16"] == report[f"encode_ratio_{best}"]
    assert report["bf16_label_agreement"] == report[f"{best}_label_agreement"]
    assert report["encode_ratio_fp32"] == report["encode_ratio_fp32_eager"]
    assert 0 <= report["bf16_label_agreement"] <= 1 and report["fp32_label_agreement"] == 1
    assert report["ablation_variants"] == 10 and report["ablation_labels_equal"]
    assert report["gflop_per_image"] == pytest.approx(_tiny_gflop(), rel=1e-6)
    assert report["embedding_bytes_per_image"] == 4 * TINY_ARCH["embed_dim"]
    assert set(report["targets_met"]) == set(bench.TARGETS)


def _tiny_gflop() -> float:
    """The tiny ViT's forward FLOPs by hand: patch embedding, 2 blocks (the last for the class token only)."""
    v = TINY_ARCH["vision_cfg"]
    width, tokens, patches = v["width"], (v["image_size"] // v["patch_size"]) ** 2 + 1, v["patch_size"] ** 2 * 3
    conv = 2 * (tokens - 1) * patches * width
    block = 2 * tokens * (3 * width * width + width * width + 2 * 4 * width * width) + 2 * 2 * tokens * tokens * width
    last = 2 * (width * width + tokens * 2 * width * width + width * width + 2 * 4 * width * width) \
        + 2 * 2 * tokens * width
    proj = 2 * width * TINY_ARCH["embed_dim"]
    return (conv + (v["layers"] - 1) * block + last + proj) / 1e9


def test_benchmark_variants_parse_and_bad_ones_are_errors():
    assert bench.parse_variants("fp32, bf16+compile,fp32+autocast") == [
        bench.Variant("fp32_eager", "fp32"), bench.Variant("bf16_compiled", "bf16", compile=True),
        bench.Variant("fp32_eager_autocast", "fp32", autocast=True)]
    for bad in ("fp8", "fp16+fast"):
        with pytest.raises(SystemExit, match=f"'{re.escape(bad)}' is not PRECISION\\[\\+compile\\]"):
            bench.parse_variants(f"fp32,{bad}")


def test_autocast_is_the_winners_cuda_autocast_a_no_op_on_the_cpu(tmp_path):
    arch = arch_file(tmp_path, {})
    plain, autocast = handle_for(arch), handle_for(arch, autocast=True)
    assert autocast.identity["autocast"] is True and autocast.text_identity["autocast"] is True
    assert "autocast" not in plain.identity
    assert not autocast.encoder.autocast  # on the CPU the winner's torch.cuda.amp.autocast() did nothing
    torch.testing.assert_close(autocast.encoder.encode_images(PIXELS), plain.encoder.encode_images(PIXELS),
                               rtol=0, atol=0)
