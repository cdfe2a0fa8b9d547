"""The benchmark's measurements, each a function of what it measures: throughput of the model alone and of the
preprocessing alone, the machine's matmul ceiling, FLOPs per image, a profile of one batch, resident memory in a
fresh process. `helpers.bench.report` runs them and assembles the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import open_clip
import torch
from natsort import natsorted
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..config import COMPILE_MODES, PRECISIONS, RANDOM_WEIGHTS, ModelEntry
from ..infra.cache import encode_images, image_batches
from ..infra.files import PROJECT_ROOT
from ..models import ModelHandle, resolve_precision
from ..models.device import autocasts_on
from ..research.steps import Preprocess
from . import proc_status_bytes, timed


class Variant(NamedTuple):
    key: str  # fp32_eager, bf16_compiled, fp32_eager_autocast, fp16_compiled_reduce-overhead, auto_eager, ...
    precision: str  # as in a config: auto, fp32, fp16, bf16
    compile: bool | str = False  # as in a config: true, or a torch.compile mode
    autocast: bool = False


def scene_subset(scene: Path, n: int, dest: Path) -> list[Path]:
    """The first `n` challenge images (natural order) copied to `dest` (a `Scene` folder: `0/` and classes.json),
    since the winner's ImageFolder reads a whole folder; returns the copies."""
    (dest / "0").mkdir(parents=True)
    for p in natsorted((scene / "0").glob("*.jpg"), key=str)[:n]:
        shutil.copy(p, dest / "0" / p.name)
    shutil.copy(scene / "classes.json", dest / "classes.json")
    return natsorted((dest / "0").glob("*.jpg"), key=str)


def arch_name(name: str) -> str:
    """An open_clip architecture name, or the path of an architecture JSON file (registered under its stem)."""
    if name.endswith(".json"):
        open_clip.add_model_config(name)
        return Path(name).stem
    return name


def workbench_handle(args, variant: Variant) -> ModelHandle:
    """The bench's model in one variant: seeded random weights (the same in every variant, and in the loop's). An
    autocast variant is the winner's arithmetic, batches of 32 included (on a GPU they are part of its numbers)."""
    entry = ModelEntry(backend="open_clip", arch=args.arch, pretrained=RANDOM_WEIGHTS, seed=0, sharpness=2.3,
                       precision=variant.precision, batch_size=32 if variant.autocast else args.batch_size,
                       compile=variant.compile, autocast=variant.autocast)
    return ModelHandle("bench", entry, args.device)


def parse_variants(text: str) -> list[Variant]:
    """'fp32,bf16+compile' -> [Variant('fp32_eager', 'fp32'), Variant('bf16_compiled', 'bf16', compile=True)];
    'fp16+compile=reduce-overhead' -> Variant('fp16_compiled_reduce-overhead', 'fp16', compile='reduce-overhead')."""
    variants = []
    for item in filter(None, (v.strip() for v in text.split(","))):
        precision, *options = item.split("+")
        modes = [o.split("=", 1)[1] for o in options if o.startswith("compile=")]
        flags = {o for o in options if not o.startswith("compile=")}
        if (precision not in PRECISIONS or not flags <= {"compile", "autocast"} or len(modes) > 1
                or not set(modes) <= set(COMPILE_MODES) or (modes and "compile" in flags)):
            raise SystemExit(f"--variants: '{item}' is not PRECISION[+compile[=MODE]][+autocast] "
                             f"(precisions: {', '.join(PRECISIONS)}; modes: {', '.join(COMPILE_MODES)})")
        compile_ = modes[0] if modes else "compile" in flags
        key = precision + ("_eager" if not compile_ else "_compiled" + (f"_{compile_}" if modes else "")) \
            + "_autocast" * ("autocast" in flags)
        variants.append(Variant(key, precision, compile_, "autocast" in flags))
    return variants


