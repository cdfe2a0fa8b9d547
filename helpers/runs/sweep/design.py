"""A sweep's design: the base config and the grid of settings over it, as points (one run config each).

The grid comes from the command line (`--grid KEY=V1,V2,...`, the product of the lists, or with `--zip` the lists
paired) or from a sweep file (YAML):

    config: configs/demo.yaml        # the base run config
    set: [data.limit=32]             # overrides of the base, as --set
    grid:                            # the product of these lists
      models.metaclip.sharpness: [2.3, 1.0]
      prompts: [winner, {set: winner, exclude: [descriptions]}]
    zip:                             # these lists paired (equal lengths): one more axis of the product
      ensemble.weights.metaclip: [0.4, 0.6]
      ensemble.weights.eva: [0.6, 0.4]
    points:                          # and these points as they are
      - {scoring: mean_logit}

A key is a dotted config key, as `--set` takes it; `models` takes lists of model names (which models run: the others
are left out and the ensemble's weights renormalised over those kept). Every point is checked before anything runs:
an unknown key, a value of the wrong type or an empty list is one error that names it. The base config itself is
always a point (`base`), the one every other is compared with.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from ...config import ConfigError, RunConfig, apply_override, checked_config, json_digest, read_yaml, yaml_problem
from ...infra.files import read_yaml_or_none, slug

SWEEP_FILE_KEYS = ("config", "set", "grid", "zip", "points")
MODEL_SELECTION = "models"  # the grid key whose values are lists of model names
_NAMED_BY_MODEL = ("models", "ensemble.weights")  # mappings keyed by the config's model names


class SweepError(ConfigError):
    """A sweep that cannot run as given; the message names the grid key, the file or the folder."""


@dataclass
class Axis:
    """One axis of the product: its settings (each a mapping key -> value), and where it was given (for errors)."""

    keys: list[str]
    settings: list[dict]
    source: str


@dataclass
class Point:
    id: str  # its folder's name under points/: its settings, short, and the digest of its config
    settings: dict  # key -> value, as the grid gives them ({} for the base)
    config: RunConfig  # resolved


@dataclass
class Design:
    config_path: Path
    overrides: list[str]
    axes: list[Axis]
    points: list[dict]  # explicit points (from a sweep file)
    points_source: str = "points"  # where they were given, for errors

    @property
    def keys(self) -> list[str]:
        """Every key the design varies, in the order given."""
        keys = [k for axis in self.axes for k in axis.keys] + [k for p in self.points for k in p]
        return list(dict.fromkeys(keys))


def parse_grid(text: str, source: str = "--grid") -> tuple[str, list]:
    """`KEY=V1,V2,...` -> (KEY, [V1, V2, ...]); the values are read as a YAML list, so a value may be a list
    (`[a, b]`) or a mapping (`{set: winner}`)."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SweepError(f"{source} {text}: expected KEY=V1,V2,... (e.g. models.metaclip.sharpness=2.0,2.3)")
    try:
        parsed = yaml.safe_load(f"[{values}]")
    except (yaml.YAMLError, ValueError) as e:
        raise SweepError(f"{source} {key}: the values are not a YAML list ({yaml_problem(e)}); quote text that "
                         "holds commas or brackets") from None
    return key, _checked_values(key, parsed, source)


def _checked_values(key: str, values, source: str) -> list:
    if not isinstance(values, list):
        raise SweepError(f"{source} {key}: expected a list of values, got {values!r}")
    if not values:
        raise SweepError(f"{source} {key}: no values (give at least one)")
    seen = []
    for v in values:
        if v in seen:
            raise SweepError(f"{source} {key}: the value {v!r} is listed twice")
        seen.append(v)
    return values


def product_axes(grids: list[tuple[str, list]], zipped: bool, source: str) -> list[Axis]:
    """The command line's grids: one axis each, or with `zipped` one axis of the lists paired."""
    keys = [k for k, _ in grids]
    repeated = [k for k in keys if keys.count(k) > 1]
    if repeated:
        raise SweepError(f"{source} {repeated[0]}: given twice; list its values once")
    if not zipped:
        return [Axis([k], [{k: v} for v in values], source) for k, values in grids]
    if not grids:
        return []
    lengths = {k: len(v) for k, v in grids}
    if len(set(lengths.values())) > 1:
        raise SweepError(f"--zip pairs lists of equal length: {', '.join(f'{k} has {n}' for k, n in lengths.items())}")
    return [Axis(keys, [dict(zip(keys, row)) for row in zip(*(v for _, v in grids))], f"{source} (--zip)")]


