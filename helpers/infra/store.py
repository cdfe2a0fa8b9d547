"""The embedding store: a folder of append-only segment files mapping short string keys to float32 rows, for
millions of rows (`EmbeddingStore`). Opening, looking up and appending cost in proportion to what is asked, not to
the store's size; several processes (and hosts) may share one folder. The embedding cache (`helpers.infra.cache`) keeps
one store per model identity and preprocessing.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import struct
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from filelock import FileLock

from .files import atomic_write_bytes, atomic_write_chunks, remove_stale_temporaries

log = logging.getLogger(__name__)


SEGMENT_SUFFIX = ".seg"
COMPACT_MIN_SEGMENTS = 4  # small segments of one size class that compaction waits for before it merges them
SMALL_SEGMENT_ROWS = 65536  # segments of at least this many rows are never rewritten
_MAGIC = b"EMBSEG\r\n"
_VERSION = 1
_HEADER = struct.Struct("<8sIIIIQQQ")  # magic, version, key width, dim, 0, rows, keys' offset, vectors' offset
_HEADER_SIZE = 64  # the fields above, their crc32, zeros
_CHUNK_BYTES = 8 << 20  # rows are written and merged this many bytes at a time
_FADVISE = hasattr(os, "posix_fadvise")  # not on macOS: reads there are not announced ahead


class CorruptSegment(ValueError):
    """A segment file that is not what its header says: cut short, damaged, or no segment at all."""


class Segment:
    """One segment file: `keys` (sorted, unique, fixed-width ASCII bytes) memory-mapped, and float32 rows in the
    keys' order, read with `pread` into the caller's arrays (`read_into`): a lookup's resident memory is its answer
    and the key pages it searched, however much of the file the page cache holds. While it is open this process
    holds a shared flock on the file, and a compaction deletes only the segments that nobody holds
    (`_remove_segment`): a file deleted by another host of a network filesystem fails the reads of whoever still has
    it open (ESTALE, or SIGBUS through a mapping)."""

    def __init__(self, path: Path, fd: int, keys: np.ndarray, dim: int, vectors_at: int):
        self.path, self.name, self._fd, self.keys, self.dim, self._at = path, path.name, fd, keys, dim, vectors_at

    @property
    def rows(self) -> int:
        return len(self.keys)

    def read_into(self, out: np.ndarray, positions: np.ndarray, rows: np.ndarray) -> None:
        """out[positions[i]] = row rows[i], for `rows` in ascending order: one scattering `preadv` per run of
        consecutive rows, the runs first handed to the kernel to read ahead together (disk reads in parallel)."""
        size = 4 * self.dim
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # where a run of consecutive rows starts
        runs = np.append(starts, len(rows))
        if len(starts) > 8 and _FADVISE:
            for s, e in zip(runs[:-1], runs[1:]):
                os.posix_fadvise(self._fd, self._at + int(rows[s]) * size, int(e - s) * size, os.POSIX_FADV_WILLNEED)
        for s, e in zip(runs[:-1], runs[1:]):
            for part in range(s, e, 1024):  # IOV_MAX
                end = min(e, part + 1024)
                buffers = [out[p] for p in positions[part:end]]
                if os.preadv(self._fd, buffers, self._at + int(rows[part]) * size) != len(buffers) * size:
                    raise CorruptSegment(f"{self.path} is shorter than its header says (changed since it was opened)")

    def prefetch_keys(self) -> None:
        """Have the kernel read all the keys, in the background: a search for many keys touches most of their pages,
        and one request is faster than a page fault for each."""
        if _FADVISE:
            os.posix_fadvise(self._fd, 0, self._at, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd is not None:
            self.keys = None  # the mapping goes with the last array over it
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit
            pass


def _vectors_at(rows: int, width: int) -> int:
    return -(-(_HEADER_SIZE + rows * width) // 64) * 64  # after the header and the keys, 64-byte aligned


def _segment_header(rows: int, dim: int, width: int) -> tuple[bytes, int]:
    """The header of a segment of `rows` keys `width` bytes wide and `dim` columns, and where its vectors start."""
    vectors_at = _vectors_at(rows, width)
    fields = _HEADER.pack(_MAGIC, _VERSION, width, dim, 0, rows, _HEADER_SIZE, vectors_at)
    return (fields + struct.pack("<I", zlib.crc32(fields))).ljust(_HEADER_SIZE, b"\0"), vectors_at


def _read_header(head: bytes, size: int) -> tuple[int, int, int, int]:
    """rows, dim, key width, vectors' offset; CorruptSegment unless the header is whole and the size is its own."""
    if len(head) < _HEADER_SIZE:
        raise CorruptSegment(f"{size} bytes, less than a header")
    fields = head[:_HEADER.size]
    magic, version, width, dim, _, rows, keys_at, vectors_at = _HEADER.unpack(fields)
    if magic != _MAGIC:
        raise CorruptSegment("not a segment file (its first bytes are not the segment magic)")
    if version != _VERSION:
        raise CorruptSegment(f"format version {version}; this code reads version {_VERSION}")
    if struct.unpack_from("<I", head, _HEADER.size)[0] != zlib.crc32(fields):
        raise CorruptSegment("its header fails its checksum")
    if min(rows, dim, width) < 1 or keys_at != _HEADER_SIZE or vectors_at != _vectors_at(rows, width):
        raise CorruptSegment(f"inconsistent header: {rows} rows, {dim} columns, keys of {width} bytes")
    if size != vectors_at + rows * dim * 4:
        raise CorruptSegment(f"{size} bytes where its header says {vectors_at + rows * dim * 4}: cut short or padded")
    return rows, dim, width, vectors_at