def gemm_flops_per_s(dtype: torch.dtype, device: torch.device, shapes: list[tuple[int, int, int]],
                     reps: int = 3) -> tuple[float, tuple[int, int, int]]:
    """The machine's matrix-product rate in `dtype`: `F.linear` of each (rows, in, out) shape, its weights laid out
    as a model's are ((out, in): what nn.Linear hands the kernels, which on a CPU pack them for their own use), best
    of `reps` after a warm-up; returns the best rate and its shape. Large products reach a GPU's peak (an H200 gave
    399 TFLOP/s in fp16 at 2048-square and 659 at 8192-square); a CPU's best can be the model's own shapes."""
    best_rate, best_shape = 0.0, shapes[0]
    for rows, inner, out in shapes:
        x = torch.randn(rows, inner, device=device).to(dtype)
        weight = torch.randn(out, inner, device=device).to(dtype)
        with torch.inference_mode():
            torch.nn.functional.linear(x, weight)
            for _ in range(reps):
                synchronize(device)
                start = time.perf_counter()
                torch.nn.functional.linear(x, weight)
                synchronize(device)
                rate = 2 * rows * inner * out / (time.perf_counter() - start)
                if rate > best_rate:
                    best_rate, best_shape = rate, (rows, inner, out)
        del x, weight
    return best_rate, best_shape


