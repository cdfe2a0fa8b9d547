"""The open_clip backend: an open_clip architecture (a name, or a JSON file) with a tag's, a file's or a folder's
weights, or random ones."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from ...config import ConfigError, ModelEntry
from ...infra.errors import describe_os_error
from ...research.steps import OPENAI_MEAN, OPENAI_STD
from ..checkpoints import (
    NOT_A_CHECKPOINT,
    TORCH_READ_ERRORS,
    TRUNCATED,
    WeightsUnavailableError,
    checkpoint_problem,
    first_sentence,
    hf_cache_dir,
    host_reachable,
    hub_host,
    offline_error,
    read_json,
    require_architecture,
    state_dict_mismatch,
    unpickling_reason,
)
from ..encoder import Encoder
from . import Backend, register_backend

if TYPE_CHECKING:
    import torch

# The winner's fork called upstream open_clip's `metaclip_fullcc` weights `metaclip_2_5b`.
OPEN_CLIP_TAG_ALIASES = {"metaclip_2_5b": "metaclip_fullcc"}


@contextmanager
def warnings_silenced():
    """No log record of WARNING or below while inside (open_clip warns through the root logger)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@contextmanager
def root_logger_kept():
    """The root logger's handlers as they were: open_clip logs through `logging.info`, which first gives a root logger
    without handlers one to stderr (basicConfig), and every later record of the workbench's would then also be
    printed there, on a notebook's error stream."""
    handlers = list(logging.root.handlers)
    try:
        yield
    finally:
        logging.root.handlers[:] = handlers


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


