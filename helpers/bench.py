"""Benchmarks: the workbench against the winner's notebook loop, measured side by side in one process.

    python -m helpers.bench --images 512 [--arch ViT-B-32-quickgelu] [--batch-size 32] [--out FILE.json]

A randomly initialised model (the compute is the real architecture's) reads the first N challenge images.
Printed, and written to a JSON file whose copy is the last line of the output:
- image encoding throughput, workbench (fp32 weights, and bf16 weights) against the original loop
  (`tests/oracle.py`: the winner's code, literally), same model, images, batch size and device;
- how many labels of the bf16 run agree with the fp32 run;
- a prompt ablation of 10 prompt-set variants: from cached embeddings against re-running the encoder per variant;
- the second encoding of the 312 prompts (a cache hit) against the first;
- peak resident memory of encoding N images, and how much it grows per image against the embedding's own size.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from natsort import natsorted

from .cache import encode_images, encode_texts
from .config import ModelEntry
from .models import ModelHandle, resolve_device
from .outputs import PROJECT_ROOT
from .prompts import load_prompts
from .scoring import score

DEFAULT_SCENE = PROJECT_ROOT.parent / "shared" / "data" / "scene" / "Scene"
TARGETS = {"encode_ratio_bf16": 3.0, "encode_ratio_fp32": 1.0, "ablation_ratio": 50.0, "text_cache_ratio": 100.0}


def _oracle():
    sys.path.insert(0, str(PROJECT_ROOT))  # the oracle is the tests' literal transcription of the winner's notebook
    from tests import oracle

    return oracle


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _handle(args, checkpoint: Path, precision: str) -> ModelHandle:
    entry = ModelEntry(backend="open_clip", arch=args.arch, pretrained=str(checkpoint), sharpness=2.3,
                       precision=precision, batch_size=args.batch_size)
    return ModelHandle("bench", entry, args.device)


def ablation_variants(prompts) -> dict[str, np.ndarray]:
    """10 prompt-set variants of the winner's set: all groups, each group alone, and four leave-one-out sets."""
    groups = prompts.groups
    variants = {"all": groups, **{f"only {g}": [g] for g in groups}}
    variants.update({f"without {g}": [h for h in groups if h != g] for g in groups[:4]})
    return {name: prompts.group_indices(chosen) for name, chosen in variants.items()}


def memory_probe(args) -> None:
    """Child process: resident memory while encoding N images, sampled every 20 ms, against the resident memory
    just before (the model already loaded), printed as JSON."""
    import threading

    import psutil

    files = natsorted(Path(args.scene).glob("0/*.jpg"), key=str)[: args.memory_probe]
    handle = _handle(args, Path(args.checkpoint), "fp32")
    _ = handle.encoder  # loaded first: the probe measures what encoding adds
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    before = process.memory_info().rss
    sampler = threading.Thread(target=sample)
    sampler.start()
    with tempfile.TemporaryDirectory() as cache:
        emb = encode_images(handle, files, handle.views[0], cache, num_workers=args.num_workers, progress=False)
        done.set()
        sampler.join()
    print(json.dumps({"images": len(files), "before_bytes": before, "peak_bytes": max(peak[0], before),
                      "dim": emb.shape[1]}))


