"""Prompt sets as data: YAML files of named groups, composed by group, laid out class-major.

A group is either a list of templates, where "{c}" stands for the class name (and "{{" for a literal brace), or a
mapping from class name to literal prompts, used as written. Classes may end up with different numbers of
prompts; scoring pools each class's own prompts.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError, PromptSpec, read_yaml

PROMPT_SET_DIR = Path(__file__).parent / "prompt_sets"


@dataclass(frozen=True)
class Prompt:
    class_index: int
    group: str
    text: str


@dataclass(frozen=True)
class PromptSet:
    classes: tuple[str, ...]
    prompts: tuple[Prompt, ...]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def class_index(self) -> np.ndarray:
        """For each prompt, the index of its class."""
        return np.array([p.class_index for p in self.prompts], dtype=np.int64)

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(p.group for p in self.prompts))

    def counts(self) -> dict[str, int]:
        return {c: sum(p.class_index == i for p in self.prompts) for i, c in enumerate(self.classes)}

    def group_indices(self, groups: list[str]) -> np.ndarray:
        """Positions of the prompts of `groups` in this set, in its (class-major) order, for ablations."""
        unknown = [g for g in groups if g not in self.groups]
        if unknown:
            raise ConfigError(f"no prompt group '{unknown[0]}' (groups: {', '.join(self.groups)})")
        return np.array([i for i, p in enumerate(self.prompts) if p.group in groups], dtype=np.int64)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {"class": [self.classes[p.class_index] for p in self.prompts], "group": [p.group for p in self.prompts],
             "text": self.texts}
        )


def list_prompt_sets() -> list[str]:
    return sorted(p.stem for p in PROMPT_SET_DIR.glob("*.yaml"))


def read_prompt_set_file(name_or_path: str) -> dict:
    """The groups of a built-in prompt set (by name) or of a prompt-set YAML file, in file order."""
    path = Path(name_or_path)
    if not name_or_path.endswith((".yaml", ".yml")):
        path = PROMPT_SET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"prompts: no built-in prompt set '{name_or_path}' "
                              f"(built-in: {', '.join(list_prompt_sets())}; or give the path of a .yaml file)")
    raw = read_yaml(path, "prompt-set")
    if not isinstance(raw, dict) or not isinstance(raw.get("groups"), dict) or not raw["groups"]:
        raise ConfigError(f"{path}: a prompt set needs a non-empty 'groups' mapping")
    for group, body in raw["groups"].items():
        ok_list = isinstance(body, list) and all(isinstance(t, str) for t in body)
        ok_map = isinstance(body, dict) and all(
            isinstance(v, list) and all(isinstance(t, str) for t in v) for v in body.values())
        if not isinstance(group, str):
            raise ConfigError(f"{path}: group name {group!r} must be text; quote it")
        if not (ok_list or ok_map):
            raise ConfigError(f"{path}: group '{group}' must be a list of templates or a mapping class -> prompts")
        for template in body if ok_list else []:
            _check_template(template, group, path)
        for name, texts in body.items() if ok_map else []:
            _check_literals(texts, name, group, path)
    return raw["groups"]


def _check_template(template: str, group: str, path: Path) -> None:
    """A template is filled with str.format(c=class name): {c} is its one placeholder, a literal brace is doubled."""
    where = f"{path}: template '{template}' in group '{group}'"
    try:
        fields = [(name, conversion, spec) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:
        raise ConfigError(f"{where} has a stray brace ({e}); write {{c}} for the class name and {{{{ or }}}} "
                          "for a literal brace") from None
    for name, conversion, spec in fields:
        if (name, conversion, spec) != ("c", None, ""):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(f"{where} has an unknown placeholder {shown}; the class name is written {{c}}")
    if not fields:
        raise ConfigError(f"{where} has no {{c}}; literal prompts go in a per-class mapping")


PLACEHOLDER = re.compile(r"\{[^{}]*\}")


def _check_literals(texts: list[str], name: str, group: str, path: Path) -> None:
    for text in texts:
        found = PLACEHOLDER.search(text)
        if found:
            raise ConfigError(f"{path}: literal prompt '{text}' for class '{name}' in group '{group}' has a "
                              f"placeholder {found.group()}; literal prompts are used as written, so put "
                              "templates in a list group")


def _expand(group: str, body, classes: tuple[str, ...], source: str) -> dict[int, list[str]]:
    if isinstance(body, list):
        return {i: [t.format(c=c) for t in body] for i, c in enumerate(classes)}
    unknown = [c for c in body if c not in classes]
    if unknown:
        raise ConfigError(f"{source}: group '{group}' names class '{unknown[0]}', not one of {', '.join(classes)}")
    return {classes.index(c): list(texts) for c, texts in body.items()}


def build_prompt_set(parts: list[tuple[str, dict[int, list[str]]]], classes: tuple[str, ...]) -> PromptSet:
    """Lay out (group, {class index: prompts}) parts class-major, in the order given."""
    prompts = [Prompt(i, group, text) for i in range(len(classes)) for group, per_class in parts
               for text in per_class.get(i, [])]
    empty = [c for i, c in enumerate(classes) if not any(p.class_index == i for p in prompts)]
    if empty:
        raise ConfigError(f"prompts: class '{empty[0]}' has no prompt in the chosen groups")
    _check_distinct(prompts, classes)
    return PromptSet(tuple(classes), tuple(prompts))


def _check_distinct(prompts: list[Prompt], classes: tuple[str, ...]) -> None:
    """A prompt twice for one class counts twice in its mean; one prompt for two classes cannot tell them apart."""
    first: dict[str, Prompt] = {}
    for p in prompts:
        seen = first.setdefault(p.text, p)
        if seen is p:
            continue
        groups = f"group {p.group}" if seen.group == p.group else f"groups {seen.group} and {p.group}"
        if seen.class_index == p.class_index:
            raise ConfigError(f"prompts: '{p.text}' appears twice (class {classes[p.class_index]}, {groups}); "
                              "remove one")
        raise ConfigError(f"prompts: '{p.text}' is a prompt of two classes ({classes[seen.class_index]} and "
                          f"{classes[p.class_index]}, {groups}), so it cannot tell them apart; remove one")


def load_prompts(spec: str | PromptSpec | list[PromptSpec], classes: list[str]) -> PromptSet:
    """The prompt set a run config asks for: a set name or file, a PromptSpec, or a list of them concatenated."""
    specs = spec if isinstance(spec, list) else [spec]
    classes = tuple(classes)
    parts = []
    for s in specs:
        s = PromptSpec(set=s) if isinstance(s, str) else s
        groups = read_prompt_set_file(s.set)
        chosen = list(groups) if s.groups is None else s.groups
        for g in list(chosen) + list(s.exclude or []):
            if g not in groups:
                raise ConfigError(f"prompts: set '{s.set}' has no group '{g}' (groups: {', '.join(groups)})")
        chosen = [g for g in chosen if g not in (s.exclude or [])]
        parts += [(g, _expand(g, groups[g], classes, s.set)) for g in chosen]
    return build_prompt_set(parts, classes)
