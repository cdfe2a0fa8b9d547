"""Run configs: one YAML file describes a run (SPEC 2).

A config is loaded into the dataclasses below; every key is checked against them, so a typo is an error that
names the key and suggests the nearest valid one. Relative paths are resolved against the working directory.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .infra.errors import UserError, one_line

# the backends (helpers.models.backends.BACKENDS), scoring modes (helpers.research.scoring.SCORERS), preprocessing
# steps (helpers.research.steps.STEPS) and transductive methods (helpers.research.transductive.METHODS) are
# registries: their names are checked against them
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def json_digest(obj) -> str:
    """A short sha256 of an object's canonical JSON (sorted keys): a config's hash, a cache entry's name."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(UserError, ValueError):
    """A run config that cannot be used; the message names the file and the key."""


class _BadNumber(ConfigError):
    """A number that no field takes (NaN, infinity): the value has a fitting type, so no other form is tried."""


RANDOM_WEIGHTS = "random"  # `pretrained: random`: weights initialised from `seed`, for tests and demos


@dataclass
class DevBuild:
    """How to build the dev folder on first use, when it is not there (`helpers.research.devset.build_dev_set`):
    which labeled photos to degrade, and how (`make dev-data` calibrates sigma and quality against the test set)."""

    source: str  # a labeled ImageFolder of photos (e.g. ../shared/data/intel_test)
    sigma: float  # Gaussian blur, px at 224 px
    quality: int  # JPEG quality
    class_map: dict[str, str] | None = None  # source folder name -> challenge class name
    limit_per_class: int | None = None  # only the first N photos of each class


@dataclass
class DevData:
    path: str
    class_map: dict[str, str] | None = None  # dev folder name -> challenge class name
    limit: int | None = None  # at most N images, taken round-robin over the classes
    build: DevBuild | None = None  # how to build `path` when it is missing


@dataclass
class Data:
    test: str | None = None  # <dir>/<one sub-folder>/<id>.jpg + <dir>/classes.json
    limit: int | None = None  # the first N test images in natural order
    dev: DevData | None = None
    classes: list[str] | None = None  # default: the test folder's classes.json


@dataclass
class PromptSpec:
    set: str = "winner"  # a built-in prompt set or the path of a prompt-set YAML file
    groups: list[str] | None = None  # keep only these groups, in this order
    exclude: list[str] | None = None  # drop these groups


# a preprocessing step in a config: its name alone, or {name: {parameter: value, ...}}
StepSpec = str | dict[str, dict[str, bool | int | float | str] | None]


@dataclass
class ModelEntry:
    backend: str
    pretrained: str  # open_clip tag, checkpoint file, local-dir:, local directory, hub id, or "random"
    arch: str | None = None  # open_clip architecture name or the path of an architecture JSON file
    revision: str | None = None  # hub revision; required for eva_clip hub ids
    sharpness: float | list[float] = 1.0  # adjust_sharpness factor (1.0: unchanged); a list averages the views
    # the preprocessing as registered steps (helpers.research.steps), after the model's resize, crop and RGB unless
    # a step sets the size; a list of such lists gives test-time views. Default: the `sharpness` shorthand's steps
    preprocess: list[StepSpec] | list[list[StepSpec]] | None = None
    # the weights' dtype; auto: fp16 on a GPU, on a CPU bf16 where it computes bf16 natively, else fp32
    precision: str = "auto"
    batch_size: int = 32
    # torch.compile the image forward: faster after a one-time compile (CPU: ~15-30 s). true, or one of torch.compile's
    # modes: reduce-overhead and max-autotune also replay the forward as a CUDA graph on a GPU
    compile: bool | str = False
    autocast: bool = False  # CUDA autocast to fp16 around the forwards, as the winner (a no-op on the CPU, as there)
    seed: int = 0  # initialises the weights when pretrained is "random"
    weights_only: bool = True  # False allows pickled checkpoints (the original G14_fullcc2.5b.pt); trusted files only
    # hf_clip, eva_clip: where the weights are loaded, straight from the files: "auto", "balanced", "balanced_low_0"
    # or "sequential" spread the model over the GPUs (then cpu, then disk), or one device ("cuda:1", "cpu")
    device_map: str | None = None
    # with a spreading device_map: the most each device may take, e.g. {0: 70GiB, 1: 70GiB, cpu: 100GiB}; keys are
    # GPU indices, cpu or disk (stored as strings), sizes as accelerate writes them (GiB, MiB, KiB, GB, MB, KB)
    max_memory: dict[str | int, str] | None = None
    # hf_clip, eva_clip with pickled weights (.bin shards): after the first load, a safetensors copy in `precision` in
    # <cache_dir>/weights, read by every later load (memory-mapped, nothing cast); false: read the pickles each time
    convert_weights: bool = True
    # a prompt longer than the model's context (77 tokens for CLIP's): an error before anything is encoded (false),
    # or cut to the context keeping its end token (true: what open_clip's tokenizer does silently)
    truncate: bool = False
    mean: list[float] | None = None  # normalisation; default: the model's own
    std: list[float] | None = None

    @property
    def sharpness_factors(self) -> list[float]:
        """The sharpening factors: one, or the test-time views of a list."""
        return self.sharpness if isinstance(self.sharpness, list) else [self.sharpness]

    @property
    def random_weights(self) -> bool:
        """Randomly initialised weights (`pretrained: random`, from `seed`): every label they give means nothing."""
        return self.pretrained == RANDOM_WEIGHTS


