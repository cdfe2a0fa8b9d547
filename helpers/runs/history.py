"""The run history: one row per finished `run` or `predict` in `outputs/runs/index.csv`, read by `python -m helpers
runs`.

A row says when, where, which config (name and hash), which code (git commit), which models (each with the short
hash of its identity, and whether any had random weights), what came out (agreement with a reference submission,
dev accuracy), how long it took and with how many processes. Several runs may finish at once, on one machine or on
several sharing the folder: an append takes a lock beside the index (`index.csv.lock`), reads the header (writing
it when the file is new), and adds its row with one write of a whole line, so the index only ever holds whole rows.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout

from ..config import json_digest
from ..infra.errors import UserError
from ..infra.files import read_json_or_none

log = logging.getLogger(__name__)

COLUMNS = ["time", "run_folder", "config_name", "config_hash", "git_commit", "models", "random_weights",
           "reference_agreement", "dev_accuracy", "seconds", "command", "world_size"]
COMMANDS = ("run", "predict")
INDEX_ENV = "HELPERS_RUN_INDEX"  # another index than outputs/runs/index.csv (e.g. for tests)
LOCK_TIMEOUT_S = 60
_HEADER = ",".join(COLUMNS) + "\n"
_TEXT_COLUMNS = {c: str for c in ("time", "run_folder", "config_name", "config_hash", "git_commit", "models",
                                  "command")}


class HistoryError(UserError, ValueError):
    """An index that is not a run history, or one that cannot be locked."""


def default_index_path() -> Path:
    """`outputs/runs/index.csv` (relative to the working directory, as the run folders), or $HELPERS_RUN_INDEX."""
    return Path(os.environ.get(INDEX_ENV) or Path("outputs") / "runs" / "index.csv")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def format_row(record: dict) -> str:
    """One record as one CSV line (quoted where needed), in the index's column order."""
    unknown = set(record) - set(COLUMNS)
    if unknown:
        raise ValueError(f"run record: unknown field(s) {', '.join(sorted(unknown))} (columns: {', '.join(COLUMNS)})")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_cell(record.get(c)) for c in COLUMNS])
    return buf.getvalue()