def linear_shapes(handle: ModelHandle) -> set[tuple[int, int, int]]:
    """(rows, in, out) of every nn.Linear product in one batch of the loaded model's image forward: the shapes of
    most of its arithmetic, for the ceiling."""
    shapes = set()

    def record(module, args, output):
        shapes.add((args[0].numel() // module.in_features, module.in_features, module.out_features))

    hooks = [m.register_forward_hook(record) for m in handle.encoder.model.modules()
             if isinstance(m, torch.nn.Linear)]
    try:
        _warm_device_batch(handle)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_precision(variant: Variant, device: torch.device) -> str:
    """The precision a variant's matmuls run in: its weights' (auto resolved), or fp16 under CUDA autocast."""
    if variant.autocast and autocasts_on(device):
        return "fp16"
    return resolve_precision(variant.precision, device)


def _warm_device_batch(handle: ModelHandle) -> torch.Tensor:
    """A batch of random pixels already on the model's device, encoded once (the warm-up)."""
    size = handle.views[0].size
    pixels = torch.randn(handle.entry.batch_size, 3, size, size, device=handle.encoder.device)
    handle.encoder.encode_images(pixels)
    return pixels


def model_images_per_s(handle: ModelHandle, batches: int, rounds: int = 2) -> float:
    """The loaded model alone, on a batch already on its device, `batches` times in a row (as many as the encode
    runs: a sustained rate, not one batch's burst): images/s of `encode_images`, the best of `rounds` after a
    warm-up; what the encode could reach if decoding, transfers and the cache cost nothing."""
    encoder, pixels = handle.encoder, _warm_device_batch(handle)
    best = float("inf")
    for _ in range(rounds):
        synchronize(encoder.device)
        start = time.perf_counter()
        for _ in range(batches):
            encoder.encode_images(pixels)
        synchronize(encoder.device)
        best = min(best, time.perf_counter() - start)
    return batches * len(pixels) / best


def preprocess_images_per_s(files: list[Path], preprocess: Preprocess, batch_size: int, num_workers: int,
                            rounds: int = 2) -> float:
    """The encode's decoding and preprocessing alone: its loader (`image_batches`, the same batches and decoding
    processes) over `files` with no model, images/s, the best of `rounds`."""
    batches = [list(range(s, min(s + batch_size, len(files)))) for s in range(0, len(files), batch_size)]
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in image_batches(files, preprocess, batches, num_workers):
            pass
        best = min(best, time.perf_counter() - start)
    return len(files) / best


def profile_batch(handle: ModelHandle, path: Path, top: int = 15) -> dict:
    """torch.profiler over two batches of the loaded model alone (after a warm-up): the table of ops by their own
    time on the device (the CPU's on a CPU) goes to `path`; returns the wall time, the device's busy time and the
    top ops' shares of it (what the rest of the time is spent on)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    encoder, pixels = handle.encoder, _warm_device_batch(handle)
    on_gpu = encoder.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    synchronize(encoder.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(2):
            encoder.encode_images(pixels)
        synchronize(encoder.device)
    wall_ms = (time.perf_counter() - start) * 1000 / 2
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = prof.key_averages()
    path.write_text(events.table(sort_by=sort_by, row_limit=60, max_name_column_width=90) + "\n")
    # on a GPU its kernels only (an op's device time is also its kernels'); no user annotations (their own spans)
    own = [(e.key, (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / 1000 / 2) for e in events
           if not e.is_user_annotation and (not on_gpu or e.device_type == DeviceType.CUDA)]
    busy_ms = sum(ms for _, ms in own)
    ranked = sorted(own, key=lambda item: -item[1])[:top]
    return {"wall_ms_per_batch": wall_ms, "busy_ms_per_batch": busy_ms, "table": str(path),
            "top_ops": [{"op": name, "ms_per_batch": ms, "share": ms / busy_ms if busy_ms else 0.0}
                        for name, ms in ranked]}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flops_per_image(handle: ModelHandle) -> float:
    """FLOPs of the workbench's image forward (matmuls, convolutions, attention), counted on one image.

    Counted with torch's fused attention fast path off, whose single op the counter cannot see into; the CPU's
    attention kernel is given torch's own formula for the other attention kernels.
    """
    encoder = handle.encoder
    pixels = torch.zeros(1, 3, *(2 * [handle.views[0].size]), device=encoder.device, dtype=encoder.dtype)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), counter:
            encoder._image_features(pixels)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return float(counter.get_total_flops())


def ablation_variants(prompts) -> dict[str, np.ndarray]:
    """10 prompt-set variants of the winner's set: all groups, each group alone, and four leave-one-out sets."""
    groups = prompts.groups
    variants = {"all": groups, **{f"only {g}": [g] for g in groups}}
    variants.update({f"without {g}": [h for h in groups if h != g] for g in groups[:4]})
    return {name: prompts.group_indices(chosen) for name, chosen in variants.items()}


def memory_probe(args) -> None:
    """Child process: resident memory of encoding N images, as JSON: before (the model loaded), the peak during
    the encode (the kernel's high-water mark, reset once the model is loaded), and after (the embeddings in hand)."""
    files = natsorted(Path(args.scene).glob("0/*.jpg"), key=str)[: args.memory_probe]
    handle = workbench_handle(args, Variant("probe", args.probe_precision))
    _ = handle.encoder  # loaded first: the probe measures what encoding adds
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = proc_status_bytes("VmRSS")
    with tempfile.TemporaryDirectory() as cache:
        emb = encode_images(handle, files, handle.views[0], cache, num_workers=args.num_workers, progress=False)
        after, peak = proc_status_bytes("VmRSS"), proc_status_bytes("VmHWM")
    print(json.dumps({"images": len(files), "before_bytes": before, "peak_bytes": peak, "after_bytes": after,
                      "embedding_bytes": emb.nbytes}))


def probe_memory(args, n: int, precision: str) -> dict:
    cmd = [sys.executable, "-m", "helpers.bench", "--memory-probe", str(n), "--probe-precision", precision,
           "--scene", str(args.scene), "--arch", args.arch, "--batch-size", str(args.batch_size), "--device",
           args.device] + (["--num-workers", str(args.num_workers)] if args.num_workers is not None else [])
    # glibc keeps freed blocks in its heap, so the resident size would follow the allocation history (tens of MB
    # either way, measured) rather than what is live; these thresholds hand blocks over 128 KB back when freed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"memory probe of {n} images failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs


def warm_up(handle: ModelHandle) -> float:
    """Load the model, and compile it for the full batch if it is compiled (a CUDA-graph mode warms up on its first
    call and records its graph on the second: three calls); returns the compile seconds."""
    encoder = handle.encoder
    if not encoder.compiled:
        return 0.0
    size = handle.views[0].size
    pixels = torch.zeros(handle.entry.batch_size, 3, size, size)
    calls = 3 if encoder.device.type == "cuda" and handle.entry.compile in CUDA_GRAPH_MODES else 1
    _, seconds = timed(lambda: [encoder.encode_images(pixels).cpu() for _ in range(calls)])
    return seconds