def _probe(args, checkpoint: Path, n: int) -> dict:
    cmd = [sys.executable, "-m", "helpers.bench", "--memory-probe", str(n), "--checkpoint", str(checkpoint),
           "--scene", str(args.scene), "--arch", args.arch, "--batch-size", str(args.batch_size),
           "--device", args.device, "--num-workers", str(args.num_workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    oracle = _oracle()
    scene = Path(args.scene)
    classes = json.loads((scene / "classes.json").read_text())
    files = natsorted((scene / "0").glob("*.jpg"), key=str)[: args.images]
    device = resolve_device(args.device)
    report = {"arch": args.arch, "images": len(files), "batch_size": args.batch_size, "device": str(device),
              "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "Scene" / "0").mkdir(parents=True)  # the original's ImageFolder reads a whole folder: exactly these
        for p in files:
            shutil.copy(p, tmp / "Scene" / "0" / p.name)
        torch.manual_seed(0)
        checkpoint = tmp / "random.pt"
        torch.save(open_clip.create_model(args.arch).state_dict(), checkpoint)
        model = open_clip.create_model(args.arch, pretrained=str(checkpoint)).to(device)

        def original(prompts):
            return oracle.open_clip_probs(model, open_clip.tokenizer, prompts, str(tmp), "Scene",
                                          oracle.make_processor(2.3), device=device, num_workers=2)

        # 1. image encoding: the original loop (with the bare class names as prompts: text costs ~nothing)
        _, seconds = _timed(lambda: original(classes))
        report["original_images_per_s"] = len(files) / seconds
        print(f"original loop:       {report['original_images_per_s']:7.1f} images/s")
        embeddings, texts = {}, {}
        prompts = load_prompts("winner", classes)
        for precision in ("fp32", "bf16"):
            handle = _handle(args, checkpoint, precision)
            _ = handle.encoder  # loaded before the clock starts, as the original's model is
            embeddings[precision], seconds = _timed(lambda h=handle, p=precision: encode_images(
                h, files, h.views[0], tmp / f"cache-{p}", num_workers=args.num_workers, progress=False))
            report[f"{precision}_images_per_s"] = len(files) / seconds
            report[f"encode_ratio_{precision}"] = report[f"{precision}_images_per_s"] / report["original_images_per_s"]
            print(f"workbench {precision}:      {report[f'{precision}_images_per_s']:7.1f} images/s "
                  f"({report[f'encode_ratio_{precision}']:.2f}x the original)")
            # 2. the 312 prompts: first encode (a cache miss), then again (a hit)
            texts[precision], first = _timed(lambda h=handle, p=precision: encode_texts(h, prompts.texts,
                                                                                     tmp / f"cache-{p}"))
            if precision == "fp32":
                _, second = _timed(lambda: encode_texts(_handle(args, checkpoint, "fp32"), prompts.texts,
                                                        tmp / "cache-fp32"))
                report.update(text_first_s=first, text_cached_s=second, text_cache_ratio=first / second)
                print(f"312 prompts:         {first:7.2f} s, cached {second * 1000:.1f} ms "
                      f"({report['text_cache_ratio']:.0f}x)")
            handle.close()
        labels = {p: score("joint_softmax_mean", embeddings[p], texts[p], prompts.class_index, len(classes)).labels
                  for p in embeddings}
        report["bf16_label_agreement"] = float(np.mean(labels["fp32"] == labels["bf16"]))
        print(f"bf16 labels equal to fp32: {report['bf16_label_agreement']:.1%} (random weights: a floor)")

        # 3. a prompt ablation of 10 variants: the cache against re-encoding per variant
        variants = ablation_variants(prompts)

        def workbench_ablation():
            handle = _handle(args, checkpoint, "fp32")  # never loaded: everything is cached
            image = encode_images(handle, files, handle.views[0], tmp / "cache-fp32", progress=False)
            text = encode_texts(handle, prompts.texts, tmp / "cache-fp32")
            return {n: score("joint_softmax_mean", image, text[idx], prompts.class_index[idx], len(classes)).labels
                    for n, idx in variants.items()}

        def original_ablation():
            out = {}
            for name, idx in variants.items():
                probs = original([prompts.texts[i] for i in idx])
                out[name] = oracle.ensemble_labels(probs, probs, classes, 1.0, 0.0)
            return out

        ours, report["ablation_workbench_s"] = _timed(workbench_ablation)
        theirs, report["ablation_original_s"] = _timed(original_ablation)
        report["ablation_variants"] = len(variants)
        report["ablation_ratio"] = report["ablation_original_s"] / report["ablation_workbench_s"]
        report["ablation_labels_equal"] = all(list(ours[n]) == theirs[n] for n in variants)
        print(f"10-variant ablation: original {report['ablation_original_s']:.1f} s, workbench "
              f"{report['ablation_workbench_s'] * 1000:.0f} ms ({report['ablation_ratio']:.0f}x); same labels: "
              f"{report['ablation_labels_equal']}")

        # 4. memory: peak RSS for N/4 and N images in fresh processes; the growth between them per image
        small, full = _probe(args, checkpoint, max(1, len(files) // 4)), _probe(args, checkpoint, len(files))
        growth = (full["peak_bytes"] - full["before_bytes"]) - (small["peak_bytes"] - small["before_bytes"])
        report["peak_rss_mb"] = full["peak_bytes"] / 2**20
        report["encode_rss_growth_mb"] = (full["peak_bytes"] - full["before_bytes"]) / 2**20
        report["rss_growth_per_image_bytes"] = growth / max(1, full["images"] - small["images"])
        report["embedding_bytes_per_image"] = full["dim"] * 4
        print(f"peak RSS:            {report['peak_rss_mb']:.0f} MB encoding {full['images']} images, "
              f"{report['encode_rss_growth_mb']:.0f} MB above the loaded model; from N/4 to N images it grows "
              f"{report['rss_growth_per_image_bytes']:.0f} B/image (an embedding is "
              f"{report['embedding_bytes_per_image']} B)")
    report["targets_met"] = {k: report[k] >= v for k, v in TARGETS.items()}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--arch", default="ViT-B-32-quickgelu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=2, help="the workbench's decoding workers")
    parser.add_argument("--scene", default=str(DEFAULT_SCENE), help="the challenge test folder")
    parser.add_argument("--out", help="JSON file (default: outputs/bench/bench-<arch>-<images>.json)")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(args)
        return
    report = run(args)
    out = Path(args.out or f"outputs/bench/bench-{args.arch}-{args.images}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