def append_run_record(index_path: str | Path | None, record: dict) -> Path:
    """Append `record` (a dict of the index's columns; `time` defaults to now, UTC) as one row of the index at
    `index_path` (None: `default_index_path()`), under a lock; returns the index's path."""
    path = Path(index_path) if index_path is not None else default_index_path()
    record = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **record}
    line = format_row(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    data = _HEADER + line
                else:
                    _check_header(path, os.pread(fd, len(_HEADER.encode()), 0).decode(errors="replace"))
                    # a row cut short (a writer that ignored the lock, a full disk): ours starts on a line of its own
                    torn = os.pread(fd, 1, size - 1) != b"\n"
                    data = ("\n" if torn else "") + line
                payload = data.encode()
                written = os.write(fd, payload)  # one write of whole lines (the lock keeps other writers out)
                while written < len(payload):
                    written += os.write(fd, payload[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
    except Timeout:
        raise HistoryError(f"{path}: could not take its lock {lock.lock_file} within {LOCK_TIMEOUT_S} s (another "
                           "process holds it); the run itself is finished and written") from None
    return path


def _check_header(path: Path, head: str) -> None:
    first = head.split("\n", 1)[0]
    if first + "\n" != _HEADER:
        raise HistoryError(f"{path}: not a run index (its first line is {first[:80]!r}, expected "
                           f"{_HEADER.strip()!r}); move it aside and a new one is started")


def read_history(index_path: str | Path | None = None) -> pd.DataFrame:
    """The index as a DataFrame, latest run first (an index that does not exist yet: no rows)."""
    path = Path(index_path) if index_path is not None else default_index_path()
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS)
    with open(path, encoding="utf-8", errors="replace") as f:
        _check_header(path, f.readline())
    frame = pd.read_csv(path, dtype=_TEXT_COLUMNS, keep_default_na=False, na_values={
        c: [""] for c in COLUMNS if c not in _TEXT_COLUMNS}, on_bad_lines="warn")
    frame = frame.iloc[::-1]  # equal times: the row appended later first
    when = pd.to_datetime(frame["time"], utc=True, errors="coerce", format="ISO8601")
    order = when.sort_values(ascending=False, kind="mergesort", na_position="last").index
    return frame.loc[order].reset_index(drop=True)


def runs_under(frame: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """The runs whose folder is inside `folder` (a sweep's points), as the index records folders: relative to the
    project when inside it, else absolute."""
    from ..infra.files import PROJECT_ROOT

    folder = folder.resolve()

    def inside(run_folder: str) -> bool:
        path = Path(run_folder)
        return (path if path.is_absolute() else PROJECT_ROOT / path).resolve().is_relative_to(folder)

    return frame[frame["run_folder"].map(inside)].reset_index(drop=True)


def format_history(frame: pd.DataFrame, limit: int | None = None) -> str:
    """The latest `limit` runs as a table for a terminal: when, what, which models (name#identity), the figures
    (`-` where a run has none), the run folder last; index.csv has every column in full."""
    shown = frame.head(limit) if limit is not None else frame

    def figure(digits: int):
        return lambda value: "-" if pd.isna(value) else f"{value:.{digits}f}"

    table = pd.DataFrame({
        "time (UTC)": shown["time"].str.slice(0, 16).str.replace("T", " "),
        "command": shown["command"],
        "config": shown["config_name"],
        "models": shown["models"].map(lambda text: " ".join(
            f"{part.split('=', 1)[0]}#{part.rsplit('#', 1)[-1]}" for part in str(text).split(";") if part)),
        "random": shown["random_weights"].map(lambda value: "yes" if not pd.isna(value) and bool(value) else ""),
        "agreement": shown["reference_agreement"].map(figure(4)),
        "dev acc": shown["dev_accuracy"].map(figure(3)),
        "seconds": shown["seconds"].map(figure(0)),
        "run folder": shown["run_folder"],
    })
    text = table.to_string(index=False)
    if len(shown) < len(frame):
        text += f"\n({len(shown)} of {len(frame)} runs; --limit shows more)"
    return text


# --- building a record from a finished run


def _number(obj, *keys) -> float | None:
    """obj[k1][k2]... when every step is there and the end is a number, else None (keys another version may lack)."""
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    if isinstance(obj, bool) or not isinstance(obj, int | float) or not math.isfinite(obj):
        return None
    return float(obj)


def _short(value) -> str:
    """A model's arch or weights, short: the file name of a local path (a JSON architecture: its stem), else as is
    (tags, hub ids)."""
    if value in (None, ""):
        return "-"
    text = str(value).removeprefix("local-dir:")
    path = Path(text)
    if text.startswith(("/", ".", "~")) or path.exists():
        return path.stem if path.suffix == ".json" else path.name
    return text


def model_summary(name: str, identity: dict) -> str:
    """`name=backend:arch@weights#hash`: hash is the first 8 hex digits of the identity's digest (the cache key)."""
    return (f"{name}={identity.get('backend', '-')}:{_short(identity.get('arch'))}@"
            f"{_short(identity.get('pretrained'))}#{json_digest(identity)[:8]}")


def _fallback_identity(entry) -> dict:
    """What a model's identity holds, from its config entry (a run folder without manifest or model.json; its
    `precision` as the config says it: what `auto` became is known only where the model ran)."""
    ident = {"backend": entry.backend, "arch": entry.arch, "pretrained": entry.pretrained, "revision": entry.revision,
             "precision": entry.precision}
    if entry.random_weights:
        ident["seed"] = entry.seed
    return ident


def _run_folder(output_dir: Path) -> str:
    from ..infra.files import PROJECT_ROOT

    resolved = output_dir.resolve()
    return str(resolved.relative_to(PROJECT_ROOT)) if resolved.is_relative_to(PROJECT_ROOT) else str(resolved)


def _commit(git: dict) -> str | None:
    commit = git.get("commit") if isinstance(git, dict) else None
    if not commit:
        return None
    return str(commit)[:12] + ("-dirty" if git.get("dirty") else "")


def run_record(config, output_dir: str | Path, metrics: dict | None, seconds: float, command: str,
               world_size: int) -> dict:
    """The index row of a finished run: `config` its RunConfig, `output_dir` its folder (the manifest there gives the
    models' identities and the git commit), `metrics` what it wrote to metrics.json."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
    output_dir = Path(output_dir)
    manifest = read_json_or_none(output_dir / "manifest.json", dict) or {}
    recorded = manifest.get("models") if isinstance(manifest.get("models"), dict) else {}
    parts, random_any = [], False
    for name, entry in config.models.items():
        info = recorded.get(name)
        if not isinstance(info, dict):
            info = read_json_or_none(output_dir / "models" / name / "model.json", dict) or {}
        identity = info.get("identity") if isinstance(info.get("identity"), dict) else _fallback_identity(entry)
        random_any |= bool(info.get("random_weights", entry.random_weights))
        parts.append(model_summary(name, identity))
    if "git" in manifest:
        git = manifest["git"]
    else:
        from .outputs import git_commit

        git = git_commit()
    metrics = metrics if isinstance(metrics, dict) else {}
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_folder": _run_folder(output_dir),
        "config_name": config.name,
        "config_hash": json_digest(config.to_dict()),
        "git_commit": _commit(git),
        "models": ";".join(parts),
        "random_weights": random_any,
        "reference_agreement": _number(metrics, "test", "reference", "agreement"),
        "dev_accuracy": _number(metrics, "dev", "ensemble", "accuracy"),
        "seconds": round(float(seconds), 1),
        "command": command,
        "world_size": int(world_size),
    }


def record_run(config, output_dir: str | Path, metrics: dict | None, seconds: float, command: str,
               world_size: int, index_path: str | Path | None = None) -> dict | None:
    """`append_run_record(index_path, run_record(...))` for the end of a run: a history that cannot be written
    (a full disk, a lock held too long, a file that is not an index) is a warning, never a failed run."""
    try:
        record = run_record(config, output_dir, metrics, seconds, command, world_size)
        append_run_record(index_path, record)
    except (OSError, UserError) as e:
        from ..infra.errors import one_line

        log.warning("the run is finished, but the run history was not updated: %s", one_line(e))
        return None
    return record