@register_backend("open_clip")
class OpenClipBackend(Backend):
    @classmethod
    def check_entry(cls, entry: ModelEntry, where: str) -> None:
        super().check_entry(entry, where)
        if entry.arch is None and not entry.pretrained.startswith(("local-dir:", "hf-hub:")):
            raise ConfigError(f"{where}.arch is required for backend open_clip (e.g. ViT-bigG-14-quickgelu)")

    @property
    def local_dir(self) -> Path | None:
        """The folder of `pretrained: local-dir:PATH`, whether it exists or not."""
        p = self.entry.pretrained
        return Path(p.removeprefix("local-dir:")) if p.startswith("local-dir:") else None

    @property
    def arch(self) -> str:
        """The architecture's name in open_clip's registry (an architecture file is added to it first)."""
        arch = self.entry.arch
        if arch and arch.endswith(".json"):
            # only a valid file: open_clip rereads every file ever added on each add, so a bad one would break all
            # later ones
            return _added_architecture(arch, self._architecture_file())
        return arch

    def _architecture_file(self) -> dict:
        arch, key = self.entry.arch, f"models.{self.name}.arch"
        if not Path(arch).is_file():
            raise FileNotFoundError(f"{key}: no such architecture file {arch}")
        return require_architecture(read_json(Path(arch), key), key, arch)

    def _architecture(self) -> dict:
        """The architecture's config. Read from its JSON file, or from the one open_clip ships for a named
        architecture, without importing open_clip (seconds, which a run whose embeddings are cached never needs);
        a name open_clip only knows at run time (added by code) is asked of open_clip itself."""
        arch = self.entry.arch
        if arch and arch.endswith(".json"):
            return self._architecture_file()
        shipped = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "model_configs"
        if (shipped / f"{arch}.json").is_file():
            return json.loads((shipped / f"{arch}.json").read_text())
        import open_clip

        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise ValueError(f"models.{self.name}.arch: open_clip has no architecture '{arch}' (see "
                             f"open_clip.list_models(), or give the path of a JSON config)")
        return model_cfg

    def _pretrained_config(self) -> dict:
        """open_clip's record of a tag's weights (their normalisation); none for random weights or a file."""
        if self.random_weights or Path(self.entry.pretrained).is_file():
            return {}
        import open_clip

        return open_clip.get_pretrained_cfg(self.arch, self.tag)

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
        schema = read_json(path, key)
        if not isinstance(schema, dict) or "model_cfg" not in schema:
            raise WeightsUnavailableError(f"{key}: {path} has no model_cfg (the architecture): give the "
                                          f"open_clip_config.json that open_clip saves with the weights")
        require_architecture(schema["model_cfg"], key, f"the model_cfg of {path}")
        return schema

    def _defaults(self):
        schema = self._schema_config()
        if schema is not None:
            model_cfg, pp = schema["model_cfg"], schema.get("preprocess_cfg", {})
        else:
            model_cfg, pp = self._architecture(), self._pretrained_config()
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
                problem = checkpoint_problem(Path(path))
            except OSError as e:
                raise WeightsUnavailableError(f"{key}: {describe_os_error(e)}") from e
            if problem:
                raise WeightsUnavailableError(f"{key}: {path} {problem}")
        return path

    def _find_weights(self, download: bool) -> str | None:
        p = self.entry.pretrained
        if self.local_dir is not None:
            # private, and no public function says which file open_clip will load from a folder (pinned in
            # tests/test_library_contracts.py)
            from open_clip.factory import _find_checkpoint_in_dir

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
        import open_clip
        from huggingface_hub import try_to_load_from_cache

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
            raise offline_error(self.name, what, "; ".join(where for where, _, _ in candidates),
                                 "`pretrained: /path/to/open_clip_pytorch_model.bin` (or the original .pt with "
                                 "`weights_only: false`) or `pretrained: local-dir:/path/to/folder`")
        return open_clip.download_pretrained(cfg) if download else None

    @root_logger_kept()  # open_clip logs through the root logger
    def load(self, device):
        import open_clip
        import torch

        from ..device import DTYPES

        weights = None
        if self.random_weights:
            # seeded, without touching the caller's random state; open_clip's warning that no weights were loaded is
            # what was asked for (the run marks random weights in its outputs), and in a notebook it looks like an error
            with torch.random.fork_rng(devices=[]), warnings_silenced():
                torch.manual_seed(self.entry.seed)
                model = open_clip.create_model(self.arch, pretrained=None, device=device)
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
        dtype = DTYPES[self.entry.precision]
        return OpenClipEncoder(model.to(device=device, dtype=dtype), device, dtype, self.tokenizer(),
                               self.entry.compile, self.entry.autocast,
                               weights_format=_open_clip_weights_format(weights))

    def tokenizer(self):
        if self.local_dir is not None:
            import open_clip

            with root_logger_kept():
                return open_clip.get_tokenizer(self.entry.pretrained)
        if not self.entry.arch.endswith(".json"):
            return _tokenizer(self.arch, None)
        # an architecture file is read each time (it may have changed), once here: the tokenizer of what it holds now
        architecture = self._architecture_file()
        name = _added_architecture(self.entry.arch, architecture)
        return _tokenizer(name, json.dumps(architecture, sort_keys=True))

    def context_length(self) -> int:
        return self.tokenizer().context_length

    def token_counts(self, texts: list[str]) -> list[int]:
        tokenizer = self.tokenizer()
        if hasattr(tokenizer, "encode"):  # CLIP's BPE (SimpleTokenizer): its ids, then start and end of text
            return [len(tokenizer.encode(text)) + 2 for text in texts]
        clean = getattr(tokenizer, "clean_fn", str)  # a transformers tokenizer inside, given the cleaned text
        return [len(tokenizer.tokenizer(clean(text)).input_ids) for text in texts]

    def _loading_problem(self, error: Exception) -> str | None:
        """What open_clip's failure to load the weights file says about the file, on one line (None: not the file)."""
        text = str(error)
        if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in text:
            return (f"is a pickled checkpoint that torch will not load with weights_only=True "
                    f"({unpickling_reason(error)}). If you trust the file, set `weights_only: false` in "
                    f"models.{self.name}")
        if text.startswith("Error(s) in loading state_dict"):
            if self.local_dir is not None:
                arch, fix = "its model_cfg", f"the model_cfg of {self.local_dir / 'open_clip_config.json'}"
            else:
                arch, fix = self.entry.arch, f"models.{self.name}.arch"
            return f"does not fit architecture {arch}: {state_dict_mismatch(text)}; check {fix}"
        if isinstance(error, pickle.UnpicklingError):
            return f"is not a readable checkpoint ({unpickling_reason(error)}): {NOT_A_CHECKPOINT}"
        if isinstance(error, EOFError) or text.startswith(TORCH_READ_ERRORS):  # an EOFError may say nothing
            return f"is not a readable checkpoint ({first_sentence(text) or type(error).__name__}): {TRUNCATED}"
        return None


def _added_architecture(path: str, architecture: dict) -> str:
    """An architecture file in open_clip's registry, by the name it is registered by (its stem), added unless the
    registry holds that name with this content (`architecture`) already: each add rescans every file added before."""
    import open_clip

    name = Path(path).stem
    if open_clip.get_model_config(name) != architecture:
        open_clip.add_model_config(path)
    return name


@functools.lru_cache(maxsize=16)
def _tokenizer(arch: str, architecture: str | None):
    """open_clip's tokenizer of an architecture, built once (per content for an architecture file: `architecture`
    is its JSON; None for one open_clip ships): the prompt check and the model both need it, and it reads CLIP's
    BPE vocabulary (0.15 s)."""
    import open_clip

    with root_logger_kept():
        return open_clip.get_tokenizer(arch)


def _open_clip_weights_format(path: str | None) -> str | None:
    """What open_clip read the weights from, by the name it chose its reader by (the file was checked to match)."""
    if path is None:
        return None
    suffix = Path(path).suffix
    return "safetensors" if suffix == ".safetensors" else "numpy" if suffix in (".npz", ".npy") else "pytorch"