def _vanished(e: OSError) -> bool:
    """Whether an error says that the file is gone (merged away, maybe by another host)."""
    return isinstance(e, FileNotFoundError) or e.errno == errno.ESTALE


def open_segment(path: Path) -> Segment | None:
    """Map one segment: reads its header only. None if it vanished (merged away); CorruptSegment if it is not whole;
    any other OSError (no permission, an I/O error) is not the file's fault and propagates."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if _vanished(e):
            return None
        raise
    segment = None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a compaction deletes a segment only while it holds it exclusively, so ...
        size = os.fstat(fd).st_size
        if os.stat(path).st_ino != os.fstat(fd).st_ino:  # ... one still in place now stays while this process maps it
            return None
        rows, dim, width, vectors_at = _read_header(os.pread(fd, _HEADER_SIZE, 0), size)
        mapped = mmap.mmap(fd, vectors_at, access=mmap.ACCESS_READ)  # the header and the keys
        mapped.madvise(mmap.MADV_RANDOM)  # a binary search's fault reads its page, not megabytes of rows around it
        keys = np.frombuffer(mapped, f"S{width}", rows, _HEADER_SIZE)
        segment = Segment(path, fd, keys, dim, vectors_at)
        return segment
    except OSError as e:
        if _vanished(e):
            return None
        raise
    finally:
        if segment is None:
            os.close(fd)


def _key_array(keys) -> np.ndarray:
    """Keys (ASCII strings) as a numpy array of fixed-width bytes."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind == "S":
        return keys
    try:
        return np.array(keys, dtype=np.bytes_).reshape(-1)
    except UnicodeEncodeError as e:
        raise ValueError(f"embedding cache keys are ASCII strings: {e}") from None


def _write_segment(path: Path, keys: np.ndarray, dim: int, row_chunks: Callable[[], Iterable[np.ndarray]]) -> None:
    """Write a segment atomically, its rows a chunk at a time: `keys` sorted and unique, `row_chunks()` their rows in
    that order."""
    rows, width = len(keys), keys.dtype.itemsize
    header, vectors_at = _segment_header(rows, dim, width)

    def chunks() -> Iterator:
        yield header
        yield np.ascontiguousarray(keys).tobytes()
        yield bytes(vectors_at - _HEADER_SIZE - rows * width)
        written = 0
        for block in row_chunks():
            block = np.ascontiguousarray(block, dtype="<f4")
            written += len(block)
            yield memoryview(block).cast("B")
        if written != rows:  # never put in place: the file would not be what its header says
            raise RuntimeError(f"{path.name}: {written} rows written for {rows} keys")

    atomic_write_chunks(path, chunks)