def random_weight_models(models: object) -> list[str]:
    """The models of a recorded config's `models` mapping (a run folder's config.yaml, of any age) whose weights were
    random; what is not a mapping of models has none."""
    if not isinstance(models, dict):
        return []
    return [name for name, m in models.items() if isinstance(m, dict) and m.get("pretrained") == RANDOM_WEIGHTS]


@dataclass
class Ensemble:
    weights: dict[str, float] | None = None  # default: equal weights over all models
    drop_below: float | None = None  # per-prompt probabilities <= this are set to 0 after the weighted sum


@dataclass
class Analysis:
    """What the analysis notebooks of a run compute (the dev-set ablations need data.dev)."""

    inspect_images: int = 8  # test images in the gallery
    sharpness_grid: list[float | list[float]] = field(default_factory=lambda: [1.0, 1.5, 2.0, 2.3, 2.6, 3.0])
    weight_grid: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.45, 0.5, 0.54, 0.55, 0.6, 0.7])
    drop_thresholds: list[float] = field(default_factory=lambda: [0.0005, 0.001, 0.002, 0.005, 0.01])
    # restorations beside the sharpening factors (01's gallery, 02's ablation): each entry a step or a list of steps
    # after the model's resize, crop and RGB (helpers/research/steps/restore.py; sigma: auto is the run's blur)
    restoration_grid: list[StepSpec | list[StepSpec]] = field(default_factory=lambda: [
        {"wiener": {"sigma": "auto"}}, {"richardson_lucy": {"sigma": "auto"}},
        {"unsharp_mask": {"radius": 6.0, "amount": 3.0}}])


@dataclass
class Transductive:
    """The post-scoring stage (helpers.research.transductive; README, "Transductive inference"): a method that takes
    the whole set's probabilities and embeddings at once. Off unless a config names a method."""

    method: str  # a registered method: em_prior, ot_assign, label_propagation, transclip
    applies_to: str = "ensemble"  # ensemble: the ensemble's probabilities; each_model: each model's, then combined
    params: dict[str, bool | int | float | str | list[float]] = field(default_factory=dict)  # default: the paper's


TRANSDUCTIVE_SCOPES = ("ensemble", "each_model")


