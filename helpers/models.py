"""Model backends behind one interface: L2-normalised float32 image and text features.

A backend is a small class in the BACKENDS registry. It says, without loading anything, what identifies the
weights (for the cache keys and the manifest) and how images are preprocessed, and it loads an `Encoder`.
`ModelHandle` loads lazily, so a run whose embeddings are all cached never loads a model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import pickle
import re
import socket
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch

from .config import DEVICE_MAP_STRATEGIES, ModelEntry, is_hub_id
from .data import OPENAI_MEAN, OPENAI_STD, Preprocess
from .errors import UserError, describe_os_error
from .scoring import FLOAT32, LogitArithmetic

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The winner's fork called upstream open_clip's `metaclip_fullcc` weights `metaclip_2_5b`.
OPEN_CLIP_TAG_ALIASES = {"metaclip_2_5b": "metaclip_fullcc"}


class WeightsUnavailableError(UserError, RuntimeError):
    """Weights, or a model file, that cannot be had or used here; the one-line message says which and what to do."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device is '{device}' but CUDA is not available here (use device: auto or cpu)")
    return torch.device(device)


def cpu_computes_bf16_natively() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), as torch reports them. Elsewhere torch emulates
    bf16, slower than fp32: 7.0 images/s against 27.2 on a 2-core Xeon with AVX-512 but neither (BENCHMARKS.md)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """A model entry's precision on `device`: `auto` is fp16 on a GPU, and on the CPU bf16 where the CPU computes
    bf16 natively, else fp32; the others are themselves."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_computes_bf16_natively() else "fp32"


def weights_device(entry: ModelEntry, device: torch.device) -> torch.device:
    """Where a model entry's weights go: its `device_map` when that names one device, else the run's device (a
    spreading device_map puts them on the GPUs first)."""
    if entry.device_map is not None and entry.device_map not in DEVICE_MAP_STRATEGIES:
        return torch.device(entry.device_map)
    return device


def with_index(device: torch.device) -> torch.device:
    """`cuda` as the GPU it means (`cuda:N`): transformers and safetensors place weights by index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def placement_record(device_map: dict) -> dict[str, str]:
    """accelerate's device map as JSON: module name ("" for the whole model) -> "cuda:N", "cpu" or "disk"."""
    return {name: f"cuda:{where}" if isinstance(where, int) else str(where) for name, where in device_map.items()}


def input_device(placement: dict[str, str]) -> torch.device:
    """Where a spread model takes its inputs: its first GPU, else the CPU (accelerate's hooks move them on), as
    accelerate's dispatch_model chooses its main device."""
    gpus = [where for where in placement.values() if where not in ("cpu", "disk")]
    return torch.device(gpus[0] if gpus else "cpu")


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


_reachable: dict[str, bool] = {}


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    """One quick connection attempt, so that an offline machine fails at once instead of retrying for minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
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


def _offline_error(name: str, what: str, cache: str, local_hint: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"models.{name}: the weights of {what} are not in the local cache ({cache}) and cannot be downloaded "
        f"from here (no network). Download them where there is network (they land in that cache), or give a local "
        f"copy: {local_hint}."
    )


def _first_sentence(message: str) -> str:
    """The gist of a library's error message: torch follows it with lines of generic advice."""
    lines = message.strip().splitlines()
    return re.split(r"\. (?=[A-Z])", lines[0], maxsplit=1)[0] if lines else ""


