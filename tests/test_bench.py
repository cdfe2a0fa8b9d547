"""The benchmarks, end to end on a tiny architecture and a small store: each runs from its command line and ends
with one JSON line holding every figure; the pieces they measure with."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from helpers import bench
from helpers.bench import report as bench_report
from helpers.bench import runners
from helpers.config import ModelEntry
from helpers.models import ModelHandle, resolve_precision
from helpers.research.data import load_test_set

from .conftest import TINY_ARCH


def test_benchmark_runs_end_to_end_and_ends_with_its_json(scene_dir, tiny_arch, tmp_path, capsys, monkeypatch):
    counted = bench_report.flops_per_image

    def fails_in_fp16(handle):  # a variant that fails on this machine is reported, and the others measured
        if handle.entry.precision == "fp16":
            raise RuntimeError("no fp16 kernel here")
        return counted(handle)

    monkeypatch.setattr(bench_report, "flops_per_image", fails_in_fp16)
    out = tmp_path / "bench.json"
    bench.main(["--images", "12", "--arch", str(tiny_arch), "--batch-size", "8", "--scene", str(scene_dir),
                "--variants", "fp32,bf16,bf16+compile,auto,fp16", "--repeats", "1", "--profile", "--gemm-sizes",
                "128,256", "--out", str(out)])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last_line)
    assert report == json.loads(out.read_text())
    assert report["images"] == 12
    assert report["variants"] == ["fp32_eager", "bf16_eager", "bf16_compiled", "auto_eager", "fp16_eager"]
    assert report["fp16_eager_error"] == "RuntimeError: no fp16 kernel here"
    assert "fp16_eager_loop_agreement" not in report and "encode_best_fp16" not in report
    assert report["auto_precision"] == report["auto_eager_precision"] == resolve_precision("auto", torch.device("cpu"))
    for key in ("original_images_per_s", "fp32_eager_images_per_s", "bf16_eager_images_per_s",
                "bf16_compiled_images_per_s", "auto_eager_images_per_s", "encode_ratio_fp32", "encode_ratio_bf16",
                "compile_s_bf16_compiled", "ablation_ratio", "text_cache_ratio", "peak_rss_mb",
                "ceiling_images_per_s_bf16", "bf16_ceiling_fraction", "fp32_eager_model_images_per_s"):
        assert report[key] > 0, key
    # the loop ran on the 312 prompts: fp32 eager is the winner's arithmetic on the CPU, so its labels are the loop's
    assert report["fp32_eager_loop_agreement"] == 1 and 0 <= report["bf16_eager_loop_agreement"] <= 1
    measured = report["variants"][:-1]  # fp16 failed
    assert report["preprocess_images_per_s"] > 0
    for key in measured:  # against the model alone and the preprocessing alone, one after the other
        serial = 1 / (1 / report[f"{key}_model_images_per_s"] + 1 / report["preprocess_images_per_s"])
        assert report[f"{key}_pipeline_fraction"] == pytest.approx(report[f"{key}_images_per_s"] / serial)
    # the ceiling is the best product of the squares asked for and the model's own; a variant's fraction is its rate
    # over the ceiling's for its FLOPs (at most 1 on a quiet machine: measured at other moments, a loaded one can
    # give a variant a better moment than its ceiling, so the test checks the arithmetic, not the timing)
    batch_rows = 8 * 50  # a batch of 8 images of 7x7 patches and the class token
    assert [batch_rows, 64, 256] in report["linear_shapes"] and [8, 64, 256] in report["linear_shapes"]
    for precision in ("fp32", "bf16"):
        assert report[f"gemm_shape_{precision}"] in [[128] * 3, [256] * 3, *report["linear_shapes"]]
    for key in measured:  # against the ceiling of the precision its matmuls run in
        ceilings = [report[f"gemm_tflops_{p}"] * 1e3 / report[f"{key}_gflop_per_image"] for p in ("fp32", "bf16")]
        assert any(report[f"{key}_ceiling_fraction"] == pytest.approx(report[f"{key}_images_per_s"] / c)
                   for c in ceilings), key
        assert report[f"{key}_ceiling_fraction"] > 0
    profile = report["bf16_compiled_profile"]
    assert Path(profile["table"]).is_file() and profile["busy_ms_per_batch"] > 0 and len(profile["top_ops"]) > 3
    assert 0 < sum(op["share"] for op in profile["top_ops"]) <= 1 + 1e-6
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
    assert set(report["targets_met"]) == set(bench_report.TARGETS["cpu"])


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


def test_the_benchmarks_winner_variant_has_the_winners_batches(tiny_arch):
    args = argparse.Namespace(arch=str(tiny_arch), batch_size=128, device="cpu")
    winners = runners.Variant("fp32_eager_autocast", "fp32", autocast=True)
    fp16 = runners.Variant("fp16_eager", "fp16")
    assert runners.workbench_handle(args, winners).entry.batch_size == 32
    assert runners.workbench_handle(args, fp16).entry.batch_size == 128


def test_benchmark_variants_parse_and_bad_ones_are_errors():
    assert runners.parse_variants("fp32, bf16+compile,fp32+autocast,auto,fp16+compile=reduce-overhead") == [
        runners.Variant("fp32_eager", "fp32"), runners.Variant("bf16_compiled", "bf16", compile=True),
        runners.Variant("fp32_eager_autocast", "fp32", autocast=True), runners.Variant("auto_eager", "auto"),
        runners.Variant("fp16_compiled_reduce-overhead", "fp16", compile="reduce-overhead")]
    for bad in ("fp8", "fp16+fast", "fp16+compile=fastest", "fp16+compile+compile=max-autotune"):
        with pytest.raises(SystemExit, match=f"'{re.escape(bad)}' is not PRECISION\\[\\+compile\\[=MODE\\]\\]"):
            runners.parse_variants(f"fp32,{bad}")


def test_the_model_alone_runs_the_encodes_batches_and_the_preprocessing_alone_its_loader(scene_dir, tiny_arch):
    handle = ModelHandle("m", ModelEntry(backend="open_clip", arch=str(tiny_arch), pretrained="random",
                                         batch_size=4, precision="fp32"), "cpu")
    calls = []
    encode = handle.encoder.encode_images
    handle.encoder.encode_images = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    assert runners.model_images_per_s(handle, batches=3, rounds=2) > 0
    assert calls == [4] * 7  # a warm-up, then two rounds of three batches
    files = load_test_set(scene_dir).files[:10]
    assert runners.preprocess_images_per_s(files, handle.views[0], batch_size=4, num_workers=0, rounds=1) > 0


def test_the_ceiling_takes_the_best_of_the_products_it_tries():
    rate, shape = runners.gemm_flops_per_s(torch.float32, torch.device("cpu"), [(8, 8, 8), (256, 256, 256)])
    assert shape == (256, 256, 256) and rate > 0  # a product of 8 rows cannot keep a CPU busy


def test_the_store_benchmark_runs_and_ends_with_its_json(tmp_path, capsys):
    from helpers import bench

    out = tmp_path / "store.json"
    bench.main(["store", "--rows", "3000", "--dim", "8", "--segment-rows", "1000", "--lookups", "500", "--append",
                "200", "--repeats", "2", "--dir", str(tmp_path), "--out", str(out)])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert report["segments"] == 3 and [r[p]["segments_opened"] for r in report["rounds"] for p in r] == [3, 4, 5, 6]
    for key in ("open_s", "lookup_s", "append_s", "peak_rss_mb", "disk_mb", "append_small_s", "contains_s"):
        assert report[key] >= 0, key
    assert set(report["targets_met"]) == {"open_s", "lookup_s", "append_s", "peak_rss_mb"}
    assert list(tmp_path.iterdir()) == [out]  # the store was removed




def test_the_transductive_benchmark_times_every_method_and_ends_with_its_json(tmp_path, capsys):
    from helpers.research.transductive import METHODS

    out = tmp_path / "transductive.json"
    bench.main(["transductive", "--rows", "200", "--dim", "256", "--repeats", "1", "--out", str(out)])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert (report["rows"], report["dim"], report["classes"]) == (200, 256, 6)
    assert list(report["methods"]) == METHODS.names() and set(report["targets_met"]) == set(METHODS.names())
    for name, entry in report["methods"].items():
        assert entry["seconds"] > 0 and entry["seconds_quarter_rows"] > 0 and entry["peak_mb"] >= 0, name
        assert entry["estimate_1m_s"] >= entry["seconds"] and 0 <= entry["labels_moved"] <= 200, name
        assert 0 <= entry["accuracy"] <= 1, name
    for name in ("label_propagation", "transclip"):  # each graph method's graph, at its default k
        assert report[f"knn_graph_k{METHODS[name]().k}_s"] > 0, name
    assert report["estimate_rows"] == 1_000_000
    assert 0.3 < report["zero_shot_accuracy"] < 0.95  # the synthetic set: zero-shot errs