@dataclass
class RunConfig:
    name: str
    data: Data
    models: dict[str, ModelEntry]
    prompts: str | PromptSpec | list[PromptSpec] = "winner"
    scoring: str = "joint_softmax_mean"
    logit_scale: float = 100.0
    ensemble: Ensemble = field(default_factory=Ensemble)
    device: str = "auto"  # auto: CUDA when present, else CPU
    cache_dir: str = "outputs/cache"
    num_workers: int | None = None  # image decoding processes; default: none on the CPU, up to 8 beside a GPU
    on_bad_image: str = "error"  # error: stop before encoding, listing every unreadable image; skip: leave them out
    fallback_label: str | None = None  # with skip: the class given to skipped test images (default: the majority)
    reference: str | None = None  # a submission to agree with: a built-in name (winner-116) or the path of a CSV
    analysis: Analysis = field(default_factory=Analysis)
    transductive: Transductive | None = None  # off (null): every image labeled alone, as the winner did

    def random_weight_models(self) -> list[str]:
        """The models whose weights are random (`pretrained: random`), in the config's order."""
        return [name for name, entry in self.models.items() if entry.random_weights]

    def to_dict(self) -> dict:
        raw = dataclasses.asdict(self)
        if raw["transductive"] is None:  # off: the same dict, so the same hash (run folders, sweep points) as before
            del raw["transductive"]
        return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load a run config; `overrides` are "dotted.key=value" strings (the value is read as YAML). An error names the
    override(s) it comes from (`--set KEY=VALUE`), else the file."""
    path = Path(path)
    raw = read_yaml(path, "run config")
    if not isinstance(raw, dict):
        found = "nothing (the file is empty)" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(f"{path}: the top level must be a mapping of keys (name, data, models, ...), got {found}")

    def attempt(items) -> tuple[RunConfig | None, str | None]:
        changed = copy.deepcopy(raw)
        for item in items:
            apply_override(changed, item)
        try:
            return checked_config(changed), None
        except ConfigError as e:
            return None, str(e)

    config, problem = attempt(overrides)
    if problem is None:
        return config
    culprits = [item for item in overrides if attempt([o for o in overrides if o is not item])[1] != problem]
    raise ConfigError(f"{' '.join(f'--set {item}' for item in culprits) or path}: {problem}")


def read_yaml(path: Path, what: str):
    """Parse the YAML file a user named; every way it cannot be read is a one-line ConfigError naming it."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a {what} YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # editors on Windows may start the file with a byte-order mark
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                          f"give a {what} YAML file, saved as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a scalar YAML cannot build, e.g. the date 2024-13-01
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None


def yaml_problem(e: Exception) -> str:
    """A YAML error on one line: the problem and its place (PyYAML's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    if getattr(e, "problem", None) and mark is not None:
        return f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return one_line(e)


def apply_override(raw: dict, item: str) -> None:
    """Set one "dotted.key=value" in a parsed config, creating mappings on the way (papermill-style parameters)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.setdefault(part, {}), dict):
            raise ConfigError(f"override '{item}': '{part}' is not a mapping")
        node = node[part]
    try:
        node[last] = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({yaml_problem(e)}); "
                          "quote it if it is text") from None


def config_from_dict(raw: object, source: str = "config") -> RunConfig:
    try:
        return checked_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def checked_config(raw: object) -> RunConfig:
    """A RunConfig from parsed YAML, every key and value checked, relative paths resolved; ConfigError says what and
    where (not which file: the caller knows)."""
    config = _build(RunConfig, raw, "")
    _check(config)
    _resolve_paths(config)
    return config


