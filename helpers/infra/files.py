"""Files written whole or not at all, and the clean-up of what a killed writer left.

A file is written to a temporary file beside it, fsynced, and renamed into place: a reader sees the old file or the
new one. The writer holds an flock on its temporary file, so a temporary file that nobody locks belongs to a writer
that died (the kernel releases the lock with the process, on any host of a shared filesystem and across containers)
and can go.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

# the checkout: its notebooks/, configs/ and outputs/ (helpers/infra/files.py is two folders below it)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc/self/status); elsewhere it is set
    and put back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path):
    """A temporary file beside `path` to write, as (file descriptor, its path), locked by this process; fsynced and
    renamed into place when the block ends, removed when it fails (see the module's docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}~", suffix=".tmp")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # mkstemp creates 0600 files, which a cache shared by a group could not read
        os.fchmod(fd, 0o666 & ~current_umask())
        yield fd, tmp
        os.fsync(fd)
        os.replace(tmp, path)  # while the lock is held
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a full disk says so without naming the file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write_chunks(path, lambda: (data,))


def atomic_write_chunks(path: Path, chunks: Callable[[], Iterable]) -> None:
    """Write the parts that `chunks()` gives (bytes-like objects, in order) to `path` atomically: a file too large to
    build in memory first. `chunks` is called again if the write has to start over."""
    for attempt in range(2):
        try:
            with atomic_file(path) as (fd, _):
                with os.fdopen(fd, "wb", closefd=False) as f:
                    for chunk in chunks():
                        f.write(chunk)
            return
        except FileNotFoundError as e:
            # a cleaner took the temporary file in the instant before it was locked: write it again
            if attempt == 0 and Path(e.filename or "").name.startswith(f".{Path(path).name}~"):
                continue
            raise


@contextmanager
def npy_rows(path: Path, shape: tuple[int, ...], dtype=np.float32):
    """A memory-mapped `.npy` array to fill a chunk of rows at a time, put in place whole when the block ends: an
    output larger than memory, written atomically."""
    with atomic_file(path) as (fd, tmp):
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        # the mapped file is sparse: reserve its blocks now, so that a full disk is an OSError here and not a SIGBUS
        # when a page is first written
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        yield array
        array.flush()
        del array


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_csv(path: Path, frame, **kwargs) -> None:
    """A pandas DataFrame as CSV, atomically."""
    buf = io.StringIO()
    frame.to_csv(buf, **kwargs)
    atomic_write_text(path, buf.getvalue())


def slug(text, max_len: int | None = None, keep: str = "._-", default: str = "x") -> str:
    """`text` as part of a file name: each run of characters other than ASCII letters, digits and those in `keep`
    becomes one `_`; then the last `max_len` characters (the end of a path names it best), `_` stripped from both
    ends; `default` when nothing is left. Cache folders are named with it: the same text must give the same name."""
    name = re.sub(f"[^A-Za-z0-9{re.escape(keep)}]+", "_", str(text))
    if max_len is not None:
        name = name[-max_len:]
    return name.strip("_") or default


def read_json_or_none(path: str | Path, of_type: type | None = None):
    """The JSON value in `path`; None when the file is missing, unreadable or damaged (not JSON, not UTF-8), or, with
    `of_type`, holds a value of another type: for files that may be absent, or written by hand or by an older
    version, where the caller goes on without them."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return value if of_type is None or isinstance(value, of_type) else None


def read_yaml_or_none(path: str | Path, of_type: type | None = None):
    """The YAML value in `path`, as `read_json_or_none` reads JSON (None when missing, unreadable or damaged)."""
    try:
        value = yaml.safe_load(Path(path).read_bytes().decode("utf-8-sig"))  # as config.read_yaml reads
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8, or a date such as 2024-13-01
        return None
    return value if of_type is None or isinstance(value, of_type) else None


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files below `folder` whose writers are gone (never whole, never read); returns them."""
    removed = []
    for tmp in Path(folder).rglob(".*~*.tmp"):
        try:  # opened for writing: NFS emulates flock with fcntl locks, whose exclusive kind needs it
            fd = os.open(tmp, os.O_RDWR)
        except (FileNotFoundError, IsADirectoryError, PermissionError):  # renamed into place meanwhile; not ours
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is alive
            continue
        finally:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