def _unpickling_reason(error: Exception) -> str:
    """What torch's weights_only unpickler objected to (its message wraps that in a page of advice), without
    terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return _first_sentence(found.group(1) if found else text)


def _read_json(path: Path, key: str):
    """A JSON file of a model entry, or an error that names the setting, the file and where the JSON breaks."""
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError says line and column; UnicodeDecodeError, which byte
        raise WeightsUnavailableError(f"{key}: {path} is not valid JSON ({e}): fix or replace the file") from e


_ARCH_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip needs of an architecture


def _require_architecture(cfg, key: str, where: str) -> dict:
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

_NOT_A_CHECKPOINT = "check that the file is complete and is the model's weights"
_TRUNCATED = "it may be truncated; download or copy it again"


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
        return f"is not a readable checkpoint (a torch checkpoint whose zip archive has no end): {_TRUNCATED}"
    try:  # opens the archive as torch.load does and reads its pickle without running it
        torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError:  # not a torch.save archive but TorchScript (OpenAI's original .pt), which open_clip also reads
        return None
    except RuntimeError as e:
        return f"is not a readable checkpoint ({_first_sentence(str(e))}): {_NOT_A_CHECKPOINT}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):  # parses the header, checks that the tensors fill the file
            return None
    except SafetensorError as e:
        return f"is not a readable checkpoint ({_first_sentence(str(e))}): {_TRUNCATED}"


def _checkpoint_problem(path: Path) -> str | None:
    """What keeps open_clip from reading a weights file, found from the file itself without loading it (None: nothing
    found; a legacy pickle can only be checked by unpickling it). Raises OSError if the file cannot be read."""
    if path.suffix in (".npz", ".npy"):  # big_vision weights: open_clip reads these with numpy
        return None
    with open(path, "rb") as f:
        kind = _checkpoint_format(f.read(9))
    if kind is None:
        return ("is not a readable checkpoint (neither a torch checkpoint, a pickle nor safetensors): "
                + _NOT_A_CHECKPOINT)
    if kind == "safetensors" and path.suffix != ".safetensors":  # open_clip picks its reader by the file's name
        return "is a safetensors file, which open_clip reads only under a .safetensors name: rename it"
    if kind != "safetensors" and path.suffix == ".safetensors":
        return f"is a {'torch checkpoint' if kind == 'torch' else 'pickle'}, not safetensors: rename it (e.g. .pt)"
    if kind == "torch":
        return _torch_zip_problem(path)
    return _safetensors_problem(path) if kind == "safetensors" else None


# torch's errors for a checkpoint it cannot read: a damaged zip record, a legacy file cut short
_TORCH_READ_ERRORS = ("PytorchStreamReader", "unexpected EOF")


def _state_dict_mismatch(message: str) -> str:
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


# Where `autocast: true` autocasts: the winner's `torch.cuda.amp.autocast()` did nothing elsewhere. (The tests add
# "cpu", with CUDA's float32 policy for the loop's norm and softmax, to check the fp16 arithmetic on the CPU.)
AUTOCAST_DEVICE_TYPES = ("cuda",)


class Encoder:
    """A loaded model. Subclasses implement `_image_features` and `_text_features`.

    With `autocast`, both forwards run under CUDA autocast to fp16, as the winner's `torch.cuda.amp.autocast()`
    (on the CPU that context did nothing, and neither does this), and the features are normalised as the winner's
    `f /= f.norm(dim=-1, keepdim=True)` did there: the norm in float32 (autocast's), the quotient rounded back to
    the features' fp16. They are returned as float32, which holds fp16 values exactly; scoring rounds its logits as
    the winner's fp16 matmul did (`ModelHandle.logit_arithmetic`). Without autocast, features are normalised in
    float32 whatever the precision of the weights. Both encodes return their features on the model's device: a
    caller copies them to the host when it needs them (an encode once per flush, so that the GPU never waits for
    the host between batches).

    With `compile`, the image forward goes through torch.compile (`true`: on the CPU with inductor's weight freezing,
    which prepacks the GEMM weights and fuses the elementwise work between them; a mode name: that mode). Its shapes
    are static: a batch smaller than the largest so far (the last one) is padded to it, so that it runs the compiled
    graph instead of compiling another.

    How the model was loaded, for the run's records (all JSON-able):
    - `placement`: where each part of the model is, module name -> device ("cuda:N", "cpu" or "disk"; the name ""
      is the whole model). A transformers model's `hf_device_map`; `{"": "<device>"}` for a model on one device.
    - `weights_format`: what the weights were read from: "safetensors", "pytorch" (torch.save files, pickles,
      TorchScript), "numpy" (big_vision .npz), or None (random weights, or files that were not found afterwards).
    - `load_seconds`: the wall time of the load, set by `ModelHandle` (None for an Encoder made otherwise).
    `device` is where the inputs go: the model's device, or the first device of a model spread over several.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, tokenizer,
                 compile: bool | str = False, autocast: bool = False, placement: dict[str, str] | None = None,
                 weights_format: str | None = None):
        self.model, self.device, self.dtype, self.tokenizer = model.eval(), device, dtype, tokenizer
        self.placement = placement if placement is not None else {"": str(with_index(device))}
        self.weights_format, self.load_seconds = weights_format, None
        self.compiled, self.autocast = bool(compile), autocast and device.type in AUTOCAST_DEVICE_TYPES
        self._image_forward = self._compile(self._image_features, compile) if compile else self._image_features
        self._compiled_batch: int | None = None

    def _compile(self, forward, mode: bool | str):
        if isinstance(mode, str):
            return torch.compile(forward, dynamic=False, mode=mode)
        options = {"freezing": True} if self.device.type == "cpu" else {}
        return torch.compile(forward, dynamic=False, options=options)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        n = len(pixels)
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        if self.compiled:  # always a fresh buffer: an input made outside inference mode would recompile
            self._compiled_batch = max(self._compiled_batch or n, n)
            padded = pixels.new_zeros(self._compiled_batch, *pixels.shape[1:])
            padded[:n] = pixels
            pixels = padded
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
            x = self._image_forward(pixels)[:n]
        return self._normalised(x)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
            x = self._text_features(texts)
        return self._normalised(x)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """x / |x| as float32. Under autocast, as the winner's in-place `x /= x.norm(...)`: autocast computes that
        norm by `linalg_vector_norm(x, dtype=float32)`, and the float32 quotient is written back into x's dtype."""
        if not self.autocast:
            x = x.float()
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        return (x / norm).to(x.dtype).float()


