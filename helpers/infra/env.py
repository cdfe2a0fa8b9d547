"""Environment variables read as on/off switches."""

from __future__ import annotations

import os

_OFF = ("", "0", "false", "False", "FALSE", "no", "off")


def env_flag(name: str) -> bool:
    """Whether the environment variable `name` is on: set to anything but empty, 0, false, no or off."""
    return os.environ.get(name, "").strip() not in _OFF
