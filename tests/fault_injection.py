"""`python -m helpers predict`, with a fault injected at a chosen point: for tests that kill a run or fill its disk.

    python tests/fault_injection.py FAULT PREDICT-ARGS...     (or `main([FAULT, *PREDICT-ARGS])` in a forked process)

FAULT is one of
    none                    no fault
    meet:DIR:N              no fault, but wait before the first image batch until N processes have come to DIR
                            (runs that share a cache, made to overlap)
    batch:K                 SIGKILL as the K-th image batch (1-based) starts encoding
    write:NAME:K            SIGKILL half-way through writing the K-th file whose name matches NAME (a glob)
    rename:NAME:K           SIGKILL when the K-th such file is complete but not yet renamed into place
    unlink:NAME:K           SIGKILL as the K-th such file is deleted (compaction: merged shard written, old ones not
                            yet removed)
    enospc:NAME:K           the K-th such write fails half-way with OSError(ENOSPC), as on a full disk
Under torchrun, FAULT_RANK=R puts the fault in rank R only. Shards are flushed after every batch
(helpers.infra.cache.FLUSH_EVERY = 1), so the cache has many points to be hit at.
Faults act at the operating-system calls (os.fdopen's writes, os.replace, os.unlink), not inside the workbench.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    fault, argv = argv[0], argv[1:]
    kind, *rest = fault.split(":")
    if os.environ.get("FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        kind = "none"  # under torchrun: the fault hits the rank FAULT_RANK names, the others run as they would
    count = {"n": 0}

    def hit(name: str) -> bool:
        """Whether this operation on `name` is the K-th that matches the pattern."""
        pattern, k = rest[0], int(rest[1])
        if not fnmatch.fnmatch(name, pattern):
            return False
        count["n"] += 1
        return count["n"] == k

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    import helpers.infra.cache
    from helpers.__main__ import main as cli
    from helpers.models import Encoder

    helpers.infra.cache.FLUSH_EVERY = 1
    if kind == "batch":
        original = Encoder.encode_images

        def encode(self, pixels):
            count["n"] += 1
            if count["n"] == int(rest[0]):
                die()
            return original(self, pixels)

        Encoder.encode_images = encode
    elif kind in ("write", "enospc"):
        fdopen = os.fdopen

        class HalfWriter:
            """A file whose write stops half-way: the process is killed, or the disk is full."""

            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                if kind == "write":
                    die()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(self.f, name)

        def faulty_fdopen(fd, *args, **kwargs):
            f = fdopen(fd, *args, **kwargs)
            target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).split("~")[0].lstrip(".")
            return HalfWriter(f) if hit(target) else f

        os.fdopen = faulty_fdopen
    elif kind == "rename":
        replace = os.replace

        def faulty_replace(src, dst, *args, **kwargs):
            if hit(os.path.basename(dst)):
                die()
            return replace(src, dst, *args, **kwargs)

        os.replace = faulty_replace
    elif kind == "unlink":
        unlink = os.unlink

        def faulty_unlink(path, *args, **kwargs):
            if hit(os.path.basename(path)):
                die()
            return unlink(path, *args, **kwargs)

        os.unlink = faulty_unlink
    elif kind == "none":
        pass
    elif kind == "meet":
        original = Encoder.encode_images
        folder, n = rest[0], int(rest[1])

        def encode_together(self, pixels):
            if count["n"] == 0:
                open(os.path.join(folder, str(os.getpid())), "w").close()
                deadline = time.monotonic() + 60
                while len(os.listdir(folder)) < n and time.monotonic() < deadline:
                    time.sleep(0.05)
            count["n"] += 1
            return original(self, pixels)

        Encoder.encode_images = encode_together
    else:
        raise SystemExit(f"unknown fault {fault}")
    return cli(["predict", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
