"""`python -m helpers.bench store`: the embedding store at a million rows, timed in fresh processes (which import
only the store, not the models)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..infra.files import PROJECT_ROOT
from ..infra.store import EmbeddingStore
from . import cpu_model, proc_status_bytes, timed, write_report

STORE_TARGETS = {"open_s": 1.0, "lookup_s": 0.5, "append_s": 1.0, "peak_rss_mb": 300.0}


def _store_keys(start: int, stop: int) -> list[str]:
    """Synthetic keys shaped like the cache's (sha1 hex digests), a function of the row number."""
    return [hashlib.sha1(str(i).encode()).hexdigest() for i in range(start, stop)]


def _store_rows(seed: int, n: int, dim: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def _evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (their clean pages: the store's), so that the next read comes
    from the disk; no other file is touched."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def store_probe(args) -> None:
    """Child process: open the store, look up, test and append, timed, with the resident high-water mark reset just
    before the open; then one append to a small store, for comparison. Prints one JSON line."""
    asked = np.random.default_rng(0).choice(args.rows, args.lookups, replace=False)  # the same keys in each probe
    keys = [hashlib.sha1(str(i).encode()).hexdigest() for i in asked]
    new = args.rows + 10**9 + args.probe_seed * args.append  # fresh keys for each probe's appends
    new_keys, new_rows = _store_keys(new, new + args.append), _store_rows(10**6 + args.probe_seed, args.append,
                                                                           args.dim)
    small_keys = _store_keys(new + args.append, new + 2 * args.append)
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark from here: what the store adds
    before = proc_status_bytes("VmRSS")
    store, open_s = timed(lambda: EmbeddingStore(Path(args.probe), {}))
    rows, lookup_s = timed(lambda: store.get(keys))
    present, contains_s = timed(lambda: store.contains(keys + new_keys[:100]))
    _, append_s = timed(lambda: store.add(new_keys, new_rows))
    peak = proc_status_bytes("VmHWM")
    assert present[:len(keys)].all() and not present[len(keys):].any()
    assert rows.shape == (args.lookups, args.dim) and rows.flags.owndata  # a copy, not a view of the map
    segments = len(store.segments) - 1  # less the appended one
    small = EmbeddingStore(Path(args.probe_small), {})
    small_rows = len(small)
    _, append_small_s = timed(lambda: small.add(small_keys, new_rows))
    for i in asked[:3]:  # the values too: each checked row against its segment, generated again
        segment, offset = divmod(int(i), args.segment_rows)
        expected = _store_rows(segment, min(args.segment_rows, args.rows - segment * args.segment_rows), args.dim)
        assert np.array_equal(rows[list(asked).index(i)], expected[offset])
    assert np.array_equal(store.get(new_keys[-2:]), new_rows[-2:])
    print(json.dumps({"open_s": open_s, "lookup_s": lookup_s, "contains_s": contains_s, "append_s": append_s,
                      "peak_rss_mb": (peak - before) / 2**20, "segments_opened": segments,
                      "append_small_s": append_small_s, "small_store_rows": small_rows}))


def _store_probe(args, folder: Path, seed: int) -> dict:
    cmd = [sys.executable, "-m", "helpers.bench", "store", "--probe", str(folder / "big"), "--probe-small",
           str(folder / "small"), "--probe-seed", str(seed), "--rows", str(args.rows), "--dim", str(args.dim),
           "--segment-rows", str(args.segment_rows), "--lookups", str(args.lookups), "--append", str(args.append)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}  # as probe_memory
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"store probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def store_bench(args) -> dict:
    """Build a synthetic store of `--rows` random float32 rows in segments of `--segment-rows` (one `add` each, as
    an encode's flushes are), then probe it in fresh processes: first with its files dropped from the page cache
    (cold: every page read comes from the disk), then again (warm)."""
    parent = Path(args.dir) if args.dir else PROJECT_ROOT / "outputs" / "bench"
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="store-", dir=parent))
    try:
        start = time.perf_counter()
        big = EmbeddingStore(folder / "big", {"bench": "store"})
        for number, first in enumerate(range(0, args.rows, args.segment_rows)):
            last = min(first + args.segment_rows, args.rows)
            big.add(_store_keys(first, last), _store_rows(number, last - first, args.dim))
            print(f"\rbuilding: {last:,} of {args.rows:,} rows", end="", flush=True)
        build_s = time.perf_counter() - start
        segments = len(big.segments)
        del big
        small_rows = min(args.segment_rows, args.rows)
        EmbeddingStore(folder / "small", {"bench": "store"}).add(_store_keys(10**12, 10**12 + small_rows),
                                                                  _store_rows(0, small_rows, args.dim))
        disk = sum(p.stat().st_size for p in (folder / "big").iterdir())
        print(f"\rbuilt {args.rows:,} x {args.dim} float32 rows in {segments} segments ({disk / 2**20:,.0f} MB) in "
              f"{build_s:.0f} s")
        rounds = []
        for round_ in range(args.repeats):
            _evict(folder / "big")
            _evict(folder / "small")
            rounds.append({"cold": _store_probe(args, folder, 2 * round_ + 1),
                           "warm": _store_probe(args, folder, 2 * round_ + 2)})
            for name, probe in rounds[-1].items():
                print(f"round {round_ + 1}, {name} ({probe['segments_opened']} segments): open "
                      f"{probe['open_s'] * 1000:.1f} ms, {args.lookups:,} lookups {probe['lookup_s'] * 1000:.1f} ms "
                      f"(contains {probe['contains_s'] * 1000:.1f} ms), append of {args.append:,} rows "
                      f"{probe['append_s'] * 1000:.0f} ms (to a store of {probe['small_store_rows']:,} rows: "
                      f"{probe['append_small_s'] * 1000:.0f} ms), peak {probe['peak_rss_mb']:.0f} MB")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    def median(values: list) -> float:
        middle = float(np.median(values))
        return int(middle) if all(isinstance(v, int) for v in values) and middle.is_integer() else middle

    cold, warm = ({k: median([r[name][k] for r in rounds]) for k in rounds[0][name]} for name in ("cold", "warm"))
    worst = {k: max(r[name][k] for r in rounds for name in r) for k in STORE_TARGETS}
    report = {"rows": args.rows, "dim": args.dim, "segment_rows": args.segment_rows, "segments": segments,
              "lookups": args.lookups, "append": args.append, **cold, "disk_mb": disk / 2**20, "build_s": build_s,
              "cold": cold, "warm": warm, "worst": worst, "rounds": rounds, "cpu": cpu_model()}
    report["targets_met"] = {k: cold[k] <= v and warm[k] <= v for k, v in STORE_TARGETS.items()}
    print(f"median of {args.repeats} (cold / warm): open {cold['open_s'] * 1000:.1f} / {warm['open_s'] * 1000:.1f} ms, "
          f"lookups {cold['lookup_s'] * 1000:.0f} / {warm['lookup_s'] * 1000:.0f} ms, append "
          f"{cold['append_s'] * 1000:.0f} / {warm['append_s'] * 1000:.0f} ms (small store: "
          f"{cold['append_small_s'] * 1000:.0f} / {warm['append_small_s'] * 1000:.0f} ms), peak "
          f"{cold['peak_rss_mb']:.0f} / {warm['peak_rss_mb']:.0f} MB; store {disk / 2**20:,.0f} MB on disk")
    return report


