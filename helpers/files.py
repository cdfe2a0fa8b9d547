"""Files written whole or not at all, and the clean-up of what a killed writer left.

A file is written to a temporary file beside it, fsynced, and renamed into place: a reader sees the old file or the
new one. The writer holds an flock on its temporary file, so a temporary file that nobody locks belongs to a writer
that died (the kernel releases the lock with the process, on any host of a shared filesystem and across containers)
and can go.
"""

from __future__ import annotations

import fcntl
import io
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp creates 0600 files, which a cache shared by a group could not read


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module's docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}~", suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.fchmod(fd, 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                os.replace(tmp, path)  # while the lock is held
            return
        except FileNotFoundError as e:
            # a cleaner took the temporary file in the instant before it was locked: write it again
            if attempt == 0 and e.filename == tmp:
                continue
            raise
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError) and e.filename is None:  # a full disk says so without naming the file
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_csv(path: Path, frame, **kwargs) -> None:
    """A pandas DataFrame as CSV, atomically."""
    buf = io.StringIO()
    frame.to_csv(buf, **kwargs)
    atomic_write_text(path, buf.getvalue())


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files below `folder` whose writers are gone (never whole, never read); returns them."""
    removed = []
    for tmp in Path(folder).rglob(".*~*.tmp"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError):  # renamed into place meanwhile
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
