"""The transformers backends: `hf_clip` (a CLIPModel) and `eva_clip` (EVA-CLIP through its remote code), from a
local folder or a hub id at a revision."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ...config import DEVICE_MAP_STRATEGIES, ConfigError, ModelEntry, is_hub_id
from ...research.steps import OPENAI_MEAN, OPENAI_STD
from .. import shards
from ..checkpoints import WeightsUnavailableError, hf_cache_dir, host_reachable, hub_host, offline_error, read_json
from ..encoder import Encoder
from . import Backend, register_backend

if TYPE_CHECKING:
    import torch

    from ..converted import ConvertedCopy
    from ..placement import Placement

log = logging.getLogger(__name__)


class HfClipEncoder(Encoder):
    def _image_features(self, pixels):
        return self.model.get_image_features(pixel_values=pixels)

    def _text_features(self, texts):
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.model.get_text_features(**tokens)


class EvaClipEncoder(Encoder):
    """EVA-CLIP through its remote code: `encode_image` / `encode_text` on CLIPTokenizer ids padded as the winner
    (with `truncate`, cut to `truncate` tokens, the end token kept, as open_clip's tokenizer cuts)."""

    truncate: int | None = None

    def _image_features(self, pixels):
        return self.model.encode_image(pixels)

    def _text_features(self, texts):
        cut = {"truncation": True, "max_length": self.truncate} if self.truncate else {}
        ids = self.tokenizer(texts, return_tensors="pt", padding=True, **cut).input_ids.to(self.device)
        return self.model.encode_text(ids)

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
    places_weights = True

    @classmethod
    def check_entry(cls, entry: ModelEntry, where: str) -> None:
        super().check_entry(entry, where)
        if entry.arch is not None:
            raise ConfigError(f"{where}.arch is for backend open_clip only; {entry.backend} reads it from the model "
                              "folder")

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
            return read_json(path, f"models.{self.name}.pretrained")
        if self.random_weights or not is_hub_id(self.entry.pretrained):
            raise FileNotFoundError(f"models.{self.name}.pretrained: no such model folder {self.entry.pretrained} "
                                    f"({self.entry.backend} needs a local folder or a hub id org/name)")
        return read_json(Path(self._hub_file("config.json")), f"models.{self.name}.pretrained")

    def _hub_file(self, filename: str) -> str:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        repo, revision = self.entry.pretrained, self.entry.revision
        cached = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(cached, str):
            return cached
        if not host_reachable(hub_host()):
            raise offline_error(self.name, f"{self.entry.backend} '{repo}' at revision {revision or 'main'}",
                                 hf_cache_dir(), "`pretrained: /path/to/model-folder` (the downloaded snapshot)")
        return hf_hub_download(repo, filename, revision=revision)

    def _defaults(self):
        cfg = self._config_dict()
        size = cfg.get("vision_config", {}).get("image_size", 224)
        mean, std = OPENAI_MEAN, OPENAI_STD
        if self.local_dir is not None and (self.local_dir / "preprocessor_config.json").is_file():
            pp = read_json(self.local_dir / "preprocessor_config.json", f"models.{self.name}.pretrained")
            mean, std = tuple(pp.get("image_mean", mean)), tuple(pp.get("image_std", std))
        return size, mean, std

    def check_weights(self) -> None:
        self._defaults()
        self.check_shards()

    def check_shards(self) -> None:
        """Every weight shard that the index names is in the model folder, or in the revision (the hub's listing of
        it, else its cached snapshot when offline): else one error naming the missing shards and the revisions to
        use, before a byte of the weights is downloaded (`shards`)."""
        if self.local_dir is not None:
            files, what = shards.folder_files(self.local_dir), str(self.local_dir)
            key = f"models.{self.name}.pretrained"
        else:
            repo, revision = self.entry.pretrained, self.entry.revision
            snapshot = Path(self._hub_file("config.json")).parent  # fails at once, offline without a snapshot
            online = host_reachable(hub_host())
            what, key = f"'{repo}' at revision {revision or 'main'}", f"models.{self.name}.revision"
            files = shards.hub_revision_files(repo, revision, key) if online else shards.folder_files(snapshot)
        index = shards.weights_index_name(files)
        if index is None:
            return
        path = self.local_dir / index if self.local_dir is not None else Path(self._hub_file(index))
        named = shards.indexed_shards(path, key)
        missing = [shard for shard in named if shard not in files]
        if not missing:
            return
        if self.local_dir is not None:
            advice = "copy them into the folder (or download the model again)"
        else:
            found = (shards.hub_complete_revisions if online else shards.cached_complete_revisions)(repo, named)
            advice = shards.revisions_advice(found or list(shards.KNOWN_COMPLETE_REVISIONS.get(repo, ())))
        raise shards.missing_shards_error(key, what, index, missing, named, advice)

    tokenizer_class = "AutoTokenizer"
    _tokenizer = None

    def tokenizer(self):
        """The tokenizer from the model's files, read once (the prompt check and the encoder both use it)."""
        import transformers

        if self._tokenizer is None:
            self._tokenizer = self._from_pretrained(getattr(transformers, self.tokenizer_class))
        return self._tokenizer

    def context_length(self) -> int:
        """The text tower's position table (config.json), else what the tokenizer says."""
        text = self._config_dict().get("text_config") or {}
        return text.get("max_position_embeddings") or self.tokenizer().model_max_length

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer()(texts).input_ids]

    def _source(self) -> str:
        if self.local_dir is not None:
            return str(self.local_dir)
        self._hub_file("config.json")  # fails at once, with the offline message, when it cannot be had
        return self.entry.pretrained

    def _from_pretrained(self, cls, source: str | None = None, **kwargs):
        source = source or self._source()
        try:
            return cls.from_pretrained(source, **self._hub_kwargs(), **kwargs)
        except OSError as e:
            raise WeightsUnavailableError(f"models.{self.name}: cannot load {source}: {e}") from e

    def _weights_format(self) -> str | None:
        """What the weights are in the model folder, or in the hub snapshot as far as it is downloaded."""
        folder = self.local_dir if self.local_dir is not None else Path(self._hub_file("config.json")).parent
        return _transformers_weights_format(folder)

    def _converted_copy(self) -> ConvertedCopy | None:
        """The safetensors copy of pickled weights in the workbench's cache (`converted`), where one applies: pickled
        weights (as far as they are downloaded), a handle with a cache, an entry that does not skip it."""
        from ..converted import ConvertedCopy, copy_folder_name
        from ..device import DTYPES

        if self.weights_cache is None or not self.entry.convert_weights:
            return None
        hub = self.local_dir is None
        source = Path(self._hub_file("config.json")).parent if hub else self.local_dir
        if _transformers_weights_format(source) != "pytorch":
            return None
        name = copy_folder_name(self.entry.pretrained if hub else str(source), self.entry.revision if hub else None,
                                self.entry.precision)
        what = f"'{self.entry.pretrained}' at revision {self.entry.revision or 'main'}" if hub else str(source)
        return ConvertedCopy(self.weights_cache / name, source, DTYPES[self.entry.precision], what)

    def _placement_kwargs(self, device: torch.device, weights_format: str | None) -> dict:
        """from_pretrained's arguments that place the weights: always a device map, so that they go straight to
        their devices (a spreading strategy's map built here, every layer whole, and printed); safetensors only,
        where there are safetensors; max_memory with GPU indices as ints."""
        import torch

        from ..device import with_index

        e = self.entry
        max_memory = {int(k) if str(k).isdigit() else k: v for k, v in e.max_memory.items()} if e.max_memory else None
        if e.device_map in DEVICE_MAP_STRATEGIES:
            placement = self.placement(max_memory)
            log.info("models.%s: %s", self.name, placement.describe())
            device_map = placement.device_map
        else:
            if e.device_map is not None and e.device_map.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"models.{self.name}.device_map is '{e.device_map}' but CUDA is not available here")
            device_map = {"": str(with_index(torch.device(e.device_map) if e.device_map else device))}
        kwargs = {"device_map": device_map, "low_cpu_mem_usage": True}
        if weights_format == "safetensors":
            kwargs["use_safetensors"] = True  # never falls back to a pytorch_model.bin beside them
        if max_memory:  # a new dict each load: accelerate rewrites the sizes in place
            kwargs["max_memory"] = max_memory
        return kwargs

    def placement(self, max_memory: dict | None) -> Placement:
        """Where the entry's device_map strategy puts each part of the model, every layer whole (`placement`),
        planned on the model's modules on the meta device (no weights read, no memory taken)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        from ..device import DTYPES
        from ..placement import plan_placement

        config = AutoConfig.from_pretrained(self._source(), **self._hub_kwargs())
        with init_empty_weights():
            model = self._model_class(config)(config)
        return plan_placement(model, self.entry.device_map, max_memory, DTYPES[self.entry.precision])

    def _model_class(self, config):
        raise NotImplementedError

    def _load_model(self, cls, device: torch.device) -> dict:
        """The model on its devices, and the Encoder arguments that say where and from what."""
        from ..device import DTYPES, input_device, placement_record, with_index

        self.check_shards()
        copy = self._converted_copy()
        from_copy = copy is not None and copy.ready
        weights_format = "safetensors" if from_copy else self._weights_format()
        kwargs = self._placement_kwargs(device, weights_format)
        try:
            model = self._from_pretrained(cls, str(copy.folder) if from_copy else None,
                                          dtype=DTYPES[self.entry.precision], **kwargs)
        except Exception as e:
            if self.entry.device_map not in DEVICE_MAP_STRATEGIES:
                raise
            key, text = f"models.{self.name}.{'max_memory' if self.entry.max_memory else 'device_map'}", str(e)
            if "offload_folder" in text:
                raise WeightsUnavailableError(
                    f"{key}: the model does not fit the memory of the devices, and transformers puts the rest on "
                    f"disk only from safetensors weights ({weights_format or 'none'} here): give the devices "
                    f"more memory, or save the weights as safetensors") from e
            if any(part in text for part in _ALL_ON_DISK):
                raise WeightsUnavailableError(f"{key}: no part of the model fits the memory of the devices, so all of "
                                              f"it would be on disk: give the devices more memory") from e
            raise
        if from_copy:
            log.info("models.%s: read the %s copy %s of the weights of %s", self.name, self.entry.precision,
                     copy.folder, copy.what)
        else:
            weights_format = self._weights_format()  # after the load: a hub download is now in the snapshot
            copy = self._converted_copy()
            if copy is not None:  # for the next loads; without it they read the shards again, as this one did
                try:
                    copy.write()
                except (OSError, WeightsUnavailableError) as e:
                    log.warning("models.%s: no converted copy of the weights was kept (%s); the next load reads "
                                "the shards again (convert_weights: false says not to try)", self.name, e)
        fallback = kwargs["device_map"] if isinstance(kwargs["device_map"], dict) else {"": str(with_index(device))}
        placement = placement_record(getattr(model, "hf_device_map", None) or fallback)  # accelerate always sets it
        return {"model": model, "device": input_device(placement), "dtype": DTYPES[self.entry.precision],
                "compile": self.entry.compile, "autocast": self.entry.autocast, "placement": placement,
                "weights_format": weights_format}


@register_backend("hf_clip")
class HfClipBackend(TransformersBackend):
    def _model_class(self, config):
        from transformers import CLIPModel

        return CLIPModel

    def load(self, device):
        from transformers import CLIPModel

        if self.random_weights:
            raise ValueError(f"models.{self.name}: hf_clip has no architecture to initialise randomly; "
                             "save a CLIPModel with save_pretrained and give its folder")
        loaded = self._load_model(CLIPModel, device)
        return HfClipEncoder(tokenizer=self.tokenizer(), **loaded)


@register_backend("eva_clip")
class EvaClipBackend(TransformersBackend):
    trust_remote_code = True
    tokenizer_class = "CLIPTokenizer"  # the model card's

    @classmethod
    def check_entry(cls, entry: ModelEntry, where: str) -> None:
        super().check_entry(entry, where)
        if is_hub_id(entry.pretrained) and not entry.revision:
            raise ConfigError(f"{where}.revision is required: eva_clip runs remote code, so the hub id "
                              f"'{entry.pretrained}' must be pinned to a commit")

    def _model_class(self, config):
        """The remote code's class that AutoModel loads (config.json's auto_map), at the entry's revision."""
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        auto_map = getattr(config, "auto_map", None) or {}
        if "AutoModel" not in auto_map:
            raise WeightsUnavailableError(f"models.{self.name}.pretrained: the config.json of {self._source()} names "
                                          "no remote code (auto_map.AutoModel): eva_clip needs EVA-CLIP's own files")
        return get_class_from_dynamic_module(auto_map["AutoModel"], self._source(), revision=self.entry.revision)

    def load(self, device):
        from transformers import AutoModel

        loaded = self._load_model(AutoModel, device)
        encoder = EvaClipEncoder(tokenizer=self.tokenizer(), **loaded)
        encoder.truncate = self.context_length() if self.entry.truncate else None
        return encoder