def store_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench store", description=(
        "The embedding store at scale: builds a synthetic store, then times opening it, looking up random keys, and "
        "appending rows (also to a small store), and its peak resident memory above the process before the open. "
        "Each round probes the store in two fresh processes: cold (the store's files dropped from the page cache "
        "first: every page read comes from the disk), then warm. The last line of the output is one JSON object; "
        "its top-level figures are the median cold round's."))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280, help="columns (1280: ViT-bigG-14's embeddings)")
    parser.add_argument("--segment-rows", type=int, default=10_000, help="rows per segment as built")
    parser.add_argument("--lookups", type=int, default=8100, help="random keys looked up (8,100: the challenge)")
    parser.add_argument("--append", type=int, default=10_000, help="rows appended")
    parser.add_argument("--dir", help="where to build it (default: a temporary folder in outputs/bench)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of a cold and a warm probe; figures are "
                        "the median round's")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--out", help="JSON file (default: outputs/bench/store-<rows>x<dim>.json)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-small", help=argparse.SUPPRESS)
    parser.add_argument("--probe-seed", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rows", "dim", "segment_rows", "lookups", "append", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lookups > args.rows:
        parser.error(f"--lookups {args.lookups} asks for more keys than --rows {args.rows} holds")
    if args.probe:
        store_probe(args)
        return
    report = store_bench(args)
    write_report(report, Path(args.out or PROJECT_ROOT / "outputs" / "bench" / f"store-{args.rows}x{args.dim}.json"))