def read_sweep_file(path: Path) -> tuple[Path, list[str], list[Axis], list[dict]]:
    """A sweep file's base config, overrides, axes and explicit points."""
    raw = read_yaml(path, "sweep")
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with keys {', '.join(SWEEP_FILE_KEYS)}")
    for key in raw:
        if key not in SWEEP_FILE_KEYS:
            near = difflib.get_close_matches(str(key), SWEEP_FILE_KEYS, n=1)
            raise SweepError(f"{path}: unknown key '{key}'" + (f"; did you mean '{near[0]}'?" if near else
                                                                  f"; valid keys: {', '.join(SWEEP_FILE_KEYS)}"))
    if not isinstance(raw.get("config"), str):
        raise SweepError(f"{path}: 'config' must name the base run config (a YAML file)")
    overrides = raw.get("set") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SweepError(f"{path}: 'set' must be a list of KEY=VALUE overrides")
    axes = []
    for section in ("grid", "zip"):
        table = raw.get(section) or {}
        if not isinstance(table, dict):
            raise SweepError(f"{path}: '{section}' must map config keys to lists of values")
        grids = [(str(k), _checked_values(str(k), v, f"{path}: {section}")) for k, v in table.items()]
        axes += product_axes(grids, section == "zip", f"{path}: {section}")
    points = raw.get("points") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
        raise SweepError(f"{path}: 'points' must be a list of mappings (config key -> value)")
    return Path(raw["config"]), overrides, axes, points


def is_sweep_file(path: Path) -> bool:
    """A sweep file names its base config; a run config has models and data."""
    raw = read_yaml_or_none(path, dict)
    return raw is not None and "config" in raw and "models" not in raw


def make_design(path: str | Path, overrides: list[str], grids: list[str], zipped: bool) -> Design:
    """The design from the command line: CONFIG is a run config or a sweep file; --grid adds axes to the file's."""
    path = Path(path)
    axes, points, points_source = [], [], "points"
    if path.is_file() and is_sweep_file(path):
        points_source = f"{path}: points"
        path, file_overrides, axes, points = read_sweep_file(path)
        overrides = [*file_overrides, *overrides]
    axes += product_axes([parse_grid(g) for g in grids], zipped, "--grid")
    design = Design(path, list(overrides), axes, points, points_source)
    known = [k for axis in axes for k in axis.keys]
    for key in design.keys:
        if known.count(key) > 1:
            raise SweepError(f"grid key {key}: given by two axes; give its values once")
    return design


# --- the points, each checked


def _strip_optional(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [o for o in typing.get_args(hint) if o is not type(None)]
    return [hint]


def check_key(raw: dict, key: str, source: str) -> None:
    """`key` names a setting of the run config (a field of the dataclasses, a model the base config has)."""
    if key == MODEL_SELECTION:
        return
    parts = key.split(".")
    hints = [RunConfig]
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        options = [h for hint in hints for h in _strip_optional(hint)]
        classes = [h for h in options if dataclasses.is_dataclass(h)]
        mappings = [h for h in options if typing.get_origin(h) is dict]
        if classes:
            fields = {f.name for c in classes for f in dataclasses.fields(c)}
            if part not in fields:
                near = difflib.get_close_matches(part, fields, n=1)
                place = f" in {where}" if where else ""
                advice = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(fields))}"
                raise SweepError(f"{source} {key}: unknown key '{part}'{place}{advice}")
            hints = [typing.get_type_hints(c)[part] for c in classes if part in {f.name for f in dataclasses.fields(c)}]
        elif mappings:
            if where in _NAMED_BY_MODEL and part not in (raw.get("models") or {}):
                names = ", ".join(raw.get("models") or {})
                raise SweepError(f"{source} {key}: no model '{part}' in the base config (models: {names})")
            hints = [typing.get_args(h)[1] for h in mappings]
        else:
            raise SweepError(f"{source} {key}: {where} is a single value, it has no key '{part}'")


