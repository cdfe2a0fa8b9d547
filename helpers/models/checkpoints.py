"""What can be known of a model's weights before loading them: whether they can be had offline, and whether a file
is a checkpoint open_clip can read (from its bytes, whatever its name says). Each problem is one line that names the
setting and the file."""

from __future__ import annotations

import json
import os
import re
import socket
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from ..infra.env import env_flag
from ..infra.errors import UserError


class WeightsUnavailableError(UserError, RuntimeError):
    """Weights, or a model file, that cannot be had or used here; the one-line message says which and what to do."""



def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


_reachable: dict[str, bool] = {}


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    """One quick connection attempt, so that an offline machine fails at once instead of retrying for minutes."""
    if env_flag("HF_HUB_OFFLINE"):
        return False
    if host not in _reachable:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _reachable[host] = True
        except OSError:
            _reachable[host] = False
    return _reachable[host]


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname


def offline_error(name: str, what: str, cache: str, local_hint: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"models.{name}: the weights of {what} are not in the local cache ({cache}) and cannot be downloaded "
        f"from here (no network). Download them where there is network (they land in that cache), or give a local "
        f"copy: {local_hint}."
    )


def first_sentence(message: str) -> str:
    """The gist of a library's error message: torch follows it with lines of generic advice."""
    lines = message.strip().splitlines()
    return re.split(r"\. (?=[A-Z])", lines[0], maxsplit=1)[0] if lines else ""


def unpickling_reason(error: Exception) -> str:
    """What torch's weights_only unpickler objected to (its message wraps that in a page of advice), without
    terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return first_sentence(found.group(1) if found else text)


def read_json(path: Path, key: str):
    """A JSON file of a model entry, or an error that names the setting, the file and where the JSON breaks."""
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError says line and column; UnicodeDecodeError, which byte
        raise WeightsUnavailableError(f"{key}: {path} is not valid JSON ({e}): fix or replace the file") from e


_ARCH_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip needs of an architecture


def require_architecture(cfg, key: str, where: str) -> dict:
    """`cfg` if it is an open_clip architecture; open_clip itself skips any other JSON silently, and later says only
    that it knows no such model."""
    if not isinstance(cfg, dict):
        problem = "not a JSON object"
    elif missing := [k for k in _ARCH_KEYS if k not in cfg]:
        problem = f"no {', '.join(missing)}"
    else:
        return cfg
    raise WeightsUnavailableError(f"{key}: {where} is not an open_clip architecture ({problem}): give an open_clip "
                                  f"model config with {', '.join(_ARCH_KEYS)}, like those in open_clip's model_configs")


# --- what a checkpoint file is, from its bytes ------------------------------------------------------------------

NOT_A_CHECKPOINT = "check that the file is complete and is the model's weights"
TRUNCATED = "it may be truncated; download or copy it again"


def _checkpoint_format(head: bytes) -> str | None:
    """What a weights file holds, from its first 9 bytes, whatever its name says."""
    if head.startswith(b"PK\x03\x04"):  # a zip archive: torch.save's format since torch 1.6 (and TorchScript's)
        return "torch"
    if head[:1] == b"\x80":  # the PROTO opcode a pickle starts with: torch.save's legacy format
        return "pickle"
    if head[8:9] == b"{":  # safetensors: the header's length (8 bytes, little-endian), then the header's JSON
        return "safetensors"
    return None


def _torch_zip_problem(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):  # a zip's directory is at its end: a file cut short has none
        return f"is not a readable checkpoint (a torch checkpoint whose zip archive has no end): {TRUNCATED}"
    import torch

    try:  # opens the archive as torch.load does and reads its pickle without running it
        torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError:  # not a torch.save archive but TorchScript (OpenAI's original .pt), which open_clip also reads
        return None
    except RuntimeError as e:
        return f"is not a readable checkpoint ({first_sentence(str(e))}): {NOT_A_CHECKPOINT}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):  # parses the header, checks that the tensors fill the file
            return None
    except SafetensorError as e:
        return f"is not a readable checkpoint ({first_sentence(str(e))}): {TRUNCATED}"


def checkpoint_problem(path: Path) -> str | None:
    """What keeps open_clip from reading a weights file, found from the file itself without loading it (None: nothing
    found; a legacy pickle can only be checked by unpickling it). Raises OSError if the file cannot be read."""
    if path.suffix in (".npz", ".npy"):  # big_vision weights: open_clip reads these with numpy
        return None
    with open(path, "rb") as f:
        kind = _checkpoint_format(f.read(9))
    if kind is None:
        return ("is not a readable checkpoint (neither a torch checkpoint, a pickle nor safetensors): "
                + NOT_A_CHECKPOINT)
    if kind == "safetensors" and path.suffix != ".safetensors":  # open_clip picks its reader by the file's name
        return "is a safetensors file, which open_clip reads only under a .safetensors name: rename it"
    if kind != "safetensors" and path.suffix == ".safetensors":
        return f"is a {'torch checkpoint' if kind == 'torch' else 'pickle'}, not safetensors: rename it (e.g. .pt)"
    if kind == "torch":
        return _torch_zip_problem(path)
    return _safetensors_problem(path) if kind == "safetensors" else None


# torch's errors for a checkpoint it cannot read: a damaged zip record, a legacy file cut short
TORCH_READ_ERRORS = ("PytorchStreamReader", "unexpected EOF")


def state_dict_mismatch(message: str) -> str:
    """torch's load_state_dict error (a line per kind of mismatch, every key listed), counted with an example each."""
    def keys(label: str) -> list[str]:
        found = re.search(rf"{label} key\(s\) in state_dict: (.*)", message)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    def counted(items: list, what: str, example) -> str:
        return f"{len(items)} {what}" + (f" (e.g. {example(items[0])})" if items else "")

    shapes = re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\((.*?)\) from checkpoint, "
                        r"the shape in current model is torch\.Size\((.*?)\)", message)
    return ", ".join([counted(keys("Missing"), "missing keys", str), counted(keys("Unexpected"), "unexpected", str),
                      counted(shapes, "of other shapes", lambda s: f"{s[0]} {s[1]} in the file, {s[2]} in the model")])

