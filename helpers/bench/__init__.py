"""Benchmarks: the workbench against the winner's notebook loop, measured side by side in one process.

    python -m helpers.bench --images 512 [--arch ViT-B-32-quickgelu] [--batch-size 32] [--variants ...] [--out F]
    python -m helpers.bench store --rows 1000000 --dim 1280      (the embedding store: see its --help)
    python -m helpers.bench transductive [--rows 8100]            (the transductive methods: see its --help)
    python -m helpers.bench restoration [--config configs/demo.yaml]   (restoring the dev set's blur: its --help)
    python -m helpers.bench load                                 (EVA-CLIP's weights: fp32 .bin shards against the
                                                                  converted fp16 copy; see its --help)

A randomly initialised model (the compute is the real architecture's) reads the first N challenge images.
Printed, and written to a JSON file whose copy is the last line of the output:
- image encoding throughput of the original loop (`helpers/research/oracle.py`: the winner's code, literally) and of the
  workbench in each variant (a precision, optionally `+compile`, `+autocast`), same model, images, batch size and
  device, the best of `--repeats` rounds; a compiled variant is compiled before its clock starts (as every model is
  loaded before it), its compile time reported beside it;
- how many labels of each variant agree with the workbench's fp32 labels;
- the machine's GEMM ceiling: the model's FLOPs per image against a large matmul's measured rate in that precision,
  the most any implementation of the same arithmetic could encode here;
- a prompt ablation of 10 prompt-set variants: from cached embeddings against re-running the encoder per variant;
- the second encoding of the 312 prompts (a cache hit) against the first;
- resident memory of encoding N/4 and N images in fresh processes: the peak, and what stays after the encode.

from __future__ import annotations


The package: `runners` measures (each function one figure), `report` runs them in order and assembles the report,
`store` is the embedding store's benchmark, `transductive` the transductive methods', `restoration` the restoration
steps' against the dev set's clean photos, `load` the model-loading one (`eva_checkpoint` builds its checkpoint).
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path


def cpu_model() -> str:
    """The machine a CPU figure was taken on: its CPU's model name and core count."""
    found = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return f"{found.group(1) if found else platform.processor()}, {os.cpu_count()} cores"


def proc_status_bytes(field: str) -> int:
    """A memory figure of this process (VmRSS, VmHWM, ...) from /proc/self/status, in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def timed(fn):
    """fn's result, and the seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def write_report(report: dict, out: Path) -> None:
    """A benchmark's report into its JSON file, then printed: its last line is the JSON object."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps(report))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["store"]:  # a subcommand; the flags alone are the encoding benchmark
        from .store import store_main

        store_main(argv[1:])
        return
    if argv[:1] == ["transductive"]:
        from .transductive import transductive_main

        transductive_main(argv[1:])
        return
    if argv[:1] == ["restoration"]:
        from .restoration import restoration_main

        restoration_main(argv[1:])
        return
    if argv[:1] == ["load"]:
        from .load import load_main

        load_main(argv[1:])
        return
    from .report import encoding_main

    encoding_main(argv)