def select_models(raw: dict, names, source: str) -> None:
    """Keep only the models `names` (and their ensemble weights, renormalised to sum to 1)."""
    models = raw.get("models") or {}
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SweepError(f"{source} {MODEL_SELECTION}: each value is a list of model names, got {names!r}")
    unknown = [n for n in names if n not in models]
    if unknown:
        raise SweepError(f"{source} {MODEL_SELECTION}: no model '{unknown[0]}' in the base config (models: "
                         f"{', '.join(models)})")
    raw["models"] = {n: models[n] for n in names}
    weights = (raw.get("ensemble") or {}).get("weights")
    if isinstance(weights, dict):
        kept = {n: w for n, w in weights.items() if n in names}
        total = sum(w for w in kept.values() if isinstance(w, int | float))
        if total <= 0:
            raise SweepError(f"{source} {MODEL_SELECTION}: the models {names} have no ensemble weight in the base "
                             "config (all 0): give ensemble.weights in the grid too")
        raw["ensemble"]["weights"] = {n: w / total for n, w in kept.items()}


def apply_settings(raw: dict, settings: dict, sources: dict) -> dict:
    changed = copy.deepcopy(raw)
    if MODEL_SELECTION in settings:  # first: a point may also set the kept models' keys
        select_models(changed, settings[MODEL_SELECTION], sources[MODEL_SELECTION])
    for key, value in settings.items():
        if key != MODEL_SELECTION:
            try:
                apply_override(changed, f"{key}={shown(value)}")
            except ConfigError as e:
                raise SweepError(f"{sources[key]} {key}={value!r}: {str(e).split(': ', 1)[-1]}") from None
    return changed


def point_id(settings: dict, digest: str) -> str:
    """`<key>=<value>_...-<digest>`, short keys (the last part, with the model's name where there is one)."""
    if not settings:
        return f"base-{digest[:8]}"
    parts = []
    for key, value in settings.items():
        names = key.split(".")
        short = ".".join(names[1:]) if names[0] == "models" and len(names) > 1 else names[-1]
        parts.append(f"{short}={slug(shown(value), keep='.', default='none')}")  # `-` and `_` part the id
    return f"{'_'.join(parts)[:64]}-{digest[:8]}"


def base_raw(design: Design) -> dict:
    from ...config import load_config

    load_config(design.config_path, design.overrides)  # the base itself must be a valid config: its own error
    raw = read_yaml(design.config_path, "run config")
    for item in design.overrides:
        apply_override(raw, item)
    return raw


def design_points(design: Design) -> list[Point]:
    """The base, then every point of the product (then the explicit points), each checked; the same config twice is
    one point (the first)."""
    raw = base_raw(design)
    source_of = {k: axis.source for axis in design.axes for k in axis.keys}
    source_of.update({k: design.points_source for p in design.points for k in p})
    for key in design.keys:
        check_key(raw, key, source_of[key])
    combos = [{}]
    if design.axes:
        combos += [{k: v for part in row for k, v in part.items()}
                   for row in itertools.product(*(axis.settings for axis in design.axes))]
    combos += design.points
    points, seen = [], set()
    for settings in combos:
        config = _checked_point(raw, settings, source_of)
        digest = json_digest(config.to_dict())
        if digest in seen:
            continue
        seen.add(digest)
        points.append(Point(point_id(settings, digest), settings, config))
    return points


def _checked_point(raw: dict, settings: dict, source_of: dict) -> RunConfig:
    try:
        return checked_config(apply_settings(raw, settings, source_of))
    except SweepError:
        raise
    except ConfigError as e:
        problem = str(e)
        # blame the one setting that fails on its own, else the combination
        for key, value in settings.items():
            try:
                checked_config(apply_settings(raw, {key: value}, source_of))
            except ConfigError:
                raise SweepError(f"{source_of[key]} {key}={shown(value)}: {problem}") from None
        point = ", ".join(f"{k}={shown(v)}" for k, v in settings.items())
        raise SweepError(f"the point {point}: {problem}") from None


def shown(value) -> str:
    """A setting's value on one line, as YAML reads it back: 2.3, null, [a, b], {set: winner}."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False).strip()


def setting_of(config: RunConfig, key: str):
    """The value `key` has in a point's resolved config (what the report lists per point)."""
    if key == MODEL_SELECTION:
        return list(config.models)
    node = config.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