def pools_class_token(visual: torch.nn.Module) -> bool:
    """Whether an open_clip image tower is a plain ViT whose feature is its class token after the last block."""
    from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer

    return (isinstance(visual, VisionTransformer) and visual.attn_pool is None and visual.pool_type == "tok"
            and not visual.output_tokens and isinstance(visual.transformer, Transformer)
            and visual.transformer.batch_first
            and all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                    for b in visual.transformer.resblocks))


def class_token_features(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip's ViT forward, with the last block run for the class token only.

    The feature is the class token's output, and in the last block nothing else depends on the other tokens' outputs:
    they are still needed as keys and values, but their query, attention output and MLP are not. Same arithmetic for
    the class token (the other rows of each GEMM are skipped), about 1/layers of the compute saved.
    """
    x = visual._embeds(pixels)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = block(x)
    h = last.ln_1(x)
    cls = x[:, :1] + last.ls_1(last.attn(h[:, :1], h, h, need_weights=False)[0])
    cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
    pooled = visual.ln_post(cls[:, 0])
    return pooled @ visual.proj if visual.proj is not None else pooled


class OpenClipEncoder(Encoder):
    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        # Not under the winner's autocast, whose numbers come first: on a GPU, how an fp16 GEMM rounds can depend on
        # its number of rows (the kernel chosen), and the class-token-only last block multiplies fewer.
        self.class_token_only = pools_class_token(model.visual) and not self.autocast

    def _image_features(self, pixels):
        if self.class_token_only:
            return class_token_features(self.model.visual, pixels)
        return self.model.encode_image(pixels)

    def _text_features(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class HfClipEncoder(Encoder):
    def _image_features(self, pixels):
        return self.model.get_image_features(pixel_values=pixels)

    def _text_features(self, texts):
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.model.get_text_features(**tokens)


class EvaClipEncoder(Encoder):
    """EVA-CLIP through its remote code: `encode_image` / `encode_text` on CLIPTokenizer ids padded as the winner."""

    def _image_features(self, pixels):
        return self.model.encode_image(pixels)

    def _text_features(self, texts):
        ids = self.tokenizer(texts, return_tensors="pt", padding=True).input_ids.to(self.device)
        return self.model.encode_text(ids)


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str):
    def add(cls):
        BACKENDS[name] = cls
        return cls

    return add


def _file_stamps(path: Path) -> dict:
    """Size and modification time of a weights file, or of every file in a model folder (cheaper than hashing
    gigabytes; a file rewritten in place changes its stamp)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


class Backend:
    """What a model entry means for one backend. `name` is the entry's key in the run config."""

    def __init__(self, name: str, entry: ModelEntry):
        self.name, self.entry = name, entry

    @property
    def random_weights(self) -> bool:
        return self.entry.pretrained == "random"

    def identity(self) -> dict:
        """What determines the features, for cache keys: backend, weights, precision."""
        e = self.entry
        ident = {"backend": e.backend, "arch": e.arch, "pretrained": e.pretrained, "revision": e.revision,
                 "precision": e.precision}
        if e.compile:  # compiled kernels round differently (fused elementwise ops): their own cache entries
            ident["compile"] = e.compile
        if self.random_weights:
            ident["seed"] = e.seed
        elif Path(e.pretrained.removeprefix("local-dir:")).exists():
            ident["files"] = _file_stamps(Path(e.pretrained.removeprefix("local-dir:")))
        return ident

    def preprocess(self, sharpness: float) -> Preprocess:
        size, mean, std = self._defaults()
        mean, std = (tuple(self.entry.mean), tuple(self.entry.std)) if self.entry.mean else (mean, std)
        return Preprocess(size=size, sharpness=sharpness, mean=mean, std=std)

    def _defaults(self) -> tuple[int, tuple, tuple]:
        raise NotImplementedError

    def check_weights(self) -> None:
        """Fail now, with the clear message, if the weights are neither on disk nor downloadable (loads nothing)."""
        raise NotImplementedError

    def load(self, device: torch.device) -> Encoder:
        raise NotImplementedError


@register_backend("open_clip")
class OpenClipBackend(Backend):
    @property
    def local_dir(self) -> Path | None:
        """The folder of `pretrained: local-dir:PATH`, whether it exists or not."""
        p = self.entry.pretrained
        return Path(p.removeprefix("local-dir:")) if p.startswith("local-dir:") else None

    @property
    def arch(self) -> str:
        arch = self.entry.arch
        if arch and arch.endswith(".json"):
            import open_clip

            if not Path(arch).is_file():
                raise FileNotFoundError(f"models.{self.name}.arch: no such architecture file {arch}")
            key = f"models.{self.name}.arch"
            _require_architecture(_read_json(Path(arch), key), key, arch)
            # only a valid file: open_clip rereads every file ever added on each add, so a bad one breaks all later
            open_clip.add_model_config(arch)
            return Path(arch).stem
        return arch

    @property
    def tag(self) -> str:
        return OPEN_CLIP_TAG_ALIASES.get(self.entry.pretrained, self.entry.pretrained)

    def identity(self) -> dict:
        return {**super().identity(), "pretrained": self.tag}

    def _schema_config(self) -> dict | None:
        if self.local_dir is None:
            return None
        path, key = self.local_dir / "open_clip_config.json", f"models.{self.name}.pretrained"
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {path} is missing")
        schema = _read_json(path, key)
        if not isinstance(schema, dict) or "model_cfg" not in schema:
            raise WeightsUnavailableError(f"{key}: {path} has no model_cfg (the architecture): give the "
                                          f"open_clip_config.json that open_clip saves with the weights")
        _require_architecture(schema["model_cfg"], key, f"the model_cfg of {path}")
        return schema

    def _defaults(self):
        import open_clip

        schema = self._schema_config()
        if schema is not None:
            model_cfg, pp = schema["model_cfg"], schema.get("preprocess_cfg", {})
        else:
            model_cfg = open_clip.get_model_config(self.arch)
            if model_cfg is None:
                raise ValueError(f"models.{self.name}.arch: open_clip has no architecture '{self.entry.arch}' "
                                 f"(see open_clip.list_models(), or give the path of a JSON config)")
            pp = open_clip.get_pretrained_cfg(self.arch, self.tag) if not self.random_weights else {}
        size = model_cfg["vision_cfg"].get("image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return size, tuple(pp.get("mean", OPENAI_MEAN)), tuple(pp.get("std", OPENAI_STD))

    def check_weights(self) -> None:
        self._defaults()
        self._weights_file(download=False)

    def _weights_file(self, download: bool = True) -> str | None:
        """The local file of `pretrained`'s weights, checked for what can be found without loading it (None for
        random; with download=False, None for a tag's weights that are not cached but can be downloaded)."""
        path = self._find_weights(download)
        if path is not None:
            key = f"models.{self.name}.pretrained"
            try:
                problem = _checkpoint_problem(Path(path))
            except OSError as e:
                raise WeightsUnavailableError(f"{key}: {describe_os_error(e)}") from e
            if problem:
                raise WeightsUnavailableError(f"{key}: {path} {problem}")
        return path

    def _find_weights(self, download: bool) -> str | None:
        import open_clip
        from huggingface_hub import try_to_load_from_cache
        from open_clip.factory import _find_checkpoint_in_dir

        p = self.entry.pretrained
        if self.local_dir is not None:
            if not self.local_dir.is_dir():
                return None  # _schema_config has said so, with the path
            weights = _find_checkpoint_in_dir(self.local_dir)  # the file open_clip will load, by its preferences
            if weights is None:
                raise WeightsUnavailableError(f"models.{self.name}.pretrained: {self.local_dir} has no weights (e.g. "
                                              f"open_clip_model.safetensors or open_clip_pytorch_model.bin)")
            return weights
        if self.random_weights:
            return None
        if p.startswith("hf-hub:"):
            raise WeightsUnavailableError(f"models.{self.name}.pretrained: use an open_clip tag, a file or local-dir:, "
                                          f"not '{p}'")
        if Path(p).is_dir():
            raise WeightsUnavailableError(f"models.{self.name}.pretrained: {p} is a folder, not a checkpoint file: "
                                          f"for an open_clip model folder write `pretrained: local-dir:{p}`, else "
                                          f"give the checkpoint file in it")
        if Path(p).is_file():
            return p
        cfg = open_clip.get_pretrained_cfg(self.arch, self.tag)
        if not cfg:
            looks_like_path = "/" in p or p.endswith((".pt", ".pth", ".bin", ".safetensors"))
            if looks_like_path:
                raise FileNotFoundError(f"models.{self.name}.pretrained: no such checkpoint file {p}")
            tags = open_clip.list_pretrained_tags_by_model(self.arch)
            raise ValueError(f"models.{self.name}.pretrained: '{p}' is neither a file nor an open_clip tag of "
                             f"{self.arch} (tags: {', '.join(tags) or 'none'}; or 'random', or local-dir:PATH)")
        alias = f" (the winner's name for '{self.tag}')" if self.tag != p else ""
        what = f"open_clip {self.arch} '{p}'{alias}"
        url_cache = Path(os.path.expanduser("~/.cache/clip"))
        candidates = []  # (where it would be cached, its host, the cached file if there)
        if cfg.get("hf_hub"):
            org, repo, filename = (cfg["hf_hub"].split("/") + [""])[:3]
            repo = f"{org}/{repo}"
            names = ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin")
            cached = [try_to_load_from_cache(repo, n) for n in names]
            candidates.append((f"hub repo {repo} in {hf_cache_dir()}", hub_host(),
                               next((c for c in cached if isinstance(c, str)), None)))
        if cfg.get("url"):
            cached = url_cache / os.path.basename(cfg["url"])
            candidates.append((f"{cfg['url']} in {url_cache}", urlparse(cfg["url"]).hostname,
                               str(cached) if cached.is_file() else None))
        for _, _, cached in candidates:
            if cached:
                return cached
        if not any(host_reachable(host) for _, host, _ in candidates):
            raise _offline_error(self.name, what, "; ".join(where for where, _, _ in candidates),
                                 "`pretrained: /path/to/open_clip_pytorch_model.bin` (or the original .pt with "
                                 "`weights_only: false`) or `pretrained: local-dir:/path/to/folder`")
        return open_clip.download_pretrained(cfg) if download else None

    def load(self, device):
        import open_clip

        weights = None
        if self.random_weights:
            with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's random state
                torch.manual_seed(self.entry.seed)
                model = open_clip.create_model(self.arch, pretrained=None, device=device)
            tokenizer = open_clip.get_tokenizer(self.arch)
        else:
            weights = self._weights_file()  # before the model is built: a large one takes minutes
            # open_clip finds a local-dir:'s file itself (the one _weights_file checked)
            model_name, pretrained = (self.arch, weights) if self.local_dir is None else (self.entry.pretrained, None)
            try:
                model = open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                               require_pretrained=True, weights_only=self.entry.weights_only)
            except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
                problem = self._loading_problem(e)
                if problem is None:
                    raise
                raise WeightsUnavailableError(f"models.{self.name}.pretrained: {weights} {problem}") from e
            tokenizer = open_clip.get_tokenizer(model_name)
        dtype = DTYPES[self.entry.precision]
        return OpenClipEncoder(model.to(device=device, dtype=dtype), device, dtype, tokenizer, self.entry.compile,
                               self.entry.autocast, weights_format=_open_clip_weights_format(weights))

    def _loading_problem(self, error: Exception) -> str | None:
        """What open_clip's failure to load the weights file says about the file, on one line (None: not the file)."""
        text = str(error)
        if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in text:
            return (f"is a pickled checkpoint that torch will not load with weights_only=True "
                    f"({_unpickling_reason(error)}). If you trust the file, set `weights_only: false` in "
                    f"models.{self.name}")
        if text.startswith("Error(s) in loading state_dict"):
            if self.local_dir is not None:
                arch, fix = "its model_cfg", f"the model_cfg of {self.local_dir / 'open_clip_config.json'}"
            else:
                arch, fix = self.entry.arch, f"models.{self.name}.arch"
            return f"does not fit architecture {arch}: {_state_dict_mismatch(text)}; check {fix}"
        if isinstance(error, pickle.UnpicklingError):
            return f"is not a readable checkpoint ({_unpickling_reason(error)}): {_NOT_A_CHECKPOINT}"
        if isinstance(error, EOFError) or text.startswith(_TORCH_READ_ERRORS):  # an EOFError may say nothing
            return f"is not a readable checkpoint ({_first_sentence(text) or type(error).__name__}): {_TRUNCATED}"
        return None


def _open_clip_weights_format(path: str | None) -> str | None:
    """What open_clip read the weights from, by the name it chose its reader by (the file was checked to match)."""
    if path is None:
        return None
    suffix = Path(path).suffix
    return "safetensors" if suffix == ".safetensors" else "numpy" if suffix in (".npz", ".npy") else "pytorch"


def _transformers_weights_format(folder: Path) -> str | None:
    """What from_pretrained reads in a model folder or hub snapshot: safetensors when there are any (the single file or
    the shards' index, by transformers' names), else torch.save files."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    for kind, names in (("safetensors", (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)),
                        ("pytorch", (WEIGHTS_NAME, WEIGHTS_INDEX_NAME))):
        if any((folder / name).is_file() for name in names):
            return kind
    return None


# what transformers 4.57 raises when a spread model's every module lands on "disk" (a device map {"": "disk"})
_ALL_ON_DISK = ("device disk is invalid", "device string: disk")


class TransformersBackend(Backend):
    """Shared by hf_clip and eva_clip: a local model directory or a hub id at a revision.

    The weights go straight from the files to their devices: from_pretrained always gets a device map (the entry's,
    or the run's device for the whole model), so that each tensor is made on its device instead of the model being
    built on the CPU and copied; safetensors files are memory-mapped, and a spread model's "disk" part is read from
    them when needed.
    """

    trust_remote_code = False

    @property
    def local_dir(self) -> Path | None:
        p = Path(self.entry.pretrained).expanduser()
        return p if p.is_dir() else None

    def _hub_kwargs(self) -> dict:
        return {"revision": self.entry.revision, "trust_remote_code": self.trust_remote_code}

    def _config_dict(self) -> dict:
        """config.json without loading code or weights: from the folder, the hub cache, or a download."""
        if self.local_dir is not None:
            path = self.local_dir / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"models.{self.name}.pretrained: {path} is missing (not a model folder?)")
            return _read_json(path, f"models.{self.name}.pretrained")
        if self.random_weights or not is_hub_id(self.entry.pretrained):
            raise FileNotFoundError(f"models.{self.name}.pretrained: no such model folder {self.entry.pretrained} "
                                    f"({self.entry.backend} needs a local folder or a hub id org/name)")
        return _read_json(Path(self._hub_file("config.json")), f"models.{self.name}.pretrained")

    def _hub_file(self, filename: str) -> str:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        repo, revision = self.entry.pretrained, self.entry.revision
        cached = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(cached, str):
            return cached
        if not host_reachable(hub_host()):
            raise _offline_error(self.name, f"{self.entry.backend} '{repo}' at revision {revision or 'main'}",
                                 hf_cache_dir(), "`pretrained: /path/to/model-folder` (the downloaded snapshot)")
        return hf_hub_download(repo, filename, revision=revision)

    def _defaults(self):
        cfg = self._config_dict()
        size = cfg.get("vision_config", {}).get("image_size", 224)
        mean, std = OPENAI_MEAN, OPENAI_STD
        if self.local_dir is not None and (self.local_dir / "preprocessor_config.json").is_file():
            pp = _read_json(self.local_dir / "preprocessor_config.json", f"models.{self.name}.pretrained")
            mean, std = tuple(pp.get("image_mean", mean)), tuple(pp.get("image_std", std))
        return size, mean, std

    def check_weights(self) -> None:
        self._defaults()

    def _source(self) -> str:
        if self.local_dir is not None:
            return str(self.local_dir)
        self._hub_file("config.json")  # fails at once, with the offline message, when it cannot be had
        return self.entry.pretrained

    def _from_pretrained(self, cls, **kwargs):
        source = self._source()
        try:
            return cls.from_pretrained(source, **self._hub_kwargs(), **kwargs)
        except OSError as e:
            raise WeightsUnavailableError(f"models.{self.name}: cannot load {source}: {e}") from e

    def _weights_format(self) -> str | None:
        """What the weights are in the model folder, or in the hub snapshot as far as it is downloaded."""
        folder = self.local_dir if self.local_dir is not None else Path(self._hub_file("config.json")).parent
        return _transformers_weights_format(folder)

    def _placement_kwargs(self, device: torch.device) -> dict:
        """from_pretrained's arguments that place the weights: always a device map, so that they go straight to
        their devices; safetensors only, where there are safetensors; max_memory with GPU indices as ints."""
        e = self.entry
        if e.device_map in DEVICE_MAP_STRATEGIES:
            device_map = e.device_map
        else:
            if e.device_map is not None and e.device_map.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"models.{self.name}.device_map is '{e.device_map}' but CUDA is not available here")
            device_map = {"": str(with_index(torch.device(e.device_map) if e.device_map else device))}
        kwargs = {"device_map": device_map, "low_cpu_mem_usage": True}
        if self._weights_format() == "safetensors":
            kwargs["use_safetensors"] = True  # never falls back to a pytorch_model.bin beside them
        if e.max_memory:  # a new dict each load: accelerate rewrites the sizes in place
            kwargs["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in e.max_memory.items()}
        return kwargs

    def _load_model(self, cls, device: torch.device) -> dict:
        """The model on its devices, and the Encoder arguments that say where and from what."""
        kwargs = self._placement_kwargs(device)
        try:
            model = self._from_pretrained(cls, dtype=DTYPES[self.entry.precision], **kwargs)
        except Exception as e:
            if not isinstance(kwargs["device_map"], str):
                raise
            key, text = f"models.{self.name}.{'max_memory' if self.entry.max_memory else 'device_map'}", str(e)
            if "offload_folder" in text:
                raise WeightsUnavailableError(
                    f"{key}: the model does not fit the memory of the devices, and transformers puts the rest on "
                    f"disk only from safetensors weights ({self._weights_format() or 'none'} here): give the devices "
                    f"more memory, or save the weights as safetensors") from e
            if any(part in text for part in _ALL_ON_DISK):
                raise WeightsUnavailableError(f"{key}: no part of the model fits the memory of the devices, so all of "
                                              f"it would be on disk: give the devices more memory") from e
            raise
        fallback = kwargs["device_map"] if isinstance(kwargs["device_map"], dict) else {"": str(with_index(device))}
        placement = placement_record(getattr(model, "hf_device_map", None) or fallback)  # accelerate always sets it
        return {"model": model, "device": input_device(placement), "dtype": DTYPES[self.entry.precision],
                "compile": self.entry.compile, "autocast": self.entry.autocast, "placement": placement,
                "weights_format": self._weights_format()}  # after the load: a hub download is now in the snapshot


@register_backend("hf_clip")
class HfClipBackend(TransformersBackend):
    def load(self, device):
        from transformers import AutoTokenizer, CLIPModel

        if self.random_weights:
            raise ValueError(f"models.{self.name}: hf_clip has no architecture to initialise randomly; "
                             "save a CLIPModel with save_pretrained and give its folder")
        loaded = self._load_model(CLIPModel, device)
        return HfClipEncoder(tokenizer=self._from_pretrained(AutoTokenizer), **loaded)


@register_backend("eva_clip")
class EvaClipBackend(TransformersBackend):
    trust_remote_code = True

    def load(self, device):
        from transformers import AutoModel, CLIPTokenizer

        loaded = self._load_model(AutoModel, device)
        return EvaClipEncoder(tokenizer=self._from_pretrained(CLIPTokenizer), **loaded)


class ModelHandle:
    """One model entry of a run: identity and preprocessing at once, the model itself only when first needed."""

    def __init__(self, name: str, entry: ModelEntry, device: str | torch.device = "auto"):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.precision_setting = entry.precision  # `entry.precision` is what it means here (`auto` resolved)
        self.name, self.entry = name, dataclasses.replace(entry, precision=resolve_precision(
            entry.precision, weights_device(entry, self.device)))
        self.backend = BACKENDS[entry.backend](name, self.entry)
        self._encoder: Encoder | None = None

    @property
    def identity(self) -> dict:
        """What determines the image features (cache keys). Under the winner's autocast on a GPU (`exact_batches`)
        also the batch size: an fp16 GEMM's rounding there can depend on its number of rows."""
        ident = self.backend.identity()
        if self.exact_batches:  # elsewhere autocast does nothing: the features are those without it
            ident.update(autocast="fp16-normalised", batch_size=self.entry.batch_size)
        return ident

    @property
    def text_identity(self) -> dict:
        """What determines the text features: `identity` less `compile` (only the image forward is compiled) and the
        batch size (the prompts are encoded together: see `exact_batches`)."""
        return {k: v for k, v in self.identity.items() if k not in ("compile", "batch_size")}

    @property
    def exact_batches(self) -> bool:
        """Whether this model computes the winner's arithmetic under CUDA autocast, where a feature's last bits can
        depend on what else is in its batch: then images are cached per batch size, and prompts per prompt list
        (encoded in one batch, as the winner did)."""
        return self.entry.autocast and self.device.type in AUTOCAST_DEVICE_TYPES

    @property
    def logit_arithmetic(self) -> LogitArithmetic:
        """How this model's logits are computed: as the winner's loop did under autocast (fp16, on this GPU) where
        its features are that loop's, else in float32 on the CPU."""
        return LogitArithmetic.fp16_on(with_index(self.device)) if self.exact_batches else FLOAT32

    @property
    def views(self) -> list[Preprocess]:
        """One preprocessing per sharpening factor of the entry (several: test-time views, averaged)."""
        return [self.backend.preprocess(f) for f in self.entry.sharpness_factors]

    def preprocess(self, sharpness: float) -> Preprocess:
        """This model's preprocessing at another sharpening factor (for sharpness ablations)."""
        return self.backend.preprocess(sharpness)

    @property
    def random_weights(self) -> bool:
        return self.backend.random_weights

    def check_weights(self) -> None:
        self.backend.check_weights()

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            start = time.perf_counter()
            encoder = self.backend.load(self.device)
            encoder.load_seconds = round(time.perf_counter() - start, 3)
            self._encoder = encoder
        return self._encoder

    def close(self) -> None:
        """Free the model (and its GPU memory) before the next one is loaded."""
        self._encoder = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
