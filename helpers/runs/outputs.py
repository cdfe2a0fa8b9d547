"""What a run writes: the submission (validated, atomic), metrics, and the manifest that says how it was made."""

from __future__ import annotations

import io
import json
import platform
import re
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..infra.errors import UserError
from ..infra.files import PROJECT_ROOT, atomic_write_bytes
from ..research.stats import interval_text

if TYPE_CHECKING:
    import torch

PACKAGES = ("torch", "torchvision", "open_clip_torch", "transformers", "numpy", "pillow", "natsort", "pandas",
            "papermill", "huggingface_hub", "accelerate")


_INTEGER = re.compile(r"^\s*[+-]?\d+\s*$")


class SubmissionError(UserError, ValueError):
    """A submission (or another CSV of a run) that cannot be read as one; the message names the file."""


def validate_submission(ids: list[int], labels, n_classes: int) -> None:
    labels = np.asarray(labels)
    if len(ids) != len(labels):
        raise SubmissionError(f"submission: {len(ids)} ids but {len(labels)} labels")
    if len(set(ids)) != len(ids):
        raise SubmissionError("submission: an id appears more than once")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes or not np.issubdtype(labels.dtype, np.integer)):
        raise SubmissionError(f"submission: labels must be integers in 0..{n_classes - 1}")


def write_submission(path: Path, ids: list[int], labels, n_classes: int) -> None:
    """`id_idx,label`, one row per image in the test set's order, written atomically."""
    validate_submission(ids, labels, n_classes)
    text = "id_idx,label\n" + "".join(f"{i},{int(y)}\n" for i, y in zip(ids, labels))
    atomic_write_bytes(Path(path), text.encode())


def read_csv_text(path: Path, what: str):
    """A CSV file a run wrote (or a person gave), every cell as text, as a DataFrame; `what` says what it should be."""
    import pandas as pd

    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise SubmissionError(f"{path}: the file is empty; {what}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: not a readable CSV ({' '.join(str(e).split())}); {what}") from None


def integer_column(values, path: Path, column: str) -> np.ndarray:
    """A column of `read_csv_text` as integers; else an error naming the first cell that is not one, and its line."""
    bad = ~values.str.match(_INTEGER)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise SubmissionError(f"{path}: {column} '{values.iloc[row]}' on line {row + 2} is not an integer")
    return values.astype(np.int64).to_numpy()


def read_submission(path: Path) -> tuple[list[int], list[int]]:
    """The ids and labels of a submission (`id_idx,label`), checked: the header, integers, no id twice (the label
    range is checked once the classes are known)."""
    import pandas as pd

    frame = read_csv_text(path, "a submission has the header id_idx,label and one row per test image")
    if list(frame.columns) != ["id_idx", "label"]:
        raise SubmissionError(f"{path}: the header must be id_idx,label, got {','.join(map(str, frame.columns))!r:.80}")
    if frame.empty:
        raise SubmissionError(f"{path}: no rows under the header; a submission has one row per test image")
    ids, labels = integer_column(frame["id_idx"], path, "id_idx"), integer_column(frame["label"], path, "label")
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if dup.any():
        lines = np.flatnonzero(ids == ids[dup][0]) + 2
        raise SubmissionError(f"{path}: id {ids[dup][0]} appears more than once (lines "
                              f"{', '.join(map(str, lines[:3]))}); each test image has one row")
    return ids.tolist(), labels.tolist()


REFERENCE_DIR = Path(__file__).parent / "references"


def list_references() -> list[str]:
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.csv"))


def reference_path(reference: str) -> Path:
    """The submission a config's `reference` names: a built-in one (helpers/references/) or a CSV file."""
    if reference.endswith(".csv"):
        path = Path(reference)
        if not path.is_file():
            raise SubmissionError(f"reference: no such submission file {path}")
        return path
    path = REFERENCE_DIR / f"{reference}.csv"
    if not path.is_file():
        raise SubmissionError(f"reference: no built-in reference '{reference}' (built-in: "
                              f"{', '.join(list_references())}; or give the path of a submission .csv)")
    return path


def reference_agreement(reference: str, ids: list[int], labels) -> dict:
    """How far a submission agrees with the reference, on the images both have, with a 95% bootstrap interval."""
    from ..research.stats import label_agreement

    path = reference_path(reference)
    by_id = dict(zip(*read_submission(path)))
    common = [(y, by_id[i]) for i, y in zip(ids, np.asarray(labels).tolist()) if i in by_id]
    if not common:
        raise SubmissionError(f"reference {path} has none of the run's test ids (e.g. {ids[0]}): is it a submission "
                              "for this test set?")
    ours, theirs = zip(*common)
    agreement = label_agreement(ours, theirs)
    return {"reference": reference, "path": str(path), **agreement, "not_in_reference": len(ids) - len(common)}


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_npy(path: Path, array) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    atomic_write_bytes(Path(path), buf.getvalue())


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description(device: torch.device) -> dict:
    import torch  # here: `compare` reads submissions with this module and needs no torch
    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def build_manifest(config: dict, device: torch.device, data: dict, models: dict) -> dict:
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_commit(),
        "device": device_description(device),
        "data": data,
        "models": models,
        "config": config,
    }


def metrics_summary(metrics: dict) -> list[str]:
    """What a run's metrics.json says, in a few lines for a terminal: per split its images and predicted classes,
    each model's and the ensemble's accuracy with its 95% interval where there are labels, the agreement with the
    reference, and what a transductive stage changed (metrics.json itself has every figure)."""
    lines = []
    for split in ("test", "dev"):
        summary = metrics.get(split)
        if summary is None:
            continue
        counts = ", ".join(f"{name} {n}" for name, n in summary["predicted_counts"].items())
        lines.append(f"{split}: {summary['images']} images, predicted {counts}")
        if "ensemble" in summary:
            accuracies = {**summary["models"], "ensemble": summary["ensemble"]}
            shown = [f"{name} {interval_text(m['accuracy'], m['ci95'])}" for name, m in accuracies.items()]
            lines.append("  accuracy " + ", ".join(shown))
        if "reference" in summary:
            ref = summary["reference"]
            lines.append(f"  agreement with {ref['reference']} {interval_text(ref['agreement'], ref['ci95'], 4)}: "
                         f"{ref['differing']} of {ref['images']} images differ")
        stage = metrics.get("transductive", {}).get(split)
        if stage is not None:  # the labels above are the stage's
            line = (f"  transductive {metrics['transductive']['method']} ({metrics['transductive']['applies_to']}) "
                    f"moved {stage['labels_moved']} labels")
            if "vs_zero_shot" in stage:
                versus = stage["vs_zero_shot"]
                line += (f"; accuracy {interval_text(versus['delta'], versus['delta_ci95'], signed=True)} against "
                         f"zero-shot (McNemar p {versus['mcnemar_p']:.3g})")
            lines.append(line)
    if metrics.get("random_weights"):
        lines.append(f"note: RANDOM weights ({', '.join(metrics['random_weights'])}): the labels and accuracies are "
                     "meaningless")
    return lines