def _build(hint, value, where: str):
    """Turn parsed YAML into `hint` (a dataclass, container or scalar type), naming `where` on error."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _build(option, value, where)
            except _BadNumber:
                raise  # the type fits; what the other forms say about it would only hide the real problem
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where or 'config'}: none of the accepted forms fits: "
                          + "; ".join(errors))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where or 'config'} must be a mapping, got {value!r}")
        fields = {f.name: f for f in dataclasses.fields(hint)}
        hints = typing.get_type_hints(hint)
        for key in value:
            if key not in fields:
                near = difflib.get_close_matches(str(key), fields, n=1)
                place = f" in {where}" if where else ""
                hint_text = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
                raise ConfigError(f"unknown key '{key}'{place}{hint_text}")
        kwargs = {}
        for name, f in fields.items():
            key_where = f"{where}.{name}" if where else name
            if name in value:
                kwargs[name] = _build(hints[name], value[name], key_where)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key '{key_where}'")
        return hint(**kwargs)
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {_build(key_type, k, f"{where} key"): _build(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_build(item_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(value, where)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def _finite(value: int | float, where: str) -> float:
    """`value` as a float. NaN and infinity (YAML .nan, .inf) stop here: NaN passes every range check after."""
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise _BadNumber(f"{where} must be a finite number, got {value}")
    return number


def _one_of(value, options, where):
    if value not in options:
        near = difflib.get_close_matches(str(value), options, n=1)
        extra = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"{where} is '{value}', expected one of {', '.join(options)}{extra}")


def is_hub_id(pretrained: str) -> bool:
    """A hub id looks like 'org/name' and is not a path that exists here."""
    if pretrained.startswith(("/", ".", "~", "local-dir:")) or Path(pretrained).expanduser().exists():
        return False
    return pretrained.count("/") == 1


ON_BAD_IMAGE = ("error", "skip")
INT64_MAX = 2**63 - 1  # image counts end up in numpy and torch indices


def _check(config: RunConfig) -> None:
    from .research.scoring import SCORERS

    _one_of(config.scoring, SCORERS.names(), "scoring")
    _one_of(config.on_bad_image, ON_BAD_IMAGE, "on_bad_image")
    if config.fallback_label is not None and config.data.classes and config.fallback_label not in config.data.classes:
        _one_of(config.fallback_label, config.data.classes, "fallback_label")
    if not 0 < config.logit_scale <= 1000:
        raise ConfigError(f"logit_scale must be in (0, 1000] (CLIP's own is 100), got {config.logit_scale}")
    if config.num_workers is not None:
        _in_range(config.num_workers, "num_workers", 0, 256, " (or absent: the device's default)")
    if not config.models:
        raise ConfigError("models must name at least one model")
    _check_data(config.data)
    for name, m in config.models.items():
        _check_model(m, f"models.{name}")
    _check_ensemble(config)
    _check_analysis(config.analysis)
    if config.transductive is not None:
        transductive_method(config.transductive, config.data.classes)


def _in_range(value, where: str, low, high, note: str = "") -> None:
    if not low <= value <= high:
        span = f"at least {low}" if high == INT64_MAX else f"between {low} and {high}"
        raise ConfigError(f"{where} must be {span}{note}, got {value}")


def _check_data(data: Data) -> None:
    if data.test is None and data.dev is None:
        raise ConfigError("data needs 'test' or 'dev'")
    if data.test is None and not data.classes:
        raise ConfigError("data.classes is required without data.test (whose classes.json names the classes)")
    if data.classes is not None:
        _check_classes(data.classes)
    dev_limit = data.dev.limit if data.dev else None
    build = data.dev.build if data.dev else None
    per_class = build.limit_per_class if build else None
    for key, limit in (("data.limit", data.limit), ("data.dev.limit", dev_limit),
                       ("data.dev.build.limit_per_class", per_class)):
        if limit is not None:
            _in_range(limit, key, 1, INT64_MAX)
    if build is not None:
        _in_range(build.sigma, "data.dev.build.sigma", 0, 100)
        _in_range(build.quality, "data.dev.build.quality", 0, 100)


def _check_classes(classes: list[str]) -> None:
    """Class names label predictions and fill the prompt templates: each must be a distinct, non-empty name."""
    for i, name in enumerate(classes):
        if not name.strip():
            raise ConfigError(f"data.classes[{i}] is an empty name; give every class a name")
    repeated = [(name, n) for name, n in collections.Counter(classes).items() if n > 1]
    if repeated:
        name, n = repeated[0]
        raise ConfigError(f"data.classes lists '{name}' {n} times; list each class once")


def _check_factors(value: float | list[float], where: str) -> None:
    """A sharpening factor, or a list of distinct ones (test-time views)."""
    factors = value if isinstance(value, list) else [value]
    if not factors or len(set(factors)) != len(factors):
        raise ConfigError(f"{where} must be a factor or a non-empty list of distinct factors, got {value}")
    for i, f in enumerate(factors):
        _in_range(f, f"{where}[{i}]" if isinstance(value, list) else where, 0, 100)


def model_views(m: ModelEntry, where: str = "model") -> list[list]:
    """The steps of each view of a model entry (several: test-time views, averaged), as the config gives them:
    `preprocess`, else the `sharpness` shorthand. The backend puts the model's resize, crop and RGB before them
    (`helpers.research.steps.view`)."""
    from .research.steps import sharpened

    if m.preprocess is None:
        return [sharpened(f) for f in m.sharpness_factors]
    nested = bool(m.preprocess) and isinstance(m.preprocess[0], list)
    specs = m.preprocess if nested else [m.preprocess]
    views = [[build_step(spec, f"{where}.preprocess" + (f"[{v}]" if nested else "") + f"[{i}]")
              for i, spec in enumerate(steps)] for v, steps in enumerate(specs)]
    for v, steps in enumerate(views):
        if any(step.sets_size for step in steps) and not any(step.name == "rgb" for step in steps):
            raise ConfigError(f"{where}.preprocess{f'[{v}]' if nested else ''} sets the size itself, so it lists "
                              "every step: add rgb (the model takes three channels)")
    if len({repr(steps) for steps in views}) != len(views):
        raise ConfigError(f"{where}.preprocess lists the same view twice")
    return views


def restoration_views(analysis: Analysis) -> list[list]:
    """The steps of each entry of `analysis.restoration_grid` (a step, or a list of steps), checked."""
    grid = analysis.restoration_grid
    views = [[build_step(spec, f"analysis.restoration_grid[{e}]" + (f"[{i}]" if isinstance(entry, list) else ""))
              for i, spec in enumerate(entry if isinstance(entry, list) else [entry])] for e, entry in enumerate(grid)]
    if len({repr(steps) for steps in views}) != len(views):
        raise ConfigError("analysis.restoration_grid lists the same entry twice")
    return views


def _step_specs(config: RunConfig, analysis: bool) -> list[tuple[list, int, str]]:
    """Every preprocessing step the config names (the models' `preprocess`; with `analysis`,
    `analysis.restoration_grid` too), as the list that holds its spec, its index there, and where it is."""
    found = []
    for name, m in config.models.items():
        nested = bool(m.preprocess) and isinstance(m.preprocess[0], list)
        for v, steps in enumerate((m.preprocess if nested else [m.preprocess]) if m.preprocess else []):
            where = f"models.{name}.preprocess" + (f"[{v}]" if nested else "")
            found += [(steps, i, f"{where}[{i}]") for i in range(len(steps))]
    grid = config.analysis.restoration_grid if analysis else []
    for e, entry in enumerate(grid):
        if isinstance(entry, list):
            found += [(entry, i, f"analysis.restoration_grid[{e}][{i}]") for i in range(len(entry))]
        else:
            found.append((grid, e, f"analysis.restoration_grid[{e}]"))
    return found


def steps_wanting_blur(config: RunConfig, analysis: bool) -> list[str]:
    """Where the config's steps say `auto` for the run's estimated blur (`sigma: auto`): the models' (with
    `analysis`, the analyses' too)."""
    return [where for holder, i, where in _step_specs(config, analysis) if build_step(holder[i], where).wants_blur]