def _row_chunks(vectors: np.ndarray, order: np.ndarray) -> Iterator[np.ndarray]:
    step = max(1, _CHUNK_BYTES // (4 * max(1, vectors.shape[1])))
    for start in range(0, len(order), step):
        yield vectors[order[start:start + step]]


def _tier(rows: int) -> int:
    """A segment's size class: under 1,024 rows, then each 4 times larger (compaction merges like with like)."""
    return 0 if rows < 1024 else (int(rows).bit_length() - 11) // 2 + 1


def _to_merge(segments: list[Segment], min_segments: int) -> list[Segment]:
    """The small segments of the largest size class that has `min_segments` of them, and those of every smaller
    class; none if no class has that many. Each row is rewritten about once per size class it climbs through (4
    times between 1,024 and 65,536 rows), and never again once its segment reaches SMALL_SEGMENT_ROWS."""
    small = [s for s in segments if s.rows < SMALL_SEGMENT_ROWS]
    counts = Counter(_tier(s.rows) for s in small)
    full = [tier for tier, n in counts.items() if n >= max(2, min_segments)]
    return [s for s in small if _tier(s.rows) <= max(full)] if full else []


def _remove_segment(path: Path, rename_if_held: bool = True) -> None:
    """Delete a merged segment if no process holds it open; else take it out of the listing (renamed `*.merged`,
    which a rename does not disturb for whoever maps it), for a later compaction to delete."""
    try:
        try:
            fd = os.open(path, os.O_RDWR)  # NFS grants an exclusive lock only to a file opened for writing
        except PermissionError:  # another user's segment: this process can only rename it
            fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if _vanished(e):
            return
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:  # held by a process that maps it (or, on NFS, a file this user may not write)
            if _vanished(e):
                return
            if rename_if_held:
                os.replace(path, path.with_name(path.name + ".merged"))
            return
        os.unlink(path)  # while holding it: a process that opens it now finds it gone once it has its lock
    except OSError as e:
        if not _vanished(e):
            raise
    finally:
        os.close(fd)


def _set_aside(path: Path, problem: Exception) -> None:
    aside = path.with_name(path.name + ".corrupt")
    try:
        path.replace(aside)
    except FileNotFoundError:  # another process set it aside first
        pass
    log.warning("embedding cache: %s is unreadable (%s: %s); set aside as %s, its rows will be computed again",
                path, type(problem).__name__, problem, aside.name)


class EmbeddingStore:
    """A folder of segment files mapping string keys (short ASCII strings) to float32 vectors, for millions of rows.

    A segment is one file, written once (`_write_segment`: temporary file, fsync, rename) and never changed: a
    64-byte header (magic, version, rows, columns, key width, offsets, checksum), the keys sorted as fixed-width
    bytes, then the rows in the same order. Opening a store lists the folder, reads each segment's header and maps
    its keys, so it costs per segment, not per row; a lookup is, per segment, a vectorised binary search of the
    asked keys, then a read of the rows found (`Segment.read_into`); `add` writes one new segment and touches no
    other. The same key may be in two segments (with the same vector): the first in name order answers.

    Safe with several processes, and hosts, on one folder: a segment is written whole or not at all, a segment that
    is not what its header says is set aside (renamed `*.corrupt`, with a warning) and its rows are computed again,
    and compaction (optional) merges, under a lock, only small segments, exactly those it read, writing the merged
    one before it removes them: it never rewrites a large segment, loses nothing that another process appends
    meanwhile, and a crash at any point leaves at most duplicates. `.npz` shards (the format before segments) are
    migrated on first open.
    """

    def __init__(self, root: Path, description: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "key.json").exists():
            atomic_write_bytes(self.root / "key.json", json.dumps(description, indent=2, sort_keys=True).encode())
        remove_stale_temporaries(self.root)
        self._lock = FileLock(self.root / ".compact.lock")  # one object per store: re-entrant within it
        self._segments: list[Segment] = []
        self._len: int | None = None
        self.refresh()

    def refresh(self) -> None:
        """Pick up the segments that other processes wrote (and drop those they merged away) since this store was
        opened or last refreshed."""
        listed = self._listing()
        while True:
            kept = {s.name: s for s in self._segments if s.name in listed}
            for segment in self._segments:
                if segment.name not in kept:
                    segment.close()
            complete = True
            for name in sorted(listed - kept.keys()):
                segment = self._open(name)
                if segment is None:
                    complete = False
                else:
                    kept[name] = segment
            self._segments = [kept[name] for name in sorted(kept)]
            self._len = None
            # a segment merged away meanwhile is in the merged one, written before it went: list again until two
            # listings agree (a listing may miss a file created and one deleted while it reads the folder)
            again = self._listing()
            if again == listed and complete:
                return
            listed = again

    def _listing(self) -> set[str]:
        names = os.listdir(self.root)
        if any(name.endswith(".npz") for name in names):
            self._migrate()
            names = os.listdir(self.root)
        return {name for name in names if name.endswith(SEGMENT_SUFFIX) and not name.startswith(".")}

    def _open(self, name: str) -> Segment | None:
        try:
            return open_segment(self.root / name)
        except CorruptSegment as e:
            _set_aside(self.root / name, e)
            return None

    def _migrate(self) -> None:
        """Each .npz shard (the format before segments) rewritten as a segment of the same name, then removed."""
        with self._lock:
            shards = sorted(self.root.glob("*.npz"))
            for shard in shards:
                target = shard.with_suffix(SEGMENT_SUFFIX)
                if not target.exists():  # else written before a crash: only the removal is left to do
                    arrays = read_shard(shard)
                    if arrays is None:  # migrated by another process
                        continue
                    keys, vectors = arrays
                    if len(keys):
                        keys, first = np.unique(_key_array(keys), return_index=True)
                        _write_segment(target, keys, vectors.shape[1], lambda v=vectors, f=first: _row_chunks(v, f))
                shard.unlink(missing_ok=True)
            if shards:
                log.info("embedding cache: %d .npz shards of %s migrated to segments", len(shards), self.root)

    @property
    def dim(self) -> int | None:
        return self._segments[0].dim if self._segments else None

    @property
    def segments(self) -> list[str]:
        return [s.name for s in self._segments]

    def __len__(self) -> int:
        """The number of distinct keys: reads every key when segments may share some (not on a lookup's path)."""
        if self._len is None:
            if len(self._segments) <= 1:
                self._len = sum(s.rows for s in self._segments)
            else:
                width = max(s.keys.dtype.itemsize for s in self._segments)
                self._len = len(np.unique(np.concatenate([s.keys.astype(f"S{width}") for s in self._segments])))
        return self._len

    def _locate(self, keys) -> tuple[np.ndarray, np.ndarray]:
        """Per key: the index of the first segment that holds it (-1: none) and its row there."""
        query = _key_array(keys)
        where = np.full(len(query), -1, np.int64)
        rows = np.zeros(len(query), np.int64)
        todo = np.argsort(query)  # positions still to find, in key order: a search for sorted keys is 3x faster
        lengths = None
        if len(query) >= 64:
            for segment in self._segments:
                segment.prefetch_keys()
        for i, segment in enumerate(self._segments):
            if not todo.size:
                break
            asked = query[todo]
            fits = None
            if asked.dtype.itemsize > segment.keys.dtype.itemsize:  # a longer key is in no row of this segment
                lengths = np.char.str_len(query) if lengths is None else lengths
                fits = lengths[todo] <= segment.keys.dtype.itemsize
            asked = asked.astype(segment.keys.dtype, copy=False)  # the segment's width: searchsorted copies nothing
            found = np.searchsorted(segment.keys, asked)
            hit = segment.keys[np.minimum(found, segment.rows - 1)] == asked
            if fits is not None:
                hit &= fits
            where[todo[hit]] = i
            rows[todo[hit]] = found[hit]
            todo = todo[~hit]
        return where, rows

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        """Whether each key has a row, as an array of bools."""
        return self._locate(keys)[0] >= 0

    def __contains__(self, key: str) -> bool:
        return bool(self.contains([key])[0])

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """The rows of `keys`, as a new (len(keys), dim) float32 array; KeyError if any key has none."""
        where, rows = self._locate(keys)
        missing = np.flatnonzero(where < 0)
        if missing.size:
            raise KeyError(f"{missing.size} keys not in the embedding cache {self.root}, e.g. {keys[missing[0]]}")
        out = np.empty((len(where), self.dim or 0), np.float32)
        for i in np.unique(where):
            asked = np.flatnonzero(where == i)
            asked = asked[np.argsort(rows[asked], kind="stable")]  # in file order
            self._segments[i].read_into(out, asked, rows[asked])
        return out

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Append rows as one new segment (a key given twice: its first row); no other segment is touched."""
        if not len(keys):
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(keys) or (self.dim not in (None, vectors.shape[1])):
            raise ValueError(f"{len(keys)} keys and vectors of shape {vectors.shape} for an embedding cache of "
                             f"{self.dim} columns")
        unique, first = np.unique(_key_array(keys), return_index=True)
        name = f"{time.time_ns()}-{os.getpid()}-{hashlib.sha256(unique.tobytes()).hexdigest()[:16]}{SEGMENT_SUFFIX}"
        _write_segment(self.root / name, unique, vectors.shape[1], lambda: _row_chunks(vectors, first))
        segment = self._open(name)
        if segment is None:  # merged away already by another process
            self.refresh()
            return
        self._segments = sorted([*self._segments, segment], key=lambda s: s.name)
        self._len = None

    def compact(self, min_segments: int = COMPACT_MIN_SEGMENTS) -> None:
        """Merge small segments (`_to_merge`) into one, if there are enough of them. Under the folder's lock; the
        merged segment is written before the merged ones are removed, so a crash at any point loses nothing (it may
        leave the same rows twice), and only the segments read here are removed, so another process's new segments
        stay."""
        with self._lock:
            self.refresh()
            for leftover in self.root.glob(f"*{SEGMENT_SUFFIX}.merged"):  # merged before, then still open somewhere
                _remove_segment(leftover, rename_if_held=False)
            chosen = _to_merge(self._segments, min_segments)
            if not chosen:
                return
            width = max(s.keys.dtype.itemsize for s in chosen)
            keys, first = np.unique(np.concatenate([s.keys.astype(f"S{width}") for s in chosen]), return_index=True)
            starts = np.cumsum([0] + [s.rows for s in chosen])

            def row_chunks() -> Iterator[np.ndarray]:
                step = max(1, _CHUNK_BYTES // (4 * self.dim))
                for start in range(0, len(first), step):
                    at = first[start:start + step]
                    which = np.searchsorted(starts, at, side="right") - 1
                    block = np.empty((len(at), self.dim), np.float32)
                    for i in np.unique(which):
                        mine = np.flatnonzero(which == i)
                        mine = mine[np.argsort(at[mine], kind="stable")]
                        chosen[i].read_into(block, mine, at[mine] - starts[i])
                    yield block

            _write_segment(self.root / f"{time.time_ns()}-{os.getpid()}-merged{SEGMENT_SUFFIX}", keys, self.dim,
                           row_chunks)
            merged = {s.name for s in chosen}
            self._segments = [s for s in self._segments if s.name not in merged]
            for segment in chosen:
                segment.close()  # this process's own hold: closed before the exclusive lock is tried
            for segment in chosen:
                _remove_segment(segment.path)
            self.refresh()


def read_shard(shard: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The keys and rows of one .npz shard (the format before segments); None if it vanished (migrated away); a
    shard that cannot be read is set aside, with a warning that names it, and counts as empty, so its rows are
    computed again."""
    problem = None
    try:
        with np.load(shard, allow_pickle=False) as z:
            keys, vectors = z["keys"], z["vectors"]
        if keys.ndim != 1 or vectors.ndim != 2 or len(keys) != len(vectors) or vectors.dtype != np.float32:
            raise ValueError(f"keys {keys.shape} and vectors {vectors.shape} {vectors.dtype} do not match")
    except OSError as e:
        if _vanished(e):
            return None
        if e.errno is not None:  # no permission, an I/O error: not the shard's fault, and not to be hidden
            raise
        problem = e
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError) as e:  # truncated or damaged
        problem = e
    if problem is not None:
        _set_aside(shard, problem)
        return np.zeros(0, "S1"), np.zeros((0, 0), np.float32)
    return keys, vectors

