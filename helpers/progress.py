"""Notebooks executed without a live frontend (papermill, through `python -m helpers run`): what they show.

`helpers.run` sets `HELPERS_SAVED_RUN=1` in the environment of the kernels it starts. Under it:
- `tqdm.auto` gives text bars that print once, finished (`FinalLineTqdm`), instead of the notebook's widget bars:
  a saved widget bar shows its first state (`0%| | 0/64`) in a notebook that no frontend drew, and JupyterLab does
  not draw the widget state of a notebook it did not save itself;
- the widgets of `helpers.interactive` show a static picture and a line saying to run the notebook live.

`helpers/__init__.py` imports this module first, so that every module's `from tqdm.auto import tqdm` gets the text
bars when the variable is set.
"""

from __future__ import annotations

import os
import sys

import tqdm.auto
import tqdm.std

from .errors import environment_flag

SAVED_RUN_ENV = "HELPERS_SAVED_RUN"


def saved_run() -> bool:
    """Whether this process is a kernel that papermill executes for a saved run (no live frontend)."""
    return os.environ.get(SAVED_RUN_ENV, "") not in ("", "0", "false", "False")


def saved_run_kernels():
    """Within: the kernels this process starts (they inherit the environment) run as saved runs."""
    return environment_flag(SAVED_RUN_ENV)


class FinalLineTqdm(tqdm.std.tqdm):
    """A text bar that prints nothing while it runs and its final state once, when it closes (to stdout: a saved
    notebook shows it as plain output, not as an error-coloured stream)."""

    def __init__(self, *args, **kwargs):
        self._final = False
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("ascii", False)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self._final:
            return False  # nothing shown (so nothing to clear)
        return super().display(msg, pos)

    def close(self):
        # a bar that leaves no trace (leave=False) prints nothing at all
        self._final = self.leave is not False and not getattr(self, "disable", True)
        super().close()


def use_text_progress() -> None:
    """Make `tqdm.auto.tqdm` (and `tqdm.autonotebook.tqdm`) the final-line text bar, for modules imported after."""
    tqdm.auto.tqdm = FinalLineTqdm
    sys.modules["tqdm.autonotebook"].tqdm = FinalLineTqdm


if saved_run():
    use_text_progress()