def fill_in_blur(config: RunConfig, sigma_px: float, analysis: bool) -> list[str]:
    """Write the run's estimated blur into every step of the config whose parameter says `auto` (the models'; with
    `analysis`, the analyses' too), in place, so that the config a run records, and its notebooks read, has the
    number; returns where it did."""
    filled = []
    for holder, i, where in _step_specs(config, analysis):
        step = build_step(holder[i], where)
        if not step.wants_blur:
            continue
        resolved = step.with_blur(sigma_px)
        name, params = (holder[i], None) if isinstance(holder[i], str) else next(iter(holder[i].items()))
        changed = {f.name: getattr(resolved, f.name) for f in dataclasses.fields(resolved)
                   if getattr(resolved, f.name) != getattr(step, f.name)}
        holder[i] = {name: {**(params or {}), **changed}}
        filled.append(where)
    return filled


def build_step(spec, where: str):
    """A registered preprocessing step from its config form (`name` or `{name: {parameter: value}}`), checked."""
    from .research.steps import STEPS

    if isinstance(spec, dict) and len(spec) != 1:
        raise ConfigError(f"{where} must name one step ({{name: {{parameter: value}}}}), got {spec}")
    name, params = (spec, None) if isinstance(spec, str) else next(iter(spec.items()))
    if name not in STEPS:
        raise ConfigError(f"{where}: {STEPS.unknown(name)}")
    step = _build(STEPS[name], params or {}, f"{where}.{name}")

    def fail(message: str):
        raise ConfigError(message)

    step.check(f"{where}.{name}", fail)
    return step


