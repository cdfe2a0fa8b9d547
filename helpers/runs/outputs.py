"""What a run writes: the submission (validated, atomic), metrics, and the manifest that says how it was made."""

from __future__ import annotations

import io
import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from ..infra.errors import UserError
from ..infra.files import PROJECT_ROOT, atomic_write_bytes

PACKAGES = ("torch", "torchvision", "open_clip_torch", "transformers", "numpy", "pillow", "natsort", "pandas",
            "papermill", "huggingface_hub", "accelerate")


class SubmissionError(UserError, ValueError):
    pass


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


def read_submission(path: Path) -> tuple[list[int], list[int]]:
    import pandas as pd

    df = pd.read_csv(path)
    if list(df.columns) != ["id_idx", "label"]:
        raise SubmissionError(f"{path}: header must be id_idx,label, got {','.join(df.columns)}")
    return df["id_idx"].tolist(), df["label"].tolist()


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
    from ..research.stats import bootstrap_ci

    path = reference_path(reference)
    ref_ids, ref_labels = read_submission(path)
    by_id = dict(zip(ref_ids, ref_labels))
    common = [(i, y) for i, y in zip(ids, np.asarray(labels).tolist()) if i in by_id]
    if not common:
        raise SubmissionError(f"reference {path} has none of the run's test ids (e.g. {ids[0]}): is it a submission "
                              "for this test set?")
    same = np.array([by_id[i] == y for i, y in common])
    lo, hi = bootstrap_ci(same)
    return {"reference": reference, "path": str(path), "agreement": float(same.mean()), "ci95": [lo, hi],
            "differing": int((~same).sum()), "images": len(common), "not_in_reference": len(ids) - len(common)}


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
    each model's and the ensemble's accuracy with its 95% interval where there are labels, and the agreement with
    the reference (metrics.json itself has every figure)."""
    lines = []
    for split in ("test", "dev"):
        summary = metrics.get(split)
        if summary is None:
            continue
        counts = ", ".join(f"{name} {n}" for name, n in summary["predicted_counts"].items())
        lines.append(f"{split}: {summary['images']} images, predicted {counts}")
        if "ensemble" in summary:
            accuracies = {**summary["models"], "ensemble": summary["ensemble"]}
            shown = [f"{name} {m['accuracy']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
                     for name, m in accuracies.items()]
            lines.append("  accuracy " + ", ".join(shown))
        if "reference" in summary:
            ref = summary["reference"]
            lines.append(f"  agreement with {ref['reference']} {ref['agreement']:.4f} [{ref['ci95'][0]:.4f}, "
                         f"{ref['ci95'][1]:.4f}]: {ref['differing']} of {ref['images']} images differ")
    if metrics.get("random_weights"):
        lines.append(f"note: RANDOM weights ({', '.join(metrics['random_weights'])}): the labels and accuracies are "
                     "meaningless")
    return lines
