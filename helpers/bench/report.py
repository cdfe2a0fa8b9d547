"""The benchmark's run: the original loop and each variant timed side by side, then the agreement of their labels,
the ceiling, the prompt ablation and memory, assembled into one report (written after each stage) with its targets;
`encoding_main` is its command line."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from functools import partial
from pathlib import Path
from unittest.mock import patch

import numpy as np
import open_clip
import torch

from .. import bench
from ..infra.cache import default_num_workers, encode_images, encode_texts
from ..infra.files import PROJECT_ROOT
from ..models import DTYPES, resolve_device, resolve_precision
from ..models.device import cpu_computes_bf16_natively
from ..research import oracle
from ..research.prompts import load_prompts
from ..research.scoring import score
from . import cpu_model, timed
from .runners import (
    Variant,
    ablation_variants,
    arch_name,
    compute_precision,
    flops_per_image,
    gemm_flops_per_s,
    linear_shapes,
    memory_probe,
    model_images_per_s,
    parse_variants,
    preprocess_images_per_s,
    probe_memory,
    profile_batch,
    scene_subset,
    synchronize,
    warm_up,
    workbench_handle,
)

DEFAULT_SCENE = PROJECT_ROOT.parent / "shared" / "data" / "scene" / "Scene"
TARGETS = {
    # issue 16: what `precision: auto` runs by default, eager, at 85% of its model and its preprocessing one after
    # the other
    "cpu": {"encode_ratio_bf16": 3.0, "encode_ratio_fp32": 1.0, "ablation_ratio": 50.0, "text_cache_ratio": 100.0,
            "auto_pipeline_fraction": 0.85},
    # issue 11: bigG fp16 at 2x the winner's loop and 80% of the matmul ceiling, with 99% of fp16 eager's labels;
    # the winner's arithmetic at 1.2x, with the loop's labels
    "cuda": {"encode_ratio_fp16": 2.0, "fp16_ceiling_fraction": 0.8, "fp16_label_agreement": 0.99,
             "encode_ratio_fp32_eager_autocast": 1.2, "fp32_eager_autocast_loop_agreement": 1.0},
}
DEFAULT_VARIANTS = {"cpu": "fp32,bf16,auto,fp32+compile,bf16+compile",
                    "cuda": "fp32+autocast,fp16,fp16+compile,fp16+compile=reduce-overhead"}
LABEL_REFERENCE = {"cpu": "fp32_eager", "cuda": "fp16_eager"}  # the variant whose labels the others are held to


def measure_encoding(args, report, original, files, tmp, variants, prompts, profile_dir, save) -> dict:
    """Images/s of the original loop (on the bare class names) and of each variant, the best of `--repeats` rounds (a
    round times the original, the preprocessing alone, then every variant and its model alone on a batch already
    on the device, so that a slow spell of the machine does not fall on one side only), and each variant's ratio to
    the original and its share of the model and the preprocessing one after the other; per variant also the peak
    GPU memory of its model and encode, its FLOPs per image, and (`--profile`) a profile of one batch. The 312
    prompts once, then from the cache. Returns each variant's labels, and the loop's on the 312 prompts (as
    "original loop"). `save` writes the report so far. A variant that fails is reported
    (`<variant>_error`) and taken out of `variants`; the others are measured."""
    best, labels, shapes = {}, {}, set()
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    classes = prompts.classes
    num_workers = default_num_workers(device) if args.num_workers is None else args.num_workers

    def record(name: str, seconds: float, round_: int) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)
        report.setdefault("rounds", {}).setdefault(name, []).append(len(files) / seconds)
        print(f"round {round_ + 1}: {name:22s} {len(files) / seconds:7.1f} images/s")
        save()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    probs = original(prompts.texts)  # the loop's labels, untimed: it encodes its prompts inside, and only once
    labels["original loop"] = np.array(oracle.ensemble_labels(probs, probs, classes, 1.0, 0.0))
    if on_gpu:
        report["original_peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    del probs
    def measure_variant(variant: Variant, round_: int) -> None:
        held = torch.cuda.memory_allocated(device) if on_gpu else 0  # the loop's model: not this variant's
        handle = workbench_handle(args, variant)
        try:
            compile_s = warm_up(handle)  # loaded (and compiled) before the clock starts, as the original's model is
            if variant.compile:
                report.setdefault(f"compile_s_{variant.key}", compile_s)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
            # a cache per variant and round: each encodes everything (`auto` is another variant's precision)
            cache = _cache(tmp, round_, variant)
            embeddings, seconds = timed(partial(encode_images, handle, files, handle.views[0], cache,
                                                 num_workers=args.num_workers, progress=False))
            record(f"workbench {variant.key}", seconds, round_)
            alone = model_images_per_s(handle, batches=-(-len(files) // handle.entry.batch_size), rounds=1)
            report[f"{variant.key}_model_images_per_s"] = max(report.get(f"{variant.key}_model_images_per_s", 0), alone)
            if round_ > 0:
                return
            if on_gpu:
                report[f"{variant.key}_peak_gpu_mb"] = (torch.cuda.max_memory_allocated(device) - held) / 2**20
            # each its own: the autocast variant runs the whole last block, the others the class token's only
            report[f"{variant.key}_gflop_per_image"] = flops_per_image(handle) / 1e9
            text, first = timed(partial(encode_texts, handle, prompts.texts, cache))
            labels[variant.key] = score("joint_softmax_mean", embeddings, text, prompts.class_index, len(classes),
                                        arithmetic=handle.logit_arithmetic).labels
            report[f"{variant.key}_precision"] = handle.entry.precision
            shapes.update(linear_shapes(handle))
            if profile_dir is not None:
                report[f"{variant.key}_profile"] = profile_batch(handle, profile_dir / f"{variant.key}.txt")
            if "text_first_s" not in report:  # the first variant measured
                fresh = workbench_handle(args, variant)  # a new handle: nothing in memory but the cache
                _, second = timed(partial(encode_texts, fresh, prompts.texts, cache))
                report.update(text_first_s=first, text_cached_s=second, text_cache_ratio=first / second,
                              gflop_per_image=report[f"{variant.key}_gflop_per_image"])
        finally:
            handle.close()

    for round_ in range(args.repeats):
        # timed on the bare class names: their text costs next to nothing, as the workbench's cached prompts do
        record("original loop", timed(lambda: synchronize(original(classes)[-1].device))[1], round_)
        preprocess = workbench_handle(args, variants[0]).views[0]  # no model loaded: every variant's preprocessing
        rate = preprocess_images_per_s(files, preprocess, args.batch_size, num_workers, rounds=1)
        report["preprocess_images_per_s"] = max(report.get("preprocess_images_per_s", 0.0), rate)
        print(f"round {round_ + 1}: {'preprocessing alone':22s} {rate:7.1f} images/s")
        for variant in [v for v in variants if f"{v.key}_error" not in report]:
            try:
                measure_variant(variant, round_)
            except Exception as error:  # one that fails here (a compile mode, memory): recorded, the others go on
                report[f"{variant.key}_error"] = f"{type(error).__name__}: {error}"[:2000]
                print(f"round {round_ + 1}: workbench {variant.key} failed: {report[f'{variant.key}_error']}")
                save()
    variants[:] = [v for v in variants if f"{v.key}_error" not in report]
    if not variants:
        raise RuntimeError("every variant failed: " + "; ".join(f"{k}: {v}" for k, v in report.items()
                                                                 if k.endswith("_error")))
    report["original_images_per_s"] = len(files) / best["original loop"]
    report["linear_shapes"] = sorted(shapes)
    print(f"original loop:       {report['original_images_per_s']:7.1f} images/s (best of {args.repeats}); "
          f"preprocessing alone {report['preprocess_images_per_s']:.1f} images/s ({num_workers} decoding processes)")
    for variant in variants:
        key = variant.key
        report[f"{key}_images_per_s"] = len(files) / best[f"workbench {key}"]
        report[f"encode_ratio_{key}"] = report[f"{key}_images_per_s"] / report["original_images_per_s"]
        # what the model alone and the preprocessing alone would reach one after the other
        serial = 1 / (1 / report[f"{key}_model_images_per_s"] + 1 / report["preprocess_images_per_s"])
        report[f"{key}_pipeline_fraction"] = report[f"{key}_images_per_s"] / serial
        compiled = f", compiled in {report[f'compile_s_{key}']:.1f} s before" if variant.compile else ""
        memory = f", peak {report[f'{key}_peak_gpu_mb']:,.0f} MB on the GPU" if on_gpu else ""
        print(f"workbench {key:14s} {report[f'{key}_images_per_s']:7.1f} images/s "
              f"({report[f'encode_ratio_{key}']:.2f}x the original{compiled}; the model alone "
              f"{report[f'{key}_model_images_per_s']:.1f}, {report[f'{key}_pipeline_fraction']:.0%} of the model and "
              f"the preprocessing one after the other{memory})")
    print(f"312 prompts:         {report['text_first_s']:7.2f} s, cached {report['text_cached_s'] * 1000:.1f} ms "
          f"({report['text_cache_ratio']:.0f}x)")
    for precision in dict.fromkeys(v.precision for v in variants):
        fastest = max((v.key for v in variants if v.precision == precision),
                      key=lambda k: report[f"{k}_images_per_s"])
        report[f"encode_best_{precision}"] = fastest
        report[f"{precision}_images_per_s"] = report[f"{fastest}_images_per_s"]
        report[f"encode_ratio_{precision}"] = report[f"encode_ratio_{fastest}"]
        report[f"{precision}_pipeline_fraction"] = report[f"{fastest}_pipeline_fraction"]
    return labels


def _cache(tmp: Path, round_: int, variant: Variant) -> Path:
    return tmp / f"cache-round{round_ + 1}" / variant.key


def measure_agreement(report, labels: dict[str, np.ndarray], variants: list[Variant], reference: Variant) -> None:
    """Each variant's labels against the original loop's (the winner's arithmetic: the same labels) and against the
    reference variant's."""
    loop = labels["original loop"]
    for variant in variants:
        key = variant.key
        report[f"{key}_loop_agreement"] = float(np.mean(labels[key] == loop))
        report[f"{key}_label_agreement"] = float(np.mean(labels[key] == labels[reference.key]))
    for precision in dict.fromkeys(v.precision for v in variants):
        report[f"{precision}_label_agreement"] = report[f"{report[f'encode_best_{precision}']}_label_agreement"]
    print("labels equal to the original loop's (312 prompts): " + ", ".join(
        f"{v.key} {report[f'{v.key}_loop_agreement']:.1%}" for v in variants))
    print(f"labels equal to {reference.key}'s: " + ", ".join(
        f"{v.key} {report[f'{v.key}_label_agreement']:.1%}" for v in variants if v != reference)
        + " (random weights leave the scores nearly tied: a floor)")


def measure_ceiling(report, variants: list[Variant], device, sizes: list[int]) -> None:
    """The most images/s any implementation of the model's arithmetic could reach here, per precision its matmuls
    run in: the machine's best matrix-product rate, over squares of `sizes` and the model's own products
    (`linear_shapes`), against the model's FLOPs; each variant's share of its ceiling."""
    shapes = [(n, n, n) for n in sizes] + [tuple(shape) for shape in report["linear_shapes"]]
    computed = {v.key: compute_precision(v, device) for v in variants}
    for precision in dict.fromkeys(computed.values()):
        rate, shape = gemm_flops_per_s(DTYPES[precision], device, shapes)
        ceiling = rate / (report["gflop_per_image"] * 1e9)
        report.update({f"gemm_tflops_{precision}": rate / 1e12, f"gemm_shape_{precision}": list(shape),
                       f"ceiling_images_per_s_{precision}": ceiling,
                       f"max_encode_ratio_{precision}": ceiling / report["original_images_per_s"]})
        print(f"{precision} ceiling:        {ceiling:7.1f} images/s ({report['gflop_per_image']:.1f} GFLOP/image at "
              f"{rate / 1e9:,.0f} GFLOP/s, the best of {len(shapes)} products: {shape[0]}x{shape[1]} by "
              f"{shape[1]}x{shape[2]}): at most {report[f'max_encode_ratio_{precision}']:.2f}x the original")
    for key, precision in computed.items():  # each variant against the ceiling of its own FLOPs
        own = report[f"gemm_tflops_{precision}"] * 1e12 / (report[f"{key}_gflop_per_image"] * 1e9)
        report[f"{key}_ceiling_fraction"] = report[f"{key}_images_per_s"] / own


def measure_memory(args, report, n_images, precision) -> None:
    """Peak and retained resident memory for N/4 and N images in fresh processes; the growth per image."""
    small, full = (probe_memory(args, n, precision) for n in (max(1, n_images // 4), n_images))
    added = max(1, full["images"] - small["images"])
    report["peak_rss_mb"] = full["peak_bytes"] / 2**20
    report["encode_rss_growth_mb"] = (full["peak_bytes"] - full["before_bytes"]) / 2**20
    report["encode_rss_growth_small_mb"] = (small["peak_bytes"] - small["before_bytes"]) / 2**20
    report["peak_growth_per_image_bytes"] = (report["encode_rss_growth_mb"] - report["encode_rss_growth_small_mb"]) \
        * 2**20 / added
    report["retained_growth_per_image_bytes"] = ((full["after_bytes"] - full["before_bytes"])
                                                 - (small["after_bytes"] - small["before_bytes"])) / added
    report["embedding_bytes_per_image"] = full["embedding_bytes"] / full["images"]
    print(f"peak RSS:            {report['peak_rss_mb']:.0f} MB encoding {full['images']} images: "
          f"{report['encode_rss_growth_mb']:.0f} MB above the loaded model ({report['encode_rss_growth_small_mb']:.0f} "
          f"MB for {small['images']}); from {small['images']} to {full['images']} images the peak grows "
          f"{report['peak_growth_per_image_bytes']:.0f} B/image and what stays "
          f"{report['retained_growth_per_image_bytes']:.0f} B/image (an embedding is "
          f"{report['embedding_bytes_per_image']:.0f} B)")


def measure_ablation(args, report, original, files, tmp, variant, prompts) -> None:
    """10 prompt-set variants: scored from the cache (no model loaded) against the original loop per variant."""
    variants, classes = ablation_variants(prompts), prompts.classes

    def workbench_ablation():
        handle = workbench_handle(args, variant)  # never loaded: everything is cached
        image = encode_images(handle, files, handle.views[0], _cache(tmp, 0, variant), progress=False)
        text = encode_texts(handle, prompts.texts, _cache(tmp, 0, variant))
        assert not handle.loaded
        return {n: score("joint_softmax_mean", image, text[idx], prompts.class_index[idx], len(classes),
                         arithmetic=handle.logit_arithmetic).labels
                for n, idx in variants.items()}

    def original_ablation():
        out = {}
        for name, idx in variants.items():
            probs = original([prompts.texts[i] for i in idx])
            out[name] = oracle.ensemble_labels(probs, probs, classes, 1.0, 0.0)
        return out

    ours, report["ablation_workbench_s"] = timed(workbench_ablation)
    theirs, report["ablation_original_s"] = timed(original_ablation)
    report["ablation_variants"] = len(variants)
    report["ablation_ratio"] = report["ablation_original_s"] / report["ablation_workbench_s"]
    report["ablation_labels_equal"] = all(list(ours[n]) == theirs[n] for n in variants)
    print(f"10-variant ablation: original {report['ablation_original_s']:.1f} s, workbench ({variant.key}) "
          f"{report['ablation_workbench_s'] * 1000:.0f} ms ({report['ablation_ratio']:.0f}x); same labels: "
          f"{report['ablation_labels_equal']}")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def run(args, out: Path) -> dict:
    """The benchmark; the report is written to `out` after each stage (a run cut short keeps what it measured)."""
    # the loop's `torch.cuda.amp.autocast()` warns on every call (deprecated, and a no-op without CUDA)
    warnings.filterwarnings("ignore", message=r".*(torch\.cuda\.amp\.autocast|CUDA is not available).*")
    scene = Path(args.scene)
    classes = json.loads((scene / "classes.json").read_text())
    device = resolve_device(args.device)
    variants = parse_variants(args.variants or DEFAULT_VARIANTS[device.type])
    reference = next((v for v in variants if v.key == LABEL_REFERENCE[device.type]), variants[0])
    # the variant with the winner's arithmetic, where there is one: the ablation's labels are then the loop's
    winners = next((v for v in variants if v.key in ("fp32_eager_autocast", "fp32_eager")), reference)
    arch = arch_name(args.arch)
    profile_dir = out.with_suffix("") if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    report = {"arch": arch, "images": 0, "batch_size": args.batch_size, "device": str(device),
              "device_name": _device_name(device), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "variants": [v.key for v in variants], "label_reference": reference.key,
              "repeats": args.repeats, "auto_precision": resolve_precision("auto", device),
              "cpu_computes_bf16_natively": cpu_computes_bf16_natively()}
    print(f"{report['device_name']}: precision auto is {report['auto_precision']} here")

    def save() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp, patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor"}):
        tmp = Path(tmp)  # an empty inductor cache: compile times are what a first run on a new machine pays
        files = scene_subset(scene, args.images, tmp / "Scene")
        report["images"] = len(files)
        loop_handle = workbench_handle(args, Variant("original", "fp32"))  # the same seeded weights as every variant's

        def original(prompts):
            return oracle.open_clip_probs(loop_handle.encoder.model, open_clip.tokenizer, prompts, str(tmp), "Scene",
                                          oracle.make_processor(2.3), device=device, num_workers=2)

        prompts = load_prompts("winner", classes)
        labels = measure_encoding(args, report, original, files, tmp, variants, prompts, profile_dir, save)
        reference = reference if reference in variants else variants[0]
        winners = winners if winners in variants else reference
        report["label_reference"] = reference.key
        measure_agreement(report, labels, variants, reference)
        measure_ceiling(report, variants, device, args.gemm_sizes)
        for precision in dict.fromkeys(v.precision for v in variants):
            best = report[f"encode_best_{precision}"]
            report[f"{precision}_ceiling_fraction"] = report[f"{best}_ceiling_fraction"]
        save()
        if not args.skip_ablation:
            measure_ablation(args, report, original, files, tmp, winners, prompts)
            save()
        loop_handle.close()
        if device.type == "cpu":  # on a GPU the encode's own peak GPU memory is measured instead
            measure_memory(args, report, len(files), reference.precision)
    report["targets_met"] = {k: report[k] >= v for k, v in TARGETS[device.type].items() if k in report}
    save()
    return report



def encoding_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--arch", default="ViT-B-32-quickgelu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, help="the workbench's decoding processes (default: as in a run)")
    parser.add_argument("--variants", help="comma-separated PRECISION[+compile][+autocast] (default: "
                        f"{DEFAULT_VARIANTS['cpu']} on the CPU, {DEFAULT_VARIANTS['cuda']} on a GPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timing rounds; each figure is the best round")
    parser.add_argument("--gemm-sizes", type=lambda text: [int(n) for n in text.split(",")],
                        help="the squares the ceiling's matrix products try besides the model's own (default: "
                        "1024,2048,4096 on the CPU, 2048,4096,8192 on a GPU)")
    parser.add_argument("--skip-ablation", action="store_true",
                        help="leave out the 10-variant ablation (it runs the original loop 10 times)")
    parser.add_argument("--scene", default=str(DEFAULT_SCENE), help="the challenge test folder")
    parser.add_argument("--out", help="JSON file (default: outputs/bench/bench-<arch>-<images>.json)")
    parser.add_argument("--profile", action="store_true", help="also profile one batch of each variant "
                        "(torch.profiler): tables in a folder beside the JSON, top ops in it")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gemm_sizes is None:
        args.gemm_sizes = [2048, 4096, 8192] if resolve_device(args.device).type == "cuda" else [1024, 2048, 4096]
    if args.memory_probe:
        memory_probe(args)
        return
    out = Path(args.out or f"outputs/bench/bench-{arch_name(args.arch)}-{args.images}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(args, out)
    print(f"wrote {out}")
    print(json.dumps(report))