def _check_model(m: ModelEntry, where: str) -> None:
    from .models.backends import BACKENDS

    _one_of(m.backend, BACKENDS.names(), f"{where}.backend")
    _one_of(m.precision, PRECISIONS, f"{where}.precision")
    if isinstance(m.compile, str):
        _one_of(m.compile, COMPILE_MODES, f"{where}.compile")
    _check_factors(m.sharpness, f"{where}.sharpness")
    if m.preprocess is not None and m.sharpness != 1.0:
        raise ConfigError(f"{where}: give sharpness or preprocess, not both (write the sharpening as a step: "
                          f"{{sharpen: {{factor: {m.sharpness}}}}})")
    model_views(m, where)
    _in_range(m.batch_size, f"{where}.batch_size", 1, 65536)
    _in_range(m.seed, f"{where}.seed", 0, 2**32 - 1)
    BACKENDS[m.backend].check_entry(m, where)
    if (m.mean is None) != (m.std is None) or any(len(v) != 3 for v in (m.mean or [0] * 3, m.std or [0] * 3)):
        raise ConfigError(f"{where}: mean and std go together, three numbers each")
    if m.std is not None and any(s <= 0 for s in m.std):
        raise ConfigError(f"{where}.std must be three numbers > 0 (pixels are divided by them), got {m.std}")
    _check_placement(m, where)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate spreads the model
MEMORY_UNITS = ("GiB", "MiB", "KiB", "GB", "MB", "KB")  # the sizes accelerate's max_memory reads


def _is_device(name: str) -> bool:
    kind, _, index = name.partition(":")
    return name == "cpu" or (kind == "cuda" and (name == "cuda" or (index.isascii() and index.isdigit())))


def _is_memory_size(size: str) -> bool:
    unit = next((u for u in MEMORY_UNITS if size.endswith(u)), None)
    number = size[:-len(unit)] if unit else ""
    return number.isascii() and number.replace(".", "", 1).isdigit()


def _check_placement(m: ModelEntry, where: str) -> None:
    """device_map and max_memory, for the backends that take them (whose from_pretrained places the weights)."""
    if m.device_map is not None and m.device_map not in DEVICE_MAP_STRATEGIES and not _is_device(m.device_map):
        near = difflib.get_close_matches(m.device_map, DEVICE_MAP_STRATEGIES, n=1)
        raise ConfigError(f"{where}.device_map is '{m.device_map}', expected one of {', '.join(DEVICE_MAP_STRATEGIES)} "
                          f"or a device (cpu, cuda, cuda:N)" + (f"; did you mean '{near[0]}'?" if near else ""))
    if m.max_memory is None:
        return
    if m.device_map not in DEVICE_MAP_STRATEGIES:
        found = "no device_map" if m.device_map is None else f"device_map '{m.device_map}' (one device)"
        raise ConfigError(f"{where}.max_memory caps what each device takes when the model is spread: it needs "
                          f"device_map {', '.join(DEVICE_MAP_STRATEGIES)}, not {found}")
    memory = {}
    for key, size in m.max_memory.items():
        device = str(int(key)) if str(key).isascii() and str(key).isdigit() else str(key)  # 00 is GPU 0
        if not ((device.isascii() and device.isdigit()) or device in ("cpu", "disk")):
            raise ConfigError(f"{where}.max_memory has key '{key}', expected GPU indices (0, 1, ...), cpu or disk")
        if device in memory:
            raise ConfigError(f"{where}.max_memory names device {device} twice")
        if not _is_memory_size(size):
            raise ConfigError(f"{where}.max_memory.{key} is '{size}', expected a size like 70GiB or 500MB "
                              f"(units {', '.join(MEMORY_UNITS)})")
        memory[device] = size
    if not memory:
        raise ConfigError(f"{where}.max_memory is empty: give the devices' sizes, or leave it out")
    m.max_memory = memory


