"""Registries: one per kind of extension point (a model backend, a preprocessing step, a scoring mode, a transductive
method), timm's pattern in small.

An entry registers itself where it is defined, with `@REGISTRY.register("name")`; a registry knows the module or
package its entries live in and imports it (every module of a package) on the first lookup, so adding an entry is
one module and one registration, with no list of names to keep elsewhere. The config's valid names are
`REGISTRY.names()`. This module imports nothing heavy; looking a name up imports the entries' modules (for backends
and scorers, torch), so `python -m helpers --help` and loading the config module stay fast.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable


class Registry:
    """Names -> registered objects of one kind, filled by the modules under `home` on first use."""

    def __init__(self, kind: str, home: str):
        self.kind, self.home = kind, home  # e.g. "backend", "helpers.models"
        self._entries: dict[str, object] = {}
        self._loaded = False

    def register(self, name: str) -> Callable:
        """A decorator: the class or function it decorates is this registry's entry `name`."""

        def add(obj):
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice ({self._entries[name]!r} and {obj!r})")
            self._entries[name] = obj
            return obj

        return add

    def register_class(self, name: str) -> Callable:
        """A class decorator: the class is entry `name`, and its `name` attribute says so (a step's cache key, a
        method's record, carry it)."""

        def add(cls):
            cls.name = name
            return self.register(name)(cls)

        return add

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: the modules imported below may look names up while they register
        package = importlib.import_module(self.home)
        for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
            importlib.import_module(f"{self.home}.{module.name}")

    def names(self) -> list[str]:
        """Sorted, as timm lists its models: registration follows import order, which differs between processes."""
        self._load()
        return sorted(self._entries)

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __getitem__(self, name: str):
        self._load()
        if name not in self._entries:
            raise KeyError(self.unknown(name))
        return self._entries[name]

    def items(self):
        self._load()
        return [(name, self._entries[name]) for name in self.names()]

    def unknown(self, name: str) -> str:
        """What to say of a name that is not registered: the registered ones, and the nearest."""
        near = difflib.get_close_matches(str(name), self._entries, n=1)
        return (f"'{name}' is not a registered {self.kind} (registered: {', '.join(sorted(self._entries))})"
                + (f"; did you mean '{near[0]}'?" if near else ""))
