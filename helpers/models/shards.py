"""Whether a transformers model's files hold every weight shard that its index names, checked before a byte of the
weights is downloaded.

A hub repository's history can have commits where the index (`pytorch_model.bin.index.json`) names shards that
arrive only in later commits: BAAI/EVA-CLIP-18B's `ac8597a` holds shards 1-6 of 8, and `from_pretrained` there
downloads those (about 58 GB) before it fails for want of shard 7. The files a revision holds are the hub's listing
of it when the hub can be reached, else those of its snapshot in the local cache; a model folder's are its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoints import WeightsUnavailableError, hf_cache_dir

# Revisions known to hold every shard, for the hub repositories that the shipped configs name (README, "EVA-CLIP-18B"):
# offline, with no snapshot of them in the cache, these are what the error can name.
KNOWN_COMPLETE_REVISIONS = {
    "BAAI/EVA-CLIP-18B": ("36bce190dbcec6baf4d28a8ae43b05362196e4be",  # "upload the last 2 model files"
                          "5b689bfaf07126664d69a9947161a2196d0a2f06"),  # its child: the README only
}


def weights_index_name(files: set[str]) -> str | None:
    """The shard index that from_pretrained reads among `files` (safetensors first, as it prefers them)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME

    return next((name for name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME) if name in files), None)


def indexed_shards(index_path: Path, key: str) -> list[str]:
    """The shard files an index names (its weight_map's values), in order."""
    try:
        weight_map = json.loads(Path(index_path).read_bytes())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsUnavailableError(f"{key}: {index_path} is not a shard index with a weight_map ({e}): download "
                                      "it again") from e
    return sorted(set(weight_map.values()))


def folder_files(folder: Path) -> set[str]:
    """The files a model folder or a cached snapshot holds, as paths relative to it (a snapshot's link to a blob
    that was never downloaded is not a file)."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def hub_revision_files(repo: str, revision: str | None, key: str) -> set[str]:
    """The files the hub lists for `repo` at `revision`; a repo or revision it does not know is one error."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return set(HfApi().list_repo_files(repo, revision=revision))
    except RevisionNotFoundError as e:
        raise WeightsUnavailableError(f"{key}: the hub has no revision {revision} of '{repo}': pin one of its "
                                      "commits") from e
    except RepositoryNotFoundError as e:
        raise WeightsUnavailableError(f"{key}: the hub has no repository '{repo}' (or it is private: log in with "
                                      "`hf auth login`)") from e


def cached_complete_revisions(repo: str, shards: list[str]) -> list[str]:
    """The revisions of `repo` whose snapshots in the local cache hold every one of `shards`."""
    snapshots = Path(hf_cache_dir()) / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = [s for s in sorted(snapshots.iterdir()) if s.is_dir()] if snapshots.is_dir() else []
    return [s.name for s in found if set(shards) <= folder_files(s)]


def hub_complete_revisions(repo: str, shards: list[str], most: int = 2) -> list[str]:
    """The first commits of `repo`'s history (oldest first) whose listing holds every one of `shards`."""
    from huggingface_hub import HfApi

    api, found = HfApi(), []
    for commit in reversed(api.list_repo_commits(repo)):  # the hub lists the newest first
        if set(shards) <= set(api.list_repo_files(repo, revision=commit.commit_id)):
            found.append(commit.commit_id)
            if len(found) == most:
                break
    return found


def missing_shards_error(key: str, what: str, index_name: str, missing: list[str], shards: list[str],
                         advice: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"{key}: {what} lacks {len(missing)} of the {len(shards)} weight shards that its {index_name} names "
        f"({', '.join(missing)}), so from_pretrained would read the others and then fail: {advice}")


def revisions_advice(use: list[str]) -> str:
    if use:
        return f"pin a revision that holds them all: {' or '.join(use)}"
    return ("pin a revision that holds them all (the repository's history on the hub shows the commit that added the "
            "last shard)")