def _check_ensemble(config: RunConfig) -> None:
    weights = config.ensemble.weights
    if weights is not None:
        for name in weights:
            if name not in config.models:
                raise ConfigError(f"ensemble.weights names '{name}', not one of the models "
                                  f"({', '.join(config.models)})")
        for name in config.models:
            if name not in weights:
                raise ConfigError(f"ensemble.weights has no weight for model '{name}' (give 0 to leave it out)")
        if any(w < 0 for w in weights.values()) or abs(sum(weights.values()) - 1) > 1e-6:
            raise ConfigError(f"ensemble.weights must be >= 0 and sum to 1, got {weights}")
    drop = config.ensemble.drop_below
    if drop is not None:
        if not 0 <= drop < 1:
            raise ConfigError(f"ensemble.drop_below must be in [0, 1), got {drop}")
        from .research.scoring import SCORERS

        if not SCORERS[config.scoring].per_prompt_probabilities:
            modes = [name for name, scorer in SCORERS.items() if scorer.per_prompt_probabilities]
            raise ConfigError("ensemble.drop_below acts on per-prompt probabilities, so it needs a scoring mode "
                              f"that gives them ({', '.join(modes)}), not {config.scoring}")


def transductive_method(spec: Transductive, classes: list[str] | None = None):
    """The configured transductive method, its parameters checked (and, with the classes known, the number of
    classes its distributions give); ConfigError naming the key otherwise."""
    from .research.transductive import METHODS

    if spec.method not in METHODS:
        raise ConfigError(f"transductive.method: {METHODS.unknown(spec.method)}")
    _one_of(spec.applies_to, TRANSDUCTIVE_SCOPES, "transductive.applies_to")
    method = _build(METHODS[spec.method], spec.params, "transductive.params")

    def fail(message: str):
        raise ConfigError(message)

    method.check("transductive.params", fail)
    if classes is not None:
        method.check_classes(len(classes), "transductive.params", fail)
    return method


def _check_analysis(analysis: Analysis) -> None:
    _in_range(analysis.inspect_images, "analysis.inspect_images", 0, 10000)
    restoration_views(analysis)
    for i, factors in enumerate(analysis.sharpness_grid):
        _check_factors(factors, f"analysis.sharpness_grid[{i}]")
    for i, w in enumerate(analysis.weight_grid):
        _in_range(w, f"analysis.weight_grid[{i}]", 0, 1)
    for i, t in enumerate(analysis.drop_thresholds):
        if not 0 <= t < 1:
            raise ConfigError(f"analysis.drop_thresholds[{i}] must be in [0, 1), got {t}")


def _resolve(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _resolve_paths(config: RunConfig) -> None:
    if config.data.test is not None:
        config.data.test = _resolve(config.data.test)
    if config.data.dev is not None:
        config.data.dev.path = _resolve(config.data.dev.path)
        if config.data.dev.build is not None:
            config.data.dev.build.source = _resolve(config.data.dev.build.source)
    config.cache_dir = _resolve(config.cache_dir)
    if config.reference is not None and config.reference.endswith(".csv"):
        config.reference = _resolve(config.reference)
    specs = config.prompts if isinstance(config.prompts, list) else [config.prompts]
    for spec in specs:
        if isinstance(spec, PromptSpec) and spec.set.endswith((".yaml", ".yml")):
            spec.set = _resolve(spec.set)
    if isinstance(config.prompts, str) and config.prompts.endswith((".yaml", ".yml")):
        config.prompts = _resolve(config.prompts)
    for m in config.models.values():
        if m.arch is not None and m.arch.endswith(".json"):
            m.arch = _resolve(m.arch)
        if m.pretrained.startswith("local-dir:"):
            m.pretrained = "local-dir:" + _resolve(m.pretrained.removeprefix("local-dir:"))
        elif not m.random_weights and Path(m.pretrained).expanduser().exists():
            m.pretrained = _resolve(m.pretrained)
